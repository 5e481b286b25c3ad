/**
 * In-memory index over the records of one NVRAM half: which logical blocks the half
 * changes, and to what. Reads consult it (newest half first) before the tree; a CP turns
 * it into the BlockChange list of the half.
 *
 * Invariants:
 * - `blocks` maps an lbn to the region offset of the newest 4 KiB payload for it in this
 *   half; an lbn in `blocks` is newer than every zero range of this half covering it
 *   (adding a zero range deletes the entries it covers).
 * - Zero ranges (trim and write-zeroes both leave holes) are kept in append order; their
 *   count is capped by the log (a half with too many ranges counts as full).
 * - The map holds at most halfSize / 4096 entries (each write block occupies 4 KiB of
 *   the half), so the index is bounded by the NVRAM size.
 */
import { assert } from '../util/assert';

export type IndexHit = { kind: 'data'; regionOffset: number } | { kind: 'zero' };

export interface LbnRange {
  startLbn: number;
  /** Exclusive. */
  endLbn: number;
}

export const ZERO_HIT: IndexHit = Object.freeze({ kind: 'zero' }) as IndexHit;

export class HalfIndex {
  readonly blocks = new Map<number, number>();
  readonly zeroRanges: LbnRange[] = [];

  get empty(): boolean {
    return this.blocks.size === 0 && this.zeroRanges.length === 0;
  }

  clear(): void {
    this.blocks.clear();
    this.zeroRanges.length = 0;
  }

  addWrite(startLbn: number, count: number, payloadRegionOffset: number): void {
    assert(count > 0 && Number.isSafeInteger(startLbn) && startLbn >= 0, 'addWrite: bad range');
    for (let i = 0; i < count; i++) this.blocks.set(startLbn + i, payloadRegionOffset + i * 4096);
  }

  addZero(startLbn: number, endLbn: number): void {
    assert(endLbn > startLbn && startLbn >= 0, 'addZero: bad range');
    if (endLbn - startLbn <= this.blocks.size) {
      for (let lbn = startLbn; lbn < endLbn; lbn++) this.blocks.delete(lbn);
    } else {
      for (const lbn of this.blocks.keys()) if (lbn >= startLbn && lbn < endLbn) this.blocks.delete(lbn);
    }
    this.zeroRanges.push({ startLbn, endLbn });
  }

  /** Zero ranges that intersect [startLbn, endLbn). */
  rangesIntersecting(startLbn: number, endLbn: number): LbnRange[] {
    const out: LbnRange[] = [];
    for (const r of this.zeroRanges) if (r.startLbn < endLbn && r.endLbn > startLbn) out.push(r);
    return out;
  }

  /** The newest state of lbn in this half; `ranges` may be a pre-filtered subset of zeroRanges. */
  lookup(lbn: number, ranges: readonly LbnRange[] = this.zeroRanges): IndexHit | undefined {
    const off = this.blocks.get(lbn);
    if (off !== undefined) return { kind: 'data', regionOffset: off };
    for (let i = ranges.length - 1; i >= 0; i--) {
      const r = ranges[i]!;
      if (lbn >= r.startLbn && lbn < r.endLbn) return ZERO_HIT;
    }
    return undefined;
  }

  /** The zero ranges merged into disjoint sorted ranges. */
  mergedZeroRanges(): LbnRange[] {
    const sorted = [...this.zeroRanges].sort((a, b) => a.startLbn - b.startLbn);
    const out: LbnRange[] = [];
    for (const r of sorted) {
      const last = out[out.length - 1];
      if (last && r.startLbn <= last.endLbn) last.endLbn = Math.max(last.endLbn, r.endLbn);
      else out.push({ startLbn: r.startLbn, endLbn: r.endLbn });
    }
    return out;
  }
}
