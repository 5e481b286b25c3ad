/**
 * Volume directories: `nvmirror create DIR` lays one out (createVolumeDir), `serve`/
 * `attach` open it (openVolumeDir). Beside this file: the label (label.ts), the lock
 * (dir-lock.ts), the clean-stop record (clean-stop.ts), the session record
 * (sessions.ts), what the serving process answers (served.ts) and the CLI's
 * status/snapshot/check/repair of a directory (dir-ops.ts).
 *
 *   DIR/nvmirror.json   label: format version, uuid, size, block size, members, NVRAM
 *   DIR/nvmirror.lock   flock'ed exclusively by the one process that has the volume open;
 *                       a read-write holder writes its pid there (emptied on release)
 *   DIR/nvram.log       the NVRAM region (default; preallocated, zeroed)
 *   DIR/member-0.img    the member (default; sparse); a RAID volume (label `raid`) has
 *                       several, each with a RAID label (src/volume/raid-members.ts)
 *   DIR/raid-journal.bin  a RAID-4/5/6 volume's stripe journal (src/raid/journal-file.ts):
 *                       partial stripes (CPs on a nearly full volume) go through it; created
 *                       by create or the first read-write open, replayed by every one
 *   DIR/control.sock    the serving process's control socket (engine-control.ts)
 *   DIR/nvram.clean     clean-stop record: the last read-write session committed every
 *                       NVRAM record (CP n, watermark seq s) and stopped
 *   DIR/sessions.json   the read-write sessions since the mirror last acknowledged them:
 *                       each one's id and the NVRAM seq it started from (sessions.ts)
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
 * - A read-write open records its session (DIR/sessions.json, durably) after recovery and
 *   before any client can append a record.
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
import { FileBlockDevice } from '../io/file-device';
import { MmapNvram, NvramFileCopy } from '../io/mmap-nvram';
import { BlockTree } from '../tree/tree';
import type { BlockTreeApi } from '../tree/types';
import { MAX_DEVICE_BLOCKS, MAX_VOLUME_BYTES } from '../tree/layout';
import { NvLog } from '../nvlog/log';
import { REGION_MIN_BYTES, REGION_MAX_BYTES } from '../nvlog/format';
import { formatSize } from '../util/size';
import { log as logger } from '../util/log';
import { EngineVolume } from './engine';
import { VolumeDirExports } from './engine-snapshot';
import { ControlServer, CONTROL_SOCKET_NAME, UNIX_PATH_MAX_BYTES } from './engine-control';
import { RAID_LEVELS, STRIPE_UNIT_DEFAULT_BYTES, geometryProblem, type RaidLevel } from '../raid/geometry';
import { createRaidMembers, isBlockDevice, openRaidMembers, raidMemberBlocks, type RaidSpec } from './raid-members';
import { RAID_JOURNAL_NAME, openRaidJournalFile } from '../raid/journal-file';
import { RaidDevice } from '../raid/raid-device';
import { replacingAtOpen, resumeServedReplace, stopServedReplace } from './replace-member';
import { newLabel, resolveIn, pathExists, readLabel, writeLabel, type VolumeLabel } from './label';
import { CLEAN_STOP_NAME, writeCleanStop, clearCleanStop } from './clean-stop';
import { recordSessionStart } from './sessions';
import { lockVolumeDir, isReadOnlyFs, type DirLock } from './dir-lock';
import { handleControl, noteRaidDevice } from './served';

export const NVRAM_DEFAULT_NAME = 'nvram.log';
export const NVRAM_DEFAULT_BYTES = 32 * 1024 * 1024;
const BS = BLOCK_SIZE_BYTES;

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
  if (blockCount > MAX_DEVICE_BLOCKS) {
    // The largest size that fits, in whole MiB (memberBlocksFor grows with the size).
    const MiB = 1024 * 1024;
    let lo = 0;
    let hi = Math.floor(MAX_DEVICE_BLOCKS * BS / MiB);
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (memberBlocksFor(mid * MiB, nvramSizeBytes) <= MAX_DEVICE_BLOCKS) lo = mid;
      else hi = mid - 1;
    }
    throw new Error(`bad size ${formatSize(sizeBytes)}: with its tree and copy-on-write headroom the device would exceed ${formatSize(MAX_DEVICE_BLOCKS * BS)}; the largest volume is ${lo} MiB (${formatSize(lo * MiB)})`);
  }
  const perMemberBlocks = raid ? raidMemberBlocks(raid, memberPaths.length, blockCount) : blockCount;

  if (await pathExists(dir)) {
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
  for (const p of [nvramAbs, ...memberAbs]) if (!blockDevs.has(p) && (await pathExists(p))) throw new Error(`${p} already exists`);

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
    // A new volume has stopped cleanly by definition (CP 0 holds everything, the log is
    // empty): a lost NVRAM log before its first session can be recreated like any other.
    created.push(path.join(absDir, CLEAN_STOP_NAME));
    await writeCleanStop(absDir, { uuid, cpNumber: 0, nvlogSeq: 0, stoppedMs: Math.floor(clock.nowMs()) });
    const label = newLabel({
      uuid,
      sizeBytes,
      members: memberPaths.map((m) => ({ path: m, blockCount: perMemberBlocks })),
      nvram: { path: nvramRel, sizeBytes: nvramSizeBytes },
      createdMs: Math.floor(clock.nowMs()),
      ...(raid ? { raid } : {}),
    });
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
export function openNvram(absDir: string, label: VolumeLabel, readOnly: boolean): Promise<NvramRegion> {
  const p = resolveIn(absDir, label.nvram.path);
  const opening = readOnly ? NvramFileCopy.open(p, label.nvram.sizeBytes) : MmapNvram.open(p, { sizeBytes: label.nvram.sizeBytes });
  return opening.catch(async (e: unknown) => {
    const hint = `if the last session stopped cleanly: nvmirror repair ${absDir} --recreate-nvram`;
    if (!(await pathExists(p))) throw new Error(`the NVRAM log ${p} is missing (${hint})`);
    const msg = e instanceof Error ? e.message : String(e);
    if (/ is \d+ bytes, expected \d+$/.test(msg)) throw new Error(`${msg}: truncated or replaced? (${hint})`);
    throw e;
  });
}

/**
 * The tree's device: the one member file, or a RaidDevice over the members (refusing a
 * foreign or swapped member by name; see src/volume/raid-members.ts). Read-write, a RAID-4/5/6
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
  // Read-write: the member file itself is locked too, so no other process (another volume
  // naming the same file with --member, a demoted mirror's receiver) writes it meanwhile.
  const dev = await FileBlockDevice.open(resolveIn(absDir, member.path), { readOnly, lock: !readOnly });
  if (dev.blockCount < member.blockCount) {
    await dev.close();
    throw new Error(`member ${member.path} has ${dev.blockCount} blocks, the label says ${member.blockCount}: truncated? (\`truncate -s ${member.blockCount * BS} ${resolveIn(absDir, member.path)}\` gives it its length back; whatever lay past the cut is gone, and \`nvmirror check\` names the blocks it held)`);
  }
  return dev;
}

/** A single member file's fd for the NBD threads' READs (EngineOptions.directRead); nothing for RAID. */
function directReadOf(dev: BlockDevice): { directRead?: { fd: number; deviceBlocks: number } } {
  const fd = dev instanceof FileBlockDevice ? dev.readFd() : undefined;
  return fd === undefined ? {} : { directRead: { fd, deviceBlocks: dev.blockCount } };
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
      ...directReadOf(parts.dev),
      description: `nvmirror volume ${absDir} (${formatSize(parts.label.sizeBytes)})`,
    });
  } catch (e) {
    await parts.tree.close().catch(() => undefined);
    await parts.region.close().catch(() => undefined);
    await parts.dev.close().catch(() => undefined);
    await parts.lock.release();
    throw e;
  }
  if (!opts.readOnly) {
    // After recovery, before any client can append: the seq this session starts from.
    try {
      const r = await recordSessionStart(absDir, volume.log.lastSeq);
      volume.session = r.session;
      if (r.unreadable) logger().warn({ dir: absDir }, 'sessions.json did not parse: replaced; the seqs earlier sessions started from are lost, so a mirror cannot check its log against them');
    } catch (e) {
      await volume.close().catch(() => undefined);
      await parts.dev.close().catch(() => undefined);
      await parts.lock.release();
      throw e;
    }
  }
  if (parts.dev instanceof RaidDevice) noteRaidDevice(volume, parts.dev);
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
        control = await ControlServer.listen(sockPath, (req) => handleControl(absDir, parts.label, volume, req, exports));
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
