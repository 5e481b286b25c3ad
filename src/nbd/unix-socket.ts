/**
 * Checks a Unix socket path before listening on it. The only thing ever removed is a
 * stale socket: a socket file that nothing answers on (a server that died).
 *
 * Invariants:
 * - An existing path that is not a socket (a regular file, a directory, a symlink...)
 *   is never removed: refused with an error naming what it is.
 * - A socket that answers is in use: refused.
 * - A missing parent directory is reported as such (not as "permission denied").
 */
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';

/** How long a connect to an existing socket may take before we call it stale. */
const PROBE_TIMEOUT_MS = 2_000;

function describe(st: fs.Stats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isBlockDevice() || st.isCharacterDevice()) return 'a device';
  return 'not a socket';
}

function answers(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(p);
    const t = setTimeout(() => {
      c.destroy();
      resolve(true); // it accepted the connection attempt but is slow: treat as in use
    }, PROBE_TIMEOUT_MS);
    c.once('connect', () => {
      clearTimeout(t);
      c.destroy();
      resolve(true);
    });
    c.once('error', () => {
      clearTimeout(t);
      resolve(false);
    });
  });
}

/** Throws a one-line Error unless `p` can be listened on; removes a stale socket. */
export async function prepareUnixSocketPath(p: string): Promise<void> {
  const dir = path.dirname(p);
  const dst = fs.statSync(dir, { throwIfNoEntry: false });
  if (!dst) throw new Error(`cannot listen on ${p}: directory ${dir} does not exist`);
  if (!dst.isDirectory()) throw new Error(`cannot listen on ${p}: ${dir} is not a directory`);
  const st = fs.lstatSync(p, { throwIfNoEntry: false });
  if (!st) return;
  if (!st.isSocket()) throw new Error(`refusing to listen on ${p}: it exists and is ${describe(st)}, not a stale socket (remove it yourself if it is not needed)`);
  if (await answers(p)) throw new Error(`socket ${p} is in use by another server`);
  fs.unlinkSync(p);
}

/**
 * The path a listening Unix socket fd is bound to (Linux: the fd's inode looked up in
 * /proc/net/unix), or undefined when it cannot be told (abstract, unnamed, no /proc).
 * Node's server.address() knows only paths it bound itself.
 */
export function unixSocketPathOfFd(fd: number): string | undefined {
  try {
    const m = /^socket:\[([0-9]+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`));
    if (!m) return undefined;
    for (const line of fs.readFileSync('/proc/net/unix', 'utf8').split('\n')) {
      const f = line.trim().split(/\s+/);
      if (f[6] === m[1] && f[7] !== undefined && f[7].startsWith('/')) return f[7];
    }
  } catch {
    // no /proc: the caller prints the fd instead
  }
  return undefined;
}
