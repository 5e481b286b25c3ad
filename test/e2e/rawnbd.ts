/**
 * A small, deliberately permissive NBD client over a raw socket, for hostile-input tests:
 * it sends whatever bytes a test asks for and reads replies field by field.
 * Written from the protocol notes (shared/docs/nbd-protocol.md); independent of src/nbd so
 * that a codec bug cannot hide itself.
 *
 * Invariants:
 * - every read has a timeout and fails with a clear message (never hangs a test);
 * - a reply payload is capped (MAX_REPLY_PAYLOAD_BYTES) before it is read, so a broken
 *   server cannot make the test allocate without bound;
 * - once the server closes, pending and later reads reject with RawClosedError.
 */
import * as net from 'net';
import * as tls from 'tls';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const CHUNK_FLAG_DONE = 1;

export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** A reply payload larger than this is a broken server, not something to buffer. */
export const MAX_REPLY_PAYLOAD_BYTES = 64 * 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;

export class RawClosedError extends Error {
  constructor(what: string) {
    super(`server closed the connection while ${what}`);
    this.name = 'RawClosedError';
  }
}

export type Target = { socketPath: string } | { host: string; port: number };

export class RawConn {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private closed = false;
  private closeWaiters: Array<() => void> = [];
  private dataWaiter: (() => void) | undefined;
  /** Set when the socket reported an error (ECONNRESET, EPIPE): the server went away. */
  lastError: Error | undefined;

  private constructor(private sock: net.Socket | tls.TLSSocket) {
    this.attach(sock);
  }

  static connect(target: Target, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const sock = 'socketPath' in target ? net.connect(target.socketPath) : net.connect(target.port, target.host);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`connect timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.setNoDelay(true);
        resolve(new RawConn(sock));
      });
    });
  }

  private attach(sock: net.Socket | tls.TLSSocket): void {
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      const w = this.dataWaiter;
      this.dataWaiter = undefined;
      if (w) w();
    });
    sock.on('error', (e) => {
      this.lastError = e;
    });
    sock.on('close', () => {
      this.closed = true;
      const w = this.dataWaiter;
      this.dataWaiter = undefined;
      if (w) w();
      for (const c of this.closeWaiters.splice(0)) c();
    });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  get socket(): net.Socket | tls.TLSSocket {
    return this.sock;
  }

  /** Writes bytes; resolves when handed to the kernel (or at once if the peer is gone). */
  write(data: Buffer): Promise<void> {
    if (this.closed || this.sock.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      const ok = this.sock.write(data, () => resolve());
      void ok;
    });
  }

  /**
   * Writes `totalBytes` of filler, respecting backpressure, and stops early (without error)
   * if the server closes. Returns the number of bytes handed to the socket.
   */
  async writeFiller(totalBytes: number, byte = 0x5a): Promise<number> {
    const piece = Buffer.alloc(Math.min(totalBytes, 1024 * 1024), byte);
    let sent = 0;
    while (sent < totalBytes && !this.closed && !this.sock.destroyed) {
      const n = Math.min(piece.length, totalBytes - sent);
      const ok = this.sock.write(n === piece.length ? piece : piece.subarray(0, n));
      sent += n;
      if (!ok) {
        await new Promise<void>((resolve) => {
          const done = (): void => {
            this.sock.removeListener('drain', done);
            this.sock.removeListener('close', done);
            resolve();
          };
          this.sock.once('drain', done);
          this.sock.once('close', done);
        });
      }
    }
    return sent;
  }

  /** Reads exactly n bytes. Rejects with RawClosedError if the server closes first. */
  async read(n: number, what = `reading ${n} bytes`, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Buffer> {
    if (n > MAX_REPLY_PAYLOAD_BYTES) throw new Error(`refusing to read ${n} bytes (${what}): above the test cap`);
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.closed) throw new RawClosedError(what);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms ${what} (have ${this.buffered} of ${n} bytes)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.dataWaiter = undefined;
          resolve();
        }, left);
        this.dataWaiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Bytes received and not yet read. */
  get available(): number {
    return this.buffered;
  }

  /** Resolves true once the server has closed, false after timeoutMs. Discards data received meanwhile. */
  waitClosed(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<boolean> {
    if (this.closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), timeoutMs);
      this.closeWaiters.push(() => {
        clearTimeout(t);
        resolve(true);
      });
    });
  }

  destroy(): void {
    this.sock.destroy();
  }

  /** Upgrades this connection to TLS (after a STARTTLS ACK). */
  async startTls(options: tls.ConnectionOptions, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    if (this.buffered !== 0) throw new Error('bytes pending before the TLS upgrade');
    const plain = this.sock;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    plain.removeAllListeners('error');
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({ ...options, socket: plain as net.Socket });
      const t = setTimeout(() => {
        s.destroy();
        reject(new Error(`TLS handshake timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('secureConnect', () => {
        clearTimeout(t);
        resolve(s);
      });
      s.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
    this.sock = secure;
    this.attach(secure);
  }
}

// ---------------------------------------------------------------------------------------
// Handshake

export interface Greeting {
  handshakeFlags: number;
}

export async function readGreeting(c: RawConn): Promise<Greeting> {
  const b = await c.read(18, 'reading the server greeting');
  const magic = b.readBigUInt64BE(0);
  const opt = b.readBigUInt64BE(8);
  if (magic !== NBDMAGIC) throw new Error(`bad NBDMAGIC 0x${magic.toString(16)}`);
  if (opt !== IHAVEOPT) throw new Error(`bad IHAVEOPT 0x${opt.toString(16)} (server is not fixed newstyle?)`);
  return { handshakeFlags: b.readUInt16BE(16) };
}

export function clientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** An option header with an arbitrary declared length (the data may be shorter or absent). */
export function optionHeader(option: number, declaredLength: number, magic: bigint = IHAVEOPT): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(magic, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(declaredLength >>> 0, 12);
  return b;
}

export function option(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([optionHeader(option, data.length), data]);
}

/** Data for OPT_GO / OPT_INFO: name, then the info requests. */
export function goData(name: string, infos: number[] = [INFO.BLOCK_SIZE, INFO.NAME, INFO.DESCRIPTION]): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + nameBytes.length);
  infos.forEach((i, k) => b.writeUInt16BE(i, 6 + nameBytes.length + 2 * k));
  return b;
}

/** Data for LIST/SET_META_CONTEXT. */
export function metaContextData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, 'utf8');
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n.length, 0);
  parts.push(h, n);
  const cnt = Buffer.alloc(4);
  cnt.writeUInt32BE(queries.length, 0);
  parts.push(cnt);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export async function readOptionReply(c: RawConn, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<OptionReply> {
  const h = await c.read(20, 'reading an option reply header', timeoutMs);
  const magic = h.readBigUInt64BE(0);
  if (magic !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)}`);
  const len = h.readUInt32BE(16);
  const data = await c.read(len, `reading ${len} bytes of option reply data`, timeoutMs);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
}

export interface ExportInfoReply {
  sizeBytes: bigint;
  transmissionFlags: number;
  name?: string;
  description?: string;
  blockSizes?: { minimum: number; preferred: number; maximum: number };
  /** Every reply before the final ACK, in order. */
  replies: OptionReply[];
}

/** Reads INFO replies until ACK (throws on an error reply). */
export async function readInfoReplies(c: RawConn, opt: number): Promise<ExportInfoReply> {
  const replies: OptionReply[] = [];
  let sizeBytes: bigint | undefined;
  let transmissionFlags = 0;
  const out: Partial<ExportInfoReply> = {};
  for (let i = 0; i < 64; i++) {
    const r = await readOptionReply(c);
    if (r.option !== opt) throw new Error(`reply for option ${r.option}, expected ${opt}`);
    if (r.type === REP.ACK) {
      if (sizeBytes === undefined) throw new Error('ACK before NBD_INFO_EXPORT');
      return { ...out, sizeBytes, transmissionFlags, replies };
    }
    if (r.type !== REP.INFO) throw new Error(`option ${opt} got reply type 0x${r.type.toString(16)}: ${r.data.toString('utf8')}`);
    replies.push(r);
    const infoType = r.data.readUInt16BE(0);
    if (infoType === INFO.EXPORT) {
      if (r.data.length !== 12) throw new Error(`NBD_INFO_EXPORT length ${r.data.length}, expected 12`);
      sizeBytes = r.data.readBigUInt64BE(2);
      transmissionFlags = r.data.readUInt16BE(10);
    } else if (infoType === INFO.NAME) {
      out.name = r.data.subarray(2).toString('utf8');
    } else if (infoType === INFO.DESCRIPTION) {
      out.description = r.data.subarray(2).toString('utf8');
    } else if (infoType === INFO.BLOCK_SIZE) {
      if (r.data.length !== 14) throw new Error(`NBD_INFO_BLOCK_SIZE length ${r.data.length}, expected 14`);
      out.blockSizes = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
    }
  }
  throw new Error('more than 64 INFO replies');
}

export interface Session {
  conn: RawConn;
  greeting: Greeting;
  info: ExportInfoReply;
  structured: boolean;
  metaContextId?: number;
}

export interface NegotiateOptions {
  exportName?: string;
  structured?: boolean;
  /** Also SET_META_CONTEXT base:allocation (implies structured). */
  blockStatus?: boolean;
}

/** Greeting, client flags, optional STRUCTURED_REPLY/SET_META_CONTEXT, then GO. */
export async function negotiate(c: RawConn, opts: NegotiateOptions = {}): Promise<Session> {
  const greeting = await readGreeting(c);
  if ((greeting.handshakeFlags & FLAG_FIXED_NEWSTYLE) === 0) throw new Error('server does not offer FIXED_NEWSTYLE');
  const flags = FLAG_FIXED_NEWSTYLE | (greeting.handshakeFlags & FLAG_NO_ZEROES);
  await c.write(clientFlags(flags));
  const structured = (opts.structured ?? false) || (opts.blockStatus ?? false);
  let metaContextId: number | undefined;
  if (structured) {
    await c.write(option(OPT.STRUCTURED_REPLY));
    const r = await readOptionReply(c);
    if (r.type !== REP.ACK) throw new Error(`STRUCTURED_REPLY refused: 0x${r.type.toString(16)}`);
  }
  const name = opts.exportName ?? '';
  if (opts.blockStatus) {
    await c.write(option(OPT.SET_META_CONTEXT, metaContextData(name, ['base:allocation'])));
    for (;;) {
      const r = await readOptionReply(c);
      if (r.type === REP.ACK) break;
      if (r.type !== REP.META_CONTEXT) throw new Error(`SET_META_CONTEXT got 0x${r.type.toString(16)}`);
      const ctxName = r.data.subarray(4).toString('utf8');
      if (ctxName !== 'base:allocation') throw new Error(`unexpected meta context ${ctxName}`);
      metaContextId = r.data.readUInt32BE(0);
    }
    if (metaContextId === undefined) throw new Error('server did not select base:allocation');
  }
  await c.write(option(OPT.GO, goData(name)));
  const info = await readInfoReplies(c, OPT.GO);
  const s: Session = { conn: c, greeting, info, structured };
  if (metaContextId !== undefined) s.metaContextId = metaContextId;
  return s;
}

// ---------------------------------------------------------------------------------------
// Transmission

export interface RequestFields {
  flags?: number;
  type: number;
  cookie: bigint;
  offset: bigint | number;
  length: number;
  magic?: number;
}

export function request(r: RequestFields, payload?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags ?? 0, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeBigUInt64BE(r.cookie, 8);
  h.writeBigUInt64BE(BigInt(r.offset), 16);
  h.writeUInt32BE(r.length >>> 0, 24);
  return payload ? Buffer.concat([h, payload]) : h;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
}

export async function readSimpleReply(c: RawConn, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<SimpleReply> {
  const b = await c.read(16, 'reading a simple reply', timeoutMs);
  const magic = b.readUInt32BE(0);
  if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`expected simple reply magic, got 0x${magic.toString(16)}`);
  return { error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8) };
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  data: Buffer;
}

export async function readChunk(c: RawConn, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Chunk> {
  const b = await c.read(20, 'reading a structured reply chunk', timeoutMs);
  const magic = b.readUInt32BE(0);
  if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`expected structured reply magic, got 0x${magic.toString(16)}`);
  const len = b.readUInt32BE(16);
  const data = await c.read(len, `reading ${len} bytes of chunk payload`, timeoutMs);
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), data };
}

/** Reads chunks until DONE; the error number of the first ERROR chunk, or 0. */
export async function readChunksUntilDone(c: RawConn, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<{ chunks: Chunk[]; error: number }> {
  const chunks: Chunk[] = [];
  let error = 0;
  for (let i = 0; i < 100_000; i++) {
    const ch = await readChunk(c, timeoutMs);
    chunks.push(ch);
    if ((ch.type & 0x8000) !== 0 && error === 0) error = ch.data.readUInt32BE(0);
    if ((ch.flags & CHUNK_FLAG_DONE) !== 0) return { chunks, error };
  }
  throw new Error('no DONE chunk after 100000 chunks');
}

let cookieSeq = 1n;
export function nextCookie(): bigint {
  return cookieSeq++;
}

/** A simple-reply READ; returns the error and, on success, the data. */
export async function simpleRead(s: Session, offset: bigint | number, length: number, flags = 0): Promise<{ error: number; data?: Buffer }> {
  const cookie = nextCookie();
  await s.conn.write(request({ type: CMD.READ, flags, cookie, offset, length }));
  const r = await readSimpleReply(s.conn);
  if (r.cookie !== cookie) throw new Error(`reply cookie ${r.cookie}, expected ${cookie}`);
  if (r.error !== 0) return { error: r.error };
  return { error: 0, data: await s.conn.read(length, `reading ${length} bytes of READ data`) };
}

/** A command without read payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE...), simple reply. */
export async function simpleCommand(s: Session, fields: Omit<RequestFields, 'cookie'>, payload?: Buffer): Promise<number> {
  const cookie = nextCookie();
  await s.conn.write(request({ ...fields, cookie }, payload));
  const r = await readSimpleReply(s.conn);
  if (r.cookie !== cookie) throw new Error(`reply cookie ${r.cookie}, expected ${cookie}`);
  return r.error;
}

export function targetOf(server: { socketPath: string | undefined; port: number | undefined }): Target {
  if (server.socketPath !== undefined) return { socketPath: server.socketPath };
  if (server.port !== undefined) return { host: '127.0.0.1', port: server.port };
  throw new Error('server has neither a socket nor a port');
}
