/**
 * The block tree over a RaidDevice (memory members): CPs write whole stripes only (the
 * allocator hands out whole free stripe units and pads the last), freed stripes are
 * reused only when wholly free, every read is right with any tolerated member loss after
 * a reopen, and a data or address block that fails its checksum is healed through the
 * tree's read path instead of becoming an EIO.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BlockTree } from '../../src/tree/tree';
import type { BlockChange, CpMeta } from '../../src/tree/types';
import { RING_SLOTS } from '../../src/tree/layout';
import { RaidGeometry, type RaidLevel } from '../../src/raid/geometry';
import { RaidDevice } from '../../src/raid/raid-device';
import { superblockPick } from '../../src/volume/raid-members';
import { SeededRandom } from '../../src/sim/random';

const B = 4096;
const UUID = '11111111-2222-4333-8444-555555555555';
const MiB = 1024 * 1024;

function meta(seq: number): CpMeta {
  return { nvlogSeq: seq, nvlogEpoch: 1 };
}

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 7) >>> 0, i);
  return b;
}

function raidOver(level: RaidLevel, mems: MemoryBlockDevice[], lost: number[] = []): RaidDevice {
  const g = new RaidGeometry(level, mems.length, 16 * 1024, mems[0]!.blockCount, RING_SLOTS);
  return new RaidDevice({
    geometry: g, volumeUuid: UUID, generation: 1, headPick: superblockPick,
    members: mems.map((d, i) => (lost.includes(i) ? { name: `m${i}`, dev: null, missingReason: 'removed' } : { name: `m${i}`, dev: d })),
  });
}

/** Runs cps random CPs; returns the blocks they wrote. */
async function run(tree: BlockTree, seed: number, cps: number, model: Map<number, number>, lbns: number): Promise<number> {
  let written = 0;
  const rnd = new SeededRandom(seed);
  for (let cp = 0; cp < cps; cp++) {
    const changes: BlockChange[] = [];
    const n = 1 + rnd.int(120);
    for (let k = 0; k < n; k++) {
      const lbn = rnd.int(lbns);
      const v = seed * 100000 + cp * 1000 + k;
      changes.push({ lbn, data: block(v) });
      model.set(lbn, v);
    }
    written += (await tree.commitCp(changes, meta(tree.cpNumber + 1))).blocksWritten;
  }
  return written;
}

async function expectModel(tree: BlockTree, model: Map<number, number>, what: string): Promise<void> {
  for (const [lbn, v] of model) {
    const got = await tree.readBlock(lbn);
    assert.ok(got && got.equals(block(v)), `${what}: lbn ${lbn} reads wrong`);
  }
}

describe('raid tree', () => {
  for (const [level, n] of [[5, 4], [6, 6], [4, 3]] as [RaidLevel, number][]) {
    it(`RAID-${level} x${n}: CPs write whole stripes, reuse freed ones, and read right after losing ${level === 6 ? 'any two members' : 'any member'}`, async () => {
      const mems = Array.from({ length: n }, () => new MemoryBlockDevice(16 + 4 * 700));
      const raid = raidOver(level, mems);
      await BlockTree.format(raid, { sizeBytes: 8 * MiB, volumeUuid: UUID });
      const tree = await BlockTree.open(raid);
      const before = { ...raid.stats };
      const model = new Map<number, number>();
      // Small device, many CPs: freed stripes must come back for the run to fit.
      let written = await run(tree, level, 40, model, 2048);
      assert.equal(raid.stats.rmwStripeWrites, before.rmwStripeWrites, 'no CP wrote a partial stripe');
      assert.ok(raid.stats.fullStripeWrites > before.fullStripeWrites);
      // On: more than the device holds, so freed stripes come back (and, once random
      // overwrites leave no wholly free stripe, single blocks by read-modify-write).
      written += await run(tree, level + 20, 120, model, 2048);
      assert.ok(written > raid.blockCount, `the CPs wrote ${written} blocks on a device of ${raid.blockCount}: freed space was reused`);
      const r = await tree.check();
      assert.deepEqual(r.problems, []);
      await tree.close();
      // (the RaidDevice is not closed: closing it would close the memory members the next ones reuse)
      const losses = level === 6 ? [[0, 3], [1, 5], [2, 4]] : [[0], [1], [n - 1]];
      for (const lost of losses) {
        const d = raidOver(level, mems, lost);
        const t = await BlockTree.open(d);
        await expectModel(t, model, `without members ${lost.join(', ')}`);
        assert.deepEqual((await t.check()).problems, []);
        await t.close();
      }
      // Degraded read-write: CPs go on without the lost member(s), and read back with it back... as long as it stays out.
      const d = raidOver(level, mems, losses[0]!);
      const t = await BlockTree.open(d);
      await run(t, level + 50, 10, model, 2048);
      await expectModel(t, model, 'degraded, after more CPs');
      await t.close();
    });
  }

  it('heals a corrupt data block and a corrupt address block through the tree\'s reads (no EIO, counted per member)', async () => {
    const mems = Array.from({ length: 4 }, () => new MemoryBlockDevice(16 + 4 * 400));
    const raid = raidOver(5, mems);
    await BlockTree.format(raid, { sizeBytes: 8 * MiB, volumeUuid: UUID });
    const tree = await BlockTree.open(raid);
    const model = new Map<number, number>();
    await run(tree, 9, 5, model, 2048);
    const [lbn, v] = [...model][0]!;
    const loc = await tree.locate(lbn);
    const g = raid.geometry;
    for (const pba of [loc.data!.pba, loc.path[loc.path.length - 1]!.pba]) {
      const at = g.locate(pba);
      const bad = mems[at.member]!.peekBlock(at.memberBlock);
      bad[100] = bad[100]! ^ 0xff;
      await mems[at.member]!.writeBlocks(at.memberBlock, bad);
    }
    await tree.close();
    const t = await BlockTree.open(raid); // a fresh cache: the address block is read again
    const got = await t.readBlock(lbn);
    assert.ok(got && got.equals(block(v)));
    assert.deepEqual(t.errorCounts, { checksum: 0, io: 0, repaired: 0 }, 'nothing refused');
    const healed = raid.health().memberStatus.reduce((s, m) => s + m.errors.healed, 0);
    assert.equal(healed, 2, 'both bad copies rewritten');
    assert.deepEqual((await t.check()).problems, [], 'the member holds good copies again');
  });
});
