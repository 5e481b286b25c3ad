/**
 * The engine's block map for the NBD threads (native/read_map.h): lbn -> (pba, crc32c) of
 * live-tree blocks the NVRAM log does not hold, so a connection's thread answers plain
 * READs of them without a trip through the event loop. Only for a tree on one member
 * file (pba * 4096 is the file offset); a RAID volume has none.
 *
 * Invariants:
 * - changed(lbn, count) runs for every record as the log indexes it (NvLog.onBlocksChanged),
 *   before its append resolves and so before its reply: it drops those blocks. The NBD
 *   threads' own appends (the log's native appender) drop theirs as they write each
 *   record, before the reply. The native thread parses a READ only after every earlier
 *   reply was sent, so a READ never sees a mapping older than a WRITE answered before it.
 * - fill() puts the pointers of level-0 address blocks a read walked only if the live CP
 *   did not move since the read began (the blocks are the live root's), leaving out every
 *   lbn the log holds now (its tree pointer is older than the log) and every lbn dropped
 *   since the read began: the map's own generation (every drop moves it on) is taken at
 *   the read's start and the map skips, under its mutex, what drops since then named
 *   (nbdReadMapPutLeaf's expectGen), so no append, the threads' included, slips between.
 * - Memory: 16 bytes per slot, at most SLOTS_MAX slots (the table is calloc'd once).
 */
import { addon } from '../io/native';
import { FANOUT } from '../tree/layout';

/** Slots at most (16 bytes each: 16 MiB), fewer for a smaller volume. */
export const READ_MAP_SLOTS_LOG2_MAX = 20;
const READ_MAP_SLOTS_LOG2_MIN = 10;
/** Leaves remembered as put (then the memory starts over). */
const FILLED_MAX = 65536;

interface ReadMapCalls {
  nbdReadMapNew(fd: number, sizeBytes: number, deviceBlocks: number, slotsLog2: number): object;
  nbdReadMapPutLeaf(map: object, node: Buffer, baseLbn: number, skip: Buffer, expectGen: number): number;
  nbdReadMapGen(map: object): number;
  nbdReadMapDrop(map: object, lbn: number, count: number): void;
  nbdReadMapClear(map: object): void;
  nbdReadMapClose(map: object): void;
  nbdReadMapStats(map: object): [number, number, number];
}

function calls(): ReadMapCalls {
  return addon() as unknown as ReadMapCalls;
}

/** Where a read started: fill() takes its leaves only if neither moved. */
export interface ReadMapToken {
  readonly cp: number;
  /** The native map's generation (drops and clears so far). */
  readonly gen: number;
}

export class EngineReadMap {
  private closed = false;
  private readonly skip = Buffer.alloc(FANOUT);
  /**
   * Leaves put since the last CP (a leaf walked again puts nothing new: what an append
   * since then dropped, the log holds until the next CP); at most FILLED_MAX.
   */
  private readonly filled = new Set<number>();
  private filledCp = -1;

  private constructor(readonly handle: object, private readonly lbnCount: number) {}

  /** A map over the member file fd (the caller keeps its fd; the map holds a dup). */
  static create(fd: number, sizeBytes: number, deviceBlocks: number): EngineReadMap {
    const lbns = Math.ceil(sizeBytes / 4096);
    let log2 = READ_MAP_SLOTS_LOG2_MIN;
    while (log2 < READ_MAP_SLOTS_LOG2_MAX && 2 ** log2 < lbns) log2++;
    return new EngineReadMap(calls().nbdReadMapNew(fd, sizeBytes, deviceBlocks, log2), lbns);
  }

  /** The log indexed a record over [lbn, lbn+count). */
  changed(lbn: number, count: number): void {
    if (!this.closed && count > 0) calls().nbdReadMapDrop(this.handle, lbn, count);
  }

  token(cp: number): ReadMapToken {
    return { cp, gen: this.closed ? -1 : calls().nbdReadMapGen(this.handle) };
  }

  /**
   * Puts the pointers of the leaves a read walked, unless a commit came between `t` and
   * now (cp: the live CP now), without the lbns the log holds (`inLog(from, to)` says which
   * of [from, to)) and those an append dropped since `t`. Returns how many were put.
   */
  fill(t: ReadMapToken, cp: number, leaves: ReadonlyMap<number, Buffer>, inLog: (from: number, to: number) => (lbn: number) => boolean): number {
    if (this.closed || t.cp !== cp || t.gen < 0) return 0;
    if (this.filledCp !== cp || this.filled.size >= FILLED_MAX) {
      this.filled.clear();
      this.filledCp = cp;
    }
    const c = calls();
    let put = 0;
    for (const [base, node] of leaves) {
      if (this.filled.has(base)) continue;
      const to = Math.min(base + FANOUT, this.lbnCount);
      const held = inLog(base, to);
      for (let i = 0; i < FANOUT; i++) this.skip[i] = base + i < to && held(base + i) ? 1 : 0;
      const n = c.nbdReadMapPutLeaf(this.handle, node, base, this.skip, t.gen);
      if (n < 0) return put; // too many drops since the read began, or a clear: put nothing more
      put += n;
      this.filled.add(base);
    }
    return put;
  }

  /** Forgets every mapping (the live tree changed other than through the log). */
  clear(): void {
    this.filled.clear();
    if (!this.closed) calls().nbdReadMapClear(this.handle);
  }

  /** hits: READs answered on the NBD threads; misses: passed to TypeScript; poolReads: READs that found a block outside the page cache and were read again by the native read pool (then counted as a hit or a miss). */
  stats(): { hits: number; misses: number; poolReads: number } {
    const [hits, misses, poolReads] = calls().nbdReadMapStats(this.handle);
    return { hits, misses, poolReads };
  }

  /** After this, the threads answer nothing from the map (their READs go to TypeScript). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    calls().nbdReadMapClose(this.handle);
  }
}
