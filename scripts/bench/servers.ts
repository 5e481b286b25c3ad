/**
 * Server processes under test: nvmirror (memory, file, engine volume) and nbdkit
 * (memory, file). Each measurement starts a fresh server on a fresh Unix socket and
 * stops it afterwards, so no run inherits another's state.
 *
 * Invariants:
 * - start() resolves only once the server accepts connections (nvmirror printed its
 *   "serving" line; nbdkit wrote its pidfile, which it does once it is listening), and
 *   rejects if the process exits first or is not ready within START_TIMEOUT_MS.
 * - stop() sends SIGTERM, waits up to STOP_TIMEOUT_MS, then SIGKILLs; it rejects if the
 *   server did not exit cleanly (exit code 0, or nbdkit's death by SIGTERM), so a crash
 *   during a run is never reported as a number.
 * - Captured output is capped at OUTPUT_CAP_BYTES per stream (the tail is kept).
 * - peakRssBytes is the process's VmHWM read while it is still alive (after the work).
 */
import { ChildProcess, spawn, execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { NODE_FLAGS } from '../../src/cli/node-flags';

const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 60_000;
const OUTPUT_CAP_BYTES = 4 * 1024 * 1024;
const POLL_MS = 20;

export interface ServerSpec {
  /** Column name in the table: "nvmirror", "nbdkit", "engine", "nvmirror file"... */
  label: string;
  /** Short id used in file names. */
  id: string;
  /** What the command line serves, for the docs. */
  describe: string;
  /** Prepares backing state in `dir` (image file, volume directory); run before each start. */
  prepare(dir: string): Promise<void>;
  /** argv (argv[0] is the program) for a server listening on `socket`. */
  command(dir: string, socket: string, pidfile: string): { argv: string[]; ready: 'stdout-serving' | 'pidfile' };
  /** Removes per-run backing state after the server stopped (a shared image stays). */
  cleanup(dir: string): Promise<void>;
  /** More environment for the server process. */
  env?: Record<string, string>;
}

/** nvmirror on the stream data path (NVMIRROR_NBD_NATIVE=0), for before/after rows in one run. */
export function streamPath(spec: ServerSpec): ServerSpec {
  return { ...spec, label: 'nvm-stream', id: `${spec.id}-stream`, describe: `NVMIRROR_NBD_NATIVE=0 ${spec.describe}`, env: { NVMIRROR_NBD_NATIVE: '0' } };
}

export class RunningServer {
  private stdoutTail = '';
  private stderrTail = '';
  private exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exitWaiters: Array<() => void> = [];

  private constructor(
    readonly spec: ServerSpec,
    readonly socket: string,
    private readonly child: ChildProcess,
  ) {
    child.stdout?.on('data', (c: Buffer) => (this.stdoutTail = capTail(this.stdoutTail + c.toString('utf8'))));
    child.stderr?.on('data', (c: Buffer) => (this.stderrTail = capTail(this.stderrTail + c.toString('utf8'))));
    child.on('exit', (code, signal) => {
      this.exited = { code, signal };
      for (const w of this.exitWaiters.splice(0)) w();
    });
  }

  get pid(): number {
    const p = this.child.pid;
    if (p === undefined) throw new Error(`${this.spec.label}: no pid`);
    return p;
  }

  get stderr(): string {
    return this.stderrTail;
  }

  get uri(): string {
    return `nbd+unix:///?socket=${this.socket}`;
  }

  static async start(spec: ServerSpec, dir: string, socket: string, extraNodeArgs: string[] = []): Promise<RunningServer> {
    const pidfile = path.join(dir, `${spec.id}.pid`);
    for (const f of [socket, pidfile]) fs.rmSync(f, { force: true });
    const { argv, ready } = spec.command(dir, socket, pidfile);
    const [prog, ...args] = argv;
    if (prog === undefined) throw new Error(`${spec.label}: empty command`);
    const fullArgs = prog === process.execPath ? [...extraNodeArgs, ...args] : args;
    const child = spawn(prog, fullArgs, { stdio: ['ignore', 'pipe', 'pipe'], cwd: dir, env: { ...process.env, ...spec.env } });
    const s = new RunningServer(spec, socket, child);
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      const err = await Promise.race([spawnError, sleep(POLL_MS).then(() => undefined)]);
      if (err) throw new Error(`${spec.label}: cannot start ${prog}: ${err.message}`);
      if (s.exited) {
        throw new Error(`${spec.label} exited during start-up (code ${s.exited.code}, signal ${s.exited.signal}): ${lastLines(s.stderrTail + s.stdoutTail)}`);
      }
      const isReady = ready === 'pidfile' ? fs.existsSync(pidfile) && fs.readFileSync(pidfile, 'utf8').trim() !== '' : s.stdoutTail.includes('nvmirror: serving');
      if (isReady && fs.existsSync(socket)) return s;
      if (Date.now() > deadline) {
        await s.kill();
        throw new Error(`${spec.label} not ready after ${START_TIMEOUT_MS} ms: ${lastLines(s.stderrTail + s.stdoutTail)}`);
      }
    }
  }

  /** VmHWM (peak resident set) of the live process, in bytes. */
  peakRssBytes(): number {
    const status = fs.readFileSync(`/proc/${this.pid}/status`, 'utf8');
    const m = /^VmHWM:\s+(\d+)\s+kB$/m.exec(status);
    if (!m || m[1] === undefined) throw new Error(`${this.spec.label}: no VmHWM in /proc/${this.pid}/status`);
    return Number(m[1]) * 1024;
  }

  /** CPU time (user+system) the process used so far, in seconds. */
  cpuSeconds(): number {
    const stat = fs.readFileSync(`/proc/${this.pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields after ")": state(3) ... utime is field 14, stime 15 (1-based over the whole line).
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    const hz = clockTicks();
    if (!Number.isFinite(utime) || !Number.isFinite(stime)) throw new Error(`${this.spec.label}: cannot parse /proc/${this.pid}/stat`);
    return (utime + stime) / hz;
  }

  /** A method, not a field read, so that narrowing does not survive the awaits above. */
  private exitStatus(): { code: number | null; signal: NodeJS.Signals | null } | undefined {
    return this.exited;
  }

  get alive(): boolean {
    return this.exited === undefined;
  }

  /** Graceful stop; rejects unless the server exits cleanly. */
  async stop(): Promise<void> {
    if (this.exited) throw new Error(`${this.spec.label} died during the run (code ${this.exited.code}, signal ${this.exited.signal}): ${lastLines(this.stderrTail)}`);
    this.child.kill('SIGTERM');
    const ok = await this.waitExit(STOP_TIMEOUT_MS);
    if (!ok) {
      await this.kill();
      throw new Error(`${this.spec.label} did not stop within ${STOP_TIMEOUT_MS} ms of SIGTERM`);
    }
    const e = this.exitStatus();
    if (e === undefined) throw new Error('internal: exited not set');
    const clean = e.code === 0 || (e.code === null && e.signal === 'SIGTERM');
    if (!clean) throw new Error(`${this.spec.label} exited uncleanly on SIGTERM (code ${e.code}, signal ${e.signal}): ${lastLines(this.stderrTail)}`);
  }

  async kill(): Promise<void> {
    if (this.exited) return;
    this.child.kill('SIGKILL');
    await this.waitExit(10_000);
  }

  private waitExit(timeoutMs: number): Promise<boolean> {
    if (this.exited) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), timeoutMs);
      this.exitWaiters.push(() => {
        clearTimeout(t);
        resolve(true);
      });
    });
  }
}

let ticks: number | undefined;
function clockTicks(): number {
  if (ticks === undefined) {
    const out = execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim();
    const n = Number(out);
    ticks = Number.isInteger(n) && n > 0 ? n : 100;
  }
  return ticks;
}

function capTail(s: string): string {
  return s.length > OUTPUT_CAP_BYTES ? s.slice(s.length - OUTPUT_CAP_BYTES) : s;
}

export function lastLines(s: string, n = 5): string {
  return s.trim().split('\n').slice(-n).map((l) => l.slice(0, 300)).join(' | ') || '(no output)';
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ------------------------------------------------------------------ the servers

const node = process.execPath;

function nvmirrorBin(repoRoot: string): string {
  return path.join(repoRoot, 'dist', 'src', 'cli', 'main.js');
}

/**
 * The suite's image file, dir/disk.img, shared by every file server of the suite: made
 * once, fully written (so random writes never split unwritten extents, and removing it
 * is cheap even on a filesystem mounted with online discard), then, before each run,
 * flushed and dropped from the page cache (dd oflag=nocache: posix_fadvise DONTNEED on
 * this file only). Every run starts from the same allocation and a cold cache.
 */
async function prepareImage(dir: string, sizeBytes: number): Promise<void> {
  const img = path.join(dir, 'disk.img');
  const st = fs.existsSync(img) ? fs.statSync(img) : undefined;
  if (st === undefined || st.size !== sizeBytes) {
    fs.rmSync(img, { force: true });
    execFileSync('fallocate', ['-l', String(sizeBytes), img]);
    const mib = sizeBytes / (1024 * 1024);
    if (!Number.isInteger(mib)) throw new Error(`image size ${sizeBytes} is not a whole number of MiB`);
    execFileSync('dd', ['if=/dev/zero', `of=${img}`, 'bs=1M', `count=${mib}`, 'conv=notrunc,fdatasync', 'status=none'], { timeout: 600_000 });
    if (fs.statSync(img).size !== sizeBytes) throw new Error(`image ${img} has the wrong size after creation`);
  }
  execFileSync('dd', [`of=${img}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0', 'status=none'], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 600_000 });
}

export function nvmirrorMemory(repoRoot: string, sizeBytes: number): ServerSpec {
  return {
    label: 'nvmirror',
    id: 'nvmirror-memory',
    describe: `nvmirror serve --memory ${sizeBytes}`,
    prepare: async () => undefined,
    command: (_dir, socket) => ({ argv: [node, ...NODE_FLAGS, nvmirrorBin(repoRoot), 'serve', '--memory', String(sizeBytes), '--socket', socket], ready: 'stdout-serving' }),
    cleanup: async () => undefined,
  };
}

function nbdkitArgs(threads: number | undefined, socket: string, pidfile: string): string[] {
  return ['nbdkit', '-f', '-U', socket, '-P', pidfile, ...(threads !== undefined ? ['-t', String(threads)] : [])];
}

export function nbdkitMemory(sizeBytes: number, threads: number | undefined): ServerSpec {
  return {
    label: 'nbdkit',
    id: 'nbdkit-memory',
    describe: `nbdkit -f -U SOCK memory ${sizeBytes}`,
    prepare: async () => undefined,
    command: (_dir, socket, pidfile) => ({ argv: [...nbdkitArgs(threads, socket, pidfile), 'memory', String(sizeBytes)], ready: 'pidfile' }),
    cleanup: async () => undefined,
  };
}

export function nvmirrorFile(repoRoot: string, sizeBytes: number, label = 'nvmirror'): ServerSpec {
  return {
    label,
    id: 'nvmirror-file',
    describe: `nvmirror serve --file IMG (${sizeBytes} bytes, written, cache dropped before each run)`,
    prepare: (dir) => prepareImage(dir, sizeBytes),
    command: (dir, socket) => ({ argv: [node, ...NODE_FLAGS, nvmirrorBin(repoRoot), 'serve', '--file', path.join(dir, 'disk.img'), '--socket', socket], ready: 'stdout-serving' }),
    cleanup: async () => undefined, // the image is reused by the next run (see prepareImage)
  };
}

export function nbdkitFile(sizeBytes: number, threads: number | undefined, label = 'nbdkit'): ServerSpec {
  return {
    label,
    id: 'nbdkit-file',
    describe: `nbdkit -f -U SOCK file IMG (the same image)`,
    prepare: (dir) => prepareImage(dir, sizeBytes),
    command: (dir, socket, pidfile) => ({ argv: [...nbdkitArgs(threads, socket, pidfile), 'file', path.join(dir, 'disk.img')], ready: 'pidfile' }),
    cleanup: async () => undefined, // the image is reused by the next run (see prepareImage)
  };
}

export interface EngineOptions {
  sizeBytes: number;
  nvramBytes: number;
  cpIntervalMs: number;
  /** More `create` arguments (e.g. --raid 5 --member a.img ...). */
  createArgs?: string[];
}

export function nvmirrorEngine(repoRoot: string, o: EngineOptions, label = 'engine', id = 'nvmirror-engine'): ServerSpec {
  const volDir = (dir: string): string => path.join(dir, 'vol');
  return {
    label,
    id,
    describe: `nvmirror create VOL --size ${o.sizeBytes} --nvram-size ${o.nvramBytes}${o.createArgs ? ` ${o.createArgs.join(' ')}` : ''}; nvmirror serve VOL --cp-interval ${o.cpIntervalMs}`,
    prepare: async (dir) => {
      fs.rmSync(volDir(dir), { recursive: true, force: true });
      const args = [nvmirrorBin(repoRoot), 'create', volDir(dir), '--size', String(o.sizeBytes), '--nvram-size', String(o.nvramBytes), ...(o.createArgs ?? [])];
      try {
        execFileSync(node, args, { stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
      } catch (e) {
        const err = e as { stderr?: Buffer; message: string };
        throw new Error(`nvmirror create failed: ${err.stderr ? lastLines(err.stderr.toString('utf8')) : err.message}`);
      }
    },
    command: (dir, socket) => ({
      argv: [node, ...NODE_FLAGS, nvmirrorBin(repoRoot), 'serve', volDir(dir), '--socket', socket, '--cp-interval', String(o.cpIntervalMs)],
      ready: 'stdout-serving',
    }),
    cleanup: async (dir) => fs.rmSync(volDir(dir), { recursive: true, force: true }),
  };
}

/**
 * Copies the built server (dist/src, the native addon, package.json; node_modules is
 * linked) into `dest` and returns that root. Servers then run from the copy, so that a
 * concurrent `tsc` or `node-gyp rebuild` in the shared tree can neither break a run
 * half-way nor mix two builds in one table. Verifies that the copy loads its addon.
 */
export function snapshotBuild(repoRoot: string, dest: string): string {
  const addonPath = path.join(repoRoot, 'build', 'Release', 'nvmirror_native.node');
  if (!fs.existsSync(addonPath)) throw new Error(`${addonPath} is missing: build the addon (npx node-gyp rebuild)`);
  fs.rmSync(dest, { recursive: true, force: true });
  fs.mkdirSync(path.join(dest, 'build', 'Release'), { recursive: true });
  fs.cpSync(path.join(repoRoot, 'dist', 'src'), path.join(dest, 'dist', 'src'), { recursive: true });
  fs.copyFileSync(addonPath, path.join(dest, 'build', 'Release', 'nvmirror_native.node'));
  fs.copyFileSync(path.join(repoRoot, 'package.json'), path.join(dest, 'package.json'));
  fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(dest, 'node_modules'), 'dir');
  const probe = `require(${JSON.stringify(path.join(dest, 'dist', 'src', 'io', 'native.js'))}).addon()`;
  try {
    execFileSync(node, ['-e', probe], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 });
    execFileSync(node, [nvmirrorBin(dest), '--help'], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new Error(`the copied build does not start: ${err.stderr ? lastLines(err.stderr.toString('utf8')) : err.message}`);
  }
  return dest;
}

/** True when this build of nvmirror has the `create` command (the engine landed). */
export function engineAvailable(repoRoot: string): boolean {
  try {
    const out = execFileSync(node, [nvmirrorBin(repoRoot), '--help'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 });
    return /^\s+create\b/m.test(out);
  } catch {
    return false;
  }
}
