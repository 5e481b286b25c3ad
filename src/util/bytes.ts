/**
 * Little-endian u64 fields and volume UUIDs in on-disk structures (the tree's superblock
 * and nodes, RAID labels, mirror labels, NVRAM headers): one spelling for every layer.
 *
 * Invariants:
 * - writeU64 takes only safe non-negative integers (2^53 - 1 at most) and asserts it;
 *   readU64 returns -1 for a stored value above that, which callers treat as corruption.
 * - uuidToBytes accepts only the 8-4-4-4-12 hex form (either case) and throws a one-line
 *   error naming the bad value; bytesToUuid always prints lower case.
 */
import { assert } from './assert';

export function writeU64(buf: Buffer, off: number, v: number): void {
  if (!(Number.isSafeInteger(v) && v >= 0)) assert(false, `u64 field must be a safe non-negative integer, got ${v}`);
  buf.writeUInt32LE(v % 0x100000000, off);
  buf.writeUInt32LE(Math.floor(v / 0x100000000), off + 4);
}

/** Reads a u64; returns -1 if it is not a safe integer (callers treat that as corruption). */
export function readU64(buf: Buffer, off: number): number {
  const lo = buf.readUInt32LE(off);
  const hi = buf.readUInt32LE(off + 4);
  if (hi >= 0x200000) return -1;
  return hi * 0x100000000 + lo;
}

// ---- UUIDs ----

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function uuidToBytes(uuid: string): Buffer {
  const u = uuid.toLowerCase();
  if (!UUID_RE.test(u)) throw new Error(`bad volume UUID "${uuid}": expected 8-4-4-4-12 hex digits`);
  return Buffer.from(u.replace(/-/g, ''), 'hex');
}

export function bytesToUuid(b: Buffer): string {
  assert(b.length === 16, 'uuid must be 16 bytes');
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
