/**
 * Transmission phase: parse requests in place, validate them at the edge (turning bad
 * input into NBD errors), run them against the volume concurrently and reply as each
 * completes (out of order). Replies produced in one tick are corked into one writev.
 *
 * Invariants:
 * - At most MAX_INFLIGHT_REQUESTS requests and MAX_INFLIGHT_BYTES payload/read bytes are
 *   in progress per connection; beyond that, and while the socket is not draining, we
 *   stop reading from the socket (backpressure), we never buffer without bound.
 * - Every request gets exactly one reply, except DISC (none) and requests that arrive
 *   after DISC (ignored, as the spec allows).
 * - With structured replies negotiated, READ and BLOCK_STATUS always get structured
 *   replies; everything else gets a simple reply (the spec allows both).
 * - The volume is only called with in-range, supported, well-formed requests.
 */
import type { Duplex } from 'stream';
import type { Logger } from '../util/log';
import type { Volume } from '../volume/types';
import { assert } from '../util/assert';
import { BufferPool, sharedBufferPool } from './buffer-pool';
import { toNbdError } from './errors';
import * as P from './protocol';
import {
  encodeBlockStatus,
  encodeSimpleReply,
  encodeStructuredError,
  Request,
  RequestParser,
  writeStructuredHeader,
  writeU64,
} from './wire';

export const MAX_INFLIGHT_REQUESTS = 256;
export const MAX_INFLIGHT_BYTES = 96 * 1024 * 1024;
/** Stop reading while this much reply data waits in the socket. */
const MAX_PENDING_WRITE_BYTES = 16 * 1024 * 1024;

export interface TransmissionSession {
  socket: Duplex;
  volume: Volume;
  exportName: string;
  structuredReplies: boolean;
  baseAllocation: boolean;
  transmissionFlags: number;
  leftover: Buffer[];
}

export class Transmission {
  private readonly parser: RequestParser;
  private readonly volume: Volume;
  private readonly readOnly: boolean;
  private inflightRequests = 0;
  private inflightBytes = 0;
  private corked = false;
  private readingPaused = false;
  private stopping = false;
  private disconnected = false;
  private idleWaiters: Array<() => void> = [];
  private resolveClosed!: () => void;
  /** Resolves when the connection is closed and every in-flight request has finished. */
  readonly closed: Promise<void>;
  requestsServed = 0;

  constructor(private readonly s: TransmissionSession, private readonly log: Logger) {
    this.volume = s.volume;
    this.readOnly = (s.transmissionFlags & P.TFLAG_READ_ONLY) !== 0;
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.parser = new RequestParser(
      {
        onRequest: (req) => this.onRequest(req),
        onFramingError: (msg) => this.abort(msg),
      },
      sharedBufferPool,
    );
    const sock = s.socket;
    sock.on('data', this.onData);
    sock.on('drain', this.maybeResume);
    sock.on('error', (e: Error) => {
      this.log.debug({ err: e.message }, 'connection error');
      this.markDisconnected();
    });
    sock.on('close', () => this.markDisconnected());
    sock.on('end', () => this.markDisconnected());
    for (const c of s.leftover) this.parser.feed(c);
    sock.resume();
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.stopping) return;
    this.parser.feed(chunk);
  };

  /** Graceful stop: read nothing more, finish in-flight requests, close. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    this.s.socket.pause();
    await this.idle();
    this.s.socket.end();
    if (!this.disconnected) {
      // Give the client a moment to read our last replies, then make sure it is gone.
      const t = setTimeout(() => this.s.socket.destroy(), 2000);
      t.unref();
    }
    await this.closed;
  }

  private idle(): Promise<void> {
    if (this.inflightRequests === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private markDisconnected(): void {
    if (this.disconnected) return;
    this.disconnected = true;
    this.stopping = true;
    void this.idle().then(() => this.resolveClosed());
  }

  private abort(msg: string): void {
    this.log.warn({ why: msg }, 'protocol violation: disconnecting client');
    this.stopping = true;
    this.s.socket.destroy();
    this.markDisconnected();
  }

  // ------------------------------------------------------------- flow control

  private begin(bytes: number): void {
    this.inflightRequests++;
    this.inflightBytes += bytes;
    if (!this.readingPaused && (this.inflightRequests >= MAX_INFLIGHT_REQUESTS || this.inflightBytes >= MAX_INFLIGHT_BYTES)) {
      this.readingPaused = true;
      this.s.socket.pause();
    }
  }

  private end(bytes: number): void {
    this.inflightRequests--;
    this.inflightBytes -= bytes;
    this.requestsServed++;
    if (this.inflightRequests === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
    this.maybeResume();
  }

  private readonly maybeResume = (): void => {
    if (!this.readingPaused || this.stopping) return;
    if (this.inflightRequests < MAX_INFLIGHT_REQUESTS && this.inflightBytes < MAX_INFLIGHT_BYTES && this.s.socket.writableLength < MAX_PENDING_WRITE_BYTES) {
      this.readingPaused = false;
      this.s.socket.resume();
    }
  };

  private readonly uncork = (): void => {
    this.corked = false;
    const sock = this.s.socket;
    sock.uncork();
    if (sock.writableLength >= MAX_PENDING_WRITE_BYTES && !this.readingPaused) {
      this.readingPaused = true;
      sock.pause();
    }
  };

  /**
   * Queues one reply. Replies made in the same tick go out corked in one writev; with a
   * single request in flight there is nothing to batch, so it is written at once.
   * `pooled` (a pool buffer behind b) is released once the socket has taken the bytes.
   */
  private send(b: Buffer, pooled?: Buffer): void {
    if (this.disconnected) {
      if (pooled) sharedBufferPool.release(pooled);
      return;
    }
    if (!this.corked && this.inflightRequests > 1) {
      this.corked = true;
      this.s.socket.cork();
      process.nextTick(this.uncork);
    }
    if (pooled) this.s.socket.write(b, () => sharedBufferPool.release(pooled));
    else this.s.socket.write(b);
  }

  private replySimple(req: Request, error: number): void {
    this.send(encodeSimpleReply(error, req.cookieHi, req.cookieLo));
  }

  private replyError(req: Request, error: number, message: string): void {
    if (this.s.structuredReplies && (req.type === P.CMD_READ || req.type === P.CMD_BLOCK_STATUS)) {
      this.send(encodeStructuredError(req.cookieHi, req.cookieLo, error, message));
    } else {
      this.replySimple(req, error);
    }
  }

  // ---------------------------------------------------------------- requests

  private onRequest(req: Request): void {
    if (this.stopping) return this.dropPayload(req);
    if (req.type === P.CMD_DISC) {
      this.log.debug('client sent DISC');
      this.stopping = true;
      this.s.socket.pause();
      void this.idle().then(() => this.s.socket.end());
      return;
    }
    const bad = this.validate(req);
    if (bad !== 0) {
      this.dropPayload(req);
      this.replyError(req, bad, 'invalid request');
      return;
    }
    switch (req.type) {
      case P.CMD_READ:
        void this.doRead(req);
        return;
      case P.CMD_WRITE:
        if (req.length === 0) return this.replySimple(req, 0);
        void this.doWrite(req);
        return;
      case P.CMD_FLUSH:
        void this.doSimple(req, this.volume.flush(), 'flush');
        return;
      case P.CMD_TRIM:
        if (req.length === 0) return this.replySimple(req, 0);
        void this.doSimple(req, this.volume.trim(req.offset, req.length, (req.flags & P.CMD_FLAG_FUA) !== 0), 'trim');
        return;
      case P.CMD_WRITE_ZEROES:
        if (req.length === 0) return this.replySimple(req, 0);
        void this.doSimple(
          req,
          this.volume.zero(req.offset, req.length, {
            noHole: (req.flags & P.CMD_FLAG_NO_HOLE) !== 0,
            fastZero: (req.flags & P.CMD_FLAG_FAST_ZERO) !== 0,
            fua: (req.flags & P.CMD_FLAG_FUA) !== 0,
          }),
          'write zeroes',
        );
        return;
      case P.CMD_CACHE:
        if (req.length === 0) return this.replySimple(req, 0);
        void this.doSimple(req, this.volume.cache(req.offset, req.length), 'cache');
        return;
      case P.CMD_BLOCK_STATUS:
        void this.doBlockStatus(req);
        return;
    }
  }

  private dropPayload(req: Request): void {
    if (req.pooled) sharedBufferPool.release(req.pooled);
    req.pooled = undefined;
    req.payload = undefined;
  }

  /** Returns 0 if the request may go to the volume, else the NBD error to reply with. */
  private validate(req: Request): number {
    const allowed = P.ALLOWED_CMD_FLAGS[req.type];
    if (allowed === undefined) return P.EINVAL; // unknown command
    if ((req.flags & ~allowed) !== 0) return P.EINVAL;
    const size = this.volume.sizeBytes;
    const caps = this.volume.caps;
    const end = req.offset + req.length;
    switch (req.type) {
      case P.CMD_READ:
        if (req.length > P.MAX_PAYLOAD_BYTES) return this.s.structuredReplies ? P.EOVERFLOW : P.EINVAL;
        if ((req.flags & P.CMD_FLAG_DF) !== 0 && !this.s.structuredReplies) return P.EINVAL;
        // As nbdkit: a zero-length READ is EINVAL (a data chunk must cover >= 1 byte).
        if (req.length === 0 || end > size) return P.EINVAL;
        return 0;
      case P.CMD_WRITE:
        if (req.length > P.MAX_PAYLOAD_BYTES) return this.s.structuredReplies ? P.EOVERFLOW : P.EINVAL;
        if (this.readOnly) return P.EPERM;
        if (end > size) return P.ENOSPC;
        return 0;
      case P.CMD_FLUSH:
        return 0;
      case P.CMD_TRIM:
        if (this.readOnly) return P.EPERM;
        if (!caps.canTrim) return P.EINVAL;
        if (end > size) return P.EINVAL;
        return 0;
      case P.CMD_WRITE_ZEROES:
        if (this.readOnly) return P.EPERM;
        if (!caps.canZero) return P.EINVAL;
        if ((req.flags & P.CMD_FLAG_FAST_ZERO) !== 0 && !caps.canFastZero) return P.EINVAL;
        if (end > size) return P.ENOSPC;
        return 0;
      case P.CMD_CACHE:
        if (!caps.canCache) return P.EINVAL;
        if (end > size) return P.EINVAL;
        return 0;
      case P.CMD_BLOCK_STATUS:
        if (!this.s.structuredReplies || !this.s.baseAllocation) return P.EINVAL;
        if (req.length === 0 || end > size) return P.EINVAL;
        return 0;
    }
    return P.EINVAL;
  }

  private async doRead(req: Request): Promise<void> {
    const len = req.length;
    let pooled: Buffer | undefined;
    this.begin(len);
    try {
      if (this.s.structuredReplies) {
        const hdr = P.STRUCTURED_REPLY_HEADER_BYTES + 8;
        pooled = BufferPool.pooled(hdr + len) ? sharedBufferPool.take(hdr + len) : undefined;
        const b = pooled ? pooled.subarray(0, hdr + len) : Buffer.allocUnsafe(hdr + len);
        await this.readPieces(req.offset, b.subarray(hdr));
        writeStructuredHeader(b, 0, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + len);
        writeU64(b, req.offset, P.STRUCTURED_REPLY_HEADER_BYTES);
        this.send(b, pooled);
      } else {
        const hdr = P.SIMPLE_REPLY_HEADER_BYTES;
        pooled = BufferPool.pooled(hdr + len) ? sharedBufferPool.take(hdr + len) : undefined;
        const b = pooled ? pooled.subarray(0, hdr + len) : Buffer.allocUnsafe(hdr + len);
        if (len > 0) await this.readPieces(req.offset, b.subarray(hdr));
        encodeSimpleReply(0, req.cookieHi, req.cookieLo, b);
        this.send(b, pooled);
      }
      pooled = undefined; // owned by the socket write now
    } catch (e) {
      this.replyError(req, toNbdError(e, this.log, `read ${len}@${req.offset}`), 'read failed');
    } finally {
      if (pooled) sharedBufferPool.release(pooled);
      this.end(len);
    }
  }

  private async doWrite(req: Request): Promise<void> {
    const data = req.payload;
    const len = req.length;
    this.begin(len);
    try {
      if (data === undefined || data.length !== len) throw new Error('internal: write without its payload');
      await this.writePieces(req.offset, data, (req.flags & P.CMD_FLAG_FUA) !== 0);
      this.replySimple(req, 0);
    } catch (e) {
      this.replySimple(req, toNbdError(e, this.log, `write ${len}@${req.offset}`));
    } finally {
      // The volume keeps no reference to the payload once its write settled.
      if (req.pooled) sharedBufferPool.release(req.pooled);
      this.end(len);
    }
  }

  /**
   * The volume takes at most caps.maxPayloadBytes per call; a larger request (we accept
   * up to MAX_PAYLOAD_BYTES) goes to it in consecutive pieces. NBD promises no atomicity
   * for a write, so this is only visible as several backend calls.
   */
  private async readPieces(offset: number, dst: Buffer): Promise<void> {
    const piece = this.volume.caps.maxPayloadBytes;
    assert(piece > 0, 'volume maxPayloadBytes must be positive');
    for (let done = 0; done < dst.length; done += piece) {
      const n = Math.min(piece, dst.length - done);
      await this.volume.read(offset + done, n, dst.subarray(done, done + n));
    }
  }

  private async writePieces(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const piece = this.volume.caps.maxPayloadBytes;
    assert(piece > 0, 'volume maxPayloadBytes must be positive');
    for (let done = 0; done < data.length; done += piece) {
      const n = Math.min(piece, data.length - done);
      await this.volume.write(offset + done, data.subarray(done, done + n), fua);
    }
  }

  /** A request with no payload either way: reply once `op` settles. */
  private async doSimple(req: Request, op: Promise<void>, what: string): Promise<void> {
    this.begin(0);
    try {
      await op;
      this.replySimple(req, 0);
    } catch (e) {
      this.replySimple(req, toNbdError(e, this.log, `${what} ${req.length}@${req.offset}`));
    } finally {
      this.end(0);
    }
  }

  private async doBlockStatus(req: Request): Promise<void> {
    this.begin(0);
    try {
      const max = (req.flags & P.CMD_FLAG_REQ_ONE) !== 0 ? 1 : P.MAX_EXTENTS_PER_REPLY;
      const extents = await this.volume.blockStatus(req.offset, req.length, max);
      // Validate what the backend returned before it goes on the wire.
      let total = 0;
      const out: Array<{ lengthBytes: number; flags: number }> = [];
      for (const e of extents) {
        if (out.length >= max || total >= req.length) break;
        const l = Math.min(e.lengthBytes, req.length - total);
        if (!(l > 0)) throw new Error(`internal: backend returned an empty extent at ${req.offset + total}`);
        out.push({ lengthBytes: l, flags: e.flags & (P.EXTENT_HOLE_BIT | P.EXTENT_ZERO_BIT) });
        total += l;
      }
      if (out.length === 0) throw new Error('internal: backend returned no extents');
      this.send(encodeBlockStatus(req.cookieHi, req.cookieLo, P.META_CONTEXT_BASE_ALLOCATION_ID, out));
    } catch (e) {
      this.replyError(req, toNbdError(e, this.log, `block status ${req.length}@${req.offset}`), 'block status failed');
    } finally {
      this.end(0);
    }
  }
}
