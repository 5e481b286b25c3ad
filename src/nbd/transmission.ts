/**
 * Transmission phase: parse requests in place, validate them at the edge (validate.ts),
 * run them against the volume concurrently and reply as each completes (out of order).
 * Replies produced in one tick are corked into one writev.
 *
 * Limits (limits.ts): MAX_INFLIGHT_REQUESTS_PER_CONNECTION, MAX_INFLIGHT_BYTES_PER_CONNECTION,
 * MAX_QUEUED_REPLY_BYTES_PER_CONNECTION, the server-wide MemoryBudget, stallTimeoutMs,
 * idleTimeoutMs, LINGER_MS.
 *
 * Invariants:
 * - Every READ/WRITE byte is charged to the server-wide budget before it is buffered
 *   (the parser asks admit() at the header) and released exactly once: a WRITE when the
 *   volume's write settled (or it was refused), a READ when the socket has taken its
 *   reply. While a charge waits we read nothing from this socket.
 * - A connection's charges (held or inside the volume) stay within
 *   MAX_INFLIGHT_BYTES_PER_CONNECTION (a first request always fits).
 * - We read from the socket only while: not stopping, no charge waiting, fewer than
 *   MAX_INFLIGHT_REQUESTS_PER_CONNECTION in flight, and fewer than
 *   MAX_QUEUED_REPLY_BYTES_PER_CONNECTION reply bytes queued (checked on every send).
 * - Once the socket is closed, what the connection still holds in the budget (replies
 *   queued in the dead socket, a half-received payload) is released at once; requests
 *   still inside the volume release theirs when they settle.
 * - After DISC: no reply to it, in-flight requests finish, input is read and discarded
 *   (so the client's FIN is seen), and the socket is destroyed LINGER_MS later at most.
 * - Every request gets exactly one reply, except DISC (none) and requests that arrive
 *   after DISC (ignored, as the spec allows).
 * - With structured replies negotiated, READ and BLOCK_STATUS always get structured
 *   replies; everything else gets a simple reply (the spec allows both).
 * - Each reply is reported once to the observer (limits.observer), when it is queued.
 */
import type { Duplex } from 'stream';
import type { Logger } from '../util/log';
import type { Volume } from '../volume/types';
import { assert } from '../util/assert';
import type { Charge, MemoryBudget } from './budget';
import { BufferPool, sharedBufferPool } from './buffer-pool';
import { errorKind, toNbdError } from './errors';
import type { NbdObserver } from './observer';
import {
  LINGER_MS,
  MAX_INFLIGHT_BYTES_PER_CONNECTION,
  MAX_INFLIGHT_REQUESTS_PER_CONNECTION,
  MAX_QUEUED_REPLY_BYTES_PER_CONNECTION,
} from './limits';
import * as P from './protocol';
import { validateRequest, ValidationContext } from './validate';
import { encodeBlockStatus, encodeSimpleReply, encodeStructuredError, Request, RequestParser, writeStructuredHeader, writeU64 } from './wire';

/**
 * Bytes the socket's handle has not yet handed to the kernel (libuv's write queue, which
 * shrinks as a large write progresses), when Node exposes it; undefined otherwise.
 */
function handleQueuedBytes(sock: Duplex): number | undefined {
  const h = (sock as unknown as { _handle?: { writeQueueSize?: unknown } | null })._handle;
  return typeof h?.writeQueueSize === 'number' ? h.writeQueueSize : undefined;
}

export interface TransmissionSession {
  socket: Duplex;
  volume: Volume;
  exportName: string;
  structuredReplies: boolean;
  baseAllocation: boolean;
  transmissionFlags: number;
  leftover: Buffer[];
}

export interface TransmissionLimits {
  /** The server-wide budget for bytes in flight. */
  budget: MemoryBudget;
  /** Drop a client that leaves replies unread or stops mid-request this long; 0 = never. */
  stallTimeoutMs: number;
  /** Drop a client with nothing in flight that sends nothing this long; 0 = never. */
  idleTimeoutMs: number;
  /** Told of every reply (metrics); optional. */
  observer?: NbdObserver;
}

export class Transmission {
  protected readonly parser: RequestParser;
  protected readonly volume: Volume;
  protected readonly vc: ValidationContext;
  protected inflightRequests = 0;
  protected corked = false;
  protected readingPaused = false;
  protected stopping = false;
  /** DISC received: read and discard until the client closes or LINGER_MS passes. */
  protected discarding = false;
  protected disconnected = false;
  protected socketClosed = false;
  protected cancelBudgetWait: (() => void) | undefined;
  /** The request whose admission waits (parser blocked), on the budget or our own share. */
  protected waitingReq: Request | undefined;
  protected retryScheduled = false;
  /** Budget bytes charged to this connection's requests (held or inside the volume). */
  protected connChargedBytes = 0;
  /** Charges the connection itself holds (queued replies, a payload being received). */
  protected readonly held = new Set<Request>();
  protected idleWaiters: Array<() => void> = [];
  protected resolveClosed!: () => void;
  /** Resolves when the connection is closed and every in-flight request has finished. */
  readonly closed: Promise<void>;
  requestsServed = 0;
  bytesReceived = 0;
  /** Why the server ended the connection (undefined: the client did, or DISC). */
  closeReason: string | undefined;
  protected lastRxMs = Date.now();
  protected lastTxMs = Date.now();
  protected lastHandleQueuedBytes = 0;

  constructor(
    protected readonly s: TransmissionSession,
    protected readonly log: Logger,
    protected readonly limits: TransmissionLimits,
    /** The socket's I/O is done elsewhere (native-transmission.ts): wire nothing to it here. */
    external = false,
  ) {
    this.volume = s.volume;
    this.vc = {
      sizeBytes: s.volume.sizeBytes,
      caps: s.volume.caps,
      readOnly: (s.transmissionFlags & P.TFLAG_READ_ONLY) !== 0,
      structuredReplies: s.structuredReplies,
      baseAllocation: s.baseAllocation,
    };
    assert(s.volume.caps.maxPayloadBytes > 0, 'volume maxPayloadBytes must be positive');
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.parser = new RequestParser(
      {
        onRequest: (req) => this.onRequest(req),
        onFramingError: (msg) => this.abort(msg),
        admit: (req) => this.admit(req),
      },
      sharedBufferPool,
    );
    if (external) return;
    const sock = s.socket;
    sock.on('data', this.onData);
    sock.on('drain', this.updateReading);
    sock.on('error', (e: Error) => {
      this.log.debug({ err: e.message }, 'connection error');
      this.markDisconnected();
    });
    sock.on('end', () => this.markDisconnected());
    sock.on('close', () => {
      this.socketClosed = true;
      this.markDisconnected();
      this.releaseHeld();
    });
    for (const c of s.leftover) this.onData(c);
    sock.resume();
  }

  protected readonly onData = (chunk: Buffer): void => {
    this.lastRxMs = Date.now();
    this.bytesReceived += chunk.length;
    if (this.stopping) return; // after DISC or shutdown: discarded
    this.parser.feed(chunk);
  };

  /** Graceful stop: read nothing more, finish in-flight requests, close. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    this.updateReading();
    await this.idle();
    this.endAndLinger();
    await this.closed;
  }

  /** True when nothing is in flight, queued or half-received (an eviction candidate). */
  get isIdle(): boolean {
    return this.inflightRequests === 0 && this.s.socket.writableLength === 0 && !this.parser.midRequest && !this.stopping;
  }

  get lastActivityMs(): number {
    return Math.max(this.lastRxMs, this.lastTxMs);
  }

  /** What the connection is doing, for diagnostics (a slow shutdown says what it waits for). */
  state(): Record<string, number | boolean> {
    return {
      inflightRequests: this.inflightRequests,
      chargedBytes: this.connChargedBytes,
      heldCharges: this.held.size,
      waitingBytes: this.waitingReq?.length ?? 0,
      waitingOnBudget: this.cancelBudgetWait !== undefined,
      readingPaused: this.readingPaused,
      stopping: this.stopping,
      disconnected: this.disconnected,
      socketClosed: this.socketClosed,
      queuedReplyBytes: this.s.socket.writableLength,
      midRequest: this.parser.midRequest,
      msSinceRx: Date.now() - this.lastRxMs,
      bytesReceived: this.bytesReceived,
    };
  }

  /** Checks the timeouts; drops the connection (and says why) when one has passed. */
  sweep(nowMs: number): void {
    if (this.disconnected) return;
    const { stallTimeoutMs, idleTimeoutMs } = this.limits;
    // Progress inside one large write (its callback fires only at the end): the handle's
    // queue shrinks as the kernel takes bytes, so a slow but steady reader is not stalled.
    const queued = handleQueuedBytes(this.s.socket);
    if (queued !== undefined) {
      if (queued < this.lastHandleQueuedBytes) this.lastTxMs = nowMs;
      this.lastHandleQueuedBytes = queued;
    }
    if (stallTimeoutMs > 0) {
      if (this.s.socket.writableLength > 0 && nowMs - this.lastTxMs > stallTimeoutMs) {
        return this.drop(`client read none of its ${this.s.socket.writableLength} queued reply bytes for ${stallTimeoutMs} ms`);
      }
      if (this.parser.midRequest && !this.parser.isBlocked && nowMs - this.lastRxMs > stallTimeoutMs) {
        return this.drop(`client stopped in the middle of a request for ${stallTimeoutMs} ms`);
      }
    }
    if (idleTimeoutMs > 0 && this.isIdle && nowMs - this.lastActivityMs > idleTimeoutMs) {
      return this.drop(`idle for ${idleTimeoutMs} ms`);
    }
  }

  /** Ends the connection now (timeout, eviction): in-flight requests still finish. */
  drop(reason: string): void {
    if (this.disconnected) return;
    this.closeReason = reason;
    this.log.debug({ why: reason }, 'dropping client');
    this.stopping = true;
    this.s.socket.destroy();
    this.markDisconnected();
  }

  protected idle(): Promise<void> {
    if (this.inflightRequests === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  protected markDisconnected(): void {
    if (this.disconnected) return;
    this.disconnected = true;
    this.stopping = true;
    this.parser.kill();
    this.cancelBudgetWait?.();
    this.cancelBudgetWait = undefined;
    this.waitingReq = undefined;
    void this.idle().then(() => {
      // No request of ours is left in the volume; make sure the socket is gone too.
      if (!this.socketClosed) this.s.socket.destroy();
      this.releaseHeld();
      this.resolveClosed();
    });
  }

  /** Ends our side after our last replies; a client that does not close is destroyed after LINGER_MS. */
  protected endAndLinger(): void {
    const sock = this.s.socket;
    if (this.socketClosed) return;
    sock.end();
    const t = setTimeout(() => sock.destroy(), LINGER_MS);
    t.unref();
    sock.once('close', () => clearTimeout(t));
  }

  protected abort(msg: string): void {
    this.limits.observer?.clientError('protocol');
    this.log.warn({ why: msg }, 'protocol violation: disconnecting client');
    this.drop(`protocol violation: ${msg}`);
  }

  // ----------------------------------------------------------------- memory budget

  /**
   * Charges a READ/WRITE before anything is buffered for it. It waits (and we stop
   * reading) while this connection already holds MAX_INFLIGHT_BYTES_PER_CONNECTION, or
   * while the server-wide budget is spent.
   */
  protected admit(req: Request): boolean {
    assert(req.charge === undefined && req.length > 0 && req.length <= P.MAX_PAYLOAD_BYTES);
    assert(this.waitingReq === undefined, 'admit while a request waits');
    if (this.stopping) return true; // onRequest drops it; a WRITE's payload is never read
    if (this.tryAdmit(req)) return true;
    this.waitingReq = req;
    this.updateReading();
    return false;
  }

  protected tryAdmit(req: Request): boolean {
    const bytes = req.length;
    if (this.connChargedBytes > 0 && this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) return false; // our own releases retry
    const budget = this.limits.budget;
    const charge = budget.tryCharge(bytes, this);
    if (charge) {
      this.hold(req, charge);
      return true;
    }
    this.log.debug({ bytes, usedBytes: budget.usedBytes }, 'memory budget spent: waiting');
    this.cancelBudgetWait = budget.wait(bytes, (c) => this.onGranted(req, c), this);
    return false;
  }

  protected onGranted(req: Request, charge: Charge): void {
    this.cancelBudgetWait = undefined;
    if (this.stopping) {
      this.limits.budget.release(charge);
      return;
    }
    this.hold(req, charge);
    this.admitted();
  }

  protected admitted(): void {
    this.waitingReq = undefined;
    this.parser.unblock();
    this.updateReading();
  }

  protected hold(req: Request, charge: Charge): void {
    req.charge = charge;
    this.connChargedBytes += charge.bytes;
    this.held.add(req);
  }

  protected uncharge(req: Request): void {
    this.held.delete(req);
    const charge = req.charge;
    if (charge === undefined) return;
    req.charge = undefined;
    this.limits.budget.release(charge);
    this.connChargedBytes -= charge.bytes;
    assert(this.connChargedBytes >= 0);
    // A request waiting on this connection's own share: retry (on a later tick, as this
    // runs inside request handling).
    const w = this.waitingReq;
    if (w !== undefined && this.cancelBudgetWait === undefined && !this.stopping && !this.retryScheduled) {
      this.retryScheduled = true;
      process.nextTick(() => {
        this.retryScheduled = false;
        if (this.stopping || this.waitingReq !== w || this.cancelBudgetWait !== undefined) return;
        if (this.tryAdmit(w)) this.admitted();
      });
    }
  }

  /** The socket is gone: release the queued replies' and half-received payload's charges. */
  protected releaseHeld(): void {
    if (!this.socketClosed) return;
    for (const req of [...this.held]) this.uncharge(req);
  }

  // ------------------------------------------------------------- flow control

  protected begin(): void {
    this.inflightRequests++;
    this.updateReading();
  }

  protected end(): void {
    this.inflightRequests--;
    this.requestsServed++;
    assert(this.inflightRequests >= 0);
    if (this.inflightRequests === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
    this.updateReading();
  }

  /** Reads from the socket exactly while the invariants above allow it. */
  protected readonly updateReading = (): void => {
    if (this.disconnected) return;
    const sock = this.s.socket;
    const want =
      this.discarding ||
      (!this.stopping &&
        this.waitingReq === undefined &&
        this.inflightRequests < MAX_INFLIGHT_REQUESTS_PER_CONNECTION &&
        sock.writableLength < MAX_QUEUED_REPLY_BYTES_PER_CONNECTION);
    if (want === !this.readingPaused) return;
    this.readingPaused = !want;
    if (want) sock.resume();
    else sock.pause();
  };

  protected readonly uncork = (): void => {
    this.corked = false;
    this.s.socket.uncork();
    this.updateReading();
  };

  /**
   * Queues one reply. Replies made in the same tick go out corked in one writev; with a
   * single request in flight there is nothing to batch, so it is written at once.
   * `onTaken` runs once the socket has handed the bytes to the kernel, or failed.
   */
  protected send(b: Buffer, onTaken?: () => void): void {
    if (this.disconnected) {
      onTaken?.();
      return;
    }
    const sock = this.s.socket;
    if (sock.writableLength === 0) this.lastTxMs = Date.now();
    if (!this.corked && this.inflightRequests > 1) {
      this.corked = true;
      sock.cork();
      process.nextTick(this.uncork);
    }
    sock.write(b, () => {
      this.lastTxMs = Date.now();
      onTaken?.();
      if (this.readingPaused) this.updateReading();
    });
    this.updateReading();
  }

  /** Reports a reply to the observer: its error (0: none) and what caused it. */
  protected observe(req: Request, error: number, cause?: unknown): void {
    const o = this.limits.observer;
    if (o) o.request(req.type, req.length, error === 0 ? undefined : errorKind(error, cause), performance.now() - req.headerMs);
  }

  protected replySimple(req: Request, error: number, cause?: unknown): void {
    this.observe(req, error, cause);
    this.send(encodeSimpleReply(error, req.cookieHi, req.cookieLo));
  }

  protected replyError(req: Request, error: number, message: string, cause?: unknown): void {
    if (this.s.structuredReplies && (req.type === P.CMD_READ || req.type === P.CMD_BLOCK_STATUS)) {
      this.observe(req, error, cause);
      this.send(encodeStructuredError(req.cookieHi, req.cookieLo, error, message));
    } else {
      this.replySimple(req, error, cause);
    }
  }

  // ---------------------------------------------------------------- requests

  protected onRequest(req: Request): void {
    // From here the request's charge belongs to its operation, not to the connection.
    this.held.delete(req);
    if (this.stopping) return this.dropPayload(req);
    if (req.type === P.CMD_DISC) {
      this.log.debug('client sent DISC');
      this.stopping = true;
      this.discarding = true;
      this.updateReading();
      void this.idle().then(() => this.endAndLinger());
      return;
    }
    const bad = validateRequest(req, this.vc);
    if (bad !== 0) {
      this.dropPayload(req);
      this.replyError(req, bad, 'invalid request');
      return;
    }
    const fua = (req.flags & P.CMD_FLAG_FUA) !== 0;
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
        void this.doSimple(req, this.volume.trim(req.offset, req.length, fua), 'trim');
        return;
      case P.CMD_WRITE_ZEROES:
        if (req.length === 0) return this.replySimple(req, 0);
        void this.doSimple(
          req,
          this.volume.zero(req.offset, req.length, {
            noHole: (req.flags & P.CMD_FLAG_NO_HOLE) !== 0,
            fastZero: (req.flags & P.CMD_FLAG_FAST_ZERO) !== 0,
            fua,
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

  protected dropPayload(req: Request): void {
    if (req.pooled) sharedBufferPool.release(req.pooled);
    req.pooled = undefined;
    req.payload = undefined;
    this.uncharge(req);
  }

  protected async doRead(req: Request): Promise<void> {
    const len = req.length;
    const hdr = this.s.structuredReplies ? P.STRUCTURED_REPLY_HEADER_BYTES + 8 : P.SIMPLE_REPLY_HEADER_BYTES;
    let pooled = BufferPool.pooled(hdr + len) ? sharedBufferPool.take(hdr + len) : undefined;
    let sent = false;
    this.begin();
    try {
      const b = pooled ? pooled.subarray(0, hdr + len) : Buffer.allocUnsafe(hdr + len);
      await this.readPieces(req.offset, b.subarray(hdr));
      if (this.s.structuredReplies) {
        writeStructuredHeader(b, 0, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + len);
        writeU64(b, req.offset, P.STRUCTURED_REPLY_HEADER_BYTES);
      } else {
        encodeSimpleReply(0, req.cookieHi, req.cookieLo, b);
      }
      // The reply's charge now waits on the socket: held by the connection.
      this.held.add(req);
      const owned = pooled;
      pooled = undefined;
      sent = true;
      this.observe(req, 0);
      this.send(b, () => {
        if (owned) sharedBufferPool.release(owned);
        this.uncharge(req);
      });
    } catch (e) {
      this.replyError(req, toNbdError(e, this.log, `read ${len}@${req.offset}`), 'read failed', e);
    } finally {
      if (pooled) sharedBufferPool.release(pooled);
      if (!sent) this.uncharge(req);
      this.end();
    }
  }

  protected async doWrite(req: Request): Promise<void> {
    const data = req.payload;
    const len = req.length;
    this.begin();
    try {
      if (data === undefined || data.length !== len) throw new Error('internal: write without its payload');
      await this.writePieces(req.offset, data, (req.flags & P.CMD_FLAG_FUA) !== 0);
      this.replySimple(req, 0);
    } catch (e) {
      this.replySimple(req, toNbdError(e, this.log, `write ${len}@${req.offset}`), e);
    } finally {
      // The volume keeps no reference to the payload once its write settled.
      this.dropPayload(req);
      this.end();
    }
  }

  /**
   * The volume takes at most caps.maxPayloadBytes per call; a larger request (we accept
   * up to MAX_PAYLOAD_BYTES) goes to it in consecutive pieces. NBD promises no atomicity
   * for a write, so this is only visible as several backend calls.
   */
  protected async readPieces(offset: number, dst: Buffer): Promise<void> {
    const piece = this.volume.caps.maxPayloadBytes;
    for (let done = 0; done < dst.length; done += piece) {
      const n = Math.min(piece, dst.length - done);
      await this.volume.read(offset + done, n, dst.subarray(done, done + n));
    }
  }

  protected async writePieces(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const piece = this.volume.caps.maxPayloadBytes;
    for (let done = 0; done < data.length; done += piece) {
      const n = Math.min(piece, data.length - done);
      await this.volume.write(offset + done, data.subarray(done, done + n), fua);
    }
  }

  /** A request with no payload either way: reply once `op` settles. */
  protected async doSimple(req: Request, op: Promise<void>, what: string): Promise<void> {
    this.begin();
    try {
      await op;
      this.replySimple(req, 0);
    } catch (e) {
      this.replySimple(req, toNbdError(e, this.log, `${what} ${req.length}@${req.offset}`), e);
    } finally {
      this.end();
    }
  }

  protected async doBlockStatus(req: Request): Promise<void> {
    this.begin();
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
      this.observe(req, 0);
      this.send(encodeBlockStatus(req.cookieHi, req.cookieLo, P.META_CONTEXT_BASE_ALLOCATION_ID, out));
    } catch (e) {
      this.replyError(req, toNbdError(e, this.log, `block status ${req.length}@${req.offset}`), 'block status failed', e);
    } finally {
      this.end();
    }
  }
}
