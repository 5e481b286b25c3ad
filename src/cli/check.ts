/**
 * `nvmirror check DIR [--json]`: verifies every checksum and the space accounting of the
 * tree (all roots) and the NVRAM records. A served volume is checked by the serving
 * process through DIR/control.sock (its committed roots; the NVRAM is the writer's).
 * Prints each problem on its own line, or the report as JSON; exit 1 if there is any.
 * On a terminal a progress line goes to stderr.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { checkVolumeDir } from '../volume/dir-ops';
import { type CheckProgress, type DirCheckReport } from '../volume/served';
import { checkMirrorDir, MIRROR_LABEL_NAME } from '../mirror/mirror-dir';
import { ProgressLine } from '../util/progress';
import { BLOCK_SIZE_BYTES } from '../io/types';

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description('verify a volume directory (tree checksums, space accounting, NVRAM records; a served volume is checked by the serving process, on its committed roots, and a block that fails is repaired from its RAID redundancy or its mirror where they hold a good copy), or a mirror DIR/<source-uuid> (also while receiving)')
    .argument('<DIR>', 'the volume directory, or a mirror directory')
    .option('--json', 'print the report as JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      let line: ProgressLine | undefined;
      const onProgress = process.stderr.isTTY
        ? (p: CheckProgress): void => {
            line ??= new ProgressLine('checking', p.blocksTotal * BLOCK_SIZE_BYTES);
            line.update(p.blocksRead * BLOCK_SIZE_BYTES);
          }
        : undefined;
      let r: DirCheckReport;
      try {
        r = fs.existsSync(path.join(dir, MIRROR_LABEL_NAME)) ? await checkMirrorDir(dir) : await checkVolumeDir(dir, onProgress);
      } finally {
        line?.finish();
      }
      if (!r.ok) process.exitCode = 1;
      if (o.json) {
        process.stdout.write(`${JSON.stringify({ dir: path.resolve(dir), ...r }, null, 2)}\n`);
        return;
      }
      for (const n of r.notes) process.stdout.write(`${n}\n`);
      for (const p of r.problems) process.stdout.write(`problem: ${p}\n`);
      process.stdout.write(r.ok ? `${dir}: ok\n` : `${dir}: ${r.problems.length} problem(s)\n`);
    });
}
