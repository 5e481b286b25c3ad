/**
 * The NBD server: accepts connections on TCP and Unix sockets, runs the handshake, then
 * the transmission phase. Also serves pre-connected sockets in transmission mode only
 * (the kernel attach path, where the kernel speaks no handshake).
 *
 * Invariants:
 * - At most maxConnections connections exist at once; more are closed at accept.
 * - A handshake that does not finish within handshakeTimeoutMs is dropped.
 * - close(): stop accepting, finish in-flight requests on every connection, then resolve.
 */
import * as fs from 'fs';
import * as net from 'net';
import * as tls from 'tls';
import type { Duplex } from 'stream';
import type { Logger } from '../util/log';
import type { Volume } from '../volume/types';
import type { ExportRegistry } from './exports';
import { negotiate, TlsConfig, transmissionFlags } from './handshake';
import { Transmission } from './transmission';

export interface TlsFiles {
  /** X.509: certificate and key (both or neither). */
  certPath?: string;
  keyPath?: string;
  caPath?: string;
  /** TLS-PSK keys file, psktool format: one `identity:hexkey` per line. */
  pskPath?: string;
  required: boolean;
}

/** Largest PSK keys file we read, and largest key; the format is tiny. */
const PSK_FILE_MAX_BYTES = 1024 * 1024;

export function parsePskFile(text: string, where: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const m = /^([^:]{1,255}):([0-9a-fA-F]{2,512})$/.exec(line);
    if (!m || (m[2] as string).length % 2 !== 0) throw new Error(`bad PSK file ${where} line ${i + 1}: expected identity:hexkey`);
    keys.set(m[1] as string, Buffer.from(m[2] as string, 'hex'));
  });
  if (keys.size === 0) throw new Error(`PSK file ${where} has no keys`);
  return keys;
}

export interface NbdServerOptions {
  exports: ExportRegistry;
  logger: Logger;
  tls?: TlsFiles;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
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
    const st = fs.statSync(files.pskPath, { throwIfNoEntry: false });
    if (!st) throw new Error(`cannot read TLS PSK file ${files.pskPath}: ENOENT`);
    if (st.size > PSK_FILE_MAX_BYTES) throw new Error(`TLS PSK file ${files.pskPath} is larger than ${PSK_FILE_MAX_BYTES} bytes`);
    psk = parsePskFile(read('PSK file', files.pskPath).toString('utf8'), files.pskPath);
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

  constructor(private readonly opts: NbdServerOptions) {
    this.log = opts.logger;
    this.tls = opts.tls ? loadTlsConfig(opts.tls) : undefined;
    this.maxConnections = opts.maxConnections ?? 128;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 60_000;
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    return this.listen((srv, cb) => srv.listen({ host, port, exclusive: true }, cb), `${host}:${port}`).then(
      (srv) => srv.address() as net.AddressInfo,
    );
  }

  async listenUnix(path: string): Promise<void> {
    // A stale socket file from a dead server would make listen fail with EADDRINUSE;
    // remove it only if nothing answers on it.
    if (fs.existsSync(path)) {
      const alive = await new Promise<boolean>((resolve) => {
        const c = net.connect(path);
        c.once('connect', () => {
          c.destroy();
          resolve(true);
        });
        c.once('error', () => resolve(false));
      });
      if (alive) throw new Error(`socket ${path} is in use by another server`);
      fs.unlinkSync(path);
    }
    await this.listen((srv, cb) => srv.listen(path, cb), path);
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
    if (this.shuttingDown || this.conns.size >= this.maxConnections) {
      this.log.warn({ connections: this.conns.size }, 'refusing connection (limit reached or shutting down)');
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const conn: Conn = { socket, id: this.nextId++ };
    this.conns.add(conn);
    const log = this.log.child({ conn: conn.id, peer: socket.remoteAddress ?? 'unix' });
    log.debug('connection accepted');
    socket.on('error', () => undefined);
    const timer = setTimeout(() => {
      log.warn('handshake timed out');
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
        if (!session) {
          this.conns.delete(conn);
          return;
        }
        if (session.socket.destroyed) {
          this.conns.delete(conn);
          return;
        }
        session.socket.on('error', () => undefined);
        log.info({ export: session.exportName, structured: session.structuredReplies, tls: session.tls }, 'client connected');
        conn.socket = session.socket;
        const t = new Transmission(session, log);
        conn.transmission = t;
        session.volume.onRevoke?.(() => void t.shutdown());
        void t.closed.then(() => {
          session.volume.detach?.();
          this.conns.delete(conn);
          log.info({ requests: t.requestsServed }, 'client disconnected');
        });
      })
      .catch((e: unknown) => {
        clearTimeout(timer);
        log.error({ err: (e as Error).message }, 'handshake failed');
        socket.destroy();
        this.conns.delete(conn);
      });
  }

  /**
   * Serves a connected socket in transmission mode only (no handshake), with simple
   * replies, e.g. one end of a socketpair handed to the kernel's nbd driver.
   */
  serveTransmission(socket: net.Socket, volume: Volume, opts: { exportName: string }): { closed: Promise<void>; close(): Promise<void> } {
    const conn: Conn = { socket, id: this.nextId++ };
    this.conns.add(conn);
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
    // net.Server.close() calls back only once every connection has ended, so start it
    // (no new connections from here on) and wait for it after closing the connections.
    const listenersClosed = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    const pending: Promise<void>[] = [];
    for (const c of this.conns) {
      if (c.transmission) pending.push(c.transmission.shutdown());
      else c.socket.destroy();
    }
    await Promise.all(pending);
    await Promise.all(listenersClosed);
  }
}

/** Transmission flags for a volume in simple-reply mode (what the kernel is told). */
export { transmissionFlags };
