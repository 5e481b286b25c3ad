/**
 * The source's connection to its destination: the transport under source.ts. It dials
 * (TCP, or TLS 1.3 when the link is secured: link.ts), hands a plain sync stream to the
 * link's native thread (native-rx.ts, source mode), writes frames and reads them back,
 * bounds what is queued, counts the bytes on the wire by message type across
 * connections, and redials after a drop with a growing backoff. What the frames mean,
 * and what a drop means for the mirror, is source.ts's (LinkEvents).
 *
 * Invariants:
 * - One connection at a time (`conn`). A dropped connection is closed for good (its
 *   socket destroyed, its native thread stopped) and never written again; the next one
 *   is dialed RECONNECT_MS_MIN after the first drop, doubling to RECONNECT_MS_MAX, back
 *   to the minimum when the source says the destination proved healthy (resetBackoff).
 * - A dial with no TCP (and TLS) connection within CONNECT_TIMEOUT_MS is dropped.
 * - A native stream is paused from the dial on: Node never reads a byte the thread must
 *   parse. Frames reach the source in stream order (events.message; WELCOME through
 *   conn.welcome), from either path.
 * - Bounded: waitRoom() returns only once queued() <= QUEUED_BYTES_MAX or the connection
 *   is closed; roomWaitSinceMs says since when a sender has waited (the source's tick
 *   drops a peer that takes nothing for its stall timeout).
 * - Counted once: a connection's byte counters join the totals when it drops.
 * - Lent frames (sendLent) stay reachable until the link says they are written
 *   (EV_SENT, or the socket's write callback), however the connection ends.
 */
import * as net from 'net';
import * as tls from 'tls';
import { afterSocketWrites, type LentBlocks } from './resync-frames';
import { EV_EOF, EV_ERROR, EV_FRAME, EV_ROOM, EV_SENT, NativeRx, plainFd, type RxEvent } from './native-rx';
import { explainTlsError } from './link';
import { decodeBody, writeEncoded, writeFrame, FrameParser, FrameWriter, MsgType, type Message, type OutMessage } from './wire';
import type { AppendedRecord } from '../nvlog/log';
import type { Clock } from '../io/types';

/** Bytes queued on the mirror socket before senders wait for it to drain. */
export const QUEUED_BYTES_MAX = 32 * 1024 * 1024;
const CONNECT_TIMEOUT_MS = 5_000;
const RECONNECT_MS_MIN = 200;
const RECONNECT_MS_MAX = 5_000;
/** How long stop() lets the queue drain before it closes the connection. */
const STOP_DRAIN_MS = 2_000;

export type Welcome = Message & { type: MsgType.Welcome };

/** One connection to the destination, as the link keeps it (source.ts extends it with the stream's state). */
export interface LinkConn {
  socket: net.Socket;
  parser: FrameParser;
  writer: FrameWriter;
  /**
   * Sync on a plain connection: the link's native thread, which carries the whole stream
   * from the TCP connect on (socket, parser and writer are unused after it).
   */
  rx?: NativeRx;
  welcome: Promise<Welcome>;
  welcomeResolve: (m: Welcome) => void;
  /** WELCOME arrived and the source took it (set by the source): destCp and the rest describe this connection's destination. A close before it: closedReason. */
  welcomed: boolean;
  closed: boolean;
  /** With rx: the last token given to rx.sendLent (tokens increase over the connection's life). */
  lentToken: number;
  /**
   * With rx: lent frames whose sender waits to hear they are sent, oldest first (at most
   * the link's queue of lent frames): EV_SENT(t) says every one up to token t is.
   */
  lent: Array<{ token: number; written: () => void }>;
}

/** What the link tells the source. */
export interface LinkEvents<C extends LinkConn> {
  /** TCP (and TLS) is up, on the native thread or not: the source says HELLO. */
  connected(conn: C): void;
  /** A frame other than WELCOME, in stream order. */
  message(conn: C, m: Message): void;
  /**
   * `conn` is being dropped (`closed` already set, nothing written on it from here on),
   * before its socket and thread close: the source stops what feeds the thread.
   */
  closing(conn: C, current: boolean): void;
  /** `conn` is closed; `current`: it was the link's connection (now none). */
  dropped(conn: C, reason: string, current: boolean): void;
  /** The queue took bytes after a sender waited for room. */
  room(): void;
}

export interface SourceLinkOptions {
  peer: { host: string; port: number };
  tls?: tls.ConnectionOptions;
  /**
   * The network seam: opens a connection to the peer instead of TCP (and TLS). The stream
   * emits 'connect' once up, as a socket does; one without a file descriptor stays on the
   * event loop's path. (test/mirror/link-sim.test.ts: a seeded in-memory link.)
   */
  dial?: (peer: { host: string; port: number }) => net.Socket;
  /** The stream goes to the link's native thread (a plain sync link). */
  native: boolean;
  /** The connect timeout, the redial backoff and the room wait's start run on it. */
  clock: Clock;
}

export class SourceLink<C extends LinkConn> {
  conn: C | undefined;
  /** Since when a sender waits for room on the socket (the peer reads nothing: its queue stays full); reset whenever room comes. */
  roomWaitSinceMs: number | undefined;
  private stopped = false;
  private reconnectMs = RECONNECT_MS_MIN;
  private reconnectTimer: { cancel(): void } | undefined;
  private drainWaiters: Array<() => void> = [];
  private sentAtTick = 0;
  /** Bytes of connections already closed: both ways, by message type sent, and received. */
  private bytesPrev = 0;
  private readonly bytesByTypePrev: number[] = new Array<number>(32).fill(0);
  private bytesInPrev = 0;

  constructor(
    private readonly o: SourceLinkOptions,
    private readonly events: LinkEvents<C>,
    /** Makes the source's connection around the link's part of it. */
    private readonly makeConn: (base: LinkConn) => C,
  ) {}

  /** Dials the destination unless a connection exists or the link is stopped. */
  connect(): void {
    if (this.stopped || this.conn) return;
    const { host, port } = this.o.peer;
    const socket = this.o.dial ? this.o.dial(this.o.peer) : this.o.tls ? tls.connect({ ...this.o.tls, host, port, minVersion: 'TLSv1.3' }) : net.connect({ host, port });
    socket.setNoDelay?.(true);
    const parser = new FrameParser();
    let welcomeResolve!: (m: Welcome) => void;
    let welcomeReject!: (e: Error) => void;
    const welcome = new Promise<Welcome>((res, rej) => {
      welcomeResolve = res;
      welcomeReject = rej;
    });
    welcome.catch(() => undefined);
    const conn = this.makeConn({ socket, parser, writer: new FrameWriter(), welcome, welcomeResolve, welcomed: false, closed: false, lentToken: 0, lent: [] });
    this.conn = conn;
    const timer = this.o.clock.setTimeout(() => this.drop(conn, 'connect timed out'), CONNECT_TIMEOUT_MS);
    const onData = (chunk: Buffer): void => {
      let msgs: Message[];
      try {
        msgs = parser.push(chunk);
      } catch (e) {
        this.drop(conn, `bad stream from the destination: ${(e as Error).message}`);
        return;
      }
      for (const m of msgs) {
        if (m.type === MsgType.Welcome) welcomeResolve(m);
        else this.events.message(conn, m);
      }
    };
    // A plain sync link goes to a native thread at 'connect': paused, Node never starts
    // reading it (a read started there would take bytes the thread must parse).
    const native = this.o.native && !this.o.tls;
    if (native) socket.pause();
    else socket.on('data', onData);
    socket.once(this.o.tls && !this.o.dial ? 'secureConnect' : 'connect', () => {
      timer.cancel();
      if (native) {
        try {
          this.goNative(conn);
        } catch (e) {
          this.drop(conn, `cannot start the mirror link's thread: ${(e as Error).message}`);
          return;
        }
        if (!conn.rx) {
          socket.on('data', onData);
          socket.resume();
        }
      }
      this.events.connected(conn);
    });
    socket.on('drain', () => this.wakeDrain());
    socket.on('error', (e) => this.drop(conn, explainTlsError(e.message, 'source')));
    socket.on('close', () => {
      welcomeReject(new Error('closed'));
      this.drop(conn, this.closedReason(conn));
    });
  }

  /** The stream moves to the link's native thread (source mode); nothing was read or written on it yet. */
  private goNative(conn: C): void {
    const fd = plainFd(conn.socket);
    if (fd === undefined) return;
    conn.rx = new NativeRx(fd, Buffer.alloc(0), 0, 0, (events) => this.onRxEvents(conn, events), undefined, { source: true });
  }

  /** Frames and events from the link's native thread, in stream order. */
  private onRxEvents(conn: C, events: RxEvent[]): void {
    for (const e of events) {
      if (conn.closed) return;
      if (e.kind === EV_FRAME) {
        const body = Buffer.allocUnsafe(e.bytes);
        conn.rx!.take(body);
        let m: Message;
        try {
          m = decodeBody(e.type, body);
        } catch (err) {
          this.drop(conn, `bad stream from the destination: ${(err as Error).message}`);
          return;
        }
        if (m.type === MsgType.Welcome) conn.welcomeResolve(m);
        else this.events.message(conn, m);
      } else if (e.kind === EV_ERROR) {
        this.drop(conn, e.protocol ? `bad stream from the destination: ${e.text}` : e.text);
      } else if (e.kind === EV_EOF) {
        this.drop(conn, this.closedReason(conn));
      } else if (e.kind === EV_ROOM) {
        this.wakeDrain();
      } else if (e.kind === EV_SENT) {
        while (conn.lent.length > 0 && conn.lent[0]!.token <= e.token) conn.lent.shift()!.written();
      }
    }
  }

  /** Why a connection the destination closed ended: unanswered, on a plaintext link, most often a receiver that expects TLS. */
  private closedReason(conn: C): string {
    if (conn.welcomed || this.o.tls) return 'connection closed';
    return 'the destination closed the connection before answering HELLO (a receiver that expects TLS? --mirror-psk or --mirror-tls-* on both sides; else its log says why)';
  }

  /** Closes `conn` for good, counts its bytes, tells the source, and redials later (unless stopped). */
  drop(conn: C, reason: string): void {
    if (conn.closed) return;
    conn.closed = true;
    const current = this.conn === conn;
    this.events.closing(conn, current);
    if (conn.rx) {
      const st = conn.rx.stats();
      this.bytesPrev += st.bytesOut + st.bytesIn;
      st.bytesByType.forEach((n, t) => (this.bytesByTypePrev[t] = (this.bytesByTypePrev[t] ?? 0) + n));
      this.bytesInPrev += st.bytesIn;
      conn.rx.close(false);
    } else {
      this.bytesPrev += conn.writer.bytesOut + conn.parser.bytesIn;
      conn.writer.bytesByType.forEach((n, t) => (this.bytesByTypePrev[t] = (this.bytesByTypePrev[t] ?? 0) + n));
      this.bytesInPrev += conn.parser.bytesIn;
    }
    conn.socket.destroy();
    if (current) this.conn = undefined;
    this.events.dropped(conn, reason, current);
    if (!this.stopped && !this.reconnectTimer) {
      this.reconnectTimer = this.o.clock.setTimeout(() => {
        this.reconnectTimer = undefined;
        this.connect();
      }, this.reconnectMs);
      this.reconnectMs = Math.min(RECONNECT_MS_MAX, this.reconnectMs * 2);
    }
  }

  /** The destination proved healthy (it committed a CP): the next redial waits the least again. */
  resetBackoff(): void {
    this.reconnectMs = RECONNECT_MS_MIN;
  }

  send(conn: C, m: OutMessage): void {
    if (conn.closed) return;
    if (conn.rx) conn.rx.send(m);
    else writeFrame(conn.socket, conn.writer, m);
  }

  /** A record of the log (sync forwarding); the payload is copied into the frame (the views die with the half). */
  sendRecord(conn: C, r: AppendedRecord): void {
    if (conn.rx) {
      const payload = r.payload.length === 1 ? r.payload[0]! : Buffer.concat(r.payload);
      conn.rx.send({ type: MsgType.Record, seq: r.seq, recordType: r.type, flags: r.flags, offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes, payload });
    } else {
      writeEncoded(conn.socket, conn.writer.recordFrame(r.seq, r.type, r.flags, r.offsetBytes, r.lengthBytes, r.payload));
    }
  }

  /**
   * A frame whose buffers the sender lends (no copy on the native link): `written`, if
   * given, runs once they are on the wire; until then they stay reachable here.
   */
  sendLent(conn: C, m: LentBlocks, written?: () => void): void {
    if (conn.closed) return;
    if (conn.rx) {
      const token = ++conn.lentToken;
      if (written) conn.lent.push({ token, written });
      conn.rx.sendLent(m, token);
    } else {
      this.send(conn, m);
      if (written) afterSocketWrites(conn.socket, written);
    }
  }

  /** Bytes queued for the peer and not yet written to the socket. */
  queued(conn: C): number {
    return conn.rx ? conn.rx.queuedBytes : conn.socket.writableLength;
  }

  /** Waits while the socket queue is over QUEUED_BYTES_MAX (the connection may drop meanwhile). */
  async waitRoom(conn: C): Promise<void> {
    while (!conn.closed && this.queued(conn) > QUEUED_BYTES_MAX) {
      this.roomWaitSinceMs ??= this.o.clock.nowMs();
      const p = new Promise<void>((r) => this.drainWaiters.push(r));
      conn.rx?.wantRoom(QUEUED_BYTES_MAX);
      await p;
    }
  }

  /** A sender holds back until the queue is under its bound (without awaiting here): room is asked for, and the wait is timed. */
  askRoom(conn: C): void {
    this.roomWaitSinceMs ??= this.o.clock.nowMs();
    conn.rx?.wantRoom(QUEUED_BYTES_MAX);
  }

  wakeDrain(): void {
    this.roomWaitSinceMs = undefined;
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
    this.events.room();
  }

  /** Whether the socket took any of its queue since the last tick (a slow link drains a full queue in many ticks). */
  sentSinceTick(conn: C): boolean {
    const sent = conn.rx ? conn.rx.stats().bytesOut : conn.writer.bytesOut - conn.socket.writableLength;
    const moved = sent !== this.sentAtTick;
    this.sentAtTick = sent;
    if (moved && this.roomWaitSinceMs !== undefined) this.roomWaitSinceMs = this.o.clock.nowMs();
    return moved;
  }

  /** Bytes on the wire both ways, every connection of this run. */
  wireBytes(): number {
    const conn = this.conn;
    if (conn?.rx && !conn.closed) {
      const st = conn.rx.stats();
      return st.bytesOut + st.bytesIn + this.bytesPrev;
    }
    return (conn?.writer.bytesOut ?? 0) + (conn?.parser.bytesIn ?? 0) + this.bytesPrev;
  }

  /** Frame bytes sent by message type, and bytes received, every connection of this run. */
  bytesByType(): { sent: (t: MsgType) => number; received: number } {
    const conn = this.conn;
    const st = conn?.rx && !conn.closed ? conn.rx.stats() : undefined;
    return {
      sent: (t) => (this.bytesByTypePrev[t] ?? 0) + (st ? st.bytesByType[t]! : (conn?.writer.bytesByType[t] ?? 0)),
      received: this.bytesInPrev + (st ? st.bytesIn : (conn?.parser.bytesIn ?? 0)),
    };
  }

  /** No redial from here on; what is queued gets up to STOP_DRAIN_MS to go out, then the connection closes. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.reconnectTimer?.cancel();
    const conn = this.conn;
    if (!conn) return;
    await new Promise<void>((r) => {
      if (this.queued(conn) === 0) return r();
      if (conn.rx) {
        this.drainWaiters.push(r);
        conn.rx.wantRoom(0);
      } else {
        conn.socket.once('drain', () => r());
      }
      setTimeout(r, STOP_DRAIN_MS).unref();
    });
    this.drop(conn, 'stopping');
  }
}
