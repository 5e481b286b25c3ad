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

/** dst |= src. */
export function orInto(dst: Buffer, src: Buffer): void {
  assert(dst.length === src.length, 'bitmaps differ in length');
  let i = 0;
  if (dst.byteOffset % 4 === 0 && src.byteOffset % 4 === 0) {
    // A word at a time (the space-map bitmaps are word aligned): 4x fewer steps.
    const words = dst.length >>> 2;
    const d = new Uint32Array(dst.buffer, dst.byteOffset, words);
    const s = new Uint32Array(src.buffer, src.byteOffset, words);
    for (let w = 0; w < words; w++) d[w] = d[w]! | s[w]!;
    i = words * 4;
  }
  for (; i < dst.length; i++) dst[i] = dst[i]! | src[i]!;
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
