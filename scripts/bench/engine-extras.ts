/**
 * Engine-only measurements of issue 4: p99 of 4k QD1 writes while a CP runs vs outside
 * CPs, and the peak RSS of the server on a large thin volume under the sustained run.
 *
 * CP windows come from two sources, merged:
 * - the volume's control socket (DIR/control.sock, JSON lines: {"op":"status"}), polled
 *   every STATUS_POLL_MS during the run: each new cpNumber gives the window
 *   [lastCpMs - lastCpDurationMs, lastCpMs] (the tree commit, as the engine times it);
 *   CPs that start and finish between two polls are counted as missed;
 * - the server's log (pino JSON lines on stderr), if it has CP lines: a line whose `msg`
 *   mentions "cp" / "consistency point" with a duration field (durationMs, ...) marks
 *   [time - duration, time]; otherwise "start" and "done"/"commit" lines pair up.
 *
 * Invariants:
 * - A p99 is reported only from at least MIN_SAMPLES samples on each side; otherwise the
 *   result says why it is missing (never a made-up figure).
 * - A sample is "during a CP" if its I/O interval [completion - latency, completion]
 *   overlaps a CP window.
 */
import * as net from 'net';
import * as path from 'path';
import { parseLatLog, runFio, LatSample } from './fio';
import { median, percentile } from './report';
import { RunningServer, ServerSpec } from './servers';

const MIN_SAMPLES = 100;
const STATUS_POLL_MS = 20;
const STATUS_LINE_MAX_BYTES = 1024 * 1024;
const LAT_SAMPLES_MAX = 5_000_000;

export interface CpWindow {
  startMs: number;
  endMs: number;
}

export interface CpLatencyResult {
  cpCount: number;
  /** CPs that the status poll saw only as a jump in cpNumber (their window is unknown). */
  cpsMissed: number;
  cpDurationMsMedian: number | undefined;
  samplesDuring: number;
  samplesOutside: number;
  p99DuringUs: number | undefined;
  p99OutsideUs: number | undefined;
  /** p99 during / p99 outside (target <= 3). */
  ratio: number | undefined;
  note: string;
}

export interface RssResult {
  volumeBytes: number;
  writtenBytes: number;
  iops: number;
  peakRssBytes: number;
}

const CP_RE = /\b(cp|consistency[ -]point)s?\b/i;
const START_RE = /\b(start|started|starting|begin|begins)\b/i;
const END_RE = /\b(done|end|ended|commit|committed|finish|finished|complete|completed)\b/i;
const DURATION_KEYS = ['durationMs', 'cpDurationMs', 'elapsedMs', 'ms', 'tookMs'];

/** Extracts CP windows from pino JSON log text. */
export function cpWindowsFromLog(text: string): CpWindow[] {
  const windows: CpWindow[] = [];
  let openStart: number | undefined;
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    let rec: Record<string, unknown>;
    try {
      rec = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    const msg = typeof rec.msg === 'string' ? rec.msg : '';
    const time = typeof rec.time === 'number' ? rec.time : undefined;
    if (time === undefined || !CP_RE.test(msg)) continue;
    const dkey = DURATION_KEYS.find((k) => typeof rec[k] === 'number');
    if (dkey !== undefined && END_RE.test(msg)) {
      const d = rec[dkey] as number;
      windows.push({ startMs: time - d, endMs: time });
      openStart = undefined;
    } else if (START_RE.test(msg)) {
      openStart = time;
    } else if (END_RE.test(msg) && openStart !== undefined) {
      windows.push({ startMs: openStart, endMs: time });
      openStart = undefined;
    }
  }
  return windows;
}

export function splitByWindows(samples: LatSample[], windows: CpWindow[]): { during: number[]; outside: number[] } {
  const ws = [...windows].sort((a, b) => a.startMs - b.startMs);
  const during: number[] = [];
  const outside: number[] = [];
  for (const s of samples) {
    const from = s.timeMs - s.latUs / 1000;
    const hit = ws.some((w) => from <= w.endMs && s.timeMs >= w.startMs);
    (hit ? during : outside).push(s.latUs);
  }
  return { during, outside };
}

/**
 * Polls {"op":"status"} on a volume's control socket and collects one window per CP it
 * sees. One request in flight at a time; the reply buffer is capped.
 */
class CpStatusPoller {
  readonly windows: CpWindow[] = [];
  missed = 0;
  private lastCp: number | undefined;
  private sock: net.Socket | undefined;
  private buf = '';
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  error: string | undefined;

  constructor(private readonly socketPath: string) {}

  start(): void {
    const sock = net.connect(this.socketPath);
    this.sock = sock;
    sock.setEncoding('utf8');
    sock.on('connect', () => this.ask());
    sock.on('data', (d: string) => this.onData(d));
    sock.on('error', (e) => {
      if (!this.stopped) this.error = `control socket: ${e.message}`;
    });
  }

  private ask(): void {
    if (this.stopped || !this.sock) return;
    this.sock.write('{"op":"status"}\n');
  }

  private onData(d: string): void {
    this.buf += d;
    if (this.buf.length > STATUS_LINE_MAX_BYTES) {
      this.error = 'control socket reply too long';
      this.stop();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      this.onReply(line);
      this.timer = setTimeout(() => this.ask(), STATUS_POLL_MS);
    }
  }

  private onReply(line: string): void {
    let r: { ok?: boolean; status?: { cpNumber?: unknown; lastCpMs?: unknown; lastCpDurationMs?: unknown }; error?: string };
    try {
      r = JSON.parse(line) as typeof r;
    } catch {
      this.error = 'control socket reply is not JSON';
      return;
    }
    const st = r.status;
    if (r.ok !== true || st === undefined) {
      this.error = `control socket: ${r.error ?? 'bad reply'}`;
      return;
    }
    const cp = st.cpNumber;
    const end = st.lastCpMs;
    const dur = st.lastCpDurationMs;
    if (typeof cp !== 'number' || typeof end !== 'number' || typeof dur !== 'number') {
      this.error = 'control socket status lacks cpNumber/lastCpMs/lastCpDurationMs';
      return;
    }
    if (this.lastCp !== undefined && cp > this.lastCp) {
      this.missed += cp - this.lastCp - 1;
      this.windows.push({ startMs: end - dur, endMs: end });
    }
    this.lastCp = cp;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.sock?.destroy();
  }
}

/** Merges overlapping windows (the log and the poll may report the same CP). */
export function mergeWindows(ws: CpWindow[]): CpWindow[] {
  const sorted = [...ws].sort((a, b) => a.startMs - b.startMs);
  const out: CpWindow[] = [];
  for (const w of sorted) {
    const last = out[out.length - 1];
    if (last && w.startMs <= last.endMs) last.endMs = Math.max(last.endMs, w.endMs);
    else out.push({ ...w });
  }
  return out;
}

export async function measureCpLatency(spec: ServerSpec, dir: string, runtimeS: number, sizeBytes: number): Promise<CpLatencyResult> {
  await spec.prepare(dir);
  const server = await RunningServer.start(spec, dir, path.join(dir, 'cplat.sock'));
  const logPrefix = path.join(dir, 'cplat');
  const poller = new CpStatusPoller(path.join(dir, 'vol', 'control.sock'));
  poller.start();
  try {
    await runFio(
      'cp-latency',
      server.uri,
      [
        ['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 1], ['norandommap', 1], ['size', sizeBytes],
        ['time_based', 1], ['runtime', runtimeS],
        ['write_lat_log', logPrefix], ['log_avg_msec', 0], ['log_unix_epoch', 1],
      ],
      'write',
      path.join(dir, 'cplat.json'),
      runtimeS,
    );
  } catch (e) {
    poller.stop();
    await server.kill();
    throw e;
  }
  poller.stop();
  await server.stop();
  await spec.cleanup(dir);
  const samples = parseLatLog(`${logPrefix}_clat.1.log`, LAT_SAMPLES_MAX);
  const fromPoll = poller.windows;
  const windows = mergeWindows([...fromPoll, ...cpWindowsFromLog(server.stderr)]);
  const { during, outside } = splitByWindows(samples, windows);
  const enough = during.length >= MIN_SAMPLES && outside.length >= MIN_SAMPLES;
  const p99During = enough ? percentile(during, 99) : undefined;
  const p99Outside = enough ? percentile(outside, 99) : undefined;
  let note = '';
  if (windows.length === 0) note = `no CP seen (control socket${poller.error ? `: ${poller.error}` : ''}; no CP lines in the log)`;
  else if (!enough) note = `too few samples on one side (during ${during.length}, outside ${outside.length}; need ${MIN_SAMPLES})`;
  return {
    cpCount: windows.length,
    cpsMissed: poller.missed,
    cpDurationMsMedian: windows.length > 0 ? median(windows.map((w) => w.endMs - w.startMs)) : undefined,
    samplesDuring: during.length,
    samplesOutside: outside.length,
    p99DuringUs: p99During,
    p99OutsideUs: p99Outside,
    ratio: p99During !== undefined && p99Outside !== undefined ? p99During / p99Outside : undefined,
    note,
  };
}

export async function measureRss(spec: ServerSpec, dir: string, volumeBytes: number, writtenBytes: number, timeoutS: number): Promise<RssResult> {
  await spec.prepare(dir);
  const server = await RunningServer.start(spec, dir, path.join(dir, 'rss.sock'));
  let peak = 0;
  const sampler = setInterval(() => {
    try {
      peak = Math.max(peak, server.peakRssBytes());
    } catch {
      /* the process may be exiting; the final read below decides */
    }
  }, 250);
  let iops: number;
  try {
    const run = await runFio(
      'rss-sustained',
      server.uri,
      [['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 32], ['norandommap', 1], ['size', volumeBytes], ['io_size', writtenBytes]],
      'write',
      path.join(dir, 'rss.json'),
      timeoutS,
    );
    iops = run.result.iops;
    peak = Math.max(peak, server.peakRssBytes());
  } catch (e) {
    clearInterval(sampler);
    await server.kill();
    throw e;
  }
  clearInterval(sampler);
  await server.stop();
  await spec.cleanup(dir);
  return { volumeBytes, writtenBytes, iops, peakRssBytes: peak };
}
