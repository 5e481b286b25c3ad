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
import * as ref from './parity-ref';

/** Operation codes of the addon's parity(op, ...) (native/parity.cc keeps the same numbers). */
const PARITY_OP_P = 0;
const PARITY_OP_PQ = 1;
/** + parityCount - 1: 2 = reconstruct with P only, 3 = with P+Q. */
const PARITY_OP_RECONSTRUCT = 2;

/** The addon's parity functions. columns: data (k), then P, then Q for the P+Q operations. */
interface RawParity {
  parity(op: number, columns: Buffer[], k: number, lost0: number, lost1: number): void;
  parityAsync(op: number, columns: Buffer[], k: number, lost0: number, lost1: number, cb: (err: Error | null) => void): void;
}

/** Until the native code lands: the reference, with the same surface. */
function refRun(op: number, columns: Buffer[], k: number, lost0: number, lost1: number): void {
  const data = columns.slice(0, k);
  if (op === PARITY_OP_P) ref.computeP(data, columns[k]!);
  else if (op === PARITY_OP_PQ) ref.computePQ(data, columns[k]!, columns[k + 1]!);
  else ref.reconstruct(columns, lost1 < 0 ? [lost0] : [lost0, lost1], op === PARITY_OP_RECONSTRUCT ? 1 : 2);
}

const refParity: RawParity = {
  parity: refRun,
  parityAsync(op, columns, k, lost0, lost1, cb) {
    setImmediate(() => {
      refRun(op, columns, k, lost0, lost1);
      cb(null);
    });
  },
};

function nativeParity(): RawParity {
  return refParity;
}

/** Columns are processed in units of this many bytes (one cache line, two AVX2 registers). */
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
  return typeof v;
}

function checkBufferArray(fn: string, name: string, v: unknown): readonly Buffer[] {
  if (!Array.isArray(v)) throw new TypeError(`${fn}: ${name} must be an array of Buffers, got ${describe(v)}`);
  v.forEach((b, i) => {
    if (!Buffer.isBuffer(b)) throw new TypeError(`${fn}: ${name}[${i}] must be a Buffer, got ${describe(b)}`);
  });
  return v as readonly Buffer[];
}

function checkBuffer(fn: string, name: string, v: unknown): Buffer {
  if (!Buffer.isBuffer(v)) throw new TypeError(`${fn}: ${name} must be a Buffer, got ${describe(v)}`);
  return v;
}

/** Checks the common length rule over named columns; returns the length. */
function checkLengths(fn: string, cols: ReadonlyArray<readonly [string, Buffer]>): number {
  const [firstName, first] = cols[0]!;
  const n = first.length;
  if (n === 0 || n % PARITY_ALIGN_BYTES !== 0 || n > PARITY_COLUMN_BYTES_MAX) {
    throw new RangeError(
      `${fn}: column length must be a positive multiple of ${PARITY_ALIGN_BYTES} up to ${PARITY_COLUMN_BYTES_MAX}, ${firstName} has ${n}`,
    );
  }
  for (const [name, b] of cols) {
    if (b.length !== n) throw new RangeError(`${fn}: all columns must have the same length: ${firstName} has ${n}, ${name} has ${b.length}`);
  }
  return n;
}

function overlaps(a: Buffer, b: Buffer): boolean {
  if (a.buffer !== b.buffer) return false;
  return a.byteOffset < b.byteOffset + b.length && b.byteOffset < a.byteOffset + a.length;
}

/** Every output must not share memory with any other column. */
function checkNoOverlap(fn: string, cols: ReadonlyArray<readonly [string, Buffer]>, outputs: readonly number[]): void {
  for (const o of outputs) {
    const [oName, oBuf] = cols[o]!;
    cols.forEach(([name, b], i) => {
      if (i !== o && overlaps(oBuf, b)) throw new RangeError(`${fn}: ${oName} (written) overlaps ${name} in memory`);
    });
  }
}

function checkK(fn: string, k: number, max: number): void {
  if (k < 1 || k > max) throw new RangeError(`${fn}: need 1..${max} data columns, got ${k}`);
}

function named(data: readonly Buffer[]): Array<readonly [string, Buffer]> {
  return data.map((b, i) => [`data[${i}]`, b] as const);
}

function validateP(fn: string, dataArg: unknown, pArg: unknown): Buffer[] {
  const data = checkBufferArray(fn, 'data', dataArg);
  const p = checkBuffer(fn, 'p', pArg);
  checkK(fn, data.length, PARITY_P_DATA_COLUMNS_MAX);
  const cols = [...named(data), ['p', p] as const];
  checkLengths(fn, cols);
  checkNoOverlap(fn, cols, [cols.length - 1]);
  return [...data, p];
}

function validatePQ(fn: string, dataArg: unknown, pArg: unknown, qArg: unknown): Buffer[] {
  const data = checkBufferArray(fn, 'data', dataArg);
  const p = checkBuffer(fn, 'p', pArg);
  const q = checkBuffer(fn, 'q', qArg);
  checkK(fn, data.length, PARITY_PQ_DATA_COLUMNS_MAX);
  const cols = [...named(data), ['p', p] as const, ['q', q] as const];
  checkLengths(fn, cols);
  checkNoOverlap(fn, cols, [cols.length - 2, cols.length - 1]);
  return [...data, p, q];
}

interface Reconstruction {
  columns: Buffer[];
  k: number;
  parityCount: 1 | 2;
  /** Sorted ascending; second is -1 when only one column is lost. */
  lost: [number, number];
}

function validateReconstruct(fn: string, columnsArg: unknown, lostArg: unknown, parityCountArg: unknown): Reconstruction {
  const columns = checkBufferArray(fn, 'columns', columnsArg);
  if (parityCountArg !== 1 && parityCountArg !== 2) {
    throw new TypeError(`${fn}: parityCount must be 1 (P: columns = k data + P) or 2 (P+Q: k data + P + Q), got ${String(parityCountArg)}`);
  }
  const parityCount = parityCountArg;
  const k = columns.length - parityCount;
  checkK(fn, k, parityCount === 1 ? PARITY_P_DATA_COLUMNS_MAX : PARITY_PQ_DATA_COLUMNS_MAX);
  const colName = (i: number): string => (i < k ? `columns[${i}] (data ${i})` : i === k ? `columns[${i}] (P)` : `columns[${i}] (Q)`);
  const cols = columns.map((b, i) => [colName(i), b] as const);
  checkLengths(fn, cols);
  if (!Array.isArray(lostArg)) throw new TypeError(`${fn}: lost must be an array of column indexes, got ${describe(lostArg)}`);
  const lost = lostArg as unknown[];
  if (lost.length < 1 || lost.length > parityCount) {
    throw new RangeError(`${fn}: lost must name 1..${parityCount} columns with ${parityCount === 1 ? 'P' : 'P+Q'} parity, got ${lost.length}`);
  }
  for (const i of lost) {
    if (typeof i !== 'number' || !Number.isInteger(i) || i < 0 || i >= columns.length) {
      throw new RangeError(`${fn}: lost index ${String(i)} is not a column index in 0..${columns.length - 1}`);
    }
  }
  const sorted = [...(lost as number[])].sort((a, b) => a - b);
  if (sorted.length === 2 && sorted[0] === sorted[1]) throw new RangeError(`${fn}: lost indexes must be distinct, got ${sorted[0]} twice`);
  checkNoOverlap(fn, cols, sorted);
  return { columns: [...columns], k, parityCount, lost: [sorted[0]!, sorted[1] ?? -1] };
}

/** A validated call: the addon's arguments. */
interface Call {
  op: number;
  columns: Buffer[];
  k: number;
  lost: [number, number];
}

function run(validate: () => Call): void {
  const v = validate();
  nativeParity().parity(v.op, v.columns, v.k, v.lost[0], v.lost[1]);
}

function runAsync(validate: () => Call): Promise<void> {
  let v: Call;
  try {
    v = validate();
  } catch (err) {
    return Promise.reject(err);
  }
  return new Promise((resolve, reject) => {
    nativeParity().parityAsync(v.op, v.columns, v.k, v.lost[0], v.lost[1], (err) => (err ? reject(err) : resolve()));
  });
}

const NO_LOST: [number, number] = [-1, -1];

/** All buffers have the same length, a multiple of 64 bytes. k = data.length, 1 <= k <= 255. p = XOR of the data. */
export function computeP(data: readonly Buffer[], p: Buffer): void {
  run(() => {
    const columns = validateP('computeP', data, p);
    return { op: PARITY_OP_P, columns, k: columns.length - 1, lost: NO_LOST };
  });
}

/** As computeP, 1 <= k <= 253; also q = sum g^i * data[i] over GF(2^8)/0x11d. */
export function computePQ(data: readonly Buffer[], p: Buffer, q: Buffer): void {
  run(() => {
    const columns = validatePQ('computePQ', data, p, q);
    return { op: PARITY_OP_PQ, columns, k: columns.length - 2, lost: NO_LOST };
  });
}

/**
 * Rebuilds up to two lost columns in place. columns = k data buffers, then P, then Q when
 * parityCount is 2 (columns.length === k + parityCount: the count alone cannot tell a
 * P-only stripe of k+1 columns from a P+Q stripe of k' = k-1 data columns, hence the
 * parameter). lost: the indexes (0..k+1) whose buffers hold garbage and are overwritten
 * with the reconstruction; 1 or 2 distinct entries (P-only: 1).
 */
export function reconstruct(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): void {
  run(() => {
    const v = validateReconstruct('reconstruct', columns, lost, parityCount);
    return { op: PARITY_OP_RECONSTRUCT + v.parityCount - 1, columns: v.columns, k: v.k, lost: v.lost };
  });
}

/** computeP on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function computePAsync(data: readonly Buffer[], p: Buffer): Promise<void> {
  return runAsync(() => {
    const columns = validateP('computePAsync', data, p);
    return { op: PARITY_OP_P, columns, k: columns.length - 1, lost: NO_LOST };
  });
}

/** computePQ on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function computePQAsync(data: readonly Buffer[], p: Buffer, q: Buffer): Promise<void> {
  return runAsync(() => {
    const columns = validatePQ('computePQAsync', data, p, q);
    return { op: PARITY_OP_PQ, columns, k: columns.length - 2, lost: NO_LOST };
  });
}

/** reconstruct on the libuv thread pool; the buffers must not be touched until the promise settles. */
export function reconstructAsync(columns: Buffer[], lost: readonly number[], parityCount: 1 | 2): Promise<void> {
  return runAsync(() => {
    const v = validateReconstruct('reconstructAsync', columns, lost, parityCount);
    return { op: PARITY_OP_RECONSTRUCT + v.parityCount - 1, columns: v.columns, k: v.k, lost: v.lost };
  });
}
