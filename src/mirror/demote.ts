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
 *   3. DIR/DEMOTED.json records what follows (where the member goes, its mirror label);
 *      DIR stops being a volume (nvmirror.json is renamed nvmirror.json.demoted); last,
 *      RECEIVE_DIR/<uuid>/mirror.json makes the member (in place, not copied) a mirror of
 *      that volume, marked `demoted`.
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
 *   is complete and synced, and DIR has stopped being a volume (the mirror label is
 *   written after the volume label is renamed away): never both a volume and a mirror.
 * - Re-runnable from any stop: a stop in step 1 or 2 leaves the volume at the same CP and
 *   its copy is made again whole; a stop in step 3 is finished from DEMOTED.json (only
 *   while the label it was made from is still DIR's and no mirror label is written).
 * - A RAID volume is demoted the same way: every member is copied in step 2, and the
 *   mirror label names the members and geometry (its partial stripes then go through the
 *   mirror's stripe journal, mirror-dir.ts).
 */
import * as cp from 'child_process';
import * as crypto from 'crypto';
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
import { receiveDirProblem } from './receive-dir';

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

/** Every step's end, for tests that stop a demote where a crash could. */
export type DemoteStep = 'member-copied' | 'recorded' | 'renamed';

/**
 * DIR/DEMOTED.json: written (durably) once this side's state is kept and before anything
 * else changes, with everything the rest needs; a demote stopped after it finishes from it.
 */
interface DemoteRecord {
  mirrorDir: string;
  cp: number;
  keptIn: string;
  demotedMs: number;
  volumeUuid: string;
  destCp: number;
  promoted: boolean;
  inPlace: boolean;
  mirrorLabel: MirrorLabel;
  /** sha256 of the volume label's text the record was made from (told apart from a later label). */
  labelDigest: string;
}

function readDemoteRecord(dir: string): DemoteRecord | undefined {
  let text: string;
  try {
    text = fs.readFileSync(path.join(dir, DEMOTED_NAME), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  let r: Partial<DemoteRecord>;
  try {
    r = JSON.parse(text) as Partial<DemoteRecord>;
  } catch {
    throw new Error(`${path.join(dir, DEMOTED_NAME)} is damaged (not JSON): see what it held, then remove it to demote again`);
  }
  // A demote before this file held the mirror label (it was then written last) has nothing to finish.
  if (r.mirrorLabel === undefined) return undefined;
  if (typeof r.mirrorDir !== 'string' || typeof r.labelDigest !== 'string' || typeof r.keptIn !== 'string' || typeof r.cp !== 'number' || r.mirrorLabel.format !== 'nvmirror-mirror') {
    throw new Error(`${path.join(dir, DEMOTED_NAME)} is damaged (fields missing): see what it held, then remove it to demote again`);
  }
  return r as DemoteRecord;
}

function labelDigest(text: string): string {
  return crypto.createHash('sha256').update(text).digest('hex');
}

/**
 * The record of a demote stopped in step 3, if this directory has one to finish: its label
 * (in place, or renamed away by the stopped run) is the one the record was made from, and
 * the mirror label is not written yet. A record left by a finished demote is not: the
 * mirror label exists, or the directory is a volume again (promoted: a new label).
 */
function unfinishedDemote(dir: string): DemoteRecord | undefined {
  const r = readDemoteRecord(dir);
  if (r === undefined) return undefined;
  const labelAt = [LABEL_NAME, DEMOTED_LABEL_NAME].map((n) => path.join(dir, n)).find((p) => fs.existsSync(p));
  if (labelAt === undefined || labelDigest(fs.readFileSync(labelAt, 'utf8')) !== r.labelDigest) return undefined;
  if (fs.existsSync(path.join(r.mirrorDir, MIRROR_LABEL_NAME))) return undefined;
  // Not in place: the stopped run may have made the directory, and begun the label's temp file; nothing else.
  if (!r.inPlace && fs.existsSync(r.mirrorDir) && fs.readdirSync(r.mirrorDir).some((n) => !n.startsWith(`${MIRROR_LABEL_NAME}.tmp-`))) return undefined;
  return r;
}

/** Names a stopped demote's copy may hold (step 2): only such a directory is removed to copy again. */
const KEPT_NAME = /^(member-\d+\.img|nvram\.log|nvmirror\.json)(\.tmp-\d+)?$/;

/** A keep directory left by a demote stopped in step 2 (the same CP): removed, to be copied again whole. */
function removeUnfinishedKeep(keptIn: string, log: Logger): void {
  if (!fs.existsSync(keptIn)) return;
  const names = fs.readdirSync(keptIn);
  const foreign = names.filter((n) => !KEPT_NAME.test(n) && n !== CLEAN_STOP_NAME);
  if (foreign.length > 0) throw new Error(`${keptIn} exists and holds files a demote does not write (${foreign.slice(0, 3).join(', ')}): move it away first`);
  log.warn({ keptIn, files: names.length }, 'demote: the copy an interrupted demote began of this same CP is removed and made again');
  fs.rmSync(keptIn, { recursive: true, force: true });
}

export async function demoteVolume(dirArg: string, intoArg: string, opts: { logger: Logger; afterStep?: (step: DemoteStep) => void }): Promise<DemoteReport> {
  const dir = path.resolve(dirArg);
  const into = path.resolve(intoArg);
  const log = opts.logger;
  // --into is a receive directory (DIR/<uuid> becomes the mirror), not a volume or a mirror.
  const intoProblem = receiveDirProblem(into);
  if (intoProblem !== undefined) throw new Error(`--into: ${intoProblem}`);
  const step = opts.afterStep ?? (() => {});
  // A demote stopped after it recorded what it does finishes from that record.
  const recorded = unfinishedDemote(dir);
  if (recorded !== undefined) {
    if (path.join(into, recorded.volumeUuid) !== recorded.mirrorDir) {
      throw new Error(`a demote of ${dir} into ${path.dirname(recorded.mirrorDir)} was interrupted: run it again with --into ${path.dirname(recorded.mirrorDir)}`);
    }
    if (await volumeDirInUse(dir)) throw new Error(`volume ${dir} is being served: stop it before demoting it`);
    log.warn({ dir, cp: recorded.cp, mirrorDir: recorded.mirrorDir }, 'demote: finishing the demote that was interrupted after it kept this side\'s state');
    return await finishDemote(dir, recorded, step, log);
  }
  // A promoted volume (role.json, no relationship of its own) goes back to being the mirror
  // of its old primary: the base is the CP it was promoted from.
  const role = readRole(dir);
  const label: VolumeLabel = await readLabel(dir);
  const labelText = fs.readFileSync(path.join(dir, LABEL_NAME), 'utf8');
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

  // 2. Keep this side's whole state. A demote stopped here left a copy of this same CP (the
  // volume is unchanged, else its CP would be newer): that copy is made again whole.
  const keptIn = path.join(dir, `pre-failback-cp${cpNumber}`);
  removeUnfinishedKeep(keptIn, log);
  await fs.promises.mkdir(keptIn);
  // Every member (a RAID volume's are copied with their RAID labels: the copy is that volume, servable read-only).
  const membersAbs = label.members.map((m) => resolveIn(dir, m.path));
  const memberAbs = membersAbs[0]!;
  membersAbs.forEach((m, i) => copyFileSparse(m, path.join(keptIn, `member-${i}.img`)));
  step('member-copied');
  copyFileSparse(resolveIn(dir, label.nvram.path), path.join(keptIn, 'nvram.log'));
  if (fs.existsSync(path.join(dir, CLEAN_STOP_NAME))) copyFileSparse(path.join(dir, CLEAN_STOP_NAME), path.join(keptIn, CLEAN_STOP_NAME));
  const keptLabel: VolumeLabel = { ...label, members: label.members.map((m, i) => ({ path: `member-${i}.img`, blockCount: m.blockCount })), nvram: { path: 'nvram.log', sizeBytes: label.nvram.sizeBytes } };
  await writeFileDurably(keptIn, LABEL_NAME, `${JSON.stringify(keptLabel, null, 2)}\n`);
  await syncDirectory(dir);

  // 3. Recorded first, so a stop from here on is finished by a re-run; then the directory
  // stops being a volume, and only then does the member become a mirror (in place).
  const demotedMs = Date.now();
  const mirrorLabel: MirrorLabel = {
    format: 'nvmirror-mirror',
    version: 1,
    sourceUuid: label.uuid,
    sizeBytes: label.sizeBytes,
    deviceBlocks: totalBlocks,
    createdMs: demotedMs,
    ...(label.raid
      ? { raid: { level: label.raid.level, stripeUnitBytes: label.raid.stripeUnitBytes, members: label.members.map((m, i) => ({ path: membersAbs[i]!, blockCount: m.blockCount })) } }
      : { memberPath: memberAbs }),
    demoted: { fromDir: dir, cp: cpNumber, destCp, keptIn, demotedMs, ...(destSuperblock && destCp >= 0 ? { destSuperblock } : {}) },
  };
  const record: DemoteRecord = { mirrorDir, cp: cpNumber, keptIn, demotedMs, volumeUuid: label.uuid, destCp, promoted: promoted !== undefined, inPlace, mirrorLabel, labelDigest: labelDigest(labelText) };
  await writeFileDurably(dir, DEMOTED_NAME, `${JSON.stringify(record, null, 2)}\n`);
  step('recorded');
  return await finishDemote(dir, record, step, log);
}

/** Step 3 from its record: every rename is skipped when done already, the mirror label written last. */
async function finishDemote(dir: string, r: DemoteRecord, step: (s: DemoteStep) => void, log: Logger): Promise<DemoteReport> {
  const renameIfThere = async (name: string, to: string): Promise<void> => {
    if (fs.existsSync(path.join(dir, name))) await fs.promises.rename(path.join(dir, name), path.join(dir, to));
  };
  // The label first: from here `serve DIR` refuses (label.ts names DEMOTED.json).
  await renameIfThere(LABEL_NAME, DEMOTED_LABEL_NAME);
  if (r.promoted) {
    // No longer a primary; the old log's records are in the state kept above.
    await renameIfThere(ROLE_NAME, `${ROLE_NAME}.demoted`);
    if (r.inPlace) await renameIfThere(DEST_LOG_NAME, `${DEST_LOG_NAME}.before-demote`);
  }
  await renameIfThere(MIRROR_STATE_NAME, `${MIRROR_STATE_NAME}.demoted`);
  // Its sessions were this side's history; as a volume again (a later promote) it starts anew.
  await renameIfThere(SESSIONS_NAME, `${SESSIONS_NAME}.demoted`);
  await syncDirectory(dir);
  step('renamed');
  await fs.promises.mkdir(r.mirrorDir, { recursive: true });
  const there = path.join(r.mirrorDir, MIRROR_LABEL_NAME);
  if (fs.existsSync(there)) {
    // Only this demote's own label (a stop right after writing it) is written again.
    let l: Partial<MirrorLabel> | undefined;
    try {
      l = JSON.parse(fs.readFileSync(there, 'utf8')) as Partial<MirrorLabel>;
    } catch {
      l = undefined;
    }
    if (l?.demoted?.fromDir !== dir || l.demoted.cp !== r.cp) throw new Error(`${there} exists and is not this demote's: move ${r.mirrorDir} away, then run demote again`);
  }
  await writeFileDurably(r.mirrorDir, MIRROR_LABEL_NAME, `${JSON.stringify(r.mirrorLabel, null, 2)}\n`);
  log.warn({ dir, cp: r.cp, destCp: r.destCp, keptIn: r.keptIn, mirrorDir: r.mirrorDir }, 'volume demoted: it becomes the mirror of the volume promoted from it; its CPs after the common one will be discarded there (all of its state is kept in keptIn)');
  return { dir, volumeUuid: r.volumeUuid, cpNumber: r.cp, destCp: r.destCp, keptIn: r.keptIn, mirrorDir: r.mirrorDir };
}
