/**
 * The `mirror` suite of `npm run bench` (BENCH_SUITES=mirror): what mirroring costs the
 * client, and what it puts on the wire, on two "hosts" (network namespaces a and b of
 * test/net/netns.ts joined by a veth pair).
 *
 *   unmirrored:  a: nvmirror serve VOL --socket S --cp-interval C
 *   sync|async:  b: nvmirror receive RX --listen B:PORT --export-socket E --mirror-insecure
 *                a: nvmirror serve VOL --socket S --cp-interval C --mirror-to B:PORT
 *                     --mirror-mode sync|async --mirror-insecure
 *   the delayed runs put a relay between them (there is no netem here):
 *                a: relay (test/net/relay.ts) 127.0.0.1:R -> B:PORT, delayMs each way
 *                a: nvmirror serve ... --mirror-to 127.0.0.1:R
 *   fio (nbd engine) runs in the root namespace against S (Unix sockets ignore network
 *   namespaces). Every run starts from a fresh thin volume and a fresh receiver directory.
 *
 * Per mirrored run: wait for 'in-sync' (the baseline is done), take the kernel's byte
 * counters of the receiver's one mirror connection (tcp_info through `ss` in namespace b:
 * bytes_received + bytes_sent, retransmissions included), run fio, ask for a CP, wait
 * until the source's status says in-sync with rootsEqual and destCp === sourceCp >= that
 * CP, take the counters again: wire/client = those bytes / fio's written bytes. A run
 * whose connection changed in between (a reconnect) is an error. Runs through the relay
 * also report the relay's own count of both directions (it must agree). Without a delay
 * there is no relay: it would be a third process (and a second TCP hop) on the same two
 * cores, which a deployment does not have. Peak RSS is VmHWM of the serve and receive
 * node processes (found in their namespaces), read before they are stopped.
 *
 * The "1 ms RTT" runs: the relay delays each chunk delayMs in each direction, but Node
 * rounds timeouts below 1 ms up to 1 ms (and Date.now() is whole ms), so delayMs 0.5 gives
 * ~2.3 ms RTT. The relay therefore runs with ./precise-timers preloaded (sub-ms timers),
 * and delayMs is calibrated once at the start with a ping-pong through the relay (64-byte
 * messages, TCP_NODELAY) so that the median RTT comes out at BENCH_MIRROR_RTT_MS.
 *
 * Invariants:
 * - needs root (namespaces): fails at once with one line otherwise;
 * - the host pair (and every process in it) is destroyed at the end, also on failure
 *   (HostPair.destroy(); netns.ts's exit hook covers signals and process.exit);
 * - a process that dies, does not start, or does not stop cleanly aborts the run: no
 *   number is reported from a broken run;
 * - the byte window starts after the baseline and ends at an in-sync point with equal
 *   roots that covers every write fio made.
 */
import { ChildProcess, execFileSync, spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import * as readline from 'readline';
import type { BenchConfig } from './config';
import { FioOptions, runFio } from './fio';
import { median } from './report';
import { lastLines, sleep } from './servers';
import { createHostPair, HostPair, netnsAvailable } from '../../test/net/netns';
import type { RelayFaults, RelayOptions, RelayStats } from '../../test/net/relay';
import { controlRequest } from '../../src/volume/engine-control';
import { formatSize } from '../../src/util/size';
import { NODE_FLAGS } from '../../src/cli/node-flags';

const MIB = 1024 * 1024;
const PORT = 17311;
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 60_000;
const SYNC_TIMEOUT_MS = 300_000;
const STATUS_POLL_MS = 50;
/** How long the writes during a baseline (and with the receiver away) run, s. */
const DURING_BASELINE_S = 5;
/** Status polls while a baseline or resync runs. */
const CATCH_UP_POLL_MS = 500;
const RELAY_REPLY_TIMEOUT_MS = 10_000;
const PING_COUNT = 400;

export interface MirrorBenchOptions {
  sizeBytes: number;
  nvramBytes: number;
  cpIntervalMs: number;
  runtimeS: number;
  rttMs: number;
  stallS: number;
  /** Live data the baseline run copies (0: no baseline run); the resync run rewrites a quarter of it. */
  baselineBytes: number;
  /**
   * Where the receiver's directories go (default: the scratch directory). The two "hosts"
   * of this bench share one machine, so by default they share one disk and every mirrored
   * byte is written to it twice; a second disk (or tmpfs) gives the receiver its own.
   */
  rxDir?: string;
}

type Mode = 'none' | 'sync' | 'async';

interface Config {
  label: string;
  mode: Mode;
  delayed: boolean;
}

interface MWorkload {
  id: string;
  label: string;
  opts: FioOptions;
  /** 'iops' or 'mbps' is the throughput metric. */
  unit: 'IOPS' | 'MB/s';
  bsBytes: number;
}

export interface MirrorSample {
  round: number;
  config: string;
  workload: string;
  iops: number;
  mbps: number;
  p50Us: number;
  p99Us: number;
  clientBytes: number;
  /** Bytes on the mirror connection, both directions (the kernel's tcp_info at the receiver), from in-sync before fio to in-sync after. */
  wireBytes?: number;
  /** The relay's count of the same window, both directions (delayed runs only). */
  relayBytes?: number;
  /** The source's own bytesOnWire / clientBytes deltas over the same window. */
  nvmWireBytes?: number;
  nvmClientBytes?: number;
  refsSent?: number;
  /** From the end of fio to the final in-sync point with equal roots. */
  syncAfterS?: number;
  sourceRssBytes: number;
  receiverRssBytes?: number;
  /** CPU used during fio, in % of one core: source, receiver, relay. */
  sourceCpuPct: number;
  receiverCpuPct?: number;
  relayCpuPct?: number;
}

export interface StallResult {
  mode: Mode;
  stallS: number;
  sourcePeakRssBytes: number;
  receiverPeakRssBytes: number;
  /** Max VmRSS sampled during the stall window only. */
  sourceMaxRssDuringBytes: number;
  receiverMaxRssDuringBytes: number;
  /** Source RSS just before the stall. */
  sourceRssBeforeBytes: number;
  receiverRssBeforeBytes: number;
  /** Relay bytes held in its queues at the end of the stall (bounded by its own cap). */
  relayQueuedBytes: number;
  statesSeen: string[];
  writesDuringStall: number;
  iops: number;
  syncAfterS: number;
  lastError: string | undefined;
  /** The relay's count of mirror bytes (both ways, every connection) from before fio to in sync after it, and the client bytes in that window. */
  wireBytes: number;
  clientBytes: number;
}

/** One catch-up (baseline or resync), as the source timed it: from its CP_BEGIN to the destination's ack of the commit. */
export interface CatchUp {
  seconds: number;
  /** Bytes the source put on the wire over that window (its own count). */
  wireBytes: number;
  /** The blocks it sent (data and metadata), in bytes. */
  dataBytes: number;
}

export interface BaselineResult {
  /** Bytes the fill wrote before the mirror started (the live data the baseline copies). */
  filledBytes: number;
  /** Bytes written (1 MiB random writes) while the receiver was down, before the resync. */
  rewrittenBytes: number;
  baseline: CatchUp;
  resync: CatchUp;
  /** Bytes written (4 KiB random writes over the whole volume) while the receiver was down again, and that resync. */
  scatteredBytes: number;
  resync4k: CatchUp;
  /**
   * 4 KiB random writes (QD32, DURING_BASELINE_S) with the receiver away, then the same
   * during a baseline to a new destination (sync, policy available), and that baseline.
   */
  during: { awayIops: number; duringIops: number; runtimeS: number; baseline: CatchUp };
  /** One TCP stream a -> b over the veth, bytes/s. */
  linkBytesPerS: number;
  /** Sequential 1 MiB writes to a file in the bench directory, then fdatasync, bytes/s. */
  diskBytesPerS: number;
}

export interface RttResult {
  directMs: number;
  relayMs: number;
  /** delayMs per direction used for the delayed runs. */
  delayMs: number;
  delayedMs: number;
  /** Plain test/net/relay.ts (no precise timers) with delayMs 0.5 each way, for the record. */
  naiveHalfMsMs: number;
  calibration: string[];
}

export interface MirrorReport {
  title: string;
  configs: Array<{ label: string; command: string }>;
  workloads: Array<{ id: string; label: string; unit: string }>;
  samples: MirrorSample[];
  rtt: RttResult;
  stalls: StallResult[];
  baseline?: BaselineResult;
}

function say(line: string): void {
  process.stderr.write(line + '\n');
}

// ------------------------------------------------------------------ processes in a namespace

class NsProcess {
  private out = '';
  private err = '';
  exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly waiters: Array<() => void> = [];

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.stdout?.on('data', (c: Buffer) => (this.out = (this.out + c.toString('utf8')).slice(-1_000_000)));
    child.stderr?.on('data', (c: Buffer) => (this.err = (this.err + c.toString('utf8')).slice(-1_000_000)));
    child.once('exit', (code, signal) => {
      this.exited = { code, signal };
      for (const w of this.waiters.splice(0)) w();
    });
  }

  get stdout(): string {
    return this.out;
  }

  get log(): string {
    return lastLines(this.err + this.out);
  }

  /** Everything it printed (each stream's last 1 MB). */
  text(): string {
    return this.out + '\n' + this.err;
  }

  /** `ip netns exec` execs the command, so this is the node process itself (checked). */
  get pid(): number {
    const p = this.child.pid;
    if (p === undefined) throw new Error(`${this.name}: no pid`);
    return p;
  }

  async waitFor(what: string, ready: () => boolean): Promise<void> {
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!ready()) {
      if (this.exited) throw new Error(`${this.name} exited before ${what} (code ${this.exited.code}, signal ${this.exited.signal}): ${this.log}`);
      if (Date.now() > deadline) throw new Error(`${this.name}: no ${what} after ${START_TIMEOUT_MS} ms: ${this.log}`);
      await sleep(20);
    }
  }

  ensureAlive(): void {
    if (this.exited) throw new Error(`${this.name} died (code ${this.exited.code}, signal ${this.exited.signal}): ${this.log}`);
  }

  async stop(): Promise<void> {
    this.ensureAlive();
    this.child.kill('SIGTERM');
    const ok = await new Promise<boolean>((resolve) => {
      if (this.exited) return resolve(true);
      const t = setTimeout(() => resolve(false), STOP_TIMEOUT_MS);
      this.waiters.push(() => {
        clearTimeout(t);
        resolve(true);
      });
    });
    if (!ok) {
      this.child.kill('SIGKILL');
      throw new Error(`${this.name} did not stop within ${STOP_TIMEOUT_MS} ms of SIGTERM: ${this.log}`);
    }
    const e = this.exited!;
    if (!(e.code === 0 || (e.code === null && e.signal === 'SIGTERM'))) throw new Error(`${this.name} exited uncleanly on SIGTERM (code ${e.code}, signal ${e.signal}): ${this.log}`);
  }
}

let clkTck: number | undefined;

/** user+system CPU seconds of a live process. */
function cpuSeconds(pid: number): number {
  clkTck ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / clkTck!;
}

function procStatusKb(pid: number, field: 'VmHWM' | 'VmRSS'): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB$`, 'm').exec(status);
  if (!m || m[1] === undefined) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

/** Checks that `pid` is a node process running `sub` (serve/receive) inside namespace `ns`. */
async function verifyPid(pair: HostPair, host: 'a' | 'b', pid: number, sub: string): Promise<void> {
  const exe = fs.readlinkSync(`/proc/${pid}/exe`);
  const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  if (!/node/.test(path.basename(exe)) || !cmd.includes(sub)) throw new Error(`pid ${pid} is ${exe} ${cmd.join(' ')}, not the node ${sub} process`);
  const pids = await new Promise<string>((resolve) => {
    const c = spawn('ip', ['netns', 'pids', pair.host(host).ns], { stdio: ['ignore', 'pipe', 'ignore'] });
    let o = '';
    c.stdout!.on('data', (d: Buffer) => (o += d.toString()));
    c.once('close', () => resolve(o));
  });
  if (!pids.split(/\s+/).includes(String(pid))) throw new Error(`pid ${pid} (${sub}) is not in namespace ${pair.host(host).ns}`);
}

// ------------------------------------------------------------------ the relay, with sub-ms timers

interface BenchRelay {
  host: string;
  port: number;
  child: ChildProcess;
  set(patch: Partial<RelayFaults>): Promise<void>;
  stats(): Promise<RelayStats>;
  close(): Promise<void>;
}

/** test/net/relay.ts's CLI inside `host`'s namespace (its line protocol, as startRelayIn), optionally with precise timers. */
async function startRelay(pair: HostPair, host: 'a' | 'b', opts: RelayOptions, precise: boolean): Promise<BenchRelay> {
  const relayJs = path.resolve(__dirname, '..', '..', 'test', 'net', 'relay.js');
  const preload = path.join(__dirname, 'precise-timers.js');
  const child = pair.spawn(host, process.execPath, [...(precise ? ['-r', preload] : []), relayJs, JSON.stringify(opts)], { stdio: ['pipe', 'pipe', 'pipe'] });
  let errText = '';
  child.stderr!.on('data', (d: Buffer) => (errText = (errText + d.toString()).slice(-4000)));
  const lines = readline.createInterface({ input: child.stdout! });
  const waiting: Array<(m: Record<string, unknown>) => void> = [];
  let exited = false;
  child.once('exit', (code, signal) => {
    exited = true;
    for (const w of waiting.splice(0)) w({ event: 'error', message: `relay exited (${code ?? signal}): ${errText.trim()}` });
  });
  lines.on('line', (line) => {
    try {
      const m = JSON.parse(line) as Record<string, unknown>;
      waiting.shift()?.(m);
    } catch {
      /* not ours */
    }
  });
  const next = (): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      if (exited) return reject(new Error(`relay exited: ${errText.trim()}`));
      const t = setTimeout(() => reject(new Error('relay did not answer in time')), RELAY_REPLY_TIMEOUT_MS);
      waiting.push((m) => {
        clearTimeout(t);
        if (m.event === 'error') reject(new Error(String(m.message)));
        else resolve(m);
      });
    });
  const command = (cmd: Record<string, unknown>): Promise<Record<string, unknown>> => {
    const a = next();
    child.stdin!.write(JSON.stringify(cmd) + '\n');
    return a;
  };
  const hello = await next();
  return {
    host: String(hello.host),
    port: Number(hello.port),
    child,
    set: async (patch) => void (await command({ set: patch })),
    stats: async () => (await command({ stats: true })).stats as RelayStats,
    close: async () => {
      if (exited) return;
      const gone = new Promise<void>((r) => child.once('exit', () => r()));
      child.stdin!.end();
      const t = setTimeout(() => child.kill('SIGKILL'), RELAY_REPLY_TIMEOUT_MS);
      await gone;
      clearTimeout(t);
    },
  };
}

// ------------------------------------------------------------------ RTT

const ECHO_JS = `require('net').createServer((s) => { s.setNoDelay(true); s.pipe(s); }).listen(Number(process.argv[2]), process.argv[1], () => console.log('up'))`;
const PING_JS = `
const net = require('net');
const [host, port, n] = process.argv.slice(1);
const s = net.connect(Number(port), host, () => {
  s.setNoDelay(true);
  const rtts = [];
  let t0 = 0n, got = 0;
  const go = () => { t0 = process.hrtime.bigint(); s.write(Buffer.alloc(64)); };
  s.on('data', (d) => {
    got += d.length;
    if (got < 64) return;
    got -= 64;
    rtts.push(Number(process.hrtime.bigint() - t0) / 1e6);
    if (rtts.length < Number(n)) setTimeout(go, 1 + Math.random() * 2);
    else { rtts.sort((a, b) => a - b); console.log(JSON.stringify({ p50: rtts[rtts.length >> 1], p10: rtts[Math.floor(rtts.length * 0.1)], p90: rtts[Math.floor(rtts.length * 0.9)] })); s.end(); }
  });
  go();
});`;

interface PingResult {
  p50: number;
  p10: number;
  p90: number;
}

async function ping(pair: HostPair, host: string, port: number): Promise<PingResult> {
  const r = await pair.exec('a', process.execPath, ['-e', PING_JS, host, String(port), String(PING_COUNT)], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`ping through ${host}:${port} failed: ${r.stderr.trim().split('\n').slice(-2).join(' | ')}`);
  return JSON.parse(r.stdout.trim()) as PingResult;
}

const fmtPing = (p: PingResult): string => `p50 ${p.p50.toFixed(2)} ms (p10 ${p.p10.toFixed(2)}, p90 ${p.p90.toFixed(2)})`;

/** Measures RTTs and picks delayMs (per direction, precise relay) so that the median RTT is ~targetMs. */
async function calibrateRtt(pair: HostPair, targetMs: number): Promise<RttResult> {
  const echoPort = PORT + 1;
  const echo = pair.spawn('b', process.execPath, ['-e', ECHO_JS, pair.b.addr, String(echoPort)]);
  try {
    await new Promise<void>((resolve, reject) => {
      echo.stdout!.once('data', () => resolve());
      echo.once('exit', () => reject(new Error('echo server exited')));
    });
    const direct = await ping(pair, pair.b.addr, echoPort);
    const target = { targetHost: pair.b.addr, targetPort: echoPort, listenHost: '127.0.0.1' };
    const at = async (delayMs: number, precise: boolean): Promise<PingResult> => {
      const relay = await startRelay(pair, 'a', { ...target, faults: { delayMs } }, precise);
      try {
        return await ping(pair, relay.host, relay.port);
      } finally {
        await relay.close();
      }
    };
    const notes: string[] = [`direct veth ${fmtPing(direct)}`];
    const relay0 = await at(0, true);
    notes.push(`relay, no delay: ${fmtPing(relay0)}`);
    const naive = await at(0.5, false);
    notes.push(`plain relay delayMs 0.5 each way (Node rounds the timer up to 1 ms): ${fmtPing(naive)}`);
    let delay = targetMs / 2;
    let got = await at(delay, true);
    notes.push(`precise-timer relay delayMs ${delay.toFixed(3)} each way: ${fmtPing(got)}`);
    for (let i = 0; i < 2 && Math.abs(got.p50 - targetMs) > 0.1 * targetMs; i++) {
      delay = Math.max(0.01, delay + (targetMs - got.p50) / 2);
      got = await at(delay, true);
      notes.push(`precise-timer relay delayMs ${delay.toFixed(3)} each way: ${fmtPing(got)}`);
    }
    return { directMs: direct.p50, relayMs: relay0.p50, delayMs: delay, delayedMs: got.p50, naiveHalfMsMs: naive.p50, calibration: notes };
  } finally {
    echo.kill('SIGTERM');
  }
}

// ------------------------------------------------------------------ one run

interface MirrorStats {
  state: string;
  connected: boolean;
  sourceCp: number;
  destCp: number;
  rootsEqual: boolean;
  bytesOnWire: number;
  clientBytes: number;
  refsSent: number;
  lastError?: string;
}

async function mirrorStatus(vol: string): Promise<MirrorStats> {
  const r = await controlRequest(path.join(vol, 'control.sock'), { op: 'status' }, 30_000);
  if (!r.ok) throw new Error(`status: ${r.error}`);
  const m = (r.status as { sections?: { mirror?: MirrorStats } }).sections?.mirror;
  if (m === undefined) throw new Error('status has no sections.mirror');
  return m;
}

async function waitInSync(vol: string, what: string, minCp: number, procs: NsProcess[], pollMs = STATUS_POLL_MS): Promise<MirrorStats> {
  const deadline = Date.now() + SYNC_TIMEOUT_MS;
  let last: MirrorStats | undefined;
  for (;;) {
    for (const p of procs) p.ensureAlive();
    last = await mirrorStatus(vol);
    if (last.state === 'in-sync' && last.rootsEqual && last.destCp === last.sourceCp && last.destCp >= minCp) return last;
    if (Date.now() > deadline) throw new Error(`mirror not in sync ${what} after ${SYNC_TIMEOUT_MS / 1000} s: ${JSON.stringify(last)}`);
    await sleep(pollMs);
  }
}

/**
 * Waits for in-sync with equal roots at CP >= minCp after a baseline or resync, and takes
 * its time and block count from the source's own log line ("mirror baseline done" /
 * "mirror resync done": from its CP_BEGIN to the destination's ack of its commit; the
 * n-th such line, n = `nth`), so status polling neither slows it nor blurs the clock.
 * Wire bytes are the source's counter minus `base` (a status taken before the receiver
 * came up; undefined: a fresh source, counting from zero).
 */
async function timeCatchUp(vol: string, kind: 'baseline' | 'resync', nth: number, minCp: number, source: NsProcess, procs: NsProcess[], base: MirrorStats | undefined): Promise<CatchUp> {
  // Rare polls: the time comes from the log, and a status walks the source's state.
  const m = await waitInSync(vol, `after the ${kind}`, minCp, procs, CATCH_UP_POLL_MS);
  const done = source.text().split('\n').filter((l) => l.includes(`"msg":"mirror ${kind} done"`));
  const line = done[nth - 1];
  if (line === undefined) throw new Error(`the source logged ${done.length} "mirror ${kind} done" lines, expected ${nth}`);
  const j = JSON.parse(line.slice(line.indexOf('{'))) as { blocks: number; ms: number };
  return { seconds: j.ms / 1000, dataBytes: j.blocks * 4096, wireBytes: m.bytesOnWire - (base?.bytesOnWire ?? 0) };
}

const SINK_JS = `let n = 0, t0 = 0; require('net').createServer((s) => { s.on('data', (d) => { if (t0 === 0) t0 = process.hrtime.bigint(); n += d.length; }); s.on('end', () => { console.log(JSON.stringify({ bytes: n, seconds: Number(process.hrtime.bigint() - t0) / 1e9 })); process.exit(0); }); }).listen(Number(process.argv[2]), process.argv[1], () => console.log('up'))`;
const SEND_JS = `const [host, port, total] = process.argv.slice(1); const buf = Buffer.alloc(1 << 20, 7); let left = Number(total); const s = require('net').connect(Number(port), host, () => { const go = () => { while (left > 0) { left -= buf.length; if (!s.write(buf)) return void s.once('drain', go); } s.end(); }; go(); });`;

/** One TCP stream from a to b over the veth (Node on both ends, as the mirror): bytes/s at the sink. */
async function linkBandwidth(pair: HostPair, bytes: number): Promise<number> {
  const port = PORT + 2;
  const sink = pair.spawn('b', process.execPath, ['-e', SINK_JS, pair.b.addr, String(port)]);
  try {
    let out = '';
    sink.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await new Promise<void>((resolve, reject) => {
      sink.stdout!.on('data', () => out.includes('up') && resolve());
      sink.once('exit', () => reject(new Error('link sink exited')));
    });
    const sent = await pair.exec('a', process.execPath, ['-e', SEND_JS, pair.b.addr, String(port), String(bytes)], { timeoutMs: 120_000 });
    if (sent.code !== 0) throw new Error(`link sender failed: ${sent.stderr.trim()}`);
    await new Promise<void>((resolve) => (sink.exitCode !== null ? resolve() : sink.once('exit', () => resolve())));
    const line = out.split('\n').find((l) => l.startsWith('{'));
    if (!line) throw new Error(`link sink said nothing: ${out}`);
    const r = JSON.parse(line) as { bytes: number; seconds: number };
    if (r.bytes < bytes) throw new Error(`link sink got ${r.bytes} of ${bytes} bytes`);
    return r.bytes / r.seconds;
  } finally {
    if (sink.exitCode === null) sink.kill('SIGKILL');
  }
}

/** Sequential 1 MiB writes of `bytes` to a new file in dir, then fdatasync: bytes/s. */
function diskBandwidth(dir: string, bytes: number): number {
  const f = path.join(dir, 'disk-bw.tmp');
  const buf = Buffer.alloc(MIB, 7);
  const fd = fs.openSync(f, 'w');
  try {
    const t0 = process.hrtime.bigint();
    for (let off = 0; off < bytes; off += MIB) fs.writeSync(fd, buf, 0, MIB, off);
    fs.fdatasyncSync(fd);
    return bytes / (Number(process.hrtime.bigint() - t0) / 1e9);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(f, { force: true });
  }
}

/**
 * The kernel's payload byte counters (tcp_info: bytes_sent includes retransmissions) of
 * the one established TCP connection on `host` whose local port is `port`, and its peer
 * address. Exactly one such connection must exist (the mirror's; the exports are Unix sockets).
 */
export async function tcpBytes(pair: HostPair, host: 'a' | 'b', port: number): Promise<{ peer: string; sent: number; received: number }> {
  const r = await pair.exec(host, 'ss', ['-tinH', 'state', 'established', `( sport = :${port} )`], { timeoutMs: 10_000 });
  if (r.code !== 0) throw new Error(`ss failed: ${lastLines(r.stderr + r.stdout)}`);
  const conns: Array<{ peer: string; info: string }> = [];
  for (const line of r.stdout.split('\n')) {
    if (line.trim() === '') continue;
    if (/^\s/.test(line)) {
      const last = conns[conns.length - 1];
      if (last) last.info += ' ' + line;
    } else {
      const f = line.trim().split(/\s+/);
      conns.push({ peer: f[f.length - 1] ?? '?', info: '' });
    }
  }
  if (conns.length !== 1) throw new Error(`expected one mirror connection on port ${port}, ss shows ${conns.length}: ${r.stdout.trim()}`);
  const c = conns[0]!;
  const num = (k: string): number => {
    const m = new RegExp(`\\b${k}:(\\d+)`).exec(c.info);
    return m ? Number(m[1]) : 0; // ss leaves a zero counter out
  };
  return { peer: c.peer, sent: num('bytes_sent'), received: num('bytes_received') };
}

async function checkpoint(vol: string): Promise<number> {
  const r = await controlRequest(path.join(vol, 'control.sock'), { op: 'checkpoint' }, 120_000);
  if (!r.ok) throw new Error(`checkpoint: ${r.error}`);
  return r.cpNumber as number;
}

interface Running {
  vol: string;
  rx: string;
  sock: string;
  source: NsProcess;
  receiver?: NsProcess;
  relay?: BenchRelay;
}

class MirrorBench {
  private readonly bin: string;
  private runNo = 0;

  constructor(
    private readonly pair: HostPair,
    private readonly root: string,
    private readonly dir: string,
    private readonly o: MirrorBenchOptions,
  ) {
    this.bin = path.join(root, 'dist', 'src', 'cli', 'main.js');
    if (o.rxDir !== undefined) fs.mkdirSync(o.rxDir, { recursive: true });
  }

  private nvm(host: 'a' | 'b', name: string, args: string[]): NsProcess {
    return new NsProcess(name, this.pair.spawn(host, process.execPath, [...NODE_FLAGS, this.bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd: this.dir }));
  }

  /** A mirrored run goes through the relay when it has a delay or `viaRelay` (the stall run stalls the relay). */
  async start(mode: Mode, delayMs: number, viaRelay = delayMs > 0): Promise<Running> {
    const n = ++this.runNo;
    const vol = path.join(this.dir, `vol-${n}`);
    const rx = path.join(this.o.rxDir ?? this.dir, `rx-${n}`);
    const sock = path.join(this.dir, `src-${n}.sock`);
    const exp = path.join(this.dir, `exp-${n}.sock`);
    const create = await this.pair.exec('a', process.execPath, [this.bin, 'create', vol, '--size', String(this.o.sizeBytes), '--nvram-size', String(this.o.nvramBytes)], { timeoutMs: 120_000 });
    if (create.code !== 0) throw new Error(`nvmirror create failed: ${lastLines(create.stderr + create.stdout)}`);
    const run: Partial<Running> = { vol, rx, sock };
    try {
      const serveArgs = ['serve', vol, '--socket', sock, '--cp-interval', String(this.o.cpIntervalMs)];
      if (mode !== 'none') {
        const receiver = this.nvm('b', 'nvmirror receive', ['receive', rx, '--listen', `${this.pair.b.addr}:${PORT}`, '--export-socket', exp, '--mirror-insecure']);
        run.receiver = receiver;
        await receiver.waitFor('"receiving" line', () => receiver.stdout.includes('nvmirror: receiving') && fs.existsSync(exp));
        await verifyPid(this.pair, 'b', receiver.pid, 'receive');
        if (viaRelay) {
          run.relay = await startRelay(this.pair, 'a', { targetHost: this.pair.b.addr, targetPort: PORT, listenHost: '127.0.0.1', faults: { delayMs } }, true);
          serveArgs.push('--mirror-to', `127.0.0.1:${run.relay.port}`);
        } else {
          serveArgs.push('--mirror-to', `${this.pair.b.addr}:${PORT}`);
        }
        serveArgs.push('--mirror-mode', mode, '--mirror-insecure');
      }
      const source = this.nvm('a', `nvmirror serve${mode === 'none' ? '' : ` (${mode})`}`, serveArgs);
      run.source = source;
      await source.waitFor('"serving" line', () => source.stdout.includes('nvmirror: serving') && fs.existsSync(sock));
      await verifyPid(this.pair, 'a', source.pid, 'serve');
      if (mode !== 'none') await waitInSync(vol, 'after the baseline', 0, this.procs(run as Running));
      return run as Running;
    } catch (e) {
      await this.stop(run, false);
      throw e;
    }
  }

  procs(r: Running): NsProcess[] {
    return [r.source, ...(r.receiver ? [r.receiver] : [])];
  }

  /** Stops source, then receiver, then relay; removes the run's directories. */
  async stop(r: Partial<Running>, strict = true): Promise<void> {
    const errors: string[] = [];
    for (const p of [r.source, r.receiver]) {
      if (!p) continue;
      if (strict) await p.stop().catch((e: unknown) => errors.push((e as Error).message));
      else if (!p.exited) p.child.kill('SIGKILL');
    }
    await r.relay?.close().catch(() => undefined);
    if (r.vol) fs.rmSync(r.vol, { recursive: true, force: true });
    if (r.rx) fs.rmSync(r.rx, { recursive: true, force: true });
    if (errors.length > 0) throw new Error(errors.join('; '));
  }

  async measure(cfg: Config, w: MWorkload, round: number, delayMs: number): Promise<MirrorSample> {
    const r = await this.start(cfg.mode, cfg.delayed ? delayMs : 0);
    try {
      const before = r.relay ? await r.relay.stats() : undefined;
      const tcp0 = cfg.mode !== 'none' ? await tcpBytes(this.pair, 'b', PORT) : undefined;
      const st0 = cfg.mode !== 'none' ? await mirrorStatus(r.vol) : undefined;
      const out = path.join(this.dir, `${w.id}-${cfg.label.replace(/\W+/g, '_')}-r${round}.json`);
      const cpuPids = [r.source.pid, r.receiver?.pid, r.relay?.child.pid];
      const cpu0 = cpuPids.map((p) => (p === undefined ? 0 : cpuSeconds(p)));
      const t0 = Date.now();
      const fio = await runFio(w.id, `nbd+unix:///?socket=${r.sock}`, w.opts, 'write', out, this.o.runtimeS + 5);
      const fioEnd = Date.now();
      for (const p of this.procs(r)) p.ensureAlive();
      const cpuPct = cpuPids.map((p, i) => (p === undefined ? undefined : ((cpuSeconds(p) - cpu0[i]!) * 100 * 1000) / (fioEnd - t0)));
      const res = fio.result;
      const sample: MirrorSample = {
        round,
        config: cfg.label,
        workload: w.id,
        iops: res.iops,
        mbps: res.bytesPerS / 1e6,
        p50Us: res.clatP50Us,
        p99Us: res.clatP99Us,
        clientBytes: res.ios * w.bsBytes, // no ramp: every write fio completed
        sourceRssBytes: 0,
        sourceCpuPct: cpuPct[0]!,
        ...(cpuPct[1] !== undefined ? { receiverCpuPct: cpuPct[1] } : {}),
        ...(cpuPct[2] !== undefined ? { relayCpuPct: cpuPct[2] } : {}),
      };
      if (cfg.mode !== 'none' && tcp0 && st0 && r.receiver) {
        const cp = await checkpoint(r.vol);
        const st1 = await waitInSync(r.vol, 'after the workload', cp, this.procs(r));
        sample.syncAfterS = (Date.now() - fioEnd) / 1000;
        const tcp1 = await tcpBytes(this.pair, 'b', PORT);
        if (tcp1.peer !== tcp0.peer) throw new Error(`the mirror connection changed during the run (${tcp0.peer} -> ${tcp1.peer}): no wire count`);
        sample.wireBytes = tcp1.sent + tcp1.received - tcp0.sent - tcp0.received;
        if (r.relay && before) {
          const after = await r.relay.stats();
          sample.relayBytes = after.bytes.toTarget + after.bytes.toClient - before.bytes.toTarget - before.bytes.toClient;
        }
        sample.nvmWireBytes = st1.bytesOnWire - st0.bytesOnWire;
        sample.nvmClientBytes = st1.clientBytes - st0.clientBytes;
        sample.refsSent = st1.refsSent - st0.refsSent;
        sample.receiverRssBytes = procStatusKb(r.receiver.pid, 'VmHWM');
      }
      sample.sourceRssBytes = procStatusKb(r.source.pid, 'VmHWM');
      await this.stop(r);
      return sample;
    } catch (e) {
      await this.stop(r, false);
      throw new Error(`${w.label} / ${cfg.label} (round ${round}): ${(e as Error).message}\n  source log: ${r.source.log}${r.receiver ? `\n  receiver log: ${r.receiver.log}` : ''}`);
    }
  }

  /**
   * Baseline and resync speed, straight over the veth (no relay): fill a volume with
   * baselineBytes unmirrored, start a receiver and the source in sync mode and time the
   * baseline; stop the receiver, rewrite a quarter of the data with 1 MiB random writes,
   * start it again and time the resync. Against one TCP stream's bandwidth on the veth
   * and the disk's sequential write bandwidth (the issue's target: >= 50% of the lower).
   */
  async baselineAndResync(): Promise<BaselineResult> {
    const n = ++this.runNo;
    const vol = path.join(this.dir, `vol-${n}`);
    const rx = path.join(this.o.rxDir ?? this.dir, `rx-${n}`);
    const sock = path.join(this.dir, `src-${n}.sock`);
    const exp = path.join(this.dir, `exp-${n}.sock`);
    const uri = `nbd+unix:///?socket=${sock}`;
    const filled = this.o.baselineBytes;
    const rewritten = Math.max(MIB, Math.floor(filled / 4 / MIB) * MIB);
    // The best of three (other writeback on the disk only ever lowers a run).
    const diskBytesPerS = Math.max(...[0, 1, 2].map(() => diskBandwidth(this.dir, Math.min(filled, 1024 * MIB))));
    const linkBytesPerS = await linkBandwidth(this.pair, Math.min(filled, 2048 * MIB));
    const create = await this.pair.exec('a', process.execPath, [this.bin, 'create', vol, '--size', String(this.o.sizeBytes), '--nvram-size', String(this.o.nvramBytes)], { timeoutMs: 120_000 });
    if (create.code !== 0) throw new Error(`nvmirror create failed: ${lastLines(create.stderr + create.stdout)}`);
    const procs: NsProcess[] = [];
    const serve = async (label: string, extra: string[]): Promise<NsProcess> => {
      const p = this.nvm('a', label, ['serve', vol, '--socket', sock, '--cp-interval', String(this.o.cpIntervalMs), ...extra]);
      procs.push(p);
      await p.waitFor('"serving" line', () => p.stdout.includes('nvmirror: serving') && fs.existsSync(sock));
      return p;
    };
    const receive = async (): Promise<NsProcess> => {
      const p = this.nvm('b', 'nvmirror receive', ['receive', rx, '--listen', `${this.pair.b.addr}:${PORT}`, '--export-socket', exp, '--mirror-insecure']);
      procs.push(p);
      await p.waitFor('"receiving" line', () => p.stdout.includes('nvmirror: receiving') && fs.existsSync(exp));
      return p;
    };
    const mirrorArgs = ['--mirror-to', `${this.pair.b.addr}:${PORT}`, '--mirror-mode', 'sync', '--mirror-insecure'];
    try {
      // The fill, unmirrored (fio's buffers are random: nothing is a zero block).
      let source = await serve('nvmirror serve (fill)', []);
      await runFio('baseline-fill', uri, [['rw', 'write'], ['bs', '1M'], ['iodepth', 8], ['size', filled]], 'write', path.join(this.dir, 'baseline-fill.json'), filled / 100e6 + 30);
      await checkpoint(vol);
      await source.stop();
      // Baseline.
      let receiver = await receive();
      source = await serve('nvmirror serve (sync)', mirrorArgs);
      const baseline = await timeCatchUp(vol, 'baseline', 1, 0, source, [source, receiver], undefined);
      // Resync: the receiver away while a quarter of the data is rewritten.
      await receiver.stop();
      await runFio('resync-writes', uri, [['rw', 'randwrite'], ['bs', '1M'], ['iodepth', 8], ['size', filled], ['io_size', rewritten], ['norandommap', 1]], 'write',
        path.join(this.dir, 'resync-writes.json'), rewritten / 50e6 + 30);
      const cp = await checkpoint(vol);
      const before = await mirrorStatus(vol);
      if (before.connected) throw new Error('the source says connected while the receiver is down');
      receiver = await receive();
      const resync = await timeCatchUp(vol, 'resync', 1, cp, source, [source, receiver], before);
      // Again, with 4 KiB random writes over the whole volume: the blocks to send are
      // scattered in lbn order, one per level-0 node or so.
      await receiver.stop();
      const scattered = Math.max(MIB, Math.floor(rewritten / 2 / MIB) * MIB);
      await runFio('resync-writes-4k', uri, [['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 32], ['size', this.o.sizeBytes], ['io_size', scattered], ['norandommap', 1]], 'write',
        path.join(this.dir, 'resync-writes-4k.json'), scattered / 5e6 + 30);
      const cp4k = await checkpoint(vol);
      const before4k = await mirrorStatus(vol);
      receiver = await receive();
      const resync4k = await timeCatchUp(vol, 'resync', 2, cp4k, source, [source, receiver], before4k);
      // Client writes during a baseline: a new destination (its directory removed), 4 KiB
      // random writes begun once the baseline runs, against the same writes with the
      // receiver away (the source then forwards nothing). Before fc16614 every write
      // during a baseline waited for the whole baseline.
      await receiver.stop();
      const w4k: FioOptions = [['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 32], ['size', this.o.sizeBytes], ['norandommap', 1], ['time_based', 1], ['runtime', DURING_BASELINE_S]];
      const away = await runFio('away-4k', uri, w4k, 'write', path.join(this.dir, 'away-4k.json'), DURING_BASELINE_S + 30);
      fs.rmSync(rx, { recursive: true, force: true });
      receiver = await receive();
      const deadline = Date.now() + SYNC_TIMEOUT_MS;
      while ((await mirrorStatus(vol)).state !== 'baseline') {
        source.ensureAlive();
        if (Date.now() > deadline) throw new Error('no baseline to the new destination');
        await sleep(20);
      }
      const during = await runFio('during-baseline-4k', uri, w4k, 'write', path.join(this.dir, 'during-baseline-4k.json'), DURING_BASELINE_S + 30);
      const baseline2 = await timeCatchUp(vol, 'baseline', 2, 0, source, [source, receiver], undefined);
      await source.stop();
      await receiver.stop();
      return {
        filledBytes: filled, rewrittenBytes: rewritten, baseline, resync, scatteredBytes: scattered, resync4k, linkBytesPerS, diskBytesPerS,
        during: { awayIops: away.result.iops, duringIops: during.result.iops, runtimeS: DURING_BASELINE_S, baseline: baseline2 },
      };
    } catch (e) {
      for (const p of procs) if (!p.exited) p.child.kill('SIGKILL');
      throw new Error(`baseline/resync: ${(e as Error).message}\n  ${procs.map((p) => `${p.name}: ${p.log}`).join('\n  ')}`);
    } finally {
      fs.rmSync(vol, { recursive: true, force: true });
      fs.rmSync(rx, { recursive: true, force: true });
    }
  }

  async stall(mode: Mode, w: MWorkload): Promise<StallResult> {
    const r = await this.start(mode, 0, true);
    try {
      const leadS = 2;
      const tailS = 2;
      const runtime = leadS + this.o.stallS + tailS;
      const opts: FioOptions = w.opts.map(([k, v]) => (k === 'runtime' ? [k, runtime] : [k, v]));
      // Per-second write log, to count the writes completed while the peer was stalled.
      const logBase = path.join(this.dir, `stall-${mode}`);
      const fioOut = path.join(this.dir, `stall-${mode}.json`);
      const relay0 = await r.relay!.stats();
      const st0 = await mirrorStatus(r.vol);
      const fioP = runFio('stall', `nbd+unix:///?socket=${r.sock}`, [...opts, ['write_iops_log', logBase], ['log_avg_msec', 250], ['log_unix_epoch', 1]], 'write', fioOut, runtime + 5);
      let fioDone = false;
      let fioErr: unknown;
      const fioRun = fioP.then(
        (x) => ((fioDone = true), x),
        (e: unknown) => {
          fioDone = true;
          fioErr = e;
          return undefined;
        },
      );
      await sleep(leadS * 1000);
      if (fioDone) throw new Error(`fio ended before the stall: ${String(fioErr)}`);
      const pids = [r.source.pid, r.receiver!.pid];
      const rssBefore = pids.map((p) => procStatusKb(p, 'VmRSS'));
      const states = new Set<string>();
      const maxDuring = [...rssBefore];
      const t0 = Date.now();
      await r.relay!.set({ stall: true });
      let lastError: string | undefined;
      while (Date.now() - t0 < this.o.stallS * 1000) {
        await sleep(100);
        pids.forEach((p, i) => (maxDuring[i] = Math.max(maxDuring[i]!, procStatusKb(p, 'VmRSS'))));
        const m = await mirrorStatus(r.vol);
        states.add(m.connected ? m.state : `${m.state} (not connected)`);
        if (m.lastError) lastError = m.lastError;
      }
      const queued = (await r.relay!.stats()).queuedBytes;
      const t1 = Date.now();
      await r.relay!.set({ stall: false });
      const fio = await fioRun;
      if (fio === undefined) throw new Error(`fio failed: ${(fioErr as Error).message}`);
      const fioEnd = Date.now();
      const cp = await checkpoint(r.vol);
      const st1 = await waitInSync(r.vol, 'after the stall', cp, this.procs(r));
      const syncAfterS = (Date.now() - fioEnd) / 1000;
      const relay1 = await r.relay!.stats();
      const peak = pids.map((p) => procStatusKb(p, 'VmHWM'));
      const writesDuring = countLoggedIos(`${logBase}_iops.1.log`, t0 + 250, t1);
      await this.stop(r);
      return {
        mode,
        stallS: (t1 - t0) / 1000,
        sourcePeakRssBytes: peak[0]!,
        receiverPeakRssBytes: peak[1]!,
        sourceMaxRssDuringBytes: maxDuring[0]!,
        receiverMaxRssDuringBytes: maxDuring[1]!,
        sourceRssBeforeBytes: rssBefore[0]!,
        receiverRssBeforeBytes: rssBefore[1]!,
        relayQueuedBytes: queued,
        statesSeen: [...states],
        writesDuringStall: writesDuring,
        iops: fio.result.iops,
        syncAfterS,
        lastError,
        wireBytes: relay1.bytes.toTarget + relay1.bytes.toClient - relay0.bytes.toTarget - relay0.bytes.toClient,
        clientBytes: st1.clientBytes - st0.clientBytes,
      };
    } catch (e) {
      await this.stop(r, false);
      throw new Error(`stall (${mode}): ${(e as Error).message}\n  source log: ${r.source.log}${r.receiver ? `\n  receiver log: ${r.receiver.log}` : ''}`);
    }
  }
}

/** Sums the IOPS log (log_avg_msec windows, epoch ms) over (fromMs, toMs] into an I/O count. */
function countLoggedIos(file: string, fromMs: number, toMs: number): number {
  if (!fs.existsSync(file)) return Number.NaN;
  let ios = 0;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const f = line.split(',').map((x) => Number(x.trim()));
    if (f.length < 2 || !Number.isFinite(f[0]) || !Number.isFinite(f[1])) continue;
    // Each entry: the average IOPS over the 250 ms ending at f[0].
    if (f[0]! > fromMs && f[0]! <= toMs) ios += (f[1]! * 250) / 1000;
  }
  return Math.round(ios);
}

// ------------------------------------------------------------------ the suite

export function mirrorWorkloads(o: MirrorBenchOptions): MWorkload[] {
  const t: FioOptions = [['size', o.sizeBytes], ['time_based', 1], ['runtime', o.runtimeS]];
  return [
    { id: 'mirror-randwrite-4k-qd32', label: '4k randwrite QD32', unit: 'IOPS', bsBytes: 4096, opts: [['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 32], ['norandommap', 1], ...t] },
    { id: 'mirror-seqwrite-1m-qd8', label: '1M seq write QD8', unit: 'MB/s', bsBytes: MIB, opts: [['rw', 'write'], ['bs', '1M'], ['iodepth', 8], ...t] },
    // A database's commit pattern (DRBD protocol C's row): every write followed by a FLUSH,
    // which a sync mirror answers only once the record is durable on both hosts.
    { id: 'mirror-randwrite-4k-qd1-fsync1', label: '4k randwrite QD1 fsync=1', unit: 'IOPS', bsBytes: 4096, opts: [['rw', 'randwrite'], ['bs', '4k'], ['iodepth', 1], ['fsync', 1], ['norandommap', 1], ...t] },
  ];
}

export async function runMirrorSuite(c: BenchConfig, root: string, o: MirrorBenchOptions): Promise<MirrorReport> {
  const why = await netnsAvailable();
  if (why !== null) throw new Error(`the mirror suite needs network namespaces: ${why}`);
  const dir = path.join(c.workDir, 'mirror');
  fs.mkdirSync(dir, { recursive: true });
  const workloads = mirrorWorkloads(o).filter((w) => c.only.length === 0 || c.only.some((x) => w.id.includes(x)));
  const wantStall = c.only.length === 0 || c.only.some((x) => 'mirror-stall'.includes(x));
  const wantBaseline = o.baselineBytes > 0 && (c.only.length === 0 || c.only.some((x) => 'mirror-baseline'.includes(x)));
  const rttLabel = `${o.rttMs} ms`;
  const configs: Config[] = [
    { label: 'unmirrored', mode: 'none', delayed: false },
    { label: 'sync', mode: 'sync', delayed: false },
    { label: `sync ${rttLabel}`, mode: 'sync', delayed: true },
    { label: 'async', mode: 'async', delayed: false },
    { label: `async ${rttLabel}`, mode: 'async', delayed: true },
  ];
  const pair = await createHostPair({ prefix: 'nvb' });
  try {
    say(`  [mirror] hosts ${pair.a.ns} (${pair.a.addr}) and ${pair.b.ns} (${pair.b.addr}); measuring RTT through the relay...`);
    const rtt = await calibrateRtt(pair, o.rttMs);
    for (const l of rtt.calibration) say(`  [mirror] RTT: ${l}`);
    const bench = new MirrorBench(pair, root, dir, o);
    const samples: MirrorSample[] = [];
    for (let round = 1; round <= c.rounds; round++) {
      for (const [i, w] of workloads.entries()) {
        // Rotate the order by round and workload, as the other suites do.
        const rot = (round - 1 + i) % configs.length;
        const order = [...configs.slice(rot), ...configs.slice(0, rot)];
        const parts: string[] = [];
        const t0 = Date.now();
        for (const cfg of order) {
          const s = await bench.measure(cfg, w, round, rtt.delayMs);
          samples.push(s);
          const v = w.unit === 'IOPS' ? `${Math.round(s.iops)} IOPS` : `${s.mbps.toFixed(0)} MB/s`;
          parts.push(`${cfg.label} ${v}${s.wireBytes !== undefined ? ` wire/client ${(s.wireBytes / s.clientBytes).toFixed(2)} sync +${s.syncAfterS?.toFixed(1)} s` : ''}`);
        }
        say(`  [mirror r${round}/${c.rounds}] ${w.label}: ${parts.join('; ')} (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
      }
    }
    const stalls: StallResult[] = [];
    if (wantStall) {
      const w = mirrorWorkloads(o)[0]!;
      for (const mode of ['sync', 'async'] as const) {
        say(`  [mirror] ${mode}: peer stalled ${o.stallS} s under ${w.label}...`);
        stalls.push(await bench.stall(mode, w));
      }
    }
    let baseline: BaselineResult | undefined;
    if (wantBaseline) {
      say(`  [mirror] baseline of ${formatSize(o.baselineBytes)} and resync over the veth...`);
      baseline = await bench.baselineAndResync();
      say(`  [mirror] ${formatBaseline(baseline).join('; ').replace(/\s+/g, ' ')}`);
    }
    return {
      title: `mirror ${formatSize(o.sizeBytes)} thin, NVRAM ${formatSize(o.nvramBytes)}, --cp-interval ${o.cpIntervalMs}: unmirrored vs sync vs async, straight over the veth and through a relay at ~${rttLabel} RTT; receiver dirs ${o.rxDir === undefined ? 'on the source\'s disk' : `in ${o.rxDir}`}`,
      configs: configs.map((k) => ({
        label: k.label,
        command:
          k.mode === 'none'
            ? 'a: nvmirror serve VOL --socket S'
            : k.delayed
              ? `b: nvmirror receive RX --listen B:${PORT} --export-socket E --mirror-insecure; a: relay delayMs ${rtt.delayMs.toFixed(3)} each way (RTT p50 ${rtt.delayedMs.toFixed(2)} ms); a: nvmirror serve VOL --mirror-to RELAY --mirror-mode ${k.mode} --mirror-insecure`
              : `b: nvmirror receive RX --listen B:${PORT} --export-socket E --mirror-insecure; a: nvmirror serve VOL --mirror-to B:${PORT} --mirror-mode ${k.mode} --mirror-insecure (veth RTT p50 ${rtt.directMs.toFixed(2)} ms)`,
      })),
      workloads: workloads.map((w) => ({ id: w.id, label: w.label, unit: w.unit })),
      samples,
      rtt,
      stalls,
      ...(baseline ? { baseline } : {}),
    };
  } finally {
    await pair.destroy();
  }
}

// ------------------------------------------------------------------ output

const mib = (b: number): string => (b / MIB).toFixed(0);

/** The baseline/resync lines (MB/s are 10^6 bytes/s). */
function formatBaseline(b: BaselineResult): string[] {
  const mbs = (bytesPerS: number): string => `${(bytesPerS / 1e6).toFixed(0)} MB/s`;
  const bound = Math.min(b.linkBytesPerS, b.diskBytesPerS);
  const line = (what: string, c: CatchUp): string => {
    const r = c.dataBytes / Math.max(c.seconds, 1e-3);
    return `   ${what}: ${formatSize(c.dataBytes)} of blocks sent in ${c.seconds.toFixed(2)} s = ${mbs(r)}, ${(r / bound).toFixed(2)}x of the lower bound (target >= 0.50); ${formatSize(c.wireBytes)} on the wire`;
  };
  return [
    `   link (one TCP stream a -> b on the veth) ${mbs(b.linkBytesPerS)}; disk (1 MiB sequential writes + fdatasync, best of 3) ${mbs(b.diskBytesPerS)}; lower bound ${mbs(bound)}`,
    line(`baseline of ${formatSize(b.filledBytes)} written`, b.baseline),
    line(`resync after ${formatSize(b.rewrittenBytes)} of 1 MiB random writes while the receiver was down`, b.resync),
    line(`resync after ${formatSize(b.scatteredBytes)} of 4 KiB random writes over the whole volume`, b.resync4k),
    `   4k randwrite QD32 for ${b.during.runtimeS} s during a baseline: ${b.during.duringIops.toFixed(0)} IOPS against ${b.during.awayIops.toFixed(0)} with the receiver away (${(b.during.duringIops / Math.max(1, b.during.awayIops)).toFixed(2)}x); that baseline ${formatSize(b.during.baseline.dataBytes)} in ${b.during.baseline.seconds.toFixed(2)} s`,
  ];
}

export function formatMirror(rep: MirrorReport, roundsNote: string): string {
  const labels = rep.configs.map((k) => k.label);
  const rows: Array<[string, string, string[]]> = [];
  const med = (w: string, k: string, f: (s: MirrorSample) => number | undefined): number | undefined => {
    const xs = rep.samples.filter((s) => s.workload === w && s.config === k).map(f).filter((x): x is number => x !== undefined && Number.isFinite(x));
    return xs.length > 0 ? median(xs) : undefined;
  };
  const cell = (v: number | undefined, digits: number): string => (v === undefined ? '-' : v.toFixed(digits));
  for (const w of rep.workloads) {
    const thr = (s: MirrorSample): number => (w.unit === 'IOPS' ? s.iops : s.mbps);
    rows.push([w.label, w.unit, labels.map((k) => cell(med(w.id, k, thr), 0))]);
    // Ratio vs unmirrored: ratio of medians, and the range of per-round ratios.
    rows.push([w.label, `${w.unit} vs unmirrored`, labels.map((k) => {
      const a = med(w.id, k, thr);
      const b = med(w.id, 'unmirrored', thr);
      if (a === undefined || b === undefined) return '-';
      if (k === 'unmirrored') return '1.00';
      const per: number[] = [];
      for (const s of rep.samples.filter((x) => x.workload === w.id && x.config === k)) {
        const u = rep.samples.find((x) => x.workload === w.id && x.config === 'unmirrored' && x.round === s.round);
        if (u) per.push(thr(s) / thr(u));
      }
      const range = per.length > 1 ? ` ${Math.min(...per).toFixed(2)}-${Math.max(...per).toFixed(2)}` : '';
      return `${(a / b).toFixed(2)}${range}`;
    })]);
    rows.push([w.label, 'p50 clat us (lower)', labels.map((k) => cell(med(w.id, k, (s) => s.p50Us), 0))]);
    rows.push([w.label, 'p99 clat us (lower)', labels.map((k) => cell(med(w.id, k, (s) => s.p99Us), 0))]);
    rows.push([w.label, 'wire/client bytes (kernel)', labels.map((k) => cell(med(w.id, k, (s) => (s.wireBytes === undefined ? undefined : s.wireBytes / s.clientBytes)), 3))]);
    rows.push([w.label, 'wire/client bytes (relay)', labels.map((k) => cell(med(w.id, k, (s) => (s.relayBytes === undefined ? undefined : s.relayBytes / s.clientBytes)), 3))]);
    rows.push([w.label, 'wire/client (nvmirror count)', labels.map((k) => cell(med(w.id, k, (s) => (s.nvmWireBytes === undefined ? undefined : s.nvmWireBytes / s.clientBytes)), 3))]);
    rows.push([w.label, 'client GiB written', labels.map((k) => cell(med(w.id, k, (s) => s.clientBytes / 1024 / MIB), 2))]);
    rows.push([w.label, 'in sync after fio s', labels.map((k) => cell(med(w.id, k, (s) => s.syncAfterS), 1))]);
    rows.push([w.label, 'CPU % source', labels.map((k) => cell(med(w.id, k, (s) => s.sourceCpuPct), 0))]);
    rows.push([w.label, 'CPU % receiver', labels.map((k) => cell(med(w.id, k, (s) => s.receiverCpuPct), 0))]);
    rows.push([w.label, 'CPU % relay', labels.map((k) => cell(med(w.id, k, (s) => s.relayCpuPct), 0))]);
    rows.push([w.label, 'source peak RSS MiB', labels.map((k) => cell(med(w.id, k, (s) => s.sourceRssBytes / MIB), 0))]);
    rows.push([w.label, 'receiver peak RSS MiB', labels.map((k) => cell(med(w.id, k, (s) => (s.receiverRssBytes === undefined ? undefined : s.receiverRssBytes / MIB)), 0))]);
  }
  const wW = Math.max(8, ...rows.map((r) => r[0].length));
  const mW = Math.max(6, ...rows.map((r) => r[1].length));
  const vW = labels.map((k, i) => Math.max(9, k.length, ...rows.map((r) => (r[2][i] ?? '').length)));
  const lines: string[] = [`== ${rep.title} (${roundsNote}) ==`];
  for (const k of rep.configs) lines.push(`   ${k.label}: ${k.command}`);
  lines.push([`workload`.padEnd(wW), 'metric'.padEnd(mW), ...labels.map((k, i) => k.padStart(vW[i]!))].join('  '));
  for (const [w, m, vs] of rows) lines.push([w.padEnd(wW), m.padEnd(mW), ...vs.map((v, i) => v.padStart(vW[i]!))].join('  '));
  lines.push('   vs unmirrored: ratio of medians (then min-max of per-round ratios), < 1.00 means mirroring cost throughput.');
  lines.push('   wire/client (kernel): payload bytes of the mirror connection, both directions, retransmissions included (tcp_info at the receiver, read with ss) / bytes fio wrote,');
  lines.push('   from in-sync after the baseline to in-sync with equal roots after fio (a CP asked for at the end); (relay): the relay\'s count of the same window (delayed runs only);');
  lines.push("   (nvmirror count): the source's own bytesOnWire over the same window / bytes fio wrote. CPU %: of one core, during fio (2 cores in all, fio included).");
  lines.push(`   RTT through the relay: ${rep.rtt.calibration.join('; ')}.`);
  if (rep.baseline) {
    lines.push('', `== mirror: baseline and resync, sync mode, straight over the veth (timed by the source: first block to the commit's ack) ==`, ...formatBaseline(rep.baseline));
  }
  if (rep.stalls.length > 0) {
    lines.push('', `== mirror: peer stalled (relay stops reading both ways) under 4k randwrite QD32 ==`);
    for (const s of rep.stalls) {
      lines.push(
        `   ${s.mode}: stalled ${s.stallS.toFixed(1)} s; peak RSS (VmHWM) source ${mib(s.sourcePeakRssBytes)} MiB, receiver ${mib(s.receiverPeakRssBytes)} MiB; ` +
          `VmRSS before -> max during the stall: source ${mib(s.sourceRssBeforeBytes)} -> ${mib(s.sourceMaxRssDuringBytes)} MiB, receiver ${mib(s.receiverRssBeforeBytes)} -> ${mib(s.receiverMaxRssDuringBytes)} MiB`,
        `      ${s.writesDuringStall} writes completed during the stall; ${Math.round(s.iops)} IOPS over the whole run; relay held ${formatSize(s.relayQueuedBytes)}; states seen: ${s.statesSeen.join(', ')}; ` +
          `in sync ${s.syncAfterS.toFixed(1)} s after fio; wire/client bytes ${(s.wireBytes / Math.max(1, s.clientBytes)).toFixed(3)} (relay count, catch-up included)` +
          `${s.lastError ? `; last error: ${s.lastError}` : ''}`,
      );
    }
  }
  return lines.join('\n');
}
