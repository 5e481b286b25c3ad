/**
 * The write half of a CP (BlockTree.commitCp runs it): which address blocks the CP
 * rewrites (planPaths), the snapshot operations it carries (planSnapshots), and the
 * blocks it writes before its superblock (CpWriter.writeCp: data blocks, address blocks
 * bottom-up, space-map blocks, allocation-unit pads, then a sync), plus the discard of
 * released blocks. The superblock and the switch of in-memory state stay in tree.ts.
 *
 * Invariants:
 * - Every block a CP writes is newly allocated (never one a committed root, kept snapshot
 *   or in-flight read references), written at most once per CP, outside the superblock
 *   ring; writes go in address order, coalesced into runs split at multiples of
 *   writeChunkBlocks (one pwritev of the blocks where they lie, where the device can),
 *   at most ioConcurrency at a time per group. The data blocks' writes run while the
 *   address blocks are built; up to ADDRESS_BATCHES_IN_FLIGHT batches of address blocks
 *   are written while the next is built, whose old versions are read (one batch call off
 *   the event loop, where the device can) while the one before is built.
 * - Nothing the CP writes is referenced before its superblock, and the superblock is
 *   written only after every one of its blocks was written and synced (writeCp resolves
 *   after every data and address write and the sync).
 * - A block's pointer carries the CP as its birth and its crc32c; a rewritten address
 *   block's old version and the data blocks it no longer points at are freed from the
 *   live map (kept while a snapshot holds them); an address block left with no pointer
 *   is not written (its block is given back).
 * - The CP sink (a mirror) is handed the same blocks as the device, at the same time;
 *   the pads are not sent to it. Its calls run one at a time, in the order of the
 *   writeAll calls (data blocks, address blocks batch by batch and level by level,
 *   space-map blocks), whatever order their writes finish in.
 * - A device with an allocation unit (`allocUnitBlocks`, a RAID stripe) is handed whole
 *   free units per CP, and the CP pads the free rest of its units with zeroes, so it
 *   writes whole stripes; discards cover whole free units only. On a plain device only
 *   released runs of at least DISCARD_RUN_BLOCKS_MIN blocks are discarded, and only what
 *   is left of them after the CP that released them (which takes them first: warm).
 */
import { WRITE_PARTS_MAX, type BlockDevice, type WriteHint } from '../io/types';
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { log } from '../util/log';
import { crc32cBlock } from '../io/checksum';
import {
  BLOCK, BlockPtr, FANOUT, MAX_SNAPSHOTS, NODE_TYPE_DATA_TREE, RING_SLOTS, SnapshotRecord, encodePtr, nodeEditRuns, ptrSlotOffset,
  snapshotNameProblem, writeNodeHeader,
} from './layout';
import type { NodeCache } from './node-cache';
import type { NewBlock, SpaceMap } from './spacemap';
import type { BlockOrigin, CpBlock, CpMeta, CpPhases, CpSink, SnapshotOp } from './types';
import type { VerifiedReader } from './verified-read';
import { Slicer, forEachLimit } from '../util/work';

/**
 * On a plain device, released runs shorter than this (256 KiB) are not discarded. Random
 * writes free thousands of scattered single blocks per CP (old data blocks and old copies
 * of address blocks): a punch-hole each sat on the CP's path (and on the thread pool its
 * writes share), and on a file system a punched block costs an allocation again when the
 * allocator hands it out. Long runs (trims, overwritten sequential data) still go back
 * to a thin member.
 */
export const DISCARD_RUN_BLOCKS_MIN = 64;

/**
 * Batches of address blocks (writeChunkBlocks each, 1 MiB) written at once while the next
 * are built. One at a time, a CP of 4K random writes on a 16 GiB volume (~3900 level-0
 * blocks, 16 batches) waited 70-190 ms for its own address writes one after another.
 */
const ADDRESS_BATCHES_IN_FLIGHT = 4;

/**
 * Every block a CP writes is synced before its superblock: a file member starts the
 * writeback of large writes at once (the disk works while the CP goes on). Measured with
 * fio 1M seq write QD8 on a 2 GiB engine volume: 307-328 -> 350-366 MB/s, 3 pairs.
 */
const CP_WRITE: WriteHint = { writeback: true };

/** The address blocks one level of a CP rewrites (parallel arrays, sorted by index). */
export interface PathLevel {
  index: number[];
  /** Children of node k are below[firstChild[k] .. firstChild[k+1]) (lbns for level 0); length index.length + 1. */
  firstChild: number[];
  oldPtr: (BlockPtr | null)[];
  newPtr: (BlockPtr | null)[];
  pba: number[];
}

export interface CommitWork {
  cp: number;
  t0: number;
  meta: CpMeta;
  lbns: number[];
  datas: (Buffer | null)[];
  dataCrcs: number[];
  origins: (BlockOrigin | undefined)[];
  /** Per change: the block its data was placed in ahead of the CP (SpaceMap.reserveEarly, written and complete), or -1. */
  earlyPbas: number[];
  dataCount: number;
  plan: PathLevel[];
  nodesMax: number;
  newSummary: Buffer | null;
  snapPlan: SnapPlan;
  slicer: Slicer;
}

/** The phases of CpPhases that writeCp times. */
export type WritePhases = Pick<CpPhases, 'addressMs' | 'dataMs' | 'spaceMapMs' | 'syncMs'>;

export interface SnapPlan {
  created: string[];
  deleted: string[];
}

/** Validates a CP's snapshot operations against the kept snapshots: the names it creates and deletes. */
export function planSnapshots(ops: SnapshotOp[], snapshots: readonly SnapshotRecord[], cp: number): SnapPlan {
  if (ops.length > 2 * MAX_SNAPSHOTS) throw new VolumeError('EINVAL', `at most ${2 * MAX_SNAPSHOTS} snapshot operations per CP`);
  const names = snapshots.map((s) => s.name);
  const created: string[] = [];
  const deleted: string[] = [];
  for (const op of ops) {
    if (op.kind === 'create') {
      const problem = snapshotNameProblem(op.name);
      if (problem) throw new VolumeError('EINVAL', problem);
      if (names.includes(op.name)) throw new VolumeError('EINVAL', `snapshot "${op.name}" already exists`);
      if (names.length >= MAX_SNAPSHOTS) throw new VolumeError('EINVAL', `cannot create snapshot "${op.name}": the volume already has the maximum of ${MAX_SNAPSHOTS}`);
      names.push(op.name);
      created.push(op.name);
    } else if (op.kind === 'delete') {
      const i = names.indexOf(op.name);
      if (i < 0) throw new VolumeError('EINVAL', `no snapshot named "${op.name}"`);
      names.splice(i, 1);
      const c = created.indexOf(op.name);
      if (c >= 0) created.splice(c, 1);
      else deleted.push(op.name);
    } else {
      throw new VolumeError('EINVAL', `unknown snapshot operation ${JSON.stringify(op)}`);
    }
  }
  assert(names.length <= MAX_SNAPSHOTS && cp > 0, 'snapshot plan');
  return { created, deleted };
}

/** Pointers present in an address block. */
function countPresent(b: Buffer): number {
  let n = 0;
  for (let s = 0; s < FANOUT; s++) if (b.readUInt16LE(ptrSlotOffset(s) + 20) !== 0) n++;
  return n;
}

export class CpWriter {
  /** Gather buffers of writeChunkBlocks blocks reused by writeAll (at most ioConcurrency kept). */
  private readonly chunkBufs: Buffer[] = [];
  /** The sink's calls run one after another, in the order writeAll was called (see writeCp). */
  private shipTail: Promise<void> = Promise.resolve();

  constructor(
    private readonly dev: BlockDevice,
    private readonly smap: SpaceMap,
    private readonly verified: VerifiedReader,
    private readonly cache: NodeCache,
    private readonly uuidBytes: Buffer,
    private readonly height: number,
    private readonly deviceBlocks: number,
    private readonly writeChunkBlocks: number,
    private readonly ioConcurrency: number,
    private readonly discardFreed: boolean,
    /** The tree's CP sink at the time of each write (BlockTree.setCpSink changes it). */
    private readonly sink: () => CpSink | undefined,
  ) {}

  /** Drops the gather buffers (the tree is closed). */
  releaseChunkBufs(): void {
    this.chunkBufs.length = 0;
  }

  /**
   * The address blocks a CP rewrites: per level (0 = bottom), the sorted indexes of the
   * touched nodes, where each one's children start in the level below (or in lbns), and
   * each one's old pointer (below the committed `root`). Reads the old levels >= 1 (not
   * level 0); changes nothing.
   */
  async planPaths(lbns: number[], root: BlockPtr | null, slicer: Slicer): Promise<PathLevel[]> {
    if (lbns.length === 0) return [];
    const H = this.height;
    const plan: PathLevel[] = [];
    let below: number[] = lbns;
    for (let l = 0; l < H; l++) {
      const index: number[] = [];
      const firstChild: number[] = [];
      for (let k = 0; k < below.length; k++) {
        const i = Math.floor(below[k]! / FANOUT);
        if (index.length === 0 || index[index.length - 1] !== i) {
          index.push(i);
          firstChild.push(k);
        }
      }
      firstChild.push(below.length);
      await slicer.maybeYield();
      plan.push({ index, firstChild, oldPtr: new Array<BlockPtr | null>(index.length).fill(null), newPtr: new Array<BlockPtr | null>(index.length).fill(null), pba: [] });
      below = index;
    }
    const top = plan[H - 1]!;
    assert(top.index.length === 1 && top.index[0] === 0, 'the root level has one node');
    top.oldPtr[0] = root;
    for (let l = H - 1; l >= 1; l--) {
      const lvl = plan[l]!;
      const child = plan[l - 1]!;
      const ks = lvl.index.map((_, k) => k).filter((k) => lvl.oldPtr[k] !== null);
      await forEachLimit(ks, this.ioConcurrency, async (k) => {
        await slicer.maybeYield();
        const ptr = lvl.oldPtr[k]!;
        // Only its pointers are read, here: not lent (the edit below may take it).
        const node = await this.verified.readNode(ptr, l, lvl.index[k]!, false, false);
        for (let c = lvl.firstChild[k]!; c < lvl.firstChild[k + 1]!; c++) {
          child.oldPtr[c] = this.verified.childOf(node, ptr, l, lvl.index[k]!, child.index[c]! % FANOUT);
        }
      });
    }
    return plan;
  }

  /**
   * Allocates and writes every block of CP c but its superblock, then syncs: data blocks,
   * address blocks bottom-up, the space map's blocks, the pads. Changes the in-memory
   * space map (and the node cache); `root` is the committed root (the new one when the
   * CP changes no block). Returns the new root and the counts. It settles only after every
   * read and write it started has: a failed CP whose other writes were still in flight
   * would otherwise leave them to land after the tree was reopened, on blocks the next CP
   * may have taken again (seen once: a property-test run found an address block of a
   * committed CP overwritten by a failed CP's late write).
   */
  async writeCp(c: CommitWork, root: BlockPtr | null, nowMs: () => number): Promise<{ newRoot: BlockPtr | null; blocksWritten: number; blocksFreed: number; earlyBlocks: number; phases: WritePhases }> {
    const started: Promise<unknown>[] = [];
    try {
      return await this.writeCpRun(c, root, nowMs, started);
    } catch (e) {
      await Promise.allSettled(started);
      throw e;
    }
  }

  private async writeCpRun(c: CommitWork, root: BlockPtr | null, nowMs: () => number, started: Promise<unknown>[]): Promise<{ newRoot: BlockPtr | null; blocksWritten: number; blocksFreed: number; earlyBlocks: number; phases: WritePhases }> {
    const { cp, lbns, datas, plan, slicer } = c;
    const phases: WritePhases = { addressMs: 0, dataMs: 0, spaceMapMs: 0, syncMs: 0 };
    let mark = nowMs();
    const lap = (): number => {
      const now = nowMs();
      const ms = Math.max(0, now - mark);
      mark = now;
      return ms;
    };
    const freed = { blocks: 0 };
    let blocksWritten = 0;
    if (c.newSummary) freed.blocks += this.smap.replaceSummary(c.newSummary);
    // Allocate data blocks, then address blocks level by level (upper bound: every
    // touched node; those that end up empty are given back), in contiguous runs.
    // Data placed ahead of the CP is taken where it is (written already: only the sync and
    // the sink are left for it); the rest is allocated.
    let adopted = 0;
    for (let i = 0; i < lbns.length; i++) if (datas[i] && c.earlyPbas[i]! >= 0) adopted++;
    const pbas: number[] = [];
    for (const r of this.smap.allocate(c.dataCount - adopted + c.nodesMax)) for (let k = 0; k < r.count; k++) pbas.push(r.pba + k);
    const placed = adopted > 0 ? new Set<number>() : undefined;
    await slicer.maybeYield();
    let next = 0;
    const dataPtrs: (BlockPtr | null)[] = new Array<BlockPtr | null>(lbns.length).fill(null);
    const dataWrites: CpBlock[] = [];
    for (let i = 0; i < lbns.length; i++) {
      if ((i & 255) === 255) await slicer.maybeYield();
      const d = datas[i];
      if (!d) continue;
      const e = c.earlyPbas[i]!;
      let pba: number;
      if (e >= 0) {
        this.smap.adoptEarly(e);
        placed!.add(e);
        pba = e;
      } else {
        pba = pbas[next++]!;
      }
      const crc = c.dataCrcs[i]!;
      dataPtrs[i] = { pba, birth: cp, crc };
      const origin = c.origins[i];
      dataWrites.push(origin ? { pba, buf: d, origin, crc } : { pba, buf: d, crc });
    }
    for (const lvl of plan) for (let k = 0; k < lvl.index.length; k++) lvl.pba.push(pbas[next++]!);
    assert(next === pbas.length, 'allocated blocks left over');
    pbas.length = 0;
    // The data blocks are written while the address blocks are built and written: nothing
    // references any of them until the superblock, which follows the sync of all of them.
    const dataDone = this.writeAll(dataWrites, slicer, cp, placed);
    dataDone.catch(() => undefined); // awaited below; a failure is reported there
    started.push(dataDone);
    blocksWritten += dataWrites.length;
    // Address blocks bottom-up, streamed in batches: copy the old node (or start empty),
    // replace the touched pointers, stamp the header, checksum, write (editNode).
    const BATCH = this.writeChunkBlocks;
    const shipping = this.sink() !== undefined;
    const addrWrites: Promise<void>[] = [];
    for (let l = 0; l < plan.length; l++) {
      const lvl = plan[l]!;
      const below = l > 0 ? plan[l - 1]! : null;
      // Batches follow the write chunks: contiguous pbas, split at multiples of the chunk size.
      const batches: number[][] = [];
      for (let k = 0; k < lvl.index.length; k++) {
        const cur = batches[batches.length - 1];
        const p = lvl.pba[k]!;
        if (cur && cur.length < BATCH && lvl.pba[cur[cur.length - 1]!]! + 1 === p && p % BATCH !== 0) cur.push(k);
        else batches.push([k]);
      }
      // The old versions of a batch's nodes are read (one batch off the event loop) while
      // the batch before it is edited.
      const fetchStarted = (ks: number[]): Promise<{ out: (Buffer | null)[]; cached: boolean[] }> => {
        const f = this.verified.readNodesForEdit(ks.map((k) => lvl.oldPtr[k] ?? null), l, ks.map((k) => lvl.index[k]!));
        started.push(f);
        return f;
      };
      let fetching = batches.length > 0 ? fetchStarted(batches[0]!) : undefined;
      for (let b = 0; b < batches.length; b++) {
        const ks = batches[b]!;
        const { out: olds, cached } = await fetching!;
        fetching = b + 1 < batches.length ? fetchStarted(batches[b + 1]!) : undefined;
        fetching?.catch(() => undefined); // awaited at the next batch; a failure is reported there
        await slicer.maybeYield();
        const out: (CpBlock | null)[] = new Array<CpBlock | null>(ks.length).fill(null);
        for (let j = 0; j < ks.length; j++) {
          // ~5-10 us a node: check the budget every 16.
          if ((j & 15) === 15) await slicer.maybeYield();
          out[j] = this.editNode(lvl, below, ks[j]!, olds[j]!, cached[j]!, l, cp, lbns, dataPtrs, shipping, freed);
        }
        const writes = out.filter((w): w is CpBlock => w !== null);
        blocksWritten += writes.length;
        // Not awaited here: the next batch is built while this one is written (its
        // pointers are already in newPtr; nothing references any of it until the superblock).
        if (addrWrites.length >= ADDRESS_BATCHES_IN_FLIGHT) await addrWrites.shift();
        const w = this.writeAll(writes, slicer, cp);
        w.catch(() => undefined); // awaited below; a failure is reported there
        addrWrites.push(w);
        started.push(w);
      }
      if (below) below.newPtr.length = 0;
    }
    for (const w of addrWrites.splice(0)) await w;
    phases.addressMs = lap();
    await dataDone;
    phases.dataMs = lap();
    dataWrites.length = 0;
    const newRoot = plan.length > 0 ? plan[plan.length - 1]!.newPtr[0]! : root;
    // The space map's own blocks (every allocation and free of the CP is final now).
    const smapBlocks = this.smap.buildCommit(cp, this.uuidBytes);
    await this.writeAll(smapBlocks, slicer, cp);
    blocksWritten += smapBlocks.length;
    await this.writePads();
    phases.spaceMapMs = lap();
    // Placement writes wait while the member syncs: the sync waits for every page under
    // writeback, and the next half's placed data is not this CP's to wait for.
    const synced = this.dev.sync();
    this.syncing = synced.catch(() => undefined);
    try {
      await synced;
    } finally {
      this.syncing = undefined;
    }
    phases.syncMs = lap();
    return { newRoot, blocksWritten, blocksFreed: freed.blocks, earlyBlocks: adopted, phases };
  }

  /**
   * One address block of a CP (node k of level l): its old version (a copy when the node
   * cache holds that buffer), or an empty node, with the CP's pointers written in, the
   * data blocks it replaces freed, stamped and checksummed; with a mirror shipping the CP,
   * the word runs it changed (changedRuns). Null when the node ends up empty (its block is given back).
   * Synchronous and apart from writeCp: V8 compiles and recompiles it on its own (it was
   * most of writeCp's 80-200 ms Turbofan compiles, repeated as writeCp deoptimized).
   */
  private editNode(lvl: PathLevel, below: PathLevel | null, k: number, old: Buffer | null, oldCached: boolean, l: number, cp: number, lbns: number[], dataPtrs: (BlockPtr | null)[], shipping: boolean, freed: { blocks: number }): CpBlock | null {
    const index = lvl.index[k]!;
    const oldPtr = lvl.oldPtr[k]!;
    assert((old === null) === (oldPtr === null), 'an old node for every old pointer');
    // A node read for this edit is ours to change, and so is the cache's buffer when no
    // reader was ever handed it (NodeCache.takeForEdit: a CP's own node, not read since;
    // the entry is dropped here, synchronously). Random writes over a large volume touch a
    // new leaf per block: a copy each was a fresh 4 KiB ArrayBuffer (3-8 us) and 4 KiB of
    // garbage per block per CP. A mirror shipping the CP gets the words the edit changed
    // instead of the old contents (its delta against the committed block: changedRuns).
    const inPlace = old !== null && oldPtr !== null && (!oldCached || this.cache.takeForEdit(oldPtr, old));
    if (inPlace) this.nodesEditedInPlace++;
    const buf = old ? (inPlace ? old : Buffer.from(old)) : Buffer.alloc(BLOCK);
    const slots: number[] | undefined = shipping && old ? [] : undefined;
    // Whether the node ends up empty: certain not when the CP writes a pointer into
    // it (the common case), otherwise its slots are counted after the edit.
    let wrotePtr = false;
    for (let x = lvl.firstChild[k]!; x < lvl.firstChild[k + 1]!; x++) {
      const slot = (below ? below.index[x]! : lbns[x]!) % FANOUT;
      const off = ptrSlotOffset(slot);
      if (!below && buf.readUInt16LE(off + 20) !== 0) {
        const oldData = this.verified.childOf(buf, oldPtr!, 0, index, slot);
        if (oldData && this.smap.freeFromLive(oldData.pba)) freed.blocks++;
      }
      const np = below ? below.newPtr[x]! : dataPtrs[x]!;
      encodePtr(buf, off, np);
      slots?.push(slot);
      if (np) wrotePtr = true;
    }
    const present = wrotePtr ? 1 : countPresent(buf);
    if (oldPtr) {
      if (this.smap.freeFromLive(oldPtr.pba)) freed.blocks++;
      // The replaced version would only push live nodes out of the LRU (each CP
      // rewrites its whole path set); a read still pinned to an old root re-reads it.
      this.cache.delete(oldPtr.pba);
    }
    if (present === 0) {
      this.smap.unallocate(lvl.pba[k]!);
      return null;
    }
    const pba = lvl.pba[k]!;
    writeNodeHeader(buf, { type: NODE_TYPE_DATA_TREE, level: l, index }, pba, cp, this.uuidBytes);
    const ptr: BlockPtr = { pba, birth: cp, crc: crc32cBlock(buf) };
    lvl.newPtr[k] = ptr;
    const nodeCrc = ptr.crc;
    const block: CpBlock = old && oldPtr ? (slots ? { pba, buf, prevPba: oldPtr.pba, changedRuns: nodeEditRuns(slots), nodeCrc } : { pba, buf, prevPba: oldPtr.pba, nodeCrc }) : { pba, buf, nodeCrc };
    // Safe before the CP is durable: only a pointer with this pba, birth and crc can hit it.
    this.cache.put(ptr, buf, false);
    return block;
  }

  /**
   * Blocks released at the start of CP cp. On a plain device, runs of at least
   * DISCARD_RUN_BLOCKS_MIN blocks are kept warm for this CP (its allocations take them
   * first: the member holds them, mostly in the page cache), and what the CP before left
   * of its warm runs is discarded now (a thin member file gets its space back); shorter
   * runs are neither (next fit reuses them). With allocation units, released whole free
   * units are discarded now. Only blocks no committed root, snapshot or in-flight read
   * references are released, and this runs before anything of CP cp is allocated. A
   * failure is only logged: discard is a hint.
   *
   * Measured (2 GiB volume, 64 MiB NVRAM, fio 1M seq write QD8): punching every long run
   * as it was released cost ~10 ms of each ~45 ms CP, and the CP then wrote into holes
   * (a new file block and a new page each); warm runs: 660 -> 955 MB/s. Warm single
   * blocks (random writes) cost more than they gave: scattered writes instead of the
   * contiguous runs next fit finds (4k QD32 57-65K -> 49K IOPS), so short runs stay out.
   */
  async discard(released: { pba: number; count: number }[], cp: number): Promise<void> {
    // Its runs are allocatable while they are punched: nothing is placed early meanwhile.
    this.discarding++;
    try {
      await this.discardRuns(released, cp);
    } finally {
      this.discarding--;
    }
  }

  /** Discards in progress (reserveEarly waits them out). */
  discarding = 0;
  /** Address blocks a CP changed in their cached buffer instead of a copy (NodeCache.takeForEdit). */
  nodesEditedInPlace = 0;

  private async discardRuns(released: { pba: number; count: number }[], cp: number): Promise<void> {
    const plain = this.smap.unitBlocks === 1;
    const cold = plain ? this.smap.keepWarm(released.filter((r) => r.count >= DISCARD_RUN_BLOCKS_MIN), cp) : released;
    if (!this.discardFreed || cold.length === 0) return;
    // Allocation units (RAID stripes): only whole free units, or parity would go stale.
    // A plain device: only runs worth a punch-hole.
    const runs = plain ? cold.filter((r) => r.count >= DISCARD_RUN_BLOCKS_MIN) : this.smap.wholeFreeUnits(cold);
    try {
      await forEachLimit(runs, this.ioConcurrency, async (r) => {
        if (!(r.pba >= RING_SLOTS && r.pba + r.count <= this.deviceBlocks)) assert(false, `discard of [${r.pba}, +${r.count})`);
        await this.dev.discard(r.pba, r.count);
      });
    } catch (e) {
      log().warn({ err: e instanceof Error ? e.message : String(e) }, 'block tree: discarding freed blocks failed (ignored)');
    }
  }

  /** The CP's member sync while it runs (writeEarly waits for it). */
  private syncing: Promise<void> | undefined;

  /**
   * Writes data placed ahead of its CP into blocks reserveEarly took (parts of whole
   * blocks, one pwritev, the writeback started as for a CP's blocks), after the CP's member
   * sync if one runs; the CP that adopts them syncs them.
   */
  async writeEarly(pba: number, parts: Buffer[]): Promise<void> {
    while (this.syncing) await this.syncing;
    let n = 0;
    for (const b of parts) {
      if (!(b.length > 0 && b.length % BLOCK === 0)) assert(false, `early write part of ${b.length} bytes`);
      n += b.length / BLOCK;
    }
    for (let p = pba; p < pba + n; p++) if (!this.smap.isEarly(p)) assert(false, `early write to pba ${p}, which was not placed early`);
    assert(parts.length <= WRITE_PARTS_MAX, `early write of ${parts.length} parts`);
    if (this.dev.writeBlocksV) await this.dev.writeBlocksV(pba, parts, CP_WRITE);
    else await this.dev.writeBlocks(pba, parts.length === 1 ? parts[0]! : Buffer.concat(parts), CP_WRITE);
  }

  /**
   * Allocation units (RAID stripes): zeroes into the free blocks of the units this CP was
   * handed, so every stripe it wrote is whole (no read-modify-write). Nothing references
   * them; a mirror does not need them (not sent to the sink).
   */
  private async writePads(): Promise<void> {
    const runs = this.smap.takePadRuns();
    if (runs.length === 0) return;
    const chunks: { pba: number; count: number }[] = [];
    for (const r of runs) {
      for (let p = r.pba; p < r.pba + r.count;) {
        const n = Math.min(r.pba + r.count - p, this.writeChunkBlocks - (p % this.writeChunkBlocks));
        chunks.push({ pba: p, count: n });
        p += n;
      }
    }
    const zeroes = Buffer.alloc(this.writeChunkBlocks * BLOCK);
    await forEachLimit(chunks, this.ioConcurrency, (c) => this.dev.writeBlocks(c.pba, zeroes.subarray(0, c.count * BLOCK)));
  }

  /**
   * Writes blocks sorted by address, coalesced into runs split at writeChunkBlocks
   * boundaries. The sink's call takes its place in the order of the writeAll calls at the
   * call (several may be in flight), before anything here waits.
   */
  private async writeAll(blocks: CpBlock[], slicer: Slicer, cp: number, onDeviceAlready?: ReadonlySet<number>): Promise<void> {
    const sink = this.sink();
    let sorted: (ok: boolean) => void = () => undefined;
    let shipped: Promise<void> | undefined;
    if (sink) {
      // In call order, never two at once (the data blocks' call may still be sending when
      // the first address blocks are ready); a failed call fails its own writeAll only.
      const ready = new Promise<boolean>((resolve) => { sorted = resolve; });
      shipped = this.shipTail.then(() => ready).then((ok) => (ok ? sink.blocks(cp, blocks) : Promise.reject(new VolumeError('EIO', `CP ${cp}: blocks not shipped (they failed their checks)`))));
      this.shipTail = shipped.catch(() => undefined);
      shipped.catch(() => undefined); // awaited below, after the device's writes
    }
    const chunks: NewBlock[][] = [];
    try {
      await slicer.maybeYield();
      blocks.sort((a, b) => a.pba - b.pba);
      let cur: NewBlock[] = [];
      let last = -1;
      for (const b of blocks) {
        if (!(b.pba !== last)) assert(false, `pba ${b.pba} written twice in one CP`);
        last = b.pba;
        // Placed ahead of the CP: the sink takes it, the device has it.
        if (onDeviceAlready?.has(b.pba)) continue;
        const prev = cur[cur.length - 1];
        if (!(b.pba >= RING_SLOTS && b.pba < this.deviceBlocks && b.buf.length === BLOCK)) assert(false, `bad block write at pba ${b.pba}`);
        if (prev && (prev.pba + 1 !== b.pba || b.pba % this.writeChunkBlocks === 0 || cur.length >= this.writeChunkBlocks)) {
          chunks.push(cur);
          cur = [];
        }
        cur.push(b);
      }
      if (cur.length > 0) chunks.push(cur);
      sorted(true);
    } catch (e) {
      sorted(false);
      throw e;
    }
    // The sink (a mirror) takes the same blocks at the same time as the device.
    await forEachLimit(chunks, this.ioConcurrency, async (c) => {
      await slicer.maybeYield();
      if (c.length === 1) {
        await this.dev.writeBlocks(c[0]!.pba, c[0]!.buf, CP_WRITE);
      } else if (this.dev.writeBlocksV && c.length <= WRITE_PARTS_MAX) {
        // One pwritev of the blocks where they are: no gather copy on the event loop.
        // Every buffer stays unchanged until this CP ends (NVRAM views of a frozen half;
        // address blocks written once per CP).
        const parts: Buffer[] = new Array<Buffer>(c.length);
        for (let k = 0; k < c.length; k++) parts[k] = c[k]!.buf;
        await this.dev.writeBlocksV(c[0]!.pba, parts, CP_WRITE);
      } else {
        // Gather into a reused buffer: a fresh 1 MiB allocation per chunk costs page
        // faults (and GC) on the event loop, far more than the copy itself.
        const chunk = this.chunkBufs.pop() ?? Buffer.allocUnsafe(this.writeChunkBlocks * BLOCK);
        try {
          // 128 KiB at a time (tens of microseconds), not a whole 1 MiB copy per turn.
          for (let k = 0; k < c.length; k++) {
            if ((k & 31) === 31) await slicer.maybeYield();
            c[k]!.buf.copy(chunk, k * BLOCK);
          }
          await this.dev.writeBlocks(c[0]!.pba, chunk.subarray(0, c.length * BLOCK), CP_WRITE);
        } finally {
          if (this.chunkBufs.length < this.ioConcurrency) this.chunkBufs.push(chunk);
        }
      }
    });
    if (shipped) await shipped;
  }

}
