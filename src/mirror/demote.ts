/**
 * `nvmirror demote DIR --into RECEIVE_DIR`: the old primary, back after a failover,
 * becomes the mirror of the volume promoted from it (failback without a full copy).
 *
 *   1. The volume is opened once more (its NVRAM replayed and committed, with every CP
 *      from the destination's last acknowledged one on held, so none of their blocks is
 *      reused) and stopped cleanly.
 *   2. Its whole state is kept: DIR/pre-failback-cp<N>/ is a complete volume directory
 *      (the member copied sparse, with reflinks where the file system has them, and its
 *      NVRAM), servable read-only. Nothing this side wrote is lost silently: what the
 *      failback discards is there, and the log says so.
 *   3. RECEIVE_DIR/<uuid>/mirror.json makes the member (in place, not copied) a mirror of
 *      that volume, marked `demoted`; DIR stops being a volume (nvmirror.json is renamed
 *      nvmirror.json.demoted, DIR/DEMOTED.json says where it went).
 *   4. When the promoted volume connects (`serve --mirror-to`), it names the CP it was
 *      promoted from and its root; the receiver rolls this member back to exactly that CP
 *      (mirror-dir.ts) and the resync sends only the blocks born after it.
 *
 * The promoted side can be demoted too (the other resolution of a split brain): its base
 * is the CP it was promoted from (role.json keeps that CP's superblock), its role.json
 * becomes role.json.demoted, and demoted into the receive directory it was promoted in it
 * becomes that mirror again in place; its old primary then resyncs it from that CP.
 *
 * Invariants:
 * - Refused while the volume is served (its lock), and when the target mirror directory
 *   exists (but for a promoted mirror going back in place): demote never overwrites anything.
 * - The member is changed (by the receiver's roll-back) only after the copy in step 2
 *   is complete and synced.
 * - A RAID volume is demoted the same way: every member is copied in step 2, and the
 *   mirror label names the members and geometry (its partial stripes then go through the
 *   mirror's stripe journal, mirror-dir.ts).
 */
import * as cp from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { writeFileDurably, syncDirectory } from '../io/file-device';
import { RING_SLOTS } from '../tree/layout';
import type { BlockTreeApi, CpBlock, CpSink } from '../tree/types';
import { CLEAN_STOP_NAME } from '../volume/clean-stop';
import { LABEL_NAME, readLabel, resolveIn, type VolumeLabel } from '../volume/label';
import { openVolumeDir } from '../volume/dir';
import { volumeDirInUse } from '../volume/dir-lock';
import { MIRROR_LABEL_NAME, type MirrorLabel } from './mirror-dir';
import { MIRROR_STATE_NAME, readRelationship } from './relationship';
import { SESSIONS_NAME } from '../volume/sessions';
import { ROLE_NAME, readRole } from './role';
import { DEST_LOG_NAME } from './dest-log';

export const DEMOTED_NAME = 'DEMOTED.json';
export const DEMOTED_LABEL_NAME = `${LABEL_NAME}.demoted`;

export interface DemoteReport {
  dir: string;
  volumeUuid: string;
  /** The CP the volume stopped at (its own newest). */
  cpNumber: number;
  /** The destination's last acknowledged CP this side knew of (-1: none recorded). */
  destCp: number;
  /** Where this side's whole state is kept (a volume directory). */
  keptIn: string;
  /** The new mirror directory (RECEIVE_DIR/<uuid>). */
  mirrorDir: string;
}

/** Keeps every CP from `fromCp` on intact while the volume recovers (frees are not reused). */
class HoldSink implements CpSink {
  constructor(private readonly fromCp: number) {}
  oldestNeededCp(): number | undefined {
    return this.fromCp;
  }
  holdBroken(): void {
    /* the recovery CP found no room: the check at failback time (roots) still protects */
  }
  async blocks(_cp: number, _blocks: readonly CpBlock[]): Promise<void> {}
  async committed(): Promise<void> {}
}

/** Copies a file sparse (reflink where possible) and syncs it. */
function copyFileSparse(from: string, to: string): void {
  cp.execFileSync('cp', ['--reflink=auto', '--sparse=always', from, to], { stdio: ['ignore', 'ignore', 'pipe'] });
  const fd = fs.openSync(to, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export async function demoteVolume(dirArg: string, intoArg: string, opts: { logger: Logger }): Promise<DemoteReport> {
  const dir = path.resolve(dirArg);
  const into = path.resolve(intoArg);
  const log = opts.logger;
  // A promoted volume (role.json, no relationship of its own) goes back to being the mirror
  // of its old primary: the base is the CP it was promoted from.
  const role = readRole(dir);
  const label: VolumeLabel = await readLabel(dir);
  if (await volumeDirInUse(dir)) throw new Error(`volume ${dir} is being served: stop it before demoting it`);
  const mirrorDir = path.join(into, label.uuid);
  const rel = readRelationship(dir);
  const promoted = role !== undefined && (rel === undefined || rel.destCp < 0) ? role : undefined;
  // A promoted mirror demoted into the receive directory it was promoted in becomes that mirror again, in place.
  const inPlace = promoted !== undefined && mirrorDir === dir;
  if (fs.existsSync(mirrorDir) && !inPlace) throw new Error(`${mirrorDir} already exists: remove it (or choose another receive directory) first`);
  const destCp = promoted ? promoted.promotedFromCp : rel?.destCp ?? -1;
  const destSuperblock = promoted ? promoted.baseSuperblock : rel?.destSuperblock;
  if (promoted) log.warn({ dir, baseCp: destCp }, 'demote: a promoted volume goes back to being the mirror of its old primary, from the CP it was promoted from');

  // 1. Replay and commit the NVRAM, holding the CPs the destination may hold.
  const opened = await openVolumeDir(dir, {
    readOnly: false,
    control: false,
    cpIntervalMs: 0,
    beforeRecovery: async (tree: BlockTreeApi) => {
      const now = tree.stats().cpNumber;
      if (destCp < 0) return;
      if (destSuperblock !== undefined) {
        const why = await tree.holdCommitted(destCp, Buffer.from(destSuperblock, 'base64'));
        if (why !== null) log.warn({ cp: destCp, reason: why }, 'demote: the destination\'s CP cannot be held');
      }
      for (let c = Math.max(destCp, now - RING_SLOTS + 1); c < now; c++) {
        const why = await tree.holdCommitted(c);
        if (why !== null) log.warn({ cp: c, reason: why }, 'demote: an older CP cannot be held');
      }
      tree.setCpSink(new HoldSink(destCp));
    },
  });
  let cpNumber: number;
  let totalBlocks: number;
  try {
    cpNumber = opened.volume.tree.stats().cpNumber;
    totalBlocks = opened.volume.tree.stats().totalBlocks;
  } finally {
    await opened.close();
  }

  // 2. Keep this side's whole state.
  const keptIn = path.join(dir, `pre-failback-cp${cpNumber}`);
  await fs.promises.mkdir(keptIn);
  // Every member (a RAID volume's are copied with their RAID labels: the copy is that volume, servable read-only).
  const membersAbs = label.members.map((m) => resolveIn(dir, m.path));
  const memberAbs = membersAbs[0]!;
  membersAbs.forEach((m, i) => copyFileSparse(m, path.join(keptIn, `member-${i}.img`)));
  copyFileSparse(resolveIn(dir, label.nvram.path), path.join(keptIn, 'nvram.log'));
  if (fs.existsSync(path.join(dir, CLEAN_STOP_NAME))) copyFileSparse(path.join(dir, CLEAN_STOP_NAME), path.join(keptIn, CLEAN_STOP_NAME));
  const keptLabel: VolumeLabel = { ...label, members: label.members.map((m, i) => ({ path: `member-${i}.img`, blockCount: m.blockCount })), nvram: { path: 'nvram.log', sizeBytes: label.nvram.sizeBytes } };
  await writeFileDurably(keptIn, LABEL_NAME, `${JSON.stringify(keptLabel, null, 2)}\n`);
  await syncDirectory(dir);

  // 3. The member becomes a mirror (in place); the directory stops being a volume.
  await fs.promises.mkdir(mirrorDir, { recursive: true });
  if (promoted) {
    // No longer a primary; the old log's records are in the state kept above.
    await fs.promises.rename(path.join(dir, ROLE_NAME), path.join(dir, `${ROLE_NAME}.demoted`));
    if (inPlace && fs.existsSync(path.join(dir, DEST_LOG_NAME))) await fs.promises.rename(path.join(dir, DEST_LOG_NAME), path.join(dir, `${DEST_LOG_NAME}.before-demote`));
  }
  const ml: MirrorLabel = {
    format: 'nvmirror-mirror',
    version: 1,
    sourceUuid: label.uuid,
    sizeBytes: label.sizeBytes,
    deviceBlocks: totalBlocks,
    createdMs: Date.now(),
    ...(label.raid
      ? { raid: { level: label.raid.level, stripeUnitBytes: label.raid.stripeUnitBytes, members: label.members.map((m, i) => ({ path: membersAbs[i]!, blockCount: m.blockCount })) } }
      : { memberPath: memberAbs }),
    demoted: { fromDir: dir, cp: cpNumber, destCp, keptIn, demotedMs: Date.now(), ...(destSuperblock && destCp >= 0 ? { destSuperblock } : {}) },
  };
  await writeFileDurably(mirrorDir, MIRROR_LABEL_NAME, `${JSON.stringify(ml, null, 2)}\n`);
  await writeFileDurably(dir, DEMOTED_NAME, `${JSON.stringify({ mirrorDir, cp: cpNumber, keptIn, demotedMs: Date.now() }, null, 2)}\n`);
  if (fs.existsSync(path.join(dir, MIRROR_STATE_NAME))) await fs.promises.rename(path.join(dir, MIRROR_STATE_NAME), path.join(dir, `${MIRROR_STATE_NAME}.demoted`));
  // Its sessions were this side's history; as a volume again (a later promote) it starts anew.
  if (fs.existsSync(path.join(dir, SESSIONS_NAME))) await fs.promises.rename(path.join(dir, SESSIONS_NAME), path.join(dir, `${SESSIONS_NAME}.demoted`));
  await fs.promises.rename(path.join(dir, LABEL_NAME), path.join(dir, DEMOTED_LABEL_NAME));
  await syncDirectory(dir);
  log.warn({ dir, cp: cpNumber, destCp, keptIn, mirrorDir }, 'volume demoted: it becomes the mirror of the volume promoted from it; its CPs after the common one will be discarded there (all of its state is kept in keptIn)');
  return { dir, volumeUuid: label.uuid, cpNumber, destCp, keptIn, mirrorDir };
}
