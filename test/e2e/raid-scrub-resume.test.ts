/**
 * Crash during scrub (issue 9): `nvmirror scrub DIR --repair` on a RAID-5 volume of member
 * files (4 members, 16 KiB unit, 16 MiB written by qemu-io), with data corrupted on one
 * member and parity on another, killed with kill -9 once it has saved a checkpoint
 * (DIR/scrub-progress.json; `--rate` keeps it slow enough to be caught mid-run):
 * - unserved: the scrub process is killed; running it again resumes at the checkpoint's
 *   stripe, repairs the rest (the counts include the killed run's), removes the file; a
 *   second scrub is clean, check passes, the data reads back right;
 * - served: the server is killed mid-scrub; restarted, `scrub --repair` resumes in the new
 *   server process at the checkpoint and ends the same way.
 */
import { strict as assert } from 'assert';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { MiB, NVMIRROR_BIN, cleanupAll, makeTempDir, requireTools, run, runOk, startServer, sleep, type Server } from './harness';
import { RaidGeometry } from '../../src/raid/geometry';
import type { VolumeStatus } from '../../src/volume/served';
import type { DirScrubReport } from '../../src/volume/scrub-dir';
import { SCRUB_CHECKPOINT_STRIPES, type ScrubCheckpoint } from '../../src/raid/scrub';
import { SCRUB_PROGRESS_NAME } from '../../src/volume/scrub-progress';

const SIZE = 64 * MiB;
const B = 4096;
const FILL = '16M';
/** Slow enough that a checkpoint is seen seconds before the end (pass 1 alone reads 16 MiB). */
const RATE = '8M';
const CHECKPOINT_WAIT_MS = 120_000;

async function status(dir: string): Promise<VolumeStatus> {
  return JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', dir, '--json'], { timeoutMs: 30_000 })) as VolumeStatus;
}

async function waitForCp(dir: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const s = await status(dir);
    if (s.cpNumber > 0 && s.nvram.usedBytes === 0) return;
    await sleep(100);
  }
  assert.fail('no CP committed the writes');
}

async function scrub(dir: string, ...flags: string[]): Promise<{ code: number | null; r: DirScrubReport; stderr: string }> {
  const res = await run(process.execPath, [NVMIRROR_BIN, 'scrub', dir, '--json', ...flags], { timeoutMs: 180_000 });
  assert.ok(res.stdout.trim().startsWith('{'), `scrub ${flags.join(' ')}: ${res.stdout}${res.stderr}`);
  return { code: res.code, r: JSON.parse(res.stdout) as DirScrubReport, stderr: res.stderr };
}

function geometryOf(dir: string): { g: RaidGeometry; member: (i: number) => string } {
  const label = JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { members: { path: string; blockCount: number }[]; raid: { level: 5; stripeUnitBytes: number } };
  const g = new RaidGeometry(label.raid.level, label.members.length, label.raid.stripeUnitBytes, label.members[0]!.blockCount, 8);
  return { g, member: (i) => path.join(dir, label.members[i]!.path) };
}

/** Overwrites the first block of `member`'s unit in stripes [from, to) where that unit is data or P; returns the stripes hit. */
function corrupt(file: string, g: RaidGeometry, member: number, from: number, to: number, want: 'data' | 'P'): number {
  const fd = fs.openSync(file, 'r+');
  let n = 0;
  try {
    for (let s = from; s < to; s++) {
      const mb = g.unitStart(s);
      const role = g.logicalOf(member, mb);
      if (want === 'data' ? typeof role !== 'number' : role !== 'P') continue;
      fs.writeSync(fd, Buffer.alloc(B, 0x3c + n), 0, B, mb * B);
      n++;
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

/** Waits for the scrub's checkpoint file and returns the checkpoint. */
async function checkpointSeen(vol: string, alive: () => boolean): Promise<ScrubCheckpoint> {
  const file = path.join(vol, SCRUB_PROGRESS_NAME);
  for (const t0 = Date.now(); Date.now() - t0 < CHECKPOINT_WAIT_MS;) {
    if (fs.existsSync(file)) return (JSON.parse(fs.readFileSync(file, 'utf8')) as { checkpoint: ScrubCheckpoint }).checkpoint;
    assert.ok(alive(), 'the scrub ended before it saved a checkpoint');
    await sleep(20);
  }
  return assert.fail('no scrub checkpoint appeared');
}

describe('e2e RAID-5 scrub killed mid-run resumes', function () {
  this.timeout(300_000);
  let tmp: string;
  let server: Server | undefined;
  const serve = async (vol: string): Promise<Server> => {
    server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    return server;
  };

  before(function () {
    requireTools(this, 'qemu-io');
    tmp = makeTempDir('nvm-e2e-raid-scrub-resume-');
  });
  afterEach(async () => {
    if (server?.alive()) await server.stop();
    server = undefined;
  });
  after(async () => {
    await cleanupAll();
  });

  async function createAndFill(vol: string): Promise<void> {
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', String(SIZE), '--nvram-size', '8M', '--raid', '5', '--stripe-unit', '16K', '--member', 'm0.img', '--member', 'm1.img', '--member', 'm2.img', '--member', 'm3.img'], { timeoutMs: 60_000 });
    const srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0xab 0 ${FILL}`, '-c', 'flush', srv.uri]);
    await waitForCp(vol);
  }

  /** 16 MiB = 342 stripes of 48 KiB data: data on member 1 in stripes 2..11, P on member 2 in 40..339 (before and after any checkpoint). */
  function corruptSome(vol: string): { badData: number; badP: number } {
    const { g, member } = geometryOf(vol);
    const badData = corrupt(member(1), g, 1, 2, 12, 'data');
    const badP = corrupt(member(2), g, 2, 40, 340, 'P');
    assert.ok(badData > 0 && badP > 0);
    return { badData, badP };
  }

  async function expectConsistent(vol: string, resumed: DirScrubReport, cp: ScrubCheckpoint, badP: number): Promise<void> {
    assert.equal(resumed.resumedAtStripe, cp.nextStripe, 'the scrub went on from the checkpoint');
    assert.equal(resumed.uncorrectable, 0, JSON.stringify(resumed.problems));
    // Every stale P is found by one run or the other; what the killed run repaired after its
    // last checkpoint (at most one batch) is repaired but not counted.
    assert.ok(resumed.parityErrors >= cp.parityErrors && resumed.parityErrors <= badP && badP - resumed.parityErrors <= SCRUB_CHECKPOINT_STRIPES, `${resumed.parityErrors} stale P counted of ${badP} (checkpoint ${cp.parityErrors})`);
    assert.ok(resumed.checksumErrors >= 1, 'the corrupt data blocks were found (by the killed run)');
    assert.equal(resumed.corrected, resumed.checksumErrors + resumed.parityErrors);
    assert.ok(!fs.existsSync(path.join(vol, SCRUB_PROGRESS_NAME)), 'the checkpoint is removed at the end');
    const again = await scrub(vol);
    assert.equal(again.code, 0, JSON.stringify(again.r));
    assert.deepEqual([again.r.checksumErrors, again.r.parityErrors, again.r.uncorrectable, again.r.resumedAtStripe], [0, 0, 0, undefined], 'a second scrub is clean');
  }

  it('unserved: scrub --repair killed with kill -9 resumes from its checkpoint and ends consistent', async () => {
    const vol = path.join(tmp, 'unserved');
    await createAndFill(vol);
    assert.equal(await server!.stop(), 0);
    server = undefined;
    const { badP } = corruptSome(vol);

    for (const bad of ['0', 'fast']) {
      const r = await run(process.execPath, [NVMIRROR_BIN, 'scrub', vol, '--repair', '--rate', bad], { timeoutMs: 30_000 });
      assert.equal(r.code, 1);
      assert.match(r.stderr, bad === '0' ? /^nvmirror: --rate 0: must be a size per second above 0 \(e\.g\. 50M\)\n$/ : /^nvmirror: bad size "fast": expected a number with an optional K\/M\/G\/T suffix\n$/);
    }
    assert.ok(!fs.existsSync(path.join(vol, SCRUB_PROGRESS_NAME)), 'a refused scrub leaves nothing behind');

    const child = spawn(process.execPath, [NVMIRROR_BIN, 'scrub', vol, '--repair', '--rate', RATE, '--json'], { stdio: 'ignore' });
    let exited = false;
    const exit = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
    const cp = await checkpointSeen(vol, () => !exited);
    child.kill('SIGKILL');
    await exit;
    assert.ok(cp.nextStripe > 0 && cp.repair, JSON.stringify(cp));
    // What the killed run saved is still there after the kill.
    assert.ok(fs.existsSync(path.join(vol, SCRUB_PROGRESS_NAME)));

    const resumed = await scrub(vol, '--repair');
    assert.equal(resumed.code, 0, JSON.stringify(resumed.r.problems));
    await expectConsistent(vol, resumed.r, cp, badP);
    const text = await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 });
    assert.equal(text.code, 0, text.stdout + text.stderr);
    const srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0xab 0 ${FILL}`, srv.uri]);
    assert.equal((await status(vol)).raid!.state, 'online');
  });

  it('served: the server killed with kill -9 mid-scrub; restarted, scrub --repair resumes in it and ends consistent', async () => {
    const vol = path.join(tmp, 'served');
    await createAndFill(vol);
    const { badP } = corruptSome(vol);
    const srv = server!;
    const client = run(process.execPath, [NVMIRROR_BIN, 'scrub', vol, '--repair', '--rate', RATE, '--json'], { timeoutMs: 180_000 });
    let clientDone = false;
    void client.then(() => { clientDone = true; });
    const cp = await checkpointSeen(vol, () => !clientDone && srv.alive());
    process.kill(srv.pid, 'SIGKILL');
    const c = await client;
    assert.notEqual(c.code, 0, 'the scrub client fails when the server dies under it');
    for (let i = 0; i < 100 && srv.alive(); i++) await sleep(50);
    server = undefined;
    assert.ok(cp.nextStripe > 0 && cp.repair, JSON.stringify(cp));

    const srv2 = await serve(vol);
    const resumed = await scrub(vol, '--repair');
    assert.equal(resumed.code, 0, JSON.stringify(resumed.r.problems));
    assert.equal(resumed.r.served, true);
    await expectConsistent(vol, resumed.r, cp, badP);
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0xab 0 ${FILL}`, srv2.uri]);
    assert.match(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 }), /scan +scrub found 0 error\(s\)/);
    assert.equal(await srv2.stop(), 0);
    server = undefined;
    const text = await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 });
    assert.equal(text.code, 0, text.stdout + text.stderr);
  });
});
