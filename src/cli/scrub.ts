/**
 * `nvmirror scrub DIR [--repair] [--json]`: reads everything a RAID volume holds in use
 * (live and snapshots), verifies every block checksum and every in-use stripe's parity
 * (RAID-1: copies); with --repair rewrites what redundancy can rebuild. A served volume
 * is scrubbed by the serving process through DIR/control.sock (progress in `status`).
 * Reports like `zpool status`; exit 1 when anything is uncorrectable, or (without
 * --repair) when anything was found. A progress line on a terminal (stderr). --rate paces
 * the reads; a scrub killed in its parity pass goes on from its checkpoint when run again.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { MIRROR_LABEL_NAME, scrubMirrorDir } from '../mirror/mirror-dir';
import { scrubVolumeDir } from '../volume/scrub-dir';
import { formatScrubReport, type ScrubProgress } from '../raid/scrub';
import { ProgressLine } from '../util/progress';
import { formatSize, parseSize } from '../util/size';

export function registerScrub(program: Command): void {
  program
    .command('scrub')
    .description('verify every checksum and every in-use stripe\'s parity of a RAID volume (also while served); --repair rewrites what redundancy can rebuild')
    .argument('<DIR>', 'the volume directory, or a RAID mirror DIR/<source-uuid> (while no receiver holds it)')
    .option('--repair', 'rewrite bad blocks from parity or a mirror copy once a rebuilt version verifies, and stale parity from the data')
    .option('--rate <SIZE>', 'read at most SIZE per second on average (e.g. 50M)')
    .option('--json', 'print the report as JSON')
    .action(async (dir: string, o: { repair?: boolean; json?: boolean; rate?: string }) => {
      let rateBytesPerSec: number | undefined;
      if (o.rate !== undefined) {
        rateBytesPerSec = parseSize(o.rate);
        if (!(rateBytesPerSec > 0)) throw new Error(`--rate ${o.rate}: must be a size per second above 0 (e.g. 50M)`);
      }
      let line: ProgressLine | undefined;
      const onProgress = process.stderr.isTTY
        ? (p: ScrubProgress): void => {
            line ??= new ProgressLine(p.repair ? 'scrub (repair)' : 'scrub', p.totalBytes);
            line.update(p.scannedBytes);
          }
        : undefined;
      let r;
      try {
        const scrubOpts = { repair: o.repair === true, ...(onProgress ? { onProgress } : {}) };
        if (fs.existsSync(path.join(dir, MIRROR_LABEL_NAME))) {
          if (rateBytesPerSec !== undefined) throw new Error('--rate is for volumes; a mirror\'s scrub runs unpaced');
          r = await scrubMirrorDir(dir, scrubOpts);
        } else r = await scrubVolumeDir(dir, { ...scrubOpts, ...(rateBytesPerSec !== undefined ? { rateBytesPerSec } : {}) });
      } finally {
        line?.finish();
      }
      if (!r.ok) process.exitCode = 1;
      if (o.json) {
        process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
        return;
      }
      process.stdout.write(`${r.dir}${r.served ? ' (scrubbed by the serving process)' : ''}\n`);
      for (const l of formatScrubReport(r, formatSize)) process.stdout.write(`${l}\n`);
    });
}
