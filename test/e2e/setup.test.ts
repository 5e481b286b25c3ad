/**
 * The README's first command leaves `nvmirror` on the PATH: `npm start` runs
 * scripts/link-bin.sh first (npm link), which links this checkout's bin/nvmirror, or
 * says in one line how to use it where the global prefix is not writable.
 */
import { strict as assert } from 'assert';
import * as cp from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

const ROOT = path.resolve(__dirname, '../../..');

describe('set-up: nvmirror on the PATH', function () {
  this.timeout(60_000);

  it('npm start links nvmirror onto the PATH (or names the binary to use)', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    assert.match(pkg.scripts.prestart ?? '', /link-bin\.sh/, 'npm start does not put nvmirror on the PATH first');
    const out = cp.execFileSync('bash', [path.join(ROOT, 'scripts/link-bin.sh')], { encoding: 'utf8' });
    const found = cp.spawnSync('bash', ['-c', 'command -v nvmirror'], { encoding: 'utf8' }).stdout.trim();
    if (found !== '' && fs.realpathSync(found) === fs.realpathSync(path.join(ROOT, 'bin/nvmirror'))) {
      assert.match(cp.execFileSync('nvmirror', ['--version'], { encoding: 'utf8' }), /^\d+\.\d+\.\d+/);
      return;
    }
    // Without a writable global prefix (not in CI, where we are root), the script must say what to run instead.
    assert.notEqual(process.env.CI, 'true', `in CI nvmirror must be on the PATH; link-bin said: ${out}`);
    assert.match(out, new RegExp(`${path.join(ROOT, 'bin')}`));
  });
});
