/**
 * A RAID volume's member set on disk: creating the member files with their labels, and
 * opening them into one RaidDevice, recognising a missing, truncated, stale, swapped or
 * foreign member by its label. It lives in volume/, not raid/: it is where the RAID meets
 * the tree's format (the head ring of RING_SLOTS superblocks every member carries, and
 * which copy of it is newest), so raid/ itself knows only stripes, parity and labels.
 *
 * Invariants:
 * - A member that belongs to another volume, or sits in another member's place (swapped),
 *   or whose label disagrees with the volume's geometry, is refused by name: the open
 *   fails and nothing is written anywhere.
 * - A member that is missing, unreadable, too small, has no label, or is stale (the newest
 *   label among the members marks it out of service, or its own label is more than one
 *   generation older than the newest) is opened as out of service: never read or written,
 *   the volume runs degraded (or read-only past the level's tolerance, see RaidDevice).
 * - A member one generation behind that the newest label names in service is in service:
 *   labels are written to every member in service and then synced, and a member whose
 *   write or sync fails is named out of service in the next generation before anything
 *   else is written; so being one behind means only that a crash kept the newest label
 *   from it (power-loss-raid.test.ts enumerates those states).
 * - Creation writes generation 1 labels to every member and syncs them before returning.
 * - A read-write open of a parity level with a stripe journal replays its batch (after a
 *   rebuild target is attached, so the replay reaches it too) before it returns: nothing
 *   reads a stripe an interrupted write left half-written. A read-only open only reads
 *   the journal and reports the batch it leaves (RaidHealth.journalPending).
 * - A read-write open returns only after every member in service holds the superblock
 *   ring it serves (RaidDevice.settleHead): the root the engine mounts, and may release
 *   log records on, survives losing any members the level tolerates.
 */
import * as fs from 'fs';
import { BLOCK_SIZE_BYTES, type BlockDevice } from '../io/types';
import { FileBlockDevice } from '../io/file-device';
import { RING_SLOTS, decodeSuperblock } from '../tree/layout';
import { assert } from '../util/assert';
import { LABEL_COPIES, RaidGeometry, type RaidLevel } from '../raid/geometry';
import { encodeRaidLabel, labelSlot, newestLabel, type RaidLabel } from '../raid/label';
import { RaidDevice, type JournalPending, type RaidMemberSpec } from '../raid/raid-device';
import type { ParityOps } from '../raid/parity';
import { StripeJournal, type JournalGeometry } from '../raid/stripe-journal';
import { openRaidJournalFile } from '../raid/journal-file';

const B = BLOCK_SIZE_BYTES;

export interface RaidSpec {
  level: RaidLevel;
  stripeUnitBytes: number;
}

export interface RaidMemberFile {
  /** As written in the volume label (relative to DIR or absolute), for messages. */
  name: string;
  /** Resolved path. */
  path: string;
}

/** The head copy to serve: the newest superblock that verifies (members may disagree after a crash mid-write). */
export function superblockPick(copies: Buffer[]): number {
  let best = 0;
  let bestCp = -1;
  copies.forEach((c, i) => {
    const d = decodeSuperblock(c);
    if (typeof d !== 'string' && d.cpNumber > bestCp) {
      best = i;
      bestCp = d.cpNumber;
    }
  });
  return best;
}

/** Member blocks each member needs for `logicalBlocks` of tree space. */
export function raidMemberBlocks(spec: RaidSpec, members: number, logicalBlocks: number): number {
  return RaidGeometry.memberBlocksFor(spec.level, members, spec.stripeUnitBytes, logicalBlocks);
}

function geometryFor(spec: RaidSpec, members: number, memberBlocks: number): RaidGeometry {
  return new RaidGeometry(spec.level, members, spec.stripeUnitBytes, memberBlocks, RING_SLOTS);
}

/** True if path names an existing block device. */
export async function isBlockDevice(p: string): Promise<boolean> {
  return (await fs.promises.stat(p).catch(() => undefined))?.isBlockDevice() === true;
}

/**
 * Opens a block device that is to become a member (create, replace-member): it must be
 * large enough and hold no nvmirror RAID label already (it is never overwritten blindly;
 * a refusal closes it and says what to do).
 */
export async function openFreeBlockDevice(devPath: string, name: string, memberBlocks: number): Promise<FileBlockDevice> {
  const dev = await FileBlockDevice.open(devPath, { lock: true });
  try {
    if (dev.blockCount < memberBlocks) throw new Error(`block device ${name} has ${dev.blockCount} blocks of 4 KiB, a member of this volume needs ${memberBlocks}`);
    const area = Buffer.alloc(LABEL_COPIES * B);
    await dev.readBlocks(0, LABEL_COPIES, area);
    const old = newestLabel(area);
    if (typeof old !== 'string') throw new Error(`block device ${name} holds member ${old.memberIndex} of nvmirror volume ${old.volumeUuid}: refusing to overwrite it (wipe its first ${LABEL_COPIES * 4} KiB if it is really free)`);
    return dev;
  } catch (e) {
    await dev.close().catch(() => undefined);
    throw e;
  }
}

/**
 * Creates the members with generation-1 labels and returns the open device: a member
 * file is created sparse (failing if it exists); a block device is used as it is, if it
 * is large enough and holds no nvmirror RAID label already (it is never overwritten
 * blindly). On failure the files it created are removed again.
 */
export async function createRaidMembers(files: RaidMemberFile[], spec: RaidSpec, memberBlocks: number, volumeUuid: string): Promise<RaidDevice> {
  const g = geometryFor(spec, files.length, memberBlocks);
  const devs: FileBlockDevice[] = [];
  const createdFiles: string[] = [];
  try {
    for (const f of files) {
      if (!(await isBlockDevice(f.path))) {
        devs.push(await FileBlockDevice.create(f.path, memberBlocks));
        createdFiles.push(f.path);
        continue;
      }
      devs.push(await openFreeBlockDevice(f.path, f.name, memberBlocks));
    }
    await labelNewMembers(devs, spec, memberBlocks, volumeUuid);
  } catch (e) {
    for (const d of devs) await d.close().catch(() => undefined);
    for (const p of createdFiles) await fs.promises.rm(p, { force: true });
    throw e;
  }
  return new RaidDevice({
    geometry: g, volumeUuid, generation: 1,
    members: files.map((f, i) => ({ name: f.name, dev: devs[i]! })),
    headPick: superblockPick,
    probe: fileProbe(files, await Promise.all(files.map((f) => fs.promises.stat(f.path))), memberBlocks),
  });
}

/** At every sync: a member file that was deleted, replaced or truncated under us leaves service. */
function fileProbe(filesIn: RaidMemberFile[], opened: (fs.Stats | undefined)[], memberBlocks: number, resolveName?: (name: string) => string): (i: number, name: string) => Promise<string | null> {
  const idOf = (st: fs.Stats): string => `${st.dev}:${st.ino}`;
  const files = [...filesIn];
  // The identity of each file as it was opened (undefined: take it at the first probe).
  const ids: (string | undefined)[] = files.map((_, i) => (opened[i] ? idOf(opened[i]!) : undefined));
  return async (i, name) => {
    if (files[i]!.name !== name && resolveName) {
      // The member was replaced (a rebuild onto a new file): watch that file from now on.
      files[i] = { name, path: resolveName(name) };
      ids[i] = undefined;
    }
    const f = files[i]!;
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(f.path);
    } catch {
      return `member file ${f.name} was deleted`;
    }
    if (ids[i] === undefined) ids[i] = idOf(st);
    if (ids[i] !== idOf(st)) return `member file ${f.name} was replaced by another file`;
    if (st.isFile() && st.size < memberBlocks * B) return `member file ${f.name} was truncated to ${st.size} bytes (it needs ${memberBlocks * B})`;
    return null;
  };
}

/** A member to assemble: its device (null: missing, with the reason). */
export interface RaidMemberDevice {
  name: string;
  dev: BlockDevice | null;
  missingReason?: string;
}

/** Writes generation-1 labels to every member of a new volume and syncs each (create). */
export async function labelNewMembers(devs: BlockDevice[], spec: RaidSpec, memberBlocks: number, volumeUuid: string): Promise<void> {
  const g = geometryFor(spec, devs.length, memberBlocks);
  const outOfService = devs.map(() => false);
  for (let i = 0; i < devs.length; i++) {
    const label = encodeRaidLabel({
      volumeUuid, memberIndex: i, members: devs.length, level: spec.level, unitBytes: spec.stripeUnitBytes, headBlocks: g.headBlocks,
      generation: 1, memberBlocks, logicalBlocks: g.logicalBlocks, outOfService,
    });
    await devs[i]!.writeBlocks(labelSlot(1), label);
    await devs[i]!.sync();
  }
}

export interface OpenRaidExtra {
  /**
   * The members may still be labelled with this uuid (a volume pre-created as a mirror
   * destination, taken over by the source's uuid): such a member counts as this volume's,
   * and every member is relabelled with volumeUuid at the next sync().
   */
  formerUuid?: string;
  /**
   * A stripe journal device: read-write, partial stripes go through it and its batch is
   * replayed before the open returns; read-only, its batch is only reported
   * (health().journalPending). Closed by the open (RAID-0/1, read-only, failure).
   */
  journalDev?: BlockDevice;
  /** A member name (as the volume label lists it) -> its path, for the probe of a member that replaced another while open. */
  resolveName?: (name: string) => string;
}

/**
 * Opens a RAID volume's members. Refuses (throws) a foreign, swapped or mismatched member
 * by name; opens missing, truncated, unlabelled and stale members as out of service.
 * @param replacing member `index` is being replaced by `file` (replace-member): the old
 *   member is not opened; with `dev` (NEW opened) the RaidDevice starts rebuilding onto it
 *   with stripes [0, doneBelow) current already, so every write from the start reaches it.
 * @param extraIn.journalPath the stripe journal file (journal-file.ts; parity levels):
 *   read-write, created if absent and its batch replayed before this returns; read-only,
 *   read if present (health().journalPending).
 */
export async function openRaidMembers(files: RaidMemberFile[], spec: RaidSpec, memberBlocks: number, volumeUuid: string, readOnly: boolean, replacing?: { index: number; file: RaidMemberFile; dev?: BlockDevice; doneBelow?: number }, extraIn: OpenRaidExtra & { journalPath?: string } = {}): Promise<RaidDevice> {
  const members: RaidMemberDevice[] = [];
  const stats: (fs.Stats | undefined)[] = [];
  const { journalPath, ...extra } = extraIn;
  try {
    // The journal file (journal-file.ts): created by a read-write open, only read by a read-only one.
    if (journalPath !== undefined && !extra.journalDev) {
      const j = await openRaidJournalFile(journalPath, geometryFor(spec, files.length, memberBlocks), readOnly);
      if (j) extra.journalDev = j;
    }
    for (let i = 0; i < files.length; i++) {
      const f = files[i]!;
      if (replacing?.index === i) {
        // Being replaced (replace-member): not opened, never read; the probe watches its replacement.
        members.push({ name: f.name, dev: null, missingReason: `being replaced by ${replacing.file.name}` });
        stats.push(undefined);
        continue;
      }
      try {
        const dev = await FileBlockDevice.open(f.path, { readOnly });
        members.push({ name: f.name, dev });
        stats.push(await fs.promises.stat(f.path).catch(() => undefined));
      } catch (e) {
        members.push({ name: f.name, dev: null, missingReason: `cannot open: ${e instanceof Error ? e.message : String(e)}` });
        stats.push(undefined);
      }
    }
  } catch (e) {
    for (const m of members) await m.dev?.close().catch(() => undefined);
    await extra.journalDev?.close().catch(() => undefined);
    throw e;
  }
  const probe = fileProbe(replacing ? files.map((f, i) => (i === replacing.index ? replacing.file : f)) : files, stats, memberBlocks, extra.resolveName);
  return assembleRaidMembers(members, spec, memberBlocks, volumeUuid, readOnly, {
    probe, ...extra,
    ...(replacing?.dev ? { rebuild: { index: replacing.index, name: replacing.file.name, dev: replacing.dev, doneBelow: replacing.doneBelow ?? 0 } } : {}),
  });
}

/** The journal batch a read-only open leaves unreplayed (undefined: none); the device is closed. */
async function peekJournal(dev: BlockDevice, jg: JournalGeometry): Promise<JournalPending | undefined> {
  try {
    const j = await StripeJournal.open(dev, jg, true);
    try {
      const todo = await j.pending();
      return todo.length > 0 ? { stripes: todo.length, epoch: j.currentEpoch } : undefined;
    } finally {
      await j.close();
    }
  } catch (e) {
    await dev.close().catch(() => undefined);
    return { stripes: 0, epoch: 0, problem: e instanceof Error ? e.message : String(e) };
  }
}

/**
 * Assembles opened member devices into a RaidDevice by their labels (the same decisions
 * as openRaidMembers, for any BlockDevice: the crash tests assemble recorded images).
 * On a refusal every member device is closed.
 */
export async function assembleRaidMembers(members: RaidMemberDevice[], spec: RaidSpec, memberBlocks: number, volumeUuid: string, readOnly: boolean, extra: OpenRaidExtra & {
  probe?: (i: number, name: string) => Promise<string | null>;
  parity?: ParityOps;
  /** replace-member in progress: rebuild member `index` onto `dev` (stripes [0, doneBelow) current), before the journal replays. */
  rebuild?: { index: number; name: string; dev: BlockDevice; doneBelow: number };
} = {}): Promise<RaidDevice> {
  const g = geometryFor(spec, members.length, memberBlocks);
  let journalDev = extra.journalDev;
  let raid: RaidDevice;
  const specs: RaidMemberSpec[] = members.map((m) => (m.dev === null ? { name: m.name, dev: null, missingReason: m.missingReason ?? 'missing' } : { name: m.name, dev: m.dev }));
  const labels: (RaidLabel | undefined)[] = members.map(() => undefined);
  try {
    for (let i = 0; i < members.length; i++) {
      const f = members[i]!;
      const dev = f.dev;
      if (dev === null) continue;
      if (dev.blockCount < LABEL_COPIES) {
        specs[i]!.faultReason = `too small to hold a label (${dev.blockCount} blocks)`;
        continue;
      }
      const area = Buffer.alloc(LABEL_COPIES * B);
      try {
        await dev.readBlocks(0, LABEL_COPIES, area);
      } catch (e) {
        specs[i]!.faultReason = `label unreadable: ${e instanceof Error ? e.message : String(e)}`;
        continue;
      }
      const l = newestLabel(area);
      if (typeof l === 'string') {
        specs[i]!.faultReason = `${l}: not a member of this volume (a blank or replaced file?)`;
        continue;
      }
      if (l.volumeUuid !== volumeUuid && l.volumeUuid !== extra.formerUuid) throw new Error(`member ${i} ${f.name} belongs to another volume (uuid ${l.volumeUuid}), not to this one (${volumeUuid}): refusing to open; put this volume's member back`);
      if (l.memberIndex !== i) throw new Error(`member ${i} ${f.name} holds member ${l.memberIndex} of this volume (members swapped?): refusing to open; restore the order the volume label lists`);
      if (l.level !== spec.level || l.members !== members.length || l.unitBytes !== spec.stripeUnitBytes || l.memberBlocks !== memberBlocks || l.headBlocks !== g.headBlocks) {
        throw new Error(`member ${i} ${f.name}: its label (RAID-${l.level}, ${l.members} members, unit ${l.unitBytes}, ${l.memberBlocks} blocks) disagrees with the volume label (RAID-${spec.level}, ${members.length} members, unit ${spec.stripeUnitBytes}, ${memberBlocks} blocks): refusing to open`);
      }
      labels[i] = l;
      if (dev.blockCount < memberBlocks) specs[i]!.faultReason = `truncated: ${dev.blockCount} blocks, the volume needs ${memberBlocks}`;
    }
    let newest: RaidLabel | undefined;
    for (const l of labels) if (l && (!newest || l.generation > newest.generation)) newest = l;
    for (let i = 0; i < members.length; i++) {
      const l = labels[i];
      const s = specs[i]!;
      if (!l || s.faultReason !== undefined || !newest) continue;
      // One generation behind and in service by the newest label: it was online when that
      // label was written and missed only its own copy of it (a crash between the label
      // writes and their sync); a member that missed anything else is named out of service.
      const stale = newest.outOfService[i] ? l.generation < newest.generation : l.generation < newest.generation - 1;
      if (stale) s.faultReason = `stale: its label is generation ${l.generation}, the volume's is ${newest.generation} (it missed writes while out of service)`;
      else if (newest.outOfService[i]) s.faultReason = `taken out of service earlier (label generation ${newest.generation}); it needs a rebuild`;
    }
    if (!newest) throw new Error(`no member of the volume has a label that verifies (${specs.map((s) => `${s.name}: ${s.missingReason ?? s.faultReason ?? '?'}`).join('; ')})`);
    assert(newest.volumeUuid === volumeUuid || newest.volumeUuid === extra.formerUuid, 'newest label volume');
    const relabel = labels.some((l) => l !== undefined && l.volumeUuid !== volumeUuid);
    // Only parity levels have partial stripes to journal (RAID-0/1 write through); the caller's device is closed otherwise.
    const jg: JournalGeometry = { level: g.level, members: g.members, unitBlocks: g.unitBlocks, stripes: g.stripes, columns: g.dataMembers + g.parityMembers };
    let journal: StripeJournal | undefined;
    let journalPending: JournalPending | undefined;
    if (journalDev) {
      const d = journalDev;
      journalDev = undefined; // from here on owned by the journal (read-write), or closed
      if (g.parityMembers === 0) await d.close();
      else if (readOnly) journalPending = await peekJournal(d, jg);
      else journal = await StripeJournal.open(d, jg).catch(async (e: unknown) => { await d.close().catch(() => undefined); throw e; });
    }
    raid = new RaidDevice({
      geometry: g, volumeUuid, generation: newest.generation, members: specs, readOnly, headPick: superblockPick, relabel,
      ...(extra.probe ? { probe: extra.probe } : {}),
      ...(extra.parity ? { parity: extra.parity } : {}),
      ...(journal ? { journal } : {}),
      ...(journalPending ? { journalPending } : {}),
    });
  } catch (e) {
    for (const s of specs) await s.dev?.close().catch(() => undefined);
    await journalDev?.close().catch(() => undefined);
    throw e;
  }
  // The RaidDevice owns the members and the journal from here on.
  try {
    if (extra.rebuild) raid.startRebuild(extra.rebuild.index, extra.rebuild.name, extra.rebuild.dev, extra.rebuild.doneBelow);
    // A failed volume cannot write: its batch stays for an open that can (the caller refuses this one, or it only reads).
    if (raid.health().journal && raid.health().state !== 'failed') await raid.replayJournal();
    // A crash mid-ring-write left the newest superblock on some members only: the engine will build on it, so every member in service gets it first.
    if (!readOnly) await raid.settleHead();
  } catch (e) {
    await raid.close().catch(() => undefined);
    throw e;
  }
  return raid;
}
