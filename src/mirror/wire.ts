/**
 * The mirror wire protocol (docs/mirror.md): framed messages between a source
 * (`serve --mirror-to`) and a destination (`receive`), one TCP or TLS connection per
 * relationship.
 *
 * Frame: a 24-byte header, then the body.
 *   0  u32 magic "NVMW"      4  u8 type    5  u8 version   6  u16 zero
 *   8  u32 body length       12 u64 frame number (0, 1, 2, ... per direction and connection)
 *   20 u32 crc32c of header bytes 0..20 and the body
 *
 * Invariants:
 * - A frame is accepted only if magic, version, type, length cap (per type), frame
 *   number (exactly the next one: a replayed, dropped or reordered frame is rejected)
 *   and checksum all verify; the body is then decoded with every field range-checked.
 *   Any failure is a MirrorProtocolError naming the problem; the connection is dropped
 *   and nothing the frame carried is applied.
 * - The parser never buffers more than one frame: at most FRAME_BODY_MAX_BYTES plus the
 *   header, whatever the input.
 * - Encoders assert what the decoders check, so a frame we send always decodes.
 */
import * as zlib from 'zlib';
import { crc32cBlocks, crc32cWide } from '../io/native';
import { crc32cAppendBlock } from '../io/checksum';
import { assert } from '../util/assert';
import { bytesToUuid, uuidToBytes } from '../util/bytes';
import { LINEAGE_ENTRIES_MAX, lineageProblem, type Generation } from '../tree/lineage';
import type { FrameSlab, SlabPool } from './slab-pool';

export const FRAME_MAGIC = 0x574d564e; // "NVMW" little-endian
export const WIRE_VERSION = 1;
export const FRAME_HEADER_BYTES = 24;
export const BLOCK_BYTES = 4096;
/** Largest write record payload forwarded in one frame (the NVRAM's record cap). */
export const RECORD_PAYLOAD_MAX_BYTES = 1024 * 1024;
/** A RECORD body before its payload: seq, type, flags, 6 zero bytes, offset, length, payload length. */
export const RECORD_HEAD_BYTES = 40;
/** Blocks per CP_BLOCKS frame and references per CP_REFS frame. */
export const BLOCKS_PER_FRAME_MAX = 64;
export const REFS_PER_FRAME_MAX = 4096;
/** HELLO's earlier sessions (volume/sessions.ts keeps SESSIONS_MAX, this one included). */
export const EARLIER_SESSIONS_MAX = 15;
const REF_BYTES = 24;
/** Largest CP_BLOCKS body: cp, count, 64 pbas and their blocks. */
export const CP_BLOCKS_BODY_MAX_BYTES = 12 + BLOCKS_PER_FRAME_MAX * (8 + BLOCK_BYTES);
/** Largest body of any frame (a record of 1 MiB with its 40-byte header). */
export const FRAME_BODY_MAX_BYTES = RECORD_PAYLOAD_MAX_BYTES + 64;
const TEXT_MAX_BYTES = 1024;

export const enum MsgType {
  Hello = 1,
  Welcome = 2,
  Refuse = 3,
  Record = 4,
  RecordAck = 5,
  DurableReq = 6,
  CpBegin = 7,
  CpBlocks = 8,
  CpRefs = 9,
  CpCommit = 10,
  CpAck = 11,
  Pin = 12,
  Ping = 13,
  CpDeltas = 14,
  ReadReq = 15,
  ReadResp = 16,
  CpAbort = 17,
}

export type MirrorMode = 'sync' | 'async';
/** cp: one CP on top of its base; resync: blocks born after the base; resume: the rest of an interrupted baseline. */
export type CpKind = 'cp' | 'resync' | 'resume';

export interface Hello {
  type: MsgType.Hello;
  sourceUuid: string;
  sizeBytes: number;
  deviceBlocks: number;
  nvramBytes: number;
  mode: MirrorMode;
  /** The source's committed CP at connect time. */
  sourceCp: number;
  /** First record seq this connection will forward (sync), or 0. */
  streamFromSeq: number;
  /**
   * A CP the source holds that the destination may hold too, offered as the base of a
   * failback (the CP a promoted volume was promoted from), with its root pointer; -1 and
   * zeroes for none. A demoted destination rolls back to it (never anything else).
   */
  baseCp: number;
  baseRoot: Buffer;
  /** The source's newest record seq (its NVRAM log's last): a mirror holding later ones is ahead of it. */
  lastSeq: number;
  /**
   * On its process's first stream to this destination, the newest record seq the source
   * held when it started (its later records are its own: a mirror holding records past it
   * holds ones the source lost); -1 on a later stream.
   */
  startedAtSeq: number;
  /**
   * 8 random bytes (16 hex digits) drawn once per source process: the destination's log
   * records which process its newest records came from (dest-log.ts), so records this
   * process sent on an earlier stream (whose WELCOME was lost) count as its own, not as
   * records it lost. All zeroes: none.
   */
  processId: string;
  /** The lineage of the source's committed CP (tree/lineage.ts), newest generation first. */
  lineage: Generation[];
  /**
   * On the process's first stream: the volume's earlier read-write sessions since a
   * destination last welcomed one (volume/sessions.ts), oldest first, each with its id (the
   * process id it sent, if it sent any) and the newest record seq it started from: records
   * past an earlier start that no later session started holding were lost, even if a
   * session without the mirror wrote new ones over the same seqs since. Empty on later streams.
   */
  earlier: Array<{ id: string; startedAtSeq: number }>;
}

export interface Welcome {
  type: MsgType.Welcome;
  /** The destination's newest committed CP, or -1 when it holds nothing yet. */
  committedCp: number;
  /** Its root pointer bytes (24) as in the superblock, zero when it holds nothing. */
  root: Buffer;
  /** The oldest record a CP may reference (NO_REFERENCES_FROM_SEQ, 2^53-1: none; dest-log.ts referableFromSeq). */
  storedFromSeq: number;
  heldSeq: number;
  /** The oldest CP a reader of the mirror still uses (-1: none beyond committedCp). */
  oldestPinnedCp: number;
  /** An interrupted baseline toward this CP (-1: none) holds its first resumeBlocks blocks durably. */
  resumeCp: number;
  resumeBlocks: number;
}

export interface Refuse {
  type: MsgType.Refuse;
  reason: string;
}

export interface RecordMsg {
  type: MsgType.Record;
  seq: number;
  recordType: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  /** Write payload (lengthBytes), empty for trim/zero. */
  payload: Buffer;
  /**
   * The crc32c of each 4 KiB block of the payload (little-endian u32s), set by a
   * FrameParser, which computes them in verifying the frame's checksum: the destination's
   * log keeps them, so a record's data is checksummed once on arrival (dest-log.ts).
   */
  blockCrcs?: Buffer;
}

export interface RecordAck {
  type: MsgType.RecordAck;
  /** Every record <= heldSeq is in the log or in a committed CP. */
  heldSeq: number;
  /** ... and durably so. */
  durableSeq: number;
  /**
   * The oldest record a CP may reference: the records the source forwarded from it on are
   * in the log or on their way (2^53-1 while the log drops records: none may be).
   */
  storedFromSeq: number;
}

export interface DurableReq {
  type: MsgType.DurableReq;
  seq: number;
}

export interface CpBegin {
  type: MsgType.CpBegin;
  cp: number;
  /** The CP the destination must hold for these blocks to apply (-1: a full baseline). */
  baseCp: number;
  kind: CpKind;
}

export interface CpBlocks {
  type: MsgType.CpBlocks;
  cp: number;
  pbas: number[];
  /** pbas.length * 4096 bytes. */
  data: Buffer;
  /** The pooled buffer `data` is a view of (a receiver's FrameParser with a SlabPool), held once for this message. */
  slab?: FrameSlab;
}

/**
 * A CP_BLOCKS frame to send whose data is in pieces (views of the buffers the blocks were
 * read into): written as they are, never copied into one buffer. Same bytes on the wire.
 */
export interface CpBlocksParts extends Omit<CpBlocks, 'data'> {
  /** Together pbas.length * 4096 bytes, in block order. */
  data: readonly Buffer[];
  /**
   * The crc32c of each block, when the sender has verified the blocks against them (a
   * resync's walk checks each against its parent pointer): the frame's checksum is then
   * combined from them instead of read over the data again. A wrong one makes the frame's
   * checksum wrong, which the receiver refuses.
   */
  crcs?: readonly number[];
}

/** What a sender may frame: a message, or CP blocks in pieces. */
export type OutMessage = Message | CpBlocksParts;

export interface CpRef {
  pba: number;
  seq: number;
  index: number;
  crc: number;
}

export interface CpRefs {
  type: MsgType.CpRefs;
  cp: number;
  refs: CpRef[];
}

/** A metadata block rebuilt on the destination from the block it replaces plus a delta (delta.ts). */
export interface CpDelta {
  pba: number;
  prevPba: number;
  /** crc32c of the rebuilt block: the destination checks it before writing. */
  crc: number;
  delta: Buffer;
}

export interface CpDeltas {
  type: MsgType.CpDeltas;
  cp: number;
  deltas: CpDelta[];
}

/** Body bytes a CP_DELTAS frame may carry, and its entries inflated (the sender fills frames up to the latter). */
export const DELTAS_BODY_MAX_BYTES = 256 * 1024 + 1024;
export const DELTAS_RAW_MAX_BYTES = 256 * 1024;
export const DELTAS_PER_FRAME_MAX = 4096;
const DELTA_ENTRY_HEADER_BYTES = 22;

export function deltaEntryBytes(d: CpDelta): number {
  return DELTA_ENTRY_HEADER_BYTES + d.delta.length;
}

export interface CpCommit {
  type: MsgType.CpCommit;
  cp: number;
  slot: number;
  /** Blocks and references sent for this CP (the receiver checks it got them all). */
  blockCount: number;
  superblock: Buffer;
}

export interface CpAck {
  type: MsgType.CpAck;
  cp: number;
  root: Buffer;
}

export interface Pin {
  type: MsgType.Pin;
  oldestPinnedCp: number;
}

export interface Ping {
  type: MsgType.Ping;
  nowMs: number;
}

/**
 * The source abandons the CP it began (async mode, a peer slower than the CPs): what the
 * destination staged for it is never committed; it stays at its committed CP, and a
 * resync follows on the same connection.
 */
export interface CpAbort {
  type: MsgType.CpAbort;
  cp: number;
}

/** Verify: the source asks for raw blocks of the destination's member (its committed image). */
export interface ReadReq {
  type: MsgType.ReadReq;
  id: number;
  pbas: number[];
}

export interface ReadResp {
  type: MsgType.ReadResp;
  id: number;
  pbas: number[];
  /** pbas.length * 4096 bytes. */
  data: Buffer;
}

export type Message = Hello | Welcome | Refuse | RecordMsg | RecordAck | DurableReq | CpBegin | CpBlocks | CpRefs | CpDeltas | CpCommit | CpAck | Pin | Ping | ReadReq | ReadResp | CpAbort;

export class MirrorProtocolError extends Error {
  override name = 'MirrorProtocolError';
}

const MAX_U53 = Number.MAX_SAFE_INTEGER;

/** Per type: the body length cap. */
function bodyCap(type: number): number | undefined {
  switch (type) {
    case MsgType.Hello: return 16 + 8 * 5 + 8 + 8 + 24 + 8 + 8 + 8 + 8 + LINEAGE_ENTRIES_MAX * 16 + 8 + EARLIER_SESSIONS_MAX * 16;
    case MsgType.Welcome: return 8 + 24 + 8 * 5;
    case MsgType.Refuse: return 2 + TEXT_MAX_BYTES;
    case MsgType.Record: return RECORD_HEAD_BYTES + RECORD_PAYLOAD_MAX_BYTES;
    case MsgType.RecordAck: return 24;
    case MsgType.DurableReq: return 8;
    case MsgType.CpBegin: return 17;
    case MsgType.CpBlocks: return CP_BLOCKS_BODY_MAX_BYTES;
    case MsgType.CpRefs: return 12 + REFS_PER_FRAME_MAX * REF_BYTES;
    case MsgType.CpCommit: return 20 + BLOCK_BYTES;
    case MsgType.CpAck: return 8 + 24;
    case MsgType.Pin: return 8;
    case MsgType.Ping: return 8;
    case MsgType.CpDeltas: return DELTAS_BODY_MAX_BYTES;
    case MsgType.ReadReq: return 8 + BLOCKS_PER_FRAME_MAX * 8;
    case MsgType.ReadResp: return 8 + BLOCKS_PER_FRAME_MAX * (8 + BLOCK_BYTES);
    case MsgType.CpAbort: return 8;
    default: return undefined;
  }
}
assert(Math.max(...[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17].map((t) => bodyCap(t)!)) <= FRAME_BODY_MAX_BYTES, 'a body cap exceeds FRAME_BODY_MAX_BYTES');

/** Every frame type's body cap, by type (0: no such type), as 32 little-endian u32s (the native receive thread's copy). */
export function bodyCapsTable(): Buffer {
  const b = Buffer.alloc(32 * 4);
  for (let t = 0; t < 32; t++) b.writeUInt32LE(bodyCap(t) ?? 0, 4 * t);
  return b;
}

// ---- a cursor over a body ----

/**
 * The little-endian u64 at b[at] as a number, or -1 when it exceeds MAX_U53 (two 32-bit
 * reads: a BigInt per field was a measurable share of the receiver's time per record).
 */
export function readU53(b: Buffer, at: number): number {
  const hi = b.readUInt32LE(at + 4);
  if (hi > 0x1fffff) return -1;
  return hi * 0x100000000 + b.readUInt32LE(at);
}

class Reader {
  private at = 0;
  constructor(private readonly b: Buffer, private readonly what: string) {}
  private need(n: number): void {
    if (this.at + n > this.b.length) throw new MirrorProtocolError(`${this.what}: body too short`);
  }
  u8(): number {
    this.need(1);
    return this.b.readUInt8(this.at++);
  }
  u16(): number {
    this.need(2);
    const v = this.b.readUInt16LE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.b.readUInt32LE(this.at);
    this.at += 4;
    return v;
  }
  /** A u64 that must fit a safe integer. */
  u64(field: string): number {
    this.need(8);
    const v = readU53(this.b, this.at);
    this.at += 8;
    if (v < 0) throw new MirrorProtocolError(`${this.what}: ${field} out of range`);
    return v;
  }
  /** A signed i64 that must be >= -1 (CP numbers, -1 = none). */
  cp(field: string): number {
    this.need(8);
    const none = this.b.readUInt32LE(this.at) === 0xffffffff && this.b.readUInt32LE(this.at + 4) === 0xffffffff;
    const v = readU53(this.b, this.at);
    this.at += 8;
    if (none) return -1;
    if (v < 0) throw new MirrorProtocolError(`${this.what}: ${field} out of range`);
    return v;
  }
  /** The rest of the body. */
  rest(): Buffer {
    const v = this.b.subarray(this.at);
    this.at = this.b.length;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const v = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
  end(): void {
    if (this.at !== this.b.length) throw new MirrorProtocolError(`${this.what}: ${this.b.length - this.at} unexpected trailing bytes`);
  }
}

// ---- encoding ----

/** A safe non-negative integer as a little-endian u64 (two 32-bit writes: no BigInt). */
export function putU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32LE(v >>> 0, at);
  b.writeUInt32LE(Math.floor(v / 0x100000000), at + 4);
}

/** Encodes the body of a message (the frame header is added by FrameWriter). Returns the body as parts. */
export function encodeBody(m: OutMessage): Buffer[] {
  const u64 = (v: number): Buffer => {
    assert(Number.isSafeInteger(v) && v >= 0, `u64 field ${v}`);
    const b = Buffer.allocUnsafe(8);
    putU64(b, 0, v);
    return b;
  };
  const i64 = (v: number): Buffer => {
    assert(Number.isSafeInteger(v) && v >= -1, `cp field ${v}`);
    const b = Buffer.allocUnsafe(8);
    if (v === -1) b.fill(0xff);
    else putU64(b, 0, v);
    return b;
  };
  /** A u64 field's value, checked: putU64 writes what it is given. */
  const safe = (v: number): number => {
    assert(Number.isSafeInteger(v) && v >= 0, `u64 field ${v}`);
    return v;
  };
  switch (m.type) {
    case MsgType.Hello:
      assert(m.sizeBytes > 0 && m.sizeBytes % BLOCK_BYTES === 0, `hello: volume size ${m.sizeBytes}`);
      assert(m.baseRoot.length === 24, 'hello: base root pointer is 24 bytes');
      assert(m.startedAtSeq <= m.lastSeq, `hello: started at seq ${m.startedAtSeq}, past its newest seq ${m.lastSeq}`);
      assert(/^[0-9a-f]{16}$/.test(m.processId), `hello: process id ${m.processId} is not 16 hex digits`);
      assert(lineageProblem(m.lineage, Math.max(0, m.sourceCp)) === null, 'hello: lineage');
      assert(m.earlier.length <= EARLIER_SESSIONS_MAX && m.earlier.every((e) => /^[0-9a-f]{16}$/.test(e.id)), 'hello: earlier sessions');
      return [
        uuidToBytes(m.sourceUuid), u64(m.sizeBytes), u64(m.deviceBlocks), u64(m.nvramBytes), u64(m.mode === 'sync' ? 1 : 2), i64(m.sourceCp), u64(m.streamFromSeq), i64(m.baseCp), m.baseRoot,
        u64(m.lastSeq), i64(m.startedAtSeq), Buffer.from(m.processId, 'hex'), u64(m.lineage.length), ...m.lineage.flatMap((g) => [Buffer.from(g.id, 'hex'), u64(g.firstCp)]),
        u64(m.earlier.length), ...m.earlier.flatMap((e) => [Buffer.from(e.id, 'hex'), u64(safe(e.startedAtSeq))]),
      ];
    case MsgType.Welcome:
      assert(m.root.length === 24, 'root pointer is 24 bytes');
      return [i64(m.committedCp), m.root, u64(m.storedFromSeq), u64(m.heldSeq), i64(m.oldestPinnedCp), i64(m.resumeCp), u64(m.resumeBlocks)];
    case MsgType.Refuse: {
      const t = Buffer.from(m.reason.slice(0, TEXT_MAX_BYTES), 'utf8').subarray(0, TEXT_MAX_BYTES);
      const len = Buffer.allocUnsafe(2);
      len.writeUInt16LE(t.length);
      return [len, t];
    }
    case MsgType.Record: {
      assert(m.payload.length === (m.recordType === 1 ? m.lengthBytes : 0) && m.payload.length <= RECORD_PAYLOAD_MAX_BYTES, 'record payload length');
      assert(m.seq >= 1 && m.recordType >= 1 && m.recordType <= 3 && m.lengthBytes > 0 && m.offsetBytes % BLOCK_BYTES === 0 && m.lengthBytes % BLOCK_BYTES === 0, `record ${m.seq}: bad fields`);
      const h = Buffer.alloc(8);
      h.writeUInt8(m.recordType, 0);
      h.writeUInt8(m.flags, 1);
      return [u64(m.seq), h, u64(m.offsetBytes), u64(m.lengthBytes), u64(m.payload.length), m.payload];
    }
    case MsgType.RecordAck:
      return [u64(m.heldSeq), u64(m.durableSeq), u64(m.storedFromSeq)];
    case MsgType.DurableReq:
      return [u64(m.seq)];
    case MsgType.CpBegin:
      assert(m.baseCp < m.cp && (m.kind !== 'resume' || m.baseCp === -1), `cp begin ${m.cp} on base ${m.baseCp} (${m.kind})`);
      return [u64(m.cp), i64(m.baseCp), Buffer.from([m.kind === 'cp' ? 1 : m.kind === 'resync' ? 2 : 3])];
    case MsgType.CpBlocks: {
      const parts = Buffer.isBuffer(m.data) ? [m.data] : m.data;
      let bytes = 0;
      for (const d of parts) bytes += d.length;
      assert(m.pbas.length >= 1 && m.pbas.length <= BLOCKS_PER_FRAME_MAX && bytes === m.pbas.length * BLOCK_BYTES, 'CpBlocks shape');
      const h = Buffer.allocUnsafe(12 + 8 * m.pbas.length);
      putU64(h, 0, safe(m.cp));
      h.writeUInt32LE(m.pbas.length, 8);
      for (let i = 0; i < m.pbas.length; i++) putU64(h, 12 + 8 * i, safe(m.pbas[i]!));
      return [h, ...parts];
    }
    case MsgType.CpRefs: {
      assert(m.refs.length >= 1 && m.refs.length <= REFS_PER_FRAME_MAX, 'CpRefs shape');
      const b = Buffer.allocUnsafe(12 + REF_BYTES * m.refs.length);
      putU64(b, 0, safe(m.cp));
      b.writeUInt32LE(m.refs.length, 8);
      m.refs.forEach((r, i) => {
        assert(Number.isSafeInteger(r.pba) && r.pba >= 0 && Number.isSafeInteger(r.seq) && r.seq >= 0 && r.index >= 0 && r.index <= 0xffffffff, 'ref fields');
        const o = 12 + REF_BYTES * i;
        putU64(b, o, r.pba);
        putU64(b, o + 8, r.seq);
        b.writeUInt32LE(r.index, o + 16);
        b.writeUInt32LE(r.crc >>> 0, o + 20);
      });
      return [b];
    }
    case MsgType.CpDeltas: {
      // The entries travel deflated: metadata deltas are repetitive (headers, pointers).
      assert(m.deltas.length >= 1 && m.deltas.length <= DELTAS_PER_FRAME_MAX, 'CpDeltas shape');
      const h = Buffer.allocUnsafe(16);
      putU64(h, 0, safe(m.cp));
      h.writeUInt32LE(m.deltas.length, 8);
      // The entries go straight into one buffer (no Buffer per entry, no concat).
      let rawBytes = 0;
      for (const d of m.deltas) {
        assert(d.delta.length <= 0xffff, 'delta too long');
        rawBytes += DELTA_ENTRY_HEADER_BYTES + d.delta.length;
      }
      assert(rawBytes <= DELTAS_RAW_MAX_BYTES, `deltas of ${rawBytes} bytes`);
      const raw = Buffer.allocUnsafe(rawBytes);
      let at = 0;
      for (const d of m.deltas) {
        putU64(raw, at, safe(d.pba));
        putU64(raw, at + 8, safe(d.prevPba));
        raw.writeUInt32LE(d.crc >>> 0, at + 16);
        raw.writeUInt16LE(d.delta.length, at + 20);
        at += DELTA_ENTRY_HEADER_BYTES + d.delta.copy(raw, at + DELTA_ENTRY_HEADER_BYTES);
      }
      h.writeUInt32LE(raw.length, 12);
      const packed = zlib.deflateRawSync(raw, { level: 1 });
      assert(16 + packed.length <= DELTAS_BODY_MAX_BYTES, 'deflated deltas exceed the frame cap');
      return [h, packed];
    }
    case MsgType.CpCommit: {
      assert(m.superblock.length === BLOCK_BYTES, 'superblock is one block');
      const h = Buffer.allocUnsafe(20);
      putU64(h, 0, safe(m.cp));
      h.writeUInt32LE(m.slot, 8);
      putU64(h, 12, safe(m.blockCount));
      return [h, m.superblock];
    }
    case MsgType.ReadReq:
    case MsgType.ReadResp: {
      assert(m.pbas.length >= 1 && m.pbas.length <= BLOCKS_PER_FRAME_MAX, 'read shape');
      const h = Buffer.allocUnsafe(8 + 8 * m.pbas.length);
      h.writeUInt32LE(m.id >>> 0, 0);
      h.writeUInt32LE(m.pbas.length, 4);
      for (let i = 0; i < m.pbas.length; i++) putU64(h, 8 + 8 * i, safe(m.pbas[i]!));
      if (m.type === MsgType.ReadReq) return [h];
      assert(m.data.length === m.pbas.length * BLOCK_BYTES, 'read response data');
      return [h, m.data];
    }
    case MsgType.CpAck:
      assert(m.root.length === 24, 'root pointer is 24 bytes');
      return [u64(m.cp), m.root];
    case MsgType.Pin:
      return [i64(m.oldestPinnedCp)];
    case MsgType.Ping:
      return [u64(m.nowMs)];
    case MsgType.CpAbort:
      return [u64(m.cp)];
  }
}

/** Decodes a verified frame body. Throws MirrorProtocolError on any bad field. */
export function decodeBody(type: number, body: Buffer): Message {
  const what = `frame type ${type}`;
  const r = new Reader(body, what);
  let m: Message;
  switch (type) {
    case MsgType.Hello: {
      const sourceUuid = bytesToUuid(r.bytes(16));
      const sizeBytes = r.u64('sizeBytes');
      const deviceBlocks = r.u64('deviceBlocks');
      const nvramBytes = r.u64('nvramBytes');
      const modeCode = r.u64('mode');
      if (modeCode !== 1 && modeCode !== 2) throw new MirrorProtocolError(`hello: unknown mode ${modeCode}`);
      const sourceCp = r.cp('sourceCp');
      const streamFromSeq = r.u64('streamFromSeq');
      const baseCp = r.cp('baseCp');
      const baseRoot = Buffer.from(r.bytes(24));
      const lastSeq = r.u64('lastSeq');
      const startedAtSeq = r.cp('startedAtSeq');
      if (startedAtSeq > lastSeq) throw new MirrorProtocolError(`hello: started at seq ${startedAtSeq}, past its newest seq ${lastSeq}`);
      const processId = r.bytes(8).toString('hex');
      const count = r.u64('lineageCount');
      if (count < 1 || count > LINEAGE_ENTRIES_MAX) throw new MirrorProtocolError(`hello: lineage of ${count} generations (1..${LINEAGE_ENTRIES_MAX})`);
      const lineage: Generation[] = [];
      for (let i = 0; i < count; i++) lineage.push({ id: r.bytes(8).toString('hex'), firstCp: r.u64('lineageFirstCp') });
      if (sizeBytes === 0 || sizeBytes % BLOCK_BYTES !== 0) throw new MirrorProtocolError(`hello: bad volume size ${sizeBytes}`);
      const lp = lineageProblem(lineage, Math.max(0, sourceCp));
      if (lp !== null) throw new MirrorProtocolError(`hello: ${lp}`);
      const earlierCount = r.u64('earlierCount');
      if (earlierCount > EARLIER_SESSIONS_MAX) throw new MirrorProtocolError(`hello: ${earlierCount} earlier sessions (at most ${EARLIER_SESSIONS_MAX})`);
      const earlier: Array<{ id: string; startedAtSeq: number }> = [];
      for (let i = 0; i < earlierCount; i++) earlier.push({ id: r.bytes(8).toString('hex'), startedAtSeq: r.u64('earlierStartedAtSeq') });
      m = { type, sourceUuid, sizeBytes, deviceBlocks, nvramBytes, mode: modeCode === 1 ? 'sync' : 'async', sourceCp, streamFromSeq, baseCp, baseRoot, lastSeq, startedAtSeq, processId, lineage, earlier };
      break;
    }
    case MsgType.Welcome:
      m = {
        type, committedCp: r.cp('committedCp'), root: Buffer.from(r.bytes(24)), storedFromSeq: r.u64('storedFromSeq'), heldSeq: r.u64('heldSeq'),
        oldestPinnedCp: r.cp('oldestPinnedCp'), resumeCp: r.cp('resumeCp'), resumeBlocks: r.u64('resumeBlocks'),
      };
      break;
    case MsgType.Refuse: {
      const n = r.u16();
      if (n > TEXT_MAX_BYTES) throw new MirrorProtocolError('refuse: reason too long');
      m = { type, reason: r.bytes(n).toString('utf8') };
      break;
    }
    case MsgType.Record: {
      const seq = r.u64('seq');
      const recordType = r.u8();
      const flags = r.u8();
      r.bytes(6);
      const offsetBytes = r.u64('offset');
      const lengthBytes = r.u64('length');
      const payloadBytes = r.u64('payload length');
      if (recordType < 1 || recordType > 3) throw new MirrorProtocolError(`record ${seq}: unknown type ${recordType}`);
      if (seq === 0 || offsetBytes % BLOCK_BYTES !== 0 || lengthBytes % BLOCK_BYTES !== 0 || lengthBytes === 0) throw new MirrorProtocolError(`record ${seq}: bad range`);
      if (payloadBytes !== (recordType === 1 ? lengthBytes : 0) || payloadBytes > RECORD_PAYLOAD_MAX_BYTES) throw new MirrorProtocolError(`record ${seq}: bad payload length ${payloadBytes}`);
      m = { type, seq, recordType, flags, offsetBytes, lengthBytes, payload: r.bytes(payloadBytes) };
      break;
    }
    case MsgType.RecordAck:
      m = { type, heldSeq: r.u64('heldSeq'), durableSeq: r.u64('durableSeq'), storedFromSeq: r.u64('storedFromSeq') };
      break;
    case MsgType.DurableReq:
      m = { type, seq: r.u64('seq') };
      break;
    case MsgType.CpBegin: {
      const cp = r.u64('cp');
      const baseCp = r.cp('baseCp');
      const k = r.u8();
      if (k !== 1 && k !== 2 && k !== 3) throw new MirrorProtocolError(`cp begin: unknown kind ${k}`);
      if (baseCp >= cp) throw new MirrorProtocolError(`cp begin: base CP ${baseCp} is not before CP ${cp}`);
      if (k === 3 && baseCp !== -1) throw new MirrorProtocolError('cp begin: only a baseline resumes');
      m = { type, cp, baseCp, kind: k === 1 ? 'cp' : k === 2 ? 'resync' : 'resume' };
      break;
    }
    case MsgType.CpBlocks: {
      const cp = r.u64('cp');
      const n = r.u32();
      if (n < 1 || n > BLOCKS_PER_FRAME_MAX) throw new MirrorProtocolError(`cp blocks: count ${n}`);
      const pbas: number[] = [];
      for (let i = 0; i < n; i++) pbas.push(r.u64('pba'));
      m = { type, cp, pbas, data: r.bytes(n * BLOCK_BYTES) };
      break;
    }
    case MsgType.CpRefs: {
      const cp = r.u64('cp');
      const n = r.u32();
      if (n < 1 || n > REFS_PER_FRAME_MAX) throw new MirrorProtocolError(`cp refs: count ${n}`);
      const refs: CpRef[] = [];
      for (let i = 0; i < n; i++) refs.push({ pba: r.u64('pba'), seq: r.u64('seq'), index: r.u32(), crc: r.u32() });
      m = { type, cp, refs };
      break;
    }
    case MsgType.CpDeltas: {
      const cp = r.u64('cp');
      const n = r.u32();
      if (n < 1 || n > DELTAS_PER_FRAME_MAX) throw new MirrorProtocolError(`cp deltas: count ${n}`);
      const rawLen = r.u32();
      if (rawLen > DELTAS_RAW_MAX_BYTES) throw new MirrorProtocolError(`cp deltas: ${rawLen} bytes inflated exceed the cap of ${DELTAS_RAW_MAX_BYTES}`);
      let raw: Buffer;
      try {
        // Capped before inflating: a deflate bomb stops at the cap.
        raw = zlib.inflateRawSync(r.rest(), { maxOutputLength: Math.max(1, rawLen) });
      } catch (e) {
        throw new MirrorProtocolError(`cp deltas: entries do not inflate (${e instanceof Error ? e.message : String(e)})`);
      }
      if (raw.length !== rawLen) throw new MirrorProtocolError(`cp deltas: entries inflate to ${raw.length} bytes, the header says ${rawLen}`);
      const er = new Reader(raw, what);
      const deltas: CpDelta[] = [];
      for (let i = 0; i < n; i++) {
        const pba = er.u64('pba');
        const prevPba = er.u64('prevPba');
        const crc = er.u32();
        const len = er.u16();
        deltas.push({ pba, prevPba, crc, delta: er.bytes(len) });
      }
      er.end();
      m = { type, cp, deltas };
      break;
    }
    case MsgType.CpCommit: {
      const cp = r.u64('cp');
      const slot = r.u32();
      const blockCount = r.u64('blockCount');
      m = { type, cp, slot, blockCount, superblock: Buffer.from(r.bytes(BLOCK_BYTES)) };
      break;
    }
    case MsgType.CpAck:
      m = { type, cp: r.u64('cp'), root: Buffer.from(r.bytes(24)) };
      break;
    case MsgType.ReadReq:
    case MsgType.ReadResp: {
      const id = r.u32();
      const n = r.u32();
      if (n < 1 || n > BLOCKS_PER_FRAME_MAX) throw new MirrorProtocolError(`read: count ${n}`);
      const pbas: number[] = [];
      for (let i = 0; i < n; i++) pbas.push(r.u64('pba'));
      m = type === MsgType.ReadReq ? { type, id, pbas } : { type, id, pbas, data: r.bytes(n * BLOCK_BYTES) };
      break;
    }
    case MsgType.Pin:
      m = { type, oldestPinnedCp: r.cp('oldestPinnedCp') };
      break;
    case MsgType.Ping:
      m = { type, nowMs: r.u64('nowMs') };
      break;
    case MsgType.CpAbort:
      m = { type, cp: r.u64('cp') };
      break;
    default:
      throw new MirrorProtocolError(`unknown frame type ${type}`);
  }
  r.end();
  return m;
}

// ---- framing ----

/** Numbers and checksums outgoing frames. */
export class FrameWriter {
  private frameNo = 0;

  /** The number the next frame gets (a native sender continues from it: native-rx.ts). */
  get nextFrameNo(): number {
    return this.frameNo;
  }

  /** Bytes of frames produced (headers included), in all and by message type. */
  bytesOut = 0;
  readonly bytesByType: number[] = new Array<number>(32).fill(0);

  /** The frame for `m` as parts to write in order (the body parts are not copied). */
  frame(m: OutMessage): Buffer[] {
    const body = encodeBody(m);
    let len = 0;
    for (const b of body) len += b.length;
    const cap = bodyCap(m.type);
    assert(cap !== undefined && len <= cap, `frame type ${m.type} body of ${len} bytes exceeds its cap`);
    const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
    this.header(h, m.type, len);
    let crc = crc32cWide(h, 0, 20);
    if (m.type === MsgType.CpBlocks && 'crcs' in m && m.crcs !== undefined) {
      assert(m.crcs.length === m.pbas.length, 'one crc per block');
      crc = crc32cWide(body[0]!, 0, body[0]!.length, crc); // cp, count, pbas
      for (const c of m.crcs) crc = crc32cAppendBlock(crc, c);
    } else {
      for (const b of body) crc = crc32cWide(b, 0, b.length, crc);
    }
    h.writeUInt32LE(crc, 20);
    this.count(m.type, len);
    return [h, ...body];
  }

  /**
   * A RECORD frame in one Buffer, exactly as frame() encodes it: header, the 40 bytes of
   * fields, then the payload copied from `parts` (views of the NVRAM, which the next CP
   * reuses). One allocation, one copy and two checksum calls per forwarded write.
   */
  recordFrame(seq: number, recordType: number, flags: number, offsetBytes: number, lengthBytes: number, parts: readonly Buffer[]): Buffer {
    let payloadBytes = 0;
    for (const p of parts) payloadBytes += p.length;
    assert(payloadBytes === (recordType === 1 ? lengthBytes : 0) && payloadBytes <= RECORD_PAYLOAD_MAX_BYTES, 'record payload length');
    assert(Number.isSafeInteger(seq) && seq >= 1 && recordType >= 1 && recordType <= 3 && lengthBytes > 0 && offsetBytes >= 0 && offsetBytes % BLOCK_BYTES === 0 && lengthBytes % BLOCK_BYTES === 0, `record ${seq}: bad fields`);
    const len = RECORD_HEAD_BYTES + payloadBytes;
    const f = Buffer.allocUnsafe(FRAME_HEADER_BYTES + len);
    this.header(f, MsgType.Record, len);
    const b = FRAME_HEADER_BYTES;
    putU64(f, b, seq);
    f.writeUInt8(recordType, b + 8);
    f.writeUInt8(flags, b + 9);
    f.fill(0, b + 10, b + 16);
    putU64(f, b + 16, offsetBytes);
    putU64(f, b + 24, lengthBytes);
    putU64(f, b + 32, payloadBytes);
    let at = b + 40;
    for (const p of parts) at += p.copy(f, at);
    f.writeUInt32LE(crc32cWide(f, b, len, crc32cWide(f, 0, 20)), 20);
    this.count(MsgType.Record, len);
    return f;
  }

  private header(h: Buffer, type: MsgType, len: number): void {
    h.writeUInt32LE(FRAME_MAGIC, 0);
    h.writeUInt8(type, 4);
    h.writeUInt8(WIRE_VERSION, 5);
    h.writeUInt16LE(0, 6);
    h.writeUInt32LE(len, 8);
    putU64(h, 12, this.frameNo++);
  }

  private count(type: MsgType, len: number): void {
    this.bytesOut += FRAME_HEADER_BYTES + len;
    this.bytesByType[type] = (this.bytesByType[type] ?? 0) + FRAME_HEADER_BYTES + len;
  }
}

/**
 * Writes frames to a socket, all frames of one tick in one writev: the socket is corked
 * at the first frame of a tick and uncorked on the next tick (a frame is several parts;
 * a sync mirror sends one or two frames per client write).
 */
export function writeFrame(socket: import('net').Socket, writer: FrameWriter, m: OutMessage): void {
  corkForTick(socket);
  for (const part of writer.frame(m)) socket.write(part);
}

/** writeFrame for a frame already encoded in one Buffer (FrameWriter.recordFrame). */
export function writeEncoded(socket: import('net').Socket, frame: Buffer): void {
  corkForTick(socket);
  socket.write(frame);
}

function corkForTick(socket: import('net').Socket): void {
  if (socket.writableCorked === 0) {
    socket.cork();
    process.nextTick(() => socket.uncork());
  }
}

/**
 * Incremental frame parser: push() chunks as they arrive, get whole verified messages
 * back in order. Holds at most one frame's bytes. With a SlabPool, a CP_BLOCKS body that
 * spans chunks is assembled in a pooled slab (the message holds it: CpBlocks.slab)
 * instead of a fresh Buffer.
 */
export class FrameParser {
  constructor(private readonly slabs?: SlabPool) {}
  private chunks: Buffer[] = [];
  private buffered = 0;
  private expectFrameNo = 0;
  private header: { type: number; len: number; frameNo: number; crc: number; raw: Buffer } | undefined;
  bytesIn = 0;
  private failed: MirrorProtocolError | undefined;

  /** Feeds bytes; returns the messages completed by them. Throws MirrorProtocolError (and stays failed). */
  push(chunk: Buffer): Message[] {
    if (this.failed) throw this.failed;
    try {
      return this.pushInner(chunk);
    } catch (e) {
      this.failed = e instanceof MirrorProtocolError ? e : new MirrorProtocolError(String(e));
      this.chunks = [];
      this.buffered = 0;
      throw this.failed;
    }
  }

  /** The next n bytes: a view of the first chunk when it holds them all, else a copy. */
  private take(n: number): Buffer {
    assert(n <= this.buffered, 'take beyond buffered');
    const first = this.chunks[0]!;
    if (first.length < n) return this.takeInto(Buffer.allocUnsafe(n), n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    return first.subarray(0, n);
  }

  /** The next n bytes, copied into dst (which has room for them). */
  private takeInto(dst: Buffer, n: number): Buffer {
    assert(n <= this.buffered && n <= dst.length, 'takeInto beyond buffered or dst');
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(dst, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return dst.subarray(0, n);
  }

  private pushInner(chunk: Buffer): Message[] {
    this.bytesIn += chunk.length;
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Message[] = [];
    for (;;) {
      if (!this.header) {
        if (this.buffered < FRAME_HEADER_BYTES) break;
        const raw = Buffer.from(this.take(FRAME_HEADER_BYTES));
        if (raw.readUInt32LE(0) !== FRAME_MAGIC) throw new MirrorProtocolError('bad frame magic (not an nvmirror mirror stream)');
        const version = raw.readUInt8(5);
        if (version !== WIRE_VERSION) throw new MirrorProtocolError(`unsupported wire version ${version}`);
        const type = raw.readUInt8(4);
        const len = raw.readUInt32LE(8);
        const cap = bodyCap(type);
        if (cap === undefined) throw new MirrorProtocolError(`unknown frame type ${type}`);
        if (len > cap) throw new MirrorProtocolError(`frame type ${type}: body of ${len} bytes exceeds its cap of ${cap}`);
        const frameNo = readU53(raw, 12);
        if (frameNo !== this.expectFrameNo) throw new MirrorProtocolError(`frame number ${frameNo < 0 ? raw.readBigUInt64LE(12) : frameNo} where ${this.expectFrameNo} was due (replayed, lost or reordered frame)`);
        this.header = { type, len, frameNo: this.expectFrameNo, crc: raw.readUInt32LE(20), raw };
      }
      const h = this.header;
      if (this.buffered < h.len) break;
      const slab = h.type === MsgType.CpBlocks && h.len > 0 && h.len > this.chunks[0]!.length ? this.slabs?.take(h.len) : undefined;
      const body = h.len === 0 ? Buffer.alloc(0) : slab ? this.takeInto(slab.buf, h.len) : this.take(h.len);
      let crc = crc32cWide(h.raw, 0, 20);
      let blockCrcs: Buffer | undefined;
      const blocks = (body.length - RECORD_HEAD_BYTES) / BLOCK_BYTES;
      if (h.type === MsgType.Record && blocks >= 1 && Number.isInteger(blocks)) {
        // A write record's payload block by block: the frame's checksum is combined from
        // the blocks' own, which the destination's log then keeps (one pass over the data).
        crc = crc32cWide(body, 0, RECORD_HEAD_BYTES, crc);
        blockCrcs = Buffer.allocUnsafe(blocks * 4);
        crc32cBlocks(body, RECORD_HEAD_BYTES, blocks, blockCrcs);
        for (let i = 0; i < blocks; i++) crc = crc32cAppendBlock(crc, blockCrcs.readUInt32LE(4 * i));
      } else {
        crc = crc32cWide(body, 0, body.length, crc);
      }
      if (crc !== h.crc) throw new MirrorProtocolError(`frame ${h.frameNo} (type ${h.type}): checksum mismatch`);
      this.header = undefined;
      this.expectFrameNo++;
      const m = decodeBody(h.type, body);
      if (slab) (m as CpBlocks).slab = slab; // a refused frame leaves its slab to the GC (slab-pool.ts)
      if (blockCrcs && m.type === MsgType.Record && m.payload.length === blockCrcs.length * 1024) m.blockCrcs = blockCrcs;
      out.push(m);
    }
    return out;
  }

  /**
   * Ends this parser's part of the stream: the bytes of the incomplete frame (its header
   * too, when it was read), then `more`, and the number of the frame they begin. Any later
   * push() fails.
   */
  detach(more: readonly Buffer[]): { leftover: Buffer; nextFrameNo: number } {
    const parts = [...(this.header ? [this.header.raw] : []), ...this.chunks, ...more];
    const out = { leftover: Buffer.concat(parts), nextFrameNo: this.expectFrameNo };
    this.header = undefined;
    this.chunks = [];
    this.buffered = 0;
    this.failed = new MirrorProtocolError('the stream went on in another reader');
    return out;
  }

  /** Bytes held for an incomplete frame (bounded by FRAME_HEADER_BYTES + FRAME_BODY_MAX_BYTES). */
  get bufferedBytes(): number {
    return this.buffered;
  }
}
