/**
 * `nvmirror receive DIR` through the real CLI: one receiver per directory (a second one is
 * refused with the first's pid, and the first keeps answering on its control socket), and
 * a directory that is a volume or a mirror is refused with one line, nothing written in it.
 */
import { strict as assert } from 'assert';
import { spawn, type ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { BIN, runCli } from '../crash/harness';
import { NODE_FLAGS } from '../../src/cli/node-flags';
import { RECEIVE_LOCK_NAME } from '../../src/mirror/receive-dir';
import { RECEIVER_SOCKET_NAME } from '../../src/mirror/receiver';
import { until } from '../mirror/helpers';

function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n').filter((l) => !l.startsWith('(run with'));
  assert.equal(lines.length, 1, `not one line: ${stderr}`);
  return lines[0]!;
}

describe('receive DIR: one receiver per directory, and only a receive directory', function () {
  this.timeout(60_000);
  let tmp: string;
  const children: ChildProcess[] = [];

  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-receive-dir-'));
  });
  after(() => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function startReceiver(dir: string): Promise<ChildProcess> {
    const c = spawn(process.execPath, [...NODE_FLAGS, BIN, 'receive', dir, '--listen', '127.0.0.1:0', '--mirror-insecure'], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(c);
    await until('the receiver\'s control socket', () => fs.existsSync(path.join(dir, RECEIVER_SOCKET_NAME)) || c.exitCode !== null, 30_000);
    assert.equal(c.exitCode, null, 'the receiver exited');
    return c;
  }

  async function stop(c: ChildProcess): Promise<void> {
    const done = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    await done;
  }

  it('a second receive on the same DIR is refused naming the first, which keeps answering; once it stops, DIR can be received into again', async () => {
    const dir = path.join(tmp, 'rx');
    const first = await startReceiver(dir);
    assert.equal(fs.readFileSync(path.join(dir, RECEIVE_LOCK_NAME), 'utf8'), `${first.pid}\n`, 'the lock names its holder');
    const second = await runCli(['receive', dir, '--listen', '127.0.0.1:0', '--mirror-insecure'], 30_000);
    assert.notEqual(second.code, 0, 'a second receiver on the same directory started');
    assert.match(oneLine(second.stderr), new RegExp(`^nvmirror: receive directory ${dir} is already in use by another process \\(pid ${first.pid}\\)$`));
    // The first one's control socket is still its own.
    const st = await runCli(['status', dir, '--json']);
    assert.equal(st.code, 0, st.stderr);
    assert.equal((JSON.parse(st.stdout) as { pid?: number }).pid, first.pid, st.stdout);
    await stop(first);
    // Stopped: still a receive directory (its lock file), with no receiver running.
    const idle = await runCli(['status', dir]);
    assert.equal(idle.code, 0, idle.stderr);
    assert.match(idle.stdout, new RegExp(`^receiver +${dir}: no receiver running$`, 'm'), idle.stdout);
    const third = await startReceiver(dir);
    await stop(third);
  });

  it('a volume directory or a mirror directory is refused with one line, and nothing is written in it; serve of a mirror or a receive directory says what it is', async () => {
    const vol = path.join(tmp, 'vol');
    assert.equal((await runCli(['create', vol, '--size', '16M', '--nvram-size', '1M'])).code, 0);
    const before = fs.readdirSync(vol).sort();
    const r = await runCli(['receive', vol, '--listen', '127.0.0.1:0', '--mirror-insecure']);
    assert.notEqual(r.code, 0, 'receive into a volume directory started');
    assert.match(oneLine(r.stderr), /is a volume directory \(nvmirror\.json\): a receive directory is a directory of its own/);
    assert.deepEqual(fs.readdirSync(vol).sort(), before, 'receive wrote into the volume directory');

    const mirror = path.join(tmp, 'rx2', '0d0d0d0d-4567-49ef-8011-223344556677');
    fs.mkdirSync(mirror, { recursive: true });
    fs.writeFileSync(path.join(mirror, 'mirror.json'), '{}\n');
    const m = await runCli(['receive', mirror, '--listen', '127.0.0.1:0', '--mirror-insecure']);
    assert.notEqual(m.code, 0, 'receive into a mirror directory started');
    assert.match(oneLine(m.stderr), new RegExp(`is a mirror directory \\(mirror\\.json\\): give the directory that holds it, ${path.dirname(mirror)}$`));
    assert.deepEqual(fs.readdirSync(mirror), ['mirror.json']);

    // Neither is a volume either: serve says what each is and what reads it.
    const sm = await runCli(['serve', mirror, '--socket', path.join(tmp, 'm.sock')]);
    assert.notEqual(sm.code, 0, 'serve of a mirror directory started');
    assert.match(oneLine(sm.stderr), new RegExp(`is a mirror \\(mirror\\.json\\), not a volume: read it through its receiver's exports .*nvmirror promote ${mirror}$`));
    const rxDir = path.join(tmp, 'rx3');
    await stop(await startReceiver(rxDir));
    const sr = await runCli(['serve', rxDir, '--socket', path.join(tmp, 'r.sock')]);
    assert.notEqual(sr.code, 0, 'serve of a receive directory started');
    assert.match(oneLine(sr.stderr), /is a receive directory \(receiver\.lock\), not a volume: its mirrors are .*rx3\/<source-uuid>$/);

    // The other volume commands say the same, each with its own hint; verify and promote
    // of the receive directory name where its mirrors are.
    const onMirror: Array<[string[], RegExp]> = [
      [['snapshot', 'create', mirror, 's1'], /snapshots of a mirror are taken on its source/],
      [['snapshot', 'list', mirror], /snapshots of a mirror are taken on its source/],
      [['repair', mirror, '--recreate-nvram'], /no NVRAM to repair/],
      [['replace-member', mirror, '0', path.join(tmp, 'new-member')], /replace-member rebuilds the RAID members of volumes/],
    ];
    for (const [args, hint] of onMirror) {
      const r = await runCli(args);
      assert.notEqual(r.code, 0, `${args.join(' ')} succeeded`);
      const line = oneLine(r.stderr);
      assert.match(line, /is a mirror \(mirror\.json\), not a volume: /, args.join(' '));
      assert.match(line, hint, args.join(' '));
    }
    assert.deepEqual(fs.readdirSync(mirror), ['mirror.json'], 'a command wrote into the mirror directory');
    const v = await runCli(['verify', rxDir]);
    assert.match(oneLine(v.stderr), /is a receive directory: verify one of its mirrors, .*rx3\/<source-uuid>$/);
    const p = await runCli(['promote', rxDir]);
    assert.match(oneLine(p.stderr), /is a receive directory: promote one of its mirrors, .*rx3\/<source-uuid> \(it holds none\)$/);

    // A mirror whose label is damaged is named as such, with the file and what is wrong, by
    // every command (status listed nothing for it, and called the mirror "not an nvmirror
    // volume directory"; the receiver refused its source with a bare JSON parser message).
    const rx4 = path.join(tmp, 'rx4');
    const damaged = path.join(rx4, '0e0e0e0e-4567-49ef-8011-223344556677');
    fs.mkdirSync(damaged, { recursive: true });
    fs.writeFileSync(path.join(damaged, 'mirror.json'), '{"format":"nvmirror-mirror","vers');
    const want = `${damaged}/mirror.json: the mirror's label cannot be read: not valid JSON`;
    for (const d of [rx4, damaged]) {
      const st = await runCli(['status', d]);
      assert.equal(st.code, 0, st.stderr);
      assert.ok(st.stdout.includes(`mirror     ${path.basename(damaged)}: DAMAGED: ${want}`), st.stdout);
    }
    for (const args of [['check', damaged], ['verify', damaged], ['promote', damaged]]) {
      const r = await runCli(args);
      assert.notEqual(r.code, 0, args.join(' '));
      assert.ok(oneLine(r.stderr).startsWith(`nvmirror: ${want}`), `${args.join(' ')}: ${r.stderr}`);
    }
    fs.writeFileSync(path.join(damaged, 'mirror.json'), '{"format":"nvmirror-mirror","version":1}\n');
    const unlabelled = path.join(rx4, '0e0e0e0f-4567-49ef-8011-223344556677');
    fs.mkdirSync(unlabelled);
    fs.writeFileSync(path.join(unlabelled, 'member-0.img'), '');
    const st = await runCli(['status', rx4]);
    assert.ok(st.stdout.includes(`DAMAGED: ${damaged}/mirror.json: not a mirror's label: it names no source uuid`), st.stdout);
    assert.ok(st.stdout.includes(`mirror     ${path.basename(unlabelled)}: DAMAGED: mirror.json is missing beside member-0.img: the source's next connection makes it again if the member holds its committed CPs (else a new mirror)`), st.stdout);

    const file = path.join(tmp, 'a-file');
    fs.writeFileSync(file, '');
    const f = await runCli(['receive', path.join(file, 'x'), '--listen', '127.0.0.1:0', '--mirror-insecure']);
    assert.notEqual(f.code, 0);
    assert.match(oneLine(f.stderr), /cannot make the receive directory .*a-file\/x: ENOTDIR$/);
  });
});
