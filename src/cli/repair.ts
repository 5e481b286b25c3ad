/**
 * `nvmirror repair DIR --recreate-nvram`: recreates a deleted or unreadable NVRAM log when
 * the tree provably holds every record it had (the last session stopped cleanly); refuses
 * otherwise. `--accept-nvram-loss`: a log damaged mid-log is opened read-write, what
 * replays is committed and the lost records are dropped (the operator's explicit choice).
 * `--rebuild-label`: a lost or damaged nvmirror.json is made again from the members and the
 * NVRAM log (volume/rebuild-label.ts).
 * Logic in volume/dir-ops.ts; a recorded mirror base stays held (mirror/base-hold.ts).
 */
import { Command } from 'commander';
import { refuseMirrorSide } from './common';
import * as path from 'path';
import { acceptNvramLoss, recreateNvram } from '../volume/dir-ops';
import { keepBaseWithoutMirror } from '../mirror/base-hold';
import { log } from '../util/log';
import { formatSize } from '../util/size';
import { LABEL_NAME } from '../volume/label';
import { rebuildLabel } from '../volume/rebuild-label';

export function registerRepair(program: Command): void {
  program
    .command('repair')
    .description('repair a volume directory that is not being served')
    .argument('<DIR>', 'the volume directory')
    .option('--recreate-nvram', 'recreate a deleted or unreadable NVRAM log; refused unless the last session stopped cleanly (the tree holds every write)')
    .option('--accept-nvram-loss', 'open a volume whose NVRAM log is damaged mid-log: commit what replays and drop the lost records for good (salvage first with serve --read-only)')
    .option('--rebuild-label', `make a lost or damaged ${LABEL_NAME} again from what the member(s) and the NVRAM log say of themselves (the damaged one is kept)`)
    .option('--member <PATH>', 'with --rebuild-label: a member, once per member in order (default: the files in DIR with a RAID label, else DIR/member-0.img)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--nvram <PATH>', 'with --rebuild-label: the NVRAM log (default DIR/nvram.log)')
    .action(async (dir: string, o: { recreateNvram?: boolean; acceptNvramLoss?: boolean; rebuildLabel?: boolean; member: string[]; nvram?: string }) => {
      const modes = [o.recreateNvram, o.acceptNvramLoss, o.rebuildLabel].filter((x) => x === true).length;
      if (modes !== 1) throw new Error('give one of --recreate-nvram, --accept-nvram-loss or --rebuild-label');
      if (o.rebuildLabel !== true && (o.member.length > 0 || o.nvram !== undefined)) throw new Error('--member and --nvram go with --rebuild-label');
      refuseMirrorSide(dir, 'its log is the source\'s records and it has no NVRAM to repair (nvmirror check finds damaged blocks and fetches them from the source)');
      if (o.rebuildLabel === true) {
        const r = await rebuildLabel(dir, { ...(o.member.length > 0 ? { members: o.member } : {}), ...(o.nvram !== undefined ? { nvram: o.nvram } : {}) });
        const l = r.label;
        const lines = [
          `rebuilt ${path.join(path.resolve(dir), LABEL_NAME)}: volume ${l.uuid}, ${formatSize(l.sizeBytes)}, ${l.raid ? `RAID-${l.raid.level} over ${l.members.length} members (stripe unit ${formatSize(l.raid.stripeUnitBytes)})` : `member ${l.members[0]!.path}`}, NVRAM ${l.nvram.path} (${formatSize(l.nvram.sizeBytes)}); the tree is at CP ${r.cpNumber}`,
          ...(r.movedAside ? [`the damaged label is kept as ${r.movedAside}`] : []),
          ...r.notes.map((n) => `note: ${n}`),
          `next: nvmirror check ${dir}`,
        ];
        process.stdout.write(lines.join('\n') + '\n');
        return;
      }
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
