/**
 * Early data placement (src/cp/early-place.ts, SpaceMap.reserveEarly/adoptEarly/dropEarly,
 * BlockTree.early): a large WRITE's blocks are written to free blocks while the half fills
 * and its CP points at them. The space map keeps such blocks out of every allocation and
 * out of the persisted map until a CP adopts them; a block rewritten or trimmed in the same
 * half is never adopted and goes back; the CP's sink still gets every data block; nothing
 * is reserved while a discard runs. The engine's model property test (engine.test.ts) runs
 * with placement on, crashes included.
 */
import { strict as assert } from 'assert';
import { SpaceMap } from '../../src/tree/spacemap';
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';
import type { CpBlock, CpMeta, CpSink } from '../../src/tree/types';

const UUID = '5eed0000-1111-4222-8333-4444555566ee';
const BS = 4096;

function pattern(seed: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += 4) b.writeUInt32LE((seed * 2654435761 + i * 40503) >>> 0, i);
  return b;
}

describe('early data placement', () => {
  it('space map: early blocks are taken by no allocation, counted out of free, adopted into use or dropped back', () => {
    const m = SpaceMap.createEmpty(2048);
    const free0 = m.free;
    const runs = m.reserveEarly(100, 0)!;
    assert.equal(runs.reduce((n, r) => n + r.count, 0), 100);
    const early: number[] = [];
    for (const r of runs) for (let p = r.pba; p < r.pba + r.count; p++) early.push(p);
    for (const p of early) {
      assert.ok(m.isEarly(p) && !m.isAllocatable(p) && !m.isActive(p), `pba ${p} is early only`);
    }
    assert.equal(m.free, free0 - 100);
    assert.equal(m.earlyBlocks, 100);
    const taken = m.allocate(300).flatMap((r) => Array.from({ length: r.count }, (_, k) => r.pba + k));
    assert.deepEqual(taken.filter((p) => early.includes(p)), [], 'allocation never hands out an early block');
    const used0 = m.used;
    m.adoptEarly(early[0]!);
    assert.ok(m.isActive(early[0]!) && !m.isEarly(early[0]!));
    assert.equal(m.used, used0 + 1);
    assert.throws(() => m.adoptEarly(early[0]!), /not placed early/);
    assert.throws(() => m.adoptEarly(taken[0]!), /not placed early/);
    for (const r of runs) m.dropEarly(r);
    assert.equal(m.earlyBlocks, 0);
    for (const p of early.slice(1)) assert.ok(m.isAllocatable(p), `pba ${p} is free again`);
    assert.ok(m.isActive(early[0]!), 'the adopted block stays in use');
    assert.equal(m.free, free0 - 300 - 1);
    assert.deepEqual(m.verifyCounters(), []);
    // Warm blocks (released runs the member still holds) are taken first, as a CP takes them.
    const hot = m.allocate(16)[0]!;
    m.allocate(8); // next fit moves on past them
    for (let q = hot.pba; q < hot.pba + 16; q++) m.unallocate(q);
    assert.deepEqual(m.keepWarm([{ pba: hot.pba, count: 16 }], 7), []);
    const warmFirst = m.reserveEarly(12, 0)!;
    assert.deepEqual(warmFirst, [{ pba: hot.pba, count: 12 }], `the warm run first: ${JSON.stringify(warmFirst)}`);
    // While blocks are being rewritten (the last CP released some), only warm ones are placed: all or none.
    assert.equal(m.reserveEarly(5, 0), undefined, 'four warm blocks left: five are not placed in cold space');
    assert.deepEqual(m.reserveEarly(4, 0), [{ pba: hot.pba + 12, count: 4 }]);
    for (const r of warmFirst) m.dropEarly(r);
    m.dropEarly({ pba: hot.pba + 12, count: 4 });
    // A CP that released nothing (first writes): next fit again.
    assert.deepEqual(m.keepWarm([], 8), []);
    const cold = m.reserveEarly(5, 0)!;
    assert.equal(cold.reduce((n, r) => n + r.count, 0), 5);
    for (const r of cold) m.dropEarly(r);
    // Not without the room asked to be kept: nothing changes.
    const before = m.free;
    assert.equal(m.reserveEarly(before - 5, 10), undefined);
    assert.equal(m.free, before);
    assert.equal(m.earlyBlocks, 0);
  });

  it('the tree reserves nothing while a discard runs (its runs are free but being punched)', async () => {
    const dev = new MemoryBlockDevice(4096);
    await BlockTree.format(dev, { sizeBytes: 4 * 1024 * 1024, volumeUuid: UUID });
    const tree = await BlockTree.open(dev);
    const w = (tree as unknown as { writer: { discarding: number } }).writer;
    assert.ok(tree.early, 'a single-member tree offers early placement');
    w.discarding = 1;
    assert.equal(tree.early.reserve(8, 0), undefined);
    w.discarding = 0;
    const runs = tree.early.reserve(8, 0);
    assert.ok(runs && runs.reduce((n, r) => n + r.count, 0) === 8);
    tree.early.drop(runs);
    await tree.close();
  });

  it('a CP takes placed blocks where they are, except those rewritten or trimmed later in the half; the sink gets every data block; reads, check and a reopen agree', async () => {
    const dev = new MemoryBlockDevice(8192);
    const SIZE = 4 * 1024 * 1024;
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    const nvram = new MemoryNvram(1024 * 1024);
    await NvLog.format(nvram, UUID);
    const tree = await BlockTree.open(dev);
    const shipped = new Map<number, CpBlock>();
    const sink: CpSink = {
      oldestNeededCp: () => undefined,
      holdBroken: () => undefined,
      blocks: async (_cp: number, blocks: readonly CpBlock[]) => {
        for (const b of blocks) if (b.crc !== undefined) shipped.set(b.pba, { ...b, buf: Buffer.from(b.buf) });
      },
      committed: async (_cp: number, _slot: number, _sb: Buffer, _meta: CpMeta) => undefined,
    };
    tree.setCpSink(sink);
    const v = await EngineVolume.open({ tree, region: nvram, readOnly: false, cpIntervalMs: 0, earlyPlacement: { minBlocks: 4, keepFreeBlocks: 64 } });
    assert.ok(v.placer);
    const big = pattern(1, 16 * BS); // blocks 32..47: placed
    await v.write(32 * BS, big, false);
    const small = pattern(2, 2 * BS); // blocks 100..101: too short to place
    await v.write(100 * BS, small, false);
    const over = pattern(3, BS); // block 35 rewritten in the same half
    await v.write(35 * BS, over, false);
    await v.trim(40 * BS, 2 * BS, false); // blocks 40, 41 trimmed
    await v.checkpoint();
    assert.equal(v.placer.stats.placedBlocks, 16);
    const last = v.stats().tree.lastCp!;
    assert.equal(last.earlyBlocks, 13, 'the placed blocks still current: 16 minus one rewritten and two trimmed');
    assert.equal(v.placer.stats.adoptedBlocks, 13);
    assert.equal(last.dataBlocks, 13 + 1 + 2);
    const want = Buffer.from(big);
    over.copy(want, 3 * BS);
    want.fill(0, 8 * BS, 10 * BS);
    assert.deepEqual(await v.read(32 * BS, 16 * BS), want);
    assert.deepEqual(await v.read(100 * BS, 2 * BS), small);
    // The sink got all 16 data blocks, each as the device holds it.
    assert.equal(shipped.size, 16);
    for (const [pba, b] of shipped) {
      const onDev = dev.peekBlock(pba);
      assert.ok(onDev.equals(b.buf), `shipped block at pba ${pba} is what the device holds`);
      assert.ok(b.origin !== undefined, `shipped block at pba ${pba} names its record`);
    }
    const report = await v.tree.check();
    assert.ok(report.ok, report.problems.join('; '));
    await v.close();
    const tree2 = await BlockTree.open(dev);
    const v2 = await EngineVolume.open({ tree: tree2, region: new MemoryNvram(nvram.sizeBytes, nvram.buffer), readOnly: false, cpIntervalMs: 0 });
    assert.deepEqual(await v2.read(32 * BS, 16 * BS), want);
    const report2 = await v2.tree.check();
    assert.ok(report2.ok, report2.problems.join('; '));
    await v2.close();
  });
});
