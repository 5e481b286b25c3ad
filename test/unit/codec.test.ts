import { strict as assert } from 'assert';
import * as P from '../../src/nbd/protocol';
import {
  ByteQueue,
  encodeBlockStatus,
  encodeExportNameReply,
  encodeOptionReply,
  encodeSimpleReply,
  encodeStructuredError,
  parseInfoRequest,
  parseMetaContextRequest,
  parseOptionHeader,
  ProtocolError,
  readU64,
  Request,
  RequestParser,
  writeU64,
} from '../../src/nbd/wire';

function request(type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(P.REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(0xdead, 8);
  h.writeUInt32BE(cookie, 12);
  writeU64(h, offset, 16);
  h.writeUInt32BE(length, 24);
  return payload ? Buffer.concat([h, payload]) : h;
}

interface Seen {
  type: number;
  flags: number;
  cookieLo: number;
  offset: number;
  length: number;
  payloadHex: string | undefined;
}

function parseAll(chunks: Buffer[]): { reqs: Seen[]; errors: string[] } {
  const reqs: Seen[] = [];
  const errors: string[] = [];
  const p = new RequestParser({
    onRequest: (r: Request) =>
      reqs.push({ type: r.type, flags: r.flags, cookieLo: r.cookieLo, offset: r.offset, length: r.length, payloadHex: r.payload?.toString('hex') }),
    onFramingError: (m) => errors.push(m),
  });
  for (const c of chunks) p.feed(c);
  return { reqs, errors };
}

describe('nbd wire codec', () => {
  const payloadA = Buffer.from('0123456789abcdef'.repeat(5));
  const stream = Buffer.concat([
    request(P.CMD_WRITE, P.CMD_FLAG_FUA, 1, 4096, payloadA.length, payloadA),
    request(P.CMD_READ, 0, 2, 0, 512),
    request(P.CMD_FLUSH, 0, 3, 0, 0),
    request(P.CMD_WRITE, 0, 4, 2 ** 40, 3, Buffer.from('xyz')),
    request(P.CMD_BLOCK_STATUS, P.CMD_FLAG_REQ_ONE, 5, 123, 4567),
    request(P.CMD_WRITE, 0, 6, 0, 0),
    request(P.CMD_DISC, 0, 7, 0, 0),
  ]);
  const whole = parseAll([stream]);

  it('parses a stream of requests with payloads', () => {
    assert.deepEqual(whole.errors, []);
    assert.equal(whole.reqs.length, 7);
    assert.equal(whole.reqs[0]?.payloadHex, payloadA.toString('hex'));
    assert.equal(whole.reqs[0]?.flags, P.CMD_FLAG_FUA);
    assert.equal(whole.reqs[3]?.offset, 2 ** 40);
    assert.equal(whole.reqs[3]?.payloadHex, Buffer.from('xyz').toString('hex'));
    assert.equal(whole.reqs[4]?.type, P.CMD_BLOCK_STATUS);
    assert.equal(whole.reqs[5]?.payloadHex, undefined, 'zero-length write has no payload');
    assert.deepEqual(whole.reqs.map((r) => r.cookieLo), [1, 2, 3, 4, 5, 6, 7]);
  });

  it('parses identically when the stream is split at every byte offset', () => {
    for (let i = 0; i <= stream.length; i++) {
      const r = parseAll([stream.subarray(0, i), stream.subarray(i)]);
      assert.deepEqual(r, whole, `split at ${i}`);
    }
  });

  it('parses identically when split at every pair of offsets (three chunks)', () => {
    for (let i = 0; i <= stream.length; i += 3) {
      for (let j = i; j <= stream.length; j += 5) {
        const r = parseAll([stream.subarray(0, i), stream.subarray(i, j), stream.subarray(j)]);
        assert.deepEqual(r, whole, `split at ${i},${j}`);
      }
    }
  });

  it('parses identically when fed one byte at a time', () => {
    const chunks: Buffer[] = [];
    for (let i = 0; i < stream.length; i++) chunks.push(stream.subarray(i, i + 1));
    assert.deepEqual(parseAll(chunks), whole);
  });

  it('reports an oversized write at once and skips its payload without buffering it', () => {
    const big = P.MAX_PAYLOAD_BYTES + 1;
    const hdr = request(P.CMD_WRITE, 0, 9, 0, big);
    const seen: Request[] = [];
    const p = new RequestParser({ onRequest: (r) => seen.push(r), onFramingError: (m) => assert.fail(m) });
    p.feed(hdr);
    assert.equal(seen.length, 1);
    assert.equal(seen[0]?.payload, undefined);
    assert.equal(seen[0]?.length, big);
    // Stream the payload in 1 MiB pieces, then a normal request: it must parse.
    const mib = Buffer.alloc(1024 * 1024);
    let left = big;
    while (left > 0) {
      const k = Math.min(left, mib.length);
      p.feed(mib.subarray(0, k));
      left -= k;
    }
    p.feed(request(P.CMD_READ, 0, 10, 0, 1));
    assert.equal(seen.length, 2);
    assert.equal(seen[1]?.cookieLo, 10);
  });

  it('reports bad request magic as a framing error and stops parsing', () => {
    const bad = request(P.CMD_READ, 0, 1, 0, 1);
    bad.writeUInt32BE(0x12345678, 0);
    const r = parseAll([bad, request(P.CMD_READ, 0, 2, 0, 1)]);
    assert.equal(r.reqs.length, 0);
    assert.equal(r.errors.length, 1);
    assert.match(r.errors[0] ?? '', /bad request magic/);
  });

  it('maps 64-bit offsets beyond 2^53 to Infinity so range checks fail', () => {
    const b = Buffer.alloc(8);
    b.writeUInt32BE(0xffffffff, 0);
    b.writeUInt32BE(0xffffffff, 4);
    assert.equal(readU64(b, 0), Number.POSITIVE_INFINITY);
    writeU64(b, 2 ** 53 - 1, 0);
    assert.equal(readU64(b, 0), 2 ** 53 - 1);
  });

  describe('handshake parsing', () => {
    function optionBytes(option: number, data: Buffer): Buffer {
      const h = Buffer.alloc(16);
      h.writeUInt32BE(P.IHAVEOPT_HI, 0);
      h.writeUInt32BE(P.IHAVEOPT_LO, 4);
      h.writeUInt32BE(option, 8);
      h.writeUInt32BE(data.length, 12);
      return Buffer.concat([h, data]);
    }
    function goData(name: string, infos: number[]): Buffer {
      const n = Buffer.from(name);
      const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
      b.writeUInt32BE(n.length, 0);
      n.copy(b, 4);
      b.writeUInt16BE(infos.length, 4 + n.length);
      infos.forEach((v, i) => b.writeUInt16BE(v, 6 + n.length + 2 * i));
      return b;
    }

    it('parses option headers split at every byte offset', () => {
      const data = goData('exp', [P.INFO_NAME, P.INFO_BLOCK_SIZE]);
      const msg = Buffer.concat([optionBytes(P.OPT_GO, data), optionBytes(P.OPT_ABORT, Buffer.alloc(0))]);
      for (let i = 0; i <= msg.length; i++) {
        const q = new ByteQueue(1 << 16);
        q.push(msg.subarray(0, i));
        const out: Array<[number, string]> = [];
        // Same steps as the server's reader: header once 16 bytes are there, then its data.
        let pending: { option: number; lengthBytes: number } | undefined;
        const pump = (): void => {
          for (;;) {
            if (!pending) {
              if (q.length < 16) return;
              pending = parseOptionHeader(q);
              assert.ok(pending);
            }
            if (q.length < pending.lengthBytes) return;
            const d = q.take(pending.lengthBytes) ?? Buffer.alloc(0);
            out.push([pending.option, d.toString('hex')]);
            pending = undefined;
          }
        };
        pump();
        q.push(msg.subarray(i));
        pump();
        assert.deepEqual(out, [
          [P.OPT_GO, data.toString('hex')],
          [P.OPT_ABORT, ''],
        ], `split at ${i}`);
      }
    });

    it('rejects bad option magic', () => {
      const q = new ByteQueue(64);
      q.push(Buffer.alloc(16, 1));
      assert.throws(() => parseOptionHeader(q), ProtocolError);
    });

    it('parses INFO/GO requests and rejects inconsistent lengths', () => {
      assert.deepEqual(parseInfoRequest(goData('a', [1, 3])), { name: 'a', infos: [1, 3] });
      assert.deepEqual(parseInfoRequest(goData('', [])), { name: '', infos: [] });
      const bad = goData('abc', [1]);
      bad.writeUInt32BE(1000, 0);
      assert.throws(() => parseInfoRequest(bad), ProtocolError);
      const extra = Buffer.concat([goData('abc', [1]), Buffer.alloc(1)]);
      assert.throws(() => parseInfoRequest(extra), ProtocolError);
      const longName = goData('x'.repeat(P.MAX_STRING_BYTES + 1), []);
      assert.throws(() => parseInfoRequest(longName), /longer than/);
    });

    it('parses meta context requests and rejects hostile counts', () => {
      const q = Buffer.from('base:allocation');
      const b = Buffer.alloc(4 + 1 + 4 + 4 + q.length);
      b.writeUInt32BE(1, 0);
      b.write('e', 4);
      b.writeUInt32BE(1, 5);
      b.writeUInt32BE(q.length, 9);
      q.copy(b, 13);
      assert.deepEqual(parseMetaContextRequest(b), { name: 'e', queries: ['base:allocation'] });
      const hostile = Buffer.from(b);
      hostile.writeUInt32BE(0xffffffff, 5);
      assert.throws(() => parseMetaContextRequest(hostile), ProtocolError);
      const hostileLen = Buffer.from(b);
      hostileLen.writeUInt32BE(0x7fffffff, 9);
      assert.throws(() => parseMetaContextRequest(hostileLen), ProtocolError);
    });

    it('bounds the handshake queue', () => {
      const q = new ByteQueue(10);
      q.push(Buffer.alloc(10));
      assert.throws(() => q.push(Buffer.alloc(1)), /exceeds/);
    });
  });

  describe('encoders', () => {
    it('encodes option replies', () => {
      const b = encodeOptionReply(P.OPT_GO, P.REP_ERR_UNKNOWN, Buffer.from('no'));
      assert.equal(b.readUInt32BE(0), P.OPTION_REPLY_MAGIC_HI);
      assert.equal(b.readUInt32BE(4), P.OPTION_REPLY_MAGIC_LO);
      assert.equal(b.readUInt32BE(8), P.OPT_GO);
      assert.equal(b.readUInt32BE(12), P.REP_ERR_UNKNOWN);
      assert.equal(b.readUInt32BE(16), 2);
      assert.equal(b.toString('utf8', 20), 'no');
    });
    it('encodes the EXPORT_NAME reply with and without zero padding', () => {
      assert.equal(encodeExportNameReply(1 << 20, 1, false).length, 134);
      const b = encodeExportNameReply(1 << 20, 0x1ff, true);
      assert.equal(b.length, 10);
      assert.equal(readU64(b, 0), 1 << 20);
      assert.equal(b.readUInt16BE(8), 0x1ff);
    });
    it('encodes simple, error and block status replies', () => {
      const s = encodeSimpleReply(P.EINVAL, 1, 2);
      assert.deepEqual([s.readUInt32BE(0), s.readUInt32BE(4), s.readUInt32BE(8), s.readUInt32BE(12)], [P.SIMPLE_REPLY_MAGIC, P.EINVAL, 1, 2]);
      const e = encodeStructuredError(1, 2, P.EIO, 'bad');
      assert.equal(e.readUInt32BE(0), P.STRUCTURED_REPLY_MAGIC);
      assert.equal(e.readUInt16BE(4), P.REPLY_FLAG_DONE);
      assert.equal(e.readUInt16BE(6), P.REPLY_TYPE_ERROR);
      assert.equal(e.readUInt32BE(16), 6 + 3);
      assert.equal(e.readUInt32BE(20), P.EIO);
      assert.equal(e.readUInt16BE(24), 3);
      const bs = encodeBlockStatus(1, 2, 7, [{ lengthBytes: 4096, flags: 3 }, { lengthBytes: 512, flags: 0 }]);
      assert.equal(bs.readUInt16BE(6), P.REPLY_TYPE_BLOCK_STATUS);
      assert.equal(bs.readUInt32BE(16), 4 + 16);
      assert.deepEqual([bs.readUInt32BE(20), bs.readUInt32BE(24), bs.readUInt32BE(28), bs.readUInt32BE(32), bs.readUInt32BE(36)], [7, 4096, 3, 512, 0]);
    });
  });
});
