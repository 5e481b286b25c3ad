/**
 * `nvmirror create` and free space (issue 11 point 18): a thin volume whose member could
 * outgrow the free space of its file system is created with one warning line; one that
 * fits gets none.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runCli } from '../crash/harness';

const GiB = 1024 ** 3;

describe('create: free space warning', function () {
  this.timeout(60_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-space-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('create warns in one line, and still creates, when the thin member could outgrow the free space', async function () {
    const st = fs.statfsSync(tmp);
    const freeBytes = st.bavail * st.bsize;
    const sizeGiB = Math.ceil((2 * freeBytes) / GiB) + 1;
    if (sizeGiB * GiB > 2 ** 44) this.skip(); // a file system this large: no volume we may create outgrows it
    const big = await runCli(['create', path.join(tmp, 'big'), '--size', `${sizeGiB}G`, '--nvram-size', '1M']);
    assert.equal(big.code, 0, big.stderr);
    assert.match(big.stdout, /created volume/);
    const lines = big.stderr.trim().split('\n');
    assert.equal(lines.length, 1, big.stderr);
    assert.match(lines[0]!, /^nvmirror: warning: member .*member-0\.img is thin and can grow to [0-9.]+ [GT]iB, but its file system has [0-9.]+ [KMGT]?i?B free$/);
    assert.ok(fs.existsSync(path.join(tmp, 'big', 'nvmirror.json')), 'created anyway');

    const small = await runCli(['create', path.join(tmp, 'small'), '--size', '64M', '--nvram-size', '1M']);
    assert.equal(small.code, 0, small.stderr);
    assert.equal(small.stderr.trim(), '');
  });
});
