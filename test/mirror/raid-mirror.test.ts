/**
 * Mirrors with another geometry (issue 9 item 8): a single-member source (namespace a)
 * mirrored in sync mode into a RAID-5 destination of 4 members pre-created with
 * `nvmirror create --raid 5` (namespace b). The source's allocator places blocks without
 * regard to the destination's stripes, so every CP writes partial stripes there; they go
 * through the destination's stripe journal (docs/raid.md "Mirrors with another geometry").
 *
 * - A destination whose RAID tree space is smaller than the source's block space, or whose
 *   members are swapped, is refused with one line, and nothing in it changes.
 * - qemu-io and fio writes with CPs: every CP acknowledged with equal roots, both exports
 *   byte-identical, the journal used; the destination checks and scrubs clean (parity
 *   consistent). Then failover (the RAID-5 mirror promoted, written), the old primary
 *   demoted and resynced from the RAID-5 primary; identical.
 * - A RAID-5 old primary demoted (a RAID volume becoming a mirror) and resynced from the
 *   single-member volume promoted from its mirror; identical, check and scrub clean.
 * - kill -9 of the RAID-5 destination three times under fio load, aimed at a journal batch
 *   written and not yet released: whoever opens the mirror next (check and scrub after the
 *   first and third kill, the restarted receiver after the second) replays exactly when a
 *   batch was left live; check and scrub clean each time; the mirror resumes; identical
 *   and scrub clean at the end.
 */
import { strict as assert } from 'assert';
import * as cp from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createHostPair, netnsAvailable, type HostPair } from '../net/netns';
import { BIN, md5OfExport, sh, sourceStatus, until } from './helpers';
import { controlRequest } from '../../src/volume/engine-control';
import { prng, seedFromEnv } from '../crash/harness';

const PORT = 17041;
const PORT_BACK = 17042;
const SIZE = '64M';

/** The stripe journal's epoch (each batch of partial stripes written advances it by one), and whether a batch is live (written, not released). */
function journalState(file: string): { epoch: number; live: boolean } {
  const b = Buffer.alloc(3 * 4096);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, b.length, 0);
  } finally {
    fs.closeSync(fd);
  }
  let epoch = 0;
  for (let s = 0; s < 2; s++) if (b.readUInt32LE(s * 4096) === 0x4e564a48) epoch = Math.max(epoch, b.readUInt32LE(s * 4096 + 8));
  const entry = b.subarray(2 * 4096);
  return { epoch, live: entry.readUInt32LE(0) === 0x4e564a45 && entry.readUInt32LE(8) === epoch };
}

describe('mirror into a RAID-5 destination (two hosts)', function () {
  this.timeout(300_000);
  let pair: HostPair;
  let tmp: string;
  const procs: cp.ChildProcess[] = [];

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`network namespaces unavailable in CI: ${why}`);
      this.skip();
    }
  });

  beforeEach(async () => {
    pair = await createHostPair({ prefix: 'nvr9' });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-raidmirror-'));
  });

  afterEach(async function () {
    if (this.currentTest?.state === 'failed') {
      for (const f of fs.readdirSync(tmp).filter((n) => n.endsWith('.log'))) {
        process.stderr.write(`--- ${f}\n${fs.readFileSync(path.join(tmp, f), 'utf8').split('\n').slice(-25).join('\n')}\n`);
      }
    }
    for (const p of procs) if (!exited(p)) p.kill('SIGKILL');
    procs.length = 0;
    await pair.destroy();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  function exited(p: cp.ChildProcess): boolean {
    return p.exitCode !== null || p.signalCode !== null;
  }

  async function stop(p: cp.ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (exited(p)) return;
    const done = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await done;
  }

  function logFd(name: string): number {
    return fs.openSync(path.join(tmp, `${name}.log`), 'a');
  }

  async function receive(host: 'a' | 'b', dir: string, port: number, sock: string, name: string): Promise<cp.ChildProcess> {
    fs.rmSync(sock, { force: true });
    const p = pair.spawn(host, BIN, ['receive', dir, '--listen', `${pair.host(host).addr}:${port}`, '--export-socket', sock, '--mirror-insecure'], { stdio: ['ignore', 'ignore', logFd(name)] });
    procs.push(p);
    await until(`${name} socket`, () => fs.existsSync(sock), 90_000);
    return p;
  }

  async function serve(host: 'a' | 'b', dir: string, sock: string, name: string, mirrorTo?: { host: 'a' | 'b'; port: number }): Promise<cp.ChildProcess> {
    fs.rmSync(sock, { force: true });
    const m = mirrorTo ? ['--mirror-to', `${pair.host(mirrorTo.host).addr}:${mirrorTo.port}`, '--mirror-mode', 'sync', '--mirror-insecure', '--mirror-stall-timeout', '5000'] : [];
    const p = pair.spawn(host, BIN, ['serve', dir, '--socket', sock, '--cp-interval', '300', ...m], { stdio: ['ignore', 'ignore', logFd(name)] });
    procs.push(p);
    await until(`${name} served`, () => fs.existsSync(path.join(dir, 'control.sock')) && fs.existsSync(sock), 90_000);
    return p;
  }

  /** A CP holding every write so far, acknowledged by the mirror with an equal root; then both exports compared whole. */
  async function identical(srcDir: string, srcUri: string, mirrorUri: string, what: string): Promise<void> {
    const r = await controlRequest(path.join(srcDir, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r.ok, `checkpoint: ${String(r.error)}`);
    const cpNow = r.cpNumber as number;
    const st = await until(`${what}: roots equal`, () => {
      const m = sourceStatus(srcDir);
      return m && m.state === 'in-sync' && m.rootsEqual && m.destCp >= cpNow ? m : undefined;
    }, 60_000);
    assert.equal(st.rootMismatches, 0, `${what}: a CP was acknowledged with another root`);
    assert.equal(md5OfExport(mirrorUri), md5OfExport(srcUri), `${what}: the mirror export differs from the source`);
  }

  function checkAndScrub(mirrorDir: string, what: string): { replayed: boolean } {
    const chk = cp.spawnSync(BIN, ['check', mirrorDir], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(chk.status, 0, `${what}: check: ${chk.stdout}${chk.stderr}`);
    assert.match(chk.stdout, /RAID-5, 4 members: online/, chk.stdout);
    const scr = cp.spawnSync(BIN, ['scrub', mirrorDir, '--json'], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(scr.status, 0, `${what}: scrub: ${scr.stdout}${scr.stderr}`);
    const r = JSON.parse(scr.stdout) as { ok: boolean; parityErrors: number; checksumErrors: number; stripesChecked: number; uncorrectable: number };
    assert.ok(r.ok && r.parityErrors === 0 && r.checksumErrors === 0 && r.uncorrectable === 0, `${what}: scrub found ${JSON.stringify(r)}`);
    assert.ok(r.stripesChecked > 0, `${what}: scrub checked no stripe`);
    return { replayed: /replayed the stripe journal/.test(chk.stderr + scr.stderr) };
  }

  function createSource(name: string, nvram = '2M'): { dir: string; uuid: string } {
    const dir = path.join(tmp, name);
    sh(BIN, ['create', dir, '--size', SIZE, '--nvram-size', nvram]);
    return { dir, uuid: (JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid };
  }

  function createRaidDest(root: string, uuid: string, nvram = '2M'): string {
    const dir = path.join(root, uuid);
    const members = [0, 1, 2, 3].map((i) => path.join(tmp, `r-${uuid.slice(0, 8)}-m${i}.img`));
    for (const m of members) fs.rmSync(m, { force: true });
    sh(BIN, ['create', dir, '--size', SIZE, '--nvram-size', nvram, '--raid', '5', '--stripe-unit', '16K', ...members.flatMap((m) => ['--member', m])]);
    return dir;
  }

  it('single-member source -> RAID-5 x4 destination (sync): a too small one and one with swapped members refused; equal roots, identical exports, check and scrub clean; failover to the RAID-5 mirror and failback to the single member', async () => {
    const s = createSource('src', '4M');
    const dst = path.join(tmp, 'dst');
    const expSock = path.join(tmp, 'exp.sock');
    const srcSock = path.join(tmp, 'src.sock');
    const srcUri = `nbd+unix:///?socket=${srcSock}`;
    const mirUri = `nbd+unix:///${s.uuid}?socket=${expSock}`;

    // Too small: its RAID tree space (made for a 2 MiB NVRAM's CP headroom) is below the source's block space.
    const small = createRaidDest(dst, s.uuid, '2M');
    let rx = await receive('b', dst, PORT, expSock, 'rx');
    let src = await serve('a', s.dir, srcSock, 'src', { host: 'b', port: PORT });
    const refused = await until('refusal', () => {
      const m = sourceStatus(s.dir);
      return m?.lastError && /RAID-5 device holds/.test(m.lastError) ? m.lastError : undefined;
    });
    assert.match(refused, /^.*: its RAID-5 device holds \d+ blocks of tree space; the source's block space needs \d+ \(create it with a larger --size\)$/);
    assert.ok(!refused.includes('\n'));
    assert.ok(fs.existsSync(path.join(small, 'nvmirror.json')) && !fs.existsSync(path.join(small, 'mirror.json')), 'the refused destination was changed');
    await stop(src);
    await stop(rx);
    fs.rmSync(small, { recursive: true });

    const dstDir = createRaidDest(dst, s.uuid, '4M');
    // Two of its members swapped: refused by name, nothing in it changed.
    const mem = (i: number): string => path.join(tmp, `r-${s.uuid.slice(0, 8)}-m${i}.img`);
    const swap = (): void => {
      fs.renameSync(mem(0), `${mem(0)}.x`);
      fs.renameSync(mem(1), mem(0));
      fs.renameSync(`${mem(0)}.x`, mem(1));
    };
    swap();
    rx = await receive('b', dst, PORT, expSock, 'rx');
    src = await serve('a', s.dir, srcSock, 'src', { host: 'b', port: PORT });
    const swapped = await until('refusal of swapped members', () => {
      const m = sourceStatus(s.dir);
      return m?.lastError && /members swapped/.test(m.lastError) ? m.lastError : undefined;
    });
    assert.match(swapped, /member 0 \S+ holds member 1 of this volume \(members swapped\?\): refusing to open/);
    assert.ok(fs.existsSync(path.join(dstDir, 'nvmirror.json')) && !fs.existsSync(path.join(dstDir, 'mirror.json')), 'the refused destination was changed');
    await stop(src);
    swap();
    src = await serve('a', s.dir, srcSock, 'src', { host: 'b', port: PORT });
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    // Scattered small writes (single blocks in many stripes), then fio 4k random writes.
    const cmds = Array.from({ length: 64 }, (_, i) => ['-c', `write -P 0x${(0x10 + i).toString(16)} ${i * 997}k 4k`]).flat();
    sh('qemu-io', ['-f', 'raw', ...cmds, srcUri]);
    await identical(s.dir, srcUri, mirUri, 'after qemu-io');
    sh('fio', ['--name=r', '--ioengine=nbd', `--uri=${srcUri}`, '--rw=randwrite', '--bs=4k', '--size=48M', '--io_size=8M', '--iodepth=16',
      '--verify=crc32c', '--verify_fatal=1', '--randrepeat=1', `--directory=${tmp}`], 120_000);
    await identical(s.dir, srcUri, mirUri, 'after fio');
    // While the receiver runs: online verify (the destination reads through its RaidDevice) and check of the committed image.
    assert.match(sh(BIN, ['verify', s.dir], 120_000), /^identical at CP \d+ \(roots equal, superblocks equal\)$/m);
    assert.match(sh(BIN, ['check', dstDir], 120_000), /RAID-5, 4 members: online[\s\S]*: ok$/m);
    const rxStatus = sh(BIN, ['status', dst]);
    assert.match(rxStatus, /^raid +RAID-5, 4 members, stripe unit 16\.0 KiB: ONLINE$/m, rxStatus);
    assert.match(rxStatus, /stripes written since open: \d+ whole, [1-9]\d* by read-modify-write \([1-9]\d* through the stripe journal in [1-9]\d* batches\)/, rxStatus);
    const m = sourceStatus(s.dir)!;
    assert.ok(m.cpsAcknowledged >= 3, `only ${m.cpsAcknowledged} CPs acknowledged`);
    const epochs = journalState(path.join(dstDir, 'raid-journal.bin')).epoch;
    assert.ok(epochs > 2, `the destination's stripe journal was used ${epochs - 1} times: no partial stripe went through it`);
    process.stdout.write(`      ${m.cpsAcknowledged} CPs acknowledged with equal roots; ${epochs - 1} journal batches of partial stripes on the RAID-5 destination\n`);

    // Failover: the source dies; the RAID-5 mirror (receiver stopped: check and scrub it first) is promoted and written.
    await stop(src, 'SIGKILL');
    await stop(rx);
    checkAndScrub(dstDir, 'the RAID-5 mirror');
    sh(BIN, ['promote', dstDir, '--json'], 120_000);
    const bSock = path.join(tmp, 'b.sock');
    let b = await serve('b', dstDir, bSock, 'b');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 40M 2M', '-c', 'write -P 0x78 3M 12k', `nbd+unix:///?socket=${bSock}`]);
    // Failback: the single-member old primary demoted, resynced from the RAID-5 primary.
    const back = path.join(tmp, 'back');
    sh(BIN, ['demote', s.dir, '--into', back, '--discard-my-changes']);
    const backSock = path.join(tmp, 'back.sock');
    const rxa = await receive('a', back, PORT_BACK, backSock, 'rxa');
    await stop(b);
    b = await serve('b', dstDir, bSock, 'b', { host: 'a', port: PORT_BACK });
    await identical(dstDir, `nbd+unix:///?socket=${bSock}`, `nbd+unix:///${s.uuid}?socket=${backSock}`, 'failback to the single member');
    assert.match(fs.readFileSync(path.join(tmp, 'rxa.log'), 'utf8'), /failback: rolled back to CP \d+/);
    const bScrub = JSON.parse(sh(BIN, ['scrub', dstDir, '--json'], 120_000)) as { ok: boolean; parityErrors: number };
    assert.ok(bScrub.ok && bScrub.parityErrors === 0, `the RAID-5 primary scrubs with ${JSON.stringify(bScrub)}`);

    await stop(b);
    await stop(rxa);
  });

  it('a RAID-5 old primary is demoted and becomes the mirror of the single-member volume promoted from its mirror: failback resync, identical, check and scrub clean', async () => {
    const dir = path.join(tmp, 'rsrc');
    const members = [0, 1, 2, 3].map((i) => path.join(tmp, `rs-m${i}.img`));
    sh(BIN, ['create', dir, '--size', SIZE, '--nvram-size', '2M', '--raid', '5', '--stripe-unit', '16K', ...members.flatMap((m) => ['--member', m])]);
    const uuid = (JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid;
    const dst = path.join(tmp, 'dst');
    const expSock = path.join(tmp, 'exp.sock');
    const srcSock = path.join(tmp, 'rsrc.sock');
    let rx = await receive('b', dst, PORT, expSock, 'rx');
    const src = await serve('a', dir, srcSock, 'rsrc', { host: 'b', port: PORT });
    await until('in sync', () => sourceStatus(dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 0 6M', '-c', 'write -P 0x42 30M 100k', `nbd+unix:///?socket=${srcSock}`]);
    await identical(dir, `nbd+unix:///?socket=${srcSock}`, `nbd+unix:///${uuid}?socket=${expSock}`, 'RAID-5 source -> single member');
    await stop(src, 'SIGKILL');
    await stop(rx);
    const mdir = path.join(dst, uuid);
    sh(BIN, ['promote', mdir, '--json'], 120_000);
    const bSock = path.join(tmp, 'b.sock');
    let b = await serve('b', mdir, bSock, 'b');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x43 50M 1M', '-c', 'write -P 0x44 5M 8k', `nbd+unix:///?socket=${bSock}`]);
    const back = path.join(tmp, 'back');
    const dem = JSON.parse(sh(BIN, ['demote', dir, '--into', back, '--discard-my-changes', '--json'], 120_000)) as { keptIn: string };
    assert.deepEqual(fs.readdirSync(dem.keptIn).filter((f) => /^member-\d\.img$/.test(f)).sort(), ['member-0.img', 'member-1.img', 'member-2.img', 'member-3.img']);
    const backSock = path.join(tmp, 'back.sock');
    rx = await receive('a', back, PORT_BACK, backSock, 'rxa');
    await stop(b);
    b = await serve('b', mdir, bSock, 'b', { host: 'a', port: PORT_BACK });
    await identical(mdir, `nbd+unix:///?socket=${bSock}`, `nbd+unix:///${uuid}?socket=${backSock}`, 'failback into the RAID-5 old primary');
    assert.match(fs.readFileSync(path.join(tmp, 'rxa.log'), 'utf8'), /failback: rolled back to CP \d+/);
    assert.doesNotMatch(fs.readFileSync(path.join(tmp, 'b.log'), 'utf8'), /mirror baseline started/, 'a full baseline instead of a failback resync');
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x43 50M 1M', '-c', 'read -P 0x41 0 5M', `nbd+unix:///${uuid}?socket=${backSock}`]);
    await stop(b);
    await stop(rx);
    checkAndScrub(path.join(back, uuid), 'the demoted RAID-5 volume as a mirror');
  });

  it('kill -9 of the RAID-5 destination mid-CP under load, three times: the next opener replays a live journal batch, check and scrub clean, the mirror resumes; identical at the end', async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed);
    process.stdout.write(`      seed ${seed} (NVMIRROR_SEED=${seed} reruns it)\n`);
    const s = createSource('src');
    const dst = path.join(tmp, 'dst');
    const dstDir = createRaidDest(dst, s.uuid);
    const expSock = path.join(tmp, 'exp.sock');
    const srcSock = path.join(tmp, 'src.sock');
    const srcUri = `nbd+unix:///?socket=${srcSock}`;
    let rx = await receive('b', dst, PORT, expSock, 'rx');
    await serve('a', s.dir, srcSock, 'src', { host: 'b', port: PORT });
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    let replays = 0;
    let inWindow = 0;
    const journal = path.join(dstDir, 'raid-journal.bin');
    for (let k = 0; k < 3; k++) {
      const fio = cp.spawn('fio', ['--name=k', '--ioengine=nbd', `--uri=${srcUri}`, '--rw=randwrite', '--bs=4k', '--size=48M', '--iodepth=16', '--io_size=64M', '--thread', `--directory=${tmp}`], { stdio: 'ignore' });
      const fioDone = new Promise((r) => fio.once('exit', r));
      const cp0 = sourceStatus(s.dir)?.destCp ?? 0;
      // Kill only once CPs of this load are landing on the destination.
      await until('CPs under load', () => (sourceStatus(s.dir)?.destCp ?? 0) >= cp0 + 2, 60_000);
      // Aim at the window a crash can tear: a journal batch written and its stripes being
      // written (polled; after a random 0-400 ms, and killed anyway after 5 s without one).
      await new Promise((r) => setTimeout(r, Math.floor(rnd() * 400)));
      // Once a batch is seen, a further 0-15 ms lets its stripe writes begin; if it is still live then, kill.
      const t0 = Date.now();
      for (let hit = false; !hit && Date.now() - t0 < 5000;) {
        if (!journalState(journal).live) {
          await new Promise((r) => setImmediate(r));
          continue;
        }
        await new Promise((r) => setTimeout(r, Math.floor(rnd() * 15)));
        hit = journalState(journal).live;
      }
      await stop(rx, 'SIGKILL');
      fio.kill('SIGKILL');
      await fioDone;
      // The receiver is dead: a batch live in the journal now must be replayed by the next opener.
      const live = journalState(journal).live;
      if (live) inWindow++;
      const rxLogBefore = fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8').length;
      if (k !== 1) {
        // check and scrub open it first (no receiver holds it): they replay, then judge.
        const r = checkAndScrub(dstDir, `after kill ${k}`);
        assert.equal(r.replayed, live, `after kill ${k}: a live journal batch ${live ? 'was not' : 'was'} replayed by check/scrub`);
        if (r.replayed) replays++;
      }
      rx = await receive('b', dst, PORT, expSock, 'rx');
      await until(`resumed after kill ${k}`, () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
      if (k === 1) {
        // The restarted receiver opens it first: it replays before it reads or writes anything.
        const replayedByRx = /replayed the stripe journal/.test(fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8').slice(rxLogBefore));
        assert.equal(replayedByRx, live, `after kill ${k}: a live journal batch ${live ? 'was not' : 'was'} replayed by the receiver`);
        if (replayedByRx) replays++;
        assert.match(sh(BIN, ['check', dstDir], 120_000), /: ok$/m);
      }
    }
    await identical(s.dir, srcUri, `nbd+unix:///${s.uuid}?socket=${expSock}`, 'after three kills');
    await stop(rx);
    checkAndScrub(dstDir, 'at the end');
    process.stdout.write(`      3 kill -9s of the RAID-5 destination (${inWindow} with a journal batch live): check and scrub clean each time; ${replays} batches replayed (by check/scrub after kills 0 and 2, by the restarted receiver after kill 1)\n`);
  });
});
