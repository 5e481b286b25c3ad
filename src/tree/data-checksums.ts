/**
 * A CP's data blocks: which are all zeroes (they become holes) and the crc32c of the rest,
 * in runs. Blocks that sit back to back in one memory (the 4 KiB views of a large
 * record's payload in the NVRAM) are checksummed by one native call for the run instead
 * of one call per block; a run's length is capped so the caller's slicer can yield
 * between runs.
 *
 * Invariants:
 * - crcs[i] is the crc32c of datas[i] exactly as it was given, for every block kept.
 * - A block is made null (a hole) iff every byte of it is zero: the crc only picks the
 *   candidates (a zero block's crc32c is ZERO_BLOCK_CRC), a byte compare decides.
 * - Views are only read, never copied or kept.
 */
import { BLOCK } from './layout';
import { crc32c, crc32cBlock, crc32cBlocks } from '../io/checksum';
import { assert } from '../util/assert';

const ZERO_BLOCK = Buffer.alloc(BLOCK);
export const ZERO_BLOCK_CRC = crc32c(ZERO_BLOCK);
/** Blocks checksummed by one call at most (1 MiB): the caller yields between calls. */
export const CRC_RUN_BLOCKS_MAX = 256;

/** True when b starts right where a ends, in the same memory. */
function followsIn(a: Buffer, b: Buffer): boolean {
  return a.buffer === b.buffer && a.byteOffset + BLOCK === b.byteOffset;
}

/**
 * Checksums datas[from..] up to CRC_RUN_BLOCKS_MAX blocks (stopping early at a null or
 * at the end of a run of adjacent blocks) into crcs, and nulls out all-zero blocks.
 * known[i], where given, is datas[i]'s crc32c already (the log's, from the thread that
 * appended it): taken as it is, the block is not read for it (a run is all known or all
 * unknown). Returns the index after the last block handled (> from when from < datas.length).
 */
export function checksumRun(datas: (Buffer | null)[], from: number, crcs: number[], scratch: Buffer, known?: readonly (number | undefined)[]): number {
  assert(scratch.length >= CRC_RUN_BLOCKS_MAX * 4, 'checksumRun scratch too small');
  const n = datas.length;
  const first = datas[from];
  if (first === null || first === undefined) return from + 1;
  assert(first.length === BLOCK, `data block of ${first.length} bytes`);
  let end = from + 1;
  if (known !== undefined && known[from] !== undefined) {
    while (end < n && end - from < CRC_RUN_BLOCKS_MAX && known[end] !== undefined && datas[end] !== null) end++;
    for (let i = from; i < end; i++) crcs[i] = known[i]!;
    nullZeroBlocks(datas, from, end, crcs);
    return end;
  }
  while (end < n && end - from < CRC_RUN_BLOCKS_MAX) {
    const next = datas[end];
    if (next === null || next === undefined || !followsIn(datas[end - 1]!, next) || known?.[end] !== undefined) break;
    end++;
  }
  if (end - from === 1) {
    crcs[from] = crc32cBlock(first);
  } else {
    crc32cBlocks(Buffer.from(first.buffer, first.byteOffset, (end - from) * BLOCK), 0, end - from, scratch);
    for (let i = from; i < end; i++) crcs[i] = scratch.readUInt32LE((i - from) * 4);
  }
  nullZeroBlocks(datas, from, end, crcs);
  return end;
}

/** All-zero blocks of datas[from, end) become null (crc 0): the crc picks the candidates, a compare decides. */
function nullZeroBlocks(datas: (Buffer | null)[], from: number, end: number, crcs: number[]): void {
  for (let i = from; i < end; i++) {
    const d = datas[i]!;
    assert(d.length === BLOCK, `data block of ${d.length} bytes`);
    if (crcs[i] === ZERO_BLOCK_CRC && d.equals(ZERO_BLOCK)) {
      datas[i] = null;
      crcs[i] = 0;
    }
  }
}

/** A scratch Buffer for checksumRun. */
export function crcScratch(): Buffer {
  return Buffer.allocUnsafe(CRC_RUN_BLOCKS_MAX * 4);
}
