/**
 * Request validation at the edge (nbdkit's validate_request): turns a request the volume
 * must not see into the NBD error to reply with. Pure; the volume below only asserts.
 *
 * Invariant: a request that passes has a known type, only flags that type accepts, a
 * range inside the export, a length <= MAX_PAYLOAD_BYTES for READ/WRITE and > 0 for
 * READ and BLOCK_STATUS, and never modifies a read-only export.
 */
import type { VolumeCapabilities } from '../volume/types';
import * as P from './protocol';
import type { Request } from './wire';

export interface ValidationContext {
  sizeBytes: number;
  caps: VolumeCapabilities;
  readOnly: boolean;
  structuredReplies: boolean;
  baseAllocation: boolean;
}

/** 0 if the request may go to the volume, else the NBD error to reply with. */
export function validateRequest(req: Request, c: ValidationContext): number {
  const allowed = P.ALLOWED_CMD_FLAGS[req.type];
  if (allowed === undefined) return P.EINVAL; // unknown command
  if ((req.flags & ~allowed) !== 0) return P.EINVAL;
  const end = req.offset + req.length;
  switch (req.type) {
    case P.CMD_READ:
      if (req.length > P.MAX_PAYLOAD_BYTES) return c.structuredReplies ? P.EOVERFLOW : P.EINVAL;
      if ((req.flags & P.CMD_FLAG_DF) !== 0 && !c.structuredReplies) return P.EINVAL;
      // As nbdkit: a zero-length READ is EINVAL (a data chunk must cover >= 1 byte).
      if (req.length === 0 || end > c.sizeBytes) return P.EINVAL;
      return 0;
    case P.CMD_WRITE:
      if (req.length > P.MAX_PAYLOAD_BYTES) return c.structuredReplies ? P.EOVERFLOW : P.EINVAL;
      if (c.readOnly) return P.EPERM;
      if (end > c.sizeBytes) return P.ENOSPC;
      return 0;
    case P.CMD_FLUSH:
      return 0;
    case P.CMD_TRIM:
      if (c.readOnly) return P.EPERM;
      if (!c.caps.canTrim) return P.EINVAL;
      if (end > c.sizeBytes) return P.EINVAL;
      return 0;
    case P.CMD_WRITE_ZEROES:
      if (c.readOnly) return P.EPERM;
      if (!c.caps.canZero) return P.EINVAL;
      if ((req.flags & P.CMD_FLAG_FAST_ZERO) !== 0 && !c.caps.canFastZero) return P.EINVAL;
      if (end > c.sizeBytes) return P.ENOSPC;
      return 0;
    case P.CMD_CACHE:
      if (!c.caps.canCache) return P.EINVAL;
      if (end > c.sizeBytes) return P.EINVAL;
      return 0;
    case P.CMD_BLOCK_STATUS:
      if (!c.structuredReplies || !c.baseAllocation) return P.EINVAL;
      if (req.length === 0 || end > c.sizeBytes) return P.EINVAL;
      return 0;
  }
  return P.EINVAL;
}
