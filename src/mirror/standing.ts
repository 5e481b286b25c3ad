/**
 * Where a source and its mirror stand, decided from the lineage in their CPs (tree/
 * lineage.ts) and the records the mirror's log holds, when a source says HELLO:
 *
 *   same / source ahead            the source is current: a CP or a resync follows
 *   mirror ahead                   the mirror holds a later CP of the source's own line, or
 *                                  records past the source's newest seq (the source lost
 *                                  its NVRAM or disk): it is current; refused, nothing is
 *                                  overwritten; promote it (or remove it for a baseline)
 *   promoted                       the mirror was promoted (role.json) and the source wrote
 *                                  nothing since: the promoted side is current; refused
 *   split brain                    both wrote after the last common CP: refused, never merged
 *   unrelated                      no common CP in the kept histories: refused
 *
 * The refusal is one human line followed by a tag the source parses for its status
 * (`[standing kind=... common=... source=... destination=... sourceSeq=... destinationSeq=...]`).
 *
 * Invariants:
 * - Decided before anything in the mirror changes (before its log starts a new stream,
 *   which drops stored records at or past the stream's first seq).
 * - Pure: the caller reads the lineages and seqs; this file does no I/O.
 */
import { compareLineage, type LineageComparison, type Lineage } from '../tree/lineage';

export type StandingKind = 'in-step' | 'mirror-ahead' | 'promoted' | 'split-brain' | 'unrelated';
/** Which side holds the newest acknowledged data. */
export type Current = 'source' | 'destination' | 'both' | 'each-its-own' | 'unknown';

export interface Standing {
  kind: StandingKind;
  current: Current;
  /** The newest CP both hold (-1: none or unknown). */
  commonCp: number;
  sourceCp: number;
  destinationCp: number;
  /**
   * The source's newest record seq (mirror-ahead: the newest of the mirror's records it
   * holds), and the newest the mirror holds (stored or committed).
   */
  sourceSeq: number;
  destinationSeq: number;
}

export interface SourceSide {
  lineage: Lineage;
  cp: number;
  /** Its newest record seq (its NVRAM log's last). */
  lastSeq: number;
  /**
   * On the first stream of the source's process to this mirror: the newest record it
   * held when it started (its NVRAM after recovery); every later record is its own.
   * Undefined on a later stream of the same process (it lost none since).
   */
  startedAtSeq?: number;
  /** Its process id (HELLO): records the mirror's log holds from this process are its own. */
  processId?: string;
  /**
   * The volume's read-write sessions before this process since a destination last welcomed
   * one (HELLO's earlier, oldest first): each one's records past its start are its own.
   */
  earlier?: Array<{ id: string; startedAtSeq: number }>;
}

export interface MirrorSide {
  /** undefined: nothing committed (a new mirror or a baseline in progress). */
  committed: { lineage: Lineage; cp: number; nvlogSeq: number } | undefined;
  /** The newest record its log holds after the committed CP (0: none). */
  newestStoredSeq: number;
  /** The directory was promoted (role.json): a primary now. */
  promoted: boolean;
  /** Promoted: the newest of the source's records it replayed (role.json lastSeq). */
  promotedThroughSeq?: number;
  /** The source process whose streams stored the log's records from fromSeq on (dest-log.ts), if known. */
  writer?: { id: string; fromSeq: number };
  /** The newest record its log holds below writer.fromSeq (stored by earlier writers; 0: none). Absent: taken as writer.fromSeq - 1. */
  newestStoredBeforeWriter?: number;
}

export const SPLIT_BRAIN_PREFIX = 'split brain refused';
/** The human part of a refusal; with the tag (< 160) and the receiver's prefix it stays under the REFUSE cap (1024 bytes). */
const REFUSAL_LINE_MAX_CHARS = 800;

export function decideStanding(src: SourceSide, dst: MirrorSide): Standing {
  const c = dst.committed;
  const destinationSeq = Math.max(dst.newestStoredSeq, c?.nvlogSeq ?? 0);
  const base = { sourceCp: src.cp, destinationCp: c?.cp ?? -1, sourceSeq: src.lastSeq, destinationSeq };
  if (!c) return { kind: 'in-step', current: 'source', commonCp: -1, ...base };
  const cmp: LineageComparison = compareLineage({ lineage: src.lineage, cp: src.cp }, { lineage: c.lineage, cp: c.cp });
  const at = { commonCp: cmp.commonCp, ...base };
  if (cmp.relation === 'unrelated') return { kind: 'unrelated', current: 'unknown', ...at };
  if (cmp.relation === 'diverged') return { kind: 'split-brain', current: 'each-its-own', ...at };
  if (dst.promoted) {
    // A primary now: never written by its old source again, whoever is ahead. The source
    // wrote since if it has CPs after the common one or records the promote did not replay.
    const wrote = cmp.relation !== 'destination-ahead' || src.lastSeq > (dst.promotedThroughSeq ?? Number.MAX_SAFE_INTEGER);
    return wrote ? { kind: 'split-brain', current: 'each-its-own', ...at } : { kind: 'promoted', current: 'destination', ...at };
  }
  if (cmp.relation === 'destination-ahead') return { kind: 'mirror-ahead', current: 'destination', ...at };
  // Same CP, or the source ahead: the mirror's log must not hold records the source no longer
  // has. Past the newest it held when a session started, the source's records are that
  // session's own: a mirror holding records past a start holds ones the source lost (its NVRAM
  // or disk), even where it has since written new records over the same seqs, in that session
  // or in one without the mirror (the HELLO's earlier sessions). Except records a session of
  // the chain stored there itself (a stream whose answer was lost): the log knows which
  // process stored its records from which seq on, and those need only be held by the
  // sessions that started after it.
  const chain = [...(src.earlier ?? []), { id: src.processId, startedAtSeq: src.startedAtSeq ?? src.lastSeq }];
  const heldFrom = (i: number): number => chain.slice(i).reduce((m, e) => Math.min(m, e.startedAtSeq), src.lastSeq);
  const holds = heldFrom(0);
  const w = dst.writer;
  let k = -1;
  if (w !== undefined) for (let i = 0; i < chain.length; i++) if (chain[i]!.id === w.id) k = i;
  if (k < 0) {
    if (dst.newestStoredSeq > holds) return { kind: 'mirror-ahead', current: 'destination', ...at, sourceSeq: holds };
  } else {
    const others = dst.newestStoredBeforeWriter ?? Math.min(dst.newestStoredSeq, w!.fromSeq - 1);
    if (others > holds) return { kind: 'mirror-ahead', current: 'destination', ...at, sourceSeq: holds };
    const after = heldFrom(k + 1);
    if (dst.newestStoredSeq >= w!.fromSeq && dst.newestStoredSeq > after) return { kind: 'mirror-ahead', current: 'destination', ...at, sourceSeq: after };
  }
  return { kind: 'in-step', current: cmp.relation === 'same' ? 'both' : 'source', ...at };
}

/** The refusal line for a standing that is not in step (with the tag parseStanding reads). */
export function refusalText(s: Standing, dir: string, promoted: boolean): string {
  const since = (cp: number): string => `${cp - s.commonCp} CP(s) since`;
  let line: string;
  switch (s.kind) {
    case 'split-brain':
      line = `${SPLIT_BRAIN_PREFIX}: ` +
        (promoted ? `${dir} was promoted at CP ${s.commonCp} (the last CP both sides hold) and is a primary now` : `this source and the mirror ${dir} both wrote after CP ${s.commonCp} (the last CP both sides hold); the mirror is`) +
        ` at CP ${s.destinationCp} (${since(s.destinationCp)}); ` +
        `this source is at CP ${s.sourceCp} (${since(s.sourceCp)}). Nothing is merged: run nvmirror demote DIR --into RECEIVE_DIR --discard-my-changes on the side whose changes you discard (they are kept in its pre-failback copy)`;
      break;
    case 'promoted':
      line = `refused: ${dir} was promoted at CP ${s.commonCp} (the last CP both sides hold) and is current (at CP ${s.destinationCp}, ${since(s.destinationCp)}); ` +
        `this source wrote nothing since (CP ${s.sourceCp}): demote this volume to make it the promoted one's mirror (nvmirror demote DIR --into RECEIVE_DIR --discard-my-changes)`;
      break;
    case 'mirror-ahead':
      line = `refused: the mirror ${dir} is current: it holds ` +
        (s.destinationCp > s.sourceCp ? `CP ${s.destinationCp} of this volume's history, ahead of this source's CP ${s.sourceCp}` : `records up to seq ${s.destinationSeq}, past this source's newest seq ${s.sourceSeq} of the same history (its NVRAM or disk was lost?)`) +
        `; nothing there is overwritten. Promote the mirror (nvmirror promote ${dir}) and make this volume its mirror, or remove ${dir} to mirror this source's state anew (a full baseline)`;
      break;
    case 'unrelated':
      line = `refused: ${dir} and this source have no CP in common in their lineages (more role changes than the superblock keeps, or another history): remove ${dir} for a full baseline`;
      break;
    case 'in-step':
      line = 'in step';
      break;
  }
  // The tag must survive the REFUSE's 1024-byte cap.
  if (line.length > REFUSAL_LINE_MAX_CHARS) line = `${line.slice(0, REFUSAL_LINE_MAX_CHARS - 3)}...`;
  return `${line} [standing kind=${s.kind} current=${s.current} common=${s.commonCp} source=${s.sourceCp} destination=${s.destinationCp} sourceSeq=${s.sourceSeq} destinationSeq=${s.destinationSeq}]`;
}

const TAG_RE = /\[standing kind=([a-z-]+) current=([a-z-]+) common=(-?\d+) source=(-?\d+) destination=(-?\d+) sourceSeq=(\d+) destinationSeq=(\d+)\]$/;
const KINDS: readonly StandingKind[] = ['in-step', 'mirror-ahead', 'promoted', 'split-brain', 'unrelated'];
const CURRENTS: readonly Current[] = ['source', 'destination', 'both', 'each-its-own', 'unknown'];

/** The standing a refusal carries, or undefined (another refusal, or a malformed tag). */
export function parseStanding(reason: string): Standing | undefined {
  const m = TAG_RE.exec(reason);
  if (!m) return undefined;
  const kind = m[1] as StandingKind;
  const current = m[2] as Current;
  if (!KINDS.includes(kind) || !CURRENTS.includes(current)) return undefined;
  const n = (i: number): number => Number(m[i]);
  return { kind, current, commonCp: n(3), sourceCp: n(4), destinationCp: n(5), sourceSeq: n(6), destinationSeq: n(7) };
}

/** One status line: who is primary, who is current, the last common CP, what each wrote since. */
export function standingLine(s: Standing, here: 'source' | 'destination'): string {
  const other = here === 'source' ? 'the mirror' : 'the source';
  const who = (c: Current): string =>
    c === 'both' ? 'both sides' : c === 'each-its-own' ? 'neither alone (each side wrote after the common CP)' : c === 'unknown' ? 'unknown' : c === here ? 'this side' : other;
  const primary = s.kind === 'split-brain' ? 'both (split brain)' : s.kind === 'promoted' ? (here === 'destination' ? 'this side (promoted)' : `${other} (promoted)`) : here === 'source' ? 'this side' : other;
  const since = s.commonCp >= 0 ? `; last common CP ${s.commonCp}, since then the source wrote ${s.sourceCp - s.commonCp} CP(s), the mirror ${s.destinationCp - s.commonCp}` : '';
  const seqs = s.kind === 'mirror-ahead' && s.destinationSeq > s.sourceSeq ? `; the mirror holds records to seq ${s.destinationSeq}, the source to ${s.sourceSeq}` : '';
  return `primary: ${primary}; current: ${who(s.current)}${since}${seqs}`;
}

/**
 * The tag a refusal for a block the committed CP uses ends with: an honest source that
 * holds that CP never writes one, so it reads this as its copy of that CP being damaged
 * (a block of it reused) and takes a full baseline (source.ts).
 */
export function baseInUseTag(cp: number, pba: number): string {
  return `[base-in-use cp=${cp} pba=${pba}]`;
}

/** The CP and block of a refusal ending with baseInUseTag, or undefined. */
export function parseBaseInUse(reason: string): { cp: number; pba: number } | undefined {
  const m = /\[base-in-use cp=(\d+) pba=(\d+)\]$/.exec(reason);
  return m ? { cp: Number(m[1]), pba: Number(m[2]) } : undefined;
}
