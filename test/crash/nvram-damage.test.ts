/**
 * NVRAM damage after a process crash: a served volume takes 50 FLUSHed writes (no CP:
 * they live only in nvram.log), is killed with SIGKILL, then one record's payload gets a
 * flipped byte.
 * - In the middle of the log (valid, later records follow it): a read-write open is
 *   refused with an error naming the lost sequence range; `serve --read-only` salvages
 *   what replays (and says so); `check` reports the damage and exits 1; `repair
 *   --accept-nvram-loss` then commits what replays and the volume serves read-write.
 * - In the last record (nothing valid after it, a torn tail): the volume opens as before
 *   and every earlier write reads back.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { runCli, ServedVolume } from './harness';
import { HEADER_PAGE_BYTES, RECORD_HEADER_BYTES } from '../../src/nvlog/format';

const BS = 4096;
const WRITES = 50;
/** Each 4 KiB write is one record: 64-byte header + payload, back to back from half 0's start. */
const RECORD_BYTES = RECORD_HEADER_BYTES + BS;
const ZERO = Buffer.alloc(BS);

function content(i: number): Buffer {
  const b = Buffer.alloc(BS, (i * 37 + 11) & 0xff);
  b.writeUInt32LE(0xfeed0000 + i, 0);
  return b;
}

function flipByte(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0x5a;
    fs.writeSync(fd, b, 0, 1, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Creates a volume, serves it, writes WRITES flushed blocks (lbn 10 + i), kills the server. */
async function crashedVolume(dir: string, sock: string): Promise<void> {
  assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
  const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1h']);
  const c = await NbdClient.connect(sock, '');
  for (let i = 0; i < WRITES; i++) {
    await c.write((10 + i) * BS, content(i), false);
    await c.flush();
  }
  server.kill9();
  await server.exited;
  await c.close().catch(() => undefined);
}

/** Region offset of the payload of the k-th record (0-based) of the session's epoch. */
function payloadOffset(k: number): number {
  return HEADER_PAGE_BYTES + k * RECORD_BYTES + RECORD_HEADER_BYTES;
}

describe('crash: NVRAM log damage after kill -9', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-nvdamage-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('mid-log damage: read-write open refused naming the lost seqs, read-only salvages, check reports it', async () => {
    const dir = path.join(tmp, 'mid');
    const sock = path.join(tmp, 'mid.sock');
    await crashedVolume(dir, sock);
    flipByte(path.join(dir, 'nvram.log'), payloadOffset(9) + 100); // the 10th write's record (seq 10)

    await assert.rejects(ServedVolume.start(dir, sock), (e: Error) => {
      assert.match(e.message, /NVRAM log damaged mid-log: records seq 10\.\.50 cannot be replayed/);
      assert.match(e.message, /refusing to open read-write/);
      return true;
    });
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 1, chk.stdout);
    assert.match(chk.stdout, /problem: NVRAM: damaged mid-log: records seq 10\.\.50 cannot be replayed/);

    const ro = await ServedVolume.start(dir, sock, ['--read-only', '--log-level', 'error']);
    const c = await NbdClient.connect(sock, '');
    for (let i = 0; i < 9; i++) assert.deepEqual(await c.read((10 + i) * BS, BS), content(i), `write ${i} salvaged`);
    assert.deepEqual(await c.read((10 + 9) * BS, BS), ZERO, 'the damaged record is not replayed');
    await c.close();
    await ro.stop();
    assert.match(ro.stderr, /NVRAM log damaged mid-log: records seq 10\.\.50.*opened read-only to salvage/);
    // The salvage wrote nothing: still refused read-write.
    await assert.rejects(ServedVolume.start(dir, sock), /records seq 10\.\.50 cannot be replayed/);

    // The operator accepts the loss: what replayed is committed, the rest dropped for good.
    const acc = await runCli(['repair', dir, '--accept-nvram-loss']);
    assert.equal(acc.code, 0, acc.stderr);
    assert.match(acc.stdout, /dropped NVRAM records seq 10\.\.50; the volume opens read-write again/);
    assert.equal((await runCli(['check', dir])).code, 0);
    const rw = await ServedVolume.start(dir, sock);
    const c2 = await NbdClient.connect(sock, '');
    for (let i = 0; i < 9; i++) assert.deepEqual(await c2.read((10 + i) * BS, BS), content(i));
    assert.deepEqual(await c2.read((10 + 9) * BS, BS), ZERO);
    await c2.close();
    assert.equal(await rw.stop(), 0, rw.stderr);
  });

  it('a torn tail (damage in the last record) opens read-write as before', async () => {
    const dir = path.join(tmp, 'tail');
    const sock = path.join(tmp, 'tail.sock');
    await crashedVolume(dir, sock);
    flipByte(path.join(dir, 'nvram.log'), payloadOffset(WRITES - 1) + 100);
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 0, chk.stdout);
    const server = await ServedVolume.start(dir, sock);
    const c = await NbdClient.connect(sock, '');
    for (let i = 0; i < WRITES - 1; i++) assert.deepEqual(await c.read((10 + i) * BS, BS), content(i));
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
  });
});
