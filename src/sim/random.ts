/**
 * Seeded randomness for the simulator: a small counter-based generator (a Weyl sequence
 * through a 32-bit avalanche mixer) and a stateless hash for decisions that must not
 * depend on the order in which unrelated calls happen.
 *
 * Invariants:
 * - Everything here is a pure function of the seed (and the call sequence for
 *   SeededRandom): the same seed replays the same stream, on any machine.
 * - next() is uniform in [0, 1) with 32 bits of resolution; int(n) is in [0, n).
 * - fork(label) derives an independent stream without disturbing the parent's
 *   sequence, so adding a consumer of one stream never shifts another.
 */
import type { Random } from '../io/types';
import { assert } from '../util/assert';

const GOLDEN = 0x9e3779b9;
const TWO_32 = 0x100000000;

/** A 32-bit avalanche mixer: every input bit affects every output bit. */
export function mix32(x: number): number {
  let h = x >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Hashes non-negative safe integers (each split into 32-bit halves) into 32 bits. */
export function hash32(...parts: readonly number[]): number {
  let h = GOLDEN;
  for (const p of parts) {
    assert(Number.isSafeInteger(p) && p >= 0, `hash32: bad part ${p}`);
    h = mix32((h ^ mix32(p % TWO_32)) + GOLDEN);
    h = mix32((h ^ Math.floor(p / TWO_32)) + 0x6a09e667);
  }
  return h;
}

/** Hashes a string into 32 bits (for naming streams by device name). */
export function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = mix32(h ^ s.charCodeAt(i));
  return h;
}

/** Uniform in [0, 1) from a 32-bit hash. */
export function unitFrom(h: number): number {
  return (h >>> 0) / TWO_32;
}

export class SeededRandom implements Random {
  private state: number;
  constructor(readonly seed: number) {
    assert(Number.isSafeInteger(seed) && seed >= 0, `seed must be a non-negative safe integer, got ${seed}`);
    this.state = hash32(seed);
  }

  next32(): number {
    this.state = (this.state + GOLDEN) >>> 0;
    return mix32(this.state);
  }

  next(): number {
    return this.next32() / TWO_32;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    assert(Number.isSafeInteger(n) && n >= 1 && n <= TWO_32, `int: bad bound ${n}`);
    return Math.floor(this.next() * n);
  }

  /** Uniform integer in [lo, hi] (inclusive). */
  range(lo: number, hi: number): number {
    assert(hi >= lo, `range: ${lo} > ${hi}`);
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return p > 0 && this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    assert(items.length > 0, 'pick from an empty list');
    return items[this.int(items.length)]!;
  }

  /** Index chosen with probability proportional to weights[i]. */
  weighted(weights: readonly number[]): number {
    let total = 0;
    for (const w of weights) total += Math.max(0, w);
    assert(total > 0, 'weighted: all weights are zero');
    let r = this.next() * total;
    for (let i = 0; i < weights.length; i++) {
      r -= Math.max(0, weights[i]!);
      if (r < 0) return i;
    }
    return weights.length - 1;
  }

  /** An independent stream named by `label`; does not advance this one. */
  fork(label: number): SeededRandom {
    return new SeededRandom(hash32(this.seed, label, 0x5eed));
  }
}
