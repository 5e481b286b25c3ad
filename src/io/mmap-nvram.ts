/**
 * MmapNvram: the NVRAM region as a MAP_SHARED mapping of a file (on real hardware, a file
 * on a DAX/pmem file system). Stores into `buffer` survive a process crash at once;
 * persist() (msync) makes a range survive power loss.
 *
 * Invariants:
 * - The file is exactly sizeBytes long, a whole number of 4 KiB pages, and every page is
 *   allocated and written (zeroes) before first use, so a later msync is an overwrite and
 *   never needs block allocation (no ENOSPC, no metadata journal on the sync path).
 * - A new file appears under its final name only once it is fully zeroed and synced
 *   (written as PATH.tmp-PID, fdatasync'd, renamed, directory fsync'd): a crash during
 *   creation never leaves a short NVRAM file behind.
 * - After close(), `buffer` is unmapped (detached, length 0); persist() asserts it is open.
 * - Before the file is mapped, open() re-caches it in base pages (native.recachePages:
 *   fdatasync, drop its cached pages, re-read them without readahead) and the mapping is
 *   MADV_RANDOM: a store dirties only its own 4 KiB page-cache folio, so persist(offset,
 *   length) writes about `length` bytes. In large folios (ext4 on Linux 6.18 cached the
 *   file in 1 MiB folios after the zero-fill) each msync of a 4 KiB range wrote 1 MiB, 4x
 *   slower. A performance hint only: persist() makes at least [offset, offset+length)
 *   durable either way.
 */
import * as fs from 'fs';
import * as path from 'path';
import { promisify } from 'util';
import { assert } from '../util/assert';
import { NvramRegion } from './types';
import * as native from './native';
import { syncDirectory } from './file-device';

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);

export const NVRAM_PAGE_BYTES = 4096;
/** Smallest and largest region we accept. */
export const NVRAM_SIZE_MIN_BYTES = 2 * NVRAM_PAGE_BYTES;
export const NVRAM_SIZE_MAX_BYTES = 64 * 1024 ** 3;
/** Zero-fill is written in pieces of this size. */
const ZERO_FILL_CHUNK_BYTES = 1024 * 1024;

export interface MmapNvramOptions {
  /** Required when creating; when opening an existing file it must match its size if given. */
  sizeBytes?: number;
  /** Create (preallocate + zero-fill) the file if it does not exist. */
  create?: boolean;
  /** Take an exclusive flock on the file; fail if another process holds it. */
  lock?: boolean;
}

function checkSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < NVRAM_SIZE_MIN_BYTES || sizeBytes > NVRAM_SIZE_MAX_BYTES ||
      sizeBytes % NVRAM_PAGE_BYTES !== 0) {
    throw new RangeError(`NVRAM size must be a multiple of ${NVRAM_PAGE_BYTES} in [${NVRAM_SIZE_MIN_BYTES}, ${NVRAM_SIZE_MAX_BYTES}], got ${sizeBytes}`);
  }
}

/** Writes a new zero-filled, fully allocated file of sizeBytes at filePath, atomically. */
async function createZeroed(filePath: string, sizeBytes: number): Promise<void> {
  const tmpPath = `${filePath}.tmp-${process.pid}`;
  const fd = await openAsync(tmpPath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
  try {
    await ftruncateAsync(fd, sizeBytes);
    try {
      await native.fallocate(fd, native.FALLOC_ALLOCATE, 0, sizeBytes);
    } catch (e) {
      if (!native.isNotSupported(e)) throw e;  // the zero writes below allocate anyway
    }
    const zeroes = Buffer.alloc(Math.min(ZERO_FILL_CHUNK_BYTES, sizeBytes));
    for (let pos = 0; pos < sizeBytes; pos += zeroes.length) {
      await native.pwrite(fd, zeroes, 0, Math.min(zeroes.length, sizeBytes - pos), pos, false);
    }
    await native.fdatasync(fd);
  } catch (e) {
    await closeAsync(fd);
    await fs.promises.unlink(tmpPath).catch(() => undefined);
    throw e;
  }
  await closeAsync(fd);
  await fs.promises.rename(tmpPath, filePath);
  await syncDirectory(path.dirname(path.resolve(filePath)));
}

export class MmapNvram implements NvramRegion {
  readonly path: string;
  readonly sizeBytes: number;
  readonly buffer: Buffer;
  private readonly fd: number;
  private closed = false;

  private constructor(filePath: string, fd: number, buffer: Buffer) {
    assert(buffer.length >= NVRAM_SIZE_MIN_BYTES && buffer.length % NVRAM_PAGE_BYTES === 0, 'bad mapping length');
    this.path = filePath;
    this.fd = fd;
    this.buffer = buffer;
    this.sizeBytes = buffer.length;
  }

  /**
   * A path that opens this very file again (a new open file, the same inode), whatever
   * happened to its name since: for a descriptor of someone else's own (the NBD threads'
   * FLUSH, native/nv_append.h). Valid while the region is open.
   */
  get reopenPath(): string {
    return `/proc/self/fd/${this.fd}`;
  }

  static async open(filePath: string, opts: MmapNvramOptions = {}): Promise<MmapNvram> {
    if (opts.sizeBytes !== undefined) checkSize(opts.sizeBytes);
    let exists = true;
    try {
      await fs.promises.access(filePath, fs.constants.F_OK);
    } catch {
      exists = false;
    }
    if (!exists) {
      if (opts.create !== true) throw new Error(`no such file: ${filePath}`);
      if (opts.sizeBytes === undefined) throw new Error(`creating NVRAM ${filePath} needs a size`);
      await createZeroed(filePath, opts.sizeBytes);
    }
    let fd: number;
    try {
      fd = await openAsync(filePath, fs.constants.O_RDWR);
    } catch (e) {
      const code = native.errnoCode(e);
      throw new Error(code === 'ENOENT' ? `no such file: ${filePath}` : `${filePath}: ${(e as Error).message}`);
    }
    try {
      const st = await fstatAsync(fd);
      if (!st.isFile()) throw new Error(`not a regular file: ${filePath}`);
      if (opts.sizeBytes !== undefined && st.size !== opts.sizeBytes) {
        throw new Error(`NVRAM file ${filePath} is ${st.size} bytes, expected ${opts.sizeBytes}`);
      }
      checkSize(st.size);
      if (opts.lock === true && !native.flockExclusive(fd)) throw new Error(`in use by another process: ${filePath}`);
      await native.recachePages(fd, st.size);
      const buffer = native.mmap(fd, st.size);
      return new MmapNvram(filePath, fd, buffer);
    } catch (e) {
      await closeAsync(fd);
      throw e;
    }
  }

  async persist(offset: number, length: number): Promise<void> {
    assert(!this.closed, `${this.path}: NVRAM is closed`);
    assert(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0, 'persist: bad range');
    assert(offset + length <= this.sizeBytes, `persist: [${offset}, ${offset + length}) beyond region of ${this.sizeBytes}`);
    if (length === 0) return;
    await native.msync(this.buffer, offset, length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    native.munmap(this.buffer);
    await closeAsync(this.fd);
  }
}

/**
 * A read-only copy of an NVRAM file, for read-only opens (status, check, serve
 * --read-only): opened O_RDONLY, so it works on a read-only file system, where a shared
 * writable mapping cannot be made. Holds the whole region in memory (its size: 32 MiB by
 * default); persist() must never be called.
 */
export class NvramFileCopy implements NvramRegion {
  readonly sizeBytes: number;
  private constructor(readonly path: string, readonly buffer: Buffer) {
    this.sizeBytes = buffer.length;
  }

  static async open(filePath: string, sizeBytes: number): Promise<NvramFileCopy> {
    checkSize(sizeBytes);
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(filePath, fs.constants.O_RDONLY);
    } catch (e) {
      throw new Error(native.errnoCode(e) === 'ENOENT' ? `no such file: ${filePath}` : `${filePath}: ${(e as Error).message}`);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new Error(`not a regular file: ${filePath}`);
      if (st.size !== sizeBytes) throw new Error(`NVRAM file ${filePath} is ${st.size} bytes, expected ${sizeBytes}`);
      const buffer = Buffer.alloc(sizeBytes);
      let at = 0;
      // Bounded: each read returns > 0 bytes until sizeBytes, or the file shrank (an error).
      while (at < sizeBytes) {
        const { bytesRead } = await fh.read(buffer, at, Math.min(ZERO_FILL_CHUNK_BYTES, sizeBytes - at), at);
        if (bytesRead === 0) throw new Error(`NVRAM file ${filePath} ended at ${at} bytes, expected ${sizeBytes}`);
        at += bytesRead;
      }
      return new NvramFileCopy(filePath, buffer);
    } finally {
      await fh.close();
    }
  }

  persist(): Promise<void> {
    assert(false, `${this.path}: persist on a read-only NVRAM copy`);
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
