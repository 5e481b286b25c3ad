/**
 * The README's claims match the code (issue 11 point 18): its docs/ links exist, the NVRAM
 * default and the member size of a 1 GiB volume are the code's figures, and `--member`
 * is refused a second time, as it says.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { memberBlocksFor, NVRAM_DEFAULT_BYTES } from '../../src/volume/dir';
import { formatSize } from '../../src/util/size';
import { runCli } from '../crash/harness';

const ROOT = path.join(__dirname, '..', '..', '..');
const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');

describe('README: claims match the code', function () {
  this.timeout(30_000);

  it('README links only docs/ files that exist', () => {
    const links = [...new Set([...README.matchAll(/docs\/[A-Za-z0-9_.-]+\.md/g)].map((m) => m[0]))];
    assert.ok(links.length > 0);
    for (const l of links) assert.ok(fs.existsSync(path.join(ROOT, l)), `README links ${l}, which does not exist`);
  });

  it('README gives the NVRAM default and the member size of a 1 GiB volume as the code computes them', () => {
    assert.match(README, new RegExp(`--nvram-size\` defaults to ${NVRAM_DEFAULT_BYTES / 2 ** 20} MiB`));
    const memberBytes = memberBlocksFor(2 ** 30, NVRAM_DEFAULT_BYTES) * 4096;
    assert.equal(formatSize(memberBytes), '1.57 GiB');
    assert.match(README, /\| member size \| \| 1\.57 GiB \|/);
    const bigBytes = memberBlocksFor(100 * 2 ** 30, NVRAM_DEFAULT_BYTES) * 4096;
    assert.ok(README.includes(`a 100 GiB volume's member is\n${formatSize(bigBytes)}`), formatSize(bigBytes));
  });

  it('README says --member is given at most once without --raid, and create refuses a second one', async () => {
    assert.match(README, /`--member PATH`[^.]*without\n`--raid` give it at most once/);
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-readme-'));
    try {
      const r = await runCli(['create', path.join(tmp, 'v'), '--size', '64M', '--member', 'a.img', '--member', 'b.img']);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /2 members need a RAID level: give --raid 0\|1\|4\|5\|6 \(or one --member\)/);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
