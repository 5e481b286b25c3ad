/**
 * tree/spacemap-read.ts, the space map as a mirror destination reads it: the map kept
 * up to date CP by CP (only leaves born after the previous CP read) must equal the map
 * read whole, also when a CP frees every block of a leaf's range, which the tree then
 * stores as a hole (a null pointer) instead of a zero leaf. The destination refuses any
 * CP that writes a block its committed map says is in use, so a stale bit there turns
 * an honest source away (a CI run of the async link-flapping test found it).
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { RING_SLOTS, decodeSuperblock, type Superblock } from '../../src/tree/layout';
import { bitmapBytes, readActiveMap, readSummaryMap } from '../../src/tree/spacemap-read';
import type { BlockChange } from '../../src/tree/types';

const B = BLOCK_SIZE_BYTES;
const UUID = '3c1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const LEAF_BLOCKS = B * 8; // blocks one space-map leaf covers
const LBNS = 4000; // the live data: each CP rewrites all of it, so COW walks it across the device
const DEVICE_BLOCKS = LEAF_BLOCKS + 8000; // two leaves: the data leaves each in turn
const CPS_MAX = 60;

async function superblockOf(dev: MemoryBlockDevice, cp: number): Promise<Superblock> {
  const raw = Buffer.alloc(B);
  await dev.readBlocks(cp % RING_SLOTS, 1, raw);
  const sb = decodeSuperblock(raw);
  assert.ok(typeof sb !== 'string', `superblock of CP ${cp}: ${String(sb)}`);
  return sb;
}

function bitsIn(map: Buffer, leaf: number): number {
  let n = 0;
  for (let i = leaf * B; i < (leaf + 1) * B && i < map.length; i++) for (let v = map[i]!; v !== 0; v &= v - 1) n++;
  return n;
}

describe('tree: the space map read by a mirror destination', () => {
  it('kept up to date CP by CP, it equals the map read whole, also when a leaf becomes a hole', async function () {
    this.timeout(60_000);
    const dev = new MemoryBlockDevice(DEVICE_BLOCKS);
    await BlockTree.format(dev, { sizeBytes: LBNS * B, volumeUuid: UUID });
    const t = await BlockTree.open(dev, { discardFreed: true });
    const read = async (pba: number): Promise<Buffer> => {
      const b = Buffer.alloc(B);
      await dev.readBlocks(pba, 1, b);
      return b;
    };
    let seq = 1;
    const commit = async (ch: BlockChange[]): Promise<Superblock> => {
      const r = await t.commitCp(ch, { nvlogSeq: seq++, nvlogEpoch: 1 });
      return superblockOf(dev, r.cpNumber);
    };
    let prev = await superblockOf(dev, t.stats().cpNumber);
    const kept = Buffer.alloc(bitmapBytes(prev));
    await readActiveMap(read, prev, kept, -1);
    let holes = 0;
    for (let i = 0; i < CPS_MAX && holes < 2; i++) {
      const gen = Buffer.alloc(B, (i % 250) + 1);
      const sb = await commit(Array.from({ length: LBNS }, (_, lbn) => ({ lbn, data: gen })));
      await readActiveMap(read, sb, kept, prev.cpNumber);
      const whole = Buffer.alloc(bitmapBytes(sb));
      await readActiveMap(read, sb, whole, -1);
      const before = Buffer.alloc(bitmapBytes(prev));
      await readActiveMap(read, prev, before, -1);
      for (let leaf = 0; leaf * B < whole.length; leaf++) if (bitsIn(before, leaf) > 0 && bitsIn(whole, leaf) === 0) holes++;
      assert.ok(kept.equals(whole), `CP ${sb.cpNumber}: the map kept CP by CP has ${bitsIn(kept, 1)} bits set in leaf 1 and ${bitsIn(kept, 0)} in leaf 0, read whole ${bitsIn(whole, 1)} and ${bitsIn(whole, 0)}`);
      prev = sb;
    }
    // The test covers what it is for: a leaf that held blocks and then none.
    assert.ok(holes >= 2, `in ${CPS_MAX} CPs no leaf emptied twice (the test would not reach a hole)`);
    await t.close();
  });

  it('read whole into fresh bitmaps, a thin 1 TiB device\'s map touches only the pages of its leaves (RSS; clearing them first is the control)', async function () {
    this.timeout(60_000);
    const MIB = 1024 * 1024;
    const blocks = 2 ** 28; // 1 TiB of 4 KiB blocks: a 32 MiB bitmap
    const dev = new MemoryBlockDevice(blocks);
    await BlockTree.format(dev, { sizeBytes: 64 * 1024 * MIB, volumeUuid: UUID });
    const t = await BlockTree.open(dev, { discardFreed: true });
    const gen = Buffer.alloc(B, 7);
    await t.commitCp(Array.from({ length: 64 }, (_, lbn) => ({ lbn: lbn * 1000, data: gen })), { nvlogSeq: 1, nvlogEpoch: 1 });
    // A snapshot, then the live tree moves on: the summary map has bits of its own.
    const r = await t.commitCp(Array.from({ length: 64 }, (_, lbn) => ({ lbn: lbn * 1000, data: Buffer.alloc(B, 9) })), { nvlogSeq: 2, nvlogEpoch: 1 }, [{ kind: 'create', name: 's1' }]);
    const sb = await superblockOf(dev, r.cpNumber);
    assert.equal(sb.snapshots.length, 1);
    const read = async (pba: number): Promise<Buffer> => {
      const b = Buffer.alloc(B);
      await dev.readBlocks(pba, 1, b);
      return b;
    };
    const size = bitmapBytes(sb);
    assert.equal(size, 32 * MIB);
    const rss = (): number => process.memoryUsage().rss;
    // Whether this kernel counts reads of untouched pages in RSS (a fresh 64 MiB calloc is
    // its own mmap, not recycled memory): only then is the control meaningful.
    const probe = Buffer.alloc(64 * MIB);
    const p0 = rss();
    let x = 0;
    for (let i = 0; i < probe.length; i += 4096) x |= probe[i]!;
    const readsCount = rss() - p0 > 32 * MIB;
    assert.equal(x, 0);

    const before = rss();
    const active = Buffer.alloc(size);
    const summary = Buffer.alloc(size);
    await readActiveMap(read, sb, active, -1, true);
    await readSummaryMap(read, sb, summary, true);
    const grew = rss() - before;
    assert.ok(grew < 8 * MIB, `RSS grew ${(grew / MIB).toFixed(1)} MiB reading a map with ${sb.smapHeight} levels into fresh bitmaps`);
    // Same bits as a map read into bitmaps that are cleared first (the control).
    const mid = rss();
    const active2 = Buffer.alloc(size);
    await readActiveMap(read, sb, active2, -1);
    const full = rss() - mid;
    assert.ok(active.equals(active2), 'the same map either way');
    let bits = 0;
    let snapBits = 0;
    for (let leaf = 0; leaf * B < size; leaf++) {
      bits += bitsIn(active, leaf);
      snapBits += bitsIn(summary, leaf);
    }
    assert.ok(bits >= 64, `only ${bits} blocks in use`);
    assert.ok(snapBits >= 64, `only ${snapBits} blocks in the snapshot's map`);
    if (readsCount) assert.ok(full > 24 * MIB, `clearing first grew RSS by only ${(full / MIB).toFixed(1)} MiB: the control measures nothing`);
    await t.close();
  });
});
