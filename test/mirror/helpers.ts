/**
 * Shared by the two-host mirror tests: run a command, wait for a condition, read the
 * source's mirror status, checksum a whole NBD export.
 */
import * as cp from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

export const ROOT = path.resolve(__dirname, '../../..');
export const BIN = path.join(ROOT, 'bin', 'nvmirror');
/** The test's PATH plus the sbin directories (mkfs, losetup, e2fsck). */
export const TOOL_ENV: NodeJS.ProcessEnv = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? '/bin'}:/usr/local/sbin:/usr/sbin:/sbin` };

export function sh(cmd: string, args: string[], timeoutMs = 60_000): string {
  return cp.execFileSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, env: TOOL_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls f every 100 ms until it returns something truthy; throws naming `what` after timeoutMs. */
export async function until<T>(what: string, f: () => T | undefined | false, timeoutMs = 30_000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

export function md5OfExport(uri: string): string {
  return sh('bash', ['-c', `nbdcopy '${uri}' - | md5sum | cut -d' ' -f1`], 120_000).trim();
}

export interface MirrorStats {
  state: string;
  cpsAcknowledged: number;
  rootMismatches: number;
  sourceCp: number;
  destCp: number;
  rootsEqual: boolean;
  refsSent: number;
  deltasSent: number;
  connected: boolean;
  lastError?: string;
  heldSeq: number;
  lastSeq: number;
  readerPinnedCp: number;
  bytesOnWire: number;
  /** Of bytesOnWire, what went while baselines and resyncs ran. */
  catchUpWireBytes: number;
  /** Which side is primary and current (src/mirror/standing.ts). */
  standing?: { kind: string; current: string; commonCp: number; sourceCp: number; destinationCp: number; sourceSeq: number; destinationSeq: number };
}

const PROBE = path.join(__dirname, 'control-probe.js');

/**
 * A served volume's status as `status --json` gives it (its control socket's answer), read
 * with control-probe.js: polling the CLI cost ~0.4 s of a CPU per poll. undefined when the
 * volume is not served (no socket, or nothing answers on it).
 */
function servedStatus(dir: string): { sections?: { mirror?: MirrorStats } } | undefined {
  const sock = path.join(dir, 'control.sock');
  if (!fs.existsSync(sock)) return undefined;
  try {
    const r = JSON.parse(cp.execFileSync(process.execPath, [PROBE, sock, 'status'], { encoding: 'utf8', timeout: 15_000, stdio: ['ignore', 'pipe', 'ignore'] })) as { ok: boolean; status?: { sections?: { mirror?: MirrorStats } } };
    return r.ok ? r.status : undefined;
  } catch {
    return undefined;
  }
}

/** A running receiver's status (its control socket's answer, as `status DIR --json` has it but the directory list), or undefined. */
export function receiverProbe<T>(dir: string): { mirrors?: T[] } | undefined {
  const sock = path.join(dir, 'receiver.sock');
  if (!fs.existsSync(sock)) return undefined;
  try {
    const r = JSON.parse(cp.execFileSync(process.execPath, [PROBE, sock, 'status'], { encoding: 'utf8', timeout: 15_000, stdio: ['ignore', 'pipe', 'ignore'] })) as { ok: boolean; receiver?: { mirrors?: T[] } };
    return r.ok ? r.receiver : undefined;
  } catch {
    return undefined;
  }
}

/** The source's `status --json` mirror section, or undefined while it cannot be read. */
export function sourceStatus(dir: string): MirrorStats | undefined {
  const served = servedStatus(dir);
  if (served) return served.sections?.mirror;
  try {
    const s = JSON.parse(sh(BIN, ['status', dir, '--json'])) as { sections?: { mirror?: MirrorStats } };
    return s.sections?.mirror;
  } catch {
    return undefined;
  }
}
