/**
 * Protocol points of issue 11 on a raw socket (doc/proto.md of NetworkBlockDevice/nbd):
 * - FUA is accepted on every command once SEND_FUA is advertised (ignored where it
 *   means nothing: READ, FLUSH, CACHE, BLOCK_STATUS);
 * - a zero-length READ with structured replies gets one ERROR chunk (EINVAL, DONE), as
 *   nbdkit answers it, never an 8-byte OFFSET_DATA chunk (a chunk covers >= 1 byte);
 * - requests up to 64 MiB (nbdkit's limit; the NBD project's integrityhuge test needs
 *   ~48 MiB over EXPORT_NAME, where no BLOCK_SIZE is seen) are accepted; larger ones are
 *   refused without being buffered.
 * Runs against the memory and engine backends (the engine's own per-call limit is
 * 32 MiB: the NBD layer splits larger requests).
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import { MiB, Server, cleanupAll, rssBytes, startServer } from './harness';
import {
  CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, ERR, FLAG_FIXED_NEWSTYLE, OPT, RawConn, Session, TFLAG, clientFlags, negotiate, nextCookie,
  option, readChunksUntilDone, readGreeting, readSimpleReply, request, simpleCommand, simpleRead, targetOf,
} from './rawnbd';

const SIZE_BYTES = 256 * MiB;
/** RSS bound after 64 MiB requests: one request buffer in, one out, plus the runtime. */
const RSS_LIMIT_BYTES = 400 * MiB;

/** Any reply (simple, or structured chunks until DONE) to a non-READ command: its error. */
async function anyReplyError(s: Session, cookie: bigint): Promise<number> {
  if (!s.structured) {
    const r = await readSimpleReply(s.conn);
    assert.equal(r.cookie, cookie);
    return r.error;
  }
  const head = await s.conn.read(4, 'reading a reply magic');
  if (head.readUInt32BE(0) === 0x67446698) {
    const rest = await s.conn.read(12);
    assert.equal(rest.readBigUInt64BE(4), cookie);
    return rest.readUInt32BE(0);
  }
  assert.equal(head.readUInt32BE(0), 0x668e33ef, 'reply magic');
  let error = 0;
  for (let first = true; ; first = false) {
    const h: Buffer = first ? Buffer.concat([head, await s.conn.read(16)]) : await s.conn.read(20);
    assert.equal(h.readBigUInt64BE(8), cookie);
    const data = await s.conn.read(h.readUInt32BE(16));
    if ((h.readUInt16BE(6) & 0x8000) !== 0 && error === 0) error = data.readUInt32BE(0);
    if ((h.readUInt16BE(4) & CHUNK_FLAG_DONE) !== 0) return error;
  }
}

for (const backend of ['memory', 'engine'] as const) {
  describe(`e2e protocol conformance (issue 11 points 1-3): ${backend} backend`, function () {
    this.timeout(60_000);
    let server: Server;
    const conns: RawConn[] = [];
    async function session(opts: { structured?: boolean; blockStatus?: boolean } = {}): Promise<Session> {
      const c = await RawConn.connect(targetOf(server));
      conns.push(c);
      return negotiate(c, opts);
    }
    before(async function () {
      server = await startServer({ backend, transport: 'unix', sizeBytes: SIZE_BYTES });
    });
    afterEach(function () {
      for (const c of conns.splice(0)) c.destroy();
    });
    after(async function () {
      if (server) assert.equal(await server.stop(), 0, server.stderr().slice(-2000));
      await cleanupAll();
    });

    for (const structured of [false, true]) {
      it(`accepts FUA on every command when SEND_FUA is advertised (${structured ? 'structured' : 'simple'} replies)`, async function () {
        const s = await session({ structured, blockStatus: structured });
        assert.ok((s.info.transmissionFlags & TFLAG.SEND_FUA) !== 0, 'SEND_FUA advertised');
        const data = Buffer.alloc(4096, 0x42);
        const cases: Array<[string, number, number, Buffer | undefined]> = [
          ['WRITE', CMD.WRITE, 4096, data],
          ['READ', CMD.READ, 4096, undefined],
          ['FLUSH', CMD.FLUSH, 0, undefined],
          ['TRIM', CMD.TRIM, 4096, undefined],
          ['WRITE_ZEROES', CMD.WRITE_ZEROES, 4096, undefined],
          ['CACHE', CMD.CACHE, 4096, undefined],
        ];
        if (structured) cases.push(['BLOCK_STATUS', CMD.BLOCK_STATUS, 4096, undefined]);
        for (const [name, type, length, payload] of cases) {
          const cookie = nextCookie();
          await s.conn.write(request({ type, flags: CMD_FLAG.FUA, cookie, offset: 8 * MiB, length }, payload));
          if (type === CMD.READ && !structured) {
            const r = await readSimpleReply(s.conn);
            assert.equal(r.error, 0, `READ with FUA: error ${r.error}`);
            await s.conn.read(length);
          } else if (type === CMD.READ) {
            const r = await readChunksUntilDone(s.conn);
            assert.equal(r.error, 0, `READ with FUA: error ${r.error}`);
          } else {
            assert.equal(await anyReplyError(s, cookie), 0, `${name} with FUA`);
          }
        }
        if (!structured) assert.equal((await simpleRead(s, 0, 512, 1 << 9)).error, ERR.EINVAL, 'an undefined flag is still EINVAL');
      });
    }

    it('answers a zero-length READ with structured replies with one EINVAL ERROR chunk, as nbdkit does', async function () {
      const s = await session({ structured: true });
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.READ, cookie, offset: 4096, length: 0 }));
      const { chunks, error } = await readChunksUntilDone(s.conn);
      assert.equal(chunks.length, 1, `one chunk, got ${JSON.stringify(chunks.map((c) => [c.type, c.data.length]))}`);
      const ch = chunks[0] as (typeof chunks)[number];
      assert.equal(ch.cookie, cookie);
      assert.equal(ch.type, CHUNK.ERROR, `chunk type ${ch.type}: an OFFSET_DATA chunk must cover at least one byte`);
      assert.equal(error, ERR.EINVAL);
      assert.equal(ch.data.length, 6 + ch.data.readUInt16BE(4), 'ERROR chunk framing');
      // The connection stays usable.
      const next = nextCookie();
      await s.conn.write(request({ type: CMD.READ, cookie: next, offset: 0, length: 512 }));
      const r = await readChunksUntilDone(s.conn);
      assert.equal(r.error, 0);
    });

    it('answers a zero-length READ with simple replies with EINVAL and stays connected', async function () {
      const s = await session();
      assert.equal((await simpleRead(s, 4096, 0)).error, ERR.EINVAL);
      assert.equal((await simpleRead(s, 0, 512)).error, 0);
    });

    it('accepts a 64 MiB WRITE and READ over EXPORT_NAME (no BLOCK_SIZE seen), data intact', async function () {
      const c = await RawConn.connect(targetOf(server));
      conns.push(c);
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | 2));
      await c.write(option(OPT.EXPORT_NAME, Buffer.alloc(0)));
      await c.read(10, 'reading the EXPORT_NAME reply');
      const s: Session = { conn: c, greeting: { handshakeFlags: 3 }, info: { sizeBytes: BigInt(SIZE_BYTES), transmissionFlags: 0, replies: [] }, structured: false };
      const data = crypto.randomBytes(64 * MiB);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 100 * MiB + 512, length: data.length }, data), 0, '64 MiB write');
      const r = await simpleRead(s, 100 * MiB + 512, data.length);
      assert.equal(r.error, 0, '64 MiB read');
      assert.ok(r.data?.equals(data), '64 MiB reads back intact');
      const rss = rssBytes(server.pid);
      assert.ok(rss < RSS_LIMIT_BYTES, `RSS ${(rss / MiB).toFixed(0)} MiB after 64 MiB requests`);
    });

    it('advertises 64 MiB as the maximum payload in NBD_INFO_BLOCK_SIZE', async function () {
      const s = await session();
      assert.equal(s.info.blockSizes?.maximum, 64 * MiB);
    });

    it('refuses a 64 MiB + 1 byte WRITE without buffering it and stays usable', async function () {
      const s = await session();
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.WRITE, cookie, offset: 0, length: 64 * MiB + 1 }));
      await s.conn.writeFiller(64 * MiB + 1);
      const r = await readSimpleReply(s.conn, 20_000);
      assert.equal(r.cookie, cookie);
      assert.ok(r.error === ERR.EINVAL || r.error === ERR.EOVERFLOW, `error ${r.error}`);
      assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'usable after the payload was skipped');
    });
  });
}
