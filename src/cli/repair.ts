/**
 * `nvmirror repair DIR --recreate-nvram`: recreates a deleted or unreadable NVRAM log when
 * the tree provably holds every record it had (the last session stopped cleanly); refuses
 * otherwise. Logic in volume/dir.ts (recreateNvram).
 */
import { Command } from 'commander';
import { recreateNvram } from '../volume/dir';

export function registerRepair(program: Command): void {
  program
    .command('repair')
    .description('repair a volume directory that is not being served')
    .argument('<DIR>', 'the volume directory')
    .option('--recreate-nvram', 'recreate a deleted or unreadable NVRAM log; refused unless the last session stopped cleanly (the tree holds every write)')
    .action(async (dir: string, o: { recreateNvram?: boolean }) => {
      if (o.recreateNvram !== true) throw new Error('nothing to do: give --recreate-nvram');
      const r = await recreateNvram(dir);
      const aside = r.movedAside ? `; the unreadable one is kept as ${r.movedAside}` : '';
      process.stdout.write(`recreated the NVRAM log ${r.nvramPath}: the tree at CP ${r.cpNumber} holds every write up to seq ${r.nvlogSeq}${aside}\n`);
    });
}
