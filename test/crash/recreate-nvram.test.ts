/**
 * A lost NVRAM log: `nvmirror repair DIR --recreate-nvram` recreates a deleted or
 * unreadable nvram.log only when the tree provably holds every write (the last session
 * stopped cleanly: its clean-stop record names the tree's newest CP and watermark), and
 * refuses after a kill -9 (the log may have held acknowledged writes) or while the log is
 * readable.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { runCli, ServedVolume } from './harness';

const BS = 4096;

function content(i: number): Buffer {
  const b = Buffer.alloc(BS, 0x70 + i);
  b.writeUInt32LE(0xc1ea0000 + i, 0);
  return b;
}

async function writeSome(dir: string, sock: string, n: number): Promise<ServedVolume> {
  const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1h']);
  const c = await NbdClient.connect(sock, '');
  for (let i = 0; i < n; i++) await c.write(i * BS, content(i), false);
  await c.flush();
  await c.close();
  return server;
}

describe('crash: recreating a lost NVRAM log', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-renv-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('after a clean stop: a deleted, then an unreadable log is recreated and the data is intact', async () => {
    const dir = path.join(tmp, 'clean');
    const sock = path.join(tmp, 'clean.sock');
    const log = path.join(dir, 'nvram.log');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    const server = await writeSome(dir, sock, 8);
    assert.equal(await server.stop(), 0, server.stderr);

    const readable = await runCli(['repair', dir, '--recreate-nvram']);
    assert.equal(readable.code, 1);
    assert.match(readable.stderr, /is readable: nothing to recreate/);

    fs.rmSync(log);
    const missing = await runCli(['serve', dir, '--socket', sock]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /the NVRAM log .* is missing \(if the last session stopped cleanly: nvmirror repair .* --recreate-nvram\)/);
    const r = await runCli(['repair', dir, '--recreate-nvram']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /recreated the NVRAM log .*nvram\.log: the tree at CP \d+ holds every write up to seq 8/);
    assert.equal(fs.statSync(log).size, 1024 * 1024);
    assert.equal((await runCli(['check', dir])).code, 0);

    // Serve again, write more, stop cleanly; then the log's header page is destroyed.
    const s2 = await ServedVolume.start(dir, sock);
    let c = await NbdClient.connect(sock, '');
    for (let i = 0; i < 8; i++) assert.deepEqual(await c.read(i * BS, BS), content(i));
    await c.write(20 * BS, content(20), false);
    await c.close();
    assert.equal(await s2.stop(), 0, s2.stderr);
    const fd = fs.openSync(log, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 0);
    fs.closeSync(fd);
    const r2 = await runCli(['repair', dir, '--recreate-nvram']);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /the unreadable one is kept as .*nvram\.log\.unreadable-\d+/);
    const s3 = await ServedVolume.start(dir, sock);
    c = await NbdClient.connect(sock, '');
    assert.deepEqual(await c.read(20 * BS, BS), content(20));
    assert.deepEqual(await c.read(3 * BS, BS), content(3));
    await c.close();
    assert.equal(await s3.stop(), 0, s3.stderr);
  });

  it('a volume never served (created: CP 0, an empty log): a truncated log is named with the way out, and recreated', async () => {
    const dir = path.join(tmp, 'new');
    const sock = path.join(tmp, 'new.sock');
    const log = path.join(dir, 'nvram.log');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    fs.truncateSync(log, 512 * 1024);
    const short = await runCli(['serve', dir, '--socket', sock]);
    assert.equal(short.code, 1);
    assert.match(short.stderr, /^nvmirror: NVRAM file .*nvram\.log is 524288 bytes, expected 1048576: truncated or replaced\? \(if the last session stopped cleanly: nvmirror repair .* --recreate-nvram\)\n$/);
    const r = await runCli(['repair', dir, '--recreate-nvram']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /recreated the NVRAM log .*nvram\.log: the tree at CP 0 holds every write up to seq 0/);
    assert.equal(fs.statSync(log).size, 1024 * 1024);
    const server = await writeSome(dir, sock, 4);
    assert.equal(await server.stop(), 0, server.stderr);
    assert.equal((await runCli(['check', dir])).code, 0);
  });

  it('after kill -9 (records not in the tree) the log is not recreated', async () => {
    const dir = path.join(tmp, 'killed');
    const sock = path.join(tmp, 'killed.sock');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    // A clean session first, so a stale clean-stop record would exist if it were not cleared.
    const s1 = await writeSome(dir, sock, 2);
    assert.equal(await s1.stop(), 0, s1.stderr);
    const s2 = await writeSome(dir, sock, 8);
    s2.kill9();
    await s2.exited;
    fs.rmSync(path.join(dir, 'nvram.log'));
    const r = await runCli(['repair', dir, '--recreate-nvram']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^nvmirror: cannot prove the NVRAM log held nothing the tree lacks: no clean-stop record for CP \d+ .*refusing to recreate it\n$/);
    assert.ok(!fs.existsSync(path.join(dir, 'nvram.log')), 'nothing recreated');
  });
});
