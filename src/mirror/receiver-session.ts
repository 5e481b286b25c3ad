/**
 * One source's connection at the destination (receiver.ts accepts it): the stream from
 * HELLO on, into that source's mirror directory (mirror-dir.ts).
 *
 *   HELLO -> WELCOME (our committed CP, root and held records), then
 *   RECORD      stored in the source's log file, acknowledged (RECORD_ACK, cumulative)
 *   DURABLE_REQ the log is persisted, then acknowledged with durableSeq (by the native
 *               receive thread itself while it holds a grant: native/mirror_rx.cc)
 *   CP_BEGIN, CP_BLOCKS / CP_REFS..., CP_COMMIT   applied at the same pbas, then the
 *               superblock (apply.ts); acknowledged with CP_ACK once durable
 *
 * Invariants:
 * - CP frames are applied in stream order by the session's CpApplier (apply.ts: a CP
 *   only on its base, committed only whole and verified; a reference only to a record
 *   the log holds, with the crc32c it arrived with).
 * - Every write of a session completes before the mirror is released to a new session
 *   (whose HELLO may drop records a reference's view points into): release().
 * - A protocol error, a checksum failure or a closed socket ends the connection; the
 *   committed image is what the last CP_COMMIT made it.
 * - A plain connection's socket belongs to the native thread after WELCOME
 *   (native-rx.ts): it stores records inside the range of the log granted here and acks
 *   them; everything else arrives here in stream order, after the records stored before
 *   it are adopted by the log. end() detaches the thread from the log before the mirror
 *   can be released.
 * - At most one session handles a source's HELLO at a time (SessionHost.claimHello); a
 *   silent earlier session of the same source gives way after SESSION_SILENT_REPLACE_MS.
 * - Time: the HELLO and idle timeouts and a session's silence are read from the host's
 *   clock (SessionHost.clock: the system's, or a test's simulated one); only a refused
 *   socket's linger before it is destroyed runs on real time.
 * - Memory: parsed frames waiting to be applied are charged to the process's one
 *   MemoryBudget (SessionHost.budget); a frame parsed while the budget is spent pauses
 *   this connection's reading until it is granted. On top of that: one frame being
 *   parsed and the rest of one socket read (<= FRAME_BODY_MAX_BYTES + 64 KiB), records on
 *   the fast path (stored at once), the CP being applied (apply.ts: at most RUNS_OPEN_MAX
 *   staged runs being combined and APPLY_WRITES_MAX combined writes in flight, <= 1 MiB
 *   each, views of their frames: each keeps at most the frames it came from, one more at
 *   each end), and reading pauses beyond QUEUED_BYTES_MAX queued.
 */
import type * as net from 'net';
import type { Logger } from 'pino';
import { decideStanding, refusalText, type Standing } from './standing';
import { decodeBody, FrameParser, FrameWriter, MirrorProtocolError, MsgType, writeFrame, type CpBlocks, type Message } from './wire';
import { EV_DURABLE, EV_ENDED, EV_EOF, EV_ERROR, EV_FRAME, EV_STORED, NativeRx, nativeRxEnabled, plainFd, takeOverSocket, type RxEvent, type StoredRecord } from './native-rx';
import { MirrorDir, MirrorDirError, rootBytes, type MirrorHello } from './mirror-dir';
import { MirrorView, type MirrorExports } from './exports';
import { RemoteReads, verifyCp, type VerifyReport } from './verify';
import type { SlabPool } from './slab-pool';
import { CpApplier, DroppedRecordError } from './apply';
import type { Lineage } from '../tree/lineage';
import type { RepairSource } from '../tree/types';
import { Slicer } from '../util/work';
import type { Charge, MemoryBudget } from '../nbd/budget';
import type { Clock } from '../io/types';

/** Parsed frames waiting to be applied, per connection, before reading pauses. */
const QUEUED_BYTES_MAX = 16 * 1024 * 1024;
/** A block asked of the source for one of the mirror's that failed verification (a reader waits for it): at most this long. */
const REPAIR_READ_TIMEOUT_MS = 5_000;

/** Roughly what a message holds in memory (its payload). */
function messageBytes(m: Message): number {
  switch (m.type) {
    case MsgType.Record: return 64 + m.payload.length;
    case MsgType.CpBlocks: return 64 + m.data.length;
    case MsgType.CpRefs: return 64 + m.refs.length * 48;
    case MsgType.CpDeltas: return 64 + m.deltas.reduce((n, d) => n + 64 + d.delta.length, 0);
    case MsgType.CpCommit: return 4200;
    default: return 64;
  }
}
/** Frames that records arriving later must not overtake on the fast path (stream order). */
function mustKeepOrder(m: Message): boolean {
  return m.type === MsgType.Record || m.type === MsgType.DurableReq || m.type === MsgType.Hello;
}
/**
 * CP application runs at most this long before the loop polls again (records and their
 * acks get through; a client's write waits for its ack).
 */
const APPLY_SLICE_MS = 0.5;
/** A connection that sends nothing for this long (the source pings every few seconds) is dropped. */
export const RECEIVER_IDLE_TIMEOUT_MS = 60_000;
/**
 * A session that has heard nothing for this long (a live source pings every 5 s) gives
 * way when the same source connects again: its peer went away without a FIN or RST (a
 * cut link TCP did not notice), and it would otherwise refuse the source's reconnects
 * until RECEIVER_IDLE_TIMEOUT_MS.
 */
export const SESSION_SILENT_REPLACE_MS = 10_000;
/** A connection must finish HELLO within this time. */
export const HELLO_TIMEOUT_MS = 10_000;

/** What a session needs of the receiver that accepted it (receiver.ts). */
export interface SessionHost {
  /** CP_BLOCKS bodies are assembled in these, shared by every connection. */
  readonly slabs: SlabPool;
  readonly budget: MemoryBudget | undefined;
  readonly exports: MirrorExports | undefined;
  /** The HELLO and idle timeouts and silence are measured by it. */
  readonly clock: Clock;
  /** Where each source and its mirror stood at its last HELLO, by source uuid. */
  readonly standings: Map<string, Standing>;
  /** Claims the HELLO of source `uuid` for `s`; false if another live session is handling one. */
  claimHello(uuid: string, s: Session): boolean;
  dropHelloClaim(uuid: string, s: Session): void;
  sessionFor(uuid: string): Session | undefined;
  /** Releases an ended session (its writes done) and forgets it; one promise per session. */
  sessionEnded(s: Session): Promise<void>;
  /** Settles once an ended session is released and forgotten. */
  sessionGone(s: Session): Promise<void>;
  /** The source's mirror, opened (or created) for its HELLO; throws MirrorDirError when refused. */
  openMirror(hello: MirrorHello & { sourceCp: number; lastSeq: number; lineage: Lineage }, log: Logger): Promise<MirrorDir>;
}

export class Session {
  private readonly parser: FrameParser;
  private readonly writer = new FrameWriter();
  /** After WELCOME on a plain connection: the socket is the native thread's (native-rx.ts). */
  private native: NativeRx | undefined;
  private mirror: MirrorDir | undefined;
  /** Applies the CP frames (apply.ts); made with the mirror at HELLO. */
  private applier: CpApplier | undefined;
  private ackQueued = false;
  /** Slices a CP's application (see drain). */
  private readonly slicer = new Slicer(APPLY_SLICE_MS);
  private queue: Message[] = [];
  private processing = false;
  /** Bytes of parsed messages not yet handled (queued or being handled). */
  private pendingBytes = 0;
  /** The budget's charge of each queued message (none without a budget). */
  private readonly charges = new Map<Message, Charge>();
  /** Queued messages parsed while the budget was spent, oldest first: reading pauses until each is granted. */
  private uncharged: Message[] = [];
  /** The message a budget wait is for, and how to cancel that wait. */
  private budgetWait: { m: Message; cancel: () => void } | undefined;
  private closed = false;
  private idleTimer: { cancel(): void } | undefined;
  private lastHeardMs: number;
  /** Messages of the batch drain() is handling that records must not overtake (see applyingOnly). */
  private orderedInBatch = 0;
  /** Settles when drain() has returned (no message of this session is being handled). */
  private drained: Promise<void> = Promise.resolve();

  constructor(private readonly rx: SessionHost, readonly socket: net.Socket, private readonly log: Logger) {
    this.parser = new FrameParser(rx.slabs);
    this.lastHeardMs = rx.clock.nowMs();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (e) => this.end(`socket error: ${e.message}`));
    socket.on('close', () => this.end('connection closed'));
    this.idleTimer = rx.clock.setTimeout(() => this.end('no HELLO in time'), HELLO_TIMEOUT_MS);
  }

  get sourceUuid(): string | undefined {
    return this.mirror?.label.sourceUuid;
  }

  get bytesIn(): number {
    return this.parser.bytesIn + (this.native?.bytesIn ?? 0);
  }

  /** The baseline or resync this session is applying, if any (status). */
  get catchUp(): { cp: number; baseCp: number; blocks: number } | undefined {
    return this.applier?.catchUp();
  }

  get mirrorDir(): MirrorDir | undefined {
    return this.mirror;
  }

  private armIdle(): void {
    this.idleTimer?.cancel();
    this.idleTimer = this.rx.clock.setTimeout(() => this.end(`nothing received for ${RECEIVER_IDLE_TIMEOUT_MS} ms`), RECEIVER_IDLE_TIMEOUT_MS);
  }

  private onData(chunk: Buffer): void {
    if (this.closed) return;
    this.lastHeardMs = this.rx.clock.nowMs();
    let msgs: Message[];
    try {
      msgs = this.parser.push(chunk);
    } catch (e) {
      this.end(`refused the stream: ${(e as Error).message}`, true);
      return;
    }
    if (this.mirror) this.armIdle();
    this.accept(msgs);
  }

  /** Takes parsed messages in stream order: records on the fast path, the rest queued. */
  private accept(msgs: readonly Message[]): void {
    // Records (and durability requests) take a fast path once the mirror is open: they
    // are stored and acknowledged at once, not behind a CP being applied (a client's
    // write waits for that ack). A record always precedes the CP frames that refer to
    // it in the stream, so storing records early never breaks a reference.
    let ack = false;
    try {
      for (const m of msgs) {
        if (this.mirror && m.type === MsgType.Record && this.applyingOnly()) {
          this.mirror.log.append(m.seq, m.recordType, m.flags, m.offsetBytes, m.lengthBytes, m.payload, m.blockCrcs);
          ack = true;
        } else if (this.mirror && m.type === MsgType.DurableReq && this.applyingOnly()) {
          void this.persistAndAck();
        } else {
          this.queue.push(m);
          this.pendingBytes += messageBytes(m);
          this.charge(m);
        }
      }
    } catch (e) {
      this.end(`refused the stream: ${e instanceof Error ? e.message : String(e)}`, true);
      return;
    }
    if (ack) this.ackSoon();
    this.grantNative();
    this.flow();
    if (this.queue.length > 0) void this.drain();
  }

  /**
   * Hands the socket to the native thread (after WELCOME, plain connections): what the
   * parser and Node hold of the stream goes with it, and the log is granted its next range.
   */
  private startNative(): void {
    const fd = plainFd(this.socket);
    if (!nativeRxEnabled() || fd === undefined || this.closed || !this.mirror) return;
    const { leftover, nextFrameNo } = this.parser.detach(takeOverSocket(this.socket));
    this.native = new NativeRx(fd, leftover, nextFrameNo, this.writer.nextFrameNo, (ev) => this.onNative(ev), this.rx.slabs);
    const { ring, crcs } = this.mirror.log.nativeParts;
    this.native.attachLog(ring, crcs);
    // DURABLE_REQs answered by the thread (an fdatasync of its own descriptor to the log),
    // unless NVMIRROR_MIRROR_RX_DURABLE=0 (then the event loop persists, as without the thread).
    const logFile = this.mirror.log.reopenPath;
    if (process.env.NVMIRROR_MIRROR_RX_DURABLE !== '0' && (logFile === undefined || !this.native.durableFile(logFile))) {
      this.log.warn({ source: this.sourceUuid }, 'mirror log: the receive thread could not open the log file; durability requests go through the event loop');
    }
    this.mirror.log.onRelease = () => this.syncNativeAck();
    this.log.debug({ source: this.sourceUuid }, 'mirror stream on the native receive thread');
    this.grantNative();
  }

  /** Events from the native thread, in stream order. */
  private onNative(events: readonly RxEvent[]): void {
    for (const e of events) {
      if (e.kind === EV_ENDED && e.lingerExpired !== undefined) this.log.warn({ source: this.sourceUuid, detail: e.lingerExpired }, 'mirror link: the source kept sending after the refusal; the connection was closed with its data unread (the source sees a reset)');
    }
    if (this.closed) return;
    this.inNative = true;
    try {
      this.onNativeBatch(events);
    } finally {
      this.inNative = false;
      // Stored records the thread still held when end() closed it mid-batch: after this batch's.
      const late = this.lateStored;
      this.lateStored = [];
      for (const r of late) this.mirror!.log.adopt(r.seq, r.at, r.size, r.type, r.lengthBytes);
    }
  }

  /** onNative() is handling a batch (end() then leaves the thread's last records to it). */
  private inNative = false;
  private lateStored: StoredRecord[] = [];

  /** Takes into the log the records the native thread stored but had not delivered when it was closed. */
  private adoptLate(late: readonly StoredRecord[]): void {
    if (this.inNative) this.lateStored.push(...late);
    else for (const r of late) this.mirror!.log.adopt(r.seq, r.at, r.size, r.type, r.lengthBytes);
  }

  private onNativeBatch(events: readonly RxEvent[]): void {
    // The batch in stream order: frames, and the records the thread stored between them,
    // up to the end of the stream (EOF, an error, a frame that does not decode) if it is here.
    const items: Array<{ m: Message; r?: undefined; d?: undefined } | { r: StoredRecord; m?: undefined; d?: undefined } | { d: number; m?: undefined; r?: undefined }> = [];
    let ending: { reason: string; refused: boolean } | undefined;
    for (const e of events) {
      if (e.kind === EV_STORED) {
        items.push({ r: e });
      } else if (e.kind === EV_DURABLE) {
        items.push({ d: e.seq });
      } else if (e.kind === EV_FRAME) {
        // A CP_BLOCKS body the thread copied into a slab granted to it, or taken here.
        const slab = e.slab ?? (e.type === MsgType.CpBlocks && e.bytes > 0 ? this.rx.slabs.take(e.bytes) : undefined);
        const body = slab ? slab.buf.subarray(e.at, e.at + e.bytes) : Buffer.allocUnsafe(e.bytes);
        if (!e.slab) this.native!.take(body);
        try {
          const m = decodeBody(e.type, body);
          if (slab) (m as CpBlocks).slab = slab;
          items.push({ m });
        } catch (err) {
          if (slab) this.rx.slabs.release(slab);
          ending = { reason: `refused the stream: ${err instanceof Error ? err.message : String(err)}`, refused: true };
          break;
        }
      } else if (e.kind === EV_ERROR) {
        ending = { reason: e.protocol ? `refused the stream: ${e.text}` : e.text, refused: e.protocol };
        break;
      } else if (e.kind === EV_EOF) {
        ending = { reason: 'connection closed', refused: false };
        break;
      }
    }
    this.lastHeardMs = this.rx.clock.nowMs();
    if (!ending) this.armIdle();
    // Runs of frames are accepted (records on the fast path, the rest queued) and stored
    // records adopted by the log in stream order, so a reference in a later frame finds
    // its record. (The thread stores nothing after a record it handed over until that one
    // was handled here: it grants itself no range.) Every record the thread stored is
    // adopted, also past the stream's end or a frame refused here: it acknowledged them,
    // and the log must neither forget them nor write over them.
    let run: Message[] = [];
    for (const { m, r, d } of items) {
      if (m) {
        run.push(m);
        continue;
      }
      if (run.length > 0 && !this.closed) this.accept(run);
      run = [];
      // The records a DURABLE event covers were stored before it: adopted above.
      if (d !== undefined) this.mirror!.log.notePersisted(d);
      else this.mirror!.log.adopt(r.seq, r.at, r.size, r.type, r.lengthBytes);
    }
    if (run.length > 0 && !this.closed) this.accept(run);
    if (ending) {
      this.end(ending.reason, ending.refused);
      return;
    }
    if (this.closed) return;
    if (run.length === 0) this.grantNative();
    this.syncNativeAck();
  }

  /** Grants the native thread the log's next range, when the log and the queue allow it. */
  private grantNative(): void {
    if (!this.native || !this.mirror || this.closed || !this.applyingOnly()) return;
    const g = this.mirror.log.grantRange();
    if (g) this.native.grant(g.nextSeq, g.at, g.limit, g.salt, g.stream);
  }

  /** Tells the native thread the log's held marks (its own acks carry them). */
  private syncNativeAck(): void {
    if (!this.native || !this.mirror || this.closed) return;
    const log = this.mirror.log;
    this.native.ack(log.heldSeq, log.durableSeq, log.referableFromSeq, false);
  }

  /** Charges a queued message to the process's budget, or queues it for a grant (reading pauses meanwhile). */
  private charge(m: Message): void {
    const budget = this.rx.budget;
    if (!budget) return;
    if (this.uncharged.length === 0) {
      const c = budget.tryCharge(messageBytes(m), this);
      if (c) {
        this.charges.set(m, c);
        return;
      }
    }
    this.uncharged.push(m);
    this.waitBudget();
  }

  private waitBudget(): void {
    const budget = this.rx.budget;
    const m = this.uncharged[0];
    if (!budget || !m || this.budgetWait || this.closed) return;
    const wait = {
      m,
      cancel: budget.wait(messageBytes(m), (c) => {
        if (this.budgetWait === wait) this.budgetWait = undefined;
        if (this.closed || this.uncharged[0] !== m) budget.release(c); // handled or gone meanwhile
        else {
          this.uncharged.shift();
          this.charges.set(m, c);
        }
        this.waitBudget();
        this.flow();
      }, this),
    };
    this.budgetWait = wait;
  }

  /** A message was handled: its charge goes back (or its wait for one ends). */
  private discharge(m: Message): void {
    const c = this.charges.get(m);
    if (c) {
      this.charges.delete(m);
      this.rx.budget!.release(c);
      return;
    }
    const i = this.uncharged.indexOf(m);
    if (i < 0) return;
    this.uncharged.splice(i, 1);
    if (this.budgetWait?.m === m) {
      this.budgetWait.cancel(); // a grant already on its way is released by its callback
      this.budgetWait = undefined;
      this.waitBudget();
    }
  }

  private releaseBudget(): void {
    this.budgetWait?.cancel();
    this.budgetWait = undefined;
    this.uncharged = [];
    for (const c of this.charges.values()) this.rx.budget!.release(c);
    this.charges.clear();
  }

  /**
   * Reads from the socket only while the queue and the budget keep up. Not the device:
   * the CP being applied waits for write slots in drain(), while records behind its
   * frames are still read, stored and acknowledged (a client's write waits for that ack);
   * a device that stays behind fills the queue, and then reading pauses.
   */
  private flow(): void {
    if (this.closed) return;
    const full = this.pendingBytes > QUEUED_BYTES_MAX || this.uncharged.length > 0;
    if (this.native) {
      this.native.pause(full);
      return;
    }
    if (full && !this.socket.isPaused()) this.socket.pause();
    else if (!full && this.socket.isPaused()) this.socket.resume();
  }

  /** True when everything queued is CP application (records may pass it). */
  private applyingOnly(): boolean {
    if (this.orderedInBatch > 0) return false;
    for (const q of this.queue) if (mustKeepOrder(q)) return false;
    return true;
  }

  private persisting: Promise<void> | undefined;
  private persistAgain = false;

  /** Group commit of the log: one msync at a time; requests during it share the next. */
  private async persistAndAck(): Promise<void> {
    if (this.persisting) {
      this.persistAgain = true;
      return;
    }
    try {
      do {
        this.persistAgain = false;
        this.persisting = this.mirror!.log.persist();
        await this.persisting;
        if (!this.closed) this.sendAck();
      } while (this.persistAgain && !this.closed);
    } catch (e) {
      this.end(`log persist failed: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      this.persisting = undefined;
    }
  }

  private send(m: Message): void {
    if (this.closed) return;
    if (this.native) this.native.send(m);
    else writeFrame(this.socket, this.writer, m);
  }


  private async drain(): Promise<void> {
    if (this.processing) return;
    this.processing = true;
    let done!: () => void;
    this.drained = new Promise<void>((r) => (done = r));
    try {
      while (this.queue.length > 0 && !this.closed) {
        const batch = this.queue;
        this.queue = [];
        // The batch left the queue but not the stream order: while any of its records (or
        // its HELLO) is unhandled, later records must not take the fast path past it.
        this.orderedInBatch = batch.filter(mustKeepOrder).length;
        let acked = false;
        for (const m of batch) {
          if (this.closed) return;
          // A CP's frames resolve mostly in microtasks (cached reads, queued writes): let the
          // loop poll between slices, so records (fast path) and their acks are not held
          // behind a whole CP.
          if (m.type !== MsgType.Record) await this.slicer.maybeYield();
          if (this.closed) return;
          acked = (await this.handle(m)) || acked;
          // Handled: the runs and writes with views of its slab hold it now.
          if (m.type === MsgType.CpBlocks && m.slab) this.rx.slabs.release(m.slab);
          if (mustKeepOrder(m)) this.orderedInBatch--;
          this.pendingBytes -= messageBytes(m);
          this.discharge(m);
          if (this.native && (m.type === MsgType.Record || m.type === MsgType.CpCommit || m.type === MsgType.Hello)) {
            // The HELLO done (the first grant), a record handed over (the log wrapped or
            // filled) or a CP's release: the thread may store the next ones again.
            this.grantNative();
            this.syncNativeAck();
          }
          this.flow();
        }
        if (acked && this.mirror && !this.closed) this.sendAck();
      }
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (e instanceof DroppedRecordError) {
        this.log.warn({ source: this.sourceUuid, cp: e.cp, seq: e.seq }, 'a CP referenced a record the log dropped (its ring was full): the connection ends, the source resyncs; the committed image is unchanged');
        this.end(msg);
      } else if (e instanceof MirrorProtocolError || e instanceof MirrorDirError) {
        this.end(`refused the stream: ${msg}`, true);
      } else {
        // An I/O error applying it (a full or failing disk): logged as such, and refused
        // too, so the source's status names the cause instead of a closed connection.
        this.log.error({ source: this.sourceUuid, err: msg }, 'the mirror cannot apply the stream: I/O error; its committed image is unchanged');
        this.end(`the destination cannot apply the stream: ${msg}`, true);
      }
    } finally {
      this.processing = false;
      done();
    }
  }

  /**
   * Records stored on the fast path are acknowledged once per event-loop turn (the socket
   * reads of one poll phase share one RECORD_ACK, which carries the newest heldSeq): the
   * source releases its held replies per ack.
   */
  private ackSoon(): void {
    if (this.ackQueued) return;
    this.ackQueued = true;
    setImmediate(() => {
      this.ackQueued = false;
      if (this.mirror && !this.closed) this.sendAck();
    });
  }

  private sendAck(): void {
    const log = this.mirror!.log;
    if (this.native) {
      if (!this.closed) this.native.ack(log.heldSeq, log.durableSeq, log.referableFromSeq, true);
      return;
    }
    this.send({ type: MsgType.RecordAck, heldSeq: log.heldSeq, durableSeq: log.durableSeq, storedFromSeq: log.referableFromSeq });
  }

  /** Handles one message; returns true if the record ack should be sent after the batch. */
  private async handle(m: Message): Promise<boolean> {
    if (!this.mirror) {
      if (m.type !== MsgType.Hello) throw new MirrorProtocolError(`expected HELLO, got frame type ${m.type}`);
      await this.hello(m);
      return false;
    }
    const mirror = this.mirror;
    switch (m.type) {
      case MsgType.Record:
        mirror.log.append(m.seq, m.recordType, m.flags, m.offsetBytes, m.lengthBytes, m.payload, m.blockCrcs);
        return true;
      case MsgType.DurableReq:
        await mirror.log.persist();
        return true;
      case MsgType.Ping:
        return false;
      case MsgType.ReadReq:
        this.send({ type: MsgType.ReadResp, id: m.id, pbas: m.pbas, data: await mirror.readRaw(m.pbas) });
        return false;
      case MsgType.ReadResp: {
        if (!this.reads.answer(m.id, m.data)) throw new MirrorProtocolError(`read response ${m.id} that was not asked for`);
        return false;
      }
      case MsgType.CpBegin:
        await this.applier!.begin(m);
        return false;
      case MsgType.CpBlocks:
        await this.applier!.blocks(m);
        return false;
      case MsgType.CpRefs:
        await this.applier!.refs(m);
        return false;
      case MsgType.CpDeltas:
        await this.applier!.deltas(m);
        return false;
      case MsgType.CpCommit: {
        const sb = await this.applier!.commit(m);
        this.send({ type: MsgType.CpAck, cp: m.cp, root: rootBytes(sb) });
        return true;
      }
      case MsgType.CpAbort:
        await this.applier!.abort(m);
        return false;
      default:
        throw new MirrorProtocolError(`unexpected frame type ${m.type} from a source`);
    }
  }


  private async hello(m: Message & { type: MsgType.Hello }): Promise<void> {
    // One HELLO per source at a time: the checks below wait on I/O, and a relay that held a
    // stalled link delivers the source's reconnect attempts together. The claim is dropped
    // once this session holds the mirror (sessionFor() finds it from then on) or failed.
    if (!this.rx.claimHello(m.sourceUuid, this)) throw new MirrorDirError(`source ${m.sourceUuid} is already connected (another of its connections is being set up)`);
    try {
      await this.helloClaimed(m);
    } finally {
      this.rx.dropHelloClaim(m.sourceUuid, this);
    }
  }

  private async helloClaimed(m: Message & { type: MsgType.Hello }): Promise<void> {
    let old = this.rx.sessionFor(m.sourceUuid);
    if (old?.ended) {
      // Its connection is gone, but it may still be applying a CP commit: WELCOME must name
      // the CP the mirror will hold, or the source builds on an older one and is refused.
      await this.rx.sessionGone(old);
      if (this.closed) return;
      old = this.rx.sessionFor(m.sourceUuid);
    }
    if (old && old.silentMs() < SESSION_SILENT_REPLACE_MS) throw new MirrorDirError(`source ${m.sourceUuid} is already connected (its earlier connection is still open here; the source retries)`);
    if (old) {
      this.log.warn({ source: m.sourceUuid, silentMs: old.silentMs() }, 'the source connected again while its old connection was silent: the old one is ended');
      await old.endSilent();
      if (this.closed) return;
      if (this.rx.sessionFor(m.sourceUuid)) throw new MirrorDirError(`source ${m.sourceUuid} is already connected (its earlier connection is still open here; the source retries)`);
    }
    const mirror = await this.rx.openMirror(m, this.log);
    if (this.closed) return;
    try {
      mirror.checkMember(); // it may have stayed open since another connection
    } catch (e) {
      // Refused at HELLO, before this session holds the mirror (end() sets lastError only
      // for a held one): the receiver's status must still say why.
      mirror.lastError = `refused the stream: ${e instanceof Error ? e.message : String(e)}`;
      throw e;
    }
    // Before the log starts this stream (which drops stored records from its first seq on).
    const c = mirror.baselinePartial ? undefined : mirror.committed?.sb;
    const writer = mirror.log.writer;
    const standing = decideStanding(
      { lineage: m.lineage, cp: m.sourceCp, lastSeq: m.lastSeq, ...(m.startedAtSeq >= 0 ? { startedAtSeq: m.startedAtSeq } : {}), processId: m.processId, earlier: m.earlier },
      {
        committed: c && { lineage: c.lineage, cp: c.cpNumber, nvlogSeq: c.nvlogSeq }, newestStoredSeq: mirror.log.newestStoredSeq, promoted: false,
        ...(writer ? { writer, newestStoredBeforeWriter: mirror.log.newestStoredBelow(writer.fromSeq) } : {}),
      },
    );
    this.rx.standings.set(m.sourceUuid, standing);
    if (standing.kind !== 'in-step') {
      const text = refusalText(standing, mirror.dir, false);
      mirror.lastError = text;
      this.log.error({ source: m.sourceUuid, ...standing }, 'the source and its mirror do not stand in step: refused, nothing in the mirror changes');
      throw new MirrorDirError(text);
    }
    this.mirror = mirror;
    // A block of the mirror that fails verification is read from the source while this session holds it (served; rewritten only under MirrorDir.healBlock's rule).
    mirror.repairSource = this.repairSource;
    this.applier = new CpApplier(mirror, this.rx.slabs, this.rx.exports, this.slicer, this.log);
    this.rx.exports?.attach(mirror);
    this.armIdle();
    await mirror.log.startDurably(Math.max(1, m.streamFromSeq), mirror.committed?.sb.nvlogSeq ?? 0, m.processId);
    if (this.closed) return;
    this.log.info({ source: m.sourceUuid, mode: m.mode, sourceCp: m.sourceCp, committedCp: mirror.committedCp, dir: mirror.dir }, 'source connected');
    this.send({
      type: MsgType.Welcome,
      committedCp: mirror.baselinePartial ? -1 : mirror.committedCp,
      root: rootBytes(mirror.committed?.sb),
      storedFromSeq: mirror.log.referableFromSeq,
      heldSeq: mirror.log.heldSeq,
      oldestPinnedCp: this.rx.exports?.oldestPinnedCp(m.sourceUuid) ?? -1,
      resumeCp: mirror.baselineResume?.cp ?? -1,
      resumeBlocks: mirror.baselineResume?.blocks ?? 0,
    });
    this.startNative();
  }

  private readonly reads = new RemoteReads('the source');
  private readonly repairSource: RepairSource = { name: 'the source', read: (pba) => this.remoteRead(pba, REPAIR_READ_TIMEOUT_MS) };

  /** Reads one block of the source's device (verify), or fails if the connection ends first. */
  private remoteRead(pba: number, timeoutMs?: number): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error('the source is not connected'));
    return this.reads.read((id) => this.send({ type: MsgType.ReadReq, id, pbas: [pba] }), timeoutMs);
  }

  /** Verifies this mirror's committed CP against the source (the CP is pinned like a reader's meanwhile). */
  async verify(): Promise<VerifyReport> {
    const mirror = this.mirror;
    if (!mirror || this.closed) throw new Error('the source is not connected');
    const view = this.rx.exports?.lookup(mirror.label.sourceUuid);
    if (!view || !(view instanceof MirrorView)) throw new Error('the mirror holds no committed CP yet');
    view.onRevoke(() => undefined); // pins the CP: the source keeps its blocks while we read them
    try {
      const here = { read: async (pba: number) => (await mirror.readRaw([pba])) };
      return await verifyCp(view.cp, here, { read: (pba) => this.remoteRead(pba) }, 'the source');
    } finally {
      view.detach();
    }
  }

  /** Sends the oldest CP a reader pins (so the source keeps its blocks). */
  sendPin(cp: number): void {
    if (this.mirror) this.send({ type: MsgType.Pin, oldestPinnedCp: cp });
  }

  silentMs(): number {
    return this.rx.clock.nowMs() - this.lastHeardMs;
  }

  /** Ends this session (its peer went silent) and waits until it no longer touches the mirror. */
  async endSilent(): Promise<void> {
    this.end(`replaced by a new connection from the same source after ${this.silentMs()} ms of silence`);
    await this.drained;
    await this.applier?.settled();
    await this.persisting?.catch(() => undefined);
    await this.rx.sessionGone(this);
  }

  end(reason: string, refused = false): void {
    if (this.closed) return;
    this.closed = true;
    this.idleTimer?.cancel();
    this.releaseBudget(); // what is still queued is never handled
    if (refused && this.mirror) this.mirror.lastError = reason;
    if (this.native && this.mirror) this.mirror.log.onRelease = undefined;
    if (refused) {
      this.log.warn({ source: this.sourceUuid, reason }, 'mirror stream refused; the committed image is unchanged');
      if (this.native) {
        // The thread sends the refusal, then ends the connection (the log is detached now).
        this.native.send({ type: MsgType.Refuse, reason });
        this.adoptLate(this.native.close(true, 1000));
        this.socket.destroy();
      } else {
        try {
          for (const part of this.writer.frame({ type: MsgType.Refuse, reason })) this.socket.write(part);
        } catch {
          /* the socket may be gone */
        }
        this.socket.end();
        // Read (and drop: onData ignores an ended session) what the source still sends until
        // it closes: a socket closed with data unread resets the connection, and a source
        // busy writing would see the reset instead of the reason (the native thread drains too).
        this.socket.resume();
        setTimeout(() => this.socket.destroy(), 1000).unref();
      }
    } else {
      this.log.info({ source: this.sourceUuid, reason }, 'source disconnected');
      if (this.native) this.adoptLate(this.native.close(false));
      this.socket.destroy();
    }
    this.applier?.wake();
    this.reads.failAll(new Error(`the source disconnected: ${reason}`));
    void this.rx.sessionEnded(this);
  }

  /** end() was called: no further message of this connection is handled (one may still be finishing: see release()). */
  get ended(): boolean {
    return this.closed;
  }

  /**
   * Waits until nothing of this session touches the mirror any more: the message being
   * handled (e.g. a CP commit's superblock write and sync, which goes on after end()),
   * a baseline progress record, a log persist, the writes in flight. Then the mirror
   * directory is released.
   */
  async release(): Promise<void> {
    await this.drained;
    await this.persisting?.catch(() => undefined);
    await this.applier?.idle();
    if (this.mirror) this.mirror.bytesIn += this.bytesIn;
    if (this.mirror?.repairSource === this.repairSource) this.mirror.repairSource = undefined;
  }
}

