/**
 * `nvmirror scrub` on a RAID-5 volume of member files (4 members, 16 KiB unit), written
 * by qemu-io through `nvmirror serve`:
 * - unserved: data blocks corrupted on member 1 and parity on member 2 (other stripes):
 *   scrub reports both and exits 1 without changing any member file; scrub --repair fixes
 *   them and exits 0; a second scrub is clean; the data reads back right.
 * - replace-member: a deleted member rebuilt onto a new file (bad OLD is one line).
 * - served: with data corrupted behind the server's back, scrub --repair runs through the
 *   control socket while qemu-io writes another region; both regions read back right, a
 *   second scrub is clean, status shows the last scan, and check passes after stopping.
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { MiB, NVMIRROR_BIN, cleanupAll, makeTempDir, requireTools, run, runOk, startServer, sleep, type Server } from './harness';
import { RaidGeometry } from '../../src/raid/geometry';
import type { VolumeStatus } from '../../src/volume/served';
import type { DirScrubReport } from '../../src/volume/scrub-dir';

const SIZE = 64 * MiB;
const B = 4096;

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
  const res = await run(process.execPath, [NVMIRROR_BIN, 'scrub', dir, '--json', ...flags], { timeoutMs: 120_000 });
  assert.ok(res.stdout.trim().startsWith('{'), `scrub ${flags.join(' ')}: ${res.stdout}${res.stderr}`);
  return { code: res.code, r: JSON.parse(res.stdout) as DirScrubReport, stderr: res.stderr };
}

function geometryOf(dir: string): { g: RaidGeometry; member: (i: number) => string; count: number } {
  const label = JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { members: { path: string; blockCount: number }[]; raid: { level: 5; stripeUnitBytes: number } };
  const g = new RaidGeometry(label.raid.level, label.members.length, label.raid.stripeUnitBytes, label.members[0]!.blockCount, 8);
  return { g, member: (i) => path.join(dir, label.members[i]!.path), count: label.members.length };
}

/** Overwrites every `everyNth` position of `member` in stripes [from, to) that is data (`want` 'data') or P (`want` 'P'); returns how many. */
function corrupt(file: string, g: RaidGeometry, member: number, from: number, to: number, everyNth: number, want: 'data' | 'P'): number {
  const fd = fs.openSync(file, 'r+');
  let n = 0;
  try {
    for (let s = from; s < to; s++) {
      for (let k = 0; k < g.unitBlocks; k += everyNth) {
        const mb = g.unitStart(s) + k;
        const role = g.logicalOf(member, mb);
        if (want === 'data' ? typeof role !== 'number' : role !== 'P') continue;
        const junk = Buffer.alloc(B, 0x3c + n);
        fs.writeSync(fd, junk, 0, B, mb * B);
        n++;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

function sha(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

describe('e2e RAID-5 scrub', function () {
  this.timeout(240_000);
  let tmp: string;
  let server: Server | undefined;
  const serve = async (vol: string): Promise<Server> => {
    server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: SIZE, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    return server;
  };

  before(function () {
    requireTools(this, 'qemu-io');
    tmp = makeTempDir('nvm-e2e-raid-scrub-');
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
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 8M', '-c', 'flush', srv.uri]);
    await waitForCp(vol);
  }

  it('unserved: reports corrupt data and parity without writing (exit 1), repairs them (exit 0), then scrubs clean', async () => {
    const vol = path.join(tmp, 'unserved');
    await createAndFill(vol);
    assert.equal(await server!.stop(), 0);
    server = undefined;
    const { g, member, count } = geometryOf(vol);
    // 8 MiB from the start: stripes up to ~170 are in use. Data on member 1 in stripes 2..11, P on member 2 in 20..59.
    const badData = corrupt(member(1), g, 1, 2, 12, 3, 'data');
    const badP = corrupt(member(2), g, 2, 20, 60, 4, 'P');
    assert.ok(badData > 0 && badP > 0);
    const before = Array.from({ length: count }, (_, i) => sha(member(i)));

    const found = await scrub(vol);
    assert.equal(found.code, 1, 'errors found: exit 1');
    assert.ok(found.r.checksumErrors >= 1 && found.r.checksumErrors <= badData, `checksum errors ${found.r.checksumErrors} of ${badData} corrupted (some may be free blocks)`);
    assert.equal(found.r.parityErrors, 10, 'P is on member 2 in 10 of those 40 stripes');
    assert.deepEqual([found.r.corrected, found.r.uncorrectable, found.r.served], [0, 0, false]);
    assert.equal(found.r.members[1]!.checksum, found.r.checksumErrors);
    assert.equal(found.r.members[2]!.checksum, found.r.parityErrors);
    assert.deepEqual(Array.from({ length: count }, (_, i) => sha(member(i))), before, 'no member file changed');
    const text = await run(process.execPath, [NVMIRROR_BIN, 'scrub', vol], { timeoutMs: 120_000 });
    assert.equal(text.code, 1);
    assert.match(text.stdout, /scan: scrub found \d+ error\(s\) in [\d.]+ s with 0 uncorrectable; scanned/);
    assert.match(text.stdout, /1 +m1\.img +ONLINE +0 +0 +\d+/);

    const fixed = await scrub(vol, '--repair');
    assert.equal(fixed.code, 0, JSON.stringify(fixed.r.problems));
    assert.equal(fixed.r.corrected, found.r.checksumErrors + found.r.parityErrors);
    assert.equal(fixed.r.uncorrectable, 0);
    const again = await scrub(vol);
    assert.equal(again.code, 0);
    assert.deepEqual([again.r.checksumErrors, again.r.parityErrors, again.r.uncorrectable], [0, 0, 0], 'a second scrub is clean');

    const srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 8M', srv.uri]);
    assert.equal((await status(vol)).raid!.state, 'online');
  });

  it('replace-member: a deleted member rebuilt onto a new file; the volume is online again, scrubs clean and reads right', async () => {
    const vol = path.join(tmp, 'replace');
    await createAndFill(vol);
    assert.equal(await server!.stop(), 0);
    server = undefined;
    fs.rmSync(path.join(vol, 'm2.img'));
    const bad = await run(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, 'm9.img', path.join(vol, 'n2.img')], { timeoutMs: 60_000 });
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^nvmirror: m9\.img is not a member of .*\n$/);
    const out = await runOk(process.execPath, [NVMIRROR_BIN, 'replace-member', vol, 'm2.img', path.join(vol, 'n2.img')], { timeoutMs: 120_000 });
    assert.match(out, /^member 2: m2\.img replaced by n2\.img: \d+ stripes rebuilt, .* written in [\d.]+ s\n$/);
    const s = await status(vol);
    assert.equal(s.raid!.state, 'online');
    assert.equal(s.raid!.memberStatus[2]!.name, 'n2.img');
    const clean = await scrub(vol);
    assert.deepEqual([clean.code, clean.r.checksumErrors, clean.r.parityErrors, clean.r.stripesUnverifiable], [0, 0, 0, 0]);
    const srv = await serve(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 8M', srv.uri]);
  });

  it('served: scrub --repair through the control socket while qemu-io writes stays correct', async () => {
    const vol = path.join(tmp, 'served');
    await createAndFill(vol);
    const { g, member } = geometryOf(vol);
    const badData = corrupt(member(1), g, 1, 2, 40, 2, 'data');
    assert.ok(badData > 0);
    const srv = server!;
    const writer = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xcd 16M 24M', '-c', 'flush', '-c', 'write -P 0xce 40M 8M', '-c', 'flush', srv.uri], { timeoutMs: 120_000 });
    const fixed = await scrub(vol, '--repair');
    const w = await writer;
    assert.equal(w.code, 0, w.stderr);
    assert.equal(fixed.code, 0, JSON.stringify(fixed.r.problems));
    assert.equal(fixed.r.served, true);
    assert.equal(fixed.r.uncorrectable, 0);
    assert.ok(fixed.r.checksumErrors > 0, 'the corrupt blocks were found');
    assert.equal(fixed.r.corrected, fixed.r.checksumErrors + fixed.r.parityErrors);
    await waitForCp(vol);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 8M', '-c', 'read -P 0xcd 16M 24M', '-c', 'read -P 0xce 40M 8M', srv.uri]);
    const again = await scrub(vol);
    assert.equal(again.code, 0, JSON.stringify(again.r));
    assert.deepEqual([again.r.checksumErrors, again.r.parityErrors], [0, 0], 'a second scrub is clean');
    const s = await status(vol);
    assert.equal(s.raid!.scrub?.last?.repair, false, 'status shows the last scan');
    assert.match(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol], { timeoutMs: 30_000 }), /scan +scrub found 0 error\(s\)/);
    assert.equal(await srv.stop(), 0);
    server = undefined;
    assert.equal((await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 })).code, 0);
  });
});
