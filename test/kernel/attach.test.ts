/**
 * Kernel tests: /dev/nbdX through the real Linux nbd driver, in a guest booted by
 * scripts/kernel-vm (this machine's kernel has no nbd driver). One boot runs every guest
 * check (test/kernel/guest-suite.sh) because the guest is software-emulated; each `it`
 * below asserts on the PASS/FAIL line of one check.
 *
 * Host side: an `nvmirror serve` on 127.0.0.1 (the guest reaches it at 10.0.2.2) for the
 * nbd-client checks. In the guest too: XFS on a RAID-5 volume losing a member while
 * attached (issue 9), and the mirror across a veth pair under real netem (issue 8: this
 * machine's kernel has no netem). In CI (CI=true) a missing tool fails the suite; elsewhere it is
 * skipped only when the VM cannot be built or booted for lack of a tool.
 *
 * Run: npx tsc -p . && npx mocha dist/test/kernel/attach.test.js
 */
import { spawn, spawnSync, ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { strict as assert } from 'assert';

const REPO = path.resolve(__dirname, '../../..');
const CLI = 'dist/src/cli/main.js';
const ADDON = 'build/Release/nvmirror_native.node';
const RUN = path.join(REPO, 'scripts/kernel-vm/run.sh');
const BUILD = path.join(REPO, 'scripts/kernel-vm/build.sh');
const SUITE = 'test/kernel/guest-suite.sh';
/** The guest run took 330-354 s with the host at load 13-19 (185 s at load 12 before the RAID-5 and netem checks). */
const VM_TIMEOUT_S = 480;
const EXPORT = 'kvm';

interface Results {
  status: Map<string, { ok: boolean; reason: string }>;
  times: Map<string, number>;
  output: string;
  exitCode: number | null;
  done: boolean;
}

/**
 * A private copy of the build (the guest reads the host's files live, and other work may
 * rebuild dist/ or the addon while the guest runs): package.json, dist/, the addon, and
 * a link to node_modules. The guest sees it at the same path.
 */
function snapshotBuild(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvmirror-kvm-'));
  fs.copyFileSync(path.join(REPO, 'package.json'), path.join(dir, 'package.json'));
  fs.cpSync(path.join(REPO, 'dist'), path.join(dir, 'dist'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'build/Release'), { recursive: true });
  fs.copyFileSync(path.join(REPO, ADDON), path.join(dir, ADDON));
  fs.symlinkSync(path.join(REPO, 'node_modules'), path.join(dir, 'node_modules'));
  fs.chmodSync(dir, 0o755); // the not-root check runs nvmirror as nobody
  return dir;
}

function startServe(app: string): Promise<{ proc: ChildProcess; port: number }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [path.join(app, CLI), 'serve', '--memory', '1G', '--listen', '127.0.0.1:0', '--export', EXPORT], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NVMIRROR_LOG_LEVEL: 'warn' },
    });
    let out = '';
    let err = '';
    const timer = setTimeout(() => reject(new Error(`nvmirror serve did not start: ${out} ${err}`)), 30_000);
    proc.stdout.on('data', (c: Buffer) => {
      out += c.toString();
      const m = /nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, port: Number(m[1]) });
      }
    });
    proc.stderr.on('data', (c: Buffer) => (err += c.toString()));
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nvmirror serve exited ${code}: ${err}`));
    });
  });
}

function runGuest(args: string[]): Promise<Results> {
  return new Promise((resolve) => {
    const proc = spawn(RUN, ['--timeout', String(VM_TIMEOUT_S), '--', 'bash', SUITE, ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    proc.stdout.on('data', (c: Buffer) => (output += c.toString()));
    proc.stderr.on('data', (c: Buffer) => (output += c.toString()));
    proc.once('close', (code) => {
      const status = new Map<string, { ok: boolean; reason: string }>();
      const times = new Map<string, number>();
      for (const line of output.split('\n')) {
        const r = /^(PASS|FAIL) (\S+?)(?:: (.*))?$/.exec(line.trim());
        if (r && r[2] !== undefined) status.set(r[2], { ok: r[1] === 'PASS', reason: r[3] ?? '' });
        const t = /^TIME (\S+) (\d+)$/.exec(line.trim());
        if (t && t[1] !== undefined) times.set(t[1], Number(t[2]));
      }
      resolve({ status, times, output, exitCode: code, done: output.includes('SUITE-DONE') });
    });
  });
}

function toolMissing(): string | undefined {
  if (spawnSync('qemu-system-x86_64', ['--version']).status !== 0 && process.getuid?.() !== 0) return 'qemu-system-x86_64 (and not root to install it)';
  return undefined;
}

describe('kernel nbd driver (VM)', function () {
  this.timeout((VM_TIMEOUT_S + 60) * 1000);
  let serve: { proc: ChildProcess; port: number } | undefined;
  let res: Results | undefined;
  let app: string | undefined;

  before(async function () {
    const missing = toolMissing();
    if (missing !== undefined) {
      if (process.env.CI === 'true') throw new Error(`kernel tests need ${missing}`);
      this.skip();
    }
    const built = spawnSync(BUILD, [], { encoding: 'utf8', timeout: 300_000 });
    if (built.status !== 0) {
      const why = `scripts/kernel-vm/build.sh failed: ${built.stderr || built.error?.message || ''}`;
      if (process.env.CI === 'true' || process.getuid?.() === 0) throw new Error(why);
      this.skip();
    }
    app = snapshotBuild();
    serve = await startServe(app);
    const t0 = Date.now();
    res = await runGuest(['--app', app, '--serve', `10.0.2.2:${serve.port}:${EXPORT}`, '--engine', '--raid', '--netem']);
    const times = [...res.times.entries()].map(([k, v]) => `${k}=${(v / 1000).toFixed(1)}s`).join(' ');
    process.stdout.write(`      guest run ${((Date.now() - t0) / 1000).toFixed(1)} s (boot included); ${times}\n`);
  });

  after(async () => {
    if (serve && serve.proc.exitCode === null) {
      const exited = new Promise((r) => serve?.proc.once('exit', r));
      serve.proc.kill('SIGTERM');
      await exited;
    }
    if (app !== undefined) fs.rmSync(app, { recursive: true, force: true });
  });

  function expectPass(name: string): void {
    assert.ok(res, 'the guest did not run');
    const r = res.status.get(name);
    const tail = res.output.split('\n').slice(-40).join('\n');
    if (!r) assert.fail(`no result for "${name}" (guest exit ${res.exitCode}, suite ${res.done ? 'finished' : 'did not finish'}); guest output tail:\n${tail}`);
    // The guest prints "DIAG <name>: ..." lines after some failures (kernel log, server warnings).
    const diag = r.ok ? '' : res.output.split('\n').filter((l) => l.startsWith(`DIAG ${name}: `)).join('\n');
    assert.ok(r.ok, `${name}: ${r.reason}${diag ? `\n${diag}` : ''}`);
  }

  it('the guest suite runs to the end and reports no failure', () => {
    assert.ok(res);
    const failed = [...res.status.entries()].filter(([, v]) => !v.ok).map(([k, v]) => `${k}: ${v.reason}`);
    assert.deepEqual(failed, []);
    assert.ok(res.done, `guest suite did not finish (exit ${res.exitCode}):\n${res.output.split('\n').slice(-40).join('\n')}`);
  });
  it('attach a file volume (netlink): mkfs.ext4, files fsynced, e2fsck -fn clean, checksums after remount', () => expectPass('attach-ext4'));
  it('attach refuses a busy device with a clear message', () => expectPass('error-busy'));
  it('attach refuses a non-root user with a clear message', () => expectPass('error-not-root'));
  it('attach refuses a device that is not /dev/nbdN', () => expectPass('error-bad-device'));
  it('detach from another process disconnects; the attach process exits 0', () => expectPass('detach-external'));
  it('detach of a device that is not attached says so', () => expectPass('error-not-attached'));
  it('re-attaching the image through the ioctl interface shows the same files', () => expectPass('reattach-ioctl'));
  it('SIGTERM detaches cleanly and exits 0', () => expectPass('sigterm-exit0'));
  it('4096-byte blocks, two connections: mkfs.xfs (4 KiB sectors), xfs_repair -n clean, checksums after remount', () => expectPass('attach-xfs-4k'));
  it('SIGINT detaches cleanly and exits 0', () => expectPass('sigint-exit0'));
  it('a stalled nvmirror makes I/O fail after --timeout instead of hanging', () => expectPass('stall-io-error'));
  it('after a stall the kernel drops the connection and nvmirror detaches and exits 1', () => expectPass('stall-cleanup'));
  it('killing nvmirror while mounted gives I/O errors in the guest, not a hang', () => expectPass('kill-io-error'));
  it('a device left by a killed nvmirror is freed by nvmirror detach', () => expectPass('kill-detach'));
  it('nbd-client against nvmirror serve on the host (netlink): ext4 checks pass', () => expectPass('nbd-client-ext4'));
  it('nbd-client -L (ioctl) with 4096-byte blocks reads back the same files', () => expectPass('nbd-client-ioctl'));
  it('an engine volume directory (nvmirror create) passes the ext4 checks with 4096-byte blocks', () => expectPass('attach-engine'));
  it('the engine volume shows the same files when attached again', () => expectPass('attach-engine-again'));
  it('a RAID-5 volume over 4 member files: XFS, a member deleted while mounted, more files written and read back, xfs_repair -n clean', () => expectPass('raid5-xfs-degraded'));
  it('the RAID-5 volume attached again without the deleted member: degraded, checksums match, xfs_repair -n clean', () => expectPass('raid5-reattach-degraded'));
  it('the mirror (sync) across a veth pair under netem reordering, loss + duplication and 100 ms delay while a client writes converges: roots equal, exports identical, no crash', () => expectPass('mirror-netem'));
  it('with no nbd driver, attach says to run modprobe nbd', () => expectPass('error-no-driver'));
});
