/**
 * The NBD server's metrics: requests, bytes and latency by command, errors by kind,
 * connections. Implements the server's NbdObserver (src/nbd/observer.ts).
 *
 * Invariants:
 * - Label values are bounded sets: a command is one of COMMAND_NAMES or "unknown"; an
 *   error kind is an errno name, "checksum", "protocol" or "handshake".
 * - requests_total counts every reply, failed or not; bytes_total only the bytes of
 *   successful requests; errors_total the failed ones (and client errors).
 * - Per request, the cost is a few array lookups and additions (no allocation).
 */
import type { NbdObserver } from '../nbd/observer';
import * as P from '../nbd/protocol';
import type { Counter, CounterChild, HistogramChild, MetricsRegistry } from './registry';

/** Latency buckets in seconds: 50 µs to 10 s. */
export const LATENCY_BUCKETS_S = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];

export const COMMAND_NAMES: Record<number, string> = {
  [P.CMD_READ]: 'read',
  [P.CMD_WRITE]: 'write',
  [P.CMD_FLUSH]: 'flush',
  [P.CMD_TRIM]: 'trim',
  [P.CMD_CACHE]: 'cache',
  [P.CMD_WRITE_ZEROES]: 'write_zeroes',
  [P.CMD_BLOCK_STATUS]: 'block_status',
};
const COMMAND_SLOTS = 8; // CMD_READ .. CMD_BLOCK_STATUS, then "unknown"

interface PerCommand {
  requests: CounterChild;
  bytes: CounterChild;
  latency: HistogramChild;
}

/** What the metrics read from the server at each scrape. */
export interface ServerGauges {
  readonly connectionCount: number;
  readonly budget: { readonly usedBytes: number };
}

export class NbdMetrics implements NbdObserver {
  private readonly perCommand: PerCommand[] = [];
  private readonly errors: Counter;
  private readonly accepted: CounterChild;
  private readonly refused: CounterChild;
  private readonly transmissions: Counter;

  constructor(private readonly registry: MetricsRegistry) {
    const requests = registry.counter('nvmirror_nbd_requests_total', 'NBD requests answered, by command', ['command']);
    const bytes = registry.counter('nvmirror_nbd_bytes_total', 'Bytes of successful NBD requests (their length), by command', ['command']);
    const latency = registry.histogram('nvmirror_nbd_request_duration_seconds', 'NBD request latency, from its header to its reply, by command', ['command'], LATENCY_BUCKETS_S);
    this.errors = registry.counter('nvmirror_nbd_errors_total', 'Failed NBD requests by error kind (errno name, checksum), and client errors (protocol, handshake)', ['kind']);
    for (let t = 0; t <= COMMAND_SLOTS; t++) {
      const name = COMMAND_NAMES[t] ?? 'unknown';
      this.perCommand.push({ requests: requests.labels(name), bytes: bytes.labels(name), latency: latency.labels(name) });
    }
    const conns = registry.counter('nvmirror_nbd_connections_total', 'Client connections, by outcome (accepted into a slot, refused)', ['outcome']);
    this.accepted = conns.labels('accepted');
    this.refused = conns.labels('refused');
    this.transmissions = registry.counter('nvmirror_nbd_transmissions_total', 'Connections that entered transmission, by data path (native thread, stream)', ['path']);
  }

  /** Gauges read from the server at each scrape: open connections, budget in use. */
  attachServer(server: ServerGauges): void {
    const open = this.registry.gauge('nvmirror_nbd_connections', 'Open client connections (handshake and transmission)').labels();
    const budget = this.registry.gauge('nvmirror_nbd_memory_budget_used_bytes', 'Bytes in flight charged to the server-wide memory budget').labels();
    this.registry.onCollect(() => {
      open.set(server.connectionCount);
      budget.set(server.budget.usedBytes);
    });
  }

  request(command: number, lengthBytes: number, errorKind: string | undefined, durationMs: number): void {
    const c = this.perCommand[command < COMMAND_SLOTS && COMMAND_NAMES[command] !== undefined ? command : COMMAND_SLOTS] as PerCommand;
    c.requests.inc();
    c.latency.observe(durationMs / 1000);
    if (errorKind === undefined) c.bytes.inc(lengthBytes);
    else this.errors.labels(errorKind).inc();
  }

  /** EIOs served over NBD because a block failed its checksum (by the error's text). */
  checksumErrors(): number {
    return this.errors.labels('checksum').get();
  }

  clientError(kind: 'protocol' | 'handshake'): void {
    this.errors.labels(kind).inc();
  }

  connectionAccepted(): void {
    this.accepted.inc();
  }

  connectionRefused(): void {
    this.refused.inc();
  }

  transmissionStarted(path: 'native' | 'stream'): void {
    this.transmissions.labels(path).inc();
  }
}
