/**
 * A lost or damaged volume label (DIR/nvmirror.json): `nvmirror repair DIR
 * --rebuild-label` makes it again from the members' superblocks and RAID labels and the
 * NVRAM log's header. The rebuilt label equals the one `create` wrote (all but its
 * creation time), the volume checks clean and serves every acknowledged write; a readable
 * label is never replaced; a member outside DIR is named with --member, and members named
 * out of order are refused. Was: the volume could not be opened at all.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { runCli, ServedVolume } from './harness';

const BS = 4096;

function content(i: number): Buffer {
  const b = Buffer.alloc(BS, 0x30 + (i % 200));
  b.writeUInt32LE(0x1abe1000 + i, 0);
  return b;
}

/** The label without its creation time. */
function labelOf(dir: string): Record<string, unknown> {
  const l = JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as Record<string, unknown>;
  delete l.createdMs;
  return l;
}

async function writeAndStop(dir: string, sock: string, n: number): Promise<void> {
  const server = await ServedVolume.start(dir, sock);
  const c = await NbdClient.connect(sock, '');
  for (let i = 0; i < n; i++) await c.write(i * BS * 3, content(i), false);
  await c.flush();
  await c.close();
  assert.equal(await server.stop(), 0, server.stderr);
}

async function readsBack(dir: string, sock: string, n: number): Promise<void> {
  const server = await ServedVolume.start(dir, sock);
  const c = await NbdClient.connect(sock, '');
  for (let i = 0; i < n; i++) assert.ok((await c.read(i * BS * 3, BS)).equals(content(i)), `block ${i} reads back`);
  await c.close();
  assert.equal(await server.stop(), 0, server.stderr);
}

describe('crash: rebuilding a lost volume label', function () {
  this.timeout(120_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-relabel-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('one member: a damaged label is named with the way out, rebuilt equal to the original, and every write reads back', async () => {
    const dir = path.join(tmp, 'one');
    const sock = path.join(tmp, 'one.sock');
    assert.equal((await runCli(['create', dir, '--size', '32M', '--nvram-size', '1M'])).code, 0);
    await writeAndStop(dir, sock, 40);
    const want = labelOf(dir);
    const readable = await runCli(['repair', dir, '--rebuild-label']);
    assert.equal(readable.code, 1);
    assert.match(readable.stderr, /nvmirror\.json is readable: nothing to rebuild/);

    fs.writeFileSync(path.join(dir, 'nvmirror.json'), '{"format":"nvmirror-vol');
    const st = await runCli(['status', dir]);
    assert.equal(st.code, 1);
    assert.match(st.stderr, /nvmirror\.json: bad volume label \(not JSON\) \(nvmirror repair .* --rebuild-label makes it again from the members and the NVRAM log\)\n$/);
    const r = await runCli(['repair', dir, '--rebuild-label']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^rebuilt .*nvmirror\.json: volume [0-9a-f-]{36}, 32\.0 MiB, member member-0\.img, NVRAM nvram\.log \(1\.00 MiB\); the tree is at CP \d+\nthe damaged label is kept as .*nvmirror\.json\.damaged-\d+\n/);
    assert.deepEqual(labelOf(dir), want);
    assert.equal((await runCli(['check', dir])).code, 0);
    await readsBack(dir, sock, 40);

    // Gone altogether: status says the directory holds a volume's files and how to get the label back.
    fs.rmSync(path.join(dir, 'nvmirror.json'));
    const gone = await runCli(['status', dir]);
    assert.match(gone.stderr, /no nvmirror\.json; it holds a volume's files: nvmirror repair .* --rebuild-label makes the label again from them/);
    assert.equal((await runCli(['repair', dir, '--rebuild-label'])).code, 0);
    assert.deepEqual(labelOf(dir), want);
  });

  it('a truncated member is refused with the command that gives its length back; after it, check names what was lost, never zeros read back quietly', async () => {
    const dir = path.join(tmp, 'cut');
    const sock = path.join(tmp, 'cut.sock');
    assert.equal((await runCli(['create', dir, '--size', '32M', '--nvram-size', '1M'])).code, 0);
    await writeAndStop(dir, sock, 40);
    const member = path.join(dir, 'member-0.img');
    const full = fs.statSync(member).size;
    fs.truncateSync(member, 64 * 1024);
    const st = await runCli(['status', dir]);
    assert.equal(st.code, 1);
    const m = /member member-0\.img has 16 blocks, the label says (\d+): truncated\? \(`truncate -s (\d+) (\S+)` gives it its length back; whatever lay past the cut is gone, and `nvmirror check` names the blocks it held\)\n$/.exec(st.stderr);
    assert.ok(m, st.stderr);
    assert.equal(Number(m[2]), full);
    assert.equal(m[3], member);
    fs.truncateSync(m[3]!, Number(m[2]));
    const c = await runCli(['check', dir]);
    assert.equal(c.code, 1, 'the lost blocks are a problem');
    assert.match(c.stdout + c.stderr, /checksum mismatch|misdirected|bad magic|not a node/);
  });

  it('RAID-5: members found by their own labels, or named with --member (one outside DIR); out of order is refused', async () => {
    const dir = path.join(tmp, 'raid');
    const sock = path.join(tmp, 'raid.sock');
    const created = await runCli(['create', dir, '--size', '32M', '--nvram-size', '1M', '--raid', '5', '--member', 'a.img', '--member', 'b.img', '--member', 'c.img']);
    assert.equal(created.code, 0, created.stderr);
    await writeAndStop(dir, sock, 40);
    const want = labelOf(dir);
    fs.rmSync(path.join(dir, 'nvmirror.json'));
    const r = await runCli(['repair', dir, '--rebuild-label']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /RAID-5 over 3 members \(stripe unit 64\.0 KiB\)/);
    assert.deepEqual(labelOf(dir), want);

    // Member 2 moved out of DIR: found only when named.
    const away = path.join(tmp, 'c-away.img');
    fs.renameSync(path.join(dir, 'c.img'), away);
    fs.rmSync(path.join(dir, 'nvmirror.json'));
    const missing = await runCli(['repair', dir, '--rebuild-label']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /member\(s\) 2 of 3 of RAID volume [0-9a-f-]{36} are not in .*: name every member with --member, in order/);
    const swapped = await runCli(['repair', dir, '--rebuild-label', '--member', path.join(dir, 'b.img'), '--member', path.join(dir, 'a.img'), '--member', away]);
    assert.equal(swapped.code, 1);
    assert.match(swapped.stderr, /member .*b\.img is member 1 of 3, not 0 of 3: name the members in order/);
    assert.equal(fs.existsSync(path.join(dir, 'nvmirror.json')), false, 'nothing written');
    const named = await runCli(['repair', dir, '--rebuild-label', '--member', path.join(dir, 'a.img'), '--member', path.join(dir, 'b.img'), '--member', away]);
    assert.equal(named.code, 0, named.stderr);
    const l = labelOf(dir) as { members: Array<{ path: string }> };
    assert.deepEqual(l.members.map((m) => m.path), ['a.img', 'b.img', away]);
    assert.equal((await runCli(['check', dir])).code, 0);
    await readsBack(dir, sock, 40);
  });
});
