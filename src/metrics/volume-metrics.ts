/**
 * Metrics of a volume directory (the engine): consistency points, NVRAM log fill,
 * space, checksum errors. Read from EngineVolume.stats() at each scrape, so the engine
 * keeps no metrics state of its own.
 *
 * Invariants:
 * - Totals (CPs, checksum errors) are exposed as counters mirroring monotonic sources;
 *   a source that restarts lower (never, within one open) cannot make them go down.
 * - nvram_fill_ratio = nvram_used_bytes / nvram_size_bytes, in [0, 1].
 */
import { BLOCK_SIZE_BYTES } from '../io/types';
import { assert } from '../util/assert';
import type { EngineVolume } from '../volume/engine';
import type { MetricsRegistry } from './registry';
import type { CpPhases } from '../tree/types';

/**
 * Checksum errors come from the engine's own counter (BlockTree.errorCounts, the one
 * `status` shows), counted where the EIO is raised, not from NBD error texts.
 */
export function registerEngineMetrics(registry: MetricsRegistry, volume: EngineVolume): void {
  const g = (name: string, help: string) => registry.gauge(name, help).labels();
  const cps = registry.counter('nvmirror_volume_cps_total', 'Consistency points committed since the volume was opened').labels();
  const cpNumber = g('nvmirror_volume_cp_number', 'Number of the newest committed consistency point');
  const cpLast = g('nvmirror_volume_cp_last_duration_seconds', 'Duration of the last consistency point');
  const cpMax = g('nvmirror_volume_cp_duration_seconds_max', 'Longest consistency point since open');
  const cpPhase = registry.counter('nvmirror_volume_cp_phase_seconds_total', 'Time consistency points spent in each phase since open (prepare, address, data, space_map, sync, superblock, sink: a mirror taking the CP)', ['phase']);
  const phaseNames: Array<[keyof CpPhases, string]> = [['prepareMs', 'prepare'], ['addressMs', 'address'], ['dataMs', 'data'], ['spaceMapMs', 'space_map'], ['syncMs', 'sync'], ['superblockMs', 'superblock'], ['sinkMs', 'sink']];
  const phaseCounters = phaseNames.map(([k, name]) => [k, cpPhase.labels(name)] as const);
  const cpRunning = g('nvmirror_volume_cp_running', '1 while a consistency point runs');
  const nvUsed = g('nvmirror_volume_nvram_used_bytes', 'NVRAM log bytes holding records not yet committed by a CP (active and frozen halves)');
  const nvSize = g('nvmirror_volume_nvram_size_bytes', 'NVRAM log region size');
  const nvFill = g('nvmirror_volume_nvram_fill_ratio', 'NVRAM log fill: used / size');
  const nvWaiters = g('nvmirror_volume_nvram_space_waiters', 'Writes waiting for NVRAM log space');
  const used = g('nvmirror_volume_used_bytes', 'Bytes of the member in use by the committed tree');
  const size = g('nvmirror_volume_size_bytes', 'Volume size');
  const checksum = registry.counter('nvmirror_volume_checksum_errors_total', 'Reads refused with EIO because a block failed its checksum').labels();
  const repaired = registry.counter('nvmirror_volume_blocks_repaired_total', 'Blocks that failed verification and were served and rewritten from the mirror\'s copy').labels();
  const threadReads = registry.counter('nvmirror_volume_thread_reads_total', 'Whole-block READs the NBD threads looked up in the engine\'s block map: answered there (hit) or passed to the event loop (miss)', ['result']);
  const threadHits = threadReads.labels('hit');
  const threadMisses = threadReads.labels('miss');
  const threadWrites = registry.counter('nvmirror_volume_thread_writes_total', 'Plain WRITEs the NBD threads appended to the engine\'s NVRAM log and answered themselves').labels();
  const threadFileStores = registry.counter('nvmirror_volume_thread_file_stores_total', 'Of those WRITEs, records written to the NVRAM file with pwrite (within a few ms of a FLUSH round: cheaper to make durable than stores through the mapping)').labels();
  const threadFlushes = registry.counter('nvmirror_volume_thread_flushes_total', 'Plain FLUSHes and FUA WRITEs the NBD threads made durable themselves (fdatasync of the engine\'s NVRAM file; under a sync mirror with the destination\'s durable ack)').labels();
  const early = registry.counter('nvmirror_volume_early_blocks_total', 'Data blocks of large WRITEs written to the member ahead of their CP (placed), and of those the blocks a CP took where they were (adopted)', ['result']);
  const earlyPlaced = early.labels('placed');
  const earlyAdopted = early.labels('adopted');
  registry.onCollect(() => {
    const st = volume.stats();
    cps.setTotal(st.cp.cpsRun);
    cpNumber.set(st.tree.cpNumber);
    cpLast.set(st.cp.lastCpDurationMs / 1000);
    cpMax.set(st.cp.cpDurationMsMax / 1000);
    cpRunning.set(st.cp.running ? 1 : 0);
    for (const [k, c] of phaseCounters) c.setTotal(st.tree.cpPhaseTotalsMs[k] / 1000);
    nvUsed.set(st.nvlog.usedBytes);
    nvSize.set(st.nvlog.regionSizeBytes);
    const fill = st.nvlog.regionSizeBytes > 0 ? st.nvlog.usedBytes / st.nvlog.regionSizeBytes : 0;
    assert(fill >= 0 && fill <= 1, `NVRAM fill ${fill} out of range`);
    nvFill.set(fill);
    nvWaiters.set(st.nvlog.spaceWaiters);
    used.set(st.tree.usedBlocks * BLOCK_SIZE_BYTES);
    size.set(st.sizeBytes);
    checksum.setTotal(st.tree.errors.checksum);
    repaired.setTotal(st.tree.errors.repaired);
    threadHits.setTotal(st.threadReads?.hits ?? 0);
    threadMisses.setTotal(st.threadReads?.misses ?? 0);
    threadWrites.setTotal(st.threadWrites ?? 0);
    threadFileStores.setTotal(st.threadFileStores ?? 0);
    threadFlushes.setTotal(st.threadFlushes ?? 0);
    earlyPlaced.setTotal(st.early?.placedBlocks ?? 0);
    earlyAdopted.setTotal(st.early?.adoptedBlocks ?? 0);
  });
}
