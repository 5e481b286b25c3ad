/**
 * A bounded LRU cache of verified address blocks, keyed by physical address.
 *
 * Invariants:
 * - At most `capacity` entries; inserting beyond evicts the least recently used.
 * - An entry is only returned when the caller's pointer matches the birth CP and
 *   checksum it was verified against, so a reused address can never serve a stale
 *   block (blocks are immutable while referenced; a new birth means a new block).
 * - Cached buffers are never handed out for mutation: callers copy before changing.
 */
import { assert } from '../util/assert';
import type { BlockPtr } from './layout';

interface Entry {
  birth: number;
  crc: number;
  buf: Buffer;
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
    return e.buf;
  }

  /** The cached block for p, if any, without touching its recency or the counters. */
  peek(p: BlockPtr): Buffer | undefined {
    const e = this.map.get(p.pba);
    return e && e.birth === p.birth && e.crc === p.crc ? e.buf : undefined;
  }

  put(p: BlockPtr, buf: Buffer): void {
    this.map.delete(p.pba);
    this.map.set(p.pba, { birth: p.birth, crc: p.crc, buf });
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
