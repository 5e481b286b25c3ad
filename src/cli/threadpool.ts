/**
 * The size of libuv's thread pool, set before anything uses it (main.ts imports this
 * module first; the pool starts at its first job, and its size is read then).
 *
 * Every blocking call of the addon (pread/pwrite/fdatasync/msync, io.cc) is a job on that
 * pool, and libuv's default is 4 threads. The receiver keeps APPLY_WRITES_MAX (16) device
 * writes in flight while it applies a CP, a resync or a baseline; with 4 threads only 4
 * of them reached the disk and the rest queued in the pool: a resync on loopback ran at
 * 260-292 MB/s with 4 threads, 303-338 MB/s with 16 (3 runs each, 459 MiB). `serve`
 * measured the same either way (1M seq write, sustained 4k random writes).
 *
 * An operator's UV_THREADPOOL_SIZE is kept.
 */
export const THREADPOOL_THREADS_DEFAULT = 16;

if (process.env.UV_THREADPOOL_SIZE === undefined || process.env.UV_THREADPOOL_SIZE === '') {
  process.env.UV_THREADPOOL_SIZE = String(THREADPOOL_THREADS_DEFAULT);
}
