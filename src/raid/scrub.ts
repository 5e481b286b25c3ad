/**
 * Scrub of a RAID volume (issue 9 point 6): reads everything in use and verifies it.
 *
 * Pass 1 (checksums): the tree's check() over every root (live and snapshots) reads
 * every block in use through the RaidDevice and verifies it against its parent's
 * checksum. A block that fails is handed to the device's readRepaired(), which rebuilds
 * it from parity or a mirror copy until a version verifies; with `repair` the device
 * rewrites the bad copy, without it nothing is written. Every such block is recorded.
 * Pass 2 (redundancy): every stripe that holds a block in use (the space map: active |
 * summary) has its P (and Q; RAID-1: every copy) recomputed from its data and compared
 * (RaidDevice.scrubStripe); with `repair` a stale column is rewritten from the data.
 *
 * Invariants:
 * - Without `repair` nothing is written to any member (readRepaired with heal off,
 *   scrubStripe with repair off).
 * - Redundancy is recomputed only from data that verified: a stripe holding a block that
 *   could not be rebuilt is never "repaired" (its parity is left as it is), nor is one
 *   holding a block in use that pass 1 never read (it lies below a block that could not
 *   be rebuilt, so nothing says whether its data or its parity is the wrong one: its
 *   parity may be what rebuilds it once the block above is restored, e.g. from a
 *   mirror); a mismatch there is reported, never "corrected". Without repair, a stripe
 *   holding a block that failed its checksum gets no parity verdict (the data error
 *   explains the mismatch; the block is already counted).
 * - Memory: three bitmaps of one bit per device block, plus one stripe's units per stripe
 *   in flight (SCRUB_STRIPES_IN_FLIGHT).
 * - At most one scrub per RaidDevice at a time; its progress is readable meanwhile
 *   (scrubState) and the last report stays there until the device is closed.
 * - Resume (opts.store): pass 2 saves a checkpoint (the next stripe, the counts so far,
 *   the stripes pass 1 left without a parity verdict) every SCRUB_CHECKPOINT_STRIPES
 *   stripes, after the members are synced (with repair: every rewrite before it is
 *   durable). A scrub that finds a checkpoint of the same mode skips pass 1 and goes on
 *   from its stripe; a crash in pass 1 starts over (pass 1 is one tree walk). A pass 1
 *   that leaves more than SCRUB_RESUME_STRIPES_MAX stripes without a verdict saves no
 *   checkpoint (the run is not resumable). The checkpoint is cleared when the scrub ends.
 * - Rate (opts.rateBytesPerSec): every read of both passes waits its turn on the
 *   injected clock, so the scrub reads at most that many bytes per second on average.
 */
import type { BlockDevice, Clock } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { setBit, testBit } from '../util/bitmap';
import { forEachLimit } from '../util/work';
import { assert } from '../util/assert';
import type { RaidDevice } from './raid-device';

/**
 * What a scrub needs of the tree above the RAID (the tree passes itself): the blocks in
 * use, and a check of every root that reads through a given device.
 */
export interface ScrubbedTree {
  /** One bit per device block, set where the live state or a snapshot uses it. */
  usedBitmap(): Buffer;
  /** Reads every reachable block through `dev`, verifying each against its parent's checksum. */
  check(onBlocksRead: (blocks: number) => void, dev: BlockDevice): Promise<{ ok: boolean; problems: string[]; blocksReachable: number }>;
}

const B = BLOCK_SIZE_BYTES;
const SCRUB_STRIPES_IN_FLIGHT = 4;
const MAX_PROBLEMS = 200;
/** Pass 2 saves a resume checkpoint every this many stripes in use. */
export const SCRUB_CHECKPOINT_STRIPES = 32;
/** Stripes without a parity verdict from pass 1 a checkpoint may carry; more and the run is not resumable. */
const SCRUB_RESUME_STRIPES_MAX = 4096;
/** Problems a checkpoint carries over to the resumed run. */
const SCRUB_RESUME_PROBLEMS_MAX = 20;

/** What an interrupted scrub saved to go on from (JSON: the volume directory keeps it in a file). */
export interface ScrubCheckpoint {
  version: 1;
  repair: boolean;
  /** Geometry it was taken on (a mismatch: start over). */
  stripes: number;
  startedMs: number;
  /** Pass 2 goes on with stripes in use >= this. */
  nextStripe: number;
  /** Stripes pass 1 found a block in that could not be rebuilt (left as they are). */
  lostStripes: number[];
  /** Without repair: stripes pass 1 found a bad (rebuilt) block in (no parity verdict). */
  rebuiltStripes: number[];
  /** Stripes holding a block in use pass 1 never read (below a lost block): never rewritten. */
  unverifiedStripes: number[];
  checkOk: boolean;
  blocksVerified: number;
  checksumErrors: number;
  unrebuildable: number;
  stripesChecked: number;
  stripesUnverifiable: number;
  parityErrors: number;
  parityCorrected: number;
  /** Per member: read, write, checksum deltas so far (checksum including parity mismatches without repair). */
  memberCounts: Array<{ read: number; write: number; checksum: number }>;
  problems: string[];
}

/** Where checkpoints live (the volume directory's scrub progress file). */
export interface ScrubCheckpointStore {
  load(): Promise<ScrubCheckpoint | undefined>;
  save(c: ScrubCheckpoint): Promise<void>;
  clear(): Promise<void>;
}

/** Wall-clock time with timers that keep the process alive (a CLI scrub waiting its rate turn must not exit). */
const refClock: Clock = {
  nowMs: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    return { cancel: () => clearTimeout(t) };
  },
};

/** Paces reads to bytesPerSec on average (none when undefined). */
class Pacer {
  private readonly t0: number;
  private bytes = 0;
  constructor(private readonly bytesPerSec: number | undefined, private readonly clock: Clock) {
    this.t0 = clock.nowMs();
  }
  async take(n: number): Promise<void> {
    if (this.bytesPerSec === undefined) return;
    this.bytes += n;
    const dueMs = this.t0 + (this.bytes / this.bytesPerSec) * 1000;
    const waitMs = dueMs - this.clock.nowMs();
    if (waitMs > 0) await new Promise<void>((r) => this.clock.setTimeout(r, waitMs));
  }
}

function isCheckpoint(c: unknown, repair: boolean, stripes: number, members: number): c is ScrubCheckpoint {
  if (typeof c !== 'object' || c === null) return false;
  const o = c as Partial<ScrubCheckpoint>;
  const nat = (v: unknown): boolean => Number.isSafeInteger(v) && (v as number) >= 0;
  return o.version === 1 && o.repair === repair && o.stripes === stripes && nat(o.nextStripe) && (o.nextStripe as number) <= stripes
    && Array.isArray(o.lostStripes) && o.lostStripes.every(nat) && Array.isArray(o.rebuiltStripes) && o.rebuiltStripes.every(nat)
    && Array.isArray(o.unverifiedStripes) && o.unverifiedStripes.every(nat)
    && Array.isArray(o.memberCounts) && o.memberCounts.length === members && Array.isArray(o.problems) && typeof o.checkOk === 'boolean'
    && [o.startedMs, o.blocksVerified, o.checksumErrors, o.unrebuildable, o.stripesChecked, o.stripesUnverifiable, o.parityErrors, o.parityCorrected].every(nat);
}

export interface ScrubProgress {
  repair: boolean;
  phase: 'checksums' | 'parity';
  startedMs: number;
  scannedBytes: number;
  /** Estimate: blocks in use plus the in-use stripes' units on every member. */
  totalBytes: number;
}

export interface ScrubMemberCounts {
  index: number;
  name: string;
  state: string;
  read: number;
  write: number;
  checksum: number;
}

export interface ScrubReport {
  repair: boolean;
  /** Nothing found (or everything found repaired) and nothing uncorrectable. */
  ok: boolean;
  startedMs: number;
  durationMs: number;
  scannedBytes: number;
  blocksVerified: number;
  stripesChecked: number;
  /** Stripes whose redundancy could not be checked (a member out of service, or being written). */
  stripesUnverifiable: number;
  /** Blocks that failed their checksum and rebuilt from redundancy (repaired with --repair). */
  checksumErrors: number;
  /** Stripes whose parity / copies did not match their data. */
  parityErrors: number;
  /** Errors rewritten (only with --repair). */
  corrected: number;
  /** Blocks that failed their checksum and could not be rebuilt, and stripes whose redundancy --repair could not rewrite. (Other tree problems, e.g. accounting, are in `problems` and make ok false.) */
  uncorrectable: number;
  members: ScrubMemberCounts[];
  problems: string[];
  /** Set when this run went on from an interrupted one's checkpoint: the stripe it resumed at. */
  resumedAtStripe?: number;
}

export interface ScrubState {
  running?: ScrubProgress;
  last?: ScrubReport;
}

const states = new WeakMap<RaidDevice, ScrubState>();

/** The scrub running on (and the last one finished on) a RAID device, for `status`. */
export function scrubState(raid: RaidDevice): ScrubState {
  return states.get(raid) ?? {};
}

export interface ScrubOptions {
  repair: boolean;
  onProgress?: (p: ScrubProgress) => void;
  /** Resume checkpoints (none: the scrub is not resumable). */
  store?: ScrubCheckpointStore;
  /** Average read rate limit, bytes per second (none: as fast as the members go). */
  rateBytesPerSec?: number;
  clock?: Clock;
}

/** Runs a scrub over a tree mounted on `raid`. Refuses a second scrub of the same device at once. */
export async function scrubRaid(tree: ScrubbedTree, raid: RaidDevice, opts: ScrubOptions): Promise<ScrubReport> {
  const state = states.get(raid) ?? {};
  if (state.running) throw new Error('a scrub of this volume is already running');
  const repair = opts.repair;
  const g = raid.geometry;
  const clock = opts.clock ?? refClock;
  assert(opts.rateBytesPerSec === undefined || (Number.isFinite(opts.rateBytesPerSec) && opts.rateBytesPerSec > 0), 'scrub rate must be positive');
  const pacer = new Pacer(opts.rateBytesPerSec, clock);
  const used = tree.usedBitmap();
  const W = g.stripeDataBlocks;
  const usedStripes: number[] = [];
  let usedBlocks = 0;
  for (let s = 0; s < g.stripes; s++) {
    let any = false;
    for (let p = s * W; p < (s + 1) * W; p++) {
      if (testBit(used, p)) {
        any = true;
        usedBlocks++;
      }
    }
    if (any) usedStripes.push(s);
  }
  const unitBytes = g.unitBlocks * B;
  // Claimed before the first await, so a second scrub is refused.
  const progress: ScrubProgress = { repair, phase: 'checksums', startedMs: clock.nowMs(), scannedBytes: 0, totalBytes: usedBlocks * B + usedStripes.length * g.members * unitBytes };
  state.running = progress;
  states.set(raid, state);
  const report = (): void => opts.onProgress?.({ ...progress });
  const before = raid.health().memberStatus.map((m) => ({ ...m.errors }));
  const problems: string[] = [];
  let dropped = 0;
  const problem = (s: string): void => {
    if (problems.length < MAX_PROBLEMS) problems.push(s);
    else dropped++;
  };
  try {
    const saved = await opts.store?.load();
    const resume = saved !== undefined && isCheckpoint(saved, repair, g.stripes, g.members) ? saved : undefined;
    if (saved !== undefined && !resume) await opts.store?.clear(); // another mode or geometry, or unreadable: start over

    // Pass 1: every checksum, through a device that records what needed rebuilding.
    const lostStripes = new Set<number>();
    const rebuiltStripes = new Set<number>();
    const unverifiedStripes = new Set<number>();
    let checksumErrors = 0;
    let unrebuildable = 0;
    let checkOk: boolean;
    let blocksVerified: number;
    let pass1Bytes: number;
    if (resume) {
      for (const s of resume.lostStripes) lostStripes.add(s);
      for (const s of resume.rebuiltStripes) rebuiltStripes.add(s);
      for (const s of resume.unverifiedStripes) unverifiedStripes.add(s);
      checksumErrors = resume.checksumErrors;
      unrebuildable = resume.unrebuildable;
      checkOk = resume.checkOk;
      blocksVerified = resume.blocksVerified;
      progress.startedMs = resume.startedMs;
      for (const p of resume.problems) problem(p);
      pass1Bytes = usedBlocks * B;
    } else {
      const bytes = Math.ceil(raid.blockCount / 8);
      const rebuilt = Buffer.alloc(bytes);
      const lost = Buffer.alloc(bytes);
      // Every block the tree's check read (and so verified against its parent, or handed to readRepaired).
      const read = Buffer.alloc(bytes);
      const recording: BlockDevice = {
        blockCount: raid.blockCount,
        allocUnitBlocks: raid.allocUnitBlocks,
        readBlocks: async (pba, count, dst) => {
          await pacer.take(count * B);
          await raid.readBlocks(pba, count, dst);
          for (let p = pba; p < pba + count; p++) setBit(read, p);
        },
        writeBlocks: () => Promise.reject(new Error('scrub writes only through the RAID device')),
        sync: () => Promise.resolve(),
        discard: () => Promise.resolve(),
        close: () => Promise.resolve(),
        readRepaired: async (pba, dst, verify) => {
          const ok = await raid.readRepaired(pba, dst, verify, { heal: repair });
          if (ok) {
            if (!testBit(rebuilt, pba)) checksumErrors++;
            setBit(rebuilt, pba);
            if (!repair) rebuiltStripes.add(Math.floor(pba / W));
          } else {
            if (!testBit(lost, pba)) unrebuildable++;
            setBit(lost, pba);
            lostStripes.add(Math.floor(pba / W));
          }
          return ok;
        },
      };
      const check = await tree.check((n) => {
        progress.scannedBytes = n * B;
        report();
      }, recording);
      checkOk = check.ok;
      blocksVerified = check.blocksReachable;
      pass1Bytes = progress.scannedBytes;
      for (const p of check.problems) problem(`tree: ${p}`);
      for (const s of usedStripes) {
        if (lostStripes.has(s)) continue;
        for (let p = s * W; p < (s + 1) * W; p++) {
          if (testBit(used, p) && !testBit(read, p)) {
            unverifiedStripes.add(s);
            break;
          }
        }
      }
    }

    // Pass 2: redundancy of every stripe in use, in checkpointed batches.
    progress.phase = 'parity';
    report();
    let stripesChecked = resume?.stripesChecked ?? 0;
    let stripesUnverifiable = resume?.stripesUnverifiable ?? 0;
    let parityErrors = resume?.parityErrors ?? 0;
    let parityCorrected = resume?.parityCorrected ?? 0;
    // Mismatches the device did not count itself (it counts those it was asked to rewrite).
    const parityUncountedByMember = new Array<number>(g.members).fill(0);
    const todo = usedStripes.filter((s) => s >= (resume?.nextStripe ?? 0));
    let done = usedStripes.length - todo.length;
    progress.scannedBytes = pass1Bytes + done * g.members * unitBytes;
    report();
    const resumable = lostStripes.size + rebuiltStripes.size + unverifiedStripes.size <= SCRUB_RESUME_STRIPES_MAX;
    const memberCounts = (): ScrubMemberCounts[] => raid.health().memberStatus.map((m, i) => ({
      index: m.index,
      name: m.name,
      state: m.state,
      read: m.errors.read - before[i]!.read + (resume?.memberCounts[i]!.read ?? 0),
      write: m.errors.write - before[i]!.write + (resume?.memberCounts[i]!.write ?? 0),
      // A parity mismatch counts on its member; scrubStripe counted those it was asked to rewrite.
      checksum: m.errors.checksum - before[i]!.checksum + parityUncountedByMember[i]! + (resume?.memberCounts[i]!.checksum ?? 0),
    }));
    for (let at = 0; at < todo.length; at += SCRUB_CHECKPOINT_STRIPES) {
      const batch = todo.slice(at, at + SCRUB_CHECKPOINT_STRIPES);
      await forEachLimit(batch, SCRUB_STRIPES_IN_FLIGHT, async (s) => {
        if (lostStripes.has(s)) {
          problem(`stripe ${s}: holds a block that could not be rebuilt; its redundancy is left as it is`);
        } else if (rebuiltStripes.has(s) && !repair) {
          // The bad data block explains a mismatch here; no verdict on parity.
        } else {
          await pacer.take(g.members * unitBytes);
          // Below a lost block: compared, never rewritten (which side is wrong is unknown).
          const unverified = unverifiedStripes.has(s);
          const rewrite = repair && !unverified;
          const r = await raid.scrubStripe(s, rewrite);
          if (r.verdict === 'unverifiable') stripesUnverifiable++;
          else stripesChecked++;
          if (r.verdict === 'mismatch') {
            parityErrors++;
            if (!rewrite) for (const m of r.members) parityUncountedByMember[m]!++;
            if (r.rewritten) parityCorrected++;
            else if (unverified) problem(`stripe ${s}: redundancy on member(s) ${r.members.join(', ')} does not match its data, which could not be verified (it lies below a block that could not be rebuilt); left as it is`);
            else problem(`stripe ${s}: redundancy on member(s) ${r.members.join(', ')} does not match its data${repair ? ' and could not be rewritten' : ' (run scrub --repair)'}`);
          }
        }
        done++;
        progress.scannedBytes = pass1Bytes + done * g.members * unitBytes;
        report();
      });
      const next = todo[at + SCRUB_CHECKPOINT_STRIPES];
      if (opts.store && resumable && next !== undefined) {
        if (repair) await raid.syncMembers(); // the rewrites so far are durable before the checkpoint says so
        await opts.store.save({
          version: 1, repair, stripes: g.stripes, startedMs: progress.startedMs, nextStripe: next,
          lostStripes: [...lostStripes], rebuiltStripes: [...rebuiltStripes], unverifiedStripes: [...unverifiedStripes], checkOk, blocksVerified,
          checksumErrors, unrebuildable, stripesChecked, stripesUnverifiable, parityErrors, parityCorrected,
          memberCounts: memberCounts().map((m) => ({ read: m.read, write: m.write, checksum: m.checksum })),
          problems: problems.slice(0, SCRUB_RESUME_PROBLEMS_MAX),
        });
      }
    }

    const members = memberCounts();
    const corrected = repair ? checksumErrors + parityCorrected : 0;
    const uncorrectable = unrebuildable + (repair ? parityErrors - parityCorrected : 0);
    if (dropped > 0) problems.push(`... and ${dropped} more problems`);
    const found = checksumErrors + parityErrors;
    const result: ScrubReport = {
      repair,
      ok: uncorrectable === 0 && checkOk && (repair || found === 0),
      startedMs: progress.startedMs,
      durationMs: clock.nowMs() - progress.startedMs,
      scannedBytes: progress.scannedBytes,
      blocksVerified,
      stripesChecked,
      stripesUnverifiable,
      checksumErrors,
      parityErrors,
      corrected,
      uncorrectable,
      members,
      problems,
      ...(resume ? { resumedAtStripe: resume.nextStripe } : {}),
    };
    await opts.store?.clear();
    state.last = result;
    return result;
  } finally {
    delete state.running;
  }
}

/** The report as `zpool status` would put it (lines, no trailing newline). */
export function formatScrubReport(r: ScrubReport, fmtSize: (n: number) => string): string[] {
  const lines: string[] = [];
  const what = r.repair ? 'scrub repaired' : 'scrub found';
  lines.push(`scan: ${what} ${r.repair ? r.corrected : r.checksumErrors + r.parityErrors} error(s) in ${(r.durationMs / 1000).toFixed(1)} s with ${r.uncorrectable} uncorrectable; scanned ${fmtSize(r.scannedBytes)} (${r.blocksVerified} blocks verified, ${r.stripesChecked} stripes' redundancy checked${r.stripesUnverifiable > 0 ? `, ${r.stripesUnverifiable} not checkable` : ''})`);
  lines.push(`      checksum errors ${r.checksumErrors}, parity errors ${r.parityErrors}, corrected ${r.corrected}, uncorrectable ${r.uncorrectable}`);
  if (r.resumedAtStripe !== undefined) lines.push(`      resumed an interrupted scrub at stripe ${r.resumedAtStripe} (counts include the interrupted run)`);
  lines.push('      member     STATE     READ WRITE CKSUM');
  for (const m of r.members) lines.push(`      ${String(m.index).padEnd(2)} ${m.name.padEnd(7)} ${m.state.toUpperCase().padEnd(8)} ${String(m.read).padStart(5)} ${String(m.write).padStart(5)} ${String(m.checksum).padStart(5)}`);
  for (const p of r.problems) lines.push(`problem: ${p}`);
  if (!r.ok && !r.repair && r.uncorrectable === 0) lines.push('errors: run nvmirror scrub --repair to repair them');
  else if (r.uncorrectable > 0) lines.push(`errors: ${r.uncorrectable} uncorrectable: the data affected cannot be rebuilt`);
  else lines.push('errors: none left');
  return lines;
}
