/**
 * Block deltas: a metadata block a CP rewrites (an address block with a few new
 * pointers, a space-map leaf with a few bits changed) differs from the committed block
 * it replaces in a few 8-byte words. The mirror sends those words instead of 4 KiB; the
 * destination, which holds the replaced block, rebuilds the new one and checks its
 * crc32c before writing it.
 *
 * Format: runs of changed words, each `u16 firstWord | u16 wordCount | wordCount * 8
 * bytes`, in increasing, non-overlapping order. An empty delta means "identical".
 *
 * Invariants:
 * - applyDelta(prev, encodeDelta(prev, next)) equals next, byte for byte.
 * - applyDelta checks every run against the block bounds and the order, and never
 *   reads past the delta: a malformed delta is an error string, never a wrong block.
 */
import { deltaEncode } from '../io/native';
import { BLOCK_BYTES } from './wire';

const WORD_BYTES = 8;
const WORDS = BLOCK_BYTES / WORD_BYTES;
const RUN_HEADER_BYTES = 4;
/** prevPba of a delta against a block of zeroes (a new block; pba 0 is a superblock slot, never a base). */
export const DELTA_FROM_ZEROES = 0;
/** The block a delta from zeroes applies to (never written to). */
export const ZERO_BLOCK: Buffer = Buffer.alloc(BLOCK_BYTES);
/** A delta larger than this is not worth it: send the block. */
export const DELTA_MAX_BYTES = 2048;

/** Lines compared with one native memcmp first: most of a metadata block is unchanged. */
const LINE_BYTES = 256;

function wordDiffers(a: Buffer, b: Buffer, w: number): boolean {
  const o = w * WORD_BYTES;
  return a.readUInt32LE(o) !== b.readUInt32LE(o) || a.readUInt32LE(o + 4) !== b.readUInt32LE(o + 4);
}

const encodeOut = Buffer.allocUnsafeSlow(DELTA_MAX_BYTES);

/** The delta from prev to next, or undefined when it would exceed DELTA_MAX_BYTES (native: native/delta.cc). */
export function encodeDelta(prev: Buffer, next: Buffer): Buffer | undefined {
  if (prev.length !== BLOCK_BYTES || next.length !== BLOCK_BYTES) throw new RangeError('deltas are between 4 KiB blocks');
  const n = deltaEncode(prev, next, encodeOut);
  if (n < 0) return undefined;
  const d = Buffer.allocUnsafe(n); // small: from Node's pool
  encodeOut.copy(d, 0, 0, n);
  return d;
}

/**
 * The delta to `next` from a previous block that equals it outside `runs` (word runs:
 * firstWord, wordCount pairs, increasing, not overlapping: CpBlock.changedRuns), without
 * the previous block: each run travels whole. Undefined when it would exceed DELTA_MAX_BYTES.
 */
export function encodeDeltaRuns(next: Buffer, runs: readonly number[]): Buffer | undefined {
  if (next.length !== BLOCK_BYTES) throw new RangeError('deltas are between 4 KiB blocks');
  if (runs.length % 2 !== 0) throw new RangeError('word runs come in (first, count) pairs');
  let size = 0;
  let minWord = 0;
  for (let i = 0; i < runs.length; i += 2) {
    const first = runs[i]!;
    const count = runs[i + 1]!;
    if (!(Number.isInteger(first) && Number.isInteger(count) && count > 0 && first >= minWord && first + count <= WORDS)) {
      throw new RangeError(`word run (${first}, ${count}) out of order or out of the block`);
    }
    minWord = first + count;
    size += RUN_HEADER_BYTES + count * WORD_BYTES;
  }
  if (size > DELTA_MAX_BYTES) return undefined;
  const d = Buffer.allocUnsafe(size); // small: from Node's pool
  let at = 0;
  for (let i = 0; i < runs.length; i += 2) {
    const first = runs[i]!;
    const count = runs[i + 1]!;
    d.writeUInt16LE(first, at);
    d.writeUInt16LE(count, at + 2);
    next.copy(d, at + RUN_HEADER_BYTES, first * WORD_BYTES, (first + count) * WORD_BYTES);
    at += RUN_HEADER_BYTES + count * WORD_BYTES;
  }
  return d;
}

/** The same encoder in TypeScript: the reference the native one is tested against. */
export function encodeDeltaJs(prev: Buffer, next: Buffer): Buffer | undefined {
  if (prev.length !== BLOCK_BYTES || next.length !== BLOCK_BYTES) throw new RangeError('deltas are between 4 KiB blocks');
  const parts: Buffer[] = [];
  let size = 0;
  let w = 0;
  while (w < WORDS) {
    // Skip whole equal lines at once (native compare), then find the first differing word.
    if (w % (LINE_BYTES / WORD_BYTES) === 0) {
      const at = w * WORD_BYTES;
      if (prev.compare(next, at, at + LINE_BYTES, at, at + LINE_BYTES) === 0) {
        w += LINE_BYTES / WORD_BYTES;
        continue;
      }
    }
    if (!wordDiffers(prev, next, w)) {
      w++;
      continue;
    }
    let end = w + 1;
    // Extend over runs of differing words, bridging a single equal word (a header is cheaper than a split).
    while (end < WORDS) {
      if (wordDiffers(prev, next, end)) end++;
      else if (end + 1 < WORDS && wordDiffers(prev, next, end + 1)) end += 2;
      else break;
    }
    const h = Buffer.allocUnsafe(RUN_HEADER_BYTES);
    h.writeUInt16LE(w, 0);
    h.writeUInt16LE(end - w, 2);
    parts.push(h, next.subarray(w * WORD_BYTES, end * WORD_BYTES));
    size += RUN_HEADER_BYTES + (end - w) * WORD_BYTES;
    if (size > DELTA_MAX_BYTES) return undefined;
    w = end;
  }
  return Buffer.concat(parts, size);
}

/** next = prev with the delta's runs applied (a new buffer), or a one-line reason the delta is malformed. */
export function applyDelta(prev: Buffer, delta: Buffer): Buffer | string {
  if (prev.length !== BLOCK_BYTES) return 'previous block is not 4 KiB';
  const out = Buffer.allocUnsafe(BLOCK_BYTES);
  prev.copy(out);
  const why = applyDeltaInPlace(out, delta);
  return why ?? out;
}

/**
 * Applies the delta's runs to `block` (which holds the previous block) in place; a
 * one-line reason if the delta is malformed (then `block` may be partly changed: the
 * caller discards it).
 */
export function applyDeltaInPlace(out: Buffer, delta: Buffer): string | undefined {
  if (out.length !== BLOCK_BYTES) return 'previous block is not 4 KiB';
  let at = 0;
  let minWord = 0;
  while (at < delta.length) {
    if (at + RUN_HEADER_BYTES > delta.length) return 'truncated run header';
    const first = delta.readUInt16LE(at);
    const count = delta.readUInt16LE(at + 2);
    at += RUN_HEADER_BYTES;
    if (count === 0 || first < minWord || first + count > WORDS) return `run of ${count} words at word ${first} out of order or out of the block`;
    const bytes = count * WORD_BYTES;
    if (at + bytes > delta.length) return 'truncated run';
    delta.copy(out, first * WORD_BYTES, at, at + bytes);
    at += bytes;
    minWord = first + count;
  }
  return undefined;
}
