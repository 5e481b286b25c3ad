/**
 * RAID volumes served by `nvmirror serve`, checked by fio with verify=crc32c over the nbd
 * engine: RAID-5 over 4 members and RAID-6 over 6. Behind the server's back the test
 * corrupts data blocks of one member (RAID-6: two, overlapping, so some stripes have two
 * bad columns), truncates a member and deletes one while fio runs: every read fio does
 * must still verify, `status` must show the lost members FAULTED with the reason, and the
 * self-healed blocks per member. After a restart the volume opens degraded and reads
 * right; a member of another volume put in a member's place is refused by name. Wrong
 * member counts, levels and stripe units are one-line errors of `create`.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';
import {
  MiB, NVMIRROR_BIN, cleanupAll, isRoot, makeTempDir, onCleanup, requireCondition, requireTools, run, runOk, startServer, sleep, type Server,
} from './harness';
import { RaidGeometry } from '../../src/raid/geometry';
import type { VolumeStatus } from '../../src/volume/served';

const SIZE = 64 * MiB;
const B = 4096;

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

let serverLog: () => string = () => '';

async function fio(dir: string, name: string, uri: string, body: string): Promise<FioJob[]> {
  const file = path.join(dir, `${name}.fio`);
  fs.writeFileSync(file, `[global]\nioengine=nbd\nuri=${uri}\nverify=crc32c\nverify_fatal=1\ndo_verify=1\n[${name}]\n${body}`);
  const r = await run('fio', ['--output-format=json', file], { timeoutMs: 120_000, cwd: dir });
  if (r.code !== 0) {
    const errors = serverLog().split('\n').filter((l) => /"level":(40|50)/.test(l)).slice(-5).join('\n');
    assert.fail(`fio ${name} failed: ${r.stderr.slice(-1500)}\n--- server warnings and errors (last 5) ---\n${errors}`);
  }
  const jobs = (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: FioJob[] }).jobs;
  for (const j of jobs) assert.equal(j.error, 0, `fio ${name}: error ${j.error}`);
  return jobs;
}

async function status(dir: string): Promise<VolumeStatus> {
  return JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', dir, '--json'], { timeoutMs: 30_000 })) as VolumeStatus;
}

/** Waits until every write fio did is in the tree (a CP ran and the NVRAM is empty). */
async function waitForCp(dir: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const s = await status(dir);
    if (s.cpNumber > 0 && s.nvram.usedBytes === 0) return;
    await sleep(100);
  }
  const s = await status(dir);
  assert.fail(`no CP committed the writes: CP ${s.cpNumber}, NVRAM ${JSON.stringify(s.nvram)}`);
}

/** Overwrites every data position of a member in [fromStripe, toStripe) with garbage (positions chosen by the geometry). */
function corruptData(memberPath: string, g: RaidGeometry, member: number, fromStripe: number, toStripe: number, everyNth: number): number {
  const fd = fs.openSync(memberPath, 'r+');
  let n = 0;
  try {
    const junk = Buffer.alloc(B, 0xa5);
    for (let s = fromStripe; s < Math.min(toStripe, g.stripes); s++) {
      for (let k = 0; k < g.unitBlocks; k += everyNth) {
        const mb = g.unitStart(s) + k;
        if (typeof g.logicalOf(member, mb) !== 'number') continue; // parity: a scrub's job (not here yet)
        junk.writeUInt32LE(mb, 0);
        fs.writeSync(fd, junk, 0, B, mb * B);
        n++;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

function createRaid(dir: string, level: number, members: number): Promise<string> {
  const args = ['create', dir, '--size', String(SIZE), '--nvram-size', '8M', '--raid', String(level), '--stripe-unit', '16K'];
  for (let i = 0; i < members; i++) args.push('--member', `m${i}.img`);
  return runOk(process.execPath, [NVMIRROR_BIN, ...args], { timeoutMs: 60_000 });
}

function geometryOf(dir: string): { g: RaidGeometry; member: (i: number) => string } {
  const label = JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { members: { path: string; blockCount: number }[]; raid: { level: 5 | 6; stripeUnitBytes: number } };
  const g = new RaidGeometry(label.raid.level, label.members.length, label.raid.stripeUnitBytes, label.members[0]!.blockCount, 8);
  return { g, member: (i) => path.join(dir, label.members[i]!.path) };
}

for (const [level, members, bad] of [[5, 4, [1]], [6, 6, [1, 4]]] as [5 | 6, number, number[]][]) {
  describe(`e2e RAID-${level} over ${members} members: fio verify through corruption, truncation and deletion`, function () {
    this.timeout(240_000);
    let tmp: string;
    let server: Server | undefined;
    const region = (off: number): string => `rw=write\nbs=64k\niodepth=8\noffset=${off}M\nsize=16M\n`;
    const serve = async (vol: string): Promise<Server> => {
      server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
      serverLog = server.stderr;
      return server;
    };

    before(async function () {
      requireTools(this, 'fio');
      tmp = makeTempDir(`nvm-e2e-raid${level}-`);
    });
    afterEach(async function () {
      if (server?.alive()) await server.stop();
      server = undefined;
    });
    after(async function () {
      await cleanupAll();
    });

    it(`heals blocks corrupted on ${bad.length} member(s) under fio's reads, counts them per member, and check passes`, async function () {
      const vol = path.join(tmp, 'corrupt');
      await createRaid(vol, level, members);
      const { g, member } = geometryOf(vol);
      const srv = await serve(vol);
      await fio(tmp, 'base', srv.uri, region(0));
      await waitForCp(vol);
      // Silent corruption of data positions (RAID-6: on two members, over the same stripes).
      const usedStripes = Math.ceil((24 * MiB) / B / g.stripeDataBlocks);
      let corrupted = 0;
      for (const m of bad) corrupted += corruptData(member(m), g, m, 1, usedStripes, m === bad[0] ? 1 : 2);
      assert.ok(corrupted > 100);
      await fio(tmp, 'base', srv.uri, `verify_only=1\n${region(0)}`);
      const s = await status(vol);
      for (const m of bad) {
        const ms = s.raid!.memberStatus[m]!;
        assert.ok(ms.errors.checksum > 0 && ms.errors.healed === ms.errors.checksum, `member ${m}: ${JSON.stringify(ms.errors)}`);
        assert.equal(ms.state, 'online', 'healed checksum errors leave the member in service');
      }
      assert.deepEqual(s.errors, { checksum: 0, io: 0, repaired: 0 }, 'no read was refused');
      // check (run by the serving process) reads every block in use: the corrupt metadata copies are healed too.
      const checked = await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 });
      assert.equal(checked.code, 0, `check: ${checked.stdout}${checked.stderr}`);
      const after = (await status(vol)).raid!.memberStatus[1]!.errors;
      assert.ok(after.healed >= s.raid!.memberStatus[1]!.errors.healed);
      const text = await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 });
      assert.match(text, new RegExp(`RAID-${level}, ${members} members, stripe unit 16.0 KiB: ONLINE`));
      assert.match(text, new RegExp(`1  m1\\.img\\s+ONLINE\\s+0\\s+0\\s+${after.checksum}\\s+${after.healed}`));
    });

    it(`keeps every read right when ${level === 6 ? 'a member is truncated and another deleted' : 'a member is truncated'} while fio runs, shows them FAULTED, and serves degraded after a restart`, async function () {
      const vol = path.join(tmp, 'lose');
      await createRaid(vol, level, members);
      const { member } = geometryOf(vol);
      const srv = await serve(vol);
      await fio(tmp, 'base', srv.uri, region(0));
      await waitForCp(vol);
      const lost = level === 6 ? [2, 5] : [2];
      const running = fio(tmp, 'during', srv.uri, region(24));
      await sleep(300);
      fs.truncateSync(member(lost[0]!), 1 * MiB);
      if (level === 6) fs.rmSync(member(lost[1]!));
      await running;
      await waitForCp(vol);
      await fio(tmp, 'base', srv.uri, `verify_only=1\n${region(0)}`);
      let s = await status(vol);
      assert.equal(s.raid!.state, 'degraded');
      assert.match(s.raid!.memberStatus[lost[0]!]!.reason ?? '', /short read|truncated/);
      if (level === 6) assert.match(s.raid!.memberStatus[lost[1]!]!.reason ?? '', /was deleted/);
      for (const m of lost) assert.equal(s.raid!.memberStatus[m]!.state, 'faulted');
      const text = await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 });
      assert.match(text, new RegExp(`RAID-${level}, ${members} members, stripe unit 16.0 KiB: DEGRADED, ${lost.length} of ${members} members out of service`));
      assert.match(text, /2  m2\.img\s+FAULTED/);
      // Restart: the lost members are recognised (truncated / missing / stale) and the volume serves degraded.
      assert.equal(await srv.stop(), 0);
      const again = await serve(vol);
      await fio(tmp, 'base', again.uri, `verify_only=1\n${region(0)}`);
      await fio(tmp, 'during', again.uri, `verify_only=1\n${region(24)}`);
      // The restart says so where the operator looks first, with what to do.
      assert.match(again.stderr(), new RegExp(`nvmirror: warning: RAID-${level}: DEGRADED, ${members - lost.length} of ${members} members in service\n`));
      for (const m of lost) assert.match(again.stderr(), new RegExp(`nvmirror: warning: RAID member ${m} m${m}\\.img: (faulted|missing) \\(`));
      assert.match(again.stderr(), /nvmirror: warning: replace each lost member with: nvmirror replace-member \S+ OLD NEW\n/);
      s = await status(vol);
      assert.equal(s.raid!.state, 'degraded');
      for (const m of lost) assert.notEqual(s.raid!.memberStatus[m]!.state, 'online', `member ${m}: ${JSON.stringify(s.raid!.memberStatus[m])}`);
    });

    it('refuses a member of another volume put in a member\'s place, by name', async function () {
      const vol = path.join(tmp, 'lose');
      fs.copyFileSync(path.join(tmp, 'corrupt', 'm0.img'), path.join(vol, 'm0.img'));
      const r = await run(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 });
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /member 0 m0\.img belongs to another volume \(uuid [0-9a-f-]{36}\), not to this one \([0-9a-f-]{36}\): refusing to open/);
    });
  });
}

describe('e2e RAID create: wrong member counts and levels are one-line errors', function () {
  this.timeout(60_000);
  after(cleanupAll);

  it('refuses RAID-6 over 3 members, RAID-3, and several members without --raid, creating nothing', async function () {
    const tmp = makeTempDir('nvm-e2e-raid-create-');
    const vol = path.join(tmp, 'v');
    const cases: [string[], RegExp][] = [
      [['--raid', '6', '--member', 'a', '--member', 'b', '--member', 'c'], /^nvmirror: RAID-6 needs at least 4 members \(2 data \+ P \+ Q\), got 3\n$/],
      [['--raid', '3', '--member', 'a', '--member', 'b', '--member', 'c'], /expected a RAID level 0, 1, 4, 5 or 6, got "3"/],
      [['--member', 'a', '--member', 'b'], /^nvmirror: 2 members need a RAID level: give --raid 0\|1\|4\|5\|6 \(or one --member\)\n$/],
      [['--raid', '5', '--member', 'a', '--member', 'b', '--member', 'c', '--stripe-unit', '6000'], /bad stripe unit 6000 bytes: a multiple of 4 KiB/],
    ];
    for (const [args, want] of cases) {
      const r = await run(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', '64M', ...args], { timeoutMs: 30_000 });
      assert.notEqual(r.code, 0, args.join(' '));
      assert.match(r.stderr, want);
      assert.ok(!fs.existsSync(path.join(vol, 'nvmirror.json')), 'nothing created');
    }
  });
});

describe('e2e RAID-5 over 4 block devices (loop devices)', function () {
  this.timeout(120_000);
  after(cleanupAll);

  it('creates, serves and verifies a RAID-5 volume on block devices, refuses to reuse a labelled one, and rebuilds a wiped member onto a new block device', async function () {
    requireCondition(this, isRoot(), 'root (loop devices)');
    requireTools(this, 'fio', 'losetup');
    const tmp = makeTempDir('nvm-e2e-raid-blk-');
    const loops: string[] = [];
    for (let i = 0; i < 5; i++) {
      const backing = path.join(tmp, `backing${i}.img`);
      fs.writeFileSync(backing, '');
      fs.truncateSync(backing, 96 * MiB);
      const dev = (await runOk('losetup', ['--find', '--show', backing])).trim();
      assert.match(dev, /^\/dev\/loop\d+$/);
      loops.push(dev);
      onCleanup(() => run('losetup', ['-d', dev]).then(() => undefined));
    }
    const vol = path.join(tmp, 'vol');
    const spare = loops.pop()!;
    const args = ['create', vol, '--size', String(SIZE), '--nvram-size', '8M', '--raid', '5', '--stripe-unit', '16K', ...loops.flatMap((l) => ['--member', l])];
    await runOk(process.execPath, [NVMIRROR_BIN, ...args], { timeoutMs: 60_000 });
    const srv = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    serverLog = srv.stderr;
    try {
      await fio(tmp, 'blk', srv.uri, 'rw=randwrite\nbs=16k\niodepth=8\noffset=0\nsize=16M\n');
      await waitForCp(vol);
      await fio(tmp, 'blk', srv.uri, 'verify_only=1\nrw=randwrite\nbs=16k\niodepth=8\noffset=0\nsize=16M\n');
      const s = await status(vol);
      assert.equal(s.raid!.state, 'online');
      assert.deepEqual(s.raid!.memberStatus.map((m) => m.name), loops);
    } finally {
      assert.equal(await srv.stop(), 0);
    }
    assert.equal((await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 })).code, 0);
    const again = await run(process.execPath, [NVMIRROR_BIN, 'create', path.join(tmp, 'vol2'), '--size', String(SIZE), '--nvram-size', '8M', '--raid', '5', ...loops.flatMap((l) => ['--member', l])], { timeoutMs: 60_000 });
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, new RegExp(`block device ${loops[0]} holds member 0 of nvmirror volume [0-9a-f-]{36}: refusing to overwrite it`));
    // A failed disk replaced by a new block device: member 1's device wiped under the
    // volume (all of it unreadable as a member), rebuilt onto the spare.
    await runOk('dd', ['if=/dev/zero', `of=${loops[1]}`, 'bs=1M', 'count=96', 'oflag=direct', 'status=none'], { timeoutMs: 60_000 });
    const labelled = await run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, loops[1]!, loops[0]!], { timeoutMs: 60_000 });
    assert.notEqual(labelled.code, 0, 'a member was accepted as the replacement');
    const rep = await run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, loops[1]!, spare, '--json'], { timeoutMs: 120_000 });
    assert.equal(rep.code, 0, rep.stderr);
    const after = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    serverLog = after.stderr;
    try {
      const s = await status(vol);
      assert.equal(s.raid!.state, 'online');
      assert.deepEqual(s.raid!.memberStatus.map((m) => m.name), [loops[0], spare, loops[2], loops[3]]);
      await fio(tmp, 'blk', after.uri, 'verify_only=1\nrw=randwrite\nbs=16k\niodepth=8\noffset=0\nsize=16M\n');
    } finally {
      assert.equal(await after.stop(), 0);
    }
    const scrub = await run(process.execPath, [NVMIRROR_BIN, 'scrub', vol], { timeoutMs: 60_000 });
    assert.equal(scrub.code, 0, scrub.stdout + scrub.stderr);
    assert.equal((await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 })).code, 0);
  });
});
