/**
 * The one place that maps internal errors to NBD wire errors. The real cause is logged
 * first; the client only sees an errno. errorKind() names the same mapping for metrics.
 */
import type { Logger } from '../util/log';
import { isVolumeError } from '../util/errors';
import { LogBurst } from '../util/log-burst';
import * as P from './protocol';

const BY_CODE: Record<string, number> = {
  EPERM: P.EPERM,
  EROFS: P.EPERM,
  EIO: P.EIO,
  ENOMEM: P.ENOMEM,
  EINVAL: P.EINVAL,
  ENOSPC: P.ENOSPC,
  EDQUOT: P.ENOSPC,
  EFBIG: P.ENOSPC,
  EOVERFLOW: P.EOVERFLOW,
  ENOTSUP: P.ENOTSUP,
  EOPNOTSUPP: P.ENOTSUP,
  ESHUTDOWN: P.ESHUTDOWN,
};

/**
 * Failed requests are logged one by one up to a burst per error code, then counted (a
 * volume that stops taking writes fails every request of every client the same way).
 */
const bursts = new Map<string, { burst: LogBurst; logger: Logger }>();

function burstFor(code: string, logger: Logger): LogBurst {
  let b = bursts.get(code);
  if (!b) {
    const entry: { burst: LogBurst; logger: Logger } = {
      logger,
      burst: new LogBurst((n, ms) => entry.logger.error({ code, requests: n }, `${n} more request(s) failed with ${code || 'an error'} within ${ms / 1000} s (one line each left out)`)),
    };
    bursts.set(code, entry);
    b = entry;
  }
  b.logger = logger;
  return b.burst;
}

export function toNbdError(e: unknown, logger: Logger, what: string): number {
  const code = typeof e === 'object' && e !== null && 'code' in e ? String((e as { code: unknown }).code) : '';
  const nbd = BY_CODE[code] ?? P.EIO;
  const message = e instanceof Error ? e.message : String(e);
  if (isVolumeError(e) && (code === 'ENOTSUP' || code === 'ENOSPC')) {
    logger.debug({ err: message, code }, `${what} failed`);
  } else if (burstFor(code, logger).take()) {
    logger.error({ err: message, code, stack: e instanceof Error && !isVolumeError(e) ? e.stack : undefined }, `${what} failed`);
  }
  return nbd;
}

const NAME_BY_NBD: Record<number, string> = {
  [P.EPERM]: 'EPERM',
  [P.EIO]: 'EIO',
  [P.ENOMEM]: 'ENOMEM',
  [P.EINVAL]: 'EINVAL',
  [P.ENOSPC]: 'ENOSPC',
  [P.EOVERFLOW]: 'EOVERFLOW',
  [P.ENOTSUP]: 'ENOTSUP',
  [P.ESHUTDOWN]: 'ESHUTDOWN',
};

/**
 * The kind of a failed reply, for metrics: the errno name sent, or "checksum" when the
 * cause is a block that failed its checksum (the block tree's EIO says so).
 */
export function errorKind(nbdErrno: number, cause?: unknown): string {
  if (nbdErrno === P.EIO && isVolumeError(cause) && /checksum mismatch/.test(cause.message)) return 'checksum';
  return NAME_BY_NBD[nbdErrno] ?? `errno_${nbdErrno}`;
}
