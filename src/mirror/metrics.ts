/**
 * The mirror source's figures in the Prometheus exposition of `serve --metrics`: read
 * from MirrorSource.stats() at each scrape (no per-write cost).
 */
import type { MetricsRegistry } from '../metrics/registry';
import type { MirrorSource } from './source';

const STATES = ['disconnected', 'baseline', 'resyncing', 'in-sync', 'behind', 'split-brain', 'promoted', 'mirror-ahead'] as const;

export function registerMirrorMetrics(registry: MetricsRegistry, mirror: MirrorSource): void {
  const state = registry.gauge('nvmirror_mirror_state', 'Mirror relationship state (1 for the current one)', ['state']);
  const cps = registry.gauge('nvmirror_mirror_cp', 'Newest committed CP on each side', ['side']);
  const lagCps = registry.gauge('nvmirror_mirror_lag_cps', 'CPs the destination is behind').labels();
  const lagBytes = registry.gauge('nvmirror_mirror_lag_bytes', 'Client bytes the destination does not hold yet').labels();
  const lagSeconds = registry.gauge('nvmirror_mirror_behind_seconds', 'How long the mirror has been behind (0: in sync)').labels();
  const wire = registry.gauge('nvmirror_mirror_wire_bytes', 'Frame bytes on the mirror link by kind, since start', ['kind']);
  const client = registry.gauge('nvmirror_mirror_client_bytes', 'Client bytes written since start').labels();
  const blocks = registry.gauge('nvmirror_mirror_cp_blocks', 'CP blocks sent, by how they travelled', ['as']);
  const acked = registry.gauge('nvmirror_mirror_cps_acknowledged', 'CPs the destination committed with a root equal to ours').labels();
  const mismatches = registry.gauge('nvmirror_mirror_root_mismatches', 'CPs the destination acknowledged with another root').labels();
  const catchUpSent = registry.gauge('nvmirror_mirror_catchup_sent_bytes', 'Blocks the running baseline or resync has sent (0: none running)').labels();
  const catchUpTotal = registry.gauge('nvmirror_mirror_catchup_total_bytes', 'What the running baseline will send, about (0: none running, or a resync)').labels();
  const catchUpRate = registry.gauge('nvmirror_mirror_catchup_bytes_per_second', 'The running baseline\'s or resync\'s rate (0: none running)').labels();
  const rateLimit = registry.gauge('nvmirror_mirror_rate_limit_bytes_per_second', 'The --mirror-rate cap on baselines and resyncs (0: none)').labels();
  registry.onCollect(() => {
    const s = mirror.stats();
    for (const st of STATES) state.labels(st).set(s.state === st ? 1 : 0);
    cps.labels('source').set(s.sourceCp);
    cps.labels('destination').set(s.destCp);
    lagCps.set(s.lagCps);
    lagBytes.set(s.lagBytes);
    lagSeconds.set(s.lagSeconds);
    for (const [k, v] of Object.entries(s.wireBytesByKind)) wire.labels(k).set(v);
    client.set(s.clientBytes);
    blocks.labels('reference').set(s.refsSent);
    blocks.labels('delta').set(s.deltasSent);
    blocks.labels('data').set(s.dataBlocksSent);
    acked.set(s.cpsAcknowledged);
    mismatches.set(s.rootMismatches);
    catchUpSent.set(s.resync ? s.resync.blocksSent * 4096 : 0);
    catchUpTotal.set(s.resync?.totalBytes ?? 0);
    catchUpRate.set(s.resync?.bytesPerSec ?? 0);
    rateLimit.set(s.rateLimitBytesPerSec ?? 0);
  });
}
