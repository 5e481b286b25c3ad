/**
 * The source side of a mirror relationship (`serve DIR --mirror-to HOST:PORT`): plugs
 * into the engine's three seams (the log's append hook, the engine's replica gate, the
 * tree's CP sink) and keeps one connection to the destination.
 *
 *   sync:  every record is forwarded as it is appended; a client's reply waits for the
 *          destination's RECORD_ACK (FLUSH/FUA: its durable ack). On a plain connection
 *          the stream runs on a native thread (native-rx.ts, source mode): the records
 *          the NBD threads append go on the wire from their thread, and RECORD_ACKs
 *          release their held replies there, without the event loop
 *          (NVMIRROR_MIRROR_NATIVE=0 or NVMIRROR_MIRROR_SOURCE_NATIVE=0: the event loop
 *          carries it all). At each CP, data
 *          blocks the destination holds in its log go as references, metadata blocks
 *          as deltas against the blocks they replace, the rest as data, then the
 *          superblock. CPs are pipelined one deep: the next CP may start while the
 *          destination applies this one, not the one after.
 *   async: no forwarding; each CP is shipped the same way (data blocks as data).
 *   behind (link lost, new destination): a resync sends every block of a pinned
 *          committed state born after the destination's CP (a baseline: all of them),
 *          then its superblock; repeated until the destination holds the newest CP.
 *
 * Invariants:
 * - The tree never reuses a block the destination's committed CP or a CP its readers pin
 *   references (oldestNeededCp): the destination's committed image survives any crash
 *   or link loss, and resync is "born after the base". Frees are held from
 *   holdValidFromCp on (the tree's CP at start, or the destination's older CP re-held
 *   from the superblock ring); an older base gets a full baseline.
 * - A CP is shipped only when the destination holds exactly the CP before it; anything
 *   else goes through resync. A reference names a record sent on this connection (the
 *   destination reads it before the CP frame) and not released by the destination
 *   (>= storedFromSeq of its last ack, which names none while the destination drops
 *   records: its ring full). A record dropped after that ack was sent ends the
 *   connection (not a refusal), and the next one resyncs.
 * - A reply waits for the destination only while it can hold the record: not during a
 *   catch-up whose base precedes the stream (catchUpGap); then the policy answers, as
 *   while disconnected.
 * - Bounded: bytes queued on the socket never exceed QUEUED_BYTES_MAX (writers wait for
 *   room: source-link.ts, which owns the connection); an ack not received within stallTimeoutMs, or a queue that stays full
 *   (nothing sent) that long, drops the connection (policy available: the mirror is marked behind and client I/O
 *   goes on; strict: writes fail with EIO until it is back in sync). So does a peer that
 *   takes the connection but sends no WELCOME within stallTimeoutMs of HELLO (a wedged
 *   receiver, a half-open connection, something that is not `nvmirror receive`): the
 *   source reconnects instead of waiting on it forever.
 */
import * as crypto from 'crypto';
import type * as net from 'net';
import * as tls from 'tls';
import type { Logger } from 'pino';
import type { EngineVolume, ReplicaGate } from '../volume/engine';
import { acknowledgeSessions, mergeSessions, readSessions, type VolumeSession } from '../volume/sessions';
import type { AppendedRecord } from '../nvlog/log';
import type { BlockTreeApi, CommittedView, CpBlock, CpMeta, CpSink } from '../tree/types';
import { countBornAfter, walkBornAfterRuns } from '../tree/born-after';
import { Slicer } from '../util/work';
import { RateLimiter } from '../util/rate';
import { systemClock, type Clock } from '../io/types';
import { ProgressLine } from '../util/progress';
import type { NodeSide } from '../tree/diff';
import { SUPERBLOCK_ROOT_OFFSET, decodeSuperblock } from '../tree/layout';
import { RemoteReads, verifyCp, type VerifyReport } from './verify';
import { ResyncFrames, type ResyncLink } from './resync-frames';
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { deltaFrames, encodeCpBlocks, refFrames } from './cp-encode';
import { nativeRxEnabled } from './native-rx';
import { QUEUED_BYTES_MAX, SourceLink, type LinkConn } from './source-link';
import type { LinkArgs } from './link';
import { readRelationship, writeRelationship, type MirrorPolicy } from './relationship';
import { holdRecordedBase } from './base-hold';
import { readRole } from './role';
import { parseBaseInUse, parseStanding, type Standing } from './standing';
import {
  BLOCKS_PER_FRAME_MAX, EARLIER_SESSIONS_MAX, MsgType,
  type Message, type MirrorMode, type OutMessage,
} from './wire';
import { DELTA_FROM_ZEROES, ZERO_BLOCK, encodeDelta } from './delta';

export type MirrorState = 'disconnected' | 'baseline' | 'resyncing' | 'in-sync' | 'behind';
/** What status reports: a refused split brain shows as such, not as a plain disconnection. */
export type MirrorStatusState = MirrorState | 'split-brain' | 'promoted' | 'mirror-ahead';
export const STALL_TIMEOUT_MS_DEFAULT = 15_000;
/** How long a clean stop waits at most for the destination to commit the volume's last CP (drain()). */
export const STOP_DRAIN_MS_MAX = 30_000;
const PING_INTERVAL_MS = 5_000;
/** CP commits sent but not acknowledged before the next CP waits (the destination applies while we write the next). */
const CPS_UNACKED_MAX = 1;
/** Reads a destination may have outstanding (verify asks one at a time). */
const READS_ANSWERED_MAX = 4;
/** An acknowledgement older than this shows as `behind` in status (the link is up but the peer is slow or stalled). */
const STALE_ACK_MS = 1000;
/** A block asked of the mirror to repair one of ours (a client's read waits for it): at most this long. */
const REPAIR_READ_TIMEOUT_MS = 5_000;
/** Records unacknowledged this long on a live stream ask for a CP (askCp). */
const HELD_CP_AFTER_MS = 1000;
/** How long an interrupted baseline's pinned state is kept for a resume (it holds its blocks from reuse meanwhile). */
export const BASELINE_KEEP_MS_MAX = 10 * 60_000;
/** Pending reply gates (one per client request in flight; the NBD server bounds those). */
const WAITERS_MAX = 1 << 20;

export interface MirrorSourceOptions {
  dir: string;
  peer: { host: string; port: number };
  mode: MirrorMode;
  policy: MirrorPolicy;
  logger: Logger;
  tls?: tls.ConnectionOptions;
  /** How the link is secured, as given on the command line (persisted so a restart resumes). */
  link: LinkArgs;
  stallTimeoutMs?: number;
  /** Caps a baseline's and a resync's blocks and deltas on the wire (bytes per second; records and CPs are the clients' pace). */
  rateBytesPerSec?: number;
  /**
   * What the source's timing runs on (default: the system's clock): the stall timeout,
   * pings, the redial backoff, the lag and the rate limiter (tests: a simulated clock).
   */
  clock?: Clock;
  /** The network seam (source-link.ts): how to reach the peer instead of TCP/TLS. */
  dial?: (peer: { host: string; port: number }) => net.Socket;
}


export interface MirrorSourceStats {
  peer: string;
  mode: MirrorMode;
  policy: MirrorPolicy;
  state: MirrorStatusState;
  /** The destination welcomed this connection (TCP, TLS and HELLO done); a connection attempt in progress is not connected. */
  connected: boolean;
  sourceCp: number;
  destCp: number;
  lagCps: number;
  lagSeconds: number;
  /** Client bytes the destination does not hold yet (sync: 0 while every record is held; else written since its CP). */
  lagBytes: number;
  /** Bytes per second on the mirror link over the last second. */
  wireBytesPerSec: number;
  rootsEqual: boolean;
  /** CPs (and resyncs) the destination committed on this run, each with its root checked equal to ours. */
  cpsAcknowledged: number;
  rootMismatches: number;
  heldSeq: number;
  lastSeq: number;
  bytesOnWire: number;
  /** Frame bytes (headers included) by kind; fromDestination = acknowledgements and the rest it sent. */
  wireBytesByKind: { log: number; references: number; deltas: number; blocks: number; commits: number; fromDestination: number };
  clientBytes: number;
  dataBlocksSent: number;
  /** Of bytesOnWire, what went while baselines and resyncs ran (this process). */
  catchUpWireBytes: number;
  refsSent: number;
  deltasSent: number;
  /** async CPs begun and abandoned (CP_ABORT) because the peer was slower than the CPs; a resync followed. */
  cpsAbandoned: number;
  bytesSavedByRefs: number;
  resync: { baseCp: number; targetCp: number; blocksSent: number; bytesPerSec: number; totalBytes: number | undefined; etaSeconds: number | undefined } | undefined;
  /** --mirror-rate: the cap on a baseline's and a resync's traffic, bytes per second (absent: none). */
  rateLimitBytesPerSec?: number;
  lastError: string | undefined;
  /** Which side is primary and current, the last common CP, what each wrote since (undefined: not known yet). */
  standing: Standing | undefined;
  /** The oldest CP a reader of the destination's export is pinned to, held here too (-1: none). */
  readerPinnedCp: number;
}

interface Waiter {
  seq: number;
  durable: boolean;
  sinceMs: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** A connection as the source keeps it: the link's part (source-link.ts) and the stream's state. */
interface Conn extends LinkConn {
  /** With rx: the first record the NBD threads' appender forwards on it (theirs from it on are on the wire already). */
  nativeFromSeq: number;
  /** CP commits sent and not yet acknowledged, oldest first (at most CPS_UNACKED_MAX + 1). */
  cpAcks: Array<{ cp: number; sinceMs: number; clientBytes: number; root: Buffer; superblock: Buffer; resolve: () => void; done: Promise<void> }>;
  /** The newest CP whose commit went out on this connection (the destination applies in stream order). */
  shippedCp: number;
  /** When HELLO went out (undefined: TCP/TLS still connecting). */
  helloAtMs?: number;
}

export class MirrorSource implements CpSink, ReplicaGate {
  private readonly o: MirrorSourceOptions;
  private readonly log: Logger;
  private tree!: BlockTreeApi;
  private volume: EngineVolume | undefined;
  /** The connection to the destination (dial, frames, queue bound, byte counts, redial). */
  private readonly link: SourceLink<Conn>;
  private state: MirrorState = 'disconnected';
  /** The superblock of the destination's CP (persisted with it: holdCommitted needs it once that CP leaves the ring). */
  private destSuperblock: { cp: number; raw: Buffer } | undefined;
  /** The superblock of pinnedCp, while known (setPinned). */
  private pinnedSuperblock: { cp: number; raw: Buffer } | undefined;
  /** The CP this volume was promoted from (kept by a snapshot), offered as a failback base until the destination acknowledges a CP. */
  private promotedBase: { cp: number; root: Buffer } | undefined;
  /** Where the two sides stand, as the destination's last refusal said (standing.ts); cleared by a WELCOME. */
  private refusedStanding: Standing | undefined;
  private stopped = false;
  /** The destination's committed CP (-1: nothing, or unknown). */
  private destCp = -1;
  private destRoot: Buffer = Buffer.alloc(24);
  private pinnedCp = -1;
  /** Frees are held for a base only from this CP on (blocks freed before it may be reused). */
  private holdValidFromCp: number;
  private heldSeq = 0;
  private durableSeq = 0;
  private storedFromSeq = 1;
  private forwardFromSeq = 0;
  /** Since when a forwarded record waits for its RECORD_ACK (the oldest such, to within an ack); undefined: none. */
  private unackedSinceMs: number | undefined;
  /** Slices the encoding of a CP's blocks (encodeCpBlocks): records keep being forwarded meanwhile. */
  private readonly slicer = new Slicer();
  /** A release of the threads' held replies is queued (updateThreads). */
  private threadsQueued = false;
  /** The newest record sent on this connection: the destination reads it before any later CP frame. */
  private lastForwardedSeq = 0;
  private lastDurableReq = 0;
  private readonly waiters: Waiter[] = [];
  private shipping: { cp: number; blocks: number } | undefined;
  private cpInProgress: number | undefined;
  private resyncRunning = false;
  /** A resync sends metadata as deltas against the base; cleared after one that used them failed, set again by one that completed. */
  private deltasInResync = true;
  private resync: { baseCp: number; targetCp: number; blocksSent: number; progress: ProgressLine } | undefined;
  /** The pinned state of an interrupted baseline, kept (for BASELINE_KEEP_MS_MAX) so the destination can resume it. */
  private keptBaseline: { view: CommittedView; sinceMs: number } | undefined;
  /**
   * The newest record seq the volume held when this process attached to it (after
   * recovery), until a destination welcomes a stream: sent in HELLO, so a mirror that
   * holds records past it (ones this source lost with its NVRAM) is found even after this
   * source has written new records over the same seqs.
   */
  private startedAtSeq: number | undefined;
  /**
   * The volume's read-write sessions before this one since a destination last welcomed
   * one (volume/sessions.ts; e.g. `serve --no-mirror` after an NVRAM loss): sent in HELLO
   * with startedAtSeq, until a destination welcomes a stream.
   */
  private earlierSessions: VolumeSession[] = [];
  /**
   * This process's id in HELLO (wire.ts), its session's id: the destination's log
   * remembers which process sent the records it stores, so those this process sent on a
   * stream whose answer was lost (it may have taken the stream) count as its own when it
   * says HELLO again, and those of an earlier session as that session's.
   */
  private processId = crypto.randomBytes(8).toString('hex');
  private resumeOffer: { cp: number; blocks: number } = { cp: -1, blocks: 0 };
  private behindSinceMs = 0;
  private ticker: { cancel(): void } | undefined;
  private readonly clock: Clock;
  private clientBytes = 0;
  private rootMismatches = 0;
  private cpsShipped = 0;
  private clientBytesAtDestCp = 0;
  private wireAtLastTick = 0;
  private lastPingMs = 0;
  private wireRate = 0;
  private dataBlocksSent = 0;
  /** Bytes on the wire while baselines and resyncs ran (their blocks, and the records and CPs beside them), finished ones. */
  private catchUpWireBytes = 0;
  /** The link's byte count when the running catch-up began (undefined: none runs). */
  private catchUpWireFrom: number | undefined;
  private refsSent = 0;
  /** async CPs begun and abandoned because the peer was slower than the CPs. */
  private cpsAbandoned = 0;
  private deltasSent = 0;
  private lastError: string | undefined;
  /** A CP verify is reading on both sides (held like the base while it runs). */
  private verifyCp: number | undefined;
  private answering = 0;
  private readonly reads = new RemoteReads('the destination');

  constructor(opts: MirrorSourceOptions) {
    this.o = opts;
    this.clock = opts.clock ?? systemClock;
    this.log = opts.logger.child({ mirror: `${opts.peer.host}:${opts.peer.port}` });
    const native = opts.mode === 'sync' && nativeRxEnabled() && process.env.NVMIRROR_MIRROR_SOURCE_NATIVE !== '0';
    this.link = new SourceLink<Conn>(
      { peer: opts.peer, ...(opts.tls ? { tls: opts.tls } : {}), ...(opts.dial ? { dial: opts.dial } : {}), native, clock: this.clock },
      {
        connected: (c) => this.onConnected(c),
        message: (c, m) => this.onMessage(c, m),
        closing: (c, current) => {
          // No record goes to this link from here on (the threads' records come in first).
          if (c.rx && current) this.volume?.log.forwardNative(undefined);
        },
        dropped: (c, reason, current) => this.onDropped(c, reason, current),
        room: () => {
          // Replies held for room during a catch-up gap (gapFull) may go now.
          if (this.conn && !this.conn.closed && this.catchUpGap()) this.settleWaiters();
        },
      },
      (base) => ({ ...base, nativeFromSeq: Infinity, cpAcks: [], shippedCp: -1 }),
    );
    this.holdValidFromCp = Number.MAX_SAFE_INTEGER;
    this.armTicker();
  }

  /** tick() once a second, on the source's clock, until stop(). */
  private armTicker(): void {
    this.ticker = this.clock.setTimeout(() => {
      if (this.stopped) return;
      this.tick();
      this.armTicker();
    }, 1000);
  }

  /**
   * Step 1, before NVRAM recovery: becomes the tree's CP sink, so recovery's CPs are
   * held for the destination too. If the destination last acknowledged an older CP that
   * is still in the superblock ring, its blocks are held again (as before the restart),
   * so the relationship resumes with a resync instead of a new baseline.
   */
  async attachTree(tree: BlockTreeApi): Promise<void> {
    this.tree = tree;
    const cpNow = tree.stats().cpNumber;
    this.holdValidFromCp = cpNow;
    const held = await holdRecordedBase(this.o.dir, tree, this.log);
    if (held) {
      this.holdValidFromCp = held.destCp;
      this.destCp = held.destCp;
      if (held.superblock) this.destSuperblock = { cp: held.destCp, raw: held.superblock };
      if (held.pinned) {
        // Until the WELCOME says where the destination's readers are now.
        this.pinnedCp = held.pinned.cp;
        this.pinnedSuperblock = { cp: held.pinned.cp, raw: held.pinned.superblock };
      }
    }
    // A volume promoted from a mirror, with no relationship of its own yet: the CP it was
    // promoted from is kept by a snapshot, so a demoted old primary that holds it too
    // (failback) resyncs from there instead of taking a full baseline.
    const role = readRole(this.o.dir);
    const prev = readRelationship(this.o.dir);
    if ((!prev || prev.destCp < 0) && role && role.promotedFromCp <= cpNow && tree.listSnapshots().some((x) => x.name === role.baseSnapshot)) {
      this.promotedBase = { cp: role.promotedFromCp, root: Buffer.from(role.promotedRoot, 'hex') };
      this.holdValidFromCp = Math.min(this.holdValidFromCp, role.promotedFromCp);
      this.log.info({ baseCp: role.promotedFromCp, snapshot: role.baseSnapshot }, 'promoted volume: offering the CP it was promoted from as the base of a failback');
    }
    tree.setCpSink(this);
  }

  /** Step 2, once the volume is open: forwarding (sync), the reply gate, and the connection. */
  attachVolume(v: EngineVolume): void {
    assert(v.tree === this.tree, 'attachVolume: another tree');
    this.volume = v;
    // Before any client write (serve attaches before it listens): every record past this
    // one is this process's own.
    this.startedAtSeq = v.log.lastSeq;
    if (v.session) {
      assert(v.session.startedAtSeq === v.log.lastSeq, `session started at seq ${v.session.startedAtSeq}, the log is at ${v.log.lastSeq}`);
      this.processId = v.session.id;
      const recorded = readSessions(this.o.dir) ?? [];
      const own = recorded.findIndex((x) => x.id === v.session!.id);
      this.earlierSessions = mergeSessions(own >= 0 ? recorded.slice(0, own) : recorded, EARLIER_SESSIONS_MAX); // merged, never cut: the lowest start stays
      if (this.earlierSessions.length > 0) this.log.info({ sessions: this.earlierSessions.length, lowestStart: Math.min(...this.earlierSessions.map((x) => x.startedAtSeq)) }, 'earlier sessions since the destination last welcomed one: the destination checks its log against them');
    }
    v.log.onAppend = (r) => this.onAppend(r); // counts client bytes; forwards in sync mode
    if (this.o.mode === 'sync') v.setReplicaGate(this);
    // A block of ours that fails verification is asked of the mirror, which holds it at the
    // same pba once it has committed the CP that wrote it (the tree takes it only if it verifies).
    this.tree.setRepairSource({ name: `the mirror at ${this.o.peer.host}:${this.o.peer.port}`, read: (pba) => this.repairRead(pba) });
    this.updateThreads();
    this.saveState();
    this.connect();
  }

  // ---- the recorded relationship (relationship.ts) ----

  /**
   * The oldest CP the destination's readers are pinned to (-1: none). Its superblock is
   * kept while it is the destination's CP (a reader pins the committed CP), so the pin
   * can be recorded, and held again after a restart, once newer CPs land.
   */
  private setPinned(cp: number): void {
    this.pinnedCp = cp;
    if (cp >= 0 && this.pinnedSuperblock?.cp !== cp) this.pinnedSuperblock = this.destSuperblock?.cp === cp ? this.destSuperblock : undefined;
    if (cp < 0) this.pinnedSuperblock = undefined;
  }

  /** Records the relationship; names the destination's CP only while its blocks are held here (else -1: a baseline is due). */
  private saveState(): void {
    const destCp = this.destCp >= this.holdValidFromCp ? this.destCp : -1;
    const sb = destCp >= 0 && this.destSuperblock?.cp === destCp ? this.destSuperblock.raw.toString('base64') : undefined;
    const p = this.pinnedSuperblock;
    const pin = sb && p && p.cp === this.pinnedCp && p.cp < destCp ? { pinnedCp: p.cp, pinnedSuperblock: p.raw.toString('base64') } : {};
    try {
      writeRelationship(this.o.dir, { peer: `${this.o.peer.host}:${this.o.peer.port}`, mode: this.o.mode, policy: this.o.policy, link: this.o.link, ...(this.o.rateBytesPerSec !== undefined ? { rateBytesPerSec: this.o.rateBytesPerSec } : {}), destCp, ...(sb ? { destSuperblock: sb } : {}), ...pin });
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, 'cannot write the mirror state file');
    }
  }

  // ---- connection ----

  private get conn(): Conn | undefined {
    return this.link.conn;
  }

  private connect(): void {
    this.link.connect();
  }

  private onConnected(conn: Conn): void {
    const v = this.volume!;
    const rx = conn.rx;
    if (rx) {
      // The NBD threads stop while HELLO is queued; their records from the next seq on go
      // to the link as they append them, behind it.
      v.log.forwardNative((appender, fromSeq) => rx.forward(appender, fromSeq), (fromSeq) => this.hello(conn, fromSeq - 1));
      conn.nativeFromSeq = this.forwardFromSeq;
    } else {
      // Forwarding starts now (same tick as HELLO): every later record goes on the wire. The
      // log's last seq is read once: reading it takes in what the NBD threads appended
      // meanwhile, and a record taken in between would go out ahead of the HELLO.
      this.hello(conn, v.log.lastSeq);
    }
    conn.helloAtMs = this.clock.nowMs();
    conn.welcome.then(
      (w) => this.onWelcome(conn, w),
      () => undefined,
    );
  }

  private hello(conn: Conn, lastSeq: number): void {
    const v = this.volume!;
    const tree = v.tree.stats();
    this.forwardFromSeq = this.o.mode === 'sync' ? lastSeq + 1 : 0;
    this.lastForwardedSeq = this.forwardFromSeq - 1;
    this.updateThreads();
    this.send(conn, {
      type: MsgType.Hello, sourceUuid: v.tree.volumeUuid, sizeBytes: v.sizeBytes, deviceBlocks: tree.totalBlocks,
      nvramBytes: v.region.sizeBytes, mode: this.o.mode, sourceCp: tree.cpNumber, streamFromSeq: Math.max(1, this.forwardFromSeq),
      ...this.failbackOffer(),
      // (Never past lastSeq, which only grows from the seq it was taken at; the min keeps a
      // HELLO valid if that ever broke, and can only make the check stricter.)
      lastSeq, startedAtSeq: Math.min(this.startedAtSeq ?? -1, lastSeq), processId: this.processId, lineage: [...tree.lineage],
      earlier: this.startedAtSeq === undefined ? [] : this.earlierSessions,
    });
  }

  /**
   * The CP offered as the base of a failback: a promoted volume's base, else the
   * destination's CP this volume holds (a demoted promoted volume rolls back to it).
   */
  private failbackOffer(): { baseCp: number; baseRoot: Buffer } {
    if (this.promotedBase) return { baseCp: this.promotedBase.cp, baseRoot: this.promotedBase.root };
    const d = this.destSuperblock;
    if (d && d.cp === this.destCp && this.destCp >= this.holdValidFromCp) {
      return { baseCp: d.cp, baseRoot: Buffer.from(d.raw.subarray(SUPERBLOCK_ROOT_OFFSET, SUPERBLOCK_ROOT_OFFSET + 24)) };
    }
    return { baseCp: -1, baseRoot: Buffer.alloc(24) };
  }

  private onWelcome(conn: Conn, w: Message & { type: MsgType.Welcome }): void {
    if (conn.closed) return;
    // Welcomed: the destination now holds no record past startedAtSeq that is not this
    // process's own (it refuses a HELLO while it does: standing.ts).
    this.startedAtSeq = undefined;
    this.earlierSessions = [];
    try {
      acknowledgeSessions(this.o.dir);
    } catch (e) {
      // Left behind, the record only makes the next process's check stricter.
      this.log.warn({ err: e instanceof Error ? e.message : String(e) }, 'could not empty sessions.json');
    }
    const cpNow = this.tree.stats().cpNumber;
    if (w.committedCp > cpNow) {
      // The destination holds a CP this volume never had: another history. Never overwrite it.
      this.log.error({ destCp: w.committedCp, sourceCp: cpNow }, 'the destination holds a newer CP than this volume: histories diverged; refusing to mirror over it');
      this.drop(conn, `the destination is at CP ${w.committedCp}, ahead of this volume (CP ${cpNow}): diverged histories`);
      return;
    }
    this.refusedStanding = undefined;
    conn.welcomed = true;
    this.destCp = w.committedCp;
    const pb = this.promotedBase;
    if (pb && !(w.committedCp === pb.cp && w.root.equals(pb.root))) {
      // Until a CP of ours is acknowledged, the only common state we can prove is the
      // promote's base (same CP number, same root): anything else gets a baseline.
      if (w.committedCp >= 0) this.log.warn({ destCp: w.committedCp, baseCp: pb.cp }, 'the destination does not hold the CP this volume was promoted from: full baseline');
      this.destCp = -1;
    }
    conn.shippedCp = w.committedCp;
    this.destRoot = w.root;
    this.setPinned(w.oldestPinnedCp);
    this.heldSeq = w.heldSeq;
    // No ack is due for the stream's records while the catch-up runs (catchUpGap): the
    // catch-up has its own stall checks (the queue, the commit's ack).
    if (this.catchUpGap()) this.unackedSinceMs = undefined;
    this.durableSeq = 0;
    this.storedFromSeq = w.storedFromSeq;
    this.lastDurableReq = 0;
    this.resumeOffer = { cp: w.resumeCp, blocks: w.resumeBlocks };
    this.log.info({ destCp: w.committedCp, sourceCp: this.tree.stats().cpNumber }, 'mirror connected');
    this.settleWaiters();
    void this.catchUp(conn);
  }

  private onMessage(conn: Conn, m: Message): void {
    switch (m.type) {
      case MsgType.RecordAck: {
        const gapBefore = this.catchUpGap();
        if (m.heldSeq > this.heldSeq) this.unackedSinceMs = m.heldSeq >= this.lastForwardedSeq ? undefined : this.clock.nowMs();
        this.heldSeq = Math.max(this.heldSeq, m.heldSeq);
        if (this.catchUpGap()) this.unackedSinceMs = undefined;
        // The catch-up closed with records outstanding: the destination may have dropped
        // records while it could release none (ring full): those are held once a CP covers them.
        // (While it drops records, its acks' storedFromSeq names none as referable.)
        else if (gapBefore && this.heldSeq < this.lastForwardedSeq) this.askCp('the catch-up ended with records outstanding');
        this.durableSeq = Math.max(this.durableSeq, m.durableSeq);
        this.storedFromSeq = m.storedFromSeq;
        this.settleWaiters();
        return;
      }
      case MsgType.CpAck:
        const head = conn.cpAcks[0];
        if (!head || head.cp !== m.cp) {
          this.drop(conn, `destination acknowledged CP ${m.cp}, which was not the next one sent`);
          return;
        }
        if (!m.root.equals(head.root)) {
          // Block-identical by construction: a different root means the destination did not apply what was sent.
          this.rootMismatches++;
          this.log.error({ cp: m.cp, sent: head.root.toString('hex'), got: m.root.toString('hex') }, 'the destination committed a different root than the source');
          this.drop(conn, `CP ${m.cp}: the destination's root differs from the source's`);
          return;
        }
        conn.cpAcks.shift();
        // Only a committed CP shows a healthy destination: one that welcomes and then
        // refuses (a full or failing disk) keeps the backoff growing.
        this.link.resetBackoff();
        this.destCp = m.cp;
        this.destSuperblock = { cp: m.cp, raw: head.superblock };
        this.promotedBase = undefined; // the relationship has its own base now
        this.destRoot = m.root;
        this.cpsShipped++;
        this.clientBytesAtDestCp = head.clientBytes;
        head.resolve();
        this.saveState();
        return;
      case MsgType.Pin:
        this.setPinned(m.oldestPinnedCp);
        return;
      case MsgType.ReadReq:
        if (this.answering >= READS_ANSWERED_MAX) {
          this.drop(conn, `the destination has more than ${READS_ANSWERED_MAX} reads outstanding`);
          return;
        }
        this.answering++;
        void this.answerRead(conn, m).finally(() => this.answering--);
        return;
      case MsgType.ReadResp:
        if (!this.reads.answer(m.id, m.data)) this.drop(conn, `read response ${m.id} that was not asked for`);
        return;
      case MsgType.Refuse:
        this.lastError = `destination refused: ${m.reason}`;
        this.refusedStanding = parseStanding(m.reason);
        this.baseRefused(m.reason);
        // A reconnect that finds its earlier connection still open there (not yet read to
        // its end, or silent for less than the receiver's replace time) is retried: not an error.
        if (/ is already connected /.test(m.reason)) this.log.warn({ reason: m.reason }, 'the destination still holds the earlier connection: retrying');
        else this.log.error({ reason: m.reason }, 'the destination refused the mirror stream');
        this.drop(conn, `refused: ${m.reason}`);
        return;
      default:
        this.drop(conn, `unexpected frame type ${m.type} from the destination`);
    }
  }

  /**
   * A refusal for a block the destination's committed CP uses: this volume holds that CP
   * (the base) and never writes such a block while the hold is whole, so its copy of the
   * base was damaged (a block reused, e.g. by a session that did not hold it). Resyncing
   * from it would be refused forever: the base is dropped and a full baseline follows.
   */
  private baseRefused(reason: string): void {
    const b = parseBaseInUse(reason);
    if (!b || b.cp !== this.destCp || this.destCp < this.holdValidFromCp) return;
    this.log.error({ destCp: this.destCp, pba: b.pba }, 'this volume\'s copy of the destination\'s CP is damaged (a block of it was reused here while it was not held): the destination gets a full baseline');
    this.holdValidFromCp = this.destCp + 1;
    this.saveState(); // at once: a restart must not trust the old base either
  }

  private drop(conn: Conn, reason: string): void {
    this.link.drop(conn, reason);
  }

  /** After the link closed `conn` (source-link.ts): what the mirror's state makes of it. */
  private onDropped(conn: Conn, reason: string, current: boolean): void {
    if (current) {
      // The next connection forwards only after its own HELLO (onConnected sets this again):
      // a record written on it before then would reach the destination ahead of the HELLO.
      this.forwardFromSeq = 0;
      this.unackedSinceMs = undefined;
    }
    if (reason !== 'connection closed' || this.state !== 'disconnected') {
      if (!this.stopped) this.log.warn({ reason }, 'mirror disconnected');
    }
    if (!this.stopped) this.lastError = reason;
    if (this.state !== 'disconnected') this.behindSinceMs = this.clock.nowMs();
    this.state = 'disconnected';
    this.shipping = undefined;
    for (const a of conn.cpAcks.splice(0)) a.resolve(); // CPs go on locally; the destination catches up by resync
    this.reads.failAll(new Error(`mirror connection lost: ${reason}`));
    this.link.wakeDrain();
    this.settleWaiters();
  }

  private send(conn: Conn, m: OutMessage): void {
    this.link.send(conn, m);
  }

  /** How long the oldest unacknowledged record or CP has waited (0: none). */
  private unackedMs(): number {
    const conn = this.conn;
    let oldest = this.unackedSinceMs ?? this.clock.nowMs();
    for (const w of this.waiters) oldest = Math.min(oldest, w.sinceMs);
    if (conn && conn.cpAcks.length > 0) oldest = Math.min(oldest, conn.cpAcks[0]!.sinceMs);
    return this.clock.nowMs() - oldest;
  }

  /** A CP asked for by askCp() is running. */
  private cpAsked = false;
  /**
   * Asks the engine for a CP now. The destination holds a record it dropped (its ring
   * full: during a catch-up it can release nothing, and replies do not wait) only once a
   * committed CP covers it, and it keeps dropping until then; without this the replies
   * waiting for such records wait for the CP timer (10 s by default) or a full half.
   */
  private askCp(why: string): void {
    const v = this.volume;
    if (!v || this.cpAsked || this.stopped) return;
    this.cpAsked = true;
    this.log.debug({ why }, 'mirror: a CP asked for');
    v.checkpoint()
      .catch((e: unknown) => this.log.warn({ err: e instanceof Error ? e.message : String(e) }, 'mirror: the CP asked for failed'))
      .finally(() => (this.cpAsked = false));
  }

  private tick(): void {
    const conn = this.conn;
    const now = this.clock.nowMs();
    const wire = this.link.wireBytes();
    this.wireRate = Math.max(0, wire - this.wireAtLastTick);
    this.wireAtLastTick = wire;
    const stall = this.o.stallTimeoutMs ?? STALL_TIMEOUT_MS_DEFAULT;
    if (this.keptBaseline && now - this.keptBaseline.sinceMs > BASELINE_KEEP_MS_MAX) {
      this.log.warn({ cp: this.keptBaseline.view.cpNumber }, 'an interrupted baseline was not resumed in time: its pinned blocks are released (the next baseline starts over)');
      this.keptBaseline.view.release();
      this.keptBaseline = undefined;
    }
    if (conn && !conn.closed) {
      this.link.sentSinceTick(conn);
      // The oldest record forwarded and not acknowledged (the NBD threads hold their replies
      // for it), or the oldest waiting reply. In a catch-up gap replies wait for room, not
      // acks: a link that moves nothing is found by the room wait below, which says so.
      const oldest = this.inGap(conn) ? this.unackedSinceMs ?? now : this.waiters.reduce((a, w) => Math.min(a, w.sinceMs), this.unackedSinceMs ?? now);
      if (!conn.welcomed && conn.helloAtMs !== undefined && now - conn.helloAtMs > stall) this.drop(conn, `no WELCOME from the destination within ${stall} ms of HELLO (a stalled peer, or not an nvmirror receive)`);
      else if (now - oldest > stall) this.drop(conn, `no acknowledgement from the destination for ${stall} ms (stalled peer)`);
      else if (conn.cpAcks.length > 0 && now - conn.cpAcks[0]!.sinceMs > stall) this.drop(conn, `CP ${conn.cpAcks[0]!.cp} not acknowledged within ${stall} ms (stalled peer)`);
      else if (this.link.roomWaitSinceMs !== undefined && now - this.link.roomWaitSinceMs > stall) this.drop(conn, `the destination read nothing for ${stall} ms with ${QUEUED_BYTES_MAX} bytes queued (stalled peer)`);
      // Not before WELCOME: a connection still connecting would queue the PING ahead of its HELLO.
      else if (conn.welcomed && now - this.lastPingMs >= PING_INTERVAL_MS) {
        this.lastPingMs = now;
        this.send(conn, { type: MsgType.Ping, nowMs: now });
      }
      // Records unacknowledged for a second on a live stream: a CP lets a destination that
      // dropped them hold them again (askCp).
      if (!conn.closed && this.streaming() && this.unackedSinceMs !== undefined && now - this.unackedSinceMs > HELD_CP_AFTER_MS) this.askCp(`records unacknowledged for ${now - this.unackedSinceMs} ms`);
    }
  }

  // ---- sync: the append hook and the reply gate ----

  private onAppend(r: AppendedRecord): void {
    this.clientBytes += r.type === 1 ? r.lengthBytes : 0;
    const conn = this.conn;
    if (this.o.mode !== 'sync' || !conn || conn.closed || r.seq < this.forwardFromSeq || this.forwardFromSeq === 0) return;
    this.lastForwardedSeq = r.seq;
    if (conn.rx) {
      // The NBD threads' records from nativeFromSeq on went to the link as they appended
      // them (its ack may have come in before this: then nothing waits for one).
      if (r.seq > this.heldSeq && !this.inGap(conn)) this.unackedSinceMs ??= this.clock.nowMs();
      if (r.viaThread === true && r.seq >= conn.nativeFromSeq) return;
    } else if (!this.inGap(conn)) this.unackedSinceMs ??= this.clock.nowMs();
    this.link.sendRecord(conn, r);
    this.boundGap(conn);
  }

  /** A record queued during a catch-up gap: past the queue's bound the threads hold their replies (gapFull). */
  private boundGap(conn: Conn): void {
    if (this.inGap(conn) && this.link.queued(conn) > QUEUED_BYTES_MAX) this.applyThreads();
  }

  /** This welcomed connection's destination cannot hold its records yet (catchUpGap); before WELCOME that is not known. */
  private inGap(conn: Conn): boolean {
    return conn.welcomed && this.catchUpGap();
  }

  wait(seq: number, durable: boolean): Promise<void> {
    const ok = durable ? this.durableSeq : this.heldSeq;
    if (seq <= ok) return Promise.resolve();
    if (!this.streaming() && !this.gapFull()) return this.unreachable();
    const conn = this.conn!;
    if (this.waiters.length >= WAITERS_MAX) return Promise.reject(new VolumeError('ENOMEM', 'too many requests waiting for the mirror'));
    if (durable && seq > this.lastDurableReq) {
      this.lastDurableReq = seq;
      this.send(conn, { type: MsgType.DurableReq, seq });
    }
    return new Promise((resolve, reject) => this.waiters.push({ seq, durable, sinceMs: this.clock.nowMs(), resolve, reject }));
  }

  private unreachable(): Promise<void> {
    if (this.o.policy === 'strict') return Promise.reject(new VolumeError('EIO', 'the mirror is not in sync and the policy is strict'));
    return Promise.resolve();
  }

  /** Sync: the NBD threads' held replies follow the same rule as wait() (engine.replicaProgress). */
  readonly threadReplies = true;

  /**
   * While streaming, the release waits for the end of the current batch of messages (a
   * microtask): acks that arrive together send the threads' replies in one go. Any other
   * state applies at once; a queued release re-reads the state when it runs.
   */
  private updateThreads(): void {
    if (!this.volume || this.o.mode !== 'sync') return;
    if (!this.streaming()) {
      this.applyThreads();
      return;
    }
    if (this.threadsQueued) return;
    this.threadsQueued = true;
    queueMicrotask(() => {
      this.threadsQueued = false;
      this.applyThreads();
    });
  }

  private applyThreads(): void {
    // A catch-up's link queue over its bound: the threads hold their replies (gate on, no
    // release) until it drains, as wait() holds the event loop's (gapFull).
    this.volume?.replicaProgress(this.streaming() || this.gapFull() ? this.heldSeq : this.o.policy === 'strict' ? 'fail' : 'open');
  }

  /**
   * During a catch-up gap the replies do not wait for the destination, but its records
   * still go on the link: while more than QUEUED_BYTES_MAX is queued there they wait for
   * room instead (the clients' pace becomes the link's, as under acks), so the queue stays
   * bounded however fast the clients write and however slow the link is. (The NBD
   * threads' own records stop at the native link's cap; past it they come here.)
   */
  private gapFull(): boolean {
    const conn = this.conn;
    if (conn === undefined || conn.closed || !this.inGap(conn) || this.link.queued(conn) <= QUEUED_BYTES_MAX) return false;
    // Room is asked for (EV_ROOM / 'drain' -> wakeDrain -> settleWaiters); a link that takes
    // nothing meanwhile is a stalled peer (tick).
    this.link.askRoom(conn);
    return true;
  }

  /**
   * Records go on the wire and acks come back: the connection is up and past its HELLO,
   * and the destination can hold the stream's records (no catch-up gap once welcomed).
   */
  private streaming(): boolean {
    const conn = this.conn;
    if (conn === undefined || conn.closed || this.forwardFromSeq === 0) return false;
    return !this.inGap(conn);
  }

  /**
   * The destination holds neither the records before this stream nor a CP that covers
   * them (a baseline, or a resync after writes it missed): it acknowledges none of the
   * stream's records until the catch-up's CP commits (its held mark is the committed
   * CP's until then: dest-log.ts), however long the catch-up takes. Meanwhile the
   * replies follow the policy as while disconnected (available: answered from the local
   * NVRAM; strict: EIO), the records still go to it, and the gap closes with the first
   * RECORD_ACK at or past the stream's start.
   */
  private catchUpGap(): boolean {
    return this.forwardFromSeq > 0 && this.heldSeq < this.forwardFromSeq - 1;
  }

  private settleWaiters(): void {
    this.updateThreads();
    if (this.waiters.length === 0) return;
    const streaming = this.streaming();
    const full = !streaming && this.gapFull();
    let kept = 0;
    for (const w of this.waiters) {
      const ok = w.durable ? this.durableSeq : this.heldSeq;
      if (w.seq <= ok) w.resolve();
      else if (!streaming && !full) {
        if (this.o.policy === 'strict') w.reject(new VolumeError('EIO', this.conn && !this.conn.closed ? 'the mirror is catching up (it holds no write until its catch-up commits) and the policy is strict' : 'the mirror connection was lost and the policy is strict'));
        else w.resolve();
      } else this.waiters[kept++] = w;
    }
    this.waiters.length = kept;
  }

  // ---- the CP sink ----

  oldestNeededCp(): number | undefined {
    if (this.destCp < this.holdValidFromCp) return undefined; // nothing we can keep intact: a baseline follows
    let cp = this.pinnedCp >= 0 ? Math.min(this.destCp, this.pinnedCp) : this.destCp;
    if (this.verifyCp !== undefined) cp = Math.min(cp, this.verifyCp);
    return cp;
  }

  holdBroken(cp: number, reason: string): void {
    this.log.error({ cp, reason }, 'mirror base lost: out of space while keeping the destination\'s blocks; the destination gets a full baseline');
    this.holdValidFromCp = cp + 1;
    this.saveState(); // at once, before any block is reused: a restart must not trust the old base
  }

  async blocks(cp: number, blocks: readonly CpBlock[]): Promise<void> {
    if (this.cpInProgress !== cp) this.cpInProgress = cp;
    const conn = this.conn;
    if (!conn || conn.closed || this.state !== 'in-sync') return;
    if (!this.shipping) {
      if (conn.shippedCp !== cp - 1) {
        this.state = 'behind';
        return;
      }
      if (this.o.mode === 'async' && conn.cpAcks.length > CPS_UNACKED_MAX) {
        // async never waits for the peer: it falls behind and catches up by resync.
        this.fallBehind(`CP ${conn.cpAcks[0]!.cp} still unacknowledged`);
        return;
      }
      this.shipping = { cp, blocks: 0 };
      this.send(conn, { type: MsgType.CpBegin, cp, baseCp: cp - 1, kind: 'cp' });
    }
    const ship = this.shipping;
    if (ship.cp !== cp) return;
    const sync = this.o.mode === 'sync';
    const { refs, deltas, data } = await encodeCpBlocks(
      blocks,
      (seq) => sync && seq >= this.storedFromSeq && seq <= this.lastForwardedSeq && seq >= this.forwardFromSeq,
      (pba, count, dst) => this.tree.readRaw(pba, count, dst),
      () => this.slicer.maybeYield(),
    );
    for (const group of refFrames(refs)) {
      if (!(await this.room(conn, cp))) return;
      this.send(conn, { type: MsgType.CpRefs, cp, refs: group });
    }
    for (const group of deltaFrames(deltas)) {
      if (!(await this.room(conn, cp))) return;
      this.send(conn, { type: MsgType.CpDeltas, cp, deltas: group });
    }
    if (!(await this.sendBlocks(conn, cp, data))) return;
    ship.blocks += refs.length + deltas.length + data.length;
    this.refsSent += refs.length;
    this.deltasSent += deltas.length;
  }

  /**
   * Sends data blocks of CP `cp` (as room() says); false when the CP was abandoned (async)
   * or the connection dropped meanwhile. (A resync's blocks go out from sendResync,
   * through resync-frames.ts.)
   */
  private async sendBlocks(conn: Conn, cp: number, blocks: readonly CpBlock[]): Promise<boolean> {
    for (let i = 0; i < blocks.length; i += BLOCKS_PER_FRAME_MAX) {
      if (!(await this.room(conn, cp))) return false;
      const part = blocks.slice(i, i + BLOCKS_PER_FRAME_MAX);
      // Views of the NVRAM half, which the next CP reuses while the socket may still hold them: copied.
      const data = [Buffer.concat(part.map((b) => b.buf))];
      const pbas = part.map((b) => b.pba);
      if (conn.rx && part.every((b) => b.crc !== undefined)) {
        // Data blocks (their crc32c known): the native link sends the copy itself, no second copy or checksum pass.
        this.link.sendLent(conn, { type: MsgType.CpBlocks, cp, pbas, data, crcs: part.map((b) => b.crc!) });
      } else {
        this.send(conn, { type: MsgType.CpBlocks, cp, pbas, data });
      }
      this.dataBlocksSent += part.length;
    }
    return !conn.closed;
  }

  /**
   * Room on the socket for the next frame of CP `cp`. sync waits for it (the peer's pace
   * is the clients' pace); async never makes a CP wait for the peer: with the queue full
   * it abandons the CP (CP_ABORT) and the mirror catches up by resync, off the CP path.
   */
  private async room(conn: Conn, cp: number): Promise<boolean> {
    if (this.o.mode === 'async' && this.link.queued(conn) > QUEUED_BYTES_MAX) {
      if (!conn.closed && this.shipping?.cp === cp) {
        this.shipping = undefined;
        this.send(conn, { type: MsgType.CpAbort, cp });
        this.cpsAbandoned++;
        this.fallBehind(`CP ${cp} abandoned: ${QUEUED_BYTES_MAX} bytes queued for the peer`);
      }
      return false;
    }
    await this.link.waitRoom(conn);
    return !conn.closed && (this.o.mode === 'sync' || this.shipping?.cp === cp);
  }

  /** async: the peer is slower than the CPs; the next commit starts a resync (catchUp). */
  private fallBehind(why: string): void {
    if (this.state === 'in-sync') {
      this.log.info({ why }, 'mirror behind: the peer is slower than the CPs (async); it catches up by resync');
      this.behindSinceMs = this.clock.nowMs();
    }
    this.state = 'behind';
  }

  async committed(cp: number, slot: number, superblock: Buffer, _meta: CpMeta): Promise<void> {
    this.cpInProgress = undefined;
    const conn = this.conn;
    if (conn && !conn.closed && this.state === 'in-sync' && !this.shipping && conn.shippedCp === cp - 1
      && (this.o.mode === 'sync' || conn.cpAcks.length <= CPS_UNACKED_MAX)) {
      // A CP that wrote no blocks (e.g. only a snapshot op).
      this.shipping = { cp, blocks: 0 };
      this.send(conn, { type: MsgType.CpBegin, cp, baseCp: cp - 1, kind: 'cp' });
    }
    const ship = this.shipping;
    this.shipping = undefined;
    if (conn && !conn.closed && ship && ship.cp === cp) {
      // Pipelined: the next CP may start while the destination applies this one (it
      // applies in stream order); reuse stays gated on acknowledged CPs (oldestNeededCp).
      void this.commitOnDest(conn, cp, slot, ship.blocks, superblock);
      // async goes on at once: its next CP falls behind instead if this one is still unacknowledged then.
      while (this.o.mode === 'sync' && conn.cpAcks.length > CPS_UNACKED_MAX && !conn.closed) await conn.cpAcks[0]!.done;
    }
    if (conn?.shippedCp !== cp && this.state === 'in-sync') this.state = 'behind';
    // Not before WELCOME: until then destCp is the last connection's, and a resync from it
    // is refused when the destination committed a CP whose ack the drop lost.
    if (conn && !conn.closed && conn.welcomed && this.state !== 'in-sync') void this.catchUp(conn);
  }

  private async commitOnDest(conn: Conn, cp: number, slot: number, blockCount: number, superblock: Buffer): Promise<void> {
    const root = superblock.subarray(SUPERBLOCK_ROOT_OFFSET, SUPERBLOCK_ROOT_OFFSET + 24);
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    conn.cpAcks.push({ cp, sinceMs: this.clock.nowMs(), clientBytes: this.clientBytes, root, superblock: Buffer.from(superblock), resolve, done });
    this.send(conn, { type: MsgType.CpCommit, cp, slot, blockCount, superblock });
    conn.shippedCp = cp;
    await done;
  }

  // ---- resync / baseline ----

  /** Brings the destination to the newest committed CP, then switches to CP shipping. */
  private async catchUp(conn: Conn): Promise<void> {
    if (this.resyncRunning) return;
    this.resyncRunning = true;
    try {
      while (!conn.closed && !this.stopped) {
        const tree = this.tree;
        if (this.destCp === tree.stats().cpNumber && this.cpInProgress === undefined && conn.cpAcks.length === 0) {
          if (this.state !== 'in-sync') this.log.info({ cp: this.destCp }, 'mirror in sync');
          this.state = 'in-sync';
          this.behindSinceMs = 0;
          return;
        }
        if (this.cpInProgress !== undefined || conn.cpAcks.length > 0) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const intact = this.destCp >= 0 && this.destCp >= this.holdValidFromCp;
        const base = intact ? this.destCp : -1;
        let view: CommittedView;
        let skip = 0;
        const kept = this.keptBaseline;
        this.keptBaseline = undefined;
        if (base < 0 && kept && this.resumeOffer.cp === kept.view.cpNumber && this.resumeOffer.blocks > 0) {
          view = kept.view;
          skip = this.resumeOffer.blocks;
        } else {
          kept?.view.release();
          view = tree.pinCommitted();
        }
        let ok = false;
        try {
          await this.sendResync(conn, view, base, skip);
          ok = !conn.closed;
        } finally {
          // An interrupted baseline keeps its pinned state: the destination resumes where its progress is durable.
          if (!ok && base < 0 && !this.stopped) this.keptBaseline = { view, sinceMs: this.clock.nowMs() };
          else view.release();
        }
      }
    } catch (e) {
      this.drop(conn, `resync failed: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      this.resyncRunning = false;
      this.resync = undefined;
    }
  }

  /**
   * Sends every block of `view` born after baseCp, then its superblock. `skip` > 0
   * resumes an interrupted baseline: the walk's order is deterministic for a view, so
   * the first `skip` blocks (durable on the destination) are walked but not sent.
   */
  private async sendResync(conn: Conn, view: CommittedView, baseCp: number, skip: number): Promise<void> {
    this.state = baseCp < 0 ? 'baseline' : 'resyncing';
    const sb = decodeSuperblock(view.superblock);
    const total = baseCp < 0 && typeof sb !== 'string' ? sb.usedBlocks * 4096 : undefined;
    const what = baseCp < 0 ? `mirror baseline to CP ${view.cpNumber}` : `mirror resync CP ${baseCp} -> ${view.cpNumber}`;
    const wireFrom = this.link.wireBytes();
    this.catchUpWireFrom = wireFrom;
    this.resync = { baseCp, targetCp: view.cpNumber, blocksSent: skip, progress: new ProgressLine(what, total) };
    const progress = this.resync.progress;
    this.log.info({ baseCp, targetCp: view.cpNumber, resumeAtBlock: skip }, skip > 0 ? 'mirror baseline resumed' : baseCp < 0 ? 'mirror baseline started' : 'mirror resync started');
    const t0 = this.clock.nowMs();
    this.send(conn, { type: MsgType.CpBegin, cp: view.cpNumber, baseCp, kind: skip > 0 ? 'resume' : 'resync' });
    const progressed = (blocks: number): void => {
      if (!this.resync) return;
      this.resync.blocksSent += blocks;
      progress.update(this.resync.blocksSent * 4096);
    };
    const frames = new ResyncFrames(view.cpNumber, this.resyncLink(conn), {
      // --mirror-rate paces the walk's frames (the records and CPs beside it go at the clients' pace).
      limiter: this.o.rateBytesPerSec !== undefined ? new RateLimiter(this.o.rateBytesPerSec, this.clock) : undefined,
      blocksSent: (n) => {
        this.dataBlocksSent += n;
        progressed(n);
      },
      deltasSent: (n) => {
        this.deltasSent += n;
        progressed(n);
      },
    });
    // A resync's metadata blocks travel as deltas against their counterparts in the base
    // (the destination's committed CP, whose blocks this volume holds intact), as a CP's
    // do against the blocks they replace: an address block with a few new pointers costs
    // a few hundred bytes, not 4 KiB; a node new since the base goes as a delta from
    // zeroes. Counterparts only from the superblock whose root the destination reported
    // (WELCOME, CP_ACK): then its committed tree is that one. A delta the destination
    // cannot apply fails the resync; the next one sends whole blocks (deltasInResync).
    const kept = this.destSuperblock;
    const baseSb = baseCp >= 0 && this.deltasInResync && kept?.cp === baseCp && kept.raw.subarray(SUPERBLOCK_ROOT_OFFSET, SUPERBLOCK_ROOT_OFFSET + 24).equals(this.destRoot) ? kept.raw : undefined;
    let count = 0;
    let usedDeltas = false;
    // A resync's total is not in the superblock: counted beside the walk (address and
    // space-map nodes born after the base only), for the progress's "of" and ETA.
    let walking = true;
    const counted = total !== undefined ? Promise.resolve() : countBornAfter(view, baseCp, () => !walking || conn.closed || this.stopped).then(
      (n) => progress.setTotal(n * 4096),
      (e: unknown) => this.log.debug({ err: e instanceof Error ? e.message : String(e) }, 'resync total not counted'),
    );
    try {
      await walkBornAfterRuns(view, baseCp, async (run) => {
        // A metadata block without a counterpart (a node new since the base) goes as a
        // delta from zeroes, as a CP sends a new node: a sparse one is mostly zeroes.
        if (baseCp >= 0 && this.deltasInResync && run.metadata) {
          assert(skip === 0 && run.ptrs.length === 1, 'metadata comes in single blocks');
          const delta = encodeDelta(run.prev?.buf ?? ZERO_BLOCK, run.buf);
          if (delta) {
            await frames.addDelta({ pba: run.ptrs[0]!.pba, prevPba: run.prev?.pba ?? DELTA_FROM_ZEROES, crc: run.ptrs[0]!.crc, delta });
            count++;
            usedDeltas = true;
            run.release();
            return;
          }
        }
        // A resumed baseline skips the first `skip` blocks of the walk (the same order every time).
        const from = Math.max(0, Math.min(run.ptrs.length, skip - count));
        count += run.ptrs.length;
        await frames.addRun(run.ptrs, run.buf, from, run.release);
      }, { shouldStop: () => conn.closed || this.stopped, baseSuperblock: baseSb });
      await frames.flush();
      if (conn.closed) return;
      await this.commitOnDest(conn, view.cpNumber, view.slot, count, view.superblock);
      this.deltasInResync = true;
    } finally {
      // Deltas in a resync that did not complete: the next one sends whole blocks, in case
      // the destination could not apply them (a base it does not hold as this side thinks).
      if (usedDeltas && conn.closed) this.deltasInResync = false;
      // The count reads the view: done before the view goes.
      walking = false;
      await counted;
      progress.finish();
      this.catchUpWireBytes += this.link.wireBytes() - wireFrom;
      this.catchUpWireFrom = undefined;
      // Its frames still queued stay reachable through the link until sent; the walk's
      // buffers (and its pool) go with it: none is given back to it from now on.
      frames.end();
    }
    if (conn.closed) return;
    this.log.info({ baseCp, cp: view.cpNumber, blocks: count, resumedAt: skip, ms: this.clock.nowMs() - t0 }, baseCp < 0 ? 'mirror baseline done' : 'mirror resync done');
  }

  /** How a resync's frames reach this connection (resync-frames.ts). */
  private resyncLink(conn: Conn): ResyncLink {
    return {
      get closed() {
        return conn.closed;
      },
      waitRoom: () => this.link.waitRoom(conn),
      send: (m) => this.send(conn, m),
      // The native link sends the blocks from the walk's buffers (no copy) and says when (EV_SENT).
      sendLent: (m, written) => this.link.sendLent(conn, m, written),
    };
  }

  // ---- read repair (verified-read.ts asks for a block of ours that failed verification) ----

  private repairRead(pba: number): Promise<Buffer> {
    const conn = this.conn;
    if (!conn || conn.closed || !conn.welcomed) return Promise.reject(new Error('the mirror is not connected'));
    if (this.destCp < 0) return Promise.reject(new Error('the mirror holds no committed CP yet'));
    return this.reads.read((id) => this.send(conn, { type: MsgType.ReadReq, id, pbas: [pba] }), REPAIR_READ_TIMEOUT_MS);
  }

  // ---- online verify ----

  private remoteRead(conn: Conn, pba: number): Promise<Buffer> {
    return this.reads.read((id) => this.send(conn, { type: MsgType.ReadReq, id, pbas: [pba] }));
  }

  /**
   * Compares the last common CP on both sides: its superblocks, then every root (live and
   * snapshots), descending only where pointers differ (tree/diff.ts). No data block is
   * read on either side.
   */
  async verify(): Promise<VerifyReport> {
    const conn = this.conn;
    if (!conn || conn.closed || this.state === 'disconnected') {
      throw new Error(`the mirror is not connected${this.lastError ? ` (${this.lastError})` : ''}: verify compares both sides while the destination's receiver runs and the link is up (see nvmirror status)`);
    }
    const cp = this.destCp;
    if (cp < 0) throw new Error('the destination holds no CP yet (baseline not done)');
    if (this.verifyCp !== undefined) throw new Error('a verify is already running');
    this.verifyCp = cp;
    try {
      return await verifyCp(cp, this.localSide(), { read: (pba) => this.remoteRead(conn, pba) }, 'the destination');
    } finally {
      this.verifyCp = undefined;
    }
  }

  private localSide(): NodeSide {
    return {
      read: async (pba) => {
        const b = Buffer.allocUnsafe(4096);
        await this.tree.readRaw(pba, 1, b);
        return b;
      },
    };
  }

  /** The destination verifies too: answer its reads of our blocks (one request at a time per connection). */
  private async answerRead(conn: Conn, m: Message & { type: MsgType.ReadReq }): Promise<void> {
    const deviceBlocks = this.tree.stats().totalBlocks;
    const data = Buffer.allocUnsafe(m.pbas.length * 4096);
    for (let i = 0; i < m.pbas.length; i++) {
      const p = m.pbas[i]!;
      if (!(p >= 0 && p < deviceBlocks)) {
        this.drop(conn, `the destination asked for pba ${p}, outside the device`);
        return;
      }
      await this.tree.readRaw(p, 1, data.subarray(i * 4096, (i + 1) * 4096));
    }
    this.send(conn, { type: MsgType.ReadResp, id: m.id, pbas: m.pbas, data });
  }


  // ---- status / stop ----

  /** A running catch-up's estimate of what it has left to send (0: none, or its total not known yet). */
  private resyncLeftBytes(): number {
    const f = this.resync?.progress.figures();
    return f?.totalBytes !== undefined ? Math.max(0, f.totalBytes - this.resync!.blocksSent * 4096) : 0;
  }

  stats(): MirrorSourceStats {
    const tree = this.tree.stats();
    const conn = this.conn;
    const wire = this.link.wireBytes();
    const rootEq = this.destCp === tree.cpNumber && this.destCp >= 0;
    return {
      peer: `${this.o.peer.host}:${this.o.peer.port}`,
      mode: this.o.mode,
      policy: this.o.policy,
      state: this.state === 'disconnected' && this.refusedStanding && this.refusedStanding.kind !== 'in-step' && this.refusedStanding.kind !== 'unrelated' ? this.refusedStanding.kind : this.state === 'in-sync' && this.unackedMs() > STALE_ACK_MS ? 'behind' : this.state,
      connected: conn !== undefined && !conn.closed && conn.welcomed,
      sourceCp: tree.cpNumber,
      destCp: this.destCp,
      lagCps: this.destCp < 0 ? tree.cpNumber : tree.cpNumber - this.destCp,
      lagSeconds: this.behindSinceMs > 0 ? Math.round((this.clock.nowMs() - this.behindSinceMs) / 100) / 10 : 0,
      // Sync with every record held there: nothing is missing; else what its CP lacks.
      // Client bytes since the destination's CP (counted this run), or what a catch-up has left (after a restart the count starts anew).
      lagBytes: this.o.mode === 'sync' && conn !== undefined && !conn.closed && this.heldSeq >= (this.volume?.log.lastSeq ?? 0) && !this.resync
        ? 0
        : Math.max(0, this.clientBytes - this.clientBytesAtDestCp, this.resyncLeftBytes()),
      wireBytesPerSec: this.wireRate,
      rootsEqual: rootEq,
      cpsAcknowledged: this.cpsShipped,
      rootMismatches: this.rootMismatches,
      heldSeq: this.heldSeq,
      lastSeq: this.volume?.log.lastSeq ?? 0,
      bytesOnWire: wire,
      catchUpWireBytes: this.catchUpWireBytes + (this.catchUpWireFrom !== undefined ? wire - this.catchUpWireFrom : 0),
      wireBytesByKind: (() => {
        const { sent: by, received } = this.link.bytesByType();
        return {
          log: by(MsgType.Record) + by(MsgType.DurableReq),
          references: by(MsgType.CpRefs),
          deltas: by(MsgType.CpDeltas),
          blocks: by(MsgType.CpBlocks),
          commits: by(MsgType.CpBegin) + by(MsgType.CpCommit),
          fromDestination: received,
        };
      })(),
      clientBytes: this.clientBytes,
      dataBlocksSent: this.dataBlocksSent,
      refsSent: this.refsSent,
      deltasSent: this.deltasSent,
      cpsAbandoned: this.cpsAbandoned,
      bytesSavedByRefs: this.refsSent * (4096 - 24),
      ...(this.o.rateBytesPerSec !== undefined ? { rateLimitBytesPerSec: this.o.rateBytesPerSec } : {}),
      resync: this.resync
        ? (() => {
            const f = this.resync.progress.figures();
            return { baseCp: this.resync.baseCp, targetCp: this.resync.targetCp, blocksSent: this.resync.blocksSent, bytesPerSec: f.bytesPerSec, totalBytes: f.totalBytes, etaSeconds: f.etaSeconds };
          })()
        : undefined,
      lastError: this.lastError,
      standing: this.standingNow(tree.cpNumber, conn !== undefined && !conn.closed),
      readerPinnedCp: this.pinnedCp,
    };
  }

  /** Which side is primary and current, the last common CP, what each wrote since (status). */
  private standingNow(cp: number, connected: boolean): Standing | undefined {
    if (this.refusedStanding) return this.refusedStanding;
    if (!connected || this.destCp < 0) return undefined;
    const lastSeq = this.volume?.log.lastSeq ?? 0;
    const both = this.destCp === cp && (this.o.mode === 'sync' ? this.heldSeq >= lastSeq : lastSeq <= this.tree.stats().meta.nvlogSeq);
    return { kind: 'in-step', current: both ? 'both' : 'source', commonCp: this.destCp, sourceCp: cp, destinationCp: this.destCp, sourceSeq: lastSeq, destinationSeq: this.heldSeq };
  }

  /** Root pointer bytes the destination reported for its committed CP. */
  get destinationRoot(): Buffer {
    return this.destRoot;
  }

  /**
   * A clean stop's step while the volume is still open, after its last CP: waits until the
   * destination has committed that CP (a planned failover then finds every write in the
   * mirror's image, not only in its log), for at most `timeoutMs`, while the link is up
   * and the mirror is in sync or catching up by resync. A baseline is not waited for (it
   * resumes where it stopped); a stalled peer ends the wait when the link drops it.
   */
  async drain(timeoutMs = STOP_DRAIN_MS_MAX): Promise<{ caughtUp: boolean; destCp: number; sourceCp: number; reason?: string }> {
    const deadline = this.clock.nowMs() + timeoutMs;
    for (;;) {
      const sourceCp = this.tree.stats().cpNumber;
      const conn = this.conn;
      const end = (reason?: string) => ({ caughtUp: reason === undefined, destCp: this.destCp, sourceCp, ...(reason !== undefined ? { reason } : {}) });
      if (this.destCp >= sourceCp && (!conn || conn.cpAcks.length === 0)) return end();
      if (this.stopped || !conn || conn.closed || this.state === 'disconnected') return end(`the mirror is not connected${this.lastError ? ` (${this.lastError})` : ''}`);
      if (this.state === 'baseline') return end('a baseline is running (it resumes where it stopped)');
      if (this.clock.nowMs() >= deadline) return end(`the destination did not commit CP ${sourceCp} within ${timeoutMs} ms`);
      await new Promise<void>((r) => this.clock.setTimeout(r, 10));
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.keptBaseline?.view.release();
    this.keptBaseline = undefined;
    this.ticker?.cancel();
    this.ticker = undefined;
    await this.link.stop();
    this.settleWaiters();
    assert(this.waiters.length === 0, 'reply gates left after stop');
    this.saveState();
  }

  /** Detaches from the engine (after the volume's final CP). */
  detach(): void {
    this.tree.setCpSink(undefined);
    this.tree.setRepairSource(undefined);
    const v = this.volume;
    if (v) {
      v.log.onAppend = undefined;
      v.setReplicaGate(undefined);
    }
  }
}
