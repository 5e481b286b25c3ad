/** `nvmirror status DIR [--json]`: size, space used, snapshots, CPs, NVRAM fill, whether served. */
import { Command } from 'commander';
import { volumeDirStatus, type VolumeStatus } from '../volume/dir';
import { formatSize } from '../util/size';

function when(ms: number): string {
  return ms > 0 ? new Date(ms).toISOString() : 'never';
}

export function formatStatus(s: VolumeStatus): string {
  const snaps = s.snapshots.length === 0 ? 'none' : s.snapshots.map((x) => `${x.name} (CP ${x.cpNumber})`).join(', ');
  return [
    `volume     ${s.dir}`,
    `uuid       ${s.uuid}`,
    `size       ${formatSize(s.sizeBytes)}, ${formatSize(s.usedBytes)} used on a ${formatSize(s.deviceBytes)} member`,
    `served     ${s.served ? (s.readOnly ? 'yes (read-only)' : 'yes') : 'no'}`,
    `CPs        ${s.cpNumber}, last at ${when(s.lastCpMs)} took ${s.lastCpDurationMs} ms`,
    `NVRAM      ${formatSize(s.nvram.sizeBytes)}, ${s.nvram.fillPercent}% full (${formatSize(s.nvram.usedBytes)})` +
      (s.nvram.unreplayedRecords > 0 ? `, ${s.nvram.unreplayedRecords} records to replay at next open` : ''),
    `snapshots  ${snaps}`,
  ].join('\n');
}

export function registerStatus(program: Command): void {
  program
    .command('status')
    .description('show a volume directory: size, space used, snapshots, CPs, NVRAM fill, whether served')
    .argument('<DIR>', 'the volume directory')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      const s = await volumeDirStatus(dir);
      process.stdout.write(o.json ? `${JSON.stringify(s, null, 2)}\n` : `${formatStatus(s)}\n`);
    });
}
