/**
 * The `parity` suite (BENCH_SUITES=parity): MB/s of data per core for nvmirror's RAID
 * parity (src/raid/parity.ts, native, synchronous, one thread) against ISA-L in the same
 * run: P (XOR), P+Q, and the two-data-column decode, 64 KiB columns.
 *
 * Invariants:
 * - Ours and ISA-L alternate inside each round (ours, then ISA-L's helper process), each
 *   after an untimed warm-up of PARITY_WARMUP_SECONDS, so load from other processes hits
 *   both alike; each figure is the median of PARITY_BENCH_ROUNDS rounds of at least
 *   PARITY_ROUND_SECONDS each, and the ratio is the median of the per-round ratios (the
 *   two halves of a round are next to each other in time; the machine is shared).
 * - MB/s counts data bytes only (k columns per call, 10^6 bytes per MB) per second of CPU
 *   time (ours: the process's user + system time, ISA-L: its thread's), for both sides:
 *   per core, and not skewed when other work on the machine deschedules one side.
 * - ISA-L's figure is timed inside its C helper (no process start in it) on 64-byte
 *   aligned buffers; ours through the public API, argument validation and the N-API call
 *   included (~0.3-0.8 us per call), on Buffers as Node allocates them (16-byte aligned).
 *   Both favour ISA-L, most for P, whose kernel takes only 2-4 us per call here.
 * - Ours is checked against ISA-L's output once per case before it is timed, so a fast
 *   wrong answer cannot show up in the table.
 * - A missing ISA-L fails the suite (the ratio is the point of it).
 */
import * as parity from '../../src/raid/parity';
import { isalBench, isalDecode, isalGen, isalHelper } from '../../test/unit/raid-parity-isal';
import { median } from './report';

export const PARITY_BENCH_ROUNDS = 5;
/** CPU seconds per round (wall time at most PARITY_ROUND_WALL_SECONDS_MAX on a busy machine). */
const PARITY_ROUND_SECONDS = 0.2;
const PARITY_ROUND_WALL_SECONDS_MAX = 3;
const PARITY_WARMUP_SECONDS = 0.05;
/** The decode case loses data columns 0 and 1 (ISA-L's helper decodes the same pair). */
const DECODE_LOST = [0, 1] as const;
const PARITY_COLUMN_BYTES = 64 * 1024;
/** Target from issue 9: ours >= 0.5x ISA-L. */
export const PARITY_TARGET_RATIO = 0.5;

type Op = 'p' | 'pq' | 'dd';
interface Case {
  op: Op;
  k: number;
  label: string;
}

const CASES: readonly Case[] = [
  { op: 'p', k: 4, label: 'P, k=4' },
  { op: 'p', k: 8, label: 'P, k=8' },
  { op: 'pq', k: 4, label: 'P+Q, k=4' },
  { op: 'pq', k: 6, label: 'P+Q, k=6' },
  { op: 'pq', k: 8, label: 'P+Q, k=8' },
  { op: 'dd', k: 6, label: 'decode 2 data, k=6' },
];

export interface ParityRow {
  label: string;
  op: Op;
  k: number;
  oursMBps: number;
  isalMBps: number;
  ratio: number;
  oursRounds: number[];
  isalRounds: number[];
}

export interface ParityReport {
  columnBytes: number;
  rounds: number;
  /** The kernels our side ran (src/raid/parity.ts parityKernels()). */
  kernels: string;
  rows: ParityRow[];
}

function randomColumns(count: number, n: number, seed: number): Buffer[] {
  let s = seed >>> 0 || 1;
  return Array.from({ length: count }, () => {
    const b = Buffer.alloc(n);
    for (let j = 0; j < n; j += 4) {
      s ^= s << 13;
      s >>>= 0;
      s ^= s >>> 17;
      s ^= s << 5;
      s >>>= 0;
      b.writeUInt32LE(s, j);
    }
    return b;
  });
}

/** One call of the case: data = the first k columns, then P, Q (prepared once, as a caller would). */
function oursOnce(c: Case, cols: Buffer[], data: Buffer[]): void {
  if (c.op === 'p') parity.computeP(data, cols[c.k]!);
  else if (c.op === 'pq') parity.computePQ(data, cols[c.k]!, cols[c.k + 1]!);
  else parity.reconstruct(cols, DECODE_LOST, 2);
}

/** CPU seconds (user + system) this process used so far: the work runs on the main thread. */
function cpuSeconds(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function oursRound(c: Case, cols: Buffer[]): number {
  const data = cols.slice(0, c.k);
  const warmupEnd = process.hrtime.bigint() + BigInt(Math.round(PARITY_WARMUP_SECONDS * 1e9));
  while (process.hrtime.bigint() < warmupEnd) oursOnce(c, cols, data);
  let calls = 0;
  const cpu0 = cpuSeconds();
  const wallEnd = Date.now() + PARITY_ROUND_WALL_SECONDS_MAX * 1000;
  let cpu = 0;
  do {
    for (let i = 0; i < 16; i++) oursOnce(c, cols, data);
    calls += 16;
    cpu = cpuSeconds() - cpu0;
  } while (cpu < PARITY_ROUND_SECONDS && Date.now() < wallEnd);
  return (calls * c.k * PARITY_COLUMN_BYTES) / cpu / 1e6;
}

/** Checks ours against ISA-L on this case's columns before timing it. */
function crossCheck(binary: string, c: Case, cols: Buffer[]): void {
  const data = cols.slice(0, c.k);
  const isal = isalGen(binary, data);
  const p = Buffer.alloc(PARITY_COLUMN_BYTES);
  const q = Buffer.alloc(PARITY_COLUMN_BYTES);
  parity.computePQ(data, p, q);
  if (!p.equals(isal.p) || !q.equals(isal.q) || !p.equals(isal.xorP)) throw new Error(`parity bench: ${c.label}: ours differs from ISA-L`);
  if (c.op === 'dd') {
    const full = [...data, p, q];
    const d = isalDecode(binary, full, 0, 1);
    if (!d.dx.equals(data[0]!) || !d.dy.equals(data[1]!)) throw new Error(`parity bench: ${c.label}: ISA-L's decode differs from the data`);
  }
}

export function runParitySuite(say: (line: string) => void): ParityReport {
  const helper = isalHelper();
  if ('missing' in helper) throw new Error(`the parity suite compares with ISA-L: ${helper.missing}`);
  const rows: ParityRow[] = [];
  for (const [i, c] of CASES.entries()) {
    const cols = randomColumns(c.k + 2, PARITY_COLUMN_BYTES, 0x5eed + i);
    crossCheck(helper.binary, c, cols);
    // Valid parity, so the decode case rebuilds real data each call.
    parity.computePQ(cols.slice(0, c.k), cols[c.k]!, cols[c.k + 1]!);
    const ours: number[] = [];
    const isal: number[] = [];
    for (let r = 0; r < PARITY_BENCH_ROUNDS; r++) {
      ours.push(oursRound(c, cols));
      isal.push(...isalBench(helper.binary, c.op, c.k, PARITY_COLUMN_BYTES, 1));
    }
    const row: ParityRow = {
      label: c.label,
      op: c.op,
      k: c.k,
      oursMBps: median(ours),
      isalMBps: median(isal),
      ratio: median(ours.map((o, r) => o / isal[r]!)),
      oursRounds: ours,
      isalRounds: isal,
    };
    rows.push(row);
    say(`  [parity] ${c.label}: ours ${row.oursMBps.toFixed(0)} MB/s, ISA-L ${row.isalMBps.toFixed(0)} MB/s (${row.ratio.toFixed(2)}x)`);
  }
  return { columnBytes: PARITY_COLUMN_BYTES, rounds: PARITY_BENCH_ROUNDS, kernels: parity.parityKernels(), rows };
}

export function formatParity(r: ParityReport): string {
  const lines = [
    `== parity: MB/s of data per CPU-second, ${r.columnBytes / 1024} KiB columns, one thread, median of ${r.rounds} rounds; ours (native, ${r.kernels}, public API) vs ISA-L (timed in C; target >= ${PARITY_TARGET_RATIO}x) ==`,
    '| Operation | ours MB/s | ISA-L MB/s | ours/ISA-L (median of per-round ratios) |',
    '|---|---:|---:|---:|',
  ];
  for (const row of r.rows) lines.push(`| ${row.label} | ${row.oursMBps.toFixed(0)} | ${row.isalMBps.toFixed(0)} | ${row.ratio.toFixed(2)} |`);
  return lines.join('\n');
}
