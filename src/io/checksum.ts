/**
 * crc32c (Castagnoli) for the block tree: the native addon's (SSE4.2) when the addon is
 * built, otherwise a portable slicing-by-8 table implementation in TypeScript. Both are
 * the standard reflected CRC-32C with pre/post inversion, so crc32c("123456789") ==
 * 0xe3069283 and the on-disk format does not depend on which one ran.
 *
 * Invariants:
 * - The choice is made once per process (first call) and never changes afterwards.
 * - Results are unsigned 32-bit integers.
 */
import { crc32c as nativeCrc32c, crc32cBlocks as nativeCrc32cBlocks, crc32cWide as nativeCrc32cWide } from './native';

const POLY_REFLECTED = 0x82f63b78;

function buildTables(): Uint32Array[] {
  const t0 = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ ((c & 1) !== 0 ? POLY_REFLECTED : 0);
    t0[i] = c >>> 0;
  }
  const tables = [t0];
  for (let t = 1; t < 8; t++) {
    const prev = tables[t - 1]!;
    const cur = new Uint32Array(256);
    for (let i = 0; i < 256; i++) cur[i] = ((prev[i]! >>> 8) ^ t0[prev[i]! & 0xff]!) >>> 0;
    tables.push(cur);
  }
  return tables;
}

let tables: Uint32Array[] | undefined;

/** Portable crc32c over buf[offset, offset+length). */
export function crc32cPortable(buf: Buffer, offset = 0, length = buf.length - offset, seed = 0): number {
  if (offset < 0 || length < 0 || offset + length > buf.length) throw new RangeError(`crc32c: ${offset}+${length} exceeds buffer of ${buf.length}`);
  if (!tables) tables = buildTables();
  const [t0, t1, t2, t3, t4, t5, t6, t7] = tables as [Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let crc = ~seed >>> 0;
  let p = offset;
  const end = offset + length;
  while (p + 8 <= end) {
    const lo = (buf[p]! | (buf[p + 1]! << 8) | (buf[p + 2]! << 16) | (buf[p + 3]! << 24)) ^ crc;
    crc =
      t7[lo & 0xff]! ^ t6[(lo >>> 8) & 0xff]! ^ t5[(lo >>> 16) & 0xff]! ^ t4[lo >>> 24]! ^
      t3[buf[p + 4]!]! ^ t2[buf[p + 5]!]! ^ t1[buf[p + 6]!]! ^ t0[buf[p + 7]!]!;
    p += 8;
  }
  while (p < end) crc = (crc >>> 8) ^ t0[(crc ^ buf[p++]!) & 0xff]!;
  return ~crc >>> 0;
}

type Crc = (buf: Buffer, offset: number, length: number) => number;
let impl: Crc | undefined;
let implName = '';

function pick(): Crc {
  try {
    const probe = Buffer.from('123456789');
    if (nativeCrc32c(probe, 0, probe.length, 0) === 0xe3069283) {
      implName = 'native';
      return (b, o, l) => nativeCrc32c(b, o, l, 0);
    }
  } catch {
    // The addon is not built (or fails to load): fall back to the portable table.
  }
  implName = 'portable';
  return (b, o, l) => crc32cPortable(b, o, l, 0);
}

/** crc32c of buf[offset, offset+length), seed 0. */
export function crc32c(buf: Buffer, offset = 0, length = buf.length - offset): number {
  if (!impl) impl = pick();
  return impl(buf, offset, length);
}

/**
 * crc32c (seed 0) of one 4 KiB block, by the addon's fastest path (crc32cWide: the same
 * value as crc32c, 2.5-6x faster): for a CP's blocks (each address block it writes, each data block
 * not adjacent to another). The single chain stays for the rest (see checksum.cc).
 */
export function crc32cBlock(buf: Buffer, offset = 0): number {
  if (!impl) impl = pick();
  if (offset < 0 || offset + 4096 > buf.length) throw new RangeError(`crc32cBlock: a block at ${offset} does not fit ${buf.length} bytes`);
  return implName === 'native' ? nativeCrc32cWide(buf, offset, 4096, 0) : crc32cPortable(buf, offset, 4096, 0);
}

/**
 * crc32c (seed 0) of each of `count` 4 KiB blocks at buf[offset..], into out[4i..4i+4)
 * (little-endian): one native call for the lot, or the portable loop.
 */
export function crc32cBlocks(buf: Buffer, offset: number, count: number, out: Buffer): void {
  if (!impl) impl = pick();
  if (implName === 'native') {
    nativeCrc32cBlocks(buf, offset, count, out);
    return;
  }
  if (offset + count * 4096 > buf.length || out.length < count * 4) throw new RangeError(`crc32cBlocks: ${count} blocks at ${offset} do not fit`);
  for (let i = 0; i < count; i++) out.writeUInt32LE(crc32cPortable(buf, offset + i * 4096, 4096, 0), i * 4);
}

/** 'native' or 'portable' (after the first call). */
export function crc32cImplementation(): string {
  if (!impl) impl = pick();
  return implName;
}

// ---- combining: the crc32c of a concatenation from the crc32c of its parts ----
//
// For the standard (pre/post-inverted) CRC, crc(A || B) = (x^(8*|B|) * crc(A) mod P) xor
// crc(B), in the reflected representation where bit 31 is x^0. Multiplying by the fixed
// x^(8*4096) is linear in the crc, so four 256-entry tables (one per byte of the crc) do
// it: a frame of 4 KiB blocks whose crc32c are known gets its checksum without reading them.

/** a(x) * b(x) mod P, reflected (bit 31 is x^0). */
function mulModP(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if ((a & m) !== 0) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = (b & 1) !== 0 ? (b >>> 1) ^ POLY_REFLECTED : b >>> 1;
  }
  return p >>> 0;
}

/** x^(8 * bytes) mod P. */
function shiftOperator(bytes: number): number {
  let p = 0x80000000; // x^0
  let sq = 0x40000000; // x^1, squared up: x^(2^k)
  for (let n = bytes * 8; n > 0; n = Math.floor(n / 2)) {
    if (n % 2 === 1) p = mulModP(sq, p);
    sq = mulModP(sq, sq);
  }
  return p;
}

let blockShift: Uint32Array[] | undefined;

/** crc32c(A || B) from crc32c(A) = `crc` and crc32c(B) = `blockCrc`, where B is 4096 bytes. */
export function crc32cAppendBlock(crc: number, blockCrc: number): number {
  if (!blockShift) {
    const op = shiftOperator(4096);
    blockShift = [0, 1, 2, 3].map((k) => {
      const t = new Uint32Array(256);
      for (let b = 0; b < 256; b++) t[b] = mulModP(op, (b << (8 * k)) >>> 0);
      return t;
    });
  }
  const [t0, t1, t2, t3] = blockShift as [Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  return (t0[crc & 0xff]! ^ t1[(crc >>> 8) & 0xff]! ^ t2[(crc >>> 16) & 0xff]! ^ t3[crc >>> 24]! ^ blockCrc) >>> 0;
}
