/**
 * Benchmark configuration, read once from the environment (and argv) at start-up.
 * Every knob is validated at the edge with a one-line error; nothing downstream
 * re-parses the environment.
 *
 * Invariants:
 * - runtimeS >= 1, 0 <= rampS, 1 <= rounds <= ROUNDS_MAX; sizes are whole MiB > 0.
 * - burstBytes < nvramBytes / 2 (a burst fits in one NVRAM half, so it never has to wait
 *   for a CP), sustainedBytes === 4 * nvramBytes (issue 4).
 * - Every suite named in `suites` is one of SUITES.
 */
import * as os from 'os';
import * as path from 'path';
import { parseSize } from '../../src/util/size';
import type { MirrorBenchOptions } from './mirror';

export const SUITES = ['memory', 'file', 'engine', 'mirror', 'parity', 'raid'] as const;
/** Suites run when BENCH_SUITES is not set ('mirror' needs root and two namespaces: only when named). */
export const DEFAULT_SUITES: readonly SuiteName[] = ['parity', 'memory', 'file', 'engine'];
export type SuiteName = (typeof SUITES)[number];
const ROUNDS_MAX = 50;
const MIB = 1024 * 1024;

export interface BenchConfig {
  rounds: number;
  runtimeS: number;
  rampS: number;
  quick: boolean;
  /** Suites to run, in order. 'engine' only when the engine is enabled. */
  suites: SuiteName[];
  /** 'auto' runs the engine suite when `nvmirror create` exists. */
  engine: 'auto' | 'on' | 'off';
  /** Volume size (and the random I/O range) for the memory and file suites. */
  sizeBytes: number;
  /** Engine suite: volume / image size (the random I/O range). */
  engineSizeBytes: number;
  nvramBytes: number;
  burstBytes: number;
  sustainedBytes: number;
  /** Thin volume size for the engine's peak-RSS run. */
  rssVolumeBytes: number;
  /** Engine CP interval for the engine suite (ms). */
  cpIntervalMs: number;
  /** QD1 write run used to compare p99 during vs outside CPs (seconds). */
  cpLatencyRuntimeS: number;
  /** Scratch directory: sockets, image files, volume dirs, fio outputs. Removed at the end unless kept. */
  workDir: string;
  keepWorkDir: boolean;
  jsonPath: string | undefined;
  jsonToStdout: boolean;
  /** Optional substring filter on workload ids (BENCH_ONLY=randwrite,seq). */
  only: string[];
  repoRoot: string;
  nbdkitThreads: number | undefined;
  /** BENCH_STREAM=1: memory and file suites also run nvmirror on the stream data path (NVMIRROR_NBD_NATIVE=0), same rounds. */
  streamToo: boolean;
  /** The raid suite's rebuild run: live data written before a member is replaced. */
  raidRebuildFillBytes: number;
  /** The mirror suite (BENCH_SUITES=mirror): see scripts/bench/mirror.ts. */
  mirror: MirrorBenchOptions;
}

function envInt(name: string, def: number, min: number, max: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) throw new Error(`${name} must be an integer from ${min} to ${max}, got "${raw}"`);
  return n;
}

function envNumber(name: string, def: number, min: number, max: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min || n > max) throw new Error(`${name} must be a number from ${min} to ${max}, got "${raw}"`);
  return n;
}

function envSize(name: string, def: string): number {
  const raw = process.env[name];
  const text = raw === undefined || raw === '' ? def : raw;
  let n: number;
  try {
    n = parseSize(text);
  } catch (e) {
    throw new Error(`${name}: ${(e as Error).message}`);
  }
  if (n <= 0 || n % MIB !== 0) throw new Error(`${name} must be a positive whole number of MiB, got "${text}"`);
  return n;
}

function envBool(name: string): boolean {
  const raw = process.env[name];
  if (raw === undefined || raw === '' || raw === '0' || raw.toLowerCase() === 'false') return false;
  if (raw === '1' || raw.toLowerCase() === 'true') return true;
  throw new Error(`${name} must be 0 or 1, got "${raw}"`);
}

export const USAGE = `usage: npm run bench [-- --json] [-- --help]
environment:
  BENCH_ROUNDS=N         rounds, servers alternate inside each (default 3; quick 1)
  BENCH_RUNTIME=S        seconds measured per fio run (default 4; quick 1)
  BENCH_RAMP=S           fio ramp_time seconds, not measured (default 1; quick 0)
  BENCH_QUICK=1          ~1-minute smoke run (1 round, 1 s runs, small sizes; the engine
                         suite only with BENCH_ENGINE=1, then ~2.5 minutes)
  BENCH_SUITES=a,b       suites: parity,memory,file,engine,mirror,raid (default: parity,memory,file,engine;
                         parity: RAID parity MB/s vs ISA-L, needs libisal-dev; raid: engine volumes on
                         1 member vs RAID-0 x4, RAID-5 x4, RAID-6 x6, member files on the same disk;
                         then RAID-5 full-stripe vs RAID-0 writes, and a rebuild vs the disk's bandwidth)
  BENCH_RAID_REBUILD_FILL=2G  raid suite: live data in the volume whose member is rebuilt (quick 256M)
  BENCH_ENGINE=auto|1|0  engine suite: auto = when 'nvmirror create' exists (default auto;
                         default 0 with BENCH_QUICK)
  BENCH_SIZE=1G          volume size for the memory and file suites (quick 256M)
  BENCH_ENGINE_SIZE=2G   engine suite volume/image size (quick 512M)
  BENCH_NVRAM_SIZE=64M   engine NVRAM size, the engine's default (burst = 40% of it,
                         sustained = 4x; quick 32M)
  BENCH_RSS_SIZE=1T      thin volume size for the engine peak-RSS run (issue target: < 384 MiB at 1 TiB)
  BENCH_CP_INTERVAL=1000 engine --cp-interval (ms) in the engine suite
  BENCH_ONLY=a,b         only workloads whose id contains one of these substrings
  BENCH_JSON=PATH        also write the results as JSON to PATH (--json: to stdout)
  BENCH_DIR=PATH         scratch directory (default: a fresh one under $TMPDIR)
  BENCH_KEEP=1           keep the scratch directory (fio outputs, images)
  BENCH_VERBOSE=1        print where each measurement's time went
  BENCH_NBDKIT_THREADS=N nbdkit -t N (default: nbdkit's own default)
  BENCH_STREAM=1         memory/file suites: also nvmirror on the stream data path (nvm-stream)
mirror suite (only when named: BENCH_SUITES=mirror; needs root for network namespaces):
  BENCH_MIRROR_SIZE=16G      thin volume size (the random write range)
  BENCH_MIRROR_NVRAM=32M     NVRAM size of the mirrored volume
  BENCH_MIRROR_RUNTIME=S     seconds per fio run, no ramp (default 10; quick 3)
  BENCH_MIRROR_RTT_MS=1      median RTT through the relay in the delayed runs (delayMs is calibrated to it)
  BENCH_MIRROR_STALL=S       seconds the peer is stalled in the stall run (default 5; quick 3)
  BENCH_MIRROR_BASELINE=2G   live data of the baseline/resync run (quick 256M; 0: no such run)
  BENCH_MIRROR_RX_DIR=PATH   the receiver's directories there, e.g. /dev/shm (default: the scratch
                             directory, i.e. the same disk as the source: every mirrored byte is written twice)
  (BENCH_ROUNDS, BENCH_CP_INTERVAL and BENCH_ONLY apply; the stall run's id is mirror-stall, the baseline run's mirror-baseline)`;

export function loadConfig(argv: string[]): BenchConfig | 'help' {
  let jsonToStdout = false;
  for (const a of argv) {
    if (a === '--help' || a === '-h') return 'help';
    else if (a === '--json') jsonToStdout = true;
    else throw new Error(`unknown argument "${a}" (see --help)`);
  }
  const quick = envBool('BENCH_QUICK');
  const rounds = envInt('BENCH_ROUNDS', quick ? 1 : 3, 1, ROUNDS_MAX);
  const runtimeS = envInt('BENCH_RUNTIME', quick ? 1 : 4, 1, 3600);
  const rampS = envNumber('BENCH_RAMP', quick ? 0 : 1, 0, 600);
  // The quick smoke run stays about a minute: the engine suite only when asked for.
  const engineRaw = (process.env.BENCH_ENGINE ?? (quick ? 'off' : 'auto')).toLowerCase();
  let engine: BenchConfig['engine'];
  if (engineRaw === 'auto' || engineRaw === '') engine = 'auto';
  else if (engineRaw === '1' || engineRaw === 'true' || engineRaw === 'on') engine = 'on';
  else if (engineRaw === '0' || engineRaw === 'false' || engineRaw === 'off') engine = 'off';
  else throw new Error(`BENCH_ENGINE must be auto, 1 or 0, got "${engineRaw}"`);

  let suites: SuiteName[] = [...DEFAULT_SUITES];
  const suitesRaw = process.env.BENCH_SUITES;
  if (suitesRaw !== undefined && suitesRaw !== '') {
    suites = [];
    for (const s of suitesRaw.split(',').map((x) => x.trim()).filter((x) => x !== '')) {
      if (!(SUITES as readonly string[]).includes(s)) throw new Error(`BENCH_SUITES: unknown suite "${s}" (expected ${SUITES.join(', ')})`);
      suites.push(s as SuiteName);
    }
    if (suites.length === 0) throw new Error('BENCH_SUITES names no suite');
  }

  const sizeBytes = envSize('BENCH_SIZE', quick ? '256M' : '1G');
  const engineSizeBytes = envSize('BENCH_ENGINE_SIZE', quick ? '512M' : '2G');
  const nvramBytes = envSize('BENCH_NVRAM_SIZE', quick ? '32M' : '64M');
  const burstBytes = Math.floor((nvramBytes * 0.4) / MIB) * MIB;
  const sustainedBytes = 4 * nvramBytes;
  if (burstBytes < MIB) throw new Error('BENCH_NVRAM_SIZE is too small for a burst run (need >= 3M)');
  if (sustainedBytes > engineSizeBytes * 64) throw new Error('BENCH_NVRAM_SIZE is out of proportion to BENCH_ENGINE_SIZE');
  const rssVolumeBytes = envSize('BENCH_RSS_SIZE', '1T');

  const mirror = {
    sizeBytes: envSize('BENCH_MIRROR_SIZE', '16G'),
    nvramBytes: envSize('BENCH_MIRROR_NVRAM', '32M'),
    cpIntervalMs: envInt('BENCH_CP_INTERVAL', 1000, 10, 3_600_000),
    runtimeS: envInt('BENCH_MIRROR_RUNTIME', quick ? 3 : 10, 1, 3600),
    rttMs: envNumber('BENCH_MIRROR_RTT_MS', 1, 0.05, 1000),
    stallS: envInt('BENCH_MIRROR_STALL', quick ? 3 : 5, 1, 600),
    baselineBytes: process.env.BENCH_MIRROR_BASELINE === '0' ? 0 : envSize('BENCH_MIRROR_BASELINE', quick ? '256M' : '2G'),
    ...(process.env.BENCH_MIRROR_RX_DIR ? { rxDir: path.resolve(process.env.BENCH_MIRROR_RX_DIR) } : {}),
  };

  const jsonEnv = process.env.BENCH_JSON;
  const onlyRaw = process.env.BENCH_ONLY ?? '';
  const workDirEnv = process.env.BENCH_DIR;
  const threads = process.env.BENCH_NBDKIT_THREADS;
  return {
    rounds,
    runtimeS,
    rampS,
    quick,
    suites,
    engine,
    sizeBytes,
    engineSizeBytes,
    nvramBytes,
    burstBytes,
    sustainedBytes,
    rssVolumeBytes,
    cpIntervalMs: envInt('BENCH_CP_INTERVAL', 1000, 10, 3_600_000),
    cpLatencyRuntimeS: quick ? 5 : 20,
    workDir: workDirEnv !== undefined && workDirEnv !== '' ? path.resolve(workDirEnv) : '',
    keepWorkDir: envBool('BENCH_KEEP'),
    jsonPath: jsonEnv !== undefined && jsonEnv !== '' ? path.resolve(jsonEnv) : undefined,
    jsonToStdout,
    raidRebuildFillBytes: envSize('BENCH_RAID_REBUILD_FILL', quick ? '256M' : '2G'),
    only: onlyRaw.split(',').map((x) => x.trim()).filter((x) => x !== ''),
    repoRoot: path.resolve(__dirname, '..', '..', '..'),
    nbdkitThreads: threads === undefined || threads === '' ? undefined : envInt('BENCH_NBDKIT_THREADS', 16, 1, 1024),
    mirror,
    streamToo: process.env.BENCH_STREAM === '1',
  };
}

export function defaultWorkDirParent(): string {
  return os.tmpdir();
}
