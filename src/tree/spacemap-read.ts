/**
 * Reads the space map a committed superblock describes into bitmaps, for a reader that
 * is not the tree's owner (a mirror destination checking that no CP it applies writes a
 * block its committed CP uses). `bornAfter` limits the work to leaves a later CP wrote
 * (a subtree born at or before it is unchanged and skipped).
 *
 * Invariants:
 * - Every node is verified (header, parent crc32c) and every leaf by its parent's crc32c
 *   before its bits are used; a bad block is an error, never a wrong map.
 * - The live tree's leaves overwrite `active`, and its holes clear it (an emptied range
 *   is a null pointer, not a zero leaf); snapshot maps are ORed into `summary`.
 */
import { VolumeError } from '../util/errors';
import { clearSetWords } from '../util/bitmap';
import { crc32c } from '../io/checksum';
import { forEachLimit } from '../util/work';
import {
  BLOCK, FANOUT, NODE_TYPE_SPACE_MAP, decodePtr, ptrSlotOffset, verifyNode, type BlockPtr, type Superblock,
} from './layout';
import { uuidToBytes } from '../util/bytes';

export type ReadBlock = (pba: number) => Promise<Buffer>;
const READS_IN_FLIGHT_MAX = 16;

/** Bytes of a bitmap with one bit per block of the superblock's device. */
export function bitmapBytes(sb: Superblock): number {
  return Math.ceil(sb.deviceBlocks / (BLOCK * 8)) * BLOCK;
}

/**
 * Visits every leaf born after `bornAfter`, and every hole (a leaf, or a node's whole
 * subtree, the tree left out because no block in its range is in use) under a node born
 * after it: a hole there may be new (the range was emptied by a later CP), so a caller
 * keeping a map up to date must clear its range.
 */
async function walkMap(
  read: ReadBlock, sb: Superblock, root: BlockPtr, bornAfter: number,
  onLeaf: (index: number, leaf: Buffer) => void, onHole: (firstLeaf: number, leaves: number) => void,
): Promise<void> {
  const uuid = uuidToBytes(sb.volumeUuid);
  const visit = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
    if (ptr.birth <= bornAfter) return;
    const node = await read(ptr.pba);
    const problem = verifyNode(node, ptr, { type: NODE_TYPE_SPACE_MAP, level, index }, uuid);
    if (problem) throw new VolumeError('EIO', `space-map node at pba ${ptr.pba}: ${problem}`);
    const leaves: Array<{ c: BlockPtr; i: number }> = [];
    for (let s = 0; s < FANOUT; s++) {
      const c = decodePtr(node, ptrSlotOffset(s), sb.deviceBlocks);
      if (typeof c === 'string') throw new VolumeError('EIO', `space-map node at pba ${ptr.pba} slot ${s}: ${c}`);
      if (c === null) {
        const span = FANOUT ** level; // leaves under one child of this node
        onHole((index * FANOUT + s) * span, span);
        continue;
      }
      if (c.birth <= bornAfter) continue;
      if (level > 0) await visit(c, level - 1, index * FANOUT + s);
      else leaves.push({ c, i: index * FANOUT + s });
    }
    // Leaves of one node are read READS_IN_FLIGHT_MAX at a time (a CP of scattered frees rewrites most of them).
    await forEachLimit(leaves, READS_IN_FLIGHT_MAX, async ({ c, i }) => {
      const leaf = await read(c.pba);
      if (crc32c(leaf) !== c.crc) throw new VolumeError('EIO', `space-map leaf at pba ${c.pba}: checksum mismatch`);
      onLeaf(i, leaf);
    });
  };
  await visit(root, sb.smapHeight - 1, 0);
}

/**
 * The live map's leaves born after `bornAfter` into `active` (-1: all of them, after
 * zeroing it). `zeroed`: `active` is all zeroes already (a fresh Buffer.alloc), so
 * neither the map nor its holes are cleared: the pages of a thin volume's empty ranges
 * are never touched (on this kernel even reading an untouched page counts in RSS, and a
 * 1 TiB device's map is 32 MiB, mostly holes).
 */
export async function readActiveMap(read: ReadBlock, sb: Superblock, active: Buffer, bornAfter: number, zeroed = false): Promise<void> {
  const clear = !(zeroed && bornAfter < 0);
  if (bornAfter < 0 && clear) clearSetWords(active); // writes only set words (it still reads the whole map: see the note in spacemap.ts)
  await walkMap(read, sb, sb.smapRoot, bornAfter, (i, leaf) => {
    if ((i + 1) * BLOCK <= active.length) leaf.copy(active, i * BLOCK);
  }, (first, n) => {
    if (clear && first * BLOCK < active.length) clearSetWords(active, first * BLOCK, Math.min(active.length, (first + n) * BLOCK));
  });
}

/** The OR of every kept snapshot's map into `summary` (zeroed first, unless `zeroed` says it is). */
export async function readSummaryMap(read: ReadBlock, sb: Superblock, summary: Buffer, zeroed = false): Promise<void> {
  if (!zeroed) clearSetWords(summary);
  for (const s of sb.snapshots) {
    await walkMap(read, sb, s.smapRoot, -1, (i, leaf) => {
      for (let k = 0; k < BLOCK && i * BLOCK + k < summary.length; k++) if (leaf[k] !== 0) summary[i * BLOCK + k] = summary[i * BLOCK + k]! | leaf[k]!;
    }, () => undefined); // zeroed above: a hole adds nothing
  }
}
