/**
 * tree/spacemap-read.ts, the space map as a mirror destination reads it: the map kept
 * up to date CP by CP (only leaves born after the previous CP read) must equal the map
 * read whole, also when a CP frees every block of a leaf's range, which the tree then
 * stores as a hole (a null pointer) instead of a zero leaf. The destination refuses any
 * CP that writes a block its committed map says is in use, so a stale bit there turns
 * an honest source away (a CI run of the async link-flapping test found it). The RSS of
 * a full read into fresh bitmaps is measured in a process of its own (spacemap-rss.ts).
 */
import { strict as assert } from 'assert';
import { execFileSync } from 'child_process';
import * as path from 'path';
import { bitsIn, type RssResult } from './spacemap-rss';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { RING_SLOTS, decodeSuperblock, type Superblock } from '../../src/tree/layout';
import { bitmapBytes, readActiveMap } from '../../src/tree/spacemap-read';
import type { BlockChange } from '../../src/tree/types';

const B = BLOCK_SIZE_BYTES;
const UUID = '3c1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const LEAF_BLOCKS = B * 8; // blocks one space-map leaf covers
// The live data: CPs write all of it and trim all of it in turn. A trimmed CP's blocks are
// not taken by the next write (blocks released at a CP are kept warm only for that CP,
// which here is a trim), so next fit walks the data across the device.
const LBNS = 4000;
const DEVICE_BLOCKS = LEAF_BLOCKS + 8000; // two leaves: the data leaves each in turn
const CPS_MAX = 60;

async function superblockOf(dev: MemoryBlockDevice, cp: number): Promise<Superblock> {
  const raw = Buffer.alloc(B);
  await dev.readBlocks(cp % RING_SLOTS, 1, raw);
  const sb = decodeSuperblock(raw);
  assert.ok(typeof sb !== 'string', `superblock of CP ${cp}: ${String(sb)}`);
  return sb;
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
      const sb = await commit(Array.from({ length: LBNS }, (_, lbn) => ({ lbn, data: i % 2 === 0 ? gen : null })));
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

  it('read whole into fresh bitmaps, a thin 1 TiB device\'s map touches only the pages of its leaves (RSS; clearing them first is the control)', function () {
    this.timeout(60_000);
    // In a process of its own: RSS in this one depends on what earlier tests left in the
    // allocator and the heap (a CI run saw +30.8 MiB here that the map did not cause).
    const out = execFileSync(process.execPath, [path.join(__dirname, 'spacemap-rss.js')], { encoding: 'utf8', timeout: 60_000 });
    const r = JSON.parse(out.trim().split('\n').pop()!) as RssResult;
    const MIB = 1024 * 1024;
    assert.equal(r.size, 32 * MIB);
    assert.ok(r.grew < 8 * MIB, `RSS grew ${(r.grew / MIB).toFixed(1)} MiB reading a map with ${r.levels} levels into fresh bitmaps`);
    assert.ok(r.same, 'the same map either way');
    assert.ok(r.bits >= 64, `only ${r.bits} blocks in use`);
    assert.ok(r.snapBits >= 64, `only ${r.snapBits} blocks in the snapshot's map`);
    if (r.readsCount) assert.ok(r.full > 24 * MIB, `clearing first grew RSS by only ${(r.full / MIB).toFixed(1)} MiB: the control measures nothing`);
  });
});
