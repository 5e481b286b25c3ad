/**
 * Early data placement: the blocks of a large WRITE are written to free blocks of the
 * member while their NVRAM half still fills, so the CP that drains the half points at them
 * instead of writing them then (issue 10, items 2 and 3: a CP of sequential writes spent
 * most of its time writing and syncing its data; see docs/benchmarks.md, "Early data
 * placement"). The NVRAM record stays as it is: recovery and the mirror see no difference.
 *
 * Invariants:
 * - Only WRITE records of at least EARLY_MIN_BLOCKS blocks in the active half are placed.
 *   Their payload in the region does not change until the half is released, which follows
 *   the half's CP, which waits for every placement write of the half first (settle).
 * - A block is offered to the CP only if its write completed; the CP takes it only where
 *   the half's index still names that payload for its lbn (commit-half.ts compares region
 *   offsets), so a block rewritten or trimmed later in the half is never adopted.
 * - Blocks are reserved only with room for any CP besides (EarlyPlacementApi.reserve's
 *   keepFree), never while a discard runs (the tree refuses), and at most
 *   EARLY_IN_FLIGHT_BLOCKS_MAX wait to be written; EARLY_WRITES_AT_ONCE writes run at a
 *   time, and a half's writes not started when its CP begins are dropped (settle).
 *   Skipping placement is always correct: the CP then writes the block itself.
 * - Every block reserved for a half is adopted by its CP or given back (finish), whether
 *   the CP succeeded or not. Reserved blocks are in no persisted set: after a crash they
 *   are free, and nothing referenced them.
 */
import type { Half, NvLog } from '../nvlog/log';
import type { EarlyPlacementApi } from '../tree/types';
import { log as logger } from '../util/log';
import { assert } from '../util/assert';

/** Records shorter than this (in 4 KiB blocks) are left to the CP: 256 KiB. */
export const EARLY_MIN_BLOCKS = 64;
/** Blocks reserved and not yet written (queued or being written), at most: 64 MiB. */
export const EARLY_IN_FLIGHT_BLOCKS_MAX = 16384;
/** Placement writes started at once (each at most a record, a few MiB): the CP's reads and writes share the thread pool. */
export const EARLY_WRITES_AT_ONCE = 2;
/**
 * Free blocks kept beyond a placement, on top of the tree's own margin (its space-map
 * blocks): what the CP of the other half may need, its data and at most as many address
 * blocks, and some more. So placement never makes a CP fail for space.
 */
function keepFreeFor(halfSizeBytes: number): number {
  return 2 * Math.ceil(halfSizeBytes / 4096) + 1024;
}

interface Placement {
  /** The half's generation when its first record was placed. */
  generation: number;
  /** Region offset of a logged block -> the pba its data was written to (writes complete). */
  readonly byOffset: Map<number, number>;
  readonly runs: { pba: number; count: number }[];
  readonly pending: Set<Promise<void>>;
  /** Its CP has begun: nothing more is placed. */
  closed: boolean;
}

export interface EarlyPlacerOptions {
  /** Shortest record placed, in blocks (default EARLY_MIN_BLOCKS). */
  minBlocks?: number;
  /** Free blocks kept beyond a placement (default: two halves' blocks and 1024 more); the tree adds its own margin. */
  keepFreeBlocks?: number;
}

export interface EarlyStats {
  /** Blocks written ahead of their CP. */
  placedBlocks: number;
  /** Of those, blocks a CP took where they were. */
  adoptedBlocks: number;
  /** Records long enough that were left to the CP (no room, a discard running, too much in flight). */
  skippedRecords: number;
}

/** A placement write: queued, then started (at most EARLY_WRITES_AT_ONCE at a time). */
interface Job {
  placement: Placement;
  pba: number;
  count: number;
  /** Region offset of its first block's payload. */
  payloadAt: number;
  view: Buffer;
  /** Resolved when it ended (written, failed, or cancelled before it started). */
  done: () => void;
}

export class EarlyPlacer {
  private readonly halves = new Map<Half, Placement>();
  /** Blocks reserved and not yet written (queued or being written). */
  private inFlight = 0;
  private readonly queue: Job[] = [];
  private writing = 0;
  private warned = false;
  private closed = false;
  private readonly keepFree: number;
  readonly stats: EarlyStats = { placedBlocks: 0, adoptedBlocks: 0, skippedRecords: 0 };

  private readonly minBlocks: number;

  constructor(private readonly nvlog: NvLog, private readonly early: EarlyPlacementApi, halfSizeBytes: number, opts: EarlyPlacerOptions = {}) {
    this.keepFree = opts.keepFreeBlocks ?? keepFreeFor(halfSizeBytes);
    this.minBlocks = opts.minBlocks ?? EARLY_MIN_BLOCKS;
    assert(Number.isSafeInteger(this.keepFree) && this.keepFree >= 0 && Number.isSafeInteger(this.minBlocks) && this.minBlocks >= 1, 'early placement thresholds');
  }

  /** NvLog.onWriteIndexed: a WRITE record whose payload is whole at payloadOffset. */
  offer(half: Half, startLbn: number, count: number, payloadOffset: number): void {
    if (count < this.minBlocks || half.state !== 'active' || this.closed) return;
    let p = this.halves.get(half);
    if (p !== undefined && p.generation !== half.generation) {
      // Cannot happen (finish runs before the half is released); give the blocks back if it does.
      this.early.drop(p.runs);
      this.halves.delete(half);
      p = undefined;
    }
    if (p?.closed) return;
    if (this.inFlight + count > EARLY_IN_FLIGHT_BLOCKS_MAX) {
      this.stats.skippedRecords++;
      return;
    }
    const runs = this.early.reserve(count, this.keepFree);
    if (runs === undefined) {
      this.stats.skippedRecords++;
      return;
    }
    if (p === undefined) {
      p = { generation: half.generation, byOffset: new Map(), runs: [], pending: new Set(), closed: false };
      this.halves.set(half, p);
    }
    const placement = p;
    placement.runs.push(...runs);
    this.inFlight += count;
    let block = 0;
    for (const r of runs) {
      const payloadAt = payloadOffset + block * 4096;
      block += r.count;
      let done: () => void = () => undefined;
      const ended = new Promise<void>((resolve) => { done = resolve; });
      placement.pending.add(ended);
      // One view of the run's payload (contiguous in the record).
      this.queue.push({ placement, pba: r.pba, count: r.count, payloadAt, view: this.nvlog.payloadView(payloadAt, r.count * 4096), done: () => {
        placement.pending.delete(ended);
        done();
      } });
    }
    this.pump();
  }

  /** Starts queued writes while fewer than EARLY_WRITES_AT_ONCE run (the CP's own I/O shares the thread pool). */
  private pump(): void {
    while (this.writing < EARLY_WRITES_AT_ONCE && this.queue.length > 0) {
      const job = this.queue.shift()!;
      this.writing++;
      this.early.write(job.pba, [job.view]).then(
        () => {
          for (let k = 0; k < job.count; k++) job.placement.byOffset.set(job.payloadAt + k * 4096, job.pba + k);
          this.stats.placedBlocks += job.count;
        },
        (e: unknown) => {
          // Left to the CP (which writes these blocks itself); the reserved ones go back at finish.
          if (!this.warned) {
            this.warned = true;
            logger().warn({ err: e instanceof Error ? e.message : String(e), pba: job.pba, blocks: job.count }, 'early data placement: a write failed; the CP writes such blocks itself');
          }
        },
      ).finally(() => {
        this.writing--;
        this.inFlight -= job.count;
        job.done();
        this.pump();
      });
    }
  }

  /** Drops the queued (not started) writes of placement p: their blocks are the CP's to write. */
  private cancelQueued(p: Placement | undefined): void {
    let kept = 0;
    for (const job of this.queue) {
      if (p === undefined || job.placement === p) {
        this.inFlight -= job.count;
        job.done();
      } else {
        this.queue[kept++] = job;
      }
    }
    this.queue.length = kept;
  }

  /**
   * The half's CP begins: nothing more is placed for it, its writes not started yet are
   * dropped (the CP writes those blocks); resolves, once its started writes have ended, to
   * where its completed blocks are (by region offset).
   */
  async settle(half: Half): Promise<ReadonlyMap<number, number> | undefined> {
    const p = this.halves.get(half);
    if (p === undefined || p.generation !== half.generation) return undefined;
    p.closed = true;
    this.cancelQueued(p);
    while (p.pending.size > 0) await Promise.all([...p.pending]);
    return p.byOffset;
  }

  /** Nothing more is placed; resolves once every placement write has ended (before the device closes). */
  async close(): Promise<void> {
    this.closed = true;
    this.cancelQueued(undefined);
    for (;;) {
      const pending = [...this.halves.values()].flatMap((p) => [...p.pending]);
      if (pending.length === 0) return;
      await Promise.all(pending);
    }
  }

  /** The half's CP ended (committed or failed): blocks it did not adopt are free again. */
  finish(half: Half, adopted: number): void {
    const p = this.halves.get(half);
    if (p === undefined) return;
    this.halves.delete(half);
    this.stats.adoptedBlocks += adopted;
    this.early.drop(p.runs);
  }
}
