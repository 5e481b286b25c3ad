/**
 * The transmission phase of a plain TCP/Unix connection with its socket I/O on a native
 * thread (native/nbd_serve.cc): the thread reads request headers, receives each WRITE
 * payload straight into a receive buffer granted here in advance, and hands us batches
 * of requests (one callback per batch); replies go out with writev. Everything else
 * (validation, the volume, replies, errors, metrics, the budget and limits) is the same
 * code as the stream path: this class is a Transmission whose socket side is native.
 * For a volume with a direct-write fd (the file volume, Volume.directWriteFd) the thread
 * also writes each plain WRITE inside the volume itself (pwrite) and answers it, and for
 * one with a native store (the memory volume, Volume.directWriteStore) it copies each
 * plain WRITE whose chunks all hold data already straight into them; TypeScript
 * is told afterwards (DONE events: metrics, request counts). With either, the thread also
 * answers each plain READ inside the volume itself when a granted buffer fits it: read
 * from the page cache (preadv2 RWF_NOWAIT) or copied out of the chunks into that buffer,
 * which goes out as the reply's data (simple or structured, as negotiated) and is granted
 * again once sent. A READ it could have served but for a buffer comes here marked, and is
 * answered here; a buffer of its size is then granted (offerReadBuffer) within the same
 * KEPT limits as a settled WRITE's. For an engine volume whose appender serves FLUSH
 * (no replica), the thread answers a plain FLUSH itself after fdatasync of the NVRAM
 * file (Volume.directFlushFailed hears of a failure). FUA, errors, a READ that would
 * block, and every other command take the shared path.
 * TLS connections and kernel (attach) sockets keep the stream path. NVMIRROR_NBD_NATIVE=0
 * (or NbdServerOptions.nativeTransmission: false) forces the stream path everywhere.
 *
 * Limits: the ones of transmission.ts (limits.ts), plus RECEIVE_BUFFERS_KEPT_MAX and
 * RECEIVE_BUFFER_BYTES_KEPT_MAX (receive buffers a connection keeps granted between writes).
 *
 * Invariants:
 * - A receive buffer is charged to the server-wide budget before it is granted, and its
 *   charge counts in connChargedBytes while granted, while its WRITE is in the volume,
 *   and until it is released (or granted again). So every payload byte the thread
 *   receives is in budgeted memory, and a connection's charges stay within
 *   MAX_INFLIGHT_BYTES_PER_CONNECTION (a first charge always fits).
 * - A buffer is referenced here (bank) from its grant until the thread reports its WRITE
 *   or gives it back (revoke, or the thread ended): the thread never writes into memory
 *   the garbage collector could free. A buffer the thread is using for a direct READ
 *   stays in the bank (it is not revocable until the thread granted it to itself again). A WRITE reported with a buffer must match it
 *   (granted, large enough), else the connection is dropped as an internal error.
 * - Receive buffers are kept granted only while nobody waits on the budget and within the
 *   two KEPT limits; an idle connection's (or, while others wait, any connection's)
 *   unclaimed buffers are taken back by the sweep.
 * - READ charges are taken in arrival order before the request runs; while one waits, the
 *   READs and a DISC after it wait behind it (in order, bounded by the thread's in-flight
 *   cap) and no receive buffer is granted; requests that hold their charge (a received
 *   WRITE) or need none run at once, so a waiting READ never waits on a request behind it.
 * - Reply buffers stay referenced here until the kernel has taken them or the thread has
 *   ended (then their onTaken runs, as the stream path does when its socket closes).
 * - `closed` resolves once the thread has ended (fd closed) and every request in the volume
 *   has finished; then the Node socket (which still holds the other fd) is destroyed.
 */
import type { Logger } from '../util/log';
import { addon } from '../io/native';
import { assert } from '../util/assert';
import type { Charge } from './budget';
import { BufferPool, sharedBufferPool } from './buffer-pool';
import { allocAligned } from '../io/aligned';
import {
  LINGER_MS,
  MAX_INFLIGHT_BYTES_PER_CONNECTION,
  MAX_INFLIGHT_REQUESTS_PER_CONNECTION,
  MAX_QUEUED_REPLY_BYTES_PER_CONNECTION,
  SMALL_CHARGE_BYTES_MAX,
} from './limits';
import * as P from './protocol';
import { Transmission, TransmissionLimits, TransmissionSession } from './transmission';
import type { Request } from './wire';

/** Receive buffers a connection keeps granted between writes (a QD32 4 KiB writer needs 32)... */
export const RECEIVE_BUFFERS_KEPT_MAX = 64;
/** ...and their bytes: beyond this, a settled WRITE's buffer goes back to the budget. */
export const RECEIVE_BUFFER_BYTES_KEPT_MAX = 8 * 1024 * 1024;
/** Unparsed bytes the thread takes over from the handshake (more: the stream path serves it). */
const LEFTOVER_BYTES_MAX = 64 * 1024;
/** A connection with no traffic this long gives its unclaimed receive buffers back. */
const RECEIVE_BUFFERS_IDLE_MS = 1_000;
/** Replies gathered in one tick go out in one writev of at most this many buffers. */
const REPLIES_PER_SEND_MAX = 64;
/** Receive buffers handed to the thread in one call at most. */
const GRANTS_PER_CALL_MAX = 64;

assert(RECEIVE_BUFFER_BYTES_KEPT_MAX < MAX_INFLIGHT_BYTES_PER_CONNECTION, 'kept buffers leave room for a maximal request');

// Event layout (native/nbd_serve.cc).
const EV_REQUEST = 1;
const EV_NEED = 2;
const EV_TAKEN = 3;
const EV_FRAMING = 4;
const EV_EOF = 5;
const EV_CLOSED = 6;
const EV_DONE = 7;
const EV_HELD = 8;
/** A REQUEST's buffer id for a plain READ the thread would have served with a buffer that fit. */
const WANTS_BUFFER = -2;
/** nbdServeDirect / nbdServeDirectMemory modes. */
const MODE_WRITES = 1;
const MODE_READS = 2;
const MODE_STRUCTURED = 4;

interface NativeState {
  queuedBytes: number;
  midRequest: boolean;
  wantsInput: boolean;
  needPending: boolean;
  lastRxMs: number;
  lastTxMs: number;
  inflight: number;
  granted: number;
  bytesReceived: number;
  closed: boolean;
  directWrites: number;
  directReads: number;
  /** FLUSHes the thread made durable itself (an engine's NVRAM file) or answered EIO. */
  directFlushes: number;
  /** WRITEs the thread appended whose replies wait for the replica (a sync mirror), and all it ever held. */
  heldReplies: number;
  heldWrites: number;
  /** READs out on the native read pool (cold blocks of an engine volume) and FLUSHes on the appender's flusher. */
  poolJobs: number;
}

type Handle = object;

interface ServeAddon {
  nbdServeBusyPoll(us: number): void;
  nbdServeBusyPollPause(paused: boolean): void;
  nbdServeBusyPollStats(): [number, number, number];
  nbdServeStart(fd: number, leftover: Buffer, maxPayloadBytes: number, maxInflight: number, maxQueuedBytes: number, onEvents: (ev: Float64Array) => void): Handle;
  nbdServeGrant(h: Handle, ids: number[], bufs: Buffer[]): void;
  nbdServeRevoke(h: Handle): number[];
  nbdServeSend(h: Handle, bufs: Buffer[], seq: number, replies: number): number;
  nbdServeSetReading(h: Handle, on: boolean): void;
  nbdServeDirect(h: Handle, fd: number, sizeBytes: number, modes: number): void;
  nbdServeDirectMemory(h: Handle, store: object, modes: number): void;
  nbdServeDirectEngine(h: Handle, map: object | null, appender: object | null, modes: number): void;
  nbdServeEnd(h: Handle): void;
  nbdServeAbort(h: Handle): void;
  nbdServeState(h: Handle): NativeState;
  readonly nbdServeEventWidth: number;
}

function serveAddon(): ServeAddon {
  return addon() as unknown as ServeAddon;
}

/** A receive buffer granted to the thread: its memory and its budget charge. */
interface Grant {
  buf: Buffer;
  pooled: Buffer | undefined;
  charge: Charge;
}

interface PendingSend {
  seq: number;
  bufs: Buffer[];
  onTaken: Array<(() => void) | undefined>;
}

/**
 * The busy-poll window of the NBD connection threads, in microseconds (0: never spin;
 * native/busy_poll.h has the rules). A thread that waits for its client's next request
 * polls without sleeping this long first, while requests keep coming that soon (a client
 * at queue depth 1): a sleep and wakeup across CPUs cost 25-30 us a request in this VM,
 * more than the request itself. fio 4k randwrite QD1 on `serve
 * --memory`: 14.7-16.2K IOPS without it, 27.8-33.9K with 30 us, nbdkit memory 21.6-23.0K
 * (docs/benchmarks.md, "Busy-poll at low queue depth"). Process-wide; the addon starts
 * with this value too.
 */
export const BUSY_POLL_US_DEFAULT = 30;
export const BUSY_POLL_US_MAX = 1000;

/** Sets the busy-poll window of every native connection thread of this process (see BUSY_POLL_US_DEFAULT). */
export function setBusyPoll(us: number): void {
  assert(Number.isInteger(us) && us >= 0 && us <= BUSY_POLL_US_MAX, `busy-poll window ${us} us`);
  serveAddon().nbdServeBusyPoll(us);
}

/**
 * While paused no connection thread spins (the window is kept): the CLI pauses it while a
 * CP runs (src/cli/priority.ts).
 */
export function pauseBusyPoll(paused: boolean): void {
  serveAddon().nbdServeBusyPollPause(paused);
}

/** The process's busy-poll totals: windows spun, those that ended in a request (or a wake), microseconds spun. */
export function busyPollStats(): { windows: number; hits: number; spunUs: number } {
  const [windows, hits, spunUs] = serveAddon().nbdServeBusyPollStats();
  return { windows, hits, spunUs };
}

/** Whether the native path is on unless told otherwise (NVMIRROR_NBD_NATIVE=0 turns it off). */
export function nativeTransmissionDefault(): boolean {
  return process.env.NVMIRROR_NBD_NATIVE !== '0';
}

/** The fd under a plain net.Socket (TCP or Unix), or undefined (TLS, other streams). */
function plainSocketFd(sock: TransmissionSession['socket']): number | undefined {
  const h = (sock as unknown as { _handle?: { fd?: unknown; readStop?: () => number } | null; encrypted?: boolean })._handle;
  if ((sock as { encrypted?: boolean }).encrypted === true) return undefined;
  const fd = h?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : undefined;
}

export class NativeTransmission extends Transmission {
  private readonly handle: Handle;
  private readonly width: number;
  private readonly bank = new Map<number, Grant>();
  private bankBytes = 0;
  private nextGrantId = 1;
  /** Grants not yet handed to the thread (see grant()); their buffers are in the bank already. */
  private grantIds: number[] = [];
  private grantBufs: Buffer[] = [];
  /** The receive buffer behind each WRITE reported with one, until the write settled. */
  private readonly grantOf = new Map<Request, Grant>();
  /** A WRITE header waits for a buffer of this many bytes (one NEED at a time). */
  private needBytes: number | undefined;
  private cancelNeedWait: (() => void) | undefined;
  /** Requests waiting, in order, behind a READ whose charge waits. */
  private readonly backlog: Request[] = [];
  private cancelReadWait: (() => void) | undefined;
  private kickScheduled = false;
  private sendSeq = 0;
  private readonly pendingSends: PendingSend[] = [];
  private corkBufs: Buffer[] = [];
  private corkTaken: Array<(() => void) | undefined> = [];
  private nativeReading = true;
  private threadEnded = false;
  private resolveThreadEnded!: () => void;
  private readonly threadEndedP: Promise<void>;
  private lingerTimer: NodeJS.Timeout | undefined;
  /** Bytes the thread took over from the handshake (counted as received, as the stream path does). */
  private readonly leftoverBytes: number;
  /** The thread appends plain WRITEs to an engine's NVRAM log (Volume.directAppender). */
  private appending = false;
  /** The thread copies plain WRITEs into a memory volume's chunks (Volume.directWriteStore). */
  private memoryStore = false;

  /**
   * The native path for this session, or undefined when it does not apply (TLS, not a
   * plain socket, more handshake leftover than the thread takes over).
   */
  static tryStart(s: TransmissionSession, log: Logger, limits: TransmissionLimits): NativeTransmission | undefined {
    const fd = plainSocketFd(s.socket);
    if (fd === undefined) return undefined;
    const sock = s.socket as unknown as { _handle: { readStop(): number; reading?: boolean }; read(): Buffer | null; readableLength: number };
    // Node may hold input it read before the handshake paused the socket: take it over.
    sock._handle.readStop();
    const extra: Buffer[] = [];
    for (let c = sock.read(); c !== null; c = sock.read()) extra.push(c);
    sock._handle.readStop();
    sock._handle.reading = false;
    const leftover = Buffer.concat([...s.leftover, ...extra]);
    if (leftover.length > LEFTOVER_BYTES_MAX) {
      log.debug({ bytes: leftover.length }, 'too much input after the handshake for the native path: stream path');
      return undefined;
    }
    return new NativeTransmission({ ...s, leftover: [] }, log, limits, fd, leftover);
  }

  private constructor(s: TransmissionSession, log: Logger, limits: TransmissionLimits, fd: number, leftover: Buffer) {
    super(s, log, limits, true);
    const a = serveAddon();
    this.width = a.nbdServeEventWidth;
    this.threadEndedP = new Promise((r) => (this.resolveThreadEnded = r));
    this.leftoverBytes = leftover.length;
    this.handle = a.nbdServeStart(fd, leftover, P.MAX_PAYLOAD_BYTES, MAX_INFLIGHT_REQUESTS_PER_CONNECTION, MAX_QUEUED_REPLY_BYTES_PER_CONNECTION, (ev) => this.onEvents(ev));
    // A file volume: the thread writes plain WRITEs (unless the export is read-only) and
    // reads plain READs itself (see Volume.directWriteFd); a memory volume: plain WRITEs
    // into chunks that hold data already, READs out of them (Volume.directWriteStore); an
    // engine volume on one member file: READs of blocks its map holds (Volume.directReadMap);
    // an engine volume: plain WRITEs of whole blocks appended to its NVRAM log (Volume.directAppender).
    const modes = (this.vc.readOnly ? 0 : MODE_WRITES) | MODE_READS | (s.structuredReplies ? MODE_STRUCTURED : 0);
    const direct = s.volume.directWriteFd?.();
    const store = direct === undefined ? s.volume.directWriteStore?.() : undefined;
    const map = direct === undefined && store === undefined ? s.volume.directReadMap?.() : undefined;
    const appender = direct === undefined && store === undefined && !this.vc.readOnly ? s.volume.directAppender?.() : undefined;
    if (direct !== undefined) a.nbdServeDirect(this.handle, direct, s.volume.sizeBytes, modes);
    else if (store !== undefined) {
      a.nbdServeDirectMemory(this.handle, store, modes);
      this.memoryStore = true;
    }
    else if (map !== undefined || appender !== undefined) {
      a.nbdServeDirectEngine(this.handle, map ?? null, appender ?? null, appender !== undefined ? modes : modes & ~MODE_WRITES);
      this.appending = appender !== undefined;
    }
  }

  // ------------------------------------------------------------------ events

  private onEvents(ev: Float64Array): void {
    const w = this.width;
    assert(ev.length % w === 0, 'native events come in whole records');
    let wrote = false;
    for (let i = 0; i < ev.length; i += w) {
      const kind = ev[i];
      if ((kind === EV_DONE && ev[i + 3] === P.CMD_WRITE) || kind === EV_HELD) wrote = true;
      if (kind === EV_REQUEST) this.onNativeRequest(ev, i);
      else if (kind === EV_NEED) this.onNeed(ev[i + 1] as number);
      else if (kind === EV_TAKEN) this.onTaken(ev[i + 1] as number);
      else if (kind === EV_FRAMING) this.abort(`bad request magic 0x${(ev[i + 1] as number).toString(16)}`);
      else if (kind === EV_EOF) this.markDisconnected();
      else if (kind === EV_CLOSED) this.onThreadEnded(ev[i + 1] as number, ev[i + 2] as number);
      else if (kind === EV_DONE) this.onDirect(ev[i + 1] as number, ev[i + 2] as number, ev[i + 3] as number, ev[i + 4] as number, ev[i + 5] as number);
      else if (kind === EV_HELD) continue; // appended; its reply waits for the replica (a DONE follows)
      else throw new Error(`internal: unknown native event ${kind}`);
    }
    // An engine's WRITEs appended by the thread: the log indexes them now, not at its next
    // look; a memory volume adopts the spare chunks they took and hands out more.
    if (wrote && (this.appending || this.memoryStore)) this.s.volume.directWritesDone?.();
  }

  private onNativeRequest(ev: Float64Array, i: number): void {
    const offHi = ev[i + 5] as number;
    const req: Request = {
      flags: ev[i + 1] as number,
      type: ev[i + 2] as number,
      cookieHi: ev[i + 3] as number,
      cookieLo: ev[i + 4] as number,
      // As readU64: a value beyond 2^53 is Infinity, which fails every range check.
      offset: offHi >= 0x200000 ? Number.POSITIVE_INFINITY : offHi * 2 ** 32 + (ev[i + 6] as number),
      length: ev[i + 7] as number,
      payload: undefined,
      pooled: undefined,
      charge: undefined,
      headerMs: performance.now(),
    };
    this.lastRxMs = Date.now();
    const id = ev[i + 8] as number;
    const wantsBuffer = id === WANTS_BUFFER && req.type === P.CMD_READ;
    const withPayload = req.type === P.CMD_WRITE && req.length > 0 && req.length <= P.MAX_PAYLOAD_BYTES;
    if (withPayload) {
      const g = id >= 0 ? this.bank.get(id) : undefined;
      if (g === undefined || g.buf.length < req.length) {
        this.log.error({ id, length: req.length }, 'internal: native WRITE without a matching receive buffer');
        this.drop('internal error: a WRITE payload without its receive buffer');
        return;
      }
      this.bank.delete(id);
      this.bankBytes -= g.charge.bytes;
      req.payload = g.buf.subarray(0, req.length);
      req.charge = g.charge;
      this.grantOf.set(req, g);
      this.held.add(req);
    } else if (id !== -1 && !wantsBuffer) {
      this.drop('internal error: a receive buffer reported for a request without payload');
      return;
    }
    if (wantsBuffer) this.offerReadBuffer(req.length);
    // Behind a waiting READ wait the READs after it and DISC (which must see every request
    // before it answered); the rest runs now: it holds its charge already or needs none, and
    // must not wait on a READ that may wait on this very connection's charges.
    if (this.backlog.length > 0 && (this.needsCharge(req) || req.type === P.CMD_DISC)) {
      this.backlog.push(req);
      return;
    }
    if (this.needsCharge(req) && !this.tryChargeRead(req)) {
      this.backlog.push(req);
      return;
    }
    this.onRequest(req);
  }

  /**
   * A plain WRITE, READ or FLUSH, or a FUA WRITE, the thread served and answered itself
   * (errno: a held WRITE failed, or the fdatasync of a FLUSH's or a FUA WRITE's flush round
   * failed with sysErrno; either answered EIO): count and report it. A failed flush round
   * fails the volume's log.
   */
  private onDirect(length: number, durationUs: number, type: number, errno: number, sysErrno: number): void {
    assert(type === P.CMD_WRITE || type === P.CMD_READ || type === P.CMD_FLUSH, `native DONE for command ${type}`);
    if (errno !== 0 && (type === P.CMD_FLUSH || sysErrno > 0)) this.s.volume.directFlushFailed?.(sysErrno);
    this.requestsServed++;
    this.lastRxMs = this.lastTxMs = Date.now();
    this.limits.observer?.request(type, length, errno === 0 ? undefined : 'EIO', durationUs / 1000);
  }

  /**
   * A plain READ the thread would have served but no granted buffer fit: grant one of its
   * size for the next such READ, charged now, within the limits a settled WRITE's buffer is
   * kept under (and never while anyone waits on the budget).
   */
  private offerReadBuffer(bytes: number): void {
    if (this.stopping || this.backlog.length > 0 || this.cancelNeedWait !== undefined || this.limits.budget.waiting > 0) return;
    if (!(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= SMALL_CHARGE_BYTES_MAX * 4)) return;
    if (this.bank.size >= RECEIVE_BUFFERS_KEPT_MAX || this.bankBytes + bytes > RECEIVE_BUFFER_BYTES_KEPT_MAX) return;
    if (this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) return;
    const c = this.limits.budget.tryCharge(bytes, this);
    if (c) this.grant(c, undefined, true);
  }

  private needsCharge(req: Request): boolean {
    return req.type === P.CMD_READ && req.length > 0 && req.length <= P.MAX_PAYLOAD_BYTES && !this.stopping && req.charge === undefined;
  }

  private tryChargeRead(req: Request): boolean {
    if (this.cancelReadWait !== undefined) return false;
    const bytes = req.length;
    if (this.connChargedBytes > 0 && this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) {
      this.giveBackBuffers();
      if (this.connChargedBytes > 0 && this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) return false; // our releases kick
    }
    const budget = this.limits.budget;
    const c = budget.tryCharge(bytes, this);
    if (c) {
      this.hold(req, c);
      return true;
    }
    this.giveBackBuffers();
    this.cancelReadWait = budget.wait(bytes, (granted) => {
      this.cancelReadWait = undefined;
      if (this.stopping) {
        budget.release(granted);
        this.kick();
        return;
      }
      this.hold(req, granted);
      const head = this.backlog.shift();
      assert(head === req, 'the READ granted is the head of the backlog');
      this.onRequest(req);
      this.kick();
    }, this);
    return false;
  }

  /** Runs the backlog (and a pending NEED) as far as charges allow; on a later tick. */
  private kick(): void {
    if (this.kickScheduled || (this.backlog.length === 0 && this.needBytes === undefined)) return;
    this.kickScheduled = true;
    process.nextTick(() => {
      this.kickScheduled = false;
      while (this.backlog.length > 0 && this.cancelReadWait === undefined) {
        const req = this.backlog[0] as Request;
        if (this.needsCharge(req) && !this.tryChargeRead(req)) break;
        this.backlog.shift();
        this.onRequest(req);
      }
      if (this.needBytes !== undefined && this.cancelNeedWait === undefined) this.tryGrantNeed();
      this.updateReading();
    });
  }

  // ------------------------------------------------------- receive buffers

  private onNeed(bytes: number): void {
    assert(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= P.MAX_PAYLOAD_BYTES, `native NEED of ${bytes} bytes`);
    if (this.stopping) return;
    // The thread asks again only once a buffer was granted; a NEED for another size
    // replaces the one still waiting (a recycled buffer may have served that WRITE).
    this.cancelNeedWait?.();
    this.cancelNeedWait = undefined;
    this.needBytes = bytes;
    this.tryGrantNeed();
  }

  private tryGrantNeed(): void {
    const bytes = this.needBytes;
    // A READ waiting for its charge goes first (kick() retries this after it).
    if (bytes === undefined || this.stopping || this.cancelNeedWait !== undefined || this.backlog.length > 0) return;
    // Buffers of settled WRITEs waiting for this tick's end may be what the thread needs.
    this.flushGrants();
    // Unclaimed buffers are given back only when they stand in the way of this charge.
    if (this.connChargedBytes > 0 && this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) {
      this.giveBackBuffers();
      if (this.connChargedBytes > 0 && this.connChargedBytes + bytes > MAX_INFLIGHT_BYTES_PER_CONNECTION) return; // our releases kick
    }
    const budget = this.limits.budget;
    let c = budget.tryCharge(bytes, this);
    if (!c && this.bank.size > 0) {
      this.giveBackBuffers();
      c = budget.tryCharge(bytes, this);
    }
    if (c) {
      this.needBytes = undefined;
      this.grant(c);
      return;
    }
    this.cancelNeedWait = budget.wait(bytes, (granted) => {
      this.cancelNeedWait = undefined;
      if (this.stopping) {
        budget.release(granted);
        return;
      }
      this.needBytes = undefined;
      this.grant(granted);
    }, this);
  }

  /**
   * Grants a receive buffer. A NEED's goes to the thread at once (it waits for it); a
   * settled WRITE's buffer granted again, and a READ's offered one, go with the others of
   * this tick, in one call.
   */
  private grant(charge: Charge, reuse?: Grant, batched = reuse !== undefined): void {
    const bytes = charge.bytes;
    let g = reuse;
    if (g === undefined) {
      const pooled = BufferPool.pooled(bytes) ? sharedBufferPool.take(bytes) : undefined;
      g = { buf: pooled ? pooled.subarray(0, bytes) : allocAligned(bytes), pooled, charge };
    } else {
      this.connChargedBytes -= bytes; // counted again below
    }
    const id = this.nextGrantId++;
    this.bank.set(id, g);
    this.bankBytes += bytes;
    this.connChargedBytes += bytes;
    this.grantIds.push(id);
    this.grantBufs.push(g.buf);
    if (!batched || this.grantIds.length >= GRANTS_PER_CALL_MAX) this.flushGrants();
    else if (this.grantIds.length === 1) process.nextTick(this.flushGrants);
  }

  private readonly flushGrants = (): void => {
    if (this.grantIds.length === 0 || this.threadEnded) return;
    const ids = this.grantIds;
    const bufs = this.grantBufs;
    this.grantIds = [];
    this.grantBufs = [];
    serveAddon().nbdServeGrant(this.handle, ids, bufs);
  };

  /** A settled (or refused) WRITE's buffer: granted again while that is cheap, else released. */
  private recycle(g: Grant): void {
    const bytes = g.charge.bytes;
    const keep =
      !this.stopping &&
      this.limits.budget.waiting === 0 &&
      this.bank.size < RECEIVE_BUFFERS_KEPT_MAX &&
      this.bankBytes + bytes <= RECEIVE_BUFFER_BYTES_KEPT_MAX &&
      bytes <= SMALL_CHARGE_BYTES_MAX * 4;
    if (keep) {
      this.grant(g.charge, g);
    } else {
      this.releaseGrant(g);
    }
    this.kick();
  }

  private releaseGrant(g: Grant): void {
    this.connChargedBytes -= g.charge.bytes;
    assert(this.connChargedBytes >= 0);
    this.limits.budget.release(g.charge);
    if (g.pooled) sharedBufferPool.release(g.pooled);
  }

  /** Takes back every unclaimed receive buffer (the thread never claims a revoked one). */
  private giveBackBuffers(): void {
    if (this.bank.size === 0 || this.threadEnded) return;
    this.flushGrants();
    for (const id of serveAddon().nbdServeRevoke(this.handle)) {
      const g = this.bank.get(id);
      assert(g !== undefined, `native revoked buffer ${id} it was not granted`);
      this.bank.delete(id);
      this.bankBytes -= g.charge.bytes;
      this.releaseGrant(g);
    }
  }

  // --------------------------------------------------- the stream path's hooks

  protected override dropPayload(req: Request): void {
    const g = this.grantOf.get(req);
    if (g === undefined) {
      super.dropPayload(req);
      this.kick();
      return;
    }
    this.grantOf.delete(req);
    this.held.delete(req);
    assert(req.charge === g.charge, 'a WRITE carries its buffer charge');
    req.charge = undefined;
    req.payload = undefined;
    this.recycle(g);
  }

  protected override uncharge(req: Request): void {
    super.uncharge(req);
    this.kick();
  }

  protected override send(b: Buffer, onTaken?: () => void): void {
    if (this.disconnected) {
      onTaken?.();
      return;
    }
    if (this.inflightRequests > 1) {
      // Replies made in this tick go out together in one writev.
      if (this.corkBufs.length === 0) process.nextTick(this.uncork);
      this.corkBufs.push(b);
      this.corkTaken.push(onTaken);
      if (this.corkBufs.length >= REPLIES_PER_SEND_MAX) this.flushCork();
      return;
    }
    this.sendNow([b], [onTaken]);
  }

  protected override readonly uncork = (): void => {
    this.flushCork();
  };

  private flushCork(): void {
    if (this.corkBufs.length === 0) return;
    const bufs = this.corkBufs;
    const taken = this.corkTaken;
    this.corkBufs = [];
    this.corkTaken = [];
    if (this.disconnected) {
      for (const f of taken) f?.();
      return;
    }
    this.sendNow(bufs, taken);
  }

  private sendNow(bufs: Buffer[], onTaken: Array<(() => void) | undefined>): void {
    const seq = ++this.sendSeq;
    const r = serveAddon().nbdServeSend(this.handle, bufs, seq, bufs.length);
    if (r === 0) {
      this.pendingSends.push({ seq, bufs, onTaken });
    } else {
      this.lastTxMs = Date.now();
      for (const f of onTaken) f?.();
    }
  }

  private onTaken(seq: number): void {
    this.lastTxMs = Date.now();
    while (this.pendingSends.length > 0 && (this.pendingSends[0] as PendingSend).seq <= seq) {
      const p = this.pendingSends.shift() as PendingSend;
      for (const f of p.onTaken) f?.();
    }
  }

  protected override readonly updateReading = (): void => {
    if (this.disconnected || this.threadEnded) return;
    // Unlike the stream path, reading goes on while a READ waits for its charge: a payload
    // being received (charged already) completes, and the thread stops by itself at the
    // next WRITE header (no buffer granted meanwhile) or at its in-flight cap.
    const want = this.discarding || !this.stopping;
    if (want === this.nativeReading) return;
    this.nativeReading = want;
    serveAddon().nbdServeSetReading(this.handle, want);
  };

  private nativeState(): NativeState | undefined {
    return this.threadEnded ? undefined : serveAddon().nbdServeState(this.handle);
  }

  override get isIdle(): boolean {
    const st = this.nativeState();
    return this.inflightRequests === 0 && st !== undefined && st.queuedBytes === 0 && st.heldReplies === 0 && st.poolJobs === 0 && !st.midRequest && !this.stopping && this.backlog.length === 0;
  }

  override get lastActivityMs(): number {
    const st = this.nativeState();
    return Math.max(this.lastRxMs, this.lastTxMs, st?.lastRxMs ?? 0, st?.lastTxMs ?? 0);
  }

  override state(): Record<string, number | boolean> {
    const st = this.nativeState();
    return {
      native: true,
      inflightRequests: this.inflightRequests,
      chargedBytes: this.connChargedBytes,
      heldCharges: this.held.size,
      receiveBuffers: this.bank.size,
      backlog: this.backlog.length,
      waitingOnBudget: this.cancelReadWait !== undefined || this.cancelNeedWait !== undefined,
      stopping: this.stopping,
      disconnected: this.disconnected,
      threadEnded: this.threadEnded,
      queuedReplyBytes: st?.queuedBytes ?? 0,
      midRequest: st?.midRequest ?? false,
      msSinceRx: Date.now() - (st?.lastRxMs ?? this.lastRxMs),
      bytesReceived: st !== undefined ? st.bytesReceived + this.leftoverBytes : this.bytesReceived,
      directWrites: st?.directWrites ?? 0,
      directReads: st?.directReads ?? 0,
      directFlushes: st?.directFlushes ?? 0,
      heldReplies: st?.heldReplies ?? 0,
      heldWrites: st?.heldWrites ?? 0,
      poolJobs: st?.poolJobs ?? 0,
    };
  }

  override sweep(nowMs: number): void {
    if (this.disconnected) return;
    const st = this.nativeState();
    if (st === undefined) return;
    const { stallTimeoutMs, idleTimeoutMs } = this.limits;
    if (stallTimeoutMs > 0) {
      if (st.queuedBytes > 0 && nowMs - st.lastTxMs > stallTimeoutMs) {
        return this.drop(`client read none of its ${st.queuedBytes} queued reply bytes for ${stallTimeoutMs} ms`);
      }
      if (st.midRequest && st.wantsInput && nowMs - st.lastRxMs > stallTimeoutMs) {
        return this.drop(`client stopped in the middle of a request for ${stallTimeoutMs} ms`);
      }
    }
    const last = Math.max(st.lastRxMs, st.lastTxMs);
    if (idleTimeoutMs > 0 && this.isIdle && nowMs - last > idleTimeoutMs) {
      return this.drop(`idle for ${idleTimeoutMs} ms`);
    }
    if (this.bank.size > 0 && (this.limits.budget.waiting > 0 || nowMs - last > RECEIVE_BUFFERS_IDLE_MS)) this.giveBackBuffers();
  }

  override drop(reason: string): void {
    if (this.disconnected) return;
    this.closeReason = reason;
    this.log.debug({ why: reason }, 'dropping client');
    this.stopping = true;
    if (!this.threadEnded) serveAddon().nbdServeAbort(this.handle);
    this.markDisconnected();
  }

  protected override markDisconnected(): void {
    if (this.disconnected) return;
    this.disconnected = true;
    this.stopping = true;
    this.cancelReadWait?.();
    this.cancelReadWait = undefined;
    this.cancelNeedWait?.();
    this.cancelNeedWait = undefined;
    this.needBytes = undefined;
    // Requests never started: their charges go back now (the stream parser drops them too).
    for (const req of this.backlog.splice(0)) this.dropPayload(req);
    void this.idle()
      .then(() => {
        if (!this.threadEnded) serveAddon().nbdServeAbort(this.handle);
        return this.threadEndedP;
      })
      .then(() => {
        this.s.socket.destroy();
        this.releaseHeld();
        this.resolveClosed();
      });
  }

  protected override endAndLinger(): void {
    if (this.threadEnded) return;
    serveAddon().nbdServeEnd(this.handle);
    if (this.lingerTimer === undefined) {
      this.lingerTimer = setTimeout(() => {
        if (!this.threadEnded) serveAddon().nbdServeAbort(this.handle);
      }, LINGER_MS);
      this.lingerTimer.unref();
    }
  }

  private onThreadEnded(errno: number, bytesReceived: number): void {
    if (errno !== 0) this.log.debug({ errno }, 'connection error');
    this.threadEnded = true;
    this.socketClosed = true;
    this.bytesReceived = bytesReceived + this.leftoverBytes;
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    // The thread is gone: every buffer it held is ours again, every queued reply dropped.
    for (const g of this.bank.values()) this.releaseGrant(g);
    this.bank.clear();
    this.bankBytes = 0;
    this.grantIds = [];
    this.grantBufs = [];
    for (const p of this.pendingSends.splice(0)) for (const f of p.onTaken) f?.();
    this.markDisconnected();
    this.releaseHeld();
    this.resolveThreadEnded();
  }
}
