/**
 * End-to-end harness: starts a real `nvmirror serve` against a chosen backend and
 * transport, runs real client programs, and cleans everything up.
 *
 * Invariants:
 * - every server is started on an explicit endpoint (a fresh Unix socket in its own temp
 *   dir, or 127.0.0.1 on a port found free just before) - never the default port, since
 *   other engineers run servers on this machine at the same time;
 * - every child process and temp dir a test creates is registered here and removed by
 *   `cleanupAll()` (called from a root after hook), even when a test fails;
 * - a missing tool fails the test under CI (env CI=true) and skips it, with a message
 *   naming the tool, elsewhere;
 * - every wait has a timeout; a server that does not print its URI in time is killed and
 *   the test fails with its stderr.
 */
import { spawn, ChildProcess, spawnSync } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { NODE_FLAGS } from '../../src/cli/node-flags';

/**
 * Backends every e2e suite runs against: a sparse memory volume, a raw image file, and
 * an engine volume directory (NVRAM log + CPs + block tree) made by `nvmirror create`.
 */
export type Backend = 'memory' | 'file' | 'engine';
export const BACKENDS: readonly Backend[] = ['memory', 'file', 'engine'];

export type Transport = 'unix' | 'tcp';
export const TRANSPORTS: readonly Transport[] = ['unix', 'tcp'];

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** The repository root: the nearest ancestor of this file holding package.json. */
export const REPO_ROOT: string = (() => {
  let dir = __dirname;
  for (let i = 0; i < 8; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'bin', 'nvmirror'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error(`harness: cannot find the repository root above ${__dirname}`);
})();
export const NVMIRROR_BIN = path.join(REPO_ROOT, 'bin', 'nvmirror');

export const IN_CI = process.env['CI'] === 'true';

/** PATH with the sbin directories, so losetup/mkfs/e2fsck are found. */
const TOOL_PATH = [process.env['PATH'] ?? '', '/usr/local/sbin', '/usr/sbin', '/sbin'].join(':');
/** /usr/bin first: nbdsh and python3-libnbd need the system python. */
export const CHILD_ENV: NodeJS.ProcessEnv = { ...process.env, PATH: `/usr/bin:${TOOL_PATH}` };

// ---------------------------------------------------------------------------------------
// Tools

export function toolPath(tool: string): string | undefined {
  for (const dir of TOOL_PATH.split(':')) {
    if (dir === '') continue;
    const p = path.join(dir, tool);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/**
 * Call from a before() or it(): fails under CI, skips elsewhere, when a tool is missing.
 * `ctx` is mocha's `this`.
 */
export function requireTools(ctx: Mocha.Context, ...tools: string[]): void {
  const missing = tools.filter((t) => toolPath(t) === undefined);
  if (missing.length === 0) return;
  const msg = `missing test tool(s): ${missing.join(', ')} (run scripts/install-test-deps.sh)`;
  if (IN_CI) throw new Error(msg);
  process.stderr.write(`      SKIP: ${msg}\n`);
  ctx.skip();
}

/** Same as requireTools for a condition that is not a tool (root, /dev/fuse...). */
export function requireCondition(ctx: Mocha.Context, ok: boolean, what: string): void {
  if (ok) return;
  const msg = `test needs ${what}`;
  if (IN_CI) throw new Error(msg);
  process.stderr.write(`      SKIP: ${msg}\n`);
  ctx.skip();
}

// ---------------------------------------------------------------------------------------
// Resources registered for cleanup

const liveChildren = new Set<ChildProcess>();
const tempDirs = new Set<string>();
const cleanupHooks: Array<() => Promise<void> | void> = [];

export function makeTempDir(prefix = 'nvm-e2e-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** Registers a cleanup step (unmount, detach a loop device) run by cleanupAll, last-in first-out. */
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanupHooks.push(fn);
}

export async function cleanupAll(): Promise<void> {
  const errors: string[] = [];
  while (cleanupHooks.length > 0) {
    const fn = cleanupHooks.pop();
    try {
      if (fn) await fn();
    } catch (e) {
      errors.push(e instanceof Error ? e.message : String(e));
    }
  }
  for (const child of [...liveChildren]) {
    await killChild(child, 5000);
  }
  for (const dir of [...tempDirs]) {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch (e) {
      errors.push(`rm ${dir}: ${e instanceof Error ? e.message : String(e)}`);
    }
    tempDirs.delete(dir);
  }
  if (errors.length > 0) throw new Error(`cleanup: ${errors.join('; ')}`);
}

function waitExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      child.removeListener('exit', onExit);
      resolve(false);
    }, timeoutMs);
    const onExit = (): void => {
      clearTimeout(t);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

/** SIGTERM, then SIGKILL after graceMs. Only ever signals the child's own pid. */
async function killChild(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) {
    child.kill('SIGTERM');
    if (!(await waitExit(child, graceMs))) {
      child.kill('SIGKILL');
      await waitExit(child, 5000);
    }
  }
  liveChildren.delete(child);
}

// ---------------------------------------------------------------------------------------
// Running client programs

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Runs a program to completion (killed after timeoutMs). Never throws on a non-zero exit. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? CHILD_ENV,
      cwd: opts.cwd ?? REPO_ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    liveChildren.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    const capBytes = 16 * MiB;
    child.stdout.on('data', (b: Buffer) => {
      if (outBytes < capBytes) out.push(b);
      outBytes += b.length;
    });
    child.stderr.on('data', (b: Buffer) => {
      if (err.length < 4096) err.push(b);
    });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      liveChildren.delete(child);
      reject(new Error(`${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      liveChildren.delete(child);
      const stderr = Buffer.concat(err).toString('utf8') + (timedOut ? `\n[killed after ${timeoutMs} ms]` : '');
      resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr });
    });
    child.stdin.on('error', () => undefined);
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Runs a program and throws, with its output, unless it exits 0. Returns stdout. */
export async function runOk(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}\n--- stdout ---\n${r.stdout.slice(-4000)}\n--- stderr ---\n${r.stderr.slice(-4000)}`,
    );
  }
  return r.stdout;
}

// ---------------------------------------------------------------------------------------
// Ports, files, checksums

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => {
        if (addr !== null && typeof addr === 'object') resolve(addr.port);
        else reject(new Error('freePort: no address'));
      });
    });
  });
}

/** Writes `sizeBytes` of seeded pseudo-random data to a file, in 1 MiB pieces. */
export function writeRandomFile(file: string, sizeBytes: number, seed: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(MiB);
    let state = seed >>> 0 || 1;
    for (let off = 0; off < sizeBytes; off += chunk.length) {
      // xorshift32 fill, fast enough for a few hundred MiB
      for (let i = 0; i < chunk.length; i += 4) {
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        chunk.writeUInt32LE(state >>> 0, i);
      }
      const n = Math.min(chunk.length, sizeBytes - off);
      fs.writeSync(fd, chunk, 0, n, off);
    }
  } finally {
    fs.closeSync(fd);
  }
}

export function sha256File(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** Resident set size of a process, from /proc/PID/status VmRSS, in bytes. */
export function rssBytes(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
  if (!m || m[1] === undefined) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------------------
// The server under test

export interface TlsOptions {
  certFile: string;
  keyFile: string;
  caFile?: string;
  required?: boolean;
}

export interface ServerOptions {
  backend: Backend;
  transport: Transport;
  sizeBytes: number;
  exportName?: string;
  readOnly?: boolean;
  tls?: TlsOptions;
  /** More `serve` arguments, appended last. */
  extraArgs?: string[];
  startTimeoutMs?: number;
  /**
   * Serve existing storage instead of making new: an image file ('file') or a volume
   * directory ('engine') left by an earlier server (see restartServer).
   */
  existingStoragePath?: string;
  /** More environment for the server (e.g. NVMIRROR_NBD_NATIVE=0: the stream data path). */
  env?: Record<string, string>;
}

export interface Server {
  readonly backend: Backend;
  readonly transport: Transport;
  readonly sizeBytes: number;
  readonly exportName: string;
  /** NBD URI of the export, e.g. nbd+unix:///?socket=/tmp/x/nbd.sock or nbd://127.0.0.1:P/ */
  readonly uri: string;
  /** The URI line(s) the server printed. */
  readonly printed: string[];
  readonly socketPath: string | undefined;
  readonly port: number | undefined;
  readonly pid: number;
  readonly dir: string;
  /** For 'file': the image being served. */
  readonly imagePath: string | undefined;
  /** For 'engine': the volume directory being served. */
  readonly volumeDir: string | undefined;
  /** The options it was started with (for restartServer). */
  readonly options: ServerOptions;
  /** Everything the server wrote to stderr so far (capped). */
  stderr(): string;
  /** True while the process has not exited. */
  alive(): boolean;
  /** SIGTERM and wait; resolves to the exit code (null if killed by a signal). */
  stop(timeoutMs?: number): Promise<number | null>;
}

/** Node prints `nbd://host:port/name` for TCP; qemu wants the export name in the path too. */
export function uriFor(transport: Transport, endpoint: string, exportName: string, tls = false): string {
  const name = encodeURIComponent(exportName);
  if (transport === 'unix') return `nbd${tls ? 's' : ''}+unix:///${name}?socket=${endpoint}`;
  return `nbd${tls ? 's' : ''}://${endpoint}/${name}`;
}

let serverSeq = 0;

/** Prepares the backend's storage and returns the serve arguments that select it. */
async function backendArgs(
  backend: Backend,
  dir: string,
  sizeBytes: number,
  existing: string | undefined,
): Promise<{ args: string[]; imagePath?: string; volumeDir?: string }> {
  if (existing !== undefined) {
    if (backend === 'file') return { args: ['--file', existing], imagePath: existing };
    if (backend === 'engine') return { args: [existing], volumeDir: existing };
    throw new Error(`harness: a ${backend} backend has no storage to reuse`);
  }
  switch (backend) {
    case 'memory':
      return { args: ['--memory', String(sizeBytes)] };
    case 'file': {
      const imagePath = path.join(dir, 'image.raw');
      fs.closeSync(fs.openSync(imagePath, 'w'));
      fs.truncateSync(imagePath, sizeBytes);
      return { args: ['--file', imagePath], imagePath };
    }
    case 'engine': {
      const volDir = path.join(dir, 'volume');
      // A small NVRAM log, so that the tests' writes fill halves and run CPs.
      await runOk(process.execPath, [NVMIRROR_BIN, 'create', volDir, '--size', String(sizeBytes), '--nvram-size', '16M'], {
        timeoutMs: 60_000,
      });
      return { args: [volDir], volumeDir: volDir };
    }
  }
}

/** Starts `nvmirror serve` and waits for it to print its URI. */
export async function startServer(opts: ServerOptions): Promise<Server> {
  const dir = makeTempDir(`nvm-e2e-${opts.backend}-`);
  const exportName = opts.exportName ?? '';
  const { args: bArgs, imagePath, volumeDir } = await backendArgs(opts.backend, dir, opts.sizeBytes, opts.existingStoragePath);
  const args: string[] = [...NODE_FLAGS, NVMIRROR_BIN, 'serve', ...bArgs, '--export', exportName, '--log-level', 'info'];
  if (opts.readOnly) args.push('--read-only');
  if (opts.tls) {
    args.push('--tls-cert', opts.tls.certFile, '--tls-key', opts.tls.keyFile);
    if (opts.tls.caFile !== undefined) args.push('--tls-ca', opts.tls.caFile);
    if (opts.tls.required) args.push('--tls-required');
  }
  args.push(...(opts.extraArgs ?? []));

  // A free port can be taken by someone else between freePort() and bind: retry.
  for (let attempt = 0; ; attempt++) {
    let socketPath: string | undefined;
    let port: number | undefined;
    let endpoint: string;
    const endpointArgs: string[] = [];
    if (opts.transport === 'unix') {
      socketPath = path.join(dir, `nbd${serverSeq++}.sock`);
      endpoint = socketPath;
      endpointArgs.push('--socket', socketPath);
    } else {
      port = await freePort();
      endpoint = `127.0.0.1:${port}`;
      endpointArgs.push('--listen', endpoint);
    }
    try {
      return await launch(args.concat(endpointArgs), {
        backend: opts.backend,
        transport: opts.transport,
        sizeBytes: opts.sizeBytes,
        exportName,
        uri: uriFor(opts.transport, endpoint, exportName),
        socketPath,
        port,
        dir,
        imagePath,
        volumeDir,
        options: opts,
        startTimeoutMs: opts.startTimeoutMs ?? 20_000,
      });
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (opts.transport === 'tcp' && attempt < 3 && /EADDRINUSE|in use/i.test(msg)) continue;
      throw e;
    }
  }
}

interface LaunchInfo {
  backend: Backend;
  transport: Transport;
  sizeBytes: number;
  exportName: string;
  uri: string;
  socketPath: string | undefined;
  port: number | undefined;
  dir: string;
  imagePath: string | undefined;
  volumeDir: string | undefined;
  options: ServerOptions;
  startTimeoutMs: number;
}

function launch(args: string[], info: LaunchInfo): Promise<Server> {
  const child = spawn(process.execPath, args, {
    cwd: REPO_ROOT,
    env: { ...CHILD_ENV, NODE_ENV: 'test', ...info.options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  liveChildren.add(child);
  const stderrCapBytes = 256 * 1024;
  let stderrText = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderrText.length < stderrCapBytes) stderrText += s;
  });
  const printed: string[] = [];
  let stdoutBuf = '';
  child.stdout.setEncoding('utf8');

  const server: Server = {
    ...info,
    printed,
    pid: child.pid ?? -1,
    stderr: () => stderrText,
    alive: () => child.exitCode === null && child.signalCode === null,
    stop: async (timeoutMs = 15_000) => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        if (!(await waitExit(child, timeoutMs))) {
          child.kill('SIGKILL');
          await waitExit(child, 5000);
          liveChildren.delete(child);
          throw new Error(`server pid ${child.pid} did not exit within ${timeoutMs} ms of SIGTERM\n${stderrText.slice(-4000)}`);
        }
      }
      liveChildren.delete(child);
      return child.exitCode;
    },
  };

  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      void killChild(child, 2000).then(() =>
        reject(new Error(`nvmirror ${args.slice(1).join(' ')}: ${why}\n--- stderr ---\n${stderrText.slice(-4000)}`)),
      );
    };
    const timer = setTimeout(() => fail(`no URI printed within ${info.startTimeoutMs} ms`), info.startTimeoutMs);
    child.on('error', (e) => fail(e.message));
    child.on('exit', (code, sig) => fail(`exited ${code ?? sig} before printing its URI`));
    child.stdout.on('data', (s: string) => {
      stdoutBuf += s;
      let nl: number;
      while ((nl = stdoutBuf.indexOf('\n')) >= 0) {
        const line = stdoutBuf.slice(0, nl);
        stdoutBuf = stdoutBuf.slice(nl + 1);
        if (/nbds?(\+unix)?:\/\//.test(line)) printed.push(line.trim());
      }
      if (!settled && printed.length > 0) {
        settled = true;
        clearTimeout(timer);
        resolve(server);
      }
    });
  });
}

/**
 * Starts a new server on the storage a stopped server left (its image file or volume
 * directory), with the same options otherwise. Memory volumes cannot be restarted.
 */
export async function restartServer(old: Server, overrides: Partial<ServerOptions> = {}): Promise<Server> {
  if (old.alive()) throw new Error('restartServer: the old server is still running');
  const storage = old.imagePath ?? old.volumeDir;
  if (storage === undefined) throw new Error(`restartServer: a ${old.backend} volume does not survive its server`);
  return startServer({ ...old.options, ...overrides, existingStoragePath: storage });
}

/** Reads the whole export through nbdcopy into a local file. */
export async function exportToFile(uri: string, file: string, connections = 1): Promise<void> {
  await runOk('nbdcopy', [`--connections=${connections}`, '--flush', uri, file], { timeoutMs: 120_000 });
}

/** True if running as root (FUSE, loop devices, mount). */
export function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

/** Runs a program synchronously; used only in cleanup paths where async is awkward. */
export function runSyncQuiet(cmd: string, args: string[]): number | null {
  const r = spawnSync(cmd, args, { env: CHILD_ENV, stdio: 'ignore', timeout: 30_000 });
  return r.status;
}

// mocha root hook: runs after every e2e file, so nothing leaks even if a test throws.
after(async function () {
  this.timeout(60_000);
  await cleanupAll();
});
