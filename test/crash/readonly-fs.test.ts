/**
 * Read-only opens on a read-only file system (a read-only bind mount; needs root, skipped
 * otherwise): `status`, `check` and `serve --read-only` work and write nothing, with and
 * without a lock file present; a read-write `serve` is refused with a one-line message
 * that names the read-only file system (not "in use by another process").
 */
import { strict as assert } from 'assert';
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { runCli, ServedVolume } from './harness';

const BS = 4096;

function content(i: number): Buffer {
  const b = Buffer.alloc(BS, 0x40 + i);
  b.writeUInt32LE(0x0dd0_0000 + i, 0);
  return b;
}

describe('crash: read-only opens on a read-only file system', function () {
  this.timeout(120_000);
  let tmp: string;
  let mounted = false;
  before(function () {
    if (process.getuid?.() !== 0) this.skip();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-rofs-'));
  });
  after(() => {
    if (mounted) execFileSync('umount', [path.join(tmp, 'ro')]);
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('status, check and serve --read-only work; a read-write serve names the read-only file system', async () => {
    const src = path.join(tmp, 'src');
    const ro = path.join(tmp, 'ro');
    fs.mkdirSync(src);
    fs.mkdirSync(ro);
    const dir = path.join(src, 'vol');
    const sock = path.join(tmp, 's');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    // Leave writes in the NVRAM (kill -9, no final CP) so a read-only open must replay them.
    const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1h']);
    const c = await NbdClient.connect(sock, '');
    for (let i = 0; i < 4; i++) await c.write(i * BS, content(i), false);
    await c.flush();
    server.kill9();
    await server.exited;
    await c.close().catch(() => undefined);
    fs.rmSync(path.join(dir, 'control.sock'), { force: true });

    execFileSync('mount', ['--bind', src, ro]);
    mounted = true;
    execFileSync('mount', ['-o', 'remount,bind,ro', ro]);
    const roDir = path.join(ro, 'vol');
    assert.throws(() => fs.writeFileSync(path.join(roDir, 'probe'), 'x'), /EROFS/);

    for (const withLock of [true, false]) {
      if (!withLock) {
        execFileSync('umount', [ro]);
        fs.rmSync(path.join(dir, 'nvmirror.lock'));
        execFileSync('mount', ['--bind', src, ro]);
        execFileSync('mount', ['-o', 'remount,bind,ro', ro]);
      }
      const what = withLock ? 'with a lock file' : 'without a lock file';
      const st = await runCli(['status', roDir]);
      assert.equal(st.code, 0, `${what}: ${st.stderr}`);
      assert.match(st.stdout, /served +no/);
      assert.match(st.stdout, /4 records to replay at next open/);
      const chk = await runCli(['check', roDir]);
      assert.equal(chk.code, 0, `${what}: ${chk.stdout}${chk.stderr}`);
      assert.match(chk.stdout, /ok$/m);

      const rw = await runCli(['serve', roDir, '--socket', sock]);
      assert.equal(rw.code, 1);
      assert.match(rw.stderr, /^nvmirror: volume .* is on a read-only file system: it can only be opened read-only/);
      assert.doesNotMatch(rw.stderr, /in use/);

      const srv = await ServedVolume.start(roDir, sock, ['--read-only']);
      const rc = await NbdClient.connect(sock, '');
      for (let i = 0; i < 4; i++) assert.deepEqual(await rc.read(i * BS, BS), content(i), `${what}: block ${i}`);
      await rc.close();
      if (withLock) {
        const busy = await runCli(['status', roDir]);
        assert.equal(busy.code, 1);
        assert.match(busy.stderr, /is open in another process that has no control socket/);
      }
      assert.equal(await srv.stop(), 0, srv.stderr);
    }
    assert.deepEqual(fs.readdirSync(dir).sort(), ['member-0.img', 'nvmirror.json', 'nvram.log', 'sessions.json'], 'nothing written while read-only (sessions.json is the read-write session before)');
  });
});
