/**
 * Volume directories through the real CLI: create (and its one-line errors), serve with
 * the lock (a second serve is refused, and so is another volume naming the same member
 * file), status (served or not, --json), snapshots while
 * served (exported as NAME@SNAP and read through NBD) and while closed, and check.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from '../crash/nbd-client';
import { runCli, ServedVolume } from '../crash/harness';

/** Waits (up to 5 s) for cond. */
async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(cond(), 'timed out waiting');
}

const BS = 4096;

describe('engine CLI: create, serve lock, status, snapshot, check', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-cli-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('create lays out a directory and refuses bad arguments with one-line errors', async () => {
    const dir = path.join(tmp, 'v1');
    const ok = await runCli(['create', dir, '--size', '256M', '--nvram-size', '2M']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /created volume .*256(\.0)? MiB.*uuid [0-9a-f-]{36}, NVRAM 2\.00 MiB/);
    const label = JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { sizeBytes: number; blockSizeBytes: number; members: Array<{ path: string }> };
    assert.equal(label.sizeBytes, 256 * 1024 * 1024);
    assert.equal(label.blockSizeBytes, 4096);
    assert.equal(fs.statSync(path.join(dir, 'nvram.log')).size, 2 * 1024 * 1024);
    const member = fs.statSync(path.join(dir, 'member-0.img'));
    assert.ok(member.size > 256 * 1024 * 1024, 'member sized for data + metadata');
    assert.ok(member.blocks * 512 < 8 * 1024 * 1024, 'member is sparse');
    const cases: Array<[string[], RegExp]> = [
      [['create', dir, '--size', '1G'], /is not empty/],
      [['create', path.join(tmp, 'x1'), '--size', '1000'], /multiple of 4096/],
      [['create', path.join(tmp, 'x2'), '--size', 'lots'], /bad size/],
      [['create', path.join(tmp, 'x3'), '--size', '1G', '--nvram-size', '16K'], /NVRAM size .* too small/],
      [['create', path.join(tmp, 'x4')], /required option '--size/],
      // Too large for one device: names the largest size that fits (and creates nothing).
      [['create', path.join(tmp, 'x5'), '--size', '15T'], /^nvmirror: bad size 15\.0 TiB: with its tree and copy-on-write headroom the device would exceed 16\.0 TiB; the largest volume is \d+ MiB \(12\.\d+ TiB\)$/m],
    ];
    for (const [args, re] of cases) {
      const r = await runCli(args);
      assert.notEqual(r.code, 0, `${args.join(' ')} succeeded`);
      assert.match(r.stderr, re);
      assert.equal(r.stderr.trim().split('\n').filter((l) => !l.startsWith('(run with')).length, 1, `not one line: ${r.stderr}`);
    }
    assert.ok(!fs.existsSync(path.join(tmp, 'x5')), 'a refused create leaves nothing');
    // The size it names is accepted (thin: nothing is written).
    const largest = /the largest volume is (\d+) MiB/.exec((await runCli(['create', path.join(tmp, 'x5'), '--size', '15T'])).stderr)![1]!;
    const fits = await runCli(['create', path.join(tmp, 'x6'), '--size', `${largest}M`, '--nvram-size', '2M']);
    assert.equal(fits.code, 0, fits.stderr);
    fs.rmSync(path.join(tmp, 'x6'), { recursive: true, force: true });
  });

  it('serves with a lock, reports status, and takes snapshots while served and while closed', async () => {
    const dir = path.join(tmp, 'v2');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    const sock = path.join(tmp, 'v2.sock');
    const server = await ServedVolume.start(dir, sock, ['--export', 'vol']);
    try {
      const second = await runCli(['serve', dir, '--socket', path.join(tmp, 'other.sock')]);
      assert.notEqual(second.code, 0);
      assert.match(second.stderr, new RegExp(`volume .*v2 is already in use by another process \\(pid ${server.pid}\\)`));

      // Another volume whose label names the same member file (a copied label, a --member
      // given twice): refused by the member's own lock, one line naming the file.
      const twin = path.join(tmp, 'v2-twin');
      fs.mkdirSync(twin);
      for (const f of ['nvmirror.json', 'nvram.log']) fs.copyFileSync(path.join(dir, f), path.join(twin, f));
      const twinLabel = JSON.parse(fs.readFileSync(path.join(twin, 'nvmirror.json'), 'utf8')) as { members: Array<{ path: string }> };
      twinLabel.members[0]!.path = path.join(dir, 'member-0.img');
      fs.writeFileSync(path.join(twin, 'nvmirror.json'), JSON.stringify(twinLabel));
      const third = await runCli(['serve', twin, '--socket', path.join(tmp, 'twin.sock')]);
      assert.notEqual(third.code, 0);
      assert.match(third.stderr, new RegExp(`in use by another process: ${path.join(dir, 'member-0.img').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));

      const c = await NbdClient.connect(sock, 'vol');
      await c.write(0, Buffer.alloc(2 * BS, 0x11), false);
      const snap = await runCli(['snapshot', 'create', dir, 'before']);
      assert.equal(snap.code, 0, snap.stderr);
      await c.write(0, Buffer.alloc(2 * BS, 0x22), false);

      const st = await runCli(['status', dir, '--json']);
      assert.equal(st.code, 0, st.stderr);
      const s = JSON.parse(st.stdout) as {
        served: boolean; sizeBytes: number; snapshots: Array<{ name: string }>; cpNumber: number; nvram: { usedBytes: number };
        lastCp?: { cpNumber: number; durationMs: number; dataBlocks: number; blocksWritten: number; phases: Record<string, number> };
      };
      assert.equal(s.served, true);
      assert.equal(s.sizeBytes, 64 * 1024 * 1024);
      assert.deepEqual(s.snapshots.map((x) => x.name), ['before']);
      assert.ok(s.cpNumber >= 1);
      assert.ok(s.nvram.usedBytes > 0, 'the write after the snapshot is in the NVRAM');
      // The snapshot's CP, as the serving process committed it: its blocks and phases.
      assert.ok(s.lastCp, 'the last CP of this session is reported');
      assert.equal(s.lastCp.cpNumber, s.cpNumber);
      assert.equal(s.lastCp.dataBlocks, 2, 'the two blocks written before the snapshot');
      assert.ok(s.lastCp.blocksWritten > s.lastCp.dataBlocks);
      assert.deepEqual(Object.keys(s.lastCp.phases).sort(), ['addressMs', 'dataMs', 'prepareMs', 'sinkMs', 'spaceMapMs', 'superblockMs', 'syncMs']);
      assert.ok(Object.values(s.lastCp.phases).every((v) => Number.isFinite(v) && v >= 0));
      const human = await runCli(['status', dir]);
      assert.match(human.stdout, /served\s+yes/);
      assert.match(human.stdout, new RegExp(`CP ${s.cpNumber}: 2 data \\+ \\d+ other blocks written, \\d+ freed; prepare \\d+, address \\d+, data \\d+, space map \\d+, sync \\d+, superblock \\d+ ms`));
      assert.match(human.stdout, /snapshots\s+before \(CP \d+\)/);

      // The snapshot is an export of its own, read-only, holding the data from before.
      const cs = await NbdClient.connect(sock, 'vol@before');
      assert.deepEqual(await cs.read(0, 2 * BS), Buffer.alloc(2 * BS, 0x11));
      await assert.rejects(cs.write(0, Buffer.alloc(BS), false), /server error 1/); // EPERM
      assert.deepEqual(await c.read(0, 2 * BS), Buffer.alloc(2 * BS, 0x22));
      await cs.close();

      const dup = await runCli(['snapshot', 'create', dir, 'before']);
      assert.notEqual(dup.code, 0);
      assert.match(dup.stderr, /already exists/);
      const busy = await runCli(['check', dir]); // checked by the serving process
      assert.equal(busy.code, 0, `${busy.stdout}${busy.stderr}`);
      assert.match(busy.stdout, new RegExp(`served by pid ${server.pid}`));
      await c.close();
    } finally {
      assert.equal(await server.stop(), 0, server.stderr);
    }
    // Closed volume: snapshot ops open, commit and close it.
    assert.equal((await runCli(['snapshot', 'create', dir, 'after'])).code, 0);
    const list = await runCli(['snapshot', 'list', dir]);
    assert.match(list.stdout, /^before\tCP \d+/m);
    assert.match(list.stdout, /^after\tCP \d+/m);
    assert.equal((await runCli(['snapshot', 'delete', dir, 'before'])).code, 0);
    const st2 = JSON.parse((await runCli(['status', dir, '--json'])).stdout) as { served: boolean; snapshots: Array<{ name: string }> };
    assert.equal(st2.served, false);
    assert.deepEqual(st2.snapshots.map((x) => x.name), ['after']);
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    assert.match(chk.stdout, /ok$/m);
  });

  it('a snapshot read over NBD is not deleted under its reader unless forced; forced, the reader\'s connection is closed, never served other blocks', async () => {
    const dir = path.join(tmp, 'v3');
    assert.equal((await runCli(['create', dir, '--size', '64M', '--nvram-size', '1M'])).code, 0);
    const sock = path.join(tmp, 'v3.sock');
    const server = await ServedVolume.start(dir, sock, []);
    try {
      const c = await NbdClient.connect(sock, '');
      await c.write(0, Buffer.alloc(BS, 0x33), false);
      assert.equal((await runCli(['snapshot', 'create', dir, 's'])).code, 0);
      const reader = await NbdClient.connect(sock, '@s');
      assert.deepEqual(await reader.read(0, BS), Buffer.alloc(BS, 0x33));

      const refused = await runCli(['snapshot', 'delete', dir, 's']);
      assert.equal(refused.code, 1);
      assert.equal(refused.stderr.trim(), 'nvmirror: snapshot s is being read by 1 NBD client(s) (export "@s"): disconnect them, or delete it with --force (their connections are closed)');
      assert.match((await runCli(['snapshot', 'list', dir])).stdout, /^s\tCP \d+/m, 'still there');
      assert.deepEqual(await reader.read(0, BS), Buffer.alloc(BS, 0x33), 'the reader goes on');

      // A reader that left does not count.
      const other = await NbdClient.connect(sock, '@s');
      await other.close();

      const forced = await runCli(['snapshot', 'delete', dir, 's', '--force']);
      assert.equal(forced.code, 0, forced.stderr);
      await assert.rejects(reader.read(0, BS), 'the forced delete closed the reader\'s connection');
      assert.equal((await runCli(['snapshot', 'list', dir])).stdout.trim(), 'no snapshots');
      await until(() => server.stderr.includes('snapshot deleted with --force: the NBD connections reading it are closed'));
      await c.close();
    } finally {
      assert.equal(await server.stop(), 0, server.stderr);
    }
  });
});
