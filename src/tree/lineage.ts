/**
 * A volume's lineage (like DRBD's generation UUIDs): which history each CP belongs to.
 * Every superblock carries it (layout.ts), so a mirror, which commits the source's
 * superblocks verbatim, holds the source's lineage with each CP it holds.
 *
 * A lineage is a bounded list of generations, newest first: (generation id, the first
 * CP of that generation). A generation covers the CPs from its first CP up to the CP
 * before the next generation's first CP (the current one: up to the superblock's CP).
 * A volume is born in its root generation (derived from its UUID, first CP 0, so a
 * volume formatted before lineages existed and its mirror agree on it); `promote` starts
 * a new generation at the CP after the one it was promoted from. A CP is identified by
 * (generation at that CP, CP number): two sides hold the same CP when both agree on
 * both.
 *
 * Invariants:
 * - 1 <= entries <= LINEAGE_ENTRIES_MAX; ids are 16 lower-case hex digits, not all zero,
 *   all different; first CPs strictly decrease; the newest first CP <= the CP number;
 *   the oldest entry's first CP may be > 0 only when older entries were dropped (bounded).
 * - compareLineage is symmetric: swapping the sides swaps 'source-ahead' and
 *   'destination-ahead' and keeps the common CP.
 */
import * as crypto from 'crypto';
import { assert } from '../util/assert';

/** Generations a superblock keeps (the oldest are dropped beyond this: 15 x 16 bytes fit the superblock's tail). */
export const LINEAGE_ENTRIES_MAX = 15;
export const GENERATION_ID_BYTES = 8;

export interface Generation {
  /** 16 lower-case hex digits. */
  id: string;
  firstCp: number;
}

/** Newest first. */
export type Lineage = readonly Generation[];

const ID_RE = /^[0-9a-f]{16}$/;
const ZERO_ID = '0'.repeat(16);

/** The root generation of a volume: derived from its UUID, so both sides of a mirror agree without storing it. */
export function rootGeneration(volumeUuid: string): Generation {
  const id = crypto.createHash('sha256').update(`nvmirror root generation ${volumeUuid.toLowerCase()}`).digest().subarray(0, GENERATION_ID_BYTES).toString('hex');
  return { id: id === ZERO_ID ? '0000000000000001' : id, firstCp: 0 };
}

/** A fresh random generation id. */
export function newGenerationId(random: (n: number) => Buffer = crypto.randomBytes): string {
  for (let i = 0; i < 8; i++) {
    const id = random(GENERATION_ID_BYTES).toString('hex');
    if (ID_RE.test(id) && id !== ZERO_ID) return id;
  }
  assert(false, 'random source gave no usable generation id');
}

/** A one-line problem with a lineage at CP `cpNumber`, or null. */
export function lineageProblem(l: Lineage, cpNumber: number): string | null {
  if (l.length < 1 || l.length > LINEAGE_ENTRIES_MAX) return `lineage has ${l.length} generations (1..${LINEAGE_ENTRIES_MAX})`;
  const seen = new Set<string>();
  for (let i = 0; i < l.length; i++) {
    const g = l[i]!;
    if (!ID_RE.test(g.id) || g.id === ZERO_ID) return `lineage generation ${i}: bad id "${g.id}"`;
    if (seen.has(g.id)) return `lineage generation ${g.id} appears twice`;
    seen.add(g.id);
    if (!(Number.isSafeInteger(g.firstCp) && g.firstCp >= 0)) return `lineage generation ${g.id}: bad first CP ${g.firstCp}`;
    if (i === 0 && g.firstCp > cpNumber) return `lineage: the current generation ${g.id} starts at CP ${g.firstCp}, after this CP ${cpNumber}`;
    if (i > 0 && g.firstCp >= l[i - 1]!.firstCp) return `lineage: generation ${g.id} starts at CP ${g.firstCp}, not before the newer one's CP ${l[i - 1]!.firstCp}`;
  }
  return null;
}

/** The generation CP `cp` belongs to in a lineage at CP `atCp`, or undefined (after atCp, or older than the history kept). */
export function generationAt(l: Lineage, atCp: number, cp: number): string | undefined {
  if (cp < 0 || cp > atCp) return undefined;
  for (const g of l) if (cp >= g.firstCp) return g.id;
  return undefined;
}

/** The lineage of the CP after `atCp` when a new generation `id` starts there (promote): bounded, the oldest dropped. */
export function startGeneration(l: Lineage, atCp: number, id: string): Generation[] {
  assert(lineageProblem(l, atCp) === null, 'start a generation on a valid lineage');
  assert(!l.some((g) => g.id === id), `generation ${id} already in the lineage`);
  return [{ id, firstCp: atCp + 1 }, ...l].slice(0, LINEAGE_ENTRIES_MAX);
}

export interface LineagePoint {
  lineage: Lineage;
  cp: number;
}

export type LineageRelation =
  /** Both hold the same CP. */
  | 'same'
  /** The source's CP follows the destination's on one line: a plain resync. */
  | 'source-ahead'
  /** The destination holds a later CP of the source's own line: it is current. */
  | 'destination-ahead'
  /** Both wrote after the common CP: split brain. */
  | 'diverged'
  /** No CP in common within the kept histories. */
  | 'unrelated';

export interface LineageComparison {
  relation: LineageRelation;
  /** The newest CP both hold (-1: none). */
  commonCp: number;
  /** CPs each side committed after the common CP. */
  sourceSince: number;
  destinationSince: number;
}

/** The CP ranges [from, to] each generation covers in a lineage at CP atCp. */
function ranges(p: LineagePoint): Map<string, { from: number; to: number }> {
  const m = new Map<string, { from: number; to: number }>();
  let end = p.cp;
  for (const g of p.lineage) {
    if (g.firstCp <= end) m.set(g.id, { from: g.firstCp, to: end });
    end = g.firstCp - 1;
    if (end < 0) break;
  }
  return m;
}

/**
 * Where two sides stand: the common CP is the newest (generation, CP) both histories
 * share. Neither wrote after it: same; one did: that one is ahead (the other a plain
 * resync/failback away); both did: diverged (split brain).
 */
export function compareLineage(source: LineagePoint, dest: LineagePoint): LineageComparison {
  assert(lineageProblem(source.lineage, source.cp) === null && lineageProblem(dest.lineage, dest.cp) === null, 'compare valid lineages');
  const a = ranges(source);
  const b = ranges(dest);
  let common = -1;
  for (const [id, ra] of a) {
    const rb = b.get(id);
    if (!rb) continue;
    const from = Math.max(ra.from, rb.from);
    const to = Math.min(ra.to, rb.to);
    if (from <= to && to > common) common = to;
  }
  if (common < 0) return { relation: 'unrelated', commonCp: -1, sourceSince: source.cp + 1, destinationSince: dest.cp + 1 };
  const sourceSince = source.cp - common;
  const destinationSince = dest.cp - common;
  const relation: LineageRelation =
    sourceSince === 0 && destinationSince === 0 ? 'same' : destinationSince === 0 ? 'source-ahead' : sourceSince === 0 ? 'destination-ahead' : 'diverged';
  return { relation, commonCp: common, sourceSince, destinationSince };
}

export function lineageString(l: Lineage): string {
  return l.map((g) => `${g.id}@${g.firstCp}`).join(' < ');
}
