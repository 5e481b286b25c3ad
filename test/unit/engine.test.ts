/**
 * EngineVolume over the real block tree (MemoryBlockDevice) and an in-memory NVRAM
 * region: reads see the newest data across halves and the tree, partial writes merge,
 * writers wait (not fail) when both halves are full, snapshots, and a property test
 * against a byte-array model with CPs, clean reopenings and process crashes (the device
 * and NVRAM copied at an arbitrary moment, even in the middle of a CP).
 */
import { strict as assert } from 'assert';
import fc from 'fast-check';
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';
import { VolumeDirExports } from '../../src/volume/engine-snapshot';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/volume/types';
import { isVolumeError } from '../../src/util/errors';
import * as os from 'os';
import * as native from '../../src/io/native';
import { beginCp, beginUrgentCp, runningCpCount, setCpRunningHandler, setCpUrgencyHandler, urgentCpCount } from '../../src/util/urgency';
import { URGENT_ACTIVE_FILL } from '../../src/cp/runner';
import type { BlockDevice } from '../../src/io/types';

const UUID = '5eed0000-1111-4222-8333-444455556666';
const BS = 4096;
const DEVICE_BLOCKS = 4096;

interface Rig {
  dev: MemoryBlockDevice;
  nvram: MemoryNvram;
}

async function makeRig(sizeBytes: number, nvramBytes: number): Promise<Rig> {
  const dev = new MemoryBlockDevice(DEVICE_BLOCKS);
  await BlockTree.format(dev, { sizeBytes, volumeUuid: UUID });
  const nvram = new MemoryNvram(nvramBytes);
  await NvLog.format(nvram, UUID);
  return { dev, nvram };
}

async function openEngine(rig: Rig, opts: { readOnly?: boolean; cpIntervalMs?: number; early?: boolean } = {}): Promise<EngineVolume> {
  const tree = await BlockTree.open(rig.dev);
  // early: data of writes of >= 2 blocks is placed ahead of its CP (the default thresholds need a far larger device).
  return EngineVolume.open({ tree, region: rig.nvram, readOnly: opts.readOnly ?? false, cpIntervalMs: opts.cpIntervalMs ?? 0, earlyPlacement: opts.early ? { minBlocks: 2, keepFreeBlocks: 64 } : undefined });
}

/** The same storage after a clean close (the engine closed the NVRAM region: map it again). */
function remap(rig: Rig): Rig {
  return { dev: rig.dev, nvram: new MemoryNvram(rig.nvram.sizeBytes, rig.nvram.buffer) };
}

/** The storage as a kill -9 leaves it right now: device blocks and NVRAM bytes copied. */
function crashCopy(rig: Rig): Rig {
  const dev = new MemoryBlockDevice(rig.dev.blockCount);
  const zero = Buffer.alloc(BS);
  const writes: Array<Promise<void>> = [];
  for (let pba = 0; pba < rig.dev.blockCount; pba++) {
    const b = rig.dev.peekBlock(pba);
    if (!b.equals(zero)) writes.push(dev.writeBlocks(pba, b));
  }
  void Promise.all(writes);
  return { dev, nvram: new MemoryNvram(rig.nvram.sizeBytes, rig.nvram.buffer) };
}

function pattern(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

describe('engine volume', () => {
  it('reads its writes (aligned and not), trims and zeroes, before and after CPs and reopen', async () => {
    const rig = await makeRig(1024 * 1024, 512 * 1024);
    let v = await openEngine(rig);
    const a = pattern(1, 3 * BS);
    await v.write(BS, a, false);
    const b = pattern(2, 1000);
    await v.write(2 * BS + 100, b, false); // inside block 2
    const expect = Buffer.alloc(1024 * 1024);
    a.copy(expect, BS);
    b.copy(expect, 2 * BS + 100);
    assert.deepEqual(await v.read(0, 6 * BS), expect.subarray(0, 6 * BS));
    await v.checkpoint();
    assert.deepEqual(await v.read(0, 6 * BS), expect.subarray(0, 6 * BS));
    // A partial write over a block that now lives in the tree merges with it.
    const c = pattern(3, 5000);
    await v.write(3 * BS + 7, c, true);
    c.copy(expect, 3 * BS + 7);
    await v.trim(BS + 10, 20, false); // partial: zeroes 20 bytes
    expect.fill(0, BS + 10, BS + 30);
    await v.zero(5 * BS, 3 * BS, { fua: false, noHole: false, fastZero: false });
    expect.fill(0, 5 * BS, 8 * BS);
    assert.deepEqual(await v.read(0, 10 * BS), expect.subarray(0, 10 * BS));
    assert.deepEqual(await v.read(BS + 5, 9000), expect.subarray(BS + 5, BS + 9005));
    await v.close();
    v = await openEngine(remap(rig));
    assert.deepEqual(await v.read(0, 10 * BS), expect.subarray(0, 10 * BS));
    await v.close();
  });

  it('reports holes and data from the log and the tree in block status', async () => {
    const rig = await makeRig(1024 * 1024, 512 * 1024);
    const v = await openEngine(rig);
    await v.write(4 * BS, pattern(4, 2 * BS), false);
    await v.checkpoint();
    await v.write(10 * BS, pattern(5, BS), false);
    await v.trim(4 * BS, BS, false);
    const ext = await v.blockStatus(0, 16 * BS, 16);
    assert.deepEqual(ext, [
      { lengthBytes: 5 * BS, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: BS, flags: 0 },
      { lengthBytes: 4 * BS, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: BS, flags: 0 },
      { lengthBytes: 5 * BS, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
    // Unaligned start, REQ_ONE.
    assert.deepEqual(await v.blockStatus(5 * BS + 100, 100, 1), [{ lengthBytes: 100, flags: 0 }]);
    await v.close();
  });

  it('merges concurrent partial writes to one block (512-byte sectors) without losing any', async () => {
    const rig = await makeRig(1024 * 1024, 512 * 1024);
    const v = await openEngine(rig);
    await v.write(0, pattern(9, BS), false);
    await v.checkpoint(); // the base now comes from the tree (an async read)
    const sectors = Array.from({ length: 8 }, (_, i) => pattern(100 + i, 512));
    await Promise.all(sectors.map((s, i) => v.write(i * 512, s, false)));
    assert.deepEqual(await v.read(0, BS), Buffer.concat(sectors));
    await v.close();
  });

  it('makes writers wait while both NVRAM halves are full, and loses nothing', async () => {
    const rig = await makeRig(2 * 1024 * 1024, 256 * 1024); // halves of ~124 KiB
    const v = await openEngine(rig);
    const n = 200;
    const ops: Promise<void>[] = [];
    for (let i = 0; i < n; i++) ops.push(v.write((i % 400) * BS, pattern(i, BS), false));
    await Promise.all(ops);
    assert.ok(v.stats().cp.cpsRun >= 3, `expected several CPs, got ${v.stats().cp.cpsRun}`);
    for (let i = 0; i < n; i++) assert.deepEqual(await v.read((i % 400) * BS, BS), pattern(i, BS), `block ${i}`);
    await v.close();
  });

  it('urgency counts CPs: the handler hears the first begin and the last end only; a throwing handler is dropped', () => {
    const seen: boolean[] = [];
    setCpUrgencyHandler((u) => seen.push(u));
    try {
      const a = beginUrgentCp();
      const b = beginUrgentCp();
      a();
      a(); // counted once
      assert.deepEqual(seen, [true]);
      assert.equal(urgentCpCount(), 1);
      b();
      assert.deepEqual(seen, [true, false]);
      setCpUrgencyHandler(() => {
        throw new Error('no');
      });
      const c = beginUrgentCp(); // logged, dropped
      setCpUrgencyHandler(undefined);
      c();
      assert.equal(urgentCpCount(), 0);
      // The process's handler sets the event loop's nice value; the addon takes the current one back.
      assert.equal(native.addon().setNice(os.getPriority()), true);
    } finally {
      setCpUrgencyHandler(undefined);
    }
  });

  it('every CP tells the running handler as it begins and ends; counted per process, a throwing handler dropped', async () => {
    const seen: Array<[boolean, number]> = [];
    setCpRunningHandler((on) => seen.push([on, runningCpCount()]));
    try {
      const rig = await makeRig(2 * 1024 * 1024, 256 * 1024);
      const v = await EngineVolume.open({ tree: await BlockTree.open(rig.dev), region: rig.nvram, readOnly: false, cpIntervalMs: 0 });
      await v.write(0, pattern(0, BS), false);
      await v.checkpoint();
      assert.deepEqual(seen, [[true, 1], [false, 0]], 'told once as the CP began, once as it ended');
      const outer = beginCp(); // another volume's CP, still running
      await v.write(BS, pattern(1, BS), false);
      await v.checkpoint();
      assert.equal(seen.length, 3, 'a second CP while one runs is not a change');
      outer();
      outer(); // counted once
      assert.deepEqual(seen, [[true, 1], [false, 0], [true, 1], [false, 0]]);
      setCpRunningHandler(() => {
        throw new Error('no');
      });
      await v.write(2 * BS, pattern(2, BS), false);
      await v.checkpoint(); // logged, dropped: the CP commits
      assert.equal(runningCpCount(), 0);
      assert.ok((await v.read(2 * BS, BS)).equals(pattern(2, BS)));
      await v.close();
    } finally {
      setCpRunningHandler(undefined);
    }
  });

  it('a CP turns urgent once the active half fills while it runs (the process is told once), and not before', async () => {
    const rig = await makeRig(2 * 1024 * 1024, 256 * 1024); // halves of ~124 KiB
    // The CP's device writes wait for the gate: the CP stays running while writes arrive.
    let open!: () => void;
    let gate: Promise<void> | null = null;
    const inner = rig.dev;
    const gated: BlockDevice = {
      get blockCount() { return inner.blockCount; },
      readBlocks: (pba, count, dst) => inner.readBlocks(pba, count, dst),
      writeBlocks: async (pba, data) => {
        if (gate) await gate;
        return inner.writeBlocks(pba, data);
      },
      sync: () => inner.sync(),
      discard: (pba, count) => inner.discard(pba, count),
      close: () => inner.close(),
    };
    const seen: boolean[] = [];
    setCpUrgencyHandler((u) => seen.push(u));
    try {
      const v = await EngineVolume.open({ tree: await BlockTree.open(gated), region: rig.nvram, readOnly: false, cpIntervalMs: 0 });
      gate = new Promise((r) => (open = r));
      // One block, then a CP of it that cannot finish: the active half is empty, so it is not urgent.
      await v.write(0, pattern(0, BS), false);
      const cp = v.checkpoint();
      await new Promise((r) => setTimeout(r, 30));
      assert.equal(urgentCpCount(), 0, 'a CP with an empty active half is not urgent');
      // Fill the active half past URGENT_ACTIVE_FILL while the CP waits.
      const blocks = Math.ceil((URGENT_ACTIVE_FILL * 124 * 1024) / BS) + 2;
      for (let i = 1; i <= blocks; i++) await v.write(i * BS, pattern(i, BS), false);
      const until = Date.now() + 2000;
      while (urgentCpCount() === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
      assert.equal(urgentCpCount(), 1, 'the running CP is urgent');
      assert.deepEqual(seen, [true]);
      open();
      gate = null;
      await cp;
      assert.equal(urgentCpCount(), 0);
      assert.deepEqual(seen, [true, false], 'told when it began and when it ended, once each');
      assert.ok(v.stats().cp.urgentCps >= 1);
      for (let i = 0; i <= blocks; i++) assert.ok((await v.read(i * BS, BS)).equals(pattern(i, BS)), `block ${i}`);
      await v.close();
    } finally {
      setCpUrgencyHandler(undefined);
      open?.();
    }
  });

  it('splits a large unaligned write into records across half rotations, and reads it back', async () => {
    const rig = await makeRig(4 * 1024 * 1024, 256 * 1024); // records of at most 28 KiB, halves of ~124 KiB
    const v = await openEngine(rig);
    const big = pattern(42, 1024 * 1024 + 777);
    const at = 3 * BS + 123;
    await Promise.all([v.write(at, big, true), v.write(2 * 1024 * 1024, pattern(43, BS), false)]);
    assert.ok(v.stats().cp.cpsRun >= 4, `expected CPs during the write, got ${v.stats().cp.cpsRun}`);
    assert.deepEqual(await v.read(at, big.length), big);
    assert.deepEqual(await v.read(at - 123, 123), Buffer.alloc(123));
    await v.close();
    const v2 = await openEngine(remap(rig));
    assert.deepEqual(await v2.read(at, big.length), big);
    await v2.close();
  });

  it('creates, serves and deletes snapshots; a snapshot keeps its data while the volume changes', async () => {
    const rig = await makeRig(1024 * 1024, 512 * 1024);
    const v = await openEngine(rig);
    await v.write(0, pattern(1, 2 * BS), false);
    await v.snapshot({ kind: 'create', name: 's1' });
    await v.write(0, pattern(2, 2 * BS), false);
    const exp = new VolumeDirExports('vol', v);
    assert.deepEqual(exp.list().map((e) => e.name), ['vol', 'vol@s1']);
    const snap = exp.lookup('vol@s1');
    assert.ok(snap);
    assert.equal(snap.caps.readOnly, true);
    assert.deepEqual(await snap.read(0, 2 * BS), pattern(1, 2 * BS));
    assert.deepEqual(await v.read(0, 2 * BS), pattern(2, 2 * BS));
    await assert.rejects(v.snapshot({ kind: 'create', name: 's1' }), /already exists/);
    await assert.rejects(v.snapshot({ kind: 'create', name: 'bad/name' }), /bad snapshot name/);
    await assert.rejects(snap.write(0, Buffer.alloc(BS), false), (e: unknown) => isVolumeError(e) && e.code === 'EPERM');
    await v.snapshot({ kind: 'delete', name: 's1' });
    assert.equal(exp.lookup('vol@s1'), undefined);
    await assert.rejects(snap.read(0, BS), (e: unknown) => isVolumeError(e) && e.code === 'ESHUTDOWN');
    await v.close();
  });

  it('replays the NVRAM after a crash, read-only as an overlay and read-write into the tree', async () => {
    const rig = await makeRig(1024 * 1024, 512 * 1024);
    const v = await openEngine(rig);
    await v.write(0, pattern(7, 4 * BS), false);
    await v.checkpoint();
    await v.write(2 * BS, pattern(8, 4 * BS), false);
    await v.trim(0, BS, false);
    const crashed = crashCopy(rig);
    await v.close();
    const expect = Buffer.concat([Buffer.alloc(BS), pattern(7, 4 * BS).subarray(BS, 2 * BS), pattern(8, 4 * BS)]);
    const ro = await openEngine(crashed, { readOnly: true });
    assert.equal(ro.stats().replay.records, 2);
    assert.deepEqual(await ro.read(0, 6 * BS), expect);
    await ro.close();
    const rw = await openEngine(remap(crashed));
    assert.deepEqual(await rw.read(0, 6 * BS), expect);
    assert.equal(rw.stats().tree.meta.nvlogSeq, rw.stats().replay.lastSeq, 'the replay was committed');
    await rw.close();
  });

  it('matches a byte-array model under random ops, CPs, reopenings and crashes (property)', async () => {
    const SIZE = 64 * BS;
    type Op =
      | { k: 'write'; off: number; len: number; seed: number; fua: boolean }
      | { k: 'trim' | 'zero'; off: number; len: number }
      | { k: 'flush' | 'cp' | 'reopen' | 'crash' }
      | { k: 'crashmid'; ticks: number };
    const range = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 6 * BS })).map(([off, len]) => ({ off, len: Math.min(len, SIZE - off) }));
    const alignedRange = fc.tuple(fc.integer({ min: 0, max: 63 }), fc.integer({ min: 1, max: 4 })).map(([b, n]) => ({ off: b * BS, len: Math.min(n, 64 - b) * BS }));
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      { weight: 6, arbitrary: fc.tuple(fc.oneof(range, alignedRange), fc.integer({ min: 1, max: 1 << 30 }), fc.boolean()).map(([r, seed, fua]) => ({ k: 'write' as const, ...r, seed, fua })) },
      { weight: 1, arbitrary: range.map((r) => ({ k: 'trim' as const, ...r })) },
      { weight: 1, arbitrary: alignedRange.map((r) => ({ k: 'zero' as const, ...r })) },
      { weight: 1, arbitrary: fc.constantFrom({ k: 'flush' as const }, { k: 'cp' as const }, { k: 'reopen' as const }, { k: 'crash' as const }) },
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 60 }).map((ticks) => ({ k: 'crashmid' as const, ticks })) },
    );
    // Early data placement on: blocks written ahead of their CP, crashes among those writes.
    let placed = 0;
    let adopted = 0;
    const closeCounting = async (x: EngineVolume): Promise<void> => {
      await x.close();
      placed += x.placer?.stats.placedBlocks ?? 0;
      adopted += x.placer?.stats.adoptedBlocks ?? 0;
    };
    await fc.assert(fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), async (ops) => {
      let rig = await makeRig(SIZE, 256 * 1024);
      let v = await openEngine(rig, { early: true });
      const model = Buffer.alloc(SIZE);
      for (const op of ops) {
        switch (op.k) {
          case 'write': {
            const d = pattern(op.seed, op.len);
            await v.write(op.off, d, op.fua);
            d.copy(model, op.off);
            break;
          }
          case 'trim':
            await v.trim(op.off, op.len, false);
            model.fill(0, op.off, op.off + op.len);
            break;
          case 'zero':
            await v.zero(op.off, op.len, { fua: false, noHole: false, fastZero: false });
            model.fill(0, op.off, op.off + op.len);
            break;
          case 'flush':
            await v.flush();
            break;
          case 'cp':
            await v.checkpoint();
            break;
          case 'reopen':
            await closeCounting(v);
            rig = remap(rig);
            v = await openEngine(rig, { early: true });
            break;
          case 'crash':
          case 'crashmid': {
            // crashmid: kill in the middle of a CP, `ticks` microtask turns after it started.
            let cpDone: Promise<unknown> | undefined;
            if (op.k === 'crashmid') {
              cpDone = v.checkpoint().catch(() => undefined);
              for (let i = 0; i < op.ticks; i++) await Promise.resolve();
            }
            const copy = crashCopy(rig);
            await cpDone;
            await closeCounting(v);
            rig = copy;
            v = await openEngine(rig, { early: true });
            break;
          }
        }
      }
      assert.deepEqual(await v.read(0, SIZE), model);
      const report = await v.tree.check();
      assert.ok(report.ok, report.problems.join('; '));
      await closeCounting(v);
    }), { numRuns: 60, seed: Number(process.env.NVMIRROR_SEED ?? 777) });
    assert.ok(placed > 0 && adopted > 0, `early placement was exercised: ${placed} blocks placed, ${adopted} offered to CPs`);
  });
});
