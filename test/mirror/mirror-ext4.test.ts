/**
 * A real filesystem read from the mirror while the source keeps changing: ext4 is made
 * and filled on the source (namespace a) through nbdfuse + loop, the mirror (receiver in
 * namespace b) is mounted read-only through its export `<source-uuid>`, then the source
 * deletes (and trims), writes and overwrites files over many CPs. The mirror's NBD
 * connections stay pinned to the CP they connected to, so the read-only mount must keep
 * showing the old files with their old checksums (page cache dropped, so reads reach the
 * device) and `e2fsck -fn` of its loop device must be clean; a new connection then shows
 * the new file set.
 *
 * The churn is sized so that it really tests the pin: before the mirror is mounted,
 * filler is written and trimmed on the source so its next-fit allocator is far into the
 * member, and the churn goes on until the allocator has wrapped round to the low blocks
 * (the old files' and the filesystem metadata's, seen as the destination's last member
 * block being written) and then some. If the source reused a block the pinned CP still
 * uses, the destination would overwrite it under the mount: reads fail their checksum
 * (EIO) or e2fsck finds damage. (Checked by ignoring the pin in
 * MirrorSource.oldestNeededCp: the test then fails with EIO right after the wrap.)
 *
 * Needs root, /dev/fuse, loop devices and network namespaces: fails under CI
 * (CI=true) when something is missing, skips with the reason elsewhere.
 *
 * Cleanup: every mount, loop device and nbdfuse process is pushed on a stack as soon as
 * it exists; afterEach undoes them last-in first-out (also after a failure), then
 * destroys the namespace pair (source and receiver die with it) and the temp dir.
 */
import { strict as assert } from 'assert';
import * as cp from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createHostPair, netnsAvailable, type HostPair } from '../net/netns';
import { controlRequest } from '../../src/volume/engine-control';
import { BIN, TOOL_ENV, sh, sleep, sourceStatus, until, type MirrorStats } from './helpers';

const PORT = 17021;
const MiB = 1024 * 1024;
const VOLUME_SIZE = '128M';
const SIZE_BYTES = 128 * MiB;
const IN_CI = process.env.CI === 'true';
/** How long detach() waits for the kernel to let go of a loop device after `losetup -d`. */
const LOOP_RELEASE_MS = 5_000;
/** Filler written and trimmed before the mirror is mounted (moves the source's allocator on). */
const FILLER_ROUNDS = 3;
const FILLER_BYTES = 60 * MiB;
/** Churn rounds after the allocator wrapped round the source's member, and at most in all. */
const WRAPPED_ROUNDS = 2;
const CHURN_ROUNDS_MAX = 14;

/** /usr/bin first (nbdfuse and friends), then the sbin directories (losetup, mkfs, e2fsck). */
const ENV = TOOL_ENV;

// ---- processes ----

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion without blocking the event loop; SIGKILL after timeoutMs. */
function run(cmd: string, args: string[], timeoutMs = 30_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = cp.spawn(cmd, args, { env: ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
    child.once('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

async function runOk(cmd: string, args: string[], timeoutMs = 30_000): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}




function toolMissing(tool: string): boolean {
  return !(ENV.PATH ?? '').split(':').some((d) => {
    try {
      fs.accessSync(path.join(d, tool), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

// ---- mirror status ----


// ---- mounts, loops, nbdfuse (each registered for cleanup as soon as it exists) ----

type Undo = () => Promise<void>;

function isMounted(dir: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === dir);
}

function loopBackingFile(dev: string): string | undefined {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(dev)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

interface Fuse {
  dir: string;
  file: string;
  child: cp.ChildProcess;
}

interface Stack {
  fuse: Fuse;
  dev: string;
  mnt: string;
}

function sha(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

/** name -> sha256 of the content written. */
type FileSet = Map<string, string>;

/** Random data and random sizes: mostly small to a few hundred KiB, some up to 2 MiB, some odd lengths. */
function randomSize(): number {
  const r = Math.random();
  if (r < 0.2) return crypto.randomInt(0, 8192);
  if (r < 0.7) return crypto.randomInt(8192, 512 * 1024);
  return crypto.randomInt(512 * 1024, 2 * MiB);
}

async function writeFile(mnt: string, name: string, set: FileSet): Promise<number> {
  const data = crypto.randomBytes(randomSize());
  const p = path.join(mnt, name);
  await fs.promises.mkdir(path.dirname(p), { recursive: true });
  await fs.promises.writeFile(p, data);
  set.set(name, sha(data));
  return data.length;
}

/** Every file of `want` has its checksum and no other regular file exists (lost+found aside). */
async function verifySet(mnt: string, want: FileSet, what: string): Promise<void> {
  const found: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await fs.promises.readdir(path.join(mnt, rel), { withFileTypes: true })) {
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      if (e.isDirectory()) {
        if (r !== 'lost+found') await walk(r);
      } else {
        found.push(r);
      }
    }
  };
  await walk('');
  assert.deepEqual(found.sort(), [...want.keys()].sort(), `${what}: the file names differ`);
  for (const [name, sum] of want) {
    const got = sha(await fs.promises.readFile(path.join(mnt, name)));
    assert.equal(got, sum, `${what}: ${name} has the wrong checksum`);
  }
}

describe('mirror: ext4 on the source, read-only from the mirror (network namespaces, nbdfuse, loop)', function () {
  this.timeout(60_000);
  let pair: HostPair | undefined;
  let tmp: string;
  let undo: Undo[] = [];
  /** How each server ended, for the failure report (they run until afterEach). */
  let serverExits: string[] = [];
  let testStart = 0;

  before(async function () {
    const missing: string[] = [];
    const why = await netnsAvailable();
    if (why !== null) missing.push(why);
    if (process.getuid?.() !== 0) missing.push('root (FUSE, loop devices, mount)');
    for (const dev of ['/dev/fuse', '/dev/loop-control']) if (!fs.existsSync(dev)) missing.push(dev);
    const tools = ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount', 'sync', 'fstrim'].filter(toolMissing);
    if (tools.length > 0) missing.push(`tools ${tools.join(', ')} (scripts/install-test-deps.sh)`);
    if (!fs.existsSync('/proc/sys/vm/drop_caches')) missing.push('/proc/sys/vm/drop_caches');
    if (missing.length === 0) return;
    const msg = `mirror ext4 test needs: ${missing.join('; ')}`;
    if (IN_CI) throw new Error(msg);
    process.stderr.write(`      SKIP: ${msg}\n`);
    this.skip();
  });

  beforeEach(async () => {
    undo = [];
    serverExits = [];
    testStart = Date.now();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-mext4-'));
    pair = await createHostPair({ prefix: 'nvx' });
  });

  afterEach(async function () {
    // Clients first (mounts, loops, nbdfuse: LIFO), then the servers with the namespaces.
    const errors: string[] = [];
    while (undo.length > 0) {
      try {
        await undo.pop()!();
      } catch (e) {
        errors.push(e instanceof Error ? e.message : String(e));
      }
    }
    const failed = this.currentTest?.state === 'failed';
    if (failed && serverExits.length > 0) process.stderr.write(`      servers that ended before cleanup: ${serverExits.join('; ')}\n`);
    // The servers go with the namespaces; their logs are complete only once they exited.
    await pair?.destroy();
    pair = undefined;
    if (failed) {
      for (const f of ['sv.log', 'rx.log']) {
        const p = path.join(tmp, f);
        if (!fs.existsSync(p)) continue;
        const lines = fs.readFileSync(p, 'utf8').split('\n');
        // Warnings and errors (pino level >= 40), then the last lines.
        const bad = lines.filter((l) => /"level":[4-6]\d/.test(l)).slice(-20);
        process.stderr.write(`--- ${f}: warnings and errors\n${bad.join('\n')}\n--- ${f}: last lines\n${lines.slice(-25).join('\n')}\n`);
      }
    }
    fs.rmSync(tmp, { recursive: true, force: true });
    if (errors.length > 0) process.stderr.write(`      cleanup: ${errors.join('; ')}\n`);
  });

  /** nbdfuse on a fresh directory; resolves once the file has the export's size. */
  async function attachFuse(name: string, uri: string, readOnly: boolean): Promise<Fuse> {
    const dir = path.join(tmp, name);
    fs.mkdirSync(dir, { recursive: true });
    const child = cp.spawn('nbdfuse', [...(readOnly ? ['-r'] : []), dir, uri], { env: ENV, stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr?.setEncoding('utf8').on('data', (s: string) => {
      if (err.length < 8192) err += s;
    });
    undo.push(async () => {
      if (isMounted(dir)) await run('fusermount3', ['-u', '-z', dir]);
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await Promise.race([gone, sleep(3000)]);
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      }
    });
    const file = path.join(dir, 'nbd');
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`nbdfuse ${uri} exited ${child.exitCode}: ${err}`);
      if (isMounted(dir) && fs.existsSync(file) && fs.statSync(file).size === SIZE_BYTES) return { dir, file, child };
      await sleep(50);
    }
    throw new Error(`nbdfuse ${uri} did not come up within 15 s: ${err}`);
  }

  /**
   * fusermount3 -u, and nbdfuse must exit 0. `lazy`: -z instead (the loop device still
   * holds the file; nbdfuse exits when the kernel lets go, afterEach kills it otherwise).
   */
  async function detachFuse(f: Fuse, lazy: boolean): Promise<void> {
    if (lazy) {
      await runOk('fusermount3', ['-u', '-z', f.dir]);
      return;
    }
    for (let attempt = 0; ; attempt++) {
      const r = await run('fusermount3', ['-u', f.dir]);
      if (r.code === 0) break;
      if (attempt >= 20 || !/busy/i.test(r.stderr)) throw new Error(`fusermount3 -u ${f.dir} exited ${r.code}: ${r.stderr.trim()}`);
      await sleep(100);
    }
    await until('nbdfuse to exit', () => f.child.exitCode !== null || f.child.signalCode !== null, 15_000);
    assert.equal(f.child.exitCode, 0, 'nbdfuse exits 0 after fusermount3 -u');
  }

  async function attachLoop(file: string, readOnly: boolean): Promise<string> {
    // Other tests on this machine take loop devices too: retry when ours was taken.
    for (let attempt = 0; ; attempt++) {
      const r = await run('losetup', [...(readOnly ? ['--read-only'] : []), '--find', '--show', file]);
      if (r.code === 0) {
        const dev = r.stdout.trim();
        assert.match(dev, /^\/dev\/loop\d+$/);
        undo.push(async () => {
          // Only if it still backs our file: a freed loop number may be someone else's by now.
          if (loopBackingFile(dev) === file) await run('losetup', ['-d', dev]);
        });
        return dev;
      }
      if (attempt >= 4) throw new Error(`losetup --find --show ${file}: ${r.stderr}`);
      await sleep(200 + 300 * attempt);
    }
  }

  async function mount(dev: string, mnt: string, opts: string[]): Promise<void> {
    fs.mkdirSync(mnt, { recursive: true });
    await runOk('mount', ['-t', 'ext4', ...opts, dev, mnt]);
    undo.push(async () => {
      if (isMounted(mnt)) await run('umount', ['-l', mnt]);
    });
  }

  /** nbdfuse -> losetup -> mount, read-write or read-only (ro,noload). */
  async function attach(name: string, uri: string, readOnly: boolean, mkfs = false): Promise<Stack> {
    const fuse = await attachFuse(`${name}-fuse`, uri, readOnly);
    const dev = await attachLoop(fuse.file, readOnly);
    if (mkfs) {
      await runOk('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', dev], 60_000);
    }
    const mnt = path.join(tmp, `${name}-mnt`);
    await mount(dev, mnt, readOnly ? ['-o', 'ro,noload'] : []);
    return { fuse, dev, mnt };
  }

  /**
   * Clean unmount, loop detach, nbdfuse stop: nothing of it is left in a cache. On this
   * kernel `losetup -d` only marks the device for autoclear while anything else has it
   * open, and something outside this test (no process here has it open, no mount
   * namespace mounts it) now and then holds a just-unmounted loop device for several
   * seconds: after LOOP_RELEASE_MS the FUSE mount is detached lazily instead of waited for.
   */
  async function detach(s: Stack): Promise<void> {
    await runOk('umount', [s.mnt]);
    await runOk('losetup', ['-d', s.dev]);
    const t = Date.now();
    while (loopBackingFile(s.dev) === s.fuse.file && Date.now() - t < LOOP_RELEASE_MS) await sleep(50);
    const released = loopBackingFile(s.dev) !== s.fuse.file;
    if (!released) process.stdout.write(`      note: ${s.dev} still bound ${LOOP_RELEASE_MS} ms after losetup -d; unmounting ${path.basename(s.fuse.dir)} lazily\n`);
    await detachFuse(s.fuse, !released);
  }

  /** Starts a server in a namespace, stderr to tmp/<log>; records how it ends. */
  function server(name: string, host: 'a' | 'b', args: string[], log: string): cp.ChildProcess {
    const child = pair!.spawn(host, BIN, args, { stdio: ['ignore', 'ignore', fs.openSync(path.join(tmp, log), 'a')] });
    child.once('exit', (code, signal) => {
      if (!pair?.destroyed) serverExits.push(`${name} at ${((Date.now() - testStart) / 1000).toFixed(1)} s (code ${code}, signal ${signal})`);
    });
    return child;
  }

  /** Both servers must still run: nothing in the test stops them. */
  function serversUp(what: string): void {
    if (serverExits.length > 0) throw new Error(`${what}: a server ended early: ${serverExits.join('; ')}`);
  }

  /**
   * Drops the page cache, dentries and inodes, so the mirror mount's next reads reach the
   * device. No global `sync` first: the mirror mounts are read-only (nothing dirty), and
   * a machine-wide sync waits for every other user's filesystems too.
   */
  function dropCaches(): void {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
  }

  it('ext4 mounted read-only from the mirror stays consistent and e2fsck-clean while the source writes', async () => {
    const p = pair!;
    const b = p.host('b');
    const src = path.join(tmp, 'src');
    const srcSock = path.join(tmp, 'src.sock');
    const expSock = path.join(tmp, 'exp.sock');
    sh(BIN, ['create', src, '--size', VOLUME_SIZE, '--nvram-size', '8M']);
    const uuid = (JSON.parse(fs.readFileSync(path.join(src, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid;
    const srcUri = `nbd+unix:///?socket=${srcSock}`;
    const mirrorUri = `nbd+unix:///${uuid}?socket=${expSock}`;
    /**
     * The destination writes each CP's blocks at the source's pbas and never frees one, so
     * its member's last block is written once the source's next-fit allocator has gone
     * past the end of the member (every later allocation comes from the low blocks).
     */
    const memberWrapped = (): boolean => {
      const member = path.join(tmp, 'dst', uuid, 'member-0.img');
      const fd = fs.openSync(member, 'r');
      try {
        const buf = Buffer.alloc(4096);
        fs.readSync(fd, buf, 0, 4096, fs.fstatSync(fd).size - 4096);
        return buf.some((x) => x !== 0);
      } finally {
        fs.closeSync(fd);
      }
    };

    // 1. Receiver in b, source in a (sync mirroring), in sync.
    const receiver = server('receiver', 'b', ['receive', path.join(tmp, 'dst'), '--listen', `${b.addr}:${PORT}`, '--export-socket', expSock, '--mirror-insecure'], 'rx.log');
    await until('receiver socket', () => fs.existsSync(expSock) || receiver.exitCode !== null, 30_000);
    serversUp('receiver start');
    const source = server('source', 'a', ['serve', src, '--socket', srcSock, '--cp-interval', '300', '--mirror-to', `${b.addr}:${PORT}`, '--mirror-mode', 'sync',
      '--mirror-insecure', '--mirror-stall-timeout', '5000'], 'sv.log');
    await until('source socket', () => fs.existsSync(srcSock) || source.exitCode !== null, 30_000);
    serversUp('source start');
    await until('mirror in sync', () => sourceStatus(src)?.state === 'in-sync');

    /** A CP holding every write so far, then the mirror's root equals the source's. */
    const checkpointLanded = async (): Promise<MirrorStats> => {
      const r = await controlRequest(path.join(src, 'control.sock'), { op: 'checkpoint' }, 30_000);
      assert.ok(r.ok, `checkpoint: ${String(r.error)}`);
      const cpNow = r.cpNumber as number;
      return until(`mirror at CP ${cpNow} with roots equal`, () => {
        const m = sourceStatus(src);
        return m && m.state === 'in-sync' && m.rootsEqual && m.destCp === m.sourceCp && m.destCp >= cpNow ? m : undefined;
      });
    };
    const step = (what: string): void => void process.stdout.write(`      ${((Date.now() - testStart) / 1000).toFixed(1)} s: ${what}\n`);

    // 2. The source: mkfs, 50 files, clean unmount, then a CP that reaches the mirror.
    //    Then filler written and trimmed, so the source's allocator (next fit) is far into
    //    its member when the churn starts and wraps round to the low blocks - the ones
    //    the 50 files and the filesystem's metadata use - during it.
    const oldSet: FileSet = new Map();
    let bytes = 0;
    {
      const s = await attach('src1', srcUri, false, true);
      for (let i = 0; i < 50; i++) bytes += await writeFile(s.mnt, i % 5 === 0 ? `d${i % 3}/old${i}.bin` : `old${i}.bin`, oldSet);
      await runOk('sync', ['-f', s.mnt]); // this filesystem only (syncfs)
      for (let k = 0; k < FILLER_ROUNDS; k++) {
        const filler = path.join(s.mnt, 'filler.bin');
        const fh = await fs.promises.open(filler, 'w');
        for (let off = 0; off < FILLER_BYTES; off += 4 * MiB) await fh.write(crypto.randomBytes(4 * MiB));
        await fh.close();
        await runOk('sync', ['-f', s.mnt]);
        await fs.promises.rm(filler);
        await runOk('sync', ['-f', s.mnt]); // ext4 trims only frees that are committed
        await runOk('fstrim', [s.mnt]);
      }
      await detach(s);
    }
    const base = await checkpointLanded();
    assert.ok(!memberWrapped(), 'the source\'s allocator reached the end of its member before the churn: use a bigger volume or less filler');
    step(`50 files (${(bytes / MiB).toFixed(1)} MiB) and ${FILLER_ROUNDS} x ${FILLER_BYTES / MiB} MiB filler (trimmed) on the source, mirror at CP ${base.destCp}`);

    // 3. The mirror, read-only: every file as written. It stays mounted (its connections
    //    stay pinned to this CP).
    const mirror = await attach('mirror1', mirrorUri, true);
    dropCaches();
    await verifySet(mirror.mnt, oldSet, 'mirror at the first CP');
    step('mirror mounted read-only, every file verified');

    // 4. The source again: delete half (and trim them), overwrite some, write new ones,
    //    in rounds with a CP after each, until the source's allocator has wrapped round
    //    its member and gone on for WRAPPED_ROUNDS more. Blocks of the mirror's CP are
    //    freed on the source all along (trimmed files, rewritten metadata and journal);
    //    while the mirror's reader pins that CP the source must not reuse them, or the
    //    destination would overwrite them under the read-only mount.
    const newSet: FileSet = new Map(oldSet);
    const oldNames = [...oldSet.keys()];
    let churn = 0;
    let wrappedAt = -1;
    {
      const s = await attach('src2', srcUri, false);
      for (let round = 0; wrappedAt < 0 || round <= wrappedAt + WRAPPED_ROUNDS; round++) {
        assert.ok(round < CHURN_ROUNDS_MAX, `the source's allocator did not wrap round its member in ${CHURN_ROUNDS_MAX} rounds (${(churn / MiB).toFixed(0)} MiB written)`);
        if (round === 0) {
          for (const name of oldNames.slice(0, 25)) {
            await fs.promises.rm(path.join(s.mnt, name));
            newSet.delete(name);
          }
          for (const name of oldNames.slice(25, 38)) churn += await writeFile(s.mnt, name, newSet); // overwritten
        } else {
          // Overwrite what the last round wrote; delete what the round before wrote.
          for (const name of [...newSet.keys()]) {
            if (name.includes(`new${round - 1}-`)) churn += await writeFile(s.mnt, name, newSet);
            if (name.includes(`new${round - 2}-`)) {
              await fs.promises.rm(path.join(s.mnt, name));
              newSet.delete(name);
            }
          }
        }
        for (let i = 0; i < 20; i++) churn += await writeFile(s.mnt, i % 4 === 0 ? `d${round % 3}/new${round}-${i}.bin` : `new${round}-${i}.bin`, newSet);
        await runOk('sync', ['-f', s.mnt]);
        await runOk('fstrim', [s.mnt]);
        const m = await checkpointLanded();
        if (wrappedAt < 0 && memberWrapped()) wrappedAt = round;
        // Between rounds the pinned mirror mount still reads the old files from the device.
        dropCaches();
        await verifySet(mirror.mnt, oldSet, `pinned mirror (CP ${base.destCp}) while the source is at CP ${m.sourceCp}`);
        step(`round ${round}: ${(churn / MiB).toFixed(1)} MiB written, mirror at CP ${m.destCp}${wrappedAt >= 0 ? ' (allocator wrapped)' : ''}, pinned mount verifies`);
      }
      await detach(s);
    }
    step('source unmounted');
    const last = await checkpointLanded();
    assert.ok(last.destCp >= base.destCp + 3, `only ${last.destCp - base.destCp} CPs reached the mirror (CP ${base.destCp} -> ${last.destCp})`);

    // 5. The pinned mount: the OLD files with the OLD checksums, read from the device, and
    //    a clean filesystem on its loop device.
    dropCaches();
    await verifySet(mirror.mnt, oldSet, `pinned mirror after CPs ${base.destCp} -> ${last.destCp}`);
    const fsck = await run('e2fsck', ['-fn', mirror.dev], 60_000);
    assert.equal(fsck.code, 0, `e2fsck -fn of the pinned mirror (CP ${base.destCp}) exited ${fsck.code}:\n${fsck.stdout}${fsck.stderr}`);
    step(`mirror CP ${base.destCp} -> ${last.destCp}; pinned mount verifies and e2fsck -fn is clean`);

    // 6. A new connection gets the newest CP: the NEW file set, and clean.
    await detach(mirror);
    step('pinned mirror unmounted');
    const fresh = await attach('mirror2', mirrorUri, true);
    dropCaches();
    await verifySet(fresh.mnt, newSet, `mirror reconnected at CP ${last.destCp}`);
    const fsck2 = await run('e2fsck', ['-fn', fresh.dev], 60_000);
    assert.equal(fsck2.code, 0, `e2fsck -fn of the reconnected mirror exited ${fsck2.code}:\n${fsck2.stdout}${fsck2.stderr}`);
    await detach(fresh);
    step(`reconnected mirror shows the new set (${newSet.size} files) and is clean`);
    assert.equal(sourceStatus(src)?.state, 'in-sync');
  });
});
