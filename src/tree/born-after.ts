/**
 * Every block of a committed state born after a base CP (ZFS's incremental send): the
 * data-tree and space-map blocks of the live root and of every kept snapshot whose birth
 * CP is greater than `baseCp`. With baseCp = -1, every block the state references.
 *
 * Invariants:
 * - A child is never born after its parent, so a subtree whose root was born at or
 *   before the base is skipped whole: the work is proportional to what changed.
 * - Every block is verified before it is emitted (address blocks by header and parent
 *   crc32c, data and space-map leaves by the parent crc32c): a corrupt source block is
 *   an error, never shipped.
 * - Each block is emitted once (a bitmap of emitted pbas: one bit per device block). The
 *   superblock is not emitted: the receiver writes it last, after every block is durable.
 * - Memory: one level-0 run buffer (FANOUT blocks) per walk plus the bitmap.
 */
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { crc32c, crc32cBlocks } from '../io/checksum';
import {
  BLOCK, BlockPtr, FANOUT, NODE_TYPE_DATA_TREE, NODE_TYPE_SPACE_MAP, decodePtr, decodeSuperblock, ptrSlotOffset, uuidToBytes, verifyNode,
  type Superblock,
} from './layout';
import type { CommittedView } from './types';

export interface BornBlock {
  pba: number;
  /** 4 KiB, owned by the receiver. */
  buf: Buffer;
  /** Its crc32c (checked: the parent pointer's). */
  crc: number;
}

/**
 * Walks `view` and awaits `emit` for every block born after `baseCp` (emit applies the
 * backpressure). Returns the number of blocks emitted. `shouldStop` is polled between
 * blocks: a true return ends the walk early with an ESHUTDOWN error.
 */
export async function walkBornAfter(
  view: CommittedView,
  baseCp: number,
  emit: (b: BornBlock) => Promise<void>,
  shouldStop: () => boolean = () => false,
): Promise<number> {
  const sb = decodeSuperblock(view.superblock);
  if (typeof sb === 'string') throw new VolumeError('EIO', `pinned superblock does not decode: ${sb}`);
  assert(sb.cpNumber === view.cpNumber, 'view and superblock disagree');
  const uuid = uuidToBytes(sb.volumeUuid);
  const deviceBlocks = sb.deviceBlocks;
  const seen = Buffer.alloc(Math.ceil(deviceBlocks / 8));
  let emitted = 0;
  const firstTime = (pba: number): boolean => {
    const m = 1 << (pba & 7);
    const i = pba >>> 3;
    if ((seen[i]! & m) !== 0) return false;
    seen[i] = seen[i]! | m;
    return true;
  };
  const out = async (ptr: BlockPtr, buf: Buffer): Promise<void> => {
    if (shouldStop()) throw new VolumeError('ESHUTDOWN', 'walk stopped');
    emitted++;
    await emit({ pba: ptr.pba, buf, crc: ptr.crc });
  };
  const readOne = async (ptr: BlockPtr): Promise<Buffer> => {
    const buf = Buffer.allocUnsafe(BLOCK);
    await view.readRaw(ptr.pba, 1, buf);
    return buf;
  };
  const child = (node: Buffer, parent: BlockPtr, slot: number, what: string): BlockPtr | null => {
    const p = decodePtr(node, ptrSlotOffset(slot), deviceBlocks);
    if (typeof p === 'string') throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${slot}: ${p}`);
    if (p !== null && p.birth > parent.birth) throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${slot}: child born after its parent`);
    return p;
  };

  // Data tree: address blocks carry a verified header; level-0 children are data blocks.
  // A level-0 node is loaded (its block read, the reads of its data runs started) one
  // ahead of the one being emitted, so the device and the receiver work at once. Loads
  // and emits follow the same child order, so the emitted order is deterministic.
  interface Leaf {
    ptr: BlockPtr;
    node: Buffer;
    runs: Array<{ ptrs: BlockPtr[]; buf: Promise<Buffer> }>;
  }
  const loadLeaf = async (ptr: BlockPtr, index: number): Promise<Leaf | null> => {
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return null;
    const node = await readOne(ptr);
    const problem = verifyNode(node, ptr, { type: NODE_TYPE_DATA_TREE, level: 0, index }, uuid);
    if (problem) throw new VolumeError('EIO', `address block at pba ${ptr.pba} (level 0): ${problem}`);
    const want: BlockPtr[] = [];
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'address block');
      if (c && c.birth > baseCp && firstTime(c.pba)) want.push(c);
    }
    want.sort((a, b) => a.pba - b.pba);
    const runs: Leaf['runs'] = [];
    let i = 0;
    while (i < want.length) {
      let j = i + 1;
      while (j < want.length && want[j]!.pba === want[j - 1]!.pba + 1) j++;
      const ptrs = want.slice(i, j);
      const buf = Buffer.allocUnsafe(ptrs.length * BLOCK);
      const read = view.readRaw(ptrs[0]!.pba, ptrs.length, buf).then(() => buf);
      read.catch(() => undefined); // awaited in emitLeaf; never an unhandled rejection meanwhile
      runs.push({ ptrs, buf: read });
      i = j;
    }
    return { ptr, node, runs };
  };
  const crcs = Buffer.allocUnsafe(FANOUT * 4);
  const emitLeaf = async (leaf: Leaf): Promise<void> => {
    await out(leaf.ptr, leaf.node);
    for (const r of leaf.runs) {
      const run = await r.buf;
      // Every block of the run checked against its parent pointer first, in one native call.
      crc32cBlocks(run, 0, r.ptrs.length, crcs);
      for (let k = 0; k < r.ptrs.length; k++) {
        if (crcs.readUInt32LE(k * 4) !== r.ptrs[k]!.crc) throw new VolumeError('EIO', `data block at pba ${r.ptrs[k]!.pba}: checksum mismatch`);
      }
      for (let k = 0; k < r.ptrs.length; k++) await out(r.ptrs[k]!, run.subarray(k * BLOCK, (k + 1) * BLOCK));
    }
  };
  const dataTree = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
    if (level === 0) {
      const leaf = await loadLeaf(ptr, index);
      if (leaf) await emitLeaf(leaf);
      return;
    }
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return;
    const node = await readOne(ptr);
    const problem = verifyNode(node, ptr, { type: NODE_TYPE_DATA_TREE, level, index }, uuid);
    if (problem) throw new VolumeError('EIO', `address block at pba ${ptr.pba} (level ${level}): ${problem}`);
    await out(ptr, node);
    const kids: Array<{ c: BlockPtr; index: number }> = [];
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'address block');
      if (c) kids.push({ c, index: index * FANOUT + s });
    }
    if (level > 1) {
      for (const k of kids) await dataTree(k.c, level - 1, k.index);
      return;
    }
    let next: Promise<Leaf | null> | undefined = kids.length > 0 ? loadLeaf(kids[0]!.c, kids[0]!.index) : undefined;
    for (let i = 0; i < kids.length; i++) {
      const cur = next!;
      next = i + 1 < kids.length ? loadLeaf(kids[i + 1]!.c, kids[i + 1]!.index) : undefined;
      next?.catch(() => undefined);
      const leaf = await cur;
      if (leaf) await emitLeaf(leaf);
    }
  };

  // Space map: nodes with headers, leaves verified by the parent's crc.
  const spaceMap = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return;
    const node = await readOne(ptr);
    const problem = verifyNode(node, ptr, { type: NODE_TYPE_SPACE_MAP, level, index }, uuid);
    if (problem) throw new VolumeError('EIO', `space-map node at pba ${ptr.pba} (level ${level}): ${problem}`);
    await out(ptr, node);
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'space-map node');
      if (!c) continue;
      if (level > 0) {
        await spaceMap(c, level - 1, index * FANOUT + s);
      } else if (c.birth > baseCp && firstTime(c.pba)) {
        const leaf = await readOne(c);
        if (crc32c(leaf) !== c.crc) throw new VolumeError('EIO', `space-map leaf at pba ${c.pba}: checksum mismatch`);
        await out(c, leaf);
      }
    }
  };

  const roots = rootsOf(sb);
  for (const r of roots.data) await dataTree(r, sb.treeHeight - 1, 0);
  for (const r of roots.smap) await spaceMap(r, sb.smapHeight - 1, 0);
  return emitted;
}

function rootsOf(sb: Superblock): { data: BlockPtr[]; smap: BlockPtr[] } {
  const data: BlockPtr[] = [];
  const smap: BlockPtr[] = [sb.smapRoot];
  if (sb.root) data.push(sb.root);
  for (const s of sb.snapshots) {
    if (s.root) data.push(s.root);
    smap.push(s.smapRoot);
  }
  return { data, smap };
}
