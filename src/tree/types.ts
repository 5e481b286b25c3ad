/**
 * Contract between the copy-on-write block tree (src/tree) and the consistency-point
 * engine above it (src/cp, src/volume/engine.ts). Logical block numbers (lbn) address
 * the volume in 4 KiB blocks; physical block addresses (pba) address the BlockDevice.
 *
 * Invariants:
 * - A committed root never points at a block written in a later CP.
 * - A block referenced by any committed root or kept snapshot is never overwritten.
 * - Blocks freed in CP n are reusable only after CP n's superblock is durable.
 * - Every block read is verified against the checksum its parent pointer holds.
 */
import type { Generation } from './lineage';
import type { Extent } from '../util/extent';
import type { Clock } from '../io/types';

/** Per-block change carried into a CP: new 4 KiB contents, or null for a hole (trim/zero). */
export interface BlockChange {
  lbn: number;
  data: Buffer | null;
  /** The log record that wrote this whole block (a mirror may send it as a reference). */
  origin?: BlockOrigin;
  /** crc32c of data, when the caller already knows it (the CP then does not read the block for it). */
  crc?: number | undefined;
  /** The block `data` was written to ahead of the CP (EarlyPlacementApi, the write complete): the CP takes it there. */
  early?: number | undefined;
}

/**
 * Data placed ahead of its CP (a single-member device): blocks taken from the free space
 * (in no persisted set: a crash leaves them free), written while the NVRAM half still
 * fills, then adopted by the CP through BlockChange.early or dropped.
 */
export interface EarlyPlacementApi {
  /** count blocks in runs, or undefined (fewer than count + keepFree free, a discard running, the tree failed). */
  reserve(count: number, keepFree: number): { pba: number; count: number }[] | undefined;
  /** Writes whole blocks into reserved ones, starting their writeback. */
  write(pba: number, parts: Buffer[]): Promise<void>;
  /** Gives back whatever of these runs no CP adopted. */
  drop(runs: readonly { pba: number; count: number }[]): void;
}

/** A block's source in the NVRAM log: record seq (the transfer id) and block index in it. */
export interface BlockOrigin {
  seq: number;
  index: number;
}

/** One block a CP writes, as the CP sink sees it. */
export interface CpBlock {
  pba: number;
  /** 4 KiB; a view that is only valid until the promise returned by the sink settles. */
  buf: Buffer;
  /** Data blocks written whole by one log record: where the record holds it. */
  origin?: BlockOrigin;
  /** Set on data blocks (their crc32c), absent on metadata blocks. */
  crc?: number;
  /** Metadata blocks: the committed block this one replaces (a mirror may send a delta against it). */
  prevPba?: number;
  /**
   * With prevPba: where this block may differ from the block at prevPba, as 8-byte word
   * runs (firstWord, wordCount pairs, increasing, not overlapping); every word outside
   * them is equal. Absent: compare the two blocks.
   */
  changedRuns?: number[];
  /** Metadata blocks: the crc32c of buf when the tree already computed it (its pointer holds it). */
  nodeCrc?: number;
}

/**
 * The CP hook (a mirror): sees every block a CP writes, then the new superblock. The
 * tree awaits each call, so a sink applies backpressure to the CP; a sink never rejects
 * (it deals with its own failures).
 */
export interface CpSink {
  /**
   * The oldest committed CP whose blocks must stay intact (a mirror's committed root, or
   * a root its readers use), or undefined. Freed blocks are not reused while it is older
   * than the CP that freed them.
   */
  oldestNeededCp(): number | undefined;
  /** Space ran out while blocks were held for oldestNeededCp(): they are being reused. */
  holdBroken(cp: number, reason: string): void;
  /** Blocks of CP `cp`, as they go to the device (data, address and space-map blocks). */
  blocks(cp: number, blocks: readonly CpBlock[]): Promise<void>;
  /** CP `cp` is durable locally: its superblock (one block) and the ring slot it went to. */
  committed(cp: number, slot: number, superblock: Buffer, meta: CpMeta): Promise<void>;
}

/** A committed state pinned against reuse (for incremental sends): release() when done. */
export interface CommittedView {
  readonly cpNumber: number;
  readonly slot: number;
  /** The superblock block of this CP (as written into its ring slot). */
  readonly superblock: Buffer;
  readonly deviceBlocks: number;
  readRaw(pba: number, count: number, dst: Buffer): Promise<void>;
  /** readRaw, with each block's crc32c into crcs (count LE uint32s); off the event loop where the device can. */
  readRawCrc(pba: number, count: number, dst: Buffer, crcs: Buffer): Promise<void>;
  release(): void;
}

/** What the engine records in the superblock besides the tree (e.g. NVRAM replay watermark). */
export interface CpMeta {
  /** Highest NVRAM record sequence number whose effect is included in this CP. */
  nvlogSeq: number;
  /** NVRAM epoch the seq belongs to. */
  nvlogEpoch: number;
}

export interface SnapshotInfo {
  name: string;
  cpNumber: number;
  createdMs: number;
  usedBlocks: number;
}

export interface CommitResult {
  cpNumber: number;
  durationMs: number;
  blocksWritten: number;
  blocksFreed: number;
  /** Of blocksWritten, the data blocks (the rest are address, space-map and pad blocks). */
  dataBlocks: number;
  /** Of dataBlocks, those placed ahead of the CP (written before it began; the CP synced them). */
  earlyBlocks: number;
  phases: CpPhases;
}

/**
 * Where one CP's time went, in ms by the tree's clock (like ZFS's per-txg times): phases
 * in order, each from the end of the one before, so they add up to the CP's duration
 * (durationMs ends before the superblock; the last two follow it).
 */
export interface CpPhases {
  /** Collecting and checksumming the changes, planning the paths, rotating the space map (discards included). */
  prepareMs: number;
  /** Allocating, then building and writing the address blocks; the data blocks' writes run meanwhile. */
  addressMs: number;
  /** Waiting for the data blocks' writes once the address blocks are written. */
  dataMs: number;
  /** Building and writing the space map's blocks and the pads. */
  spaceMapMs: number;
  /** The device sync that makes every block of the CP durable. */
  syncMs: number;
  /** Writing and syncing the superblock: the CP is committed after this. */
  superblockMs: number;
  /** The CP sink's hook (a mirror taking the CP), after the commit; 0 without one. */
  sinkMs: number;
}

/**
 * Gets the level-0 address blocks a read walked (verified), with the first lbn each maps
 * (a multiple of FANOUT); a block may come twice. The buffer is the cache's: read only.
 */
export type LeafSink = (baseLbn: number, node: Buffer) => void;

/** A read-only view pinned to one committed root (the live tree or a snapshot). */
export interface TreeReader {
  readonly cpNumber: number;
  /** Returns the block's contents, or null if it is a hole. Rejects with VolumeError('EIO') on checksum mismatch. */
  readBlock(lbn: number): Promise<Buffer | null>;
  /**
   * Reads lbns [lbn, lbn+count) into dst (exactly count*4096 bytes), holes as zeroes,
   * with one tree walk and one device read per physically contiguous run. Rejects with
   * VolumeError('EIO') like readBlock (dst contents are then undefined).
   */
  readRange(lbn: number, count: number, dst: Buffer, leaves?: LeafSink): Promise<void>;
  /** Extents (EXTENT_HOLE|EXTENT_ZERO for holes) for lbns [lbn, lbn+count), at most maxExtents. */
  blockStatus(lbn: number, count: number, maxExtents: number): Promise<Extent[]>;
}

export interface CheckReport {
  ok: boolean;
  problems: string[];
  blocksReachable: number;
  blocksAccounted: number;
  /** Blocks that failed verification and were repaired from the repair source (a mirror) during the check. */
  repaired?: number;
}

export interface TreeStats {
  volumeUuid: string;
  sizeBytes: number;
  cpNumber: number;
  lastCpMs: number;
  lastCpDurationMs: number;
  /** The last CP committed since open (undefined before the first): its sizes and phases. */
  lastCp?: CommitResult;
  /** Each phase's time summed over the CPs committed since open (ms). */
  cpPhaseTotalsMs: CpPhases;
  usedBlocks: number;
  totalBlocks: number;
  snapshots: SnapshotInfo[];
  meta: CpMeta;
  /** Reads refused since open: a block that failed verification, a failed device read. */
  errors: BlockErrorCounts;
  /** The committed CP's lineage, newest generation first (lineage.ts). */
  lineage: readonly Generation[];
  /** Address blocks CPs since open changed in the node cache's buffer (never lent to a reader) rather than in a copy. */
  nodesEditedInPlace: number;
}

/**
 * Where a block that failed verification may be fetched again, beside the device's own
 * redundancy: a mirror holds the same block at the same pba (mirror/source.ts), verified-read.ts. Its copy
 * is taken only if it verifies against the same pointer; then it is served and written
 * over the bad copy.
 */
export interface RepairSource {
  /** Named in log lines ("the mirror at HOST:PORT"). */
  readonly name: string;
  /** The block at pba as the other side holds it (any content: it is verified here). */
  read(pba: number): Promise<Buffer>;
  /** Told of each block served from this source's copy (it verified against the reader's pointer). */
  repaired?(pba: number, copy: Buffer): void;
}

export interface BlockErrorCounts {
  /** Reads refused: a block failed verification and no good copy was found. */
  checksum: number;
  io: number;
  /** Blocks that failed verification and were served (and rewritten) from the repair source, a mirror (verified-read.ts). */
  repaired: number;
}

/**
 * Set when mount had to fall back past a newer CP whose superblock slot verified (so it
 * was durably committed) but whose tree did not. The engine decides whether the NVRAM
 * still covers the writes of the skipped CPs; if not, opening would lose them.
 */
export interface TreeRollback {
  mountedCp: number;
  newestCp: number;
  /** The NVRAM watermark the newest (skipped) CP had committed. */
  newestMeta: CpMeta;
  reasons: string[];
}

export interface BlockTreeApi extends TreeReader {
  readonly sizeBytes: number;
  /** The clock the tree runs on (CP timing; the slices of CP work, util/work.ts slicerFor). */
  readonly clock: Clock;
  readonly volumeUuid: string;
  /** Undefined when the newest durable CP mounted. */
  readonly rollback: TreeRollback | undefined;
  stats(): TreeStats;
  /** The live root's level-0 address blocks for lbns [lbn, lbn+count), reading at most maxNodes address blocks (no data). */
  readLeaves(lbn: number, count: number, leaves: LeafSink, maxNodes: number): Promise<void>;
  /**
   * Atomically commits one CP: write changed data blocks and the address-block paths
   * above them to newly allocated blocks, sync, write the new root into the superblock
   * ring, sync. Snapshot ops are applied in the same CP. Only one commit at a time.
   */
  commitCp(changes: Iterable<BlockChange>, meta: CpMeta, snapshotOps?: SnapshotOp[]): Promise<CommitResult>;
  /** Early data placement, where the device offers it. */
  readonly early?: EarlyPlacementApi | undefined;
  listSnapshots(): SnapshotInfo[];
  /** A reader pinned to a kept snapshot root, or undefined. */
  snapshotReader(name: string): TreeReader | undefined;
  /** The next CP starts generation `id` (promote); see lineage.ts. */
  startGeneration(id: string): void;
  /** Installs (or removes) the CP hook. */
  setCpSink(sink: CpSink | undefined): void;
  /** Installs (or removes) where a block that fails verification is fetched again (a mirror): verified-read.ts. */
  setRepairSource(src: RepairSource | undefined): void;
  /** Reads raw blocks of the device (a block of the committed state, e.g. a CpBlock's prevPba, before the CP that replaces it is durable). */
  readRaw(pba: number, count: number, dst: Buffer): Promise<void>;
  /** Keeps an older committed CP's blocks from reuse (a mirror's base after a restart); null, or why it cannot. */
  holdCommitted(cp: number, superblock?: Buffer): Promise<string | null>;
  /** Pins the committed state (live root and every snapshot) until release(). */
  pinCommitted(): CommittedView;
  /** Full walk: verify every checksum, that accounting matches reachability. `onBlocksRead` gets the running count of blocks read. */
  check(onBlocksRead?: (blocks: number) => void): Promise<CheckReport>;
  close(): Promise<void>;
}

export type SnapshotOp = { kind: 'create'; name: string } | { kind: 'delete'; name: string };
