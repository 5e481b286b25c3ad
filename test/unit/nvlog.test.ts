/**
 * NVRAM log: append and replay, watermark, torn records, stale epochs, half rotation
 * with waiting writers, group commit (persist counts through the recording layer over a
 * real mmapped file), and a property test against a Map model with simulated CPs and
 * process crashes.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import fc from 'fast-check';
import { NvLog, type Half } from '../../src/nvlog/log';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { RecordType, halfLayout, readRegionHeader, RECORD_HEADER_BYTES } from '../../src/nvlog/format';
import { scanRegion } from '../../src/nvlog/replay';
import { MmapNvram } from '../../src/io/mmap-nvram';
import { IoRecorder, RecordingNvram, buildState, crashPoint, emptyImage } from '../../src/io/recording';
import type { CpMeta } from '../../src/tree/types';
import { logged } from './nvlog-helpers';

const UUID = '0123abcd-0000-4000-8000-00000000beef';
const BS = 4096;

function block(fill: number): Buffer {
  return Buffer.alloc(BS, fill & 0xff);
}

async function freshLog(region: MemoryNvram | RecordingNvram | MmapNvram, committed: CpMeta = { nvlogSeq: 0, nvlogEpoch: 0 }): Promise<NvLog> {
  const log = NvLog.open(region, { volumeUuid: UUID, committed, readOnly: false });
  assert.equal(log.recoveryHalves().length, 0);
  await log.beginEpoch();
  return log;
}

function flip(b: Buffer, at: number): void {
  b.writeUInt8(b.readUInt8(at) ^ 0xff, at);
}

/** A copy of the region as it would be after kill -9 (MAP_SHARED pages survive). */
function crashCopy(region: MemoryNvram): MemoryNvram {
  return new MemoryNvram(region.sizeBytes, region.buffer);
}

describe('nvlog', () => {
  it('formats a region with a verifiable header at epoch 1', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const h = readRegionHeader(region.buffer);
    assert.ok(h);
    assert.equal(h.uuid, UUID);
    assert.equal(h.epoch, 1);
    assert.equal(h.halfSizeBytes, halfLayout(region.sizeBytes).halfSizeBytes);
  });

  it('refuses a region of another volume and an unformatted region', async () => {
    const region = new MemoryNvram(1024 * 1024);
    assert.throws(() => NvLog.open(region, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false }), /no valid header/);
    await NvLog.format(region, UUID);
    assert.throws(() => NvLog.open(region, { volumeUuid: 'ffffffff-0000-4000-8000-000000000000', committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false }), /belongs to volume/);
  });

  it('replays appended writes, trims and zeroes after a crash, in seq order', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = await freshLog(region);
    const s1 = await log.appendWrite(0, [block(1), block(2)], 0);
    const s2 = await log.appendWrite(BS, [block(3)], 0);
    const s3 = await log.appendZero(RecordType.Trim, 0, BS, 0);
    const s4 = await log.appendWrite(10 * BS, [block(4)], 0);
    const s5 = await log.appendZero(RecordType.Zero, 10 * BS, 2 * BS, 0);
    assert.deepEqual([s1, s2, s3, s4, s5], [1, 2, 3, 4, 5]);
    assert.equal(logged(log, 0), 'zero');
    assert.deepEqual(logged(log, 1), block(3));
    assert.equal(logged(log, 10), 'zero');
    assert.equal(logged(log, 11), 'zero');
    assert.equal(logged(log, 12), undefined);

    const after = NvLog.open(crashCopy(region), { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: true });
    assert.equal(after.replaySummary.records, 5);
    assert.equal(after.replaySummary.lastSeq, 5);
    assert.equal(logged(after, 0), 'zero');
    assert.deepEqual(logged(after, 1), block(3));
    assert.equal(logged(after, 10), 'zero');
    assert.equal(logged(after, 12), undefined);
  });

  it('replays only records after the committed watermark', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = await freshLog(region);
    for (let i = 0; i < 6; i++) await log.appendWrite(i * BS, [block(i + 1)], 0);
    const after = NvLog.open(crashCopy(region), { volumeUuid: UUID, committed: { nvlogSeq: 4, nvlogEpoch: log.epoch }, readOnly: true });
    assert.equal(after.replaySummary.records, 2);
    assert.equal(after.replaySummary.firstSeq, 5);
    assert.equal(logged(after, 3), undefined);
    assert.deepEqual(logged(after, 4), block(5));
  });

  it('stops replay at a torn record and ignores valid records after it', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = await freshLog(region);
    for (let i = 0; i < 5; i++) await log.appendWrite(i * BS, [block(i + 1)], 0);
    const copy = crashCopy(region);
    // Tear the payload of the third record (records are 64 + 4096 bytes, from the half start).
    const third = halfLayout(copy.sizeBytes).halfOffsets[0] + 2 * (RECORD_HEADER_BYTES + BS);
    flip(copy.buffer, third + RECORD_HEADER_BYTES + 100);
    const scan = scanRegion(copy, UUID, 0);
    assert.equal(scan.chain.length, 2);
    const after = NvLog.open(copy, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: true });
    assert.equal(after.replaySummary.lastSeq, 2);
    assert.equal(logged(after, 2), undefined);
    assert.equal(logged(after, 4), undefined);
  });

  it('tells mid-log damage (a later record proves the lost ones durable) from an unflushed gap', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = await freshLog(region);
    for (let i = 0; i < 5; i++) {
      await log.appendWrite(i * BS, [block(i + 1)], 0);
      await log.flush();
    }
    const copy = crashCopy(region);
    const third = halfLayout(copy.sizeBytes).halfOffsets[0] + 2 * (RECORD_HEADER_BYTES + BS);
    flip(copy.buffer, third + RECORD_HEADER_BYTES + 100);
    const scan = scanRegion(copy, UUID, 0);
    assert.equal(scan.chain.length, 2);
    assert.deepEqual(scan.damage, { firstLostSeq: 3, lastLostSeq: 5, lastDurableLostSeq: 4, validRecordsAfter: 2 });
    assert.equal(scan.unflushedGap, undefined);

    // The same damage without flushes proves nothing: a torn, unflushed tail.
    const region2 = new MemoryNvram(1024 * 1024);
    await NvLog.format(region2, UUID);
    const log2 = await freshLog(region2);
    for (let i = 0; i < 5; i++) await log2.appendWrite(i * BS, [block(i + 1)], 0);
    const copy2 = crashCopy(region2);
    flip(copy2.buffer, third + RECORD_HEADER_BYTES + 100);
    const scan2 = scanRegion(copy2, UUID, 0);
    assert.equal(scan2.damage, undefined);
    assert.deepEqual(scan2.unflushedGap, { firstLostSeq: 3, lastLostSeq: 5, lastDurableLostSeq: 0, validRecordsAfter: 2 });
  });

  it('never replays records of an earlier epoch, even with higher seqs', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = await freshLog(region);
    for (let i = 0; i < 8; i++) await log.appendWrite(i * BS, [block(0x10 + i)], 0);
    // Crash; pretend recovery replayed only up to seq 3 (e.g. record 4 was torn): the CP committed seq 3.
    const copy = crashCopy(region);
    const tornAt = halfLayout(copy.sizeBytes).halfOffsets[0] + 3 * (RECORD_HEADER_BYTES + BS);
    flip(copy.buffer, tornAt + 9);
    const rec = NvLog.open(copy, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false });
    assert.equal(rec.recoverySeq, 3);
    const epoch2 = rec.nextEpoch;
    await rec.beginEpoch();
    assert.equal(rec.epoch, epoch2);
    // New epoch writes seq 4 at the start of half 0 (overwriting old records 1..1).
    assert.equal(await rec.appendWrite(50 * BS, [block(0x99)], 0), 4);
    const after = NvLog.open(crashCopy(copy), { volumeUuid: UUID, committed: { nvlogSeq: 3, nvlogEpoch: epoch2 }, readOnly: true });
    // Old records 5..8 (epoch 1) are still in the region but must not replay.
    assert.equal(after.replaySummary.records, 1);
    assert.deepEqual(logged(after, 50), block(0x99));
    assert.equal(logged(after, 5), undefined);
  });

  it('rotates halves, makes writers wait while both are full, and wakes them in order', async () => {
    const region = new MemoryNvram(256 * 1024);
    await NvLog.format(region, UUID);
    let frozenCount = 0;
    const log = await freshLog(region);
    log.onFrozen = () => { frozenCount++; };
    const perHalf = Math.floor(log.layout.halfSizeBytes / (RECORD_HEADER_BYTES + BS));
    for (let i = 0; i < perHalf; i++) await log.appendWrite(i * BS, [block(i)], 0);
    assert.equal(frozenCount, 0);
    // The next append rotates: half 0 frozen, half 1 active.
    await log.appendWrite(1000 * BS, [block(7)], 0);
    assert.equal(frozenCount, 1);
    const frozen = log.frozenHalf();
    assert.ok(frozen);
    assert.equal(frozen.records, perHalf);
    for (let i = 1; i < perHalf; i++) await log.appendWrite((1000 + i) * BS, [block(i)], 0);
    // Both halves full: the next appends wait.
    const order: number[] = [];
    const waiting = [0, 1, 2].map((k) => log.appendWrite((2000 + k) * BS, [block(k)], 0).then((seq) => { order.push(seq); return seq; }));
    await new Promise((r) => setImmediate(r));
    assert.equal(order.length, 0);
    assert.equal(log.stats().spaceWaiters, 3);
    // Reads still see the frozen half's data.
    assert.deepEqual(logged(log, 3), block(3));
    log.releaseFrozen(frozen as Half);
    const seqs = await Promise.all(waiting);
    assert.deepEqual(order, seqs);
    assert.deepEqual(seqs, [2 * perHalf + 1, 2 * perHalf + 2, 2 * perHalf + 3]);
    assert.equal(frozenCount, 2);
    // The released half's data is gone from the index (its CP owns it now).
    assert.equal(logged(log, 3), undefined);
    assert.deepEqual(logged(log, 2001), block(1));
    assert.ok(log.durableSeq >= perHalf, 'a released half counts as durable');
  });

  it('treats a half with too many zero ranges as full', async () => {
    const region = new MemoryNvram(1024 * 1024);
    await NvLog.format(region, UUID);
    const log = NvLog.open(region, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false, zeroRangesPerHalfMax: 4 });
    await log.beginEpoch();
    let frozen = 0;
    log.onFrozen = () => { frozen++; };
    for (let i = 0; i < 4; i++) await log.appendZero(RecordType.Trim, i * 2 * BS, BS, 0);
    assert.equal(frozen, 0);
    await log.appendZero(RecordType.Trim, 100 * BS, BS, 0);
    assert.equal(frozen, 1);
  });

  describe('group commit over a real mmapped file', () => {
    let dir: string;
    before(() => { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvlog-')); });
    after(() => fs.rmSync(dir, { recursive: true, force: true }));

    it('concurrent flushes share persist rounds', async () => {
      const mm = await MmapNvram.open(path.join(dir, 'nv.log'), { sizeBytes: 4 * 1024 * 1024, create: true });
      const rec = new IoRecorder();
      rec.recording = false;
      const region = new RecordingNvram(mm, rec, 'nvram');
      await NvLog.format(region, UUID);
      const log = await freshLog(region);
      const before = rec.counts.persists;
      const n = 64;
      const ops: Promise<void>[] = [];
      for (let i = 0; i < n; i++) {
        ops.push(log.appendWrite(i * BS, [block(i)], 0).then(() => log.flush()));
      }
      await Promise.all(ops);
      const persists = rec.counts.persists - before;
      const rounds = log.stats().persistRounds;
      assert.ok(rounds <= 3, `expected the 64 flushes to share at most 3 rounds, got ${rounds}`);
      assert.ok(persists <= 2 * rounds, `persists ${persists} for ${rounds} rounds`);
      assert.equal(log.durableSeq, n);
      // A flush with nothing new does not persist again.
      await log.flush();
      assert.equal(log.stats().persistRounds, rounds);
      // Sequential flushes each need their own round.
      for (let i = 0; i < 3; i++) {
        await log.appendWrite(i * BS, [block(9)], 1);
        await log.flush();
      }
      assert.equal(log.stats().persistRounds, rounds + 3);
      log.close();
      await region.close();
    });
  });

  describe('power loss over a real mmapped file', () => {
    let dir: string;
    before(() => { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvlog-pl-')); });
    after(() => fs.rmSync(dir, { recursive: true, force: true }));

    it('the recorder models what persist made durable in the file, and that state replays every flushed record', async () => {
      const file = path.join(dir, 'nv.log');
      const mm = await MmapNvram.open(file, { sizeBytes: 1024 * 1024, create: true });
      const rec = new IoRecorder();
      const region = new RecordingNvram(mm, rec, 'nvram');
      await NvLog.format(region, UUID);
      const log = await freshLog(region);
      rec.reset();
      const base = emptyImage();
      const basePages = new Map<number, Buffer>();
      for (let p = 0; p < mm.sizeBytes / BS; p++) basePages.set(p, Buffer.from(mm.buffer.subarray(p * BS, (p + 1) * BS)));
      base.pages.set('nvram', basePages);
      // Five flushed writes (their records span pages), then two never flushed.
      for (let i = 0; i < 5; i++) {
        await log.appendWrite(i * BS, [block(0x10 + i)], 0);
        await log.flush();
      }
      await log.appendWrite(7 * BS, [block(0x77)], 0);
      await log.appendWrite(8 * BS, [block(0x88)], 0);
      rec.capture();
      const crash = crashPoint(base, rec.events, rec.events.length);
      assert.ok(crash.pending.length > 0, 'the unflushed records are pending');
      // Every page the model calls durable and nothing stored into since holds, in the
      // file, exactly the modelled bytes (the file read through another descriptor).
      const fd = fs.openSync(file, 'r');
      const pendingPages = new Set(crash.pending.map((u) => u.key));
      let compared = 0;
      for (const [page, data] of crash.durable.pages.get('nvram')!) {
        if (pendingPages.has(page) || data.equals(basePages.get(page)!)) continue;
        const onFile = Buffer.alloc(BS);
        fs.readSync(fd, onFile, 0, BS, page * BS);
        assert.ok(onFile.equals(data), `page ${page}: the file differs from the modelled durable page`);
        compared++;
      }
      fs.closeSync(fd);
      assert.ok(compared >= 2, `compared ${compared} persisted pages`);
      // The state where nothing pending survived replays all five flushed records.
      const lost = buildState(crash, crash.pending.map(() => ({ version: -1 })));
      const image = Buffer.alloc(mm.sizeBytes);
      for (const [page, data] of lost.pages.get('nvram')!) data.copy(image, page * BS);
      const after = NvLog.open(new MemoryNvram(mm.sizeBytes, image), { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: true });
      assert.ok(after.replaySummary.lastSeq >= 5, `replayed through seq ${after.replaySummary.lastSeq}`);
      for (let i = 0; i < 5; i++) assert.ok(logged(after, i)! instanceof Buffer && (logged(after, i) as Buffer).equals(block(0x10 + i)), `flushed write ${i}`);
      log.close();
      await region.close();
    });
  });

  it('matches a Map model under random ops, CPs and crashes (property)', async () => {
    const LBNS = 24;
    type Op =
      | { k: 'write'; lbn: number; count: number; fill: number }
      | { k: 'trim'; lbn: number; count: number }
      | { k: 'zero'; lbn: number; count: number }
      | { k: 'cp' }
      | { k: 'crash' };
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      { weight: 6, arbitrary: fc.record({ k: fc.constant('write' as const), lbn: fc.integer({ min: 0, max: LBNS - 1 }), count: fc.integer({ min: 1, max: 4 }), fill: fc.integer({ min: 1, max: 255 }) }) },
      { weight: 1, arbitrary: fc.record({ k: fc.constant('trim' as const), lbn: fc.integer({ min: 0, max: LBNS - 1 }), count: fc.integer({ min: 1, max: 6 }) }) },
      { weight: 1, arbitrary: fc.record({ k: fc.constant('zero' as const), lbn: fc.integer({ min: 0, max: LBNS - 1 }), count: fc.integer({ min: 1, max: 6 }) }) },
      { weight: 1, arbitrary: fc.constant({ k: 'cp' as const }) },
      { weight: 1, arbitrary: fc.constant({ k: 'crash' as const }) },
    );
    await fc.assert(fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 80 }), async (ops) => {
      let region = new MemoryNvram(256 * 1024);
      await NvLog.format(region, UUID);
      // "Tree": what CPs committed, plus the committed watermark.
      const tree = new Map<number, number>();
      let meta: CpMeta = { nvlogSeq: 0, nvlogEpoch: 0 };
      const model = new Map<number, number>();
      const commit = (halves: readonly Half[], newMeta: CpMeta, log: NvLog): void => {
        for (const h of halves) {
          for (const r of h.index.mergedZeroRanges()) for (let l = r.startLbn; l < r.endLbn; l++) tree.delete(l);
          for (const [lbn, off] of h.index.blocks) tree.set(lbn, log.blockView(off)[0]!);
        }
        meta = newMeta;
      };
      const recover = async (): Promise<NvLog> => {
        const log = NvLog.open(region, { volumeUuid: UUID, committed: meta, readOnly: false });
        commit(log.recoveryHalves(), { nvlogSeq: log.recoverySeq, nvlogEpoch: log.nextEpoch }, log);
        await log.beginEpoch();
        return log;
      };
      let log = await recover();
      const cp = (): void => {
        log.freezeActive();
        const f = log.frozenHalf();
        if (!f) return;
        commit([f], { nvlogSeq: f.lastSeq, nvlogEpoch: log.epoch }, log);
        log.releaseFrozen(f);
      };
      log.onFrozen = () => { /* CPs run explicitly below */ };
      for (const op of ops) {
        const count = 'count' in op ? Math.min(op.count, LBNS - op.lbn) : 0;
        if (op.k === 'write') {
          const bufs = Array.from({ length: count }, () => block(op.fill));
          // A full log needs a CP first (the engine does this from onFrozen).
          if (log.frozenHalf() && log.activeFull) cp();
          const p = log.appendWrite(op.lbn * BS, bufs, 0);
          if (log.stats().spaceWaiters > 0) cp();
          await p;
          for (let i = 0; i < count; i++) model.set(op.lbn + i, op.fill);
        } else if (op.k === 'trim' || op.k === 'zero') {
          if (log.frozenHalf() && log.activeFull) cp();
          const p = log.appendZero(op.k === 'trim' ? RecordType.Trim : RecordType.Zero, op.lbn * BS, count * BS, 0);
          if (log.stats().spaceWaiters > 0) cp();
          await p;
          for (let i = 0; i < count; i++) model.delete(op.lbn + i);
        } else if (op.k === 'cp') {
          cp();
          if (log.frozenHalf()) cp();
        } else {
          log.close();
          region = crashCopy(region);
          log = await recover();
          log.onFrozen = () => { /* explicit */ };
        }
        for (let lbn = 0; lbn < LBNS; lbn++) {
          const l = logged(log, lbn);
          const got = l === undefined ? (tree.get(lbn) ?? 0) : l === 'zero' ? 0 : l[0]!;
          assert.equal(got, model.get(lbn) ?? 0, `lbn ${lbn} after ${JSON.stringify(op)}`);
        }
      }
    }), { numRuns: 150, seed: Number(process.env.NVMIRROR_SEED ?? 4242) });
  });
});
