/**
 * Socket activation: systemd's LISTEN_FDS protocol (sd_listen_fds(3)), as nbdkit
 * honours it. The service manager opens the listening sockets and passes them as fds
 * 3 .. 3+LISTEN_FDS-1, with LISTEN_PID set to the pid that is meant to take them.
 *
 * Limits: LISTEN_FDS_MAX (a typo or hostile environment cannot make us adopt thousands
 * of fds).
 *
 * Invariants:
 * - Sockets are taken only when LISTEN_PID is exactly our pid: a LISTEN_PID of another
 *   process (inherited by a child of the activated process) is refused, the fds are not
 *   touched and the reason is returned, never thrown.
 * - Once taken, LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from our
 *   environment, so no child of ours adopts them too (sd_listen_fds(unset_environment=1)).
 * - A malformed LISTEN_FDS / LISTEN_PID is an error (one line), not a silent default.
 */
import { assert } from '../util/assert';

/** The first passed fd (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;
/** Most sockets we adopt from one activation. */
export const LISTEN_FDS_MAX = 64;

export interface ActivatedSocket {
  fd: number;
  /** From LISTEN_FDNAMES (colon-separated), if given; systemd's default is "unknown". */
  name: string | undefined;
}

export type Activation =
  | { kind: 'none' }
  | { kind: 'refused'; reason: string }
  | { kind: 'activated'; sockets: ActivatedSocket[] };

const DECIMAL = /^[0-9]{1,10}$/;

/**
 * Reads the activation variables from `env` for process `pid`. Pure apart from
 * `unset`: when sockets are taken, the variables are deleted from `env`.
 */
export function takeListenFds(env: NodeJS.ProcessEnv, pid: number, unset = true): Activation {
  const pidText = env['LISTEN_PID'];
  const fdsText = env['LISTEN_FDS'];
  if (pidText === undefined && fdsText === undefined) return { kind: 'none' };
  if (pidText === undefined || fdsText === undefined) throw new Error('socket activation needs both LISTEN_PID and LISTEN_FDS in the environment');
  if (!DECIMAL.test(pidText)) throw new Error(`bad LISTEN_PID=${JSON.stringify(pidText)}: expected a process id`);
  if (!DECIMAL.test(fdsText)) throw new Error(`bad LISTEN_FDS=${JSON.stringify(fdsText)}: expected a count of sockets`);
  const listenPid = Number(pidText);
  if (listenPid !== pid) return { kind: 'refused', reason: `LISTEN_PID=${listenPid} is not this process (pid ${pid}): the sockets are not ours` };
  const count = Number(fdsText);
  if (count === 0) throw new Error('LISTEN_FDS=0: socket activation passed no sockets');
  if (count > LISTEN_FDS_MAX) throw new Error(`LISTEN_FDS=${count} is more than ${LISTEN_FDS_MAX} sockets`);
  const names = env['LISTEN_FDNAMES']?.split(':');
  const sockets: ActivatedSocket[] = [];
  for (let i = 0; i < count; i++) sockets.push({ fd: LISTEN_FDS_START + i, name: names?.[i] });
  if (unset) {
    delete env['LISTEN_PID'];
    delete env['LISTEN_FDS'];
    delete env['LISTEN_FDNAMES'];
  }
  assert(sockets.length === count && sockets[0]?.fd === LISTEN_FDS_START, 'fds start at LISTEN_FDS_START');
  return { kind: 'activated', sockets };
}
