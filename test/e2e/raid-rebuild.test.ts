/**
 * `nvmirror replace-member` on a RAID-5 volume of 4 member files (16 KiB unit), one
 * member deleted:
 * - served: bad input (not a member, already a member, a rate below 64K) is one line and
 *   changes nothing; the CLI asks the serving process, which rebuilds onto the new file (--rate
 *   1M, so it lasts seconds) while fio (verify=crc32c) writes a new region and re-reads
 *   the old one; `status` shows the member REBUILDING, progress and an ETA meanwhile.
 *   Then: the member ONLINE under its new name, scrub clean, check clean, every byte
 *   right, and still right with another member deleted (the new one holds real data).
 * - served, kill -9 mid-rebuild: the restarted server resumes from the persisted
 *   progress (status says from which stripe, the marker's) while qemu-io writes, and
 *   ends with the member in service, scrub clean, data right.
 * - unserved, kill -9 of the CLI mid-rebuild: the same command again resumes (its
 *   output names the marker's stripe), then scrub clean, data right.
 */
import { strict as assert } from 'assert';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { CHILD_ENV, MiB, NVMIRROR_BIN, REPO_ROOT, cleanupAll, makeTempDir, requireTools, run, runOk, startServer, sleep, type Server } from './harness';
import type { VolumeStatus } from '../../src/volume/served';
import type { DirScrubReport } from '../../src/volume/scrub-dir';
import type { ReplaceMarker } from '../../src/volume/replace-member';

const SIZE = 64 * MiB;
/** Long enough to overlap the rebuild with clients (about 600 stripes of 16 KiB in use: ~10 s). */
const RATE = '1M';

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

async function scrubClean(dir: string): Promise<void> {
  const res = await run(process.execPath, [NVMIRROR_BIN, 'scrub', dir, '--json'], { timeoutMs: 120_000 });
  const r = JSON.parse(res.stdout) as DirScrubReport;
  assert.deepEqual([res.code, r.checksumErrors, r.parityErrors, r.uncorrectable, r.stripesUnverifiable], [0, 0, 0, 0, 0], `scrub: ${res.stdout}${res.stderr}`);
}

function readMarker(dir: string): ReplaceMarker | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'replace-member.json'), 'utf8')) as ReplaceMarker;
  } catch {
    return undefined;
  }
}

async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, tries = 600): Promise<T> {
  for (let i = 0; i < tries; i++) {
    const v = await fn();
    if (v !== undefined) return v;
    await sleep(100);
  }
  assert.fail(`gave up waiting for ${what}`);
}

async function fio(dir: string, name: string, uri: string, body: string): Promise<void> {
  const file = path.join(dir, `${name}.fio`);
  fs.writeFileSync(file, `[global]\nioengine=nbd\nuri=${uri}\nverify=crc32c\nverify_fatal=1\ndo_verify=1\n[${name}]\n${body}`);
  const r = await run('fio', ['--output-format=json', file], { timeoutMs: 180_000, cwd: dir });
  assert.equal(r.code, 0, `fio ${name}: ${r.stderr.slice(-1500)}`);
  for (const j of (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number }[] }).jobs) assert.equal(j.error, 0, `fio ${name}`);
}

describe('e2e RAID-5 replace-member while served, rate-limited, resumed after kill -9', function () {
  this.timeout(300_000);
  let tmp: string;
  let server: Server | undefined;
  const serve = async (vol: string): Promise<Server> => {
    server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    return server;
  };
  const region = (off: number, rw = 'write'): string => `rw=${rw}\nbs=64k\niodepth=8\noffset=${off}M\nsize=16M\n`;

  before(function () {
    requireTools(this, 'fio', 'qemu-io');
    tmp = makeTempDir('nvm-e2e-raid-rebuild-');
  });
  afterEach(async () => {
    if (server?.alive()) await server.stop();
    server = undefined;
  });
  after(async () => {
    await cleanupAll();
  });

  async function create(vol: string): Promise<void> {
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', String(SIZE), '--nvram-size', '8M', '--raid', '5', '--stripe-unit', '16K', '--member', 'm0.img', '--member', 'm1.img', '--member', 'm2.img', '--member', 'm3.img'], { timeoutMs: 60_000 });
  }

  it('served: rebuilds a deleted member while fio writes and verifies; status shows progress; ONLINE, scrub and check clean, every byte right', async () => {
    const vol = path.join(tmp, 'served');
    await create(vol);
    let srv = await serve(vol);
    await fio(tmp, 'base', srv.uri, region(0));
    await waitForCp(vol);
    fs.rmSync(path.join(vol, 'm2.img'));
    // Bad input while served: one line each, nothing changed.
    const label = fs.readFileSync(path.join(vol, 'nvmirror.json'), 'utf8');
    for (const [args, msg] of [
      [['m9.img', path.join(vol, 'n2.img')], /^nvmirror: m9\.img is not a member of .*\n$/],
      [['m2.img', path.join(vol, 'm3.img')], /^nvmirror: .*m3\.img is already a member of .*\n$/],
      [['m2.img', path.join(vol, 'n2.img'), '--rate', '1K'], /^nvmirror: bad rate "1K": at least 64K per second\n$/],
    ] as [string[], RegExp][]) {
      const bad = await run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, ...args], { timeoutMs: 30_000 });
      assert.equal(bad.code, 1, bad.stderr);
      assert.match(bad.stderr, msg);
    }
    assert.equal(fs.readFileSync(path.join(vol, 'nvmirror.json'), 'utf8'), label);
    assert.ok(!fs.existsSync(path.join(vol, 'n2.img')) && !fs.existsSync(path.join(vol, 'replace-member.json')));

    const replacing = run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, 'm2.img', path.join(vol, 'n2.img'), '--rate', RATE], { timeoutMs: 240_000 });
    const during = await until('the rebuild in status', async () => {
      const s = await status(vol);
      return s.raid?.rebuild && s.raid.rebuild.doneBytes > 0 ? s : undefined;
    });
    const rb = during.raid!.rebuild!;
    assert.equal(during.raid!.memberStatus[2]!.state, 'rebuilding');
    assert.deepEqual([rb.index, rb.old, rb.new, rb.rateBytesPerSec], [2, 'm2.img', 'n2.img', MiB]);
    assert.ok(rb.doneBytes < rb.totalBytes && rb.etaSeconds !== undefined && rb.etaSeconds > 0, JSON.stringify(rb));
    const text = await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 });
    assert.match(text, /rebuild +member 2 m2\.img -> n2\.img in progress since .*: .* of .* \(\d+%, \d+ of \d+ stripes\), .*\/s, ETA \d+ s, limit 1\.00 MiB\/s/);
    assert.match(text, /2  n2\.img\s+REBUILDING/);
    // Clients during the rebuild: new data written (and verified), the old data read back.
    await Promise.all([fio(tmp, 'during', srv.uri, region(24)), fio(tmp, 'base', srv.uri, `verify_only=1\n${region(0)}`)]);
    assert.ok((await status(vol)).raid!.rebuild, 'fio ran while the rebuild was still going');

    const res = await replacing;
    assert.equal(res.code, 0, res.stderr);
    assert.match(res.stdout, /^member 2: m2\.img replaced by n2\.img \(by the serving process\): \d+ stripes rebuilt, .* written in [\d.]+ s\n$/);
    const after = await status(vol);
    assert.equal(after.raid!.state, 'online');
    assert.deepEqual([after.raid!.memberStatus[2]!.name, after.raid!.memberStatus[2]!.state], ['n2.img', 'online']);
    assert.equal(after.raid!.rebuild, undefined);
    assert.match(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 }), /2  n2\.img\s+ONLINE/);
    await waitForCp(vol);
    await scrubClean(vol);
    await fio(tmp, 'base', srv.uri, `verify_only=1\n${region(0)}`);
    await fio(tmp, 'during', srv.uri, `verify_only=1\n${region(24)}`);
    assert.equal(await srv.stop(), 0);
    server = undefined;
    assert.equal((await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 })).code, 0);
    assert.ok(!fs.existsSync(path.join(vol, 'replace-member.json')));
    // The new member holds real data: lose another one, every byte still right.
    fs.rmSync(path.join(vol, 'm0.img'));
    srv = await serve(vol);
    assert.equal((await status(vol)).raid!.memberStatus[2]!.state, 'online');
    await fio(tmp, 'base', srv.uri, `verify_only=1\n${region(0)}`);
    await fio(tmp, 'during', srv.uri, `verify_only=1\n${region(24)}`);
  });

  it('served, kill -9 mid-rebuild: the restarted server resumes from the persisted progress and ends consistent', async () => {
    const vol = path.join(tmp, 'crash');
    await create(vol);
    let srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 24M', '-c', 'flush', srv.uri]);
    await waitForCp(vol);
    fs.rmSync(path.join(vol, 'm1.img'));
    const replacing = run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, '1', path.join(vol, 'n1.img'), '--rate', RATE], { timeoutMs: 240_000 });
    const marker = await until('progress persisted', () => {
      const m = readMarker(vol);
      return m && m.nextStripe >= 128 ? m : undefined;
    });
    process.kill(srv.pid, 'SIGKILL');
    await until('the server gone', () => (srv.alive() ? undefined : true));
    const cli = await replacing;
    assert.notEqual(cli.code, 0, 'the CLI saw the serving process die');
    const persisted = readMarker(vol)!;
    assert.ok(persisted.nextStripe >= marker.nextStripe && persisted.nextStripe < 1000, JSON.stringify(persisted));

    srv = await serve(vol);
    const resumed = await until('the resumed rebuild in status', async () => (await status(vol)).raid?.rebuild);
    assert.equal(resumed.resumedAtStripe, persisted.nextStripe, 'resumed from the persisted progress');
    assert.ok(resumed.stripesDone > 0, `not from zero: ${JSON.stringify(resumed)}`);
    assert.equal(resumed.rateBytesPerSec, MiB, 'the rate limit carries over');
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xcd 32M 8M', '-c', 'flush', '-c', 'read -P 0xab 0 24M', srv.uri]);
    await until('the member in service', async () => {
      const s = await status(vol);
      return s.raid?.state === 'online' && s.raid.memberStatus[1]!.name === 'n1.img' && !fs.existsSync(path.join(vol, 'replace-member.json')) ? true : undefined;
    }, 1200);
    assert.match(srv.stderr(), /replace-member: resumed replacement finished/);
    // Not from zero: this run rebuilt at most the stripes at and above the persisted one.
    const doneLine = srv.stderr().split('\n').find((l) => l.includes('replace-member: the new member is in service'));
    const rebuiltNow = (JSON.parse(doneLine!) as { stripes: number }).stripes;
    assert.ok(rebuiltNow > 0 && rebuiltNow <= resumed.stripesTotal - persisted.nextStripe + 8, `rebuilt ${rebuiltNow} stripes of ${resumed.stripesTotal} after resuming at ${persisted.nextStripe}`);
    await waitForCp(vol);
    await scrubClean(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 24M', '-c', 'read -P 0xcd 32M 8M', srv.uri]);
    assert.equal(await srv.stop(), 0);
    server = undefined;
    assert.equal((await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 })).code, 0);
  });

  it('unserved, kill -9 of the CLI mid-rebuild: running it again resumes and ends consistent', async () => {
    const vol = path.join(tmp, 'offline');
    await create(vol);
    let srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 24M', '-c', 'flush', srv.uri]);
    await waitForCp(vol);
    assert.equal(await srv.stop(), 0);
    server = undefined;
    fs.rmSync(path.join(vol, 'm3.img'));
    const child = spawn(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, 'm3.img', path.join(vol, 'n3.img'), '--rate', RATE], { env: CHILD_ENV, cwd: REPO_ROOT, stdio: 'ignore' });
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_c, sig) => resolve(sig)));
    await until('progress persisted', () => {
      const m = readMarker(vol);
      return m && m.nextStripe >= 64 ? m : undefined;
    });
    child.kill('SIGKILL');
    assert.equal(await exited, 'SIGKILL');
    const persisted = readMarker(vol)!;
    assert.ok(persisted.nextStripe > 0 && persisted.nextStripe < 1000);
    const out = await runOk(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, 'm3.img', path.join(vol, 'n3.img'), '--rate', '64M'], { timeoutMs: 120_000 });
    assert.match(out, new RegExp(`^member 3: m3\\.img replaced by n3\\.img: \\d+ stripes rebuilt \\(resumed at stripe ${persisted.nextStripe}\\)`));
    await scrubClean(vol);
    srv = await serve(vol);
    const s = await status(vol);
    assert.deepEqual([s.raid!.state, s.raid!.memberStatus[3]!.name], ['online', 'n3.img']);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 24M', srv.uri]);
  });
});
