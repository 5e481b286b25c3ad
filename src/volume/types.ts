/**
 * The block-device interface that the NBD layer serves. Every backend (memory, raw
 * file, the NVRAM/CP engine, a read-only snapshot or mirror view) implements it.
 *
 * Invariants the NBD layer guarantees before calling (validate at the edge):
 * - offset + length <= sizeBytes, lengths are > 0 and <= maxPayloadBytes for read/write;
 * - write/trim/zero are never called on a read-only volume.
 * Backends assert these, they do not turn them into errors.
 *
 * Errors: a backend rejects with VolumeError (src/util/errors.ts); the NBD layer maps
 * its `code` to an NBD error number in one place.
 */

export { EXTENT_HOLE, EXTENT_ZERO, type Extent } from '../util/extent';
import type { Extent } from '../util/extent';

export interface ZeroOptions {
  /** The client asked that zeroing not create a hole (NBD_CMD_FLAG_NO_HOLE). */
  noHole: boolean;
  /** Fail with ENOTSUP unless zeroing is fast (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero: boolean;
  fua: boolean;
}

export interface VolumeCapabilities {
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canCache: boolean;
  /** True only if a flush on any handle covers writes completed on every handle. */
  canMultiConn: boolean;
  rotational: boolean;
  /** NBD block size constraints. */
  minBlockSizeBytes: number;
  preferredBlockSizeBytes: number;
  maxPayloadBytes: number;
}

export interface Volume {
  readonly sizeBytes: number;
  readonly caps: VolumeCapabilities;
  /** Short human description (NBD_INFO_DESCRIPTION). */
  readonly description: string;

  /** Reads `length` bytes at `offset` into a fresh buffer (or `dst` if given, which must be exactly length bytes). */
  read(offset: number, length: number, dst?: Buffer): Promise<Buffer>;
  /**
   * Writes data; when fua, resolves only once the data is on stable storage. The volume
   * must not keep a reference to `data` once the promise settles (the NBD layer reuses
   * payload buffers).
   */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Resolves once every write that resolved before this call is on stable storage. */
  flush(): Promise<void>;
  /** Discards a range (may punch a hole; reads afterwards return zeroes or old data per NBD; ours return zeroes). */
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  /** Writes zeroes over a range. */
  zero(offset: number, length: number, opts: ZeroOptions): Promise<void>;
  /** Hint to prefetch; may do nothing. */
  cache(offset: number, length: number): Promise<void>;
  /**
   * Extents covering at least the first byte of [offset, offset+length), in order,
   * contiguous from offset, total length <= length, each lengthBytes > 0.
   * `maxExtents` caps the count (REQ_ONE asks for 1).
   */
  blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]>;
  /** Flushes and releases resources; no further calls after it resolves. */
  /** Called once when an NBD connection that looked this volume up ends (views pinned per connection release their root). */
  detach?(): void;
  /** Lets the volume end the connection that looked it up (e.g. a mirror reader pinned too long); called once per connection. */
  onRevoke?(revoke: () => void): void;
  /**
   * A file descriptor to which a plain write (not FUA) inside sizeBytes may be done with
   * pwrite directly, bypassing write(), with the same effect (the native NBD data path
   * writes such payloads from its thread: src/nbd/native-transmission.ts); undefined if
   * the volume has none (memory, engine, read-only). The caller dups it.
   */
  directWriteFd?(): number | undefined;
  /**
   * A native store (native/nbd_serve.cc MemStore) into which the native NBD data path may
   * copy a plain write whose range lies in chunks that already hold data, with the same
   * effect as write(); the volume keeps it in step with its chunks. Undefined if none
   * (file, engine, read-only).
   */
  directWriteStore?(): object | undefined;
  /**
   * A native block map (native/read_map.h) from which the native NBD data path may answer
   * a plain READ of whole blocks with the same bytes read() would return; the volume keeps
   * it in step with its writes. Undefined if none (file, memory, RAID engine volumes).
   */
  directReadMap?(): object | undefined;
  /**
   * A native NVRAM appender (native/nv_append.h) to which the native NBD data path may
   * append a plain WRITE of whole blocks and answer it, with the same effect as write();
   * the volume takes the records in. Undefined if none (file, memory, read-only).
   */
  directAppender?(): object | undefined;
  /** The native data path answered WRITEs through directAppender or directWriteStore (called once per batch). */
  directWritesDone?(): void;
  /**
   * The native data path's fdatasync for a FLUSH through directAppender failed with this
   * errno (it answered EIO): the volume must fail as its own failed sync would.
   */
  directFlushFailed?(errno: number): void;
  close(): Promise<void>;
}
