/**
 * `nvmirror create DIR --size SIZE [--raid LEVEL --member A --member B ... [--stripe-unit SIZE]]`:
 * lays out a new volume directory (label, NVRAM, member or RAID members).
 * Warns (one line on stderr, the volume is still created) when the thin member could
 * outgrow the free space of its file system.
 */
import { Command, InvalidArgumentError } from 'commander';
import { createVolumeDir, memberSpaceWarning } from '../volume/dir';
import { formatSize } from '../util/size';
import { sizeArg } from './common';

interface CreateOpts {
  size: number;
  member: string[];
  nvram?: string;
  nvramSize?: number;
  raid?: number;
  stripeUnit?: number;
}

function raidArg(value: string): number {
  if (!/^[01456]$/.test(value)) throw new InvalidArgumentError(`expected a RAID level 0, 1, 4, 5 or 6, got "${value}"`);
  return Number(value);
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
    .option('--member <PATH>', 'member file (default DIR/member-0.img; created sparse), or with --raid an existing block device; once per member', collect, [])
    .option('--raid <LEVEL>', 'RAID level over the --member files: 0 (stripes), 1 (n-way mirror), 4 (dedicated parity), 5 (rotating parity), 6 (P+Q)', raidArg)
    .option('--stripe-unit <SIZE>', 'RAID stripe unit per member (default 64K; a multiple of 4K)', sizeArg)
    .option('--nvram <PATH>', 'NVRAM log file (default DIR/nvram.log; preallocated and zeroed)')
    .option('--nvram-size <SIZE>', 'NVRAM log size (default 32M)', sizeArg)
    .action(async (dir: string, o: CreateOpts) => {
      if (o.stripeUnit !== undefined && o.raid === undefined) throw new Error('--stripe-unit needs --raid LEVEL');
      const label = await createVolumeDir(dir, {
        sizeBytes: o.size,
        ...(o.member.length > 0 ? { members: o.member } : {}),
        ...(o.nvram !== undefined ? { nvramPath: o.nvram } : {}),
        ...(o.nvramSize !== undefined ? { nvramSizeBytes: o.nvramSize } : {}),
        ...(o.raid !== undefined ? { raid: { level: o.raid, ...(o.stripeUnit !== undefined ? { stripeUnitBytes: o.stripeUnit } : {}) } } : {}),
      });
      const raid = label.raid ? `, RAID-${label.raid.level} over ${label.members.length} members (stripe unit ${formatSize(label.raid.stripeUnitBytes)}, ${formatSize(label.members[0]!.blockCount * 4096)} each)` : '';
      process.stdout.write(`created volume ${dir}: ${formatSize(label.sizeBytes)}, uuid ${label.uuid}, NVRAM ${formatSize(label.nvram.sizeBytes)}${raid}\n`);
      const warning = await memberSpaceWarning(dir, label);
      if (warning !== undefined) process.stderr.write(`nvmirror: ${warning}\n`);
    });
}
