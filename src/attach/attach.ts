/**
 * Serves a volume to the local kernel as /dev/nbdN, without TCP (like `qemu-nbd -c`):
 * one AF_UNIX socketpair per connection, the local end served by the NBD server in
 * transmission mode (no handshake, simple replies), the other end handed to the kernel.
 *
 * Invariants:
 * - Nothing is opened when the device is visibly busy: that check comes first.
 * - On any failure before the kernel took the sockets, everything opened so far (sockets,
 *   server, volume) is closed again before the error propagates.
 * - The kernel ends are closed here as soon as the kernel holds its own references, so
 *   if this process dies every connection hits end-of-file and the kernel fails I/O
 *   (bounded by timeoutS) instead of waiting forever.
 * - stop() runs at most once: flush the block device (the kernel sends us its dirty
 *   pages and a FLUSH), flush the volume, detach, wait (bounded) for every connection to
 *   close, close the volume. `ended` resolves after the volume is closed, whether the stop
 *   came from stop() or from outside (`nvmirror detach`, or the kernel dropping us).
 */
import * as fs from 'fs';
import * as net from 'net';
import type { Logger } from '../util/log';
import { assert } from '../util/assert';
import { NbdServer, transmissionFlags } from '../nbd/server';
import { openVolume, VolumeSpec, OpenedVolume } from '../volume/open';
import {
  AttachError,
  AttachMethod,
  deviceState,
  driverLoaded,
  kernelAttach,
  kernelDetach,
  MAX_CONNECTIONS,
  parseNbdDevice,
  socketPair,
  waitDetached,
} from './kernel';

/** How long stop() waits for the connections to close after the detach request. */
const CLOSE_WAIT_MS = 10_000;

export type EndedBy = 'stop' | 'detach' | 'lost';

export interface AttachOptions {
  spec: VolumeSpec;
  device: string;
  blockSizeBytes: number;
  connections: number;
  timeoutS: number;
  method: AttachMethod;
  logger: Logger;
}

export interface Attached {
  device: string;
  index: number;
  method: 'netlink' | 'ioctl';
  opened: OpenedVolume;
  /** Flushes, detaches the device and closes the volume. Idempotent. */
  stop(): Promise<void>;
  /**
   * Resolves once the device is detached and the volume closed, however that came about:
   * 'stop' (stop() was called), 'detach' (detached from outside, e.g. `nvmirror detach`),
   * 'lost' (every connection dropped, e.g. a request timed out, and we detached).
   */
  ended: Promise<{ by: EndedBy }>;
}

export async function attachVolume(o: AttachOptions): Promise<Attached> {
  const index = parseNbdDevice(o.device);
  assert(Number.isInteger(o.connections) && o.connections >= 1 && o.connections <= MAX_CONNECTIONS, 'connections out of range');
  if (driverLoaded()) {
    const st = deviceState(index);
    if (st.attached) {
      const by = st.pid !== undefined ? ` (attached by pid ${st.pid})` : '';
      throw new AttachError('EBUSY', `${o.device} is busy${by}: pick another /dev/nbdN or run \`nvmirror detach ${o.device}\``);
    }
  }
  const log = o.logger.child({ device: o.device });
  const opened = await openVolume(o.spec);
  const volume = opened.volume;
  const locals: net.Socket[] = [];
  const kernelFds: number[] = [];
  let server: NbdServer | undefined;
  try {
    if (volume.sizeBytes < o.blockSizeBytes || volume.sizeBytes % o.blockSizeBytes !== 0) {
      throw new AttachError('EINVAL', `the volume size (${volume.sizeBytes} bytes) is not a multiple of the block size ${o.blockSizeBytes}`);
    }
    if (o.connections > 1 && !volume.caps.canMultiConn) {
      throw new AttachError('EINVAL', `--connections ${o.connections}: this volume does not support multi-conn (a flush on one connection would not cover the others); use --connections 1`);
    }
    server = new NbdServer({ exports: opened.exports, logger: log, maxConnections: o.connections });
    const served: Array<{ closed: Promise<void>; close(): Promise<void> }> = [];
    for (let i = 0; i < o.connections; i++) {
      const [local, kernel] = socketPair();
      kernelFds.push(kernel);
      const sock = new net.Socket({ fd: local, readable: true, writable: true });
      locals.push(sock);
      served.push(server.serveTransmission(sock, volume, { exportName: o.spec.exportName }));
    }
    const flags = transmissionFlags(volume, false);
    const res = await kernelAttach({
      device: o.device,
      fds: kernelFds,
      sizeBytes: volume.sizeBytes,
      blockSizeBytes: o.blockSizeBytes,
      flags,
      timeoutS: o.timeoutS,
      deadConnTimeoutS: 0,
      method: o.method,
    });
    assert(res.index === index, `kernel attached nbd${res.index}, asked for nbd${index}`);
    for (const fd of kernelFds.splice(0)) fs.closeSync(fd);
    log.info({ method: res.method, connections: o.connections, sizeBytes: volume.sizeBytes, blockSizeBytes: o.blockSizeBytes, flags }, 'attached');
    return running(o, res.method, index, opened, server, served, log);
  } catch (e) {
    for (const fd of kernelFds) fs.closeSync(fd);
    for (const s of locals) s.destroy();
    if (server) await server.close().catch(() => undefined);
    await opened.close().catch(() => undefined);
    throw e;
  }
}

function running(
  o: AttachOptions,
  method: 'netlink' | 'ioctl',
  index: number,
  opened: OpenedVolume,
  server: NbdServer,
  served: Array<{ closed: Promise<void>; close(): Promise<void> }>,
  log: Logger,
): Attached {
  let stopping: Promise<void> | undefined;
  let by: EndedBy = 'detach';
  let resolveEnded!: (v: { by: EndedBy }) => void;
  const ended = new Promise<{ by: EndedBy }>((r) => (resolveEnded = r));
  const allClosed = Promise.all(served.map((s) => s.closed));

  const finish = async (): Promise<void> => {
    await server.close();
    await opened.close();
    log.info({ by }, 'detached; volume closed');
    resolveEnded({ by });
  };

  const stop = (): Promise<void> => {
    if (stopping) return stopping;
    by = 'stop';
    stopping = (async () => {
      await flushDevice(o.device, o.timeoutS * 1000, log);
      await opened.volume.flush();
      try {
        await kernelDetach(o.device);
      } catch (e) {
        if (!(e instanceof AttachError && e.code === 'ENOTATTACHED')) throw e;
      }
      const closedInTime = await Promise.race([allClosed.then(() => true), delay(CLOSE_WAIT_MS).then(() => false)]);
      if (!closedInTime) {
        log.warn('connections still open after the detach request; closing them');
        await Promise.all(served.map((s) => s.close()));
      }
      await finish();
    })();
    return stopping;
  };

  // Detached from outside (`nvmirror detach`), or the kernel dropped every connection
  // (e.g. a request timed out): clean up whatever configuration the kernel kept.
  void allClosed.then(async () => {
    if (stopping) return;
    stopping = (async () => {
      log.info('every connection to the kernel closed');
      // A detach from outside is finishing in the kernel; a connection loss leaves the
      // configuration (dead sockets) in place until someone detaches it: do that here.
      if (!(await waitDetached(index, 2000))) {
        by = 'lost';
        log.error(`the kernel dropped every connection (a request got no reply within ${o.timeoutS} s?); detaching ${o.device}`);
        await kernelDetach(o.device).catch((e: unknown) => log.warn({ err: (e as Error).message }, 'detach after connection loss failed'));
        await waitDetached(index, CLOSE_WAIT_MS);
      }
      await opened.volume.flush().catch((e: unknown) => log.error({ err: (e as Error).message }, 'flush failed'));
      await finish();
    })();
  });

  return { device: o.device, index, method, opened, stop, ended };
}

/**
 * fsync on the block device: the kernel writes back its dirty pages for it and sends a
 * FLUSH. Bounded: if it takes longer than limitMs we go on (the detach fails the rest).
 */
async function flushDevice(device: string, limitMs: number, log: Logger): Promise<void> {
  const mountedAt = mountPoints(device);
  if (mountedAt.length > 0) {
    log.warn({ mountedAt }, `${device} is still mounted: unmount it first; detaching anyway, the filesystem will see I/O errors`);
  }
  const work = (async () => {
    const h = await fs.promises.open(device, fs.constants.O_RDONLY);
    try {
      await h.sync();
    } finally {
      await h.close();
    }
  })();
  const done = await Promise.race([work.then(() => true), delay(limitMs).then(() => false)]).catch((e: unknown) => {
    log.warn({ err: (e as Error).message }, 'flushing the device failed');
    return true;
  });
  if (!done) log.warn({ limitMs }, 'flushing the device is taking too long; detaching anyway');
}

/** Where the device is mounted, from /proc/self/mountinfo (matched by major:minor). */
export function mountPoints(device: string): string[] {
  let rdev: number;
  let info: string;
  try {
    rdev = fs.statSync(device).rdev;
    info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  // Linux dev_t encoding (glibc): major in bits 8..19 and 32..43, minor in 0..7 and 20..31.
  const major = ((rdev >>> 8) & 0xfff) | Math.floor(rdev / 2 ** 32) & ~0xfff;
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  const id = `${major}:${minor}`;
  const out: string[] = [];
  for (const line of info.split('\n')) {
    const f = line.split(' ');
    if (f[2] === id && f[4] !== undefined) out.push(f[4]);
  }
  return out;
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}
