/**
 * A CP changes an address block's cached buffer in place only when no reader was ever
 * handed that buffer (NodeCache.takeForEdit); every buffer a reader holds stays as it was
 * read, through any number of CPs, including a reader handed it after the CP fetched it
 * for the edit and before the edit. Each test would fail if a CP edited a lent buffer, or
 * (the first) if the CP copied every node again.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { FANOUT } from '../../src/tree/layout';
import { BlockTree } from '../../src/tree/tree';
import type { BlockChange, CpMeta } from '../../src/tree/types';
import { GatedDevice } from './gated-device';

const B = BLOCK_SIZE_BYTES;
const UUID = '6e0de5ed-0000-4000-8000-0000000ed175';
const LEAVES = 48;
const meta = (n: number): CpMeta => ({ nvlogSeq: n, nvlogEpoch: 1 });

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

/** One block in each of the first LEAVES leaves (lbn = leaf * FANOUT + slot), contents from seed. */
function oneBlockPerLeaf(slot: number, seed: number): BlockChange[] {
  return Array.from({ length: LEAVES }, (_, i) => ({ lbn: i * FANOUT + slot, data: block(seed * 1000 + i) }));
}

/** Leaves a reader was handed (LeafSink: the cache's buffers), each with a copy taken when handed. */
class HeldLeaves {
  readonly held: { base: number; buf: Buffer; copy: Buffer }[] = [];
  readonly sink = (base: number, node: Buffer): void => void this.held.push({ base, buf: node, copy: Buffer.from(node) });
  assertUnchanged(when: string): void {
    assert.ok(this.held.length >= LEAVES, `the reader was handed ${this.held.length} leaves`);
    for (const h of this.held) assert.ok(h.buf.equals(h.copy), `${when}: the leaf for lbn ${h.base} a reader holds was changed under it`);
  }
}

async function readEach(tree: BlockTree, slot: number, sink?: (base: number, node: Buffer) => void): Promise<Buffer[]> {
  return Promise.all(Array.from({ length: LEAVES }, async (_, i) => {
    const dst = Buffer.alloc(B);
    await tree.readRange(i * FANOUT + slot, 1, dst, sink);
    return dst;
  }));
}

async function assertReads(tree: BlockTree, slot: number, seed: number): Promise<void> {
  const got = await readEach(tree, slot);
  for (let i = 0; i < LEAVES; i++) assert.ok(got[i]!.equals(block(seed * 1000 + i)), `lbn ${i * FANOUT + slot} reads back what CP wrote`);
}

describe('tree: address blocks edited in place', () => {
  it('a CP edits the nodes the CP before wrote in place; a leaf a reader holds is never changed, even one handed to it between the fetch and the edit', async () => {
    const mem = new MemoryBlockDevice(4096);
    await BlockTree.format(mem, { sizeBytes: (LEAVES + 2) * FANOUT * B, volumeUuid: UUID });
    const dev = new GatedDevice(mem);
    // Two leaves a write batch: the CP fetches each batch's old nodes while it edits the one before.
    const tree = await BlockTree.open(dev, { writeChunkBlocks: 2 });
    await tree.commitCp(oneBlockPerLeaf(0, 1), meta(1));
    const afterCp1 = tree.stats().nodesEditedInPlace;

    // CP 2 rewrites every leaf CP 1 wrote (its buffers, never read since): no copies.
    await tree.commitCp(oneBlockPerLeaf(0, 2), meta(2));
    assert.ok(tree.stats().nodesEditedInPlace - afterCp1 >= LEAVES, `CP 2 edited ${tree.stats().nodesEditedInPlace - afterCp1} nodes in place`);
    await assertReads(tree, 0, 2);

    // A reader now holds every leaf (the reads above lent them): CP 3 must copy each one.
    const early = new HeldLeaves();
    await readEach(tree, 0, early.sink);
    const beforeCp3 = tree.stats().nodesEditedInPlace;
    await tree.commitCp(oneBlockPerLeaf(1, 3), meta(3));
    early.assertUnchanged('CP 3');
    assert.equal(tree.stats().nodesEditedInPlace - beforeCp3, 0, 'no node a reader was handed is edited in place');

    // CP 4 stopped part-way (its address writes held): the leaves it has not edited yet are
    // fetched or still to fetch; a reader is handed them now, then the CP goes on.
    const beforeCp4 = tree.stats().nodesEditedInPlace;
    dev.hold();
    const cp4 = tree.commitCp(oneBlockPerLeaf(2, 4), meta(4));
    // Until it has edited some leaves too: its data writes alone can reach 4 held writes
    // before it edits the first leaf (seen under CI load: then the reader got every leaf
    // first and the CP edited none in place). Its address writes are held as well, so it
    // stops after a few batches of leaves (ADDRESS_BATCHES_IN_FLIGHT), long before the last.
    const editedSoFar = (): number => tree.stats().nodesEditedInPlace - beforeCp4;
    for (let t = 0; t < 10_000 && (dev.heldWrites < 4 || editedSoFar() === 0); t++) await new Promise((r) => setImmediate(r));
    assert.ok(dev.heldWrites >= 4 && editedSoFar() > 0, `CP 4 reached its held writes (${dev.heldWrites}) having edited ${editedSoFar()} leaves`);
    const mid = new HeldLeaves();
    const during = await readEach(tree, 1, mid.sink);
    for (let i = 0; i < LEAVES; i++) assert.ok(during[i]!.equals(block(3000 + i)), `lbn ${i * FANOUT + 1} reads CP 3's data while CP 4 runs`);
    dev.release();
    await cp4;
    mid.assertUnchanged('CP 4');
    early.assertUnchanged('CP 4');
    const inPlace4 = tree.stats().nodesEditedInPlace - beforeCp4;
    assert.ok(inPlace4 > 0 && inPlace4 < LEAVES, `CP 4 edited ${inPlace4} nodes in place: those edited before the reader came, not those it was handed`);

    // CP 5 again edits what CP 4 wrote (not read since) in place; every read holds.
    const beforeCp5 = tree.stats().nodesEditedInPlace;
    await tree.commitCp(oneBlockPerLeaf(3, 5), meta(5));
    assert.ok(tree.stats().nodesEditedInPlace - beforeCp5 >= LEAVES, `CP 5 edited ${tree.stats().nodesEditedInPlace - beforeCp5} nodes in place`);
    mid.assertUnchanged('CP 5');
    early.assertUnchanged('CP 5');
    await assertReads(tree, 0, 2);
    await assertReads(tree, 1, 3);
    await assertReads(tree, 2, 4);
    await assertReads(tree, 3, 5);
    const report = await tree.check();
    assert.deepEqual(report.problems, []);
    await tree.close();

    // And from the device alone, as a restart finds it.
    const again = await BlockTree.open(mem);
    await assertReads(again, 0, 2);
    await assertReads(again, 3, 5);
    await again.close();
  });
});
