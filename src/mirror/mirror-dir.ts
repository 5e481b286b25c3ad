/**
 * One source's mirror on the destination: DIR/<source-uuid>/ holds
 *
 *   mirror.json        the relationship label: source uuid, volume size, device blocks
 *   member-0.img       the mirror's member: the source's physical block space, block for block
 *                      (or, for a RAID destination, the members mirror.json lists: a RaidDevice
 *                      whose logical blocks are that space; docs/raid.md "Mirrors with another geometry")
 *   raid-journal.bin   a RAID destination's stripe journal (src/raid/stripe-journal.ts):
 *                      the source's allocator places blocks without regard to this side's
 *                      stripes, so CPs write partial stripes; they go through the journal
 *   source.log         the source's forwarded records (dest-log.ts)
 *   baseline.partial   present while a full baseline overwrites an older image (the image
 *                      is then inconsistent: not exported, and `check` says so)
 *   mirror.lock        flock'ed by the receiver that holds this mirror
 *
 * Invariants:
 * - The committed image is the newest superblock in the member's ring that verifies;
 *   blocks of a CP are written and synced before its superblock, which is synced before
 *   the CP is acknowledged (applyCommit).
 * - A CP applies only on top of the CP it was built from (its base): anything else is
 *   refused before a block is written.
 * - Only blocks outside the superblock ring and inside the device are written by CP
 *   frames; the ring slot is written only by a verified superblock of this source.
 * - A RAID destination's partial stripes are written through its stripe journal and the
 *   journal is replayed at every read-write open before anything reads: a crash at any
 *   point of a CP leaves the committed image intact and parity consistent.
 * - A CP (other than a full baseline) never writes a block the committed CP uses: the
 *   source allocates only from blocks free in its base, so such a write is a confused or
 *   hostile peer, refused before it lands (the committed CP's space map is kept in memory:
 *   two bits per device block). A block only an older CP a reader is pinned to uses is
 *   written only after that reader was released (pins, pin-guard.ts).
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { FileBlockDevice, syncDirectory, writeFileDurably } from '../io/file-device';
import { WRITE_PARTS_MAX, type BlockDevice, type WriteHint } from '../io/types';
import { RaidGeometry, type RaidLevel } from '../raid/geometry';
import { openRaidMembers } from '../volume/raid-members';
import { RaidDevice } from '../raid/raid-device';
import { RAID_JOURNAL_NAME } from '../raid/journal-file';
import * as native from '../io/native';
import { BlockTree } from '../tree/tree';
import type { RepairSource } from '../tree/types';
import { log } from '../util/log';
import { BLOCK, RING_SLOTS, decodeSuperblock, encodePtr, type Superblock } from '../tree/layout';
import { assert } from '../util/assert';
import { DestLog, DEST_LOG_NAME, destLogBytesFor } from './dest-log';
import { LABEL_NAME, readLabel, resolveIn } from '../volume/label';
import { bitmapBytes, readActiveMap, readSummaryMap } from '../tree/spacemap-read';
import { scrubRaid, type ScrubProgress, type ScrubReport } from '../raid/scrub';
import { baseInUseTag } from './standing';
import { PinGuard } from './pin-guard';

export const MIRROR_LABEL_NAME = 'mirror.json';
export const MIRROR_LOCK_NAME = 'mirror.lock';
export const BASELINE_MARKER_NAME = 'baseline.partial';
export const MEMBER_NAME = 'member-0.img';
export { RAID_JOURNAL_NAME };
/** Device writes of a CP in flight at once. */
export const APPLY_WRITES_MAX = 16;
/** A baseline's progress is made durable (member synced, marker rewritten) every this many blocks, so it resumes there. */
export const BASELINE_PROGRESS_BLOCKS = 8192;

export interface MirrorLabel {
  format: 'nvmirror-mirror';
  version: 1;
  sourceUuid: string;
  sizeBytes: number;
  deviceBlocks: number;
  createdMs: number;
  /** The member, when it is not DIR/member-0.img (a directory pre-created with `nvmirror create`); relative paths are relative to DIR. */
  memberPath?: string;
  /**
   * A RAID destination (pre-created with `nvmirror create --raid`, or a demoted RAID
   * volume): its geometry and members (paths relative to DIR or absolute); memberPath is
   * then unused. formerUuid: the uuid the members were labelled with before this mirror
   * took them over (they are relabelled with sourceUuid at the first open).
   */
  raid?: { level: RaidLevel; stripeUnitBytes: number; members: Array<{ path: string; blockCount: number }>; formerUuid?: string };
  /**
   * Set by `nvmirror demote` on an old primary's member: until the volume promoted from
   * it connects and names the CP both hold, this mirror rolls back to that CP and
   * nothing else (demote.ts).
   */
  demoted?: {
    fromDir: string;
    cp: number;
    destCp: number;
    keptIn: string;
    demotedMs: number;
    /** The superblock (base64) of destCp as the old primary kept it: the base when it has left the ring. */
    destSuperblock?: string;
  };
}

/** What a HELLO tells openOrCreate. */
export interface MirrorHello {
  sourceUuid: string;
  sizeBytes: number;
  deviceBlocks: number;
  nvramBytes: number;
  /** The failback base the source offers (-1: none) and its root pointer. */
  baseCp?: number;
  baseRoot?: Buffer;
}

/** Where a mirror's member lives. */
export function memberOf(dir: string, label: MirrorLabel): string {
  return resolveIn(dir, label.memberPath ?? MEMBER_NAME);
}

/** A mirror's directory name in a receive directory: its source volume's uuid. */
export const SOURCE_UUID_RE = /^[0-9a-f-]{36}$/;

export class MirrorDirError extends Error {
  override name = 'MirrorDirError';
}

/**
 * Opens a mirror's device: its member file, or a RaidDevice over its members. Read-write,
 * a RAID device's stripe journal (DIR/raid-journal.bin, created if absent) is replayed
 * and the members relabelled if they were taken over, before this returns. The caller
 * holds the mirror's lock for a read-write open.
 */
export async function openMirrorDevice(dir: string, label: MirrorLabel, readOnly: boolean): Promise<BlockDevice> {
  const r = label.raid;
  // Read-write, the member file is locked (as a volume's is): a member that is also a volume's is written by one of them only.
  if (!r) return FileBlockDevice.open(memberOf(dir, label), readOnly ? { readOnly: true } : { directWrites: true, lock: true });
  const files = r.members.map((m) => ({ name: m.path, path: resolveIn(dir, m.path) }));
  // The journal (src/raid/journal-file.ts): created if absent and replayed by a read-write open.
  const dev = await openRaidMembers(files, { level: r.level, stripeUnitBytes: r.stripeUnitBytes }, r.members[0]!.blockCount, label.sourceUuid, readOnly, undefined,
    { ...(r.formerUuid !== undefined ? { formerUuid: r.formerUuid } : {}), journalPath: path.join(dir, RAID_JOURNAL_NAME) });
  if (!readOnly) {
    try {
      await dev.sync(); // labels: a taken-over member set gets this mirror's uuid, a faulted member is marked
    } catch (e) {
      await dev.close();
      throw e;
    }
  }
  return dev;
}

/** A RAID geometry's tree space for a volume label's members. */
function raidLogicalBlocks(level: RaidLevel, members: number, stripeUnitBytes: number, memberBlocks: number): number {
  return new RaidGeometry(level, members, stripeUnitBytes, memberBlocks, RING_SLOTS).logicalBlocks;
}

/** The superblocks of source `uuid` in a member's ring, each in its own slot, by slot. */
export async function ringSuperblocks(dev: BlockDevice, uuid: string): Promise<Array<{ slot: number; sb: Superblock; raw: Buffer }>> {
  const ring = Buffer.alloc(RING_SLOTS * BLOCK);
  await dev.readBlocks(0, RING_SLOTS, ring);
  const out: Array<{ slot: number; sb: Superblock; raw: Buffer }> = [];
  for (let slot = 0; slot < RING_SLOTS; slot++) {
    const raw = ring.subarray(slot * BLOCK, (slot + 1) * BLOCK);
    const d = decodeSuperblock(raw);
    if (typeof d !== 'string' && d.volumeUuid === uuid && d.cpNumber % RING_SLOTS === slot) out.push({ slot, sb: d, raw });
  }
  return out;
}

/** The newest superblock in a member's ring that decodes (the committed image), or undefined. */
export async function newestSuperblock(dev: BlockDevice, uuid: string): Promise<{ sb: Superblock; raw: Buffer } | undefined> {
  let best: { sb: Superblock; raw: Buffer } | undefined;
  for (const e of await ringSuperblocks(dev, uuid)) if (!best || e.sb.cpNumber > best.sb.cpNumber) best = { sb: e.sb, raw: Buffer.from(e.raw) };
  return best;
}

/** The root pointer as the superblock holds it (24 bytes; zeroes for none). */
export function rootBytes(sb: Superblock | undefined): Buffer {
  const b = Buffer.alloc(24);
  if (sb?.root) encodePtr(b, 0, sb.root);
  return b;
}

/** What `status` shows of a mirror directory no receiver has open: its committed CP and root, read from its ring. */
export interface MirrorDirSummary {
  /** The newest committed CP (-1: none yet). */
  cp: number;
  /** Its root pointer (24 bytes, hex), as the receiver's status shows it. */
  root: string;
  /** A full baseline was interrupted: the image is inconsistent until it completes. */
  baselinePartial: boolean;
}

/**
 * Reads the committed CP of the mirror directory labelled `label` without taking its lock (only the superblock
 * ring, which a running receiver writes last and whole per slot: at worst this sees the
 * CP before the one being committed).
 */
export async function mirrorDirSummary(dir: string, label: MirrorLabel): Promise<MirrorDirSummary> {
  const dev = await openMirrorDevice(dir, label, true);
  try {
    const newest = await newestSuperblock(dev, label.sourceUuid);
    return { cp: newest?.sb.cpNumber ?? -1, root: rootBytes(newest?.sb).toString('hex'), baselinePartial: baselineInProgress(dir, newest?.sb.cpNumber) };
  } finally {
    await dev.close();
  }
}

/**
 * Checks a mirror's committed image (safe while the receiver runs: it reads only the
 * committed CP, whose blocks nothing overwrites): every checksum and the space
 * accounting of every root. A partial baseline is a problem (the image is inconsistent).
 */
export async function checkMirrorDir(dir: string): Promise<{ ok: boolean; problems: string[]; notes: string[] }> {
  const problems: string[] = [];
  const notes: string[] = [];
  const label = readMirrorLabel(dir);
  const partial = fs.existsSync(path.join(dir, BASELINE_MARKER_NAME)) ? readBaselineMarker(path.join(dir, BASELINE_MARKER_NAME)) ?? { cp: -1, blocks: 0 } : undefined;
  await replayIfIdle(dir, label);
  const dev = await openMirrorDevice(dir, label, true);
  try {
    raidCheckNotes(dev, problems, notes);
    const newest = await newestSuperblock(dev, label.sourceUuid);
    if (!newest) {
      notes.push(`mirror of ${label.sourceUuid}: no CP committed yet` + (partial ? `; a baseline toward CP ${partial.cp} has ${partial.blocks} blocks durable` : ''));
      return { ok: problems.length === 0, problems, notes };
    }
    // A baseline over an older image writes where that image's blocks are: it is not trustworthy until the baseline commits.
    if (partial && baselineCommitted(partial.cp, newest.sb.cpNumber)) {
      notes.push(`the baseline toward CP ${partial.cp} committed; its marker was left by a stop before its removal (the receiver removes it when it opens this mirror)`);
    } else if (partial) problems.push(`a full baseline toward CP ${partial.cp} is in progress over CP ${newest.sb.cpNumber}: the image is inconsistent until it completes`);
    let tree: BlockTree | undefined;
    try {
      tree = await BlockTree.open(dev);
    } catch (e) {
      problems.push(`tree: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (tree) {
      if (tree.rollback) problems.push(`tree: the newest CP ${tree.rollback.newestCp} does not verify; CP ${tree.rollback.mountedCp} does (${tree.rollback.reasons.join('; ')})`);
      const r = await tree.check();
      for (const p of r.problems) problems.push(`tree: ${p}`);
      notes.push(`mirror of ${label.sourceUuid}: CP ${tree.stats().cpNumber}, ${r.blocksReachable} blocks reachable, ${r.blocksAccounted} accounted, ${tree.stats().snapshots.length} snapshot(s)`);
      await tree.close();
    }
  } finally {
    await dev.close();
  }
  return { ok: problems.length === 0, problems, notes };
}

/** A RAID mirror's health as `check` reports it (a failed array is a problem). */
function raidCheckNotes(dev: BlockDevice, problems: string[], notes: string[]): void {
  if (!(dev instanceof RaidDevice)) return;
  const h = dev.health();
  notes.push(`RAID-${h.level}, ${h.members} members: ${h.state}${h.state !== 'online' ? ` (${h.memberStatus.filter((m) => m.state !== 'online').map((m) => `member ${m.index} ${m.name}: ${m.reason ?? m.state}`).join('; ')})` : ''}`);
  if (h.state === 'failed') problems.push(h.failure ?? 'RAID failed');
}

/**
 * A RAID mirror's stripe journal is replayed by whoever opens it read-write: when no
 * receiver holds the mirror (its lock is free), check and scrub do it first, so they
 * never judge stripes a crash left half-written.
 */
async function replayIfIdle(dir: string, label: MirrorLabel): Promise<void> {
  if (!label.raid || !fs.existsSync(path.join(dir, RAID_JOURNAL_NAME))) return;
  const fd = fs.openSync(path.join(dir, MIRROR_LOCK_NAME), 'a');
  try {
    if (!native.flockExclusive(fd)) return; // a receiver holds it: it replayed the journal when it opened the mirror
    const dev = await openMirrorDevice(dir, label, false);
    await dev.close();
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * `scrub` of a RAID mirror (no receiver may hold it: stripes it is writing would read as
 * parity errors): the journal replayed, then every checksum of the committed image and
 * every in-use stripe's parity verified (src/raid/scrub.ts); with `repair`, rewritten.
 */
export async function scrubMirrorDir(dirArg: string, opts: { repair: boolean; onProgress?: (p: ScrubProgress) => void }): Promise<ScrubReport & { dir: string; served: boolean }> {
  const dir = path.resolve(dirArg);
  const label = readMirrorLabel(dir);
  if (!label.raid) throw new Error(`${dir} is a mirror on one member, not RAID: there is nothing to scrub (use nvmirror check)`);
  if (fs.existsSync(path.join(dir, BASELINE_MARKER_NAME))) throw new Error(`${dir}: a full baseline is in progress, the image is inconsistent until it completes: nothing to scrub yet`);
  const fd = fs.openSync(path.join(dir, MIRROR_LOCK_NAME), 'a');
  try {
    if (!native.flockExclusive(fd)) throw new Error(`mirror ${dir} is held by a running receiver: stop it to scrub the mirror (check works while it runs)`);
    if (!opts.repair) await (await openMirrorDevice(dir, label, false)).close(); // the journal replayed first
    const dev = await openMirrorDevice(dir, label, !opts.repair);
    try {
      assert(dev instanceof RaidDevice, 'a RAID mirror opens as a RaidDevice');
      const committed = await newestSuperblock(dev, label.sourceUuid);
      if (!committed) throw new Error(`mirror ${dir} has no committed CP yet: nothing to scrub`);
      const tree = await BlockTree.open(dev, { discardFreed: false });
      try {
        if (tree.stats().cpNumber !== committed.sb.cpNumber) throw new Error(`mirror ${dir}: the ring mounts CP ${tree.stats().cpNumber}, the committed CP is ${committed.sb.cpNumber}: run nvmirror check`);
        const r = await scrubRaid(tree, dev, opts);
        if (opts.repair) await dev.sync();
        return { dir, served: false, ...r };
      } finally {
        await tree.close();
      }
    } finally {
      await dev.close();
    }
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Failback: a demoted old primary's member rolls back to the CP the promoted volume names
 * (same CP number, same root pointer), found in the member's superblock ring; the ring
 * slots of its own later CPs are cleared (their state was kept by demote). Refused, with
 * nothing changed, when the source offers no base or the member does not hold it.
 */
async function rollBackForFailback(dir: string, dev: BlockDevice, label: MirrorLabel, hello: MirrorHello, logger: Logger): Promise<void> {
  const d = label.demoted!;
  const baseCp = hello.baseCp ?? -1;
  if (baseCp < 0 || !hello.baseRoot) {
    throw new MirrorDirError(`mirror ${dir} is a demoted primary (${d.fromDir}): only the volume promoted from it may resync it, naming the CP both hold; this source offers none`);
  }
  const ring = await ringSuperblocks(dev, label.sourceUuid);
  const held = ring.map((e) => e.sb.cpNumber);
  let found = ring.find((e) => e.sb.cpNumber === baseCp && rootBytes(e.sb).equals(hello.baseRoot!))?.raw;
  if (!found && d.destSuperblock !== undefined) {
    // Out of the ring: the old primary kept its destination's CP's superblock, and held that
    // CP's blocks since (the check below proves it); put it back into its slot.
    const kept = Buffer.from(d.destSuperblock, 'base64');
    const sb = kept.length === BLOCK ? decodeSuperblock(kept) : 'not one block';
    if (typeof sb !== 'string' && sb.volumeUuid === label.sourceUuid && sb.cpNumber === baseCp && rootBytes(sb).equals(hello.baseRoot)) {
      await dev.writeBlocks(baseCp % RING_SLOTS, kept);
      found = kept;
    }
  }
  // This side's CPs after the base (the slot the base went back into no longer holds one).
  const later = ring.filter((e) => e.sb.cpNumber > baseCp && e.slot !== baseCp % RING_SLOTS).map((e) => e.slot);
  if (!found) {
    throw new MirrorDirError(`mirror ${dir} (demoted from ${d.fromDir}) does not hold CP ${baseCp} with the promoted volume's root (its ring holds CPs ${held.sort((a, b) => a - b).join(', ') || 'none'}): ` +
      `no common CP, so no failback without a full copy; remove ${dir} to take a full baseline`);
  }
  // The base becomes the newest CP in the ring: this side's later ones are cleared (their
  // state is in the demote's copy).
  for (const s of later) await dev.writeBlocks(s, Buffer.alloc(BLOCK));
  await dev.sync();
  // Equal root pointers prove the trees equal only if every block of the base is still
  // what it was here: a block this side reused after the base (a restart that did not hold
  // it) would otherwise go unnoticed. Mount the base and check all of it once (local I/O).
  let damage: string | undefined;
  try {
    const tree = await BlockTree.open(dev, { discardFreed: false });
    try {
      if (tree.stats().cpNumber !== baseCp) damage = `the ring mounts CP ${tree.stats().cpNumber}, not CP ${baseCp}`;
      else {
        const r = await tree.check();
        if (r.problems.length > 0) damage = r.problems.slice(0, 3).join('; ');
      }
    } finally {
      await tree.close();
    }
  } catch (e) {
    damage = e instanceof Error ? e.message : String(e);
  }
  if (damage !== undefined) {
    // Not a usable base: the member holds no CP for this mirror any more (every ring slot
    // cleared), so the source sends a full baseline; this side's state is in the demote's copy.
    logger.error({ dir, baseCp, damage, keptIn: d.keptIn }, `failback: this side's copy of CP ${baseCp} no longer verifies (${damage}): a full baseline follows instead`);
    for (let s = 0; s < RING_SLOTS; s++) await dev.writeBlocks(s, Buffer.alloc(BLOCK));
    await dev.sync();
    return;
  }
  logger.warn({ dir, baseCp, discardedSlots: later.length, ownNewestCp: d.cp, keptIn: d.keptIn },
    `failback: rolled back to CP ${baseCp}, the last CP both sides hold; this side's CPs after it are discarded here (its whole state is kept in ${d.keptIn})`);
}

/**
 * The newest CP of the source `hello` names committed on a mirror member file found
 * without its label; undefined when it holds none (a creation cut short). A member of
 * another size than the source's block space is refused: it is not this mirror.
 */
async function committedOnMember(memberPath: string, hello: MirrorHello): Promise<number | undefined> {
  const dev = await FileBlockDevice.open(memberPath, { readOnly: true });
  try {
    const top = await newestSuperblock(dev, hello.sourceUuid);
    if (top === undefined) return undefined;
    if (top.sb.deviceBlocks !== hello.deviceBlocks || top.sb.sizeBytes !== hello.sizeBytes || dev.blockCount < hello.deviceBlocks) {
      throw new MirrorDirError(`${memberPath} holds CP ${top.sb.cpNumber} of ${hello.sourceUuid} on ${top.sb.deviceBlocks} blocks but no ${MIRROR_LABEL_NAME}, and the source now has ${hello.deviceBlocks}: move it aside to start a new mirror`);
    }
    return top.sb.cpNumber;
  } finally {
    await dev.close();
  }
}

/**
 * A mirror's label (DIR/mirror.json), checked for the fields every reader relies on. A
 * file that does not parse or lacks them is a MirrorDirError naming the file and what is
 * wrong (never a bare JSON parser message, never taken as "not a mirror").
 */
export function readMirrorLabel(dir: string): MirrorLabel {
  const file = path.join(dir, MIRROR_LABEL_NAME);
  let v: unknown;
  try {
    v = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    const why = e instanceof SyntaxError ? `not valid JSON (${e.message})` : e instanceof Error ? e.message : String(e);
    throw new MirrorDirError(`${file}: the mirror's label cannot be read: ${why}`);
  }
  const o = (typeof v === 'object' && v !== null ? v : {}) as Partial<MirrorLabel>;
  const nat = (x: unknown): boolean => Number.isSafeInteger(x) && (x as number) > 0;
  const problem = o.format !== 'nvmirror-mirror' ? 'its format is not nvmirror-mirror'
    : typeof o.sourceUuid !== 'string' || !SOURCE_UUID_RE.test(o.sourceUuid) ? 'it names no source uuid'
      : !nat(o.sizeBytes) || !nat(o.deviceBlocks) ? 'it has no size'
        : undefined;
  if (problem !== undefined) throw new MirrorDirError(`${file}: not a mirror's label: ${problem}`);
  return o as MirrorLabel;
}

/** Writes mirror.json durably (temp file, fsync, rename, fsync DIR). */
async function writeMirrorLabel(dir: string, label: MirrorLabel): Promise<void> {
  await writeFileDurably(dir, MIRROR_LABEL_NAME, JSON.stringify(label, null, 2) + '\n');
}

/**
 * Whether a baseline toward CP `targetCp` has committed, given the newest CP whose
 * superblock verifies: a baseline begins only toward a CP newer than the committed one
 * and never writes a superblock slot, so a superblock of targetCp or later is its commit's
 * (or a later CP's). An unreadable marker (targetCp < 0) says nothing.
 */
function baselineCommitted(targetCp: number, newestCp: number): boolean {
  return targetCp >= 0 && newestCp >= targetCp;
}

/**
 * Removes DIR's baseline marker, if there is one, once baselineInProgress said it is not
 * (the caller holds the mirror's lock): the baseline's superblock is durable, written after
 * all its blocks were synced, and the process stopped before the marker was removed.
 */
export async function removeStaleBaselineMarker(dir: string, logger: Pick<Logger, 'info'>): Promise<void> {
  const p = path.join(dir, BASELINE_MARKER_NAME);
  if (!fs.existsSync(p)) return;
  const marked = readBaselineMarker(p);
  await fs.promises.rm(p, { force: true });
  await syncDirectory(dir);
  logger.info({ dir, cp: marked?.cp }, 'the marker of a committed baseline removed (a stop between its commit and the removal)');
}

/**
 * Whether DIR's baseline marker stands for a baseline still in progress: false when there
 * is none, or when it is the marker of a baseline that the newest verified CP (newestCp)
 * shows committed (left by a stop between the commit and the marker's removal).
 */
export function baselineInProgress(dir: string, newestCp: number | undefined): boolean {
  const p = path.join(dir, BASELINE_MARKER_NAME);
  if (!fs.existsSync(p)) return false;
  const marked = readBaselineMarker(p);
  return !(marked && newestCp !== undefined && baselineCommitted(marked.cp, newestCp));
}

function readBaselineMarker(p: string): { cp: number; blocks: number } | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(p, 'utf8')) as Record<string, unknown>;
    if (typeof v.targetCp === 'number' && typeof v.blocks === 'number' && Number.isSafeInteger(v.targetCp) && Number.isSafeInteger(v.blocks) && v.blocks >= 0) {
      return { cp: v.targetCp, blocks: v.blocks };
    }
  } catch {
    /* an older or torn marker: the baseline starts over */
  }
  return undefined;
}

export class MirrorDir {
  /**
   * The connected source's blocks, for a block of this mirror that fails verification
   * (receiver-session.ts sets it while a session holds the mirror). Every view asks it
   * through repairFor(its CP); a copy that verifies is served, and written over the bad
   * one only under healBlock's rule.
   */
  repairSource: RepairSource | undefined;
  /** Blocks of this mirror that failed verification and were served from the source's copy. */
  blocksServedFromSource = 0;
  /** Of those, rewritten here (healBlock). */
  blocksHealed = 0;
  /** Heal writes in flight: a commit waits for them before the committed CP changes. */
  private readonly heals = new Set<Promise<void>>();
  /** A commit is changing the committed CP: no heal starts. */
  private committing = false;

  private repairFor(cp: number): RepairSource {
    return {
      name: 'the source',
      read: (pba) => (this.repairSource ? this.repairSource.read(pba) : Promise.reject(new Error('the source is not connected'))),
      repaired: (pba, copy) => {
        this.blocksServedFromSource++;
        this.healBlock(cp, pba, copy);
      },
    };
  }

  /**
   * Checks committed CP `cp` (superblock `raw`, pinned by the caller so no CP writes its
   * blocks meanwhile) with its space map, from the receiver: a block that fails is asked
   * of the connected source and rewritten under healBlock's rule.
   */
  async checkCommitted(cp: number, raw: Buffer): Promise<{ ok: boolean; problems: string[]; notes: string[] }> {
    const problems: string[] = [];
    const notes: string[] = [];
    raidCheckNotes(this.dev, problems, notes);
    const served0 = this.blocksServedFromSource;
    const healed0 = this.blocksHealed;
    let tree: BlockTree;
    try {
      tree = await BlockTree.openCommitted(this.dev, raw);
    } catch (e) {
      problems.push(`tree: CP ${cp}: ${e instanceof Error ? e.message : String(e)}`);
      return { ok: false, problems, notes };
    }
    try {
      tree.setRepairSource(this.repairFor(cp));
      const r = await tree.check();
      for (const p of r.problems) problems.push(`tree: ${p}`);
      notes.push(`checked by the receiver (pid ${process.pid}) on CP ${cp}, pinned meanwhile: ${r.blocksReachable} blocks reachable, ${r.blocksAccounted} accounted, ${tree.stats().snapshots.length} snapshot(s)`);
      // The rewrites run behind the check; the counts once they are done.
      await Promise.all([...this.heals]);
      const served = this.blocksServedFromSource - served0;
      if (served > 0) notes.push(`${served} block(s) failed verification on this disk and were repaired from the source's copy, ${this.blocksHealed - healed0} rewritten here (the log names them)`);
    } finally {
      await tree.close();
    }
    return { ok: problems.length === 0, problems, notes };
  }

  /**
   * Writes a verified copy over a damaged block, only when nothing else can be writing that
   * pba: the copy verified against CP `cp`'s own pointer and `cp` is still the committed
   * CP, no commit is under way, and the committed CP uses the block (a CP being applied
   * never writes such a block: checkWritable refuses it). The commit that ends this CP
   * waits for the write (heals). Otherwise the copy is only served (logged).
   */
  private healBlock(cp: number, pba: number, copy: Buffer): void {
    const u = this.inUse;
    const m = 1 << (pba & 7);
    const used = u !== undefined && ((u.active[pba >>> 3]! | u.summary[pba >>> 3]!) & m) !== 0;
    if (cp !== this.committedCp || this.committing || this.baselinePartial || !used || pba < RING_SLOTS) {
      log().warn({ dir: this.dir, pba, cp, committedCp: this.committedCp }, 'mirror: a damaged block was served from the source\'s copy but not rewritten (the reader is on an older CP, or a CP is being committed): check this mirror');
      return;
    }
    const w = this.dev.writeBlocks(pba, Buffer.from(copy)).then(
      () => {
        this.blocksHealed++;
        log().warn({ dir: this.dir, pba, cp }, 'mirror: a damaged block was rewritten from the source\'s copy');
      },
      (e: unknown) => log().warn({ dir: this.dir, pba, err: e instanceof Error ? e.message : String(e) }, 'mirror: could not rewrite a damaged block from the source\'s copy'),
    );
    this.heals.add(w);
    void w.finally(() => this.heals.delete(w));
  }
  /** The committed image's superblock (undefined: nothing committed yet). */
  committed: { sb: Superblock; raw: Buffer } | undefined;
  /** A read-only tree view of the committed image (for exports and verify). */
  view: BlockTree | undefined;
  baselinePartial: boolean;
  /** The committed CP's space map (live and snapshots): blocks no CP may overwrite. */
  private inUse: { active: Buffer; summary: Buffer } | undefined;
  /** The durable progress of an interrupted baseline (from the marker), if any. */
  baselineResume: { cp: number; blocks: number } | undefined;
  lastCommitMs = 0;
  /** Why the last stream was refused or could not be applied (the receiver sets it; a commit clears it). */
  lastError: string | undefined;
  cpsApplied = 0;
  /** CPs the source began and abandoned (async, a slow peer): never committed. */
  cpsAborted = 0;
  blocksApplied = 0;
  refsApplied = 0;
  deltasApplied = 0;
  /** Bytes received from earlier connections. */
  bytesIn = 0;
  private lockFd: number;
  /** Readers of older CPs, protected from the CPs that land after theirs (pin-guard.ts). */
  readonly pins: PinGuard;

  private constructor(
    readonly dir: string,
    readonly label: MirrorLabel,
    readonly dev: BlockDevice,
    readonly log: DestLog,
    lockFd: number,
    baselinePartial: boolean,
  ) {
    this.lockFd = lockFd;
    this.baselinePartial = baselinePartial;
    this.pins = new PinGuard(label.sourceUuid, (pba) => this.readBlock(pba), () => this.committedCp);
  }

  /**
   * @param opts.device what the mirror's blocks go through instead of the member as
   *   opened (the recording device of test/crash/power-loss-mirror-cp.test.ts): given the
   *   opened device, returns the one to use (and closes the other if it replaces it).
   */
  static async openOrCreate(root: string, hello: MirrorHello, logger: Logger, opts: { device?: (opened: BlockDevice) => Promise<BlockDevice> } = {}): Promise<MirrorDir> {
    const dir = path.join(root, hello.sourceUuid);
    try {
      await fs.promises.mkdir(dir, { recursive: true });
    } catch (e) {
      const code = native.errnoCode(e);
      if (code === 'EEXIST' || code === 'ENOTDIR') throw new MirrorDirError(`${dir} exists and is not a directory: the mirror of source ${hello.sourceUuid} goes there (move the file away)`);
      throw new MirrorDirError(`cannot make the mirror directory ${dir}: ${e instanceof Error ? e.message : String(e)}`);
    }
    let lockFd: number;
    try {
      lockFd = fs.openSync(path.join(dir, MIRROR_LOCK_NAME), 'a');
    } catch (e) {
      throw new MirrorDirError(`cannot open ${path.join(dir, MIRROR_LOCK_NAME)}: ${e instanceof Error ? e.message : String(e)}`);
    }
    // Opened here and closed here if the open fails further on (a member left open keeps its
    // flock: every later stream of this source would be refused as "in use").
    let dev: BlockDevice | undefined;
    let log: DestLog | undefined;
    try {
      if (!native.flockExclusive(lockFd)) throw new MirrorDirError(`mirror ${dir} is already in use by another connection or process`);
      const labelPath = path.join(dir, MIRROR_LABEL_NAME);
      let label: MirrorLabel;
      if (fs.existsSync(labelPath)) {
        label = readMirrorLabel(dir);
        if (label.format !== 'nvmirror-mirror' || label.sourceUuid !== hello.sourceUuid) throw new MirrorDirError(`${labelPath}: not a mirror of ${hello.sourceUuid}`);
        if (label.sizeBytes !== hello.sizeBytes || label.deviceBlocks !== hello.deviceBlocks) {
          throw new MirrorDirError(`mirror ${dir} was made for ${label.sizeBytes} bytes on ${label.deviceBlocks} blocks; the source now has ${hello.sizeBytes} on ${hello.deviceBlocks}`);
        }
      } else if (fs.existsSync(path.join(dir, LABEL_NAME))) {
        // Pre-created with `nvmirror create DIR/<source-uuid> --size S [--member PATH]`: its
        // member (on the disk the operator chose) becomes the mirror's. Its own label is set
        // aside so nothing serves that directory as the volume it was formatted as.
        const vol = await readLabel(dir);
        const member = vol.members[0]!;
        const memberPath = resolveIn(dir, member.path);
        if (vol.sizeBytes !== hello.sizeBytes) throw new MirrorDirError(`${dir} was created for ${vol.sizeBytes} bytes; the source has ${hello.sizeBytes}`);
        if (vol.raid) {
          // A RAID destination: its tree space (stripes of its own geometry) must cover the source's block space.
          const logical = raidLogicalBlocks(vol.raid.level, vol.members.length, vol.raid.stripeUnitBytes, member.blockCount);
          if (logical < hello.deviceBlocks) {
            throw new MirrorDirError(`${dir}: its RAID-${vol.raid.level} device holds ${logical} blocks of tree space; the source's block space needs ${hello.deviceBlocks} (create it with a larger --size)`);
          }
          // Its members as they are (a foreign or swapped one is refused by name) before anything in DIR changes.
          const probe = await openRaidMembers(vol.members.map((m) => ({ name: m.path, path: resolveIn(dir, m.path) })), vol.raid, member.blockCount, hello.sourceUuid, true, undefined, { formerUuid: vol.uuid })
            .catch((e: unknown) => { throw new MirrorDirError(`${dir}: ${e instanceof Error ? e.message : String(e)}`); });
          await probe.close();
        } else if (member.blockCount < hello.deviceBlocks) throw new MirrorDirError(`${dir}: its member has ${member.blockCount} blocks; the source's block space needs ${hello.deviceBlocks}`);
        label = {
          format: 'nvmirror-mirror', version: 1, sourceUuid: hello.sourceUuid, sizeBytes: hello.sizeBytes, deviceBlocks: hello.deviceBlocks, createdMs: Date.now(),
          ...(vol.raid
            ? { raid: { level: vol.raid.level, stripeUnitBytes: vol.raid.stripeUnitBytes, members: vol.members.map((m) => ({ path: m.path, blockCount: m.blockCount })), formerUuid: vol.uuid } }
            : { memberPath: member.path }),
        };
        await fs.promises.rename(path.join(dir, LABEL_NAME), path.join(dir, `${LABEL_NAME}.before-mirror`));
        await writeMirrorLabel(dir, label);
        logger.info({ dir, source: hello.sourceUuid, member: memberPath }, 'pre-created volume directory taken as the mirror');
      } else {
        label = { format: 'nvmirror-mirror', version: 1, sourceUuid: hello.sourceUuid, sizeBytes: hello.sizeBytes, deviceBlocks: hello.deviceBlocks, createdMs: Date.now() };
        const memberPath = path.join(dir, MEMBER_NAME);
        // A member without its label: one that holds committed CPs of this source is this
        // mirror (its label lost: made again from what the source says and the member
        // holds); one that holds none is a creation cut short, made anew.
        const kept = fs.existsSync(memberPath) ? await committedOnMember(memberPath, hello) : undefined;
        if (kept !== undefined) {
          await writeMirrorLabel(dir, label);
          logger.warn({ dir, source: hello.sourceUuid, cp: kept }, `the mirror's label (${MIRROR_LABEL_NAME}) was missing: made again from the source's HELLO and the member, which holds CP ${kept}`);
        } else {
          await fs.promises.rm(memberPath, { force: true });
          const dev = await FileBlockDevice.create(memberPath, hello.deviceBlocks);
          await dev.close();
          await writeMirrorLabel(dir, label);
          logger.info({ dir, source: hello.sourceUuid }, 'new mirror created');
        }
      }
      const opened = await openMirrorDevice(dir, label, false);
      dev = opened;
      if (opts.device) dev = await opts.device(opened);
      if (dev.blockCount < label.deviceBlocks) {
        throw new MirrorDirError(`mirror ${label.raid ? `RAID-${label.raid.level} device` : 'member'} has ${dev.blockCount} blocks, needs ${label.deviceBlocks}`);
      }
      if (label.demoted) {
        await rollBackForFailback(dir, dev, label, hello, logger);
        delete label.demoted;
        await writeMirrorLabel(dir, label);
      }
      const committed = await newestSuperblock(dev, label.sourceUuid);
      // The log keeps what an earlier run stored after the committed CP (a receiver restart loses no record).
      log = await DestLog.open(path.join(dir, DEST_LOG_NAME), hello.sourceUuid, destLogBytesFor(hello.nvramBytes), 'recover', committed?.sb.nvlogSeq ?? 0);
      if (log.recordsRecovered > 0) logger.info({ dir, records: log.recordsRecovered }, 'records of an earlier run kept in the mirror\'s log');
      const damage = log.damage && `the mirror's log is damaged: record seq ${log.damage.firstMissingSeq} cannot be read, though every record through seq ${log.damage.durableThroughSeq} was stored durably; the log keeps those before it (the source sends the rest again if it still holds them; a promote now would need --accept-log-loss)`;
      if (damage) logger.error({ dir, ...log.damage }, damage);
      const markerPath = path.join(dir, BASELINE_MARKER_NAME);
      const partial = baselineInProgress(dir, committed?.sb.cpNumber);
      // Left, the marker of a committed baseline would send the source into resuming a
      // baseline this mirror has committed.
      if (!partial) await removeStaleBaselineMarker(dir, logger);
      const m = new MirrorDir(dir, label, dev, log, lockFd, partial);
      // Shown by the receiver's status until a CP commits here (the source resent or resynced).
      if (damage) m.lastError = damage;
      if (m.baselinePartial) m.baselineResume = readBaselineMarker(markerPath);
      m.committed = committed;
      if (m.committed && !m.baselinePartial) {
        m.view = await BlockTree.openView(dev, m.committed.raw);
        m.view.setRepairSource(m.repairFor(m.committed.sb.cpNumber));
        await m.loadInUse(m.committed.sb, undefined);
      }
      if (m.committed) log.committed(m.committed.sb.nvlogSeq);
      return m;
    } catch (e) {
      await log?.close().catch(() => undefined);
      await dev?.close().catch(() => undefined);
      fs.closeSync(lockFd);
      throw e;
    }
  }

  get committedCp(): number {
    return this.committed ? this.committed.sb.cpNumber : -1;
  }

  /**
   * Marks a baseline toward CP `targetCp` in progress with `blocks` of it durable (the
   * image is inconsistent until it commits), or clears the mark (targetCp undefined).
   */
  async setBaselinePartial(targetCp: number | undefined, blocks = 0): Promise<void> {
    const p = path.join(this.dir, BASELINE_MARKER_NAME);
    if (targetCp !== undefined) {
      await writeFileDurably(this.dir, BASELINE_MARKER_NAME, JSON.stringify({ targetCp, blocks, updated: new Date().toISOString() }) + '\n');
      this.baselineResume = { cp: targetCp, blocks };
    } else {
      await fs.promises.rm(p, { force: true });
      await syncDirectory(this.dir);
      this.baselineResume = undefined;
    }
    this.baselinePartial = targetCp !== undefined;
    if (this.baselinePartial) this.view = undefined;
  }

  /** Makes the completed writes of the CP being applied durable (nothing is recorded: a resync's). */
  syncBlocks(): Promise<void> {
    return this.dev.sync();
  }

  /**
   * Makes the first `blocks` blocks of the baseline toward `targetCp` durable and records
   * it. The caller's writes of those blocks have completed; writes of later blocks may be
   * in flight (the sync covers at least the completed ones).
   */
  async baselineProgress(targetCp: number, blocks: number): Promise<void> {
    await this.dev.sync();
    await this.setBaselinePartial(targetCp, blocks);
  }

  /**
   * The space map of `sb` (now committed): only the live leaves born after `prev`'s CP
   * when the snapshot set is unchanged, else all of it.
   */
  private async loadInUse(sb: Superblock, prev: Superblock | undefined): Promise<void> {
    const read = (pba: number): Promise<Buffer> => this.readBlock(pba);
    const sameSnapshots = prev !== undefined && prev.snapshots.length === sb.snapshots.length && prev.snapshots.every((s, i) => s.name === sb.snapshots[i]!.name && s.cp === sb.snapshots[i]!.cp);
    if (this.inUse && prev && sameSnapshots) {
      await readActiveMap(read, sb, this.inUse.active, prev.cpNumber);
      return;
    }
    // Fresh (zeroed, untouched) bitmaps: the reads touch only the pages of leaves that exist.
    const active = Buffer.alloc(bitmapBytes(sb));
    const summary = Buffer.alloc(bitmapBytes(sb));
    await readActiveMap(read, sb, active, -1, true);
    await readSummaryMap(read, sb, summary, true);
    this.inUse = { active, summary };
  }

  /**
   * Writes blocks of a CP being applied (never the ring; inside the device; with
   * `checkInUse`, never a block the committed CP uses).
   */
  writeBlocks(pba: number, data: Buffer | readonly Buffer[], checkInUse: boolean, hint?: WriteHint): Promise<void> {
    const parts = Buffer.isBuffer(data) ? [data] : data;
    let bytes = 0;
    for (const b of parts) {
      assert(b.length > 0 && b.length % BLOCK === 0, 'whole blocks');
      bytes += b.length;
    }
    this.checkWritable(pba, bytes / BLOCK, checkInUse);
    this.checkMember();
    if (parts.length === 1) return this.dev.writeBlocks(pba, parts[0]!, hint);
    // Parts straight from the stream's frames: one pwritev where the device has it, not a copy into one buffer.
    if (this.dev.writeBlocksV && parts.length <= WRITE_PARTS_MAX) return this.dev.writeBlocksV(pba, parts, hint);
    return this.dev.writeBlocks(pba, Buffer.concat(parts), hint);
  }

  /**
   * Throws a MirrorDirError if the member file is shorter than when it was opened (cut
   * under us: the committed CP's blocks past the cut are gone). Checked before every
   * write and commit, because a write past the cut would extend the file again with holes
   * where those blocks were, and the next CP would commit a root over them: equal roots,
   * different devices.
   */
  checkMember(): void {
    // A RAID member cut under us is taken out of service at the next sync (its blocks rebuilt from the others).
    if (!(this.dev instanceof FileBlockDevice)) return;
    let size: number;
    try {
      // fstat of the descriptor written to (no path lookup: this runs before every write).
      size = this.dev.fileBytes();
    } catch (e) {
      throw new MirrorDirError(`mirror member ${this.dev.path}: ${(e as Error).message}`);
    }
    const want = this.dev.blockCount * BLOCK;
    if (size < want) {
      throw new MirrorDirError(`mirror member ${this.dev.path} was truncated to ${size} bytes (it had ${want}): the committed image is damaged; run nvmirror check, or remove ${this.dir} for a new baseline`);
    }
  }

  /** Throws a MirrorDirError if a CP may not write [pba, pba+n) (see writeBlocks). */
  checkWritable(pba: number, n: number, checkInUse: boolean): void {
    if (!(pba >= RING_SLOTS && pba + n <= this.label.deviceBlocks)) throw new MirrorDirError(`CP block at pba ${pba} outside [${RING_SLOTS}, ${this.label.deviceBlocks})`);
    const u = this.inUse;
    if (checkInUse && u) {
      for (let p = pba; p < pba + n; p++) {
        const m = 1 << (p & 7);
        if (((u.active[p >>> 3]! | u.summary[p >>> 3]!) & m) !== 0) {
          throw new MirrorDirError(`the CP writes pba ${p}, which the committed CP ${this.committedCp} uses (a confused or hostile source, or one whose copy of that CP was damaged): refused ${baseInUseTag(this.committedCp, p)}`);
        }
      }
    }
  }

  /** Reads raw blocks for verify (the ring included: the source compares superblocks). */
  async readRaw(pbas: number[]): Promise<Buffer> {
    const out = Buffer.allocUnsafe(pbas.length * BLOCK);
    for (let i = 0; i < pbas.length; i++) {
      const p = pbas[i]!;
      if (!(p >= 0 && p < this.label.deviceBlocks)) throw new MirrorDirError(`read of pba ${p} outside the device`);
      await this.dev.readBlocks(p, 1, out.subarray(i * BLOCK, (i + 1) * BLOCK));
    }
    return out;
  }

  /** Reads `count` blocks of the committed image from pba on into dst (the bases deltas apply to). */
  async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    if (!(count >= 1 && pba >= RING_SLOTS && pba + count <= this.label.deviceBlocks)) throw new MirrorDirError(`blocks [${pba}, ${pba + count}) outside [${RING_SLOTS}, ${this.label.deviceBlocks})`);
    assert(dst.length >= count * BLOCK, 'readBlocks into a buffer that holds them');
    await this.dev.readBlocks(pba, count, dst);
  }

  /** Reads one block of the committed image (the base a delta applies to). */
  async readBlock(pba: number): Promise<Buffer> {
    const b = Buffer.allocUnsafe(BLOCK);
    await this.readBlocks(pba, 1, b);
    return b;
  }

  /** Commits a CP whose blocks are all written: sync, superblock into its slot, sync. */
  async applyCommit(cp: number, slot: number, superblock: Buffer): Promise<Superblock> {
    const d = decodeSuperblock(superblock);
    if (typeof d === 'string') throw new MirrorDirError(`CP ${cp}: superblock does not verify (${d})`);
    if (d.volumeUuid !== this.label.sourceUuid) throw new MirrorDirError(`CP ${cp}: superblock of volume ${d.volumeUuid}, this is a mirror of ${this.label.sourceUuid}`);
    if (d.cpNumber !== cp || slot !== cp % RING_SLOTS) throw new MirrorDirError(`CP ${cp}: superblock says CP ${d.cpNumber} in slot ${slot}`);
    if (d.deviceBlocks !== this.label.deviceBlocks || d.sizeBytes !== this.label.sizeBytes) throw new MirrorDirError(`CP ${cp}: superblock geometry differs from the mirror's`);
    if (cp <= this.committedCp) throw new MirrorDirError(`CP ${cp} is not newer than the committed CP ${this.committedCp}`);
    this.checkMember();
    // Heals of the outgoing CP's blocks end before it does (a later CP may write those pbas).
    this.committing = true;
    try {
      await Promise.all([...this.heals]);
      return await this.commitSuperblock(cp, slot, superblock, d);
    } finally {
      this.committing = false;
    }
  }

  private async commitSuperblock(cp: number, slot: number, superblock: Buffer, d: Superblock): Promise<Superblock> {
    await this.dev.sync();
    await this.dev.writeBlocks(slot, superblock);
    await this.dev.sync();
    const raw = Buffer.from(superblock);
    const view = await BlockTree.openView(this.dev, raw);
    view.setRepairSource(this.repairFor(cp));
    // The outgoing CP's map joins the pin guard's (if a reader keeps that CP) before it is updated in place.
    if (this.committed && this.inUse && !this.baselinePartial) this.pins.retire(this.committed.sb, this.inUse);
    await this.loadInUse(d, this.baselinePartial ? undefined : this.committed?.sb);
    if (this.baselinePartial) await this.setBaselinePartial(undefined);
    // The committed CP and its view change together: a reader never gets one CP's label with another's root.
    this.committed = { sb: d, raw };
    this.view = view;
    this.lastCommitMs = Date.now();
    this.log.committed(d.nvlogSeq);
    return d;
  }

  async close(): Promise<void> {
    await this.view?.close().catch(() => undefined);
    await this.log.close().catch(() => undefined);
    await this.dev.close().catch(() => undefined);
    fs.closeSync(this.lockFd);
  }
}
