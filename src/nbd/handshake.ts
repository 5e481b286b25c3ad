/**
 * Fixed-newstyle handshake and option haggling. Runs once per connection before the
 * transmission phase. Every option's length is capped before anything is buffered;
 * the number of options is capped; a client that breaks framing (bad magic, unknown
 * client flags, oversize options) is disconnected, everything else gets an option
 * error reply and haggling continues.
 *
 * Invariants:
 * - Nothing but STARTTLS/ABORT is honoured before TLS when TLS is required.
 * - All negotiated state (structured replies, meta contexts) resets after STARTTLS.
 * - Transmission starts only with an export that exists, via EXPORT_NAME or GO.
 * - Every way out of the handshake ends with the socket destroyed (at once, or after
 *   ABORT's reply within LINGER_MS): no half-closed socket is left behind.
 */
import type { Duplex } from 'stream';
import * as net from 'net';
import * as tls from 'tls';
import type { Logger } from '../util/log';
import type { Volume } from '../volume/types';
import type { ExportRegistry } from '../volume/exports';
import { LINGER_MS } from './limits';
import * as P from './protocol';
import {
  ByteQueue,
  ProtocolError,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionError,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
  parseInfoRequest,
  parseMetaContextRequest,
  parseOptionHeader,
} from './wire';

export interface TlsConfig {
  context: tls.SecureContext;
  /** TLS-PSK identities and keys (psktool format); undefined when not configured. */
  psk: Map<string, Buffer> | undefined;
  /** Require and verify a client certificate (when a CA was given). */
  requestCert: boolean;
  required: boolean;
}

export interface NegotiatedSession {
  socket: Duplex;
  exportName: string;
  volume: Volume;
  structuredReplies: boolean;
  /** base:allocation selected with SET_META_CONTEXT for this export. */
  baseAllocation: boolean;
  transmissionFlags: number;
  /** Bytes received after the handshake, to be parsed as requests first. */
  leftover: Buffer[];
  tls: boolean;
}

export function transmissionFlags(volume: Volume, structured: boolean): number {
  const c = volume.caps;
  let f = P.TFLAG_HAS_FLAGS;
  if (c.readOnly) f |= P.TFLAG_READ_ONLY;
  if (c.canFlush) f |= P.TFLAG_SEND_FLUSH;
  if (c.canFua) f |= P.TFLAG_SEND_FUA;
  if (c.rotational) f |= P.TFLAG_ROTATIONAL;
  if (c.canTrim && !c.readOnly) f |= P.TFLAG_SEND_TRIM;
  if (c.canZero && !c.readOnly) f |= P.TFLAG_SEND_WRITE_ZEROES;
  if (c.canFastZero && c.canZero && !c.readOnly) f |= P.TFLAG_SEND_FAST_ZERO;
  if (structured) f |= P.TFLAG_SEND_DF;
  if (c.canMultiConn) f |= P.TFLAG_CAN_MULTI_CONN;
  if (c.canCache) f |= P.TFLAG_SEND_CACHE;
  return f;
}

class Disconnect extends Error {}

/** Reads from a Duplex into a bounded queue; waits for n bytes with a promise. */
class SocketReader {
  readonly q = new ByteQueue(P.MAX_OPTION_BYTES + P.OPTION_HEADER_BYTES + 64 * 1024);
  private waiter: (() => void) | undefined;
  private ended = false;
  private readonly onData = (c: Buffer): void => {
    try {
      this.q.push(c);
    } catch {
      this.ended = true; // client is flooding us during the handshake
      this.socket.destroy();
    }
    this.wake();
  };
  private readonly onEnd = (): void => {
    this.ended = true;
    this.wake();
  };

  constructor(readonly socket: Duplex) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  async need(n: number): Promise<void> {
    while (this.q.length < n) {
      if (this.ended) throw new Disconnect('client went away during handshake');
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  async take(n: number): Promise<Buffer> {
    await this.need(n);
    const b = this.q.take(n);
    if (!b) throw new Disconnect('short read');
    return b;
  }

  detach(): Buffer[] {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
    this.socket.pause();
    return this.q.drain();
  }
}

export interface HandshakeOptions {
  exports: ExportRegistry;
  tls: TlsConfig | undefined;
  logger: Logger;
  /** True once the server is shutting down: options get ERR_SHUTDOWN. */
  isShuttingDown(): boolean;
}

function write(socket: Duplex, b: Buffer): void {
  socket.write(b);
}

/**
 * Runs the handshake on a fresh socket. Resolves with the negotiated session, or
 * undefined if the client aborted or was disconnected (socket already destroyed).
 */
export async function negotiate(raw: Duplex, opts: HandshakeOptions): Promise<NegotiatedSession | undefined> {
  const log = opts.logger;
  let socket: Duplex = raw;
  let reader = new SocketReader(socket);
  let usingTls = false;
  let structured = false;
  let metaExport: string | undefined; // export name base:allocation was selected for
  let optionCount = 0;

  const reply = (option: number, type: number, data?: Buffer): void => write(socket, encodeOptionReply(option, type, data));
  const error = (option: number, type: number, msg: string): void => {
    log.debug({ option, type: type - 0x80000000, msg }, 'option refused');
    write(socket, encodeOptionError(option, type, msg));
  };
  /** The client's error for a name no export answers: the registry's reason, or plainly unknown. */
  const missing = (name: string): string => opts.exports.whyMissing?.(name) ?? `unknown export "${name}"`;
  const hangUp = (why: string): undefined => {
    log.info({ why }, 'handshake: disconnecting client');
    reader.detach();
    socket.destroy();
    return undefined;
  };

  try {
    write(socket, encodeServerGreeting());
    const cf = (await reader.take(4)).readUInt32BE(0);
    if ((cf & ~P.KNOWN_CLIENT_FLAGS) !== 0) return hangUp(`unknown client flags 0x${cf.toString(16)}`);
    const noZeroes = (cf & P.FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      await reader.need(P.OPTION_HEADER_BYTES);
      const hdr = parseOptionHeader(reader.q);
      if (!hdr) throw new Disconnect('short option header');
      const { option, lengthBytes } = hdr;
      if (++optionCount > P.MAX_OPTIONS) return hangUp(`more than ${P.MAX_OPTIONS} options`);
      if (lengthBytes > P.MAX_OPTION_BYTES) {
        // Never buffer it. EXPORT_NAME cannot get an error reply; others get TOO_BIG. Then hang up:
        // draining up to 4 GiB from a client that is likely hostile is not worth it.
        if (option !== P.OPT_EXPORT_NAME) error(option, P.REP_ERR_TOO_BIG, `option length ${lengthBytes} exceeds ${P.MAX_OPTION_BYTES}`);
        return hangUp(`option ${option} length ${lengthBytes} too large`);
      }
      const data = lengthBytes > 0 ? await reader.take(lengthBytes) : Buffer.alloc(0);

      if (opts.isShuttingDown() && option !== P.OPT_ABORT) {
        if (option === P.OPT_EXPORT_NAME) return hangUp('server shutting down');
        error(option, P.REP_ERR_SHUTDOWN, 'server is shutting down');
        continue;
      }
      const tlsBlocked = opts.tls?.required === true && !usingTls;
      if (tlsBlocked && option !== P.OPT_STARTTLS && option !== P.OPT_ABORT) {
        if (option === P.OPT_EXPORT_NAME) return hangUp('EXPORT_NAME before STARTTLS on a TLS-only server');
        error(option, P.REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
        continue;
      }

      switch (option) {
        case P.OPT_ABORT:
          if (lengthBytes === 0) reply(option, P.REP_ACK);
          else error(option, P.REP_ERR_INVALID, 'ABORT takes no data');
          // Either way the client wants out: close after the reply is written. Keep reading
          // (and discarding) so the client's FIN is seen, and destroy after LINGER_MS at
          // most: a paused, half-closed socket would never be noticed closing (a leak).
          reader.detach();
          socket.resume();
          socket.end();
          setTimeout(() => socket.destroy(), LINGER_MS).unref();
          return undefined;

        case P.OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          const volume = opts.exports.lookup(name);
          if (!volume) return hangUp(`${missing(name)} (EXPORT_NAME)`);
          const tflags = transmissionFlags(volume, false);
          write(socket, encodeExportNameReply(volume.sizeBytes, tflags, noZeroes));
          return finish(name, volume, false, false, tflags);
        }

        case P.OPT_LIST: {
          if (lengthBytes !== 0) {
            error(option, P.REP_ERR_INVALID, 'LIST takes no data');
            break;
          }
          for (const e of opts.exports.list()) reply(option, P.REP_SERVER, encodeServerEntry(e.name, e.description));
          reply(option, P.REP_ACK);
          break;
        }

        case P.OPT_STARTTLS: {
          if (lengthBytes !== 0) {
            error(option, P.REP_ERR_INVALID, 'STARTTLS takes no data');
            break;
          }
          if (!opts.tls) {
            error(option, P.REP_ERR_POLICY, 'TLS is not configured on this server');
            break;
          }
          if (usingTls) {
            error(option, P.REP_ERR_INVALID, 'TLS already negotiated');
            break;
          }
          reply(option, P.REP_ACK);
          const pending = reader.detach();
          if (pending.length > 0) return hangUp('data sent after STARTTLS before the TLS handshake');
          const secured = await upgradeToTls(socket, opts.tls);
          if (!secured) return hangUp('TLS handshake failed');
          socket = secured;
          reader = new SocketReader(socket);
          usingTls = true;
          structured = false;
          metaExport = undefined;
          break;
        }

        case P.OPT_STRUCTURED_REPLY:
          if (lengthBytes !== 0) error(option, P.REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
          else {
            structured = true;
            reply(option, P.REP_ACK);
          }
          break;

        case P.OPT_LIST_META_CONTEXT:
        case P.OPT_SET_META_CONTEXT: {
          const isSet = option === P.OPT_SET_META_CONTEXT;
          if (isSet) metaExport = undefined; // SET replaces the selection, even when it fails
          if (!structured) {
            error(option, P.REP_ERR_INVALID, 'negotiate STRUCTURED_REPLY first');
            break;
          }
          let parsed: { name: string; queries: string[] };
          try {
            parsed = parseMetaContextRequest(data);
          } catch (e) {
            error(option, P.REP_ERR_INVALID, (e as Error).message);
            break;
          }
          if (!opts.exports.lookup(parsed.name)) {
            error(option, P.REP_ERR_UNKNOWN, missing(parsed.name));
            break;
          }
          const matches = matchBaseAllocation(parsed.queries, isSet);
          if (matches) reply(option, P.REP_META_CONTEXT, encodeMetaContext(isSet ? P.META_CONTEXT_BASE_ALLOCATION_ID : 0, P.META_CONTEXT_BASE_ALLOCATION));
          if (isSet && matches) metaExport = parsed.name;
          reply(option, P.REP_ACK);
          break;
        }

        case P.OPT_INFO:
        case P.OPT_GO: {
          let parsed: { name: string; infos: number[] };
          try {
            parsed = parseInfoRequest(data);
          } catch (e) {
            error(option, P.REP_ERR_INVALID, (e as Error).message);
            break;
          }
          const volume = opts.exports.lookup(parsed.name);
          if (!volume) {
            error(option, P.REP_ERR_UNKNOWN, missing(parsed.name));
            break;
          }
          const tflags = transmissionFlags(volume, structured);
          reply(option, P.REP_INFO, encodeInfoExport(volume.sizeBytes, tflags));
          if (parsed.infos.includes(P.INFO_NAME)) reply(option, P.REP_INFO, encodeInfoString(P.INFO_NAME, parsed.name));
          if (parsed.infos.includes(P.INFO_DESCRIPTION)) reply(option, P.REP_INFO, encodeInfoString(P.INFO_DESCRIPTION, volume.description));
          // Our minimum block size is 1, so sending BLOCK_SIZE unrequested is harmless and informative.
          const c = volume.caps;
          reply(option, P.REP_INFO, encodeInfoBlockSize(c.minBlockSizeBytes, c.preferredBlockSizeBytes, P.MAX_PAYLOAD_BYTES));
          reply(option, P.REP_ACK);
          if (option === P.OPT_GO) return finish(parsed.name, volume, structured, metaExport === parsed.name, tflags);
          break;
        }

        default:
          error(option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
      }
    }
  } catch (e) {
    if (e instanceof ProtocolError) return hangUp(e.message);
    if (e instanceof Disconnect) {
      reader.detach();
      socket.destroy();
      return undefined;
    }
    throw e;
  }

  function finish(exportName: string, volume: Volume, structuredReplies: boolean, baseAllocation: boolean, tflags: number): NegotiatedSession {
    const leftover = reader.detach();
    return { socket, exportName, volume, structuredReplies, baseAllocation, transmissionFlags: tflags, leftover, tls: usingTls };
  }
}

/** LIST with no queries lists everything; a query matches if it is "base:" or "base:allocation". */
function matchBaseAllocation(queries: string[], isSet: boolean): boolean {
  if (queries.length === 0) return !isSet;
  return queries.some((q) => q === P.META_CONTEXT_BASE_ALLOCATION || (!isSet && q === 'base:'));
}

function upgradeToTls(socket: Duplex, cfg: TlsConfig): Promise<tls.TLSSocket | undefined> {
  return new Promise((resolve) => {
    const psk = cfg.psk;
    const s = new tls.TLSSocket(socket as net.Socket, {
      isServer: true,
      secureContext: cfg.context,
      requestCert: cfg.requestCert,
      rejectUnauthorized: cfg.requestCert,
      // Unknown identities get no key, which fails the handshake.
      ...(psk ? { pskCallback: (_s: tls.TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
    });
    const timer = setTimeout(() => {
      s.destroy();
      resolve(undefined);
    }, 30_000);
    s.once('secure', () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once('error', () => {
      clearTimeout(timer);
      s.destroy();
      resolve(undefined);
    });
    socket.resume();
  });
}
