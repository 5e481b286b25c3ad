/**
 * NBD wire codec: incremental parsers that carry partial frames across chunks, and
 * reply encoders. Parsers never allocate more than a capped length: an option longer
 * than MAX_OPTION_BYTES or a WRITE longer than MAX_PAYLOAD_BYTES is reported without
 * its payload being buffered (the payload is skipped as it streams past).
 *
 * Invariants:
 * - ByteQueue never holds more than its capacity (push beyond it throws).
 * - RequestParser delivers requests in wire order, each exactly once, whatever the
 *   chunking of its input.
 */
import { assert } from '../util/assert';
import { BufferPool } from './buffer-pool';
import * as P from './protocol';

const TWO_32 = 2 ** 32;

/** A bounded FIFO of bytes for the handshake phase. */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  private total = 0;
  constructor(readonly capacityBytes: number) {}

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.total + chunk.length > this.capacityBytes) {
      throw new Error(`handshake input exceeds ${this.capacityBytes} buffered bytes`);
    }
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Removes and returns exactly n bytes, or undefined if fewer are buffered. */
  take(n: number): Buffer | undefined {
    if (n > this.total) return undefined;
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    while (copied < n) {
      const c = this.chunks[0];
      assert(c !== undefined, 'ByteQueue underflow');
      const avail = c.length - this.head;
      const k = Math.min(avail, n - copied);
      c.copy(out, copied, this.head, this.head + k);
      copied += k;
      this.head += k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.total -= n;
    return out;
  }

  /** Discards up to n bytes; returns how many were discarded. */
  skip(n: number): number {
    let skipped = 0;
    while (skipped < n && this.chunks.length > 0) {
      const c = this.chunks[0];
      assert(c !== undefined);
      const k = Math.min(c.length - this.head, n - skipped);
      skipped += k;
      this.head += k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.total -= skipped;
    return skipped;
  }

  /** Removes and returns everything buffered. */
  drain(): Buffer[] {
    const out = this.chunks.map((c, i) => (i === 0 ? c.subarray(this.head) : c));
    this.chunks = [];
    this.head = 0;
    this.total = 0;
    return out.filter((c) => c.length > 0);
  }
}

export function readU64(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  const lo = buf.readUInt32BE(off + 4);
  // Values >= 2^53 are not safe integers: report them as Infinity so range checks fail.
  if (hi >= 0x200000) return Number.POSITIVE_INFINITY;
  return hi * TWO_32 + lo;
}

export function writeU64(buf: Buffer, value: number, off: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `writeU64: bad value ${value}`);
  buf.writeUInt32BE(Math.floor(value / TWO_32), off);
  buf.writeUInt32BE(value >>> 0, off + 4);
}

// ---------------------------------------------------------------- handshake

export interface OptionHeader {
  option: number;
  lengthBytes: number;
}

/** Parses the 16-byte option header; throws on bad magic (the caller disconnects). */
export function parseOptionHeader(q: ByteQueue): OptionHeader | undefined {
  const b = q.take(P.OPTION_HEADER_BYTES);
  if (!b) return undefined;
  if (b.readUInt32BE(0) !== P.IHAVEOPT_HI || b.readUInt32BE(4) !== P.IHAVEOPT_LO) {
    throw new ProtocolError('bad option magic (expected IHAVEOPT)');
  }
  return { option: b.readUInt32BE(8), lengthBytes: b.readUInt32BE(12) };
}

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

export function encodeServerGreeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeUInt32BE(P.NBDMAGIC_HI, 0);
  b.writeUInt32BE(P.NBDMAGIC_LO, 4);
  b.writeUInt32BE(P.IHAVEOPT_HI, 8);
  b.writeUInt32BE(P.IHAVEOPT_LO, 12);
  b.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
  return b;
}

export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(P.OPTION_REPLY_HEADER_BYTES + len);
  b.writeUInt32BE(P.OPTION_REPLY_MAGIC_HI, 0);
  b.writeUInt32BE(P.OPTION_REPLY_MAGIC_LO, 4);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, P.OPTION_REPLY_HEADER_BYTES);
  return b;
}

export function encodeOptionError(option: number, type: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), 'utf8');
  return encodeOptionReply(option, type, msg);
}

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(P.INFO_EXPORT, 0);
  writeU64(b, sizeBytes, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(infoType: number, s: string): Buffer {
  const str = Buffer.from(s, 'utf8').subarray(0, P.MAX_STRING_BYTES);
  const b = Buffer.allocUnsafe(2 + str.length);
  b.writeUInt16BE(infoType, 0);
  str.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(minBytes: number, preferredBytes: number, maxBytes: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minBytes, 2);
  b.writeUInt32BE(preferredBytes, 6);
  b.writeUInt32BE(maxBytes, 10);
  return b;
}

export function encodeServerEntry(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8').subarray(0, P.MAX_STRING_BYTES);
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : 124));
  writeU64(b, sizeBytes, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

/** Parses "u32 len, name, u16 n, u16 info[n]" (INFO/GO). Throws ProtocolError('invalid') on inconsistency. */
export function parseInfoRequest(data: Buffer): { name: string; infos: number[] } {
  if (data.length < 6) throw new ProtocolError('INFO/GO data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > P.MAX_STRING_BYTES) throw new ProtocolError(`export name longer than ${P.MAX_STRING_BYTES} bytes`);
  if (4 + nameLen + 2 > data.length) throw new ProtocolError('INFO/GO name length exceeds option length');
  const name = data.toString('utf8', 4, 4 + nameLen);
  const n = data.readUInt16BE(4 + nameLen);
  if (4 + nameLen + 2 + 2 * n !== data.length) throw new ProtocolError('INFO/GO request count does not match option length');
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

/** Parses "u32 len, name, u32 n, (u32 len, query)*" (LIST/SET_META_CONTEXT). */
export function parseMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  if (data.length < 8) throw new ProtocolError('meta context data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > P.MAX_STRING_BYTES) throw new ProtocolError(`export name longer than ${P.MAX_STRING_BYTES} bytes`);
  if (4 + nameLen + 4 > data.length) throw new ProtocolError('meta context name length exceeds option length');
  const name = data.toString('utf8', 4, 4 + nameLen);
  let off = 4 + nameLen;
  const n = data.readUInt32BE(off);
  off += 4;
  // Each query takes at least 4 bytes, so n is bounded by the (capped) option length.
  if (n > (data.length - off) / 4) throw new ProtocolError('meta context query count exceeds option length');
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (off + 4 > data.length) throw new ProtocolError('meta context query truncated');
    const qlen = data.readUInt32BE(off);
    off += 4;
    if (qlen > P.MAX_STRING_BYTES) throw new ProtocolError(`meta context query longer than ${P.MAX_STRING_BYTES} bytes`);
    if (off + qlen > data.length) throw new ProtocolError('meta context query exceeds option length');
    queries.push(data.toString('utf8', off, off + qlen));
    off += qlen;
  }
  if (off !== data.length) throw new ProtocolError('trailing bytes after meta context queries');
  return { name, queries };
}

// ------------------------------------------------------------- transmission

export interface Request {
  flags: number;
  type: number;
  /** The 64-bit cookie as two 32-bit halves (echoed back verbatim). */
  cookieHi: number;
  cookieLo: number;
  /** Offset; Infinity when the wire value is not a safe integer (always out of range). */
  offset: number;
  length: number;
  /** WRITE payload when length <= MAX_PAYLOAD_BYTES; undefined otherwise (skipped). */
  payload: Buffer | undefined;
  /** The pool buffer behind `payload`, to release once the write has settled. */
  pooled: Buffer | undefined;
  /** Its charge to the server's memory budget (budget.ts), undefined once released. */
  charge: { readonly bytes: number; readonly lane: boolean } | undefined;
  /** performance.now() when its header was parsed (request latency is measured from it). */
  headerMs: number;
}

export interface RequestSink {
  onRequest(req: Request): void;
  /** Unrecoverable framing error (bad request magic): the caller must disconnect. */
  onFramingError(message: string): void;
  /**
   * Asked before a READ or WRITE of 1..MAX_PAYLOAD_BYTES is delivered or its payload is
   * buffered (the caller charges its memory budget here). false: the parser holds
   * everything after this header until unblock() (the caller stops reading meanwhile).
   */
  admit?(req: Request): boolean;
}

const enum ParseState {
  Header,
  Payload,
  Skip,
  Blocked,
  Dead,
}

/**
 * Incremental parser for the transmission phase. Feeds of any chunking produce the same
 * requests. WRITE payloads that fit in one chunk are delivered as zero-copy subarrays of
 * it (Node gives each read its own buffer, so keeping a view is safe).
 */
export class RequestParser {
  private state = ParseState.Header;
  private readonly header = Buffer.allocUnsafe(P.REQUEST_HEADER_BYTES);
  private headerFill = 0;
  private current: Request | undefined;
  private payloadFill = 0;
  private skipRemaining = 0;
  /** While Blocked: the request waiting for admission, and the input after its header. */
  private blocked: Request | undefined;
  private held: Buffer[] = [];

  constructor(
    private readonly sink: RequestSink,
    private readonly pool?: BufferPool,
  ) {}

  feed(chunk: Buffer): void {
    let pos = 0;
    const n = chunk.length;
    while (pos < n) {
      if (this.state === ParseState.Blocked) {
        this.held.push(pos === 0 ? chunk : chunk.subarray(pos));
        return;
      }
      switch (this.state) {
        case ParseState.Header: {
          if (this.headerFill === 0 && n - pos >= P.REQUEST_HEADER_BYTES) {
            // Fast path: whole header in this chunk.
            pos = this.parseHeader(chunk, pos);
          } else {
            const k = Math.min(P.REQUEST_HEADER_BYTES - this.headerFill, n - pos);
            chunk.copy(this.header, this.headerFill, pos, pos + k);
            this.headerFill += k;
            pos += k;
            if (this.headerFill === P.REQUEST_HEADER_BYTES) {
              this.headerFill = 0;
              this.parseHeader(this.header, 0);
            }
          }
          break;
        }
        case ParseState.Payload: {
          const req = this.current;
          assert(req !== undefined && req.payload !== undefined);
          const need = req.length - this.payloadFill;
          if (this.payloadFill === 0 && n - pos >= need) {
            req.payload = chunk.subarray(pos, pos + need);
            pos += need;
            this.finishRequest();
          } else {
            // The payload spans chunks: allocate it once (length is capped), then fill.
            if (this.payloadFill === 0) {
              if (this.pool && BufferPool.pooled(req.length)) {
                req.pooled = this.pool.take(req.length);
                req.payload = req.pooled.subarray(0, req.length);
              } else {
                req.payload = Buffer.allocUnsafe(req.length);
              }
            }
            const k = Math.min(need, n - pos);
            chunk.copy(req.payload, this.payloadFill, pos, pos + k);
            this.payloadFill += k;
            pos += k;
            if (this.payloadFill === req.length) this.finishRequest();
          }
          break;
        }
        case ParseState.Skip: {
          const k = Math.min(this.skipRemaining, n - pos);
          this.skipRemaining -= k;
          pos += k;
          if (this.skipRemaining === 0) this.state = ParseState.Header;
          break;
        }
        case ParseState.Dead:
          return;
      }
    }
  }

  /** True while a request waits for admission (see RequestSink.admit). */
  get isBlocked(): boolean {
    return this.state === ParseState.Blocked;
  }

  /** Bytes held back while blocked. */
  get heldBytes(): number {
    return this.held.reduce((a, b) => a + b.length, 0);
  }

  /** The blocked request was admitted: deliver it and parse what was held back. */
  unblock(): void {
    assert(this.state === ParseState.Blocked && this.blocked !== undefined, 'unblock while not blocked');
    const req = this.blocked;
    this.blocked = undefined;
    this.state = ParseState.Header;
    this.dispatch(req);
    const held = this.held;
    this.held = [];
    for (const c of held) this.feed(c);
  }

  /** Stops parsing for good (the connection is going away); drops held input. */
  kill(): void {
    this.state = ParseState.Dead;
    this.blocked = undefined;
    this.held = [];
  }

  /** A WRITE whose payload was partly received (its budget charge is the caller's to release). */
  get partialRequest(): Request | undefined {
    return this.state === ParseState.Payload ? this.current : this.blocked;
  }

  /** True while bytes of an unfinished request are pending. */
  get midRequest(): boolean {
    return this.state !== ParseState.Header || this.headerFill !== 0;
  }

  private parseHeader(b: Buffer, off: number): number {
    if (b.readUInt32BE(off) !== P.REQUEST_MAGIC) {
      this.state = ParseState.Dead;
      this.sink.onFramingError(`bad request magic 0x${b.readUInt32BE(off).toString(16)}`);
      return Number.MAX_SAFE_INTEGER;
    }
    const req: Request = {
      flags: b.readUInt16BE(off + 4),
      type: b.readUInt16BE(off + 6),
      cookieHi: b.readUInt32BE(off + 8),
      cookieLo: b.readUInt32BE(off + 12),
      offset: readU64(b, off + 16),
      length: b.readUInt32BE(off + 24),
      payload: undefined,
      pooled: undefined,
      charge: undefined,
      headerMs: performance.now(),
    };
    const next = off + P.REQUEST_HEADER_BYTES;
    const admissible = (req.type === P.CMD_WRITE || req.type === P.CMD_READ) && req.length > 0 && req.length <= P.MAX_PAYLOAD_BYTES;
    if (admissible && this.sink.admit !== undefined && !this.sink.admit(req)) {
      this.blocked = req;
      this.state = ParseState.Blocked;
      return next;
    }
    this.dispatch(req);
    return next;
  }

  private dispatch(req: Request): void {
    if (req.type === P.CMD_WRITE && req.length > 0) {
      if (req.length <= P.MAX_PAYLOAD_BYTES) {
        // Filled in the Payload state: a zero-copy view if it arrives in one chunk.
        req.payload = PENDING;
        this.current = req;
        this.payloadFill = 0;
        this.state = ParseState.Payload;
      } else {
        // Oversized: deliver now (the server replies with an error) and skip the payload.
        this.skipRemaining = req.length;
        this.state = ParseState.Skip;
        this.sink.onRequest(req);
      }
    } else {
      this.sink.onRequest(req);
    }
  }

  private finishRequest(): void {
    const req = this.current;
    assert(req !== undefined);
    this.current = undefined;
    this.payloadFill = 0;
    this.state = ParseState.Header;
    this.sink.onRequest(req);
  }
}

/** Marks a WRITE whose payload is still arriving. */
const PENDING = Buffer.alloc(0);

export function encodeSimpleReply(error: number, cookieHi: number, cookieLo: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(P.SIMPLE_REPLY_HEADER_BYTES);
  b.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

export function writeStructuredHeader(b: Buffer, off: number, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, off);
  b.writeUInt16BE(flags, off + 4);
  b.writeUInt16BE(type, off + 6);
  b.writeUInt32BE(cookieHi, off + 8);
  b.writeUInt32BE(cookieLo, off + 12);
  b.writeUInt32BE(length, off + 16);
}

export function encodeStructuredError(cookieHi: number, cookieLo: number, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 256), 'utf8');
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + 6 + msg.length);
  writeStructuredHeader(b, 0, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, cookieHi, cookieLo, 6 + msg.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

export function encodeStructuredNone(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES);
  writeStructuredHeader(b, 0, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

export function encodeBlockStatus(cookieHi: number, cookieLo: number, contextId: number, extents: Array<{ lengthBytes: number; flags: number }>): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + len);
  writeStructuredHeader(b, 0, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, len);
  b.writeUInt32BE(contextId, 20);
  let off = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.lengthBytes, off);
    b.writeUInt32BE(e.flags, off + 4);
    off += 8;
  }
  return b;
}
