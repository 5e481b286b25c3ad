/**
 * `nvmirror promote DIR/<source-uuid>`: turns a mirror into a primary volume (seed 004).
 *
 *   1. The receiver, if one runs, lets go of this mirror (refused while the source is
 *      connected, unless forced) and from then on refuses that source: a promoted mirror
 *      is never written by its old source again (split brain is refused, not merged).
 *   2. The committed image (the newest CP in the member's ring) is the base. A snapshot
 *      of it, `promoted-cp<N>`, keeps its blocks: the last CP both sides hold, for a
 *      later failback.
 *   3. The source's log file is replayed: the records after the base's watermark, in seq
 *      order, stopping at the first gap or record that does not verify (dest-log.ts).
 *      In sync mode that is every acknowledged write.
 *   4. Committed (a CP, then a clean stop), in a new generation (tree/lineage.ts): every
 *      superblock from then on says its CPs after the base are this side's own; the directory becomes a volume directory
 *      (nvmirror.json, its own NVRAM log) that `serve` opens, and role.json says it was
 *      promoted, from which CP, and its new generation.
 *
 * Invariants:
 * - The mirror's lock is held from before the receiver's state is read to the end: no
 *   receiver can take the directory back meanwhile.
 * - Nothing is written to the member before the base is known to be a complete CP (no
 *   partial baseline); the log file is only read.
 * - Re-running an interrupted promote is safe: replaying the same records again over the
 *   same base gives the same image (each record overwrites its whole range, in order).
 *   The base is recorded (promote.base) before anything changes the member, and a re-run
 *   takes it from there: by then the newest CP may be one of the replay's, whose nvlogSeq
 *   counts the new volume's records, and whose number and root the old primary never had.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { writeFileDurably } from '../io/file-device';
import { MmapNvram } from '../io/mmap-nvram';
import * as native from '../io/native';
import { NvLog } from '../nvlog/log';
import { RecordType } from '../nvlog/format';
import { BLOCK } from '../tree/layout';
import { newGenerationId } from '../tree/lineage';
import { controlRequest } from '../volume/engine-control';
import { LABEL_NAME, newLabel } from '../volume/label';
import { NVRAM_DEFAULT_BYTES, NVRAM_DEFAULT_NAME, openVolumeDir } from '../volume/dir';
import { DEST_LOG_MIN_BYTES, DEST_LOG_NAME, DestLog } from './dest-log';
import { RECEIVER_SOCKET_NAME } from './receiver';
import { PROMOTED_LABEL_NAME, ROLE_NAME, readRole, type RoleRecord } from './role';
import { isReceiveDir, sourceEntryNames } from './receive-dir';
import { MEMBER_NAME, openMirrorDevice, BASELINE_MARKER_NAME, MIRROR_LABEL_NAME, MIRROR_LOCK_NAME, MirrorDirError, baselineInProgress, readMirrorLabel, newestSuperblock, removeStaleBaselineMarker, rootBytes, type MirrorLabel } from './mirror-dir';

/** The promote's new generation id, written before its first CP (a re-run continues it). */
const GENERATION_NAME = 'promote.generation';
/**
 * The base (the committed CP the promote started from: number, root, the source's record
 * seq it covers, superblock), written before anything changes the member: a re-run after
 * an interruption replays from it, since the newest CP is then one of the replay's.
 */
const BASE_NAME = 'promote.base';

function readPromoteBase(dir: string): { cp: number; root: string; seq: number; superblock: Buffer } | undefined {
  let v: Record<string, unknown>;
  try {
    v = JSON.parse(fs.readFileSync(path.join(dir, BASE_NAME), 'utf8')) as Record<string, unknown>;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new MirrorDirError(`${path.join(dir, BASE_NAME)}: unreadable (${e instanceof Error ? e.message : String(e)}); the interrupted promote's base is unknown`);
  }
  const { cp, root, seq, superblock } = v;
  if (typeof cp !== 'number' || !Number.isSafeInteger(cp) || cp < 0 || typeof seq !== 'number' || !Number.isSafeInteger(seq) || seq < 0
    || typeof root !== 'string' || !/^[0-9a-f]+$/.test(root) || typeof superblock !== 'string') {
    throw new MirrorDirError(`${path.join(dir, BASE_NAME)}: not a promote base; the interrupted promote's base is unknown`);
  }
  return { cp, root, seq, superblock: Buffer.from(superblock, 'base64') };
}

/** How long promote waits for a running receiver to let go of the mirror. */
const RELEASE_TIMEOUT_MS = 30_000;

export interface PromoteReport extends RoleRecord {
  dir: string;
  volumeUuid: string;
  bytesReplayed: number;
  /** The CP the promoted volume is at. */
  cpNumber: number;
  /** Why replay stopped where it did. */
  replayEnd: string;
  /** Records lost to damage in the mirror's log (only with acceptLogLoss): from firstMissingSeq through at least durableThroughSeq. */
  logLoss?: { firstMissingSeq: number; durableThroughSeq: number; validAfter: number };
}

/** The receiver's control socket for a mirror directory (its parent directory holds it). */
function receiverSocketOf(dir: string): string {
  return path.join(path.dirname(dir), RECEIVER_SOCKET_NAME);
}

/** Asks a running receiver to let go of source `uuid`; resolves false when no receiver runs. */
async function askReceiverToRelease(dir: string, uuid: string, force: boolean): Promise<boolean> {
  const sock = receiverSocketOf(dir);
  if (!fs.existsSync(sock)) return false;
  let r;
  try {
    r = await controlRequest(sock, { op: 'release', source: uuid, force }, RELEASE_TIMEOUT_MS);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    if (/ECONNREFUSED|ENOENT/.test(msg)) return false; // a stale socket: no receiver
    throw new Error(`the receiver did not let go of the mirror: ${msg}`);
  }
  if (!r.ok) throw new Error(r.error);
  return true;
}

/** Tells a running receiver that a promote it released a mirror for refused (best effort: a stopped receiver has nothing to take back). */
async function askReceiverToUnrelease(dir: string, uuid: string): Promise<void> {
  await controlRequest(receiverSocketOf(dir), { op: 'unrelease', source: uuid }, RELEASE_TIMEOUT_MS).catch(() => undefined);
}

export interface PromoteOptions {
  /** Promote while the source is connected (its stream is cut off). */
  force: boolean;
  logger: Logger;
  /** Promote over a log damaged before its durable mark, losing the records from the damage on. */
  acceptLogLoss?: boolean;
  /** Called after each replayed record with the count so far (a test stops a promote there, as a crash would). */
  afterRecord?: (replayed: number) => void;
}

export async function promoteMirror(dirArg: string, opts: PromoteOptions): Promise<PromoteReport> {
  const dir = path.resolve(dirArg);
  const labelPath = path.join(dir, MIRROR_LABEL_NAME);
  if (!fs.existsSync(labelPath)) {
    if (readRole(dir)) throw new Error(`${dir} was already promoted: it is a primary volume (serve it with nvmirror serve ${dir})`);
    if (isReceiveDir(dir)) {
      const mirrors = sourceEntryNames(dir).filter((n) => fs.existsSync(path.join(dir, n, MIRROR_LABEL_NAME)));
      throw new Error(`${dir} is a receive directory: promote one of its mirrors, ${path.join(dir, '<source-uuid>')}${mirrors.length > 0 ? ` (${mirrors.join(', ')})` : ' (it holds none)'}`);
    }
    throw new Error(`${dir} is not a mirror directory (no ${MIRROR_LABEL_NAME})`);
  }
  const label = readMirrorLabel(dir);
  const receiverLetGo = await askReceiverToRelease(dir, label.sourceUuid, opts.force);
  // Until the promote changes the member, a refusal hands the mirror back to the receiver.
  let changing = false;
  try {
    return await promoteReleased(dir, label, receiverLetGo, opts, () => { changing = true; });
  } catch (e) {
    if (receiverLetGo && !changing) await askReceiverToUnrelease(dir, label.sourceUuid);
    throw e;
  }
}

/** The promote proper, once a running receiver has let go of the mirror; `changing()` is called before the first change to it. */
async function promoteReleased(dir: string, label: MirrorLabel, receiverLetGo: boolean, opts: PromoteOptions, changing: () => void): Promise<PromoteReport> {
  const log = opts.logger;
  const lockFd = fs.openSync(path.join(dir, MIRROR_LOCK_NAME), 'a');
  try {
    if (!native.flockExclusive(lockFd)) throw new MirrorDirError(`mirror ${dir} is in use by another process (a receiver whose control socket did not answer?)`);
    if (fs.existsSync(path.join(dir, BASELINE_MARKER_NAME))) {
      // Read only (nothing is written before the base is known to be whole): the marker
      // of a baseline the newest CP shows committed was left by a stop before its removal.
      const ro = await openMirrorDevice(dir, label, true);
      let newestCp: number | undefined;
      try {
        newestCp = (await newestSuperblock(ro, label.sourceUuid))?.sb.cpNumber;
      } finally {
        await ro.close();
      }
      if (baselineInProgress(dir, newestCp)) {
        throw new MirrorDirError(`${dir} holds no consistent image: a full baseline was interrupted (${BASELINE_MARKER_NAME}); it cannot be promoted`);
      }
      await removeStaleBaselineMarker(dir, opts.logger);
    }
    const memberRel = label.memberPath ?? MEMBER_NAME;

    // The base: the committed CP (a RAID mirror's stripe journal replayed first).
    const dev = await openMirrorDevice(dir, label, false);
    let baseCp: number;
    let baseRoot: string;
    let baseSeq: number;
    let blockCount: number;
    let baseSuperblock: Buffer;
    try {
      const committed = await newestSuperblock(dev, label.sourceUuid);
      if (!committed) throw new MirrorDirError(`${dir} has no committed CP yet: nothing to promote`);
      // A re-run after an interruption: the replay's CPs (this side's own) are newer than
      // the base, and their nvlogSeq counts the new volume's records, not the source's.
      // Only an interrupted promote has made the volume directory (nvmirror.json; a demote
      // renames it away, so a base left by an earlier promote is never taken).
      const recorded = fs.existsSync(path.join(dir, LABEL_NAME)) ? readPromoteBase(dir) : undefined;
      if (recorded && recorded.cp > committed.sb.cpNumber) throw new MirrorDirError(`${dir}: ${BASE_NAME} names CP ${recorded.cp}, newer than the newest CP ${committed.sb.cpNumber}`);
      baseSuperblock = recorded ? recorded.superblock : committed.raw;
      baseCp = recorded ? recorded.cp : committed.sb.cpNumber;
      baseRoot = recorded ? recorded.root : rootBytes(committed.sb).toString('hex');
      baseSeq = recorded ? recorded.seq : committed.sb.nvlogSeq;
      blockCount = label.raid ? label.raid.members[0]!.blockCount : dev.blockCount;
      if (recorded) log.info({ dir, baseCp, baseSeq }, 'promote resumed: the base recorded by the interrupted run');
      else await writeFileDurably(dir, BASE_NAME, `${JSON.stringify({ cp: baseCp, root: baseRoot, seq: baseSeq, superblock: baseSuperblock.toString('base64') })}\n`);
    } finally {
      await dev.close();
    }

    // The records to replay (read-only: the log file is left as it is).
    const logPath = path.join(dir, DEST_LOG_NAME);
    let destLog: DestLog | undefined;
    if (fs.existsSync(logPath)) {
      const size = (await fs.promises.stat(logPath)).size;
      if (size >= DEST_LOG_MIN_BYTES && size % BLOCK === 0) destLog = await DestLog.open(logPath, label.sourceUuid, size, 'recover', baseSeq);
    }
    const records = destLog ? [...destLog.recordsAfter(baseSeq)] : [];
    // Damage in the middle of the log: records after it were acknowledged to the source's
    // clients, and replay stops before them. Promoting loses them: only when told to.
    const damage = destLog?.damage;
    if (damage && !opts.acceptLogLoss) {
      await destLog?.close();
      throw new MirrorDirError(`${dir}: the mirror's log is damaged: record seq ${damage.firstMissingSeq} cannot be read, though every record through seq ${damage.durableThroughSeq} was stored durably (writes the source acknowledged): a promote replays only up to seq ${damage.firstMissingSeq - 1} and loses the rest. If the source can still be reached, let it resync this mirror instead; to promote anyway: nvmirror promote ${dir} --accept-log-loss`);
    }
    const replayEnd = damage
      ? `LOST: the log is damaged at seq ${damage.firstMissingSeq}; the records from it through seq ${damage.durableThroughSeq} are not replayed (--accept-log-loss)`
      : records.length === 0
        ? `the log holds no record after the base's watermark (seq ${baseSeq})`
        : `replay stopped after seq ${records[records.length - 1]!.seq}, the last record the log holds durably or not (a power loss may take records not yet synced; damage before the log's durable mark is refused)`;
    if (damage) log.error({ dir, ...damage }, 'promote: the mirror\'s log is damaged; the records from the damage on are not replayed (--accept-log-loss)');

    changing();
    // A volume directory around the member (idempotent: an interrupted promote left it).
    if (!fs.existsSync(path.join(dir, LABEL_NAME))) {
      const nvramAbs = path.join(dir, NVRAM_DEFAULT_NAME);
      await fs.promises.rm(nvramAbs, { force: true });
      const region = await MmapNvram.open(nvramAbs, { sizeBytes: NVRAM_DEFAULT_BYTES, create: true });
      try {
        await NvLog.format(region, label.sourceUuid);
      } finally {
        await region.close();
      }
      const vol = newLabel({
        uuid: label.sourceUuid,
        sizeBytes: label.sizeBytes,
        members: label.raid ? label.raid.members.map((m) => ({ path: m.path, blockCount: m.blockCount })) : [{ path: memberRel, blockCount }],
        ...(label.raid ? { raid: { level: label.raid.level, stripeUnitBytes: label.raid.stripeUnitBytes } } : {}),
        nvram: { path: NVRAM_DEFAULT_NAME, sizeBytes: NVRAM_DEFAULT_BYTES },
        createdMs: Date.now(),
      });
      await writeFileDurably(dir, LABEL_NAME, `${JSON.stringify(vol, null, 2)}\n`);
    }

    // The new generation (tree/lineage.ts), chosen once: a re-run continues the same one.
    const genPath = path.join(dir, GENERATION_NAME);
    let generation = fs.existsSync(genPath) ? fs.readFileSync(genPath, 'utf8').trim() : '';
    if (!/^[0-9a-f]{16}$/.test(generation)) {
      generation = newGenerationId();
      await writeFileDurably(dir, GENERATION_NAME, `${generation}\n`);
    }
    const opened = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    let bytesReplayed = 0;
    let replayedCount = 0;
    let lastSeq = baseSeq;
    const baseSnapshot = `promoted-cp${baseCp}`;
    let cpNumber: number;
    try {
      const v = opened.volume;
      // Every CP from here on is this side's own: the lineage names the base it forked at.
      v.tree.startGeneration(generation);
      // Keep the base (the last CP both sides hold) before anything changes it.
      if (!v.listSnapshots().some((s) => s.name === baseSnapshot)) await v.snapshot({ kind: 'create', name: baseSnapshot });
      for (const r of records) {
        if (r.type === RecordType.Write) await v.write(r.offsetBytes, r.payload.subarray(0, r.lengthBytes), false);
        else if (r.type === RecordType.Trim) await v.trim(r.offsetBytes, r.lengthBytes, false);
        else if (r.type === RecordType.Zero) await v.zero(r.offsetBytes, r.lengthBytes, { fua: false, noHole: false, fastZero: false });
        else throw new Error(`record ${r.seq} has an unknown type ${r.type}`);
        bytesReplayed += r.lengthBytes;
        lastSeq = r.seq;
        opts.afterRecord?.(++replayedCount);
      }
      await v.flush();
      await v.checkpoint();
      cpNumber = v.tree.stats().cpNumber;
    } finally {
      await opened.close();
      await destLog?.close();
    }
    const role: RoleRecord = {
      format: 'nvmirror-role',
      role: 'primary',
      promotedFromCp: baseCp,
      promotedRoot: baseRoot,
      promotedMs: Date.now(),
      baseSnapshot,
      lastSeq,
      recordsReplayed: records.length,
      generation,
      baseSuperblock: baseSuperblock.toString('base64'),
    };
    await writeFileDurably(dir, ROLE_NAME, `${JSON.stringify(role, null, 2)}\n`);
    // Last: the directory stops being a mirror (a receiver now refuses this source by role.json).
    await fs.promises.rename(path.join(dir, MIRROR_LABEL_NAME), path.join(dir, PROMOTED_LABEL_NAME));
    // Done: a later promote (after a demote) starts a generation of its own, from its own base.
    await fs.promises.rm(genPath, { force: true });
    await fs.promises.rm(path.join(dir, BASE_NAME), { force: true });
    log.info({ dir, fromCp: baseCp, records: records.length, bytes: bytesReplayed, lastSeq, cp: cpNumber, receiverLetGo }, 'mirror promoted: it is a primary volume now');
    return { ...role, dir, volumeUuid: label.sourceUuid, bytesReplayed, cpNumber, replayEnd, ...(damage ? { logLoss: damage } : {}) };
  } finally {
    fs.closeSync(lockFd);
  }
}
