/**
 * bin/nvmirror runs node with NODE_FLAGS (its shebang), and a process started through it
 * has them: the young generation is capped as node-flags.ts says.
 */
import { strict as assert } from 'assert';
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { NODE_FLAGS } from '../../src/cli/node-flags';

const BIN = path.join(__dirname, '..', '..', '..', 'bin', 'nvmirror');

describe('cli: node flags', () => {
  it("bin/nvmirror's shebang passes exactly NODE_FLAGS to node", () => {
    const first = fs.readFileSync(BIN, 'utf8').split('\n')[0]!;
    assert.equal(first, `#!/usr/bin/env -S node ${NODE_FLAGS.join(' ')}`);
  });

  it('a process started through bin/nvmirror runs with them (young generation capped at 2 x 8 MiB)', () => {
    // The probe runs `node -e` through the shebang's own interpreter line (env -S node FLAGS).
    const shebang = fs.readFileSync(BIN, 'utf8').split('\n')[0]!.slice(2).split(' ');
    const probe = "const v8=require('v8');console.log(JSON.stringify({argv:process.execArgv,newSpace:v8.getHeapSpaceStatistics().find(s=>s.space_name==='new_space').space_size}))";
    const out = JSON.parse(execFileSync(shebang[0]!, [...shebang.slice(1), '-e', probe], { encoding: 'utf8' })) as { argv: string[]; newSpace: number };
    for (const f of NODE_FLAGS) assert.ok(out.argv.includes(f), `${f} missing from ${JSON.stringify(out.argv)}`);
    assert.ok(out.newSpace <= 16 * 1024 * 1024, `new space ${out.newSpace} bytes`);
  });

  it('bin/nvmirror starts as an executable (the -S shebang works here)', () => {
    const out = execFileSync(BIN, ['--help'], { encoding: 'utf8' });
    assert.match(out, /Usage: nvmirror/);
  });
});
