/**
 * An open volume's status, check and control requests, as the process that has it open
 * answers them (`status` and `check` of an unserved volume open it and call these; of a
 * served one they ask its serving process through DIR/control.sock: dir-ops.ts).
 *
 * Invariants:
 * - At most one check runs per open volume; it checks the committed roots (pinned), so
 *   CPs go on meanwhile. The NVRAM belongs to the writer and is not checked here.
 * - Control requests that would write refuse on a volume served read-only, with one line.
 */
import { BlockTree } from '../tree/tree';
import type { BlockErrorCounts, CpPhases } from '../tree/types';
import { logDroppedLines, log as logger } from '../util/log';
import { EngineVolume, type ServedBy } from './engine';
import { type ControlRequest } from './engine-control';
import type { VolumeDirExports } from './engine-snapshot';
import { journalPendingText } from '../raid/journal-file';
import { RaidDevice, type RaidHealth } from '../raid/raid-device';
import { scrubRaid, scrubState, type ScrubState } from '../raid/scrub';
import { scrubCheckpointStore } from './scrub-progress';
import { replaceMemberServed, servedReplaceProgress } from './replace-member';
import { resolveIn, type VolumeLabel } from './label';
import { BLOCK_SIZE_BYTES } from '../io/types';

const BS = BLOCK_SIZE_BYTES;

export interface VolumeStatus {
  dir: string;
  uuid: string;
  sizeBytes: number;
  served: boolean;
  readOnly: boolean;
  usedBytes: number;
  deviceBytes: number;
  snapshots: Array<{ name: string; cpNumber: number; createdMs: number; usedBytes: number }>;
  cpNumber: number;
  lastCpMs: number;
  lastCpDurationMs: number;
  cpsThisSession: number;
  /** A CP failed (e.g. the member's file system is full): the volume takes no more writes until it is restarted. */
  cpFailure?: string;
  /** What the clients' writes fail with meanwhile (ENOSPC, EIO). */
  cpFailureCode?: string | undefined;
  /** The last CP this process committed: blocks written (data and the rest), freed, and where its time went (ms). */
  lastCp?: { cpNumber: number; durationMs: number; dataBlocks: number; earlyBlocks?: number; blocksWritten: number; blocksFreed: number; phases: CpPhases };
  /** Data blocks of large WRITEs written to the member ahead of their CP, this session: placed, taken by a CP where they were, and records left to the CP. */
  early?: { placedBlocks: number; adoptedBlocks: number; skippedRecords: number };
  nvram: { path: string; sizeBytes: number; usedBytes: number; fillPercent: number; epoch: number; lastSeq: number; durableSeq: number; unreplayedRecords: number };
  /** The serving process (absent when not served): its pid, and its URIs, exports and clients when it serves over NBD. */
  server?: { pid: number; logDroppedLines?: number } & Partial<ServedBy>;
  /** Reads refused since the volume was opened (by the serving process, or by this status). */
  errors: BlockErrorCounts;
  /** Whole-block READs the NBD threads answered from the block map (hits) or passed on (misses), and those the native read pool read from the disk (poolReads), this session. */
  threadReads?: { hits: number; misses: number; poolReads: number };
  /** Plain WRITEs the NBD threads appended to the NVRAM log themselves, this session. */
  threadWrites?: number;
  /** Of those, records stored with pwrite (within a few ms of a FLUSH round: cheaper to make durable) instead of through the mapping. */
  threadFileStores?: number;
  /** Plain FLUSHes and FUA WRITEs the NBD threads made durable themselves (fdatasync of the NVRAM file; under a sync mirror with the destination's durable ack), this session. */
  threadFlushes?: number;
  /** Sections added by what runs beside the engine (e.g. `mirror`). */
  sections?: Record<string, unknown>;
  /** A RAID volume: level, state, and each member's state and error counts. */
  raid?: RaidHealth & { scrub?: ScrubState };
}

/** The RAID device under each open RAID volume (for status). */
const raidOf = new WeakMap<EngineVolume, RaidDevice>();

/** Records the RAID device under an open volume (openVolumeDir). */
export function noteRaidDevice(volume: EngineVolume, dev: RaidDevice): void {
  raidOf.set(volume, dev);
}

/** The RAID device under an open RAID volume (undefined: not RAID). */
export function raidDeviceOf(volume: EngineVolume): RaidDevice | undefined {
  return raidOf.get(volume);
}

/** One line per lost member, for check's notes. */
export function raidNotes(h: RaidHealth): string[] {
  const lost = h.memberStatus.filter((m) => m.state !== 'online');
  return [
    `RAID-${h.level}: ${h.state.toUpperCase()}, ${h.members - lost.length} of ${h.members} members in service`,
    ...lost.map((m) => `RAID member ${m.index} ${m.name}: ${m.state} (${m.reason ?? ''})`),
    ...(h.journalPending ? [journalPendingText(h.journalPending)] : []),
  ];
}

export function engineStatus(dir: string, label: VolumeLabel, volume: EngineVolume, served: boolean): VolumeStatus {
  const s = volume.stats();
  const capacity = 2 * s.nvlog.halfSizeBytes;
  // A volume opened read-only keeps replayed records as an overlay: report them as the fill.
  const used = s.readOnly ? volume.log.recoveryHalves().reduce((n, h) => n + h.usedBytes, 0) : s.nvlog.usedBytes;
  return {
    dir,
    uuid: label.uuid,
    sizeBytes: label.sizeBytes,
    served,
    readOnly: s.readOnly,
    usedBytes: s.tree.usedBlocks * BS,
    deviceBytes: s.tree.totalBlocks * BS,
    snapshots: s.tree.snapshots.map((x) => ({ name: x.name, cpNumber: x.cpNumber, createdMs: x.createdMs, usedBytes: x.usedBlocks * BS })),
    cpNumber: s.tree.cpNumber,
    lastCpMs: s.tree.lastCpMs,
    lastCpDurationMs: s.tree.lastCpDurationMs,
    cpsThisSession: s.cp.cpsRun,
    ...(s.cp.failure !== undefined ? { cpFailure: s.cp.failure, cpFailureCode: s.cp.failureCode } : {}),
    ...(s.tree.lastCp ? { lastCp: s.tree.lastCp } : {}),
    nvram: {
      path: resolveIn(dir, label.nvram.path),
      sizeBytes: label.nvram.sizeBytes,
      usedBytes: used,
      fillPercent: capacity > 0 ? Math.round((used / capacity) * 1000) / 10 : 0,
      epoch: s.nvlog.epoch,
      lastSeq: s.nvlog.lastSeq,
      durableSeq: s.nvlog.durableSeq,
      unreplayedRecords: s.readOnly ? s.replay.records : 0,
    },
    ...(served ? { server: { pid: process.pid, ...(volume.servedBy?.() ?? {}), logDroppedLines: logDroppedLines() } } : {}),
    errors: s.tree.errors,
    ...(served && s.threadReads ? { threadReads: s.threadReads } : {}),
    ...(served && s.threadWrites !== undefined ? { threadWrites: s.threadWrites } : {}),
    ...(served && s.threadFileStores !== undefined ? { threadFileStores: s.threadFileStores } : {}),
    ...(served && s.threadFlushes !== undefined ? { threadFlushes: s.threadFlushes } : {}),
    ...(served && s.early ? { early: s.early } : {}),
    ...(raidOf.has(volume) ? { raid: { ...raidOf.get(volume)!.health(), scrub: scrubState(raidOf.get(volume)!) } } : {}),
    ...(volume.statusSections.size > 0 ? { sections: Object.fromEntries([...volume.statusSections].map(([k, f]) => [k, f()])) } : {}),
  };
}

/** The control socket's requests (DIR/control.sock) for a volume this process serves. */
export async function handleControl(dir: string, label: VolumeLabel, volume: EngineVolume, req: ControlRequest, exports?: VolumeDirExports): Promise<Record<string, unknown>> {
  switch (req.op) {
    case 'status':
      return { status: engineStatus(dir, label, volume, true) };
    case 'list':
      return { snapshots: volume.listSnapshots() };
    case 'checkpoint': {
      if (volume.caps.readOnly) throw new Error('the volume is served read-only');
      const r = await volume.checkpoint();
      return { cpNumber: r?.cpNumber ?? volume.stats().tree.cpNumber };
    }
    case 'check':
      return { check: await checkServed(dir, label, volume) };
    case 'check-progress':
      return { progress: checksRunning.get(volume) ?? null };
    case 'scrub': {
      const raid = raidOf.get(volume);
      if (!raid || !(volume.tree instanceof BlockTree)) throw new Error(`${dir} is not a RAID volume: there is nothing to scrub (use check)`);
      if (req.repair && volume.caps.readOnly) throw new Error('the volume is served read-only: scrub --repair cannot rewrite anything (scrub without --repair reports)');
      return { scrub: await scrubRaid(volume.tree, raid, { repair: req.repair, store: scrubCheckpointStore(dir, label.uuid), ...(req.rateBytesPerSec !== undefined ? { rateBytesPerSec: req.rateBytesPerSec } : {}) }) };
    }
    case 'scrub-progress': {
      const raid = raidOf.get(volume);
      return { progress: raid ? scrubState(raid).running ?? null : null };
    }
    case 'replace-member': {
      const raid = raidOf.get(volume);
      if (!raid) throw new Error(`${dir} is not a RAID volume: it has no member to replace`);
      return { replace: await replaceMemberServed(dir, label, volume, raid, { old: req.old, new: req.new, ...(req.rateBytesPerSec !== undefined ? { rateBytesPerSec: req.rateBytesPerSec } : {}) }) };
    }
    case 'replace-progress': {
      const raid = raidOf.get(volume);
      return { progress: raid ? servedReplaceProgress(raid) : null };
    }
    case 'verify': {
      const f = volume.controlActions.get('verify');
      if (!f) throw new Error('this volume is not mirrored (serve it with --mirror-to)');
      return f();
    }
    case 'snapshot': {
      if (volume.caps.readOnly) throw new Error('the volume is served read-only: snapshots cannot be changed');
      // A snapshot being read over NBD is deleted only when forced (ZFS: "dataset is busy"):
      // its readers would lose their device mid-use.
      const readers = req.kind === 'delete' ? exports?.snapshotReaders(req.name) ?? 0 : 0;
      if (readers > 0 && req.force !== true) {
        throw new Error(`snapshot ${req.name} is being read by ${readers} NBD client(s) (export "${exports!.snapshotExport(req.name)}"): disconnect them, or delete it with --force (their connections are closed)`);
      }
      const r = await volume.snapshot({ kind: req.kind, name: req.name });
      logger().info({ kind: req.kind, name: req.name, cp: r?.cpNumber }, 'snapshot changed');
      if (readers > 0) {
        const closed = exports!.revokeSnapshot(req.name);
        logger().warn({ name: req.name, connections: closed }, 'snapshot deleted with --force: the NBD connections reading it are closed');
      }
      return { cpNumber: r?.cpNumber ?? volume.stats().tree.cpNumber, snapshots: volume.listSnapshots() };
    }
    case 'release':
    case 'unrelease':
      throw new Error(`${req.op} is a receiver's request (for promote), not a volume's`);
  }
}

export interface DirCheckReport {
  ok: boolean;
  problems: string[];
  /** Plain facts for the human summary. */
  notes: string[];
  /** Pid of the process that ran the check on the served volume; absent when check opened the volume itself. */
  servedBy?: number;
  /** Blocks the tree check read (for the final progress figure). */
  blocksRead?: number;
}

/** Blocks read so far by a check; blocksTotal is an estimate (blocks in use). */
export interface CheckProgress {
  blocksRead: number;
  blocksTotal: number;
}

/** The check running in this (serving) process, per volume: at most one at a time. */
const checksRunning = new WeakMap<EngineVolume, CheckProgress>();

/**
 * In the serving process: the tree check on the committed roots (BlockTree.check() pins
 * them, so CPs go on meanwhile and nothing it reads is overwritten). The NVRAM belongs to
 * the writer and is not checked here.
 */
export async function checkServed(dir: string, label: VolumeLabel, volume: EngineVolume): Promise<DirCheckReport> {
  if (checksRunning.has(volume)) throw new Error(`a check of ${dir} is already running in the serving process`);
  const progress: CheckProgress = { blocksRead: 0, blocksTotal: volume.stats().tree.usedBlocks };
  checksRunning.set(volume, progress);
  try {
    const problems: string[] = [];
    const notes: string[] = [];
    const tree = volume.tree;
    if (tree.volumeUuid !== label.uuid) problems.push(`tree: belongs to volume ${tree.volumeUuid}, the label says ${label.uuid}`);
    const r = await tree.check((n) => { progress.blocksRead = n; });
    for (const p of r.problems) problems.push(`tree: ${p}`);
    const st = tree.stats();
    notes.push(`served by pid ${process.pid}: checked the committed roots (CP ${st.cpNumber} and its snapshots) while serving`);
    notes.push(`tree: CP ${st.cpNumber}, ${r.blocksReachable} blocks reachable, ${r.blocksAccounted} accounted, ${st.snapshots.length} snapshot(s)`);
    if (r.repaired) notes.push(`tree: ${r.repaired} block(s) failed verification on this disk and were repaired from the mirror (the log names them)`);
    notes.push(`NVRAM: in use by the serving process, not checked (stop it for a full check)`);
    return { ok: problems.length === 0, problems, notes, servedBy: process.pid, blocksRead: progress.blocksRead };
  } finally {
    checksRunning.delete(volume);
  }
}
