/**
 * Metrics for `nvmirror serve --metrics HOST:PORT` (and `receive --metrics`, without a
 * volume): one registry holding the NBD server's metrics, a volume directory's (engine)
 * metrics and the process's, exposed over HTTP. `registry` is the hook for what runs beside the server (the mirror) to
 * register its own counters and gauges.
 *
 * Invariants:
 * - Created before the NBD server (which reports to `nbd`); attachServer() once after.
 * - close() stops the HTTP endpoint; metrics objects stay usable (no-ops for nobody).
 */
import type { Volume } from '../volume/types';
import { EngineVolume } from '../volume/engine';
import { serveMetrics, type MetricsEndpoint } from './http';
import { NbdMetrics } from './nbd-metrics';
import { MetricsRegistry } from './registry';
import { registerEngineMetrics } from './volume-metrics';
import { logDroppedLines } from '../util/log';

export interface ServeMetrics {
  readonly registry: MetricsRegistry;
  readonly nbd: NbdMetrics;
  readonly endpoint: MetricsEndpoint;
  /** http://HOST:PORT/metrics */
  readonly url: string;
  close(): Promise<void>;
}

export async function startServeMetrics(listen: { host: string; port: number }, volume: Volume | undefined): Promise<ServeMetrics> {
  const registry = new MetricsRegistry();
  const nbd = new NbdMetrics(registry);
  if (volume instanceof EngineVolume) registerEngineMetrics(registry, volume);
  const rss = registry.gauge('process_resident_memory_bytes', 'Resident memory size').labels();
  registry.gauge('process_start_time_seconds', 'Start time of the process since the Unix epoch').labels().set(Math.round(Date.now() / 1000 - process.uptime()));
  const logDropped = registry.counter('nvmirror_log_lines_dropped_total', "Log lines dropped because the server's stderr was not read fast enough (its queue full)").labels();
  registry.onCollect(() => {
    rss.set(process.memoryUsage.rss());
    logDropped.setTotal(logDroppedLines());
  });
  const endpoint = await serveMetrics(registry, listen.host, listen.port);
  const h = endpoint.address.address.includes(':') ? `[${endpoint.address.address}]` : endpoint.address.address;
  return { registry, nbd, endpoint, url: `http://${h}:${endpoint.address.port}/metrics`, close: () => endpoint.close() };
}
