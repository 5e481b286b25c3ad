/**
 * The mirror's figures in the Prometheus exposition: the source's in `serve --metrics`
 * (MirrorSource.stats()), the destination's in `receive --metrics` (MirrorReceiver.stats(),
 * one series per source volume, labelled with its uuid). Read at each scrape: no
 * per-write cost.
 *
 * Invariants:
 * - Label values are bounded: states and kinds are fixed sets; a receiver's `source`
 *   label is the uuid of a mirror it has open (the registry caps series per metric), and
 *   a mirror's series leave with it.
 */
import type { MetricsRegistry } from '../metrics/registry';
import type { MirrorSource } from './source';
import type { ReceiverStats } from './receiver';

const STATES = ['disconnected', 'baseline', 'resyncing', 'in-sync', 'behind', 'split-brain', 'promoted', 'mirror-ahead'] as const;

export function registerMirrorMetrics(registry: MetricsRegistry, mirror: MirrorSource): void {
  const state = registry.gauge('nvmirror_mirror_state', 'Mirror relationship state (1 for the current one)', ['state']);
  const cps = registry.gauge('nvmirror_mirror_cp', 'Newest committed CP on each side', ['side']);
  const lagCps = registry.gauge('nvmirror_mirror_lag_cps', 'CPs the destination is behind').labels();
  const lagBytes = registry.gauge('nvmirror_mirror_lag_bytes', 'Client bytes the destination does not hold yet').labels();
  const lagSeconds = registry.gauge('nvmirror_mirror_behind_seconds', 'How long the mirror has been behind (0: in sync)').labels();
  const wire = registry.gauge('nvmirror_mirror_wire_bytes', 'Frame bytes on the mirror link by kind, since start', ['kind']);
  const client = registry.gauge('nvmirror_mirror_client_bytes', 'Client bytes written since start').labels();
  const catchUpWire = registry.gauge('nvmirror_mirror_catchup_wire_bytes', 'Of the link\'s bytes since start, those that went while baselines and resyncs ran').labels();
  const blocks = registry.gauge('nvmirror_mirror_cp_blocks', 'CP blocks sent, by how they travelled', ['as']);
  const acked = registry.gauge('nvmirror_mirror_cps_acknowledged', 'CPs the destination committed with a root equal to ours').labels();
  const mismatches = registry.gauge('nvmirror_mirror_root_mismatches', 'CPs the destination acknowledged with another root').labels();
  const catchUpSent = registry.gauge('nvmirror_mirror_catchup_sent_bytes', 'Blocks the running baseline or resync has sent (0: none running)').labels();
  const catchUpTotal = registry.gauge('nvmirror_mirror_catchup_total_bytes', 'What the running baseline or resync will send, about (0: none running, or a resync\'s total not counted yet)').labels();
  const catchUpRate = registry.gauge('nvmirror_mirror_catchup_bytes_per_second', 'The running baseline\'s or resync\'s rate (0: none running)').labels();
  const rateLimit = registry.gauge('nvmirror_mirror_rate_limit_bytes_per_second', 'The --mirror-rate cap on baselines and resyncs (0: none)').labels();
  const readerPinned = registry.gauge('nvmirror_mirror_reader_pinned_cp', 'The oldest CP a reader of the destination\'s export is pinned to, held here (-1: none)').labels();
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
    catchUpWire.set(s.catchUpWireBytes);
    blocks.labels('reference').set(s.refsSent);
    blocks.labels('delta').set(s.deltasSent);
    blocks.labels('data').set(s.dataBlocksSent);
    acked.set(s.cpsAcknowledged);
    mismatches.set(s.rootMismatches);
    catchUpSent.set(s.resync ? s.resync.blocksSent * 4096 : 0);
    catchUpTotal.set(s.resync?.totalBytes ?? 0);
    catchUpRate.set(s.resync?.bytesPerSec ?? 0);
    rateLimit.set(s.rateLimitBytesPerSec ?? 0);
    readerPinned.set(s.readerPinnedCp);
  });
}

/** The destination's figures, per source volume (`receive --metrics`). */
export function registerReceiverMetrics(registry: MetricsRegistry, receiver: { stats(): ReceiverStats }): void {
  const connections = registry.gauge('nvmirror_receiver_sources_connected', 'Source connections open').labels();
  const memory = registry.gauge('nvmirror_receiver_memory_budget_bytes', 'The process\'s memory budget (mirror frames waiting and export NBD bytes in flight)', ['kind']);
  const connected = registry.gauge('nvmirror_receiver_source_connected', 'Whether the source of this mirror is connected', ['source']);
  const committed = registry.gauge('nvmirror_receiver_committed_cp', 'The mirror\'s committed CP (-1: none)', ['source']);
  const inconsistent = registry.gauge('nvmirror_receiver_baseline_partial', 'A full baseline is overwriting the mirror (1: its image is inconsistent, not exported)', ['source']);
  const lastCommit = registry.gauge('nvmirror_receiver_last_commit_timestamp_seconds', 'When this receiver last committed a CP of the mirror (0: not since it started)', ['source']);
  const logUsed = registry.gauge('nvmirror_receiver_log_used_bytes', 'Bytes of the source\'s log file in use', ['source']);
  const dropping = registry.gauge('nvmirror_receiver_log_dropping', 'The log\'s ring is full and drops records until a CP covers them (1)', ['source']);
  const records = registry.counter('nvmirror_receiver_records_total', 'Forwarded records, by what became of them', ['source', 'outcome']);
  const cps = registry.counter('nvmirror_receiver_cps_total', 'CPs committed or abandoned by the source', ['source', 'outcome']);
  const blocks = registry.counter('nvmirror_receiver_cp_blocks_total', 'CP blocks written, by how they travelled', ['source', 'as']);
  const bytesIn = registry.counter('nvmirror_receiver_bytes_in_total', 'Bytes received from the source', ['source']);
  const released = registry.counter('nvmirror_receiver_readers_released_total', 'Export readers closed because a CP wrote blocks of the older CP they read', ['source']);
  const readers = registry.gauge('nvmirror_receiver_readers', 'Export connections reading the mirror (each pinned to the CP it connected at)', ['source']);
  const oldestPin = registry.gauge('nvmirror_receiver_oldest_pinned_cp', 'The oldest CP a reader is pinned to, held on the source (-1: none)', ['source']);
  const longestPin = registry.gauge('nvmirror_receiver_longest_pin_seconds', 'How long the longest-pinned reader has been on its CP (0: none)', ['source']);
  const damaged = registry.counter('nvmirror_receiver_damaged_blocks_total', 'Blocks of the mirror that failed verification under a reader and were served from the source\'s copy, by whether they were rewritten here', ['source', 'outcome']);
  const failing = registry.gauge('nvmirror_receiver_error', 'The last stream from the source was refused or could not be applied (1, until a CP commits)', ['source']);
  const perSource = [connected, committed, inconsistent, lastCommit, logUsed, dropping, records, cps, blocks, bytesIn, released, readers, oldestPin, longestPin, failing, damaged];
  registry.onCollect(() => {
    const s = receiver.stats();
    // A mirror the receiver no longer has (promoted, released) leaves the exposition.
    const open = new Set(s.mirrors.map((m) => m.sourceUuid));
    for (const f of perSource) f.removeWhere((v) => !open.has(v[0]!));
    connections.set(s.connections);
    if (s.memory) {
      memory.labels('capacity').set(s.memory.budgetBytes);
      memory.labels('used').set(s.memory.usedBytes);
      memory.labels('peak').set(s.memory.peakBytes);
    }
    for (const m of s.mirrors) {
      const u = m.sourceUuid;
      connected.labels(u).set(m.connected ? 1 : 0);
      committed.labels(u).set(m.committedCp);
      inconsistent.labels(u).set(m.baselinePartial ? 1 : 0);
      lastCommit.labels(u).set(m.lastCommitMs > 0 ? Math.round(m.lastCommitMs / 1000) : 0);
      logUsed.labels(u).set(m.logUsedBytes);
      dropping.labels(u).set(m.droppingFromSeq > 0 ? 1 : 0);
      records.labels(u, 'stored').setTotal(m.recordsStored);
      records.labels(u, 'dropped').setTotal(m.recordsDropped);
      cps.labels(u, 'applied').setTotal(m.cpsApplied);
      cps.labels(u, 'aborted').setTotal(m.cpsAborted);
      blocks.labels(u, 'data').setTotal(m.blocksApplied);
      blocks.labels(u, 'reference').setTotal(m.refsApplied);
      blocks.labels(u, 'delta').setTotal(m.deltasApplied);
      bytesIn.labels(u).setTotal(m.bytesIn);
      released.labels(u).setTotal(m.readersReleased);
      damaged.labels(u, 'rewritten').setTotal(m.blocksHealed);
      damaged.labels(u, 'not-rewritten').setTotal(m.blocksServedFromSource - m.blocksHealed);
      failing.labels(u).set(m.lastError !== undefined ? 1 : 0);
      readers.labels(u).set(m.readers);
      oldestPin.labels(u).set(m.oldestPinnedCp);
      longestPin.labels(u).set(Math.round(m.longestPinMs / 1000));
    }
  });
}
