/**
 * EngineVolume: the NVRAM-log + consistency-point + copy-on-write-tree volume.
 *
 *   write/trim/zero -> a record in the active NVRAM half (acknowledged once copied into
 *                      the region: survives a process crash) -> the log's block index
 *   flush / FUA     -> group-committed persist of the covering records
 *   read            -> newest of: active half index, frozen half index, tree
 *   CP              -> a full or timed-out half is drained into the tree (src/cp)
 *
 * Invariants:
 * - Every record covers whole 4 KiB blocks: a write covering part of a block merges
 *   with the block's newest contents first (read-modify-write under BlockLocks, after
 *   every append queued before it has been written), and logs the whole block.
 * - Reads resolve each block against the log index synchronously, and only blocks not
 *   in any half go to the tree, so a read never returns data older than a write that
 *   completed before it began.
 * - A write resolves only after its last record is appended and indexed; with FUA
 *   only after the log says that record is durable. flush() waits for every record
 *   appended before it: one log shared by all connections, so canMultiConn holds.
 * - Memory: the log index is bounded by the NVRAM size; reads and status work in
 *   bounded chunks; writers beyond the NVRAM wait in the log's bounded queue.
 * - After close() resolves, everything acknowledged is in the tree (final CP).
 * - The NBD threads may append plain whole-block WRITEs themselves (directAppender: the
 *   log's native appender) and answer them; never while a block is locked (a partial
 *   write's read-modify-write), while a replica gates replies (a sync mirror) or while
 *   closing; the log takes their records in before any read, flush or CP looks at it.
 */
import type { BlockTreeApi, CommitResult, LeafSink, SnapshotInfo, SnapshotOp, TreeReader, TreeStats } from '../tree/types';
import { BLOCK_SIZE_BYTES, systemClock, type Clock, type NvramRegion, type Random } from '../io/types';
import { NvLog, type NvLogStats, type ReplaySummary } from '../nvlog/log';
import { RecordType, RECORD_FLAG_FUA } from '../nvlog/format';
import { commitHalf } from '../cp/commit-half';
import { CpRunner, CP_INTERVAL_MS_DEFAULT, type CpStats } from '../cp/runner';
import { EarlyPlacer, type EarlyPlacerOptions, type EarlyStats } from '../cp/early-place';
import { assert } from '../util/assert';
import { formatSize } from '../util/size';
import { log as logger } from '../util/log';
import { clipExtents } from './extents';
import { VolumeError } from '../util/errors';
import { EXTENT_HOLE, EXTENT_ZERO, type Extent, type Volume, type VolumeCapabilities, type ZeroOptions } from './types';
import { BlockLocks } from './engine-locks';
import type { VolumeSession } from './sessions';
import { EngineReadMap } from './engine-read-map';
import { FANOUT, MAX_SNAPSHOTS, snapshotNameProblem } from '../tree/layout';

const BS = BLOCK_SIZE_BYTES;
export const ENGINE_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** Blocks resolved per read step (bounds the tree reads in flight per request). */
const READ_CHUNK_BLOCKS = 256;
/** Level-0 address blocks the block map reads ahead of sequential READs (32 map 21 MiB). */
const MAP_AHEAD_LEAVES = 32;
/** Blocks examined per blockStatus call (a short answer is allowed). */
const STATUS_WINDOW_BLOCKS = 65536;
/** Bytes a CACHE request reads ahead (the rest of the hint is ignored). */
const CACHE_BYTES_MAX = 32 * 1024 * 1024;
export const SNAPSHOTS_MAX = MAX_SNAPSHOTS;

/**
 * Reads one byte of every page of the NVRAM mapping, so that the first append to a page
 * is not a major fault (a file-backed region may have been evicted; real NVRAM is
 * always resident). Bounded by the region size; runs once at open.
 */
function prefault(buf: Buffer): number {
  let sum = 0;
  for (let at = 0; at < buf.length; at += 4096) sum += buf[at]!;
  return sum;
}

/**
 * Reads sorted lbns from a tree view into `out` (which holds [offset, offset+length)):
 * consecutive lbns in one readRange, straight into `out` where whole blocks fit.
 */
export async function readFromTree(tree: TreeReader, lbns: readonly number[], offset: number, length: number, out: Buffer, leaves?: LeafSink): Promise<void> {
  const reads: Promise<void>[] = [];
  let i = 0;
  while (i < lbns.length) {
    let j = i + 1;
    while (j < lbns.length && lbns[j] === lbns[j - 1]! + 1) j++;
    const first = lbns[i]!;
    const count = j - i;
    const from = first * BS;
    const to = (first + count) * BS;
    if (from >= offset && to <= offset + length) {
      reads.push(tree.readRange(first, count, out.subarray(from - offset, to - offset), leaves));
    } else {
      const tmp = Buffer.allocUnsafe(count * BS);
      reads.push(tree.readRange(first, count, tmp, leaves).then(() => {
        for (let k = 0; k < count; k++) placeBlock(first + k, tmp.subarray(k * BS, (k + 1) * BS), offset, length, out);
      }));
    }
    i = j;
  }
  await Promise.all(reads);
}

/**
 * Reads [offset, offset+length) of a tree view (a snapshot, a mirror's CP) into `out`, in
 * steps of READ_CHUNK_BLOCKS blocks (bounds the tree reads in flight per request).
 */
export async function readTreeRange(tree: TreeReader, offset: number, length: number, out: Buffer): Promise<void> {
  const endLbn = Math.ceil((offset + length) / BS);
  for (let lbn = Math.floor(offset / BS); lbn < endLbn; lbn += READ_CHUNK_BLOCKS) {
    const lbns: number[] = [];
    for (let l = lbn; l < Math.min(endLbn, lbn + READ_CHUNK_BLOCKS); l++) lbns.push(l);
    await readFromTree(tree, lbns, offset, length, out);
  }
}

/** Copies the part of block `lbn` that overlaps [offset, offset+length) into out. src null = zeroes. */
export function placeBlock(lbn: number, src: Buffer | null, offset: number, length: number, out: Buffer): void {
  const blockStart = lbn * BS;
  const from = Math.max(offset, blockStart);
  const to = Math.min(offset + length, blockStart + BS);
  assert(to > from, 'block outside the range');
  const dstAt = from - offset;
  if (src === null) out.fill(0, dstAt, dstAt + (to - from));
  else src.copy(out, dstAt, from - blockStart, to - blockStart);
}

/**
 * A replica that must hold each record before the client hears back (a sync mirror). The
 * log's append hook feeds it; the engine awaits it on every write's reply path.
 */
export interface ReplicaGate {
  /** Resolves once records <= seq are held by the replica (durably there if `durable`); rejects with a VolumeError to fail the request. */
  wait(seq: number, durable: boolean): Promise<void>;
  /**
   * The gate also tells the NBD threads' held replies (replicaProgress) what wait() would
   * decide, so the threads may append plain WRITEs under it. Without it they stop appending.
   */
  readonly threadReplies?: boolean;
}

/**
 * What a ReplicaGate with threadReplies says for the replies the NBD threads hold: the
 * replica holds every record <= this seq; or it is not streaming and the policy lets
 * writes through ('open'), or fails them ('fail': EIO, and the threads append no more
 * until the next progress, so every later WRITE takes wait()).
 */
export type ReplicaProgress = number | 'open' | 'fail';

export interface EngineOptions {
  tree: BlockTreeApi;
  region: NvramRegion;
  readOnly: boolean;
  clock?: Clock;
  random?: Random;
  /** CP timer period (default 10 s; 0 disables the timer). */
  cpIntervalMs?: number;
  description?: string;
  /**
   * Read-write open of a log damaged mid-log (see ScanResult.damage): commit the records
   * that replay and drop the rest (the operator salvaged what they need). Default false.
   */
  acceptNvramLoss?: boolean;
  /**
   * The tree's one member file (its fd; pba * 4096 is the offset) and the device's blocks:
   * the NBD threads then answer READs of blocks the log does not hold from a map of the
   * live tree (engine-read-map.ts). Absent for RAID volumes and views.
   */
  directRead?: { fd: number; deviceBlocks: number };
  /** Early data placement where the tree offers it (default on: EarlyPlacer's thresholds); false: off. Tests set small thresholds. */
  earlyPlacement?: false | EarlyPlacerOptions | undefined;
}

export interface EngineStats {
  sizeBytes: number;
  readOnly: boolean;
  tree: TreeStats;
  nvlog: NvLogStats;
  cp: CpStats;
  replay: ReplaySummary;
  /** READs the NBD threads answered from the block map (hits) or passed on (misses), if the volume has one. */
  threadReads?: { hits: number; misses: number; poolReads: number };
  /** WRITEs the NBD threads appended to the NVRAM log themselves, if they ever did. */
  threadWrites?: number;
  /** Early data placement this session (absent when off). */
  early?: EarlyStats;
  /** Of those, records stored with pwrite (within a few ms of a FLUSH round) instead of through the mapping. */
  threadFileStores?: number;
  /** FLUSHes the NBD threads made durable themselves (fdatasync of the NVRAM file). */
  threadFlushes?: number;
}

/** Who serves the volume, as `status` shows it (set by `serve`). */
export interface ServedBy {
  uris: string[];
  exports: string[];
  /** Open NBD connections (handshake and transmission). */
  clients: number;
}

export class EngineVolume implements Volume {
  readonly sizeBytes: number;
  readonly caps: VolumeCapabilities;
  readonly description: string;
  readonly tree: BlockTreeApi;
  readonly region: NvramRegion;
  readonly log: NvLog;
  private readonly cp: CpRunner | undefined;
  /** Early data placement (src/cp/early-place.ts); undefined read-only, on RAID, or when turned off. */
  readonly placer: EarlyPlacer | undefined;
  private readonly locks = new BlockLocks();
  private readonly pendingSnapshotNames = new Set<string>();
  private closed = false;
  private closing: Promise<void> | undefined;
  private replica: ReplicaGate | undefined;
  /** The replica gate lets the NBD threads append, holding their replies (replicaProgress). */
  private replicaThreads = false;
  private readonly readMap: EngineReadMap | undefined;
  /** The block map's read-ahead in flight (one at a time), and where the last READ through TypeScript ended. */
  private mapAhead: Promise<void> | undefined;
  private readEndLbn = -1;
  /** Extra sections for `status` (e.g. "mirror"), each a function returning plain data. */
  readonly statusSections = new Map<string, () => unknown>();
  /** Control-socket operations added by what runs beside the engine (e.g. a mirror's "verify"). */
  readonly controlActions = new Map<string, () => Promise<Record<string, unknown>>>();
  /** Set by the process serving the volume over NBD: its URIs, exports and clients for `status`. */
  servedBy: (() => ServedBy) | undefined = undefined;
  /** This read-write session as the volume directory records it (sessions.ts); undefined read-only or outside a directory. */
  session: VolumeSession | undefined = undefined;

  private constructor(opts: EngineOptions, log: NvLog) {
    this.tree = opts.tree;
    this.region = opts.region;
    this.log = log;
    this.sizeBytes = opts.tree.sizeBytes;
    assert(this.sizeBytes % BS === 0, 'volume size must be whole blocks');
    this.description = opts.description ?? `nvmirror volume ${opts.tree.volumeUuid} (${formatSize(this.sizeBytes)})`;
    const ro = opts.readOnly;
    this.caps = {
      readOnly: ro,
      canFlush: true,
      canFua: true,
      canTrim: !ro,
      canZero: !ro,
      canFastZero: !ro,
      canCache: true,
      canMultiConn: true,
      rotational: false,
      minBlockSizeBytes: 1,
      preferredBlockSizeBytes: BS,
      maxPayloadBytes: ENGINE_MAX_PAYLOAD_BYTES,
    };
    if (!ro) {
      // Large writes' data goes to the member while the half fills (NVMIRROR_EARLY_PLACEMENT=0: at the CP, as before).
      const early = opts.tree.early;
      const on = opts.earlyPlacement !== false && process.env.NVMIRROR_EARLY_PLACEMENT !== '0';
      // NVMIRROR_EARLY_MIN_BLOCKS: the shortest record placed (tests drive small writes through it).
      const envMin = Number(process.env.NVMIRROR_EARLY_MIN_BLOCKS);
      const placerOpts = opts.earlyPlacement || (Number.isSafeInteger(envMin) && envMin >= 1 ? { minBlocks: envMin } : {});
      const placer = early && on ? new EarlyPlacer(log, early, log.stats().halfSizeBytes, placerOpts) : undefined;
      this.placer = placer;
      if (placer) log.onWriteIndexed = (half, lbn, count, at) => placer.offer(half, lbn, count, at);
      this.cp = new CpRunner({ log, tree: opts.tree, clock: opts.clock ?? systemClock, cpIntervalMs: opts.cpIntervalMs ?? CP_INTERVAL_MS_DEFAULT, placer });
    }
    if (opts.directRead && process.env.NVMIRROR_ENGINE_READ_MAP !== '0') {
      const map = EngineReadMap.create(opts.directRead.fd, this.sizeBytes, opts.directRead.deviceBlocks);
      this.readMap = map;
      log.onBlocksChanged = (lbn, count) => map.changed(lbn, count);
    }
  }

  /**
   * The NVRAM log's appender for the NBD threads (Volume.directAppender): they append plain
   * whole-block WRITEs themselves and answer them (nvlog/native-append.ts). Made on the
   * first ask; none for a read-only volume, while closing, or with NVMIRROR_ENGINE_NATIVE_APPEND=0.
   */
  directAppender(): object | undefined {
    if (this.closed || this.closing || this.caps.readOnly || this.log.failed || process.env.NVMIRROR_ENGINE_NATIVE_APPEND === '0') return undefined;
    return (this.log.nativeAppender ?? this.log.enableNativeAppends(this.sizeBytes, this.readMap?.handle)).handle;
  }

  /** The threads answered WRITEs they appended: the log takes their records in now. */
  directWritesDone(): void {
    if (!this.closed) this.log.syncNative();
  }

  /**
   * A thread's fdatasync of the NVRAM file failed (it answered that FLUSH with EIO): the log
   * fails as it does when its own msync fails (every later write, flush and CP gets EIO; a
   * failed sync is never retried: what the kernel dropped may be gone).
   */
  directFlushFailed(errno: number): void {
    const e = new VolumeError('EIO', `NVRAM persist failed: fdatasync of the NVRAM file on an NBD thread: errno ${errno}`);
    logger().error({ errno }, e.message);
    this.log.fail(e);
  }

  /** The map the NBD threads answer READs from (Volume.directReadMap), if the tree has one member file. */
  directReadMap(): object | undefined {
    return this.closed ? undefined : this.readMap?.handle;
  }

  /**
   * Opens an engine over a tree (already opened at its newest valid root) and its NVRAM
   * region: replays the NVRAM records newer than the tree's watermark. Read-write: the
   * replayed records are committed in CPs, then a new log epoch starts. Read-only: they
   * stay an in-memory overlay and nothing is written.
   */
  static async open(opts: EngineOptions): Promise<EngineVolume> {
    const committed = opts.tree.stats().meta;
    const log = NvLog.open(opts.region, {
      volumeUuid: opts.tree.volumeUuid,
      committed,
      readOnly: opts.readOnly,
      ...(opts.random ? { random: opts.random } : {}),
    });
    const replay = log.replaySummary;
    if (replay.records > 0 || replay.orphanedRecords > 0) {
      logger().info({ records: replay.records, firstSeq: replay.firstSeq, lastSeq: replay.lastSeq, orphaned: replay.orphanedRecords }, 'NVRAM replay');
    }
    if (replay.damage) {
      const d = replay.damage;
      const msg =
        `NVRAM log damaged mid-log: records seq ${d.firstLostSeq}..${d.lastLostSeq} cannot be replayed (seq ${d.firstLostSeq} does not verify, ` +
        `${d.validRecordsAfter} valid record(s) follow it, and records up to seq ${d.lastDurableLostSeq} were durable): replay stops at seq ${d.firstLostSeq - 1}`;
      if (!opts.readOnly && opts.acceptNvramLoss !== true) {
        throw new VolumeError('EIO', `${msg}; refusing to open read-write (serve it --read-only to salvage; nvmirror check; then nvmirror repair --accept-nvram-loss)`);
      }
      const what = opts.readOnly ? 'opened read-only to salvage: writes in that range are missing' : 'accepting the loss as asked: those records are dropped for good';
      logger().error({ firstLostSeq: d.firstLostSeq, lastLostSeq: d.lastLostSeq, lastDurableLostSeq: d.lastDurableLostSeq }, `${msg}; ${what}`);
    } else if (replay.unflushedGap) {
      const g = replay.unflushedGap;
      logger().warn({ firstLostSeq: g.firstLostSeq, lastLostSeq: g.lastLostSeq },
        `NVRAM log: records seq ${g.firstLostSeq}..${g.lastLostSeq} after a torn record are dropped (none of them was flushed; a power loss may leave such a tail)`);
    }
    const rb = opts.tree.rollback;
    if (rb) {
      // The tree mounted an older CP than the newest durable one. Acknowledged writes up to
      // the newest CP's watermark survive only if the replay chain reaches it.
      const reached = replay.records > 0 ? replay.lastSeq : committed.nvlogSeq;
      if (reached < rb.newestMeta.nvlogSeq) {
        const msg =
          `the newest committed CP ${rb.newestCp} does not verify (${rb.reasons.join('; ')}), and the NVRAM log no longer ` +
          `holds its writes (replay reaches seq ${reached}, CP ${rb.newestCp} had committed up to seq ${rb.newestMeta.nvlogSeq}): ` +
          `opening CP ${rb.mountedCp} would silently lose acknowledged writes`;
        if (!opts.readOnly) throw new VolumeError('EIO', `${msg}; refusing to open read-write (serve it --read-only to salvage; run nvmirror check)`);
        logger().error({ mountedCp: rb.mountedCp, newestCp: rb.newestCp }, `${msg}; serving read-only as asked`);
      } else {
        logger().warn({ mountedCp: rb.mountedCp, newestCp: rb.newestCp }, 'newest CP did not verify; its writes are replayed from the NVRAM log');
      }
    }
    if (!opts.readOnly) {
      const epoch = log.nextEpoch;
      for (const half of log.recoveryHalves()) {
        await commitHalf(log, opts.tree, half, { nvlogSeq: half.lastSeq, nvlogEpoch: epoch });
      }
      await log.beginEpoch();
      prefault(opts.region.buffer);
    }
    return new EngineVolume(opts, log);
  }

  /** Installs (or removes) the replica gate; every later reply waits for it. */
  setReplicaGate(gate: ReplicaGate | undefined): void {
    this.replica = gate;
    // A replica must hold each record before its reply: the threads append only if they
    // hold their replies for it (NVMIRROR_SYNC_THREAD_REPLIES=0: they never do), else only
    // this path waits for that.
    this.replicaThreads = gate?.threadReplies === true && process.env.NVMIRROR_SYNC_THREAD_REPLIES !== '0';
    this.log.setNativeBlocked('replica', gate !== undefined && !this.replicaThreads);
    this.log.setNativeGate(this.replicaThreads);
    // A FLUSH must wait for the replica's durable ack too: the threads ask for it through
    // a sync mirror's native link when it forwards their records (nv_append.h), and hand
    // the FLUSH to this side otherwise (a TLS link, no link, the link cannot tell in time).
    this.log.setNativeFlushAllowed(gate === undefined || this.replicaThreads);
    if (!this.replicaThreads) this.log.setNativeBlocked('replica-down', false);
  }

  /** The replica's progress for the NBD threads' held replies (a gate with threadReplies; else ignored). */
  replicaProgress(p: ReplicaProgress): void {
    if (!this.replicaThreads || this.closed) return;
    if (p === 'fail') {
      // Stop the threads first (their records come in), then fail everything they hold.
      this.log.setNativeBlocked('replica-down', true);
      this.log.failNativeHeld();
      return;
    }
    this.log.setNativeGate(p !== 'open');
    if (typeof p === 'number') this.log.releaseNative(p);
    this.log.setNativeBlocked('replica-down', false);
  }

  /** The reply path of a mutation that ended with record `seq`: local durability (FUA) and the replica. */
  private settle(seq: number, fua: boolean): Promise<unknown> {
    const replica = this.replica;
    if (!replica) return fua ? this.log.waitDurable(seq) : Promise.resolve();
    return fua ? Promise.all([this.log.waitDurable(seq), replica.wait(seq, true)]) : replica.wait(seq, false);
  }

  private checkOpen(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'volume is closed');
  }

  private checkRange(offset: number, length: number): void {
    assert(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0, `bad range ${offset}+${length}`);
    assert(offset + length <= this.sizeBytes, `range ${offset}+${length} beyond volume of ${this.sizeBytes}`);
  }

  private checkWritable(): void {
    this.checkOpen();
    assert(!this.caps.readOnly, 'write to a read-only engine volume');
  }

  // ---- reads ----

  async read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    this.checkOpen();
    this.checkRange(offset, length);
    assert(dst === undefined || dst.length === length, 'read: dst must be exactly length bytes');
    const out = dst ?? Buffer.allocUnsafe(length);
    if (length === 0) return out;
    const endLbn = Math.ceil((offset + length) / BS);
    let lbn = Math.floor(offset / BS);
    // The level-0 address blocks walked, for the threads' map (only what the live root holds now).
    const map = this.readMap;
    const token = map?.token(this.tree.cpNumber);
    let leaves: Map<number, Buffer> | undefined;
    const sink = map ? (base: number, node: Buffer): void => void (leaves ??= new Map()).set(base, node) : undefined;
    while (lbn < endLbn) {
      const chunkEnd = Math.min(endLbn, lbn + READ_CHUNK_BLOCKS);
      const resolve = this.log.resolver(lbn, chunkEnd);
      const fromTree: number[] = [];
      for (let l = lbn; l < chunkEnd; l++) {
        const hit = resolve(l);
        if (hit === undefined) fromTree.push(l);
        else placeBlock(l, hit.kind === 'zero' ? null : this.log.blockView(hit.regionOffset), offset, length, out);
      }
      if (fromTree.length > 0) await readFromTree(this.tree, fromTree, offset, length, out, sink);
      lbn = chunkEnd;
    }
    if (map && token && leaves) map.fill(token, this.tree.cpNumber, leaves, this.inLog);
    if (map) {
      // A READ where the last one ended: map the blocks after it before their READs come.
      const first = Math.floor(offset / BS);
      if (Math.abs(first - this.readEndLbn) <= READ_CHUNK_BLOCKS && this.mapAhead === undefined) {
        this.mapAhead = this.readMapAhead(map, endLbn).finally(() => (this.mapAhead = undefined));
      }
      this.readEndLbn = endLbn;
    }
    return out;
  }

  /** Which lbns of [from, to) the log holds (their tree pointers are older). */
  private readonly inLog = (from: number, to: number): ((lbn: number) => boolean) => {
    const r = this.log.resolver(from, to);
    return (l) => r(l) !== undefined;
  };

  /** Puts the MAP_AHEAD_LEAVES leaves from lbn `from` into the block map (nothing if anything changed meanwhile). */
  private async readMapAhead(map: EngineReadMap, from: number): Promise<void> {
    const lbns = this.sizeBytes / BS;
    if (from >= lbns || this.closed) return;
    const token = map.token(this.tree.cpNumber);
    const leaves = new Map<number, Buffer>();
    const count = Math.min(lbns - from, MAP_AHEAD_LEAVES * FANOUT);
    try {
      await this.tree.readLeaves(from, count, (base, node) => void leaves.set(base, node), 2 * MAP_AHEAD_LEAVES);
    } catch {
      return; // a bad address block is the READ path's to report, when a READ reaches it
    }
    map.fill(token, this.tree.cpNumber, leaves, this.inLog);
  }

  /** A private copy of the newest contents of one block. */
  private async newestBlock(lbn: number): Promise<Buffer> {
    const hit = this.log.resolver(lbn, lbn + 1)(lbn);
    const out = Buffer.alloc(BS);
    if (hit?.kind === 'data') this.log.copyBlock(hit.regionOffset, out, 0);
    else if (hit === undefined) {
      const b = await this.tree.readBlock(lbn);
      if (b) b.copy(out);
    }
    return out;
  }

  // ---- writes ----

  /** Appends whole blocks at a block-aligned offset, split into records; returns the last seq. */
  private async appendBlocks(offsetBytes: number, segments: Buffer[], flags: number): Promise<number> {
    const max = this.log.recordPayloadMaxBytes;
    let recOffset = offsetBytes;
    let parts: Buffer[] = [];
    let partBytes = 0;
    let seq = -1;
    for (const seg of segments) {
      assert(seg.length % BS === 0, 'segment not whole blocks');
      let at = 0;
      while (at < seg.length) {
        const take = Math.min(seg.length - at, max - partBytes);
        parts.push(at === 0 && take === seg.length ? seg : seg.subarray(at, at + take));
        partBytes += take;
        at += take;
        if (partBytes === max) {
          seq = await this.log.appendWrite(recOffset, parts, flags);
          recOffset += partBytes;
          parts = [];
          partBytes = 0;
        }
      }
    }
    if (partBytes > 0) seq = await this.log.appendWrite(recOffset, parts, flags);
    assert(seq > 0, 'appendBlocks wrote nothing');
    return seq;
  }

  /**
   * Applies a write (data) or a zeroing (data undefined) of [offset, offset+length).
   * Returns the seq of the last record appended.
   */
  private async mutate(offset: number, length: number, data: Buffer | undefined, type: RecordType, flags: number): Promise<number> {
    const end = offset + length;
    const startLbn = Math.floor(offset / BS);
    const endLbn = Math.ceil(end / BS);
    const partial: number[] = [];
    if (offset % BS !== 0 || end < (startLbn + 1) * BS) partial.push(startLbn);
    if (end % BS !== 0 && endLbn - 1 !== startLbn) partial.push(endLbn - 1);
    const locked = this.locks.lockedIn(startLbn, endLbn);
    if (partial.length === 0 && locked.length === 0) return this.emit(offset, length, data, type, flags, partial);
    const handle = this.locks.acquire([...partial, ...locked]);
    // While a block is locked (read-modify-write of a partial block), the threads append
    // nothing (a whole-block write of theirs could land between the read and the append).
    this.log.setNativeBlocked('locks', true);
    try {
      await handle.ready;
      this.checkOpen();
      // A queued append (waiting for NVRAM space) may cover a partial block: let it land first.
      if (partial.length > 0) await this.log.queueBarrier();
      return await this.emit(offset, length, data, type, flags, partial);
    } finally {
      handle.release();
      if (this.locks.size === 0) this.log.setNativeBlocked('locks', false);
    }
  }

  private async emit(offset: number, length: number, data: Buffer | undefined, type: RecordType, flags: number, partial: number[]): Promise<number> {
    const end = offset + length;
    const startLbn = Math.floor(offset / BS);
    const endLbn = Math.ceil(end / BS);
    // Merged copies of the partially covered blocks.
    const merged = new Map<number, Buffer>();
    for (const lbn of partial) {
      const base = await this.newestBlock(lbn);
      const from = Math.max(offset, lbn * BS);
      const to = Math.min(end, (lbn + 1) * BS);
      if (data) data.copy(base, from - lbn * BS, from - offset, to - offset);
      else base.fill(0, from - lbn * BS, to - lbn * BS);
      merged.set(lbn, base);
    }
    if (data) {
      const segments: Buffer[] = [];
      const head = merged.get(startLbn);
      const tail = endLbn - 1 !== startLbn ? merged.get(endLbn - 1) : undefined;
      if (head) segments.push(head);
      const midStart = head ? startLbn + 1 : startLbn;
      const midEnd = tail ? endLbn - 1 : endLbn;
      if (midEnd > midStart) segments.push(data.subarray(midStart * BS - offset, midEnd * BS - offset));
      if (tail) segments.push(tail);
      return this.appendBlocks(startLbn * BS, segments, flags);
    }
    // Zeroing: partial blocks are written merged; whole blocks become one zero/trim record.
    let seq = -1;
    const head = merged.get(startLbn);
    if (head) seq = await this.appendBlocks(startLbn * BS, [head], flags);
    const wholeStart = head ? startLbn + 1 : startLbn;
    const tailBuf = endLbn - 1 !== startLbn ? merged.get(endLbn - 1) : undefined;
    const wholeEnd = tailBuf ? endLbn - 1 : endLbn;
    if (wholeEnd > wholeStart) seq = await this.log.appendZero(type as RecordType.Trim | RecordType.Zero, wholeStart * BS, (wholeEnd - wholeStart) * BS, flags);
    if (tailBuf) seq = await this.appendBlocks((endLbn - 1) * BS, [tailBuf], flags);
    assert(seq > 0, 'zeroing wrote nothing');
    return seq;
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, data.length);
    assert(data.length <= ENGINE_MAX_PAYLOAD_BYTES, 'write larger than maxPayloadBytes');
    if (data.length === 0) return;
    const seq = await this.mutate(offset, data.length, data, RecordType.Write, fua ? RECORD_FLAG_FUA : 0);
    await this.settle(seq, fua);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (this.caps.readOnly) return;
    if (this.replica) await Promise.all([this.log.flush(), this.replica.wait(this.log.lastSeq, true)]);
    else await this.log.flush();
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const seq = await this.mutate(offset, length, undefined, RecordType.Trim, fua ? RECORD_FLAG_FUA : 0);
    await this.settle(seq, fua);
  }

  /** Zeroes a range. Whole blocks become holes (NO_HOLE is a hint we do not follow: holes read as zeroes). */
  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const seq = await this.mutate(offset, length, undefined, RecordType.Zero, opts.fua ? RECORD_FLAG_FUA : 0);
    await this.settle(seq, opts.fua);
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkOpen();
    this.checkRange(offset, length);
    const n = Math.min(length, CACHE_BYTES_MAX);
    if (n > 0) await this.read(offset, n);
  }

  // ---- block status ----

  async blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    this.checkOpen();
    this.checkRange(offset, length);
    assert(length > 0 && maxExtents >= 1, 'blockStatus: empty request');
    const startLbn = Math.floor(offset / BS);
    const endLbn = Math.min(Math.ceil((offset + length) / BS), startLbn + STATUS_WINDOW_BLOCKS);
    // Runs of the log's view (resolved synchronously), with tree runs left to ask.
    type Run = { startLbn: number; count: number; flags: number | 'tree' };
    const runs: Run[] = [];
    if (this.log.indexEmpty) {
      runs.push({ startLbn, count: endLbn - startLbn, flags: 'tree' });
    } else {
      const resolve = this.log.resolver(startLbn, endLbn);
      for (let l = startLbn; l < endLbn; l++) {
        const hit = resolve(l);
        const flags: number | 'tree' = hit === undefined ? 'tree' : hit.kind === 'zero' ? EXTENT_HOLE | EXTENT_ZERO : 0;
        const last = runs[runs.length - 1];
        if (last && last.flags === flags) last.count++;
        else runs.push({ startLbn: l, count: 1, flags });
      }
    }
    const blocks: Extent[] = [];
    const push = (lengthBytes: number, flags: number): void => {
      const last = blocks[blocks.length - 1];
      if (last && last.flags === flags) last.lengthBytes += lengthBytes;
      else blocks.push({ lengthBytes, flags });
    };
    for (const run of runs) {
      if (blocks.length > maxExtents) break;
      if (run.flags !== 'tree') {
        push(run.count * BS, run.flags);
        continue;
      }
      const ext = await this.tree.blockStatus(run.startLbn, run.count, maxExtents + 1);
      let covered = 0;
      for (const e of ext) {
        assert(e.lengthBytes > 0, 'tree returned an empty extent');
        push(e.lengthBytes, e.flags);
        covered += e.lengthBytes;
      }
      assert(covered <= run.count * BS, 'tree extents beyond the query');
      if (covered < run.count * BS) break; // the tree answered short: stop here, stay contiguous
    }
    // Clip to [offset, offset+length) and to maxExtents.
    const out = clipExtents(blocks, offset - startLbn * BS, length, maxExtents);
    assert(out.length >= 1, 'blockStatus produced nothing');
    return out;
  }

  // ---- CPs, snapshots, stats ----

  /** Commits everything logged so far into the tree (a CP on demand). */
  async checkpoint(): Promise<CommitResult | undefined> {
    this.checkWritable();
    assert(this.cp, 'no CP runner');
    return this.cp.requestCp();
  }

  listSnapshots(): SnapshotInfo[] {
    return this.tree.listSnapshots();
  }

  /** Validates a snapshot op against the current state; throws a one-line Error. */
  private validateSnapshotOp(op: SnapshotOp): void {
    const problem = snapshotNameProblem(op.name);
    if (problem !== null) throw new VolumeError('EINVAL', problem);
    if (op.name.includes('@')) throw new VolumeError('EINVAL', `bad snapshot name "${op.name}": '@' separates export and snapshot names`);
    const exists = this.tree.listSnapshots().some((s) => s.name === op.name);
    if (this.pendingSnapshotNames.has(op.name)) throw new VolumeError('EINVAL', `snapshot "${op.name}" has a change pending`);
    if (op.kind === 'create') {
      if (exists) throw new VolumeError('EINVAL', `snapshot "${op.name}" already exists`);
      if (this.tree.listSnapshots().length + this.pendingSnapshotNames.size >= SNAPSHOTS_MAX) {
        throw new VolumeError('ENOSPC', `a volume holds at most ${SNAPSHOTS_MAX} snapshots`);
      }
    } else if (!exists) {
      throw new VolumeError('EINVAL', `no snapshot "${op.name}"`);
    }
  }

  /** Creates or deletes a snapshot in a CP that holds every write acknowledged before this call. */
  async snapshot(op: SnapshotOp): Promise<CommitResult | undefined> {
    this.checkWritable();
    assert(this.cp, 'no CP runner');
    this.validateSnapshotOp(op);
    this.pendingSnapshotNames.add(op.name);
    try {
      return await this.cp.requestCp([op]);
    } finally {
      this.pendingSnapshotNames.delete(op.name);
    }
  }

  stats(): EngineStats {
    return {
      sizeBytes: this.sizeBytes,
      readOnly: this.caps.readOnly,
      tree: this.tree.stats(),
      nvlog: this.log.stats(),
      cp: this.cp?.stats() ?? { cpsRun: 0, running: false, lastCpDurationMs: 0, lastCpEndMs: 0, cpDurationMsMax: 0, urgentCps: 0 },
      replay: this.log.replaySummary,
      ...(this.readMap && !this.closed ? { threadReads: this.readMap.stats() } : {}),
      ...(this.placer ? { early: { ...this.placer.stats } } : {}),
      ...(this.log.nativeAppender ? { threadWrites: this.log.nativeAppender.appends, threadFileStores: this.log.nativeAppender.fileStores, threadFlushes: this.log.nativeAppender.flushes } : {}),
    };
  }

  /** Final CP (read-write), then closes the log, the tree and the NVRAM region. */
  close(): Promise<void> {
    if (!this.closing) this.closing = this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    let err: unknown;
    // The threads' records come in and they append no more: the final CP holds everything.
    this.log.disableNativeAppends();
    try {
      if (this.cp) await this.cp.close();
    } catch (e) {
      err = e;
      logger().error({ err: e }, 'final consistency point failed; the NVRAM log keeps the data for the next open');
    }
    this.closed = true;
    // Placement writes of a half whose CP did not run (a failed log): ended before the device closes.
    this.log.onWriteIndexed = undefined;
    if (this.placer) await this.placer.close();
    this.readMap?.close();
    await this.mapAhead;
    this.log.close();
    await this.tree.close();
    await this.region.close();
    if (err) throw err;
  }
}
