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
 */
import type { NvramRegion } from '../io/types';
import { assert } from '../util/assert';
import { decodeRecord, halfLayout, readRegionHeader, recordSizeBytes, type HalfLayout, type RecordHeader, type RegionHeader } from './format';

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
}

export interface ScanResult {
  header: RegionHeader;
  layout: HalfLayout;
  halves: [HalfScan, HalfScan];
  /** Records to replay: seq watermark+1, +2, ... in order. */
  chain: LocatedRecord[];
  /** Verified records with seq > watermark that were not replayable because of a gap. */
  orphanedRecords: number;
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
  return { records, endOffset: at - start };
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
  return { header, layout, halves, chain, orphanedRecords: candidates.length - chain.length };
}
