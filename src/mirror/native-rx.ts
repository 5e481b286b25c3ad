/**
 * The receiver's side of a plain mirror connection on a native thread (native/mirror_rx.cc),
 * once HELLO and WELCOME are done: the thread reads and verifies frames, stores each
 * RECORD that fits the range of the source's log file granted here (DestLog.grantRange)
 * straight into its mapping and acknowledges it (RECORD_ACK) itself; every other frame
 * comes here in stream order (a CP_BLOCKS body copied by the thread into one of the slabs
 * granted here, else taken into a buffer chosen here), after
 * the STORED events of the records before it, which the log adopts (DestLog.adopt) before
 * the frame is handled. Outgoing frames go through the thread too (one frame counter).
 * TLS connections, and NVMIRROR_MIRROR_NATIVE=0, keep the stream path (receiver-session.ts).
 *
 * The source's side of a sync mirror's plain link runs on the same thread in source mode
 * (`{ source: true }`, source.ts): forward() lets the NBD threads' appender queue each record
 * on the link as it is appended, and a RECORD_ACK releases their held replies on the thread
 * before it comes here (acks not taken yet are merged into the newest). Sends beyond the
 * caller's bound wait for wantRoom()'s EV_ROOM.
 *
 * Invariants:
 * - A grant is made only when the log is contiguous (no record dropped) and nothing this
 *   side was handed is unhandled; the thread refuses a grant whose next seq is not the
 *   next record it will parse, so a grant never covers records it stored but this side has
 *   not adopted yet.
 * - close() detaches the log on the thread before it returns: nothing writes into the
 *   mapping after it (the mirror may then be released and its log closed). It returns the
 *   records stored but not yet delivered, so every record the thread acknowledged reaches
 *   the log's index, however the connection ends.
 * - A frame sent with sendLent() is read from the caller's buffers until an EV_SENT
 *   event reaches its token or close() returned (close copies what is still queued);
 *   this side keeps those buffers reachable until then, the caller keeps them unchanged.
 * - A granted slab is the thread's until an EV_FRAME names it (then the frame's message
 *   holds it, as a slab taken here would be) or close() returned (then it goes back to the
 *   pool): this side never reads or reuses one in between.
 * - Memory, per connection, outside the process's budget (a body taken here is charged
 *   as the stream path charges it): the thread's input buffer (~1.2 MiB), frame bodies not
 *   yet taken here (reading stops beyond 2 MiB; this side takes them at each delivery),
 *   SLAB_GRANTS slabs granted (~1 MiB), and its send queue (reading stops beyond 1 MiB
 *   queued): ~5.3 MiB at most.
 */
import type * as net from 'net';
import { addon } from '../io/native';
import { assert } from '../util/assert';
import type { FrameSlab, SlabPool } from './slab-pool';
import { bodyCapsTable, encodeBody, type CpBlocksParts, type OutMessage } from './wire';

/** Slabs granted to the thread for CP_BLOCKS bodies at a time (it copies a body into one instead of a buffer TypeScript copies out of). */
export const SLAB_GRANTS = 4;

interface RxAddon {
  mirrorRxStart(fd: number, leftover: Buffer, inFrameNo: number, outFrameNo: number, caps: Buffer, onEvents: (ev: Float64Array, texts: string[]) => void, source: boolean): object;
  mirrorRxForward(h: object, appender: object | null, fromSeq: number): void;
  mirrorRxWantRoom(h: object, bytes: number): void;
  mirrorRxAttachLog(h: object, ring: Buffer, crcs: Buffer): void;
  mirrorRxGrant(h: object, nextSeq: number, at: number, limit: number, salt: number, stream: number): boolean;
  mirrorRxAck(h: object, heldSeq: number, durableSeq: number, storedFromSeq: number, sendNow: boolean): void;
  mirrorRxSend(h: object, type: number, parts: Buffer[], token?: number, blockCrcs?: Uint32Array | null): number;
  mirrorRxTake(h: object, dst: Buffer): number;
  mirrorRxSlab(h: object, id: number, buf: Buffer): boolean;
  mirrorRxPause(h: object, paused: boolean): void;
  mirrorRxClose(h: object, flush: boolean, lingerMs: number): Float64Array;
  mirrorRxStats(h: object): Float64Array;
  mirrorRxDurableFile(h: object, path: string): boolean;
  mirrorRxEventWidth: number;
}

export const EV_STORED = 1;
export const EV_FRAME = 2;
export const EV_ERROR = 3;
export const EV_EOF = 4;
export const EV_ENDED = 5;
export const EV_ROOM = 6;
/** The thread answered DURABLE_REQs itself: every record <= seq is durable in the log file. */
export const EV_DURABLE = 7;
/** Every frame sent with sendLent() up to token is on the socket: its lent buffers are free again. */
export const EV_SENT = 8;

/** A record the thread stored in the log (DestLog.adopt takes it in). */
export interface StoredRecord {
  kind: typeof EV_STORED;
  seq: number;
  at: number;
  size: number;
  type: number;
  lengthBytes: number;
}

/** One event from the thread. */
export type RxEvent =
  | StoredRecord
  | { kind: typeof EV_FRAME; type: number; bytes: number; slab?: FrameSlab; at: number }
  | { kind: typeof EV_ERROR; text: string; protocol: boolean }
  | { kind: typeof EV_EOF }
  /** lingerExpired: close(true) ended at its deadline with the peer still sending (what was left, in words). */
  | { kind: typeof EV_ENDED; lingerExpired?: string }
  | { kind: typeof EV_ROOM }
  | { kind: typeof EV_DURABLE; seq: number }
  | { kind: typeof EV_SENT; token: number };

/** Whether plain mirror connections use the native thread (NVMIRROR_MIRROR_NATIVE=0: the event-loop path). */
export function nativeRxEnabled(): boolean {
  return process.env.NVMIRROR_MIRROR_NATIVE !== '0';
}

/** The fd under a plain (not TLS) net.Socket, or undefined. */
export function plainFd(sock: net.Socket): number | undefined {
  if ((sock as { encrypted?: boolean }).encrypted === true) return undefined;
  const fd = (sock as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : undefined;
}

/**
 * Stops Node reading `sock` and returns what it had read but not yet delivered (the
 * thread takes the stream over from there). Node must not read the socket again: the
 * caller never resumes it.
 */
export function takeOverSocket(sock: net.Socket): Buffer[] {
  const s = sock as unknown as { _handle: { readStop(): number; reading?: boolean }; read(): Buffer | null };
  s._handle.readStop();
  const extra: Buffer[] = [];
  for (let c = s.read(); c !== null; c = s.read()) extra.push(c);
  s._handle.readStop();
  s._handle.reading = false;
  return extra;
}

export class NativeRx {
  private readonly a: RxAddon;
  private readonly h: object;
  private closed = false;
  private paused = false;
  private lastToken = 0;
  /** Lent frames' buffers not yet reported sent, oldest first (sendLent). */
  private readonly lent: Array<{ token: number; parts: Buffer[] }> = [];
  /** Slabs the thread holds, by id (1, 2, ...). */
  private readonly granted = new Map<number, FrameSlab>();
  private nextSlabId = 1;

  /** slabs: the pool CP_BLOCKS bodies go to (undefined: every body is taken with take()). */
  constructor(fd: number, leftover: Buffer, inFrameNo: number, outFrameNo: number, onEvents: (events: RxEvent[]) => void, private readonly slabs?: SlabPool, opts: { source?: boolean } = {}) {
    this.a = addon() as unknown as RxAddon;
    this.h = this.a.mirrorRxStart(fd, leftover, inFrameNo, outFrameNo, bodyCapsTable(), (ev, texts) => {
      const events = this.decode(ev, texts);
      this.grantSlabs();
      onEvents(events);
    }, opts.source === true);
    this.grantSlabs();
  }

  /** Tops the thread's slabs up to SLAB_GRANTS. */
  private grantSlabs(): void {
    if (!this.slabs) return;
    while (!this.closed && this.granted.size < SLAB_GRANTS) {
      const s = this.slabs.take(this.slabs.slabBytes);
      assert(s !== undefined, 'a slab of the pool size fits the pool');
      const id = this.nextSlabId++;
      if (!this.a.mirrorRxSlab(this.h, id, s.buf)) {
        this.slabs.release(s);
        return;
      }
      this.granted.set(id, s);
    }
  }

  private decode(ev: Float64Array, texts: readonly string[]): RxEvent[] {
    const w = this.a.mirrorRxEventWidth;
    assert(ev.length % w === 0, 'native events come in whole records');
    const out: RxEvent[] = [];
    for (let i = 0; i < ev.length; i += w) {
      const k = ev[i];
      if (k === EV_STORED) out.push({ kind: EV_STORED, seq: ev[i + 1]!, at: ev[i + 2]!, size: ev[i + 3]!, type: ev[i + 4]!, lengthBytes: ev[i + 5]! });
      else if (k === EV_FRAME) {
        const id = ev[i + 3]!;
        if (id === 0) {
          // After close() the thread dropped the bodies it held: a frame still queued then is
          // dropped here too (the session is over), not handed on without a body to take.
          if (this.closed) continue;
          out.push({ kind: EV_FRAME, type: ev[i + 1]!, bytes: ev[i + 2]!, at: 0 });
        } else {
          const slab = this.granted.get(id);
          // After close() the slabs are the pool's again: a frame still queued then is dropped (the session is over).
          if (slab === undefined && this.closed) continue;
          const at = ev[i + 4]!;
          assert(slab !== undefined && at >= 0 && at + ev[i + 2]! <= slab.buf.length, `native frame in slab ${id} at ${at}, which is not granted or too short`);
          this.granted.delete(id);
          // The body starts `at` bytes into the slab (its blocks then start on a 4096 boundary).
          out.push({ kind: EV_FRAME, type: ev[i + 1]!, bytes: ev[i + 2]!, slab, at });
        }
      }
      else if (k === EV_ERROR) out.push({ kind: EV_ERROR, text: texts[ev[i + 1]!] ?? 'unknown error', protocol: ev[i + 2] === 1 });
      else if (k === EV_EOF) out.push({ kind: EV_EOF });
      else if (k === EV_ENDED) {
        const note = ev[i + 1]!;
        out.push(note > 0 ? { kind: EV_ENDED, lingerExpired: texts[note - 1] ?? 'the linger ran out' } : { kind: EV_ENDED });
      }
      else if (k === EV_ROOM) out.push({ kind: EV_ROOM });
      else if (k === EV_DURABLE) out.push({ kind: EV_DURABLE, seq: ev[i + 1]! });
      else if (k === EV_SENT) {
        const token = ev[i + 1]!;
        while (this.lent.length > 0 && this.lent[0]!.token <= token) this.lent.shift();
        out.push({ kind: EV_SENT, token });
      }
      else assert(false, `native event kind ${k}`);
    }
    return out;
  }

  /** The log the thread stores records into: its mapping and its block-checksum table. */
  attachLog(ring: Buffer, crcs: Uint32Array): void {
    this.a.mirrorRxAttachLog(this.h, ring, Buffer.from(crcs.buffer, crcs.byteOffset, crcs.byteLength));
  }

  /**
   * The log's file (a path that opens it: DestLog.reopenPath): from now on the thread
   * answers a DURABLE_REQ itself while it holds a grant (one fdatasync of its own
   * descriptor, then the ack; EV_DURABLE tells the log). Once per thread; false if it
   * was set already or does not open (TypeScript keeps answering them).
   */
  durableFile(path: string): boolean {
    if (this.closed) return false;
    return this.a.mirrorRxDurableFile(this.h, path);
  }

  /** Grants [at, limit) of the ring for records from nextSeq on; false if the thread is past nextSeq. */
  grant(nextSeq: number, at: number, limit: number, salt: number, stream: number): boolean {
    if (this.closed) return false;
    return this.a.mirrorRxGrant(this.h, nextSeq, at, limit, salt, stream);
  }

  /** The log's held marks as this side knows them; sendNow: a RECORD_ACK now (with the thread's own stores counted). */
  ack(heldSeq: number, durableSeq: number, storedFromSeq: number, sendNow: boolean): void {
    if (!this.closed) this.a.mirrorRxAck(this.h, heldSeq, durableSeq, storedFromSeq, sendNow);
  }

  /** Frames and sends (or queues) a message. */
  send(m: OutMessage): void {
    if (this.closed) return;
    const parts = encodeBody(m);
    this.a.mirrorRxSend(this.h, m.type, parts);
  }

  /**
   * Sends a CP_BLOCKS frame without copying its blocks: the thread writes them to the
   * socket from the message's buffers, which the caller keeps unchanged until an EV_SENT
   * event carries a token >= `token` (tokens increase by frame) or close() returned. The
   * frame's checksum is extended by the blocks' crc32c (m.crcs, which the caller checked
   * when it read them), not computed from the bytes again.
   */
  sendLent(m: CpBlocksParts & { crcs: readonly number[] }, token: number): void {
    if (this.closed) return;
    assert(Number.isSafeInteger(token) && token > 0 && token > this.lastToken, 'lent frames have increasing tokens');
    this.lastToken = token;
    assert(m.crcs.length === m.pbas.length, 'one crc per block');
    const parts = encodeBody(m);
    // The thread reads these until EV_SENT reaches the token: kept reachable until then
    // (a buffer only the message referenced would otherwise be collected under it).
    this.lent.push({ token, parts });
    this.a.mirrorRxSend(this.h, m.type, parts, token, Uint32Array.from(m.crcs));
  }

  /** Copies the next frame body (which must be dst.length bytes) into dst. */
  take(dst: Buffer): void {
    const n = this.a.mirrorRxTake(this.h, dst);
    assert(n === dst.length, `native frame body of ${dst.length} bytes is not next`);
  }

  pause(paused: boolean): void {
    if (this.closed || paused === this.paused) return;
    this.paused = paused;
    this.a.mirrorRxPause(this.h, paused);
  }

  /** Bytes received by the thread (frame headers included). */
  get bytesIn(): number {
    return this.a.mirrorRxStats(this.h)[0]!;
  }

  get recordsStored(): number {
    return this.a.mirrorRxStats(this.h)[2]!;
  }

  /** The thread's counters: bytes in and out, bytes queued to send, records the appender forwarded, DURABLE_REQs made durable here (fdatasyncs) and records stored with pwritev for them, frame bytes queued per type. */
  stats(): { bytesIn: number; bytesOut: number; queuedBytes: number; forwarded: number; forwardedTop: number; durableSyncs: number; fileStores: number; bytesByType: Float64Array } {
    const s = this.a.mirrorRxStats(this.h);
    return { bytesIn: s[0]!, bytesOut: s[1]!, queuedBytes: s[3]!, forwarded: s[4]!, forwardedTop: s[5]!, durableSyncs: s[6]!, fileStores: s[7]!, bytesByType: s.subarray(8) };
  }

  /** Bytes queued to send. */
  get queuedBytes(): number {
    return this.a.mirrorRxStats(this.h)[3]!;
  }

  /**
   * Source mode: the appender's records from fromSeq on are queued here as the NBD threads
   * append them, and RECORD_ACKs release its held replies here (null: no more of either).
   */
  forward(appender: object | null, fromSeq: number): void {
    if (!this.closed) this.a.mirrorRxForward(this.h, appender, fromSeq);
  }

  /** An EV_ROOM event once at most `bytes` are queued to send (at once if so now). */
  wantRoom(bytes: number): void {
    if (!this.closed) this.a.mirrorRxWantRoom(this.h, bytes);
  }

  /**
   * Ends the thread: at once, or after sending what is queued (up to lingerMs). The log is
   * detached before this returns, and the records the thread stored that were not delivered
   * yet are returned (in stream order, after any batch being delivered now): the thread
   * acknowledged them, so the log must take them in.
   */
  close(flush: boolean, lingerMs = 1000): StoredRecord[] {
    if (this.closed) return [];
    this.closed = true;
    const late = this.decode(this.a.mirrorRxClose(this.h, flush, lingerMs), []);
    // The thread forgot its slabs in mirrorRxClose: they are the pool's again.
    for (const s of this.granted.values()) this.slabs!.release(s);
    this.granted.clear();
    // mirrorRxClose copied the lent frames still queued: their buffers are the caller's again.
    this.lent.length = 0;
    return late.filter((e): e is StoredRecord => e.kind === EV_STORED);
  }
}
