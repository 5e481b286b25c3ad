/**
 * Socket activation (issue 11 point 14): `systemd-socket-activate -l PATH_OR_PORT
 * nvmirror serve ...` hands nvmirror its listening socket (LISTEN_FDS/LISTEN_PID, fd 3);
 * the first client, the one whose connection starts the server, gets a working device:
 * its I/O (qemu-io write then verified read) is correct, and nbdinfo sees the export.
 * A LISTEN_PID that is not nvmirror's is ignored (a warning) and --socket is used.
 */
import { strict as assert } from 'assert';
import { spawn, type ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { CHILD_ENV, MiB, NVMIRROR_BIN, REPO_ROOT, cleanupAll, freePort, makeTempDir, requireTools, run, runOk, sleep } from './harness';

const START_TIMEOUT_MS = 10_000;

/** Starts systemd-socket-activate listening on `listen`; resolves once it listens. */
async function activate(listen: string, serveArgs: string[]): Promise<{ child: ChildProcess; stderr: () => string }> {
  const child = spawn('systemd-socket-activate', ['-l', listen, process.execPath, NVMIRROR_BIN, 'serve', ...serveArgs], {
    cwd: REPO_ROOT,
    env: { ...CHILD_ENV, NODE_ENV: 'test' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => (err += s));
  child.stdout?.resume();
  const t0 = Date.now();
  while (!/Listening on/.test(err)) {
    if (child.exitCode !== null) throw new Error(`systemd-socket-activate exited ${child.exitCode}: ${err}`);
    if (Date.now() - t0 > START_TIMEOUT_MS) throw new Error(`systemd-socket-activate did not listen: ${err}`);
    await sleep(20);
  }
  return { child, stderr: () => err };
}

async function stop(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return child.exitCode;
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  child.kill('SIGTERM'); // systemd-socket-activate exec'd nvmirror: same pid
  const t = setTimeout(() => child.kill('SIGKILL'), 15_000);
  const code = await exited;
  clearTimeout(t);
  return code;
}

const QEMU_IO_CHECK = ['-c', 'write -P 0xa5 1M 2M', '-c', 'read -P 0xa5 1M 2M', '-c', 'read -P 0 0 1M', '-c', 'flush'];

describe('e2e socket activation (issue 11 point 14)', function () {
  this.timeout(30_000);
  before(function () {
    requireTools(this, 'systemd-socket-activate', 'qemu-io', 'nbdinfo');
  });
  after(async function () {
    await cleanupAll();
  });

  it('the shipped units (contrib/systemd) serve a volume directory: the first client does correct I/O', async function () {
    // The units' own ExecStart and ListenStream, instance "vol0", with /var/lib/nvmirror
    // and /run/nvmirror moved to a temporary directory and the binary to this checkout's.
    const dir = makeTempDir('nvm-e2e-sa-');
    const unit = (name: string): string =>
      fs.readFileSync(path.join(REPO_ROOT, 'contrib', 'systemd', name), 'utf8')
        .replaceAll('%i', 'vol0')
        .replaceAll('/var/lib/nvmirror', dir)
        .replaceAll('/run/nvmirror', dir);
    const execStart = /^ExecStart=(\S+) (.*)$/m.exec(unit('nvmirror@.service'));
    const listen = /^ListenStream=(\S+)$/m.exec(unit('nvmirror@.socket'));
    assert.ok(execStart && listen, 'the units have ExecStart and ListenStream');
    assert.match(execStart[1] as string, /\/nvmirror$/);
    const args = (execStart[2] as string).split(' ');
    assert.equal(args[0], 'serve');
    const vol = args[1] as string;
    assert.equal(vol, path.join(dir, 'vol0'));
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', '64M', '--nvram-size', '16M']);
    const sock = listen[1] as string;
    const { child, stderr } = await activate(sock, args.slice(1));
    try {
      const uri = `nbd+unix:///vol0?socket=${sock}`;
      // The first connection starts nvmirror; it must be served, not hang.
      const io = await run('qemu-io', ['-f', 'raw', ...QEMU_IO_CHECK, uri], { timeoutMs: 20_000 });
      assert.equal(io.code, 0, `qemu-io:\n${io.stdout}${io.stderr}\n--- server ---\n${stderr()}`);
      assert.doesNotMatch(io.stdout, /Pattern verification failed/);
      const info = await runOk('nbdinfo', ['--json', uri], { timeoutMs: 10_000 });
      assert.equal(JSON.parse(info).exports[0]['export-size'], 64 * MiB);
      // A fresh client reads back what the first one wrote.
      await runOk('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xa5 1M 2M', uri], { timeoutMs: 10_000 });
    } finally {
      assert.equal(await stop(child), 0, stderr());
    }
    // The volume was closed cleanly and keeps the data.
    assert.match(await runOk(process.execPath, [NVMIRROR_BIN, 'check', vol]), /ok/i);
  });

  it('the first client of a memory volume activated on TCP does correct I/O', async function () {
    const port = await freePort();
    const { child, stderr } = await activate(`127.0.0.1:${port}`, ['--memory', '16M']);
    try {
      const io = await run('qemu-io', ['-f', 'raw', ...QEMU_IO_CHECK, `nbd://127.0.0.1:${port}/`], { timeoutMs: 20_000 });
      assert.equal(io.code, 0, `qemu-io:\n${io.stdout}${io.stderr}\n--- server ---\n${stderr()}`);
      assert.match(stderr(), /nbd:\/\/127\.0\.0\.1:\d+\//, 'prints the activated address');
    } finally {
      assert.equal(await stop(child), 0, stderr());
    }
  });

  it('a LISTEN_PID that is not ours is ignored with a warning, and --socket is served', async function () {
    const dir = makeTempDir('nvm-e2e-sa-');
    const sock = path.join(dir, 'x.sock');
    const child = spawn(process.execPath, [NVMIRROR_BIN, 'serve', '--memory', '1M', '--socket', sock], {
      cwd: REPO_ROOT,
      env: { ...CHILD_ENV, LISTEN_PID: '1', LISTEN_FDS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let err = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => (err += s));
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (s: string) => (out += s));
    try {
      const t0 = Date.now();
      while (!out.includes('nbd+unix://')) {
        assert.equal(child.exitCode, null, `serve exited:\n${err}`);
        assert.ok(Date.now() - t0 < START_TIMEOUT_MS, `no URI printed:\n${err}`);
        await sleep(20);
      }
      await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`], { timeoutMs: 10_000 });
    } finally {
      assert.equal(await stop(child), 0, err);
    }
    assert.match(err, /LISTEN_PID=1 is not this process/);
    assert.match(err, /ignoring socket activation/);
  });
});
