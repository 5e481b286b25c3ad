/**
 * `nvmirror promote DIR/<source-uuid>`: the mirror becomes a primary volume (replays the
 * source's log onto its committed CP, commits; then `serve` opens it). Logic in
 * mirror/promote.ts.
 */
import { Command, Option } from 'commander';
import { promoteMirror } from '../mirror/promote';
import { createLogger } from '../util/log';
import { logLevelArg } from './common';

export function registerPromote(program: Command): void {
  program
    .command('promote')
    .description('turn a mirror (DIR/<source-uuid> on the destination) into a primary volume: replay its log, commit, serve it')
    .argument('<DIR>', 'the mirror directory (DIR/<source-uuid> of a receive directory)')
    .option('--force', 'promote even while the source is connected (its stream is cut off; its later writes are refused as split brain)')
    .option('--accept-log-loss', 'promote although the mirror\'s log is damaged before its durable mark: replay up to the damage and lose the acknowledged records from it on (said in the result)')
    .option('--json', 'print the result as JSON')
    .addOption(new Option('--log-level <LEVEL>', 'log level').default('warn').argParser(logLevelArg))
    .action(async (dir: string, o: { force?: boolean; acceptLogLoss?: boolean; json?: boolean; logLevel: string }) => {
      const r = await promoteMirror(dir, { force: o.force === true, acceptLogLoss: o.acceptLogLoss === true, logger: createLogger(o.logLevel) });
      if (o.json === true) {
        process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
        return;
      }
      process.stdout.write(
        `promoted ${r.dir}: it is a primary volume now (role: primary)\n` +
          `  base: CP ${r.promotedFromCp} (the last CP both sides hold), kept as snapshot ${r.baseSnapshot}\n` +
          `  replayed: ${r.recordsReplayed} record(s), ${r.bytesReplayed} bytes, last seq ${r.lastSeq}; ${r.replayEnd}\n` +
          `  now at CP ${r.cpNumber}; serve it with: nvmirror serve ${r.dir}\n`,
      );
    });
}
