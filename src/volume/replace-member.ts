/**
 * `replace-member DIR OLD NEW [--rate R]`: rebuilds member OLD's contents onto a new file
 * NEW from the other members, only for the stripes in use (the space map: active |
 * summary) plus the head copies, then labels NEW as that member (generation + 1 on every
 * member in service, so OLD is stale if it comes back) and names it in nvmirror.json.
 * OLD is never read (it may be gone or failing). src/raid/rebuild.ts does the rebuild.
 *
 * Unserved: here, under the volume lock. Served: by the serving process (DIR/control.sock,
 * ops `replace-member` and `replace-progress`), while clients read and write: every write
 * from the start of the rebuild reaches NEW too (RaidDevice.startRebuild), so no stripe is
 * left stale; `status` shows the progress.
 *
 * Resume: DIR/replace-member.json (the marker) records the replacement and `nextStripe`:
 * every stripe in use below it is current on NEW, durably. It is written before NEW gets
 * any write, then at most every second (rebuild.ts: at the end of a batch, PROGRESS_PERSIST_MS) after NEW is synced. While it
 * exists, every open of the volume for writing (openMemberDevice: serve, scrub --repair,
 * ...) opens NEW as the member being rebuilt, so every write reaches it and the progress
 * stays true; a serving process resumes the rebuild by itself, and running the same
 * command again (unserved) goes on from there. Order at the end: labels on the members
 * (NEW in service), then nvmirror.json, then the marker is removed; a crash in between is
 * finished by the next open or run.
 *
 * Invariants:
 * - Bad input (not RAID, RAID-0, OLD not a member, NEW already a member or an existing
 *   file without a matching marker, another replacement in progress, a bad rate) is one
 *   line and changes nothing.
 * - NEW is in service (labelled, listed) only once every stripe in use is current on it
 *   and synced.
 * - Memory: one stripe unit per member at a time, one byte per stripe, one bit per block.
 */
import * as fs from 'fs';
import * as path from 'path';
import { FileBlockDevice, writeFileDurably } from '../io/file-device';
import { systemClock, type Clock } from '../io/types';
import { BlockTree } from '../tree/tree';
import { isBlockDevice, openFreeBlockDevice, openRaidMembers } from './raid-members';
import { RAID_JOURNAL_NAME } from '../raid/journal-file';
import { RaidDevice, type RebuildStatus } from '../raid/raid-device';
import { runRebuild, type RebuildRunResult } from '../raid/rebuild';
import { log as logger } from '../util/log';
import type { EngineVolume } from './engine';
import { CONTROL_SOCKET_NAME, controlRequest } from './engine-control';
import { lockVolumeDir, volumeDirInUse } from './dir-lock';
import { readLabel, resolveIn, writeLabel, type VolumeLabel } from './label';

export const REPLACE_MARKER_NAME = 'replace-member.json';

/** The system clock with timers that keep the process alive (systemClock's are unref'd: an unserved run has nothing else pending while it waits for the rate). */
const keepAliveClock: Clock = {
  nowMs: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    return { cancel: () => clearTimeout(t) };
  },
};

export interface ReplaceMarker {
  uuid: string;
  index: number;
  old: string;
  /** NEW as the volume label will name it. */
  new: string;
  /** The CP the rebuild began at (information only). */
  cpNumber: number;
  /** Every stripe in use below it is current on NEW, durably. */
  nextStripe: number;
  rateBytesPerSec?: number;
}

export type ReplaceProgress = RebuildStatus;

export interface ReplaceResult {
  index: number;
  old: string;
  new: string;
  stripesRebuilt: number;
  /** Stripes already rebuilt by an earlier, interrupted run. */
  resumedAt: number;
  bytesWritten: number;
  durationMs: number;
  /** Rebuilt by the serving process. */
  served: boolean;
}

export async function readReplaceMarker(absDir: string): Promise<ReplaceMarker | undefined> {
  const p = path.join(absDir, REPLACE_MARKER_NAME);
  let text: string;
  try {
    text = await fs.promises.readFile(p, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const m = JSON.parse(text) as ReplaceMarker;
  if (typeof m.uuid !== 'string' || !Number.isInteger(m.index) || typeof m.old !== 'string' || typeof m.new !== 'string' || !Number.isInteger(m.nextStripe) || m.nextStripe < 0) {
    throw new Error(`${p} is not a replace-member marker: remove it only if no replacement is in progress`);
  }
  return m;
}

function writeMarker(absDir: string, m: ReplaceMarker): Promise<void> {
  return writeFileDurably(absDir, REPLACE_MARKER_NAME, `${JSON.stringify(m)}\n`);
}

/**
 * NEW, empty, for a rebuild from stripe 0: a block device is opened as it is (checked
 * free, its size enough); a file is created sparse (an earlier copy nobody forwarded
 * writes to is removed first).
 */
async function freshNewMember(absNew: string, memberBlocks: number): Promise<FileBlockDevice> {
  if (await isBlockDevice(absNew)) return openFreeBlockDevice(absNew, absNew, memberBlocks);
  if (fs.existsSync(absNew)) await fs.promises.rm(absNew);
  return FileBlockDevice.create(absNew, memberBlocks);
}

/** NEW as the volume label names it: relative to DIR when inside it. */
function labelName(absDir: string, absNew: string): string {
  const rel = path.relative(absDir, absNew);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : absNew;
}

export interface ResolvedReplace {
  index: number;
  oldName: string;
  newName: string;
  absNew: string;
  /** The marker of this same replacement, in progress. */
  marker: ReplaceMarker | undefined;
}

/**
 * Validates a replacement (one-line errors, nothing changed). OLD: the member's path as
 * the label lists it, its path, or its index; NEW: an absolute path or one relative to
 * the caller's cwd.
 */
export async function resolveReplace(absDir: string, label: VolumeLabel, oldArg: string, newArg: string): Promise<ResolvedReplace> {
  if (!label.raid) throw new Error(`${absDir} is not a RAID volume: it has no member to replace`);
  if (label.raid.level === 0) throw new Error('RAID-0 has no redundancy: a member cannot be rebuilt');
  const absNew = path.resolve(newArg);
  const newName = labelName(absDir, absNew);
  const marker = await readReplaceMarker(absDir);
  const byArg = (a: string): number => label.members.findIndex((m, i) => m.path === a || resolveIn(absDir, m.path) === path.resolve(a) || String(i) === a);
  let index = byArg(oldArg);
  if (marker) {
    if (marker.uuid !== label.uuid || marker.new !== newName || (index >= 0 && index !== marker.index) || (index < 0 && marker.old !== oldArg)) {
      throw new Error(`a replacement of member ${marker.index} ${marker.old} by ${marker.new} is in progress (${path.join(absDir, REPLACE_MARKER_NAME)}): run replace-member ${absDir} ${marker.old} ${marker.new} to finish it`);
    }
    index = marker.index;
  } else {
    if (index < 0) throw new Error(`${oldArg} is not a member of ${absDir} (members: ${label.members.map((m, i) => `${i} ${m.path}`).join(', ')})`);
    if (byArg(newArg) >= 0 || label.members.some((m) => m.path === newName)) throw new Error(`${newArg} is already a member of ${absDir}`);
    if (await isBlockDevice(absNew)) await (await openFreeBlockDevice(absNew, absNew, label.members[0]!.blockCount)).close();
    else if (fs.existsSync(absNew)) throw new Error(`${absNew} exists: give a new file (replace-member creates it) or a block device`);
  }
  return { index, oldName: marker?.old ?? label.members[index]!.path, newName, absNew, marker };
}

/** Puts NEW in the label and removes the marker (after the members' labels name it). */
async function finishLabel(absDir: string, label: VolumeLabel, r: ResolvedReplace): Promise<void> {
  label.members[r.index] = { path: r.newName, blockCount: label.members[r.index]!.blockCount };
  await writeLabel(absDir, label);
  await fs.promises.rm(path.join(absDir, REPLACE_MARKER_NAME), { force: true });
}

/** How an open for writing treats a replacement in progress (openMemberDevice). */
export async function replacingAtOpen(absDir: string, label: VolumeLabel, readOnly: boolean): Promise<{ index: number; file: { name: string; path: string }; dev?: FileBlockDevice; doneBelow?: number } | undefined> {
  const m = await readReplaceMarker(absDir);
  if (!m || m.uuid !== label.uuid || !label.raid || m.index < 0 || m.index >= label.members.length) return undefined;
  const file = { name: m.new, path: resolveIn(absDir, m.new) };
  if (label.members[m.index]!.path === m.new) return undefined; // finished but for the marker: the open's caller removes it
  if (readOnly || !fs.existsSync(file.path)) return { index: m.index, file };
  const dev = await FileBlockDevice.open(file.path);
  if (dev.blockCount < label.members[m.index]!.blockCount) {
    await dev.close();
    return { index: m.index, file };
  }
  return { index: m.index, file, dev, doneBelow: m.nextStripe };
}

export interface ReplaceOptions {
  rateBytesPerSec?: number;
  clock?: Clock;
  onProgress?: (p: ReplaceProgress) => void;
  /** (tests) stop like a crash would after rebuilding that many stripes in this run. */
  stopAfterStripes?: number;
}

/** replace-member of an unserved volume (the CLI asks the serving process when it is served). */
export async function replaceMember(dir: string, oldArg: string, newArg: string, opts: ReplaceOptions = {}): Promise<ReplaceResult> {
  const clock = opts.clock ?? keepAliveClock;
  const t0 = clock.nowMs();
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  const r = await resolveReplace(absDir, label, oldArg, newArg);
  if (r.marker && label.members[r.index]!.path === r.newName) {
    // The crash came after nvmirror.json named NEW: only the marker is left.
    await fs.promises.rm(path.join(absDir, REPLACE_MARKER_NAME));
    return { index: r.index, old: r.oldName, new: r.newName, stripesRebuilt: 0, resumedAt: r.marker.nextStripe, bytesWritten: 0, durationMs: clock.nowMs() - t0, served: false };
  }
  if (await volumeDirInUse(absDir)) throw new Error(`volume ${absDir} is served: run replace-member again to replace the member through the serving process`);
  const lock = await lockVolumeDir(absDir, false);
  try {
    const memberBlocks = label.members[0]!.blockCount;
    const files = label.members.map((m) => ({ name: m.path, path: resolveIn(absDir, m.path) }));
    const resumable = r.marker !== undefined && fs.existsSync(r.absNew);
    let dev: FileBlockDevice | undefined;
    if (resumable) {
      dev = await FileBlockDevice.open(r.absNew);
      if (dev.blockCount < memberBlocks) {
        await dev.close();
        throw new Error(`${r.absNew} has ${dev.blockCount} blocks, the member needs ${memberBlocks}`);
      }
    } else {
      dev = await freshNewMember(r.absNew, memberBlocks);
    }
    const start = resumable ? r.marker!.nextStripe : 0;
    const rate = opts.rateBytesPerSec ?? r.marker?.rateBytesPerSec;
    // The stripe journal is replayed at this open, before the tree is read. A resumed run
    // attaches NEW first (stripes below `start` current on it), so the replay reaches it too;
    // a fresh run rebuilds every stripe in use from the others, which the replay made current.
    const attach = resumable ? { dev, doneBelow: start } : {};
    const raid = await openRaidMembers(files, label.raid!, memberBlocks, label.uuid, false, { index: r.index, file: { name: r.newName, path: r.absNew }, ...attach }, { journalPath: path.join(absDir, RAID_JOURNAL_NAME) }).catch(async (e: unknown) => {
      await dev!.close();
      throw e;
    });
    if (resumable) dev = undefined; // the RAID device owns it now
    try {
      const h = raid.health();
      if (h.state === 'failed') throw new Error(`${h.failure ?? 'too many members lost'}: member ${r.index} cannot be rebuilt`);
      const tree = await BlockTree.open(raid);
      const used = tree.usedBitmap();
      const cpNumber = tree.cpNumber;
      await tree.close();
      const marker: ReplaceMarker = { uuid: label.uuid, index: r.index, old: r.oldName, new: r.newName, cpNumber, nextStripe: start, ...(rate !== undefined ? { rateBytesPerSec: rate } : {}) };
      await writeMarker(absDir, marker);
      if (dev) {
        raid.startRebuild(r.index, r.newName, dev, start);
        dev = undefined; // the RAID device owns it now
      }
      const res = await runRebuild({ index: r.index, old: r.oldName, new: r.newName, resumedAtStripe: start }, {
        raid, usedBitmap: () => used, clock,
        persist: (nextStripe) => writeMarker(absDir, { ...marker, nextStripe }),
        ...(rate !== undefined ? { rateBytesPerSec: rate } : {}),
        ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
        ...(opts.stopAfterStripes !== undefined ? { stopAfterStripes: opts.stopAfterStripes } : {}),
      });
      // NEW in service: labels (generation + 1) on every member in service, then the volume label.
      raid.finishRebuild();
      await raid.sync();
      const after = raid.health();
      if (after.memberStatus[r.index]!.state !== 'online') throw new Error(`the new member ${r.newName} left service while labelling: ${after.memberStatus[r.index]!.reason ?? ''}`);
      await finishLabel(absDir, label, r);
      return { index: r.index, old: r.oldName, new: r.newName, stripesRebuilt: res.stripesRebuilt, resumedAt: start, bytesWritten: res.bytesWritten, durationMs: clock.nowMs() - t0, served: false };
    } finally {
      await dev?.close().catch(() => undefined);
      await raid.close();
    }
  } finally {
    await lock.release();
  }
}

// ---- while served ----

interface ServedJob {
  index: number;
  newName: string;
  done: Promise<ReplaceResult>;
  stopping: string | undefined;
}

const jobs = new WeakMap<EngineVolume, ServedJob>();

/** The rebuild a serving process runs, if any (for status and replace-progress). */
export function servedReplaceProgress(raid: RaidDevice): RebuildStatus | null {
  return raid.health().rebuild ?? null;
}

/**
 * replace-member in the serving process (the control op, or a resume at open when the
 * marker says one is in progress). Answers when NEW is in service. One at a time; a
 * request for the one running waits for it.
 */
export async function replaceMemberServed(absDir: string, label: VolumeLabel, volume: EngineVolume, raid: RaidDevice, req: { old: string; new: string; rateBytesPerSec?: number }, clock: Clock = systemClock): Promise<ReplaceResult> {
  if (volume.caps.readOnly) throw new Error('the volume is served read-only: a member cannot be rebuilt');
  const newName = labelName(absDir, path.resolve(req.new));
  const running = jobs.get(volume);
  if (running) {
    if (newName !== running.newName) throw new Error(`a replacement of member ${running.index} by ${running.newName} is in progress in the serving process; wait for it (nvmirror status shows it)`);
    return running.done;
  }
  // Registered before any await: a second request (or the resume at open) finds this one.
  const job: ServedJob = { index: -1, newName, done: undefined as unknown as Promise<ReplaceResult>, stopping: undefined };
  jobs.set(volume, job);
  job.done = (async (): Promise<ReplaceResult> => {
    const r = await resolveReplace(absDir, label, req.old, req.new);
    job.index = r.index;
    if (r.marker && label.members[r.index]!.path === r.newName) {
      await fs.promises.rm(path.join(absDir, REPLACE_MARKER_NAME));
      return { index: r.index, old: r.oldName, new: r.newName, stripesRebuilt: 0, resumedAt: r.marker.nextStripe, bytesWritten: 0, durationMs: 0, served: true };
    }
    const h = raid.health();
    if (h.state === 'failed') throw new Error(`${h.failure ?? 'too many members lost'}: member ${r.index} cannot be rebuilt`);
    return runServed(absDir, label, volume, raid, r, req.rateBytesPerSec ?? r.marker?.rateBytesPerSec, clock, job);
  })().finally(() => {
    if (jobs.get(volume) === job) jobs.delete(volume);
  });
  return job.done;
}

async function runServed(absDir: string, label: VolumeLabel, volume: EngineVolume, raid: RaidDevice, r: ResolvedReplace, rate: number | undefined, clock: Clock, job: ServedJob): Promise<ReplaceResult> {
  const t0 = clock.nowMs();
  const memberBlocks = label.members[0]!.blockCount;
  const tree = volume.tree;
  if (!(tree instanceof BlockTree)) throw new Error('replace-member needs the engine\'s block tree');
  let start = 0;
  const status = raid.health();
  if (status.rebuild === undefined && status.memberStatus[r.index]!.state === 'rebuilding') {
    // Opened with the marker (a resume): the RAID device is rebuilding onto NEW already.
    start = raid.rebuildResumedAt();
  } else {
    const dev = await freshNewMember(r.absNew, memberBlocks); // a copy nobody forwarded writes to: start again
    try {
      await writeMarker(absDir, { uuid: label.uuid, index: r.index, old: r.oldName, new: r.newName, cpNumber: tree.cpNumber, nextStripe: 0, ...(rate !== undefined ? { rateBytesPerSec: rate } : {}) });
      raid.startRebuild(r.index, r.newName, dev, 0);
    } catch (e) {
      await dev.close();
      await fs.promises.rm(path.join(absDir, REPLACE_MARKER_NAME), { force: true });
      throw e;
    }
  }
  const marker: ReplaceMarker = { uuid: label.uuid, index: r.index, old: r.oldName, new: r.newName, cpNumber: tree.cpNumber, nextStripe: start, ...(rate !== undefined ? { rateBytesPerSec: rate } : {}) };
  logger().info({ member: r.index, old: r.oldName, new: r.newName, resumedAtStripe: start, rate }, 'replace-member: rebuilding while served');
  try {
    const res: RebuildRunResult = await runRebuild({ index: r.index, old: r.oldName, new: r.newName, resumedAtStripe: start }, {
      raid, usedBitmap: () => tree.usedBitmap(), clock,
      persist: (nextStripe) => writeMarker(absDir, { ...marker, nextStripe }),
      stopReason: () => job.stopping,
      ...(rate !== undefined ? { rateBytesPerSec: rate } : {}),
    });
    raid.finishRebuild();
    await volume.checkpoint(); // what the clients wrote, durable on every member
    await raid.sync(); // the labels (generation + 1): NEW in service
    const after = raid.health();
    if (after.memberStatus[r.index]!.state !== 'online' || after.generation <= status.generation) throw new Error(`the new member ${r.newName} left service while labelling: ${after.memberStatus[r.index]!.reason ?? ''}`);
    await finishLabel(absDir, label, r);
    logger().info({ member: r.index, new: r.newName, stripes: res.stripesRebuilt, late: res.stripesLate }, 'replace-member: the new member is in service');
    return { index: r.index, old: r.oldName, new: r.newName, stripesRebuilt: res.stripesRebuilt, resumedAt: start, bytesWritten: res.bytesWritten, durationMs: clock.nowMs() - t0, served: true };
  } catch (e) {
    if (job.stopping === undefined) raid.abortRebuild(e instanceof Error ? e.message : String(e));
    throw e;
  }
}

/** At open for serving: resumes a replacement the marker says is in progress (in the background). */
export function resumeServedReplace(absDir: string, label: VolumeLabel, volume: EngineVolume, raid: RaidDevice): void {
  void (async () => {
    const m = await readReplaceMarker(absDir);
    if (!m || volume.caps.readOnly) return;
    const res = await replaceMemberServed(absDir, label, volume, raid, { old: m.old, new: resolveIn(absDir, m.new) });
    logger().info({ member: res.index, new: res.new, resumedAt: res.resumedAt }, 'replace-member: resumed replacement finished');
  })().catch((e: unknown) => logger().error({ err: e instanceof Error ? e.message : String(e) }, 'replace-member: the resumed replacement failed'));
}

/** Before the volume closes: stops a rebuild in progress (its persisted progress stays for the next open). */
export async function stopServedReplace(volume: EngineVolume): Promise<void> {
  const job = jobs.get(volume);
  if (!job) return;
  job.stopping = 'the volume is closing';
  await job.done.catch(() => undefined);
}

// ---- the CLI's entry ----

const PROGRESS_POLL_MS = 250;
const REPLACE_ANSWER_TIMEOUT_MS = 7 * 24 * 3600 * 1000;

/** replace-member of a volume directory: here when unserved, else through the serving process's control socket. */
export async function replaceMemberDir(dir: string, oldArg: string, newArg: string, opts: ReplaceOptions = {}): Promise<ReplaceResult> {
  const absDir = path.resolve(dir);
  if (!(await volumeDirInUse(absDir))) return replaceMember(absDir, oldArg, newArg, opts);
  const label = await readLabel(absDir);
  const r = await resolveReplace(absDir, label, oldArg, newArg); // one-line errors here, before asking
  const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
  if (!fs.existsSync(sockPath)) throw new Error(`volume ${absDir} is open in another process that has no control socket; stop it before running replace-member`);
  let finished = false;
  const poll = async (): Promise<void> => {
    for (let first = true; !finished && opts.onProgress; first = false) {
      if (!first) await new Promise((res) => setTimeout(res, PROGRESS_POLL_MS));
      if (finished) return;
      const p = await controlRequest(sockPath, { op: 'replace-progress' }, 10_000).catch(() => undefined);
      if (!finished && p?.ok && p.progress) opts.onProgress(p.progress as ReplaceProgress);
    }
  };
  const polling = poll();
  try {
    const res = await controlRequest(sockPath, { op: 'replace-member', old: String(r.index), new: r.absNew, ...(opts.rateBytesPerSec !== undefined ? { rateBytesPerSec: opts.rateBytesPerSec } : {}) }, REPLACE_ANSWER_TIMEOUT_MS);
    if (!res.ok) throw new Error(`serving process: ${res.error}`);
    return res.replace as ReplaceResult;
  } finally {
    finished = true;
    await polling;
  }
}
