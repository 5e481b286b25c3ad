/**
 * The NBD server: accepts connections on TCP and Unix sockets, runs the handshake, then
 * the transmission phase. Also serves pre-connected sockets in transmission mode only
 * (the kernel attach path, where the kernel speaks no handshake).
 *
 * Limits (limits.ts): MAX_CONNECTIONS_DEFAULT, HANDSHAKE_TIMEOUT_MS,
 * EVICT_HANDSHAKE_AGE_MS_MIN, one MemoryBudget (MEMORY_BUDGET_BYTES_DEFAULT) shared by
 * every connection, stall and idle timeouts checked every SWEEP_INTERVAL_MS_MAX at most.
 *
 * Invariants:
 * - At most maxConnections connections exist at once. When all slots are taken, a new
 *   client takes the slot of the connection idle the longest (nothing in flight), else
 *   of the oldest handshake older than EVICT_HANDSHAKE_AGE_MS_MIN; else it is refused.
 *   Kernel (attach) connections are never evicted nor timed out.
 * - A handshake that does not finish within handshakeTimeoutMs is dropped.
 * - One info log line per connection (when it ends), with why it ended.
 * - close(): stop accepting, finish in-flight requests on every connection, then resolve.
 */
import * as fs from 'fs';
import * as net from 'net';
import * as tls from 'tls';
import type { Duplex } from 'stream';
import type { Logger } from '../util/log';
import type { Volume } from '../volume/types';
import type { ExportRegistry } from '../volume/exports';
import { MemoryBudget } from './budget';
import { negotiate, TlsConfig, transmissionFlags } from './handshake';
import {
  EVICT_HANDSHAKE_AGE_MS_MIN,
  EVICT_IDLE_MS_MIN,
  HANDSHAKE_TIMEOUT_MS,
  IDLE_TIMEOUT_MS_DEFAULT,
  MAX_CONNECTIONS_DEFAULT,
  MEMORY_BUDGET_BYTES_DEFAULT,
  SHUTDOWN_REPORT_MS,
  STALL_TIMEOUT_MS_DEFAULT,
  SWEEP_INTERVAL_MS_MAX,
} from './limits';
import { Transmission, TransmissionLimits } from './transmission';
import { BUSY_POLL_US_DEFAULT, NativeTransmission, nativeTransmissionDefault, setBusyPoll } from './native-transmission';
import type { NbdObserver } from './observer';
import { prepareUnixSocketPath, unixSocketPathOfFd } from './unix-socket';
import { readPskFile } from '../util/psk';

export interface TlsFiles {
  /** X.509: certificate and key (both or neither). */
  certPath?: string;
  keyPath?: string;
  caPath?: string;
  /** TLS-PSK keys file, psktool format: one `identity:hexkey` per line. */
  pskPath?: string;
  required: boolean;
}

export interface NbdServerOptions {
  exports: ExportRegistry;
  logger: Logger;
  tls?: TlsFiles;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  /** Server-wide budget for bytes in flight (default MEMORY_BUDGET_BYTES_DEFAULT). */
  memoryBudgetBytes?: number;
  /** The process's budget when others share it (the mirror receiver's frames); overrides memoryBudgetBytes. */
  budget?: MemoryBudget;
  /** Default STALL_TIMEOUT_MS_DEFAULT; 0 = never. */
  stallTimeoutMs?: number;
  /** Default IDLE_TIMEOUT_MS_DEFAULT (off); 0 = never. */
  idleTimeoutMs?: number;
  /** Told of connections and replies (metrics). */
  observer?: NbdObserver;
  /**
   * Serve plain (non-TLS) connections' transmission phase on a native thread
   * (native-transmission.ts). Default: on, unless NVMIRROR_NBD_NATIVE=0.
   */
  nativeTransmission?: boolean;
  /**
   * The native connection threads' busy-poll window in microseconds (0: off; default
   * BUSY_POLL_US_DEFAULT). Process-wide: the last server constructed sets it.
   */
  busyPollUs?: number;
}

export function loadTlsConfig(files: TlsFiles): TlsConfig {
  const read = (what: string, p: string): Buffer => {
    try {
      return fs.readFileSync(p);
    } catch (e) {
      throw new Error(`cannot read TLS ${what} ${p}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  };
  if ((files.certPath === undefined) !== (files.keyPath === undefined)) throw new Error('a TLS certificate and key go together');
  if (files.certPath === undefined && files.pskPath === undefined) throw new Error('TLS needs a certificate and key, or a PSK file');
  const cert = files.certPath !== undefined ? read('certificate', files.certPath) : undefined;
  const key = files.keyPath !== undefined ? read('key', files.keyPath) : undefined;
  const ca = files.caPath !== undefined ? read('CA', files.caPath) : undefined;
  let psk: Map<string, Buffer> | undefined;
  if (files.pskPath !== undefined) {
    psk = readPskFile(files.pskPath, 'TLS PSK file');
  }
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({ ...(cert ? { cert } : {}), ...(key ? { key } : {}), ...(ca ? { ca } : {}) });
  } catch (e) {
    throw new Error(`bad TLS certificate/key: ${(e as Error).message}`);
  }
  return { context, psk, requestCert: ca !== undefined, required: files.required };
}

interface Conn {
  socket: Duplex;
  transmission?: Transmission;
  id: number;
  startedMs: number;
  /** A kernel (attach) connection: never evicted nor timed out. */
  kernel: boolean;
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly conns = new Set<Conn>();
  private readonly tls: TlsConfig | undefined;
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number;
  private shuttingDown = false;
  private nextId = 1;
  private readonly log: Logger;
  readonly budget: MemoryBudget;
  private readonly limits: TransmissionLimits;
  private readonly sweepTimer: NodeJS.Timeout;
  private readonly native: boolean;
  /** Connections whose transmission phase ran on the native path (native-transmission.ts). */
  nativeTransmissions = 0;

  constructor(private readonly opts: NbdServerOptions) {
    this.log = opts.logger;
    this.tls = opts.tls ? loadTlsConfig(opts.tls) : undefined;
    this.maxConnections = opts.maxConnections ?? MAX_CONNECTIONS_DEFAULT;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
    this.native = opts.nativeTransmission ?? nativeTransmissionDefault();
    if (this.native) setBusyPoll(opts.busyPollUs ?? BUSY_POLL_US_DEFAULT);
    this.budget = opts.budget ?? new MemoryBudget(opts.memoryBudgetBytes ?? MEMORY_BUDGET_BYTES_DEFAULT);
    this.limits = {
      budget: this.budget,
      stallTimeoutMs: opts.stallTimeoutMs ?? STALL_TIMEOUT_MS_DEFAULT,
      idleTimeoutMs: opts.idleTimeoutMs ?? IDLE_TIMEOUT_MS_DEFAULT,
      ...(opts.observer ? { observer: opts.observer } : {}),
    };
    const timeouts = [this.limits.stallTimeoutMs, this.limits.idleTimeoutMs].filter((t) => t > 0);
    const sweepMs = Math.max(50, Math.min(SWEEP_INTERVAL_MS_MAX, ...timeouts.map((t) => t / 4)));
    this.sweepTimer = setInterval(() => this.sweep(), sweepMs);
    this.sweepTimer.unref();
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  /** What each connection in transmission is doing (diagnostics; tests wait on bytesReceived). */
  transmissionStates(): Array<Record<string, number | boolean>> {
    return [...this.conns].flatMap((c) => (c.transmission ? [c.transmission.state()] : []));
  }

  private sweep(): void {
    const now = Date.now();
    for (const c of this.conns) if (c.transmission && !c.kernel) c.transmission.sweep(now);
  }

  /**
   * Frees one slot for a new client: the transmission connection idle the longest, else
   * the oldest handshake older than EVICT_HANDSHAKE_AGE_MS_MIN. False if neither exists.
   */
  private evictOne(): boolean {
    const now = Date.now();
    let idle: Conn | undefined;
    let handshake: Conn | undefined;
    for (const c of this.conns) {
      if (c.kernel) continue;
      const t = c.transmission;
      if (t) {
        if (t.isIdle && now - t.lastActivityMs >= EVICT_IDLE_MS_MIN && (!idle || t.lastActivityMs < (idle.transmission as Transmission).lastActivityMs)) idle = c;
      } else if (now - c.startedMs >= EVICT_HANDSHAKE_AGE_MS_MIN && (!handshake || c.startedMs < handshake.startedMs)) {
        handshake = c;
      }
    }
    if (idle?.transmission) {
      idle.transmission.drop('evicted: every connection slot was taken and this one was idle the longest');
      this.conns.delete(idle);
      return true;
    }
    if (handshake) {
      this.log.info({ conn: handshake.id }, 'evicting the oldest unfinished handshake: every connection slot was taken');
      handshake.socket.destroy();
      this.conns.delete(handshake);
      return true;
    }
    return false;
  }

  listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    return this.listen((srv, cb) => srv.listen({ host, port, exclusive: true }, cb), `${host}:${port}`).then(
      (srv) => srv.address() as net.AddressInfo,
    );
  }

  async listenUnix(path: string): Promise<void> {
    await prepareUnixSocketPath(path);
    await this.listen((srv, cb) => srv.listen(path, cb), path);
  }

  /**
   * Serves a listening socket the service manager passed (socket activation,
   * socket-activation.ts); returns where it listens, for the printed URI.
   */
  async listenFd(fd: number): Promise<{ tcp: { host: string; port: number } } | { unix: string }> {
    const srv = await this.listen((srv, cb) => srv.listen({ fd }, cb), `passed fd ${fd}`);
    const a = srv.address();
    if (typeof a === 'string') return { unix: a };
    if (a === null || a.port === undefined) return { unix: unixSocketPathOfFd(fd) ?? `(passed fd ${fd})` };
    return { tcp: { host: a.address, port: a.port } };
  }

  private listen(start: (srv: net.Server, cb: () => void) => void, where: string): Promise<net.Server> {
    return new Promise((resolve, reject) => {
      const srv = net.createServer({ noDelay: true, pauseOnConnect: false }, (s) => this.accept(s));
      srv.once('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'EADDRINUSE') reject(new Error(`${where} is already in use`));
        else if (e.code === 'EACCES') reject(new Error(`permission denied listening on ${where}`));
        else if (e.code === 'EADDRNOTAVAIL') reject(new Error(`cannot listen on ${where}: address not available`));
        else reject(new Error(`cannot listen on ${where}: ${e.message}`));
      });
      start(srv, () => {
        srv.removeAllListeners('error');
        srv.on('error', (e) => this.log.error({ err: e.message }, 'listener error'));
        this.servers.push(srv);
        resolve(srv);
      });
    });
  }

  private accept(socket: net.Socket): void {
    if (this.shuttingDown || (this.conns.size >= this.maxConnections && !this.evictOne())) {
      this.log.warn({ connections: this.conns.size }, 'refusing connection (limit reached or shutting down)');
      this.opts.observer?.connectionRefused();
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const conn: Conn = { socket, id: this.nextId++, startedMs: Date.now(), kernel: false };
    this.conns.add(conn);
    this.opts.observer?.connectionAccepted();
    const log = this.log.child({ conn: conn.id, peer: socket.remoteAddress ?? 'unix' });
    log.debug('connection accepted');
    socket.on('error', () => undefined);
    const timer = setTimeout(() => {
      log.info('handshake timed out: disconnecting client');
      socket.destroy();
    }, this.handshakeTimeoutMs);
    socket.once('close', () => {
      clearTimeout(timer);
      if (!conn.transmission) this.conns.delete(conn);
    });
    negotiate(socket, {
      exports: this.opts.exports,
      tls: this.tls,
      logger: log,
      isShuttingDown: () => this.shuttingDown,
    })
      .then((session) => {
        clearTimeout(timer);
        // No session: the socket is destroyed or lingering after ABORT; its 'close' removes it.
        if (!session) return;
        if (session.socket.destroyed) {
          this.conns.delete(conn);
          return;
        }
        session.socket.on('error', () => undefined);
        const what = { export: session.exportName, structured: session.structuredReplies, tls: session.tls };
        log.debug(what, 'client connected');
        conn.socket = session.socket;
        const native = this.native && !session.tls ? NativeTransmission.tryStart(session, log, this.limits) : undefined;
        if (native) this.nativeTransmissions++;
        this.opts.observer?.transmissionStarted?.(native ? 'native' : 'stream');
        const t = native ?? new Transmission(session, log, this.limits);
        conn.transmission = t;
        session.volume.onRevoke?.(() => void t.shutdown());
        void t.closed.then(() => {
          session.volume.detach?.();
          this.conns.delete(conn);
          const info = { ...what, requests: t.requestsServed, bytesReceived: t.bytesReceived, durationMs: Date.now() - conn.startedMs };
          log.info(t.closeReason !== undefined ? { ...info, why: t.closeReason } : info, 'client disconnected');
        });
      })
      .catch((e: unknown) => {
        clearTimeout(timer);
        log.error({ err: (e as Error).message }, 'handshake failed');
        this.opts.observer?.clientError('handshake');
        socket.destroy();
        this.conns.delete(conn);
      });
  }

  /**
   * Serves a connected socket in transmission mode only (no handshake), with simple
   * replies, e.g. one end of a socketpair handed to the kernel's nbd driver.
   */
  serveTransmission(socket: net.Socket, volume: Volume, opts: { exportName: string }): { closed: Promise<void>; close(): Promise<void> } {
    const conn: Conn = { socket, id: this.nextId++, startedMs: Date.now(), kernel: true };
    this.conns.add(conn);
    this.opts.observer?.connectionAccepted();
    const log = this.log.child({ conn: conn.id, export: opts.exportName });
    socket.on('error', () => undefined);
    const t = new Transmission(
      {
        socket,
        volume,
        exportName: opts.exportName,
        structuredReplies: false,
        baseAllocation: false,
        transmissionFlags: transmissionFlags(volume, false),
        leftover: [],
      },
      log,
      this.limits,
    );
    conn.transmission = t;
    const closed = t.closed.then(() => {
      this.conns.delete(conn);
    });
    return { closed, close: () => t.shutdown() };
  }

  /** Stops accepting, lets in-flight requests finish, closes every connection. */
  async close(): Promise<void> {
    this.shuttingDown = true;
    clearInterval(this.sweepTimer);
    // net.Server.close() calls back only once every connection has ended, so start it
    // (no new connections from here on) and wait for it after closing the connections.
    const listenersClosed = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    const pending: Promise<void>[] = [];
    for (const c of this.conns) {
      if (c.transmission) pending.push(c.transmission.shutdown());
      else c.socket.destroy();
    }
    this.log.info({ connections: this.conns.size, transmissions: pending.length }, 'closing: finishing in-flight requests');
    // Say what a slow shutdown waits for (a request stuck in the volume, a client...).
    const slow = setInterval(() => {
      for (const c of this.conns) this.log.warn({ conn: c.id, state: c.transmission?.state() ?? 'handshake' }, 'shutdown still waiting for this connection');
    }, SHUTDOWN_REPORT_MS);
    slow.unref();
    try {
      await Promise.all(pending);
      await Promise.all(listenersClosed);
    } finally {
      clearInterval(slow);
    }
    this.log.debug('closing: every connection and listener closed');
  }
}

/** Transmission flags for a volume in simple-reply mode (what the kernel is told). */
export { transmissionFlags };
