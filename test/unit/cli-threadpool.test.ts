/**
 * The CLI sizes libuv's thread pool (src/cli/threadpool.ts) before anything uses it: 16
 * blocking jobs run at once, not 4 (libuv's default), so the receiver's 16 device writes
 * in flight all reach the disk; `serve` and `attach` get one thread per CPU (2 to 16), so
 * a CP's I/O does not crowd out the threads that answer clients.
 *
 * How it is seen from outside: a child loads the CLI's modules, then starts 16 reads
 * that block on 16 FIFOs (each read is a pool job that waits until its FIFO has data) and
 * feeds only the last FIFO. That read can only finish if it was running, i.e. if the
 * pool has a 16th thread; with 4 threads it waits behind the first four forever (the
 * child then reports "stuck" after its own deadline). The control runs the same child
 * with UV_THREADPOOL_SIZE=4 set by the operator (kept) and expects "stuck".
 */
import { strict as assert } from 'assert';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

const CHILD = `
const fs = require('fs');
const path = require('path');
require(process.argv[1]); // src/cli/threadpool.js, as main.js loads it first
const dir = process.argv[process.argv.length - 1]; // after the command, if any (argv[2], as the CLI's)
const n = 16;
const fds = [];
for (let i = 0; i < n; i++) fds.push(fs.openSync(path.join(dir, 'f' + i), 'r+')); // O_RDWR: a FIFO opens without a peer
let done = false;
for (let i = 0; i < n; i++) {
  fs.read(fds[i], Buffer.alloc(1), 0, 1, null, (err) => {
    if (i === n - 1 && !done) { done = true; console.log(err ? 'error ' + err.message : 'ran'); finish(); }
  });
}
// Give the pool a moment to take the 16 jobs, then feed the last FIFO only.
setTimeout(() => fs.writeSync(fds[n - 1], 'x'), 100);
const deadline = setTimeout(() => { if (!done) { done = true; console.log('stuck'); finish(); } }, 5000);
function finish() {
  clearTimeout(deadline);
  for (let i = 0; i < n - 1; i++) fs.writeSync(fds[i], 'x'); // let the other reads end
  setTimeout(() => process.exit(0), 50);
}
`;

/** `command`: what the child's argv says after the script (threadpool.ts sizes the pool by it). */
function run(env: NodeJS.ProcessEnv, command: string[] = []): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-pool-'));
  try {
    for (let i = 0; i < 16; i++) {
      const r = spawnSync('mkfifo', [path.join(dir, `f${i}`)]);
      assert.equal(r.status, 0, `mkfifo: ${String(r.stderr)}`);
    }
    // The module main.js loads first (the third test checks that it does): main.js itself would run a command.
    const entry = path.resolve(__dirname, '..', '..', 'src', 'cli', 'threadpool.js');
    const r = spawnSync(process.execPath, ['-e', CHILD, entry, ...command, dir], { env, encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 0, `child failed: ${r.stderr}`);
    return r.stdout.trim();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe('cli: libuv thread pool size', function () {
  this.timeout(60_000);

  it('runs 16 blocking jobs at once', () => {
    const env = { ...process.env };
    delete env.UV_THREADPOOL_SIZE;
    assert.equal(run(env), 'ran');
  });

  it("keeps the operator's UV_THREADPOOL_SIZE (4: the 16th job waits, the control)", () => {
    assert.equal(run({ ...process.env, UV_THREADPOOL_SIZE: '4' }), 'stuck');
  });

  it('serve and attach get one thread per CPU (2 to 16), every other command 16', () => {
    const { threadpoolSizeFor, THREADPOOL_THREADS_DEFAULT } = require(path.resolve(__dirname, '..', '..', 'src', 'cli', 'threadpool.js')) as typeof import('../../src/cli/threadpool');
    const argv = (...a: string[]): string[] => ['node', 'nvmirror', ...a];
    assert.equal(threadpoolSizeFor(argv('serve', 'vol'), 2), 2);
    assert.equal(threadpoolSizeFor(argv('serve', '--memory', '1G'), 1), 2, 'at least 2');
    assert.equal(threadpoolSizeFor(argv('attach', 'vol', '/dev/nbd0'), 8), 8);
    assert.equal(threadpoolSizeFor(argv('serve', 'vol'), 64), 16, 'at most 16');
    assert.equal(threadpoolSizeFor(argv('receive', 'rx', '--listen', 'h:1'), 2), THREADPOOL_THREADS_DEFAULT);
    assert.equal(threadpoolSizeFor(argv('check', 'vol'), 2), THREADPOOL_THREADS_DEFAULT);
    assert.equal(threadpoolSizeFor(['node', '-e'], 2), THREADPOOL_THREADS_DEFAULT, 'no command');
  });

  it('a serve process on this machine gets its share: 16 jobs do not all run unless it has 16 CPUs', function () {
    const cpus = os.availableParallelism?.() ?? os.cpus().length;
    const env = { ...process.env };
    delete env.UV_THREADPOOL_SIZE;
    assert.equal(run(env, ['serve']), cpus >= 16 ? 'ran' : 'stuck');
  });

  it('main.js loads the pool module before anything else', () => {
    const main = fs.readFileSync(path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js'), 'utf8');
    const firstRequire = /require\("([^"]+)"\)/.exec(main);
    assert.ok(firstRequire, 'main.js has no require');
    assert.equal(firstRequire[1], './threadpool');
  });
});
