/**
 * `nvmirror serve` command-line behaviour from issue 11 (points 13 and 18):
 * - `--socket PATH` removes only a stale socket: an existing regular file, directory or
 *   live socket at PATH is refused and left alone; a missing parent directory is named
 *   as such (not "permission denied");
 * - one info log line per connection;
 * - `--cp-interval` takes durations like `10s` (a bare number stays milliseconds);
 * - with `--tls-psk`, the printed URI carries the PSK user and keys file, and works
 *   as printed with nbdinfo;
 * - a recorded mirror relationship that is damaged or empty is refused (not served
 *   unmirrored without a word); `--no-mirror` serves the volume.
 */
import { strict as assert } from 'assert';
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as crypto from 'crypto';
import * as net from 'net';
import * as path from 'path';
import { MiB, NVMIRROR_BIN, cleanupAll, freePort, makeTempDir, requireTools, run, runOk, sha256File, sleep, startServer, writeRandomFile } from './harness';
import { CMD, RawConn, negotiate, nextCookie, request, simpleRead, targetOf } from './rawnbd';
import { MIRROR_STATE_NAME } from '../../src/mirror/relationship';

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

  it('18: logs one info line per connection, with why it ended', async function () {
    requireTools(this, 'nbdinfo');
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 16 * MiB });
    try {
      await runOk('nbdinfo', ['--json', server.uri]);
      await runOk('nbdinfo', ['--list', server.uri]);
      const s = await negotiate(await RawConn.connect(targetOf(server)));
      assert.equal((await simpleRead(s, 0, 512)).error, 0);
      await s.conn.write(request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }));
      assert.ok(await s.conn.waitClosed(5000));
      const bad = await negotiate(await RawConn.connect(targetOf(server)));
      await bad.conn.write(Buffer.alloc(28, 0xee)); // bad magic: dropped
      assert.ok(await bad.conn.waitClosed(5000));
      await sleep(300);
      const perConn = new Map<number, string[]>();
      for (const line of server.stderr().split('\n')) {
        if (!line.startsWith('{')) continue;
        const j = JSON.parse(line) as { level: number; conn?: number; msg: string };
        if (j.conn === undefined || j.level < 30) continue;
        perConn.set(j.conn, [...(perConn.get(j.conn) ?? []), j.msg]);
      }
      assert.ok(perConn.size >= 3, `info lines for at least the 3 connections that reached transmission: ${JSON.stringify([...perConn])}`);
      for (const [conn, msgs] of perConn) {
        const info = msgs.filter((m) => !/protocol violation/.test(m)); // a warning is allowed on top
        assert.equal(info.length, 1, `connection ${conn} logged ${JSON.stringify(msgs)}`);
      }
      assert.match(server.stderr(), /"why":"protocol violation: bad request magic/);
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  it('keeps serving, CPs included, while nobody reads its stderr (a full pipe)', async function () {
    requireTools(this, 'nbdcopy', 'mkfifo');
    this.timeout(120_000);
    const dir = makeTempDir('nvm-e2e-logpipe-');
    const vol = path.join(dir, 'vol');
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', String(64 * MiB), '--nvram-size', '16M'], { timeoutMs: 60_000 });
    // stderr is a FIFO whose reader never reads until the end, filled to the brim before
    // the server starts: with a blocking log write the server's first line would wait forever.
    const fifo = path.join(dir, 'stderr.fifo');
    await runOk('mkfifo', [fifo]);
    const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const filler = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    const chunk = Buffer.alloc(4096, 0x20);
    chunk[4095] = 0x0a;
    let filled = 0;
    for (;;) {
      try {
        filled += fs.writeSync(filler, chunk);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') break;
        throw e;
      }
    }
    fs.closeSync(filler);
    assert.ok(filled >= 4096, 'the pipe took some filler');
    const errFd = fs.openSync(fifo, fs.constants.O_WRONLY);
    const sock = path.join(dir, 'nbd.sock');
    const child = spawn(process.execPath, [NVMIRROR_BIN, 'serve', vol, '--socket', sock, '--log-level', 'debug'], {
      stdio: ['ignore', 'pipe', errFd],
    });
    fs.closeSync(errFd);
    const readAll = (): string => {
      const buf = Buffer.alloc(1 << 20);
      let out = '';
      for (;;) {
        let n = 0;
        try {
          n = fs.readSync(reader, buf, 0, buf.length, null);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return out;
          throw e;
        }
        if (n === 0) return out;
        out += buf.subarray(0, n).toString('utf8');
      }
    };
    try {
      const uri = await new Promise<string>((resolve, reject) => {
        let out = '';
        child.stdout!.setEncoding('utf8');
        child.stdout!.on('data', (s: string) => {
          out += s;
          const m = /nbd\+unix:\/\/\S+/.exec(out);
          if (m) resolve(m[0]);
        });
        child.on('exit', (code) => reject(new Error(`serve exited ${code} before printing its URI`)));
      });
      // 64 MiB (the whole volume) through a 16 MiB NVRAM: several CPs, each logging at debug level.
      const src = path.join(dir, 'src.img');
      writeRandomFile(src, 64 * MiB, 77);
      await runOk('nbdcopy', [src, uri], { timeoutMs: 60_000 });
      const back = path.join(dir, 'back.img');
      await runOk('nbdcopy', [uri, back], { timeoutMs: 60_000 });
      assert.equal(sha256File(back), sha256File(src), 'the data read back is the data written');
      const st = JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol, '--json'], { timeoutMs: 30_000 })) as { server?: { logDroppedLines?: number } };
      assert.equal(st.server?.logDroppedLines, 0, 'status counts dropped log lines (none: the queue held them)');
      // The reader comes back: the filler, then the server's lines, CPs included.
      let text = '';
      for (let i = 0; i < 200 && !/consistency point committed/.test(text); i++) {
        text += readAll();
        await sleep(20);
      }
      assert.match(text, /consistency point committed/, 'the CPs ran (and logged) while stderr was full');
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((r) => (child.exitCode !== null ? r(child.exitCode) : child.on('exit', (c) => r(c))));
      text += readAll();
      assert.equal(code, 0, text.slice(-2000));
      assert.doesNotMatch(text, /droppedLines/, 'nothing was dropped: the queue held the lines until the reader came back');
    } finally {
      child.kill('SIGKILL');
      fs.closeSync(reader);
    }
  });

  it('18: --cp-interval takes 10s-style durations and refuses nonsense with a one-line error', async function () {
    const server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 16 * MiB, extraArgs: ['--cp-interval', '10s'] });
    assert.equal(await server.stop(), 0);
    const err = await serveFails(['--memory', '1M', '--socket', path.join(makeTempDir('nvm-e2e-cp-'), 's'), '--cp-interval', '10 parsecs']);
    assert.match(err, /bad duration "10 parsecs"/);
  });

  it('a volume whose recorded mirror relationship is damaged or empty is refused with a line naming the file and the way out, never served unmirrored; --no-mirror serves it', async function () {
    const dir = path.join(makeTempDir('nvm-e2e-rel-'), 'vol');
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', dir, '--size', '16M']);
    const state = path.join(dir, MIRROR_STATE_NAME);
    const sock = path.join(path.dirname(dir), 's');
    for (const [content, why] of [['{"peer":"10.0.0.2:7000","mode":"sy', /it is not a mirror relationship/], ['', /it is empty/]] as const) {
      fs.writeFileSync(state, content);
      const err = await serveFails([dir, '--socket', sock]);
      assert.match(err.split('\n')[0] ?? '', new RegExp(`${state.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `), err);
      assert.match(err, why);
      assert.match(err, /--mirror-to HOST:PORT .* or --no-mirror/);
      assert.equal(fs.readFileSync(state, 'utf8'), content, 'the file is left as it was');
    }
    const server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 16 * MiB, existingStoragePath: dir, extraArgs: ['--no-mirror'] });
    assert.equal(await server.stop(), 0);
  });

  it('a --mirror-to naming another destination than the recorded one says the mirror moves, from where to where', async function () {
    const until = async (ok: () => boolean): Promise<void> => {
      for (let i = 0; i < 100 && !ok(); i++) await sleep(50);
      assert.ok(ok(), 'in time');
    };
    const dir = path.join(makeTempDir('nvm-e2e-move-'), 'vol');
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', dir, '--size', '16M']);
    // Nothing listens on these ports: the relationship is recorded all the same (policy available).
    const [a, b] = [await freePort(), await freePort()];
    const first = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 16 * MiB, existingStoragePath: dir, extraArgs: ['--mirror-to', `127.0.0.1:${a}`, '--mirror-insecure'] });
    assert.doesNotMatch(first.stderr(), /relationship moved/);
    assert.equal(await first.stop(), 0);
    const same = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 16 * MiB, existingStoragePath: dir, extraArgs: ['--mirror-to', `127.0.0.1:${a}`, '--mirror-insecure'] });
    assert.doesNotMatch(same.stderr(), /relationship moved/, 'the same destination again: nothing to say');
    assert.equal(await same.stop(), 0);
    const moved = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 16 * MiB, existingStoragePath: dir, extraArgs: ['--mirror-to', `127.0.0.1:${b}`, '--mirror-insecure'] });
    await until(() => /relationship moved/.test(moved.stderr()));
    const line = moved.stderr().split('\n').find((l) => l.includes('relationship moved'))!;
    const rec = JSON.parse(line) as { level: number; from: string; to: string; oldDestCp: number };
    assert.deepEqual([rec.level, rec.from, rec.to, rec.oldDestCp], [40, `127.0.0.1:${a}`, `127.0.0.1:${b}`, -1]);
    assert.equal(await moved.stop(), 0);
  });

  it('--busy-poll takes microseconds in [0, 1000] and refuses anything else with an error naming the option', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 16 * MiB, extraArgs: ['--busy-poll', '0'] });
    assert.equal(await server.stop(), 0);
    for (const bad of ['1001', '-1', 'fast']) {
      const err = await serveFails(['--memory', '1M', '--socket', path.join(makeTempDir('nvm-e2e-bp-'), 's'), '--busy-poll', bad]);
      assert.match(err.split('\n')[0] ?? '', /'--busy-poll <US>' argument '.*' is invalid/, `the first line names the option for ${bad}: ${err}`);
    }
  });

  it('18: with --tls-psk, the printed URIs carry the PSK user and keys file and work as printed', async function () {
    requireTools(this, 'nbdinfo');
    const dir = makeTempDir('nvm-e2e-psk-uri-');
    const keys = path.join(dir, 'keys.psk');
    fs.writeFileSync(keys, `alice:${crypto.randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    const sock = path.join(dir, 'psk.sock');
    const server = await startServer({
      backend: 'memory', transport: 'tcp', sizeBytes: 16 * MiB, exportName: 'vol',
      extraArgs: ['--tls-psk', keys, '--tls-required', '--socket', sock],
    });
    try {
      await sleep(200); // every URI line is out
      const uris = server.printed.filter((l) => !l.startsWith('connect with')).map((l) => l.trim());
      assert.equal(uris.length, 2, `printed: ${JSON.stringify(server.printed)}`);
      for (const uri of uris) {
        assert.match(uri, /^nbds(\+unix)?:\/\/alice@/, `user in ${uri}`);
        assert.ok(uri.includes(`tls-psk-file=${keys}`), `keys file in ${uri}`);
        const j = JSON.parse(await runOk('nbdinfo', ['--json', uri])) as { TLS: boolean };
        assert.equal(j.TLS, true, `nbdinfo '${uri}' connects over TLS`);
      }
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });
});
