/**
 * `nvmirror create DIR --size SIZE`: lays out a new volume directory (label, NVRAM, member).
 * Warns (one line on stderr, the volume is still created) when the thin member could
 * outgrow the free space of its file system.
 */
import { Command } from 'commander';
import { createVolumeDir, memberSpaceWarning } from '../volume/dir';
import { formatSize } from '../util/size';
import { sizeArg } from './common';

interface CreateOpts {
  size: number;
  member: string[];
  nvram?: string;
  nvramSize?: number;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function registerCreate(program: Command): void {
  program
    .command('create')
    .description('create a volume directory (NVRAM log + copy-on-write block tree)')
    .argument('<DIR>', 'the volume directory (created; must be empty if it exists)')
    .requiredOption('--size <SIZE>', 'volume size (K/M/G/T suffixes; a multiple of 4 KiB)', sizeArg)
    .option('--member <PATH>', 'member file (default DIR/member-0.img; created sparse; at most once until RAID)', collect, [])
    .option('--nvram <PATH>', 'NVRAM log file (default DIR/nvram.log; preallocated and zeroed)')
    .option('--nvram-size <SIZE>', 'NVRAM log size (default 32M)', sizeArg)
    .action(async (dir: string, o: CreateOpts) => {
      const label = await createVolumeDir(dir, {
        sizeBytes: o.size,
        ...(o.member.length > 0 ? { members: o.member } : {}),
        ...(o.nvram !== undefined ? { nvramPath: o.nvram } : {}),
        ...(o.nvramSize !== undefined ? { nvramSizeBytes: o.nvramSize } : {}),
      });
      process.stdout.write(`created volume ${dir}: ${formatSize(label.sizeBytes)}, uuid ${label.uuid}, NVRAM ${formatSize(label.nvram.sizeBytes)}\n`);
      const warning = await memberSpaceWarning(dir, label);
      if (warning !== undefined) process.stderr.write(`nvmirror: ${warning}\n`);
    });
}
