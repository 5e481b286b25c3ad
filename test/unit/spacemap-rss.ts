/**
 * Run as a process of its own by spacemap-read.test.ts: RSS while a thin 1 TiB device's
 * space map (two levels, a snapshot) is read whole into fresh bitmaps (zeroed: not
 * cleared first), and, as the control, into a bitmap cleared first. Prints one JSON line
 * (RssResult). A fresh process, so the numbers depend on nothing an earlier test left in
 * the allocator or the heap. Writing a page always counts in RSS; reading an untouched one
 * counts only on some kernels (readsCount), so only there does the control (clearing the
 * bitmap reads every word of it) show anything.
 */
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { RING_SLOTS, decodeSuperblock } from '../../src/tree/layout';
import { bitmapBytes, readActiveMap, readSummaryMap } from '../../src/tree/spacemap-read';

export interface RssResult {
  size: number;
  levels: number;
  /** RSS growth reading both maps into fresh bitmaps. */
  grew: number;
  /** RSS growth reading the active map into a bitmap cleared first (the control). */
  full: number;
  /** Whether this kernel counts reads of untouched pages in RSS (only then is the control meaningful). */
  readsCount: boolean;
  same: boolean;
  bits: number;
  snapBits: number;
}

const B = BLOCK_SIZE_BYTES;
const UUID = '3c1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const MIB = 1024 * 1024;

/** Bits set in the space-map leaf `leaf` of map (its 4 KiB). */
export function bitsIn(map: Buffer, leaf: number): number {
  let n = 0;
  for (let i = leaf * B; i < (leaf + 1) * B && i < map.length; i++) for (let v = map[i]!; v !== 0; v &= v - 1) n++;
  return n;
}

async function main(): Promise<RssResult> {
  const blocks = 2 ** 28; // 1 TiB of 4 KiB blocks: a 32 MiB bitmap
  const dev = new MemoryBlockDevice(blocks);
  await BlockTree.format(dev, { sizeBytes: 64 * 1024 * MIB, volumeUuid: UUID });
  const t = await BlockTree.open(dev, { discardFreed: true });
  const gen = Buffer.alloc(B, 7);
  await t.commitCp(Array.from({ length: 64 }, (_, lbn) => ({ lbn: lbn * 1000, data: gen })), { nvlogSeq: 1, nvlogEpoch: 1 });
  // A snapshot, then the live tree moves on: the summary map has bits of its own.
  const r = await t.commitCp(Array.from({ length: 64 }, (_, lbn) => ({ lbn: lbn * 1000, data: Buffer.alloc(B, 9) })), { nvlogSeq: 2, nvlogEpoch: 1 }, [{ kind: 'create', name: 's1' }]);
  const raw = Buffer.alloc(B);
  await dev.readBlocks(r.cpNumber % RING_SLOTS, 1, raw);
  const sb = decodeSuperblock(raw);
  if (typeof sb === 'string') throw new Error(`superblock: ${sb}`);
  if (sb.snapshots.length !== 1) throw new Error(`${sb.snapshots.length} snapshots`);
  const read = async (pba: number): Promise<Buffer> => {
    const b = Buffer.alloc(B);
    await dev.readBlocks(pba, 1, b);
    return b;
  };
  const size = bitmapBytes(sb);
  const rss = (): number => process.memoryUsage().rss;
  // A fresh 64 MiB calloc is its own mapping: reading it shows whether untouched pages count.
  const probe = Buffer.alloc(64 * MIB);
  const p0 = rss();
  let x = 0;
  for (let i = 0; i < probe.length; i += 4096) x |= probe[i]!;
  const readsCount = rss() - p0 > 32 * MIB && x === 0;

  const before = rss();
  const active = Buffer.alloc(size);
  const summary = Buffer.alloc(size);
  await readActiveMap(read, sb, active, -1, true);
  await readSummaryMap(read, sb, summary, true);
  const grew = rss() - before;
  const mid = rss();
  const active2 = Buffer.alloc(size);
  await readActiveMap(read, sb, active2, -1);
  const full = rss() - mid;
  let bits = 0;
  let snapBits = 0;
  for (let leaf = 0; leaf * B < size; leaf++) {
    bits += bitsIn(active, leaf);
    snapBits += bitsIn(summary, leaf);
  }
  await t.close();
  return { size, levels: sb.smapHeight, grew, full, readsCount, same: active.equals(active2), bits, snapBits };
}

if (require.main === module) {
  main().then(
    (r) => process.stdout.write(JSON.stringify(r) + '\n'),
    (e: unknown) => {
      process.stderr.write(`spacemap-rss: ${e instanceof Error ? e.stack : String(e)}\n`);
      process.exit(1);
    },
  );
}
