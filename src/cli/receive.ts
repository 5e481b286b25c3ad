/** `nvmirror receive`: the mirror destination (src/mirror/receiver.ts), with read-only NBD exports of each mirror. */
import * as path from 'path';
import { Command, Option } from 'commander';
import { BUSY_POLL_US_DEFAULT, BUSY_POLL_US_MAX } from '../nbd/native-transmission';
import { NbdServer } from '../nbd/server';
import { MirrorReceiver, RECEIVER_SOCKET_NAME } from '../mirror/receiver';
import { openReceiveDir } from '../mirror/receive-dir';
import { ControlServer } from '../volume/engine-control';
import { MirrorExports, PIN_HOLD_MS_MAX_DEFAULT } from '../mirror/exports';
import { linkSecurity, serverTls, type LinkArgs } from '../mirror/link';
import { createLogger } from '../util/log';
import { hostPortArg, intArg, logLevelArg, onStopSignals, sizeRangeArg } from './common';
import { MemoryBudget } from '../nbd/budget';
import { MEMORY_BUDGET_BYTES_DEFAULT, MEMORY_BUDGET_BYTES_MAX, MEMORY_BUDGET_BYTES_MIN } from '../nbd/limits';
import { formatSize } from '../util/size';
import { startServeMetrics, type ServeMetrics } from '../metrics/serve-metrics';
import { registerReceiverMetrics } from '../mirror/metrics';

interface ReceiveOpts extends LinkArgs {
  listen: { host: string; port: number };
  metrics?: { host: string; port: number };
  exportListen?: { host: string; port: number };
  exportSocket?: string;
  readerPinMax: number;
  busyPoll: number;
  memoryBudget: number;
  logLevel: string;
}

export function registerReceive(program: Command): void {
  program
    .command('receive')
    .description('receive mirror streams from sources into DIR/<source-uuid>/ and export them read-only')
    .argument('<DIR>', 'directory holding one mirror per source volume')
    .requiredOption('--listen <HOST:PORT>', 'where sources connect', hostPortArg)
    .option('--export-listen <HOST:PORT>', 'serve each mirror read-only over NBD on TCP (export name: the source uuid)', hostPortArg)
    .option('--export-socket <PATH>', 'serve each mirror read-only over NBD on a Unix socket')
    .option('--mirror-psk <FILE>', 'TLS-PSK keys (psktool format), the same file as the sources')
    .option('--mirror-tls-cert <FILE>', 'TLS certificate (PEM)')
    .option('--mirror-tls-key <FILE>', 'TLS private key (PEM)')
    .option('--mirror-tls-ca <FILE>', 'CA that signed the sources\' certificates (PEM)')
    .option('--mirror-insecure', 'accept plaintext, unauthenticated sources')
    .option('--metrics <HOST:PORT>', 'serve Prometheus metrics at http://HOST:PORT/metrics (each mirror, the exports\' NBD server, the process)', hostPortArg)
    .option('--reader-pin-max <SECONDS>', 'longest a mirror reader may stay on one CP (its source keeps that CP\'s blocks meanwhile); then its reads fail and it must reconnect', intArg(1, 7 * 24 * 3600), PIN_HOLD_MS_MAX_DEFAULT / 1000)
    .addOption(
      new Option('--memory-budget <SIZE>', 'process-wide cap on mirror frames waiting to be applied (every source) and NBD request and reply bytes in flight (the exports); reading pauses while it is reached')
        .argParser(sizeRangeArg(MEMORY_BUDGET_BYTES_MIN, MEMORY_BUDGET_BYTES_MAX))
        .default(MEMORY_BUDGET_BYTES_DEFAULT, formatSize(MEMORY_BUDGET_BYTES_DEFAULT)),
    )
    .addOption(
      new Option('--busy-poll <US>', 'microseconds an export connection thread polls without sleeping for its client\'s next request, while requests come that soon (0: never)')
        .argParser(intArg(0, BUSY_POLL_US_MAX))
        .default(BUSY_POLL_US_DEFAULT),
    )
    .addOption(new Option('--log-level <LEVEL>', 'log level').default('info').argParser(logLevelArg))
    .action(async (dir: string, o: ReceiveOpts) => {
      const sec = linkSecurity(o);
      const logger = createLogger(o.logLevel);
      const abs = path.resolve(dir);
      // Before anything listens: a second receiver on DIR, or DIR a volume, fails in one line.
      const dirLock = await openReceiveDir(abs);
      const exports = new MirrorExports(logger, o.readerPinMax * 1000);
      const tlsOpts = serverTls(sec);
      // One budget for the process: every source's frames and every export client's bytes.
      const budget = new MemoryBudget(o.memoryBudget);
      const rx = new MirrorReceiver({ dir: abs, logger, exports, budget, ...(tlsOpts ? { tls: tlsOpts } : {}) });
      let nbd: NbdServer | undefined;
      let control: ControlServer | undefined;
      let metrics: ServeMetrics | undefined;
      onStopSignals(async () => {
        await nbd?.close();
        await control?.close();
        await metrics?.close();
        await rx.close();
        await dirLock.release();
        logger.info('stopped cleanly');
      }, logger);
      if (o.metrics) {
        // Before anything listens: a metrics address in use fails the start with one line.
        metrics = await startServeMetrics(o.metrics, undefined);
        registerReceiverMetrics(metrics.registry, rx);
      }
      const addr = await rx.listen(o.listen.host, o.listen.port);
      control = await ControlServer.listen(path.join(abs, RECEIVER_SOCKET_NAME), async (req) => {
        if (req.op === 'status') return { receiver: { ...rx.stats(), pid: process.pid, standings: rx.standingsList() } };
        if (req.op === 'verify' && req.source !== undefined) return { verify: await rx.verify(req.source) };
        if (req.op === 'release' && typeof req.source === 'string') return { release: await rx.release(req.source, req.force === true) };
        if (req.op === 'unrelease' && typeof req.source === 'string') return { unrelease: rx.unrelease(req.source) };
        if (req.op === 'check' && req.source !== undefined) return { check: await rx.checkMirror(req.source) };
        throw new Error(`a receiver answers status, verify, check and release or unrelease (promote) of a source, not ${req.op}`);
      });
      const lines = [`nvmirror: receiving mirrors into ${abs} on ${o.listen.host}:${addr.port} (${sec.kind === 'insecure' ? 'plaintext' : `TLS ${sec.kind}`})`];
      if (o.exportListen || o.exportSocket) {
        nbd = new NbdServer({ exports, logger, maxConnections: 128, budget, busyPollUs: o.busyPoll, ...(metrics ? { observer: metrics.nbd } : {}) });
        metrics?.nbd.attachServer(nbd);
        if (o.exportSocket) {
          await nbd.listenUnix(path.resolve(o.exportSocket));
          lines.push(`  mirrors read-only at nbd+unix:///<source-uuid>?socket=${path.resolve(o.exportSocket)}`);
        }
        if (o.exportListen) {
          const a = await nbd.listenTcp(o.exportListen.host, o.exportListen.port);
          lines.push(`  mirrors read-only at nbd://${o.exportListen.host}:${a.port}/<source-uuid>`);
        }
      }
      if (metrics) lines.push(`  metrics: ${metrics.url}`);
      process.stdout.write(lines.join('\n') + '\n');
      logger.info({ dir: abs, port: addr.port }, 'receiving');
    });
}
