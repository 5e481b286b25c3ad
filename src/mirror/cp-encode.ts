/**
 * How each block a CP writes travels to a destination that holds the CP before it:
 *   - a data block wholly written by a log record the destination holds: a reference
 *     (record seq = transfer id, block index, crc32c), seed 003;
 *   - a metadata block (address or space-map block): a delta against the committed block
 *     it replaces, or against zeroes for a new one (delta.ts), when that is small;
 *   - anything else: the block itself.
 *
 * Invariants:
 * - Only data blocks (those with a crc) are referenced, and only when `referable(seq)`
 *   says the destination will hold that record when it reads the reference.
 * - A delta is computed against exactly the block the destination holds at prevPba (the
 *   committed version, read from this device before the CP that replaces it is durable),
 *   or built from the words the tree says it changed (changedRuns: the rest equals it).
 * - Frames stay under their caps: references in groups of REFS_PER_FRAME_MAX, deltas in
 *   groups whose entries fit DELTAS_RAW_MAX_BYTES.
 */
import { crc32cWide } from '../io/native';
import type { CpBlock } from '../tree/types';
import { DELTA_FROM_ZEROES, ZERO_BLOCK, encodeDelta, encodeDeltaRuns } from './delta';
import { DELTAS_PER_FRAME_MAX, DELTAS_RAW_MAX_BYTES, REFS_PER_FRAME_MAX, deltaEntryBytes, type CpDelta, type CpRef } from './wire';

export interface EncodedCpBlocks {
  refs: CpRef[];
  deltas: CpDelta[];
  data: CpBlock[];
}

export async function encodeCpBlocks(
  blocks: readonly CpBlock[],
  referable: (seq: number) => boolean,
  readRaw: (pba: number, count: number, dst: Buffer) => Promise<void>,
  maybeYield: () => Promise<void> = () => Promise.resolve(),
): Promise<EncodedCpBlocks> {
  const out: EncodedCpBlocks = { refs: [], deltas: [], data: [] };
  const prevBuf = Buffer.allocUnsafe(4096);
  let n = 0;
  for (const b of blocks) {
    // Cached reads resolve in microtasks: without a yield a CP's blocks would hold the
    // event loop (and the records it forwards) for tens of milliseconds.
    if ((++n & 63) === 0) await maybeYield();
    if (b.crc !== undefined) {
      // Client data: a reference when the destination holds its record, else the block (never a delta).
      const o = b.origin;
      if (o && referable(o.seq)) out.refs.push({ pba: b.pba, seq: o.seq, index: o.index, crc: b.crc });
      else out.data.push(b);
      continue;
    }
    let delta: Buffer | undefined;
    if (b.prevPba !== undefined && b.changedRuns) {
      delta = encodeDeltaRuns(b.buf, b.changedRuns); // the tree says where it edited
    } else {
      let prev: Buffer | undefined;
      if (b.prevPba !== undefined) {
        await readRaw(b.prevPba, 1, prevBuf);
        prev = prevBuf;
      }
      delta = encodeDelta(prev ?? ZERO_BLOCK, b.buf);
    }
    if (delta) out.deltas.push({ pba: b.pba, prevPba: b.prevPba ?? DELTA_FROM_ZEROES, crc: b.nodeCrc ?? crc32cWide(b.buf), delta });
    else out.data.push(b);
  }
  return out;
}

/** References in frame-sized groups. */
export function* refFrames(refs: CpRef[]): Generator<CpRef[]> {
  for (let i = 0; i < refs.length; i += REFS_PER_FRAME_MAX) yield refs.slice(i, i + REFS_PER_FRAME_MAX);
}

/** Deltas in frame-sized groups (by entry count and inflated bytes). */
export function* deltaFrames(deltas: CpDelta[]): Generator<CpDelta[]> {
  let i = 0;
  while (i < deltas.length) {
    let bytes = 0;
    let j = i;
    while (j < deltas.length && j - i < DELTAS_PER_FRAME_MAX && bytes + deltaEntryBytes(deltas[j]!) <= DELTAS_RAW_MAX_BYTES) bytes += deltaEntryBytes(deltas[j++]!);
    yield deltas.slice(i, j);
    i = j;
  }
}
