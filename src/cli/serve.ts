/** `nvmirror serve`: serve a volume over NBD (TCP and/or a Unix socket, optional TLS). */
import * as fs from 'fs';
import * as path from 'path';
import { Command, Option } from 'commander';
import { NbdServer, type TlsFiles } from '../nbd/server';
import { BUSY_POLL_US_DEFAULT, BUSY_POLL_US_MAX } from '../nbd/native-transmission';
import { openVolume } from '../volume/open';
import { createVolumeDir } from '../volume/dir';
import { LABEL_NAME } from '../volume/label';
import { createLogger } from '../util/log';
import { formatSize, parseSize } from '../util/size';
import { parseRate } from '../util/rate';
import { MirrorSource } from '../mirror/source';
import { keepBaseWithoutMirror } from '../mirror/base-hold';
import { MIRROR_STATE_NAME, readRelationship, relationshipProblem, type MirrorPolicy, type MirrorRelationship } from '../mirror/relationship';
import type { MirrorMode } from '../mirror/wire';
import { clientTls, linkSecurity, type LinkArgs } from '../mirror/link';
import { EngineVolume } from '../volume/engine';
import { raidDeviceOf, raidNotes } from '../volume/served';
import { assert } from '../util/assert';
import { hostPortArg, logLevelArg, onStopSignals, sizeArg, sizeRangeArg, intArg, durationArg, volumeSpecFromArgs } from './common';
import {
  IDLE_TIMEOUT_MS_DEFAULT,
  MAX_CONNECTIONS_DEFAULT,
  MEMORY_BUDGET_BYTES_DEFAULT,
  MEMORY_BUDGET_BYTES_MAX,
  MEMORY_BUDGET_BYTES_MIN,
  STALL_TIMEOUT_MS_DEFAULT,
} from '../nbd/limits';
import { formatDurationMs } from '../util/duration';
import { readPskFile } from '../util/psk';
import { takeListenFds } from '../nbd/socket-activation';
import { startServeMetrics, type ServeMetrics } from '../metrics/serve-metrics';
import { registerMirrorMetrics } from '../mirror/metrics';

interface ServeOpts extends LinkArgs {
  mirror?: boolean;
  mirrorTo?: { host: string; port: number };
  mirrorMode?: string;
  mirrorPolicy?: string;
  mirrorStallTimeout?: number;
  /** --mirror-rate: bytes per second; 0 removes a recorded cap. */
  mirrorRate?: number;
  memory?: number;
  file?: string;
  listen?: { host: string; port: number };
  socket?: string;
  export: string;
  readOnly?: boolean;
  logLevel: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsRequired?: boolean;
  tlsPsk?: string;
  cpInterval?: number;
  maxConnections: number;
  busyPoll: number;
  memoryBudget: number;
  stallTimeout: number;
  idleTimeout: number;
  create?: number;
  metrics?: { host: string; port: number };
}

export const DEFAULT_LISTEN = { host: '127.0.0.1', port: 10809 };

export interface UriTls {
  /** TLS-PSK: the identity to connect as and the keys file (libnbd's tls-psk-file). */
  psk?: { user: string; file: string };
}

/**
 * The NBD URI (libnbd's syntax) of an endpoint; with TLS-PSK it carries the user and the
 * keys file, so that `nbdinfo URI` works as printed.
 */
export function uriFor(endpoint: { tcp?: { host: string; port: number }; unix?: string }, exportName: string, tls: UriTls | false): string {
  const name = encodeURIComponent(exportName);
  const scheme = `nbd${tls ? 's' : ''}`;
  const user = tls && tls.psk ? `${encodeURIComponent(tls.psk.user)}@` : '';
  const query: string[] = [];
  if (endpoint.unix !== undefined) query.push(`socket=${endpoint.unix}`);
  if (tls && tls.psk) query.push(`tls-psk-file=${tls.psk.file}`);
  const q = query.length > 0 ? `?${query.join('&')}` : '';
  if (endpoint.unix !== undefined) return `${scheme}+unix://${user}/${name}${q}`;
  const t = endpoint.tcp as { host: string; port: number };
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `${scheme}://${user}${host}:${t.port}/${name}${q}`;
}

/** The first identity of a PSK keys file (what the printed URI connects as). */
function firstPskUser(file: string): string {
  return readPskFile(file, 'TLS PSK file').keys().next().value as string; // at least one key, or it throws
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description('serve a volume over NBD')
    .argument('[DIR]', 'a volume directory (see `nvmirror create`)')
    .option('--memory <SIZE>', 'serve a sparse in-memory volume of SIZE (K/M/G/T suffixes)', sizeArg)
    .option('--file <PATH>', 'serve a raw image file')
    .option('--listen <HOST:PORT>', `listen on TCP (default ${DEFAULT_LISTEN.host}:${DEFAULT_LISTEN.port} unless --socket is given)`, hostPortArg)
    .option('--socket <PATH>', 'listen on a Unix socket')
    .option('--export <NAME>', 'export name', '')
    .option('--read-only', 'refuse writes')
    .addOption(new Option('--log-level <LEVEL>', 'log level').default('info').argParser(logLevelArg))
    .option('--tls-cert <FILE>', 'TLS server certificate (PEM); enables STARTTLS')
    .option('--tls-key <FILE>', 'TLS server private key (PEM)')
    .option('--tls-ca <FILE>', 'CA certificate (PEM): require client certificates signed by it')
    .option('--tls-psk <FILE>', 'TLS-PSK keys file (psktool format: identity:hexkey per line); enables STARTTLS')
    .option('--tls-required', 'refuse clients that do not upgrade to TLS')
    .option('--cp-interval <DURATION>', 'consistency point interval for volume directories, e.g. 10s, 500ms (a bare number is ms)', durationArg(10, 3_600_000, 'ms'))
    .option('--create <SIZE>', 'create the volume directory DIR with SIZE first if it does not exist yet', sizeArg)
    .addOption(
      new Option('--max-connections <N>', 'maximum concurrent connections; when all are taken, the longest-idle one makes room')
        .argParser(intArg(1, 4096))
        .default(MAX_CONNECTIONS_DEFAULT),
    )
    .addOption(
      new Option('--busy-poll <US>', 'microseconds a connection thread polls without sleeping for its client\'s next request, while requests come that soon (0: never)')
        .argParser(intArg(0, BUSY_POLL_US_MAX))
        .default(BUSY_POLL_US_DEFAULT),
    )
    .addOption(
      new Option('--memory-budget <SIZE>', 'server-wide cap on request and reply bytes in flight; reading pauses while it is reached')
        .argParser(sizeRangeArg(MEMORY_BUDGET_BYTES_MIN, MEMORY_BUDGET_BYTES_MAX))
        .default(MEMORY_BUDGET_BYTES_DEFAULT, formatSize(MEMORY_BUDGET_BYTES_DEFAULT)),
    )
    .addOption(
      new Option('--stall-timeout <DURATION>', 'drop a client that reads none of its replies, or stops mid-request, this long (0: never; a bare number is s)')
        .argParser(durationArg(100, 24 * 3_600_000, 's', true))
        .default(STALL_TIMEOUT_MS_DEFAULT, formatDurationMs(STALL_TIMEOUT_MS_DEFAULT)),
    )
    .addOption(
      new Option('--idle-timeout <DURATION>', 'drop a client with nothing in flight that sends nothing this long (0: never; a bare number is s)')
        .argParser(durationArg(100, 30 * 24 * 3_600_000, 's', true))
        .default(IDLE_TIMEOUT_MS_DEFAULT, IDLE_TIMEOUT_MS_DEFAULT === 0 ? 'never' : formatDurationMs(IDLE_TIMEOUT_MS_DEFAULT)),
    )
    .option('--mirror-to <HOST:PORT>', 'mirror the volume directory to `nvmirror receive` at HOST:PORT', hostPortArg)
    .addOption(new Option('--mirror-mode <MODE>', 'sync: a write is acknowledged once the peer holds it; async: CPs only (without --mirror-to: changes the recorded relationship)').choices(['sync', 'async']))
    .addOption(new Option('--mirror-policy <POLICY>', 'while the peer is unreachable: keep serving (available) or fail writes with EIO (strict) (without --mirror-to: changes the recorded relationship)').choices(['available', 'strict']))
    .option('--mirror-psk <FILE>', 'TLS-PSK keys for the mirror link (psktool format; the same file on the receiver)')
    .option('--mirror-tls-cert <FILE>', 'TLS certificate for the mirror link (PEM)')
    .option('--mirror-tls-key <FILE>', 'TLS private key for the mirror link (PEM)')
    .option('--mirror-tls-ca <FILE>', 'CA that signed the receiver\'s certificate (PEM)')
    .option('--mirror-insecure', 'mirror over plaintext TCP, unauthenticated')
    .option('--no-mirror', 'serve a volume directory without the mirror relationship it has recorded')
    .option('--metrics <HOST:PORT>', 'serve Prometheus metrics at http://HOST:PORT/metrics', hostPortArg)
    .option('--mirror-rate <SIZE>', 'cap a baseline\'s and a resync\'s traffic at SIZE per second, e.g. 50M (0: no cap); recorded with the relationship', (v: string) => (v.trim() === '0' ? 0 : parseRate(v, parseSize)))
    .option('--mirror-stall-timeout <DURATION>', 'drop the mirror connection when the peer acknowledges nothing this long, e.g. 15s (a bare number is ms)', durationArg(100, 3_600_000, 'ms'))
    .action(async (dir: string | undefined, o: ServeOpts) => {
      await serve(dir, o);
    });
}

/**
 * The mirror relationship to run: from the flags, or (a volume directory served without
 * them and without --no-mirror) the one recorded in DIR/mirror-source.json, so a restart
 * resumes it. Link files are kept as absolute paths.
 */
function mirrorRelationship(dir: string | undefined, o: ServeOpts): Omit<MirrorRelationship, 'destCp'> | undefined {
  if (o.mirrorTo !== undefined) {
    const abs = (p: string | undefined): string | undefined => (p === undefined ? undefined : path.resolve(p));
    const link: LinkArgs = {};
    for (const k of ['mirrorPsk', 'mirrorTlsCert', 'mirrorTlsKey', 'mirrorTlsCa'] as const) {
      const v = abs(o[k]);
      if (v !== undefined) link[k] = v;
    }
    if (o.mirrorInsecure) link.mirrorInsecure = true;
    const rel: Omit<MirrorRelationship, 'destCp'> = { peer: `${o.mirrorTo.host}:${o.mirrorTo.port}`, mode: (o.mirrorMode ?? 'sync') as MirrorMode, policy: (o.mirrorPolicy ?? 'available') as MirrorPolicy, link };
    if (o.mirrorRate) rel.rateBytesPerSec = o.mirrorRate;
    return rel;
  }
  if (dir === undefined || o.mirror === false) return undefined;
  const rel = readRelationship(path.resolve(dir));
  const problem = rel ? undefined : relationshipProblem(path.resolve(dir));
  if (problem !== undefined) {
    // Serving on without the mirror would drop its guarantees (strict: RPO 0) without a word.
    throw new Error(`${path.join(path.resolve(dir), MIRROR_STATE_NAME)}: ${problem}: give --mirror-to HOST:PORT (with its mode, policy and link options) to record the relationship again (the destination then gets a full baseline), or --no-mirror to serve without mirroring`);
  }
  // --mirror-rate alone changes the recorded relationship's cap (0 removes it), and
  // --mirror-mode / --mirror-policy alone its mode and policy (the same destination: its
  // base is kept, the mirror resumes with a resync).
  if (rel && o.mirrorRate !== undefined) {
    if (o.mirrorRate > 0) rel.rateBytesPerSec = o.mirrorRate;
    else delete rel.rateBytesPerSec;
  }
  if (rel && o.mirrorMode !== undefined && o.mirrorMode !== rel.mode) {
    process.stdout.write(`nvmirror: the mirror to ${rel.peer} changes from ${rel.mode} to ${o.mirrorMode} mode\n`);
    rel.mode = o.mirrorMode as MirrorMode;
  }
  if (rel && o.mirrorPolicy !== undefined && o.mirrorPolicy !== rel.policy) {
    process.stdout.write(`nvmirror: the mirror to ${rel.peer} changes from the ${rel.policy} to the ${o.mirrorPolicy} policy\n`);
    rel.policy = o.mirrorPolicy as MirrorPolicy;
  }
  return rel;
}

async function serve(dir: string | undefined, o: ServeOpts): Promise<void> {
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
  if (o.tlsCa !== undefined && o.tlsCert === undefined) throw new Error('--tls-ca needs --tls-cert and --tls-key');
  if (o.tlsRequired && o.tlsCert === undefined && o.tlsPsk === undefined) throw new Error('--tls-required needs --tls-cert and --tls-key, or --tls-psk');
  if (o.create !== undefined) {
    if (dir === undefined) throw new Error('--create needs a volume directory argument');
    if (!fs.existsSync(path.join(dir, LABEL_NAME))) {
      await createVolumeDir(path.resolve(dir), { sizeBytes: o.create });
      process.stdout.write(`nvmirror: created volume ${path.resolve(dir)} (${formatSize(o.create)})\n`);
    }
  }
  const spec = volumeSpecFromArgs(dir, o);
  const mirrorArgs = o.mirrorTo !== undefined || o.mirrorMode !== undefined || o.mirrorPolicy !== undefined;
  if (mirrorArgs && dir === undefined) {
    const given = [o.mirrorTo !== undefined ? '--mirror-to' : '', o.mirrorMode !== undefined ? '--mirror-mode' : '', o.mirrorPolicy !== undefined ? '--mirror-policy' : ''].filter((x) => x !== '');
    throw new Error(`${given.join(', ')}: mirroring needs a volume directory (memory and file volumes are not mirrored)`);
  }
  const rel = mirrorRelationship(dir, o);
  if ((o.mirrorMode !== undefined || o.mirrorPolicy !== undefined) && !rel) {
    throw new Error(o.mirror === false ? '--mirror-mode/--mirror-policy and --no-mirror contradict each other' : '--mirror-mode and --mirror-policy need --mirror-to or a mirror relationship recorded in the volume directory');
  }
  if (o.mirrorRate !== undefined && !rel) throw new Error(o.mirror === false ? '--mirror-rate and --no-mirror contradict each other' : '--mirror-rate needs --mirror-to or a mirror relationship recorded in the volume directory');
  const mirrorSec = rel ? linkSecurity(rel.link) : undefined;
  const logger = createLogger(o.logLevel);
  let mirror: MirrorSource | undefined;
  if (rel && dir !== undefined && mirrorSec) {
    if (spec.readOnly) throw new Error('mirroring needs the volume served read-write (or --no-mirror)');
    if (o.mirrorTo === undefined) process.stdout.write(`nvmirror: resuming the mirror to ${rel.peer} (${rel.mode}) recorded in ${path.join(path.resolve(dir), MIRROR_STATE_NAME)}; --no-mirror to serve without it\n`);
    const before = o.mirrorTo !== undefined ? readRelationship(path.resolve(dir)) : undefined;
    if (before && before.peer !== rel.peer) {
      // The old destination keeps what it has, but is no longer kept in step (nor its CP held here).
      const had = before.destCp >= 0 ? `its copy at CP ${before.destCp}` : 'no committed copy';
      process.stdout.write(`nvmirror: the mirror moves from ${before.peer} (${had}, no longer kept in step) to ${rel.peer}: a destination without this volume's mirror gets a full baseline\n`);
      logger.warn({ from: before.peer, to: rel.peer, oldDestCp: before.destCp }, 'mirror relationship moved to another destination');
    }
    const tlsOpts = clientTls(mirrorSec);
    const m = new MirrorSource({
      dir: path.resolve(dir), peer: hostPortArg(rel.peer), mode: rel.mode, policy: rel.policy, logger, link: rel.link,
      ...(tlsOpts ? { tls: tlsOpts } : {}),
      ...(o.mirrorStallTimeout !== undefined ? { stallTimeoutMs: o.mirrorStallTimeout } : {}),
      ...(rel.rateBytesPerSec !== undefined ? { rateBytesPerSec: rel.rateBytesPerSec } : {}),
    });
    mirror = m;
    spec.beforeRecovery = (tree) => m.attachTree(tree);
  } else if (dir !== undefined && !spec.readOnly) {
    // Without its recorded mirror (--no-mirror): the destination's CP stays held, so the
    // mirror resumes with a resync.
    const keep = keepBaseWithoutMirror(path.resolve(dir), logger);
    if (keep) spec.beforeRecovery = keep;
  }
  const opened = await openVolume(spec);
  let server: NbdServer | undefined;
  let metrics: ServeMetrics | undefined;
  if (mirror) {
    const v = opened.volume;
    assert(v instanceof EngineVolume, 'a volume directory opens as an engine volume');
    mirror.attachVolume(v);
    const m = mirror;
    v.statusSections.set('mirror', () => m.stats());
    v.controlActions.set('verify', async () => ({ verify: await m.verify() }));
  }
  // Handlers go in before the URI is printed: a client may signal as soon as it sees it.
  onStopSignals(async () => {
    await server?.close();
    await metrics?.close();
    const v = opened.volume;
    if (mirror && v instanceof EngineVolume && !v.caps.readOnly) {
      // Every acknowledged write into a CP, and that CP onto the mirror, while the volume is
      // open: a planned failover then finds them in the mirror's image (bounded wait).
      const last = await v.checkpoint().then(() => undefined, (e: unknown) => (e instanceof Error ? e.message : String(e)));
      const d = last === undefined ? await mirror.drain() : { caughtUp: false, destCp: -1, sourceCp: -1, reason: `the last CP failed: ${last}` };
      if (d.caughtUp) logger.info({ cp: d.destCp }, 'stopping: the mirror holds the last CP');
      else logger.warn({ destCp: d.destCp, sourceCp: d.sourceCp, why: d.reason }, `stopping with the mirror behind (its CP ${d.destCp}, ours ${d.sourceCp}): ${d.reason}; it catches up when the volume is served again`);
    }
    await opened.close(); // the final CP (nothing new by now, with a mirror) is shipped too
    if (mirror) {
      await mirror.stop();
      mirror.detach();
    }
    logger.info('stopped cleanly');
  }, logger);
  const tlsFiles: TlsFiles | undefined =
    o.tlsCert !== undefined || o.tlsPsk !== undefined
      ? {
          ...(o.tlsCert !== undefined ? { certPath: o.tlsCert } : {}),
          ...(o.tlsKey !== undefined ? { keyPath: o.tlsKey } : {}),
          ...(o.tlsCa !== undefined ? { caPath: o.tlsCa } : {}),
          ...(o.tlsPsk !== undefined ? { pskPath: o.tlsPsk } : {}),
          required: o.tlsRequired === true,
        }
      : undefined;
  try {
    const tls: UriTls | false =
      tlsFiles === undefined ? false : o.tlsPsk !== undefined ? { psk: { user: firstPskUser(o.tlsPsk), file: path.resolve(o.tlsPsk) } } : {};
    if (o.metrics) {
      metrics = await startServeMetrics(o.metrics, opened.volume);
      if (mirror) registerMirrorMetrics(metrics.registry, mirror);
    }
    const srv = new NbdServer({
      exports: opened.exports,
      logger,
      maxConnections: o.maxConnections,
      busyPollUs: o.busyPoll,
      memoryBudgetBytes: o.memoryBudget,
      stallTimeoutMs: o.stallTimeout,
      idleTimeoutMs: o.idleTimeout,
      ...(tlsFiles ? { tls: tlsFiles } : {}),
      ...(metrics ? { observer: metrics.nbd } : {}),
    });
    server = srv;
    metrics?.nbd.attachServer(srv);
    // Socket activation (LISTEN_FDS, systemd-socket-activate) replaces --listen/--socket.
    const act = takeListenFds(process.env, process.pid);
    if (act.kind === 'refused') logger.warn({ why: act.reason }, 'ignoring socket activation');
    if (act.kind === 'activated' && (o.listen !== undefined || o.socket !== undefined)) throw new Error('--listen and --socket cannot be used with socket activation (LISTEN_FDS)');
    const tcp = act.kind === 'activated' ? undefined : o.listen ?? (o.socket === undefined ? DEFAULT_LISTEN : undefined);
    const uris: string[] = [];
    if (act.kind === 'activated') for (const s of act.sockets) uris.push(uriFor(await srv.listenFd(s.fd), o.export, tls));
    if (o.socket !== undefined) {
      await srv.listenUnix(path.resolve(o.socket));
      uris.push(uriFor({ unix: path.resolve(o.socket) }, o.export, tls));
    }
    if (tcp) {
      const addr = await srv.listenTcp(tcp.host, tcp.port);
      uris.push(uriFor({ tcp: { host: tcp.host, port: addr.port } }, o.export, tls));
    }
    const v = opened.volume;
    if (v instanceof EngineVolume) {
      const exps = opened.exports;
      v.servedBy = () => ({ uris, exports: exps.list().map((e) => e.name), clients: srv.connectionCount });
    }
    const lines = [
      `nvmirror: serving ${opened.what} (${formatSize(v.sizeBytes)}${v.caps.readOnly ? ', read-only' : ''}) as export "${o.export}"`,
      ...uris.map((u) => `  ${u}`),
      ...(metrics ? [`metrics: ${metrics.url}`] : []),
      `connect with: nbdinfo '${uris[0]}'   (Ctrl-C to stop)`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    logger.info({ uris, what: opened.what, sizeBytes: v.sizeBytes }, 'serving');
    // A RAID volume opened with members out of service says so where the operator looks first.
    const raid = v instanceof EngineVolume ? raidDeviceOf(v) : undefined;
    const health = raid?.health();
    if (health && health.state !== 'online') {
      const notes = raidNotes(health);
      process.stderr.write(notes.map((n) => `nvmirror: warning: ${n}`).join('\n') + '\n' +
        `nvmirror: warning: ${health.state === 'failed' ? 'data on the lost members cannot be read; ' : ''}replace each lost member with: nvmirror replace-member ${dir ?? 'DIR'} OLD NEW\n`);
      logger.warn({ state: health.state, lost: notes.slice(1) }, 'raid: serving with members out of service');
    }
  } catch (e) {
    await server?.close().catch(() => undefined);
    await metrics?.close().catch(() => undefined);
    await opened.close().catch(() => undefined);
    throw e;
  }
}
