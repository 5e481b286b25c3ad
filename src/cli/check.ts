/**
 * `nvmirror check DIR`: verifies every checksum and the space accounting of the tree
 * (all roots) and the NVRAM records. Prints each problem on its own line; exit 1 if
 * there is any.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { checkVolumeDir } from '../volume/dir';
import { checkMirrorDir, MIRROR_LABEL_NAME } from '../mirror/mirror-dir';

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description('verify a volume directory that is not being served (tree checksums, space accounting, NVRAM records), or a mirror DIR/<source-uuid> (also while receiving)')
    .argument('<DIR>', 'the volume directory, or a mirror directory')
    .action(async (dir: string) => {
      const r = fs.existsSync(path.join(dir, MIRROR_LABEL_NAME)) ? await checkMirrorDir(dir) : await checkVolumeDir(dir);
      for (const n of r.notes) process.stdout.write(`${n}\n`);
      for (const p of r.problems) process.stdout.write(`problem: ${p}\n`);
      if (r.ok) {
        process.stdout.write(`${dir}: ok\n`);
      } else {
        process.stdout.write(`${dir}: ${r.problems.length} problem(s)\n`);
        process.exitCode = 1;
      }
    });
}
