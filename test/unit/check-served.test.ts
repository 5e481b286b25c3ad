/**
 * `nvmirror check DIR` while the volume is served (issue 11 point 17): the serving process
 * checks its committed roots through DIR/control.sock while a client keeps writing and CPs
 * run; a block corrupted on disk under the served volume is named; `--json`; a progress
 * line on a terminal (through `script`, which gives the command a pty).
 */
import { strict as assert } from 'assert';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from '../crash/nbd-client';
import { BIN, runCli, ServedVolume } from '../crash/harness';

const BS = 4096;

interface CheckJson {
  dir: string;
  ok: boolean;
  problems: string[];
  notes: string[];
  servedBy?: number;
}

function block(tag: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE((Math.imul(i + 7, 2246822519) + tag) >>> 0, i);
  return b;
}

describe('check: a served volume, through its serving process', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-chk-served-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('check of a served volume runs in the serving process during writes and CPs, names a corrupted block, and prints JSON', async () => {
    const dir = path.join(tmp, 'v');
    const sock = path.join(tmp, 's');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    const server = await ServedVolume.start(dir, sock, ['--cp-interval', '50ms']);
    try {
      const c = await NbdClient.connect(sock, '');
      const big = Buffer.alloc(4 * 1024 * 1024);
      for (let i = 0; i < big.length; i += BS) block(i / BS + 100).copy(big, i);
      await c.write(8 * 1024 * 1024, big, false);
      await c.write(300 * BS, block(1), false);
      assert.equal((await runCli(['snapshot', 'create', dir, 's1'])).code, 0); // a CP, and a second root to check

      // Writes (and CPs every 50 ms) go on while the check runs.
      let writing = true;
      let writes = 0;
      const writer = (async () => {
        while (writing) {
          await c.write((1000 + (writes % 2000)) * BS, block(writes), false);
          writes++;
        }
      })();
      const chk = await runCli(['check', dir]);
      const js = await runCli(['check', dir, '--json']);
      writing = false;
      await writer;
      assert.equal(chk.code, 0, `${chk.stdout}${chk.stderr}`);
      assert.match(chk.stdout, new RegExp(`served by pid ${server.pid}`));
      assert.match(chk.stdout, /tree: CP \d+, \d+ blocks reachable, \d+ accounted, 1 snapshot\(s\)/);
      assert.match(chk.stdout, /: ok$/m);
      assert.equal(js.code, 0, js.stderr);
      const j = JSON.parse(js.stdout) as CheckJson;
      assert.equal(j.ok, true);
      assert.equal(j.servedBy, server.pid);
      assert.deepEqual(j.problems, []);
      assert.ok(writes > 0, 'the client wrote during the checks');

      // On a terminal: a progress line on stderr ending at 100%.
      const script = spawnSync('script', ['--version'], { encoding: 'utf8' });
      if (script.status === 0) {
        const tty = spawnSync('script', ['-qec', `${process.execPath} ${BIN} check ${dir}`, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
        assert.equal(tty.status, 0, tty.stdout);
        assert.match(tty.stdout, /checking: [0-9.]+ [KMG]?i?B of ~[0-9.]+ [KMG]?i?B \(100%\)/);
        assert.match(tty.stdout, /: ok/);
      }

      // A committed data block corrupted on disk under the served volume is named.
      const member = path.join(dir, 'member-0.img');
      const image = fs.readFileSync(member);
      const at = image.indexOf(block(1));
      assert.ok(at >= 0 && at % BS === 0, 'the block is stored verbatim');
      const fd = fs.openSync(member, 'r+');
      fs.writeSync(fd, Buffer.from([image[at + 77]! ^ 0xff]), 0, 1, at + 77);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      const bad = await runCli(['check', dir, '--json']);
      assert.equal(bad.code, 1, bad.stdout);
      const b = JSON.parse(bad.stdout) as CheckJson;
      assert.equal(b.ok, false);
      assert.ok(b.problems.some((p) => new RegExp(`data block lbn 300 at pba ${at / BS}: checksum mismatch`).test(p)), b.problems.join('\n'));
      await c.close();
    } finally {
      assert.equal(await server.stop(), 0, server.stderr);
    }
  });
});
