/**
 * `nvmirror replace-member DIR OLD NEW [--rate R]`: rebuilds RAID member OLD (its path as
 * the volume label lists it, or its index) onto the new file NEW, only the stripes in
 * use, then puts NEW in its place. A served volume is rebuilt by the serving process
 * (through DIR/control.sock) while clients go on; `status` shows the progress. Resumes an
 * interrupted run (run the same command again; a serving process resumes by itself). A
 * progress line on a terminal (stderr).
 */
import { Command } from 'commander';
import { refuseMirrorSide } from './common';
import { replaceMemberDir, type ReplaceProgress } from '../volume/replace-member';
import { parseRate } from '../util/rate';
import { ProgressLine } from '../util/progress';
import { formatSize, parseSize } from '../util/size';

export function registerReplaceMember(program: Command): void {
  program
    .command('replace-member')
    .description('rebuild a RAID member onto a new file from the others (only the stripes in use) and put it in the old one\'s place; also while served; resumes an interrupted run')
    .argument('<DIR>', 'the volume directory')
    .argument('<OLD>', 'the member to replace: its path as nvmirror.json lists it, or its index')
    .argument('<NEW>', 'the new member file (created; must not exist)')
    .option('--rate <SIZE>', 'rebuild at most this much per second (e.g. 50M)')
    .option('--json', 'print the result as JSON')
    .action(async (dir: string, oldArg: string, newArg: string, o: { rate?: string; json?: boolean }) => {
      refuseMirrorSide(dir, 'replace-member rebuilds the RAID members of volumes');
      const rate = o.rate !== undefined ? parseRate(o.rate, parseSize) : undefined;
      let line: ProgressLine | undefined;
      const onProgress = process.stderr.isTTY
        ? (p: ReplaceProgress): void => {
            line ??= new ProgressLine('rebuilding', p.totalBytes);
            line.update(p.doneBytes);
          }
        : undefined;
      try {
        const r = await replaceMemberDir(dir, oldArg, newArg, { ...(onProgress ? { onProgress } : {}), ...(rate !== undefined ? { rateBytesPerSec: rate } : {}) });
        if (o.json) {
          process.stdout.write(`${JSON.stringify(r)}\n`);
          return;
        }
        process.stdout.write(`member ${r.index}: ${r.old} replaced by ${r.new}${r.served ? ' (by the serving process)' : ''}: ${r.stripesRebuilt} stripes rebuilt${r.resumedAt > 0 ? ` (resumed at stripe ${r.resumedAt})` : ''}, ${formatSize(r.bytesWritten)} written in ${(r.durationMs / 1000).toFixed(1)} s\n`);
      } finally {
        line?.finish();
      }
    });
}
