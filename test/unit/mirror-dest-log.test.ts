/**
 * DestLog (src/mirror/dest-log.ts), the destination's per-source record log in an
 * mmap'd file: in-order append and exact block reads, gap/replay refusal, the
 * heldSeq / durableSeq / storedFromSeq marks across start() with a gap, overflow when
 * the ring is full, release by committed() and reuse of the ring (wrap-around), and
 * persist(). A random test (seeded: MIRROR_FC_SEED=N replays it) checks every stored
 * record against a model after every step.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import fc from 'fast-check';
import { crc32c } from '../../src/io/native';
import { DEST_LOG_MAX_BYTES, DEST_LOG_MIN_BYTES, DestLog, destLogBytesFor, NO_REFERENCES_FROM_SEQ } from '../../src/mirror/dest-log';
import { BLOCK_BYTES } from '../../src/mirror/wire';

const SEED = process.env.MIRROR_FC_SEED !== undefined ? Number(process.env.MIRROR_FC_SEED) : Date.now() % 0x7fffffff;
const UUID = 'a1b2c3d4-0000-4111-8222-333344445555';
const LOG_BYTES = DEST_LOG_MIN_BYTES;
const HEADER_BYTES = 4096;
const RECORD_HEADER_BYTES = 64;
const RING_BYTES = LOG_BYTES - HEADER_BYTES;
const WRITE = 1;
const TRIM = 2;
const ZERO = 3;
/** A 1 MiB write record takes this much of the ring: 15 fit in a 16 MiB log. */
const MIB_BLOCKS = 256;
const MIB_RECORD_BYTES = RECORD_HEADER_BYTES + MIB_BLOCKS * BLOCK_BYTES;
const MIB_RECORDS_PER_RING = Math.floor(RING_BYTES / MIB_RECORD_BYTES);

/** Block `index` of record `seq`: distinct for every (seq, index). */
function blockOf(seq: number, index: number): Buffer {
  const b = Buffer.alloc(BLOCK_BYTES, (seq * 31 + index * 7) & 0xff);
  b.writeUInt32LE(seq, 0);
  b.writeUInt32LE(index, 4);
  b.writeUInt32LE(seq ^ 0x5a5a5a5a, BLOCK_BYTES - 4);
  return b;
}

function payloadOf(seq: number, blocks: number): Buffer {
  return Buffer.concat(Array.from({ length: blocks }, (_, i) => blockOf(seq, i)));
}

/** Full 1 MiB payloads by seq, for the model test (payloadOf(seq, n) is a prefix of payloadOf(seq, 256)). */
const payloadCache = new Map<number, Buffer>();

/** Appends write record `seq` of `blocks` blocks at offset seq * 1 MiB. */
function appendWrite(log: DestLog, seq: number, blocks: number, cache = false): boolean {
  let payload: Buffer;
  if (cache && blocks <= MIB_BLOCKS) {
    let full = payloadCache.get(seq);
    if (!full) payloadCache.set(seq, (full = payloadOf(seq, MIB_BLOCKS)));
    payload = full.subarray(0, blocks * BLOCK_BYTES);
  } else {
    payload = payloadOf(seq, blocks);
  }
  return log.append(seq, WRITE, 0, seq * 1024 * 1024, blocks * BLOCK_BYTES, payload);
}

function expectBlock(log: DestLog, seq: number, index: number): void {
  const got = log.block(seq, index);
  assert.ok(Buffer.isBuffer(got), `record ${seq} block ${index}: ${String(got)}`);
  if (!got.equals(blockOf(seq, index))) assert.fail(`record ${seq} block ${index} differs (first bytes ${got.subarray(0, 8).toString('hex')})`);
}

function expectAllBlocks(log: DestLog, seq: number, blocks: number): void {
  for (let i = 0; i < blocks; i++) expectBlock(log, seq, i);
}

/** Checks the three marks; storedFrom 'none': the log holds nothing, so [storedFromSeq, heldSeq] must be empty. */
function expectMarks(log: DestLog, held: number, durable: number, storedFrom: number | 'none', what = ''): void {
  assert.deepStrictEqual({ heldSeq: log.heldSeq, durableSeq: log.durableSeq }, { heldSeq: held, durableSeq: durable }, what);
  if (storedFrom === 'none') {
    assert.equal(log.usedBytes, 0);
    assert.ok(log.storedFromSeq > log.heldSeq, `${what}: the log holds nothing, yet it claims records [${log.storedFromSeq}, ${log.heldSeq}]`);
  } else {
    assert.equal(log.storedFromSeq, storedFrom, `${what}: storedFromSeq`);
  }
}

describe('mirror destination log', () => {
  let dir: string;
  let file: string;
  const open: DestLog[] = [];

  before(async function () {
    this.timeout(30_000);
    // tmpfs when there is one: these tests are about the log's logic, and msync there is cheap.
    const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
    dir = fs.mkdtempSync(path.join(base, 'nvmirror-destlog-'));
    file = path.join(dir, 'source.log');
    // Created once (zero-filled); each test reopens it, which starts a new, empty log.
    open.push(await DestLog.open(file, UUID, LOG_BYTES));
  });

  afterEach(async () => {
    while (open.length > 0) await open.pop()!.close();
  });

  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
    // eslint-disable-next-line no-console
    console.log(`      mirror-dest-log: fast-check seed ${SEED} (replay with MIRROR_FC_SEED=${SEED})`);
  });

  async function fresh(): Promise<DestLog> {
    const log = await DestLog.open(file, UUID, LOG_BYTES, 'fresh');
    open.push(log);
    assert.equal(log.sizeBytes, LOG_BYTES);
    assert.equal(log.usedBytes, 0);
    return log;
  }

  it('sizes a log for an NVRAM: four times it, rounded to blocks, within [16 MiB, 1 GiB]', () => {
    assert.equal(destLogBytesFor(0), DEST_LOG_MIN_BYTES);
    assert.equal(destLogBytesFor(1024 * 1024), DEST_LOG_MIN_BYTES);
    assert.equal(destLogBytesFor(64 * 1024 * 1024), 256 * 1024 * 1024);
    assert.equal(destLogBytesFor(64 * 1024 * 1024 + 1), 256 * 1024 * 1024 + BLOCK_BYTES);
    assert.equal(destLogBytesFor(1024 ** 4), DEST_LOG_MAX_BYTES);
    assert.equal(MIB_RECORDS_PER_RING, 15);
  });

  it('appends records in order; block(seq, index) returns exactly the payload, as a copy', async () => {
    const log = await fresh();
    log.start(1, 0);
    expectMarks(log, 0, 0, 1, 'empty');
    const shape = (seq: number) => ({ type: seq % 5 === 0 ? TRIM : seq % 7 === 0 ? ZERO : WRITE, blocks: 1 + (seq % 4) });
    for (let seq = 1; seq <= 40; seq++) {
      const { type, blocks } = shape(seq);
      const payload = type === WRITE ? payloadOf(seq, blocks) : Buffer.alloc(0);
      assert.equal(log.append(seq, type, seq & 0xff, seq * 8192, blocks * BLOCK_BYTES, payload), true);
      assert.equal(log.heldSeq, seq);
    }
    assert.equal(log.recordsStored, 40);
    assert.equal(log.recordsDropped, 0);
    for (let seq = 1; seq <= 40; seq++) {
      const { type, blocks } = shape(seq);
      if (type === WRITE) {
        expectAllBlocks(log, seq, blocks);
        assert.equal(log.block(seq, blocks), `record ${seq} has no block ${blocks}`);
        assert.equal(log.block(seq, -1), `record ${seq} has no block -1`);
      } else {
        assert.equal(log.block(seq, 0), `record ${seq} is not a write`);
      }
    }
    assert.equal(log.block(41, 0), 'record 41 is not in the log (it holds 1..40)');
    assert.equal(log.block(0, 0), 'record 0 is not in the log (it holds 1..40)');
    // A copy: changing it changes nothing in the log.
    const b = log.block(1, 0) as Buffer;
    b.fill(0);
    expectBlock(log, 1, 0);
    // recordsAfter gives every field back.
    const after = [...log.recordsAfter(35)];
    assert.deepStrictEqual(after.map((r) => r.seq), [36, 37, 38, 39, 40]);
    for (const r of after) {
      const { type, blocks } = shape(r.seq);
      assert.deepStrictEqual(
        { type: r.type, flags: r.flags, offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes },
        { type, flags: r.seq & 0xff, offsetBytes: r.seq * 8192, lengthBytes: blocks * BLOCK_BYTES },
      );
      assert.ok(r.payload.equals(type === WRITE ? payloadOf(r.seq, blocks) : Buffer.alloc(0)), `payload of ${r.seq}`);
    }
    let used = 0;
    for (let seq = 1; seq <= 40; seq++) used += RECORD_HEADER_BYTES + (shape(seq).type === WRITE ? shape(seq).blocks * BLOCK_BYTES : 0);
    assert.equal(log.usedBytes, used);
    expectMarks(log, 40, 0, 1, 'nothing persisted yet');
  });

  it('stores checksummed records in the file itself (magic, header crc32c, salted record crc32c)', async () => {
    const log = await fresh();
    log.start(1, 0);
    appendWrite(log, 1, 2);
    assert.equal(log.append(2, TRIM, 3, 0, 5 * BLOCK_BYTES, Buffer.alloc(0)), true);
    await log.persist();
    const f = fs.readFileSync(file);
    assert.equal(f.length, LOG_BYTES);
    assert.equal(f.toString('latin1', 0, 8), 'NVMDLOG2');
    assert.equal(f.toString('hex', 8, 24), UUID.replace(/-/g, ''));
    assert.equal(f.readBigUInt64LE(24), BigInt(LOG_BYTES));
    assert.equal(f.readUInt32LE(36), 1, 'stream 1');
    assert.equal(f.readBigUInt64LE(40), 1n, 'stream 1 starts at seq 1');
    assert.equal(f.readUInt32LE(48), crc32c(f, 0, 48));
    const salt = f.readUInt32LE(32);
    let at = HEADER_BYTES;
    for (const [seq, type, payloadBytes] of [[1, WRITE, 2 * BLOCK_BYTES], [2, TRIM, 0]] as const) {
      assert.equal(f.readUInt32LE(at), 0x5244564e, `record ${seq} magic`);
      assert.equal(f.readBigUInt64LE(at + 8), BigInt(seq));
      assert.equal(f.readUInt8(at + 16), type);
      assert.equal(f.readUInt32LE(at + 20), 1, `record ${seq} stream`);
      assert.equal(f.readBigUInt64LE(at + 40), BigInt(payloadBytes));
      const crc = crc32c(f, at + RECORD_HEADER_BYTES, payloadBytes, crc32c(f, at + 8, RECORD_HEADER_BYTES - 8, salt));
      assert.equal(f.readUInt32LE(at + 4), crc, `record ${seq} crc`);
      at += RECORD_HEADER_BYTES + payloadBytes;
    }
    assert.ok(f.subarray(HEADER_BYTES + RECORD_HEADER_BYTES, HEADER_BYTES + RECORD_HEADER_BYTES + 2 * BLOCK_BYTES).equals(payloadOf(1, 2)));
  });

  it('reopening fresh discards the records of an earlier run; another size makes a new file of that size', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 5; seq++) appendWrite(log, seq, 1);
    await log.persist();
    const salt = fs.readFileSync(file).readUInt32LE(32);
    await open.pop()!.close();
    const again = await fresh();
    expectMarks(again, 0, 0, 1, 'a reopened log holds nothing');
    assert.equal(again.block(1, 0), 'record 1 is not in the log (it holds 1..0)');
    assert.notEqual(fs.readFileSync(file).readUInt32LE(32), salt, 'a new salt: old records no longer verify');
    await open.pop()!.close();
    const bigger = await DestLog.open(file, UUID, LOG_BYTES + 1024 * 1024);
    open.push(bigger);
    assert.equal(bigger.sizeBytes, LOG_BYTES + 1024 * 1024);
    assert.equal(fs.statSync(file).size, LOG_BYTES + 1024 * 1024);
    await open.pop()!.close();
    // Back to the size the other tests use.
    open.push(await DestLog.open(file, UUID, LOG_BYTES, 'fresh'));
    assert.equal(fs.statSync(file).size, LOG_BYTES);
    await assert.rejects(DestLog.open(file, UUID, LOG_BYTES - BLOCK_BYTES), /dest log size/);
  });

  it('reopening recovers the records after the committed watermark, in order, up to the first gap or damaged record', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 8; seq++) assert.equal(seq % 3 === 0 ? log.append(seq, TRIM, 0, seq * 4096, 4096, Buffer.alloc(0)) : appendWrite(log, seq, 1 + (seq % 4)), true);
    await log.persist();
    await open.pop()!.close();
    // A receiver restart: every record is back, exactly.
    let again = await DestLog.open(file, UUID, LOG_BYTES, 'recover', 0);
    open.push(again);
    assert.equal(again.recordsRecovered, 8);
    again.committed(2);
    const got = [...again.recordsAfter(2)];
    assert.deepEqual(got.map((r) => r.seq), [3, 4, 5, 6, 7, 8]);
    for (const r of got) {
      if (r.seq % 3 === 0) assert.equal(r.type, TRIM);
      else assert.ok(r.payload.equals(payloadOf(r.seq, 1 + (r.seq % 4))), `record ${r.seq} payload`);
    }
    expectAllBlocks(again, 7, 4);
    // The stream continues after the recovered records.
    again.start(9, 2);
    assert.equal(appendWrite(again, 9, 1), true);
    expectMarks(again, 9, 8, 3, 'recovered records count as held, the new one is not durable yet');
    await again.persist();
    await open.pop()!.close();
    // Damage record 7's payload on disk: recovery keeps 1..6 (7 and after are not replayable).
    const fd = fs.openSync(file, 'r+');
    const all = fs.readFileSync(file);
    let at = HEADER_BYTES;
    for (let seq = 1; seq < 7; seq++) at += RECORD_HEADER_BYTES + Number(all.readBigUInt64LE(at + 40));
    assert.equal(Number(all.readBigUInt64LE(at + 8)), 7);
    fs.writeSync(fd, Buffer.from([0xff]), 0, 1, at + RECORD_HEADER_BYTES + 100);
    fs.closeSync(fd);
    again = await DestLog.open(file, UUID, LOG_BYTES);
    open.push(again);
    assert.deepEqual([...again.recordsAfter(0)].map((r) => r.seq), [1, 2, 3, 4, 5, 6]);
    await open.pop()!.close();
    // Only what follows the committed watermark is kept.
    again = await DestLog.open(file, UUID, LOG_BYTES, 'recover', 3);
    open.push(again);
    assert.deepEqual([...again.recordsAfter(0)].map((r) => r.seq), [4, 5, 6]);
    assert.equal(again.heldSeq, 6);
  });

  it('keeps each block\'s crc32c: blockView(seq, index, crc) checks a reference against it without reading the block, also after a reopen', async () => {
    const log = await fresh();
    log.start(1, 0);
    // Record 1 with the checksums a FrameParser computed; record 2 without (the log computes them).
    const p1 = payloadOf(1, 3);
    const crcs = Buffer.alloc(12);
    for (let i = 0; i < 3; i++) crcs.writeUInt32LE(crc32c(p1, i * BLOCK_BYTES, BLOCK_BYTES), 4 * i);
    assert.equal(log.append(1, WRITE, 0, 0, p1.length, p1, crcs), true);
    assert.equal(appendWrite(log, 2, 2), true);
    const check = (l: DestLog, what: string): void => {
      for (const [seq, blocks] of [[1, 3], [2, 2]] as const) {
        for (let i = 0; i < blocks; i++) {
          const crc = crc32c(blockOf(seq, i));
          const v = l.blockView(seq, i, crc);
          assert.ok(Buffer.isBuffer(v) && v.equals(blockOf(seq, i)), `${what}: ${seq}/${i}: ${String(v)}`);
          const wrong = (crc ^ 0x80) >>> 0;
          assert.equal(l.blockView(seq, i, wrong), `block ${seq}/${i}, whose crc is ${crc.toString(16)}, not ${wrong.toString(16)}`, what);
        }
      }
    };
    check(log, 'as stored');
    // The record checksum in the file is the crc32c of header bytes 8..64 (salted) and the payload, read over the bytes.
    await log.persist();
    await open.pop()!.close();
    const raw = fs.readFileSync(file);
    const salt = raw.readUInt32LE(32);
    const at = HEADER_BYTES;
    assert.equal(raw.readUInt32LE(at + 4), crc32c(raw, at + RECORD_HEADER_BYTES, p1.length, crc32c(raw, at + 8, RECORD_HEADER_BYTES - 8, salt)));
    const again = await DestLog.open(file, UUID, LOG_BYTES, 'recover', 0);
    open.push(again);
    assert.equal(again.recordsRecovered, 2);
    check(again, 'after a reopen');
  });

  it('a new stream supersedes the records an older stream stored from its first seq on, across a reopen', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 6; seq++) appendWrite(log, seq, 2);
    // The source restarts from seq 4 (it lost 4..6): a new stream, which stores only 4.
    log.start(4, 0);
    assert.equal(log.append(4, TRIM, 0, 0, 4096, Buffer.alloc(0)), true);
    await log.persist();
    await open.pop()!.close();
    const again = await DestLog.open(file, UUID, LOG_BYTES);
    open.push(again);
    const got = [...again.recordsAfter(0)];
    assert.deepEqual(got.map((r) => r.seq), [1, 2, 3, 4]);
    assert.equal(got[3]!.type, TRIM, 'seq 4 is the new stream\'s record, not the old one');
  });

  it('remembers which source process stored its records (from which seq), across a reopen; a log without it has no known writer', async () => {
    const log = await fresh();
    assert.equal(log.writer, undefined, 'a new log');
    const P = '5eed5eed5eed5eed';
    log.start(11, 10, P);
    for (let seq = 11; seq <= 14; seq++) appendWrite(log, seq, 1);
    assert.deepEqual(log.writer, { id: P, fromSeq: 11 });
    // The same process again (its WELCOME lost), from 13: its records still begin at 11.
    log.start(13, 10, P);
    assert.deepEqual(log.writer, { id: P, fromSeq: 11 });
    // ... and from 12 after that, or another process from 14.
    log.start(12, 10, P);
    assert.deepEqual(log.writer, { id: P, fromSeq: 11 });
    appendWrite(log, 12, 1);
    appendWrite(log, 13, 1);
    log.start(20, 10, 'aaaaaaaaaaaaaaaa');
    assert.deepEqual(log.writer, { id: 'aaaaaaaaaaaaaaaa', fromSeq: 20 });
    // The newest record below the writer's first seq (stored by earlier writers), not fromSeq - 1.
    assert.deepEqual([log.newestStoredBelow(20), log.newestStoredBelow(13), log.newestStoredBelow(11), log.newestStoredBelow(1)], [13, 12, 0, 0]);
    log.start(14, 10, 'aaaaaaaaaaaaaaaa');
    assert.deepEqual(log.writer, { id: 'aaaaaaaaaaaaaaaa', fromSeq: 14 });
    appendWrite(log, 14, 1);
    assert.deepEqual([log.newestStoredSeq, log.newestStoredBelow(14), log.newestStoredBelow(15)], [14, 13, 14]);
    await log.persist();
    await open.pop()!.close();
    const again = await DestLog.open(file, UUID, LOG_BYTES, 'recover', 10);
    open.push(again);
    assert.deepEqual(again.writer, { id: 'aaaaaaaaaaaaaaaa', fromSeq: 14 }, 'kept in the header');
    // A header written before the field existed (zeroes where it is): no known writer.
    await open.pop()!.close();
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(24), 0, 24, 56);
    fs.closeSync(fd);
    const old = await DestLog.open(file, UUID, LOG_BYTES, 'recover', 10);
    open.push(old);
    assert.equal(old.writer, undefined);
    assert.deepEqual([...old.recordsAfter(10)].map((r) => r.seq), [11, 12, 13, 14], 'the records are kept');
  });

  it('releasing more than 1024 records at once compacts the index and loses none of the rest', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 3000; seq++) {
      const ok = seq % 3 === 0 ? appendWrite(log, seq, 1) : log.append(seq, ZERO, 0, 0, BLOCK_BYTES, Buffer.alloc(0));
      assert.equal(ok, true);
    }
    log.committed(2000);
    expectMarks(log, 3000, 2000, 2001);
    for (let seq = 2001; seq <= 3000; seq++) {
      if (seq % 3 === 0) expectBlock(log, seq, 0);
      else assert.equal(log.block(seq, 0), `record ${seq} is not a write`);
    }
    assert.equal(log.block(2000, 0), 'record 2000 is not in the log (it holds 2001..3000)');
    assert.deepStrictEqual([...log.recordsAfter(2995)].map((r) => r.seq), [2996, 2997, 2998, 2999, 3000]);
    for (let seq = 3001; seq <= 3100; seq++) assert.equal(appendWrite(log, seq, 1), true);
    log.committed(2999);
    expectMarks(log, 3100, 2999, 3000);
    for (let seq = 3000; seq <= 3100; seq++) if (seq % 3 === 0 || seq > 3000) expectBlock(log, seq, 0);
  });

  it('refuses a gap or a replay with an error naming both seqs, and stays usable', async () => {
    const log = await fresh();
    log.start(1, 0);
    appendWrite(log, 1, 1);
    appendWrite(log, 2, 1);
    assert.throws(() => appendWrite(log, 4, 1), /^Error: record seq 4 where 3 was due \(gap or replay in the stream\)$/);
    assert.throws(() => appendWrite(log, 2, 1), /record seq 2 where 3 was due/);
    assert.throws(() => appendWrite(log, 1, 1), /record seq 1 where 3 was due/);
    assert.throws(() => appendWrite(log, 0, 1), /record seq 0 where 3 was due/);
    assert.equal(log.recordsStored, 2);
    expectMarks(log, 2, 0, 1);
    assert.equal(appendWrite(log, 3, 1), true);
    expectAllBlocks(log, 2, 1);
    expectAllBlocks(log, 3, 1);
    // After a new stream starts at 10, the next seq due is 10.
    log.start(10, 9);
    assert.throws(() => appendWrite(log, 4, 1), /record seq 4 where 10 was due/);
    assert.throws(() => appendWrite(log, 11, 1), /record seq 11 where 10 was due/);
    assert.equal(appendWrite(log, 10, 1), true);
  });

  it('after start(fromSeq, committedSeq) with a gap, heldSeq stays at the committed watermark until a CP covers fromSeq - 1', async () => {
    const log = await fresh();
    log.start(10, 5);
    expectMarks(log, 5, 5, 10, 'right after start');
    for (let seq = 10; seq <= 12; seq++) assert.equal(appendWrite(log, seq, 1), true);
    expectMarks(log, 5, 5, 10, 'records 6..9 are neither here nor committed');
    await log.persist();
    expectMarks(log, 5, 5, 10, 'persisted, still a gap');
    log.committed(8);
    expectMarks(log, 8, 8, 10, 'a CP up to 8: 9 still missing');
    for (let seq = 10; seq <= 12; seq++) expectAllBlocks(log, seq, 1);
    log.committed(9);
    expectMarks(log, 12, 12, 10, 'the CP covers the gap');
    assert.equal(appendWrite(log, 13, 1), true);
    expectMarks(log, 13, 12, 10, 'record 13 not yet persisted');
    await log.persist();
    expectMarks(log, 13, 13, 10);
    // A committed watermark never goes back.
    log.committed(3);
    expectMarks(log, 13, 13, 10);
  });

  it('a reconnect right after a gapped one still holds nothing across the gap', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 3; seq++) appendWrite(log, seq, 1);
    expectMarks(log, 3, 0, 1);
    // The source reconnects streaming from 6: records 4 and 5 never arrive.
    log.start(6, 0);
    expectMarks(log, 0, 0, 1, 'gap 4..5');
    appendWrite(log, 6, 1);
    appendWrite(log, 7, 1);
    expectMarks(log, 0, 0, 1, 'gap 4..5, records 6, 7 stored');
    // The link flaps again before any CP: the source resends from 7 (or streams on from 8).
    for (const from of [8, 7]) {
      log.start(from, 0);
      assert.equal(log.heldSeq, 0, `after start(${from}, 0): records 4 and 5 are neither stored nor committed, yet heldSeq is ${log.heldSeq}`);
      assert.equal(log.durableSeq, 0, `after start(${from}, 0): durableSeq`);
    }
    appendWrite(log, 7, 1);
    assert.equal(log.heldSeq, 0);
    // Only a CP covering 5 makes 6, 7 count.
    log.committed(5);
    expectMarks(log, 7, 5, 6, 'CP covers the gap');
  });

  it('start() with no gap holds at once; a restart keeps contiguous old records and drops those >= fromSeq', async () => {
    const log = await fresh();
    log.start(6, 5);
    expectMarks(log, 5, 5, 6);
    for (let seq = 6; seq <= 10; seq++) appendWrite(log, seq, 2);
    await log.persist();
    expectMarks(log, 10, 10, 6);
    // Reconnect, streaming on from 11: the stored records still count.
    log.start(11, 5);
    expectMarks(log, 10, 10, 6, 'restart at 11');
    // Reconnect from 8: records 8..10 are dropped (the source may reuse those seqs).
    log.start(8, 5);
    expectMarks(log, 7, 7, 6, 'restart at 8');
    assert.equal(log.block(8, 0), 'record 8 is not in the log (it holds 6..7)');
    expectAllBlocks(log, 7, 2);
    // The new record 8 is different: 3 blocks.
    assert.equal(appendWrite(log, 8, 3), true);
    expectAllBlocks(log, 8, 3);
    expectMarks(log, 8, 7, 6);
    // Reconnect from 20: a gap after 8; the old records stay readable but are not held.
    log.start(20, 5);
    expectMarks(log, 5, 5, 6, 'gap 9..19');
    expectAllBlocks(log, 6, 2);
    // Records on both sides of the gap are found (the index has no per-seq map: a record
    // past a gap is not at its distance from the oldest one).
    for (let seq = 20; seq <= 23; seq++) assert.equal(appendWrite(log, seq, 1 + (seq % 3)), true);
    for (const seq of [6, 7, 8, 20, 21, 22, 23]) expectAllBlocks(log, seq, seq === 6 || seq === 7 ? 2 : seq === 8 ? 3 : 1 + (seq % 3));
    for (const seq of [9, 15, 19, 24]) assert.equal(log.block(seq, 0), `record ${seq} is not in the log (it holds 6..23)`);
    const view = log.blockView(21, 0);
    assert.ok(Buffer.isBuffer(view) && view.equals(blockOf(21, 0)), 'blockView is the block');
    log.committed(19);
    expectMarks(log, 23, 19, 20, 'a CP covers the gap and releases 6..8');
    expectAllBlocks(log, 20, 3);
    assert.equal(log.block(6, 0), 'record 6 is not in the log (it holds 20..23)');
    log.committed(23);
    assert.equal(log.usedBytes, 0);
  });

  it('persist() makes durableSeq follow; a record appended during a persist waits for the next one', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 3; seq++) appendWrite(log, seq, 1);
    expectMarks(log, 3, 0, 1);
    await log.persist();
    expectMarks(log, 3, 3, 1);
    appendWrite(log, 4, 1);
    expectMarks(log, 4, 3, 1);
    const p = log.persist();
    appendWrite(log, 5, 1);
    await p;
    assert.equal(log.durableSeq, 4, 'record 5 came after the persist began');
    await log.persist();
    expectMarks(log, 5, 5, 1);
    // A persist with nothing new is harmless.
    await log.persist();
    expectMarks(log, 5, 5, 1);
  });

  it('a persist that finds nothing new still waits for an earlier one still syncing (no early durable ack)', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 3; seq++) appendWrite(log, seq, 256);
    let firstDone = false;
    const first = log.persist().then(() => {
      firstDone = true;
    });
    const second = log.persist(); // nothing dirty of its own: the first one is syncing records 1-3
    await second;
    assert.ok(firstDone, 'the second persist resolved before the first had synced the records');
    await first;
    assert.equal(log.durableSeq, 3);
  });

  it('committed() releases records: block() says they are not in the log, storedFromSeq moves on', async () => {
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= 10; seq++) appendWrite(log, seq, 2);
    const per = RECORD_HEADER_BYTES + 2 * BLOCK_BYTES;
    assert.equal(log.usedBytes, 10 * per);
    log.committed(4);
    assert.equal(log.usedBytes, 6 * per);
    expectMarks(log, 10, 4, 5, 'committed records count as durable');
    for (let seq = 1; seq <= 4; seq++) assert.equal(log.block(seq, 0), `record ${seq} is not in the log (it holds 5..10)`);
    for (let seq = 5; seq <= 10; seq++) expectAllBlocks(log, seq, 2);
    assert.deepStrictEqual([...log.recordsAfter(0)].map((r) => r.seq), [5, 6, 7, 8, 9, 10]);
    log.committed(10);
    assert.equal(log.usedBytes, 0);
    expectMarks(log, 10, 10, 11, 'all committed: durable by the CP');
    assert.equal(log.block(10, 0), 'record 10 is not in the log (it holds 11..10)');
    assert.equal(appendWrite(log, 11, 1), true);
    expectAllBlocks(log, 11, 1);
  });

  it('overflow: a full ring drops records, heldSeq stops at the last stored one, a CP covering the dropped ones makes the log contiguous', async function () {
    this.timeout(20_000);
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= MIB_RECORDS_PER_RING; seq++) assert.equal(appendWrite(log, seq, MIB_BLOCKS), true, `record ${seq} fits`);
    const last = MIB_RECORDS_PER_RING; // 15
    assert.equal(appendWrite(log, last + 1, MIB_BLOCKS), false, 'the ring is full');
    assert.equal(appendWrite(log, last + 2, 1), false, 'dropping goes on, even for a record that would fit');
    assert.equal(log.recordsDropped, 2);
    assert.equal(log.droppingFromSeq, last + 1, 'status says it drops, and from which record');
    expectMarks(log, last, 0, 1, 'held stops at the last stored record');
    // The acks name no record as referable while records are dropped (a CP built before
    // the source saw that could name a dropped one: dropped() tells it from a bad reference).
    assert.equal(log.referableFromSeq, NO_REFERENCES_FROM_SEQ);
    assert.deepEqual([log.dropped(last), log.dropped(last + 1), log.dropped(last + 2), log.dropped(last + 3)], [false, true, true, false]);
    await log.persist();
    expectMarks(log, last, last, 1);
    // Seqs still run on: a replay of a dropped one or a gap is refused.
    assert.throws(() => appendWrite(log, last + 2, 1), new RegExp(`record seq ${last + 2} where ${last + 3} was due`));
    assert.throws(() => appendWrite(log, last + 4, 1), new RegExp(`record seq ${last + 4} where ${last + 3} was due`));
    assert.equal(log.block(last + 1, 0), `record ${last + 1} is not in the log (it holds 1..${last})`);
    // A CP up to 10 frees room, but 16, 17 are still missing: held stays, and so does dropping.
    log.committed(10);
    expectMarks(log, last, last, 11, 'dropped records not yet covered');
    assert.equal(appendWrite(log, last + 3, 1), false, 'still dropping until a CP covers the dropped ones');
    for (let seq = 11; seq <= last; seq++) expectAllBlocks(log, seq, MIB_BLOCKS);
    // A CP covering part of the dropped ones: held moves to it, nothing more.
    log.committed(last + 2);
    assert.deepStrictEqual([log.heldSeq, log.durableSeq, log.usedBytes], [last + 2, last + 2, 0], 'CP covers 16, 17, not 18');
    assert.equal(appendWrite(log, last + 4, 1), false);
    // A CP covering every dropped record: contiguous again from the next seq.
    log.committed(last + 4);
    expectMarks(log, last + 4, last + 4, last + 5, 'contiguous again');
    assert.equal(log.droppingFromSeq, 0, 'storing again');
    assert.equal(log.referableFromSeq, last + 5, 'references allowed again');
    assert.equal(log.dropped(last + 1), false);
    assert.equal(log.usedBytes, 0);
    assert.throws(() => appendWrite(log, last + 4, 1), new RegExp(`record seq ${last + 4} where ${last + 5} was due`));
    assert.equal(appendWrite(log, last + 5, MIB_BLOCKS), true);
    expectMarks(log, last + 5, last + 4, last + 5);
    expectAllBlocks(log, last + 5, MIB_BLOCKS);
    await log.persist();
    expectMarks(log, last + 5, last + 5, last + 5);
    assert.equal(log.recordsDropped, 4);
  });

  it('while dropping, a CP past every stored record leaves [storedFromSeq, heldSeq] naming no record the log lacks', async function () {
    this.timeout(20_000);
    const log = await fresh();
    log.start(1, 0);
    for (let seq = 1; seq <= MIB_RECORDS_PER_RING; seq++) appendWrite(log, seq, MIB_BLOCKS);
    const last = MIB_RECORDS_PER_RING;
    // 16, 17, 18 are dropped.
    for (let seq = last + 1; seq <= last + 3; seq++) assert.equal(appendWrite(log, seq, MIB_BLOCKS), false);
    // A CP up to 17: 1..15 are released, 16 and 17 are held by the CP, 18 is missing.
    log.committed(last + 2);
    assert.equal(log.heldSeq, last + 2);
    assert.equal(log.usedBytes, 0);
    // A RECORD_ACK carries these: the source may reference any record in [storedFromSeq, heldSeq].
    for (let seq = log.storedFromSeq; seq <= log.heldSeq; seq++) {
      const b = log.block(seq, 0);
      assert.ok(Buffer.isBuffer(b), `storedFromSeq ${log.storedFromSeq}, heldSeq ${log.heldSeq}: a reference to record ${seq} would be refused: ${String(b)}`);
    }
  });

  it('wrap-around: fill, release, fill again for several laps; contents stay exact', async function () {
    this.timeout(20_000);
    const log = await fresh();
    log.start(1, 0);
    // Mixed sizes so that the wrap point moves: 200, 57, 1, 130 blocks...
    const sizes = [200, 57, 1, 130, 256, 3, 90];
    const blocksOf = (seq: number) => sizes[seq % sizes.length]!;
    let next = 1;
    let oldest = 1;
    let wrote = 0;
    for (let lap = 0; lap < 10; lap++) {
      // Fill while the total stays under the ring (with room to spare for the unusable tail).
      while (log.usedBytes + RECORD_HEADER_BYTES + blocksOf(next) * BLOCK_BYTES <= RING_BYTES - 3 * 1024 * 1024) {
        assert.equal(appendWrite(log, next, blocksOf(next)), true, `lap ${lap}: record ${next}`);
        wrote += RECORD_HEADER_BYTES + blocksOf(next) * BLOCK_BYTES;
        next++;
      }
      for (let seq = oldest; seq < next; seq++) {
        expectBlock(log, seq, 0);
        expectBlock(log, seq, blocksOf(seq) - 1);
      }
      // Release the older half.
      const upTo = oldest + Math.floor((next - oldest) / 2);
      log.committed(upTo);
      for (let seq = oldest; seq <= upTo; seq++) assert.match(log.block(seq, 0) as string, /is not in the log/);
      oldest = upTo + 1;
      expectMarks(log, next - 1, upTo, oldest, `lap ${lap}`);
    }
    assert.ok(wrote > 3 * RING_BYTES, `only ${wrote} bytes went round the ring`);
    for (let seq = oldest; seq < next; seq++) expectAllBlocks(log, seq, blocksOf(seq));
    assert.equal(log.recordsDropped, 0);
  });

  it('a full ring after a wrap drops the next record instead of overwriting the oldest stored one', async function () {
    this.timeout(20_000);
    const log = await fresh();
    log.start(1, 0);
    const n = MIB_RECORDS_PER_RING;
    for (let seq = 1; seq <= n; seq++) assert.equal(appendWrite(log, seq, MIB_BLOCKS), true);
    // Release 1 and 2; 16 and 17 wrap to the start of the ring and end exactly where 3 begins.
    log.committed(2);
    assert.equal(appendWrite(log, n + 1, MIB_BLOCKS), true);
    assert.equal(appendWrite(log, n + 2, MIB_BLOCKS), true);
    assert.ok(log.usedBytes <= RING_BYTES);
    // The ring holds 3..17 and has no room for an 18th 1 MiB record.
    const stored = appendWrite(log, n + 3, MIB_BLOCKS);
    assert.ok(log.usedBytes <= RING_BYTES, `the log claims ${log.usedBytes} bytes stored in a ring of ${RING_BYTES}`);
    for (let seq = 3; seq <= n + 2; seq++) {
      expectBlock(log, seq, 0);
      expectBlock(log, seq, MIB_BLOCKS - 1);
    }
    assert.equal(stored, false, 'record 18 should have been dropped: the ring is full');
    assert.equal(log.heldSeq, n + 2);
  });

  it('random appends, CPs and persists: every stored record reads back exactly (seeded model test)', async function () {
    this.timeout(60_000);
    type Op = { k: 'append'; blocks: number; type: number } | { k: 'commit'; frac: number } | { k: 'persist' } | { k: 'restart'; back: number };
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      { weight: 10, arbitrary: fc.record({ k: fc.constant('append' as const), blocks: fc.constantFrom(1, 3, 64, 255, 256, 256, 256, 256), type: fc.constantFrom(WRITE, WRITE, WRITE, TRIM) }) },
      { weight: 2, arbitrary: fc.record({ k: fc.constant('commit' as const), frac: fc.oneof({ weight: 4, arbitrary: fc.double({ min: 0, max: 0.3, noNaN: true }) }, { weight: 1, arbitrary: fc.double({ min: 0, max: 1, noNaN: true }) }, { weight: 1, arbitrary: fc.constant(1) }) }) },
      { weight: 1, arbitrary: fc.constant({ k: 'persist' as const }) },
      { weight: 1, arbitrary: fc.record({ k: fc.constant('restart' as const), back: fc.integer({ min: 0, max: 3 }) }) },
    );
    let runsDropping = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 40, maxLength: 90, size: 'max' }), async (ops) => {
        const log = await DestLog.open(file, UUID, LOG_BYTES, 'fresh');
        try {
          log.start(1, 0);
          // Model: stored records (seq -> blocks, -1 for a trim), the committed watermark, the
          // stream position (lastStored: the last record stored, or fromSeq - 1 after a restart),
          // dropping state, and gapTo: the current stream (with the run of stored records it
          // continues) starts at gapTo + 1; below it records may be missing, so nothing above the
          // committed watermark counts until a CP reaches gapTo.
          const stored = new Map<number, number>();
          let nextSeq = 1;
          let committed = 0;
          let dropping = false;
          let lastStored = 0;
          let persisted = 0;
          let gapTo = 0;
          for (const [step, op] of ops.entries()) {
            const at = `step ${step} (${JSON.stringify(op)})`;
            if (op.k === 'append') {
              const seq = nextSeq++;
              const ok = op.type === WRITE ? appendWrite(log, seq, op.blocks, true) : log.append(seq, TRIM, 0, 0, op.blocks * BLOCK_BYTES, Buffer.alloc(0));
              if (dropping) assert.equal(ok, false, `${at}: record ${seq} stored while dropping`);
              if (ok) {
                stored.set(seq, op.type === WRITE ? op.blocks : -1);
                lastStored = seq;
              } else {
                if (!dropping) runsDropping++;
                dropping = true;
              }
            } else if (op.k === 'commit') {
              const to = committed + Math.floor(op.frac * (nextSeq - 1 - committed));
              log.committed(to);
              committed = Math.max(committed, to);
              for (const s of [...stored.keys()]) if (s <= committed) stored.delete(s);
              if (dropping && committed >= nextSeq - 1) {
                dropping = false;
                lastStored = nextSeq - 1;
                persisted = Math.max(persisted, lastStored);
              }
            } else if (op.k === 'persist') {
              await log.persist();
              persisted = Math.max(persisted, lastStored);
            } else {
              // The source reconnects and resends from a little before its last record.
              const from = Math.max(committed + 1, nextSeq - op.back);
              log.start(from, committed);
              for (const s of [...stored.keys()]) if (s >= from) stored.delete(s);
              // The new stream continues the run of stored records that ends at from - 1, if any.
              const keys = [...stored.keys()].sort((x, y) => x - y);
              let i = keys.length - 1;
              if (i >= 0 && keys[i] === from - 1) {
                while (i > 0 && keys[i - 1] === keys[i]! - 1) i--;
                gapTo = keys[i]! - 1;
              } else {
                gapTo = from - 1;
              }
              nextSeq = from;
              dropping = false;
              lastStored = from - 1;
              persisted = Math.min(persisted, lastStored);
            }
            // Every stored record reads back exactly; space is within the ring.
            let used = 0;
            for (const [seq, blocks] of stored) {
              if (blocks < 0) {
                assert.equal(log.block(seq, 0), `record ${seq} is not a write`, at);
                used += RECORD_HEADER_BYTES;
              } else {
                expectBlock(log, seq, 0);
                expectBlock(log, seq, blocks - 1);
                used += RECORD_HEADER_BYTES + blocks * BLOCK_BYTES;
              }
            }
            assert.ok(log.usedBytes <= RING_BYTES, `${at}: ${log.usedBytes} bytes stored in a ring of ${RING_BYTES}`);
            assert.equal(log.usedBytes, used, `${at}: usedBytes`);
            // The marks, as the file's invariants define them.
            const held = committed < gapTo ? committed : Math.max(committed, lastStored);
            const durable = committed < gapTo ? committed : Math.max(committed, Math.min(persisted, lastStored));
            assert.equal(log.heldSeq, held, `${at}: heldSeq`);
            assert.equal(log.durableSeq, durable, `${at}: durableSeq`);
            // Safety whatever the bookkeeping: every seq <= heldSeq is stored or committed,
            // and every seq in [storedFromSeq, heldSeq] is in the log (a source may reference it).
            for (let s = committed + 1; s <= log.heldSeq; s++) assert.ok(stored.has(s), `${at}: heldSeq ${log.heldSeq} but record ${s} is neither stored nor committed`);
            for (let s = log.storedFromSeq; s <= log.heldSeq; s++) assert.ok(stored.has(s), `${at}: [storedFromSeq ${log.storedFromSeq}, heldSeq ${log.heldSeq}] names record ${s}, which is not in the log`);
            if (stored.size > 0) assert.equal(log.storedFromSeq, Math.min(...stored.keys()), `${at}: storedFromSeq`);
          }
        } finally {
          await log.close();
        }
      }),
      { seed: SEED, numRuns: 60, endOnFailure: true },
    );
    payloadCache.clear();
    assert.ok(runsDropping >= 5, `the ring overflowed only ${runsDropping} times`);
  });
});
