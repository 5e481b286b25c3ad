/**
 * A real filesystem on nvmirror: nbdfuse exposes the export as a file, losetup turns it
 * into a block device, mkfs.ext4 + mount + write files + umount + e2fsck -fn, then the
 * whole stack is torn down (so nothing is left in a page cache) and attached again:
 * e2fsck once more, mount, and every file's checksum must match. Then the server stops
 * (`nvmirror check` must pass for an engine volume) and a new read-only server on the
 * same storage must show the same clean filesystem and files; for the file backend the
 * image file itself is checked with e2fsck too.
 * Needs root, /dev/fuse and loop devices. Runs for every backend in BACKENDS.
 *
 * Then the same stack on a RAID-5 volume over 4 member files (issue 9): a member file is
 * deleted while ext4 is mounted, more files are written, the server takes the member out
 * of service (status: FAULTED, "was deleted"); after a fresh attach e2fsck -fn is clean
 * and every file reads back (the lost member's units rebuilt from parity); a new server
 * opens the volume without that member (MISSING) and the same holds.
 *
 * Cleanup: every mount, loop device and nbdfuse process is registered with onCleanup
 * as soon as it exists, so the after hook undoes them even when a step fails.
 */
import { strict as assert } from 'assert';
import { ChildProcess, spawn } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import {
  BACKENDS, CHILD_ENV, MiB, NVMIRROR_BIN, Server, cleanupAll, isRoot, makeTempDir, onCleanup, requireCondition, requireTools,
  restartServer, run, runOk, sleep, startServer,
} from './harness';

const SIZE_BYTES = 128 * MiB;

function isMounted(dir: string): boolean {
  const mounts = fs.readFileSync('/proc/mounts', 'utf8');
  return mounts.split('\n').some((l) => l.split(' ')[1] === dir);
}

/** Starts nbdfuse on `fuseDir` and waits until `fuseDir/nbd` has the export's size. */
async function attachFuse(fuseDir: string, uri: string, pidFile: string, extra: string[] = [], sizeBytes = SIZE_BYTES): Promise<{ child: ChildProcess; file: string }> {
  const child = spawn('nbdfuse', [...extra, '-P', pidFile, fuseDir, uri], { env: CHILD_ENV, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => {
    if (err.length < 8192) err += s;
  });
  onCleanup(async () => {
    if (isMounted(fuseDir)) await run('fusermount3', ['-u', '-z', fuseDir]);
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await sleep(200);
    }
  });
  const file = path.join(fuseDir, 'nbd');
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`nbdfuse exited ${child.exitCode}: ${err}`);
    if (fs.existsSync(pidFile) && isMounted(fuseDir) && fs.statSync(file).size === sizeBytes) return { child, file };
    await sleep(100);
  }
  throw new Error(`nbdfuse did not come up within 15 s: ${err}`);
}

async function detachFuse(fuseDir: string, child: ChildProcess, pidFile: string): Promise<void> {
  // EBUSY while the kernel still closes what used the file (detachLoop waits for the loop
  // device; anything else gets a few seconds too).
  for (let attempt = 0; ; attempt++) {
    const r = await run('fusermount3', ['-u', fuseDir]);
    if (r.code === 0) break;
    if (!/Device or resource busy/.test(r.stderr)) throw new Error(`fusermount3 -u ${fuseDir} exited ${r.code}: ${r.stderr}`);
    if (attempt >= 50) {
      process.stdout.write(`      note: ${fuseDir} still busy 5 s after its loop device was detached; unmounting it lazily\n`);
      await runOk('fusermount3', ['-u', '-z', fuseDir]);
      break;
    }
    await sleep(100);
  }
  const deadline = Date.now() + 30_000;
  while (child.exitCode === null && child.signalCode === null) {
    if (Date.now() > deadline) throw new Error('nbdfuse did not exit within 30 s of fusermount3 -u');
    await sleep(50);
  }
  assert.equal(child.exitCode, 0, 'nbdfuse exits 0 after unmount');
  fs.rmSync(pidFile, { force: true });
}

function loopBackingFile(dev: string): string | undefined {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(dev)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

async function attachLoop(file: string, readOnly = false): Promise<string> {
  // Another test on this machine may grab the same free loop device: retry a few times.
  let dev = '';
  for (let attempt = 0; ; attempt++) {
    const r = await run('losetup', [...(readOnly ? ['--read-only'] : []), '--find', '--show', file]);
    if (r.code === 0) {
      dev = r.stdout.trim();
      break;
    }
    if (attempt >= 4) throw new Error(`losetup --find --show ${file}: ${r.stderr}`);
    await sleep(200 + 300 * attempt);
  }
  assert.match(dev, /^\/dev\/loop\d+$/);
  onCleanup(async () => {
    // Detach only if the device still backs our file: a freed loop number may already
    // belong to someone else's test.
    if (loopBackingFile(dev) === file) await run('losetup', ['-d', dev]);
  });
  return dev;
}

/**
 * Detaches a loop device and waits until the kernel has let go of its backing file:
 * `losetup -d` may return while the device is still open (a udev probe, the last close
 * of an unmount), and the nbdfuse file it backs stays busy until then.
 */
async function detachLoop(dev: string): Promise<void> {
  const file = loopBackingFile(dev);
  await runOk('losetup', ['-d', dev]);
  const deadline = Date.now() + 10_000;
  while (file !== undefined && loopBackingFile(dev) === file && Date.now() < deadline) await sleep(50);
  // Still bound: something outside the test holds it (seen now and then on this kernel);
  // detachFuse then unmounts lazily.
}

async function mount(dev: string, dir: string, extra: string[] = []): Promise<void> {
  await runOk('mount', ['-t', 'ext4', ...extra, dev, dir]);
  onCleanup(async () => {
    if (isMounted(dir)) await run('umount', ['-l', dir]);
  });
}

function fileSet(seed: number): Array<{ name: string; data: Buffer }> {
  // Sizes from a few bytes to several MiB, some not multiples of any block size.
  const sizes = [1, 100, 4095, 4096, 4097, 65536 + 17, 1 * MiB, 3 * MiB + 1234, 8 * MiB, 12345];
  return sizes.map((size, i) => {
    const data = crypto.createHash('sha256').update(`${seed}:${i}`).digest();
    const buf = Buffer.alloc(size);
    // Cheap deterministic fill, different for every file and offset.
    for (let off = 0; off < size; off += 32) {
      data.copy(buf, off, 0, Math.min(32, size - off));
      data.writeUInt32LE((data.readUInt32LE(0) + off + 1) >>> 0, 0);
    }
    return { name: i % 3 === 0 ? `dir${i}/file${i}.bin` : `file${i}.bin`, data: buf };
  });
}

/** Bytes the server reports as data (not hole/zero), from nbdinfo --map. */
async function allocatedBytes(uri: string): Promise<number> {
  const out = await runOk('nbdinfo', ['--map', '--json', uri]);
  const extents = JSON.parse(out) as Array<{ length: number; type: number }>;
  return extents.filter((e) => (e.type & 1) === 0).reduce((sum, e) => sum + e.length, 0);
}

function sha(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

for (const backend of BACKENDS) {
  describe(`e2e nbdfuse + loop + ext4: ${backend} backend over unix`, function () {
    this.timeout(120_000);
    let server: Server;
    let tmp: string;

    before(async function () {
      requireCondition(this, isRoot(), 'root (FUSE, loop devices, mount)');
      requireCondition(this, fs.existsSync('/dev/fuse') && fs.existsSync('/dev/loop-control'), '/dev/fuse and /dev/loop-control');
      requireTools(this, 'nbdfuse', 'nbdinfo', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount', 'fstrim');
      tmp = makeTempDir('nvm-e2e-fuse-');
      server = await startServer({ backend, transport: 'unix', sizeBytes: SIZE_BYTES });
    });
    after(async function () {
      // Unmount, detach loops and stop nbdfuse (LIFO) before the server goes: a server
      // with clients still attached is the last thing to stop.
      await cleanupAll();
    });

    it('mkfs.ext4, write files, fstrim frees space, e2fsck clean, reattach and restart, files intact', async function () {
      const fuseDir = path.join(tmp, 'fuse');
      const mnt = path.join(tmp, 'mnt');
      fs.mkdirSync(fuseDir);
      fs.mkdirSync(mnt);
      const pidFile = path.join(tmp, 'nbdfuse.pid');
      const files = fileSet(7);

      // First attachment: make the filesystem and write the files.
      const f1 = await attachFuse(fuseDir, server.uri, pidFile);
      const dev1 = await attachLoop(f1.file);
      await runOk('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', dev1], { timeoutMs: 60_000 });
      await mount(dev1, mnt);
      for (const f of files) {
        const p = path.join(mnt, f.name);
        fs.mkdirSync(path.dirname(p), { recursive: true });
        fs.writeFileSync(p, f.data);
      }
      // A file that is then deleted and trimmed: fstrim goes loop -> fallocate(PUNCH_HOLE)
      // on the FUSE file -> nbdfuse -> NBD_CMD_TRIM, and the server must free the space.
      fs.writeFileSync(path.join(mnt, 'gone.bin'), crypto.randomBytes(8 * MiB));
      await runOk('sync', []);
      const dataBefore = await allocatedBytes(server.uri);
      fs.rmSync(path.join(mnt, 'gone.bin'));
      await runOk('sync', []); // ext4 trims only blocks whose free is committed
      await runOk('fstrim', [mnt]);
      await runOk('sync', []);
      const dataAfter = await allocatedBytes(server.uri);
      assert.ok(
        dataAfter <= dataBefore - 6 * MiB,
        `fstrim freed ${((dataBefore - dataAfter) / MiB).toFixed(2)} MiB on the server; expected about 8 (before ${dataBefore}, after ${dataAfter})`,
      );
      await runOk('umount', [mnt]);
      const fsck1 = await run('e2fsck', ['-fn', dev1], { timeoutMs: 60_000 });
      assert.equal(fsck1.code, 0, `e2fsck after umount:\n${fsck1.stdout}${fsck1.stderr}`);
      await detachLoop(dev1);
      await detachFuse(fuseDir, f1.child, pidFile);

      // Second attachment from scratch: nothing can come from a local cache.
      const f2 = await attachFuse(fuseDir, server.uri, pidFile);
      const dev2 = await attachLoop(f2.file);
      const fsck2 = await run('e2fsck', ['-fn', dev2], { timeoutMs: 60_000 });
      assert.equal(fsck2.code, 0, `e2fsck after reattach:\n${fsck2.stdout}${fsck2.stderr}`);
      await mount(dev2, mnt);
      for (const f of files) {
        const got = fs.readFileSync(path.join(mnt, f.name));
        assert.equal(got.length, f.data.length, f.name);
        assert.equal(sha(got), sha(f.data), `${f.name} checksum after reattach`);
      }
      assert.ok(!fs.existsSync(path.join(mnt, 'gone.bin')));
      await runOk('umount', [mnt]);
      await detachLoop(dev2);
      await detachFuse(fuseDir, f2.child, pidFile);

      // The server flushes and exits 0 on SIGTERM.
      assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
      if (backend === 'memory') return;

      if (backend === 'engine' && server.volumeDir !== undefined) {
        const check = await run(process.execPath, [NVMIRROR_BIN, 'check', server.volumeDir], { timeoutMs: 60_000 });
        assert.equal(check.code, 0, `nvmirror check after a clean stop:\n${check.stdout}${check.stderr}`);
        assert.match(check.stdout, /: ok$/m);
      }

      // A new server on the same storage, read-only this time: the filesystem and every
      // file are there after the restart.
      const again = await restartServer(server, { readOnly: true });
      const f3 = await attachFuse(fuseDir, again.uri, pidFile, ['-r']);
      const dev3 = await attachLoop(f3.file, true);
      const fsck3 = await run('e2fsck', ['-fn', dev3], { timeoutMs: 60_000 });
      assert.equal(fsck3.code, 0, `e2fsck after the server restarted:\n${fsck3.stdout}${fsck3.stderr}`);
      await mount(dev3, mnt, ['-o', 'ro,noload']);
      for (const f of files) assert.equal(sha(fs.readFileSync(path.join(mnt, f.name))), sha(f.data), `${f.name} after restart`);
      await runOk('umount', [mnt]);
      await detachLoop(dev3);
      await detachFuse(fuseDir, f3.child, pidFile);
      assert.equal(await again.stop(), 0, 'restarted server exits 0');

      if (backend === 'file' && server.imagePath !== undefined) {
        // The image is a clean ext4 filesystem on its own.
        const fsck3 = await run('e2fsck', ['-fn', server.imagePath], { timeoutMs: 60_000 });
        assert.equal(fsck3.code, 0, `e2fsck of the image file:\n${fsck3.stdout}${fsck3.stderr}`);
        const dev4 = await attachLoop(server.imagePath, true);
        await mount(dev4, mnt, ['-o', 'ro,noload']);
        for (const f of files) assert.equal(sha(fs.readFileSync(path.join(mnt, f.name))), sha(f.data), `${f.name} in the image file`);
        await runOk('umount', [mnt]);
        await detachLoop(dev4);
      }
    });
  });
}

/** The RAID fields of `status DIR --json` this test reads. */
interface RaidStatus {
  raid?: { state: string; memberStatus: Array<{ index: number; state: string; reason?: string }> };
}

async function raidStatus(dir: string): Promise<NonNullable<RaidStatus['raid']>> {
  const out = await runOk(process.execPath, [NVMIRROR_BIN, 'status', dir, '--json'], { timeoutMs: 30_000 });
  const raid = (JSON.parse(out) as RaidStatus).raid;
  assert.ok(raid, `status --json of ${dir} has no raid section`);
  return raid;
}

describe('e2e nbdfuse + loop + ext4 on RAID-5 (4 member files), a member deleted while mounted', function () {
  this.timeout(180_000);
  const RAID_SIZE_BYTES = 96 * MiB;
  const LOST = 2;
  let server: Server | undefined;
  let tmp: string;

  before(async function () {
    requireCondition(this, isRoot(), 'root (FUSE, loop devices, mount)');
    requireCondition(this, fs.existsSync('/dev/fuse') && fs.existsSync('/dev/loop-control'), '/dev/fuse and /dev/loop-control');
    requireTools(this, 'nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount');
    tmp = makeTempDir('nvm-e2e-fuse-raid5-');
  });
  after(async function () {
    await cleanupAll();
    if (server?.alive()) await server.stop();
  });

  it('serves degraded: e2fsck -fn clean and every file intact after the deletion, and again after a restart without the member', async function () {
    const vol = path.join(tmp, 'vol');
    const members = [0, 1, 2, 3].flatMap((i) => ['--member', `m${i}.img`]);
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', String(RAID_SIZE_BYTES), '--nvram-size', '8M', '--raid', '5', '--stripe-unit', '16K', ...members], { timeoutMs: 60_000 });
    server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: RAID_SIZE_BYTES, existingStoragePath: vol, extraArgs: ['--cp-interval', '200ms'] });
    const fuseDir = path.join(tmp, 'fuse');
    const mnt = path.join(tmp, 'mnt');
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mnt);
    const pidFile = path.join(tmp, 'nbdfuse.pid');
    const before = fileSet(21);
    const after = fileSet(22).map((f) => ({ ...f, name: `after/${f.name}` }));
    const write = (files: typeof before): void => {
      for (const f of files) {
        const p = path.join(mnt, f.name);
        fs.mkdirSync(path.dirname(p), { recursive: true });
        fs.writeFileSync(p, f.data);
      }
    };
    const checkFiles = (when: string): void => {
      for (const f of [...before, ...after]) assert.equal(sha(fs.readFileSync(path.join(mnt, f.name))), sha(f.data), `${f.name} ${when}`);
    };
    const fsck = async (dev: string, when: string): Promise<void> => {
      const r = await run('e2fsck', ['-fn', dev], { timeoutMs: 60_000 });
      assert.equal(r.code, 0, `e2fsck -fn ${when}:\n${r.stdout}${r.stderr}`);
    };

    const f1 = await attachFuse(fuseDir, server.uri, pidFile, [], RAID_SIZE_BYTES);
    const dev1 = await attachLoop(f1.file);
    await runOk('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', dev1], { timeoutMs: 60_000 });
    await mount(dev1, mnt);
    write(before);
    await runOk('sync', ['-f', mnt]);
    // The member goes away under the mounted filesystem; the files written next land on
    // the other three (and the server notices at its next CP's sync).
    fs.rmSync(path.join(vol, `m${LOST}.img`));
    write(after);
    await runOk('sync', ['-f', mnt]);
    let raid = await raidStatus(vol);
    for (let i = 0; i < 100 && raid.memberStatus[LOST]?.state !== 'faulted'; i++) {
      await sleep(100);
      raid = await raidStatus(vol);
    }
    assert.equal(raid.state, 'degraded', JSON.stringify(raid));
    assert.equal(raid.memberStatus[LOST]?.state, 'faulted', JSON.stringify(raid));
    assert.match(raid.memberStatus[LOST]?.reason ?? '', new RegExp(`m${LOST}\\.img was deleted`));
    await runOk('umount', [mnt]);
    await detachLoop(dev1);
    await detachFuse(fuseDir, f1.child, pidFile);

    // A fresh attachment reads everything through the server, degraded.
    const f2 = await attachFuse(fuseDir, server.uri, pidFile, [], RAID_SIZE_BYTES);
    const dev2 = await attachLoop(f2.file);
    await fsck(dev2, 'with the member deleted');
    await mount(dev2, mnt);
    checkFiles('with the member deleted');
    await runOk('umount', [mnt]);
    await detachLoop(dev2);
    await detachFuse(fuseDir, f2.child, pidFile);
    assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');

    // A new server opens the volume without the member.
    server = await restartServer(server);
    raid = await raidStatus(vol);
    assert.equal(raid.state, 'degraded', JSON.stringify(raid));
    assert.equal(raid.memberStatus[LOST]?.state, 'missing', JSON.stringify(raid));
    const f3 = await attachFuse(fuseDir, server.uri, pidFile, [], RAID_SIZE_BYTES);
    const dev3 = await attachLoop(f3.file);
    await fsck(dev3, 'after a restart without the member');
    await mount(dev3, mnt);
    checkFiles('after a restart without the member');
    await runOk('umount', [mnt]);
    await fsck(dev3, 'after mounting degraded');
    await detachLoop(dev3);
    await detachFuse(fuseDir, f3.child, pidFile);
    assert.equal(await server.stop(), 0, 'restarted server exits 0 on SIGTERM');
  });
});
