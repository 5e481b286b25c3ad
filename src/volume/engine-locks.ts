/**
 * Per-block ordering for read-modify-write: a write that covers only part of a 4 KiB
 * block reads the block's newest contents, merges, and logs the whole block. Two such
 * writes to the same block (e.g. two 512-byte sectors written concurrently) must not
 * both start from the same base, or one would be lost. BlockLocks chains the
 * operations that touch a block being read-modified-written.
 *
 * Invariants:
 * - `tails` maps an lbn to the completion promise of the newest operation registered on
 *   it; an entry is removed by its own operation when it completes, unless a newer one
 *   has replaced it.
 * - Entries exist only for operations in flight, so the map is bounded by the NBD
 *   layer's in-flight request cap times the lbns each registers (<= 2 partial blocks
 *   plus the already-locked lbns it overlaps).
 */
import { assert } from '../util/assert';

export interface LockHandle {
  /** Resolves when every earlier operation on these lbns has completed. */
  ready: Promise<void>;
  release(): void;
}

export class BlockLocks {
  private readonly tails = new Map<number, Promise<void>>();

  get size(): number {
    return this.tails.size;
  }

  /** The lbns in [startLbn, endLbn) that an in-flight operation holds. */
  lockedIn(startLbn: number, endLbn: number): number[] {
    if (this.tails.size === 0) return [];
    const out: number[] = [];
    if (endLbn - startLbn <= this.tails.size) {
      for (let l = startLbn; l < endLbn; l++) if (this.tails.has(l)) out.push(l);
    } else {
      for (const l of this.tails.keys()) if (l >= startLbn && l < endLbn) out.push(l);
    }
    return out;
  }

  acquire(lbns: readonly number[]): LockHandle {
    assert(lbns.length > 0, 'acquire of no lbns');
    let release!: () => void;
    const mine = new Promise<void>((r) => { release = r; });
    const previous: Promise<void>[] = [];
    const unique = [...new Set(lbns)];
    for (const l of unique) {
      const prev = this.tails.get(l);
      if (prev) previous.push(prev);
      this.tails.set(l, mine);
    }
    let released = false;
    return {
      ready: previous.length === 0 ? Promise.resolve() : Promise.all(previous).then(() => undefined),
      release: () => {
        assert(!released, 'lock released twice');
        released = true;
        for (const l of unique) if (this.tails.get(l) === mine) this.tails.delete(l);
        release();
      },
    };
  }
}
