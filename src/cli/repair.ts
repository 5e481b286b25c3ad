/**
 * `nvmirror repair DIR --recreate-nvram`: recreates a deleted or unreadable NVRAM log when
 * the tree provably holds every record it had (the last session stopped cleanly); refuses
 * otherwise. `--accept-nvram-loss`: a log damaged mid-log is opened read-write, what
 * replays is committed and the lost records are dropped (the operator's explicit choice).
 * Logic in volume/dir-ops.ts; a recorded mirror base stays held (mirror/base-hold.ts).
 */
import { Command } from 'commander';
import { refuseMirrorSide } from './common';
import * as path from 'path';
import { acceptNvramLoss, recreateNvram } from '../volume/dir-ops';
import { keepBaseWithoutMirror } from '../mirror/base-hold';
import { log } from '../util/log';

export function registerRepair(program: Command): void {
  program
    .command('repair')
    .description('repair a volume directory that is not being served')
    .argument('<DIR>', 'the volume directory')
    .option('--recreate-nvram', 'recreate a deleted or unreadable NVRAM log; refused unless the last session stopped cleanly (the tree holds every write)')
    .option('--accept-nvram-loss', 'open a volume whose NVRAM log is damaged mid-log: commit what replays and drop the lost records for good (salvage first with serve --read-only)')
    .action(async (dir: string, o: { recreateNvram?: boolean; acceptNvramLoss?: boolean }) => {
      if ((o.recreateNvram === true) === (o.acceptNvramLoss === true)) throw new Error('give one of --recreate-nvram or --accept-nvram-loss');
      refuseMirrorSide(dir, 'its log is the source\'s records and it has no NVRAM to repair (nvmirror check finds damaged blocks and fetches them from the source)');
      if (o.acceptNvramLoss === true) {
        const lost = await acceptNvramLoss(dir, keepBaseWithoutMirror(path.resolve(dir), log()));
        process.stdout.write(lost ? `dropped NVRAM records seq ${lost.firstLostSeq}..${lost.lastLostSeq}; the volume opens read-write again\n` : 'the NVRAM log is not damaged: nothing dropped\n');
        return;
      }
      const r = await recreateNvram(dir);
      const aside = r.movedAside ? `; the unreadable one is kept as ${r.movedAside}` : '';
      process.stdout.write(`recreated the NVRAM log ${r.nvramPath}: the tree at CP ${r.cpNumber} holds every write up to seq ${r.nvlogSeq}${aside}\n`);
    });
}
