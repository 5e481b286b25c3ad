/**
 * `nvmirror snapshot create|list|delete DIR [NAME]`. On a served volume the request goes
 * to the serving process (it takes effect at the CP it triggers); otherwise the volume
 * is opened, the change committed in a CP, and the volume closed.
 */
import { Command } from 'commander';
import { refuseMirrorSide } from './common';
import * as path from 'path';
import { volumeDirSnapshot, volumeDirSnapshots } from '../volume/dir-ops';
import { keepBaseWithoutMirror } from '../mirror/base-hold';
import { log } from '../util/log';
import { formatSize } from '../util/size';

const SNAPSHOT_HINT = 'snapshots of a mirror are taken on its source (they appear here as EXPORT@NAME)';

/** A stopped mirrored volume opened to commit a snapshot keeps its mirror's CP held (mirror/base-hold.ts). */
function keepBase(dir: string): ReturnType<typeof keepBaseWithoutMirror> {
  return keepBaseWithoutMirror(path.resolve(dir), log());
}

export function registerSnapshot(program: Command): void {
  const snap = program.command('snapshot').description('create, list or delete snapshots of a volume directory');
  snap
    .command('create')
    .description('create a snapshot holding every write acknowledged before it')
    .argument('<DIR>', 'the volume directory')
    .argument('<NAME>', 'snapshot name (served read-only as EXPORT@NAME)')
    .action(async (dir: string, name: string) => {
      refuseMirrorSide(dir, SNAPSHOT_HINT);
      const r = await volumeDirSnapshot(dir, { kind: 'create', name }, undefined, keepBase(dir));
      process.stdout.write(`created snapshot ${name} at CP ${r.cpNumber}\n`);
    });
  snap
    .command('delete')
    .description('delete a snapshot (its blocks are freed unless still in use)')
    .argument('<DIR>', 'the volume directory')
    .argument('<NAME>', 'snapshot name')
    .option('--force', 'delete it although NBD clients are reading it (their connections are closed)')
    .action(async (dir: string, name: string, o: { force?: boolean }) => {
      refuseMirrorSide(dir, SNAPSHOT_HINT);
      const r = await volumeDirSnapshot(dir, { kind: 'delete', name, force: o.force === true }, undefined, keepBase(dir));
      process.stdout.write(`deleted snapshot ${name} at CP ${r.cpNumber}\n`);
    });
  snap
    .command('list')
    .description('list snapshots')
    .argument('<DIR>', 'the volume directory')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      refuseMirrorSide(dir, SNAPSHOT_HINT);
      const list = await volumeDirSnapshots(dir);
      if (o.json) {
        process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
        return;
      }
      if (list.length === 0) {
        process.stdout.write('no snapshots\n');
        return;
      }
      for (const s of list) {
        process.stdout.write(`${s.name}\tCP ${s.cpNumber}\t${new Date(s.createdMs).toISOString()}\t${formatSize(s.usedBytes)} used\n`);
      }
    });
}
