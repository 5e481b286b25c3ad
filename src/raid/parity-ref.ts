/**
 * RAID parity, the pure-TypeScript reference: byte by byte, written for obviousness, not
 * speed. The native code (native/parity.cc) must agree with it byte for byte; the tests
 * check that, and check both against the vector in engine-notes.md and against ISA-L.
 *
 * Conventions (Linux md's RAID-6): GF(2^8) with polynomial x^8+x^4+x^3+x^2+1 (0x11d),
 * generator g = {02}. For k data columns D_0..D_{k-1}: P = XOR_i D_i,
 * Q = XOR_i g^i * D_i. Column indexes in `reconstruct`: 0..k-1 data, k = P, k+1 = Q.
 *
 * Invariants:
 * - The callers (src/raid/parity.ts) validated the arguments; here they are only asserted.
 * - Q is computed from the log/exp tables (g^i * d), not by Horner's rule as the native
 *   code does, so the two are independent derivations of the same sums.
 * - reconstruct writes only the lost columns, each exactly once at the end, and reads no
 *   lost column before it was rebuilt.
 */
import { assert } from '../util/assert';

/** Field polynomial x^8+x^4+x^3+x^2+1. */
export const GF_POLY = 0x11d;

/** EXP[i] = g^i for i in 0..509 (doubled so EXP[LOG[a] + LOG[b]] needs no modulo); LOG[g^i] = i. */
const EXP = new Uint8Array(510);
const LOG = new Uint8Array(256);
{
  let x = 1;
  for (let i = 0; i < 255; i++) {
    EXP[i] = x;
    EXP[i + 255] = x;
    LOG[x] = i;
    x <<= 1;
    if (x & 0x100) x ^= GF_POLY;
  }
  assert(x === 1, 'g = 2 generates GF(2^8)* under 0x11d');
}

export function gfMul(a: number, b: number): number {
  if (a === 0 || b === 0) return 0;
  return EXP[LOG[a]! + LOG[b]!]!;
}

export function gfInv(a: number): number {
  assert(a !== 0, 'gfInv(0)');
  return EXP[(255 - LOG[a]!) % 255]!;
}

/** g^e for any integer e (negative allowed). */
export function gfPow2(e: number): number {
  return EXP[((e % 255) + 255) % 255]!;
}

function checkSameLength(bufs: readonly Buffer[]): number {
  const n = bufs[0]!.length;
  for (const b of bufs) assert(b.length === n, 'parity-ref: columns differ in length');
  return n;
}

export function computeP(data: readonly Buffer[], p: Buffer): void {
  assert(data.length >= 1, 'parity-ref: no data columns');
  const n = checkSameLength([...data, p]);
  const out = Buffer.alloc(n);
  for (const d of data) for (let j = 0; j < n; j++) out[j] = out[j]! ^ d[j]!;
  out.copy(p);
}

export function computePQ(data: readonly Buffer[], p: Buffer, q: Buffer): void {
  assert(data.length >= 1, 'parity-ref: no data columns');
  const n = checkSameLength([...data, p, q]);
  const pOut = Buffer.alloc(n);
  const qOut = Buffer.alloc(n);
  data.forEach((d, i) => {
    const coef = gfPow2(i);
    for (let j = 0; j < n; j++) {
      pOut[j] = pOut[j]! ^ d[j]!;
      qOut[j] = qOut[j]! ^ gfMul(coef, d[j]!);
    }
  });
  pOut.copy(p);
  qOut.copy(q);
}

/**
 * Rebuilds the lost columns in place. `parityCount` 1: columns = k data + P; 2: k data + P + Q.
 * lost: 1 entry (any column), or 2 distinct entries with parityCount 2.
 */
export function reconstruct(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): void {
  const k = columns.length - parityCount;
  assert(k >= 1, 'parity-ref: no data columns');
  const n = checkSameLength(columns);
  assert(lost.length >= 1 && lost.length <= parityCount, 'parity-ref: lost count');
  const isLost = (i: number): boolean => lost.includes(i);
  const data = columns.slice(0, k);
  const pIdx = k;
  const qIdx = k + 1;
  const lostData = lost.filter((i) => i < k).sort((a, b) => a - b);

  // Partial sums over the surviving data columns.
  const pPart = Buffer.alloc(n);
  const qPart = Buffer.alloc(n);
  data.forEach((d, i) => {
    if (isLost(i)) return;
    const coef = gfPow2(i);
    for (let j = 0; j < n; j++) {
      pPart[j] = pPart[j]! ^ d[j]!;
      qPart[j] = qPart[j]! ^ gfMul(coef, d[j]!);
    }
  });

  const rebuilt = new Map<number, Buffer>();
  if (lostData.length === 2) {
    // Anvin, "The mathematics of RAID-6": Dx = A(P + Pxy) + B(Q + Qxy), Dy = (P + Pxy) + Dx.
    const [x, y] = lostData as [number, number];
    const denomInv = gfInv(gfPow2(y - x) ^ 1);
    const a = gfMul(gfPow2(y - x), denomInv);
    const b = gfMul(gfPow2(-x), denomInv);
    const dx = Buffer.alloc(n);
    const dy = Buffer.alloc(n);
    const pCol = columns[pIdx]!;
    const qCol = columns[qIdx]!;
    for (let j = 0; j < n; j++) {
      const pd = pCol[j]! ^ pPart[j]!;
      const qd = qCol[j]! ^ qPart[j]!;
      dx[j] = gfMul(a, pd) ^ gfMul(b, qd);
      dy[j] = pd ^ dx[j]!;
    }
    rebuilt.set(x, dx);
    rebuilt.set(y, dy);
  } else if (lostData.length === 1) {
    const x = lostData[0]!;
    const dx = Buffer.alloc(n);
    if (!isLost(pIdx)) {
      const pCol = columns[pIdx]!;
      for (let j = 0; j < n; j++) dx[j] = pCol[j]! ^ pPart[j]!;
    } else {
      // P lost too: Q + Qx = g^x * Dx.
      assert(parityCount === 2, 'parity-ref: data+P lost without Q');
      const qCol = columns[qIdx]!;
      const inv = gfPow2(-x);
      for (let j = 0; j < n; j++) dx[j] = gfMul(inv, qCol[j]! ^ qPart[j]!);
    }
    rebuilt.set(x, dx);
  }

  // Parity columns are recomputed from the (now complete) data.
  if (isLost(pIdx) || (parityCount === 2 && isLost(qIdx))) {
    const full = data.map((d, i) => rebuilt.get(i) ?? d);
    const p = Buffer.alloc(n);
    const q = Buffer.alloc(n);
    computePQ(full, p, q);
    if (isLost(pIdx)) rebuilt.set(pIdx, p);
    if (parityCount === 2 && isLost(qIdx)) rebuilt.set(qIdx, q);
  }

  assert(rebuilt.size === lost.length, 'parity-ref: every lost column rebuilt');
  for (const [i, buf] of rebuilt) buf.copy(columns[i]!);
}
