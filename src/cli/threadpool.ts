/**
 * The size of libuv's thread pool, set before anything uses it (main.ts imports this
 * module first; the pool starts at its first job, and its size is read then).
 *
 * Every blocking call of the addon (pread/pwrite/fdatasync/msync, io.cc) is a job on that
 * pool, and libuv's default is 4 threads.
 * - `receive` and the commands that walk a volume: 16. The receiver keeps
 *   APPLY_WRITES_MAX (16) device writes in flight while it applies a CP, a resync or a
 *   baseline; with 4 threads only 4 of them reached the disk and the rest queued in the
 *   pool: a resync on loopback ran at 260-292 MB/s with 4 threads, 303-338 MB/s with 16.
 * - `serve` and `attach`: one thread per CPU (2 to 16). There the pool runs a CP's
 *   writes, reads and discards (the clients' requests are answered on the NBD threads),
 *   at the event loop's lowered priority (priority.ts). Yet each pool thread with work is
 *   one more runnable thread beside the clients': with 16 a CP had up to 8 at once, and on
 *   2 CPUs the p99 of QD1 writes during CPs was 3.8-4.5x the p99 outside them
 *   (test/crash/cp-latency, 4 runs and a CI run; 2 threads: 1.7-2.3x, 1: 1.2-1.5x).
 *   Throughput did not need them: by hand on 2 CPUs (engine 2 GiB / 64 MiB NVRAM, pool of
 *   16 against 2) sustained 4k QD32 30.3K, 32.4K against 32.2K, 34.4K IOPS; 1M seq write
 *   274, 338 against 333, 336 MB/s; 4k randread QD32 60.8K against 75.5K; fsync=32 15.6K,
 *   16.5K against 17.0K, 16.2K.
 *
 * An operator's UV_THREADPOOL_SIZE is kept.
 */
import * as os from 'os';

export const THREADPOOL_THREADS_DEFAULT = 16;
export const THREADPOOL_SERVE_THREADS_MIN = 2;

/** The pool size for a command line (argv as process.argv: node, script, command, ...) on a machine with `cpus` CPUs. */
export function threadpoolSizeFor(argv: readonly string[], cpus: number): number {
  const command = argv[2];
  if (command === 'serve' || command === 'attach') {
    return Math.max(THREADPOOL_SERVE_THREADS_MIN, Math.min(THREADPOOL_THREADS_DEFAULT, Math.floor(cpus)));
  }
  return THREADPOOL_THREADS_DEFAULT;
}

if (process.env.UV_THREADPOOL_SIZE === undefined || process.env.UV_THREADPOOL_SIZE === '') {
  process.env.UV_THREADPOOL_SIZE = String(threadpoolSizeFor(process.argv, os.availableParallelism?.() ?? os.cpus().length));
}
