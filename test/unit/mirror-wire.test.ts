/**
 * The mirror wire codec (src/mirror/wire.ts): every message type round-trips through
 * FrameWriter / FrameParser; a stream parses identically however it is chunked; hostile
 * input (bad magic, version, type, lengths, checksums, frame numbers, field ranges) is a
 * MirrorProtocolError with a precise message, after which the parser stays failed and
 * holds nothing. Random tests are seeded: MIRROR_FC_SEED=N replays a run.
 */
import * as zlib from 'zlib';
import { strict as assert } from 'assert';
import fc from 'fast-check';
import { crc32c } from '../../src/io/native';
import {
  BLOCK_BYTES,
  BLOCKS_PER_FRAME_MAX,
  decodeBody,
  DELTAS_BODY_MAX_BYTES,
  DELTAS_PER_FRAME_MAX,
  encodeBody,
  FRAME_BODY_MAX_BYTES,
  FRAME_HEADER_BYTES,
  FRAME_MAGIC,
  FrameParser,
  FrameWriter,
  MirrorProtocolError,
  MsgType,
  putU64,
  readU53,
  RECORD_PAYLOAD_MAX_BYTES,
  REFS_PER_FRAME_MAX,
  WIRE_VERSION,
  type Message,
} from '../../src/mirror/wire';
import { SlabPool } from '../../src/mirror/slab-pool';

const SEED = process.env.MIRROR_FC_SEED !== undefined ? Number(process.env.MIRROR_FC_SEED) : Date.now() % 0x7fffffff;
const U53_MAX = Number.MAX_SAFE_INTEGER;
const UUID = '0123abcd-4567-89ef-0011-223344556677';

/** Per type, the body cap the header check enforces (as documented in wire.ts). */
const BODY_CAP: Record<number, number> = {
  [MsgType.Hello]: 96 + 16 + 8 + 8 + 15 * 16 + 8 + 15 * 16,
  [MsgType.Welcome]: 72,
  [MsgType.Refuse]: 2 + 1024,
  [MsgType.Record]: 40 + RECORD_PAYLOAD_MAX_BYTES,
  [MsgType.RecordAck]: 24,
  [MsgType.DurableReq]: 8,
  [MsgType.CpBegin]: 17,
  [MsgType.CpBlocks]: 12 + BLOCKS_PER_FRAME_MAX * (8 + BLOCK_BYTES),
  [MsgType.CpRefs]: 12 + REFS_PER_FRAME_MAX * 24,
  [MsgType.CpDeltas]: DELTAS_BODY_MAX_BYTES,
  [MsgType.CpCommit]: 20 + BLOCK_BYTES,
  [MsgType.CpAck]: 32,
  [MsgType.Pin]: 8,
  [MsgType.Ping]: 8,
  [MsgType.ReadReq]: 8 + BLOCKS_PER_FRAME_MAX * 8,
  [MsgType.ReadResp]: 8 + BLOCKS_PER_FRAME_MAX * (8 + BLOCK_BYTES),
  [MsgType.CpAbort]: 8,
};
const TYPE_NAME: Record<number, string> = {
  [MsgType.Hello]: 'HELLO', [MsgType.Welcome]: 'WELCOME', [MsgType.Refuse]: 'REFUSE', [MsgType.Record]: 'RECORD',
  [MsgType.RecordAck]: 'RECORD_ACK', [MsgType.DurableReq]: 'DURABLE_REQ', [MsgType.CpBegin]: 'CP_BEGIN', [MsgType.CpBlocks]: 'CP_BLOCKS',
  [MsgType.CpRefs]: 'CP_REFS', [MsgType.CpDeltas]: 'CP_DELTAS', [MsgType.CpCommit]: 'CP_COMMIT', [MsgType.CpAck]: 'CP_ACK',
  [MsgType.Pin]: 'PIN', [MsgType.Ping]: 'PING', [MsgType.ReadReq]: 'READ_REQ', [MsgType.ReadResp]: 'READ_RESP',
  [MsgType.CpAbort]: 'CP_ABORT',
};
/** Type codes no message uses. */
const UNKNOWN_TYPES = [0, 200, 254, 255];
const ALL_TYPES = Object.keys(BODY_CAP).map(Number);

/** Every message a protocol error may be reported with (anything else is a wrapped internal error). */
const KNOWN_ERROR =
  /^(bad frame magic \(not an nvmirror mirror stream\)|unsupported wire version \d+|unknown frame type \d+|frame type \d+: body of \d+ bytes exceeds its cap of \d+|frame number \d+ where \d+ was due \(replayed, lost or reordered frame\)|frame \d+ \(type \d+\): checksum mismatch|frame type \d+: body too short|frame type \d+: \d+ unexpected trailing bytes|frame type \d+: \w+( length)? out of range|hello: unknown mode \d+|hello: bad volume size \d+|hello: lineage.+|hello: started at seq \d+, past its newest seq \d+|hello: \d+ earlier sessions \(at most \d+\)|refuse: reason too long|record \d+: unknown type \d+|record \d+: bad range|record \d+: bad payload length \d+|cp begin: unknown kind \d+|cp begin: base CP -?\d+ is not before CP \d+|cp blocks: count \d+|cp refs: count \d+|cp deltas: count \d+|cp deltas: entries do not inflate \(.*\)|cp deltas: entries inflate to \d+ bytes, the header says \d+|cp deltas: \d+ bytes inflated exceed the cap of \d+|cp begin: only a baseline resumes|read: count \d+)$/;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

function root(seed: number): Buffer {
  return pattern(24, seed);
}

/** One or more messages of every type, with fields at their extremes. */
function samples(): Message[] {
  const refs = (n: number) => Array.from({ length: n }, (_, i) => ({ pba: i * 7 + 1, seq: U53_MAX - i, index: (i * 31) % 257, crc: (0xfedcba98 + i) >>> 0 }));
  return [
    { type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 1024 ** 4, deviceBlocks: 12345, nvramBytes: 64 << 20, mode: 'sync', sourceCp: -1, streamFromSeq: 0, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '5eed5eed5eed5eed', lineage: [{ id: '00000000000000a1', firstCp: 0 }], earlier: [] },
    { type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 4096, deviceBlocks: U53_MAX, nvramBytes: 0, mode: 'async', sourceCp: U53_MAX, streamFromSeq: U53_MAX, baseCp: 7, baseRoot: Buffer.alloc(24, 0xa5), lastSeq: U53_MAX, startedAtSeq: U53_MAX - 5, processId: 'ffffffffffffff01', lineage: Array.from({ length: 15 }, (_, i) => ({ id: (0xfff0 - i).toString(16).padStart(16, 'f'), firstCp: U53_MAX - i * 1000 })), earlier: Array.from({ length: 15 }, (_, i) => ({ id: (0xabc0 + i).toString(16).padStart(16, 'e'), startedAtSeq: U53_MAX - i })) },
    { type: MsgType.Welcome, committedCp: -1, root: Buffer.alloc(24), storedFromSeq: 1, heldSeq: 0, oldestPinnedCp: -1, resumeCp: -1, resumeBlocks: 0 },
    { type: MsgType.Welcome, committedCp: 77, root: root(1), storedFromSeq: U53_MAX, heldSeq: U53_MAX - 1, oldestPinnedCp: 70, resumeCp: U53_MAX, resumeBlocks: U53_MAX },
    { type: MsgType.Refuse, reason: '' },
    { type: MsgType.Refuse, reason: 'source 0123 is already connected: ünïcødé ✓' },
    { type: MsgType.Refuse, reason: 'x'.repeat(1024) },
    { type: MsgType.Record, seq: 1, recordType: 1, flags: 0, offsetBytes: 0, lengthBytes: BLOCK_BYTES, payload: pattern(BLOCK_BYTES, 2) },
    { type: MsgType.Record, seq: U53_MAX, recordType: 1, flags: 0xff, offsetBytes: U53_MAX - (U53_MAX % BLOCK_BYTES), lengthBytes: RECORD_PAYLOAD_MAX_BYTES, payload: pattern(RECORD_PAYLOAD_MAX_BYTES, 3) },
    { type: MsgType.Record, seq: 42, recordType: 2, flags: 1, offsetBytes: 8192, lengthBytes: 1024 ** 3, payload: Buffer.alloc(0) },
    { type: MsgType.Record, seq: 43, recordType: 3, flags: 2, offsetBytes: 4096 * 1000, lengthBytes: 4096, payload: Buffer.alloc(0) },
    { type: MsgType.RecordAck, heldSeq: 10, durableSeq: 9, storedFromSeq: 1 },
    { type: MsgType.RecordAck, heldSeq: U53_MAX, durableSeq: 0, storedFromSeq: U53_MAX },
    { type: MsgType.DurableReq, seq: 0 },
    { type: MsgType.DurableReq, seq: U53_MAX },
    { type: MsgType.CpBegin, cp: 0, baseCp: -1, kind: 'resync' },
    { type: MsgType.CpBegin, cp: U53_MAX, baseCp: U53_MAX - 1, kind: 'cp' },
    { type: MsgType.CpBegin, cp: 12, baseCp: -1, kind: 'resume' },
    { type: MsgType.CpBlocks, cp: 5, pbas: [U53_MAX], data: pattern(BLOCK_BYTES, 4) },
    { type: MsgType.CpBlocks, cp: 6, pbas: Array.from({ length: BLOCKS_PER_FRAME_MAX }, (_, i) => 1000 + 2 * i), data: pattern(BLOCKS_PER_FRAME_MAX * BLOCK_BYTES, 5) },
    { type: MsgType.CpRefs, cp: 5, refs: refs(1) },
    { type: MsgType.CpRefs, cp: 6, refs: refs(REFS_PER_FRAME_MAX) },
    { type: MsgType.CpDeltas, cp: 5, deltas: [{ pba: 9, prevPba: U53_MAX, crc: 0xffffffff, delta: Buffer.alloc(0) }, { pba: 10, prevPba: 3, crc: 1, delta: pattern(100, 8) }] },
    { type: MsgType.CpDeltas, cp: 6, deltas: [{ pba: U53_MAX, prevPba: 0, crc: 0, delta: pattern(0xffff, 9) }, ...Array.from({ length: 300 }, (_, i) => ({ pba: i, prevPba: i + 1, crc: i * 3, delta: pattern(i, i) }))] },
    { type: MsgType.CpCommit, cp: 5, slot: 0xffffffff, blockCount: U53_MAX, superblock: pattern(BLOCK_BYTES, 6) },
    { type: MsgType.CpCommit, cp: 0, slot: 0, blockCount: 0, superblock: Buffer.alloc(BLOCK_BYTES) },
    { type: MsgType.CpAck, cp: 5, root: root(7) },
    { type: MsgType.Pin, oldestPinnedCp: -1 },
    { type: MsgType.Pin, oldestPinnedCp: U53_MAX },
    { type: MsgType.Ping, nowMs: 0 },
    { type: MsgType.Ping, nowMs: 1_764_500_000_000 },
    { type: MsgType.CpAbort, cp: 0 },
    { type: MsgType.CpAbort, cp: U53_MAX },
    { type: MsgType.ReadReq, id: 0, pbas: [U53_MAX] },
    { type: MsgType.ReadReq, id: 0xffffffff, pbas: Array.from({ length: BLOCKS_PER_FRAME_MAX }, (_, i) => i * 3) },
    { type: MsgType.ReadResp, id: 7, pbas: [5], data: pattern(BLOCK_BYTES, 10) },
    { type: MsgType.ReadResp, id: 8, pbas: Array.from({ length: BLOCKS_PER_FRAME_MAX }, (_, i) => U53_MAX - i), data: pattern(BLOCKS_PER_FRAME_MAX * BLOCK_BYTES, 11) },
  ];
}

/** Small frames only (a few hundred bytes in all), for exhaustive splitting. */
function smallSamples(): Message[] {
  return samples().filter((m) => {
    const n = encodeBody(m).reduce((a, b) => a + b.length, 0);
    return n <= 200;
  });
}

function frameOf(w: FrameWriter, m: Message): Buffer {
  return Buffer.concat(w.frame(m));
}

function streamOf(msgs: Message[]): Buffer {
  const w = new FrameWriter();
  const s = Buffer.concat(msgs.map((m) => frameOf(w, m)));
  assert.equal(w.bytesOut, s.length);
  return s;
}

/** A frame built by hand: any type, body, frame number, magic and version, with a valid checksum unless given. */
function rawFrame(type: number, body: Buffer, o: { frameNo?: number; magic?: number; version?: number; lengthBytes?: number; crc?: number } = {}): Buffer {
  const h = Buffer.alloc(FRAME_HEADER_BYTES);
  h.writeUInt32LE(o.magic ?? FRAME_MAGIC, 0);
  h.writeUInt8(type, 4);
  h.writeUInt8(o.version ?? WIRE_VERSION, 5);
  h.writeUInt32LE(o.lengthBytes ?? body.length, 8);
  h.writeBigUInt64LE(BigInt(o.frameNo ?? 0), 12);
  const crc = o.crc ?? crc32c(body, 0, body.length, crc32c(h, 0, 20));
  h.writeUInt32LE(crc, 20);
  return Buffer.concat([h, body]);
}

function bodyOf(m: Message): Buffer {
  return Buffer.concat(encodeBody(m));
}

/**
 * A FrameParser whose RECORD messages are checked for their block checksums (each 4 KiB
 * block's crc32c, set by the parser) and then given back without them, so they compare
 * equal to the messages that were framed.
 */
class CheckedParser extends FrameParser {
  override push(chunk: Buffer): Message[] {
    const out = super.push(chunk);
    for (const m of out) {
      if (m.type !== MsgType.Record) continue;
      const blocks = m.payload.length / BLOCK_BYTES;
      if (blocks === 0) {
        assert.equal(m.blockCrcs, undefined, `record ${m.seq} without payload has block checksums`);
        continue;
      }
      assert.ok(m.blockCrcs && m.blockCrcs.length === 4 * blocks, `record ${m.seq}: block checksums of ${blocks} blocks`);
      for (let i = 0; i < blocks; i++) assert.equal(m.blockCrcs.readUInt32LE(4 * i), crc32c(m.payload, i * BLOCK_BYTES, BLOCK_BYTES), `record ${m.seq} block ${i}`);
      delete m.blockCrcs;
    }
    return out;
  }
}

function parseChunks(chunks: Buffer[]): Message[] {
  const p = new CheckedParser();
  const out: Message[] = [];
  let total = 0;
  for (const c of chunks) {
    for (const m of p.push(c)) out.push(m);
    total += c.length;
    assert.ok(p.bufferedBytes < FRAME_HEADER_BYTES + FRAME_BODY_MAX_BYTES, `parser holds ${p.bufferedBytes} bytes`);
  }
  assert.equal(p.bufferedBytes, 0, 'a whole stream leaves nothing buffered');
  assert.equal(p.bytesIn, total);
  return out;
}

/** Asserts `f` throws a MirrorProtocolError whose message matches `re`; returns it. */
function protocolError(f: () => unknown, re: RegExp): MirrorProtocolError {
  let caught: unknown;
  try {
    f();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught !== undefined, `expected a MirrorProtocolError matching ${re}, nothing was thrown`);
  assert.ok(caught instanceof MirrorProtocolError, `expected a MirrorProtocolError, got ${String(caught)}`);
  assert.match(caught.message, re);
  assert.match(caught.message, KNOWN_ERROR, 'the message is one of the codec\'s own, not a wrapped internal error');
  assert.equal(caught.name, 'MirrorProtocolError');
  return caught;
}

/** Feeds `bad` to a parser (after `before`), expects the error, then checks that the parser stays failed and holds nothing. */
function rejects(bad: Buffer, re: RegExp, before: Buffer[] = []): MirrorProtocolError {
  const p = new CheckedParser();
  for (const b of before) p.push(b);
  const e = protocolError(() => p.push(bad), re);
  assert.equal(p.bufferedBytes, 0, 'a failed parser holds nothing');
  // Stays failed: the same error for any later input, even a valid frame or nothing.
  const next = frameOf(new FrameWriter(), { type: MsgType.Ping, nowMs: 1 });
  assert.throws(() => p.push(next), (x: unknown) => x === e);
  assert.throws(() => p.push(Buffer.alloc(0)), (x: unknown) => x === e);
  assert.equal(p.bufferedBytes, 0);
  return e;
}

describe('mirror wire codec', () => {
  before(() => {
    // eslint-disable-next-line no-console
    console.log(`      mirror-wire: fast-check seed ${SEED} (replay with MIRROR_FC_SEED=${SEED})`);
  });

  it('u64 fields: exact up to 2^53 - 1, out of range above it (no BigInt on the hot path)', () => {
    const b = Buffer.alloc(8);
    for (const v of [0, 1, 0xffffffff, 0x100000000, 2 ** 40 + 12345, Number.MAX_SAFE_INTEGER]) {
      putU64(b, 0, v);
      assert.equal(b.readBigUInt64LE(0), BigInt(v), `putU64(${v})`);
      assert.equal(readU53(b, 0), v, `readU53 of ${v}`);
    }
    for (const big of [2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, (2n ** 53n - 1n) | (1n << 60n)]) {
      b.writeBigUInt64LE(big, 0);
      assert.equal(readU53(b, 0), -1, `readU53 of ${big}`);
    }
  });

  describe('round trips', () => {
    const seen = new Map<number, number>();
    for (const m of samples()) {
      const body = bodyOf(m);
      const nth = (seen.get(m.type) ?? 0) + 1;
      seen.set(m.type, nth);
      it(`${TYPE_NAME[m.type]} #${nth} (${body.length}-byte body) parses back to the message FrameWriter framed`, () => {
        const w = new FrameWriter();
        const f = frameOf(w, m);
        assert.equal(f.length, FRAME_HEADER_BYTES + body.length);
        assert.equal(f.readUInt32LE(0), FRAME_MAGIC);
        assert.equal(f.readUInt8(4), m.type);
        assert.equal(f.readUInt8(5), WIRE_VERSION);
        assert.equal(f.readUInt16LE(6), 0);
        assert.equal(f.readUInt32LE(8), body.length);
        assert.equal(f.readBigUInt64LE(12), 0n);
        assert.equal(f.readUInt32LE(20), crc32c(f, FRAME_HEADER_BYTES, body.length, crc32c(f, 0, 20)), 'crc32c of header bytes 0..20, then the body');
        assert.ok(f.subarray(FRAME_HEADER_BYTES).equals(body));
        assert.ok(body.length <= BODY_CAP[m.type]!);
        const p = new CheckedParser();
        const got = p.push(f);
        assert.deepStrictEqual(got, [m]);
        assert.equal(p.bufferedBytes, 0);
        assert.equal(p.bytesIn, f.length);
        assert.deepStrictEqual(decodeBody(m.type, body), m);
      });
    }

    it('covers every message type', () => {
      assert.deepStrictEqual([...new Set(samples().map((m) => m.type as number))].sort((a, b) => a - b), [...ALL_TYPES].sort((a, b) => a - b));
      for (const t of ALL_TYPES) assert.ok(TYPE_NAME[t] !== undefined);
      // And no other code decodes: every other type byte is unknown.
      for (let t = 0; t < 256; t++) {
        if (ALL_TYPES.includes(t)) continue;
        protocolError(() => decodeBody(t, Buffer.alloc(64)), new RegExp(`^unknown frame type ${t}$`));
      }
    });

    it('frame numbers count up per writer and the parser follows them', () => {
      const w = new FrameWriter();
      const p = new CheckedParser();
      for (let i = 0; i < 300; i++) {
        const f = frameOf(w, { type: MsgType.Ping, nowMs: i });
        assert.equal(f.readBigUInt64LE(12), BigInt(i));
        assert.deepStrictEqual(p.push(f), [{ type: MsgType.Ping, nowMs: i }]);
      }
    });

    it('CP blocks sent in pieces (views of the read buffers, as a resync sends them) frame to the same bytes as one buffer', () => {
      const data = pattern(BLOCKS_PER_FRAME_MAX * BLOCK_BYTES, 12);
      const pbas = Array.from({ length: BLOCKS_PER_FRAME_MAX }, (_, i) => 7 + i);
      const blocks = pbas.map((_, i) => data.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES));
      // Two separate read buffers: blocks 0..9 from one, the rest from another.
      const other = Buffer.from(data.subarray(10 * BLOCK_BYTES));
      const views = [data.subarray(0, 10 * BLOCK_BYTES), other];
      const whole = Buffer.concat(new FrameWriter().frame({ type: MsgType.CpBlocks, cp: 3, pbas, data }));
      const parts = Buffer.concat(new FrameWriter().frame({ type: MsgType.CpBlocks, cp: 3, pbas, data: views }));
      assert.ok(parts.equals(whole));
      assert.deepStrictEqual(new CheckedParser().push(parts), [{ type: MsgType.CpBlocks, cp: 3, pbas, data }]);
      assert.throws(() => new FrameWriter().frame({ type: MsgType.CpBlocks, cp: 3, pbas, data: views.slice(1) }), /CpBlocks shape/);
      // With the blocks' crc32c given, the checksum is combined from them: the same frame.
      const crcs = blocks.map((b) => crc32c(b, 0, b.length, 0));
      const combined = Buffer.concat(new FrameWriter().frame({ type: MsgType.CpBlocks, cp: 3, pbas, data: views, crcs }));
      assert.ok(combined.equals(whole), 'the combined checksum differs from the one read over the data');
      // A wrong one makes a frame the receiver refuses, never a block applied with it.
      const bad = [...crcs];
      bad[17] = (bad[17]! ^ 1) >>> 0;
      const lie = Buffer.concat(new FrameWriter().frame({ type: MsgType.CpBlocks, cp: 3, pbas, data: views, crcs: bad }));
      protocolError(() => new CheckedParser().push(lie), /^frame 0 \(type 8\): checksum mismatch$/);
    });

    it('a RECORD framed in one Buffer (recordFrame, from the payload\'s parts) is byte for byte the frame() of the message', () => {
      const w1 = new FrameWriter();
      const w2 = new FrameWriter();
      const samples = [
        { seq: 1, recordType: 1, flags: 0, offsetBytes: 0, lengthBytes: BLOCK_BYTES, payload: pattern(BLOCK_BYTES, 2) },
        { seq: U53_MAX, recordType: 1, flags: 0xff, offsetBytes: U53_MAX - (U53_MAX % BLOCK_BYTES), lengthBytes: 3 * BLOCK_BYTES, payload: pattern(3 * BLOCK_BYTES, 3) },
        { seq: 2 ** 32 + 5, recordType: 2, flags: 1, offsetBytes: 2 ** 40, lengthBytes: 1024 ** 3, payload: Buffer.alloc(0) },
        { seq: 43, recordType: 3, flags: 2, offsetBytes: 4096 * 1000, lengthBytes: 4096, payload: Buffer.alloc(0) },
      ];
      const p = new CheckedParser();
      for (const r of samples) {
        // The payload as views in pieces (a record's payload may wrap in the NVRAM region).
        const cut = Math.min(r.payload.length, 1000);
        const parts = r.payload.length === 0 ? [] : [r.payload.subarray(0, cut), r.payload.subarray(cut)];
        const one = w1.recordFrame(r.seq, r.recordType, r.flags, r.offsetBytes, r.lengthBytes, parts);
        const m = { type: MsgType.Record as const, ...r };
        assert.ok(one.equals(Buffer.concat(w2.frame(m))), `record ${r.seq}`);
        assert.deepStrictEqual(p.push(one), [m]);
      }
      assert.deepEqual([w1.bytesOut, w1.bytesByType[MsgType.Record]], [w2.bytesOut, w2.bytesByType[MsgType.Record]], 'counted alike');
      assert.throws(() => w1.recordFrame(5, 1, 0, 0, BLOCK_BYTES, [Buffer.alloc(100)]), /payload length/);
      assert.throws(() => w1.recordFrame(0, 1, 0, 0, BLOCK_BYTES, [Buffer.alloc(BLOCK_BYTES)]), /bad fields/);
      assert.throws(() => w1.recordFrame(6, 1, 0, 100, BLOCK_BYTES, [Buffer.alloc(BLOCK_BYTES)]), /bad fields/);
    });

    it('a Refuse reason longer than 1024 bytes is cut to fit, and still parses', () => {
      const f = frameOf(new FrameWriter(), { type: MsgType.Refuse, reason: 'y'.repeat(5000) });
      const [m] = new CheckedParser().push(f);
      assert.deepStrictEqual(m, { type: MsgType.Refuse, reason: 'y'.repeat(1024) });
    });
  });

  describe('chunking', () => {
    const msgs = smallSamples();
    const stream = streamOf(msgs);

    it('parses a stream of small frames of every type', () => {
      assert.ok(msgs.length >= 20, `${msgs.length} small samples`);
      // Every type but those over 4 KiB (the long stream below has them).
      const big = [MsgType.CpBlocks, MsgType.CpCommit, MsgType.ReadResp] as number[];
      assert.deepStrictEqual([...new Set(msgs.map((m) => m.type as number))].sort((a, b) => a - b), ALL_TYPES.filter((t) => !big.includes(t)).sort((a, b) => a - b));
      assert.deepStrictEqual(parseChunks([stream]), msgs);
    });

    it('parses identically when split at every byte offset', () => {
      for (let i = 0; i <= stream.length; i++) {
        assert.deepStrictEqual(parseChunks([stream.subarray(0, i), stream.subarray(i)]), msgs, `split at ${i}`);
      }
    });

    it('parses identically when split at many pairs of offsets (three chunks)', () => {
      for (let i = 0; i <= stream.length; i += 7) {
        for (let j = i; j <= stream.length; j += 11) {
          assert.deepStrictEqual(parseChunks([stream.subarray(0, i), stream.subarray(i, j), stream.subarray(j)]), msgs, `split at ${i},${j}`);
        }
      }
    });

    it('parses identically when fed one byte at a time', () => {
      const chunks: Buffer[] = [];
      for (let i = 0; i < stream.length; i++) chunks.push(stream.subarray(i, i + 1));
      assert.deepStrictEqual(parseChunks(chunks), msgs);
    });

    it('gives no message and no error for any truncated frame, then the message once it completes', () => {
      for (const m of msgs) {
        const f = frameOf(new FrameWriter(), m);
        for (let i = 0; i < f.length; i++) {
          const p = new CheckedParser();
          assert.deepStrictEqual(p.push(f.subarray(0, i)), [], `${i} of ${f.length} bytes of type ${m.type}`);
          assert.ok(p.bufferedBytes <= i);
          assert.deepStrictEqual(p.push(f.subarray(i)), [m]);
          assert.equal(p.bufferedBytes, 0);
        }
      }
    });

    it('a long stream with big frames parses identically under random chunkings (seeded)', function () {
      this.timeout(30_000);
      // 400 frames: every sample once (1 MiB record, 64-block frames, 4096 refs...) spread among small ones.
      const all = samples();
      const small = smallSamples();
      const long: Message[] = [];
      for (let i = 0; i < 400; i++) long.push(i % 11 === 0 && i / 11 < all.length ? all[i / 11]! : small[(i * 7) % small.length]!);
      assert.ok(all.every((m) => long.includes(m)));
      const s = streamOf(long);
      const expectTypes = long.map((m) => m.type);
      const whole = parseChunks([s]);
      assert.deepStrictEqual(whole, long);
      fc.assert(
        fc.property(fc.array(fc.integer({ min: 0, max: s.length }), { minLength: 1, maxLength: 300 }), fc.boolean(), (cuts, tiny) => {
          const at = [...new Set(cuts)].sort((a, b) => a - b);
          if (tiny) {
            // Cluster cuts around frame boundaries: many 1..30-byte chunks.
            const extra: number[] = [];
            for (const c of at) for (let k = 1; k < 30; k += 3) extra.push(Math.min(s.length, c + k));
            at.push(...extra);
            at.sort((a, b) => a - b);
          }
          const chunks: Buffer[] = [];
          let from = 0;
          for (const c of at) {
            chunks.push(s.subarray(from, c));
            from = c;
          }
          chunks.push(s.subarray(from));
          const got = parseChunks(chunks);
          assert.deepStrictEqual(got.map((m) => m.type), expectTypes);
          assert.deepStrictEqual(got, long);
        }),
        { seed: SEED, numRuns: 30 },
      );
    });
  });

  describe('slab pool (receiver)', () => {
    it('CP_BLOCKS bodies that span chunks are assembled in pooled slabs: same messages, and a released slab carries the next frame unharmed', () => {
      const all = samples();
      const small = smallSamples();
      const long: Message[] = [];
      for (let i = 0; i < 300; i++) long.push(i % 5 === 0 ? all.find((m) => m.type === MsgType.CpBlocks && m.pbas.length === BLOCKS_PER_FRAME_MAX) ?? all[0]! : small[(i * 7) % small.length]!);
      const s = streamOf(long);
      const pool = new SlabPool(FRAME_BODY_MAX_BYTES, 2);
      const p = new CheckedParser(pool);
      const got: Message[] = [];
      let slabbed = 0;
      // Node's socket reads: 64 KiB at most.
      for (let at = 0; at < s.length; at += 65536) {
        for (const m of p.push(s.subarray(at, at + 65536))) {
          if (m.type === MsgType.CpBlocks && m.slab) {
            slabbed++;
            const { slab, ...rest } = m;
            assert.equal(slab.refs, 1, 'held once, by its message');
            assert.ok(m.data.buffer === slab.buf.buffer, 'its data is a view of the slab');
            got.push({ ...rest, data: Buffer.from(m.data) }); // copied before the slab goes back
            pool.release(slab);
            assert.equal(slab.refs, 0);
          } else got.push(m);
        }
      }
      assert.deepStrictEqual(got, long);
      assert.equal(slabbed, 60, 'every 256 KiB CP_BLOCKS frame spans chunks');
      assert.ok(pool.allocated <= 2, `${pool.allocated} slabs allocated for ${slabbed} frames`);
      assert.equal(pool.takes, slabbed);
    });

    it('trimIdle shrinks the free list only after an interval with no take: a stream keeps its working set, an idle receiver gives it back', () => {
      const pool = new SlabPool(4096, 64);
      const held = Array.from({ length: 40 }, () => pool.take(4096)!);
      for (const s of held) pool.release(s);
      assert.equal(pool.freeCount, 40);
      pool.trimIdle(4); // takes happened since the last call (none before): kept
      assert.equal(pool.freeCount, 40, 'a stream in progress keeps every idle slab');
      pool.release(pool.take(4096)!);
      pool.trimIdle(4);
      assert.equal(pool.freeCount, 40, 'still taking');
      pool.trimIdle(4); // nothing taken since the last call
      assert.equal(pool.freeCount, 4, 'idle: trimmed to the floor');
      const allocated = pool.allocated;
      for (let i = 0; i < 4; i++) pool.take(4096);
      assert.equal(pool.allocated, allocated, 'the kept ones are reused');
    });

    it('a slab goes back only when its last holder releases it, and the free list keeps at most keepMax', () => {
      const pool = new SlabPool(4096, 1);
      const a = pool.take(4096)!;
      assert.equal(pool.take(4097), undefined, 'a body larger than a slab gets none');
      pool.hold(a);
      pool.release(a);
      assert.equal(pool.freeCount, 0, 'still held');
      const b = pool.take(100)!;
      assert.notEqual(a, b, 'a held slab is never handed out again');
      pool.release(a);
      pool.release(b);
      assert.equal(pool.freeCount, 1, 'keepMax 1: the second goes to the garbage collector');
      assert.throws(() => pool.release(a), /release of a free slab/);
      assert.throws(() => pool.hold(a), /hold of a free slab/);
      assert.equal(pool.take(1), a, 'reused');
    });
  });

  describe('hostile frames', () => {
    const ping = (n: number): Message => ({ type: MsgType.Ping, nowMs: n });

    it('rejects bad magic at once', () => {
      const f = frameOf(new FrameWriter(), ping(1));
      f.writeUInt32LE(0x574d564f, 0);
      rejects(f, /^bad frame magic/);
      // Even from the header alone, and not only at the start of the stream.
      rejects(rawFrame(MsgType.Ping, Buffer.alloc(8), { magic: 0 }).subarray(0, FRAME_HEADER_BYTES), /^bad frame magic/);
      const w = new FrameWriter();
      const first = frameOf(w, ping(1));
      const second = frameOf(w, ping(2));
      second.write('HTTP', 0, 'latin1');
      rejects(second, /^bad frame magic/, [first]);
    });

    it('rejects an unknown frame type', () => {
      for (const t of UNKNOWN_TYPES) rejects(rawFrame(t, Buffer.alloc(8)), new RegExp(`^unknown frame type ${t}$`));
      protocolError(() => decodeBody(99, Buffer.alloc(0)), /^unknown frame type 99$/);
    });

    it('rejects a wrong wire version', () => {
      for (const v of [0, 2, 255]) rejects(rawFrame(MsgType.Ping, Buffer.alloc(8), { version: v }), new RegExp(`^unsupported wire version ${v}$`));
    });

    it('rejects a length over the type\'s cap from the header alone, without buffering the body', () => {
      for (const t of ALL_TYPES) {
        const cap = BODY_CAP[t]!;
        for (const len of [cap + 1, FRAME_BODY_MAX_BYTES + 1, 0xffffffff]) {
          const h = rawFrame(t, Buffer.alloc(0), { lengthBytes: len });
          rejects(h, new RegExp(`^frame type ${t}: body of ${len} bytes exceeds its cap of ${cap}$`));
        }
        // Exactly the cap is accepted by the header check (the body is then awaited).
        const p = new CheckedParser();
        assert.deepStrictEqual(p.push(rawFrame(t, Buffer.alloc(0), { lengthBytes: cap })), []);
        assert.equal(p.bufferedBytes, 0);
      }
    });

    it('a header claiming a huge length fails before its body arrives: bufferedBytes stays small', () => {
      const p = new CheckedParser();
      const h = rawFrame(MsgType.Ping, Buffer.alloc(0), { lengthBytes: 0xfffffff0 });
      // The header trickles in: nothing is held beyond the header's bytes.
      for (let i = 0; i < FRAME_HEADER_BYTES - 1; i++) {
        assert.deepStrictEqual(p.push(h.subarray(i, i + 1)), []);
        assert.equal(p.bufferedBytes, i + 1);
      }
      protocolError(() => p.push(h.subarray(FRAME_HEADER_BYTES - 1)), /exceeds its cap of 8$/);
      assert.equal(p.bufferedBytes, 0);
      // Body bytes that follow are not buffered either.
      for (let i = 0; i < 16; i++) assert.throws(() => p.push(Buffer.alloc(64 * 1024)), MirrorProtocolError);
      assert.equal(p.bufferedBytes, 0);
    });

    it('holds at most one frame: a header at the cap then its body in pieces', () => {
      const cap = BODY_CAP[MsgType.Record]!;
      const p = new CheckedParser();
      p.push(rawFrame(MsgType.Record, Buffer.alloc(0), { lengthBytes: cap }));
      const piece = Buffer.alloc(64 * 1024);
      let max = 0;
      for (let sent = 0; sent + piece.length < cap; sent += piece.length) {
        assert.deepStrictEqual(p.push(piece), []);
        max = Math.max(max, p.bufferedBytes);
      }
      assert.ok(max < cap, `${max} bytes held`);
      // The rest completes it: zeroes fail the checksum (the crc was for an empty body).
      protocolError(() => p.push(Buffer.alloc(cap)), /^frame 0 \(type 4\): checksum mismatch$/);
      assert.equal(p.bufferedBytes, 0);
    });

    it('rejects a flipped bit anywhere in a frame\'s header or body, and never yields its message', () => {
      const w = new FrameWriter();
      const first = frameOf(w, ping(1));
      const msgs: Message[] = [
        { type: MsgType.CpRefs, cp: 9, refs: [{ pba: 1, seq: 2, index: 3, crc: 4 }, { pba: 5, seq: 6, index: 7, crc: 8 }] },
        { type: MsgType.RecordAck, heldSeq: 10, durableSeq: 9, storedFromSeq: 1 },
        { type: MsgType.Record, seq: 3, recordType: 1, flags: 0, offsetBytes: 4096, lengthBytes: 4096, payload: pattern(4096, 9) },
      ];
      const filler = Buffer.alloc(FRAME_HEADER_BYTES + FRAME_BODY_MAX_BYTES + 1);
      for (const m of msgs) {
        const good = frameOf(new FrameWriter(), m);
        // As frame 1 of a stream whose frame 0 was fine.
        good.writeBigUInt64LE(1n, 12);
        good.writeUInt32LE(crc32c(good, FRAME_HEADER_BYTES, good.length - FRAME_HEADER_BYTES, crc32c(good, 0, 20)), 20);
        {
          const p = new CheckedParser();
          p.push(first);
          assert.deepStrictEqual(p.push(good), [m], 'the unflipped frame is accepted');
        }
        const bits = good.length * 8;
        const step = good.length > 1024 ? 13 : 1;
        for (let bit = 0; bit < bits; bit += bit < FRAME_HEADER_BYTES * 8 ? 1 : step) {
          const bad = Buffer.from(good);
          bad[bit >> 3] = bad[bit >> 3]! ^ (1 << (bit & 7));
          const p = new CheckedParser();
          assert.equal(p.push(first).length, 1);
          let err: unknown;
          try {
            // A flip in the length field may make the parser wait for more: feed it.
            assert.deepStrictEqual(p.push(bad), [], `bit ${bit}: no message`);
            assert.deepStrictEqual(p.push(filler), [], `bit ${bit}: no message`);
          } catch (e) {
            err = e;
          }
          assert.ok(err instanceof MirrorProtocolError, `bit ${bit} of type ${m.type}: ${String(err)}`);
          assert.match(err.message, KNOWN_ERROR);
          const byte = bit >> 3;
          if (byte < 4) assert.match(err.message, /^bad frame magic/, `bit ${bit}`);
          else if (byte === 5) assert.match(err.message, /^unsupported wire version/, `bit ${bit}`);
          else if (byte >= 12 && byte < 20) assert.match(err.message, /^frame number \d+ where 1 was due/, `bit ${bit}`);
          else if (byte === 6 || byte === 7 || byte >= 20) assert.match(err.message, new RegExp(`^frame 1 \\(type ${m.type}\\): checksum mismatch$`), `bit ${bit}`);
          assert.equal(p.bufferedBytes, 0);
        }
      }
    });

    it('rejects a replayed frame (its number repeated)', () => {
      const w = new FrameWriter();
      const f0 = frameOf(w, ping(0));
      const f1 = frameOf(w, ping(1));
      rejects(f1, /^frame number 1 where 2 was due \(replayed, lost or reordered frame\)$/, [f0, f1]);
      rejects(f0, /^frame number 0 where 1 was due/, [f0]);
    });

    it('rejects a skipped frame and a reordered one', () => {
      const w = new FrameWriter();
      const f0 = frameOf(w, ping(0));
      const f1 = frameOf(w, ping(1));
      const f2 = frameOf(w, ping(2));
      rejects(f2, /^frame number 2 where 1 was due/, [f0]);
      rejects(f1, /^frame number 1 where 0 was due/);
      rejects(rawFrame(MsgType.Ping, Buffer.alloc(8), { frameNo: 2 ** 63 }), /^frame number 9223372036854775808 where 0 was due/);
      // A skipped frame inside one chunk: the good frame before it is not returned either (the connection is dropped).
      rejects(Buffer.concat([f0, f2]), /^frame number 2 where 1 was due/);
    });

    it('rejects trailing bytes after a body', () => {
      const extra = (m: Message, n: number) => Buffer.concat([bodyOf(m), Buffer.alloc(n, 0xee)]);
      rejects(rawFrame(MsgType.Refuse, extra({ type: MsgType.Refuse, reason: 'no' }, 1)), /^frame type 3: 1 unexpected trailing bytes$/);
      rejects(rawFrame(MsgType.Record, extra({ type: MsgType.Record, seq: 5, recordType: 2, flags: 0, offsetBytes: 0, lengthBytes: 4096, payload: Buffer.alloc(0) }, 3)), /^frame type 4: 3 unexpected trailing bytes$/);
      rejects(rawFrame(MsgType.CpBlocks, extra({ type: MsgType.CpBlocks, cp: 1, pbas: [7], data: Buffer.alloc(4096) }, 8)), /^frame type 8: 8 unexpected trailing bytes$/);
      rejects(rawFrame(MsgType.CpRefs, extra({ type: MsgType.CpRefs, cp: 1, refs: [{ pba: 1, seq: 1, index: 0, crc: 0 }] }, 24)), /^frame type 9: 24 unexpected trailing bytes$/);
      // Fixed-size bodies (their cap is their size) through decodeBody itself.
      for (const m of samples()) {
        if (bodyOf(m).length !== BODY_CAP[m.type]) continue;
        protocolError(() => decodeBody(m.type, extra(m, 1)), new RegExp(`^frame type ${m.type}: 1 unexpected trailing bytes$`));
      }
    });

    it('rejects a body cut short, for every type at every length', () => {
      for (const m of samples()) {
        const b = bodyOf(m);
        if (b.length > 5000) continue;
        for (let n = 0; n < b.length; n++) {
          const e = protocolError(() => decodeBody(m.type, b.subarray(0, n)), /./);
          assert.match(e.message, /body too short|out of range|bad volume size|unknown mode|bad range|unknown type|bad payload length|unknown kind|count|not before|inflate/, `type ${m.type} cut to ${n}`);
        }
        rejects(rawFrame(m.type, b.subarray(0, b.length - 1)), /./);
      }
    });

    describe('out-of-range fields', () => {
      const rec = (o: Partial<{ seq: number; recordType: number; offsetBytes: number; lengthBytes: number; payload: Buffer }> = {}): Buffer => {
        const b = bodyOf({ type: MsgType.Record, seq: 5, recordType: 1, flags: 0, offsetBytes: 8192, lengthBytes: 4096, payload: Buffer.alloc(4096, 1) });
        const body = o.payload ? Buffer.concat([b.subarray(0, 40), o.payload]) : b;
        if (o.seq !== undefined) body.writeBigUInt64LE(BigInt(o.seq), 0);
        if (o.recordType !== undefined) body.writeUInt8(o.recordType, 8);
        if (o.offsetBytes !== undefined) body.writeBigUInt64LE(BigInt(o.offsetBytes), 16);
        if (o.lengthBytes !== undefined) body.writeBigUInt64LE(BigInt(o.lengthBytes), 24);
        if (o.payload) body.writeBigUInt64LE(BigInt(o.payload.length), 32);
        return body;
      };

      it('record: seq 0, unaligned offset or length, zero length', () => {
        rejects(rawFrame(MsgType.Record, rec({ seq: 0 })), /^record 0: bad range$/);
        rejects(rawFrame(MsgType.Record, rec({ offsetBytes: 4095 })), /^record 5: bad range$/);
        rejects(rawFrame(MsgType.Record, rec({ offsetBytes: 512 })), /^record 5: bad range$/);
        protocolError(() => decodeBody(MsgType.Record, rec({ lengthBytes: 512, payload: Buffer.alloc(512) })), /^record 5: bad range$/);
        protocolError(() => decodeBody(MsgType.Record, rec({ recordType: 2, lengthBytes: 0, payload: Buffer.alloc(0) })), /^record 5: bad range$/);
        protocolError(() => decodeBody(MsgType.Record, rec({ recordType: 3, lengthBytes: 100, payload: Buffer.alloc(0) })), /^record 5: bad range$/);
      });

      it('record: payload length that does not match the type and length', () => {
        rejects(rawFrame(MsgType.Record, rec({ lengthBytes: 8192 })), /^record 5: bad payload length 4096$/);
        rejects(rawFrame(MsgType.Record, rec({ payload: Buffer.alloc(0) })), /^record 5: bad payload length 0$/);
        rejects(rawFrame(MsgType.Record, rec({ recordType: 2 })), /^record 5: bad payload length 4096$/);
        rejects(rawFrame(MsgType.Record, rec({ recordType: 3 })), /^record 5: bad payload length 4096$/);
        // A write whose length is over the payload cap: refused whatever the payload.
        const over = rec();
        over.writeBigUInt64LE(BigInt(RECORD_PAYLOAD_MAX_BYTES + 4096), 24);
        over.writeBigUInt64LE(BigInt(RECORD_PAYLOAD_MAX_BYTES + 4096), 32);
        protocolError(() => decodeBody(MsgType.Record, over), /^record 5: bad payload length 1052672$/);
        // Payload length says more than the body holds.
        const short = rec();
        short.writeBigUInt64LE(8192n, 24);
        short.writeBigUInt64LE(8192n, 32);
        protocolError(() => decodeBody(MsgType.Record, short), /^frame type 4: body too short$/);
      });

      it('record: unknown record type, and u64 fields beyond 2^53', () => {
        for (const t of [0, 4, 255]) rejects(rawFrame(MsgType.Record, rec({ recordType: t })), new RegExp(`^record 5: unknown type ${t}$`));
        const big = rec();
        big.writeBigUInt64LE(2n ** 53n, 0);
        rejects(rawFrame(MsgType.Record, big), /^frame type 4: seq out of range$/);
        const bigOff = rec();
        bigOff.writeBigUInt64LE(0xffffffffffff0000n, 16);
        protocolError(() => decodeBody(MsgType.Record, bigOff), /^frame type 4: offset out of range$/);
      });

      it('cp begin: base at or after the CP, base below -1, unknown kind', () => {
        const begin = (cp: bigint, base: bigint, kind = 1): Buffer => {
          const b = Buffer.alloc(17);
          b.writeBigUInt64LE(cp, 0);
          b.writeBigInt64LE(base, 8);
          b.writeUInt8(kind, 16);
          return b;
        };
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 7n)), /^cp begin: base CP 7 is not before CP 7$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 8n)), /^cp begin: base CP 8 is not before CP 7$/);
        rejects(rawFrame(MsgType.CpBegin, begin(0n, 0n)), /^cp begin: base CP 0 is not before CP 0$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, -2n)), /^frame type 7: baseCp out of range$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 6n, 255)), /^cp begin: unknown kind 255$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 6n, 0)), /^cp begin: unknown kind 0$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 6n, 4)), /^cp begin: unknown kind 4$/);
        rejects(rawFrame(MsgType.CpBegin, begin(7n, 5n, 3)), /^cp begin: only a baseline resumes$/);
        assert.deepStrictEqual(decodeBody(MsgType.CpBegin, begin(7n, -1n, 3)), { type: MsgType.CpBegin, cp: 7, baseCp: -1, kind: 'resume' });
        assert.deepStrictEqual(decodeBody(MsgType.CpBegin, begin(7n, -1n, 2)), { type: MsgType.CpBegin, cp: 7, baseCp: -1, kind: 'resync' });
      });

      it('cp blocks, refs, deltas and reads: a count of 0 or over the max', () => {
        const head = (cp: number, n: number, rest = 0): Buffer => {
          const b = Buffer.alloc(12 + rest);
          b.writeBigUInt64LE(BigInt(cp), 0);
          b.writeUInt32LE(n, 8);
          return b;
        };
        rejects(rawFrame(MsgType.CpBlocks, head(1, 0)), /^cp blocks: count 0$/);
        rejects(rawFrame(MsgType.CpBlocks, head(1, BLOCKS_PER_FRAME_MAX + 1, 8)), /^cp blocks: count 65$/);
        rejects(rawFrame(MsgType.CpBlocks, head(1, 0xffffffff)), /^cp blocks: count 4294967295$/);
        rejects(rawFrame(MsgType.CpRefs, head(1, 0)), /^cp refs: count 0$/);
        rejects(rawFrame(MsgType.CpRefs, head(1, REFS_PER_FRAME_MAX + 1, 24)), /^cp refs: count 4097$/);
        rejects(rawFrame(MsgType.CpRefs, head(1, 0xffffffff)), /^cp refs: count 4294967295$/);
        rejects(rawFrame(MsgType.CpDeltas, head(1, 0)), /^cp deltas: count 0$/);
        rejects(rawFrame(MsgType.CpDeltas, head(1, DELTAS_PER_FRAME_MAX + 1, 22)), /^cp deltas: count 4097$/);
        // CP_DELTAS entries travel deflated after a u32 of their inflated length.
        const deflated = (raw: Buffer, rawLen = raw.length): Buffer => {
          const l = Buffer.alloc(4);
          l.writeUInt32LE(rawLen);
          return Buffer.concat([head(1, 1), l, zlib.deflateRawSync(raw)]);
        };
        // A delta length that promises more than the entries hold.
        const entry = Buffer.alloc(22 + 10);
        entry.writeUInt16LE(11, 20);
        rejects(rawFrame(MsgType.CpDeltas, deflated(entry)), /^frame type 14: body too short$/);
        // An inflated length that lies, entries that do not inflate, and a deflate bomb past the cap.
        rejects(rawFrame(MsgType.CpDeltas, deflated(Buffer.alloc(22), 30)), /^cp deltas: entries inflate to 22 bytes, the header says 30$/);
        rejects(rawFrame(MsgType.CpDeltas, Buffer.concat([head(1, 1), Buffer.from([22, 0, 0, 0]), Buffer.from('not deflate at all')])), /^cp deltas: entries do not inflate/);
        const bomb = Buffer.concat([head(1, 1), Buffer.from([0, 0, 4, 0]), zlib.deflateRawSync(Buffer.alloc(8 * 1024 * 1024))]);
        assert.ok(bomb.length < 64 * 1024, 'the bomb is small on the wire');
        rejects(rawFrame(MsgType.CpDeltas, bomb), /^cp deltas: (entries do not inflate|entries inflate to)/);
        const tooBig = Buffer.concat([head(1, 1), Buffer.from([0, 0, 8, 0])]);
        rejects(rawFrame(MsgType.CpDeltas, tooBig), /^cp deltas: \d+ bytes inflated exceed the cap/);
        for (const t of [MsgType.ReadReq, MsgType.ReadResp]) {
          rejects(rawFrame(t, head(1, 0).subarray(4)), /^read: count 0$/);
          rejects(rawFrame(t, head(1, BLOCKS_PER_FRAME_MAX + 1).subarray(4)), /^read: count 65$/);
        }
        // A count that promises more than the body holds.
        rejects(rawFrame(MsgType.ReadResp, Buffer.concat([head(1, 1).subarray(4), Buffer.alloc(8 + 4095)])), /^frame type 16: body too short$/);
        rejects(rawFrame(MsgType.CpBlocks, head(1, 2, 8 + 8 + 4096)), /^frame type 8: body too short$/);
        rejects(rawFrame(MsgType.CpRefs, head(1, 3, 48)), /^frame type 9: body too short$/);
      });

      it('hello: unknown mode, zero or unaligned volume size, a start past its newest seq, too many earlier sessions', () => {
        const hello = bodyOf(samples()[0]!);
        const mode = Buffer.from(hello);
        mode.writeBigUInt64LE(3n, 40);
        rejects(rawFrame(MsgType.Hello, mode), /^hello: unknown mode 3$/);
        const zero = Buffer.from(hello);
        zero.writeBigUInt64LE(0n, 16);
        rejects(rawFrame(MsgType.Hello, zero), /^hello: bad volume size 0$/);
        const odd = Buffer.from(hello);
        odd.writeBigUInt64LE(4096n * 10n + 512n, 16);
        rejects(rawFrame(MsgType.Hello, odd), /^hello: bad volume size 41472$/);
        // The lineage: its count, and a generation that starts after the source's CP.
        const none = Buffer.from(hello);
        none.writeBigUInt64LE(0n, 120);
        rejects(rawFrame(MsgType.Hello, none), /^hello: lineage of 0 generations \(1\.\.15\)$/);
        const late = Buffer.from(hello);
        late.writeBigUInt64LE(5n, 136);
        rejects(rawFrame(MsgType.Hello, late), /^hello: lineage: the current generation 00000000000000a1 starts at CP 5, after this CP 0$/);
        // The seq it started at (-1: a later stream) is never past its newest.
        const started = Buffer.from(hello);
        started.writeBigUInt64LE(5n, 104);
        rejects(rawFrame(MsgType.Hello, started), /^hello: started at seq 5, past its newest seq 0$/);
        const cp = Buffer.from(hello);
        cp.writeBigInt64LE(-2n, 48);
        rejects(rawFrame(MsgType.Hello, cp), /^frame type 1: sourceCp out of range$/);
        // The earlier sessions: at most 15, and each one there.
        assert.equal(hello.length, 152, 'earlier count at 144');
        const many = Buffer.from(hello);
        many.writeBigUInt64LE(16n, 144);
        rejects(rawFrame(MsgType.Hello, many), /^hello: 16 earlier sessions \(at most 15\)$/);
        const short = Buffer.from(hello);
        short.writeBigUInt64LE(1n, 144);
        rejects(rawFrame(MsgType.Hello, short), /^frame type 1: body too short$/);
      });

      it('refuse: a reason length over 1024; welcome and pin: CPs below -1 or beyond 2^53', () => {
        const r = Buffer.alloc(2);
        r.writeUInt16LE(1025);
        rejects(rawFrame(MsgType.Refuse, r), /^refuse: reason too long$/);
        const wel = bodyOf(samples()[3]!);
        wel.writeBigInt64LE(-2n, 0);
        rejects(rawFrame(MsgType.Welcome, wel), /^frame type 2: committedCp out of range$/);
        const pin = Buffer.alloc(8);
        pin.writeBigInt64LE(2n ** 53n, 0);
        rejects(rawFrame(MsgType.Pin, pin), /^frame type 12: oldestPinnedCp out of range$/);
        pin.writeBigInt64LE(-(2n ** 62n), 0);
        rejects(rawFrame(MsgType.Pin, pin), /^frame type 12: oldestPinnedCp out of range$/);
      });
    });

    describe('encoders assert what the decoders check (a frame we send always decodes)', () => {
      const bad: Array<[string, Message]> = [
        ['record with seq 0', { type: MsgType.Record, seq: 0, recordType: 2, flags: 0, offsetBytes: 0, lengthBytes: 4096, payload: Buffer.alloc(0) }],
        ['record at an unaligned offset', { type: MsgType.Record, seq: 1, recordType: 1, flags: 0, offsetBytes: 512, lengthBytes: 4096, payload: Buffer.alloc(4096) }],
        ['trim of length 0', { type: MsgType.Record, seq: 1, recordType: 2, flags: 0, offsetBytes: 0, lengthBytes: 0, payload: Buffer.alloc(0) }],
        ['record of unknown type 9', { type: MsgType.Record, seq: 1, recordType: 9, flags: 0, offsetBytes: 0, lengthBytes: 4096, payload: Buffer.alloc(0) }],
        ['CP begin with base == cp', { type: MsgType.CpBegin, cp: 4, baseCp: 4, kind: 'cp' }],
        ['hello with an unaligned size', { type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 1000, deviceBlocks: 1, nvramBytes: 1, mode: 'sync', sourceCp: -1, streamFromSeq: 0, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '5eed5eed5eed5eed', lineage: [{ id: '00000000000000a1', firstCp: 0 }], earlier: [] }],
        ['hello with a process id that is not 16 hex digits', { type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 4096, deviceBlocks: 1, nvramBytes: 1, mode: 'sync', sourceCp: -1, streamFromSeq: 0, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '5eed', lineage: [{ id: '00000000000000a1', firstCp: 0 }], earlier: [] }],
        ['hello started past its newest seq', { type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 4096, deviceBlocks: 1, nvramBytes: 1, mode: 'sync', sourceCp: -1, streamFromSeq: 0, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 5, startedAtSeq: 6, processId: '5eed5eed5eed5eed', lineage: [{ id: '00000000000000a1', firstCp: 0 }], earlier: [] }],
        ['CP refs with a seq beyond 2^53', { type: MsgType.CpRefs, cp: 1, refs: [{ pba: 1, seq: 2 ** 60, index: 0, crc: 0 }] }],
        ['CP blocks with no block', { type: MsgType.CpBlocks, cp: 1, pbas: [], data: Buffer.alloc(0) }],
        ['CP refs over the max', { type: MsgType.CpRefs, cp: 1, refs: Array.from({ length: REFS_PER_FRAME_MAX + 1 }, () => ({ pba: 1, seq: 1, index: 0, crc: 0 })) }],
        ['welcome with a 23-byte root', { type: MsgType.Welcome, committedCp: 1, root: Buffer.alloc(23), storedFromSeq: 1, heldSeq: 0, oldestPinnedCp: -1, resumeCp: -1, resumeBlocks: 0 }],
        ['resume of a CP on top of a base', { type: MsgType.CpBegin, cp: 9, baseCp: 8, kind: 'resume' }],
      ];
      it('FrameWriter throws (an assertion) or frames a message FrameParser accepts, for every invalid message', () => {
        const slipped: string[] = [];
        for (const [what, m] of bad) {
          let parts: Buffer[];
          try {
            parts = new FrameWriter().frame(m);
          } catch (e) {
            assert.ok(!(e instanceof MirrorProtocolError), 'an encoder failure is an assertion, not a protocol error');
            continue;
          }
          try {
            new CheckedParser().push(Buffer.concat(parts));
          } catch (e) {
            slipped.push(`${what} (the parser says: ${(e as Error).message})`);
          }
        }
        assert.deepStrictEqual(slipped, [], `FrameWriter framed messages that FrameParser rejects:\n  ${slipped.join('\n  ')}`);
      });
    });
  });

  describe('random input (seeded)', () => {
    it('random bytes never throw anything but a MirrorProtocolError, and the parser then stays failed', () => {
      fc.assert(
        fc.property(fc.array(fc.uint8Array({ minLength: 0, maxLength: 200 }), { minLength: 1, maxLength: 10 }), fc.boolean(), (chunks, withMagic) => {
          const p = new CheckedParser();
          let failed: unknown;
          for (const [i, c] of chunks.entries()) {
            const b = Buffer.from(c);
            if (withMagic && i === 0 && b.length >= 6) {
              b.writeUInt32LE(FRAME_MAGIC, 0);
              b[5] = WIRE_VERSION;
            }
            let got: Message[] | undefined;
            let err: unknown;
            try {
              got = p.push(b);
            } catch (e) {
              err = e;
            }
            if (err === undefined) {
              assert.equal(failed, undefined, 'no message after a failure');
              assert.ok(got!.every((m) => ALL_TYPES.includes(m.type)));
            } else {
              assert.ok(err instanceof MirrorProtocolError, String(err));
              assert.match(err.message, KNOWN_ERROR);
              if (failed !== undefined) assert.equal(err, failed);
              failed = err;
              assert.equal(p.bufferedBytes, 0);
            }
            assert.ok(p.bufferedBytes <= FRAME_HEADER_BYTES + FRAME_BODY_MAX_BYTES);
          }
        }),
        { seed: SEED, numRuns: 2000 },
      );
    });

    it('well-framed random and mutated bodies decode or fail only with a MirrorProtocolError; what decodes re-encodes', () => {
      const all = samples().filter((m) => bodyOf(m).length <= 8192);
      const arb = fc.record({
        base: fc.integer({ min: 0, max: all.length - 1 }),
        type: fc.oneof({ weight: 4, arbitrary: fc.constant(-1) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 20 }) }),
        edits: fc.array(fc.record({ at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }), { maxLength: 6 }),
        cut: fc.oneof(fc.constant(-1), fc.nat()),
        tail: fc.uint8Array({ maxLength: 40 }),
        random: fc.oneof({ weight: 3, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.uint8Array({ maxLength: 300 }) }),
      });
      let decoded = 0;
      fc.assert(
        fc.property(arb, (g) => {
          const m = all[g.base]!;
          const type = g.type === -1 ? m.type : g.type;
          let body = g.random !== null ? Buffer.from(g.random) : bodyOf(m);
          for (const e of g.edits) if (body.length > 0) body[e.at % body.length] = e.byte;
          if (g.cut >= 0 && body.length > 0) body = body.subarray(0, g.cut % (body.length + 1));
          if (g.tail.length > 0 && g.edits.length % 2 === 1) body = Buffer.concat([body, Buffer.from(g.tail)]);
          let direct: Message | undefined;
          try {
            direct = decodeBody(type, body);
          } catch (e) {
            assert.ok(e instanceof MirrorProtocolError, `decodeBody threw ${String(e)}`);
            assert.match(e.message, KNOWN_ERROR);
          }
          const p = new CheckedParser();
          let viaParser: Message[] | undefined;
          try {
            viaParser = p.push(rawFrame(type, body));
          } catch (e) {
            assert.ok(e instanceof MirrorProtocolError, String(e));
            assert.match(e.message, KNOWN_ERROR);
          }
          if (direct === undefined) return;
          decoded++;
          assert.deepStrictEqual(viaParser, [direct]);
          if (direct.type === MsgType.Refuse) return; // invalid UTF-8 does not survive a round trip
          // What we accept we can send again, identically.
          const again = new CheckedParser().push(frameOf(new FrameWriter(), direct));
          assert.deepStrictEqual(again, [direct]);
        }),
        { seed: SEED, numRuns: 3000 },
      );
      assert.ok(decoded > 100, `only ${decoded} bodies decoded`);
    });
  });
});
