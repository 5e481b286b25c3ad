/**
 * `npm run bench`: fio's nbd engine against nvmirror and a peer server (nbdkit) in the
 * same run, alternating between them inside each round, over Unix sockets, same sizes.
 * Prints a table of medians and ratios; --json / BENCH_JSON for machines.
 *
 * Invariants:
 * - Every measurement starts a fresh server with the same starting state (memory: empty;
 *   file: the suite's one fully written image, flushed and dropped from the page cache;
 *   engine: a new volume directory) and stops it cleanly; any server or fio failure
 *   aborts the run with a non-zero exit and no table: numbers are never invented.
 * - In round r, workload i, the servers run in an order rotated by (r + i), so no server
 *   is always first (or always right after the other's page-cache churn).
 * - At most one server and one fio process run at a time.
 * - The scratch directory is removed at the end (unless BENCH_KEEP=1), also on failure.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { BenchConfig, defaultWorkDirParent, loadConfig, SuiteName, USAGE } from './config';
import { runFio } from './fio';
import { buildRows, formatTable, Sample, SuiteReport } from './report';
import { CpLatencyResult, measureCpLatency, measureRss, RssResult } from './engine-extras';
import { formatMirror, MirrorReport, mirrorWorkloads, runMirrorSuite } from './mirror';
import { formatParity, ParityReport, runParitySuite } from './parity';
import { formatRaidExtras, fullStripeNote, measureRebuild, type FullStripeNote, type RebuildBench } from './raid-rebuild';
import {
  engineAvailable,
  nbdkitFile,
  nbdkitMemory,
  nvmirrorEngine,
  nvmirrorFile,
  nvmirrorMemory,
  RunningServer,
  ServerSpec,
  snapshotBuild,
  streamPath,
} from './servers';
import { baseWorkloads, engineWorkloads, filterWorkloads, prefillOptions, WARMUP_SETTLE_MS, Workload } from './workloads';
import { formatSize } from '../../src/util/size';

/** Per-measurement overhead beyond fio's own runtime (server start/stop, image setup), for the estimate. */
const OVERHEAD_S = 1.5;

interface Suite {
  name: SuiteName;
  title: string;
  servers: ServerSpec[];
  reference: string;
  sizeBytes: number;
  workloads: Workload[];
}

let current: RunningServer | undefined;
/** BENCH_VERBOSE=1: print where each measurement's time went. */
const verbose = process.env.BENCH_VERBOSE === '1';
/** Scratch directory to remove on exit (empty when kept or not ours). */
let scratchToRemove = '';

function say(line: string): void {
  process.stderr.write(line + '\n');
}

function tool(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim().split('\n')[0] ?? '';
  } catch {
    throw new Error(`${cmd} is not installed (needed by the benchmark; see scripts/install-test-deps.sh)`);
  }
}

function buildSuites(c: BenchConfig, root: string, withEngine: boolean): Suite[] {
  const t = c.nbdkitThreads;
  const suites: Suite[] = [];
  for (const name of c.suites) {
    if (name === 'memory') {
      suites.push({
        name,
        title: `memory ${formatSize(c.sizeBytes)}: nvmirror serve --memory vs nbdkit memory`,
        servers: [nvmirrorMemory(root, c.sizeBytes), ...(c.streamToo ? [streamPath(nvmirrorMemory(root, c.sizeBytes))] : []), nbdkitMemory(c.sizeBytes, t)],
        reference: 'nbdkit',
        sizeBytes: c.sizeBytes,
        workloads: filterWorkloads(baseWorkloads(c, c.sizeBytes), c.only),
      });
    } else if (name === 'file') {
      suites.push({
        name,
        title: `file ${formatSize(c.sizeBytes)} (written image on ${fsType(c.workDir)}): nvmirror serve --file vs nbdkit file`,
        servers: [nvmirrorFile(root, c.sizeBytes), ...(c.streamToo ? [streamPath(nvmirrorFile(root, c.sizeBytes))] : []), nbdkitFile(c.sizeBytes, t)],
        reference: 'nbdkit',
        sizeBytes: c.sizeBytes,
        workloads: filterWorkloads(baseWorkloads(c, c.sizeBytes), c.only),
      });
    } else if (name === 'raid' && withEngine) {
      const eng = { sizeBytes: c.engineSizeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs };
      const raid = (level: number, n: number): string[] => ['--raid', String(level), ...Array.from({ length: n }, (_, i) => ['--member', `m${i}.img`]).flat()];
      const keep = ['engine-seqwrite-1m', 'engine-seqread-1m', 'engine-sustained-randwrite-4k'];
      suites.push({
        name,
        title: `raid ${formatSize(c.engineSizeBytes)}, NVRAM ${formatSize(c.nvramBytes)}: engine volume on 1 member vs RAID-0 x4, RAID-5 x4, RAID-6 x6 (stripe unit 64 KiB, members on one disk)`,
        servers: [
          nvmirrorEngine(root, eng, 'single', 'nvm-single'),
          nvmirrorEngine(root, { ...eng, createArgs: raid(0, 4) }, 'raid0x4', 'nvm-raid0'),
          nvmirrorEngine(root, { ...eng, createArgs: raid(5, 4) }, 'raid5x4', 'nvm-raid5'),
          nvmirrorEngine(root, { ...eng, createArgs: raid(6, 6) }, 'raid6x6', 'nvm-raid6'),
        ],
        reference: 'single',
        sizeBytes: c.engineSizeBytes,
        workloads: filterWorkloads(engineWorkloads(c, c.engineSizeBytes).filter((w) => keep.some((k) => w.id.startsWith(k))), c.only),
      });
    } else if (name === 'engine' && withEngine) {
      const eng = { sizeBytes: c.engineSizeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs };
      suites.push({
        name,
        title: `engine ${formatSize(c.engineSizeBytes)}, NVRAM ${formatSize(c.nvramBytes)}: engine volume vs nvmirror --file vs nbdkit file`,
        servers: [nvmirrorEngine(root, eng), nvmirrorFile(root, c.engineSizeBytes, 'nvm-file'), nbdkitFile(c.engineSizeBytes, t, 'nbdkit-file')],
        reference: 'nbdkit-file',
        sizeBytes: c.engineSizeBytes,
        workloads: filterWorkloads(engineWorkloads(c, c.engineSizeBytes), c.only),
      });
    }
  }
  return suites.filter((s) => s.workloads.length > 0);
}

function fsType(dir: string): string {
  try {
    return execFileSync('findmnt', ['-n', '-o', 'FSTYPE', '-T', dir], { encoding: 'utf8' }).trim();
  } catch {
    return 'unknown fs';
  }
}

async function measure(c: BenchConfig, suite: Suite, w: Workload, spec: ServerSpec, round: number): Promise<Sample> {
  const dir = path.join(c.workDir, suite.name);
  fs.mkdirSync(dir, { recursive: true });
  const phases: Array<[string, number]> = [['begin', Date.now()]];
  const where = `${suite.name} / ${w.label} / ${spec.label} (round ${round})`;
  let server: RunningServer;
  try {
    // Every run starts with nothing dirty in the page cache: a server that never syncs
    // (nbdkit's file plugin, nvmirror --file) leaves GBs being written back while the
    // next one runs, which that one's rows would pay for.
    execFileSync('sync', [], { timeout: 600_000 });
    phases.push(['sync', Date.now()]);
    await spec.prepare(dir);
    phases.push(['prepare', Date.now()]);
    server = await RunningServer.start(spec, dir, path.join(dir, `${spec.id}.sock`));
  } catch (e) {
    throw new Error(`${where}: ${(e as Error).message}`);
  }
  phases.push(['start', Date.now()]);
  current = server;
  const tag = `${suite.name}-${w.id}-${spec.id}-r${round}`;
  let sample: Sample;
  try {
    if (w.prefill) await runFio(`prefill`, server.uri, prefillOptions(suite.sizeBytes), 'write', path.join(dir, `${tag}.prefill.json`), suite.sizeBytes / 50e6 + 10);
    phases.push(['prefill', Date.now()]);
    if (w.warmup) {
      await runFio(`warmup`, server.uri, w.opts, w.dir, path.join(dir, `${tag}.warmup.json`), w.expectedS);
      await new Promise((r) => setTimeout(r, WARMUP_SETTLE_MS));
      phases.push(['warmup', Date.now()]);
    }
    // Server CPU over the measured window: sample once the ramp is over, and at the end.
    const timeBased = w.opts.some(([k]) => k === 'time_based');
    let cpuStart: number | undefined;
    let cpuTimer: NodeJS.Timeout | undefined;
    if (timeBased && c.rampS > 0) cpuTimer = setTimeout(() => (cpuStart = server.alive ? server.cpuSeconds() : undefined), c.rampS * 1000);
    else cpuStart = server.cpuSeconds();
    const run = await runFio(w.id, server.uri, w.opts, w.dir, path.join(dir, `${tag}.json`), w.expectedS);
    phases.push(['fio', Date.now()]);
    if (cpuTimer) clearTimeout(cpuTimer);
    const cpuEnd = server.cpuSeconds();
    const measuredIos = run.result.ios + run.result.syncs;
    const values: Record<string, number> = {};
    for (const m of w.metrics) values[m.id] = m.get(run.result);
    sample = {
      round,
      server: spec.label,
      workload: w.id,
      values,
      // The CPU window starts when the ramp ends (give or take fio's start-up, ~1%).
      cpuUsPerIo: cpuStart === undefined || measuredIos === 0 ? undefined : ((cpuEnd - cpuStart) * 1e6) / measuredIos,
      peakRssBytes: server.peakRssBytes(),
      fioArgv: run.argv,
    };
  } catch (e) {
    await server.kill();
    current = undefined;
    throw new Error(`${where}: ${(e as Error).message}\n  server log: ${server.stderr.trim().split('\n').slice(-3).map((l) => l.slice(0, 300)).join(' | ') || '(empty)'}`);
  }
  try {
    await server.stop();
  } catch (e) {
    current = undefined;
    throw new Error(`${where}: ${(e as Error).message}`);
  }
  phases.push(['stop', Date.now()]);
  current = undefined;
  await spec.cleanup(dir);
  phases.push(['cleanup', Date.now()]);
  if (verbose) say(`    ${tag}: ${phases.slice(1).map(([k, t], i) => `${k} ${t - (phases[i] as [string, number])[1]} ms`).join(', ')}`);
  return sample;
}

async function runSuite(c: BenchConfig, suite: Suite): Promise<SuiteReport> {
  const samples: Sample[] = [];
  const n = suite.servers.length;
  for (let round = 1; round <= c.rounds; round++) {
    for (const [i, w] of suite.workloads.entries()) {
      const rot = (round - 1 + i) % n;
      const order = [...suite.servers.slice(rot), ...suite.servers.slice(0, rot)];
      const parts: string[] = [];
      const t0 = Date.now();
      for (const spec of order) {
        const s = await measure(c, suite, w, spec, round);
        samples.push(s);
        parts.push(`${spec.label} ${Object.entries(s.values).map(([k, v]) => `${k}=${v.toFixed(k === 'iops' ? 0 : 1)}`).join(' ')}`);
      }
      say(`  [${suite.name} r${round}/${c.rounds}] ${w.label}: ${parts.join('; ')} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    }
  }
  const labels = suite.servers.map((s) => s.label);
  return {
    name: suite.name,
    title: suite.title,
    servers: suite.servers.map((s) => ({ label: s.label, command: s.describe })),
    reference: suite.reference,
    rows: buildRows(suite.workloads, labels, suite.reference, samples),
    samples,
  };
}

function estimateS(c: BenchConfig, suites: Suite[], withEngine: boolean): number {
  let s = 0;
  for (const su of suites) {
    for (const w of su.workloads) {
      const prefill = w.prefill ? su.sizeBytes / 500e6 + 0.5 : 0;
      const warmup = w.warmup ? w.expectedS + WARMUP_SETTLE_MS / 1000 : 0;
      s += c.rounds * su.servers.length * (w.expectedS + OVERHEAD_S + prefill + warmup);
    }
  }
  if (withEngine && c.suites.includes('engine')) s += c.cpLatencyRuntimeS + 5 + c.sustainedBytes / 4096 / 10_000 + 5;
  if (c.suites.includes('parity')) s += 20;
  if (withEngine && c.suites.includes('raid')) s += 30 + (c.raidRebuildFillBytes / 100e6) * 2;
  if (c.suites.includes('mirror')) {
    // 5 configurations per workload: fio, start-up and the wait for the final in-sync point; RTT calibration; 2 stall runs.
    s += c.rounds * mirrorWorkloads(c.mirror).length * 5 * (c.mirror.runtimeS + 8) + 40 + 2 * (c.mirror.stallS + 15);
    // The baseline run: the fill, the baseline, the rewrite and the resync (~100-500 MB/s each), start-ups.
    s += c.mirror.baselineBytes > 0 ? (c.mirror.baselineBytes * 2.5) / 100e6 + 30 : 0;
  }
  return s;
}

async function main(): Promise<number> {
  const loaded = loadConfig(process.argv.slice(2));
  if (loaded === 'help') {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const c = loaded;
  const wantMirror = c.suites.includes('mirror');
  const wantParity = c.suites.includes('parity');
  if (wantMirror && process.getuid?.() !== 0) throw new Error('the mirror suite needs root (network namespaces): run it as root, or leave mirror out of BENCH_SUITES');
  const distMain = path.join(c.repoRoot, 'dist', 'src', 'cli', 'main.js');
  if (!fs.existsSync(distMain)) throw new Error(`${distMain} is missing: run npm run build first`);
  const versions = { fio: tool('fio', ['--version']), nbdkit: tool('nbdkit', ['--version']), node: process.version };
  tool('fallocate', ['--version']);

  const ownDir = c.workDir === '';
  c.workDir = ownDir ? fs.mkdtempSync(path.join(defaultWorkDirParent(), 'nvmirror-bench-')) : c.workDir;
  fs.mkdirSync(c.workDir, { recursive: true });
  if (ownDir && !c.keepWorkDir) scratchToRemove = c.workDir;
  // Every server of this run uses one frozen copy of the build (see snapshotBuild).
  const root = snapshotBuild(c.repoRoot, path.join(c.workDir, 'build-snapshot'));

  let withEngine = false;
  if ((c.suites.includes('engine') || c.suites.includes('raid')) && c.engine !== 'off') {
    withEngine = engineAvailable(root);
    if (!withEngine && (c.engine === 'on' || process.env.BENCH_SUITES?.includes('engine') || c.suites.includes('raid'))) {
      throw new Error('the engine suite was asked for but this nvmirror has no `create` command yet');
    }
  }

  const suites = buildSuites(c, root, withEngine);
  const wantCpLatency = withEngine && c.suites.includes('engine') && (c.only.length === 0 || c.only.some((o) => 'cp-latency'.includes(o)));
  const wantRss = withEngine && c.suites.includes('engine') && (c.only.length === 0 || c.only.some((o) => 'rss'.includes(o)));
  if (suites.length === 0 && !wantCpLatency && !wantRss && !wantMirror && !wantParity) throw new Error('no workload selected (check BENCH_SUITES / BENCH_ONLY)');
  let gitRev = 'unknown';
  try {
    gitRev = execFileSync('git', ['-C', c.repoRoot, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
  } catch {
    /* not a git checkout */
  }
  const roundsNote = `median of ${c.rounds} round${c.rounds > 1 ? 's' : ''}, ${c.runtimeS} s runs${c.rampS > 0 ? ` after ${c.rampS} s ramp` : ''}`;
  say(`nvmirror bench: ${[...(wantParity ? ['parity'] : []), ...suites.map((s) => s.name), ...(wantMirror ? ['mirror'] : [])].join(', ')}${c.suites.includes('engine') && !withEngine ? ' (engine suite skipped: no `nvmirror create` yet)' : ''}; ${suites.length > 0 ? roundsNote : mirrorRoundsNote(c)}; ` +
    `about ${Math.ceil(estimateS(c, suites, withEngine) / 60)} min; ${os.cpus().length} CPUs; ${versions.fio}, ${versions.nbdkit}, node ${versions.node}; scratch ${c.workDir}`);

  const started = Date.now();
  const loadStart = os.loadavg()[0] ?? 0;
  const reports: SuiteReport[] = [];
  let cpLatency: CpLatencyResult | undefined;
  let rss: RssResult | undefined;
  let mirror: MirrorReport | undefined;
  let parityReport: ParityReport | undefined;
  let raidFullStripe: FullStripeNote | undefined;
  let raidRebuild: RebuildBench | undefined;
  try {
    if (wantParity) {
      parityReport = runParitySuite(say);
      say('\n' + formatParity(parityReport) + '\n');
    }
    for (const suite of suites) {
      const rep = await runSuite(c, suite);
      reports.push(rep);
      say('\n' + formatTable(rep, roundsNote) + '\n');
      if (suite.name === 'raid') {
        raidFullStripe = fullStripeNote(rep);
        raidRebuild = await measureRebuild(root, c.workDir, c.raidRebuildFillBytes, c.nvramBytes, c.rounds, say);
        say('\n' + formatRaidExtras(raidFullStripe, raidRebuild) + '\n');
      }
    }
    if (wantCpLatency) {
      const dir = path.join(c.workDir, 'engine-extras');
      fs.mkdirSync(dir, { recursive: true });
      const eng = nvmirrorEngine(root, { sizeBytes: c.engineSizeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs });
      say(`  [engine] 4k randwrite QD1 for ${c.cpLatencyRuntimeS} s, p99 during vs outside CPs...`);
      cpLatency = await measureCpLatency(eng, dir, c.cpLatencyRuntimeS, c.engineSizeBytes);
    }
    if (wantRss) {
      const dir = path.join(c.workDir, 'engine-extras');
      fs.mkdirSync(dir, { recursive: true });
      const eng = nvmirrorEngine(root, { sizeBytes: c.rssVolumeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs }, 'engine', 'engine-rss');
      say(`  [engine] peak RSS: ${formatSize(c.sustainedBytes)} of 4k random writes over a ${formatSize(c.rssVolumeBytes)} thin volume...`);
      rss = await measureRss(eng, dir, c.rssVolumeBytes, c.sustainedBytes, 600);
    }
    if (wantMirror) {
      say(`  [mirror] ${formatSize(c.mirror.sizeBytes)} thin volumes, NVRAM ${formatSize(c.mirror.nvramBytes)}, ${c.mirror.runtimeS} s fio runs...`);
      mirror = await runMirrorSuite(c, root, c.mirror);
      say('\n' + formatMirror(mirror, mirrorRoundsNote(c)) + '\n');
    }
  } finally {
    if (current) await current.kill();
    removeScratch();
  }

  // Final summary on stdout: all tables (stderr carried the progress).
  const out: string[] = [];
  const loadEnd = os.loadavg()[0] ?? 0;
  out.push(`nvmirror ${gitRev}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), ${versions.fio}, ${versions.nbdkit}, node ${versions.node}; took ${Math.round((Date.now() - started) / 1000)} s; load average ${loadStart.toFixed(1)} at start, ${loadEnd.toFixed(1)} at end`);
  if (parityReport) out.push('', formatParity(parityReport));
  for (const r of reports) out.push('', formatTable(r, roundsNote));
  if (raidFullStripe || raidRebuild) out.push('', formatRaidExtras(raidFullStripe, raidRebuild));
  if (cpLatency) {
    out.push('', '== engine: 4k randwrite QD1 p99 completion latency during vs outside CPs (target: during <= 3x outside) ==');
    if (cpLatency.ratio !== undefined) {
      out.push(`   CPs seen: ${cpLatency.cpCount}${cpLatency.cpsMissed > 0 ? ` (+${cpLatency.cpsMissed} too short to catch)` : ''}, median ${cpLatency.cpDurationMsMedian?.toFixed(0)} ms; p99 outside ${cpLatency.p99OutsideUs?.toFixed(0)} us (${cpLatency.samplesOutside} I/Os), during ${cpLatency.p99DuringUs?.toFixed(0)} us (${cpLatency.samplesDuring} I/Os); during/outside = ${cpLatency.ratio.toFixed(2)}`);
    } else {
      out.push(`   n/a: ${cpLatency.note}`);
    }
  }
  if (rss) {
    out.push('', `== engine: peak RSS (VmHWM) under the sustained run (target < 384 MiB on 1 TiB) ==`);
    out.push(`   ${formatSize(rss.volumeBytes)} thin volume, ${formatSize(rss.writtenBytes)} of 4k random writes at QD32 (${Math.round(rss.iops)} IOPS): peak RSS ${(rss.peakRssBytes / 1024 / 1024).toFixed(0)} MiB`);
  }
  if (mirror) out.push('', formatMirror(mirror, mirrorRoundsNote(c)));
  // With --json, stdout carries only the JSON document; the tables go to stderr.
  if (c.jsonToStdout) say(out.join('\n'));
  else process.stdout.write(out.join('\n') + '\n');

  const json = {
    gitRev,
    date: new Date().toISOString(),
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, totalMemBytes: os.totalmem(), loadAvgStart: loadStart, loadAvgEnd: loadEnd },
    tookS: Math.round((Date.now() - started) / 1000),
    versions,
    config: { rounds: c.rounds, runtimeS: c.runtimeS, rampS: c.rampS, quick: c.quick, sizeBytes: c.sizeBytes, engineSizeBytes: c.engineSizeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs },
    suites: reports,
    engineCpLatency: cpLatency ?? null,
    engineRss: rss ?? null,
    mirror: mirror ?? null,
    parity: parityReport ?? null,
    raidFullStripe: raidFullStripe ?? null,
    raidRebuild: raidRebuild ?? null,
  };
  const text = JSON.stringify(json, null, 2);
  if (c.jsonPath) fs.writeFileSync(c.jsonPath, text + '\n');
  if (c.jsonToStdout) process.stdout.write(text + '\n');
  return 0;
}

function mirrorRoundsNote(c: BenchConfig): string {
  return `median of ${c.rounds} round${c.rounds > 1 ? 's' : ''}, ${c.mirror.runtimeS} s runs, no ramp`;
}

function removeScratch(): void {
  if (scratchToRemove !== '') fs.rmSync(scratchToRemove, { recursive: true, force: true });
  scratchToRemove = '';
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    say(`bench: ${sig}, stopping`);
    const cur = current;
    void (cur ? cur.kill() : Promise.resolve()).finally(() => {
      removeScratch();
      process.exit(130);
    });
  });
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    say(`bench FAILED: ${e instanceof Error ? e.message : String(e)}`);
    removeScratch();
    process.exit(1);
  },
);
