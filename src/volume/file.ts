/**
 * FileVolume (`serve --file PATH`): a raw image file, like nbdkit's file plugin. All I/O
 * goes through the native addon off the event loop on one shared fd.
 *
 * Invariants:
 * - sizeBytes is the file size at open; requests lie inside it (asserted: the NBD layer
 *   validated them). A read past a shorter file (truncated under us) returns zeroes.
 * - FLUSH = fdatasync of the one shared fd, so it covers writes completed on every NBD
 *   connection (canMultiConn). FUA = pwrite + fdatasync in one native job.
 * - Concurrent flushes share syncs: a flush joins the next fdatasync that starts after it
 *   was called, never one already running (which might not cover its writes).
 * - fsync errors are fatal: after a failed fdatasync (the kernel may have dropped the
 *   dirty pages) every later flush/FUA/close fails with EIO; we never report durability
 *   we cannot prove.
 * - TRIM and WRITE_ZEROES leave the range reading as zeroes: punch hole / zero range when
 *   the file system supports them (remembered after the first ENOTSUP), else written
 *   zeroes; with FAST_ZERO, the written-zeroes path fails with ENOTSUP instead.
 * - Reads (and writes, where the file system allows) first try a page-cache-only copy on
 *   the event loop (RWF_NOWAIT, <= 128 KiB: a few microseconds, never waits for the disk);
 *   whatever that did not transfer goes through the thread pool. The first "unsupported"
 *   answer turns the attempt off for this volume.
 * - Plain (non-FUA) writes up to WRITE_BATCH_ITEM_MAX_BYTES made in the same tick go to
 *   the thread pool as one batch job (one hop for the lot, not one each); each write's
 *   promise settles with its own outcome. A batch holds at most PWRITE_BATCH_MAX writes
 *   and WRITE_BATCH_MAX_BYTES.
 * - No call is accepted after close(); close() is idempotent.
 */
import * as fs from 'fs';
import * as path from 'path';
import { promisify } from 'util';
import { assert } from '../util/assert';
import { formatSize } from '../util/size';
import * as native from '../io/native';
import { syncDirectory } from '../io/file-device';
import { VolumeError, VolumeErrorCode, isVolumeError } from '../util/errors';
import { EXTENT_HOLE, EXTENT_ZERO, Extent, Volume, VolumeCapabilities, ZeroOptions } from './types';

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);
const fsyncAsync = promisify(fs.fsync);

export const FILE_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** Largest image we serve: 2^52 bytes keeps every offset exact in a JS number. */
export const FILE_VOLUME_SIZE_MAX_BYTES = 2 ** 52;
/** Plain writes up to this size are batched; larger ones go alone (they amortise the hop). */
const WRITE_BATCH_ITEM_MAX_BYTES = 256 * 1024;
/** A batch is submitted at once when it holds this many bytes. */
const WRITE_BATCH_MAX_BYTES = 8 * 1024 * 1024;

interface WriteBatch {
  bufs: Buffer[];
  positions: number[];
  waiters: Array<{ resolve: () => void; reject: (e: unknown) => void }>;
  bytes: number;
}

/** The slow zeroing path writes at most this much per pwrite. */
const ZERO_WRITE_CHUNK_BYTES = 1024 * 1024;
/** blockStatus issues at most this many lseek calls per request (bounded work). */
const BLOCK_STATUS_SEEKS_MAX = 1024;
/** Largest transfer tried synchronously on the event loop (page cache only). */
const NOWAIT_BYTES_MAX = 128 * 1024;

/** Shared, never written: the source of the slow zeroing path. */
let zeroBuffer: Buffer | undefined;
function zeroes(): Buffer {
  zeroBuffer ??= Buffer.alloc(ZERO_WRITE_CHUNK_BYTES);
  return zeroBuffer;
}

export interface FileVolumeOptions {
  readOnly?: boolean;
  /** Take an exclusive flock on the image; fail if another process holds it. Default false. */
  lock?: boolean;
}

export interface FileVolumeCreateOptions {
  /** Reserve the space now (fallocate) instead of leaving a sparse file. */
  preallocate?: boolean;
  lock?: boolean;
}

/** Maps an addon/fs error to a VolumeError, keeping the real cause in the message. */
export function toVolumeError(e: unknown, what: string): VolumeError {
  if (isVolumeError(e)) return e;
  const code = native.errnoCode(e);
  let mapped: VolumeErrorCode = 'EIO';
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') mapped = 'ENOSPC';
  else if (code === 'EROFS' || code === 'EPERM' || code === 'EACCES') mapped = 'EPERM';
  else if (code === 'ENOTSUP' || code === 'EOPNOTSUPP') mapped = 'ENOTSUP';
  else if (code === 'EINVAL') mapped = 'EINVAL';
  else if (code === 'ENOMEM') mapped = 'ENOMEM';
  const detail = e instanceof Error ? e.message : String(e);
  return new VolumeError(mapped, `${what}: ${detail}`);
}

function openError(e: unknown, filePath: string): Error {
  const code = native.errnoCode(e);
  if (code === 'ENOENT') return new Error(`no such file: ${filePath}`);
  if (code === 'EACCES' || code === 'EPERM') return new Error(`permission denied: ${filePath}`);
  if (code === 'EISDIR') return new Error(`not a regular file: ${filePath}`);
  if (code === 'EEXIST') return new Error(`file exists: ${filePath}`);
  if (code === 'EROFS') return new Error(`read-only file system: ${filePath} (use --read-only)`);
  return new Error(`cannot open ${filePath}: ${e instanceof Error ? e.message : String(e)}`);
}

export class FileVolume implements Volume {
  readonly path: string;
  readonly sizeBytes: number;
  readonly caps: VolumeCapabilities;
  readonly description: string;
  private readonly fd: number;
  private closed = false;
  /** Set after the first failed fdatasync; every later durability promise fails. */
  private syncError: VolumeError | undefined;
  private syncRunning: Promise<void> | undefined;
  private syncQueued: Promise<void> | undefined;
  private canPunchHole = true;
  private canZeroRange = true;
  private canAllocate = true;
  private tryNowaitReads = true;
  private tryNowaitWrites = true;
  /** Plain writes gathered in this tick, submitted together at its end. */
  private batch: WriteBatch | undefined;
  /** Batch jobs running in the pool; close() waits for them before closing the fd. */
  private readonly batchesInFlight = new Set<Promise<void>>();

  private constructor(filePath: string, fd: number, sizeBytes: number, readOnly: boolean) {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0 && sizeBytes <= FILE_VOLUME_SIZE_MAX_BYTES, 'bad size');
    this.path = filePath;
    this.fd = fd;
    this.sizeBytes = sizeBytes;
    this.description = `file ${path.basename(filePath)} ${formatSize(sizeBytes)}`;
    this.caps = {
      readOnly,
      canFlush: !readOnly,
      canFua: !readOnly,
      canTrim: !readOnly,
      canZero: !readOnly,
      canFastZero: !readOnly,
      canCache: true,
      canMultiConn: true,
      rotational: false,
      minBlockSizeBytes: 1,
      preferredBlockSizeBytes: 4096,
      maxPayloadBytes: FILE_MAX_PAYLOAD_BYTES,
    };
  }

  /**
   * Opens an existing raw image (O_RDWR, or O_RDONLY when readOnly); its size is the
   * volume size. Errors are one-line Errors: "no such file: PATH", "not a regular file: PATH".
   */
  static async open(filePath: string, opts: FileVolumeOptions = {}): Promise<FileVolume> {
    const readOnly = opts.readOnly ?? false;
    let fd: number;
    try {
      fd = await openAsync(filePath, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
    } catch (e) {
      throw openError(e, filePath);
    }
    try {
      const st = await fstatAsync(fd);
      if (!st.isFile()) throw new Error(`not a regular file: ${filePath}`);
      if (st.size > FILE_VOLUME_SIZE_MAX_BYTES) throw new Error(`image too large: ${filePath} (${st.size} bytes)`);
      if (opts.lock === true && !native.flockExclusive(fd)) throw new Error(`in use by another process: ${filePath}`);
      return new FileVolume(filePath, fd, st.size, readOnly);
    } catch (e) {
      await closeAsync(fd);
      throw e;
    }
  }

  /** Creates a new image of sizeBytes (sparse unless preallocate; fails if PATH exists), then opens it. */
  static async create(filePath: string, sizeBytes: number, opts: FileVolumeCreateOptions = {}): Promise<FileVolume> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0 || sizeBytes > FILE_VOLUME_SIZE_MAX_BYTES) {
      throw new Error(`bad image size ${sizeBytes}: must be 0..${formatSize(FILE_VOLUME_SIZE_MAX_BYTES)}`);
    }
    let fd: number;
    try {
      fd = await openAsync(filePath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
    } catch (e) {
      throw openError(e, filePath);
    }
    try {
      if (opts.lock === true && !native.flockExclusive(fd)) throw new Error(`in use by another process: ${filePath}`);
      await ftruncateAsync(fd, sizeBytes);
      if (opts.preallocate === true && sizeBytes > 0) await native.fallocate(fd, native.FALLOC_ALLOCATE, 0, sizeBytes);
      await fsyncAsync(fd);
      await syncDirectory(path.dirname(path.resolve(filePath)));
    } catch (e) {
      await closeAsync(fd);
      await fs.promises.unlink(filePath).catch(() => undefined);
      throw e;
    }
    return new FileVolume(filePath, fd, sizeBytes, false);
  }

  private checkRange(offset: number, length: number): void {
    assert(!this.closed, `${this.path}: volume is closed`);
    assert(Number.isSafeInteger(offset) && offset >= 0, `bad offset ${offset}`);
    assert(Number.isSafeInteger(length) && length > 0, `bad length ${length}`);
    assert(offset + length <= this.sizeBytes, `[${offset}, ${offset + length}) beyond volume of ${this.sizeBytes}`);
  }

  async read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    this.checkRange(offset, length);
    assert(length <= FILE_MAX_PAYLOAD_BYTES, `read of ${length} bytes exceeds the payload limit`);
    assert(dst === undefined || dst.length === length, 'read: dst length differs from length');
    const out = dst ?? Buffer.allocUnsafe(length);
    let done = 0;
    if (this.tryNowaitReads && length <= NOWAIT_BYTES_MAX) {
      const n = native.preadNowait(this.fd, out, 0, length, offset);
      if (n === length) return out;
      if (n === native.NOWAIT_UNSUPPORTED) this.tryNowaitReads = false;
      else if (n > 0) done = n;
    }
    let n: number;
    try {
      n = await native.pread(this.fd, out, done, length - done, offset + done);
    } catch (e) {
      throw toVolumeError(e, `read ${this.path} at ${offset}`);
    }
    if (done + n < length) out.fill(0, done + n, length);  // the file shrank under us: past its end reads as zeroes
    return out;
  }

  /** The shared fd: a plain write is a pwrite to it (no state here tracks plain writes). */
  directWriteFd(): number | undefined {
    return this.caps.readOnly || this.closed ? undefined : this.fd;
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    assert(!this.caps.readOnly, 'write to a read-only volume');
    this.checkRange(offset, data.length);
    assert(data.length <= FILE_MAX_PAYLOAD_BYTES, `write of ${data.length} bytes exceeds the payload limit`);
    if (fua && this.syncError) throw this.syncError;
    const length = data.length;
    let done = 0;
    if (!fua && this.tryNowaitWrites && length <= NOWAIT_BYTES_MAX) {
      const n = native.pwriteNowait(this.fd, data, 0, length, offset);
      if (n === length) return;
      if (n === native.NOWAIT_UNSUPPORTED) this.tryNowaitWrites = false;
      else if (n > 0) done = n;
    }
    if (!fua && length - done <= WRITE_BATCH_ITEM_MAX_BYTES) return this.queueWrite(done === 0 ? data : data.subarray(done), offset + done);
    try {
      await native.pwrite(this.fd, data, done, length - done, offset + done, fua);
    } catch (e) {
      throw this.noteSyncFailure(e, `write ${this.path} at ${offset}`);
    }
  }

  private queueWrite(data: Buffer, position: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let b = this.batch;
      if (!b) {
        b = { bufs: [], positions: [], waiters: [], bytes: 0 };
        this.batch = b;
        process.nextTick(() => this.submitBatch(b as WriteBatch));
      }
      b.bufs.push(data);
      b.positions.push(position);
      b.waiters.push({ resolve, reject });
      b.bytes += data.length;
      if (b.bufs.length >= native.PWRITE_BATCH_MAX || b.bytes >= WRITE_BATCH_MAX_BYTES) this.submitBatch(b);
    });
  }

  private submitBatch(b: WriteBatch): void {
    if (this.batch !== b) return; // already submitted (it filled up)
    this.batch = undefined;
    const job: Promise<void> = native.pwriteBatch(this.fd, b.bufs, b.positions).then(
      (errors) => {
        assert(errors.length === b.waiters.length, 'pwriteBatch: one result per write');
        b.waiters.forEach((w, i) => {
          const e = errors[i];
          if (e) w.reject(this.noteSyncFailure(e, `write ${this.path} at ${b.positions[i]}`));
          else w.resolve();
        });
      },
      (e: unknown) => {
        for (const w of b.waiters) w.reject(this.noteSyncFailure(e, `write ${this.path}`));
      },
    );
    this.batchesInFlight.add(job);
    void job.finally(() => this.batchesInFlight.delete(job));
  }

  /** Marks the volume failed if e came from fdatasync, and returns the VolumeError to throw. */
  private noteSyncFailure(e: unknown, what: string): VolumeError {
    const err = toVolumeError(e, what);
    if ((e as Partial<native.NativeError>).syscall === 'fdatasync' && this.syncError === undefined) {
      this.syncError = new VolumeError('EIO', `${this.path}: an earlier fdatasync failed (${err.message}); data may be lost`);
    }
    return err;
  }

  private async syncOnce(): Promise<void> {
    if (this.syncError) throw this.syncError;
    try {
      await native.fdatasync(this.fd);
    } catch (e) {
      throw this.noteSyncFailure(e, `fdatasync ${this.path}`);
    }
  }

  async flush(): Promise<void> {
    assert(!this.closed, `${this.path}: volume is closed`);
    if (this.caps.readOnly) return;
    if (this.syncRunning === undefined) {
      const run = this.syncOnce().finally(() => {
        if (this.syncRunning === run) this.syncRunning = undefined;
      });
      this.syncRunning = run;
      return run;
    }
    // A sync is running; it may have started before our caller's writes completed, so join
    // (or start) the one that runs after it.
    if (this.syncQueued === undefined) {
      const after = this.syncRunning.catch(() => undefined);
      const queued = after.then(() => {
        this.syncQueued = undefined;
        return this.flush();
      });
      this.syncQueued = queued;
    }
    return this.syncQueued;
  }

  private async fuaSync(fua: boolean): Promise<void> {
    if (fua) await this.flush();
  }

  /** Writes zeroes over the range with pwrite (the slow path). */
  private async writeZeroes(offset: number, length: number): Promise<void> {
    const z = zeroes();
    for (let pos = offset; pos < offset + length; pos += z.length) {
      const n = Math.min(z.length, offset + length - pos);
      await native.pwrite(this.fd, z, 0, n, pos, false);
    }
  }

  /** Tries one fallocate mode; false if the file system does not support it (remembered by the caller). */
  private async tryFallocate(mode: number, offset: number, length: number): Promise<boolean> {
    try {
      await native.fallocate(this.fd, mode, offset, length);
      return true;
    } catch (e) {
      if (native.isNotSupported(e)) return false;
      throw e;
    }
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    assert(!this.caps.readOnly, 'trim on a read-only volume');
    this.checkRange(offset, length);
    try {
      let done = false;
      if (this.canPunchHole) {
        done = await this.tryFallocate(native.FALLOC_PUNCH_HOLE, offset, length);
        if (!done) this.canPunchHole = false;
      }
      if (!done) await this.writeZeroes(offset, length);  // our trims read back as zeroes
    } catch (e) {
      throw toVolumeError(e, `trim ${this.path} at ${offset}`);
    }
    await this.fuaSync(fua);
  }

  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    assert(!this.caps.readOnly, 'zero on a read-only volume');
    this.checkRange(offset, length);
    try {
      let done = false;
      if (!opts.noHole && this.canPunchHole) {
        done = await this.tryFallocate(native.FALLOC_PUNCH_HOLE, offset, length);
        if (!done) this.canPunchHole = false;
      }
      if (!done && this.canZeroRange) {
        done = await this.tryFallocate(native.FALLOC_ZERO_RANGE, offset, length);
        if (!done) this.canZeroRange = false;
      }
      if (!done && opts.noHole && this.canPunchHole && this.canAllocate) {
        // Punch, then allocate again: fast, and the range stays provisioned.
        done = await this.tryFallocate(native.FALLOC_PUNCH_HOLE, offset, length);
        if (!done) this.canPunchHole = false;
        else if (!(await this.tryFallocate(native.FALLOC_ALLOCATE, offset, length))) this.canAllocate = false;
      }
      if (!done) {
        if (opts.fastZero) throw new VolumeError('ENOTSUP', `${this.path}: no fast way to zero on this file system`);
        await this.writeZeroes(offset, length);
      }
    } catch (e) {
      throw toVolumeError(e, `zero ${this.path} at ${offset}`);
    }
    await this.fuaSync(opts.fua);
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);  // the page cache already does read-ahead
  }

  async blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    assert(Number.isSafeInteger(maxExtents) && maxExtents >= 1, `bad maxExtents ${maxExtents}`);
    const end = offset + length;
    const extents: Extent[] = [];
    const push = (lengthBytes: number, flags: number): boolean => {
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags) {
        last.lengthBytes += lengthBytes;
        return true;
      }
      if (extents.length === maxExtents) return false;
      extents.push({ lengthBytes, flags });
      return true;
    };
    let pos = offset;
    // Whether pos is known to start a data region (from the previous SEEK_DATA).
    let atData = false;
    try {
      for (let seeks = 0; pos < end && seeks < BLOCK_STATUS_SEEKS_MAX; seeks++) {
        if (!atData) {
          const data = await native.seekData(this.fd, pos);
          // No data at or after pos (or the file shrank): the rest reads as zeroes.
          const holeEnd = data < 0 ? end : Math.min(data, end);
          if (holeEnd > pos) {
            if (!push(holeEnd - pos, EXTENT_HOLE | EXTENT_ZERO)) break;
            pos = holeEnd;
          }
          atData = true;
        } else {
          const hole = await native.seekHole(this.fd, pos);
          const dataEnd = hole < 0 ? end : Math.min(hole, end);
          if (dataEnd > pos) {
            if (!push(dataEnd - pos, 0)) break;
            pos = dataEnd;
          }
          atData = false;
        }
      }
    } catch (e) {
      const code = native.errnoCode(e);
      if (code !== 'EINVAL' && !native.isNotSupported(e)) throw toVolumeError(e, `block status ${this.path} at ${offset}`);
      // No SEEK_DATA support: everything is data.
      if (extents.length === 0) extents.push({ lengthBytes: end - offset, flags: 0 });
    }
    assert(extents.length >= 1, 'blockStatus made no progress');
    return extents;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    let err: unknown;
    if (this.batch) this.submitBatch(this.batch);
    await Promise.allSettled([...this.batchesInFlight]);
    if (!this.caps.readOnly) {
      try {
        await this.flush();
      } catch (e) {
        err = e;
      }
    }
    this.closed = true;
    await closeAsync(this.fd);
    if (err !== undefined) throw err;
  }
}
