/**
 * The copy-on-write block tree (see docs/tree.md for the on-disk format).
 *
 * A fixed-height radix tree of address blocks (168 pointers each) maps logical block
 * numbers to 4 KiB data blocks; a null pointer is a hole. Every CP writes the changed
 * data blocks and the address-block paths above them to newly allocated blocks, in
 * contiguous runs, then the space-map blocks (spacemap.ts), syncs, writes the new root
 * into the next slot of an 8-slot superblock ring, and syncs again. Snapshots are kept
 * roots (with the space map of their CP) listed in the superblock.
 *
 * BlockTree (this file) holds the open tree's state and its public API: the mounted
 * superblock, the pinned roots, the space map, the order of a commit and the switch to
 * a new CP, snapshots, the seams for a mirror, check and close. The rest, by job:
 * - mount.ts: format, choosing and verifying the superblock to mount, read-only views.
 * - verified-read.ts: every device read of an open tree, verified and counted.
 * - read.ts: readBlock / readRange / blockStatus below one root (the walks).
 * - root-handle.ts: the roots reads are pinned to; a snapshot's TreeReader.
 * - commit.ts: what a CP rewrites and writes before its superblock; discards.
 *
 * Invariants:
 * - A block referenced by the committed root, by any kept snapshot, or by a root a read
 *   is still in flight on, is never overwritten (allocation skips active | summary |
 *   reserved; reserved blocks are released only when no retired root is being read).
 * - Blocks freed in CP n are reusable only after CP n's superblock is durable (two CPs
 *   later in steady state; one CP later under space pressure).
 * - One commit at a time. In-memory state (root, snapshots, space map) changes only after
 *   the new superblock is durable, except the space map's in-flight bookkeeping; if a
 *   commit fails after it started changing that bookkeeping, the tree refuses further
 *   commits (the caller reopens and recovers from its log).
 * - Reads (verified-read.ts) and CP writes (commit.ts) keep their own invariants, listed
 *   in those files.
 */
import type { BlockDevice, Clock } from '../io/types';
import { systemClock } from '../io/types';
import { VolumeError } from '../util/errors';
import { type Extent } from '../util/extent';
import { assert } from '../util/assert';
import { log } from '../util/log';
import { popcount } from '../util/bitmap';
import { checksumRun, crcScratch } from './data-checksums';
import { crc32cBlocks } from '../io/checksum';
import { errnoCode } from '../io/native';
import { runCheck } from './check';
import {
  BLOCK, BlockPtr, FANOUT, RING_SLOTS, SnapshotRecord, Superblock, decodeSuperblock, encodeSuperblock, ptrString, slotsPerPointer,
} from './layout';
import { uuidToBytes } from '../util/bytes';
import { NodeCache } from './node-cache';
import { startGeneration, type Generation } from './lineage';
import { SpaceMap } from './spacemap';
import type {
  BlockChange, BlockOrigin, BlockTreeApi, CheckReport, CommitResult, CommittedView, CpMeta, CpPhases, CpSink, SnapshotInfo, SnapshotOp,
  TreeReader, TreeStats, TreeRollback, BlockErrorCounts, LeafSink, EarlyPlacementApi, RepairSource,
} from './types';
import { slicerFor } from '../util/work';
import { CommitWork, CpWriter, planSnapshots } from './commit';
import { FormatOptions, allocUnitOf, formatVolume, loadCommitted, mountNewest, verifyViewRoots } from './mount';
import { ReadPath } from './read';
import { PinnedReader, RootHandle } from './root-handle';
import { VerifiedReader } from './verified-read';

export type { FormatOptions } from './mount';

export interface OpenOptions {
  clock?: Clock;
  /** Address blocks kept in the LRU cache (default 4096 = 16 MiB). */
  cacheBlocks?: number;
  /** Largest single writeBlocks call in blocks; runs are also split at multiples of it (default 256 = 1 MiB). */
  writeChunkBlocks?: number;
  /** Device reads/writes in flight at once during a commit or check (default 8). */
  ioConcurrency?: number;
  /** Address blocks one blockStatus call may read before it returns a shorter answer (default 512). */
  statusNodeBudget?: number;
  /** Discard blocks on the device when they become free (default true; thin members shrink). */
  discardFreed?: boolean;
  /** Offer early data placement (`early`) on a single-member device (default true). */
  earlyPlacement?: boolean;
}

export const DEFAULT_CACHE_BLOCKS = 4096;

export const MAX_CHANGES_PER_CP = 1 << 18;

export class BlockTree implements BlockTreeApi {
  readonly sizeBytes: number;
  readonly volumeUuid: string;
  /** Set by open() when it fell back past a durable newer CP (see TreeRollback). */
  rollback: TreeRollback | undefined = undefined;
  /** Reads refused since open (see the invariants); only ever incremented. */
  readonly errorCounts: BlockErrorCounts = { checksum: 0, io: 0, repaired: 0 };
  readonly lbnCount: number;
  readonly height: number;
  private readonly uuidBytes: Buffer;
  private sb: Superblock;
  private live: RootHandle;
  private readonly snapHandles = new Map<string, RootHandle>();
  private readonly retired = new Set<RootHandle>();
  private readonly cache: NodeCache;
  private readonly ioConcurrency: number;
  /** Verified device reads (verified-read.ts), the read path (read.ts), the CP writes (commit.ts). */
  private readonly verified: VerifiedReader;
  private readonly reads: ReadPath;
  private readonly writer: CpWriter;
  private commitRunning: Promise<unknown> | null = null;
  /** The last CP this tree committed (stats().lastCp). */
  private lastCommit: CommitResult | undefined;
  private readonly phaseTotals: CpPhases = { prepareMs: 0, addressMs: 0, dataMs: 0, spaceMapMs: 0, syncMs: 0, superblockMs: 0, sinkMs: 0 };
  private rotatedForCp = -1;
  private failedReason: string | null = null;
  private closed = false;
  private sink: CpSink | undefined;
  /** The newest CP holdCommitted() holds blocks of (SpaceMap held), until the sink needs none of them. */
  private heldThroughCp: number | undefined;
  /** Pins taken by pinCommitted() that are not released yet. */
  private readonly pins = new Set<RootHandle[]>();
  /** A generation startGeneration() asked for: the next CP is its first. */
  private pendingGeneration: string | undefined;

  private constructor(
    private readonly dev: BlockDevice,
    sb: Superblock,
    private readonly smap: SpaceMap,
    readonly clock: Clock,
    opts: OpenOptions,
  ) {
    this.sb = sb;
    this.sizeBytes = sb.sizeBytes;
    this.volumeUuid = sb.volumeUuid;
    this.uuidBytes = uuidToBytes(sb.volumeUuid);
    this.lbnCount = sb.sizeBytes / BLOCK;
    this.height = sb.treeHeight;
    this.cache = new NodeCache(opts.cacheBlocks ?? DEFAULT_CACHE_BLOCKS);
    // A RAID device's stripes: write chunks are whole stripes (split at stripe boundaries).
    const unit = allocUnitOf(dev);
    const writeChunkBlocks = opts.writeChunkBlocks ?? (unit === 1 ? 256 : Math.min(8192, unit * Math.max(1, Math.floor(256 / unit))));
    this.ioConcurrency = opts.ioConcurrency ?? 8;
    const statusNodeBudget = opts.statusNodeBudget ?? 512;
    const discardFreed = opts.discardFreed ?? true;
    assert(Number.isInteger(statusNodeBudget) && statusNodeBudget >= 1, 'statusNodeBudget >= 1');
    assert(Number.isInteger(writeChunkBlocks) && writeChunkBlocks >= 1 && writeChunkBlocks <= 8192, 'writeChunkBlocks in [1, 8192]');
    assert(Number.isInteger(this.ioConcurrency) && this.ioConcurrency >= 1 && this.ioConcurrency <= 256, 'ioConcurrency in [1, 256]');
    this.verified = new VerifiedReader(dev, this.cache, this.uuidBytes, this.volumeUuid, this.lbnCount, sb.deviceBlocks, this.errorCounts);
    this.verified.mayHeal = (dev as { readOnly?: boolean }).readOnly !== true;
    this.reads = new ReadPath(this.verified, this.cache, this.height, this.ioConcurrency, statusNodeBudget);
    this.writer = new CpWriter(
      dev, smap, this.verified, this.cache, this.uuidBytes, this.height, sb.deviceBlocks, writeChunkBlocks, this.ioConcurrency, discardFreed, () => this.sink,
    );
    this.live = new RootHandle(sb.cpNumber, sb.root, 'live');
    for (const s of sb.snapshots) this.snapHandles.set(s.name, new RootHandle(s.cp, s.root, `snapshot ${s.name}`));
    if (unit === 1 && (opts.earlyPlacement ?? true)) {
      this.early = {
        reserve: (count, keepFree) => {
          if (this.failedReason !== null || this.writer.discarding > 0) return undefined;
          // Room for any CP besides: its data, address and space-map blocks.
          return this.smap.reserveEarly(count, keepFree + this.smap.treeBlocksMax);
        },
        write: (pba, parts) => this.writer.writeEarly(pba, parts),
        drop: (runs) => {
          for (const r of runs) this.smap.dropEarly(r);
        },
      };
    }
  }

  readonly early: EarlyPlacementApi | undefined;

  // ---------------------------------------------------------------- format / open (mount.ts)

  /** Writes an empty volume (CP 0) onto dev; every superblock slot but the first is zeroed. */
  static format(dev: BlockDevice, opts: FormatOptions): Promise<void> {
    return formatVolume(dev, opts);
  }

  /** Mounts the newest superblock whose checksum, root block and space map verify. */
  static open(dev: BlockDevice, opts: OpenOptions = {}): Promise<BlockTree> {
    return mountNewest(dev, (sb) => BlockTree.mount(dev, sb, opts));
  }

  /**
   * A read-only view of the committed state a superblock describes (e.g. a mirror's
   * newest CP): verifies the root blocks, loads no space map, refuses commits. Reads are
   * as safe as the caller's guarantee that nothing it references is overwritten.
   */
  static async openView(dev: BlockDevice, superblock: Buffer, opts: OpenOptions = {}): Promise<BlockTree> {
    const sb = await verifyViewRoots(dev, superblock);
    const tree = new BlockTree(dev, sb, SpaceMap.createEmpty(sb.deviceBlocks), opts.clock ?? systemClock, { cacheBlocks: 256, ...opts, discardFreed: false });
    tree.failedReason = 'a read-only view';
    // A view never writes its device (a repair source's copy is served, not written back).
    tree.verified.mayHeal = false;
    return tree;
  }

  /**
   * A read-only tree of one committed state with its space map (openView has none), for a
   * check of that state while its device is written elsewhere (a mirror's receiver, the
   * state pinned meanwhile). Never writes its device.
   */
  static async openCommitted(dev: BlockDevice, superblock: Buffer, opts: OpenOptions = {}): Promise<BlockTree> {
    const sb = await verifyViewRoots(dev, superblock);
    const smap = await loadCommitted(dev, sb);
    const tree = new BlockTree(dev, sb, smap, opts.clock ?? systemClock, { cacheBlocks: 256, ...opts, discardFreed: false });
    tree.failedReason = 'a read-only view';
    tree.verified.mayHeal = false;
    return tree;
  }

  private static async mount(dev: BlockDevice, sb: Superblock, opts: OpenOptions): Promise<BlockTree> {
    const smap = await loadCommitted(dev, sb);
    return new BlockTree(dev, sb, smap, opts.clock ?? systemClock, opts);
  }

  // ---------------------------------------------------------------- reads (read.ts)

  private async pinned<T>(h: RootHandle, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'block tree is closed');
    if (h.retired && h !== this.live) throw new VolumeError('ESHUTDOWN', `${h.label} was deleted`);
    h.enter();
    try {
      return await fn();
    } finally {
      h.exit();
    }
  }

  private checkRange(lbn: number, count: number): void {
    if (!(Number.isSafeInteger(lbn) && lbn >= 0 && Number.isSafeInteger(count) && count >= 1 && lbn + count <= this.lbnCount)) assert(false, `lbn range ${lbn}+${count} outside [0, ${this.lbnCount})`);
  }

  /** @internal Reads one block through the root pinned by h. */
  async readBlockOn(h: RootHandle, lbn: number): Promise<Buffer | null> {
    this.checkRange(lbn, 1);
    return this.pinned(h, () => this.reads.readBlock(h.root, lbn));
  }

  /**
   * @internal Reads count blocks into dst (holes as zeroes), coalescing contiguous blocks
   * (ReadPath.readRange).
   */
  async readRangeOn(h: RootHandle, lbn: number, count: number, dst: Buffer, leaves?: LeafSink): Promise<void> {
    this.checkRange(lbn, count);
    if (!(dst.length === count * BLOCK)) assert(false, `readRange: dst must be ${count * BLOCK} bytes, got ${dst.length}`);
    await this.pinned(h, () => this.reads.readRange(h.root, lbn, count, dst, leaves));
  }

  /** The live root's level-0 address blocks for lbns [lbn, lbn+count), at most maxNodes address blocks read (ReadPath.leafNodes). */
  async readLeaves(lbn: number, count: number, leaves: LeafSink, maxNodes: number): Promise<void> {
    this.checkRange(lbn, count);
    const h = this.live;
    await this.pinned(h, () => this.reads.leafNodes(h.root, lbn, lbn + count, leaves, maxNodes));
  }

  /** @internal Extents for [lbn, lbn+count) through the root pinned by h, from the tree only. */
  async blockStatusOn(h: RootHandle, lbn: number, count: number, maxExtents: number): Promise<Extent[]> {
    this.checkRange(lbn, count);
    if (!(Number.isInteger(maxExtents) && maxExtents >= 1)) assert(false, `maxExtents ${maxExtents}`);
    const end = lbn + count;
    return this.pinned(h, () => this.reads.blockStatus(h.root, lbn, end, maxExtents));
  }

  get cpNumber(): number {
    return this.live.cp;
  }

  readBlock(lbn: number): Promise<Buffer | null> {
    return this.readBlockOn(this.live, lbn);
  }

  /** Reads [lbn, lbn+count) into dst (count*4096 bytes); holes read as zeroes. */
  readRange(lbn: number, count: number, dst: Buffer, leaves?: LeafSink): Promise<void> {
    return this.readRangeOn(this.live, lbn, count, dst, leaves);
  }

  blockStatus(lbn: number, count: number, maxExtents: number): Promise<Extent[]> {
    return this.blockStatusOn(this.live, lbn, count, maxExtents);
  }

  snapshotReader(name: string): TreeReader | undefined {
    const h = this.snapHandles.get(name);
    return h ? new PinnedReader(this, h) : undefined;
  }

  listSnapshots(): SnapshotInfo[] {
    return this.sb.snapshots.map((s) => ({ name: s.name, cpNumber: s.cp, createdMs: s.createdMs, usedBlocks: s.usedBlocks }));
  }

  stats(): TreeStats {
    return {
      volumeUuid: this.volumeUuid,
      sizeBytes: this.sizeBytes,
      cpNumber: this.sb.cpNumber,
      lastCpMs: this.sb.timestampMs,
      lastCpDurationMs: this.sb.lastCpDurationMs,
      ...(this.lastCommit ? { lastCp: { ...this.lastCommit, phases: { ...this.lastCommit.phases } } } : {}),
      cpPhaseTotalsMs: { ...this.phaseTotals },
      nodesEditedInPlace: this.writer.nodesEditedInPlace,
      usedBlocks: this.smap.used,
      totalBlocks: this.sb.deviceBlocks,
      snapshots: this.listSnapshots(),
      meta: { nvlogSeq: this.sb.nvlogSeq, nvlogEpoch: this.sb.nvlogEpoch },
      errors: { ...this.errorCounts },
      lineage: this.sb.lineage,
    };
  }

  /**
   * Starts a new generation (promote): the next CP is its first, and the lineage of
   * every CP from then on names the current one and the CP it forked at. Idempotent for
   * the generation already current.
   */
  startGeneration(id: string): void {
    if (this.sb.lineage[0]?.id === id) return;
    if (this.sb.lineage.some((g) => g.id === id)) throw new VolumeError('EINVAL', `generation ${id} is already in this volume's lineage`);
    this.pendingGeneration = id;
  }

  // ---------------------------------------------------------------- commit

  commitCp(changes: Iterable<BlockChange>, meta: CpMeta, snapshotOps: SnapshotOp[] = []): Promise<CommitResult> {
    if (this.closed) return Promise.reject(new VolumeError('ESHUTDOWN', 'block tree is closed'));
    if (this.failedReason !== null) return Promise.reject(new VolumeError('EIO', `block tree refuses commits after a failed one (${this.failedReason}); reopen the volume`));
    assert(this.commitRunning === null, 'commitCp called while another commit is running');
    const p = this.commitInner(changes, meta, snapshotOps);
    this.commitRunning = p;
    const done = (): void => {
      this.commitRunning = null;
    };
    p.then(done, done);
    return p;
  }

  private retiredIdle(): boolean {
    for (const h of this.retired) if (h.inflight === 0) this.retired.delete(h);
    return this.retired.size === 0;
  }

  private async commitInner(changesIn: Iterable<BlockChange>, meta: CpMeta, snapshotOps: SnapshotOp[]): Promise<CommitResult> {
    const t0 = this.clock.nowMs();
    const cp = this.sb.cpNumber + 1;
    for (const [k, v] of Object.entries(meta)) {
      if (!Number.isSafeInteger(v) || (v as number) < 0) throw new VolumeError('EINVAL', `CpMeta.${k} must be a non-negative safe integer, got ${String(v)}`);
    }
    // Collect and validate the changes (the last change to an lbn wins).
    const byLbn = new Map<number, BlockChange>();
    const slicer = slicerFor(this.clock);
    for (const c of changesIn) {
      if ((byLbn.size & 63) === 63) await slicer.maybeYield();
      if (!Number.isSafeInteger(c.lbn) || c.lbn < 0 || c.lbn >= this.lbnCount) throw new VolumeError('EINVAL', `change to lbn ${c.lbn} outside the volume [0, ${this.lbnCount})`);
      if (c.data !== null && c.data.length !== BLOCK) throw new VolumeError('EINVAL', `change to lbn ${c.lbn} has ${c.data.length} bytes, not ${BLOCK}`);
      byLbn.set(c.lbn, c);
      if (byLbn.size > MAX_CHANGES_PER_CP) throw new VolumeError('EINVAL', `a CP may change at most ${MAX_CHANGES_PER_CP} blocks`);
    }
    const snapPlan = planSnapshots(snapshotOps, this.sb.snapshots, cp);
    const lbns = [...byLbn.keys()].sort((a, b) => a - b);
    // Data blocks: all-zero blocks become holes; checksum the rest.
    const datas: (Buffer | null)[] = new Array<Buffer | null>(lbns.length);
    const dataCrcs: number[] = new Array<number>(lbns.length).fill(0);
    const origins: (BlockOrigin | undefined)[] = new Array<BlockOrigin | undefined>(lbns.length);
    const knownCrcs: (number | undefined)[] = new Array<number | undefined>(lbns.length);
    const earlyPbas: number[] = new Array<number>(lbns.length).fill(-1);
    let dataCount = 0;
    for (let i = 0; i < lbns.length; i++) {
      const ch = byLbn.get(lbns[i]!)!;
      datas[i] = ch.data;
      origins[i] = ch.origin;
      if (ch.early !== undefined && ch.data !== null) {
        if (!this.smap.isEarly(ch.early)) throw new VolumeError('EINVAL', `change to lbn ${ch.lbn} names pba ${ch.early}, which was not placed early`);
        earlyPbas[i] = ch.early;
      }
      if (ch.crc !== undefined && ch.data !== null) {
        if (!(Number.isInteger(ch.crc) && ch.crc >= 0 && ch.crc <= 0xffffffff)) throw new VolumeError('EINVAL', `change to lbn ${ch.lbn} has crc ${ch.crc}`);
        knownCrcs[i] = ch.crc;
      }
    }
    byLbn.clear();
    // Zero blocks become holes; crc32c of the rest (those not known already), one native
    // call per run of adjacent views.
    const scratch = crcScratch();
    for (let i = 0, sinceYield = 0; i < lbns.length; ) {
      const next = checksumRun(datas, i, dataCrcs, scratch, knownCrcs);
      sinceYield += next - i;
      i = next;
      // ~1-2 us a block: check the budget every 32 blocks or so.
      if (sinceYield >= 32) {
        sinceYield = 0;
        await slicer.maybeYield();
      }
    }
    for (let i = 0; i < lbns.length; i++) {
      if (datas[i] === null) origins[i] = undefined;
      else dataCount++;
    }
    // Which address blocks the CP touches (arithmetic), and their old pointers (reads upper levels only).
    const plan = await this.writer.planPaths(lbns, this.sb.root, slicer);
    let nodesMax = 0;
    for (const lvl of plan) nodesMax += lvl.index.length;
    // A snapshot delete needs the OR of the remaining snapshots' maps.
    let newSummary: Buffer | null = null;
    if (snapPlan.deleted.length > 0) newSummary = await this.summaryWithout(snapPlan.deleted);
    // Space: rotate the reserved generations once per CP number, then check room.
    // Releasing at the start of CP c makes the frees of CPs <= c-2 reusable: a sink's
    // oldest needed CP must be at least c-2, or the frees stay held.
    const needed0 = this.sink?.oldestNeededCp();
    if (this.heldThroughCp !== undefined && (needed0 === undefined || needed0 > this.heldThroughCp)) {
      // The peer no longer needs the CPs held since the open (holdCommitted).
      this.heldThroughCp = undefined;
      await this.writer.discard(this.smap.releaseHeld(), cp);
    }
    if (this.rotatedForCp !== cp) {
      this.rotatedForCp = cp;
      const holdOk = needed0 === undefined || needed0 >= cp - 2;
      await this.writer.discard(this.smap.beginCommit(this.retiredIdle() && holdOk), cp);
      await slicer.maybeYield();
    }
    const needed = dataCount + nodesMax + this.smap.treeBlocksMax;
    if (needed > this.smap.free && this.smap.reserved > 0) {
      // Space pressure: reuse blocks freed by the last CP now (it is durable) once no read is in flight on an old root.
      if (needed0 !== undefined && needed0 < cp - 1) {
        this.sink?.holdBroken(cp, `CP ${cp} needs ${needed} blocks, ${this.smap.free} free: reusing blocks held for CP ${needed0}`);
      }
      await Promise.all([...this.retired].map((h) => h.idle()));
      this.retiredIdle();
      await this.writer.discard(this.smap.beginCommit(true), cp);
      await this.writer.discard(this.smap.beginCommit(true), cp);
      if (needed > this.smap.free && this.smap.heldBlocks > 0) {
        this.sink?.holdBroken(cp, `CP ${cp} needs ${needed} blocks, ${this.smap.free} free: reusing the blocks held for CP ${this.heldThroughCp}`);
        this.heldThroughCp = undefined;
        await this.writer.discard(this.smap.releaseHeld(), cp);
      }
    }
    if (needed > this.smap.free) {
      throw new VolumeError('ENOSPC', `CP ${cp} needs up to ${needed} blocks but only ${this.smap.free} of ${this.sb.deviceBlocks} are free`);
    }
    // From here on the in-memory space map changes: a failure poisons the tree.
    try {
      return await this.commitMutating({ cp, t0, meta, lbns, datas, dataCrcs, origins, earlyPbas, dataCount, plan, nodesMax, newSummary, snapPlan, slicer });
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      this.failedReason = `CP ${cp}: ${msg}`;
      log().error({ cp, err: msg }, 'block tree: commit failed; further commits are refused until the volume is reopened');
      if (e instanceof VolumeError) throw e;
      // A full file system under a thin member is said as such to the clients (NBD ENOSPC), not as a media error.
      const full = errnoCode(e) === 'ENOSPC' || errnoCode(e) === 'EDQUOT';
      throw new VolumeError(full ? 'ENOSPC' : 'EIO', `commit of CP ${cp} failed: ${msg}`);
    }
  }

  private async commitMutating(c: CommitWork): Promise<CommitResult> {
    const { cp } = c;
    // Data, address and space-map blocks, pads, then sync (commit.ts).
    const prepareMs = Math.max(0, this.clock.nowMs() - c.t0);
    const { newRoot, blocksWritten, blocksFreed, earlyBlocks, phases: written } = await this.writer.writeCp(c, this.sb.root, () => this.clock.nowMs());
    // The new superblock, into the next ring slot, then sync: the CP is durable.
    const nowMs = Math.max(0, Math.floor(this.clock.nowMs()));
    const durationMs = Math.max(0, Math.round(nowMs - c.t0));
    const snapshots: SnapshotRecord[] = this.sb.snapshots.filter((s) => !c.snapPlan.deleted.includes(s.name));
    if (c.snapPlan.created.length > 0) {
      const referenced = popcount(this.smap.active);
      for (const name of c.snapPlan.created) snapshots.push({ name, cp, createdMs: nowMs, usedBlocks: referenced, root: newRoot, smapRoot: this.smap.root });
    }
    const generation = this.pendingGeneration;
    const lineage: readonly Generation[] = generation !== undefined ? startGeneration(this.sb.lineage, cp - 1, generation) : this.sb.lineage;
    const sb: Superblock = {
      ...this.sb, cpNumber: cp, timestampMs: nowMs, lastCpDurationMs: durationMs, nvlogSeq: c.meta.nvlogSeq, nvlogEpoch: c.meta.nvlogEpoch,
      root: newRoot, smapRoot: this.smap.root, usedBlocks: this.smap.used, snapshots, lineage,
    };
    const sbBlock = encodeSuperblock(sb);
    const sbStart = this.clock.nowMs();
    await this.dev.writeBlocks(cp % RING_SLOTS, sbBlock);
    await this.dev.sync();
    const superblockMs = Math.max(0, this.clock.nowMs() - sbStart);
    // Durable: switch the in-memory state.
    this.sb = sb;
    if (this.pendingGeneration === generation) this.pendingGeneration = undefined;
    this.live.retired = true;
    this.retired.add(this.live);
    this.live = new RootHandle(cp, newRoot, 'live');
    for (const name of c.snapPlan.deleted) {
      const h = this.snapHandles.get(name);
      assert(h !== undefined, `deleted snapshot ${name} has no handle`);
      h.retired = true;
      this.retired.add(h);
      this.snapHandles.delete(name);
    }
    if (c.snapPlan.created.length > 0) this.smap.addActiveToSummary();
    for (const name of c.snapPlan.created) this.snapHandles.set(name, new RootHandle(cp, newRoot, `snapshot ${name}`));
    // The CP hook last: the next CP starts only after a mirror has taken this one.
    const sinkStart = this.clock.nowMs();
    if (this.sink) await this.sink.committed(cp, cp % RING_SLOTS, sbBlock, c.meta);
    const phases: CpPhases = { prepareMs, ...written, superblockMs, sinkMs: this.sink ? Math.max(0, this.clock.nowMs() - sinkStart) : 0 };
    this.lastCommit = { cpNumber: cp, durationMs, blocksWritten, blocksFreed, dataBlocks: c.dataCount, earlyBlocks, phases };
    for (const k of Object.keys(phases) as (keyof CpPhases)[]) this.phaseTotals[k] += phases[k];
    return this.lastCommit;
  }

  /**
   * Keeps the blocks of an older committed CP (in the superblock ring, or given as the
   * copy of its superblock a mirror kept) from being reused, as if it were a kept snapshot until the CP sink's oldestNeededCp() moves
   * past it: a mirror whose destination holds that CP resumes after a restart without a
   * new baseline. Returns null, or why the CP cannot be held (then it is not).
   */
  async holdCommitted(cp: number, superblock?: Buffer): Promise<string | null> {
    if (cp === this.sb.cpNumber) return null;
    if (cp > this.sb.cpNumber || cp < 0) return `CP ${cp} is not an older CP of this volume (it is at CP ${this.sb.cpNumber})`;
    const raw = Buffer.alloc(BLOCK);
    await this.verified.devRead(cp % RING_SLOTS, 1, raw, `superblock slot ${cp % RING_SLOTS}`);
    let old = decodeSuperblock(raw);
    if (typeof old !== 'string' && (old.cpNumber !== cp || old.volumeUuid !== this.volumeUuid) && superblock) {
      // Out of the ring: the copy the caller kept (its blocks were held since, so they are
      // intact; the space map below is read with its checksums, so a copy that lies fails).
      old = decodeSuperblock(superblock);
      if (typeof old === 'string') return `the kept superblock of CP ${cp}: ${old}`;
    }
    if (typeof old === 'string') return `superblock slot of CP ${cp}: ${old}`;
    if (old.cpNumber !== cp || old.volumeUuid !== this.volumeUuid) return `CP ${cp} is no longer in the superblock ring (slot holds CP ${old.cpNumber})`;
    if (old.deviceBlocks !== this.sb.deviceBlocks) return `CP ${cp}: its superblock describes another device size`;
    const map = Buffer.alloc(this.smap.active.length);
    try {
      for (const r of [old.smapRoot, ...old.snapshots.map((s) => s.smapRoot)]) await this.smap.loadTree(r, this.verified.smapLoader('held CP'), map, false);
    } catch (e) {
      return `space map of CP ${cp}: ${e instanceof Error ? e.message : String(e)}`;
    }
    const n = this.smap.reserveHeld(map);
    // Released once the sink's oldest needed CP is past every held CP (not by the reserved
    // generations' rotation: these blocks were freed by CPs after `cp`, before the open).
    this.heldThroughCp = Math.max(this.heldThroughCp ?? -1, cp);
    log().info({ cp, blocks: n }, 'block tree: holding the blocks of an older CP for a mirror');
    return null;
  }

  /** OR of the space maps of every kept snapshot not in `without` (reads them). */
  private async summaryWithout(without: string[]): Promise<Buffer> {
    const out = Buffer.alloc(this.smap.summary.length);
    const loader = this.verified.smapLoader('snapshot');
    for (const s of this.sb.snapshots) if (!without.includes(s.name)) await this.smap.loadTree(s.smapRoot, loader, out, false);
    return out;
  }

  // ---------------------------------------------------------------- seams for a mirror

  readRaw(pba: number, count: number, dst: Buffer): Promise<void> {
    if (!(pba >= 0 && count >= 1 && pba + count <= this.sb.deviceBlocks && dst.length === count * BLOCK)) assert(false, `readRaw [${pba}, +${count})`);
    return this.dev.readBlocks(pba, count, dst);
  }

  setCpSink(sink: CpSink | undefined): void {
    this.sink = sink;
  }

  setRepairSource(src: RepairSource | undefined): void {
    this.verified.repairSource = src;
  }

  /**
   * Pins the committed state (live root and every snapshot) the way an in-flight read
   * does: none of its blocks is reused until release(). For sending it elsewhere.
   */
  pinCommitted(): CommittedView {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'block tree is closed');
    const handles = [this.live, ...this.snapHandles.values()];
    for (const h of handles) h.enter();
    this.pins.add(handles);
    let released = false;
    const sb = this.sb;
    return {
      cpNumber: sb.cpNumber,
      slot: sb.cpNumber % RING_SLOTS,
      superblock: encodeSuperblock(sb),
      deviceBlocks: sb.deviceBlocks,
      readRaw: (pba, count, dst) => {
        if (released) return Promise.reject(new VolumeError('ESHUTDOWN', 'committed view released'));
        if (!(pba >= 0 && count >= 1 && pba + count <= sb.deviceBlocks && dst.length === count * BLOCK)) assert(false, `readRaw [${pba}, +${count})`);
        return this.dev.readBlocks(pba, count, dst);
      },
      readRawCrc: async (pba, count, dst, crcs) => {
        if (released) throw new VolumeError('ESHUTDOWN', 'committed view released');
        if (!(pba >= 0 && count >= 1 && pba + count <= sb.deviceBlocks && dst.length === count * BLOCK && crcs.length >= count * 4)) assert(false, `readRawCrc [${pba}, +${count})`);
        if (this.dev.readBlocksCrc) return this.dev.readBlocksCrc(pba, count, dst, crcs);
        await this.dev.readBlocks(pba, count, dst);
        crc32cBlocks(dst, 0, count, crcs);
      },
      release: () => {
        if (released) return;
        released = true;
        this.pins.delete(handles);
        for (const h of handles) h.exit();
      },
    };
  }

  // ---------------------------------------------------------------- check / close

  /** Blocks in use by the live state or any snapshot (a copy of active | summary). */
  usedBitmap(): Buffer {
    const b = Buffer.from(this.smap.active);
    const s = this.smap.summary;
    for (let i = 0; i < b.length; i++) b[i] = b[i]! | s[i]!;
    return b;
  }

  /** @param dev read through this device instead (a wrapper over the tree's own, e.g. scrub's recording one) */
  async check(onBlocksRead?: (blocks: number) => void, dev?: BlockDevice): Promise<CheckReport> {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'block tree is closed');
    while (this.commitRunning) await this.commitRunning.catch(() => undefined);
    const handles = [this.live, ...this.snapHandles.values()];
    for (const h of handles) h.enter();
    try {
      return await runCheck({
        dev: dev ?? this.dev,
        sb: this.sb,
        uuid: this.uuidBytes,
        active: Buffer.from(this.smap.active),
        summary: Buffer.from(this.smap.summary),
        used: this.smap.used,
        counterProblems: this.smap.verifyCounters(),
        ioConcurrency: this.ioConcurrency,
        clock: this.clock,
        ...(onBlocksRead ? { onBlocksRead } : {}),
        ...(this.verified.repairSource && !dev
          ? { repair: { source: this.verified.repairSource, mayHeal: this.verified.mayHeal, volumeUuid: this.volumeUuid, onRepaired: () => this.errorCounts.repaired++ } }
          : {}),
      });
    } finally {
      for (const h of handles) h.exit();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.commitRunning) await this.commitRunning.catch(() => undefined);
    this.cache.clear();
    this.writer.releaseChunkBufs();
  }

  /** @internal For tests: cache and space figures. */
  debugInfo(): { cacheSize: number; cacheHits: number; cacheMisses: number; freeBlocks: number; reservedBlocks: number } {
    return { cacheSize: this.cache.size, cacheHits: this.cache.hits, cacheMisses: this.cache.misses, freeBlocks: this.smap.free, reservedBlocks: this.smap.reserved };
  }

  /** @internal Pointer string for an lbn in the live tree (tests and diagnostics). */
  async locate(lbn: number): Promise<{ data: BlockPtr | null; path: BlockPtr[] }> {
    this.checkRange(lbn, 1);
    const path: BlockPtr[] = [];
    let ptr = this.live.root;
    for (let level = this.height - 1; level >= 0 && ptr !== null; level--) {
      path.push(ptr);
      const index = Math.floor(lbn / slotsPerPointer(level + 1));
      const node = await this.verified.readNode(ptr, level, index);
      ptr = this.verified.childOf(node, ptr, level, index, Math.floor(lbn / slotsPerPointer(level)) % FANOUT);
    }
    return { data: ptr, path };
  }
}

export { ptrString };
