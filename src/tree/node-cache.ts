/**
 * A bounded LRU cache of verified address blocks, keyed by physical address.
 *
 * Invariants:
 * - At most `capacity` entries; inserting beyond evicts the least recently used.
 * - An entry is only returned when the caller's pointer matches the birth CP and
 *   checksum it was verified against, so a reused address can never serve a stale
 *   block (blocks are immutable while referenced; a new birth means a new block).
 * - Cached buffers are never handed out for mutation: callers copy before changing. The
 *   one exception is a CP replacing the block (takeForEdit): it may change the buffer
 *   itself only when the entry still holds that buffer and no caller was ever handed it
 *   (`lent` is set by every get and by a put of a buffer its putter returns to a
 *   caller, and never cleared), and the entry is dropped in the same synchronous step, so
 *   nobody can be handed it afterwards. An evicted entry's buffer counts as lent.
 */
import { assert } from '../util/assert';
import type { BlockPtr } from './layout';

interface Entry {
  birth: number;
  crc: number;
  buf: Buffer;
  /** Handed to a caller since it was put (it may be held across awaits: never changed in place). */
  lent: boolean;
}

export class NodeCache {
  private readonly map = new Map<number, Entry>();
  hits = 0;
  misses = 0;

  constructor(readonly capacity: number) {
    assert(Number.isSafeInteger(capacity) && capacity >= 16, `node cache capacity ${capacity} must be >= 16`);
  }

  /** The cached block for p (most recently used now), or undefined; countMiss false: a probe that is not counted as a miss. */
  get(p: BlockPtr, countMiss = true): Buffer | undefined {
    const e = this.map.get(p.pba);
    if (!e || e.birth !== p.birth || e.crc !== p.crc) {
      if (countMiss) this.misses++;
      return undefined;
    }
    this.map.delete(p.pba);
    this.map.set(p.pba, e);
    this.hits++;
    e.lent = true;
    return e.buf;
  }

  /**
   * For a CP about to replace the block at p: the cached buffer, without lending it (the
   * CP only reads it until takeForEdit, or copies it), counted as a hit; undefined if absent.
   */
  getForEdit(p: BlockPtr): Buffer | undefined {
    const e = this.map.get(p.pba);
    if (!e || e.birth !== p.birth || e.crc !== p.crc) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    return e.buf;
  }

  /**
   * A CP replaces the block at p and holds buf from getForEdit: true (the entry dropped,
   * buf the caller's to change) when the entry still holds buf and it was never lent;
   * false otherwise (copy it), the entry dropped either way.
   */
  takeForEdit(p: BlockPtr, buf: Buffer): boolean {
    const e = this.map.get(p.pba);
    const mine = e !== undefined && e.buf === buf && e.birth === p.birth && e.crc === p.crc && !e.lent;
    this.map.delete(p.pba);
    return mine;
  }

  /** lent: the putter hands buf to a caller too (a read); false only for a CP's own new block, which nothing else holds once the CP ends. */
  put(p: BlockPtr, buf: Buffer, lent: boolean): void {
    this.map.delete(p.pba);
    this.map.set(p.pba, { birth: p.birth, crc: p.crc, buf, lent });
    while (this.map.size > this.capacity) {
      const oldest = this.map.keys().next();
      assert(!oldest.done, 'cache over capacity but empty');
      this.map.delete(oldest.value);
    }
  }

  /** Drops the entry for a pba (e.g. an address block the CP replaced), if any. */
  delete(pba: number): void {
    this.map.delete(pba);
  }

  get size(): number {
    return this.map.size;
  }

  clear(): void {
    this.map.clear();
  }
}
