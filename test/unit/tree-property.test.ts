/**
 * Property tests of the block tree against a simple model (Map lbn -> contents):
 * random sequences of writes, trims, commits (with snapshot create/delete), reopenings
 * and commits that fail part-way (a device write error), on a small device so that
 * freed space must be reused and ENOSPC happens. After every step that changes the
 * tree, the live tree and every snapshot must read back exactly as the model says, and
 * check() must pass. A failing run prints its seed (fast-check).
 */
import { strict as assert } from 'assert';
import fc from 'fast-check';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES, type BlockDevice } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import type { BlockChange, TreeReader } from '../../src/tree/types';
import { VolumeError } from '../../src/util/errors';
import { EXTENT_HOLE } from '../../src/volume/types';

const B = BLOCK_SIZE_BYTES;
const UUID = '11111111-2222-4333-8444-555555555555';
const SIZE_BYTES = 64 * 1024 ** 3; // 16 Mi lbns: a 4-level tree
const LBNS = SIZE_BYTES / B;

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  b.writeUInt32LE(seed >>> 0, 0);
  b.writeUInt32LE(0xabcdef ^ seed, B - 4);
  b.fill(seed & 0xff, 8, 64);
  return b;
}

/** Fails the n-th writeBlocks call from now (nothing of it lands), once. */
class FaultyDevice implements BlockDevice {
  failIn = -1;
  constructor(readonly inner: MemoryBlockDevice) {}
  get blockCount(): number {
    return this.inner.blockCount;
  }
  readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    return this.inner.readBlocks(pba, count, dst);
  }
  writeBlocks(pba: number, data: Buffer): Promise<void> {
    if (this.failIn > 0 && --this.failIn === 0) return Promise.reject(new Error('injected write error'));
    return this.inner.writeBlocks(pba, data);
  }
  sync(): Promise<void> {
    return this.inner.sync();
  }
  discard(pba: number, count: number): Promise<void> {
    return this.inner.discard(pba, count);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

type Op =
  | { k: 'write'; lbn: number; seed: number }
  | { k: 'trim'; lbn: number }
  | { k: 'commit'; create: string | null; del: number | null; failAt: number }
  | { k: 'reopen' };

const lbnArb = fc.oneof(
  fc.integer({ min: 0, max: 40 }),
  fc.integer({ min: 160, max: 180 }),
  fc.integer({ min: 0, max: LBNS - 1 }),
  fc.constantFrom(LBNS - 1, 28223, 28224, 4741632),
);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 8, arbitrary: fc.record({ k: fc.constant('write' as const), lbn: lbnArb, seed: fc.integer({ min: 1, max: 1 << 30 }) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('trim' as const), lbn: lbnArb }) },
  {
    weight: 4,
    arbitrary: fc.record({
      k: fc.constant('commit' as const),
      create: fc.option(fc.constantFrom('s1', 's2', 's3', 's4'), { freq: 3 }),
      del: fc.option(fc.integer({ min: 0, max: 3 }), { freq: 3 }),
      failAt: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 12 }) }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ k: 'reopen' as const }) },
);

async function verifyReader(r: TreeReader, model: Map<number, number>, probe: Iterable<number>, label: string): Promise<void> {
  for (const lbn of probe) {
    const got = await r.readBlock(lbn);
    const want = model.get(lbn);
    if (want === undefined) assert.equal(got, null, `${label}: lbn ${lbn} should be a hole`);
    else assert.ok(got !== null && got.equals(block(want)), `${label}: lbn ${lbn} should hold seed ${want}`);
    const ext = await r.blockStatus(lbn, 1, 1);
    assert.equal(ext.length, 1);
    assert.equal((ext[0]!.flags & EXTENT_HOLE) !== 0, want === undefined, `${label}: block status of lbn ${lbn}`);
  }
}

async function runScenario(ops: Op[], deviceBlocks: number): Promise<void> {
  const mem = new MemoryBlockDevice(deviceBlocks);
  const dev = new FaultyDevice(mem);
  await BlockTree.format(dev, { sizeBytes: SIZE_BYTES, volumeUuid: UUID });
  let tree = await BlockTree.open(dev);
  const live = new Map<number, number>();
  const snaps = new Map<string, Map<number, number>>();
  const pending = new Map<number, number | null>();
  const touched = new Set<number>();
  let seq = 0;
  const verifyAll = async (): Promise<void> => {
    await verifyReader(tree, live, touched, 'live');
    for (const [name, m] of snaps) {
      const r = tree.snapshotReader(name);
      assert.ok(r, `snapshot ${name} exists`);
      await verifyReader(r, m, touched, `snapshot ${name}`);
    }
    assert.deepEqual(tree.listSnapshots().map((s) => s.name).sort(), [...snaps.keys()].sort());
    const report = await tree.check();
    assert.deepEqual(report.problems, []);
  };
  for (const op of ops) {
    if (op.k === 'write') {
      pending.set(op.lbn, op.seed);
      touched.add(op.lbn);
    } else if (op.k === 'trim') {
      pending.set(op.lbn, null);
      touched.add(op.lbn);
    } else if (op.k === 'reopen') {
      await tree.close();
      tree = await BlockTree.open(dev);
      await verifyAll();
    } else {
      const names = [...snaps.keys()].sort();
      const snapOps: { kind: 'create' | 'delete'; name: string }[] = [];
      const delName = op.del !== null ? names[op.del % Math.max(1, names.length)] : undefined;
      if (delName !== undefined) snapOps.push({ kind: 'delete', name: delName });
      if (op.create !== null && (!snaps.has(op.create) || op.create === delName)) snapOps.push({ kind: 'create', name: op.create });
      const changes: BlockChange[] = [...pending].map(([lbn, s]) => ({ lbn, data: s === null ? null : block(s) }));
      dev.failIn = op.failAt;
      seq++;
      let ok = false;
      try {
        await tree.commitCp(changes, { nvlogSeq: seq, nvlogEpoch: 1 }, snapOps);
        ok = true;
      } catch (e) {
        if (!(e instanceof VolumeError)) throw e;
        if (e.code === 'ENOSPC') {
          // Nothing changed; the model drops the pending writes to lbns other than trims, so space frees up.
          for (const [lbn, s] of [...pending]) if (s !== null) pending.delete(lbn);
        } else {
          assert.equal(e.code, 'EIO');
          assert.match(e.message, /injected write error/);
          await assert.rejects(tree.commitCp([], { nvlogSeq: seq, nvlogEpoch: 1 }), /refuses commits/);
          tree = await BlockTree.open(dev);
        }
      }
      dev.failIn = -1;
      if (ok) {
        for (const [lbn, s] of pending) {
          if (s === null) live.delete(lbn);
          else live.set(lbn, s);
        }
        pending.clear();
        for (const o of snapOps) {
          if (o.kind === 'delete') snaps.delete(o.name);
          else snaps.set(o.name, new Map(live));
        }
        assert.equal(tree.stats().meta.nvlogSeq, seq);
      }
      await verifyAll();
    }
  }
  // Finally: reopen and verify everything once more.
  await tree.close();
  tree = await BlockTree.open(dev);
  await verifyAll();
}

describe('tree: property tests against a model', () => {
  it('random writes/trims/commits/snapshots/reopens/failed commits read back like the model', async function () {
    this.timeout(120_000);
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 60 }), async (ops) => runScenario(ops, 300)),
      { numRuns: 150 },
    );
  });

  it('a long single run with a cramped device keeps accounting exact', async function () {
    this.timeout(120_000);
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 200, maxLength: 300 }), async (ops) => runScenario(ops, 160)),
      { numRuns: 8 },
    );
  });
});
