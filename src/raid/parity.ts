/**
 * RAID parity: P (XOR) and Q (RAID-6, Linux md's convention) over equal-length columns,
 * and reconstruction of up to two lost columns. Conventions and the math: docs/raid.md
 * "Parity"; the byte-by-byte reference is src/raid/parity-ref.ts.
 *
 * Invariants:
 * - Validation happens here, at the edge, before anything is written: every buffer the
 *   same length, a positive multiple of PARITY_ALIGN_BYTES and at most
 *   PARITY_COLUMN_BYTES_MAX; k within the limits; lost indexes distinct and in range; no
 *   column that is written overlaps the memory of any other column. A bad argument throws
 *   a TypeError/RangeError (the async forms reject with it) and no buffer is modified.
 * - Only the outputs (p, q, or the lost columns) are written; every other column is read only.
 * - The async forms run on the libuv thread pool; the caller must not touch the buffers
 *   until the promise settles (the native job holds references to all of them).
 */
import bindings from 'bindings';

/** Operation codes of the addon's parity(op, ...) (native/parity.cc keeps the same numbers). */
export const PARITY_OP_P = 0;
export const PARITY_OP_PQ = 1;
/** + parityCount - 1: 2 = reconstruct with P only, 3 = with P+Q. */
export const PARITY_OP_RECONSTRUCT = 2;

/** The addon's parity functions. columns: data (k), then P, then Q for the P+Q operations. */
export interface RawParity {
  /** path: 0 = the fastest kernels this CPU runs, 1 = portable, 2 = AVX2, 3 = AVX-512 (tests compare them). */
  parity(op: number, columns: Buffer[], k: number, lost0: number, lost1: number, path?: number): void;
  parityAsync(op: number, columns: Buffer[], k: number, lost0: number, lost1: number, cb: (err: Error | null) => void): void;
  /** Whether this CPU runs the AVX2 / AVX-512BW kernels (path 0 uses AVX-512 when it can, then AVX2). */
  readonly parityAvx2: boolean;
  readonly parityAvx512: boolean;
}

let raw: RawParity | undefined;

/** Which kernels path 0 (every call of this module) runs on this CPU. */
export function parityKernels(): 'avx512' | 'avx2' | 'portable' {
  const r = nativeParity();
  return r.parityAvx512 ? 'avx512' : r.parityAvx2 ? 'avx2' : 'portable';
}

/** The addon's parity surface (exported for tests and the benchmark). */
export function nativeParity(): RawParity {
  if (!raw) raw = bindings('nvmirror_native') as RawParity;
  return raw;
}

/** Columns are processed in units of this many bytes (one cache line: one AVX-512 or two AVX2 registers). */
export const PARITY_ALIGN_BYTES = 64;
/** Largest column accepted: bounds the work of one call (a sync call blocks the event loop). */
export const PARITY_COLUMN_BYTES_MAX = 16 * 1024 * 1024;
/** P-only (RAID-4/5): k + 1 columns at most 256. */
export const PARITY_P_DATA_COLUMNS_MAX = 255;
/** P+Q (RAID-6): g^i must be distinct and g^i + 1 invertible for i < k, and k + 2 <= 255 (md's limit). */
export const PARITY_PQ_DATA_COLUMNS_MAX = 253;

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (ArrayBuffer.isView(v)) return v.constructor.name;
  return typeof v;
}

/** Names column i in messages; only called to build an error. */
type Namer = (i: number) => string;

/**
 * Every column a Buffer of the same length (a positive multiple of PARITY_ALIGN_BYTES, at
 * most PARITY_COLUMN_BYTES_MAX), and the written columns out0/out1 (-1: none) sharing no
 * memory with any other column. Plain loops: this runs on every call, next to a few
 * microseconds of native work.
 */
function checkColumns(fn: string, cols: readonly unknown[], name: Namer, out0: number, out1: number): void {
  const count = cols.length;
  for (let i = 0; i < count; i++) {
    if (!Buffer.isBuffer(cols[i])) throw new TypeError(`${fn}: ${name(i)} must be a Buffer, got ${describe(cols[i])}`);
  }
  const bufs = cols as readonly Buffer[];
  const n = bufs[0]!.length;
  if (n === 0 || n % PARITY_ALIGN_BYTES !== 0 || n > PARITY_COLUMN_BYTES_MAX) {
    throw new RangeError(`${fn}: column length must be a positive multiple of ${PARITY_ALIGN_BYTES} up to ${PARITY_COLUMN_BYTES_MAX}, ${name(0)} has ${n}`);
  }
  for (let i = 1; i < count; i++) {
    const len = bufs[i]!.length;
    if (len !== n) throw new RangeError(`${fn}: all columns must have the same length: ${name(0)} has ${n}, ${name(i)} has ${len}`);
  }
  // Only columns on the same ArrayBuffer can overlap: look at .buffer once per column.
  const backing = new Array<ArrayBufferLike>(count);
  for (let i = 0; i < count; i++) backing[i] = bufs[i]!.buffer;
  checkWritten(fn, bufs, backing, name, out0);
  checkWritten(fn, bufs, backing, name, out1);
}

/** Written column o (-1: none) shares no memory with any other column. */
function checkWritten(fn: string, bufs: readonly Buffer[], backing: readonly ArrayBufferLike[], name: Namer, o: number): void {
  if (o < 0) return;
  const ob = bufs[o]!;
  for (let i = 0; i < bufs.length; i++) {
    if (i === o || backing[i] !== backing[o]) continue;
    const b = bufs[i]!;
    if (ob.byteOffset < b.byteOffset + b.length && b.byteOffset < ob.byteOffset + ob.length) {
      throw new RangeError(`${fn}: ${name(o)} (written) overlaps ${name(i)} in memory`);
    }
  }
}

function checkK(fn: string, k: number, max: number): void {
  if (k < 1 || k > max) throw new RangeError(`${fn}: need 1..${max} data columns, got ${k}`);
}

/** data then the parity outputs, validated; returns the addon's column array. */
function validateCompute(fn: string, dataArg: unknown, p: unknown, q: unknown, withQ: boolean): Buffer[] {
  if (!Array.isArray(dataArg)) throw new TypeError(`${fn}: data must be an array of Buffers, got ${describe(dataArg)}`);
  const data = dataArg as readonly unknown[];
  const k = data.length;
  checkK(fn, k, withQ ? PARITY_PQ_DATA_COLUMNS_MAX : PARITY_P_DATA_COLUMNS_MAX);
  const cols = new Array<unknown>(k + (withQ ? 2 : 1));
  for (let i = 0; i < k; i++) cols[i] = data[i];
  cols[k] = p;
  if (withQ) cols[k + 1] = q;
  const name: Namer = (i) => (i < k ? `data[${i}]` : i === k ? 'p' : 'q');
  checkColumns(fn, cols, name, k, withQ ? k + 1 : -1);
  return cols as Buffer[];
}

/** A validated call: the addon's arguments. */
interface Call {
  op: number;
  columns: Buffer[];
  k: number;
  lost0: number;
  lost1: number;
}

function validateReconstruct(fn: string, columnsArg: unknown, lostArg: unknown, parityCountArg: unknown): Call {
  if (!Array.isArray(columnsArg)) throw new TypeError(`${fn}: columns must be an array of Buffers, got ${describe(columnsArg)}`);
  // A plain copy, checked and then handed to the addon: an accessor on the caller's array
  // could answer differently on a second read.
  const columns = (columnsArg as unknown[]).slice();
  if (parityCountArg !== 1 && parityCountArg !== 2) {
    throw new TypeError(`${fn}: parityCount must be 1 (P: columns = k data + P) or 2 (P+Q: k data + P + Q), got ${String(parityCountArg)}`);
  }
  const parityCount = parityCountArg;
  const k = columns.length - parityCount;
  checkK(fn, k, parityCount === 1 ? PARITY_P_DATA_COLUMNS_MAX : PARITY_PQ_DATA_COLUMNS_MAX);
  if (!Array.isArray(lostArg)) throw new TypeError(`${fn}: lost must be an array of column indexes, got ${describe(lostArg)}`);
  const lost = (lostArg as unknown[]).slice(); // read once (see columns)
  if (lost.length < 1 || lost.length > parityCount) {
    throw new RangeError(`${fn}: lost must name 1..${parityCount} columns with ${parityCount === 1 ? 'P' : 'P+Q'} parity, got ${lost.length}`);
  }
  for (const i of lost) {
    if (typeof i !== 'number' || !Number.isInteger(i) || i < 0 || i >= columns.length) {
      throw new RangeError(`${fn}: lost index ${String(i)} is not a column index in 0..${columns.length - 1}`);
    }
  }
  let lost0 = lost[0] as number;
  let lost1 = lost.length === 2 ? (lost[1] as number) : -1;
  if (lost0 === lost1) throw new RangeError(`${fn}: lost indexes must be distinct, got ${lost0} twice`);
  if (lost1 >= 0 && lost1 < lost0) [lost0, lost1] = [lost1, lost0];
  const name: Namer = (i) => (i < k ? `columns[${i}] (data ${i})` : i === k ? `columns[${i}] (P)` : `columns[${i}] (Q)`);
  checkColumns(fn, columns, name, lost0, lost1);
  return { op: PARITY_OP_RECONSTRUCT + parityCount - 1, columns: columns as Buffer[], k, lost0, lost1 };
}

function runAsync(build: () => Call): Promise<void> {
  let v: Call;
  try {
    v = build();
  } catch (err) {
    return Promise.reject(err);
  }
  return new Promise((resolve, reject) => {
    nativeParity().parityAsync(v.op, v.columns, v.k, v.lost0, v.lost1, (err) => (err ? reject(err) : resolve()));
  });
}

/** All buffers have the same length, a multiple of 64 bytes. k = data.length, 1 <= k <= 255. p = XOR of the data. */
export function computeP(data: readonly Buffer[], p: Buffer): void {
  const cols = validateCompute('computeP', data, p, undefined, false);
  nativeParity().parity(PARITY_OP_P, cols, cols.length - 1, -1, -1);
}

/** As computeP, 1 <= k <= 253; also q = sum g^i * data[i] over GF(2^8)/0x11d. */
export function computePQ(data: readonly Buffer[], p: Buffer, q: Buffer): void {
  const cols = validateCompute('computePQ', data, p, q, true);
  nativeParity().parity(PARITY_OP_PQ, cols, cols.length - 2, -1, -1);
}

/**
 * Rebuilds up to two lost columns in place. columns = k data buffers, then P, then Q when
 * parityCount is 2 (columns.length === k + parityCount: the count alone cannot tell a
 * P-only stripe of k+1 columns from a P+Q stripe of k' = k-1 data columns, hence the
 * parameter). lost: the indexes (0..k+1) whose buffers hold garbage and are overwritten
 * with the reconstruction; 1 or 2 distinct entries (P-only: 1).
 */
export function reconstruct(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): void {
  const v = validateReconstruct('reconstruct', columns, lost, parityCount);
  nativeParity().parity(v.op, v.columns, v.k, v.lost0, v.lost1);
}

/** computeP on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function computePAsync(data: readonly Buffer[], p: Buffer): Promise<void> {
  return runAsync(() => {
    const columns = validateCompute('computePAsync', data, p, undefined, false);
    return { op: PARITY_OP_P, columns, k: columns.length - 1, lost0: -1, lost1: -1 };
  });
}

/** computePQ on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function computePQAsync(data: readonly Buffer[], p: Buffer, q: Buffer): Promise<void> {
  return runAsync(() => {
    const columns = validateCompute('computePQAsync', data, p, q, true);
    return { op: PARITY_OP_PQ, columns, k: columns.length - 2, lost0: -1, lost1: -1 };
  });
}

/** reconstruct on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function reconstructAsync(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): Promise<void> {
  return runAsync(() => validateReconstruct('reconstructAsync', columns, lost, parityCount));
}

/** The parity work a RaidDevice calls: on the thread pool in production; a simulator injects the synchronous forms (deterministic, no real time). */
export interface ParityOps {
  computeP(data: readonly Buffer[], p: Buffer): Promise<void>;
  computePQ(data: readonly Buffer[], p: Buffer, q: Buffer): Promise<void>;
  reconstruct(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): Promise<void>;
}

export const PARITY_THREAD_POOL: ParityOps = Object.freeze({ computeP: computePAsync, computePQ: computePQAsync, reconstruct: reconstructAsync });

/** The same work on the caller's thread (a settled promise): for the seeded simulator. */
export const PARITY_INLINE: ParityOps = Object.freeze({
  computeP: async (data: readonly Buffer[], p: Buffer) => computeP(data, p),
  computePQ: async (data: readonly Buffer[], p: Buffer, q: Buffer) => computePQ(data, p, q),
  reconstruct: async (columns: Buffer[], lost: readonly number[], parityCount: 1 | 2) => reconstruct(columns, lost, parityCount),
});
