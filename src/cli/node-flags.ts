/**
 * The V8 flags every nvmirror process runs with. They cannot be set once Node runs (the
 * young generation is sized when the heap is made), so they live in bin/nvmirror's
 * shebang (`#!/usr/bin/env -S node ...`, checked against this list by a unit test), and the
 * tests and benchmarks that start the CLI as `node BIN ...` pass them the same way.
 *
 * --max-semi-space-size=4 (MiB): V8 lets the young generation grow to 2 x 16 MiB of semi-
 * spaces under a high allocation rate, and it stays at that size. The engine allocates
 * quickly (request objects, CP planning), so a server carried 32 MiB of young generation
 * that a 4 MiB cap turns into 8. Measured with test/crash/memory.test.js (100 GiB thin
 * volume, 4k random writes at QD32, 12 s): peak RSS 245/253 MiB without the cap, 230/225
 * at 8 MiB, 218/223 at 4 MiB; IOPS 17.8-20.0K in all six runs (no loss from the extra
 * scavenges).
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=4'];

