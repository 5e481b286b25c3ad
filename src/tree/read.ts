/**
 * The read path below one committed root: readBlock, readRange and blockStatus, and the
 * walks they share (walk, walkCached). The tree (BlockTree.readBlockOn and the others)
 * checks the range and pins the root (root-handle.ts) around each call; every block is
 * read through the VerifiedReader (verified-read.ts).
 *
 * Invariants:
 * - A walk visits [start, end) in lbn order, each lbn at most once, as a hole or a data
 *   pointer, until a callback or the budget stops it.
 * - readRange fills all of dst: holes as zeroes, data blocks each verified against its
 *   pointer's crc32c; contiguous blocks are read in runs of at most 256 blocks, at most
 *   ioConcurrency runs at a time.
 * - blockStatus reads at most statusNodeBudget address blocks per call and answers a
 *   shorter range (at least one extent) when the budget runs out.
 * - A LeafSink sees each level-0 address block a readRange walked (verified: read through
 *   the VerifiedReader or taken from the cache), with the first lbn it maps; possibly twice.
 */
import { assert } from '../util/assert';
import { EXTENT_HOLE, EXTENT_ZERO, type Extent } from '../util/extent';
import { crc32cBlocks } from '../io/checksum';
import { forEachLimit } from '../util/work';
import { BLOCK, BlockPtr, FANOUT, slotsPerPointer } from './layout';
import type { NodeCache } from './node-cache';
import type { LeafSink } from './types';
import type { VerifiedReader } from './verified-read';

export class ReadPath {
  constructor(
    private readonly verified: VerifiedReader,
    private readonly cache: NodeCache,
    private readonly height: number,
    private readonly ioConcurrency: number,
    private readonly statusNodeBudget: number,
  ) {}

  /**
   * Visits [start, end) in order: onHole(lbn, n) for runs of holes, onData(lbn, ptr) per
   * data block. A callback returning false stops the walk; so does running out of budget
   * (address blocks to read), in which case the walk returns false.
   */
  private async walk(
    root: BlockPtr | null, start: number, end: number,
    onHole: (lbn: number, n: number) => boolean, onData: (lbn: number, ptr: BlockPtr) => boolean,
    budget: { nodes: number }, leaves?: LeafSink,
  ): Promise<boolean> {
    const rec = async (ptr: BlockPtr | null, level: number, index: number): Promise<boolean> => {
      const nodeLo = index * slotsPerPointer(level + 1);
      const lo = Math.max(start, nodeLo);
      const hi = Math.min(end, nodeLo + slotsPerPointer(level + 1));
      assert(lo < hi, 'walk visited a node outside the range');
      if (ptr === null) return onHole(lo, hi - lo);
      if (budget.nodes <= 0) return false;
      budget.nodes--;
      const node = await this.verified.readNode(ptr, level, index);
      if (level === 0 && leaves) leaves(nodeLo, node);
      const cs = slotsPerPointer(level);
      for (let slot = Math.floor((lo - nodeLo) / cs); slot < FANOUT && nodeLo + slot * cs < hi; slot++) {
        const child = this.verified.childOf(node, ptr, level, index, slot);
        let more: boolean;
        if (level === 0) more = child === null ? onHole(nodeLo + slot, 1) : onData(nodeLo + slot, child);
        else more = await rec(child, level - 1, index * FANOUT + slot);
        if (!more) return false;
      }
      return true;
    };
    return rec(root, this.height - 1, 0);
  }

  /** Reads one block below root (null for a hole). */
  async readBlock(root: BlockPtr | null, lbn: number): Promise<Buffer | null> {
    let ptr = root;
    for (let level = this.height - 1; level >= 0 && ptr !== null; level--) {
      const index = Math.floor(lbn / slotsPerPointer(level + 1));
      const node = await this.verified.readNode(ptr, level, index);
      ptr = this.verified.childOf(node, ptr, level, index, Math.floor(lbn / slotsPerPointer(level)) % FANOUT);
    }
    if (ptr === null) return null;
    const buf = Buffer.alloc(BLOCK);
    await this.verified.readData([ptr], buf, `data block lbn ${lbn}`);
    await this.verified.verifyData(buf, 0, ptr, lbn);
    return buf;
  }

  /**
   * walk() over cached address blocks only, synchronously (no promise per level): false
   * as soon as an address block on the way is not in the cache (callbacks may have run
   * for part of the range; the caller starts again with walk()). Callbacks cannot stop it.
   */
  private walkCached(
    root: BlockPtr | null, start: number, end: number, onHole: (lbn: number, n: number) => void, onData: (lbn: number, ptr: BlockPtr) => void, leaves?: LeafSink,
  ): boolean {
    const rec = (ptr: BlockPtr | null, level: number, index: number): boolean => {
      const nodeLo = index * slotsPerPointer(level + 1);
      const lo = Math.max(start, nodeLo);
      const hi = Math.min(end, nodeLo + slotsPerPointer(level + 1));
      assert(lo < hi, 'walk visited a node outside the range');
      if (ptr === null) {
        onHole(lo, hi - lo);
        return true;
      }
      const node = this.cache.get(ptr, false);
      if (node === undefined) return false;
      if (level === 0 && leaves) leaves(nodeLo, node);
      const cs = slotsPerPointer(level);
      for (let slot = Math.floor((lo - nodeLo) / cs); slot < FANOUT && nodeLo + slot * cs < hi; slot++) {
        const child = this.verified.childOf(node, ptr, level, index, slot);
        if (level > 0) {
          if (!rec(child, level - 1, index * FANOUT + slot)) return false;
        } else if (child === null) onHole(nodeLo + slot, 1);
        else onData(nodeLo + slot, child);
      }
      return true;
    };
    return rec(root, this.height - 1, 0);
  }

  /** Reads one run of contiguous data blocks into its place in dst and verifies each block. */
  private async readDataRun(base: number, r: { lbn: number; ptrs: BlockPtr[] }, dst: Buffer): Promise<void> {
    const off = (r.lbn - base) * BLOCK;
    const view = dst.subarray(off, off + r.ptrs.length * BLOCK);
    await this.verified.readData(r.ptrs, view, `data blocks lbn ${r.lbn}-${r.lbn + r.ptrs.length - 1}`);
    // One native call checksums the run; only a mismatch goes on to repair or refuse.
    const crcs = Buffer.allocUnsafe(r.ptrs.length * 4);
    crc32cBlocks(view, 0, r.ptrs.length, crcs);
    for (let i = 0; i < r.ptrs.length; i++) {
      if (crcs.readUInt32LE(i * 4) !== r.ptrs[i]!.crc) await this.verified.verifyData(view, i * BLOCK, r.ptrs[i]!, r.lbn + i);
    }
  }

  /**
   * Reads count blocks below root into dst (holes as zeroes), coalescing contiguous blocks.
   * The address blocks are looked up synchronously when all are cached (walkCached), else
   * read with walk(); the data runs are read at most ioConcurrency at a time. `leaves`
   * gets the level-0 address blocks walked.
   */
  async readRange(root: BlockPtr | null, lbn: number, count: number, dst: Buffer, leaves?: LeafSink): Promise<void> {
    const runs: { lbn: number; ptrs: BlockPtr[] }[] = [];
    const onHole = (l: number, n: number): boolean => {
      dst.fill(0, (l - lbn) * BLOCK, (l - lbn + n) * BLOCK);
      return true;
    };
    const onData = (l: number, p: BlockPtr): boolean => {
      const last = runs[runs.length - 1];
      const prev = last?.ptrs[last.ptrs.length - 1];
      if (last && prev && last.lbn + last.ptrs.length === l && prev.pba + 1 === p.pba && last.ptrs.length < 256) last.ptrs.push(p);
      else runs.push({ lbn: l, ptrs: [p] });
      return true;
    };
    if (!this.walkCached(root, lbn, lbn + count, onHole, onData, leaves)) {
      runs.length = 0;
      await this.walk(root, lbn, lbn + count, onHole, onData, { nodes: Number.MAX_SAFE_INTEGER }, leaves);
    }
    if (runs.length === 1) await this.readDataRun(lbn, runs[0]!, dst);
    else if (runs.length > 1) await forEachLimit(runs, this.ioConcurrency, (r) => this.readDataRun(lbn, r, dst));
  }

  /**
   * Gives `leaves` the level-0 address blocks below root that map lbns in [start, end), in
   * order, reading at most maxNodes address blocks (upper levels count); no data block is read.
   */
  async leafNodes(root: BlockPtr | null, start: number, end: number, leaves: LeafSink, maxNodes: number): Promise<void> {
    let budget = maxNodes;
    const rec = async (ptr: BlockPtr | null, level: number, index: number): Promise<boolean> => {
      if (ptr === null) return true;
      if (budget <= 0) return false;
      budget--;
      const node = await this.verified.readNode(ptr, level, index);
      const nodeLo = index * slotsPerPointer(level + 1);
      if (level === 0) {
        leaves(nodeLo, node);
        return true;
      }
      const cs = slotsPerPointer(level);
      for (let slot = Math.max(0, Math.floor((start - nodeLo) / cs)); slot < FANOUT && nodeLo + slot * cs < end; slot++) {
        if (!(await rec(this.verified.childOf(node, ptr, level, index, slot), level - 1, index * FANOUT + slot))) return false;
      }
      return true;
    };
    await rec(root, this.height - 1, 0);
  }

  /** Extents for [lbn, end) below root, from the tree only (at most maxExtents). */
  async blockStatus(root: BlockPtr | null, lbn: number, end: number, maxExtents: number): Promise<Extent[]> {
    const out: { blocks: number; flags: number }[] = [];
    const add = (n: number, flags: number): boolean => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) {
        last.blocks += n;
        return true;
      }
      if (out.length >= maxExtents) return false;
      out.push({ blocks: n, flags });
      return true;
    };
    const budget = { nodes: this.statusNodeBudget };
    await this.walk(root, lbn, end, (_l, n) => add(n, EXTENT_HOLE | EXTENT_ZERO), () => add(1, 0), budget);
    assert(out.length >= 1, 'block status found no extent');
    return out.map((e) => ({ lengthBytes: e.blocks * BLOCK, flags: e.flags }));
  }
}
