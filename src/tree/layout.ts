/**
 * On-disk format of the block tree (see docs/tree.md): block pointers, the header of
 * metadata (address) blocks, tree geometry, and the superblock ring. Pure encoding and
 * decoding; no I/O.
 *
 * Invariants:
 * - Every block is 4096 bytes. Physical blocks [0, RING_SLOTS) are the superblock ring;
 *   nothing else is ever written there, and no pointer may point there.
 * - A block pointer is 24 bytes; the null pointer (a hole) is 24 zero bytes; a present
 *   pointer has PTR_FLAG_PRESENT set, a pba in [RING_SLOTS, deviceBlocks) and the crc32c
 *   of the whole 4096-byte child.
 * - An address block is a 64-byte header followed by FANOUT pointers (64 + 168*24 = 4096).
 *   Its header names its own pba, birth CP, level, index and volume, so a block read
 *   from the wrong place, or of the wrong age or volume, is detected.
 * - A superblock carries its own crc32c in its last 4 bytes; it is the only block not
 *   verified through a parent pointer.
 * - Integers are little-endian; 64-bit fields hold safe integers (< 2^53).
 */
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { crc32c } from '../io/checksum';
import { bytesToUuid, readU64, uuidToBytes, writeU64 } from '../util/bytes';
import { LINEAGE_ENTRIES_MAX, lineageProblem, rootGeneration, type Generation } from './lineage';

export const BLOCK = BLOCK_SIZE_BYTES;
export const RING_SLOTS = 8;

export const PTR_BYTES = 24;
export const NODE_HEADER_BYTES = 64;
export const FANOUT = Math.floor((BLOCK - NODE_HEADER_BYTES) / PTR_BYTES);
assert(FANOUT === 168 && NODE_HEADER_BYTES + FANOUT * PTR_BYTES === BLOCK, 'node layout must fill a block exactly');

/** Bits per space-map leaf (a leaf is a raw bitmap block, verified through its parent pointer). */
export const BITS_PER_LEAF = BLOCK * 8;

export const NODE_MAGIC = 0x414d564e; // 'NVMA' little-endian
export const NODE_TYPE_DATA_TREE = 1;
export const NODE_TYPE_SPACE_MAP = 2;

export const PTR_FLAG_PRESENT = 1;

/** The largest volume and device we address (2^50 bytes; 2^32 device blocks = 16 TiB). */
export const MAX_VOLUME_BYTES = 2 ** 50;
export const MAX_DEVICE_BLOCKS = 2 ** 32;
/** The smallest device: the ring plus room for a few CPs' metadata. */
export const MIN_DEVICE_BLOCKS = 64;

export interface BlockPtr {
  readonly pba: number;
  readonly birth: number;
  readonly crc: number;
}

export function ptrSlotOffset(slot: number): number {
  if (!(Number.isInteger(slot) && slot >= 0 && slot < FANOUT)) assert(false, `slot ${slot} out of range`);
  return NODE_HEADER_BYTES + slot * PTR_BYTES;
}

const WORD_BYTES = 8;
/** The header's words that differ between two versions of one node: its pba and its birth CP (bytes 8-23). */
const HEADER_CHANGED_WORDS: readonly [number, number] = [1, 2];

/**
 * Where a node rewritten at `slots` (encodePtr there, then writeNodeHeader with the same
 * id) can differ from its previous version: 8-byte word runs as (firstWord, wordCount)
 * pairs, increasing and not overlapping. Every other word is what the old version held
 * (writeNodeHeader writes the same magic, type, level, uuid, index and fan-out).
 */
export function nodeEditRuns(slots: readonly number[]): number[] {
  assert(NODE_HEADER_BYTES % WORD_BYTES === 0 && PTR_BYTES % WORD_BYTES === 0, 'slots on word boundaries');
  const runs: number[] = [...HEADER_CHANGED_WORDS];
  const sorted = slots.length > 1 ? [...slots].sort((a, b) => a - b) : slots;
  for (const slot of sorted) {
    const first = ptrSlotOffset(slot) / WORD_BYTES;
    const count = PTR_BYTES / WORD_BYTES;
    const end = runs[runs.length - 2]! + runs[runs.length - 1]!;
    if (first < end) continue; // the same slot twice
    if (first === end) runs[runs.length - 1] = runs[runs.length - 1]! + count;
    else runs.push(first, count);
  }
  return runs;
}

export function encodePtr(buf: Buffer, off: number, p: BlockPtr | null): void {
  if (p === null) {
    buf.fill(0, off, off + PTR_BYTES);
    return;
  }
  if (!(p.pba >= RING_SLOTS)) assert(false, `pointer to the superblock ring (pba ${p.pba})`);
  writeU64(buf, off, p.pba);
  writeU64(buf, off + 8, p.birth);
  buf.writeUInt32LE(p.crc >>> 0, off + 16);
  buf.writeUInt16LE(PTR_FLAG_PRESENT, off + 20);
  buf.writeUInt16LE(0, off + 22);
}

/** Result of decoding a pointer: a pointer, null (hole), or a reason it is malformed. */
export type PtrDecode = BlockPtr | null | string;

export function decodePtr(buf: Buffer, off: number, deviceBlocks: number): PtrDecode {
  const flags = buf.readUInt16LE(off + 20);
  if (flags === 0) {
    for (let i = off; i < off + PTR_BYTES; i++) if (buf[i] !== 0) return 'hole pointer with non-zero fields';
    return null;
  }
  if (flags !== PTR_FLAG_PRESENT || buf.readUInt16LE(off + 22) !== 0) return `unknown pointer flags 0x${flags.toString(16)}`;
  const pba = readU64(buf, off);
  const birth = readU64(buf, off + 8);
  if (pba < RING_SLOTS || pba >= deviceBlocks) return `pointer pba ${pba} outside [${RING_SLOTS}, ${deviceBlocks})`;
  if (birth < 0) return 'pointer birth CP out of range';
  return { pba, birth, crc: buf.readUInt32LE(off + 16) };
}

export function ptrEquals(a: BlockPtr | null, b: BlockPtr | null): boolean {
  if (a === null || b === null) return a === b;
  return a.pba === b.pba && a.birth === b.birth && a.crc === b.crc;
}

export function ptrString(p: BlockPtr | null): string {
  return p === null ? 'hole' : `pba ${p.pba} birth ${p.birth} crc ${p.crc.toString(16).padStart(8, '0')}`;
}


// ---- Geometry ----

/** Smallest height h >= 1 with FANOUT^h >= slots. */
export function heightFor(slots: number): number {
  assert(Number.isSafeInteger(slots) && slots >= 1, `slot count ${slots}`);
  let h = 1;
  let span = FANOUT;
  while (span < slots) {
    span *= FANOUT;
    h++;
  }
  assert(h <= 8, `tree height ${h} too large`);
  return h;
}

/** Number of slots one pointer at `level` spans (level 0 pointers name single slots). */
const SPAN: number[] = [];
for (let l = 0, s = 1; l <= 9; l++, s *= FANOUT) SPAN.push(s);
export function slotsPerPointer(level: number): number {
  const s = SPAN[level];
  if (!(s !== undefined)) assert(false, `level ${level}`);
  return s;
}

// ---- Address-block header ----
// 0 u32 magic | 4 u16 type | 6 u16 level | 8 u64 own pba | 16 u64 birth | 24 uuid[16]
// 40 u64 index (node number at its level) | 48 u32 fanout | 52..64 zero

export interface NodeId {
  type: number;
  level: number;
  index: number;
}

export function writeNodeHeader(buf: Buffer, id: NodeId, pba: number, birth: number, uuid: Buffer): void {
  assert(buf.length === BLOCK, 'node buffer must be one block');
  buf.writeUInt32LE(NODE_MAGIC, 0);
  buf.writeUInt16LE(id.type, 4);
  buf.writeUInt16LE(id.level, 6);
  writeU64(buf, 8, pba);
  writeU64(buf, 16, birth);
  uuid.copy(buf, 24, 0, 16);
  writeU64(buf, 40, id.index);
  buf.writeUInt32LE(FANOUT, 48);
  buf.fill(0, 52, NODE_HEADER_BYTES);
}

/** Verifies an address block read via pointer p; returns a problem description or null. */
/** `crc`: the block's crc32c when the reader computed it already (a batch read off the event loop). */
export function verifyNode(buf: Buffer, p: BlockPtr, id: NodeId, uuid: Buffer, crc = crc32c(buf, 0, BLOCK)): string | null {
  if (crc !== p.crc) return `checksum mismatch (expected ${p.crc.toString(16).padStart(8, '0')}, got ${crc.toString(16).padStart(8, '0')})`;
  if (buf.readUInt32LE(0) !== NODE_MAGIC) return 'bad address-block magic';
  if (buf.readUInt16LE(4) !== id.type) return `wrong block type ${buf.readUInt16LE(4)} (expected ${id.type})`;
  if (buf.readUInt16LE(6) !== id.level) return `wrong level ${buf.readUInt16LE(6)} (expected ${id.level})`;
  if (readU64(buf, 8) !== p.pba) return `misdirected block: header says pba ${readU64(buf, 8)}`;
  if (readU64(buf, 16) !== p.birth) return `wrong birth CP ${readU64(buf, 16)} (pointer says ${p.birth})`;
  if (!buf.subarray(24, 40).equals(uuid)) return 'block belongs to another volume (UUID mismatch)';
  if (readU64(buf, 40) !== id.index) return `wrong node index ${readU64(buf, 40)} (expected ${id.index})`;
  if (buf.readUInt32LE(48) !== FANOUT) return 'wrong fan-out';
  return null;
}

// ---- Superblock ----
// 0 magic[8] "NVMSUPER" | 8 u32 version | 12 u32 block size | 16 uuid[16] | 32 u64 sizeBytes
// 40 u64 deviceBlocks | 48 u64 cpNumber | 56 u64 timestampMs | 64 u64 lastCpDurationMs
// 72 u64 nvlogSeq | 80 u64 nvlogEpoch | 88 u32 treeHeight | 92 u32 smapHeight
// 96 root ptr[24] | 120 smap root ptr[24] | 144 u64 usedBlocks | 152 u32 snapshotCount
// 156 u32 fanout | 160..256 zero | 256 snapshots[32] x 112 | 4092 u32 crc32c of [0, 4092)
// Snapshot entry: 0 u8 nameLen | 1 name[39] | 40 u64 cp | 48 u64 createdMs
// 56 u64 usedBlocks | 64 root ptr[24] | 88 smap root ptr[24]
// Version 2 adds the lineage (lineage.ts) after the snapshot table:
// 3840 u32 generation count (1..15) | 3844 u32 zero | 3848 count x {id[8] | u64 first CP},
// newest first; the rest up to the crc zero. A version 1 superblock (no lineage) decodes
// with the volume's root generation, as if it had always been written with it.

export const SUPER_MAGIC = Buffer.from('NVMSUPER', 'latin1');
/** Where the superblock holds the root pointer (24 bytes). */
export const SUPERBLOCK_ROOT_OFFSET = 96;
export const SUPER_VERSION = 2;
/** Superblocks written before lineages existed: still opened (their lineage is the root generation). */
export const SUPER_VERSION_NO_LINEAGE = 1;
export const MAX_SNAPSHOTS = 32;
export const MAX_SNAPSHOT_NAME_BYTES = 39;
const SNAP_BASE = 256;
const SNAP_BYTES = 112;
const SUPER_CRC_OFF = BLOCK - 4;
const LINEAGE_BASE = SNAP_BASE + MAX_SNAPSHOTS * SNAP_BYTES;
const LINEAGE_ENTRY_BYTES = 16;
assert(LINEAGE_BASE === 3840 && LINEAGE_BASE + 8 + LINEAGE_ENTRIES_MAX * LINEAGE_ENTRY_BYTES <= SUPER_CRC_OFF, 'snapshot table and lineage must fit the superblock');

export interface SnapshotRecord {
  name: string;
  cp: number;
  createdMs: number;
  usedBlocks: number;
  root: BlockPtr | null;
  smapRoot: BlockPtr;
}

export interface Superblock {
  volumeUuid: string;
  sizeBytes: number;
  deviceBlocks: number;
  cpNumber: number;
  timestampMs: number;
  lastCpDurationMs: number;
  nvlogSeq: number;
  nvlogEpoch: number;
  treeHeight: number;
  smapHeight: number;
  root: BlockPtr | null;
  smapRoot: BlockPtr;
  usedBlocks: number;
  snapshots: SnapshotRecord[];
  /** Newest generation first (lineage.ts). */
  lineage: readonly Generation[];
}

const SNAP_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:+-]*$/;

/** Returns a one-line problem with a snapshot name, or null if it is acceptable. */
export function snapshotNameProblem(name: string): string | null {
  if (Buffer.byteLength(name, 'utf8') > MAX_SNAPSHOT_NAME_BYTES) return `snapshot name "${name}" is longer than ${MAX_SNAPSHOT_NAME_BYTES} bytes`;
  if (!SNAP_NAME_RE.test(name)) return `bad snapshot name "${name}": use letters, digits and . _ : + - (not starting with punctuation)`;
  return null;
}

export function encodeSuperblock(sb: Superblock): Buffer {
  assert(sb.snapshots.length <= MAX_SNAPSHOTS, 'too many snapshots');
  const b = Buffer.alloc(BLOCK);
  SUPER_MAGIC.copy(b, 0);
  b.writeUInt32LE(SUPER_VERSION, 8);
  b.writeUInt32LE(BLOCK, 12);
  uuidToBytes(sb.volumeUuid).copy(b, 16);
  writeU64(b, 32, sb.sizeBytes);
  writeU64(b, 40, sb.deviceBlocks);
  writeU64(b, 48, sb.cpNumber);
  writeU64(b, 56, sb.timestampMs);
  writeU64(b, 64, sb.lastCpDurationMs);
  writeU64(b, 72, sb.nvlogSeq);
  writeU64(b, 80, sb.nvlogEpoch);
  b.writeUInt32LE(sb.treeHeight, 88);
  b.writeUInt32LE(sb.smapHeight, 92);
  encodePtr(b, SUPERBLOCK_ROOT_OFFSET, sb.root);
  encodePtr(b, 120, sb.smapRoot);
  writeU64(b, 144, sb.usedBlocks);
  b.writeUInt32LE(sb.snapshots.length, 152);
  b.writeUInt32LE(FANOUT, 156);
  sb.snapshots.forEach((s, i) => {
    const o = SNAP_BASE + i * SNAP_BYTES;
    assert(snapshotNameProblem(s.name) === null, `bad snapshot name ${s.name}`);
    const n = b.write(s.name, o + 1, MAX_SNAPSHOT_NAME_BYTES, 'utf8');
    b.writeUInt8(n, o);
    writeU64(b, o + 40, s.cp);
    writeU64(b, o + 48, s.createdMs);
    writeU64(b, o + 56, s.usedBlocks);
    encodePtr(b, o + 64, s.root);
    encodePtr(b, o + 88, s.smapRoot);
  });
  const lp = lineageProblem(sb.lineage, sb.cpNumber);
  if (lp !== null) assert(false, `superblock of CP ${sb.cpNumber}: ${lp}`);
  b.writeUInt32LE(sb.lineage.length, LINEAGE_BASE);
  sb.lineage.forEach((g, i) => {
    const o = LINEAGE_BASE + 8 + i * LINEAGE_ENTRY_BYTES;
    b.write(g.id, o, 8, 'hex');
    writeU64(b, o + 8, g.firstCp);
  });
  b.writeUInt32LE(crc32c(b, 0, SUPER_CRC_OFF), SUPER_CRC_OFF);
  return b;
}

/** Decodes a superblock slot: the superblock, or a one-line reason it is not valid. */
export function decodeSuperblock(b: Buffer): Superblock | string {
  assert(b.length === BLOCK, 'superblock buffer must be one block');
  if (!b.subarray(0, 8).equals(SUPER_MAGIC)) return 'bad magic';
  if (b.readUInt32LE(SUPER_CRC_OFF) !== crc32c(b, 0, SUPER_CRC_OFF)) return 'checksum mismatch';
  const version = b.readUInt32LE(8);
  if (version !== SUPER_VERSION && version !== SUPER_VERSION_NO_LINEAGE) return `unsupported version ${version}`;
  if (b.readUInt32LE(12) !== BLOCK) return `unsupported block size ${b.readUInt32LE(12)}`;
  if (b.readUInt32LE(156) !== FANOUT) return `unsupported fan-out ${b.readUInt32LE(156)}`;
  const deviceBlocks = readU64(b, 40);
  if (deviceBlocks < MIN_DEVICE_BLOCKS || deviceBlocks > MAX_DEVICE_BLOCKS) return `bad device size ${deviceBlocks} blocks`;
  const sizeBytes = readU64(b, 32);
  if (sizeBytes <= 0 || sizeBytes % BLOCK !== 0 || sizeBytes > MAX_VOLUME_BYTES) return `bad volume size ${sizeBytes}`;
  const fields = [48, 56, 64, 72, 80, 144].map((o) => readU64(b, o));
  if (fields.some((v) => v < 0)) return 'a 64-bit field is out of range';
  const [cpNumber, timestampMs, lastCpDurationMs, nvlogSeq, nvlogEpoch, usedBlocks] = fields as [number, number, number, number, number, number];
  const treeHeight = b.readUInt32LE(88);
  const smapHeight = b.readUInt32LE(92);
  if (treeHeight !== heightFor(sizeBytes / BLOCK)) return `tree height ${treeHeight} does not match volume size`;
  if (smapHeight !== heightFor(Math.ceil(deviceBlocks / BITS_PER_LEAF))) return `space-map height ${smapHeight} does not match device size`;
  const root = decodePtr(b, 96, deviceBlocks);
  const smapRoot = decodePtr(b, 120, deviceBlocks);
  if (typeof root === 'string') return `root pointer: ${root}`;
  if (typeof smapRoot === 'string' || smapRoot === null) return `space-map root pointer: ${smapRoot ?? 'hole'}`;
  const count = b.readUInt32LE(152);
  if (count > MAX_SNAPSHOTS) return `snapshot count ${count} too large`;
  const snapshots: SnapshotRecord[] = [];
  for (let i = 0; i < count; i++) {
    const o = SNAP_BASE + i * SNAP_BYTES;
    const len = b.readUInt8(o);
    if (len === 0 || len > MAX_SNAPSHOT_NAME_BYTES) return `snapshot ${i}: bad name length`;
    const name = b.toString('utf8', o + 1, o + 1 + len);
    const sroot = decodePtr(b, o + 64, deviceBlocks);
    const ssmap = decodePtr(b, o + 88, deviceBlocks);
    const cp = readU64(b, o + 40);
    const createdMs = readU64(b, o + 48);
    const used = readU64(b, o + 56);
    if (typeof sroot === 'string') return `snapshot ${name}: root pointer: ${sroot}`;
    if (typeof ssmap === 'string' || ssmap === null) return `snapshot ${name}: space-map pointer: ${ssmap ?? 'hole'}`;
    if (cp < 0 || createdMs < 0 || used < 0 || cp > cpNumber) return `snapshot ${name}: bad fields`;
    snapshots.push({ name, cp, createdMs, usedBlocks: used, root: sroot, smapRoot: ssmap });
  }
  const volumeUuid = bytesToUuid(b.subarray(16, 32));
  let lineage: Generation[];
  if (version === SUPER_VERSION_NO_LINEAGE) {
    lineage = [rootGeneration(volumeUuid)];
  } else {
    const n = b.readUInt32LE(LINEAGE_BASE);
    if (n < 1 || n > LINEAGE_ENTRIES_MAX || b.readUInt32LE(LINEAGE_BASE + 4) !== 0) return `lineage: bad generation count ${n}`;
    lineage = [];
    for (let i = 0; i < n; i++) {
      const o = LINEAGE_BASE + 8 + i * LINEAGE_ENTRY_BYTES;
      lineage.push({ id: b.toString('hex', o, o + 8), firstCp: readU64(b, o + 8) });
    }
    for (let i = LINEAGE_BASE + 8 + n * LINEAGE_ENTRY_BYTES; i < SUPER_CRC_OFF; i++) if (b[i] !== 0) return 'lineage: non-zero bytes after the last generation';
    const lp = lineageProblem(lineage, cpNumber);
    if (lp !== null) return lp;
  }
  return {
    volumeUuid,
    sizeBytes, deviceBlocks, cpNumber, timestampMs, lastCpDurationMs, nvlogSeq, nvlogEpoch,
    treeHeight, smapHeight, root, smapRoot, usedBlocks, snapshots, lineage,
  };
}
