/**
 * `nvmirror verify DIR [--json]`: asks the process serving a mirrored volume to compare
 * the last CP both sides hold: superblocks, then every root, descending only where the
 * pointers differ (no data block is read). Exit 1 if anything differs.
 */
import * as fs from 'fs';
import * as path from 'path';
import { MIRROR_LABEL_NAME, readMirrorLabel } from '../mirror/mirror-dir';
import { isReceiveDir } from '../mirror/receive-dir';
import { RECEIVER_SOCKET_NAME } from '../mirror/receiver';
import { Command } from 'commander';
import { controlRequest, CONTROL_SOCKET_NAME } from '../volume/engine-control';
import type { VerifyReport } from '../mirror/verify';

export function registerVerify(program: Command): void {
  program
    .command('verify')
    .description('compare a mirrored volume with its mirror (the serving process asks the destination); exit 1 if they differ')
    .argument('<DIR>', 'the source volume directory (served with --mirror-to), or a mirror DIR/<source-uuid> on the destination')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      const abs = path.resolve(dir);
      const mirrorLabel = path.join(abs, MIRROR_LABEL_NAME);
      let r;
      if (fs.existsSync(mirrorLabel)) {
        // The destination side: ask the receiver running in the parent directory.
        const source = readMirrorLabel(abs).sourceUuid;
        r = await controlRequest(path.join(path.dirname(abs), RECEIVER_SOCKET_NAME), { op: 'verify', source }, 600_000).catch((e: unknown) => {
          throw new Error(`cannot reach the receiver of ${dir} (${e instanceof Error ? e.message : String(e)}): verify runs while \`nvmirror receive\` runs`);
        });
      } else {
        if (isReceiveDir(abs)) throw new Error(`${dir} is a receive directory: verify one of its mirrors, ${path.join(dir, '<source-uuid>')}`);
        r = await controlRequest(path.join(abs, CONTROL_SOCKET_NAME), { op: 'verify' }, 600_000).catch((e: unknown) => {
          throw new Error(`cannot reach the serving process of ${dir} (${e instanceof Error ? e.message : String(e)}): verify runs while the volume is served with --mirror-to`);
        });
      }
      if (!r.ok) throw new Error(r.error);
      const v = r.verify as VerifyReport;
      const same = v.rootsEqual && v.blocksDiffering === 0 && v.differences.length === 0;
      if (o.json) process.stdout.write(`${JSON.stringify({ ...v, identical: same }, null, 2)}\n`);
      else {
        for (const d of v.differences) process.stdout.write(`differs: ${d}\n`);
        process.stdout.write(same ? `identical at CP ${v.cp} (roots equal${v.superblocksEqual ? ', superblocks equal' : ''})\n` : `CP ${v.cp}: the mirror differs (${v.blocksDiffering} blocks)\n`);
      }
      if (!same) process.exitCode = 1;
    });
}
