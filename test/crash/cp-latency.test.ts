/**
 * CPs must not stall clients: 4 KiB writes at queue depth 1 against the real server,
 * with the NVRAM small enough that CPs run every 100-200 milliseconds. Each write is
 * classified by whether a CP was running when it started (CP windows come from the
 * server's debug log), and the p99 latency during CPs must stay within 3x of the p99
 * outside them. Prints the figures. And the mechanism that keeps it so: the threads that
 * answer clients run at the server's starting priority, the event loop and libuv's pool
 * (where CPs run) below them (src/cli/priority.ts, native/priority.cc), and that pool has
 * one thread per CPU under `serve` (src/cli/threadpool.ts).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { prng, runCli, ServedVolume } from './harness';
import { threadsOf } from '../threads';

const BS = 4096;
// 16 s (about 100 CPs): at 8 s the ratio of two p99s moved 1.4-4.1x between runs of one build on this
// 2-core machine (a single slow CP or scheduler hiccup decides it); at 16 s it held 2.0-2.5x.
const RUN_MS = Number(process.env.NVMIRROR_LATENCY_MS ?? 16000);
// About 100 CPs in those 16 s, as designed: 8 MiB gave that at 6-8K QD1 writes/s; with WRITEs
// answered on the NBD thread (8-12K/s here) it gave 130-190 CPs, one every ~90 ms. 16 MiB gives
// 104-143. (The bound is unchanged; one CI run at 8 MiB measured 5.7x, cause not found.)
const NVRAM_SIZE = process.env.NVMIRROR_LATENCY_NVRAM ?? '16M';

function pct(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
}

describe('crash: CP latency', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-lat-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('p99 of QD1 4 KiB writes while a CP runs stays within 3x of the p99 outside CPs', async () => {
    const dir = path.join(tmp, 'vol');
    const sock = path.join(tmp, 's');
    assert.equal((await runCli(['create', dir, '--size', '4G', '--nvram-size', NVRAM_SIZE])).code, 0);
    const server = await ServedVolume.start(dir, sock, ['--log-level', 'debug', '--cp-interval', '10000']);
    const c = await NbdClient.connect(sock, '');
    const rnd = prng(99);
    const data = Buffer.alloc(BS, 0x5c);
    const samples: Array<{ atMs: number; us: number }> = [];
    const blocks = (4 * 1024 ** 3) / BS;
    const end = Date.now() + RUN_MS;
    while (Date.now() < end) {
      const atMs = Date.now();
      const t = process.hrtime.bigint();
      await c.write(Math.floor(rnd() * blocks) * BS, data, false);
      samples.push({ atMs, us: Number(process.hrtime.bigint() - t) / 1000 });
    }
    await c.close();
    assert.equal(await server.stop(), 0);
    const windows: Array<[number, number]> = [];
    for (const line of server.stderr.split('\n')) {
      if (!line.includes('"consistency point committed"')) continue;
      const o = JSON.parse(line) as { startMs: number; durationMs: number };
      windows.push([o.startMs, o.startMs + o.durationMs]);
    }
    const during: number[] = [];
    const outside: number[] = [];
    for (const s of samples) (windows.some(([a, b]) => s.atMs >= a && s.atMs <= b) ? during : outside).push(s.us);
    during.sort((a, b) => a - b);
    outside.sort((a, b) => a - b);
    const cpMs = windows.map(([a, b]) => b - a).sort((a, b) => a - b);
    console.log(`      ${samples.length} writes, ${windows.length} CPs (median ${pct(cpMs, 0.5)} ms, max ${cpMs[cpMs.length - 1]} ms); ` +
      `p50/p99 outside CPs ${pct(outside, 0.5).toFixed(0)}/${pct(outside, 0.99).toFixed(0)} us (${outside.length}), ` +
      `during CPs ${pct(during, 0.5).toFixed(0)}/${pct(during, 0.99).toFixed(0)} us (${during.length})`);
    assert.ok(windows.length >= 3, `only ${windows.length} CPs ran`);
    assert.ok(during.length >= 100, `only ${during.length} writes during CPs`);
    const ratio = pct(during, 0.99) / pct(outside, 0.99);
    assert.ok(ratio <= 3, `p99 during CPs exceeds 3x the p99 outside CPs: ${pct(during, 0.99).toFixed(0)} vs ${pct(outside, 0.99).toFixed(0)} us (${ratio.toFixed(2)}x)`);
  });

  it('the threads that answer clients keep the starting priority; the event loop and its pool run 10 nice levels below', async () => {
    const dir = path.join(tmp, 'prio');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '16M'])).code, 0);
    const base = os.getPriority(0);
    const POOL_THREADS = 6;
    for (const [setting, delta] of [[undefined, 10], ['0', 0], ['3', 3]] as const) {
      const sock = path.join(tmp, `p${delta}`);
      const env: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: String(POOL_THREADS) };
      if (setting !== undefined) env.NVMIRROR_BACKGROUND_NICE = setting;
      const server = await ServedVolume.start(dir, sock, [], 30_000, env);
      try {
        const c = await NbdClient.connect(sock, '');
        await c.write(0, Buffer.alloc(BS, 1), false); // on the connection's thread
        await c.write(BS, Buffer.alloc(BS, 2), true); // FUA: through the event loop and the pool
        const threads = threadsOf(server.pid);
        await c.close();
        const low = Math.min(19, base + delta);
        const main = threads.find((t) => t.tid === server.pid)!;
        const named = (n: string) => threads.filter((t) => t.comm === n);
        const where = `NVMIRROR_BACKGROUND_NICE=${setting ?? '(unset)'}: ${JSON.stringify(threads.map((t) => `${t.comm}:${t.nice}`))}`;
        assert.equal(main.nice, low, `the event loop, ${where}`);
        assert.ok(named('nvm-nbd-conn').length === 1 && named('nvm-nbd-conn')[0]!.nice === base, `the connection thread, ${where}`);
        assert.ok(named('nvm-launcher').length === 1 && named('nvm-launcher')[0]!.nice === base, `the launcher, ${where}`);
        // libuv's workers are named 'node' (this Node) or 'libuv-worker' (newer libuv), as are
        // V8's (made before the event loop's priority changed): at least the pool's are low.
        const unnamed = threads.filter((t) => t.tid !== server.pid && (t.comm === 'node' || t.comm === 'libuv-worker'));
        assert.ok(unnamed.filter((t) => t.nice === low).length >= POOL_THREADS, `libuv's ${POOL_THREADS} pool threads, ${where}`);
      } finally {
        assert.equal(await server.stop(), 0);
      }
    }
  });
});
