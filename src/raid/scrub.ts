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
 *   could not be rebuilt is never "repaired" (its parity is left as it is), and, without
 *   repair, a stripe holding a block that failed its checksum gets no parity verdict
 *   (the data error explains the mismatch; the block is already counted).
 * - Memory: two bitmaps of one bit per device block, plus one stripe's units per stripe
 *   in flight (SCRUB_STRIPES_IN_FLIGHT).
 * - At most one scrub per RaidDevice at a time; its progress is readable meanwhile
 *   (scrubState) and the last report stays there until the device is closed.
 */
import type { BlockDevice } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { setBit, testBit } from '../tree/bitmap';
import type { BlockTree } from '../tree/tree';
import { forEachLimit } from '../tree/work';
import type { RaidDevice } from './raid-device';

const B = BLOCK_SIZE_BYTES;
const SCRUB_STRIPES_IN_FLIGHT = 4;
const MAX_PROBLEMS = 200;

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

/** Runs a scrub over a tree mounted on `raid`. Refuses a second scrub of the same device at once. */
export async function scrubRaid(tree: BlockTree, raid: RaidDevice, opts: { repair: boolean; onProgress?: (p: ScrubProgress) => void }): Promise<ScrubReport> {
  const state = states.get(raid) ?? {};
  if (state.running) throw new Error('a scrub of this volume is already running');
  const repair = opts.repair;
  const g = raid.geometry;
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
  const progress: ScrubProgress = { repair, phase: 'checksums', startedMs: Date.now(), scannedBytes: 0, totalBytes: usedBlocks * B + usedStripes.length * g.members * unitBytes };
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
    // Pass 1: every checksum, through a device that records what needed rebuilding.
    const bytes = Math.ceil(raid.blockCount / 8);
    const rebuilt = Buffer.alloc(bytes);
    const lost = Buffer.alloc(bytes);
    let checksumErrors = 0;
    let unrebuildable = 0;
    const recording: BlockDevice = {
      blockCount: raid.blockCount,
      allocUnitBlocks: raid.allocUnitBlocks,
      readBlocks: (pba, count, dst) => raid.readBlocks(pba, count, dst),
      writeBlocks: () => Promise.reject(new Error('scrub writes only through the RAID device')),
      sync: () => Promise.resolve(),
      discard: () => Promise.resolve(),
      close: () => Promise.resolve(),
      readRepaired: async (pba, dst, verify) => {
        const ok = await raid.readRepaired(pba, dst, verify, { heal: repair });
        if (ok) {
          if (!testBit(rebuilt, pba)) checksumErrors++;
          setBit(rebuilt, pba);
        } else {
          if (!testBit(lost, pba)) unrebuildable++;
          setBit(lost, pba);
        }
        return ok;
      },
    };
    const check = await tree.check((n) => {
      progress.scannedBytes = n * B;
      report();
    }, recording);
    const pass1Bytes = progress.scannedBytes;
    for (const p of check.problems) problem(`tree: ${p}`);

    // Pass 2: redundancy of every stripe in use.
    progress.phase = 'parity';
    report();
    let stripesChecked = 0;
    let stripesUnverifiable = 0;
    let parityErrors = 0;
    let parityCorrected = 0;
    const parityByMember = new Array<number>(g.members).fill(0);
    let done = 0;
    await forEachLimit(usedStripes, SCRUB_STRIPES_IN_FLIGHT, async (s) => {
      let hasLost = false;
      let hasRebuilt = false;
      for (let p = s * W; p < (s + 1) * W; p++) {
        if (testBit(lost, p)) hasLost = true;
        if (testBit(rebuilt, p)) hasRebuilt = true;
      }
      if (hasLost) {
        problem(`stripe ${s}: holds a block that could not be rebuilt; its redundancy is left as it is`);
      } else if (hasRebuilt && !repair) {
        // The bad data block explains a mismatch here; no verdict on parity.
      } else {
        const r = await raid.scrubStripe(s, repair);
        if (r.verdict === 'unverifiable') stripesUnverifiable++;
        else stripesChecked++;
        if (r.verdict === 'mismatch') {
          parityErrors++;
          for (const m of r.members) parityByMember[m]!++;
          if (r.rewritten) parityCorrected++;
          else problem(`stripe ${s}: redundancy on member(s) ${r.members.join(', ')} does not match its data${repair ? ' and could not be rewritten' : ' (run scrub --repair)'}`);
        }
      }
      done++;
      progress.scannedBytes = pass1Bytes + done * g.members * unitBytes;
      report();
    });

    const after = raid.health().memberStatus;
    const members: ScrubMemberCounts[] = after.map((m, i) => ({
      index: m.index,
      name: m.name,
      state: m.state,
      read: m.errors.read - before[i]!.read,
      write: m.errors.write - before[i]!.write,
      // A parity mismatch counts on its member; with repair, scrubStripe already counted it in the device.
      checksum: m.errors.checksum - before[i]!.checksum + (repair ? 0 : parityByMember[i]!),
    }));
    const corrected = repair ? checksumErrors + parityCorrected : 0;
    const uncorrectable = unrebuildable + (repair ? parityErrors - parityCorrected : 0);
    if (dropped > 0) problems.push(`... and ${dropped} more problems`);
    const found = checksumErrors + parityErrors;
    const result: ScrubReport = {
      repair,
      ok: uncorrectable === 0 && check.ok && (repair || found === 0),
      startedMs: progress.startedMs,
      durationMs: Date.now() - progress.startedMs,
      scannedBytes: progress.scannedBytes,
      blocksVerified: check.blocksReachable,
      stripesChecked,
      stripesUnverifiable,
      checksumErrors,
      parityErrors,
      corrected,
      uncorrectable,
      members,
      problems,
    };
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
  lines.push('      member     STATE     READ WRITE CKSUM');
  for (const m of r.members) lines.push(`      ${String(m.index).padEnd(2)} ${m.name.padEnd(7)} ${m.state.toUpperCase().padEnd(8)} ${String(m.read).padStart(5)} ${String(m.write).padStart(5)} ${String(m.checksum).padStart(5)}`);
  for (const p of r.problems) lines.push(`problem: ${p}`);
  if (!r.ok && !r.repair && r.uncorrectable === 0) lines.push('errors: run nvmirror scrub --repair to repair them');
  else if (r.uncorrectable > 0) lines.push(`errors: ${r.uncorrectable} uncorrectable: the data affected cannot be rebuilt`);
  else lines.push('errors: none left');
  return lines;
}
