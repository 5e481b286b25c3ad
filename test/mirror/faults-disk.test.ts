/**
 * The mirror under disk faults (issue 8, "Disk faults"). On the destination: the
 * receiver's directory on a small tmpfs that fills up, its member on an ext4 that shuts
 * down (every I/O fails, as a dead disk), its member made read-only, and its member
 * truncated (under the running receiver, and while it was stopped). On the source: its
 * file system shut down under writes (the client must get EIO, the mirror keep a clean
 * committed image, and the restarted source converge it). Each destination fault: a
 * clear error in the receiver's log, the source's `status` says the mirror is not in sync
 * and why (`lastError`, and the receiver's status too once the mirror is open), the mirror's committed image is never changed into something else
 * (its export and `check` stay as they were, or it is refused), and once the fault is
 * repaired the mirror converges to a byte-identical copy.
 *
 * Invariants: mounts and loop devices are made under this run's temporary directory and
 * undone in after hooks (lazy unmount, loop detached), also when a test fails; the seed
 * is printed on failure.
 */
import * as assert from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { netnsAvailable } from '../net/netns';
import { AckedWriter, Rig, seedFromEnv, sleep, until } from './faults-harness';
import { BIN, sh } from './helpers';

const RECEIVER_PORT = 17210;
const RELAY_PORT = 17211;
/** The tmpfs that fills: the log file (32 MiB, allocated at open) and 16 MiB for a thin member that needs more. */
const SMALL_TMPFS_MIB = 48;
const LOOP_FS_MIB = 400;

describe('mirror faults: disk faults on either side', function () {
  this.timeout(300_000);
  const seed = seedFromEnv();
  let rig: Rig | undefined;
  let mnt: string | undefined;
  let loopImage: string | undefined;
  /** A member with a read-only bind mount over it (undone in afterEach). */
  let roMember: string | undefined;
  const figures: string[] = [];

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`network namespaces unavailable in CI: ${why}`);
      this.skip();
    }
  });

  beforeEach(() => {
    mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'nvfault-mnt-'));
  });

  afterEach(async function () {
    if (this.currentTest?.state === 'failed') rig?.printFailure(this.currentTest.fullTitle());
    if (roMember) {
      try {
        sh('umount', ['-l', roMember]);
      } catch {
        /* already gone */
      }
      roMember = undefined;
    }
    await rig?.destroy();
    rig = undefined;
    if (mnt) {
      try {
        sh('umount', ['-l', mnt]);
      } catch {
        /* not mounted */
      }
      fs.rmSync(mnt, { recursive: true, force: true });
      mnt = undefined;
    }
    if (loopImage) fs.rmSync(loopImage, { force: true });
    loopImage = undefined;
  });

  after(() => {
    if (figures.length > 0) process.stdout.write(`      figures (seed ${seed}):\n${figures.map((f) => `        ${f}`).join('\n')}\n`);
  });

  /** Writes until `untilAcked` requests were acknowledged, then waits for every reply. */
  async function write(r: Rig, w: AckedWriter, untilAcked: number): Promise<void> {
    await w.start();
    await until('writes acknowledged', () => w.ackedWrites >= untilAcked, 120_000);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors');
  }

  it('the destination directory fills up (tmpfs): a clear error, status says why, the committed image unchanged; room again: converges', async () => {
    sh('mount', ['-t', 'tmpfs', '-o', `size=${SMALL_TMPFS_MIB}m`, 'nvfault-tmpfs', mnt!]);
    rig = await Rig.start({ mode: 'sync', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed, dstDir: path.join(mnt!, 'dst') });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 8192);
    await write(r, w0, 200);
    await r.converge();
    const cp0 = r.receiverStatus()!.committedCp;
    const md5Before = r.mirrorMd5();
    // Writes over 32 MiB of blocks: copy-on-write spreads them over more of the member than fits.
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 8192);
    await w.start();
    await until('the receiver fails for lack of space', () => /ENOSPC|no space/i.test(r.readLog('receiver')), 120_000);
    await until('the source reports it', () => /ENOSPC|no space/i.test(r.status()?.lastError ?? '') && r.status()?.state !== 'in-sync', 30_000);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
    const st = r.status()!;
    figures.push(`full: source state ${st.state}, lastError "${st.lastError}"`);
    assert.match(r.receiverStatus()?.lastError ?? '', /ENOSPC|no space/i, 'the receiver\'s status does not say why');
    // The committed image is the last CP that fitted, intact.
    const rx = r.receiverStatus()!;
    assert.ok(rx.committedCp >= cp0, 'the committed CP went back');
    if (rx.committedCp === cp0) assert.strictEqual(r.mirrorMd5(), md5Before, 'the mirror changed without a new CP');
    sh('mount', ['-o', 'remount,size=512m', mnt!]);
    const c = await r.converge();
    assert.deepStrictEqual(await w.check(r.expSock, r.uuid), [], 'an acknowledged write is missing on the mirror');
    figures.push(`full: converged ${c.ms} ms after the tmpfs grew, ${(c.bytesToReceiver / 1048576).toFixed(1)} MiB sent`);
  });

  it('the member\'s file system dies (ext4 shut down: every I/O fails): a clear error, status says why; repaired: converges', async () => {
    loopImage = path.join(os.tmpdir(), `nvfault-loop-${process.pid}.img`);
    fs.writeFileSync(loopImage, '');
    fs.truncateSync(loopImage, LOOP_FS_MIB * 1048576);
    sh('mkfs.ext4', ['-q', '-F', loopImage]);
    sh('mount', ['-o', 'loop', loopImage, mnt!]);
    rig = await Rig.start({ mode: 'async', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed, dstDir: path.join(mnt!, 'dst') });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 4096);
    await write(r, w0, 200);
    await r.converge();
    sh('xfs_io', ['-x', '-c', 'shutdown', mnt!]);
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 4096);
    await w.start();
    await until('the receiver fails on I/O', () => /EIO|input\/output error/i.test(r.readLog('receiver')), 60_000);
    await until('the source reports it', () => /EIO|input\/output error/i.test(r.status()?.lastError ?? '') && r.status()?.state !== 'in-sync', 30_000);
    const tries0 = r.count('source', /mirror (resync|baseline) started/);
    const wire0 = (await r.relay.stats()).bytes.toTarget;
    await sleep(5000);
    figures.push(`dead fs: ${r.count('source', /mirror (resync|baseline) started/) - tries0} resyncs tried, ` +
      `${(((await r.relay.stats()).bytes.toTarget - wire0) / 1048576).toFixed(1)} MiB sent toward it in 5 s`);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
    const st = r.status()!;
    figures.push(`dead fs: source state ${st.state}, lastError "${st.lastError}"`);
    assert.match(r.receiverStatus()?.lastError ?? '', /EIO|input\/output error/i, 'the receiver\'s status does not say why');
    // Repair: stop the receiver and mount the disk again (ext4 replays its journal). The
    // processes `ip netns exec` started hold copies of the mount in their own mount
    // namespaces, which keep the shut-down file system alive, so the "disk" is moved: the
    // image is copied and the copy mounted.
    await r.stop('receiver');
    sh('umount', ['-l', mnt!]);
    const repaired = `${loopImage}.repaired`;
    sh('cp', ['--sparse=always', loopImage, repaired]);
    fs.rmSync(loopImage, { force: true });
    loopImage = repaired;
    sh('mount', ['-o', 'loop', loopImage, mnt!]);
    const chk = sh(BIN, ['check', path.join(r.dst, r.uuid)]);
    assert.match(chk, /: ok$/m, `the committed image after the shutdown: ${chk}`);
    await r.startReceiver();
    const c = await r.converge();
    assert.deepStrictEqual(await w.check(r.expSock, r.uuid), [], 'an acknowledged write is missing on the mirror');
    figures.push(`dead fs: converged ${c.ms} ms after the repair, ${(c.bytesToReceiver / 1048576).toFixed(1)} MiB sent`);
  });

  it('the member made read-only (a read-only bind mount over it, receiver restarted): a clear error, status says why; writable again: converges', async () => {
    rig = await Rig.start({ mode: 'async', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 4096);
    await write(r, w0, 200);
    await r.converge();
    await r.stop('receiver');
    const member = path.join(r.dst, r.uuid, 'member-0.img');
    sh('mount', ['--bind', member, member]);
    roMember = member;
    sh('mount', ['-o', 'remount,bind,ro', member]);
    await r.startReceiver();
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 4096);
    await w.start();
    await until('the receiver cannot open the member for writing', () => /EROFS|read-only file system/i.test(r.readLog('receiver')), 60_000);
    await until('the source reports it', () => /EROFS|read-only file system/i.test(r.status()?.lastError ?? '') && r.status()?.state !== 'in-sync', 30_000);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
    const st = r.status()!;
    figures.push(`read-only member: source state ${st.state}, lastError "${st.lastError}"`);
    await r.stop('receiver');
    sh('umount', [member]);
    roMember = undefined;
    const chk = sh(BIN, ['check', path.join(r.dst, r.uuid)]);
    assert.match(chk, /: ok$/m, `the committed image: ${chk}`);
    await r.startReceiver();
    const c = await r.converge();
    assert.deepStrictEqual(await w.check(r.expSock, r.uuid), [], 'an acknowledged write is missing on the mirror');
    figures.push(`read-only member: converged ${c.ms} ms after it was writable again, ${(c.bytesToReceiver / 1048576).toFixed(1)} MiB sent`);
  });

  it('the source\'s file system dies under writes: the client gets EIO, the mirror\'s committed image stays clean; restarted on the repaired disk: converges', async () => {
    loopImage = path.join(os.tmpdir(), `nvfault-loop-${process.pid}.img`);
    fs.writeFileSync(loopImage, '');
    fs.truncateSync(loopImage, LOOP_FS_MIB * 1048576);
    sh('mkfs.ext4', ['-q', '-F', loopImage]);
    sh('mount', ['-o', 'loop', loopImage, mnt!]);
    rig = await Rig.start({ mode: 'sync', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed, srcDir: path.join(mnt!, 'src') });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 4096);
    await write(r, w0, 200);
    await r.converge();
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 4096);
    await w.start();
    await until('writes flowing', () => w.ackedWrites > 200, 30_000);
    sh('xfs_io', ['-x', '-c', 'shutdown', mnt!]);
    await until('the client is refused', () => w.errors.length > 10, 30_000);
    const acked = w.ackedWrites;
    await sleep(1000);
    await w.stop();
    // After the disk died nothing more is acknowledged: every error is EIO.
    assert.ok(w.errors.every((e) => /server error 5$/.test(e)), `not EIO: ${w.errors.find((e) => !/server error 5$/.test(e))}`);
    // At most the requests already in flight when the errors began complete.
    assert.ok(w.ackedWrites - acked <= w.queueDepth, `${w.ackedWrites - acked} writes acknowledged after the disk died`);
    assert.match(r.readLog('source'), /EIO/, 'the source does not log the I/O error');
    const rx = r.receiverStatus()!;
    const chk = sh(BIN, ['check', path.join(r.dst, r.uuid)]);
    assert.match(chk, /: ok$/m, `the mirror's committed image: ${chk}`);
    // Repair: the source process goes (as after a crash), the disk comes back from what reached it.
    await r.stop('source', 'SIGKILL');
    sh('umount', ['-l', mnt!]);
    const repaired = `${loopImage}.repaired`;
    sh('cp', ['--sparse=always', loopImage, repaired]);
    fs.rmSync(loopImage, { force: true });
    loopImage = repaired;
    sh('mount', ['-o', 'loop', loopImage, mnt!]);
    fs.rmSync(path.join(r.src, 'control.sock'), { force: true });
    await r.startSource(true);
    // Plain writes acknowledged but not flushed may be gone with the source's disk (the
    // engine promises them across a process crash, not a disk loss); a sync mirror held
    // them in its log (heldSeq). Then the mirror is current: the source is refused
    // (mirror-ahead), never resyncs over it. Here the operator keeps the source's state:
    // the mirror directory goes and a baseline follows.
    const back = await until('the source in sync, or refused as behind its mirror', () => {
      const st = r.status();
      return st?.state === 'in-sync' || st?.state === 'mirror-ahead' ? st : undefined;
    }, 60_000);
    if (back.state === 'mirror-ahead') {
      assert.match(back.lastError ?? '', /is current: it holds records up to seq \d+, past this source's newest seq \d+/);
      assert.equal(r.receiverStatus()?.committedCp, rx.committedCp, 'the refused source changed the mirror');
      await r.stop('receiver');
      fs.rmSync(path.join(r.dst, r.uuid), { recursive: true, force: true });
      await r.startReceiver();
    }
    const c = await r.converge();
    const lost = (await w.check(r.srcSock, '', w.blocks)).length;
    figures.push(`source disk died: the mirror held records to seq ${rx.heldSeq} beyond its CP ${rx.committedCp}; the restarted source was ${back.state === 'mirror-ahead' ? 'refused (mirror-ahead) until the mirror was removed' : 'in sync'}; ` +
      `${lost} blocks' acknowledged plain writes gone with the source's disk; converged ${c.ms} ms after the restart at CP ${c.cp}`);
  });

  it('the member truncated under a running receiver: refused with a clear error, never a silently different mirror; a new mirror directory: converges', async () => {
    rig = await Rig.start({ mode: 'sync', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 4096);
    await write(r, w0, 400);
    await r.converge();
    const member = path.join(r.dst, r.uuid, 'member-0.img');
    // Past the superblock ring (8 blocks), below every block the tree uses: the next CP's
    // writes would extend the file again, with holes where the committed blocks were.
    fs.truncateSync(member, 64 * 1024);
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 4096);
    await w.start();
    await until('the receiver refuses the truncated member', () => /member .* was truncated/.test(r.readLog('receiver')), 60_000);
    await until('the source reports it', () => /was truncated/.test(r.status()?.lastError ?? '') && r.status()?.state !== 'in-sync', 30_000);
    await sleep(2000);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
    const st = r.status()!;
    assert.notStrictEqual(st.state, 'in-sync', 'in sync over a truncated member');
    assert.match(r.receiverStatus()?.lastError ?? '', /was truncated/, 'the receiver\'s status does not say why');
    figures.push(`truncated under the receiver: source state ${st.state}, lastError "${st.lastError}"`);
    await r.stop('receiver');
    fs.rmSync(path.join(r.dst, r.uuid), { recursive: true, force: true });
    await r.startReceiver();
    const c = await r.converge();
    assert.deepStrictEqual(await w.check(r.expSock, r.uuid), [], 'an acknowledged write is missing on the mirror');
    figures.push(`truncated under the receiver: a new baseline converged in ${c.ms} ms, ${(c.bytesToReceiver / 1048576).toFixed(1)} MiB sent`);
  });

  it('the member truncated (receiver stopped): refused with a clear error, status says why; a new mirror directory: converges', async () => {
    rig = await Rig.start({ mode: 'sync', prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed });
    const r = rig;
    const w0 = new AckedWriter(r.srcSock, seed, undefined, 4096);
    await write(r, w0, 200);
    await r.converge();
    await r.stop('receiver');
    const member = path.join(r.dst, r.uuid, 'member-0.img');
    fs.truncateSync(member, Math.floor(fs.statSync(member).size / 2));
    await r.startReceiver();
    const w = new AckedWriter(r.srcSock, seed + 1, w0, 4096);
    await w.start();
    await until('the receiver refuses the truncated member', () => /member has \d+ blocks, needs \d+/.test(r.readLog('receiver')), 60_000);
    await until('the source reports it', () => /member has \d+ blocks/.test(r.status()?.lastError ?? '') && r.status()?.state !== 'in-sync', 30_000);
    await sleep(1000);
    await w.stop();
    assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
    const st = r.status()!;
    figures.push(`truncated: source state ${st.state}, lastError "${st.lastError}"`);
    // The operator's repair: the damaged mirror directory goes; the source sends a new baseline.
    await r.stop('receiver');
    fs.rmSync(path.join(r.dst, r.uuid), { recursive: true, force: true });
    await r.startReceiver();
    const c = await r.converge();
    assert.deepStrictEqual(await w.check(r.expSock, r.uuid), [], 'an acknowledged write is missing on the mirror');
    figures.push(`truncated: a new baseline converged in ${c.ms} ms, ${(c.bytesToReceiver / 1048576).toFixed(1)} MiB sent`);
  });
});
