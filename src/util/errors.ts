/** Errors a backend may raise. `code` is mapped to an NBD error in src/nbd/errors.ts. */
export type VolumeErrorCode = 'EIO' | 'ENOSPC' | 'EPERM' | 'EINVAL' | 'ENOTSUP' | 'ENOMEM' | 'ESHUTDOWN' | 'EOVERFLOW';

export class VolumeError extends Error {
  readonly code: VolumeErrorCode;
  constructor(code: VolumeErrorCode, message: string) {
    super(message);
    this.name = 'VolumeError';
    this.code = code;
  }
}

export function isVolumeError(e: unknown): e is VolumeError {
  return e instanceof VolumeError;
}
