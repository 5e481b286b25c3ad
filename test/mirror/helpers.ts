/**
 * Shared by the two-host mirror tests: run a command, wait for a condition, read the
 * source's mirror status, checksum a whole NBD export.
 */
import * as cp from 'child_process';
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
  /** Which side is primary and current (src/mirror/standing.ts). */
  standing?: { kind: string; current: string; commonCp: number; sourceCp: number; destinationCp: number; sourceSeq: number; destinationSeq: number };
}

/** The source's `status --json` mirror section, or undefined while it cannot be read. */
export function sourceStatus(dir: string): MirrorStats | undefined {
  try {
    const s = JSON.parse(sh(BIN, ['status', dir, '--json'])) as { sections?: { mirror?: MirrorStats } };
    return s.sections?.mirror;
  } catch {
    return undefined;
  }
}
