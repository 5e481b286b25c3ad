/**
 * `nvmirror status DIR` as a health view (issue 11 point 16), through the real CLI and a
 * real serving process: who serves the volume (pid, URI, exports, clients), the
 * `errors:` line, and a checksum EIO served to a client counted there (text and --json).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient, NbdReplyError } from '../crash/nbd-client';
import { runCli, ServedVolume } from '../crash/harness';

const BS = 4096;
const EIO = 5;

interface HealthJson {
  served: boolean;
  cpNumber: number;
  lastCpMs: number;
  server?: { pid: number; uris?: string[]; exports?: string[]; clients?: number };
  errors: { checksum: number; io: number };
}

function block(tag: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) + tag) >>> 0, i);
  return b;
}

describe('status: a health view of a served volume', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-health-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('status names the serving pid, URI, exports and clients, and counts a checksum EIO served to a client', async () => {
    const dir = path.join(tmp, 'v');
    const sock = path.join(tmp, 's');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    let server = await ServedVolume.start(dir, sock, ['--export', 'vol']);
    let c = await NbdClient.connect(sock, 'vol');
    await c.write(100 * BS, block(1), false);
    await c.write(200 * BS, block(2), false);

    const st = await runCli(['status', dir, '--json']);
    assert.equal(st.code, 0, st.stderr);
    const s = JSON.parse(st.stdout) as HealthJson;
    assert.equal(s.server?.pid, server.pid);
    assert.ok(s.server?.uris?.some((u) => u.includes(`socket=${sock}`)), JSON.stringify(s.server));
    assert.deepEqual(s.server?.exports, ['vol']);
    assert.equal(s.server?.clients, 1);
    assert.deepEqual(s.errors, { checksum: 0, io: 0, repaired: 0 });
    const human = await runCli(['status', dir]);
    assert.match(human.stdout, new RegExp(`served\\s+yes, by pid ${server.pid}`));
    assert.match(human.stdout, /exports\s+vol\n/);
    assert.match(human.stdout, /clients\s+1 connected/);
    assert.match(human.stdout, /^errors:\s+No known data errors$/m);
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);

    // Corrupt lbn 100's data block on disk, serve again, read it: an EIO to the client.
    const member = path.join(dir, 'member-0.img');
    const image = fs.readFileSync(member);
    const at = image.indexOf(block(1));
    assert.ok(at >= 0 && at % BS === 0, 'the block is stored verbatim');
    const fd = fs.openSync(member, 'r+');
    fs.writeSync(fd, Buffer.from([image[at + 999]! ^ 0xff]), 0, 1, at + 999);
    fs.closeSync(fd);
    server = await ServedVolume.start(dir, sock, ['--export', 'vol']);
    try {
      c = await NbdClient.connect(sock, 'vol');
      await assert.rejects(c.read(100 * BS, BS), (e: unknown) => e instanceof NbdReplyError && e.errno === EIO);
      assert.deepEqual(await c.read(200 * BS, BS), block(2));
      await c.close();
      const j = JSON.parse((await runCli(['status', dir, '--json'])).stdout) as HealthJson;
      assert.deepEqual(j.errors, { checksum: 1, io: 0, repaired: 0 });
      assert.equal(j.server?.pid, server.pid);
      assert.ok(j.cpNumber >= 1 && j.lastCpMs > 0, 'last CP reported');
      const h = await runCli(['status', dir]);
      assert.equal(h.code, 0, h.stderr);
      assert.match(h.stdout, /^errors:\s+1 checksum error\(s\), 0 I\/O error\(s\) since the volume was opened/m);
      assert.match(h.stdout, /CPs\s+\d+, last at /);
    } finally {
      assert.equal(await server.stop(), 0, server.stderr);
    }
    // Not served: no server, and the errors line says what it covers.
    const idle = await runCli(['status', dir]);
    assert.match(idle.stdout, /served\s+no/);
    assert.match(idle.stdout, /^errors:\s+No known data errors \(by this status/m);
    assert.equal((JSON.parse((await runCli(['status', dir, '--json'])).stdout) as HealthJson).server, undefined);
  });
});
