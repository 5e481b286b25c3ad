/**
 * `nvmirror check DIR [--json]`: verifies every checksum and the space accounting of the
 * tree (all roots) and the NVRAM records. A served volume is checked by the serving
 * process through DIR/control.sock (its committed roots; the NVRAM is the writer's).
 * Prints each problem on its own line, or the report as JSON; exit 1 if there is any.
 * On a terminal a progress line goes to stderr. A mirror directory its receiver holds is
 * checked by the receiver through RECEIVE_DIR/receiver.sock (its committed CP pinned; a
 * block that fails is repaired from the source), else here, read-only.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { checkVolumeDir } from '../volume/dir-ops';
import { type CheckProgress, type DirCheckReport } from '../volume/served';
import { checkMirrorDir, MIRROR_LABEL_NAME, readMirrorLabel } from '../mirror/mirror-dir';
import { ProgressLine } from '../util/progress';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { RECEIVER_SOCKET_NAME } from '../mirror/receiver';
import { controlRequest } from '../volume/engine-control';

/** How long `check` waits for the receiver's answer (a full walk of a large mirror). */
const CHECK_ANSWER_TIMEOUT_MS = 24 * 3600 * 1000;

/**
 * A mirror its receiver holds is checked by the receiver (its committed CP pinned, a block
 * that fails repaired from the source); undefined when no receiver holds it (or it cannot:
 * not exported), and the check runs here, read-only.
 */
async function checkThroughReceiver(dir: string): Promise<DirCheckReport | undefined> {
  const abs = path.resolve(dir);
  const sock = path.join(path.dirname(abs), RECEIVER_SOCKET_NAME);
  if (!fs.existsSync(sock)) return undefined;
  const label = readMirrorLabel(abs);
  if (path.basename(abs) !== label.sourceUuid) return undefined;
  const r = await controlRequest(sock, { op: 'check', source: label.sourceUuid }, CHECK_ANSWER_TIMEOUT_MS).catch(() => undefined);
  if (r === undefined) return undefined; // no receiver answers (a socket left by a stopped one)
  if (!r.ok) {
    if (/holds no mirror|is not exported/.test(r.error)) return undefined;
    throw new Error(`receiver: ${r.error}`);
  }
  return r.check as DirCheckReport;
}

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description('verify a volume directory (tree checksums, space accounting, NVRAM records; a served volume is checked by the serving process, on its committed roots, and a block that fails is repaired from its RAID redundancy or its mirror where they hold a good copy), or a mirror DIR/<source-uuid> (also while receiving)')
    .argument('<DIR>', 'the volume directory, or a mirror directory')
    .option('--json', 'print the report as JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      let line: ProgressLine | undefined;
      const onProgress = process.stderr.isTTY
        ? (p: CheckProgress): void => {
            line ??= new ProgressLine('checking', p.blocksTotal * BLOCK_SIZE_BYTES);
            line.update(p.blocksRead * BLOCK_SIZE_BYTES);
          }
        : undefined;
      let r: DirCheckReport;
      try {
        r = fs.existsSync(path.join(dir, MIRROR_LABEL_NAME)) ? (await checkThroughReceiver(dir)) ?? (await checkMirrorDir(dir)) : await checkVolumeDir(dir, onProgress);
      } finally {
        line?.finish();
      }
      if (!r.ok) process.exitCode = 1;
      if (o.json) {
        process.stdout.write(`${JSON.stringify({ dir: path.resolve(dir), ...r }, null, 2)}\n`);
        return;
      }
      for (const n of r.notes) process.stdout.write(`${n}\n`);
      for (const p of r.problems) process.stdout.write(`problem: ${p}\n`);
      process.stdout.write(r.ok ? `${dir}: ok\n` : `${dir}: ${r.problems.length} problem(s)\n`);
    });
}
