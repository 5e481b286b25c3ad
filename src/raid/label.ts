/**
 * RAID member labels: one 4 KiB block at the start of every member (LABEL_COPIES slots,
 * generation g written to slot g mod LABEL_COPIES), naming the volume, the member's index
 * and the geometry, so that a swapped, stale or foreign member is recognised at open.
 *
 * Layout (little-endian):
 *   0 magic[8] "NVMRAIDL" | 8 u32 version | 12 u32 member index | 16 volume uuid[16]
 *   32 u32 member count | 36 u32 level | 40 u32 stripe unit bytes | 44 u32 head blocks
 *   48 u64 generation | 56 u64 member blocks (geometry) | 64 u64 logical blocks
 *   128 u8[MEMBERS_MAX] out-of-service flags as this label's writer saw them (1 = out)
 *   4092 u32 crc32c of [0, 4092)
 *
 * Invariants:
 * - A label verifies (magic, crc32c, version, fields in range) or it is ignored; the newest
 *   verifying slot is the member's label.
 * - The generation only grows: every change of the members' states is written as
 *   generation + 1 to every member still in service. A member whose newest label is
 *   older than the volume's newest missed writes (stale) and is not used.
 */
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { crc32c } from '../io/checksum';
import { bytesToUuid, readU64, uuidToBytes, writeU64 } from '../util/bytes';
import { LABEL_COPIES, MEMBERS_MAX, RAID_LEVELS, geometryProblem, type RaidLevel } from './geometry';

export const RAID_LABEL_MAGIC = Buffer.from('NVMRAIDL', 'latin1');
export const RAID_LABEL_VERSION = 1;
const CRC_OFF = BLOCK_SIZE_BYTES - 4;
const FLAGS_OFF = 128;

export interface RaidLabel {
  volumeUuid: string;
  memberIndex: number;
  members: number;
  level: RaidLevel;
  unitBytes: number;
  headBlocks: number;
  generation: number;
  memberBlocks: number;
  logicalBlocks: number;
  /** outOfService[i]: member i was faulted or missing when this label was written. */
  outOfService: boolean[];
}

export function encodeRaidLabel(l: RaidLabel): Buffer {
  assert(geometryProblem(l.level, l.members, l.unitBytes) === null, 'label geometry');
  assert(l.memberIndex >= 0 && l.memberIndex < l.members && l.outOfService.length === l.members, 'label member index');
  const b = Buffer.alloc(BLOCK_SIZE_BYTES);
  RAID_LABEL_MAGIC.copy(b, 0);
  b.writeUInt32LE(RAID_LABEL_VERSION, 8);
  b.writeUInt32LE(l.memberIndex, 12);
  uuidToBytes(l.volumeUuid).copy(b, 16);
  b.writeUInt32LE(l.members, 32);
  b.writeUInt32LE(l.level, 36);
  b.writeUInt32LE(l.unitBytes, 40);
  b.writeUInt32LE(l.headBlocks, 44);
  writeU64(b, 48, l.generation);
  writeU64(b, 56, l.memberBlocks);
  writeU64(b, 64, l.logicalBlocks);
  l.outOfService.forEach((o, i) => b.writeUInt8(o ? 1 : 0, FLAGS_OFF + i));
  b.writeUInt32LE(crc32c(b, 0, CRC_OFF), CRC_OFF);
  return b;
}

/** A label, or a one-line reason the block is not one. */
export function decodeRaidLabel(b: Buffer): RaidLabel | string {
  assert(b.length === BLOCK_SIZE_BYTES, 'label buffer must be one block');
  if (!b.subarray(0, 8).equals(RAID_LABEL_MAGIC)) return 'no RAID label';
  if (b.readUInt32LE(CRC_OFF) !== crc32c(b, 0, CRC_OFF)) return 'label checksum mismatch';
  if (b.readUInt32LE(8) !== RAID_LABEL_VERSION) return `unsupported label version ${b.readUInt32LE(8)}`;
  const members = b.readUInt32LE(32);
  const level = b.readUInt32LE(36);
  const unitBytes = b.readUInt32LE(40);
  const problem = geometryProblem(level, members, unitBytes);
  if (problem !== null || !RAID_LEVELS.includes(level as RaidLevel)) return `bad label geometry: ${problem ?? ''}`;
  const memberIndex = b.readUInt32LE(12);
  if (memberIndex >= members) return `bad member index ${memberIndex}`;
  const generation = readU64(b, 48);
  const memberBlocks = readU64(b, 56);
  const logicalBlocks = readU64(b, 64);
  if (generation < 0 || memberBlocks < 0 || logicalBlocks < 0) return 'a 64-bit label field is out of range';
  const outOfService: boolean[] = [];
  for (let i = 0; i < members; i++) outOfService.push(b.readUInt8(FLAGS_OFF + i) !== 0);
  assert(members <= MEMBERS_MAX, 'members');
  return {
    volumeUuid: bytesToUuid(b.subarray(16, 32)), memberIndex, members, level: level as RaidLevel, unitBytes,
    headBlocks: b.readUInt32LE(44), generation, memberBlocks, logicalBlocks, outOfService,
  };
}

/** The member block a generation's label goes to. */
export function labelSlot(generation: number): number {
  return generation % LABEL_COPIES;
}

/** The newest verifying label among a member's slots (the label area's first LABEL_COPIES blocks), or why none. */
export function newestLabel(area: Buffer): RaidLabel | string {
  assert(area.length === LABEL_COPIES * BLOCK_SIZE_BYTES, 'label area read');
  let best: RaidLabel | undefined;
  const reasons: string[] = [];
  for (let s = 0; s < LABEL_COPIES; s++) {
    const d = decodeRaidLabel(area.subarray(s * BLOCK_SIZE_BYTES, (s + 1) * BLOCK_SIZE_BYTES));
    if (typeof d === 'string') reasons.push(d);
    else if (!best || d.generation > best.generation) best = d;
  }
  return best ?? reasons[0] ?? 'no RAID label';
}
