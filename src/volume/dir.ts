/**
 * Volume directories: `nvmirror create DIR` lays one out, `serve`/`attach`/`snapshot`/
 * `status`/`check` open it.
 *
 *   DIR/nvmirror.json   label: format version, uuid, size, block size, members, NVRAM
 *   DIR/nvmirror.lock   flock'ed exclusively by the one process that has the volume open;
 *                       a read-write holder writes its pid there (emptied on release)
 *   DIR/nvram.log       the NVRAM region (default; preallocated, zeroed)
 *   DIR/member-0.img    the member (default; sparse); a RAID volume (label `raid`) has
 *                       several, each with a RAID label (src/raid/members.ts)
 *   DIR/raid-journal.bin  a RAID-4/5/6 volume's stripe journal (src/raid/journal-file.ts):
 *                       partial stripes (CPs on a nearly full volume) go through it; created
 *                       by create or the first read-write open, replayed by every one
 *   DIR/control.sock    the serving process's control socket (engine-control.ts)
 *   DIR/nvram.clean     clean-stop record: the last read-write session committed every
 *                       NVRAM record (CP n, watermark seq s) and stopped
 *
 * Invariants:
 * - The label is written last during create (temp file, fsync, rename, fsync DIR): a
 *   directory with a label holds a complete, formatted volume.
 * - A volume is open in at most one process: open takes the lock before touching
 *   anything else and keeps it until close() has closed everything. Read-only opens
 *   (status, check, serve --read-only) write nothing in DIR: they open the lock file
 *   O_RDONLY, read a copy of the NVRAM, and on a read-only file system where the lock
 *   file does not exist they go without it (no process can hold a lock there, and none
 *   can write the volume). The control socket is then skipped with a warning.
 * - DIR/nvram.clean exists only while no read-write session is open and the last one
 *   stopped after a final CP whose watermark is its last NVRAM seq: it is written (temp,
 *   fsync, rename, fsync DIR) after that CP and removed (fsync DIR) by a read-write open
 *   before any record can be appended. It is what lets `repair --recreate-nvram` prove
 *   that a lost NVRAM log held nothing the tree lacks.
 * - A read-write open of a RAID-4/5/6 volume replays its stripe journal before the tree
 *   mounts (openMemberDevice); a read-only open leaves it and reports a batch it finds.
 * - Relative member/NVRAM paths in the label are relative to DIR.
 * - Every bad argument or bad directory is a one-line Error naming what is wrong.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import type { ExportRegistry } from './exports';
import type { BlockDevice, Clock, NvramRegion } from '../io/types';
import { BLOCK_SIZE_BYTES, systemClock } from '../io/types';
import { FileBlockDevice, syncDirectory, writeFileDurably } from '../io/file-device';
import { MmapNvram, NvramFileCopy } from '../io/mmap-nvram';
import * as native from '../io/native';
import { BlockTree } from '../tree/tree';
import type { BlockErrorCounts, BlockTreeApi } from '../tree/types';
import { MAX_DEVICE_BLOCKS, MAX_VOLUME_BYTES } from '../tree/layout';
import { NvLog } from '../nvlog/log';
import { REGION_MIN_BYTES, REGION_MAX_BYTES } from '../nvlog/format';
import { formatSize } from '../util/size';
import { log as logger } from '../util/log';
import { EngineVolume, type ServedBy } from './engine';
import { VolumeDirExports } from './engine-snapshot';
import { ControlServer, CONTROL_SOCKET_NAME, UNIX_PATH_MAX_BYTES, controlRequest, type ControlRequest } from './engine-control';
import { NvramFormatError, scanRegion } from '../nvlog/replay';
import { RAID_LEVELS, STRIPE_UNIT_DEFAULT_BYTES, geometryProblem, type RaidLevel } from '../raid/geometry';
import { createRaidMembers, isBlockDevice, openRaidMembers, raidMemberBlocks, type RaidSpec } from '../raid/members';
import { RAID_JOURNAL_NAME, journalPendingText, openRaidJournalFile } from '../raid/journal-file';
import { RaidDevice, type RaidHealth } from '../raid/raid-device';
import { scrubRaid, scrubState, type ScrubState } from '../raid/scrub';
import { scrubCheckpointStore } from './scrub-progress';
import { replaceMemberServed, replacingAtOpen, resumeServedReplace, servedReplaceProgress, stopServedReplace } from './replace-member';

export const LABEL_NAME = 'nvmirror.json';
export const LOCK_NAME = 'nvmirror.lock';
export const NVRAM_DEFAULT_NAME = 'nvram.log';
export const NVRAM_DEFAULT_BYTES = 32 * 1024 * 1024;
export const CLEAN_STOP_NAME = 'nvram.clean';
const CLEAN_STOP_MAX_BYTES = 4096;
export const LABEL_FORMAT = 'nvmirror-volume';
export const LABEL_VERSION = 1;
const LABEL_MAX_BYTES = 64 * 1024;
const BS = BLOCK_SIZE_BYTES;

export interface VolumeLabel {
  format: typeof LABEL_FORMAT;
  version: number;
  uuid: string;
  sizeBytes: number;
  blockSizeBytes: number;
  members: Array<{ path: string; blockCount: number }>;
  nvram: { path: string; sizeBytes: number };
  createdMs: number;
  /** A RAID volume (several members); absent: one member. */
  raid?: { level: RaidLevel; stripeUnitBytes: number };
}

export interface CreateVolumeDirOptions {
  sizeBytes: number;
  /** Member file paths (default: DIR/member-0.img). Several need `raid`. */
  members?: string[];
  /** RAID level and stripe unit over the members. */
  raid?: { level: number; stripeUnitBytes?: number };
  nvramPath?: string;
  nvramSizeBytes?: number;
  clock?: Clock;
}

export interface OpenVolumeDirOptions {
  readOnly: boolean;
  /** NBD export name of the live volume (default ""); snapshots are NAME@SNAP. */
  exportName?: string;
  cpIntervalMs?: number;
  clock?: Clock;
  /** Listen on DIR/control.sock (default true). */
  control?: boolean;
  /** Called with the mounted tree before NVRAM recovery commits anything (a mirror attaches its CP sink here). */
  beforeRecovery?: (tree: BlockTreeApi) => Promise<void>;
  /** Open read-write although the NVRAM log is damaged mid-log, dropping what cannot replay (repair --accept-nvram-loss). */
  acceptNvramLoss?: boolean;
}

export interface OpenedVolumeDir {
  dir: string;
  label: VolumeLabel;
  volume: EngineVolume;
  exports: ExportRegistry;
  close(): Promise<void>;
}

/** Device blocks for a volume: data, address and space-map blocks, CoW headroom for in-flight CPs and snapshots. */
export function memberBlocksFor(sizeBytes: number, nvramSizeBytes: number): number {
  const data = Math.ceil(sizeBytes / BS);
  const metadata = Math.ceil(data / 160) + Math.ceil(data / 30000) + 64;
  const snapshotHeadroom = Math.ceil(data / 4);
  const cpHeadroom = 8 * Math.ceil(nvramSizeBytes / BS) + 16384;
  return data + metadata + snapshotHeadroom + cpHeadroom;
}

/** A path of a volume directory's label: absolute as given, else relative to DIR. */
export function resolveIn(dir: string, p: string): string {
  return path.isAbsolute(p) ? p : path.join(dir, p);
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.promises.lstat(p);
    return true;
  } catch {
    return false;
  }
}

// ---- label ----

function validateLabel(v: unknown, where: string): VolumeLabel {
  const bad = (what: string): never => {
    throw new Error(`${where}: bad volume label (${what})`);
  };
  if (typeof v !== 'object' || v === null) bad('not an object');
  const o = v as Record<string, unknown>;
  if (o.format !== LABEL_FORMAT) bad(`format is not "${LABEL_FORMAT}"`);
  if (o.version !== LABEL_VERSION) bad(`unsupported version ${String(o.version)}`);
  if (typeof o.uuid !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(o.uuid)) bad('uuid');
  if (typeof o.sizeBytes !== 'number' || !Number.isSafeInteger(o.sizeBytes) || o.sizeBytes <= 0 || o.sizeBytes % BS !== 0) bad('sizeBytes');
  if (o.blockSizeBytes !== BS) bad(`blockSizeBytes must be ${BS}`);
  const raid = o.raid as Record<string, unknown> | undefined;
  if (raid !== undefined) {
    if (typeof raid !== 'object' || raid === null || !Array.isArray(o.members)) bad('raid');
    const problem = geometryProblem(Number(raid.level), (o.members as unknown[]).length, Number(raid.stripeUnitBytes));
    if (problem !== null) bad(`raid: ${problem}`);
  } else if (!Array.isArray(o.members) || o.members.length !== 1) {
    bad('exactly one member without raid');
  }
  for (const m of o.members as unknown[]) {
    const mm = m as Record<string, unknown>;
    if (typeof mm !== 'object' || mm === null || typeof mm.path !== 'string' || typeof mm.blockCount !== 'number' || !Number.isSafeInteger(mm.blockCount)) bad('member');
  }
  const nv = o.nvram as Record<string, unknown> | undefined;
  if (typeof nv !== 'object' || nv === null || typeof nv.path !== 'string' || typeof nv.sizeBytes !== 'number' || !Number.isSafeInteger(nv.sizeBytes)) bad('nvram');
  if (typeof o.createdMs !== 'number') bad('createdMs');
  return o as unknown as VolumeLabel;
}

export async function readLabel(dir: string): Promise<VolumeLabel> {
  const p = path.join(dir, LABEL_NAME);
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(dir);
  } catch {
    throw new Error(`no such volume directory: ${dir}`);
  }
  if (!st.isDirectory()) throw new Error(`not a directory: ${dir}`);
  let text: string;
  try {
    const fst = await fs.promises.stat(p);
    if (fst.size > LABEL_MAX_BYTES) throw new Error(`${p}: label is larger than ${LABEL_MAX_BYTES} bytes`);
    text = await fs.promises.readFile(p, 'utf8');
  } catch (e) {
    if (native.errnoCode(e) === 'ENOENT' && (await exists(`${p}.demoted`))) throw new Error(`${dir} was demoted: its member is now a mirror (see ${path.join(dir, 'DEMOTED.json')})`);
    if (native.errnoCode(e) === 'ENOENT') throw new Error(`${dir} is not an nvmirror volume directory (no ${LABEL_NAME}; create one with \`nvmirror create\`)`);
    throw e;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new Error(`${p}: bad volume label (not JSON)`);
  }
  return validateLabel(v, p);
}

export async function writeLabel(dir: string, label: VolumeLabel): Promise<void> {
  await writeFileDurably(dir, LABEL_NAME, `${JSON.stringify(label, null, 2)}\n`);
}

// ---- clean-stop record ----

export interface CleanStop {
  uuid: string;
  cpNumber: number;
  nvlogSeq: number;
  stoppedMs: number;
}

async function writeCleanStop(dir: string, rec: CleanStop): Promise<void> {
  const p = path.join(dir, CLEAN_STOP_NAME);
  const tmp = `${p}.tmp-${process.pid}`;
  const fh = await fs.promises.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(`${JSON.stringify(rec)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.promises.rename(tmp, p);
  await syncDirectory(dir);
}

/** Removes the clean-stop record (durably) before a read-write session can append. */
async function clearCleanStop(dir: string): Promise<void> {
  const p = path.join(dir, CLEAN_STOP_NAME);
  if (!(await exists(p))) return;
  await fs.promises.rm(p);
  await syncDirectory(dir);
}

/** The clean-stop record, or undefined if there is none (or it is not one). */
export async function readCleanStop(dir: string): Promise<CleanStop | undefined> {
  let text: string;
  try {
    const fh = await fs.promises.open(path.join(dir, CLEAN_STOP_NAME), 'r');
    try {
      const buf = Buffer.alloc(CLEAN_STOP_MAX_BYTES);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      text = buf.toString('utf8', 0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch {
    return undefined;
  }
  try {
    const o = JSON.parse(text) as Record<string, unknown>;
    const int = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
    if (typeof o.uuid !== 'string' || !int(o.cpNumber) || !int(o.nvlogSeq) || !int(o.stoppedMs)) return undefined;
    return { uuid: o.uuid, cpNumber: o.cpNumber, nvlogSeq: o.nvlogSeq, stoppedMs: o.stoppedMs };
  } catch {
    return undefined;
  }
}

/**
 * A thin member grows as blocks are first written. The warning line for `create` when
 * the member could outgrow the free space of its file system, or undefined.
 */
export async function memberSpaceWarning(dir: string, label: VolumeLabel): Promise<string | undefined> {
  const member = label.members[0]!;
  const memberPath = resolveIn(path.resolve(dir), member.path);
  const st = await fs.promises.stat(memberPath);
  if (st.isBlockDevice()) return undefined; // not thin: its size is its size
  const fsst = await fs.promises.statfs(path.dirname(memberPath));
  const fullBytes = member.blockCount * BS;
  const growthBytes = fullBytes - st.blocks * 512;
  const freeBytes = fsst.bavail * fsst.bsize;
  if (growthBytes <= freeBytes) return undefined;
  return `warning: member ${memberPath} is thin and can grow to ${formatSize(fullBytes)}, but its file system has ${formatSize(freeBytes)} free`;
}

// ---- lock ----

export interface DirLock {
  release(): Promise<void>;
}

const NO_LOCK: DirLock = { release: () => Promise.resolve() };

function isReadOnlyFs(e: unknown): boolean {
  return native.errnoCode(e) === 'EROFS';
}

/** Opens the lock file: read-write (created if missing), or for a read-only open without writing anything; undefined when there is no lock file on a read-only file system. */
async function openLockFile(dir: string, readOnly: boolean): Promise<fs.promises.FileHandle | undefined> {
  const p = path.join(dir, LOCK_NAME);
  if (readOnly) {
    try {
      return await fs.promises.open(p, fs.constants.O_RDONLY);
    } catch (e) {
      if (native.errnoCode(e) !== 'ENOENT') throw new Error(`cannot open the lock file ${p}: ${(e as Error).message}`);
    }
  }
  try {
    return await fs.promises.open(p, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (e) {
    if (isReadOnlyFs(e)) {
      if (readOnly) return undefined;
      throw new Error(`volume ${dir} is on a read-only file system: it can only be opened read-only (serve --read-only, status, check)`);
    }
    throw new Error(`cannot open the lock file ${p}: ${(e as Error).message}`);
  }
}

const LOCK_PID_MAX_BYTES = 32;
/** How long taking the lock waits for a holder that wrote no pid (a read-only look) to let go. */
const READER_LOCK_WAIT_MS = 3_000;

/** The pid a lock file names, if it names a live process (a kill -9 leaves a stale one, and read-only holders write none). */
async function lockHolderPid(fh: fs.promises.FileHandle): Promise<number | undefined> {
  let pid = 0;
  try {
    const buf = Buffer.alloc(LOCK_PID_MAX_BYTES);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const m = /^(\d{1,10})\n/.exec(buf.toString('latin1', 0, bytesRead));
    pid = m ? Number(m[1]) : 0;
    if (pid <= 0 || pid === process.pid) return undefined;
    process.kill(pid, 0); // signal 0: only whether it exists
    return pid;
  } catch (e) {
    return native.errnoCode(e) === 'EPERM' && pid > 0 ? pid : undefined; // EPERM: alive, another user's
  }
}

/**
 * Takes the volume's exclusive lock; throws "volume DIR is already in use by another
 * process (pid N)". A read-write holder writes its pid into the lock file (and empties
 * it on release), so the error can name it. `readOnly`: writes nothing in DIR (see the
 * invariants above).
 */
export async function lockVolumeDir(dir: string, readOnly = false): Promise<DirLock> {
  let fh: fs.promises.FileHandle | undefined;
  let locked = false;
  let holder: number | undefined;
  const t0 = Date.now();
  for (;;) {
    fh = await openLockFile(dir, readOnly);
    if (fh === undefined) return NO_LOCK;
    try {
      locked = native.flockExclusive(fh.fd);
      if (!locked) holder = await lockHolderPid(fh);
    } finally {
      if (!locked) await fh.close();
    }
    // A holder that wrote no pid is a read-only look (status, check of an unserved volume):
    // it lets go within moments, so a serve starting meanwhile waits instead of failing.
    if (locked || holder !== undefined || Date.now() - t0 >= READER_LOCK_WAIT_MS) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!locked) throw new Error(`volume ${dir} is already in use by another process${holder !== undefined ? ` (pid ${holder})` : ''}`);
  if (!readOnly) {
    await fh.truncate(0);
    await fh.write(`${process.pid}\n`, 0);
  }
  let released = false;
  return {
    release: async () => {
      if (released) return;
      released = true;
      if (!readOnly) await fh.truncate(0).catch(() => undefined);
      await fh.close(); // closing the last descriptor drops the flock
    },
  };
}

/** True if another process holds the volume's lock (it is being served). */
export async function volumeDirInUse(dir: string): Promise<boolean> {
  try {
    const l = await lockVolumeDir(dir, true);
    await l.release();
    return false;
  } catch (e) {
    if (e instanceof Error && e.message.includes('already in use')) return true;
    throw e;
  }
}

// ---- create ----

export async function createVolumeDir(dir: string, opts: CreateVolumeDirOptions): Promise<VolumeLabel> {
  const { sizeBytes } = opts;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new Error(`bad size ${sizeBytes}: must be a positive number of bytes`);
  if (sizeBytes % BS !== 0) throw new Error(`bad size ${formatSize(sizeBytes)}: must be a multiple of ${BS} bytes`);
  if (sizeBytes > MAX_VOLUME_BYTES) throw new Error(`bad size ${formatSize(sizeBytes)}: the largest volume is ${formatSize(MAX_VOLUME_BYTES)}`);
  const nvramSizeBytes = opts.nvramSizeBytes ?? NVRAM_DEFAULT_BYTES;
  if (!Number.isSafeInteger(nvramSizeBytes) || nvramSizeBytes < REGION_MIN_BYTES) {
    throw new Error(`NVRAM size ${formatSize(nvramSizeBytes)} is too small: at least ${formatSize(REGION_MIN_BYTES)}`);
  }
  if (nvramSizeBytes > REGION_MAX_BYTES) throw new Error(`NVRAM size ${formatSize(nvramSizeBytes)} is too large: at most ${formatSize(REGION_MAX_BYTES)}`);
  if (nvramSizeBytes % BS !== 0) throw new Error(`NVRAM size ${formatSize(nvramSizeBytes)} must be a multiple of ${BS} bytes`);
  let raid: RaidSpec | undefined;
  if (opts.raid !== undefined) {
    const members = opts.members?.length ?? 0;
    const unit = opts.raid.stripeUnitBytes ?? STRIPE_UNIT_DEFAULT_BYTES;
    const problem = geometryProblem(opts.raid.level, members, unit);
    if (problem !== null) throw new Error(`${problem}${members < 2 ? ' (give each with --member PATH)' : ''}`);
    raid = { level: opts.raid.level as RaidLevel, stripeUnitBytes: unit };
  }
  const memberPaths = opts.members && opts.members.length > 0 ? opts.members : ['member-0.img'];
  if (!raid && memberPaths.length !== 1) throw new Error(`${memberPaths.length} members need a RAID level: give --raid ${RAID_LEVELS.join('|')} (or one --member)`);
  if (new Set(memberPaths.map((m) => path.resolve(dir, m))).size !== memberPaths.length) throw new Error('a member is given twice: every --member must be a different file');
  // blockCount: the tree's device blocks (for RAID, the striped space over the members).
  const blockCount = memberBlocksFor(sizeBytes, nvramSizeBytes);
  if (blockCount > MAX_DEVICE_BLOCKS) throw new Error(`bad size ${formatSize(sizeBytes)}: the member would exceed ${formatSize(MAX_DEVICE_BLOCKS * BS)}`);
  const perMemberBlocks = raid ? raidMemberBlocks(raid, memberPaths.length, blockCount) : blockCount;

  if (await exists(dir)) {
    const st = await fs.promises.stat(dir);
    if (!st.isDirectory()) throw new Error(`${dir} exists and is not a directory`);
    const entries = await fs.promises.readdir(dir);
    if (entries.length > 0) throw new Error(`${dir} is not empty`);
  } else {
    await fs.promises.mkdir(dir, { recursive: true });
  }
  const absDir = path.resolve(dir);
  const nvramRel = opts.nvramPath ?? NVRAM_DEFAULT_NAME;
  const nvramAbs = resolveIn(absDir, nvramRel);
  const memberAbs = memberPaths.map((m) => resolveIn(absDir, m));
  // A RAID member may be an existing block device (checked, labelled, never created or removed).
  const blockDevs = new Set<string>();
  if (raid) for (const p of memberAbs) if (await isBlockDevice(p)) blockDevs.add(p);
  for (const p of [nvramAbs, ...memberAbs]) if (!blockDevs.has(p) && (await exists(p))) throw new Error(`${p} already exists`);

  const lock = await lockVolumeDir(absDir);
  const created: string[] = [];
  try {
    const uuid = crypto.randomUUID();
    const clock = opts.clock ?? systemClock;
    let dev: BlockDevice;
    if (raid) {
      dev = await createRaidMembers(memberPaths.map((m, i) => ({ name: m, path: memberAbs[i]! })), raid, perMemberBlocks, uuid);
      created.push(...memberAbs.filter((p) => !blockDevs.has(p)));
      // The stripe journal up front (parity levels; an older volume gets it at its next read-write open).
      const journalPath = path.join(absDir, RAID_JOURNAL_NAME);
      const journal = dev instanceof RaidDevice ? await openRaidJournalFile(journalPath, dev.geometry, false) : undefined;
      if (journal) {
        created.push(journalPath);
        await journal.close();
      }
    } else {
      dev = await FileBlockDevice.create(memberAbs[0]!, blockCount);
      created.push(memberAbs[0]!);
    }
    try {
      await BlockTree.format(dev, { sizeBytes, volumeUuid: uuid, clock });
    } finally {
      await dev.close();
    }
    const region = await MmapNvram.open(nvramAbs, { sizeBytes: nvramSizeBytes, create: true });
    created.push(nvramAbs);
    try {
      await NvLog.format(region, uuid);
    } finally {
      await region.close();
    }
    const label: VolumeLabel = {
      format: LABEL_FORMAT,
      version: LABEL_VERSION,
      uuid,
      sizeBytes,
      blockSizeBytes: BS,
      members: memberPaths.map((m) => ({ path: m, blockCount: perMemberBlocks })),
      nvram: { path: nvramRel, sizeBytes: nvramSizeBytes },
      createdMs: Math.floor(clock.nowMs()),
      ...(raid ? { raid } : {}),
    };
    await writeLabel(absDir, label);
    return label;
  } catch (e) {
    for (const p of created) await fs.promises.rm(p, { force: true });
    throw e;
  } finally {
    await lock.release();
  }
}

// ---- open ----

interface OpenedParts {
  label: VolumeLabel;
  dev: BlockDevice;
  tree: BlockTree;
  region: NvramRegion;
  lock: DirLock;
}

/** The volume's NVRAM: the shared mapping, or for a read-only open a copy read without writing. */
function openNvram(absDir: string, label: VolumeLabel, readOnly: boolean): Promise<NvramRegion> {
  const p = resolveIn(absDir, label.nvram.path);
  const opening = readOnly ? NvramFileCopy.open(p, label.nvram.sizeBytes) : MmapNvram.open(p, { sizeBytes: label.nvram.sizeBytes });
  return opening.catch(async (e: unknown) => {
    if (await exists(p)) throw e;
    throw new Error(`the NVRAM log ${p} is missing (if the last session stopped cleanly: nvmirror repair ${absDir} --recreate-nvram)`);
  });
}

/**
 * The tree's device: the one member file, or a RaidDevice over the members (refusing a
 * foreign or swapped member by name; see src/raid/members.ts). Read-write, a RAID-4/5/6
 * volume's stripe journal (DIR/raid-journal.bin, created if absent) is replayed before
 * this returns; read-only, it is only read (RaidHealth.journalPending).
 */
export async function openMemberDevice(absDir: string, label: VolumeLabel, readOnly: boolean): Promise<BlockDevice> {
  if (label.raid) {
    const files = label.members.map((m) => ({ name: m.path, path: resolveIn(absDir, m.path) }));
    // A replacement in progress: the old member is not used, and every write reaches the new one (replace-member.ts).
    const replacing = await replacingAtOpen(absDir, label, readOnly);
    return openRaidMembers(files, label.raid, label.members[0]!.blockCount, label.uuid, readOnly, replacing, { resolveName: (name) => resolveIn(absDir, name), journalPath: path.join(absDir, RAID_JOURNAL_NAME) }).catch(async (e: unknown) => {
      await replacing?.dev?.close().catch(() => undefined);
      throw e;
    });
  }
  const member = label.members[0]!;
  const dev = await FileBlockDevice.open(resolveIn(absDir, member.path), { readOnly });
  if (dev.blockCount < member.blockCount) {
    await dev.close();
    throw new Error(`member ${member.path} has ${dev.blockCount} blocks, the label says ${member.blockCount} (truncated?)`);
  }
  return dev;
}

/** Opens label, lock, member, tree and NVRAM (no replay). The caller owns what is returned. */
export async function openVolumeParts(dir: string, readOnly: boolean, clock?: Clock): Promise<OpenedParts> {
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  const lock = await lockVolumeDir(absDir, readOnly);
  const undo: Array<() => Promise<void>> = [() => lock.release()];
  try {
    const member = { path: label.raid ? `the members` : label.members[0]!.path };
    const dev = await openMemberDevice(absDir, label, readOnly);
    undo.unshift(() => dev.close());
    if (dev instanceof RaidDevice && !readOnly && dev.health().state === 'failed') {
      throw new Error(`${dev.health().failure ?? 'too many members lost'}; open it read-only (serve --read-only, status, check)`);
    }
    const tree = await BlockTree.open(dev, clock ? { clock } : {});
    undo.unshift(() => tree.close());
    if (tree.volumeUuid !== label.uuid) throw new Error(`member ${member.path} belongs to volume ${tree.volumeUuid}, the label says ${label.uuid}`);
    if (tree.sizeBytes !== label.sizeBytes) throw new Error(`member ${member.path} holds a volume of ${tree.sizeBytes} bytes, the label says ${label.sizeBytes}`);
    const region = await openNvram(absDir, label, readOnly);
    return { label, dev, tree, region, lock };
  } catch (e) {
    for (const f of undo) await f().catch(() => undefined);
    throw e;
  }
}

/** After a read-write session closed: records the clean stop if its final CP holds every NVRAM record. */
async function recordCleanStop(absDir: string, label: VolumeLabel, volume: EngineVolume): Promise<void> {
  const st = volume.tree.stats();
  const lastSeq = volume.log.lastSeq;
  if (st.meta.nvlogSeq !== lastSeq) {
    logger().warn({ watermark: st.meta.nvlogSeq, lastSeq }, 'the final CP does not hold every NVRAM record: no clean-stop record');
    return;
  }
  await writeCleanStop(absDir, { uuid: label.uuid, cpNumber: st.cpNumber, nvlogSeq: lastSeq, stoppedMs: Date.now() });
}

/** Opens a volume directory for serving: recovery (replay), exports, control socket. */
export async function openVolumeDir(dir: string, opts: OpenVolumeDirOptions): Promise<OpenedVolumeDir> {
  const absDir = path.resolve(dir);
  const parts = await openVolumeParts(absDir, opts.readOnly, opts.clock);
  let volume: EngineVolume;
  try {
    if (!opts.readOnly) await clearCleanStop(absDir);
    if (opts.beforeRecovery) await opts.beforeRecovery(parts.tree);
    volume = await EngineVolume.open({
      tree: parts.tree,
      region: parts.region,
      readOnly: opts.readOnly,
      ...(opts.clock ? { clock: opts.clock } : {}),
      ...(opts.cpIntervalMs !== undefined ? { cpIntervalMs: opts.cpIntervalMs } : {}),
      ...(opts.acceptNvramLoss === true ? { acceptNvramLoss: true } : {}),
      description: `nvmirror volume ${absDir} (${formatSize(parts.label.sizeBytes)})`,
    });
  } catch (e) {
    await parts.tree.close().catch(() => undefined);
    await parts.region.close().catch(() => undefined);
    await parts.dev.close().catch(() => undefined);
    await parts.lock.release();
    throw e;
  }
  if (parts.dev instanceof RaidDevice) raidOf.set(volume, parts.dev);
  const exports = new VolumeDirExports(opts.exportName ?? '', volume);
  let control: ControlServer | undefined;
  const closeAll = async (): Promise<void> => {
    let err: unknown;
    await control?.close().catch(() => undefined);
    await stopServedReplace(volume);
    try {
      await volume.close();
      if (!opts.readOnly) await recordCleanStop(absDir, parts.label, volume);
    } catch (e) {
      err = e;
    }
    await parts.dev.close().catch(() => undefined);
    await parts.lock.release();
    if (err) throw err;
  };
  if (opts.control !== false) {
    const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
    if (Buffer.byteLength(sockPath) > UNIX_PATH_MAX_BYTES) {
      // Serving matters more than the control socket: say why status/snapshot cannot reach us.
      logger().warn({ path: sockPath }, `control socket path is longer than ${UNIX_PATH_MAX_BYTES} bytes: \`nvmirror status/snapshot\` cannot reach this process; use a shorter directory path`);
    } else {
      try {
        control = await ControlServer.listen(sockPath, (req) => handleControl(absDir, parts.label, volume, req));
      } catch (e) {
        if (opts.readOnly && isReadOnlyFs(e)) {
          logger().warn({ path: sockPath }, 'read-only file system: no control socket; `nvmirror status` cannot reach this process');
        } else {
          await closeAll();
          throw e;
        }
      }
    }
  }
  if (parts.dev instanceof RaidDevice && !opts.readOnly) resumeServedReplace(absDir, parts.label, volume, parts.dev);
  let closing: Promise<void> | undefined;
  return {
    dir: absDir,
    label: parts.label,
    volume,
    exports,
    close: () => {
      if (!closing) closing = closeAll();
      return closing;
    },
  };
}

// ---- status ----

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
  nvram: { path: string; sizeBytes: number; usedBytes: number; fillPercent: number; epoch: number; lastSeq: number; durableSeq: number; unreplayedRecords: number };
  /** The serving process (absent when not served): its pid, and its URIs, exports and clients when it serves over NBD. */
  server?: { pid: number } & Partial<ServedBy>;
  /** Reads refused since the volume was opened (by the serving process, or by this status). */
  errors: BlockErrorCounts;
  /** Sections added by what runs beside the engine (e.g. `mirror`). */
  sections?: Record<string, unknown>;
  /** A RAID volume: level, state, and each member's state and error counts. */
  raid?: RaidHealth & { scrub?: ScrubState };
}

/** The RAID device under each open RAID volume (for status). */
const raidOf = new WeakMap<EngineVolume, RaidDevice>();

/** The RAID device under an open RAID volume (undefined: not RAID). */
export function raidDeviceOf(volume: EngineVolume): RaidDevice | undefined {
  return raidOf.get(volume);
}

/** One line per lost member, for check's notes. */
function raidNotes(h: RaidHealth): string[] {
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
    ...(served ? { server: { pid: process.pid, ...(volume.servedBy?.() ?? {}) } } : {}),
    errors: s.tree.errors,
    ...(raidOf.has(volume) ? { raid: { ...raidOf.get(volume)!.health(), scrub: scrubState(raidOf.get(volume)!) } } : {}),
    ...(volume.statusSections.size > 0 ? { sections: Object.fromEntries([...volume.statusSections].map(([k, f]) => [k, f()])) } : {}),
  };
}

async function handleControl(dir: string, label: VolumeLabel, volume: EngineVolume, req: ControlRequest): Promise<Record<string, unknown>> {
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
      const r = await volume.snapshot({ kind: req.kind, name: req.name });
      logger().info({ kind: req.kind, name: req.name, cp: r?.cpNumber }, 'snapshot changed');
      return { cpNumber: r?.cpNumber ?? volume.stats().tree.cpNumber, snapshots: volume.listSnapshots() };
    }
    case 'release':
      throw new Error('release is a receiver\'s request (for promote), not a volume\'s');
  }
}

// ---- check ----

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
async function checkServed(dir: string, label: VolumeLabel, volume: EngineVolume): Promise<DirCheckReport> {
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
    notes.push(`NVRAM: in use by the serving process, not checked (stop it for a full check)`);
    return { ok: problems.length === 0, problems, notes, servedBy: process.pid, blocksRead: progress.blocksRead };
  } finally {
    checksRunning.delete(volume);
  }
}

/** Polls the serving process's check progress every CHECK_PROGRESS_POLL_MS while `done` is pending. */
const CHECK_PROGRESS_POLL_MS = 250;

/** Asks the serving process to check its committed roots; `onProgress` (if given) is polled meanwhile. */
async function checkThroughControl(absDir: string, onProgress: ((p: CheckProgress) => void) | undefined): Promise<DirCheckReport> {
  const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
  if (!(await exists(sockPath))) {
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

// ---- status of a directory, served or not ----

/** Status of a volume directory: asks the serving process if there is one, else opens it read-only. */
export async function volumeDirStatus(dir: string, timeoutMs = 10_000): Promise<VolumeStatus> {
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  if (await volumeDirInUse(absDir)) {
    const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
    if (!(await exists(sockPath))) {
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
export async function volumeDirSnapshot(dir: string, op: { kind: 'create' | 'delete'; name: string }, timeoutMs = 120_000): Promise<{ cpNumber: number; served: boolean }> {
  const absDir = path.resolve(dir);
  await readLabel(absDir);
  if (await volumeDirInUse(absDir)) {
    const r = await controlRequest(path.join(absDir, CONTROL_SOCKET_NAME), { op: 'snapshot', kind: op.kind, name: op.name }, timeoutMs);
    if (!r.ok) throw new Error(r.error);
    return { cpNumber: r.cpNumber as number, served: true };
  }
  const opened = await openVolumeDir(absDir, { readOnly: false, control: false, cpIntervalMs: 0 });
  try {
    const r = await opened.volume.snapshot(op);
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
    if (await exists(nvramPath)) {
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
export async function acceptNvramLoss(dir: string): Promise<{ firstLostSeq: number; lastLostSeq: number } | undefined> {
  const absDir = path.resolve(dir);
  await readLabel(absDir);
  if (await volumeDirInUse(absDir)) throw new Error(`volume ${absDir} is already in use by another process; stop it before repairing`);
  const opened = await openVolumeDir(absDir, { readOnly: false, control: false, cpIntervalMs: 0, acceptNvramLoss: true });
  const d = opened.volume.log.replaySummary.damage;
  await opened.close();
  return d && { firstLostSeq: d.firstLostSeq, lastLostSeq: d.lastLostSeq };
}
