/**
 * `nvmirror demote DIR --into RECEIVE_DIR`: the old primary becomes the mirror of the
 * volume promoted from it (failback without a full copy). Logic in mirror/demote.ts.
 */
import { Command, Option } from 'commander';
import { demoteVolume } from '../mirror/demote';
import { createLogger } from '../util/log';
import { logLevelArg } from './common';

export function registerDemote(program: Command): void {
  program
    .command('demote')
    .description('make an old primary (back after a failover) the mirror of the volume promoted from it; its own state is kept in DIR/pre-failback-cp<N>/')
    .argument('<DIR>', 'the old primary\'s volume directory (not served)')
    .requiredOption('--into <RECEIVE_DIR>', 'the receive directory that will hold it as RECEIVE_DIR/<uuid> (then run nvmirror receive RECEIVE_DIR)')
    .option('--discard-my-changes', 'required: this side\'s writes after the CP both sides hold are discarded on the member (after being kept in DIR/pre-failback-cp<N>/)')
    .option('--json', 'print the result as JSON')
    .addOption(new Option('--log-level <LEVEL>', 'log level').default('warn').argParser(logLevelArg))
    .action(async (dir: string, o: { into: string; discardMyChanges?: boolean; json?: boolean; logLevel: string }) => {
      if (o.discardMyChanges !== true) {
        throw new Error(`demote discards what ${dir} wrote after the CP both sides hold (it keeps a copy first): say so with --discard-my-changes`);
      }
      const r = await demoteVolume(dir, o.into, { logger: createLogger(o.logLevel) });
      if (o.json === true) {
        process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
        return;
      }
      process.stdout.write(
        `demoted ${r.dir} (at CP ${r.cpNumber}): its member is now the mirror ${r.mirrorDir}\n` +
          `  everything it held is kept in ${r.keptIn} (a volume: nvmirror serve ${r.keptIn} --read-only)\n` +
          `  next: nvmirror receive ${o.into} --listen HOST:PORT ..., then on the promoted volume: nvmirror serve DIR --mirror-to HOST:PORT\n` +
          `  on that connection this member rolls back to the CP both sides hold and only what changed since travels\n`,
      );
    });
}
