/**
 * Reusable buffers for the bodies of CP_BLOCKS frames on the receiver.
 *
 * A baseline streams ~1 GiB/s of 256 KiB frames. Assembled each in a fresh Buffer, they
 * outlive a scavenge (a frame waits in the queue and in a device write), so V8 counts
 * them as old external memory and runs a full mark-compact every ~64 MiB (~40% of the
 * receiver's busy time in the baseline profile), and every fresh allocation faults its
 * pages in again. A slab is allocated once and reused.
 *
 * Invariants:
 * - A slab goes back to the free list only when its count of holders reaches zero: the
 *   message its frame decoded to (until handled), and each staged run and device write
 *   that has a view of it (until the write completes). Anything that may still read it
 *   holds it.
 * - A holder that is dropped without a release (a session that ends mid-CP, a refused
 *   write) only leaves the slab to the garbage collector: a missed release costs an
 *   allocation, never data.
 * - A slab starts at a 4096-byte aligned address (an O_DIRECT write takes whole blocks of
 *   it without a bounce copy when the body was placed so that its blocks are aligned).
 * - The free list keeps at most keepMax slabs (keepMax x slabBytes of idle memory per
 *   receiver process); a take() from an empty list allocates. trimIdle() lets a pool
 *   that saw no take since its last call shrink to fewer.
 */
import { allocAligned } from '../io/aligned';
import { assert } from '../util/assert';

export interface FrameSlab {
  readonly buf: Buffer;
  /** Holders (see the invariants); 0 only while on the free list. */
  refs: number;
}

export class SlabPool {
  private readonly free: FrameSlab[] = [];
  /** Slabs allocated so far (the rest of the takes were reuses). */
  allocated = 0;
  takes = 0;
  private takesAtTrim = 0;

  constructor(readonly slabBytes: number, readonly keepMax: number) {
    assert(Number.isSafeInteger(slabBytes) && slabBytes > 0 && Number.isSafeInteger(keepMax) && keepMax >= 0, 'slab pool shape');
  }

  /** A slab for a body of `bytes` (held once, by the caller), or undefined if it does not fit one. */
  take(bytes: number): FrameSlab | undefined {
    if (bytes > this.slabBytes) return undefined;
    this.takes++;
    let s = this.free.pop();
    if (!s) {
      s = { buf: allocAligned(this.slabBytes, 4096), refs: 0 };
      this.allocated++;
    }
    assert(s.refs === 0, 'a slab on the free list has holders');
    s.refs = 1;
    return s;
  }

  hold(s: FrameSlab): void {
    assert(s.refs > 0, 'hold of a free slab');
    s.refs++;
  }

  release(s: FrameSlab): void {
    assert(s.refs > 0, 'release of a free slab');
    s.refs--;
    if (s.refs === 0 && this.free.length < this.keepMax) this.free.push(s);
  }

  /**
   * Called periodically: if nothing was taken since the last call, keeps at most `keep`
   * idle slabs (the rest go to the garbage collector). A stream in progress keeps its
   * whole working set (a slab dropped only to be allocated again costs a fresh
   * allocation, its page faults, and V8's external-memory GCs); an idle receiver does not.
   */
  trimIdle(keep: number): void {
    if (this.takes === this.takesAtTrim && this.free.length > keep) this.free.length = keep;
    this.takesAtTrim = this.takes;
  }

  get freeCount(): number {
    return this.free.length;
  }
}

const BLOCK = 4096;

/**
 * `count` 4 KiB blocks in pooled slabs: where the receiver rebuilds the blocks of a
 * CP_REFS or CP_DELTAS frame (copied from its log, or a base block with a delta applied)
 * instead of a fresh Buffer each. The caller holds every slab once until release(); a
 * staged run that keeps a view holds its slab itself (slabOf).
 */
export class BlockSlots {
  private readonly slabs: FrameSlab[] = [];
  private readonly perSlab: number;

  constructor(private readonly pool: SlabPool, readonly count: number) {
    this.perSlab = Math.floor(pool.slabBytes / BLOCK);
    assert(this.perSlab >= 1, 'slabs hold at least one block');
    for (let i = 0; i < count; i += this.perSlab) this.slabs.push(pool.take(Math.min(this.perSlab, count - i) * BLOCK)!);
  }

  block(i: number): Buffer {
    assert(i >= 0 && i < this.count, `block slot ${i} of ${this.count}`);
    const k = i % this.perSlab;
    return this.slabOf(i).buf.subarray(k * BLOCK, (k + 1) * BLOCK);
  }

  slabOf(i: number): FrameSlab {
    const s = this.slabs[Math.floor(i / this.perSlab)];
    assert(s !== undefined, `block slot ${i} after release`);
    return s;
  }

  /** The caller's holds go back (staged runs keep theirs). */
  release(): void {
    for (const s of this.slabs) this.pool.release(s);
    this.slabs.length = 0;
  }
}
