/**
 * The volume directory's lock, DIR/nvmirror.lock: flock'ed exclusively by the one process
 * that has the volume open; a read-write holder writes its pid there (emptied on release).
 *
 * Invariants:
 * - A volume is open in at most one process: open takes the lock before touching
 *   anything else and keeps it until close() has closed everything.
 * - Read-only opens write nothing in DIR: they open the lock file O_RDONLY, and on a
 *   read-only file system where it does not exist they go without it (no process can
 *   hold a lock there, and none can write the volume).
 */
import * as fs from 'fs';
import * as path from 'path';
import * as native from '../io/native';

export const LOCK_NAME = 'nvmirror.lock';

export interface DirLock {
  release(): Promise<void>;
}

const NO_LOCK: DirLock = { release: () => Promise.resolve() };

export function isReadOnlyFs(e: unknown): boolean {
  return native.errnoCode(e) === 'EROFS';
}

/** Opens the lock file: read-write (created if missing), or for a read-only open without writing anything; undefined when there is no lock file on a read-only file system. */
async function openLockFile(dir: string, name: string, what: string, readOnly: boolean): Promise<fs.promises.FileHandle | undefined> {
  const p = path.join(dir, name);
  if (readOnly) {
    try {
      return await fs.promises.open(p, fs.constants.O_RDONLY);
    } catch (e) {
      if (native.errnoCode(e) !== 'ENOENT') throw new Error(`cannot open the lock file ${p}: ${(e as Error).message}`);
    }
  }
  try {
    return await fs.promises.open(p, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (e) {
    if (isReadOnlyFs(e)) {
      if (readOnly) return undefined;
      throw new Error(`${what} is on a read-only file system${name === LOCK_NAME ? ': it can only be opened read-only (serve --read-only, status, check)' : ''}`);
    }
    throw new Error(`cannot open the lock file ${p}: ${(e as Error).message}`);
  }
}

const LOCK_PID_MAX_BYTES = 32;
/** How long taking the lock waits for a holder that wrote no pid (a read-only look) to let go. */
const READER_LOCK_WAIT_MS = 3_000;

/** The pid a lock file names, if it names a live process (a kill -9 leaves a stale one, and read-only holders write none). */
async function lockHolderPid(fh: fs.promises.FileHandle): Promise<number | undefined> {
  let pid = 0;
  try {
    const buf = Buffer.alloc(LOCK_PID_MAX_BYTES);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const m = /^(\d{1,10})\n/.exec(buf.toString('latin1', 0, bytesRead));
    pid = m ? Number(m[1]) : 0;
    if (pid <= 0 || pid === process.pid) return undefined;
    process.kill(pid, 0); // signal 0: only whether it exists
    return pid;
  } catch (e) {
    return native.errnoCode(e) === 'EPERM' && pid > 0 ? pid : undefined; // EPERM: alive, another user's
  }
}

/**
 * Takes the volume's exclusive lock; throws "volume DIR is already in use by another
 * process (pid N)". A read-write holder writes its pid into the lock file (and empties
 * it on release), so the error can name it. `readOnly`: writes nothing in DIR (see the
 * invariants above).
 */
export function lockVolumeDir(dir: string, readOnly = false): Promise<DirLock> {
  return lockDirFile(dir, LOCK_NAME, `volume ${dir}`, readOnly);
}

/**
 * The same lock on another file of a directory: `DIR/name`, flock'ed exclusively, the
 * holder's pid written in it; throws "WHAT is already in use by another process (pid N)".
 * (`receive` holds one on its directory: mirror/receiver.ts.)
 */
export async function lockDirFile(dir: string, name: string, what: string, readOnly = false): Promise<DirLock> {
  let fh: fs.promises.FileHandle | undefined;
  let locked = false;
  let holder: number | undefined;
  const t0 = Date.now();
  for (;;) {
    fh = await openLockFile(dir, name, what, readOnly);
    if (fh === undefined) return NO_LOCK;
    try {
      locked = native.flockExclusive(fh.fd);
      if (!locked) holder = await lockHolderPid(fh);
    } finally {
      if (!locked) await fh.close();
    }
    // A holder that wrote no pid is a read-only look (status, check of an unserved volume):
    // it lets go within moments, so a serve starting meanwhile waits instead of failing.
    if (locked || holder !== undefined || Date.now() - t0 >= READER_LOCK_WAIT_MS) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!locked) throw new Error(`${what} is already in use by another process${holder !== undefined ? ` (pid ${holder})` : ''}`);
  if (!readOnly) {
    await fh.truncate(0);
    await fh.write(`${process.pid}\n`, 0);
  }
  let released = false;
  return {
    release: async () => {
      if (released) return;
      released = true;
      if (!readOnly) await fh.truncate(0).catch(() => undefined);
      await fh.close(); // closing the last descriptor drops the flock
    },
  };
}

/** True if another process holds the volume's lock (it is being served). */
export async function volumeDirInUse(dir: string): Promise<boolean> {
  try {
    const l = await lockVolumeDir(dir, true);
    await l.release();
    return false;
  } catch (e) {
    if (e instanceof Error && e.message.includes('already in use')) return true;
    throw e;
  }
}
