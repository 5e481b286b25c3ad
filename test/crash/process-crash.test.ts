/**
 * Process crash: the real server (`nvmirror serve DIR`) under a pipelined write load is
 * killed with SIGKILL at random moments (CPs run constantly: 1 MiB NVRAM, short CP
 * intervals), restarted, and every write whose reply arrived must read back; a block
 * may instead hold the write still in flight on it when the server died. The client
 * never has two requests in flight on one block, so each block has exactly one or two
 * allowed contents. Rounds alternate plain writes, FUA writes and periodic FLUSHes.
 * A negative control runs the same checker against an empty volume: it must fail.
 * The seed is printed; NVMIRROR_SEED=N reruns it.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { BS, VOLUME_BYTES, load, verify, type Mode, type World } from './ack-checker';
import { prng, runCli, seedFromEnv, ServedVolume } from './harness';

const ROUNDS = Number(process.env.NVMIRROR_CRASH_ROUNDS ?? 20);
/** Early data placement down to 2-block writes (the default, 64 blocks, is beyond this load's writes). */
const EARLY = { NVMIRROR_EARLY_MIN_BLOCKS: '2' };
describe('crash: kill -9 of the real server under load', function () {
  this.timeout(300_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-crash-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it(`keeps every acknowledged write across ${ROUNDS} kills (plain, FUA, FLUSH; CPs running)`, async () => {
    const seed = seedFromEnv();
    console.log(`      process-crash seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    const dir = path.join(tmp, 'vol');
    const sock = path.join(tmp, 's');
    const created = await runCli(['create', dir, '--size', String(VOLUME_BYTES), '--nvram-size', '1M']);
    assert.equal(created.code, 0, created.stderr);
    const w: World = { acked: new Map(), inflight: new Map(), writeId: 0, ackedWrites: 0, killedInFlight: 0, landedInFlight: 0 };
    const t0 = Date.now();
    const intervals = [20, 100, 1000];
    for (let round = 0; round < ROUNDS; round++) {
      const mode: Mode = (['plain', 'fua', 'flush'] as const)[round % 3]!;
      const cpInterval = intervals[Math.floor(rnd() * intervals.length)]!;
      // Every round places the data of writes of >= 2 blocks ahead of its CP (early-place.ts):
      // kills land among those writes too.
      const server = await ServedVolume.start(dir, sock, ['--cp-interval', String(cpInterval)], 30_000, EARLY);
      const c = await NbdClient.connect(sock, '');
      const problems = await verify(c, w, true);
      assert.deepEqual(problems, [], `seed ${seed} round ${round}: after restart:\n${problems.slice(0, 20).join('\n')}`);
      const errors: string[] = [];
      const killAfterMs = 150 + Math.floor(rnd() * 900);
      const killer = setTimeout(() => server.kill9(), killAfterMs);
      await load(c, w, mode, rnd, errors);
      clearTimeout(killer);
      const exit = await server.exited;
      assert.equal(exit.signal, 'SIGKILL', `seed ${seed} round ${round}: server died on its own: ${server.stderr}`);
      assert.deepEqual(errors, [], `seed ${seed} round ${round}: request errors`);
      if (round % 7 === 6) {
        // `check` on the killed volume (before recovery): the tree verifies, the NVRAM records are valid.
        const chk = await runCli(['check', dir]);
        assert.equal(chk.code, 0, `seed ${seed} round ${round}: check after kill:\n${chk.stdout}${chk.stderr}`);
      }
    }
    // Final restart, verification, clean stop and check.
    const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1000'], 30_000, EARLY);
    const c = await NbdClient.connect(sock, '');
    const problems = await verify(c, w, true);
    assert.deepEqual(problems, [], `seed ${seed}: final verification:\n${problems.slice(0, 20).join('\n')}`);
    // The rounds' multi-block writes were placed ahead of their CPs as this one is.
    await c.write(0, Buffer.alloc(16 * 4096, 0x5c), false);
    // The rounds' plain whole-block WRITEs took the native path (the connection's thread
    // appends them to the NVRAM log and answers them): the kills above hit that path too.
    for (let i = 0; i < 8; i++) await c.write(i * 4096, Buffer.alloc(4096, 0x5a), false);
    // So did the 'flush' rounds' writes stored with pwrite: a WRITE within 5 ms of the
    // thread's FLUSH round goes to the NVRAM file that way (native/nv_append.h). Here: a
    // FLUSH, a WRITE, twenty times (so that a stall of this process cannot miss them all).
    for (let i = 0; i < 20; i++) {
      await c.flush();
      await c.write(i * 4096, Buffer.alloc(4096, 0x5b), false);
    }
    const st = await runCli(['status', dir, '--json']);
    const { threadWrites = 0, threadFileStores = 0, early } = JSON.parse(st.stdout) as { threadWrites?: number; threadFileStores?: number; early?: { placedBlocks: number } };
    assert.ok(early !== undefined && early.placedBlocks >= 16, `blocks placed ahead of their CP: ${JSON.stringify(early)}`);
    assert.ok(threadWrites >= 28, `plain WRITEs appended by the NBD thread: ${threadWrites} (status: ${st.stdout.slice(0, 300)})`);
    assert.ok(threadFileStores >= 1, `WRITEs stored with pwrite right after a FLUSH: ${threadFileStores}`);
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    console.log(`      ${ROUNDS} kills in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${w.ackedWrites} acknowledged requests, ` +
      `${w.acked.size} blocks verified each restart, ${w.killedInFlight} requests in flight at kills (${w.landedInFlight} blocks of them landed)`);
    assert.ok(w.ackedWrites > ROUNDS * 50, `too little load: ${w.ackedWrites} acknowledged writes`);

    // Negative control: the same checker against an empty volume must report losses.
    const empty = path.join(tmp, 'empty');
    assert.equal((await runCli(['create', empty, '--size', String(VOLUME_BYTES), '--nvram-size', '1M'])).code, 0);
    const sock2 = path.join(tmp, 's2');
    const s2 = await ServedVolume.start(empty, sock2);
    const c2 = await NbdClient.connect(sock2, '');
    const lost = await verify(c2, w, false);
    await c2.close();
    await s2.stop();
    assert.ok(lost.length > 0, 'negative control: the checker found nothing missing on an empty volume');
  });
});
