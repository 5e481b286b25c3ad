/**
 * The fio workloads of issue 2 (memory/file suites) and issue 4 (engine suite), and the
 * numbers each one reports.
 *
 * Invariants:
 * - Every workload is either time-based (runtime + ramp from the config) or size-bound
 *   (io_size given, no ramp), never both.
 * - Every metric says whether higher or lower is better; ratios are always oriented so
 *   that > 1 means the subject (nvmirror) did better.
 * - Random workloads use the same seed for every server (fio's default randrepeat), so
 *   each server sees the same offsets.
 */
import type { BenchConfig } from './config';
import type { FioOptions, FioResult } from './fio';

export interface Metric {
  id: string;
  label: string;
  unit: string;
  better: 'higher' | 'lower';
  get(r: FioResult): number;
}

export interface Workload {
  id: string;
  label: string;
  /** Which fio direction the metrics read. */
  dir: 'read' | 'write';
  /** Fill the whole range with data (1M sequential writes) before measuring. */
  prefill: boolean;
  /** Run the same fio job once, unmeasured, in the same server process, then wait
   * WARMUP_SETTLE_MS, before the measured run: the row then measures a server that has
   * already done this work once (its JIT, caches and allocator warm), as a long-running
   * server is. Every server of the suite gets the same warm-up. */
  warmup?: boolean;
  opts: FioOptions;
  /** Expected fio duration in seconds (for timeouts and the time estimate). */
  expectedS: number;
  metrics: Metric[];
}

const MIB = 1024 * 1024;
/** Pause between a warm-up run and the measured one: longer than the engine's CP
 * interval in the bench (1 s), so the warm-up's last CP has run before measuring. */
export const WARMUP_SETTLE_MS = 2000;

export const iops: Metric = { id: 'iops', label: 'IOPS', unit: 'IOPS', better: 'higher', get: (r) => r.iops };
export const mbps: Metric = { id: 'mbps', label: 'MB/s', unit: 'MB/s', better: 'higher', get: (r) => r.bytesPerS / 1e6 };
/** fio's fsync=N with iodepth > 1 issues flushes at a rate that depends on the server's
 * timing (far more than one per N writes), so FLUSH-heavy rows also report flushes/s. */
export const flushes: Metric = { id: 'flushes', label: 'flushes/s', unit: 'flush/s', better: 'higher', get: (r) => (r.runtimeMs > 0 ? (r.syncs * 1000) / r.runtimeMs : Number.NaN) };
export const p50: Metric = { id: 'p50', label: 'p50 clat', unit: 'us', better: 'lower', get: (r) => r.clatP50Us };
export const p99: Metric = { id: 'p99', label: 'p99 clat', unit: 'us', better: 'lower', get: (r) => r.clatP99Us };

function timed(c: BenchConfig, sizeBytes: number): FioOptions {
  return [
    ['size', sizeBytes],
    ['time_based', 1],
    ['runtime', c.runtimeS],
    ...(c.rampS > 0 ? ([['ramp_time', `${Math.round(c.rampS * 1000)}ms`]] as FioOptions) : []),
  ];
}

function rw(rwKind: string, bs: string, iodepth: number, extra: FioOptions = []): FioOptions {
  const random = rwKind.startsWith('rand');
  return [['rw', rwKind], ['bs', bs], ['iodepth', iodepth], ...(random ? ([['norandommap', 1]] as FioOptions) : []), ...extra];
}

/** Issue 2: the same list for `--memory` and `--file`. */
export function baseWorkloads(c: BenchConfig, sizeBytes: number): Workload[] {
  const t = timed(c, sizeBytes);
  const e = c.runtimeS + c.rampS;
  return [
    { id: 'randwrite-4k-qd32', label: '4k randwrite QD32', dir: 'write', prefill: false, opts: [...rw('randwrite', '4k', 32), ...t], expectedS: e, metrics: [iops] },
    { id: 'randread-4k-qd32', label: '4k randread QD32', dir: 'read', prefill: true, opts: [...rw('randread', '4k', 32), ...t], expectedS: e, metrics: [iops] },
    { id: 'randwrite-4k-qd1', label: '4k randwrite QD1', dir: 'write', prefill: false, opts: [...rw('randwrite', '4k', 1), ...t], expectedS: e, metrics: [iops, p50, p99] },
    { id: 'seqwrite-1m-qd8', label: '1M seq write QD8', dir: 'write', prefill: false, opts: [...rw('write', '1M', 8), ...t], expectedS: e, metrics: [mbps] },
    { id: 'seqread-1m-qd8', label: '1M seq read QD8', dir: 'read', prefill: true, opts: [...rw('read', '1M', 8), ...t], expectedS: e, metrics: [mbps] },
    {
      id: 'randwrite-4k-4conn-qd8',
      label: '4k randwrite 4 conns x QD8',
      dir: 'write',
      prefill: false,
      // numjobs=4: fio opens one NBD connection per job; group_reporting sums them.
      opts: [...rw('randwrite', '4k', 8), ['numjobs', 4], ...t],
      expectedS: e,
      metrics: [iops],
    },
  ];
}

/** Issue 4: engine volume vs `nvmirror serve --file` vs nbdkit file. */
export function engineWorkloads(c: BenchConfig, sizeBytes: number): Workload[] {
  const t = timed(c, sizeBytes);
  const e = c.runtimeS + c.rampS;
  // Size-bound runs: estimate at a pessimistic 5k IOPS for the timeout, capped.
  const estimate = (bytes: number): number => Math.min(600, Math.ceil(bytes / 4096 / 5000) + 5);
  /** A size-bound 4k randwrite QD32 row of ioBytes (burst, sustained), optionally in a warm server. */
  const randwrite4k = (name: string, what: string, ioBytes: number, warmup: boolean): Workload => ({
    id: `engine-${name}-randwrite-4k-qd32`,
    label: `4k randwrite QD32 ${what}`,
    dir: 'write',
    prefill: false,
    ...(warmup ? { warmup } : {}),
    opts: [...rw('randwrite', '4k', 32), ['size', sizeBytes], ['io_size', ioBytes]],
    expectedS: estimate(ioBytes),
    metrics: [iops],
  });
  return [
    randwrite4k('burst', `burst (${c.burstBytes / MIB} MiB, fits NVRAM)`, c.burstBytes, false),
    randwrite4k('sustained', `sustained (${c.sustainedBytes / MIB} MiB = 4x NVRAM)`, c.sustainedBytes, false),
    // The same two rows in a server that has run the job once already (docs/benchmarks.md,
    // "The engine's sustained and burst rows measure a cold process"): the rows above are
    // a fresh process's first seconds, V8's compiler included; these are a running server's.
    randwrite4k('burst-warm', 'burst, warm server', c.burstBytes, true),
    randwrite4k('sustained-warm', 'sustained, warm server', c.sustainedBytes, true),
    // Issue 10's latency target (QD1 p50 within nbdkit file's + 15 us): the plain write at
    // queue depth 1, answered from the NVRAM by the connection's thread.
    { id: 'engine-randwrite-4k-qd1', label: '4k randwrite QD1', dir: 'write', prefill: false, opts: [...rw('randwrite', '4k', 1), ...t], expectedS: e, metrics: [iops, p50, p99] },
    { id: 'engine-randread-4k-qd32', label: '4k randread QD32', dir: 'read', prefill: true, opts: [...rw('randread', '4k', 32), ...t], expectedS: e, metrics: [iops] },
    { id: 'engine-seqwrite-1m-qd8', label: '1M seq write QD8', dir: 'write', prefill: false, opts: [...rw('write', '1M', 8), ...t], expectedS: e, metrics: [mbps] },
    // The same over a fully written device (as nbdkit's image always is): the row above is a
    // new thin volume's first write, which on this VM mostly measures fresh page-cache pages
    // (docs/benchmarks.md, "Block checksums once, at the append; released runs reused warm").
    { id: 'engine-seqoverwrite-1m-qd8', label: '1M seq overwrite QD8 (after a prefill)', dir: 'write', prefill: true, opts: [...rw('write', '1M', 8), ...t], expectedS: e, metrics: [mbps] },
    { id: 'engine-seqread-1m-qd8', label: '1M seq read QD8', dir: 'read', prefill: true, opts: [...rw('read', '1M', 8), ...t], expectedS: e, metrics: [mbps] },
    {
      id: 'engine-fsync1-4k-qd1',
      label: '4k randwrite QD1 fsync=1',
      dir: 'write',
      prefill: false,
      opts: [...rw('randwrite', '4k', 1, [['fsync', 1]]), ...t],
      expectedS: e,
      metrics: [iops, flushes],
    },
    {
      id: 'engine-fsync32-4k-qd32',
      label: '4k randwrite QD32 fsync=32',
      dir: 'write',
      prefill: false,
      opts: [...rw('randwrite', '4k', 32, [['fsync', 32]]), ...t],
      expectedS: e,
      metrics: [iops, flushes],
    },
  ];
}

/** Sequential 1M writes over the whole range: makes reads hit data. */
export function prefillOptions(sizeBytes: number): FioOptions {
  return [['rw', 'write'], ['bs', '1M'], ['iodepth', 8], ['size', sizeBytes]];
}

export function filterWorkloads(ws: Workload[], only: string[]): Workload[] {
  if (only.length === 0) return ws;
  return ws.filter((w) => only.some((o) => w.id.includes(o)));
}
