/**
 * kill -9 of `nvmirror serve` on RAID-5 x4 and RAID-6 x6 volumes under a pipelined write
 * load with CPs running (1 MiB NVRAM), with the acknowledged-write checker of
 * test/crash: after every restart each acknowledged block holds its last acknowledged
 * write (or the one in flight at the kill), `check` passes at the end and every member
 * is still in service (a kill between the members' superblock copies, or with stripes
 * still in the write-back buffer, loses nothing the NVRAM log does not replay). Lean: a
 * few kills per level; the power-loss enumeration over RAID is not here yet.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from '../crash/nbd-client';
import { VOLUME_BYTES, load, verify, type Mode, type World } from '../crash/ack-checker';
import { prng, runCli, seedFromEnv, ServedVolume } from '../crash/harness';
import type { VolumeStatus } from '../../src/volume/served';

const KILLS = 5;

for (const [level, members] of [[5, 4], [6, 6]] as const) {
  describe(`e2e RAID-${level} x${members}: kill -9 under load`, function () {
    this.timeout(180_000);
    let tmp: string;
    before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), `nvm-raid-crash-${level}-`)); });
    after(() => fs.rmSync(tmp, { recursive: true, force: true }));

    it(`keeps every acknowledged write across ${KILLS} kills, and every member in service`, async () => {
      const seed = seedFromEnv();
      console.log(`      raid-crash seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
      const rnd = prng(seed);
      const dir = path.join(tmp, 'vol');
      const sock = path.join(tmp, 's');
      const memberArgs = Array.from({ length: members }, (_, i) => ['--member', `m${i}.img`]).flat();
      const created = await runCli(['create', dir, '--size', String(VOLUME_BYTES), '--nvram-size', '1M', '--raid', String(level), '--stripe-unit', '16K', ...memberArgs]);
      assert.equal(created.code, 0, created.stderr);
      const w: World = { acked: new Map(), inflight: new Map(), writeId: 0, ackedWrites: 0, killedInFlight: 0, landedInFlight: 0 };
      for (let round = 0; round < KILLS; round++) {
        const mode: Mode = (['plain', 'fua', 'flush'] as const)[round % 3]!;
        const server = await ServedVolume.start(dir, sock, ['--cp-interval', String([20, 100][round % 2])]);
        const c = await NbdClient.connect(sock, '');
        const problems = await verify(c, w, true);
        assert.deepEqual(problems, [], `seed ${seed} round ${round}: after restart:\n${problems.slice(0, 20).join('\n')}`);
        const errors: string[] = [];
        const killer = setTimeout(() => server.kill9(), 150 + Math.floor(rnd() * 900));
        await load(c, w, mode, rnd, errors);
        clearTimeout(killer);
        const exit = await server.exited;
        assert.equal(exit.signal, 'SIGKILL', `seed ${seed} round ${round}: server died on its own: ${server.stderr}`);
        assert.deepEqual(errors, [], `seed ${seed} round ${round}: request errors`);
      }
      const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1000']);
      const c = await NbdClient.connect(sock, '');
      const problems = await verify(c, w, true);
      assert.deepEqual(problems, [], `seed ${seed}: final verification:\n${problems.slice(0, 20).join('\n')}`);
      await c.close();
      assert.equal(await server.stop(), 0, server.stderr);
      const chk = await runCli(['check', dir]);
      assert.equal(chk.code, 0, chk.stdout + chk.stderr);
      const st = JSON.parse((await runCli(['status', dir, '--json'])).stdout) as VolumeStatus;
      assert.equal(st.raid!.state, 'online', JSON.stringify(st.raid));
      assert.ok(w.ackedWrites > KILLS * 50, `too little load: ${w.ackedWrites} acknowledged writes`);
    });
  });
}
