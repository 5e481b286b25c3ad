/**
 * NVRAM region layout and record format (pure encode/decode, no state).
 *
 * Region layout:
 *   [0, 4096)                  header page: two header slots (at 0 and 512), ping-pong by epoch
 *   [4096, 4096 + half)        half 0
 *   [4096 + half, 4096 + 2h)   half 1
 * Each half holds records back to back from its start; a record is a 64-byte header
 * followed by its payload (whole 4 KiB blocks, writes only), so every record starts on a
 * 64-byte boundary.
 *
 * Invariants:
 * - A header slot is valid iff its magic, version and crc32c verify; the valid slot with
 *   the highest epoch is the current one. A new epoch is written to slot epoch % 2, so
 *   the previous epoch's slot is never overwritten by the write that replaces it.
 * - A record is valid iff its magic matches, its crc32c (seeded with the epoch's salt,
 *   over header bytes 8..64 and the payload) verifies, its epoch equals the header
 *   epoch, and it fits inside its half. The salt is random per epoch, so payload bytes
 *   that happen to look like a record (client data) cannot pass as one.
 * - Record payloads are whole, block-aligned 4 KiB blocks: offset and length of a record
 *   are multiples of 4096; a write record's payload is exactly `length` bytes.
 * - A record's `durableSeq` is lower than its seq, and every record with seq <= durableSeq
 *   was on stable storage (persisted, or in a durable CP) before this record was written:
 *   a valid record thus proves that those earlier records once were durable (replay
 *   uses it to tell mid-log damage from a torn or power-loss-reordered tail). Records
 *   written before the field existed carry 0, which proves nothing.
 */
import { crc32c } from '../io/native';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { assert } from '../util/assert';

export const HEADER_PAGE_BYTES = 4096;
export const HEADER_SLOT_BYTES = 512;
export const HEADER_SLOT_OFFSETS = [0, 512] as const;
export const HEADER_MAGIC = 0x4e564d494c4f4731n; // "NVMILOG1"
export const HEADER_VERSION = 1;

export const RECORD_HEADER_BYTES = 64;
export const RECORD_ALIGN_BYTES = 64;
export const RECORD_MAGIC = 0x4e565231; // "NVR1"

/** Record payloads are capped at 1 MiB (and at a quarter of a half, see halfLayout). */
export const RECORD_PAYLOAD_MAX_BYTES = 1024 * 1024;
/** Smallest NVRAM region we accept: header page + two halves of 64 KiB. */
export const REGION_MIN_BYTES = HEADER_PAGE_BYTES + 2 * 64 * 1024;
/** Largest NVRAM region: keeps every offset well inside a safe integer and memory sane. */
export const REGION_MAX_BYTES = 64 * 1024 * 1024 * 1024;

export const enum RecordType {
  Write = 1,
  Trim = 2,
  Zero = 3,
}

export const RECORD_FLAG_FUA = 1;

export interface RegionHeader {
  uuid: string;
  epoch: number;
  salt: number;
  regionSizeBytes: number;
  halfSizeBytes: number;
}

export interface RecordHeader {
  epoch: number;
  seq: number;
  type: RecordType;
  flags: number;
  /** Byte offset in the volume, block aligned. */
  offsetBytes: number;
  /** Byte length in the volume, block aligned, > 0. */
  lengthBytes: number;
  transferId: number;
  /** Payload length: lengthBytes for writes, 0 otherwise. */
  payloadBytes: number;
  /** Every record up to this seq was durable before this one was written (< seq; 0 = no claim). */
  durableSeq: number;
}

export interface HalfLayout {
  halfSizeBytes: number;
  halfOffsets: [number, number];
  recordPayloadMaxBytes: number;
}

/** Half size and record cap for a region of `regionSizeBytes`. */
export function halfLayout(regionSizeBytes: number): HalfLayout {
  assert(regionSizeBytes >= REGION_MIN_BYTES, `NVRAM region of ${regionSizeBytes} bytes is below the minimum ${REGION_MIN_BYTES}`);
  const halfSizeBytes = Math.floor((regionSizeBytes - HEADER_PAGE_BYTES) / 2 / BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES;
  const quarter = Math.floor(halfSizeBytes / 4 / BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES;
  const recordPayloadMaxBytes = Math.min(RECORD_PAYLOAD_MAX_BYTES, quarter);
  assert(recordPayloadMaxBytes >= BLOCK_SIZE_BYTES, 'half too small for one block');
  assert(HEADER_PAGE_BYTES + 2 * halfSizeBytes <= regionSizeBytes, 'halves exceed the region');
  return { halfSizeBytes, halfOffsets: [HEADER_PAGE_BYTES, HEADER_PAGE_BYTES + halfSizeBytes], recordPayloadMaxBytes };
}

export function recordSizeBytes(payloadBytes: number): number {
  const total = RECORD_HEADER_BYTES + payloadBytes;
  return Math.ceil(total / RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES;
}

// ---- uuid helpers ----

export function uuidToBytes(uuid: string): Buffer {
  const hex = uuid.replace(/-/g, '');
  assert(/^[0-9a-fA-F]{32}$/.test(hex), `bad uuid ${uuid}`);
  return Buffer.from(hex, 'hex');
}

export function bytesToUuid(b: Buffer): string {
  assert(b.length === 16, 'uuid must be 16 bytes');
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---- header slots ----
// slot: 0 u64 magic | 8 u32 crc(12..128) | 12 u32 version | 16 uuid[16] | 32 u32 epoch
//       36 u32 salt | 40 u64 regionSizeBytes | 48 u64 halfSizeBytes | 56..128 zero
const SLOT_CRC_START = 12;
const SLOT_CRC_END = 128;

export function encodeHeaderSlot(h: RegionHeader, dst: Buffer, at: number): void {
  assert(at + HEADER_SLOT_BYTES <= dst.length, 'header slot out of range');
  assert(Number.isSafeInteger(h.epoch) && h.epoch >= 1 && h.epoch <= 0xffffffff, `bad epoch ${h.epoch}`);
  dst.fill(0, at, at + HEADER_SLOT_BYTES);
  dst.writeBigUInt64LE(HEADER_MAGIC, at);
  dst.writeUInt32LE(HEADER_VERSION, at + 12);
  uuidToBytes(h.uuid).copy(dst, at + 16);
  dst.writeUInt32LE(h.epoch, at + 32);
  dst.writeUInt32LE(h.salt >>> 0, at + 36);
  dst.writeBigUInt64LE(BigInt(h.regionSizeBytes), at + 40);
  dst.writeBigUInt64LE(BigInt(h.halfSizeBytes), at + 48);
  dst.writeUInt32LE(crc32c(dst, at + SLOT_CRC_START, SLOT_CRC_END - SLOT_CRC_START), at + 8);
}

/** Decodes a header slot; undefined if it does not verify. */
export function decodeHeaderSlot(src: Buffer, at: number): RegionHeader | undefined {
  if (at + HEADER_SLOT_BYTES > src.length) return undefined;
  if (src.readBigUInt64LE(at) !== HEADER_MAGIC) return undefined;
  if (src.readUInt32LE(at + 12) !== HEADER_VERSION) return undefined;
  if (crc32c(src, at + SLOT_CRC_START, SLOT_CRC_END - SLOT_CRC_START) !== src.readUInt32LE(at + 8)) return undefined;
  const epoch = src.readUInt32LE(at + 32);
  if (epoch < 1) return undefined;
  return {
    uuid: bytesToUuid(src.subarray(at + 16, at + 32)),
    epoch,
    salt: src.readUInt32LE(at + 36),
    regionSizeBytes: Number(src.readBigUInt64LE(at + 40)),
    halfSizeBytes: Number(src.readBigUInt64LE(at + 48)),
  };
}

/** The current header: the valid slot with the highest epoch. */
export function readRegionHeader(region: Buffer): RegionHeader | undefined {
  let best: RegionHeader | undefined;
  for (const at of HEADER_SLOT_OFFSETS) {
    const h = decodeHeaderSlot(region, at);
    if (h && (!best || h.epoch > best.epoch)) best = h;
  }
  return best;
}

export function headerSlotFor(epoch: number): number {
  const at = HEADER_SLOT_OFFSETS[epoch % 2];
  assert(at !== undefined, 'slot');
  return at;
}

// ---- records ----
// 0 u32 magic | 4 u32 crc | 8 u32 epoch | 12 u16 type | 14 u16 flags | 16 u64 seq
// 24 u64 offsetBytes | 32 u64 lengthBytes | 40 u64 transferId | 48 u32 payloadBytes
// 52 u32 zero | 56 u64 durableSeq | payload

/**
 * Writes a record into `dst` at `at`: payload first, then the header fields, then the
 * crc and finally the magic, so a record interrupted half-way never verifies.
 * `payload` (writes only) is copied from the given buffers, concatenated.
 */
export function encodeRecord(dst: Buffer, at: number, h: RecordHeader, salt: number, payload: readonly Buffer[]): number {
  const size = recordSizeBytes(h.payloadBytes);
  assert(at % RECORD_ALIGN_BYTES === 0, 'record misaligned');
  assert(at + size <= dst.length, 'record exceeds region');
  assert(h.offsetBytes % BLOCK_SIZE_BYTES === 0 && h.lengthBytes % BLOCK_SIZE_BYTES === 0 && h.lengthBytes > 0, 'record range not block aligned');
  assert(h.type === RecordType.Write ? h.payloadBytes === h.lengthBytes : h.payloadBytes === 0, 'payload length does not match type');
  assert(Number.isSafeInteger(h.durableSeq) && h.durableSeq >= 0 && h.durableSeq < h.seq, `record seq ${h.seq} claims durable seq ${h.durableSeq}`);
  // Invalidate any stale magic first (a kill between these steps leaves no valid record).
  dst.writeUInt32LE(0, at);
  let p = at + RECORD_HEADER_BYTES;
  let copied = 0;
  for (const b of payload) {
    b.copy(dst, p);
    p += b.length;
    copied += b.length;
  }
  assert(copied === h.payloadBytes, `payload ${copied} bytes, header says ${h.payloadBytes}`);
  if (size > RECORD_HEADER_BYTES + h.payloadBytes) dst.fill(0, at + RECORD_HEADER_BYTES + h.payloadBytes, at + size);
  dst.writeUInt32LE(h.epoch, at + 8);
  dst.writeUInt16LE(h.type, at + 12);
  dst.writeUInt16LE(h.flags, at + 14);
  dst.writeBigUInt64LE(BigInt(h.seq), at + 16);
  dst.writeBigUInt64LE(BigInt(h.offsetBytes), at + 24);
  dst.writeBigUInt64LE(BigInt(h.lengthBytes), at + 32);
  dst.writeBigUInt64LE(BigInt(h.transferId), at + 40);
  dst.writeUInt32LE(h.payloadBytes, at + 48);
  dst.fill(0, at + 52, at + 56);
  dst.writeBigUInt64LE(BigInt(h.durableSeq), at + 56);
  dst.writeUInt32LE(crc32c(dst, at + 8, size - 8, salt), at + 4);
  dst.writeUInt32LE(RECORD_MAGIC, at);
  return size;
}

/**
 * Decodes the record at `at` if it is valid for (epoch, salt) and lies within
 * [at, limit). Returns undefined for anything else (torn, stale, foreign, garbage).
 */
export function decodeRecord(src: Buffer, at: number, limit: number, epoch: number, salt: number, payloadMaxBytes: number): RecordHeader | undefined {
  if (at % RECORD_ALIGN_BYTES !== 0 || at + RECORD_HEADER_BYTES > limit) return undefined;
  if (src.readUInt32LE(at) !== RECORD_MAGIC) return undefined;
  if (src.readUInt32LE(at + 8) !== epoch) return undefined;
  const payloadBytes = src.readUInt32LE(at + 48);
  if (payloadBytes > payloadMaxBytes) return undefined;
  const size = recordSizeBytes(payloadBytes);
  if (at + size > limit) return undefined;
  if (crc32c(src, at + 8, size - 8, salt) !== src.readUInt32LE(at + 4)) return undefined;
  const type = src.readUInt16LE(at + 12);
  if (type !== RecordType.Write && type !== RecordType.Trim && type !== RecordType.Zero) return undefined;
  const seq = src.readBigUInt64LE(at + 16);
  const offsetBytes = src.readBigUInt64LE(at + 24);
  const lengthBytes = src.readBigUInt64LE(at + 32);
  const transferId = src.readBigUInt64LE(at + 40);
  const durableSeq = src.readBigUInt64LE(at + 56);
  const max = BigInt(Number.MAX_SAFE_INTEGER);
  if (seq > max || offsetBytes > max || lengthBytes > max || transferId > max) return undefined;
  if (durableSeq >= seq && durableSeq !== 0n) return undefined;
  const h: RecordHeader = {
    epoch,
    seq: Number(seq),
    type,
    flags: src.readUInt16LE(at + 14),
    offsetBytes: Number(offsetBytes),
    lengthBytes: Number(lengthBytes),
    transferId: Number(transferId),
    payloadBytes,
    durableSeq: Number(durableSeq),
  };
  // A record that verifies but is malformed cannot come from our writer: treat it as invalid.
  if (h.offsetBytes % BLOCK_SIZE_BYTES !== 0 || h.lengthBytes % BLOCK_SIZE_BYTES !== 0 || h.lengthBytes === 0) return undefined;
  if (type === RecordType.Write ? payloadBytes !== h.lengthBytes : payloadBytes !== 0) return undefined;
  return h;
}
