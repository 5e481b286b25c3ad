/**
 * What the CLI does to a volume directory, served or not: `status`, `snapshot`, `check`
 * (through the serving process's control socket when it is served, else by opening it,
 * read-only where nothing needs writing), and `repair` of a lost or damaged NVRAM log.
 *
 * Invariants:
 * - status and check of an unserved volume write nothing; of a served one they go
 *   through DIR/control.sock and fail with one line when there is none.
 * - recreateNvram replaces an NVRAM log only when the clean-stop record proves the tree
 *   holds every record (clean-stop.ts); acceptNvramLoss drops only what cannot replay.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { BlockDevice, NvramRegion } from '../io/types';
import { syncDirectory } from '../io/file-device';
import { MmapNvram, NvramFileCopy } from '../io/mmap-nvram';
import { BlockTree } from '../tree/tree';
import { NvLog } from '../nvlog/log';
import { log as logger } from '../util/log';
import { CONTROL_SOCKET_NAME, controlRequest } from './engine-control';
import { NvramFormatError, scanRegion } from '../nvlog/replay';
import { RaidDevice } from '../raid/raid-device';
import { resolveIn, pathExists, readLabel } from './label';
import { readCleanStop } from './clean-stop';
import { lockVolumeDir, volumeDirInUse } from './dir-lock';
import { engineStatus, raidNotes, type VolumeStatus, type DirCheckReport, type CheckProgress } from './served';
import { openVolumeDir, openMemberDevice, openNvram, type OpenVolumeDirOptions } from './dir';

/** Polls the serving process's check progress every CHECK_PROGRESS_POLL_MS while `done` is pending. */
const CHECK_PROGRESS_POLL_MS = 250;

/** Asks the serving process to check its committed roots; `onProgress` (if given) is polled meanwhile. */
async function checkThroughControl(absDir: string, onProgress: ((p: CheckProgress) => void) | undefined): Promise<DirCheckReport> {
  const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
  if (!(await pathExists(sockPath))) {
    throw new Error(`volume ${absDir} is open in another process that has no control socket; stop it before running check`);
  }
  let finished = false;
  const poll = async (): Promise<void> => {
    // The first poll right away: the progress line's rate counts from it.
    for (let first = true; !finished && onProgress; first = false) {
      if (!first) await new Promise((r) => setTimeout(r, CHECK_PROGRESS_POLL_MS));
      if (finished) return;
      const r = await controlRequest(sockPath, { op: 'check-progress' }, 10_000).catch(() => undefined);
      if (!finished && r?.ok && r.progress) onProgress(r.progress as CheckProgress);
    }
  };
  const polling = poll();
  try {
    const r = await controlRequest(sockPath, { op: 'check' }, CHECK_ANSWER_TIMEOUT_MS);
    if (!r.ok) throw new Error(`serving process: ${r.error}`);
    const report = r.check as DirCheckReport;
    finished = true;
    if (onProgress && report.blocksRead !== undefined) onProgress({ blocksRead: report.blocksRead, blocksTotal: report.blocksRead });
    return report;
  } finally {
    finished = true;
    await polling;
  }
}

/** How long `check` waits for the serving process's answer (a full walk of a large volume). */
const CHECK_ANSWER_TIMEOUT_MS = 24 * 3600 * 1000;

/**
 * Checks a volume: the tree (every checksum, accounting vs reachability, on every root)
 * and the NVRAM (header, record validity, replay chain). Opens nothing for writing. A
 * served volume is checked by the serving process, through its control socket (the tree
 * only, on its committed roots).
 */
export async function checkVolumeDir(dir: string, onProgress?: (p: CheckProgress) => void): Promise<DirCheckReport> {
  const absDir = path.resolve(dir);
  const problems: string[] = [];
  const notes: string[] = [];
  const label = await readLabel(absDir);
  if (await volumeDirInUse(absDir)) return checkThroughControl(absDir, onProgress);
  const lock = await lockVolumeDir(absDir, true).catch((e: unknown) => {
    const msg = e instanceof Error ? e.message : String(e);
    throw new Error(msg.includes('already in use') ? `${msg}; run check again to check it through the serving process` : msg);
  });
  let dev: BlockDevice | undefined;
  let tree: BlockTree | undefined;
  let region: NvramRegion | undefined;
  try {
    dev = await openMemberDevice(absDir, label, true);
    if (dev instanceof RaidDevice) notes.push(...raidNotes(dev.health()));
    try {
      tree = await BlockTree.open(dev);
    } catch (e) {
      problems.push(`tree: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (tree?.rollback) {
      // Mount skipped a durably committed CP: its blocks are damaged, and its writes are
      // safe only if the NVRAM replay still reaches its watermark (checked below).
      const rb = tree.rollback;
      problems.push(`tree: the newest committed CP ${rb.newestCp} does not verify, CP ${rb.mountedCp} was mounted instead (${rb.reasons.join('; ')})`);
    }
    if (tree) {
      if (tree.volumeUuid !== label.uuid) problems.push(`tree: belongs to volume ${tree.volumeUuid}, the label says ${label.uuid}`);
      const total = tree.stats().usedBlocks;
      const r = await tree.check(onProgress && ((n) => onProgress({ blocksRead: n, blocksTotal: total })));
      for (const p of r.problems) problems.push(`tree: ${p}`);
      const st = tree.stats();
      notes.push(`tree: CP ${st.cpNumber}, ${r.blocksReachable} blocks reachable, ${r.blocksAccounted} accounted, ${st.snapshots.length} snapshot(s)`);
    }
    region = await openNvram(absDir, label, true);
    const watermark = tree ? tree.stats().meta.nvlogSeq : 0;
    try {
      const scan = scanRegion(region, label.uuid, watermark);
      for (const r of scan.chain) {
        if (r.header.offsetBytes + r.header.lengthBytes > label.sizeBytes) {
          problems.push(`NVRAM: record seq ${r.header.seq} covers [${r.header.offsetBytes}, ${r.header.offsetBytes + r.header.lengthBytes}) beyond the volume size ${label.sizeBytes}`);
        }
      }
      const rb = tree?.rollback;
      if (rb) {
        const reached = scan.chain.length > 0 ? scan.chain[scan.chain.length - 1]!.header.seq : watermark;
        if (reached < rb.newestMeta.nvlogSeq) {
          problems.push(`NVRAM: replay reaches seq ${reached}, CP ${rb.newestCp} had committed up to seq ${rb.newestMeta.nvlogSeq}: writes ${reached + 1}..${rb.newestMeta.nvlogSeq} are lost`);
        } else {
          notes.push(`NVRAM: the replay (to seq ${reached}) still covers CP ${rb.newestCp}'s writes (up to seq ${rb.newestMeta.nvlogSeq})`);
        }
      }
      if (scan.damage) {
        const d = scan.damage;
        problems.push(`NVRAM: damaged mid-log: records seq ${d.firstLostSeq}..${d.lastLostSeq} cannot be replayed (seq ${d.firstLostSeq} does not verify; ${d.validRecordsAfter} valid record(s) follow it, and records up to seq ${d.lastDurableLostSeq} were durable)`);
      } else if (scan.unflushedGap) {
        const g = scan.unflushedGap;
        notes.push(`NVRAM: records seq ${g.firstLostSeq}..${g.lastLostSeq} follow a torn record and will be dropped (none was flushed: a torn tail)`);
      }
      const valid = scan.halves[0].records.length + scan.halves[1].records.length;
      notes.push(`NVRAM: epoch ${scan.header.epoch}, ${valid} valid record(s), ${scan.chain.length} to replay after seq ${watermark}` +
        (scan.orphanedRecords > 0 ? `, ${scan.orphanedRecords} after a gap (never replayed)` : ''));
    } catch (e) {
      if (e instanceof NvramFormatError) problems.push(`NVRAM: ${e.message}`);
      else throw e;
    }
  } finally {
    await region?.close().catch(() => undefined);
    await tree?.close().catch(() => undefined);
    await dev?.close().catch(() => undefined);
    await lock.release();
  }
  return { ok: problems.length === 0, problems, notes };
}

/** Status of a volume directory: asks the serving process if there is one, else opens it read-only. */
export async function volumeDirStatus(dir: string, timeoutMs = 10_000): Promise<VolumeStatus> {
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  if (await volumeDirInUse(absDir)) {
    const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
    if (!(await pathExists(sockPath))) {
      throw new Error(`volume ${absDir} is open in another process that has no control socket (on a read-only file system \`serve --read-only\` cannot create one)`);
    }
    const r = await controlRequest(sockPath, { op: 'status' }, timeoutMs);
    if (!r.ok) throw new Error(`serving process: ${r.error}`);
    return r.status as VolumeStatus;
  }
  const opened = await openVolumeDir(absDir, { readOnly: true, control: false, cpIntervalMs: 0 });
  try {
    return engineStatus(absDir, label, opened.volume, false);
  } finally {
    await opened.close();
  }
}

/**
 * Creates or deletes a snapshot: through the serving process if the volume is served
 * (it takes effect at the CP this triggers), else by opening the volume, committing a
 * CP with the op, and closing it.
 */
export async function volumeDirSnapshot(
  dir: string,
  op: { kind: 'create' | 'delete'; name: string; force?: boolean },
  timeoutMs = 120_000,
  beforeRecovery?: OpenVolumeDirOptions['beforeRecovery'],
): Promise<{ cpNumber: number; served: boolean }> {
  const absDir = path.resolve(dir);
  await readLabel(absDir);
  if (await volumeDirInUse(absDir)) {
    const r = await controlRequest(path.join(absDir, CONTROL_SOCKET_NAME), { op: 'snapshot', kind: op.kind, name: op.name, ...(op.force === true ? { force: true } : {}) }, timeoutMs);
    if (!r.ok) throw new Error(r.error);
    return { cpNumber: r.cpNumber as number, served: true };
  }
  const opened = await openVolumeDir(absDir, { readOnly: false, control: false, cpIntervalMs: 0, ...(beforeRecovery ? { beforeRecovery } : {}) });
  try {
    const r = await opened.volume.snapshot({ kind: op.kind, name: op.name });
    return { cpNumber: r?.cpNumber ?? opened.volume.stats().tree.cpNumber, served: false };
  } finally {
    await opened.close();
  }
}

/** Snapshots of a volume directory (served or not). */
export async function volumeDirSnapshots(dir: string): Promise<VolumeStatus['snapshots']> {
  return (await volumeDirStatus(dir)).snapshots;
}

// ---- repair: recreate the NVRAM log ----

export interface RecreateNvramResult {
  nvramPath: string;
  cpNumber: number;
  nvlogSeq: number;
  /** Where an unreadable NVRAM file was moved, if there was one. */
  movedAside: string | undefined;
}

/**
 * Recreates a deleted or unreadable NVRAM log, only when the tree provably holds
 * everything: the newest CP mounts without a rollback and the clean-stop record names
 * exactly that CP and its watermark (the last session stopped after committing every
 * record, and no read-write session ran since). A readable log is left alone. An
 * unreadable file is kept beside the new one (PATH.unreadable-MS).
 */
export async function recreateNvram(dir: string): Promise<RecreateNvramResult> {
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  const lock = await lockVolumeDir(absDir).catch((e: unknown) => {
    const msg = e instanceof Error ? e.message : String(e);
    throw new Error(msg.includes('already in use') ? `${msg}; stop it before repairing` : msg);
  });
  try {
    const nvramPath = resolveIn(absDir, label.nvram.path);
    let unreadable: string | undefined;
    if (await pathExists(nvramPath)) {
      try {
        const copy = await NvramFileCopy.open(nvramPath, label.nvram.sizeBytes);
        scanRegion(copy, label.uuid, 0);
      } catch (e) {
        unreadable = e instanceof Error ? e.message : String(e);
      }
      if (unreadable === undefined) throw new Error(`the NVRAM log ${nvramPath} is readable: nothing to recreate (run nvmirror check ${dir})`);
    }
    const dev = await openMemberDevice(absDir, label, true);
    let st: ReturnType<BlockTree['stats']>;
    try {
      const tree = await BlockTree.open(dev);
      try {
        if (tree.rollback) {
          throw new Error(`cannot recreate the NVRAM log: the newest committed CP ${tree.rollback.newestCp} does not verify (CP ${tree.rollback.mountedCp} mounted), so the log may hold writes the tree lacks`);
        }
        if (tree.volumeUuid !== label.uuid) throw new Error(`member belongs to volume ${tree.volumeUuid}, the label says ${label.uuid}`);
        st = tree.stats();
      } finally {
        await tree.close();
      }
    } finally {
      await dev.close();
    }
    const clean = await readCleanStop(absDir);
    if (!clean || clean.uuid !== label.uuid || clean.cpNumber !== st.cpNumber || clean.nvlogSeq !== st.meta.nvlogSeq) {
      const why = clean ? `it names CP ${clean.cpNumber} seq ${clean.nvlogSeq}, the tree is at CP ${st.cpNumber} seq ${st.meta.nvlogSeq}` : 'there is none';
      throw new Error(`cannot prove the NVRAM log held nothing the tree lacks: no clean-stop record for CP ${st.cpNumber} (${why}; the last read-write session did not stop cleanly): refusing to recreate it`);
    }
    let movedAside: string | undefined;
    if (unreadable !== undefined) {
      movedAside = `${nvramPath}.unreadable-${Date.now()}`;
      await fs.promises.rename(nvramPath, movedAside);
      logger().warn({ from: nvramPath, to: movedAside, err: unreadable }, 'unreadable NVRAM log moved aside');
    }
    const region = await MmapNvram.open(nvramPath, { sizeBytes: label.nvram.sizeBytes, create: true });
    try {
      await NvLog.format(region, label.uuid);
    } finally {
      await region.close();
    }
    await syncDirectory(path.dirname(nvramPath));
    return { nvramPath, cpNumber: st.cpNumber, nvlogSeq: st.meta.nvlogSeq, movedAside };
  } finally {
    await lock.release();
  }
}

/**
 * Opens a volume whose NVRAM log is damaged mid-log read-write, commits the records that
 * replay, drops the rest (a new log epoch) and closes it. Returns the dropped range, or
 * undefined if the log was not damaged (then it is an ordinary open and close).
 */
export async function acceptNvramLoss(dir: string, beforeRecovery?: OpenVolumeDirOptions['beforeRecovery']): Promise<{ firstLostSeq: number; lastLostSeq: number } | undefined> {
  const absDir = path.resolve(dir);
  await readLabel(absDir);
  if (await volumeDirInUse(absDir)) throw new Error(`volume ${absDir} is already in use by another process; stop it before repairing`);
  const opened = await openVolumeDir(absDir, { readOnly: false, control: false, cpIntervalMs: 0, acceptNvramLoss: true, ...(beforeRecovery ? { beforeRecovery } : {}) });
  const d = opened.volume.log.replaySummary.damage;
  await opened.close();
  return d && { firstLostSeq: d.firstLostSeq, lastLostSeq: d.lastLostSeq };
}
