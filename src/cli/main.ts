/**
 * nvmirror command line: commander wiring only. Each command lives in its own file
 * under src/cli/ and registers itself here; no logic beyond parsing and wiring.
 */
// First: sets the thread pool's size before any module or command can start a job on it.
import './threadpool';
// Second: lowers the event loop's priority before libuv's pool exists (its threads inherit it).
import './priority';
import { Command, CommanderError } from 'commander';
import { registerServe } from './serve';
import { registerAttach } from './attach';
import { registerDetach } from './detach';
import { registerCreate } from './create';
import { registerSnapshot } from './snapshot';
import { registerStatus } from './status';
import { registerCheck } from './check';
import { registerReceive } from './receive';
import { registerVerify } from './verify';
import { registerRepair } from './repair';
import { registerPromote } from './promote';
import { registerDemote } from './demote';
import { registerScrub } from './scrub';
import { registerReplaceMember } from './replace-member';

const program = new Command();
program
  .name('nvmirror')
  .description('A userspace block device served over NBD, with an NVRAM log, copy-on-write block tree and mirroring')
  .version('0.1.0')
  .showHelpAfterError('(run with --help for usage)')
  .exitOverride();

registerServe(program);
registerAttach(program);
registerDetach(program);
registerCreate(program);
registerSnapshot(program);
registerStatus(program);
registerCheck(program);
registerReceive(program);
registerVerify(program);
registerRepair(program);
registerPromote(program);
registerDemote(program);
registerScrub(program);
registerReplaceMember(program);

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof CommanderError) process.exit(e.exitCode === 0 ? 0 : 2);
  const msg = e instanceof Error ? e.message : String(e);
  process.stderr.write(`nvmirror: ${msg}\n`);
  process.exit(1);
});
