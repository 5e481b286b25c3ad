/**
 * Helpers for crash tests: a seeded PRNG, running the real CLI, and a served volume
 * directory (`nvmirror serve DIR --socket S`) as a child process that can be killed.
 *
 * Invariants: every wait has a timeout; a child's stderr is kept (capped) for messages.
 */
import { spawn, type ChildProcess } from 'child_process';
import * as path from 'path';
import { NODE_FLAGS } from '../../src/cli/node-flags';

export const ROOT = path.resolve(__dirname, '..', '..', '..');
export const BIN = path.join(ROOT, 'bin', 'nvmirror');
const STDERR_KEEP_BYTES = 64 * 1024;

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function seedFromEnv(): number {
  const s = process.env.NVMIRROR_SEED;
  if (s === undefined) return Math.floor(Math.random() * 0x7fffffff);
  const n = Number(s);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`NVMIRROR_SEED must be a non-negative integer, got ${s}`);
  return n;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `nvmirror ARGS...` to completion. */
export function runCli(args: string[], timeoutMs = 60_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...NODE_FLAGS, BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NVMIRROR_LOG_LEVEL: 'warn' } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-STDERR_KEEP_BYTES); });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`nvmirror ${args.join(' ')} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export class ServedVolume {
  stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private constructor(readonly child: ChildProcess) {
    child.stderr?.on('data', (d: Buffer) => { this.stderr = (this.stderr + d.toString()).slice(-STDERR_KEEP_BYTES); });
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  }

  /** Starts `nvmirror serve DIR --socket S ...extra` and waits until it says it is serving. */
  static async start(dir: string, socketPath: string, extra: string[] = [], timeoutMs = 30_000, env: NodeJS.ProcessEnv = {}): Promise<ServedVolume> {
    const child = spawn(process.execPath, [...NODE_FLAGS, BIN, 'serve', dir, '--socket', socketPath, '--log-level', 'warn', ...extra], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NVMIRROR_LOG_LEVEL: 'warn', ...env },
    });
    const sv = new ServedVolume(child);
    let out = '';
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`server did not start within ${timeoutMs} ms: ${sv.stderr}`)), timeoutMs);
      child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('serving')) {
          clearTimeout(timer);
          resolve();
        }
      });
      void sv.exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`server exited (code ${code}, signal ${signal}) before serving: ${sv.stderr.trim()}`));
      });
    });
    return sv;
  }

  get pid(): number {
    return this.child.pid as number;
  }

  kill9(): void {
    this.child.kill('SIGKILL');
  }

  /** SIGTERM and wait; returns the exit code. */
  async stop(timeoutMs = 60_000): Promise<number | null> {
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    const r = await this.exited;
    clearTimeout(timer);
    return r.code;
  }
}
