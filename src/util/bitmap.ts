/**
 * Bit arrays over physical block addresses, bit p of byte p>>3 (least significant first).
 *
 * Invariants:
 * - Buffers are a whole number of space-map leaves long (zero beyond the device's end).
 * - Counting helpers never read past the buffer.
 */
import { assert } from './assert';

export function testBit(b: Buffer, p: number): boolean {
  return (b[p >>> 3]! & (1 << (p & 7))) !== 0;
}

export function setBit(b: Buffer, p: number): void {
  const i = p >>> 3;
  if (!(i < b.length)) assert(false, `bit ${p} past the bitmap`);
  b[i] = b[i]! | (1 << (p & 7));
}

export function clearBit(b: Buffer, p: number): void {
  const i = p >>> 3;
  if (!(i < b.length)) assert(false, `bit ${p} past the bitmap`);
  b[i] = b[i]! & ~(1 << (p & 7));
}

const POP8 = new Uint8Array(256);
for (let i = 0; i < 256; i++) POP8[i] = (i & 1) + POP8[i >>> 1]!;

/** Number of set bits in one byte value. */
export function pop8(v: number): number {
  return POP8[v & 0xff]!;
}

export function popcount(b: Buffer, start = 0, end = b.length): number {
  let n = 0;
  for (let i = start; i < end; i++) n += POP8[b[i]!]!;
  return n;
}

/** popcount(a | b) over the whole buffers (equal lengths). */
export function popcountOr(a: Buffer, b: Buffer): number {
  assert(a.length === b.length, 'bitmaps differ in length');
  let n = 0;
  for (let i = 0; i < a.length; i++) n += POP8[a[i]! | b[i]!]!;
  return n;
}

/**
 * dst |= src, writing only where src has bits: a page of dst that nothing sets is never
 * written, so it stays unbacked (a 1 TiB device's bitmaps are 32 MiB each, mostly zero).
 */
export function orInto(dst: Buffer, src: Buffer): void {
  assert(dst.length === src.length, 'bitmaps differ in length');
  let i = 0;
  if (dst.byteOffset % 4 === 0 && src.byteOffset % 4 === 0) {
    // A word at a time (the space-map bitmaps are word aligned): 4x fewer steps.
    const words = dst.length >>> 2;
    const d = new Uint32Array(dst.buffer, dst.byteOffset, words);
    const s = new Uint32Array(src.buffer, src.byteOffset, words);
    for (let w = 0; w < words; w++) {
      const v = s[w]!;
      if (v !== 0) d[w] = d[w]! | v;
    }
    i = words * 4;
  }
  for (; i < dst.length; i++) if (src[i] !== 0) dst[i] = dst[i]! | src[i]!;
}

/** dst |= src, then src = 0: both written only where src had bits (see orInto). */
export function moveInto(dst: Buffer, src: Buffer): void {
  orInto(dst, src);
  clearSetWords(src);
}

/**
 * b[start, end) = 0, writing only the words that are not zero already, unlike fill(0),
 * which writes (and so makes resident) every page of a bitmap that is mostly untouched.
 */
export function clearSetWords(b: Buffer, start = 0, end = b.length): void {
  assert(start >= 0 && start <= end && end <= b.length, `clear [${start}, ${end}) of ${b.length} bytes`);
  let i = start;
  if ((b.byteOffset + i) % 4 === 0) {
    const words = (end - i) >>> 2;
    const w32 = new Uint32Array(b.buffer, b.byteOffset + i, words);
    for (let w = 0; w < words; w++) if (w32[w] !== 0) w32[w] = 0;
    i += words * 4;
  }
  for (; i < end; i++) if (b[i] !== 0) b[i] = 0;
}

/** True if buf[start, end) is all zero bytes. */
export function isZero(b: Buffer, start = 0, end = b.length): boolean {
  for (let i = start; i < end; i++) if (b[i] !== 0) return false;
  return true;
}

/** Calls fn(p) for each bit set in b[start, end) (byte offsets), in increasing order. */
export function forEachSet(b: Buffer, fn: (p: number) => void, start = 0, end = b.length): void {
  for (let i = start; i < end; i++) {
    let v = b[i]!;
    while (v !== 0) {
      const bit = 31 - Math.clz32(v & -v);
      fn(i * 8 + bit);
      v &= v - 1;
    }
  }
}
