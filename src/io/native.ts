/**
 * Typed wrapper over the C++ addon (native/). The addon does only what Node lacks:
 * positional I/O combined with syncs in one thread-pool job, fallocate/punch-hole,
 * SEEK_DATA/SEEK_HOLE, flock, mmap/msync of the NVRAM region, crc32c, XOR/P+Q parity,
 * and the kernel nbd attach. Every blocking call runs off the event loop (napi async
 * work) and is exposed here as a Promise. Arguments are validated here, with precise
 * messages, before native code runs; native code re-checks and never crashes on them.
 */
import bindings from 'bindings';

/** Raw addon surface (callback style; see native/addon.cc). */
interface RawAddon {
  pread(fd: number, buf: Buffer, bufOffset: number, length: number, position: number, cb: (err: Error | null, bytesRead: number) => void): void;
  /** pread, then the crc32c of each whole 4 KiB block read into crcs (LE uint32s), in the same pool job; length is whole blocks. */
  preadCrc(fd: number, buf: Buffer, bufOffset: number, length: number, position: number, crcs: Buffer, cb: (err: Error | null, bytesRead: number) => void): void;
  /** Writes all `length` bytes (loops on short writes); if sync, fdatasync before the callback. */
  /** pwrite; then fdatasync if sync, else if writeback start the range's writeback (sync_file_range WRITE, a hint). */
  pwrite(fd: number, buf: Buffer, bufOffset: number, length: number, position: number, sync: boolean, writeback: boolean, cb: (err: Error | null) => void): void;
  /**
   * pwritev of several buffers at consecutive positions starting at `position`; if sync,
   * fdatasync afterwards; writeback (without sync): as pwrite's, start the range's writeback.
   */
  pwritev(fd: number, bufs: Buffer[], position: number, sync: boolean, writeback: boolean, cb: (err: Error | null) => void): void;
  /**
   * pwritev to an O_DIRECT descriptor: position and total length whole 4 KiB blocks; buffers that
   * are not 4 KiB-aligned are copied through the pool thread's aligned bounce buffer.
   */
  pwritevDirect(fd: number, bufs: Buffer[], position: number, cb: (err: Error | null) => void): void;
  /** Independent writes in one thread-pool job; errors[i] is null or write i's Error. */
  pwriteBatch(fd: number, bufs: Buffer[], positions: number[], cb: (err: Error | null, errors: Array<Error | null>) => void): void;
  /**
   * In one thread-pool job: each buffer (>= 4096 bytes) read whole from its own position, and
   * the crc32c (seed 0) of its first 4 KiB into crcs (little-endian uint32 per buffer). A
   * failed or short read (end of file) fails the whole call.
   */
  preadBatchCrc(fd: number, bufs: Buffer[], positions: number[], crcs: Buffer, cb: (err: Error | null) => void): void;
  fdatasync(fd: number, cb: (err: Error | null) => void): void;
  /**
   * Synchronous preadv2/pwritev2(RWF_NOWAIT), length <= 1 MiB: touches only the page cache, never
   * waits for the disk. Returns bytes transferred (may be short), -1 (would block, or any error:
   * retry with the async call, which reports it) or -2 (RWF_NOWAIT unsupported on this file).
   */
  preadNowait(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number;
  addressMod(buf: Buffer, m: number): number;
  pwriteNowait(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number;
  /** mode: 0 = allocate (keep size), 1 = punch hole, 2 = zero range. */
  fallocate(fd: number, mode: number, position: number, length: number, cb: (err: Error | null) => void): void;
  /** whence: 3 = SEEK_DATA, 4 = SEEK_HOLE; returns -1 when ENXIO (no more data). */
  seek(fd: number, position: number, whence: number, cb: (err: Error | null, pos: number) => void): void;
  /** Non-blocking exclusive flock; returns false if another process holds it. */
  flockExclusive(fd: number): boolean;
  /** Maps [0, length) of fd MAP_SHARED read/write (MADV_RANDOM); the Buffer stays valid until munmap. */
  mmap(fd: number, length: number): Buffer;
  /** fdatasync, drop the file's cached pages, re-read [0, length) without readahead (base-page folios); off the event loop. */
  recachePages(fd: number, length: number, cb: (err: Error | null) => void): void;
  munmap(buf: Buffer): void;
  /** msync(MS_SYNC) of [offset, offset+length) of a mapping from mmap(), off the event loop. */
  msync(buf: Buffer, offset: number, length: number, cb: (err: Error | null) => void): void;
  /** madvise(MADV_POPULATE_WRITE) of [offset, offset+length) of a mapping from mmap(), off the event loop. */
  populateWrite(buf: Buffer, offset: number, length: number, cb: (err: Error | null) => void): void;
  crc32c(buf: Buffer, offset: number, length: number, seed: number): number;
  /** crc32c (seed 0) of each of count 4 KiB blocks at buf[offset..], into out as little-endian uint32s. */
  crc32cBlocks(buf: Buffer, offset: number, count: number, out: Buffer): void;
  /** crc32c(buf, offset, length, seed) by the addon's fastest path (AVX-512 folding, else three crc32 chains; same value, faster on long buffers). */
  crc32cWide(buf: Buffer, offset: number, length: number, seed: number): number;
  /** crc32c(A || B) from crc32c(A) (any seed) and crc32c(B) of a 4 KiB block B (the NBD threads' record checksums). */
  crc32cExtendBlock(crc: number, blockCrc: number): number;
  /** The portable (table) crc32c path, always available, so tests can compare it with the SSE4.2 one. */
  crc32cPortable(buf: Buffer, offset: number, length: number, seed: number): number;
  /** True when crc32c uses the SSE4.2 crc32 instruction. */
  readonly crc32cHardware: boolean;
  /** The AVX-512 VPCLMULQDQ folding path alone (length >= 256); throws where crc32cFolding is false. */
  crc32cFold(buf: Buffer, offset: number, length: number, seed: number): number;
  /** True when spans of >= 256 bytes (crc32cWide, the 4 KiB block checksums of the native paths) fold with AVX-512 VPCLMULQDQ. */
  readonly crc32cFolding: boolean;
  /** The delta from prev to next into out (mirror/delta.ts format); bytes written, -1 if it does not fit. */
  deltaEncode(prev: Buffer, next: Buffer, out: Buffer): number;
  /** dst ^= src over length bytes. */
  xorInto(dst: Buffer, src: Buffer, length: number): void;
  /** RAID-6 P+Q over data columns (all same length) into p and q. */
  pqGen(data: Buffer[], p: Buffer, q: Buffer): void;
  /**
   * Raises the calling thread's nice value by delta (capped at 19); returns the new value. Threads
   * that answer clients are made by a launcher that keeps the starting priority (native/priority.cc).
   */
  lowerPriority(delta: number): number;
  /** Sets the calling thread's nice value ([-20, 19]); false if the kernel refuses (EACCES/EPERM). */
  setNice(value: number): boolean;
  // The kernel nbd functions (socketpair, nbdAttach, nbdDetach; native/nbd_attach.cc) are
  // typed and validated in src/attach/kernel.ts, their only user.
}

let raw: RawAddon | undefined;
export function addon(): RawAddon {
  if (!raw) raw = bindings('nvmirror_native') as RawAddon;
  return raw;
}

export const FALLOC_ALLOCATE = 0;
export const FALLOC_PUNCH_HOLE = 1;
export const FALLOC_ZERO_RANGE = 2;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;

function checkInt(name: string, v: number, min = 0): void {
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`${name} must be an integer >= ${min}, got ${v}`);
}

export function pread(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
  checkInt('fd', fd); checkInt('bufOffset', bufOffset); checkInt('length', length); checkInt('position', position);
  if (bufOffset + length > buf.length) throw new RangeError(`pread: ${bufOffset}+${length} exceeds buffer of ${buf.length}`);
  return new Promise((resolve, reject) => addon().pread(fd, buf, bufOffset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** pread with each whole 4 KiB block's crc32c into crcs (see RawAddon.preadCrc); resolves to the bytes read. */
export function preadCrc(fd: number, buf: Buffer, bufOffset: number, length: number, position: number, crcs: Buffer): Promise<number> {
  checkInt('fd', fd); checkInt('bufOffset', bufOffset); checkInt('length', length); checkInt('position', position);
  if (bufOffset + length > buf.length) throw new RangeError(`preadCrc: ${bufOffset}+${length} exceeds buffer of ${buf.length}`);
  if (length % 4096 !== 0 || crcs.length < (length / 4096) * 4) throw new RangeError(`preadCrc: ${length} bytes is not whole blocks, or crcs (${crcs.length} bytes) too short`);
  return new Promise((resolve, reject) => addon().preadCrc(fd, buf, bufOffset, length, position, crcs, (err, n) => (err ? reject(err) : resolve(n))));
}

/**
 * pwrite off the event loop; `sync`: fdatasync after it. `writeback` (without sync): a hint
 * that the caller syncs this range soon (a CP's blocks), so its writeback starts right
 * after the write and the later fdatasync has less left to wait for. Makes nothing durable.
 */
export function pwrite(fd: number, buf: Buffer, bufOffset: number, length: number, position: number, sync: boolean, writeback = false): Promise<void> {
  checkInt('fd', fd); checkInt('bufOffset', bufOffset); checkInt('length', length); checkInt('position', position);
  if (bufOffset + length > buf.length) throw new RangeError(`pwrite: ${bufOffset}+${length} exceeds buffer of ${buf.length}`);
  return new Promise((resolve, reject) => addon().pwrite(fd, buf, bufOffset, length, position, sync, writeback, (err) => (err ? reject(err) : resolve())));
}

export function pwritev(fd: number, bufs: Buffer[], position: number, sync: boolean, writeback = false): Promise<void> {
  checkInt('fd', fd); checkInt('position', position);
  if (bufs.length === 0 || bufs.length > 1024) throw new RangeError(`pwritev: 1..1024 buffers, got ${bufs.length}`);
  return new Promise((resolve, reject) => addon().pwritev(fd, bufs, position, sync, writeback, (err) => (err ? reject(err) : resolve())));
}

/** pwritev to a descriptor opened with O_DIRECT (see RawAddon.pwritevDirect): no sync. */
export function pwritevDirect(fd: number, bufs: Buffer[], position: number): Promise<void> {
  checkInt('fd', fd); checkInt('position', position);
  if (bufs.length === 0 || bufs.length > 1024) throw new RangeError(`pwritevDirect: 1..1024 buffers, got ${bufs.length}`);
  return new Promise((resolve, reject) => addon().pwritevDirect(fd, bufs, position, (err) => (err ? reject(err) : resolve())));
}

export const NOWAIT_MAX_BYTES = 1024 * 1024;
export const NOWAIT_WOULD_BLOCK = -1;
export const NOWAIT_UNSUPPORTED = -2;

/** The address of buf's first byte modulo m (a power of two, 2..4096). */
export function addressMod(buf: Buffer, m: number): number {
  return addon().addressMod(buf, m);
}

/** Page-cache-only read on the calling thread; see RawAddon.preadNowait. */
export function preadNowait(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number {
  return addon().preadNowait(fd, buf, bufOffset, length, position);
}

/** Page-cache-only write on the calling thread; see RawAddon.pwriteNowait. */
export function pwriteNowait(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number {
  return addon().pwriteNowait(fd, buf, bufOffset, length, position);
}

/** Most reads one preadBatchCrc call takes (the addon's cap). */
export const PREAD_BATCH_MAX = 1024;

/** Scattered reads with their crc32c in one thread-pool job; see RawAddon.preadBatchCrc. */
export function preadBatchCrc(fd: number, bufs: Buffer[], positions: number[], crcs: Buffer): Promise<void> {
  checkInt('fd', fd);
  if (bufs.length === 0 || bufs.length > PREAD_BATCH_MAX || positions.length !== bufs.length) {
    throw new RangeError(`preadBatchCrc: 1..${PREAD_BATCH_MAX} buffers with as many positions, got ${bufs.length}/${positions.length}`);
  }
  if (crcs.length < 4 * bufs.length) throw new RangeError(`preadBatchCrc: crcs (${crcs.length} bytes) too short for ${bufs.length} buffers`);
  for (const p of positions) checkInt('position', p);
  return new Promise((resolve, reject) => addon().preadBatchCrc(fd, bufs, positions, crcs, (err) => (err ? reject(err) : resolve())));
}

/** Most writes one pwriteBatch call takes (the addon's cap). */
export const PWRITE_BATCH_MAX = 1024;

/**
 * Writes each buffer at its own position in one thread-pool job. Resolves with one entry
 * per write: null if it was written whole, else its Error.
 */
export function pwriteBatch(fd: number, bufs: Buffer[], positions: number[]): Promise<Array<Error | null>> {
  checkInt('fd', fd);
  if (bufs.length === 0 || bufs.length > PWRITE_BATCH_MAX || positions.length !== bufs.length) {
    throw new RangeError(`pwriteBatch: 1..${PWRITE_BATCH_MAX} buffers with as many positions, got ${bufs.length}/${positions.length}`);
  }
  for (const p of positions) checkInt('position', p);
  return new Promise((resolve, reject) => addon().pwriteBatch(fd, bufs, positions, (err, errors) => (err ? reject(err) : resolve(errors))));
}

export function fdatasync(fd: number): Promise<void> {
  checkInt('fd', fd);
  return new Promise((resolve, reject) => addon().fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

export function fallocate(fd: number, mode: number, position: number, length: number): Promise<void> {
  checkInt('fd', fd); checkInt('position', position); checkInt('length', length, 1);
  if (mode !== FALLOC_ALLOCATE && mode !== FALLOC_PUNCH_HOLE && mode !== FALLOC_ZERO_RANGE) throw new RangeError(`fallocate: bad mode ${mode}`);
  return new Promise((resolve, reject) => addon().fallocate(fd, mode, position, length, (err) => (err ? reject(err) : resolve())));
}

/** Next data offset at or after position, or -1 if none. */
export function seekData(fd: number, position: number): Promise<number> {
  checkInt('fd', fd); checkInt('position', position);
  return new Promise((resolve, reject) => addon().seek(fd, position, SEEK_DATA, (err, pos) => (err ? reject(err) : resolve(pos))));
}

/** Next hole offset at or after position (end of file counts as a hole), or -1 past EOF. */
export function seekHole(fd: number, position: number): Promise<number> {
  checkInt('fd', fd); checkInt('position', position);
  return new Promise((resolve, reject) => addon().seek(fd, position, SEEK_HOLE, (err, pos) => (err ? reject(err) : resolve(pos))));
}

export function flockExclusive(fd: number): boolean {
  checkInt('fd', fd);
  return addon().flockExclusive(fd);
}

export function mmap(fd: number, length: number): Buffer {
  checkInt('fd', fd); checkInt('length', length, 1);
  return addon().mmap(fd, length);
}

/**
 * Makes the page cache hold [0, length) of fd in base (4 KiB) pages, before it is mapped
 * with mmap(): fdatasync (every cached page becomes clean), drop the file's cached pages,
 * re-read them without readahead. A store into a mapping dirties the whole page-cache
 * folio it hits, and an msync writes whole dirty folios: in base pages an msync of a
 * 4 KiB range writes 4 KiB, not up to 1 MiB (see native/nvram.cc). Changes no byte of
 * the file. Rejects if the fdatasync or a read fails.
 */
export function recachePages(fd: number, length: number): Promise<void> {
  checkInt('fd', fd); checkInt('length', length);
  return new Promise((resolve, reject) => addon().recachePages(fd, length, (err) => (err ? reject(err) : resolve())));
}

export function munmap(buf: Buffer): void {
  addon().munmap(buf);
}

export function msync(buf: Buffer, offset: number, length: number): Promise<void> {
  checkInt('offset', offset); checkInt('length', length);
  if (offset + length > buf.length) throw new RangeError(`msync: ${offset}+${length} exceeds mapping of ${buf.length}`);
  return new Promise((resolve, reject) => addon().msync(buf, offset, length, (err) => (err ? reject(err) : resolve())));
}

/**
 * Pre-faults [offset, offset+length) of a mapping from mmap() for writing
 * (madvise(MADV_POPULATE_WRITE), Linux >= 5.14), off the event loop, so later stores into
 * it take no page fault. Contents are unchanged. Rejects (e.g. EINVAL on older kernels)
 * if the kernel cannot; callers treat it as a hint.
 */
export function populateWrite(buf: Buffer, offset: number, length: number): Promise<void> {
  checkInt('offset', offset); checkInt('length', length);
  if (offset + length > buf.length) throw new RangeError(`populateWrite: ${offset}+${length} exceeds mapping of ${buf.length}`);
  return new Promise((resolve, reject) => addon().populateWrite(buf, offset, length, (err) => (err ? reject(err) : resolve())));
}

export function crc32c(buf: Buffer, offset = 0, length = buf.length - offset, seed = 0): number {
  if (offset < 0 || length < 0 || offset + length > buf.length) throw new RangeError(`crc32c: ${offset}+${length} exceeds buffer of ${buf.length}`);
  return addon().crc32c(buf, offset, length, seed >>> 0) >>> 0;
}

/**
 * The same value as crc32c, by the addon's fastest path: AVX-512 folding where the CPU has
 * it (crc32cFolding), else three interleaved chains of the crc32 instruction (~2.5x the
 * bytes per cycle of one on 4 KiB and up). The mirror's record path uses it; the
 * engine's calls keep crc32c (docs/benchmarks.md, "The CP stall", on why).
 */
export function crc32cWide(buf: Buffer, offset = 0, length = buf.length - offset, seed = 0): number {
  if (offset < 0 || length < 0 || offset + length > buf.length) throw new RangeError(`crc32cWide: ${offset}+${length} exceeds buffer of ${buf.length}`);
  return addon().crc32cWide(buf, offset, length, seed >>> 0) >>> 0;
}

/** crc32c(A || B) from crc = crc32c(A) (any seed) and blockCrc = crc32c(B) of a 4 KiB block B, without B. */
export function crc32cExtendBlock(crc: number, blockCrc: number): number {
  return addon().crc32cExtendBlock(crc >>> 0, blockCrc >>> 0) >>> 0;
}

/** Blocks one crc32cBlocks call may checksum (256 MiB). */
export const CRC_BLOCKS_MAX = 65536;

/** crc32c (seed 0) of each of `count` 4 KiB blocks at buf[offset..], into out[4i..4i+4) little-endian. */
export function crc32cBlocks(buf: Buffer, offset: number, count: number, out: Buffer): void {
  if (!(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(count) && count >= 0 && count <= CRC_BLOCKS_MAX)) {
    throw new RangeError(`crc32cBlocks: bad offset ${offset} or count ${count}`);
  }
  if (offset + count * 4096 > buf.length) throw new RangeError(`crc32cBlocks: ${count} blocks at ${offset} exceed buffer of ${buf.length}`);
  if (out.length < count * 4) throw new RangeError(`crc32cBlocks: out of ${out.length} bytes cannot hold ${count} checksums`);
  addon().crc32cBlocks(buf, offset, count, out);
}

/** The delta from prev to next (4 KiB each) into out, as mirror/delta.ts encodes it; bytes written, or -1 if more than out holds. */
export function deltaEncode(prev: Buffer, next: Buffer, out: Buffer): number {
  return addon().deltaEncode(prev, next, out);
}

/** crc32c through the table path only (for tests and diagnostics). */
export function crc32cPortable(buf: Buffer, offset = 0, length = buf.length - offset, seed = 0): number {
  if (offset < 0 || length < 0 || offset + length > buf.length) throw new RangeError(`crc32cPortable: ${offset}+${length} exceeds buffer of ${buf.length}`);
  return addon().crc32cPortable(buf, offset, length, seed >>> 0) >>> 0;
}

export function crc32cHardware(): boolean {
  return addon().crc32cHardware;
}

/** Least length crc32cFold takes (shorter spans go the three-chain way). */
export const CRC_FOLD_MIN_BYTES = 256;

/** crc32c through the AVX-512 folding path only (for tests and diagnostics); see crc32cFolding(). */
export function crc32cFold(buf: Buffer, offset = 0, length = buf.length - offset, seed = 0): number {
  if (offset < 0 || length < CRC_FOLD_MIN_BYTES || offset + length > buf.length) throw new RangeError(`crc32cFold: ${offset}+${length} outside buffer of ${buf.length} or under ${CRC_FOLD_MIN_BYTES} bytes`);
  return addon().crc32cFold(buf, offset, length, seed >>> 0) >>> 0;
}

/**
 * True when spans of >= 256 bytes fold with AVX-512 VPCLMULQDQ (the CPU has it, the OS
 * saves its registers, NVMIRROR_CRC_NO_AVX512 is unset); else three crc32 chains.
 */
export function crc32cFolding(): boolean {
  return addon().crc32cFolding;
}

export function xorInto(dst: Buffer, src: Buffer, length = dst.length): void {
  if (length > dst.length || length > src.length) throw new RangeError('xorInto: length exceeds a buffer');
  addon().xorInto(dst, src, length);
}

export function pqGen(data: Buffer[], p: Buffer, q: Buffer): void {
  const n = p.length;
  if (data.length < 1 || data.length > 253) throw new RangeError(`pqGen: 1..253 data columns, got ${data.length}`);
  if (q.length !== n || data.some((d) => d.length !== n)) throw new RangeError('pqGen: all columns must have the same length');
  addon().pqGen(data, p, q);
}

/** Error raised by a failed system call in the addon: code 'EIO', errno -5, syscall 'pwrite'. */
export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

/** The errno name ('EIO', 'ENOSPC', 'ENOTSUP', ...) of an addon or Node fs error, else undefined. */
export function errnoCode(e: unknown): string | undefined {
  if (e instanceof Error && typeof (e as Partial<NativeError>).code === 'string') return (e as NativeError).code;
  return undefined;
}

/** True if the error says the file system does not support the operation. */
export function isNotSupported(e: unknown): boolean {
  const code = errnoCode(e);
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS';
}
