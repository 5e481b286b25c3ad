/**
 * BlockTree.holdCommitted across a reopen (a mirror source restarting): the blocks of an
 * older committed CP a peer still holds must survive every later CP until the peer's
 * oldest needed CP moves past it, however many CPs that takes; the reserved generations'
 * rotation (which follows the CP that freed a block) must not release them. Then they are
 * released. Checked by reading the held CP's whole tree with its checksums.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { RING_SLOTS } from '../../src/tree/layout';
import type { BlockChange, CpBlock, CpSink } from '../../src/tree/types';

const B = BLOCK_SIZE_BYTES;
const UUID = '2a1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const SIZE = 64 * 1024 * 1024;
const DEVICE_BLOCKS = 16384;

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 11, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

/** A peer that needs CP `needed` (settable). */
class Peer implements CpSink {
  broken = 0;
  constructor(public needed: number | undefined) {}
  oldestNeededCp(): number | undefined {
    return this.needed;
  }
  holdBroken(): void {
    this.broken++;
  }
  async blocks(_cp: number, _b: readonly CpBlock[]): Promise<void> {}
  async committed(): Promise<void> {}
}

async function ringSuperblock(dev: MemoryBlockDevice, cp: number): Promise<Buffer> {
  const b = Buffer.alloc(B);
  await dev.readBlocks(cp % RING_SLOTS, 1, b);
  return b;
}

/** Problems found reading CP `cp`'s whole tree (from the copy of its superblock). */
async function verifyCp(dev: MemoryBlockDevice, sb: Buffer): Promise<string[]> {
  try {
    const v = await BlockTree.openView(dev, sb);
    const lbns: number[] = [];
    for (let l = 0; l < 2000; l += 3) lbns.push(l);
    const out: string[] = [];
    for (const l of lbns) {
      try {
        const got = await v.readBlock(l);
        if (!got) throw new Error('a hole');
      } catch (e) {
        out.push(`lbn ${l}: ${(e as Error).message}`);
        if (out.length > 3) break;
      }
    }
    await v.close();
    return out;
  } catch (e) {
    return [(e as Error).message];
  }
}

describe('tree: holding an older CP across a reopen', () => {
  it('keeps every block of the held CP through many CPs of overwrites, then releases them once the peer moves past it', async () => {
    const dev = new MemoryBlockDevice(DEVICE_BLOCKS);
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    let t = await BlockTree.open(dev, { discardFreed: false });
    const peer = new Peer(undefined);
    t.setCpSink(peer);
    let seq = 1;
    const write = async (gen: number): Promise<number> => {
      const ch: BlockChange[] = [];
      for (let l = 0; l < 2000; l += 3) ch.push({ lbn: l, data: block(l * 1000 + gen) });
      const r = await t.commitCp(ch, { nvlogSeq: seq++, nvlogEpoch: 1 });
      return r.cpNumber;
    };
    const held = await write(1);
    peer.needed = held; // the peer holds `held`
    await write(2); // frees the blocks of `held` (kept in memory by the running tree)
    const heldSb = await ringSuperblock(dev, held);
    await t.close();

    // The restart: the in-memory reservations are gone; the peer still needs `held`.
    t = await BlockTree.open(dev, { discardFreed: false });
    assert.equal(await t.holdCommitted(held), null);
    t.setCpSink(peer);
    for (let g = 3; g < 3 + 2 * RING_SLOTS; g++) await write(g); // many CPs, every block rewritten each time
    assert.deepEqual(await verifyCp(dev, heldSb), [], 'a block of the held CP was reused while the peer needed it');
    assert.ok(t.debugInfo().reservedBlocks > 0);

    // The peer moves on: the held blocks become free again and are reused.
    peer.needed = t.stats().cpNumber;
    const before = t.debugInfo().freeBlocks;
    await write(100);
    await write(101);
    assert.ok(t.debugInfo().freeBlocks > before - 50, 'the held blocks were not released');
    for (let g = 200; g < 220; g++) await write(g);
    assert.notDeepEqual(await verifyCp(dev, heldSb), [], 'after the release the old CP\'s blocks are reused (this test would not notice a leak otherwise)');
    assert.equal(peer.broken, 0);
    await t.close();
  });
});
