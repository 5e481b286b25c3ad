/**
 * The server process as a whole: SIGTERM/SIGINT with idle and busy clients (exit 0,
 * acknowledged writes durable in the file backend's image), and clear one-line errors
 * with a non-zero exit for bad arguments (port in use, missing file, bad size).
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import { BACKENDS, MiB, NVMIRROR_BIN, cleanupAll, makeTempDir, run, sleep, startServer } from './harness';
import { CMD, CMD_FLAG, RawClosedError, RawConn, negotiate, readSimpleReply, request, simpleRead, targetOf } from './rawnbd';

const SIZE_BYTES = 64 * MiB;

/** Runs `nvmirror serve ARGS` expecting a quick failure; returns its stderr. */
async function serveFails(args: string[]): Promise<{ code: number | null; stderr: string }> {
  const r = await run(process.execPath, [NVMIRROR_BIN, 'serve', ...args], { timeoutMs: 15_000 });
  assert.notEqual(r.code, 0, `serve ${args.join(' ')} should fail:\n${r.stdout}${r.stderr}`);
  assert.notEqual(r.code, null, `serve ${args.join(' ')} did not exit by itself: ${r.stderr}`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `no stack trace for a user error:\n${r.stderr}`);
  return { code: r.code, stderr: r.stderr };
}

describe('e2e server lifecycle and command-line errors', function () {
  this.timeout(60_000);
  after(async function () {
    await cleanupAll();
  });

  for (const backend of BACKENDS) {
    it(`${backend}: exits 0 within 5 s of SIGTERM while an idle client stays connected`, async function () {
      const server = await startServer({ backend, transport: 'unix', sizeBytes: SIZE_BYTES });
      const s = await negotiate(await RawConn.connect(targetOf(server)));
      try {
        assert.equal((await simpleRead(s, 0, 4096)).error, 0);
        const t0 = Date.now();
        const code = await server.stop(5000);
        assert.equal(code, 0);
        assert.ok(Date.now() - t0 < 5000);
        assert.ok(await s.conn.waitClosed(2000), 'the idle client is disconnected');
      } finally {
        s.conn.destroy();
      }
    });

    it(`${backend}: on SIGTERM with writes in flight, answers what it accepted and exits 0; acknowledged writes are durable`, async function () {
      const server = await startServer({ backend, transport: 'unix', sizeBytes: SIZE_BYTES });
      const s = await negotiate(await RawConn.connect(targetOf(server)));
      const blocks = Array.from({ length: 48 }, () => crypto.randomBytes(256 * 1024));
      try {
        // Queue the writes, then SIGTERM right behind them.
        await s.conn.write(
          Buffer.concat(
            blocks.map((b, i) =>
              request({ type: CMD.WRITE, flags: i % 4 === 0 ? CMD_FLAG.FUA : 0, cookie: BigInt(i + 1), offset: i * b.length, length: b.length }, b),
            ),
          ),
        );
        const stopped = server.stop(15_000);
        const acked = new Set<number>();
        for (;;) {
          try {
            const r = await readSimpleReply(s.conn, 10_000);
            assert.equal(r.error, 0, `write ${r.cookie} failed with ${r.error} during shutdown`);
            acked.add(Number(r.cookie) - 1);
          } catch (e) {
            if (e instanceof RawClosedError) break;
            throw e;
          }
          if (acked.size === blocks.length) break;
        }
        s.conn.destroy();
        assert.equal(await stopped, 0, `exit code:\n${server.stderr().slice(-2000)}`);
        if (backend === 'file' && server.imagePath !== undefined) {
          const fd = fs.openSync(server.imagePath, 'r');
          try {
            for (const i of acked) {
              const b = blocks[i] as Buffer;
              const got = Buffer.alloc(b.length);
              fs.readSync(fd, got, 0, b.length, i * b.length);
              assert.ok(got.equals(b), `acknowledged write ${i} is in the image file`);
            }
          } finally {
            fs.closeSync(fd);
          }
        }
      } finally {
        s.conn.destroy();
      }
    });
  }

  it('exits 0 on SIGINT too', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: SIZE_BYTES });
    process.kill(server.pid, 'SIGINT');
    const deadline = Date.now() + 10_000;
    while (server.alive() && Date.now() < deadline) await sleep(50);
    assert.ok(!server.alive(), 'exited within 10 s of SIGINT');
    assert.equal(await server.stop(), 0);
  });

  it('refuses a port in use with a one-line error', async function () {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    try {
      const addr = blocker.address() as net.AddressInfo;
      const { stderr } = await serveFails(['--memory', '64M', '--listen', `127.0.0.1:${addr.port}`]);
      assert.match(stderr.trim(), new RegExp(`^nvmirror: .*${addr.port}.*in use`, 'm'));
    } finally {
      blocker.close();
    }
  });

  it('refuses a missing image file, a bad size and a bad listen address with one-line errors', async function () {
    const dir = makeTempDir('nvm-e2e-cli-');
    const sock = path.join(dir, 'x.sock');
    const missing = await serveFails(['--file', path.join(dir, 'nope.img'), '--socket', sock]);
    assert.match(missing.stderr, /nope\.img/);
    const badSize = await serveFails(['--memory', '12Q', '--socket', sock]);
    assert.match(badSize.stderr, /12Q/);
    const badListen = await serveFails(['--memory', '64M', '--listen', 'nonsense']);
    assert.match(badListen.stderr, /nonsense/);
    const nothing = await serveFails(['--socket', sock]);
    assert.match(nothing.stderr, /nothing to serve|--memory|--file/);
    assert.ok(!fs.existsSync(sock) || fs.statSync(sock).isSocket() === false, 'no socket left behind by a failed start');
  });
});
