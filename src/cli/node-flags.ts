/**
 * The V8 flags every nvmirror process runs with. They cannot be set once Node runs (the
 * young generation is sized when the heap is made), so they live in bin/nvmirror's
 * shebang (`#!/usr/bin/env -S node ...`, checked against this list by a unit test), and the
 * tests and benchmarks that start the CLI as `node BIN ...` pass them the same way.
 *
 * --max-semi-space-size=8 (MiB): V8 lets the young generation grow to 2 x 16 MiB of semi-
 * spaces under a high allocation rate, and it stays at that size. The engine allocates
 * quickly (request objects, CP planning), so a server carried 32 MiB of young generation
 * that the cap halves. Measured with test/crash/memory.test.js (100 GiB thin volume, 4k
 * random writes at QD32, 12 s): peak RSS 241.9-258.1 MiB without the cap (it failed its
 * 256 MiB bound in CI), 225-234 at 8 MiB, 216-223 at 4 MiB; IOPS 17-20K in all. A smaller
 * young generation promotes a CP's short-lived objects: test/crash/cp-latency's p99 of QD1
 * writes during CPs was 244-891 us at 4 MiB (3 of 12 runs over its 3x bound, one in CI),
 * 243-444 us at 8 MiB (1 of 8 over, at 3.2x), 319-453 us without the cap (0 of 6); the cap
 * was taken out for that (0a9517c). It is back since the CP runs below the threads that
 * answer clients (priority.ts): 8 MiB, alternated with no cap, memory test 223.7 / 225.5
 * MiB against 239.7 / 236.6, cp-latency 1.12x / 1.15x against 0.77x / 1.11x.
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=8'];

