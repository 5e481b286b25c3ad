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
 *   EARLY_IN_FLIGHT_BLOCKS_MAX are being written at once. Skipping placement is always
 *   correct: the CP then writes the block itself.
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
/** Blocks being written ahead of their CP at once (64 MiB). */
export const EARLY_IN_FLIGHT_BLOCKS_MAX = 16384;
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

export class EarlyPlacer {
  private readonly halves = new Map<Half, Placement>();
  private inFlight = 0;
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
      const first = block;
      // One view of the run's payload (contiguous in the record).
      const view = this.nvlog.payloadView(payloadOffset + first * 4096, r.count * 4096);
      block += r.count;
      const w: Promise<void> = this.early.write(r.pba, [view]).then(
        () => {
          for (let k = 0; k < r.count; k++) placement.byOffset.set(payloadOffset + (first + k) * 4096, r.pba + k);
          this.stats.placedBlocks += r.count;
        },
        (e: unknown) => {
          // Left to the CP (which writes these blocks itself); the reserved ones go back at finish.
          if (!this.warned) {
            this.warned = true;
            logger().warn({ err: e instanceof Error ? e.message : String(e), pba: r.pba, blocks: r.count }, 'early data placement: a write failed; the CP writes such blocks itself');
          }
        },
      ).finally(() => {
        this.inFlight -= r.count;
        placement.pending.delete(w);
      });
      placement.pending.add(w);
    }
  }

  /**
   * The half's CP begins: nothing more is placed for it; resolves, once every placement
   * write of the half has ended, to where its completed blocks are (by region offset).
   */
  async settle(half: Half): Promise<ReadonlyMap<number, number> | undefined> {
    const p = this.halves.get(half);
    if (p === undefined || p.generation !== half.generation) return undefined;
    p.closed = true;
    while (p.pending.size > 0) await Promise.all([...p.pending]);
    return p.byOffset;
  }

  /** Nothing more is placed; resolves once every placement write has ended (before the device closes). */
  async close(): Promise<void> {
    this.closed = true;
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
