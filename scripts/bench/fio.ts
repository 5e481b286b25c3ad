/**
 * Runs fio's nbd ioengine against one server and extracts the numbers we report.
 * fio's JSON goes to a file (--output), because the nbd engine prints a line of its own
 * on stdout.
 *
 * Invariants:
 * - runFio() resolves only if fio exited 0, wrote parseable JSON, every job reports
 *   error 0, and the measured direction moved bytes; otherwise it rejects. No number is
 *   ever made up or defaulted.
 * - Job options are passed as --key=value pairs in a fixed order (reproducible command lines).
 * - fio runs at most FIO_TIMEOUT_MARGIN_S beyond its own expected duration.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import { lastLines } from './servers';

const FIO_TIMEOUT_MARGIN_S = 120;
const OUTPUT_CAP_BYTES = 1024 * 1024;

export type FioOptions = Array<[string, string | number]>;

export interface FioResult {
  /** Which direction the numbers below describe. */
  dir: 'read' | 'write';
  iops: number;
  bytesPerS: number;
  clatP50Us: number;
  clatP99Us: number;
  clatMeanUs: number;
  /** Total I/Os counted (after ramp). */
  ios: number;
  /** Flushes issued (fsync=N workloads), else 0. */
  syncs: number;
  runtimeMs: number;
}

export interface FioRun {
  argv: string[];
  result: FioResult;
}

function num(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`fio JSON: ${what} missing or not a number`);
  return v;
}

function obj(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null) throw new Error(`fio JSON: ${what} missing`);
  return v as Record<string, unknown>;
}

/** Parses fio --output-format=json for a single (group-reported) job. */
export function parseFioJson(text: string, dir: 'read' | 'write'): FioResult {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new Error(`fio JSON does not parse: ${(e as Error).message}`);
  }
  const jobs = obj(doc, 'document').jobs;
  if (!Array.isArray(jobs) || jobs.length !== 1) throw new Error(`fio JSON: expected exactly one (group-reported) job, got ${Array.isArray(jobs) ? jobs.length : 'none'}`);
  const job = obj(jobs[0], 'jobs[0]');
  const err = num(job.error, 'jobs[0].error');
  if (err !== 0) throw new Error(`fio job failed with error ${err}`);
  const d = obj(job[dir], `jobs[0].${dir}`);
  const ioBytes = num(d.io_bytes, `${dir}.io_bytes`);
  if (ioBytes <= 0) throw new Error(`fio moved no ${dir} bytes`);
  const clat = obj(d.clat_ns, `${dir}.clat_ns`);
  const pct = obj(clat.percentile, `${dir}.clat_ns.percentile`);
  const sync = job.sync === undefined ? undefined : obj(job.sync, 'sync');
  return {
    dir,
    iops: num(d.iops, `${dir}.iops`),
    bytesPerS: num(d.bw_bytes, `${dir}.bw_bytes`),
    clatP50Us: num(pct['50.000000'], 'clat p50') / 1000,
    clatP99Us: num(pct['99.000000'], 'clat p99') / 1000,
    clatMeanUs: num(clat.mean, 'clat mean') / 1000,
    ios: num(d.total_ios, `${dir}.total_ios`),
    syncs: sync === undefined ? 0 : num(sync.total_ios, 'sync.total_ios'),
    runtimeMs: num(d.runtime, `${dir}.runtime`),
  };
}

/** Runs fio with the given job options against `uri`; JSON goes to `outPath`. */
export async function runFio(name: string, uri: string, opts: FioOptions, dir: 'read' | 'write', outPath: string, expectedS: number): Promise<FioRun> {
  const argv = ['fio', `--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, ...opts.map(([k, v]) => `--${k}=${v}`), '--group_reporting=1', '--output-format=json', `--output=${outPath}`];
  fs.rmSync(outPath, { force: true });
  const { code, signal, output } = await run(argv, (expectedS + FIO_TIMEOUT_MARGIN_S) * 1000);
  if (code !== 0) throw new Error(`fio exited with ${code === null ? `signal ${signal}` : `code ${code}`}: ${lastLines(output)}\n  command: ${argv.join(' ')}`);
  let text: string;
  try {
    text = fs.readFileSync(outPath, 'utf8');
  } catch {
    throw new Error(`fio wrote no JSON output: ${lastLines(output)}`);
  }
  return { argv, result: parseFioJson(text, dir) };
}

function run(argv: string[], timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null; output: string }> {
  return new Promise((resolve, reject) => {
    const [prog, ...args] = argv;
    if (prog === undefined) return reject(new Error('empty command'));
    const child = spawn(prog, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const keep = (c: Buffer): void => {
      output += c.toString('utf8');
      if (output.length > OUTPUT_CAP_BYTES) output = output.slice(output.length - OUTPUT_CAP_BYTES);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const t = setTimeout(() => {
      output += `\n(killed after ${timeoutMs} ms)`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(t);
      reject(new Error(`cannot run ${prog}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, output });
    });
  });
}

/** One sample of fio's per-I/O latency log: completion time (epoch ms) and latency (µs). */
export interface LatSample {
  timeMs: number;
  latUs: number;
}

/**
 * Parses a fio latency log written with log_unix_epoch=1 and log_avg_msec=0 (one line per
 * I/O: "time_ms, lat_ns, ddir, bs, offset[, prio]"). Caps the sample count.
 */
export function parseLatLog(path: string, maxSamples: number): LatSample[] {
  const text = fs.readFileSync(path, 'utf8');
  const out: LatSample[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const f = line.split(',');
    const t = Number(f[0]);
    const lat = Number(f[1]);
    if (!Number.isFinite(t) || !Number.isFinite(lat)) throw new Error(`bad fio latency log line: "${line.slice(0, 80)}"`);
    out.push({ timeMs: t, latUs: lat / 1000 });
    if (out.length >= maxSamples) break;
  }
  return out;
}
