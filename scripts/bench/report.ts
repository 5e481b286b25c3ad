/**
 * Aggregation (medians over rounds) and output (a compact text table, and JSON).
 *
 * Invariants:
 * - A row is printed only from measured samples: a median over zero samples throws.
 * - ratio > 1 always means the subject did better: value/reference for "higher is better"
 *   metrics, reference/value for "lower is better" ones.
 * - Per-round ratios pair the two servers' samples of the same round (same conditions).
 */
import type { Metric, Workload } from './workloads';

export interface Sample {
  round: number;
  server: string;
  workload: string;
  values: Record<string, number>;
  /** Server CPU time per I/O over the measured window (µs), when measurable. */
  cpuUsPerIo: number | undefined;
  peakRssBytes: number;
  fioArgv: string[];
}

export interface Row {
  workload: string;
  workloadLabel: string;
  metric: string;
  metricLabel: string;
  unit: string;
  better: 'higher' | 'lower';
  /** server label -> median */
  medians: Record<string, number>;
  /** "subject/reference" -> median of per-round ratios' basis: ratio of medians */
  ratios: Record<string, number>;
  /** "subject/reference" -> [min, max] of per-round ratios */
  ratioRanges: Record<string, [number, number]>;
}

export interface SuiteReport {
  name: string;
  title: string;
  servers: Array<{ label: string; command: string }>;
  reference: string;
  rows: Row[];
  samples: Sample[];
}

export function median(xs: number[]): number {
  if (xs.length === 0) throw new Error('median of no samples');
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

/** Nearest-rank percentile (p in (0, 100]). */
export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) throw new Error('percentile of no samples');
  const s = [...xs].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * s.length));
  return s[rank - 1] as number;
}

function orient(value: number, reference: number, better: 'higher' | 'lower'): number {
  if (!(value > 0) || !(reference > 0)) return Number.NaN;
  return better === 'higher' ? value / reference : reference / value;
}

const cpuMetric: Metric = { id: 'cpu', label: 'server CPU/IO', unit: 'us', better: 'lower', get: () => Number.NaN };

export function buildRows(workloads: Workload[], servers: string[], reference: string, samples: Sample[]): Row[] {
  const rows: Row[] = [];
  const subjects = servers.filter((s) => s !== reference);
  for (const w of workloads) {
    const ws = samples.filter((s) => s.workload === w.id);
    if (ws.length === 0) continue;
    const metrics = [...w.metrics];
    // For latency-bound (QD1) workloads, also show what each request costs the server in CPU.
    if (w.metrics.some((m) => m.better === 'lower') && ws.every((s) => s.cpuUsPerIo !== undefined)) metrics.push(cpuMetric);
    for (const m of metrics) {
      const valueOf = (s: Sample): number => (m === cpuMetric ? (s.cpuUsPerIo as number) : (s.values[m.id] as number));
      const medians: Record<string, number> = {};
      for (const srv of servers) medians[srv] = median(ws.filter((s) => s.server === srv).map(valueOf));
      const ratios: Record<string, number> = {};
      const ratioRanges: Record<string, [number, number]> = {};
      for (const subj of subjects) {
        const key = `${subj}/${reference}`;
        ratios[key] = orient(medians[subj] as number, medians[reference] as number, m.better);
        const perRound: number[] = [];
        for (const r of new Set(ws.map((s) => s.round))) {
          const a = ws.find((s) => s.round === r && s.server === subj);
          const b = ws.find((s) => s.round === r && s.server === reference);
          if (a && b) perRound.push(orient(valueOf(a), valueOf(b), m.better));
        }
        ratioRanges[key] = [Math.min(...perRound), Math.max(...perRound)];
      }
      rows.push({ workload: w.id, workloadLabel: w.label, metric: m.id, metricLabel: m.label, unit: m.unit, better: m.better, medians, ratios, ratioRanges });
    }
  }
  return rows;
}

function fmtValue(v: number, unit: string): string {
  if (!Number.isFinite(v)) return 'n/a';
  if (unit === 'IOPS' || unit === 'flush/s') return Math.round(v).toString();
  if (unit === 'MB/s') return v.toFixed(0);
  if (unit === 'us') return v < 100 ? v.toFixed(1) : v.toFixed(0);
  if (unit === 'MiB') return v.toFixed(0);
  return v.toPrecision(4);
}

function pad(s: string, n: number, right = false): string {
  return right ? s.padStart(n) : s.padEnd(n);
}

export function formatTable(rep: SuiteReport, roundsNote: string): string {
  const servers = rep.servers.map((s) => s.label);
  const ratioKeys = servers.filter((s) => s !== rep.reference).map((s) => `${s}/${rep.reference}`);
  const wW = Math.max(8, ...rep.rows.map((r) => r.workloadLabel.length));
  const mW = Math.max(6, ...rep.rows.map((r) => metricCell(r).length));
  const vW = Math.max(9, ...servers.map((s) => s.length));
  const lines: string[] = [];
  lines.push(`== ${rep.title} (${roundsNote}) ==`);
  for (const s of rep.servers) lines.push(`   ${s.label}: ${s.command}`);
  const rW = (k: string): number => Math.max(6, k.length);
  const head = [pad('workload', wW), pad('metric', mW), ...servers.map((s) => pad(s, vW, true)), ...ratioKeys.map((k) => pad(k, rW(k), true) + pad('rounds', 11, true))];
  lines.push(head.join('  '));
  for (const r of rep.rows) {
    const cells = [pad(r.workloadLabel, wW), pad(metricCell(r), mW), ...servers.map((s) => pad(fmtValue(r.medians[s] as number, r.unit), vW, true))];
    for (const k of ratioKeys) {
      const v = r.ratios[k] as number;
      const range = r.ratioRanges[k] as [number, number];
      cells.push(pad(Number.isFinite(v) ? v.toFixed(2) : 'n/a', rW(k), true) + pad(`${range[0].toFixed(2)}-${range[1].toFixed(2)}`, 11, true));
    }
    lines.push(cells.join('  '));
  }
  lines.push(`   ${ratioKeys.join(', ')}: ratio of medians, > 1.00 means the first did better (latency and CPU rows, lower is better, are inverted); rounds: min-max of the per-round ratios.`);
  return lines.join('\n');
}

function metricCell(r: Row): string {
  if (r.unit === 'IOPS' || r.unit === 'MB/s' || r.unit === 'flush/s') return r.unit;
  return `${r.metricLabel} ${r.unit}${r.better === 'lower' ? ' (lower)' : ''}`;
}
