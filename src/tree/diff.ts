/**
 * Differences between two block trees of the same volume (a source and its mirror, or
 * later two sides of a split brain), found without comparing data: equal pointers
 * (pba, birth, crc32c) mean equal subtrees, so the walk descends only where the
 * pointers differ, and reports the lbn ranges whose data pointers differ.
 *
 * Invariants:
 * - Each side's address blocks are verified (header and its own parent's crc32c) before
 *   their pointers are trusted: a corrupt block is an error, not a difference.
 * - Work is bounded by the differences: a subtree with equal pointers on both sides is
 *   never read. Output is capped at `rangesMax` ranges (the count of differing blocks
 *   stays exact).
 */
import { VolumeError } from '../util/errors';
import {
  FANOUT, NODE_TYPE_DATA_TREE, decodePtr, ptrEquals, ptrSlotOffset, slotsPerPointer, verifyNode, type BlockPtr,
} from './layout';
import { uuidToBytes } from '../util/bytes';

export interface NodeSide {
  /** Reads one raw block (4 KiB). */
  read(pba: number): Promise<Buffer>;
}

export interface TreeDiff {
  /** Data blocks whose pointers differ (one side a hole, or other contents). */
  blocksDiffering: number;
  /** Differing lbn ranges [startLbn, endLbn), at most rangesMax of them. */
  ranges: Array<{ startLbn: number; endLbn: number }>;
  /** Address blocks read on each side. */
  nodesRead: number;
}

export async function diffTrees(
  a: NodeSide, b: NodeSide, rootA: BlockPtr | null, rootB: BlockPtr | null,
  geometry: { height: number; lbnCount: number; deviceBlocks: number; volumeUuid: string }, rangesMax = 100,
): Promise<TreeDiff> {
  const uuid = uuidToBytes(geometry.volumeUuid);
  const out: TreeDiff = { blocksDiffering: 0, ranges: [], nodesRead: 0 };
  const note = (lo: number, n: number): void => {
    out.blocksDiffering += n;
    const last = out.ranges[out.ranges.length - 1];
    if (last && last.endLbn === lo) last.endLbn = lo + n;
    else if (out.ranges.length < rangesMax) out.ranges.push({ startLbn: lo, endLbn: lo + n });
  };
  const node = async (side: NodeSide, p: BlockPtr, level: number, index: number, which: string): Promise<Buffer> => {
    const buf = await side.read(p.pba);
    out.nodesRead++;
    const problem = verifyNode(buf, p, { type: NODE_TYPE_DATA_TREE, level, index }, uuid);
    if (problem) throw new VolumeError('EIO', `${which}: address block at pba ${p.pba} (level ${level}): ${problem}`);
    return buf;
  };
  const child = (buf: Buffer | null, slot: number, which: string): BlockPtr | null => {
    if (!buf) return null;
    const c = decodePtr(buf, ptrSlotOffset(slot), geometry.deviceBlocks);
    if (typeof c === 'string') throw new VolumeError('EIO', `${which}: bad pointer in slot ${slot}: ${c}`);
    return c;
  };
  const rec = async (pa: BlockPtr | null, pb: BlockPtr | null, level: number, index: number): Promise<void> => {
    if (ptrEquals(pa, pb)) return;
    const span = slotsPerPointer(level + 1);
    const lo = index * span;
    const hi = Math.min(geometry.lbnCount, lo + span);
    const na = pa ? await node(a, pa, level, index, 'this side') : null;
    const nb = pb ? await node(b, pb, level, index, 'the other side') : null;
    const cs = slotsPerPointer(level);
    for (let s = 0; s < FANOUT && lo + s * cs < hi; s++) {
      const ca = child(na, s, 'this side');
      const cb = child(nb, s, 'the other side');
      if (ptrEquals(ca, cb)) continue;
      if (level === 0) note(lo + s, 1);
      else await rec(ca, cb, level - 1, index * FANOUT + s);
    }
  };
  await rec(rootA, rootB, geometry.height - 1, 0);
  return out;
}
