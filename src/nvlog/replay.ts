/**
 * Scanning an NVRAM region: which records form the replay chain after a committed
 * watermark.
 *
 * Invariants:
 * - Only records of the header's epoch (and salt) are considered; records left by an
 *   earlier epoch never verify, so they never replay.
 * - Within a half, the scan walks records from the half's start while each one verifies
 *   and its seq is exactly one more than the previous; it stops at the first that does
 *   not (a torn record, stale bytes from an older rotation, or the end of the half).
 * - The chain is the union of both halves' runs, restricted to seq > watermark, sorted
 *   by seq, and cut at the first gap: it is contiguous from watermark + 1.
 * - Past the end of each run the rest of the half is probed at every record boundary
 *   (64 bytes: at most halfSize / 64 probes per half) for further valid records. Valid
 *   records with seq beyond the chain's end are never replayed; if one of them claims
 *   (durableSeq) that a record after the chain's end was durable, the gap is mid-log
 *   damage (`damage`: acknowledged, durable writes lost); otherwise it is a tail that was
 *   never made durable (`unflushedGap`: torn, or pages reordered by a power loss).
 *   Stale records of the same epoch left from an earlier use of a half have seqs at or
 *   below the committed watermark (a half is reused only after its CP is durable), so
 *   they never count.
 */
import type { NvramRegion } from '../io/types';
import { assert } from '../util/assert';
import { decodeRecord, halfLayout, RECORD_ALIGN_BYTES, readRegionHeader, recordSizeBytes, type HalfLayout, type RecordHeader, type RegionHeader } from './format';

export interface LocatedRecord {
  header: RecordHeader;
  half: 0 | 1;
  /** Absolute offset of the record in the region. */
  regionOffset: number;
  /** Absolute offset of the payload (writes) in the region. */
  payloadOffset: number;
}

export interface HalfScan {
  /** Verified records at the start of the half, contiguous in seq. */
  records: LocatedRecord[];
  /** Offset (relative to the half) just after the last verified record. */
  endOffset: number;
  /** Verified records found past the end of the run (after a record that does not verify). */
  beyond: RecordHeader[];
}

/** Records after the replay chain's end that cannot be replayed (the chain stops at a record that is missing or does not verify). */
export interface NvramGap {
  /** The first seq that is not replayed (chain end + 1). */
  firstLostSeq: number;
  /** The highest seq of a valid record found after the gap. */
  lastLostSeq: number;
  /** The highest seq a record after the gap proves was durable (0 if none proves anything). */
  lastDurableLostSeq: number;
  /** Valid records found after the gap. */
  validRecordsAfter: number;
}

export interface ScanResult {
  header: RegionHeader;
  layout: HalfLayout;
  halves: [HalfScan, HalfScan];
  /** Records to replay: seq watermark+1, +2, ... in order. */
  chain: LocatedRecord[];
  /** Verified records with seq > watermark that were not replayable because of a gap. */
  orphanedRecords: number;
  /** Mid-log damage: a valid record after the gap proves that lost records were durable. */
  damage: NvramGap | undefined;
  /** A gap after which no record proves durability (a torn or reordered unflushed tail). */
  unflushedGap: NvramGap | undefined;
}

export class NvramFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NvramFormatError';
  }
}

function scanHalf(buf: Buffer, header: RegionHeader, layout: HalfLayout, half: 0 | 1): HalfScan {
  const start = layout.halfOffsets[half];
  const limit = start + layout.halfSizeBytes;
  const records: LocatedRecord[] = [];
  let at = start;
  let prevSeq = -1;
  // Bounded: every iteration advances by at least one record header.
  while (at < limit) {
    const h = decodeRecord(buf, at, limit, header.epoch, header.salt, layout.recordPayloadMaxBytes);
    if (!h) break;
    if (prevSeq !== -1 && h.seq !== prevSeq + 1) break;
    records.push({ header: h, half, regionOffset: at, payloadOffset: at + 64 });
    prevSeq = h.seq;
    at += recordSizeBytes(h.payloadBytes);
  }
  const endOffset = at - start;
  // Probe the rest of the half; bounded: every iteration advances by >= RECORD_ALIGN_BYTES.
  const beyond: RecordHeader[] = [];
  while (at < limit) {
    const h = decodeRecord(buf, at, limit, header.epoch, header.salt, layout.recordPayloadMaxBytes);
    if (h) {
      beyond.push(h);
      at += recordSizeBytes(h.payloadBytes);
    } else {
      at += RECORD_ALIGN_BYTES;
    }
  }
  return { records, endOffset, beyond };
}

/** Reads the header and scans both halves. Throws NvramFormatError if the region has no valid header or belongs to another volume. */
export function scanRegion(region: NvramRegion, volumeUuid: string, watermarkSeq: number): ScanResult {
  const buf = region.buffer;
  const header = readRegionHeader(buf);
  if (!header) throw new NvramFormatError('NVRAM region has no valid header (not initialised, or corrupt)');
  if (header.uuid !== volumeUuid) throw new NvramFormatError(`NVRAM region belongs to volume ${header.uuid}, not ${volumeUuid}`);
  if (header.regionSizeBytes !== region.sizeBytes) {
    throw new NvramFormatError(`NVRAM region is ${region.sizeBytes} bytes but its header says ${header.regionSizeBytes}`);
  }
  const layout = halfLayout(region.sizeBytes);
  if (header.halfSizeBytes !== layout.halfSizeBytes) throw new NvramFormatError(`NVRAM header half size ${header.halfSizeBytes} does not match ${layout.halfSizeBytes}`);
  const halves: [HalfScan, HalfScan] = [scanHalf(buf, header, layout, 0), scanHalf(buf, header, layout, 1)];
  const candidates = [...halves[0].records, ...halves[1].records].filter((r) => r.header.seq > watermarkSeq);
  candidates.sort((a, b) => a.header.seq - b.header.seq);
  const chain: LocatedRecord[] = [];
  let want = watermarkSeq + 1;
  for (const r of candidates) {
    if (r.header.seq !== want) break;
    chain.push(r);
    want++;
  }
  for (let i = 1; i < chain.length; i++) assert(chain[i]!.header.seq === chain[i - 1]!.header.seq + 1, 'chain not contiguous');
  const chainEnd = want - 1;
  const after = [...candidates.map((r) => r.header), ...halves[0].beyond, ...halves[1].beyond].filter((h) => h.seq > chainEnd);
  let gap: NvramGap | undefined;
  if (after.length > 0) {
    gap = { firstLostSeq: chainEnd + 1, lastLostSeq: 0, lastDurableLostSeq: 0, validRecordsAfter: after.length };
    for (const h of after) {
      gap.lastLostSeq = Math.max(gap.lastLostSeq, h.seq);
      gap.lastDurableLostSeq = Math.max(gap.lastDurableLostSeq, h.durableSeq);
    }
    assert(gap.lastLostSeq > chainEnd && gap.lastDurableLostSeq < gap.lastLostSeq, 'gap bounds');
  }
  const proven = gap !== undefined && gap.lastDurableLostSeq > chainEnd;
  return {
    header, layout, halves, chain, orphanedRecords: candidates.length - chain.length,
    damage: proven ? gap : undefined,
    unflushedGap: proven ? undefined : gap,
  };
}
