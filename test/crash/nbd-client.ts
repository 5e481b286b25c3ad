/**
 * A minimal pipelined NBD client for crash tests: fixed-newstyle handshake with OPT_GO,
 * simple replies only, any number of requests in flight, and an exact record of which
 * replies arrived. Written from the protocol notes, independent of src/nbd.
 *
 * Invariants:
 * - A request's promise settles exactly once: with its reply, or with NbdClosedError
 *   when the connection ends first (the caller then does not know the outcome).
 * - Read payloads are capped (READ_MAX_BYTES) before anything is allocated.
 * - Every wait has a timeout (the handshake) or ends with the socket (requests).
 */
import * as net from 'net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const INFO_EXPORT = 0;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const FLAG_FUA = 1;
export const READ_MAX_BYTES = 32 * 1024 * 1024;

export class NbdClosedError extends Error {
  constructor() {
    super('connection closed before the reply');
    this.name = 'NbdClosedError';
  }
}

export class NbdReplyError extends Error {
  constructor(readonly errno: number, what: string) {
    super(`${what}: server error ${errno}`);
    this.name = 'NbdReplyError';
  }
}

interface Pending {
  readLength: number;
  what: string;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

export class NbdClient {
  sizeBytes = 0;
  transmissionFlags = 0;
  private buf: Buffer = Buffer.alloc(0);
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private closed = false;
  private waiter: (() => void) | undefined;

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      if (this.waiter) this.waiter();
      else this.parseReplies();
    });
    const end = (): void => {
      if (this.closed) return;
      this.closed = true;
      for (const p of this.pending.values()) p.reject(new NbdClosedError());
      this.pending.clear();
      this.waiter?.();
    };
    sock.on('close', end);
    sock.on('error', end);
  }

  get inFlight(): number {
    return this.pending.size;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  static async connect(socketPath: string, exportName: string, timeoutMs = 10_000): Promise<NbdClient> {
    const sock = net.createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    sock.setNoDelay(true);
    const c = new NbdClient(sock);
    const timer = setTimeout(() => sock.destroy(new Error('handshake timeout')), timeoutMs);
    try {
      await c.handshake(exportName);
    } finally {
      clearTimeout(timer);
    }
    return c;
  }

  private async need(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new NbdClosedError();
      await new Promise<void>((r) => { this.waiter = r; });
      this.waiter = undefined;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  private async handshake(exportName: string): Promise<void> {
    const g = await this.need(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad server greeting');
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(g.readUInt16BE(16) & 3); // FIXED_NEWSTYLE | NO_ZEROES as offered
    const name = Buffer.from(exportName, 'utf8');
    const data = Buffer.alloc(4 + name.length + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(0, 4 + name.length);
    const hdr = Buffer.alloc(16);
    hdr.writeBigUInt64BE(IHAVEOPT, 0);
    hdr.writeUInt32BE(OPT_GO, 8);
    hdr.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([cflags, hdr, data]));
    for (let i = 0; i < 64; i++) {
      const r = await this.need(20);
      if (r.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new Error('bad option reply magic');
      const type = r.readUInt32BE(12);
      const len = r.readUInt32BE(16);
      if (len > 65536) throw new Error('option reply too long');
      const payload = await this.need(len);
      if (type === REP_ACK) {
        if (this.sizeBytes === 0) throw new Error('no NBD_INFO_EXPORT before ACK');
        this.parseReplies();
        return;
      }
      if (type & 0x80000000) throw new Error(`OPT_GO refused: ${type.toString(16)} ${payload.subarray(0).toString('utf8')}`);
      if (type === REP_INFO && payload.readUInt16BE(0) === INFO_EXPORT) {
        this.sizeBytes = Number(payload.readBigUInt64BE(2));
        this.transmissionFlags = payload.readUInt16BE(10);
      }
    }
    throw new Error('too many option replies');
  }

  private parseReplies(): void {
    for (;;) {
      if (this.buf.length < 16) return;
      const magic = this.buf.readUInt32BE(0);
      if (magic !== SIMPLE_REPLY_MAGIC) {
        this.sock.destroy(new Error(`bad reply magic ${magic.toString(16)}`));
        return;
      }
      const errno = this.buf.readUInt32BE(4);
      const cookie = this.buf.readBigUInt64BE(8);
      const p = this.pending.get(cookie);
      if (!p) {
        this.sock.destroy(new Error(`reply for unknown cookie ${cookie}`));
        return;
      }
      const dataLen = errno === 0 ? p.readLength : 0;
      if (this.buf.length < 16 + dataLen) return;
      const data = Buffer.from(this.buf.subarray(16, 16 + dataLen));
      this.buf = this.buf.subarray(16 + dataLen);
      this.pending.delete(cookie);
      if (errno !== 0) p.reject(new NbdReplyError(errno, p.what));
      else p.resolve(data);
    }
  }

  private request(type: number, flags: number, offset: number, length: number, payload: Buffer | undefined, readLength: number): Promise<Buffer> {
    if (this.closed) return Promise.reject(new NbdClosedError());
    if (readLength > READ_MAX_BYTES) return Promise.reject(new Error('read too large'));
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    const p = new Promise<Buffer>((resolve, reject) => {
      this.pending.set(cookie, { readLength, what: `cmd ${type} at ${offset}+${length}`, resolve, reject });
    });
    this.sock.write(payload ? Buffer.concat([h, payload]) : h);
    return p;
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    await this.request(CMD_WRITE, fua ? FLAG_FUA : 0, offset, data.length, data, 0);
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.request(CMD_TRIM, fua ? FLAG_FUA : 0, offset, length, undefined, 0);
  }

  async flush(): Promise<void> {
    await this.request(CMD_FLUSH, 0, 0, 0, undefined, 0);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD_READ, 0, offset, length, undefined, length);
  }

  /** Sends DISC and closes. */
  async close(): Promise<void> {
    if (!this.closed) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(REQUEST_MAGIC, 0);
      h.writeUInt16BE(CMD_DISC, 6);
      this.sock.end(h);
      await new Promise<void>((r) => {
        if (this.closed) r();
        else this.sock.once('close', () => r());
      });
    }
  }

  destroy(): void {
    this.sock.destroy();
  }
}
