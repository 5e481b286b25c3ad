/**
 * The destination's readers pinned to CPs older than the committed one, protected from
 * the CPs that land after them.
 *
 * A reader of the mirror's export stays on the CP it connected at (exports.ts). The
 * committed CP's blocks are protected by MirrorDir.checkWritable: a CP that writes one is
 * refused. An older CP a reader still uses is protected only by the source's promise to
 * hold it (the PIN report), which a source cannot always keep: one restarted holds only
 * the CP its relationship file names, a session without the mirror likewise, and a
 * confused or hostile source holds nothing. Such a CP would land over blocks the reader
 * still reads, and the reader would get EIO. Refusing the CP would stop the mirror for a
 * reader's sake; instead the guard ends the readers whose CP the write would damage,
 * before the write starts (their connections close with a log line; a reconnect gets the
 * newest CP), and the CP lands.
 *
 * How: `map` is a superset of the blocks the old pinned CPs use: at each commit, the
 * outgoing CP's space map (live and snapshots) is ORed into it when a reader is pinned to
 * that CP. A write that touches a set bit (or any write while a reader was pinned to an old
 * CP the map may not cover) is resolved: each old pinned CP's space map is read again
 * from its superblock, the CPs that use a written block (or whose map no longer verifies)
 * lose their readers, and the map becomes the exact OR of the others. An honest source
 * holds every CP from the oldest pin on, so its writes only meet stale bits: one resolve
 * after the pinned set shrank, nobody released.
 *
 * Invariants:
 * - No block an old pinned CP uses is written while a reader of that CP is live:
 *   `mayConflict` is checked before every write a CP (not a baseline) stages, and its
 *   false answers are only for blocks outside every old pinned CP.
 * - Memory: one bitmap of one bit per device block while a reader is pinned to an old CP
 *   (pages untouched where nothing is set); a resolve reads one old CP's maps at a time
 *   into two more.
 * - Cost: nothing per write while no reader is on an old CP; otherwise a bit test per
 *   block. A resolve reads the whole space map of each distinct old pinned CP (at most one
 *   per export connection) while the CP being applied waits: it happens when a source did
 *   not hold a pinned CP, or once after the pinned set shrank.
 */
import type { Superblock } from '../tree/layout';
import { decodeSuperblock } from '../tree/layout';
import { bitmapBytes, readActiveMap, readSummaryMap, type ReadBlock } from '../tree/spacemap-read';
import { orInto, testBit } from '../util/bitmap';
import { assert } from '../util/assert';

/** The exports' side: which readers are pinned where, and ending them. */
export interface PinnedReaders {
  /** The distinct CPs older than `committedCp` live readers are pinned to, each with its superblock. */
  oldPins(uuid: string, committedCp: number): Array<{ cp: number; superblock: Buffer }>;
  /** Ends every reader pinned to one of `cps` (its connection is closed, `reason` logged); returns how many. */
  release(uuid: string, cps: readonly number[], reason: string): number;
}

function anySet(map: Buffer, pba: number, n: number): boolean {
  for (let p = pba; p < pba + n; p++) if (testBit(map, p)) return true;
  return false;
}

export class PinGuard {
  private readers: PinnedReaders | undefined;
  /** A superset of the blocks old pinned CPs use; undefined: no reader is pinned to an old CP (as far as the map knows). */
  private map: Buffer | undefined;
  /** A reader was pinned to an old CP after the map was made: the next write resolves first. */
  private late = false;
  private resolving: Promise<void> | undefined;
  /** Readers released because a CP wrote their blocks (status). */
  released = 0;

  constructor(
    private readonly uuid: string,
    private readonly read: ReadBlock,
    private readonly committedCp: () => number,
  ) {}

  /** The exports that pin CPs of this mirror (none: nothing to guard). */
  attach(readers: PinnedReaders): void {
    this.readers = readers;
  }

  /** Every reader of this mirror is gone (a baseline over the image, the source detached). */
  reset(): void {
    this.map = undefined;
    this.late = false;
  }

  /** A reader was pinned to `cp` after that CP stopped being the committed one. */
  pinnedLate(cp: number): void {
    if (cp < this.committedCp()) this.late = true;
  }

  /**
   * Before CP `prev` stops being the committed one: its space map (live and snapshots,
   * about to be updated in place) joins the map when a reader is pinned to it.
   */
  retire(prev: Superblock, inUse: { active: Buffer; summary: Buffer }): void {
    if (!this.readers) return;
    const olds = this.readers.oldPins(this.uuid, prev.cpNumber + 1);
    if (olds.length === 0) {
      this.map = undefined; // no reader on any CP but the one about to commit
      return;
    }
    if (!olds.some((o) => o.cp === prev.cpNumber)) return;
    this.map ??= Buffer.alloc(inUse.active.length);
    orInto(this.map, inUse.active);
    orInto(this.map, inUse.summary);
  }

  /** True when writing [pba, pba+n) needs a resolve first. */
  mayConflict(pba: number, n: number): boolean {
    if (this.late) return true;
    return this.map !== undefined && anySet(this.map, pba, n);
  }

  /**
   * Ends the readers of every old pinned CP that uses a block of [pba, pba+n) (or whose
   * map no longer reads back), then makes the map exact for the rest. `cp`: the CP being
   * applied (for the log line).
   */
  async resolve(pba: number, n: number, cp: number): Promise<void> {
    while (this.resolving) await this.resolving;
    if (!this.mayConflict(pba, n)) return;
    const p = this.rebuild(pba, n, cp);
    this.resolving = p;
    try {
      await p;
    } finally {
      this.resolving = undefined;
    }
  }

  private async rebuild(pba: number, n: number, cp: number): Promise<void> {
    const readers = this.readers;
    this.late = false; // a pin from here on sets it again
    const olds = readers ? readers.oldPins(this.uuid, this.committedCp()) : [];
    if (!readers || olds.length === 0) {
      this.map = undefined;
      return;
    }
    let next: Buffer | undefined;
    const hit: number[] = [];
    let why = '';
    for (const o of olds) {
      const sb = decodeSuperblock(o.superblock);
      assert(typeof sb !== 'string' && sb.cpNumber === o.cp, 'a pinned view keeps its CP\'s verified superblock');
      const bytes = bitmapBytes(sb);
      // Fresh bitmaps: the reads touch only the pages of leaves that exist.
      const active = Buffer.alloc(bytes);
      const summary = Buffer.alloc(bytes);
      try {
        await readActiveMap(this.read, sb, active, -1, true);
        await readSummaryMap(this.read, sb, summary, true);
      } catch (e) {
        hit.push(o.cp);
        why ||= `the space map of CP ${o.cp} no longer reads back (${e instanceof Error ? e.message : String(e)})`;
        continue;
      }
      if (anySet(active, pba, n) || anySet(summary, pba, n)) {
        hit.push(o.cp);
        why ||= `CP ${cp} writes blocks [${pba}, ${pba + n}) that CP ${o.cp} still uses (its source did not hold that CP)`;
        continue;
      }
      next ??= Buffer.alloc(bytes);
      orInto(next, active);
      orInto(next, summary);
    }
    if (hit.length > 0) this.released += readers.release(this.uuid, hit, why);
    this.map = next;
  }
}
