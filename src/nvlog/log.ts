/**
 * The NVRAM log: appends write/trim/zero records into the active half of a persistent
 * region, makes them durable with group commit, indexes them for reads, and hands full
 * halves to the consistency-point engine.
 *
 * Invariants:
 * - Sequence numbers are assigned in append order, contiguous, and records are laid out
 *   in a half in seq order; every record of the frozen half precedes every record of the
 *   active half.
 * - At most one half is frozen (owned by a running or pending CP); the frozen half is
 *   never written; it becomes free only through releaseFrozen(), after its CP is durable.
 * - `durableSeq`: every record with seq <= durableSeq is on stable storage (persisted in
 *   the region, or included in a durable CP). It never decreases.
 * - At most PERSIST_ROUNDS_MAX persist rounds are in flight (group commit, pipelined):
 *   a round starts only for waiters that no round in flight covers, and covers all of
 *   them with one persist per dirty half. Each round persists, per half, everything from
 *   the half's persistedEnd at the round's start (the end of what completed rounds made
 *   durable) to its writeEnd, so a round on its own makes every record appended before it
 *   started durable, whatever the order in which rounds complete.
 * - Appends that do not fit wait in a bounded FIFO queue; while it is non-empty every
 *   new append queues behind it, so seq order equals arrival order.
 * - A half that becomes free (and both halves at a new epoch) is pre-faulted for writing
 *   off the event loop (MmapNvram only), so appends into it copy without page faults;
 *   this is a hint: it changes no byte of the region, and a failure only stops it.
 * - After a persist failure the log is failed: every pending and later operation
 *   rejects with EIO (a failed msync is never retried; recovery replays from the region).
 * - Native appends (enableNativeAppends): the NBD threads may append plain whole-block
 *   writes into the rest of the active half themselves (native/nv_append.h), from the
 *   log's writeEnd and nextSeq, while the log leases it to them: only while running,
 *   with no space waiters, nothing blocking it (setNativeBlocked) and no section of the
 *   log holding the half (hold/unhold: every append, switch and release of this log
 *   pauses them and takes their records in first). Their records are taken in (indexed,
 *   the append hook called) before anything here reads the active half's state or the
 *   index: every lookup, lastSeq, durability wait and stat syncs first. So the log's
 *   view is the threads' records plus its own, in one seq order, as if all were its own.
 * - A sync mirror's native link (forwardNative) gets the threads' records from the
 *   appender as they append them, from the seq after everything taken in when it was
 *   linked (and from an appender made later, at once); its records still come in here
 *   (AppendedRecord.viaThread), so the mirror knows which it need not send itself.
 * - The threads answer a plain FLUSH themselves (fdatasync of the region's file; see
 *   native/nv_append.h) only while the log is running, its region is a file (MmapNvram)
 *   and the owner allows it (setNativeFlushAllowed: no replica, or a sync mirror whose
 *   native link then carries the durable request and ack; the threads hand the FLUSH back
 *   here whenever that link is not there or cannot tell).
 *   A failed fdatasync of theirs reaches fail() through the volume; this log's own next
 *   msync would report the same error (the threads use a file of their own).
 */
import type { CpMeta } from '../tree/types';
import type { NvramRegion, Random } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { MmapNvram } from '../io/mmap-nvram';
import { populateWrite } from '../io/native';
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import {
  encodeHeaderSlot, encodeRecord, halfLayout, headerSlotFor, HEADER_PAGE_BYTES, HEADER_SLOT_OFFSETS,
  recordSizeBytes, RecordType, RECORD_HEADER_BYTES, type HalfLayout, type RegionHeader,
} from './format';
import { HalfIndex, type IndexHit, type LbnRange } from './half-index';
import { NativeAppender } from './native-append';
import { log as logger } from '../util/log';
import { scanRegion, type LocatedRecord, type NvramGap, type ScanResult } from './replay';

export const SPACE_WAITERS_MAX_DEFAULT = 65536;
/** Persist rounds in flight at once (concurrent syncs let the device merge its flushes). */
export const PERSIST_ROUNDS_MAX = 4;
/** A free half is pre-faulted for writing in pieces of this size, one at a time. */
const POPULATE_CHUNK_BYTES = 1024 * 1024;
export const ZERO_RANGES_PER_HALF_MAX_DEFAULT = 1024;
const PAGE_BYTES = 4096;

export type HalfState = 'free' | 'active' | 'frozen';

/** One half of the region. Offsets are absolute region offsets. */
export class Half {
  readonly index = new HalfIndex();
  state: HalfState = 'free';
  writeEnd: number;
  persistedEnd: number;
  firstSeq = 0;
  lastSeq = 0;
  records = 0;
  /** Incremented each time the half is reset, so stale persist rounds can tell. */
  generation = 0;
  /** Write records of this half in seq order: payload region offsets and their seqs. */
  readonly writePayloadOffsets: number[] = [];
  readonly writeSeqs: number[] = [];
  /**
   * The crc32c of logged blocks whose checksum is known (the NBD threads' appends hand it
   * over; other records' blocks are checksummed by the CP), per 4 KiB slot of the half: a
   * block's payload at region offset o is slot floor((o - start) / 4096), one block per
   * slot (two 4 KiB payloads cannot start in the same 4 KiB). Cleared with the half.
   */
  private readonly crcs: Uint32Array;
  private readonly crcKnown: Uint8Array;
  constructor(readonly id: 0 | 1, readonly start: number, readonly sizeBytes: number) {
    this.writeEnd = start;
    this.persistedEnd = start;
    this.crcs = new Uint32Array(Math.ceil(sizeBytes / BLOCK_SIZE_BYTES));
    this.crcKnown = new Uint8Array(this.crcs.length);
  }
  /** Records the crc32c of count blocks whose payload starts at region offset payloadAt. */
  setBlockCrcs(payloadAt: number, count: number, crcs: Uint32Array, from: number): void {
    assert(payloadAt >= this.start && payloadAt + count * BLOCK_SIZE_BYTES <= this.end && from + count <= crcs.length, 'setBlockCrcs out of range');
    const slot = Math.floor((payloadAt - this.start) / BLOCK_SIZE_BYTES);
    // A loop, not set(subarray): this runs for every record the threads append, and a view each was garbage.
    for (let i = 0; i < count; i++) {
      this.crcs[slot + i] = crcs[from + i]!;
      this.crcKnown[slot + i] = 1;
    }
  }
  /** The crc32c of the logged block at region offset regionOffset, if known. */
  blockCrc(regionOffset: number): number | undefined {
    const slot = Math.floor((regionOffset - this.start) / BLOCK_SIZE_BYTES);
    return this.crcKnown[slot] === 1 ? this.crcs[slot] : undefined;
  }
  get end(): number {
    return this.start + this.sizeBytes;
  }
  get usedBytes(): number {
    return this.writeEnd - this.start;
  }
  reset(): void {
    this.index.clear();
    this.writeEnd = this.start;
    this.persistedEnd = this.start;
    this.firstSeq = 0;
    this.lastSeq = 0;
    this.records = 0;
    this.writePayloadOffsets.length = 0;
    this.writeSeqs.length = 0;
    this.crcKnown.fill(0);
    this.generation++;
  }
}

export interface NvLogOptions {
  volumeUuid: string;
  /** The replay watermark from the committed superblock. */
  committed: CpMeta;
  readOnly: boolean;
  random?: Random;
  spaceWaitersMax?: number;
  zeroRangesPerHalfMax?: number;
  /** Called (synchronously) each time a half becomes frozen and needs a CP. */
  onFrozen?: () => void;
}

export interface ReplaySummary {
  records: number;
  firstSeq: number;
  lastSeq: number;
  orphanedRecords: number;
  /** Mid-log damage: records after the replay's end that were durable are lost (see replay.ts). */
  damage: NvramGap | undefined;
  /** Records after a gap that were never made durable (a torn or reordered tail): dropped. */
  unflushedGap: NvramGap | undefined;
}

export interface NvLogStats {
  epoch: number;
  lastSeq: number;
  durableSeq: number;
  regionSizeBytes: number;
  halfSizeBytes: number;
  usedBytes: number;
  activeUsedBytes: number;
  frozenUsedBytes: number;
  spaceWaiters: number;
  persistRounds: number;
}

/** A record as the append hook sees it. */
export interface AppendedRecord {
  seq: number;
  type: RecordType;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  /** Write payload (concatenated: lengthBytes), empty for trim/zero. */
  payload: readonly Buffer[];
  /** Appended by an NBD thread (native/nv_append.h), not by this log. */
  viaThread?: boolean;
}

interface PendingAppend {
  type: RecordType;
  offsetBytes: number;
  lengthBytes: number;
  flags: number;
  payload: readonly Buffer[];
  resolve: (seq: number) => void;
  reject: (e: Error) => void;
}

interface DurableWaiter {
  seq: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

type LogState = 'recovering' | 'running' | 'readonly' | 'failed' | 'closed';

function randomU32(random: Random | undefined): number {
  const r = random ? random.next() : Math.random();
  return Math.floor(r * 0x100000000) >>> 0;
}

export class NvLog {
  readonly region: NvramRegion;
  readonly layout: HalfLayout;
  readonly halves: [Half, Half];
  private header: RegionHeader;
  private readonly opts: NvLogOptions;
  private state: LogState;
  private failure: Error | undefined;
  private active: Half;
  private nextSeq: number;
  private durable: number;
  private readonly spaceWaiters: PendingAppend[] = [];
  private spaceWaitersHead = 0;
  /** Appends ever queued / ever dequeued (written or rejected), for queueBarrier(). */
  private queuedTotal = 0;
  private dequeuedTotal = 0;
  private readonly barriers: Array<{ until: number; resolve: () => void }> = [];
  private readonly durableWaiters: DurableWaiter[] = [];
  private persistInFlight = 0;
  /** The highest seq a started persist round covers. */
  private persistCoveredSeq = 0;
  private persistRoundCount = 0;
  private readonly replay: ReplaySummary;
  /** Halves holding replayed records, oldest first (recovering / read-only only). */
  private readonly replayHalves: Half[] = [];
  private readonly spaceWaitersMax: number;
  private readonly zeroRangesMax: number;
  /** Half ranges waiting to be pre-faulted (at most 2 queued), and whether one is running. */
  private readonly populateQueue: Half[] = [];
  private populating = false;
  /** The NBD threads' appender, while they append plain writes themselves (see the invariants). */
  private native: NativeAppender | undefined;
  /** The owner lets the threads answer FLUSH (setNativeFlushAllowed), and the file they flush now (null: they do not). */
  private nativeFlushAllowed = true;
  private nativeFlushPath: string | null = null;
  /** Synchronous sections that need the active half to themselves (native appends paused). */
  private nativeHolds = 0;
  private readonly nativeBlocks = new Set<string>();
  /** The threads' replies wait for release (setNativeGate): a sync mirror's replica. */
  private nativeGate = false;
  /** A sync mirror's native link for the threads' records (forwardNative). */
  private nativeForward: { attach: (appender: object, fromSeq: number) => void; fromSeq: number } | undefined;
  onFrozen: (() => void) | undefined;
  /**
   * The append hook: called synchronously for each record as it is written into the
   * region, in seq order (a mirror forwards it). The payload views are valid only
   * during the call.
   */
  onAppend: ((rec: AppendedRecord) => void) | undefined;
  /**
   * Called synchronously with the blocks [startLbn, startLbn+count) of each record as it
   * is indexed (before its append resolves): a cache of the tree's mapping drops them.
   */
  onBlocksChanged: ((startLbn: number, count: number) => void) | undefined;
  /** Called (synchronously) for each WRITE record indexed into a half, its payload whole in the region (early data placement). */
  onWriteIndexed: ((half: Half, startLbn: number, count: number, payloadOffset: number) => void) | undefined;

  /** Initialises a region for a volume: header epoch 1, fresh salt; persists the header page. */
  static async format(region: NvramRegion, volumeUuid: string, random?: Random): Promise<void> {
    const layout = halfLayout(region.sizeBytes);
    const buf = region.buffer;
    buf.fill(0, 0, HEADER_PAGE_BYTES);
    encodeHeaderSlot({ uuid: volumeUuid, epoch: 1, salt: randomU32(random), regionSizeBytes: region.sizeBytes, halfSizeBytes: layout.halfSizeBytes }, buf, headerSlotFor(1));
    await region.persist(0, HEADER_PAGE_BYTES);
  }

  /**
   * Opens a formatted region: scans it and indexes the replay chain (records after the
   * committed watermark). Read-write logs start in 'recovering': the caller commits
   * the replayed changes (recoveryHalves) in a CP with meta {recoverySeq, nextEpoch},
   * then calls beginEpoch(). Read-only logs keep the replayed records as an overlay.
   */
  static open(region: NvramRegion, opts: NvLogOptions): NvLog {
    const scan = scanRegion(region, opts.volumeUuid, opts.committed.nvlogSeq);
    return new NvLog(region, opts, scan);
  }

  private constructor(region: NvramRegion, opts: NvLogOptions, scan: ScanResult) {
    this.region = region;
    this.opts = opts;
    this.layout = scan.layout;
    this.header = scan.header;
    this.onFrozen = opts.onFrozen;
    this.spaceWaitersMax = opts.spaceWaitersMax ?? SPACE_WAITERS_MAX_DEFAULT;
    this.zeroRangesMax = opts.zeroRangesPerHalfMax ?? ZERO_RANGES_PER_HALF_MAX_DEFAULT;
    assert(this.spaceWaitersMax >= 1 && this.zeroRangesMax >= 1, 'limits must be >= 1');
    this.halves = [
      new Half(0, this.layout.halfOffsets[0], this.layout.halfSizeBytes),
      new Half(1, this.layout.halfOffsets[1], this.layout.halfSizeBytes),
    ];
    this.state = opts.readOnly ? 'readonly' : 'recovering';
    this.indexReplayChain(scan.chain);
    const chainLast = scan.chain.length > 0 ? scan.chain[scan.chain.length - 1]!.header.seq : opts.committed.nvlogSeq;
    this.nextSeq = chainLast + 1;
    this.durable = chainLast; // everything in the region that verified is, by definition, what survived
    this.replay = {
      records: scan.chain.length,
      firstSeq: scan.chain.length > 0 ? scan.chain[0]!.header.seq : 0,
      lastSeq: scan.chain.length > 0 ? chainLast : 0,
      orphanedRecords: scan.orphanedRecords,
      damage: scan.damage,
      unflushedGap: scan.unflushedGap,
    };
    // The newest replayed half acts as active for lookups; a fresh log starts on half 0.
    this.active = this.replayHalves[this.replayHalves.length - 1] ?? this.halves[0];
  }

  private indexReplayChain(chain: LocatedRecord[]): void {
    for (const r of chain) {
      const half = this.halves[r.half];
      if (this.replayHalves[this.replayHalves.length - 1] !== half) {
        assert(!this.replayHalves.includes(half), 'replay chain alternates halves more than once');
        this.replayHalves.push(half);
        half.state = 'frozen';
        half.firstSeq = r.header.seq;
      }
      this.indexRecord(half, r.header.type, r.header.offsetBytes, r.header.lengthBytes, r.payloadOffset, r.header.seq);
      half.lastSeq = r.header.seq;
      half.records++;
      half.writeEnd = r.regionOffset + recordSizeBytes(r.header.payloadBytes);
      half.persistedEnd = half.writeEnd;
    }
  }

  private indexRecord(half: Half, type: RecordType, offsetBytes: number, lengthBytes: number, payloadOffset: number, seq: number): void {
    const startLbn = offsetBytes / BLOCK_SIZE_BYTES;
    const count = lengthBytes / BLOCK_SIZE_BYTES;
    if (type === RecordType.Write) {
      half.index.addWrite(startLbn, count, payloadOffset);
      half.writePayloadOffsets.push(payloadOffset);
      half.writeSeqs.push(seq);
      this.onWriteIndexed?.(half, startLbn, count, payloadOffset);
    } else {
      half.index.addZero(startLbn, startLbn + count);
    }
    this.onBlocksChanged?.(startLbn, count);
  }

  /**
   * The record (seq) and block index within it that a logged block at `regionOffset`
   * (from the half's index) belongs to. Binary search over the half's write records.
   */
  originOf(half: Half, regionOffset: number): { seq: number; index: number } {
    const offs = half.writePayloadOffsets;
    let lo = 0;
    let hi = offs.length - 1;
    assert(hi >= 0 && regionOffset >= offs[0]!, 'originOf: offset before the first write record');
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (offs[mid]! <= regionOffset) lo = mid;
      else hi = mid - 1;
    }
    const delta = regionOffset - offs[lo]!;
    assert(delta % BLOCK_SIZE_BYTES === 0, 'originOf: offset not on a block of a record');
    return { seq: half.writeSeqs[lo]!, index: delta / BLOCK_SIZE_BYTES };
  }

  // ---- recovery ----

  get replaySummary(): ReplaySummary {
    return { ...this.replay, damage: this.replay.damage && { ...this.replay.damage }, unflushedGap: this.replay.unflushedGap && { ...this.replay.unflushedGap } };
  }

  /** Halves holding replayed records, oldest first (apply in this order; newer wins). */
  recoveryHalves(): readonly Half[] {
    return this.replayHalves;
  }

  /** The seq of the last replayed record, or the committed watermark if none. */
  get recoverySeq(): number {
    return this.nextSeq - 1;
  }

  get epoch(): number {
    return this.header.epoch;
  }

  /** The epoch beginEpoch() will start. */
  get nextEpoch(): number {
    return Math.max(this.header.epoch, this.opts.committed.nvlogEpoch) + 1;
  }

  /**
   * Starts a new epoch: the replayed records must already be committed (their effect is
   * in the tree with watermark recoverySeq). Writes the new header slot, persists it and
   * empties both halves; appends are accepted afterwards.
   */
  async beginEpoch(): Promise<void> {
    assert(this.state === 'recovering', `beginEpoch in state ${this.state}`);
    const epoch = this.nextEpoch;
    assert(epoch <= 0xffffffff, 'epoch overflow');
    const header: RegionHeader = { ...this.header, epoch, salt: randomU32(this.opts.random) };
    const slot = headerSlotFor(epoch);
    assert((HEADER_SLOT_OFFSETS as readonly number[]).includes(slot), 'slot');
    encodeHeaderSlot(header, this.region.buffer, slot);
    await this.region.persist(0, HEADER_PAGE_BYTES);
    this.header = header;
    for (const h of this.halves) {
      h.reset();
      h.state = 'free';
    }
    this.replayHalves.length = 0;
    this.active = this.halves[0];
    this.active.state = 'active';
    this.durable = this.nextSeq - 1;
    this.state = 'running';
    this.schedulePopulate(this.halves[0]);
    this.schedulePopulate(this.halves[1]);
  }

  /**
   * Pre-faults a half's pages for writing (madvise MADV_POPULATE_WRITE), one chunk at a
   * time in the addon's thread pool. Stores into a MAP_SHARED file page fault on first
   * write and again after each writeback (msync, CP-time writeback), ~5 us a page: doing
   * it ahead keeps that off the append path. Only for an mmap'd region; errors stop it.
   */
  private schedulePopulate(half: Half): void {
    if (!(this.region instanceof MmapNvram) || this.populateQueue.includes(half)) return;
    this.populateQueue.push(half);
    if (!this.populating) void this.runPopulate(this.region);
  }

  private async runPopulate(region: MmapNvram): Promise<void> {
    this.populating = true;
    try {
      for (;;) {
        const half = this.populateQueue.shift();
        if (half === undefined) return;
        for (let at = half.start; at < half.end; at += POPULATE_CHUNK_BYTES) {
          if (this.state !== 'running') return;
          await populateWrite(region.buffer, at, Math.min(POPULATE_CHUNK_BYTES, half.end - at));
        }
      }
    } catch {
      this.populateQueue.length = 0; // a hint only (e.g. a kernel without MADV_POPULATE_WRITE)
    } finally {
      this.populating = false;
    }
  }

  // ---- appends ----

  get recordPayloadMaxBytes(): number {
    return this.layout.recordPayloadMaxBytes;
  }

  get lastSeq(): number {
    this.syncNative();
    return this.nextSeq - 1;
  }

  get durableSeq(): number {
    return this.durable;
  }

  /** Appends a write record; `payload` concatenated is the block-aligned data (<= recordPayloadMaxBytes). */
  appendWrite(offsetBytes: number, payload: readonly Buffer[], flags: number): Promise<number> {
    let total = 0;
    for (const b of payload) total += b.length;
    assert(total > 0 && total % BLOCK_SIZE_BYTES === 0 && total <= this.layout.recordPayloadMaxBytes, `bad write payload ${total}`);
    return this.append({ type: RecordType.Write, offsetBytes, lengthBytes: total, flags, payload });
  }

  /** Appends a trim or zero record over whole blocks. */
  appendZero(type: RecordType.Trim | RecordType.Zero, offsetBytes: number, lengthBytes: number, flags: number): Promise<number> {
    return this.append({ type, offsetBytes, lengthBytes, flags, payload: [] });
  }

  private append(a: Omit<PendingAppend, 'resolve' | 'reject'>): Promise<number> {
    assert(a.offsetBytes % BLOCK_SIZE_BYTES === 0 && a.lengthBytes % BLOCK_SIZE_BYTES === 0 && a.lengthBytes > 0, 'append: range not block aligned');
    if (this.state === 'failed') return Promise.reject(this.failedError());
    if (this.state !== 'running') return Promise.reject(new VolumeError('ESHUTDOWN', `NVRAM log is ${this.state}`));
    this.hold();
    try {
      return this.appendHeld(a);
    } finally {
      this.unhold();
    }
  }

  private appendHeld(a: Omit<PendingAppend, 'resolve' | 'reject'>): Promise<number> {
    if (this.spaceWaiters.length === this.spaceWaitersHead && this.fits(this.active, a)) {
      return Promise.resolve(this.writeRecord(a));
    }
    if (this.spaceWaiters.length === this.spaceWaitersHead) {
      // The active half cannot take it: switch if the other half is free.
      if (this.trySwitch()) {
        assert(this.fits(this.active, a), 'record does not fit an empty half');
        return Promise.resolve(this.writeRecord(a));
      }
    }
    if (this.spaceWaiters.length - this.spaceWaitersHead >= this.spaceWaitersMax) {
      return Promise.reject(new VolumeError('ENOMEM', `NVRAM log: more than ${this.spaceWaitersMax} writers waiting for space`));
    }
    return new Promise<number>((resolve, reject) => {
      this.spaceWaiters.push({ ...a, resolve, reject });
      this.queuedTotal++;
    });
  }

  /** Resolves once every append queued before this call has been written (or rejected). */
  queueBarrier(): Promise<void> {
    if (this.dequeuedTotal >= this.queuedTotal) return Promise.resolve();
    return new Promise((resolve) => this.barriers.push({ until: this.queuedTotal, resolve }));
  }

  private settleBarriers(): void {
    if (this.barriers.length === 0) return;
    let kept = 0;
    for (const b of this.barriers) {
      if (b.until <= this.dequeuedTotal) b.resolve();
      else this.barriers[kept++] = b;
    }
    this.barriers.length = kept;
  }

  private fits(half: Half, a: { type: RecordType; lengthBytes: number }): boolean {
    const payload = a.type === RecordType.Write ? a.lengthBytes : 0;
    if (half.writeEnd + recordSizeBytes(payload) > half.end) return false;
    if (a.type !== RecordType.Write && half.index.zeroRanges.length >= this.zeroRangesMax) return false;
    return true;
  }

  private writeRecord(a: Omit<PendingAppend, 'resolve' | 'reject'>): number {
    assert(this.native === undefined || this.nativeHolds > 0, 'writeRecord while the threads may append');
    const half = this.active;
    assert(half.state === 'active' && this.fits(half, a), 'writeRecord: no room');
    const seq = this.nextSeq++;
    const at = half.writeEnd;
    const payloadBytes = a.type === RecordType.Write ? a.lengthBytes : 0;
    const size = encodeRecord(this.region.buffer, at, {
      epoch: this.header.epoch, seq, type: a.type, flags: a.flags, offsetBytes: a.offsetBytes,
      lengthBytes: a.lengthBytes, transferId: seq, payloadBytes, durableSeq: this.durable,
    }, this.header.salt, a.payload);
    half.writeEnd = at + size;
    if (half.records === 0) half.firstSeq = seq;
    half.lastSeq = seq;
    half.records++;
    this.indexRecord(half, a.type, a.offsetBytes, a.lengthBytes, at + RECORD_HEADER_BYTES, seq);
    this.onAppend?.({ seq, type: a.type, flags: a.flags, offsetBytes: a.offsetBytes, lengthBytes: a.lengthBytes, payload: a.payload });
    return seq;
  }

  /** Makes the other half active if it is free and the active one holds records. */
  private trySwitch(): boolean {
    assert(this.native === undefined || this.nativeHolds > 0, 'trySwitch while the threads may append');
    const other = this.halves[1 - this.active.id]!;
    if (other.state !== 'free' || this.active.records === 0) return false;
    assert(other.usedBytes === 0 && other.index.empty, 'free half not empty');
    this.active.state = 'frozen';
    other.state = 'active';
    this.active = other;
    this.onFrozen?.();
    return true;
  }

  /** Freezes the active half for a CP (timer / on demand). False if it is empty or the other half is still frozen. */
  freezeActive(): boolean {
    if (this.state !== 'running') return false;
    this.hold();
    try {
      return this.trySwitch();
    } finally {
      this.unhold();
    }
  }

  /** The half a CP must drain, if any. */
  frozenHalf(): Half | undefined {
    if (this.state !== 'running') return undefined;
    const other = this.halves[1 - this.active.id]!;
    return other.state === 'frozen' ? other : undefined;
  }

  /** True when the active half cannot take more (writers are or will be waiting). */
  get activeFull(): boolean {
    this.syncNative();
    return this.spaceWaiters.length > this.spaceWaitersHead || this.active.writeEnd + recordSizeBytes(BLOCK_SIZE_BYTES) > this.active.end;
  }

  /**
   * Releases the frozen half after its CP is durable (the tree holds its effect with a
   * watermark >= its last seq). Wakes writers waiting for space.
   */
  releaseFrozen(half: Half): void {
    this.hold();
    try {
      this.releaseFrozenHeld(half);
    } finally {
      this.unhold();
    }
  }

  private releaseFrozenHeld(half: Half): void {
    assert(this.state === 'running' || this.state === 'failed', `releaseFrozen in state ${this.state}`);
    assert(half.state === 'frozen' && half !== this.active, 'releaseFrozen: half is not frozen');
    const committedSeq = half.lastSeq;
    half.reset();
    half.state = 'free';
    this.schedulePopulate(half);
    if (committedSeq > this.durable) this.markDurable(committedSeq);
    if (this.state !== 'running') return;
    // Drain waiters: they need the active half rotated out.
    while (this.spaceWaiters.length > this.spaceWaitersHead) {
      const w = this.spaceWaiters[this.spaceWaitersHead]!;
      if (!this.fits(this.active, w)) {
        if (!this.trySwitch()) break;
        assert(this.fits(this.active, w), 'waiter does not fit an empty half');
      }
      this.spaceWaitersHead++;
      this.dequeuedTotal++;
      w.resolve(this.writeRecord(w));
    }
    this.settleBarriers();
    if (this.spaceWaitersHead === this.spaceWaiters.length) {
      this.spaceWaiters.length = 0;
      this.spaceWaitersHead = 0;
    } else if (this.spaceWaitersHead > 1024) {
      this.spaceWaiters.splice(0, this.spaceWaitersHead);
      this.spaceWaitersHead = 0;
    }
  }

  // ---- lookups ----

  /** Halves to consult for reads, newest first. */
  private lookupHalves(): Half[] {
    if (this.state === 'recovering' || this.state === 'readonly') return [...this.replayHalves].reverse();
    const other = this.halves[1 - this.active.id]!;
    return other.state === 'frozen' ? [this.active, other] : [this.active];
  }

  /** True if no half holds any indexed change (reads can go straight to the tree). */
  get indexEmpty(): boolean {
    this.syncNative();
    return this.lookupHalves().every((h) => h.index.empty);
  }

  /**
   * A resolver for lbns in [startLbn, endLbn): returns the newest logged state of an lbn,
   * or undefined if the tree holds the newest data. Valid until the next await.
   */
  resolver(startLbn: number, endLbn: number): (lbn: number) => IndexHit | undefined {
    this.syncNative();
    const halves = this.lookupHalves().filter((h) => !h.index.empty);
    if (halves.length === 0) return () => undefined;
    const ranges: LbnRange[][] = halves.map((h) => h.index.rangesIntersecting(startLbn, endLbn));
    return (lbn: number) => {
      for (let i = 0; i < halves.length; i++) {
        const hit = halves[i]!.index.lookup(lbn, ranges[i]!);
        if (hit) return hit;
      }
      return undefined;
    };
  }

  /** Copies the logged 4 KiB payload at a region offset into dst at dstOffset. */
  copyBlock(regionOffset: number, dst: Buffer, dstOffset: number): void {
    assert(regionOffset >= HEADER_PAGE_BYTES && regionOffset + BLOCK_SIZE_BYTES <= this.region.sizeBytes, 'copyBlock out of range');
    this.region.buffer.copy(dst, dstOffset, regionOffset, regionOffset + BLOCK_SIZE_BYTES);
  }

  /** A view (no copy) of a logged block; valid only while its half is not released. */
  /** A view of `bytes` (whole blocks) of logged payload at regionOffset, inside one half. */
  payloadView(regionOffset: number, bytes: number): Buffer {
    assert(bytes > 0 && bytes % BLOCK_SIZE_BYTES === 0 && regionOffset >= HEADER_PAGE_BYTES && regionOffset + bytes <= this.region.sizeBytes, 'payloadView out of range');
    return this.region.buffer.subarray(regionOffset, regionOffset + bytes);
  }

  blockView(regionOffset: number): Buffer {
    assert(regionOffset >= HEADER_PAGE_BYTES && regionOffset + BLOCK_SIZE_BYTES <= this.region.sizeBytes, 'blockView out of range');
    return this.region.buffer.subarray(regionOffset, regionOffset + BLOCK_SIZE_BYTES);
  }

  // ---- durability (group commit) ----

  /** Resolves once every record with seq <= `seq` is on stable storage. */
  waitDurable(seq: number): Promise<void> {
    this.syncNative();
    if (seq <= this.durable) return Promise.resolve();
    if (this.state === 'failed') return Promise.reject(this.failedError());
    assert(seq < this.nextSeq, `waitDurable(${seq}) beyond last seq ${this.nextSeq - 1}`);
    return new Promise<void>((resolve, reject) => {
      this.durableWaiters.push({ seq, resolve, reject });
      this.kickPersist();
    });
  }

  /** Resolves once every record appended so far is on stable storage. */
  flush(): Promise<void> {
    this.syncNative();
    return this.waitDurable(this.nextSeq - 1);
  }

  private kickPersist(): void {
    while (this.persistInFlight < PERSIST_ROUNDS_MAX && this.state !== 'failed') {
      const covered = Math.max(this.durable, this.persistCoveredSeq);
      if (!this.durableWaiters.some((w) => w.seq > covered)) return;
      this.startPersistRound();
    }
  }

  private startPersistRound(): void {
    this.persistInFlight++;
    this.persistRoundCount++;
    const capturedSeq = this.nextSeq - 1;
    this.persistCoveredSeq = capturedSeq;
    const rounds: Array<{ half: Half; generation: number; end: number }> = [];
    const ops: Promise<void>[] = [];
    for (const h of this.halves) {
      if (h.writeEnd <= h.persistedEnd) continue;
      const from = Math.floor(h.persistedEnd / PAGE_BYTES) * PAGE_BYTES;
      const to = Math.min(this.region.sizeBytes, Math.ceil(h.writeEnd / PAGE_BYTES) * PAGE_BYTES);
      rounds.push({ half: h, generation: h.generation, end: h.writeEnd });
      ops.push(this.region.persist(from, to - from));
    }
    Promise.all(ops).then(
      () => {
        this.persistInFlight--;
        for (const r of rounds) if (r.half.generation === r.generation && r.end > r.half.persistedEnd) r.half.persistedEnd = r.end;
        this.markDurable(capturedSeq);
        this.kickPersist();
      },
      (e: unknown) => {
        this.persistInFlight--;
        this.fail(new VolumeError('EIO', `NVRAM persist failed: ${e instanceof Error ? e.message : String(e)}`));
      },
    );
  }

  private markDurable(seq: number): void {
    if (seq <= this.durable) return;
    this.durable = seq;
    this.native?.setDurable(seq);
    let kept = 0;
    for (const w of this.durableWaiters) {
      if (w.seq <= seq) w.resolve();
      else this.durableWaiters[kept++] = w;
    }
    this.durableWaiters.length = kept;
  }

  private failedError(): Error {
    return this.failure ?? new VolumeError('EIO', 'NVRAM log failed');
  }

  /** Puts the log into the failed state: everything pending and later rejects. */
  fail(e: Error): void {
    if (this.state === 'failed' || this.state === 'closed') return;
    this.failure = e;
    this.state = 'failed';
    for (const w of this.durableWaiters) w.reject(e);
    this.durableWaiters.length = 0;
    for (let i = this.spaceWaitersHead; i < this.spaceWaiters.length; i++) this.spaceWaiters[i]!.reject(e);
    this.spaceWaiters.length = 0;
    this.spaceWaitersHead = 0;
    this.dequeuedTotal = this.queuedTotal;
    this.settleBarriers();
    this.refreshNative();
    this.refreshNativeFlush();
  }

  get failed(): boolean {
    return this.state === 'failed';
  }

  // ---- native appends (native-append.ts) ----

  /**
   * Lets the NBD threads append plain whole-block writes themselves (the returned
   * appender goes to them). `map`: the engine's read map, which their appends drop from.
   */
  enableNativeAppends(volumeBytes: number, map: object | undefined): NativeAppender {
    assert(this.state === 'running' && this.native === undefined, `enableNativeAppends in state ${this.state}`);
    this.native = NativeAppender.create(this.region.buffer, this.header.epoch, this.header.salt, this.layout.recordPayloadMaxBytes, volumeBytes, map);
    if (this.nativeGate) this.native.setGate(true);
    if (this.nativeForward) this.nativeForward.attach(this.native.handle, Math.max(this.nativeForward.fromSeq, this.nextSeq));
    this.refreshNative();
    this.refreshNativeFlush();
    return this.native;
  }

  get nativeAppender(): NativeAppender | undefined {
    return this.native;
  }

  /** Takes the threads' records in and stops them for good (before the region closes). */
  disableNativeAppends(): void {
    const n = this.native;
    if (n === undefined) return;
    n.drain(true, this.adoptNative);
    n.close();
    this.native = undefined;
    this.nativeFlushPath = null;
  }

  /** Lets (or stops) the threads answer plain FLUSHes themselves (the owner knows whether a replica allows it). */
  setNativeFlushAllowed(on: boolean): void {
    this.nativeFlushAllowed = on;
    this.refreshNativeFlush();
  }

  /** The threads answer FLUSH only while the log runs on a file region and the owner allows it. */
  private refreshNativeFlush(): void {
    const n = this.native;
    if (n === undefined) return;
    const path = this.nativeFlushAllowed && this.state === 'running' && this.region instanceof MmapNvram ? this.region.reopenPath : null;
    if (path === this.nativeFlushPath) return;
    if (path !== null && !n.setFlushFile(path)) {
      this.nativeFlushPath = null;
      logger().warn({ path }, 'the NBD threads cannot flush the NVRAM file themselves: FLUSH stays on the event loop');
      return;
    }
    if (path === null) n.setFlushFile(null);
    this.nativeFlushPath = path;
  }

  /** Stops (or lets again) the threads append, for a reason of the caller's (a replica, block locks). */
  setNativeBlocked(reason: string, blocked: boolean): void {
    if (blocked === this.nativeBlocks.has(reason)) return;
    if (blocked) this.nativeBlocks.add(reason);
    else this.nativeBlocks.delete(reason);
    this.refreshNative();
  }

  /**
   * Held replies: while on, a WRITE a thread appends is answered only once releaseNative()
   * covers its seq (or failNativeHeld() fails it); off answers every held one and holds no
   * more. For a replica that must hold each record before its reply (a sync mirror): the
   * threads may append meanwhile, the append hook forwards their records as they come in.
   */
  setNativeGate(on: boolean): void {
    if (on === this.nativeGate) return;
    this.nativeGate = on;
    this.native?.setGate(on);
  }

  /** The replica holds every record <= seq: the threads' held replies up to it go out. */
  releaseNative(seq: number): void {
    this.native?.release(seq);
  }

  /** Every held reply of a record the threads appended so far gets EIO. */
  failNativeHeld(): void {
    this.native?.failHeld();
  }

  /** Takes in the records the threads appended so far (indexed, hooks called). */
  syncNative(): void {
    this.native?.drain(false, this.adoptNative);
  }

  /** One record a thread wrote, taken in as writeRecord would have written it. */
  private readonly adoptNative = (seq: number, at: number, offsetBytes: number, lengthBytes: number, blockCrcs: Uint32Array, crcAt: number): void => {
    const half = this.active;
    if (!(half.state === 'active' && seq === this.nextSeq && at === half.writeEnd)) {
      assert(false, `native record seq ${seq} at ${at}: the log expected seq ${this.nextSeq} at ${half.writeEnd} of an active half`);
    }
    this.nextSeq++;
    half.writeEnd = at + recordSizeBytes(lengthBytes);
    assert(half.writeEnd <= half.end, 'native record beyond its half');
    if (half.records === 0) half.firstSeq = seq;
    half.lastSeq = seq;
    half.records++;
    const payloadAt = at + RECORD_HEADER_BYTES;
    half.setBlockCrcs(payloadAt, lengthBytes / BLOCK_SIZE_BYTES, blockCrcs, crcAt);
    this.indexRecord(half, RecordType.Write, offsetBytes, lengthBytes, payloadAt, seq);
    this.onAppend?.({ seq, type: RecordType.Write, flags: 0, offsetBytes, lengthBytes, payload: [this.region.buffer.subarray(payloadAt, payloadAt + lengthBytes)], viaThread: true });
  };

  /**
   * A sync mirror's native link (native/mirror_rx.cc, source mode) takes the threads'
   * records as they append them: `attach` is given the appender now (if there is one) and
   * whenever one is made later; undefined: no link. `first` runs while the threads are
   * stopped and their records taken in, with the seq of the first record the link gets
   * from them (nothing the threads append goes to the link before `first` returns).
   */
  forwardNative(attach: ((appender: object, fromSeq: number) => void) | undefined, first?: (fromSeq: number) => void): void {
    this.hold();
    try {
      const fromSeq = this.nextSeq;
      first?.(fromSeq);
      this.nativeForward = attach ? { attach, fromSeq } : undefined;
      if (attach && this.native) attach(this.native.handle, fromSeq);
      else this.native?.unforward();
    } finally {
      this.unhold();
    }
  }

  /** A section that changes the active half: the threads stop and their records come in first. */
  private hold(): void {
    if (this.nativeHolds++ === 0) this.native?.drain(true, this.adoptNative);
  }

  private unhold(): void {
    assert(this.nativeHolds > 0, 'unhold without hold');
    if (--this.nativeHolds === 0) this.refreshNative();
  }

  /** Leases the rest of the active half to the threads again if nothing stands in the way. */
  private refreshNative(): void {
    const n = this.native;
    if (n === undefined || this.nativeHolds > 0) return;
    n.drain(true, this.adoptNative);
    if (this.state !== 'running' || this.nativeBlocks.size > 0 || this.spaceWaiters.length > this.spaceWaitersHead || this.active.state !== 'active') return;
    n.resume(this.active.writeEnd, this.active.end, this.nextSeq, this.durable);
  }

  /** How full the active half is, in [0, 1] (records the threads appended included). */
  activeFill(): number {
    this.syncNative();
    return this.active.usedBytes / this.layout.halfSizeBytes;
  }

  /** Appends waiting for NVRAM space (a full active half while the other is frozen). */
  get spaceWaitersCount(): number {
    return this.spaceWaiters.length - this.spaceWaitersHead;
  }

  // ---- stats / close ----

  stats(): NvLogStats {
    this.syncNative();
    const other = this.halves[1 - this.active.id]!;
    const frozenUsed = other.state === 'frozen' ? other.usedBytes : 0;
    return {
      epoch: this.header.epoch,
      lastSeq: this.nextSeq - 1,
      durableSeq: this.durable,
      regionSizeBytes: this.region.sizeBytes,
      halfSizeBytes: this.layout.halfSizeBytes,
      usedBytes: this.active.usedBytes + frozenUsed,
      activeUsedBytes: this.active.usedBytes,
      frozenUsedBytes: frozenUsed,
      spaceWaiters: this.spaceWaitersCount,
      persistRounds: this.persistRoundCount,
    };
  }

  /** Stops accepting appends; pending waiters reject with ESHUTDOWN. The region is closed by its owner. */
  close(): void {
    if (this.state === 'closed') return;
    this.disableNativeAppends();
    const e = new VolumeError('ESHUTDOWN', 'NVRAM log closed');
    for (let i = this.spaceWaitersHead; i < this.spaceWaiters.length; i++) this.spaceWaiters[i]!.reject(e);
    this.spaceWaiters.length = 0;
    this.spaceWaitersHead = 0;
    this.dequeuedTotal = this.queuedTotal;
    this.settleBarriers();
    for (const w of this.durableWaiters) w.reject(e);
    this.durableWaiters.length = 0;
    this.state = 'closed';
  }
}
