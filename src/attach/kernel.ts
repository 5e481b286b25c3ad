/**
 * Typed access to the kernel nbd driver through the addon (native/nbd_attach.cc):
 * socketpair(), attach (generic netlink "nbd" family, falling back to the ioctls) and
 * detach, plus the device state the kernel shows in sysfs. Every failure becomes an
 * AttachError with a one-line message a user can act on (errors are worded here and
 * only here).
 *
 * Invariants:
 * - A device name is accepted only as /dev/nbdN (N without leading zeroes, <= MAX_INDEX);
 *   everything else is refused before native code runs.
 * - Arguments are validated here with precise messages; the addon re-checks them.
 * - attach resolves only once the kernel accepted every socket; after that the caller
 *   owns the local ends and may close its copies of the kernel ends.
 */
import * as fs from 'fs';
import { addon } from '../io/native';

export const MAX_CONNECTIONS = 16; // == kMaxConnections in native/nbd_attach.cc
export const MAX_INDEX = 65535;
export const MAX_TIMEOUT_S = 86400;
export const BLOCK_SIZES_BYTES = [512, 1024, 2048, 4096] as const;

export type AttachMethod = 'auto' | 'netlink' | 'ioctl';

/** The nbd part of the addon (the declaration in src/io/native.ts is the short form). */
interface NbdAddon {
  socketpair(): [number, number];
  nbdAttach(
    device: string,
    fds: number[],
    sizeBytes: number,
    blockSizeBytes: number,
    flags: number,
    timeoutS: number,
    opts: { method: AttachMethod; deadConnTimeoutS: number },
    cb: (err: Error | null, index: number, method: 'netlink' | 'ioctl') => void,
  ): void;
  nbdDetach(device: string, cb: (err: Error | null) => void): void;
}

function nbd(): NbdAddon {
  const a = addon() as unknown as Partial<NbdAddon>;
  if (typeof a.nbdAttach !== 'function' || typeof a.nbdDetach !== 'function' || typeof a.socketpair !== 'function') {
    throw new AttachError('ENOSYS', 'this build of the nvmirror addon has no kernel nbd support (rebuild with `npx node-gyp rebuild`)');
  }
  return a as NbdAddon;
}

export type AttachErrorCode = 'ENODRIVER' | 'EBUSY' | 'EPERM' | 'ENODEV' | 'EINVAL' | 'ENOTATTACHED' | 'ENOSYS' | 'EIO';

export class AttachError extends Error {
  readonly code: AttachErrorCode;
  constructor(code: AttachErrorCode, message: string) {
    super(message);
    this.name = 'AttachError';
    this.code = code;
  }
}

/** The index N of "/dev/nbdN"; throws AttachError('EINVAL') for any other name. */
export function parseNbdDevice(device: string): number {
  const m = /^\/dev\/nbd(0|[1-9][0-9]{0,4})$/.exec(device);
  const index = m ? Number(m[1]) : NaN;
  if (!m || index > MAX_INDEX) throw new AttachError('EINVAL', `bad device "${device}": expected /dev/nbdN, e.g. /dev/nbd0`);
  return index;
}

export interface DeviceState {
  /** The kernel has a live configuration for the device (connected, or dead sockets not yet detached). */
  attached: boolean;
  /** Process that attached it, as the kernel records it. */
  pid?: number;
  sizeBytes?: number;
}

/** What sysfs says about /dev/nbdN right now (the "pid" file exists while configured). */
export function deviceState(index: number): DeviceState {
  const base = `/sys/block/nbd${index}`;
  let pid: number | undefined;
  try {
    pid = Number(fs.readFileSync(`${base}/pid`, 'utf8').trim());
  } catch {
    return { attached: false };
  }
  let sizeBytes: number | undefined;
  try {
    sizeBytes = Number(fs.readFileSync(`${base}/size`, 'utf8').trim()) * 512;
  } catch {
    sizeBytes = undefined;
  }
  return { attached: true, ...(Number.isSafeInteger(pid) ? { pid } : {}), ...(sizeBytes !== undefined ? { sizeBytes } : {}) };
}

/** True when this kernel has the nbd driver loaded (it may still be loadable on demand). */
export function driverLoaded(): boolean {
  return fs.existsSync('/sys/module/nbd') || fs.existsSync('/dev/nbd0');
}

/** A connected AF_UNIX stream pair, both ends close-on-exec. */
export function socketPair(): [number, number] {
  const pair = nbd().socketpair();
  if (!Array.isArray(pair) || pair.length !== 2) throw new AttachError('EIO', 'socketpair returned no pair');
  return pair;
}

export interface KernelAttachOptions {
  device: string;
  /** Kernel ends of the connections, 1..MAX_CONNECTIONS. */
  fds: number[];
  sizeBytes: number;
  blockSizeBytes: number;
  /** NBD transmission flags (HAS_FLAGS, READ_ONLY, SEND_FLUSH, ...). */
  flags: number;
  /** Per-request timeout; after it the kernel drops the connection and fails the request. */
  timeoutS: number;
  /** How long the kernel waits for a reconnect once every connection is dead (0: fail at once). */
  deadConnTimeoutS: number;
  method: AttachMethod;
}

export interface KernelAttachResult {
  index: number;
  method: 'netlink' | 'ioctl';
}

function checkInt(name: string, v: number, min: number, max: number): void {
  if (!Number.isSafeInteger(v) || v < min || v > max) throw new AttachError('EINVAL', `${name} must be an integer from ${min} to ${max}, got ${v}`);
}

/** Hands the sockets to the kernel; resolves once /dev/nbdN is live. */
export function kernelAttach(o: KernelAttachOptions): Promise<KernelAttachResult> {
  const index = parseNbdDevice(o.device);
  if (o.fds.length < 1 || o.fds.length > MAX_CONNECTIONS) throw new AttachError('EINVAL', `1 to ${MAX_CONNECTIONS} connections, got ${o.fds.length}`);
  for (const fd of o.fds) checkInt('fd', fd, 0, 0x7fffffff);
  if (!(BLOCK_SIZES_BYTES as readonly number[]).includes(o.blockSizeBytes)) {
    throw new AttachError('EINVAL', `block size must be one of ${BLOCK_SIZES_BYTES.join(', ')}, got ${o.blockSizeBytes}`);
  }
  checkInt('size', o.sizeBytes, o.blockSizeBytes, Number.MAX_SAFE_INTEGER);
  if (o.sizeBytes % o.blockSizeBytes !== 0) {
    throw new AttachError('EINVAL', `the volume size ${o.sizeBytes} is not a multiple of the block size ${o.blockSizeBytes}`);
  }
  checkInt('flags', o.flags, 0, 0xffff);
  checkInt('timeout', o.timeoutS, 1, MAX_TIMEOUT_S);
  checkInt('dead-connection timeout', o.deadConnTimeoutS, 0, MAX_TIMEOUT_S);
  const n = nbd();
  return new Promise((resolve, reject) => {
    n.nbdAttach(o.device, o.fds, o.sizeBytes, o.blockSizeBytes, o.flags, o.timeoutS, { method: o.method, deadConnTimeoutS: o.deadConnTimeoutS }, (err, got, method) => {
      if (err) reject(describe(err, o.device, index, 'attach'));
      else resolve({ index: got, method });
    });
  });
}

/** Disconnects /dev/nbdN, whoever attached it. Rejects with ENOTATTACHED if it is not attached. */
export async function kernelDetach(device: string): Promise<void> {
  const index = parseNbdDevice(device);
  const n = nbd();
  if (!driverLoaded()) throw new AttachError('ENOTATTACHED', `${device} is not attached (the nbd driver is not loaded)`);
  if (!deviceState(index).attached) throw new AttachError('ENOTATTACHED', `${device} is not attached`);
  await new Promise<void>((resolve, reject) => {
    n.nbdDetach(device, (err) => (err ? reject(describe(err, device, index, 'detach')) : resolve()));
  });
}

/** Resolves once sysfs no longer shows the device as configured, or after timeoutMs (false). */
export async function waitDetached(index: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!deviceState(index).attached) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The one place native nbd errors become user-facing messages. */
function describe(err: Error, device: string, index: number, what: 'attach' | 'detach'): AttachError {
  const e = err as Error & { code?: string; syscall?: string };
  const code = e.code ?? '';
  const call = e.syscall ?? '';
  if (code === 'ENODEV' && call === 'nbd-driver') return new AttachError('ENODRIVER', 'no nbd driver in this kernel: run `modprobe nbd`');
  if (code === 'EPERM' || code === 'EACCES') {
    return new AttachError('EPERM', `permission denied: ${what}ing ${device} needs root (CAP_SYS_ADMIN); run nvmirror ${what} as root`);
  }
  if (code === 'EBUSY' || (what === 'attach' && code === 'EINVAL' && call.startsWith('ioctl') && deviceState(index).attached)) {
    const st = deviceState(index);
    const by = st.pid !== undefined ? ` (attached by pid ${st.pid})` : '';
    return new AttachError('EBUSY', `${device} is busy${by}: pick another /dev/nbdN or run \`nvmirror detach ${device}\``);
  }
  if (code === 'ENOENT' && call === 'open') {
    return new AttachError('ENODEV', `${device} does not exist: the nbd driver has fewer devices (load it with \`modprobe nbd nbds_max=${index + 1}\`)`);
  }
  if (code === 'EINVAL' && what === 'attach') {
    return new AttachError('EINVAL', `the kernel refused to attach ${device} (${call}: EINVAL); see dmesg for the reason`);
  }
  return new AttachError('EIO', `${what} ${device} failed: ${e.message}`);
}
