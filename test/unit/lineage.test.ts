/**
 * lineage.ts and the lineage in the superblock: the comparison agrees with the CP-by-CP
 * history on random fork trees (fast-check), superblocks carry it (version 1 ones still
 * open, with the root generation), promote's new generation starts at the next CP, and
 * check flags a ring CP of another history.
 */
import { strict as assert } from 'assert';
import * as fc from 'fast-check';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { crc32c } from '../../src/io/checksum';
import { BLOCK, RING_SLOTS, decodeSuperblock, encodeSuperblock, type Superblock } from '../../src/tree/layout';
import {
  LINEAGE_ENTRIES_MAX, compareLineage, generationAt, lineageProblem, rootGeneration, startGeneration, type Generation, type LineageRelation,
} from '../../src/tree/lineage';
import { BlockTree } from '../../src/tree/tree';

const SEED = Number(process.env.LINEAGE_FC_SEED ?? Date.now() % 1_000_000);
const UUID = '5a1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';

/** A side of a simulated world: its lineage, CP, and (ground truth) the generation of every CP it went through. */
interface Side {
  lineage: Generation[];
  cp: number;
  path: string[];
}

/** Ground truth from the CP-by-CP paths. */
function truth(a: Side, b: Side): { relation: LineageRelation; commonCp: number } {
  let c = -1;
  for (let i = 0; i <= Math.min(a.cp, b.cp) && a.path[i] === b.path[i]; i++) c = i;
  if (c < 0) return { relation: 'unrelated', commonCp: -1 };
  const relation: LineageRelation = a.cp === c && b.cp === c ? 'same' : b.cp === c ? 'source-ahead' : a.cp === c ? 'destination-ahead' : 'diverged';
  return { relation, commonCp: c };
}

type Op = { kind: 'commit'; who: number } | { kind: 'copy'; who: number; back: number } | { kind: 'promote'; who: number; back: number };

/** Runs ops from one root volume: commits, mirror copies (possibly lagging), and promotes (a copy that starts a generation and commits). */
function world(ops: Op[]): Side[] {
  const root = rootGeneration(UUID);
  const sides: Side[] = [{ lineage: [root], cp: 0, path: [root.id] }];
  let next = 1;
  const copyAt = (s: Side, back: number): Side => {
    const cp = Math.max(0, s.cp - back);
    return { lineage: s.lineage.filter((g) => g.firstCp <= cp), cp, path: s.path.slice(0, cp + 1) };
  };
  for (const op of ops) {
    const s = sides[op.who % sides.length]!;
    if (op.kind === 'commit') {
      s.cp++;
      s.path.push(s.lineage[0]!.id);
    } else if (op.kind === 'copy') {
      sides.push(copyAt(s, op.back));
    } else {
      const c = copyAt(s, op.back);
      const id = (next++).toString(16).padStart(16, '0');
      c.lineage = startGeneration(c.lineage, c.cp, id);
      c.cp++;
      c.path.push(id);
      sides.push(c);
    }
  }
  return sides;
}

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('commit' as const), who: fc.nat(40) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('copy' as const), who: fc.nat(40), back: fc.nat(4) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('promote' as const), who: fc.nat(40), back: fc.nat(4) }) },
);

describe('lineage', () => {
  before(() => process.stdout.write(`      (fast-check seed ${SEED}; LINEAGE_FC_SEED=${SEED} replays)\n`));

  it('finds the newest common CP and who wrote since, as the CP-by-CP histories say, for random forks', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 60 }), fc.nat(), fc.nat(), (ops, i, j) => {
        const promotes = ops.filter((o) => o.kind === 'promote').length;
        fc.pre(promotes < LINEAGE_ENTRIES_MAX); // bounded histories: see the next test
        const sides = world(ops);
        const a = sides[i % sides.length]!;
        const b = sides[j % sides.length]!;
        assert.equal(lineageProblem(a.lineage, a.cp), null);
        const got = compareLineage(a, b);
        const want = truth(a, b);
        assert.deepEqual({ relation: got.relation, commonCp: got.commonCp }, want);
        assert.equal(got.sourceSince, a.cp - want.commonCp);
        assert.equal(got.destinationSince, b.cp - want.commonCp);
        // Symmetric.
        const back = compareLineage(b, a);
        const swap: Record<LineageRelation, LineageRelation> = { same: 'same', 'source-ahead': 'destination-ahead', 'destination-ahead': 'source-ahead', diverged: 'diverged', unrelated: 'unrelated' };
        assert.equal(back.relation, swap[got.relation]);
        assert.equal(back.commonCp, got.commonCp);
        // Every CP on the path is named by the lineage.
        for (let c = 0; c <= a.cp; c++) assert.equal(generationAt(a.lineage, a.cp, c), a.path[c]);
      }),
      { seed: SEED, numRuns: 2000 },
    );
  });

  it('with histories cut to the bound, never names a wrong common CP (it says unrelated instead)', () => {
    fc.assert(
      fc.property(fc.array(fc.nat(6), { minLength: 16, maxLength: 40 }), fc.nat(39), (backs, k) => {
        // A chain of promotes, each from the last (some lagging): more generations than a superblock keeps.
        const ops: Op[] = backs.flatMap((back, n) => [{ kind: 'commit' as const, who: n }, { kind: 'promote' as const, who: n, back: back % 2 }]);
        const sides = world(ops);
        const last = sides[sides.length - 1]!;
        const other = sides[k % sides.length]!;
        const cut = (s: Side): Side => ({ ...s, lineage: s.lineage.slice(0, LINEAGE_ENTRIES_MAX) });
        const got = compareLineage(cut(last), cut(other));
        const want = truth(last, other);
        if (got.relation !== 'unrelated') assert.deepEqual({ relation: got.relation, commonCp: got.commonCp }, want);
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('refuses malformed lineages with a reason', () => {
    const g = (id: string, firstCp: number): Generation => ({ id, firstCp });
    assert.match(lineageProblem([], 3)!, /0 generations/);
    assert.match(lineageProblem([g('00000000000000ab', 5)], 3)!, /starts at CP 5, after this CP 3/);
    assert.match(lineageProblem([g('00000000000000ab', 2), g('00000000000000ac', 2)], 3)!, /not before/);
    assert.match(lineageProblem([g('00000000000000ab', 2), g('00000000000000ab', 0)], 3)!, /twice/);
    assert.match(lineageProblem([g('0000000000000000', 0)], 3)!, /bad id/);
    assert.match(lineageProblem([g('XYZ', 0)], 3)!, /bad id/);
    assert.equal(lineageProblem([g('00000000000000ab', 2), g('00000000000000ac', 0)], 3), null);
  });
});

describe('lineage in the superblock', () => {
  async function fresh(): Promise<{ dev: MemoryBlockDevice; tree: BlockTree }> {
    const dev = new MemoryBlockDevice(1024);
    await BlockTree.format(dev, { sizeBytes: 1 << 20, volumeUuid: UUID });
    return { dev, tree: await BlockTree.open(dev) };
  }
  const sbOf = (dev: MemoryBlockDevice, cp: number): Superblock => {
    const d = decodeSuperblock(dev.peekBlock(cp % RING_SLOTS));
    assert.ok(typeof d !== 'string', String(d));
    return d;
  };

  it('a new volume is in its root generation; a started generation begins at the next CP and names the one it forked from', async () => {
    const { dev, tree } = await fresh();
    assert.deepEqual(sbOf(dev, 0).lineage, [rootGeneration(UUID)]);
    await tree.commitCp([{ lbn: 1, data: Buffer.alloc(BLOCK, 1) }], { nvlogSeq: 1, nvlogEpoch: 1 });
    tree.startGeneration('00000000000000f1');
    assert.deepEqual(tree.stats().lineage, [rootGeneration(UUID)], 'nothing changes before the CP');
    await tree.commitCp([{ lbn: 2, data: Buffer.alloc(BLOCK, 2) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    await tree.commitCp([{ lbn: 3, data: Buffer.alloc(BLOCK, 3) }], { nvlogSeq: 3, nvlogEpoch: 1 });
    const want = [{ id: '00000000000000f1', firstCp: 2 }, rootGeneration(UUID)];
    assert.deepEqual(sbOf(dev, 3).lineage, want);
    assert.deepEqual(sbOf(dev, 1).lineage, [rootGeneration(UUID)]);
    assert.ok((await tree.check()).ok);
    await tree.close();
    const again = await BlockTree.open(dev);
    assert.deepEqual(again.stats().lineage, want);
    await again.close();
  });

  it('a version 1 superblock (no lineage) still opens, in the root generation', async () => {
    const { dev, tree } = await fresh();
    await tree.commitCp([{ lbn: 1, data: Buffer.alloc(BLOCK, 1) }], { nvlogSeq: 1, nvlogEpoch: 1 });
    await tree.close();
    for (let s = 0; s < 2; s++) {
      const b = Buffer.from(dev.peekBlock(s));
      b.writeUInt32LE(1, 8);
      b.fill(0, 3840, BLOCK - 4);
      b.writeUInt32LE(crc32c(b, 0, BLOCK - 4), BLOCK - 4);
      await dev.writeBlocks(s, b);
    }
    const old = await BlockTree.open(dev);
    assert.equal(old.stats().cpNumber, 1);
    assert.deepEqual(old.stats().lineage, [rootGeneration(UUID)]);
    await old.commitCp([{ lbn: 2, data: Buffer.alloc(BLOCK, 2) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    assert.equal(dev.peekBlock(2).readUInt32LE(8), 2, 'new CPs are written as version 2');
    assert.ok((await old.check()).ok);
    await old.close();
  });

  it('a damaged lineage field makes the superblock invalid, with the reason', async () => {
    const { dev, tree } = await fresh();
    await tree.close();
    const sb = sbOf(dev, 0);
    const b = encodeSuperblock({ ...sb, cpNumber: 5, lineage: [{ id: '00000000000000f1', firstCp: 4 }, rootGeneration(UUID)] });
    const bad = (patch: (x: Buffer) => void): string => {
      const c = Buffer.from(b);
      patch(c);
      c.writeUInt32LE(crc32c(c, 0, BLOCK - 4), BLOCK - 4);
      const d = decodeSuperblock(c);
      assert.equal(typeof d, 'string');
      return d as string;
    };
    assert.match(bad((c) => c.writeUInt32LE(0, 3840)), /bad generation count 0/);
    assert.match(bad((c) => c.writeUInt32LE(16, 3840)), /bad generation count 16/);
    assert.match(bad((c) => c.writeUInt32LE(9, 3848 + 8)), /starts at CP 9, after this CP 5/);
    assert.match(bad((c) => c.writeUInt32LE(4, 3848 + 16 + 8)), /not before/);
    assert.match(bad((c) => (c[4000] = 1)), /non-zero bytes after the last generation/);
  });

  it('check flags an older CP in the ring that belongs to another history', async () => {
    const { dev, tree } = await fresh();
    for (let n = 1; n <= 3; n++) await tree.commitCp([{ lbn: n, data: Buffer.alloc(BLOCK, n) }], { nvlogSeq: n, nvlogEpoch: 1 });
    assert.ok((await tree.check()).ok);
    // CP 2's slot rewritten as if another side had written CP 2 in its own generation.
    const two = sbOf(dev, 2);
    await dev.writeBlocks(2, encodeSuperblock({ ...two, lineage: [{ id: '00000000000000e9', firstCp: 2 }, rootGeneration(UUID)] }));
    const r = await tree.check();
    assert.equal(r.ok, false);
    assert.ok(r.problems.some((p) => /lineage: CP 2 in ring slot 2 is of generation 00000000000000e9/.test(p)), r.problems.join('\n'));
    await tree.close();
  });
});
