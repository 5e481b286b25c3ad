/**
 * FileBlockDevice: a BlockDevice over one member file or block device, through the native
 * addon (pread/pwrite/fdatasync/punch-hole off the event loop).
 *
 * Invariants:
 * - blockCount = floor(size / 4096) at open (a block device's size comes from sysfs,
 *   /sys/dev/block/MAJ:MIN/size, in 512-byte sectors); every request lies inside
 *   [0, blockCount) (asserted: the caller validated it).
 * - A read either fills every requested byte or rejects (a short read means the file was
 *   truncated under us, which is an I/O error, never silently zeroes).
 * - No call is accepted after close(); close() is idempotent.
 * - A read-only device never writes, syncs or discards.
 * - With directWrites, a write of at least DIRECT_WRITE_MIN_BYTES goes through a second
 *   descriptor opened O_DIRECT (straight to the device, not copied into the page cache:
 *   on this project's VMs a fresh page-cache page costs more than the disk write). The
 *   kernel keeps the two coherent (a direct write flushes and drops the cached pages of
 *   its range); sync() covers both. A file system that refuses O_DIRECT (at open or at
 *   the first write: EINVAL) gets buffered writes, as without the option. A write hinted
 *   `reread` is buffered (its blocks stay cached for the reads that follow).
 * - A read of at most NOWAIT_READ_BYTES_MAX (1 MiB) is first tried as a page-cache-only copy on
 *   the calling thread (preadv2 RWF_NOWAIT: never waits for the disk); only if that did
 *   not return every byte does it go to the thread pool (from the start, so a short
 *   or failed attempt changes nothing). The first "unsupported" answer turns it off.
 */
import * as fs from 'fs';
import * as path from 'path';
import { promisify } from 'util';
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES, BlockDevice, READ_BATCH_MAX, WRITE_PARTS_MAX, type WriteHint } from './types';
import * as native from './native';

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);
const fsyncAsync = promisify(fs.fsync);

/**
 * Largest read tried on the event loop (page cache only; 1 MiB, the addon's cap, the
 * tree's largest data run): a copy of at most ~100 us, against a thread-pool hop (two
 * cross-thread wake-ups, ~20% of the server's busy time in the 1M seq read profile).
 */
export const NOWAIT_READ_BYTES_MAX = native.NOWAIT_MAX_BYTES;

/** Largest member we accept: 2^40 blocks (4 PiB) keeps byte offsets exact in a JS number. */
export const MEMBER_BLOCKS_MAX = 2 ** 40;

/** Smallest write sent through the O_DIRECT descriptor (directWrites): 64 KiB. */
export const DIRECT_WRITE_MIN_BYTES = 64 * 1024;

/**
 * Smallest write whose writeback starts at once when hinted (WriteHint.writeback): 256 KiB.
 * Below it the extra syscall costs more than the early start buys (a CP's single address
 * blocks go out with its final fdatasync).
 */
export const WRITEBACK_MIN_BYTES = 256 * 1024;

export interface FileBlockDeviceOptions {
  readOnly?: boolean;
  /** Large writes bypass the page cache (see the invariants); NVMIRROR_DIRECT_WRITES=0 turns it off. */
  directWrites?: boolean;
  /** Take an exclusive flock on the file; fail if another process holds it. */
  lock?: boolean;
}

export interface FileBlockDeviceCreateOptions {
  /** Reserve the space now (fallocate) instead of leaving a sparse file. */
  preallocate?: boolean;
  lock?: boolean;
}

/** fsyncs a directory so that a created or renamed entry in it is durable. */
export async function syncDirectory(dirPath: string): Promise<void> {
  const fd = await openAsync(dirPath, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fsyncAsync(fd);
  } finally {
    await closeAsync(fd);
  }
}

/**
 * Replaces DIR/NAME with `text` durably: a temp file written and fsynced, renamed over
 * NAME, the directory fsynced. A crash leaves the old file or the new one, never half.
 */
export async function writeFileDurably(dir: string, name: string, text: string): Promise<void> {
  const p = path.join(dir, name);
  const tmp = `${p}.tmp-${process.pid}`;
  const fh = await fs.promises.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.promises.rename(tmp, p);
  await syncDirectory(dir);
}

/** Bytes of a block device (st.size is 0 for one): its sysfs size, in 512-byte sectors. */
export async function blockDeviceBytes(rdev: number, filePath: string): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  const sys = `/sys/dev/block/${major}:${minor}/size`;
  let text: string;
  try {
    text = await fs.promises.readFile(sys, 'utf8');
  } catch (e) {
    throw new Error(`cannot read the size of block device ${filePath} (${sys}): ${e instanceof Error ? e.message : String(e)}`);
  }
  const sectors = Number(text.trim());
  if (!Number.isSafeInteger(sectors) || sectors < 0) throw new Error(`bad size "${text.trim()}" in ${sys} for ${filePath}`);
  return sectors * 512;
}

function describeOpenError(e: unknown, filePath: string): Error {
  const code = native.errnoCode(e);
  if (code === 'ENOENT') return new Error(`no such file: ${filePath}`);
  if (code === 'EACCES' || code === 'EPERM') return new Error(`permission denied: ${filePath}`);
  if (code === 'EISDIR') return new Error(`is a directory: ${filePath}`);
  if (code === 'EEXIST') return new Error(`file exists: ${filePath}`);
  if (code === 'EROFS') return new Error(`read-only file system: ${filePath}`);
  return e instanceof Error ? new Error(`${filePath}: ${e.message}`) : new Error(`${filePath}: ${String(e)}`);
}

export class FileBlockDevice implements BlockDevice {
  readonly path: string;
  readonly blockCount: number;
  readonly readOnly: boolean;
  private readonly fd: number;
  /** The O_DIRECT descriptor for large writes (directWrites), or undefined. */
  private directFd: number | undefined;
  private directFdOpen: number | undefined;
  private closed = false;
  /** Writes that went through the O_DIRECT descriptor. */
  directWrites = 0;
  private tryNowaitReads = true;
  /** Reads answered from the page cache on the calling thread (no thread-pool job). */
  nowaitReads = 0;

  private constructor(filePath: string, fd: number, blockCount: number, readOnly: boolean) {
    assert(Number.isSafeInteger(blockCount) && blockCount >= 0 && blockCount <= MEMBER_BLOCKS_MAX, 'blockCount out of range');
    this.path = filePath;
    this.fd = fd;
    this.blockCount = blockCount;
    this.readOnly = readOnly;
  }

  /** The file's descriptor, for a native reader that dups it (block pba is at pba * 4096); undefined once closed. */
  readFd(): number | undefined {
    return this.closed ? undefined : this.fd;
  }

  /** Opens an existing member file. Bytes past the last whole block are ignored. */
  static async open(filePath: string, opts: FileBlockDeviceOptions = {}): Promise<FileBlockDevice> {
    const readOnly = opts.readOnly ?? false;
    let fd: number;
    try {
      fd = await openAsync(filePath, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
    } catch (e) {
      throw describeOpenError(e, filePath);
    }
    try {
      const st = await fstatAsync(fd);
      if (!st.isFile() && !st.isBlockDevice()) throw new Error(`not a regular file: ${filePath}`);
      const sizeBytes = st.isBlockDevice() ? await blockDeviceBytes(st.rdev, filePath) : st.size;
      const blockCount = Math.floor(sizeBytes / BLOCK_SIZE_BYTES);
      if (blockCount > MEMBER_BLOCKS_MAX) throw new Error(`member too large: ${filePath} (${sizeBytes} bytes)`);
      if (opts.lock === true && !native.flockExclusive(fd)) throw new Error(`in use by another process: ${filePath}`);
      const dev = new FileBlockDevice(filePath, fd, blockCount, readOnly);
      if (!readOnly && opts.directWrites === true && process.env.NVMIRROR_DIRECT_WRITES !== '0') {
        dev.directFd = dev.directFdOpen = await openAsync(filePath, fs.constants.O_RDWR | fs.constants.O_DIRECT).catch(() => undefined);
      }
      return dev;
    } catch (e) {
      await closeAsync(fd);
      throw e;
    }
  }

  /** Creates a new member file of blockCount blocks (fails if the file exists), durably. */
  static async create(filePath: string, blockCount: number, opts: FileBlockDeviceCreateOptions = {}): Promise<FileBlockDevice> {
    if (!Number.isSafeInteger(blockCount) || blockCount < 1 || blockCount > MEMBER_BLOCKS_MAX) {
      throw new RangeError(`member size must be 1..${MEMBER_BLOCKS_MAX} blocks, got ${blockCount}`);
    }
    let fd: number;
    try {
      fd = await openAsync(filePath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
    } catch (e) {
      throw describeOpenError(e, filePath);
    }
    try {
      if (opts.lock === true && !native.flockExclusive(fd)) throw new Error(`in use by another process: ${filePath}`);
      const sizeBytes = blockCount * BLOCK_SIZE_BYTES;
      await ftruncateAsync(fd, sizeBytes);
      if (opts.preallocate === true) await native.fallocate(fd, native.FALLOC_ALLOCATE, 0, sizeBytes);
      await fsyncAsync(fd);
    } catch (e) {
      await closeAsync(fd);
      await fs.promises.unlink(filePath).catch(() => undefined);
      throw e;
    }
    await syncDirectory(path.dirname(path.resolve(filePath)));
    return new FileBlockDevice(filePath, fd, blockCount, false);
  }

  private checkRange(pba: number, count: number): void {
    assert(!this.closed, `${this.path}: device is closed`);
    assert(Number.isSafeInteger(pba) && pba >= 0, `bad pba ${pba}`);
    assert(Number.isSafeInteger(count) && count >= 1, `bad block count ${count}`);
    assert(pba + count <= this.blockCount, `blocks [${pba}, ${pba + count}) beyond device of ${this.blockCount}`);
  }

  async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    this.checkRange(pba, count);
    const lengthBytes = count * BLOCK_SIZE_BYTES;
    assert(dst.length === lengthBytes, `readBlocks: dst is ${dst.length} bytes, expected ${lengthBytes}`);
    if (this.tryNowaitReads && lengthBytes <= NOWAIT_READ_BYTES_MAX) {
      const got = native.preadNowait(this.fd, dst, 0, lengthBytes, pba * BLOCK_SIZE_BYTES);
      if (got === lengthBytes) {
        this.nowaitReads++;
        return;
      }
      if (got === native.NOWAIT_UNSUPPORTED) this.tryNowaitReads = false;
    }
    const n = await native.pread(this.fd, dst, 0, lengthBytes, pba * BLOCK_SIZE_BYTES);
    if (n !== lengthBytes) {
      const err = new Error(`EIO: short read of ${this.path} at block ${pba}: ${n} of ${lengthBytes} bytes (file truncated?)`) as native.NativeError;
      err.code = 'EIO';
      err.errno = -5;
      err.syscall = 'pread';
      throw err;
    }
  }

  async readBlocksCrc(pba: number, count: number, dst: Buffer, crcs: Buffer): Promise<void> {
    this.checkRange(pba, count);
    const lengthBytes = count * BLOCK_SIZE_BYTES;
    assert(dst.length === lengthBytes && crcs.length >= count * 4, `readBlocksCrc: dst is ${dst.length} bytes and crcs ${crcs.length}, for ${count} blocks`);
    const n = await native.preadCrc(this.fd, dst, 0, lengthBytes, pba * BLOCK_SIZE_BYTES, crcs);
    if (n !== lengthBytes) {
      const err = new Error(`EIO: short read of ${this.path} at block ${pba}: ${n} of ${lengthBytes} bytes (file truncated?)`) as native.NativeError;
      err.code = 'EIO';
      err.errno = -5;
      err.syscall = 'pread';
      throw err;
    }
  }

  async readBlocksBatchCrc(pbas: readonly number[], dsts: readonly Buffer[], crcs: Uint32Array): Promise<void> {
    assert(pbas.length >= 1 && pbas.length <= READ_BATCH_MAX && dsts.length === pbas.length && crcs.length >= pbas.length, `readBlocksBatchCrc: ${pbas.length} blocks, ${dsts.length} buffers, ${crcs.length} crcs`);
    const positions: number[] = new Array<number>(pbas.length);
    for (let i = 0; i < pbas.length; i++) {
      this.checkRange(pbas[i]!, 1);
      assert(dsts[i]!.length === BLOCK_SIZE_BYTES, `readBlocksBatchCrc: buffer ${i} is ${dsts[i]!.length} bytes`);
      positions[i] = pbas[i]! * BLOCK_SIZE_BYTES;
    }
    const raw = Buffer.allocUnsafe(4 * pbas.length);
    try {
      await native.preadBatchCrc(this.fd, dsts as Buffer[], positions, raw);
    } catch (e) {
      const err = e as native.NativeError;
      if (typeof err.message === 'string') err.message = `${this.path}: ${err.message}`;
      throw err;
    }
    for (let i = 0; i < pbas.length; i++) crcs[i] = raw.readUInt32LE(4 * i);
  }

  async writeBlocks(pba: number, data: Buffer, hint?: WriteHint): Promise<void> {
    assert(!this.readOnly, `${this.path}: write to a read-only device`);
    assert(data.length > 0 && data.length % BLOCK_SIZE_BYTES === 0, `writeBlocks: length ${data.length} is not whole blocks`);
    this.checkRange(pba, data.length / BLOCK_SIZE_BYTES);
    if (this.directFd !== undefined && hint?.reread !== true && data.length >= DIRECT_WRITE_MIN_BYTES && (await this.writeDirect(pba, [data]))) return;
    await native.pwrite(this.fd, data, 0, data.length, pba * BLOCK_SIZE_BYTES, false, hint?.writeback === true && data.length >= WRITEBACK_MIN_BYTES);
  }

  /** Writes through the O_DIRECT descriptor; false (and direct writes off) if the file system refuses them. */
  private async writeDirect(pba: number, parts: Buffer[]): Promise<boolean> {
    const fd = this.directFd!;
    try {
      await native.pwritevDirect(fd, parts, pba * BLOCK_SIZE_BYTES);
      this.directWrites++;
      return true;
    } catch (e) {
      if (native.errnoCode(e) !== 'EINVAL') throw e;
      // Off from now on; the descriptor stays open until close() (other writes may be queued on it).
      if (this.directFd === fd) this.directFd = undefined;
      return false;
    }
  }

  async writeBlocksV(pba: number, parts: readonly Buffer[], hint?: WriteHint): Promise<void> {
    assert(!this.readOnly, `${this.path}: write to a read-only device`);
    assert(parts.length >= 1 && parts.length <= WRITE_PARTS_MAX, `writeBlocksV: ${parts.length} parts`);
    let bytes = 0;
    for (const b of parts) {
      assert(b.length > 0 && b.length % BLOCK_SIZE_BYTES === 0, `writeBlocksV: a part of ${b.length} bytes is not whole blocks`);
      bytes += b.length;
    }
    this.checkRange(pba, bytes / BLOCK_SIZE_BYTES);
    if (this.directFd !== undefined && hint?.reread !== true && bytes >= DIRECT_WRITE_MIN_BYTES && (await this.writeDirect(pba, parts as Buffer[]))) return;
    await native.pwritev(this.fd, parts as Buffer[], pba * BLOCK_SIZE_BYTES, false, hint?.writeback === true && bytes >= WRITEBACK_MIN_BYTES);
  }

  /** The file's size now, from its descriptor (the file written to, whatever its path names now); throws what fstat throws. */
  fileBytes(): number {
    assert(!this.closed, `${this.path}: device is closed`);
    return fs.fstatSync(this.fd).size;
  }

  async sync(): Promise<void> {
    assert(!this.closed, `${this.path}: device is closed`);
    if (this.readOnly) return;
    await native.fdatasync(this.fd);
  }

  async discard(pba: number, count: number): Promise<void> {
    assert(!this.readOnly, `${this.path}: discard on a read-only device`);
    this.checkRange(pba, count);
    try {
      await native.fallocate(this.fd, native.FALLOC_PUNCH_HOLE, pba * BLOCK_SIZE_BYTES, count * BLOCK_SIZE_BYTES);
    } catch (e) {
      // A discard is a hint: a file system without hole punching simply keeps the data.
      if (!native.isNotSupported(e)) throw e;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const direct = this.directFdOpen;
    this.directFd = this.directFdOpen = undefined;
    if (direct !== undefined) await closeAsync(direct).catch(() => undefined);
    await closeAsync(this.fd);
  }
}
