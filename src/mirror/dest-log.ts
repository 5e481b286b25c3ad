/**
 * The destination's log file for one source (seeds 002/004): every record the source
 * forwards in sync mode is stored here, in a memory-mapped file (MAP_SHARED: a stored
 * record survives a crash of the receiving process at once; persist() makes it survive
 * power loss), until a committed CP covers it.
 *
 *   [0, 4096)        header: magic "NVMDLOG2", source uuid, size, salt, stream number,
 *                    the stream's first seq, crc32c; then the writer: the source process
 *                    id (HELLO) whose streams stored the newest records, the first seq it
 *                    stored, crc32c (a log without it has no known writer); then the
 *                    durable mark: u64 seq, crc32c (absent: 0)
 *   [4096, size)     a ring of records: 64-byte header + payload (whole 4 KiB blocks)
 *
 * Record header: u32 magic "NVDR" | u32 crc32c (seeded with the salt, over bytes 8..64
 * and the payload) | u64 seq | u8 type | u8 flags | 2 zero | u32 stream | u64 offset |
 * u64 length | u64 payload bytes | 16 zero.
 *
 * A stream is one connection's run of records (start()). The log survives a restart of
 * the receiver (open() scans the ring, recover mode): the records kept are those after
 * the committed watermark, in seq order, stopping at the first gap, at the first one that
 * does not verify, and at one of an older stream at or past the newest stream's first
 * seq (the source may have reused those seqs). That is also what promote replays (seed
 * 004).
 *
 * The durable mark tells the log's end from damage. It is written into the header (not
 * synced: the next sync of the file carries it) only after every record up to it was made
 * durable, so on disk it never claims more than was durable. A record up to the mark that
 * the scan cannot find is damage (media, or a hand), never a power loss: those records
 * were acknowledged, and `damage` names them (the receiver logs it; promote refuses
 * unless told to accept the loss). A new stream lowers the mark below its first seq and
 * makes that header durable before any record of it is stored (startDurably()): the old
 * stream's records it writes over are then no longer claimed.
 *
 * Invariants:
 * - Records are stored in seq order with no gap: a record is stored only if its seq is
 *   exactly lastStoredSeq + 1 or it starts a new stream (start()); stored records are
 *   [storedFromSeq, lastStoredSeq].
 * - `heldSeq`: every record <= heldSeq is stored here or covered by a committed CP. When
 *   the ring is full, records are dropped (overflow): they are then held only once a
 *   committed CP covers them, so heldSeq does not move past the last stored record until
 *   then, and the source's writes wait for that CP (bounded memory, never a lost ack).
 * - A record is released only when a committed CP's watermark covers it.
 * - While records are being dropped, referableFromSeq (what WELCOME and RECORD_ACK send
 *   as storedFromSeq) names none: a CP must not reference a record that may be a dropped one.
 * - Memory: the index holds one small entry per stored record, at most
 *   (size - 4096) / 64 entries, and a crc32c per 4 KiB of log (size / 1024 bytes).
 * - The crc32c kept for a stored block is that of its bytes as they arrived (computed
 *   once, with the frame's checksum, or here); the record's checksum is combined from them.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import { MmapNvram } from '../io/mmap-nvram';
import type { NvramRegion } from '../io/types';
import { crc32cBlocks, crc32cWide, errnoCode } from '../io/native';
import { crc32cAppendBlock } from '../io/checksum';
import { assert } from '../util/assert';
import { formatSize } from '../util/size';
import { BLOCK_BYTES, putU64, RECORD_PAYLOAD_MAX_BYTES } from './wire';

export const DEST_LOG_NAME = 'source.log';

/**
 * The slot of the first payload block of the record at `at` in the block-checksum table:
 * the 4 KiB unit its first byte falls in. Stored payload blocks never overlap, so their
 * first bytes fall in distinct units, and block i of the record is in slot + i.
 */
function blockSlot(at: number): number {
  return Math.floor((at + RECORD_HEADER_BYTES) / BLOCK_BYTES);
}
const HEADER_BYTES = 4096;
const HEADER_MAGIC = Buffer.from('NVMDLOG2', 'latin1');
/** Header bytes covered by its crc32c (stored right after them). */
const HEADER_CRC_AT = 48;
/** The writer (see `writer`): process id [8], first seq u64, then their crc32c. */
const WRITER_AT = 56;
const WRITER_CRC_AT = 72;
const NO_WRITER = '0000000000000000';
/** The durable mark (see the file comment): u64 seq, then its crc32c. */
const MARK_AT = 80;
const MARK_CRC_AT = 88;
const RECORD_MAGIC = 0x5244564e; // "NVDR"
const RECORD_HEADER_BYTES = 64;
/** referableFromSeq while the log drops records: past every seq, so no record may be referenced. */
export const NO_REFERENCES_FROM_SEQ = Number.MAX_SAFE_INTEGER;
export const DEST_LOG_MIN_BYTES = 16 * 1024 * 1024;
export const DEST_LOG_MAX_BYTES = 1024 * 1024 * 1024;

/** Log size for a source with an NVRAM of `nvramBytes`: room for both halves twice over. */
export function destLogBytesFor(nvramBytes: number): number {
  const want = Math.ceil((4 * nvramBytes) / BLOCK_BYTES) * BLOCK_BYTES;
  return Math.min(DEST_LOG_MAX_BYTES, Math.max(DEST_LOG_MIN_BYTES, want));
}

interface Entry {
  seq: number;
  at: number;
  size: number;
  type: number;
  lengthBytes: number;
}

export interface StoredRecord {
  seq: number;
  type: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  payload: Buffer;
}

export class DestLog {
  private readonly entries: Entry[] = [];
  private head = 0;
  private writeAt = HEADER_BYTES;
  private salt = 0;
  /** Records from this seq on were dropped (ring full) until droppedThrough; 0: none. */
  private dropFrom = 0;
  private droppedThrough = 0;
  private lastStoredSeq = 0;
  private persistedSeq = 0;
  private committedSeq = 0;
  /** The first seq of the current stream: records between the committed watermark and it are missing until a CP covers them. */
  private streamFrom = 1;
  /** The current stream's number (stored in each record; a later stream supersedes an earlier one's records from its first seq). */
  private stream = 0;
  /** Records found valid when the log was reopened (recover mode). */
  recordsRecovered = 0;
  /**
   * Set by a recover-mode open whose kept run stops before the durable mark: record
   * firstMissingSeq cannot be read although every record through durableThroughSeq was
   * stored durably (acknowledged writes); validAfter records past it still verify but are
   * not kept (replaying them without the missing one would not be a prefix).
   */
  damage: { firstMissingSeq: number; durableThroughSeq: number; validAfter: number } | undefined;
  /** The durable mark as last written into the header's mapping (see the file comment). */
  private durableMark = 0;
  /** The mark as the header had it at its last sync here (close() syncs a newer one). */
  private markSynced = 0;
  /** The byte range [lo, hi) of records written since the last persist (a wrap widens it to the ring). */
  private dirtyLo = Infinity;
  private dirtyHi = 0;
  recordsStored = 0;
  recordsDropped = 0;

  /** While the log drops records (its ring was full), the first one it dropped; 0 when it stores them. */
  get droppingFromSeq(): number {
    return this.dropFrom;
  }

  /**
   * The crc32c of every stored block, by its place in the ring (blockSlot): a reference's
   * checksum is checked against it without reading the block. 4 bytes per 4 KiB of log.
   */
  private readonly blockCrcs: Uint32Array;
  /** One record's block checksums, when they are computed here. */
  private readonly crcScratch = Buffer.allocUnsafe((RECORD_PAYLOAD_MAX_BYTES / BLOCK_BYTES) * 4);

  private constructor(private readonly region: NvramRegion & { readonly reopenPath?: string }, private readonly uuid: string) {
    this.blockCrcs = new Uint32Array(Math.ceil(region.sizeBytes / BLOCK_BYTES));
  }

  /**
   * Opens (creating if needed) the log of source `uuid`. 'recover' keeps the records a
   * previous run stored after `committedSeq` (the committed CP's watermark; see the file
   * comment); 'fresh' starts an empty log (new salt: nothing of an earlier run verifies
   * any more).
   */
  static async open(path: string, uuid: string, sizeBytes: number, mode: 'recover' | 'fresh' = 'recover', committedSeq = 0): Promise<DestLog> {
    assert(sizeBytes >= DEST_LOG_MIN_BYTES && sizeBytes % BLOCK_BYTES === 0, `dest log size ${sizeBytes}`);
    const fail = (e: unknown): Error => new Error(`the mirror's log ${path} (${formatSize(sizeBytes)}): ${e instanceof Error ? e.message : String(e)}`);
    // Missing, or another size (the source's NVRAM changed; or a creation cut short, e.g. by
    // a full disk): made anew. Any other failure (permissions, descriptors, memory) leaves
    // the file as it is: the records in it may be the only copy a promote would replay.
    let exists: boolean;
    try {
      exists = (await fs.promises.stat(path)).size === sizeBytes;
    } catch (e) {
      if (errnoCode(e) !== 'ENOENT') throw fail(e);
      exists = false;
    }
    let region: MmapNvram;
    try {
      if (!exists) await fs.promises.rm(path, { force: true });
      region = await MmapNvram.open(path, exists ? { sizeBytes } : { sizeBytes, create: true });
    } catch (e) {
      throw fail(e);
    }
    return DestLog.over(region, uuid, mode, committedSeq);
  }

  /**
   * The same over any region (the recording and memory regions of the power-loss
   * enumeration: test/crash/power-loss-dest-log.test.ts). Without a file behind it
   * (`reopenPath` undefined) no other writer can be given the log (the native receive
   * thread's durable acks need the file).
   */
  static async over(region: NvramRegion & { readonly reopenPath?: string }, uuid: string, mode: 'recover' | 'fresh' = 'recover', committedSeq = 0): Promise<DestLog> {
    // (Files are at least DEST_LOG_MIN_BYTES: open(); a test may use a smaller ring.)
    assert(region.sizeBytes >= HEADER_BYTES + RECORD_HEADER_BYTES + RECORD_PAYLOAD_MAX_BYTES && region.sizeBytes % BLOCK_BYTES === 0, `dest log size ${region.sizeBytes}`);
    const log = new DestLog(region, uuid);
    if (mode === 'recover' && log.readHeader()) {
      log.scan(committedSeq);
      // What the scan found may be only in memory (a crash of the process, not of the
      // host: the pages were never synced). It counts as durable (persistedSeq) only once
      // synced here. (MmapNvram.open syncs its file already; other regions need not.)
      if (log.recordsRecovered > 0) await region.persist(0, region.sizeBytes);
    } else await log.writeHeader();
    return log;
  }

  /** Reads a header of this source and size; false if there is none (then the log starts fresh). */
  private readHeader(): boolean {
    const b = this.region.buffer;
    if (!b.subarray(0, 8).equals(HEADER_MAGIC)) return false;
    if (b.readUInt32LE(HEADER_CRC_AT) !== crc32cWide(b, 0, HEADER_CRC_AT)) return false;
    if (!b.subarray(8, 24).equals(Buffer.from(this.uuid.replace(/-/g, ''), 'hex'))) return false;
    if (Number(b.readBigUInt64LE(24)) !== this.region.sizeBytes) return false;
    this.salt = b.readUInt32LE(32);
    this.stream = b.readUInt32LE(36);
    this.headerStreamFrom = Number(b.readBigUInt64LE(40));
    if (b.readUInt32LE(WRITER_CRC_AT) === crc32cWide(b, WRITER_AT, WRITER_CRC_AT - WRITER_AT)) {
      this.writerId = b.subarray(WRITER_AT, WRITER_AT + 8).toString('hex');
      this.writerFromSeq = Number(b.readBigUInt64LE(WRITER_AT + 8));
    }
    if (b.readUInt32LE(MARK_CRC_AT) === crc32cWide(b, MARK_AT, MARK_CRC_AT - MARK_AT)) this.durableMark = Number(b.readBigUInt64LE(MARK_AT));
    this.markSynced = this.durableMark;
    return true;
  }

  /**
   * Rebuilds the index from the ring: every record that verifies, then the run kept (see
   * the file comment). Records are 64-byte aligned; a valid record's payload is skipped
   * (a block of data that looks like a header is not one).
   */
  private scan(committedSeq: number): void {
    const b = this.region.buffer;
    const end = this.region.sizeBytes;
    const found = new Map<number, Entry & { stream: number }>();
    for (let at = HEADER_BYTES; at + RECORD_HEADER_BYTES <= end; ) {
      if (b.readUInt32LE(at) !== RECORD_MAGIC) {
        at += RECORD_HEADER_BYTES;
        continue;
      }
      const payloadBytes = Number(b.readBigUInt64LE(at + 40));
      const size = RECORD_HEADER_BYTES + payloadBytes;
      let ok = payloadBytes % BLOCK_BYTES === 0 && payloadBytes <= RECORD_PAYLOAD_MAX_BYTES && at + size <= end;
      if (ok) {
        crc32cBlocks(b, at + RECORD_HEADER_BYTES, payloadBytes / BLOCK_BYTES, this.crcScratch);
        ok = this.recordCrc(at, payloadBytes / BLOCK_BYTES, this.crcScratch) === b.readUInt32LE(at + 4);
      }
      if (!ok) {
        at += RECORD_HEADER_BYTES;
        continue;
      }
      this.keepBlockCrcs(at, payloadBytes / BLOCK_BYTES, this.crcScratch);
      const seq = Number(b.readBigUInt64LE(at + 8));
      const stream = b.readUInt32LE(at + 20);
      const e = { seq, at, size, type: b.readUInt8(at + 16), lengthBytes: Number(b.readBigUInt64LE(at + 32)), stream };
      // Of two copies of a seq, the later stream's is the record (the other is a leftover).
      const prev = found.get(seq);
      if (stream <= this.stream && (!prev || prev.stream < stream) && !(stream < this.stream && seq >= this.headerStreamFrom)) found.set(seq, e);
      at += size;
    }
    // The kept run: consecutive seqs from the committed watermark on, whose streams never go back.
    const run: Array<Entry & { stream: number }> = [];
    for (let seq = committedSeq + 1; ; seq++) {
      const e = found.get(seq);
      const last = run[run.length - 1];
      if (!e || (last && e.stream < last.stream)) break;
      run.push(e);
    }
    this.committedSeq = committedSeq;
    for (const e of run) {
      this.entries.push({ seq: e.seq, at: e.at, size: e.size, type: e.type, lengthBytes: e.lengthBytes });
    }
    const last = run[run.length - 1];
    if (last) {
      this.writeAt = last.at + last.size;
      this.lastStoredSeq = last.seq;
      this.persistedSeq = last.seq;
      this.streamFrom = run[0]!.seq;
    }
    this.recordsRecovered = run.length;
    const next = (last ? last.seq : committedSeq) + 1;
    if (this.durableMark >= next) {
      let validAfter = 0;
      for (const s of found.keys()) if (s > next) validAfter++;
      this.damage = { firstMissingSeq: next, durableThroughSeq: this.durableMark, validAfter };
    }
  }

  /** The newest stream's first seq as the header records it. */
  private headerStreamFrom = 1;
  /** The source process whose streams stored the records from writerFromSeq on (NO_WRITER: unknown). */
  private writerId = NO_WRITER;
  private writerFromSeq = 0;

  /**
   * The source process (HELLO's processId) that stored the newest records, and the first
   * seq it stored: every stored record from that seq on came from that process's streams.
   * Undefined when unknown (a new log, or one written before the field existed).
   */
  get writer(): { id: string; fromSeq: number } | undefined {
    return this.writerId === NO_WRITER ? undefined : { id: this.writerId, fromSeq: this.writerFromSeq };
  }

  private writeHeaderFields(): void {
    const b = this.region.buffer;
    b.fill(0, 0, HEADER_CRC_AT + 4);
    HEADER_MAGIC.copy(b, 0);
    Buffer.from(this.uuid.replace(/-/g, ''), 'hex').copy(b, 8);
    b.writeBigUInt64LE(BigInt(this.region.sizeBytes), 24);
    b.writeUInt32LE(this.salt, 32);
    b.writeUInt32LE(this.stream, 36);
    b.writeBigUInt64LE(BigInt(this.headerStreamFrom), 40);
    b.writeUInt32LE(crc32cWide(b, 0, HEADER_CRC_AT), HEADER_CRC_AT);
    b.fill(0, HEADER_CRC_AT + 4, WRITER_AT);
    Buffer.from(this.writerId, 'hex').copy(b, WRITER_AT);
    b.writeBigUInt64LE(BigInt(this.writerFromSeq), WRITER_AT + 8);
    b.writeUInt32LE(crc32cWide(b, WRITER_AT, WRITER_CRC_AT - WRITER_AT), WRITER_CRC_AT);
    this.writeMark();
  }

  private writeMark(): void {
    const b = this.region.buffer;
    b.writeBigUInt64LE(BigInt(this.durableMark), MARK_AT);
    b.writeUInt32LE(crc32cWide(b, MARK_AT, MARK_CRC_AT - MARK_AT), MARK_CRC_AT);
  }

  /**
   * Records up to durableSeq are durable now: the mark follows them into the header's
   * mapping (the next sync of the file makes it durable; until then the disk has a lower one).
   */
  private advanceMark(): void {
    const d = this.durableSeq;
    if (d <= this.durableMark) return;
    this.durableMark = d;
    this.writeMark();
  }

  private async writeHeader(): Promise<void> {
    const b = this.region.buffer;
    b.fill(0, 0, HEADER_BYTES);
    this.salt = crypto.randomBytes(4).readUInt32LE(0);
    this.stream = 0;
    this.headerStreamFrom = 1;
    this.writerId = NO_WRITER;
    this.writerFromSeq = 0;
    this.durableMark = 0;
    this.markSynced = 0;
    this.writeHeaderFields();
    // Invalidate the first record slot so a scan of this generation starts clean.
    b.fill(0, HEADER_BYTES, HEADER_BYTES + RECORD_HEADER_BYTES);
    await this.region.persist(0, HEADER_BYTES + RECORD_HEADER_BYTES);
  }

  get sizeBytes(): number {
    return this.region.sizeBytes;
  }

  /** The highest seq <= `stored` such that every record up to it is stored or committed. */
  private held(stored: number): number {
    if (this.committedSeq < this.streamFrom - 1) return this.committedSeq;
    const top = this.dropFrom > 0 ? Math.min(stored, this.dropFrom - 1) : stored;
    return Math.max(this.committedSeq, top);
  }

  /** Every record <= heldSeq is stored here or covered by a committed CP. */
  get heldSeq(): number {
    return this.held(this.lastStoredSeq);
  }

  /** ... and durably so. */
  get durableSeq(): number {
    return this.held(Math.min(this.persistedSeq, this.lastStoredSeq));
  }

  /** The newest record stored (0: none); start() drops those at or past a new stream's first seq. */
  get newestStoredSeq(): number {
    return this.entries.length > this.head ? this.entries[this.entries.length - 1]!.seq : 0;
  }

  /** The newest record stored below `seq` (0: none). */
  newestStoredBelow(seq: number): number {
    let lo = this.head;
    let hi = this.entries.length; // entries are in seq order: find the first at or past seq
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.entries[mid]!.seq < seq) lo = mid + 1;
      else hi = mid;
    }
    return lo > this.head ? this.entries[lo - 1]!.seq : 0;
  }

  get storedFromSeq(): number {
    return this.entries.length > this.head ? this.entries[this.head]!.seq : Math.max(this.lastStoredSeq, this.committedSeq) + 1;
  }

  /**
   * The oldest record a CP may reference (the `storedFromSeq` of WELCOME and RECORD_ACK):
   * the source references records it forwarded from there on, also those whose ack has
   * not come yet. While records are being dropped (the ring filled), none
   * (NO_REFERENCES_FROM_SEQ): the records after the ack the source saw may be dropped ones.
   */
  get referableFromSeq(): number {
    return this.dropFrom > 0 || this.droppedThrough > 0 ? NO_REFERENCES_FROM_SEQ : this.storedFromSeq;
  }

  /** Whether `seq` is one of the records dropped (ring full) and not yet covered by a committed CP. */
  dropped(seq: number): boolean {
    return this.dropFrom > 0 && seq >= this.dropFrom && seq <= this.droppedThrough && seq > this.committedSeq;
  }

  get usedBytes(): number {
    let n = 0;
    for (let i = this.head; i < this.entries.length; i++) n += this.entries[i]!.size;
    return n;
  }

  /**
   * A new stream from the source starts at `fromSeq` with its committed watermark at
   * `committedSeq`: drops every stored record >= fromSeq (the source may have lost and
   * reused those seqs) and resets the held marks. `writerId`: the source process that
   * sends it (HELLO's processId; `writer` from then on).
   */
  start(fromSeq: number, committedSeq: number, writerId: string = NO_WRITER): void {
    assert(fromSeq >= 1, 'stream seqs start at 1');
    assert(/^[0-9a-f]{16}$/.test(writerId), `writer id ${writerId}`);
    // The same process again (a stream whose answer it lost): its records below fromSeq
    // stay its own. Another one: its records begin at fromSeq.
    this.writerFromSeq = writerId !== NO_WRITER && writerId === this.writerId ? Math.min(this.writerFromSeq, fromSeq) : fromSeq;
    this.writerId = writerId;
    while (this.entries.length > this.head && this.entries[this.entries.length - 1]!.seq >= fromSeq) {
      const e = this.entries.pop()!;
      this.writeAt = e.at;
    }
    this.committedSeq = Math.max(this.committedSeq, committedSeq);
    // Records of the old stream below fromSeq are kept, but only count when they form an
    // unbroken run ending at fromSeq - 1 (the new stream continues it).
    let runStart = fromSeq;
    for (let i = this.entries.length - 1; i >= this.head && this.entries[i]!.seq === runStart - 1; i--) runStart = this.entries[i]!.seq;
    this.streamFrom = runStart;
    this.lastStoredSeq = fromSeq - 1;
    this.persistedSeq = Math.min(this.persistedSeq, this.lastStoredSeq);
    this.dropFrom = 0;
    this.droppedThrough = 0;
    // A new stream number, stored before any of its records: a reopen then ignores the
    // records of older streams from fromSeq on (written into the mapping at once: it
    // survives a crash of this process; the next persist() makes it survive power loss).
    this.stream++;
    this.headerStreamFrom = fromSeq;
    this.durableMark = Math.min(this.durableMark, this.durableSeq);
    this.damage = undefined;
    this.writeHeaderFields();
    this.headerDirty = true;
  }

  /**
   * start(), and the header it wrote made durable if the durable mark went down with it:
   * only then may the stream's records be stored over the old stream's, which the mark on
   * disk would otherwise claim. The receiver starts its streams this way.
   */
  async startDurably(fromSeq: number, committedSeq: number, writerId: string = NO_WRITER): Promise<void> {
    const markWas = this.durableMark;
    this.start(fromSeq, committedSeq, writerId);
    if (this.durableMark >= markWas) return;
    this.headerDirty = false;
    const mark = this.durableMark;
    await this.region.persist(0, HEADER_BYTES);
    this.markSynced = mark;
  }

  private headerDirty = false;

  /** Where a record of `size` bytes would go, or undefined if the ring has no room. */
  private placeFor(size: number): number | undefined {
    const end = this.region.sizeBytes;
    const tail = this.entries.length > this.head ? this.entries[this.head]!.at : undefined;
    if (tail === undefined) {
      this.writeAt = HEADER_BYTES;
      return size <= end - HEADER_BYTES ? HEADER_BYTES : undefined;
    }
    // Records occupy [tail, writeAt) when writeAt > tail; otherwise they wrapped, and
    // writeAt === tail (with records present) means the ring is full.
    if (this.writeAt > tail) {
      if (this.writeAt + size <= end) return this.writeAt;
      if (HEADER_BYTES + size <= tail) return HEADER_BYTES; // wrap
      return undefined;
    }
    return this.writeAt + size <= tail ? this.writeAt : undefined;
  }

  /**
   * Stores a record arriving in stream order. A seq that is not the next one is a
   * protocol error (thrown as an Error naming both). Returns whether it was stored
   * (false: the ring was full, it is dropped and held only once a CP covers it).
   */
  append(seq: number, type: number, flags: number, offsetBytes: number, lengthBytes: number, payload: Buffer, blockCrcs?: Buffer): boolean {
    const expected = Math.max(this.lastStoredSeq, this.droppedThrough) + 1;
    if (seq !== expected) throw new Error(`record seq ${seq} where ${expected} was due (gap or replay in the stream)`);
    const size = RECORD_HEADER_BYTES + payload.length;
    const at = this.droppedThrough > 0 ? undefined : this.placeFor(size);
    if (at === undefined) {
      if (this.dropFrom === 0) this.dropFrom = seq;
      this.droppedThrough = seq;
      this.recordsDropped++;
      return false;
    }
    const b = this.region.buffer;
    b.fill(0, at, at + RECORD_HEADER_BYTES);
    b.writeUInt32LE(RECORD_MAGIC, at);
    putU64(b, at + 8, seq);
    b.writeUInt8(type, at + 16);
    b.writeUInt8(flags, at + 17);
    b.writeUInt32LE(this.stream, at + 20);
    putU64(b, at + 24, offsetBytes);
    putU64(b, at + 32, lengthBytes);
    putU64(b, at + 40, payload.length);
    payload.copy(b, at + RECORD_HEADER_BYTES);
    const blocks = payload.length / BLOCK_BYTES;
    assert(Number.isInteger(blocks) && blocks <= RECORD_PAYLOAD_MAX_BYTES / BLOCK_BYTES, `record ${seq}: payload of ${payload.length} bytes`);
    let crcs = blockCrcs;
    if (!crcs || crcs.length !== 4 * blocks) {
      crcs = this.crcScratch;
      crc32cBlocks(b, at + RECORD_HEADER_BYTES, blocks, crcs);
    }
    this.keepBlockCrcs(at, blocks, crcs);
    b.writeUInt32LE(this.recordCrc(at, blocks, crcs), at + 4);
    this.indexStored(seq, at, size, type, lengthBytes);
    return true;
  }

  /** A record now in the ring at `at`: indexed, the write position past it, its bytes to persist. */
  private indexStored(seq: number, at: number, size: number, type: number, lengthBytes: number): void {
    this.entries.push({ seq, at, size, type, lengthBytes });
    this.writeAt = at + size;
    this.lastStoredSeq = seq;
    this.dirtyLo = Math.min(this.dirtyLo, at);
    this.dirtyHi = Math.max(this.dirtyHi, at + size);
    this.recordsStored++;
  }

  /**
   * Where records from the next seq on may be stored by another writer (the native receive
   * thread: native-rx.ts), as append() would place them: from the write position to the
   * ring's end or, once wrapped, to the oldest record. Undefined while records are being
   * dropped or the stream does not continue the held run (append() decides those).
   */
  grantRange(): { nextSeq: number; at: number; limit: number; salt: number; stream: number } | undefined {
    if (this.dropFrom > 0 || this.droppedThrough > 0 || this.committedSeq < this.streamFrom - 1) return undefined;
    const end = this.region.sizeBytes;
    const tail = this.entries.length > this.head ? this.entries[this.head]!.at : undefined;
    const at = tail === undefined ? HEADER_BYTES : this.writeAt;
    const limit = tail === undefined || this.writeAt > tail ? end : tail;
    return { nextSeq: this.lastStoredSeq + 1, at, limit, salt: this.salt, stream: this.stream };
  }

  /**
   * Takes into the index a record another writer stored at `at` within a grantRange():
   * exactly what append() would have recorded for it (its bytes, record checksum and
   * block checksums are in place already).
   */
  adopt(seq: number, at: number, size: number, type: number, lengthBytes: number): void {
    assert(seq === this.lastStoredSeq + 1 && this.dropFrom === 0 && this.droppedThrough === 0, `adopted record ${seq} after ${this.lastStoredSeq}`);
    assert(at >= HEADER_BYTES && at + size <= this.region.sizeBytes && size >= RECORD_HEADER_BYTES, `adopted record ${seq} at ${at} (${size} bytes)`);
    this.indexStored(seq, at, size, type, lengthBytes);
  }

  /** A path that opens this log's file again (for a descriptor of another writer's own); undefined: no file behind it. */
  get reopenPath(): string | undefined {
    return this.region.reopenPath;
  }

  /**
   * Another writer made every record <= seq durable (an fdatasync of the file after they
   * were stored: the receive thread's answer to a DURABLE_REQ).
   */
  notePersisted(seq: number): void {
    assert(Number.isSafeInteger(seq) && seq >= 0, `persisted seq ${seq}`);
    this.persistedSeq = Math.max(this.persistedSeq, seq);
    this.advanceMark();
  }

  /** The mapping and the block-checksum table another writer stores records into (grantRange()). */
  get nativeParts(): { ring: Buffer; crcs: Uint32Array } {
    return { ring: this.region.buffer, crcs: this.blockCrcs };
  }

  /**
   * Makes every stored record durable (msync of what was written since the last call).
   * Calls run one after another: a call that found nothing dirty must not report records
   * durable while an earlier call is still syncing them.
   */
  persist(): Promise<void> {
    // Idle: start now (what is stored at this call is what this call syncs); else queue.
    const p = this.persistsInFlight === 0 ? this.persistNow() : this.persistChain.then(() => this.persistNow());
    this.persistsInFlight++;
    const done = p.finally(() => this.persistsInFlight--);
    this.persistChain = done.catch(() => undefined);
    return done;
  }

  private persistChain: Promise<void> = Promise.resolve();
  private persistsInFlight = 0;

  private async persistNow(): Promise<void> {
    const target = this.lastStoredSeq;
    if (this.headerDirty) {
      this.headerDirty = false;
      const mark = this.durableMark;
      await this.region.persist(0, HEADER_BYTES);
      this.markSynced = mark;
    }
    if (this.dirtyHi > 0) {
      const lo = Math.floor(this.dirtyLo / 4096) * 4096;
      const hi = Math.min(this.region.sizeBytes, Math.ceil(this.dirtyHi / 4096) * 4096);
      this.dirtyLo = Infinity;
      this.dirtyHi = 0;
      await this.region.persist(lo, hi - lo);
    }
    this.persistedSeq = Math.max(this.persistedSeq, target);
    this.advanceMark();
  }

  /** Block `index` of write record `seq`, as a copy (or a one-line reason the log does not hold it). */
  block(seq: number, index: number): Buffer | string {
    const v = this.blockView(seq, index);
    return typeof v === 'string' ? v : Buffer.from(v);
  }

  /**
   * Block `index` of write record `seq` as a view of the log's mapping (or a one-line
   * reason the log does not hold it). The view's bytes stay as they are until the record
   * is released (committed()), a new stream drops it (start()) or the log is closed: the
   * receiver writes such views to the mirror's members, and every such write completes
   * before its CP commits (receiver-session.ts) and before a session's mirror is released.
   */
  blockView(seq: number, index: number, crc?: number): Buffer | string {
    const e = this.entry(seq);
    if (!e) return `record ${seq} is not in the log (it holds ${this.storedFromSeq}..${this.lastStoredSeq})`;
    if (e.type !== 1) return `record ${seq} is not a write`;
    if (!(index >= 0 && (index + 1) * BLOCK_BYTES <= e.lengthBytes)) return `record ${seq} has no block ${index}`;
    const from = e.at + RECORD_HEADER_BYTES + index * BLOCK_BYTES;
    if (crc !== undefined) {
      const kept = this.blockCrcs[blockSlot(e.at) + index]!;
      if (kept !== crc) return `block ${seq}/${index}, whose crc is ${kept.toString(16)}, not ${crc.toString(16)}`;
    }
    return this.region.buffer.subarray(from, from + BLOCK_BYTES);
  }

  /**
   * The record crc32c of the record at `at` (its header bytes 8..64, seeded with the salt,
   * then its payload), combined from its blocks' crc32cs: the payload is not read again.
   */
  private recordCrc(at: number, blocks: number, crcs: Buffer): number {
    let crc = crc32cWide(this.region.buffer, at + 8, RECORD_HEADER_BYTES - 8, this.salt);
    for (let i = 0; i < blocks; i++) crc = crc32cAppendBlock(crc, crcs.readUInt32LE(4 * i));
    return crc;
  }

  private keepBlockCrcs(at: number, blocks: number, crcs: Buffer): void {
    const first = blockSlot(at);
    for (let i = 0; i < blocks; i++) this.blockCrcs[first + i] = crcs.readUInt32LE(4 * i);
  }

  /**
   * The stored record `seq`, if any. Stored seqs ascend (mostly consecutively: a new
   * stream may leave a gap after the old one's kept records), so the entry is found by
   * its distance from the oldest, else by a binary search: no per-record map.
   */
  private entry(seq: number): Entry | undefined {
    const first = this.entries[this.head];
    if (!first || seq < first.seq) return undefined;
    const guess = this.entries[this.head + (seq - first.seq)];
    if (guess?.seq === seq) return guess;
    let lo = this.head;
    let hi = this.entries.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const m = this.entries[mid]!;
      if (m.seq === seq) return m;
      if (m.seq < seq) lo = mid + 1;
      else hi = mid - 1;
    }
    return undefined;
  }

  /** A committed CP covers every record <= seq: release them, and dropped ones are held now. */
  committed(seq: number): void {
    this.committedSeq = Math.max(this.committedSeq, seq);
    while (this.entries.length > this.head && this.entries[this.head]!.seq <= seq) {
      this.head++;
    }
    if (this.head > 1024 && this.head * 2 > this.entries.length) {
      this.entries.splice(0, this.head);
      this.head = 0;
    }
    if (this.droppedThrough > 0 && seq >= this.droppedThrough) {
      // Every dropped record is covered: the log is contiguous again from seq + 1.
      this.lastStoredSeq = this.droppedThrough;
      this.persistedSeq = Math.max(this.persistedSeq, this.droppedThrough);
      this.dropFrom = 0;
      this.droppedThrough = 0;
    }
    this.onRelease?.();
  }

  /** Called after committed() released records (the native receive thread's acks must stop offering them). */
  onRelease: (() => void) | undefined;

  /** Stored records after `seq`, in order (for promote / replay). */
  *recordsAfter(seq: number): Generator<StoredRecord> {
    for (let i = this.head; i < this.entries.length; i++) {
      const e = this.entries[i]!;
      if (e.seq <= seq) continue;
      const b = this.region.buffer;
      yield {
        seq: e.seq,
        type: e.type,
        flags: b.readUInt8(e.at + 17),
        offsetBytes: Number(b.readBigUInt64LE(e.at + 24)),
        lengthBytes: e.lengthBytes,
        payload: b.subarray(e.at + RECORD_HEADER_BYTES, e.at + e.size),
      };
    }
  }

  /** Closes the log; a durable mark newer than the header's last sync is synced first (a stopped log claims all it holds durably). */
  async close(): Promise<void> {
    if (this.durableMark > this.markSynced) await this.region.persist(0, HEADER_BYTES).catch(() => undefined);
    await this.region.close();
  }
}
