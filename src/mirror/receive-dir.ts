/**
 * The receive directory: `nvmirror receive DIR` keeps one mirror per source in
 * DIR/<source-uuid>/ (mirror-dir.ts) and its control socket in DIR/receiver.sock.
 *
 * Invariants:
 * - One receiver per directory: it holds DIR/receiver.lock (flock'ed, its pid written)
 *   from before it listens until it has stopped. A second `receive` on the same DIR is
 *   refused with the holder's pid, before it touches the control socket the first one
 *   answers on (each mirror's own mirror.lock would only stop it at a source's HELLO).
 * - A volume directory (nvmirror.json) or a mirror directory (mirror.json) is not a
 *   receive directory: refused, nothing written in it.
 */
import * as fs from 'fs';
import * as path from 'path';
import { lockDirFile, type DirLock } from '../volume/dir-lock';
import { LABEL_NAME } from '../volume/label';
import { MIRROR_LABEL_NAME, SOURCE_UUID_RE } from './mirror-dir';

export { SOURCE_UUID_RE };

export const RECEIVE_LOCK_NAME = 'receiver.lock';

/** DIR is a receive directory a receiver used: its lock file stays after the receiver stops. */
export function isReceiveDir(dir: string): boolean {
  return fs.existsSync(path.join(dir, RECEIVE_LOCK_NAME));
}

/** DIR's entries named by a source uuid (its mirrors, promoted and demoted ones too), sorted; none if DIR cannot be read. */
export function sourceEntryNames(dir: string): string[] {
  try {
    return fs.readdirSync(dir).filter((n) => SOURCE_UUID_RE.test(n)).sort();
  } catch {
    return [];
  }
}

/**
 * Why DIR cannot be a receive directory (`receive DIR`, `demote --into DIR`): it is a
 * volume directory or a mirror directory; undefined if it can (missing, or anything else).
 */
export function receiveDirProblem(dir: string): string | undefined {
  const abs = path.resolve(dir);
  if (fs.existsSync(path.join(abs, LABEL_NAME))) {
    return `${abs} is a volume directory (${LABEL_NAME}): a receive directory is a directory of its own, which keeps each mirror in DIR/<source-uuid>/`;
  }
  if (fs.existsSync(path.join(abs, MIRROR_LABEL_NAME))) {
    return `${abs} is a mirror directory (${MIRROR_LABEL_NAME}): give the directory that holds it, ${path.dirname(abs)}`;
  }
  return undefined;
}

/** Makes DIR if missing, refuses a directory that is not a receive directory, and takes its lock. */
export async function openReceiveDir(dir: string): Promise<DirLock> {
  const abs = path.resolve(dir);
  const problem = receiveDirProblem(abs);
  if (problem !== undefined) throw new Error(problem);
  try {
    await fs.promises.mkdir(abs, { recursive: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new Error(`cannot make the receive directory ${abs}: ${code ?? (e as Error).message}`);
  }
  return lockDirFile(abs, RECEIVE_LOCK_NAME, `receive directory ${abs}`);
}
