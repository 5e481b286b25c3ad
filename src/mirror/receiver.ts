/**
 * The destination (`nvmirror receive DIR --listen HOST:PORT`): accepts mirror streams
 * from any number of sources, one connection per source, each into its own mirror
 * directory DIR/<source-uuid>/ (mirror-dir.ts).
 *
 * Each connection is a Session (receiver-session.ts: the stream from HELLO on); this
 * file accepts connections, keeps the open mirrors (their exports outlive a source's
 * connection), releases a mirror for promote, and reports status.
 *
 * Invariants:
 * - At most one session handles a source's HELLO at a time (claimHello), and an ended
 *   session is released (its writes done) before it is forgotten (sessionEnded).
 * - A mirror released for promote is refused to its old source until it was demoted
 *   into this directory again (openMirror); a promoted directory always is.
 * - Memory: parsed frames waiting to be applied are charged to the process's one
 *   MemoryBudget (nbd/budget.ts; `receive --memory-budget`), shared by every source and
 *   by the NBD clients of the exports (per connection: receiver-session.ts); the whole
 *   receiver: at most CONNECTIONS_MAX connections, and SLABS_KEPT_MAX idle CP_BLOCKS
 *   slabs, SLABS_IDLE_KEPT once no stream took one for SLAB_TRIM_INTERVAL_MS
 *   (slab-pool.ts; a slab in use is a frame's body, charged with its message while
 *   queued, then held by the CP's staged runs and writes). Each open mirror also keeps
 *   its committed CP's space map (two bits per device block).
 */
import * as net from 'net';
import * as tls from 'tls';
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { openMemberDevice } from '../volume/dir';
import { readLabel } from '../volume/label';
import { RaidDevice, type RaidHealth } from '../raid/raid-device';
import { FileBlockDevice } from '../io/file-device';
import { readRole } from './role';
import { decideStanding, refusalText, type Standing } from './standing';
import type { Lineage } from '../tree/lineage';
import type { Superblock } from '../tree/layout';
import { assert } from '../util/assert';
import { CP_BLOCKS_BODY_MAX_BYTES, WIRE_VERSION } from './wire';
import { MIRROR_LABEL_NAME, MirrorDir, MirrorDirError, newestSuperblock, rootBytes, type MirrorHello, type MirrorLabel } from './mirror-dir';
import { MirrorView, type MirrorExports } from './exports';
import type { VerifyReport } from './verify';
import { SlabPool } from './slab-pool';
import type { MemoryBudget } from '../nbd/budget';
import { Session, type SessionHost } from './receiver-session';
import { explainTlsError } from './link';
import { systemClock, type Clock } from '../io/types';

/** How many times `check` of a mirror starts again on the newest CP when a CP overtakes the one it pinned (checkMirror). */
export const CHECK_ATTEMPTS_MAX = 3;
export const CONNECTIONS_MAX = 64;
/**
 * Idle CP_BLOCKS slabs kept for reuse by the whole receiver while a stream runs (256 x
 * 261 KiB: ~65 MiB). A baseline holds up to ~210 at once on one connection (16 MiB queued,
 * staged runs and writes in flight); with 32 kept, a third of its takes allocated a
 * fresh slab (page faults, and V8's external-memory mark-compacts: the receiver was the
 * baseline's bound). Kept slabs never raise the peak (they were in use at it).
 */
const SLABS_KEPT_MAX = 256;
/** Idle slabs kept once no slab was taken for a trim interval (16 x 261 KiB: ~4 MiB). */
const SLABS_IDLE_KEPT = 16;
const SLAB_TRIM_INTERVAL_MS = 2000;
/** The receiver's control socket in its directory (`nvmirror status DIR`). */
export const RECEIVER_SOCKET_NAME = 'receiver.sock';
export interface ReceiverStats {
  connections: number;
  /** The process's one budget (mirror frames waiting and the exports' NBD bytes in flight). */
  memory?: { budgetBytes: number; usedBytes: number; peakBytes: number; waiting: number };
  mirrors: Array<{
    sourceUuid: string;
    dir: string;
    connected: boolean;
    committedCp: number;
    root: string;
    heldSeq: number;
    durableSeq: number;
    logUsedBytes: number;
    recordsStored: number;
    recordsDropped: number;
    /** The first record dropped while the log drops them (its ring was full, until a CP covers them); 0: storing. */
    droppingFromSeq: number;
    /** Export readers closed because a CP wrote blocks of the older CP they read (their source did not hold it; pin-guard.ts). */
    readersReleased: number;
    /** Export connections reading this mirror, each pinned to a CP (the oldest is held on the source), and the longest pin (ms). */
    readers: number;
    oldestPinnedCp: number;
    longestPinMs: number;
    cpsApplied: number;
    cpsAborted: number;
    blocksApplied: number;
    refsApplied: number;
    deltasApplied: number;
    bytesIn: number;
    baselinePartial: boolean;
    /** Blocks of this mirror that failed verification and were served from the source's copy (its own stays damaged: check). */
    blocksServedFromSource: number;
    /** Of those, rewritten here (the reader was on the committed CP, which uses the block). */
    blocksHealed: number;
    /** A baseline (baseCp -1) or resync being received: toward which CP, blocks so far. */
    catchUp?: { cp: number; baseCp: number; blocks: number };
    lastCommitMs: number;
    /** The committed CP's snapshots (the source's, exported here as <uuid>@NAME). */
    snapshots?: Array<{ name: string; cp: number }>;
    /** Why the last stream from this source was refused or could not be applied (cleared by the next commit). */
    lastError: string | undefined;
    /** A RAID destination's health (members, stripes written whole / through the journal). */
    raid?: RaidHealth;
    /** A single-member destination's writes that bypassed the page cache (O_DIRECT; io/file-device.ts). */
    directWrites?: number;
  }>;
  /** Where each source that said HELLO since the start stood then (standing.ts): primary, current, last common CP (standingsList()). */
  standings?: Array<Standing & { sourceUuid: string }>;
}

export interface ReceiverOptions {
  dir: string;
  logger: Logger;
  /** TLS context options (PSK or certificates); undefined = plaintext (--mirror-insecure). */
  tls?: tls.TlsOptions;
  exports?: MirrorExports;
  /** The process's one memory budget (shared with the exports' NBD server); none: per-connection bounds only. */
  budget?: MemoryBudget;
  /** What the sessions' HELLO and idle timeouts and silence run on (default: the system clock; tests: a simulated one). */
  clock?: Clock;
}

export class MirrorReceiver implements SessionHost {
  readonly dir: string;
  readonly exports: MirrorExports | undefined;
  readonly budget: MemoryBudget | undefined;
  readonly clock: Clock;
  /** CP_BLOCKS bodies are assembled in these (slab-pool.ts), shared by every connection. */
  /** A CP_BLOCKS body and up to a block of padding before it (native-rx.ts: its blocks are placed block-aligned). */
  readonly slabs = new SlabPool(CP_BLOCKS_BODY_MAX_BYTES + 4096, SLABS_KEPT_MAX);
  private readonly log: Logger;
  private readonly sessions = new Set<Session>();
  private server: net.Server | undefined;
  /** Open mirrors (kept open while the receiver runs, so their exports outlive a source's connection). */
  private readonly mirrors = new Map<string, MirrorDir>();
  private closing = false;
  private readonly slabTrim: NodeJS.Timeout;
  /** Sources whose mirror was released for promote (refused from then on). */
  private readonly released = new Set<string>();

  constructor(private readonly opts: ReceiverOptions) {
    this.dir = opts.dir;
    this.log = opts.logger;
    this.exports = opts.exports;
    this.budget = opts.budget;
    this.clock = opts.clock ?? systemClock;
    this.exports?.onPinChange((uuid, cp) => this.sessionFor(uuid)?.sendPin(cp));
    assert(WIRE_VERSION === 1, 'wire version');
    this.slabTrim = setInterval(() => this.slabs.trimIdle(SLABS_IDLE_KEPT), SLAB_TRIM_INTERVAL_MS);
    this.slabTrim.unref();
  }

  /**
   * Takes a connection from a source: the listener's, or any stream shaped like a socket
   * (the network seam: test/mirror/link-sim.test.ts joins a source to this receiver
   * through a seeded in-memory link). One without a file descriptor stays on the event
   * loop's path (no native receive thread).
   */
  accept(sock: net.Socket): void {
    if (this.closing || this.sessions.size >= CONNECTIONS_MAX) {
      this.log.warn({ remote: sock.remoteAddress }, `mirror connection refused: ${this.closing ? 'shutting down' : `${CONNECTIONS_MAX} connections already`}`);
      sock.destroy();
      return;
    }
    sock.setNoDelay?.(true);
    const s = new Session(this, sock, this.log.child({ remote: `${sock.remoteAddress}:${sock.remotePort}` }));
    this.sessions.add(s);
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    const onConn = (sock: net.Socket): void => this.accept(sock);
    const srv = this.opts.tls
      ? tls.createServer({ ...this.opts.tls, minVersion: 'TLSv1.3' }, onConn)
      : net.createServer(onConn);
    if (this.opts.tls) {
      (srv as tls.Server).on('tlsClientError', (e, sock) => {
        this.log.warn({ remote: sock.remoteAddress, why: explainTlsError(e.message, 'destination'), err: e.message.trim() }, 'mirror connection refused: TLS authentication failed');
      });
    }
    this.server = srv;
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(port, host, () => {
        srv.off('error', reject);
        resolve(srv.address() as net.AddressInfo);
      });
    });
  }

  /** Verify of one mirror against its connected source (`nvmirror verify DIR/<uuid>`). */
  async verify(uuid: string): Promise<VerifyReport> {
    const s = this.sessionFor(uuid);
    if (!s) throw new Error(`source ${uuid} is not connected: verify needs both sides running`);
    return s.verify();
  }

  /**
   * `check` of a mirror this receiver holds: its committed CP, pinned like a reader's (the
   * source keeps its blocks, no CP writes them), with its space map; a block that fails is
   * repaired from the connected source (MirrorDir.checkCommitted). Needs the exports (the
   * pin is a reader's); without them `check` runs on its own, read-only.
   *
   * The pin guard ends the pin if a newer CP must write blocks of the pinned one (a source
   * that did not hold it: restarted, or without the mirror for a while); what the check
   * read then proves nothing, so it runs again on the newest committed CP, at most
   * CHECK_ATTEMPTS_MAX times in all.
   */
  async checkMirror(uuid: string): Promise<{ ok: boolean; problems: string[]; notes: string[] }> {
    const m = this.mirrors.get(uuid);
    if (!m) throw new Error(`this receiver holds no mirror of ${uuid}`);
    for (let attempt = 1; ; attempt++) {
      const view = this.exports?.lookup(uuid);
      if (!view || !(view instanceof MirrorView)) throw new Error(`the mirror of ${uuid} is not exported here (no committed CP, or receive runs without --export-*)`);
      let revoked = false;
      view.onRevoke(() => {
        revoked = true;
      });
      let r: { ok: boolean; problems: string[]; notes: string[] } | undefined;
      try {
        r = await m.checkCommitted(view.cp, view.superblock);
      } catch (e) {
        if (!revoked) throw e;
      } finally {
        view.detach();
      }
      if (!revoked && r) {
        if (attempt > 1) r.notes.push(`the check was overtaken ${attempt - 1} time(s) (a newer CP wrote blocks of the CP it read: its source did not hold them) and ran again on CP ${view.cp}`);
        return r;
      }
      if (attempt >= CHECK_ATTEMPTS_MAX) {
        throw new Error(`the check was overtaken ${attempt} times, last on CP ${view.cp}: newer CPs wrote blocks of the CP it read (its source did not hold them); run check again`);
      }
      this.log.warn({ source: uuid, cp: view.cp, attempt }, 'mirror check overtaken: a newer CP wrote blocks of the CP it read (its source did not hold them); checking the newest committed CP again');
    }
  }

  sessionFor(uuid: string): Session | undefined {
    for (const s of this.sessions) if (s.sourceUuid === uuid) return s;
    return undefined;
  }

  /** Where each source and its mirror stood at its last HELLO (status), by source uuid (one per directory in DIR). */
  readonly standings = new Map<string, Standing>();

  /**
   * The standings for status. A source streaming in step is brought up to date: each CP it
   * committed here since its HELLO is common to both sides (the HELLO's "since then the
   * source wrote N CPs" was what the catch-up was about to send).
   */
  standingsList(): Array<Standing & { sourceUuid: string }> {
    return [...this.standings].map(([sourceUuid, st]) => {
      const m = this.mirrors.get(sourceUuid);
      const cp = m?.committedCp ?? -1;
      if (st.kind === 'in-step' && this.sessionFor(sourceUuid) !== undefined && cp > st.commonCp && cp >= st.sourceCp) {
        return { sourceUuid, ...st, commonCp: cp, sourceCp: cp, destinationCp: cp };
      }
      return { sourceUuid, ...st };
    });
  }

  async openMirror(hello: MirrorHello & { sourceCp: number; lastSeq: number; lineage: Lineage }, log: Logger): Promise<MirrorDir> {
    const promoted = await promotedRefusal(path.join(this.dir, hello.sourceUuid), hello);
    if (promoted) {
      this.standings.set(hello.sourceUuid, promoted.standing);
      throw new MirrorDirError(promoted.text);
    }
    if (this.released.has(hello.sourceUuid)) {
      // Released for promote; taken back only once the promoted side was demoted into this directory again.
      if (!isDemotedMirror(path.join(this.dir, hello.sourceUuid))) throw new MirrorDirError(`the mirror of ${hello.sourceUuid} was released for promote: refused`);
      this.released.delete(hello.sourceUuid);
    }
    let m = this.mirrors.get(hello.sourceUuid);
    if (m && (m.label.sizeBytes !== hello.sizeBytes || m.label.deviceBlocks !== hello.deviceBlocks)) {
      throw new MirrorDirError(`mirror of ${hello.sourceUuid} holds ${m.label.sizeBytes} bytes on ${m.label.deviceBlocks} blocks; the source now has ${hello.sizeBytes} on ${hello.deviceBlocks}`);
    }
    if (!m) {
      m = await MirrorDir.openOrCreate(this.dir, hello, log);
      this.mirrors.set(hello.sourceUuid, m);
    }
    return m;
  }

  /**
   * Lets go of the mirror of source `uuid` for `nvmirror promote`: refused while that
   * source is connected (it is still primary) unless forced; then its session ends, its
   * exports go, and the directory's lock is released. A later HELLO from that source
   * finds the directory promoted and is refused.
   */
  async release(uuid: string, force: boolean): Promise<{ wasConnected: boolean }> {
    const s = this.sessionFor(uuid);
    if (s && !force) {
      throw new Error(`source ${uuid} is connected and still primary: stop it (or cut it off) before promoting its mirror, or promote with --force`);
    }
    if (s) {
      this.log.warn({ source: uuid }, 'promote --force: ending the connected source\'s stream');
      s.end('the mirror is being promoted');
      while (this.sessions.has(s)) await new Promise((r) => setTimeout(r, 10));
    }
    // Until promote has marked the directory (role.json), this receiver must not take it back.
    this.released.add(uuid);
    // Where the source stood at its last HELLO (it was primary) is history now: status
    // shows a standing under the promoted entry only once the old source connects again.
    this.standings.delete(uuid);
    const m = this.mirrors.get(uuid);
    if (m) {
      this.exports?.detachSource(m);
      this.mirrors.delete(uuid);
      await m.close();
    }
    this.log.info({ source: uuid, wasConnected: s !== undefined }, 'mirror released for promote');
    return { wasConnected: s !== undefined };
  }

  /**
   * A promote that released the mirror of `uuid` stopped before it changed anything (it
   * refused: a baseline in progress, nothing committed, a damaged log): its source is
   * taken again (the mirror opens at its next HELLO). Nothing if it was not released.
   */
  unrelease(uuid: string): { wasReleased: boolean } {
    const was = this.released.delete(uuid);
    if (was) this.log.info({ source: uuid }, 'promote did not happen: the mirror takes its source again');
    return { wasReleased: was };
  }

  private readonly ending = new Map<Session, Promise<void>>();
  /** The session handling each source's HELLO (at most one per source: Session.hello()). */
  private readonly helloClaims = new Map<string, Session>();

  /** Claims the HELLO of source `uuid` for `s`; false if another live session is handling one. */
  claimHello(uuid: string, s: Session): boolean {
    const holder = this.helloClaims.get(uuid);
    if (holder && holder !== s && !holder.ended) return false;
    this.helloClaims.set(uuid, s);
    return true;
  }

  dropHelloClaim(uuid: string, s: Session): void {
    if (this.helloClaims.get(uuid) === s) this.helloClaims.delete(uuid);
  }

  sessionEnded(s: Session): Promise<void> {
    let p = this.ending.get(s);
    if (!p) {
      p = (async () => {
        await s.release();
        this.sessions.delete(s);
        this.ending.delete(s);
      })();
      this.ending.set(s, p);
    }
    return p;
  }

  /** Settles once an ended session is released and forgotten. */
  async sessionGone(s: Session): Promise<void> {
    await (this.ending.get(s) ?? Promise.resolve());
  }

  stats(): ReceiverStats {
    const mirrors: ReceiverStats['mirrors'] = [];
    for (const m of this.mirrors.values()) {
      const s = this.sessionFor(m.label.sourceUuid);
      mirrors.push({
        sourceUuid: m.label.sourceUuid,
        dir: m.dir,
        connected: s !== undefined,
        committedCp: m.committedCp,
        root: rootBytes(m.committed?.sb).toString('hex'),
        heldSeq: m.log.heldSeq,
        durableSeq: m.log.durableSeq,
        logUsedBytes: m.log.usedBytes,
        recordsStored: m.log.recordsStored,
        recordsDropped: m.log.recordsDropped,
        droppingFromSeq: m.log.droppingFromSeq,
        readersReleased: m.pins.released,
        ...(this.exports?.readerStats(m.label.sourceUuid) ?? { readers: 0, oldestPinnedCp: -1, longestPinMs: 0 }),
        cpsApplied: m.cpsApplied,
        cpsAborted: m.cpsAborted,
        blocksApplied: m.blocksApplied,
        refsApplied: m.refsApplied,
        deltasApplied: m.deltasApplied,
        bytesIn: m.bytesIn + (s?.bytesIn ?? 0),
        baselinePartial: m.baselinePartial,
        blocksServedFromSource: m.blocksServedFromSource,
        blocksHealed: m.blocksHealed,
        ...(s?.catchUp ? { catchUp: s.catchUp } : {}),
        lastCommitMs: m.lastCommitMs,
        snapshots: m.baselinePartial ? [] : (m.committed?.sb.snapshots ?? []).map((x) => ({ name: x.name, cp: x.cp })),
        lastError: m.lastError,
        ...(m.dev instanceof RaidDevice ? { raid: m.dev.health() } : {}),
        ...(m.dev instanceof FileBlockDevice ? { directWrites: m.dev.directWrites } : {}),
      });
    }
    const b = this.budget;
    return {
      connections: this.sessions.size,
      ...(b ? { memory: { budgetBytes: b.capacityBytes, usedBytes: b.usedBytes, peakBytes: b.peakBytes, waiting: b.waiting } } : {}),
      mirrors,
    };
  }

  async close(): Promise<void> {
    clearInterval(this.slabTrim);
    this.closing = true;
    // End the sessions first: server.close() resolves only once every connection is gone.
    const closed = new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    for (const s of [...this.sessions]) s.end('receiver stopping');
    await closed;
    while (this.sessions.size > 0) await new Promise((r) => setTimeout(r, 10));
    for (const m of this.mirrors.values()) await m.close();
    this.mirrors.clear();
    this.exports?.close();
  }
}

/**
 * Why a source may not write into DIR/<uuid> because that mirror was promoted (a primary
 * now: its old source writing into it would be split brain), or undefined. Names the
 * last CP both sides hold and how far each has gone since.
 */
export async function promotedRefusal(dir: string, hello: { sourceCp: number; lastSeq: number; lineage: Lineage }): Promise<{ text: string; standing: Standing } | undefined> {
  const role = readRole(dir);
  if (!role) return undefined;
  let now: Superblock | undefined;
  try {
    const label = await readLabel(dir);
    const dev = await openMemberDevice(dir, label, true);
    try {
      now = (await newestSuperblock(dev, label.uuid))?.sb;
    } finally {
      await dev.close();
    }
  } catch {
    /* unreadable: the refusal stands on role.json's figures */
  }
  const standing: Standing = now
    ? decideStanding({ lineage: hello.lineage, cp: hello.sourceCp, lastSeq: hello.lastSeq }, { committed: { lineage: now.lineage, cp: now.cpNumber, nvlogSeq: now.nvlogSeq }, newestStoredSeq: 0, promoted: true, promotedThroughSeq: role.lastSeq })
    : { kind: 'split-brain', current: 'unknown', commonCp: role.promotedFromCp, sourceCp: hello.sourceCp, destinationCp: -1, sourceSeq: hello.lastSeq, destinationSeq: 0 };
  return { text: refusalText(standing, dir, true), standing };
}

/** DIR holds a mirror label marked demoted (and no role.json): a promoted volume made a mirror again. */
function isDemotedMirror(dir: string): boolean {
  if (readRole(dir)) return false;
  try {
    const l = JSON.parse(fs.readFileSync(path.join(dir, MIRROR_LABEL_NAME), 'utf8')) as MirrorLabel;
    return l.format === 'nvmirror-mirror' && l.demoted !== undefined;
  } catch {
    return false;
  }
}
