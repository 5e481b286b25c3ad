/**
 * End-to-end corruption: a closed volume has one byte flipped in a data block, then in an
 * address block, on its member file. `nvmirror check` names the damaged block and exits
 * non-zero; served again, reads of the damaged range fail with EIO (never wrong data)
 * while other data still reads back.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient, NbdReplyError } from './nbd-client';
import { runCli, ServedVolume } from './harness';
import { FileBlockDevice } from '../../src/io/file-device';
import { BlockTree } from '../../src/tree/tree';

const BS = 4096;
const EIO = 5;

function unique(tag: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 8) b.writeUInt32LE(0xc0de0000 + tag, i);
  for (let i = 4; i < BS; i += 8) b.writeUInt32LE((Math.imul(i, 2654435761) + tag) >>> 0, i);
  return b;
}

/** pba of the first 4 KiB block in the file equal to `content`. */
function findBlock(file: string, content: Buffer): number {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const chunk = Buffer.alloc(1024 * 1024);
    for (let pos = 0; pos < size; pos += chunk.length) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, pos);
      for (let at = 0; at + BS <= n; at += BS) {
        if (chunk.compare(content, 0, BS, at, at + BS) === 0) return (pos + at) / BS;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  throw new Error('block not found in the member');
}

function flipByte(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0] = (b[0]! ^ 0x5a) & 0xff;
    fs.writeSync(fd, b, 0, 1, offset);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function expectEio(c: NbdClient, offset: number, length: number): Promise<void> {
  await assert.rejects(c.read(offset, length), (e: unknown) => e instanceof NbdReplyError && e.errno === EIO);
}

describe('crash: corruption of a closed volume', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-corrupt-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('a flipped byte in a data block or an address block: check names it, reads EIO, other data fine', async () => {
    const dir = path.join(tmp, 'vol');
    const sock = path.join(tmp, 's');
    const member = path.join(dir, 'member-0.img');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    // lbns 100, 101 share an address block; lbn 5000 lives under another one.
    let server = await ServedVolume.start(dir, sock);
    let c = await NbdClient.connect(sock, '');
    await c.write(100 * BS, unique(1), false);
    await c.write(101 * BS, unique(2), false);
    await c.write(5000 * BS, unique(3), false);
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
    assert.equal((await runCli(['check', dir])).code, 0);

    // 1. Data block of lbn 100.
    const pba = findBlock(member, unique(1));
    flipByte(member, pba * BS + 1234);
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 1, chk.stdout);
    assert.match(chk.stdout, new RegExp(`problem: .*data block lbn 100 at pba ${pba}: checksum mismatch`));
    server = await ServedVolume.start(dir, sock);
    c = await NbdClient.connect(sock, '');
    await expectEio(c, 100 * BS, BS);
    await expectEio(c, 99 * BS, 3 * BS); // a read overlapping the bad block fails as a whole
    assert.deepEqual(await c.read(101 * BS, BS), unique(2));
    assert.deepEqual(await c.read(5000 * BS, BS), unique(3));
    // Overwriting the bad block heals it (a whole-block write needs no read of the old data).
    await c.write(100 * BS, unique(4), false);
    assert.deepEqual(await c.read(100 * BS, BS), unique(4));
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
    const healed = await runCli(['check', dir]);
    assert.equal(healed.code, 0, healed.stdout);

    // 2. The address block above lbns 100/101.
    const dev = await FileBlockDevice.open(member, { readOnly: true });
    const tree = await BlockTree.open(dev);
    const { path: treePath } = await tree.locate(100);
    const other = await tree.locate(5000);
    await tree.close();
    await dev.close();
    const leaf = treePath[treePath.length - 1]!;
    assert.ok(!other.path.some((p) => p.pba === leaf.pba), 'lbn 5000 must not share the address block');
    flipByte(member, leaf.pba * BS + 700);
    const chk2 = await runCli(['check', dir]);
    assert.equal(chk2.code, 1, chk2.stdout);
    assert.match(chk2.stdout, new RegExp(`problem: .*pba ${leaf.pba}`));
    server = await ServedVolume.start(dir, sock);
    c = await NbdClient.connect(sock, '');
    await expectEio(c, 100 * BS, BS);
    await expectEio(c, 101 * BS, BS);
    assert.deepEqual(await c.read(5000 * BS, BS), unique(3));
    await c.close();
    await server.stop();
  });
});
