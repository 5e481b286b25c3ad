/**
 * `nvmirror replace-member DIR OLD NEW` (an unserved RAID volume): rebuilds member OLD
 * (its path as the volume label lists it, or its index) onto the new file NEW, only the
 * stripes in use, then puts NEW in its place. Resumes an interrupted run (run the same
 * command again). A progress line on a terminal (stderr).
 */
import { Command } from 'commander';
import { replaceMember, type ReplaceProgress } from '../volume/replace-member';
import { ProgressLine } from '../util/progress';
import { formatSize } from '../util/size';

export function registerReplaceMember(program: Command): void {
  program
    .command('replace-member')
    .description('rebuild a RAID member onto a new file from the others (only the stripes in use) and put it in the old one\'s place; resumes an interrupted run (the volume must not be served)')
    .argument('<DIR>', 'the volume directory')
    .argument('<OLD>', 'the member to replace: its path as nvmirror.json lists it, or its index')
    .argument('<NEW>', 'the new member file (created; must not exist)')
    .action(async (dir: string, oldArg: string, newArg: string) => {
      let line: ProgressLine | undefined;
      const onProgress = process.stderr.isTTY
        ? (p: ReplaceProgress): void => {
            line ??= new ProgressLine('rebuilding', p.stripesTotal * p.unitBytes);
            line.update(p.stripesDone * p.unitBytes);
          }
        : undefined;
      try {
        const r = await replaceMember(dir, oldArg, newArg, onProgress ? { onProgress } : {});
        process.stdout.write(`member ${r.index}: ${r.old} replaced by ${r.new}: ${r.stripesRebuilt} stripes rebuilt${r.resumedAt > 0 ? ` (resumed at stripe ${r.resumedAt})` : ''}, ${formatSize(r.bytesWritten)} written in ${(r.durationMs / 1000).toFixed(1)} s\n`);
      } finally {
        line?.finish();
      }
    });
}
