/**
 * The space map: which physical blocks are in use, persisted copy-on-write as a radix
 * tree of bitmap leaves (one bit per physical block, 32768 per leaf) under address
 * blocks of type NODE_TYPE_SPACE_MAP. Only the leaves and path nodes a CP changes are
 * rewritten; the map records its own blocks (a small fixpoint at each CP).
 *
 * In memory (3-4 bits per device block; 100 GiB device -> ~13 MiB):
 * - active: the blocks the live state uses: live data tree, live space-map tree, ring.
 *   Exactly the map the next superblock will reference.
 * - summary: OR of every kept snapshot's space map (the `active` map of the CP the
 *   snapshot was taken in). A block freed from the live tree that a snapshot still holds
 *   stays set here, so it is not reused (WAFL-style per-snapshot maps).
 * - reservedOld / reservedNew: blocks freed (no longer in active or summary) in recent
 *   CPs that may not be reused yet. A block freed in CP n goes to reservedNew; at the
 *   start of CP n+1 it moves to reservedOld; it is released at the start of CP n+2 (and
 *   only when no read is still in flight on a retired root). So a block is never reused
 *   before the CP that freed it is durable, and the previous CP stays intact on disk.
 * - The pointer arrays of the space-map tree itself (leaf pointers, node pointers per
 *   level): a node's contents are derived from the level below, so no node buffers are
 *   kept.
 *
 * Invariants (asserted):
 * - held: blocks of older committed CPs a peer still uses, reserved after a restart
 *   (reserveHeld); released together (releaseHeld) when the peer no longer needs them.
 *   Kept apart from the reserved generations, whose release follows the CP that freed a
 *   block, not the CP a peer holds.
 * - early: blocks placed ahead of their CP (reserveEarly: a large write's data written to
 *   free blocks while its NVRAM half still fills). Not in the persisted map: nothing
 *   references them until the CP that adopts them (adoptEarly: they become active) or drops
 *   them (dropEarly: allocatable again). Disjoint from every other set.
 * - A block is allocatable iff it is in none of active, summary, reservedOld, reservedNew, held, early.
 * - reservedOld, reservedNew are disjoint from each other and from active | summary.
 * - used == popcount(active | summary); reservedCount{Old,New} == popcount(reserved{Old,New}).
 * - Ring blocks [0, RING_SLOTS) are always set in active.
 * - Allocation sets a bit only if the block is allocatable; freeing clears only a set bit.
 * - Allocation units (a RAID device's stripe, `unitBlocks` > 1): a CP is handed whole
 *   units, aligned, every block of which was allocatable; the rest of its last unit is
 *   its tail, used by its later allocations; a unit is handed out again only when all of
 *   it is allocatable. Only when no whole unit is left does allocation fall back to single
 *   blocks (logged: those stripes are written by read-modify-write).
 * - With unitBlocks 1 (a single member), allocation takes the warm blocks first, then
 *   block-level next fit. Warm: the runs released in this CP (keepWarm), which the member
 *   still holds, mostly in the page cache; rewriting them costs no new file block and no
 *   new page (a punched or never-written block costs both). What is left of them when
 *   the next CP starts is handed back as cold (to be discarded). Every warm block is
 *   re-checked allocatable before it is taken.
 */
import { assert } from '../util/assert';
import { clearBit, clearSetWords, isZero, moveInto, orInto, pop8, popcount, popcountOr, setBit, testBit } from '../util/bitmap';
import {
  BITS_PER_LEAF, BLOCK, BlockPtr, FANOUT, NODE_TYPE_SPACE_MAP, NodeId, RING_SLOTS, encodePtr, heightFor, ptrSlotOffset,
  writeNodeHeader,
} from './layout';
import { crc32c } from '../io/checksum';
import { forEachLimit } from '../util/work';
import { log } from '../util/log';

/** Space-map leaves read at once while loading. */
const LOAD_CONCURRENCY = 8;

export interface Run {
  pba: number;
  count: number;
}

/** A block produced by a commit, waiting to be written. */
export interface NewBlock {
  pba: number;
  buf: Buffer;
  /** The block this one replaces (its previous version in the committed state), if any. */
  prevPba?: number;
}

/** Reads and verifies space-map blocks (supplied by the tree, which owns the device). */
export interface SpaceMapLoader {
  readNode(ptr: BlockPtr, id: NodeId): Promise<Buffer>;
  readLeaf(ptr: BlockPtr, leafIndex: number): Promise<Buffer>;
  decodeChild(node: Buffer, slot: number, what: string): BlockPtr | null;
}

export class SpaceMap {
  readonly deviceBlocks: number;
  readonly leafCount: number;
  readonly height: number;
  readonly active: Buffer;
  summary: Buffer;
  private reservedOld: Buffer;
  private reservedNew: Buffer;
  private reservedCountOld = 0;
  private reservedCountNew = 0;
  private held: Buffer;
  private heldCount = 0;
  private early: Buffer;
  private earlyCount = 0;
  /**
   * Per leaf of reservedOld / reservedNew / held: 1 if the leaf may have a set bit. The
   * per-CP passes over those bitmaps (release, merge, clear) visit only marked leaves: a
   * 1 TiB device's bitmaps are 32 MiB each, and a pass over a whole one made it resident
   * (reads of untouched pages count too, on this kernel), 64 MiB for the two reserved
   * generations. A mark never misses a set bit; a marked leaf may be empty.
   */
  private reservedOldLeaves: Uint8Array;
  private reservedNewLeaves: Uint8Array;
  private heldLeaves: Uint8Array;
  private usedCount = 0;
  /** leafPtrs[i] points at bitmap leaf i; nodePtrs[l][i] at space-map node (level l, index i). */
  private readonly leafPtrs: (BlockPtr | null)[];
  private readonly nodePtrs: (BlockPtr | null)[][];
  private readonly dirtyLeaves = new Set<number>();
  private cursor = RING_SLOTS;
  /** Allocation unit in blocks (1: block-level next fit). */
  readonly unitBlocks: number;
  /** Units handed out whole in the current CP (their free blocks are padded at its end). */
  private readonly cpUnits = new Set<number>();
  /** The unhanded rest of the current CP's last whole unit. */
  private tail: Run = { pba: 0, count: 0 };
  private unitCursor = 0;
  /** Runs released in CP warmCp (keepWarm), taken first by allocation from warm[warmAt] on (the head run partly taken). */
  private warm: Run[] = [];
  private warmAt = 0;
  private warmCp = -1;

  constructor(deviceBlocks: number, unitBlocks = 1) {
    assert(Number.isSafeInteger(deviceBlocks) && deviceBlocks >= RING_SLOTS * 2, `device of ${deviceBlocks} blocks`);
    assert(Number.isSafeInteger(unitBlocks) && unitBlocks >= 1 && unitBlocks <= deviceBlocks, `allocation unit of ${unitBlocks} blocks`);
    this.unitBlocks = unitBlocks;
    this.deviceBlocks = deviceBlocks;
    this.leafCount = Math.ceil(deviceBlocks / BITS_PER_LEAF);
    this.height = heightFor(this.leafCount);
    const bytes = this.leafCount * BLOCK;
    this.active = Buffer.alloc(bytes);
    this.summary = Buffer.alloc(bytes);
    this.reservedOld = Buffer.alloc(bytes);
    this.held = Buffer.alloc(bytes);
    this.reservedNew = Buffer.alloc(bytes);
    this.early = Buffer.alloc(bytes);
    this.reservedOldLeaves = new Uint8Array(this.leafCount);
    this.reservedNewLeaves = new Uint8Array(this.leafCount);
    this.heldLeaves = new Uint8Array(this.leafCount);
    this.leafPtrs = new Array<BlockPtr | null>(this.leafCount).fill(null);
    this.nodePtrs = [];
    let n = this.leafCount;
    for (let l = 0; l < this.height; l++) {
      n = Math.ceil(n / FANOUT);
      this.nodePtrs.push(new Array<BlockPtr | null>(n).fill(null));
    }
    assert(this.nodePtrs[this.height - 1]!.length === 1, 'space-map tree must have one root');
  }

  /** A new, empty map for format: only the ring is in use. */
  static createEmpty(deviceBlocks: number, unitBlocks = 1): SpaceMap {
    const m = new SpaceMap(deviceBlocks, unitBlocks);
    for (let p = 0; p < RING_SLOTS; p++) m.allocateAt(p);
    return m;
  }

  /** Loads the live map from its root (verifying every block), then ORs in each snapshot map. */
  static async load(deviceBlocks: number, root: BlockPtr, snapshotRoots: BlockPtr[], loader: SpaceMapLoader, unitBlocks = 1): Promise<SpaceMap> {
    const m = new SpaceMap(deviceBlocks, unitBlocks);
    const loaded = new Uint8Array(m.leafCount);
    await m.loadTree(root, loader, m.active, true, loaded);
    for (let p = 0; p < RING_SLOTS; p++) if (!testBit(m.active, p)) throw new Error(`space map does not mark superblock slot ${p} in use`);
    for (const r of snapshotRoots) await m.loadTree(r, loader, m.summary, false, loaded);
    // Counted over the leaves read (the rest are zero in both): a pass over the whole
    // bitmaps would make them resident (see reservedOldLeaves).
    for (let leaf = 0; leaf < m.leafCount; leaf++) {
      if (loaded[leaf] !== 0) m.usedCount += popcountOr(m.active.subarray(leaf * BLOCK, (leaf + 1) * BLOCK), m.summary.subarray(leaf * BLOCK, (leaf + 1) * BLOCK));
    }
    return m;
  }

  /**
   * Reads the space-map tree under root and ORs its leaves into dst. With keep, also
   * records the tree's pointers as the live space-map tree; `loaded[i]` is set for each
   * leaf i read.
   */
  async loadTree(root: BlockPtr, loader: SpaceMapLoader, dst: Buffer, keep: boolean, loaded?: Uint8Array): Promise<void> {
    const visit = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
      const node = await loader.readNode(ptr, { type: NODE_TYPE_SPACE_MAP, level, index });
      const childCount = level === 0 ? this.leafCount : this.nodePtrs[level - 1]!.length;
      const children: { ci: number; child: BlockPtr }[] = [];
      for (let s = 0; s < FANOUT; s++) {
        const ci = index * FANOUT + s;
        const child = loader.decodeChild(node, s, `space-map node level ${level} index ${index} slot ${s}`);
        if (ci >= childCount) {
          if (child !== null) throw new Error(`space-map node level ${level} index ${index} points past the map (slot ${s})`);
          continue;
        }
        if (child === null) continue;
        if (child.birth > ptr.birth) throw new Error(`space-map pointer born at CP ${child.birth} under a parent born at ${ptr.birth}`);
        children.push({ ci, child });
      }
      if (level > 0) {
        for (const { ci, child } of children) {
          await visit(child, level - 1, ci);
          if (keep) this.nodePtrs[level - 1]![ci] = child;
        }
        return;
      }
      await forEachLimit(children, LOAD_CONCURRENCY, async ({ ci, child }) => {
        const leaf = await loader.readLeaf(child, ci);
        const end = Math.min(dst.length, (ci + 1) * BLOCK);
        for (let i = ci * BLOCK, j = 0; i < end; i++, j++) dst[i] = dst[i]! | leaf[j]!;
        if (keep) this.leafPtrs[ci] = child;
        if (loaded) loaded[ci] = 1;
      });
    };
    await visit(root, this.height - 1, 0);
    if (keep) this.nodePtrs[this.height - 1]![0] = root;
    // Bits past the device end must be clear.
    for (let p = this.deviceBlocks; p < Math.min(this.deviceBlocks + 64, this.leafCount * BITS_PER_LEAF); p++) {
      if (testBit(dst, p)) throw new Error(`space map marks pba ${p} past the device end in use`);
    }
  }

  get root(): BlockPtr {
    const r = this.nodePtrs[this.height - 1]![0];
    assert(r !== null && r !== undefined, 'space-map root missing');
    return r;
  }

  get used(): number {
    return this.usedCount;
  }

  get reserved(): number {
    return this.reservedCountOld + this.reservedCountNew + this.heldCount + this.earlyCount;
  }

  get free(): number {
    return this.deviceBlocks - this.usedCount - this.reservedCountOld - this.reservedCountNew - this.heldCount - this.earlyCount;
  }

  isActive(p: number): boolean {
    return testBit(this.active, p);
  }

  isHeld(p: number): boolean {
    return testBit(this.summary, p);
  }

  isAllocatable(p: number): boolean {
    const i = p >>> 3;
    const m = 1 << (p & 7);
    return ((this.active[i]! | this.summary[i]! | this.reservedOld[i]! | this.reservedNew[i]! | this.held[i]! | this.early[i]!) & m) === 0;
  }

  /**
   * Start of a CP. With release, the older reserved generation becomes allocatable and
   * the newer one becomes older; otherwise both merge into the older one (a reader is
   * still in flight on a retired root).
   */
  beginCommit(release: boolean): Run[] {
    assert(this.dirtyLeaves.size === 0, 'previous commit left dirty leaves');
    this.cpUnits.clear();
    this.tail = { pba: 0, count: 0 };
    let released: Run[] = [];
    if (release) {
      if (this.reservedCountOld > 0) {
        released = SpaceMap.runsOf(this.reservedOld, this.reservedOldLeaves);
        assert(released.reduce((n, r) => n + r.count, 0) === this.reservedCountOld, 'released runs disagree with the reserved count');
      }
      SpaceMap.clearMarked(this.reservedOld, this.reservedOldLeaves);
      const t = this.reservedOld;
      this.reservedOld = this.reservedNew;
      this.reservedNew = t;
      const tl = this.reservedOldLeaves;
      this.reservedOldLeaves = this.reservedNewLeaves;
      this.reservedNewLeaves = tl;
      this.reservedCountOld = this.reservedCountNew;
      this.reservedCountNew = 0;
    } else if (this.reservedCountNew > 0) {
      for (let leaf = 0; leaf < this.leafCount; leaf++) {
        if (this.reservedNewLeaves[leaf] === 0) continue;
        const a = leaf * BLOCK;
        moveInto(this.reservedOld.subarray(a, a + BLOCK), this.reservedNew.subarray(a, a + BLOCK));
        this.reservedOldLeaves[leaf] = 1;
        this.reservedNewLeaves[leaf] = 0;
      }
      this.reservedCountOld += this.reservedCountNew;
      this.reservedCountNew = 0;
    }
    return released;
  }

  /** Zeroes the marked leaves of b (writing only their set words) and clears the marks. */
  private static clearMarked(b: Buffer, marks: Uint8Array): void {
    for (let leaf = 0; leaf < marks.length; leaf++) {
      if (marks[leaf] === 0) continue;
      clearSetWords(b, leaf * BLOCK, (leaf + 1) * BLOCK);
      marks[leaf] = 0;
    }
  }

  /**
   * Runs of set bits, in increasing order (skips zero words quickly); with `marks`, only in
   * the marked leaves (every set bit must be in one).
   */
  static runsOf(b: Buffer, marks?: Uint8Array): Run[] {
    assert(b.byteOffset % 4 === 0 && b.length % 4 === 0, 'bitmap must be word aligned');
    const words = new Uint32Array(b.buffer, b.byteOffset, b.length / 4);
    const runs: Run[] = [];
    const leafWords = BLOCK / 4;
    for (let w = 0; w < words.length; w++) {
      if (marks && w % leafWords === 0 && marks[w / leafWords] === 0) {
        w += leafWords - 1; // an unmarked leaf has no set bit
        continue;
      }
      let v = words[w]!;
      while (v !== 0) {
        const bit = 31 - Math.clz32(v & -v);
        v &= v - 1;
        const p = w * 32 + bit;
        const last = runs[runs.length - 1];
        if (last && last.pba + last.count === p) last.count++;
        else runs.push({ pba: p, count: 1 });
      }
    }
    return runs;
  }

  private markDirty(p: number): void {
    this.dirtyLeaves.add(Math.floor(p / BITS_PER_LEAF));
  }

  private allocateAt(p: number): void {
    if (!(p >= 0 && p < this.deviceBlocks)) assert(false, `allocate pba ${p} outside the device`);
    if (!(this.isAllocatable(p))) assert(false, `allocate pba ${p} that is not free`);
    setBit(this.active, p);
    this.usedCount++;
    this.markDirty(p);
  }

  /** Allocates count blocks in as few contiguous runs as the free space allows (next fit; whole units first, see the invariants). */
  allocate(count: number): Run[] {
    assert(Number.isSafeInteger(count) && count >= 0, `allocate ${count}`);
    assert(count <= this.free, `allocate ${count} with only ${this.free} free`);
    if (this.unitBlocks === 1) return this.allocateBlocks(count, []);
    const runs: Run[] = [];
    let left = count;
    const take = (pba: number, n: number): void => {
      for (let p = pba; p < pba + n; p++) this.allocateAt(p);
      const last = runs[runs.length - 1];
      if (last && last.pba + last.count === pba) last.count += n;
      else runs.push({ pba, count: n });
      left -= n;
    };
    if (left > 0 && this.tail.count > 0) {
      const n = Math.min(left, this.tail.count);
      take(this.tail.pba, n);
      this.tail = { pba: this.tail.pba + n, count: this.tail.count - n };
    }
    const u = this.unitBlocks;
    const units = Math.floor(this.deviceBlocks / u);
    for (let scanned = 0; left > 0 && scanned < units; scanned++) {
      const unit = this.unitCursor;
      this.unitCursor = (this.unitCursor + 1) % units;
      if (!this.unitFree(unit)) continue;
      const n = Math.min(left, u);
      this.cpUnits.add(unit);
      take(unit * u, n);
      this.tail = { pba: unit * u + n, count: u - n };
    }
    if (left > 0) {
      log().warn({ blocks: left, unitBlocks: u }, 'space map: no whole free allocation unit left; allocating single blocks (their stripes are written by read-modify-write)');
      return this.allocateBlocks(left, runs);
    }
    return runs;
  }

  /** True if every block of allocation unit `unit` is allocatable. */
  private unitFree(unit: number): boolean {
    const u = this.unitBlocks;
    const lo = unit * u;
    if (lo < RING_SLOTS) return false;
    if ((u & 7) === 0) {
      for (let i = lo >>> 3; i < (lo + u) >>> 3; i++) if ((this.active[i]! | this.summary[i]! | this.reservedOld[i]! | this.reservedNew[i]! | this.held[i]! | this.early[i]!) !== 0) return false;
      return true;
    }
    for (let p = lo; p < lo + u; p++) if (!this.isAllocatable(p)) return false;
    return true;
  }

  /**
   * End of a CP's allocations: the free blocks of the units it was handed whole (its tail,
   * and blocks it gave back). Nothing references them; writing them (zeroes) completes
   * those stripes, so no stripe of the CP needs a read-modify-write.
   */
  takePadRuns(): Run[] {
    const runs: Run[] = [];
    const u = this.unitBlocks;
    for (const unit of [...this.cpUnits].sort((a, b) => a - b)) {
      for (let p = unit * u; p < (unit + 1) * u; p++) {
        if (testBit(this.active, p)) continue;
        if (!(this.isAllocatable(p))) assert(false, `pad block ${p} is not free`);
        const last = runs[runs.length - 1];
        if (last && last.pba + last.count === p) last.count++;
        else runs.push({ pba: p, count: 1 });
      }
    }
    this.cpUnits.clear();
    this.tail = { pba: 0, count: 0 };
    return runs;
  }

  /** Of released runs, the whole allocation units that are entirely allocatable now (what may be discarded). */
  wholeFreeUnits(runs: Run[]): Run[] {
    if (this.unitBlocks === 1) return runs;
    const u = this.unitBlocks;
    const units = new Set<number>();
    for (const r of runs) for (let unit = Math.floor(r.pba / u); unit * u < r.pba + r.count; unit++) if ((unit + 1) * u <= this.deviceBlocks) units.add(unit);
    const out: Run[] = [];
    for (const unit of [...units].sort((a, b) => a - b)) {
      if (!this.unitFree(unit)) continue;
      const last = out[out.length - 1];
      if (last && last.pba + last.count === unit * u) last.count += u;
      else out.push({ pba: unit * u, count: u });
    }
    return out;
  }

  /**
   * Released runs (from beginCommit or releaseHeld at the start of CP cp, single-member
   * maps only) become the warm blocks allocation takes first. The first call of a later CP
   * returns what is left of the earlier ones, still allocatable (nothing took them in a
   * whole CP): cold, to be discarded. The runs are kept, not copied.
   */
  keepWarm(released: Run[], cp: number): Run[] {
    assert(this.unitBlocks === 1, 'warm blocks are for single-member maps');
    const cold: Run[] = [];
    if (this.warmCp !== cp) {
      assert(cp > this.warmCp, `warm blocks of CP ${this.warmCp} kept again at CP ${cp}`);
      for (let i = this.warmAt; i < this.warm.length; i++) this.allocatableRuns(this.warm[i]!, cold);
      this.warm = [];
      this.warmAt = 0;
      this.warmCp = cp;
      this.recentlyWarm = false;
    }
    for (const r of released) {
      if (!(r.pba >= RING_SLOTS && r.count > 0 && r.pba + r.count <= this.deviceBlocks)) assert(false, `warm run [${r.pba}, +${r.count})`);
      this.warm.push(r);
    }
    if (released.length > 0) this.recentlyWarm = true;
    return cold;
  }

  /** Whether CP warmCp was given warm blocks (blocks are being rewritten, not written for the first time). */
  private recentlyWarm = false;

  /** Appends the allocatable stretches of run r to out (eight blocks a step where a bitmap byte covers them). */
  private allocatableRuns(r: Run, out: Run[]): void {
    const end = r.pba + r.count;
    let start = -1;
    let p = r.pba;
    while (p < end) {
      if ((p & 7) === 0 && p + 8 <= end) {
        const i = p >>> 3;
        const used = this.active[i]! | this.summary[i]! | this.reservedOld[i]! | this.reservedNew[i]! | this.held[i]! | this.early[i]!;
        if (used === 0) {
          if (start < 0) start = p;
          p += 8;
          continue;
        }
      }
      const ok = this.isAllocatable(p);
      if (ok && start < 0) start = p;
      else if (!ok && start >= 0) {
        out.push({ pba: start, count: p - start });
        start = -1;
      }
      p++;
    }
    if (start >= 0) out.push({ pba: start, count: end - start });
  }

  /** Takes block p: into the live map (allocateAt), or, for early, into the early set. */
  private takeBlock(p: number, early: boolean): void {
    if (early) setBit(this.early, p);
    else this.allocateAt(p);
  }

  /** Takes up to `count` allocatable warm blocks into runs (live, or early); returns how many it took. */
  private allocateWarm(count: number, runs: Run[], early = false): number {
    let left = count;
    while (left > 0 && this.warmAt < this.warm.length) {
      const r = this.warm[this.warmAt]!;
      while (left > 0 && r.count > 0) {
        const p = r.pba;
        r.pba++;
        r.count--;
        if (!this.isAllocatable(p)) continue;
        this.takeBlock(p, early);
        left--;
        const last = runs[runs.length - 1];
        if (last && last.pba + last.count === p) last.count++;
        else runs.push({ pba: p, count: 1 });
      }
      if (r.count === 0) this.warmAt++;
    }
    return count - left;
  }

  /** Block-level next fit (warm blocks first), appending to runs; early: into the early set (reserveEarly). */
  private allocateBlocks(count: number, runs: Run[], early = false): Run[] {
    let left = count - this.allocateWarm(count, runs, early);
    let p = this.cursor;
    let scanned = 0;
    const a = this.active, s = this.summary;
    while (left > 0) {
      assert(scanned <= this.deviceBlocks + 8, 'allocator scanned the whole device without finding space');
      if (p >= this.deviceBlocks) p = RING_SLOTS;
      // Skip whole bytes with no free bit.
      if ((p & 7) === 0) {
        const i = p >>> 3;
        if ((a[i]! | s[i]! | this.reservedOld[i]! | this.reservedNew[i]! | this.held[i]! | this.early[i]!) === 0xff) {
          p += 8;
          scanned += 8;
          continue;
        }
      }
      if (!this.isAllocatable(p)) {
        p++;
        scanned++;
        continue;
      }
      const start = p;
      while (left > 0 && p < this.deviceBlocks && this.isAllocatable(p)) {
        this.takeBlock(p, early);
        p++;
        left--;
      }
      scanned += p - start;
      const last = runs[runs.length - 1];
      if (last && last.pba + last.count === start) last.count += p - start;
      else runs.push({ pba: start, count: p - start });
    }
    this.cursor = p;
    return runs;
  }

  /**
   * Takes `count` allocatable blocks for data placed ahead of its CP: warm blocks first,
   * then next fit (only warm ones while blocks are being rewritten), in runs
   * (single-member maps only). The blocks are
   * in no persisted set until adoptEarly; undefined when fewer than count + keepFree are free.
   */
  reserveEarly(count: number, keepFree: number): Run[] | undefined {
    assert(this.unitBlocks === 1, 'early placement is for single-member maps');
    assert(Number.isSafeInteger(count) && count > 0 && Number.isSafeInteger(keepFree) && keepFree >= 0, `reserveEarly ${count}, keeping ${keepFree}`);
    if (this.free < count + keepFree) return undefined;
    // Blocks being rewritten: CPs release runs the member holds warm, and a CP allocating
    // its data at once takes them. Placed data must then come from them too (placing it in
    // cold space instead cost 1M overwrites 15-35% here): all of it, or none (the CP writes it).
    if (this.recentlyWarm && this.warmSupply(count) < count) return undefined;
    // The CP's own allocation order (warm blocks first: the member holds them, mostly in
    // the page cache; then next fit), into the early set.
    const runs = this.allocateBlocks(count, [], true);
    this.earlyCount += count;
    return runs;
  }

  /** Allocatable warm blocks left, counted up to `upTo`. */
  private warmSupply(upTo: number): number {
    let n = 0;
    for (let i = this.warmAt; i < this.warm.length && n < upTo; i++) {
      const r = this.warm[i]!;
      for (let q = r.pba; q < r.pba + r.count && n < upTo; q++) if (this.isAllocatable(q)) n++;
    }
    return n;
  }

  isEarly(p: number): boolean {
    return p >= 0 && p < this.deviceBlocks && testBit(this.early, p);
  }

  /** A block placed early becomes part of the CP being committed (active). */
  adoptEarly(p: number): void {
    if (!this.isEarly(p)) assert(false, `adopt pba ${p}, which was not placed early`);
    clearBit(this.early, p);
    this.earlyCount--;
    this.allocateAt(p);
  }

  /** Early blocks no CP adopted (the data was rewritten or trimmed in the same half, or its write failed): allocatable again. */
  dropEarly(r: Run): void {
    for (let p = r.pba; p < r.pba + r.count; p++) {
      if (!testBit(this.early, p)) continue; // adopted
      clearBit(this.early, p);
      this.earlyCount--;
    }
  }

  get earlyBlocks(): number {
    return this.earlyCount;
  }

  /**
   * Frees a block the live state no longer references. If a snapshot still holds it,
   * it stays in use; otherwise it is reserved until two CPs later. Returns true if the
   * block became free (not held).
   */
  freeFromLive(p: number): boolean {
    if (!(p >= RING_SLOTS && p < this.deviceBlocks)) assert(false, `free pba ${p} outside the allocatable range`);
    if (!(testBit(this.active, p))) assert(false, `free of pba ${p} that is not in use`);
    clearBit(this.active, p);
    this.markDirty(p);
    if (testBit(this.summary, p)) return false;
    this.usedCount--;
    if (!(!testBit(this.reservedOld, p) && !testBit(this.reservedNew, p))) assert(false, `pba ${p} reserved twice`);
    setBit(this.reservedNew, p);
    this.reservedNewLeaves[Math.floor(p / BITS_PER_LEAF)] = 1;
    this.reservedCountNew++;
    return true;
  }

  /** Un-allocates a block allocated in this CP and never written (a surplus of the upper bound). */
  unallocate(p: number): void {
    if (!(testBit(this.active, p) && !testBit(this.summary, p))) assert(false, `unallocate pba ${p}`);
    clearBit(this.active, p);
    this.usedCount--;
    this.markDirty(p);
  }

  /**
   * Replaces the snapshot summary (after a snapshot delete): blocks that were held only
   * by deleted snapshots and are not active become reserved. Returns how many.
   */
  replaceSummary(next: Buffer): number {
    assert(next.length === this.summary.length, 'summary length');
    let freed = 0;
    const old = this.summary;
    for (let i = 0; i < old.length; i++) {
      const gone = old[i]! & ~next[i]! & ~this.active[i]!;
      if (gone === 0) continue;
      assert((next[i]! & ~old[i]! & ~this.active[i]!) === 0, 'new summary holds a block the old one did not');
      assert(((this.reservedOld[i]! | this.reservedNew[i]!) & gone) === 0, 'freed snapshot block already reserved');
      this.reservedNew[i] = this.reservedNew[i]! | gone;
      this.reservedNewLeaves[Math.floor(i / BLOCK)] = 1;
      freed += pop8(gone);
    }
    this.summary = next;
    this.reservedCountNew += freed;
    this.usedCount -= freed;
    assert(this.usedCount === popcountOr(this.active, this.summary), 'used count after summary replace');
    return freed;
  }

  /**
   * Holds the blocks of `map` (the space map of an older committed CP a peer still
   * uses) that are free now: they become reserved, released only by a later rotation.
   * Returns how many blocks it reserved.
   */
  reserveHeld(map: Buffer): number {
    assert(map.length === this.active.length, 'held map length');
    let n = 0;
    for (let i = 0; i < map.length; i++) {
      const add = map[i]! & ~this.active[i]! & ~this.summary[i]! & ~this.reservedOld[i]! & ~this.reservedNew[i]! & ~this.held[i]! & ~this.early[i]!;
      if (add === 0) continue;
      this.held[i] = this.held[i]! | add;
      this.heldLeaves[Math.floor(i / BLOCK)] = 1;
      n += pop8(add);
    }
    this.heldCount += n;
    return n;
  }

  get heldBlocks(): number {
    return this.heldCount;
  }

  /** Releases every held block (the peer no longer needs the CPs they belong to); returns them. */
  releaseHeld(): Run[] {
    if (this.heldCount === 0) return [];
    const runs = SpaceMap.runsOf(this.held, this.heldLeaves);
    assert(runs.reduce((n, r) => n + r.count, 0) === this.heldCount, 'held runs disagree with the held count');
    SpaceMap.clearMarked(this.held, this.heldLeaves);
    this.heldCount = 0;
    return runs;
  }

  /** After a snapshot of the current active map is taken: it holds everything active holds. */
  addActiveToSummary(): void {
    orInto(this.summary, this.active);
  }

  /** Upper bound on the blocks the space-map tree can need in one CP. */
  get treeBlocksMax(): number {
    return this.leafCount + this.nodePtrs.reduce((n, a) => n + a.length, 0);
  }

  /**
   * Writes the space-map side of a CP: frees the old versions of every dirty leaf and
   * path node, allocates blocks for their new versions (which dirties more leaves: a
   * fixpoint), and builds the blocks. Returns them for writing and updates the pointers.
   */
  buildCommit(cp: number, uuid: Buffer): NewBlock[] {
    const reservedForMap: number[] = [];
    const dirtyNodes: Set<number>[] = [];
    // The committed versions being replaced, by leaf index and by (level, index).
    const prevLeaf = new Map<number, number>();
    const prevNode = new Map<string, number>();
    for (let rounds = 0; ; rounds++) {
      assert(rounds < 64, 'space-map fixpoint does not converge');
      const before = this.dirtyLeaves.size;
      dirtyNodes.length = 0;
      let below: Iterable<number> = this.dirtyLeaves;
      for (let l = 0; l < this.height; l++) {
        const set = new Set<number>();
        for (const i of below) set.add(Math.floor(i / FANOUT));
        dirtyNodes.push(set);
        below = set;
      }
      // Free the old versions (they are replaced); a freed pointer is set to null now.
      for (const i of [...this.dirtyLeaves]) {
        const old = this.leafPtrs[i];
        if (old) {
          if (!prevLeaf.has(i)) prevLeaf.set(i, old.pba);
          this.freeFromLive(old.pba);
          this.leafPtrs[i] = null;
        }
      }
      for (let l = 0; l < this.height; l++) {
        for (const i of dirtyNodes[l]!) {
          const old = this.nodePtrs[l]![i];
          if (old) {
            if (!prevNode.has(`${l}/${i}`)) prevNode.set(`${l}/${i}`, old.pba);
            this.freeFromLive(old.pba);
            this.nodePtrs[l]![i] = null;
          }
        }
      }
      const need = this.dirtyLeaves.size + dirtyNodes.reduce((n, s) => n + s.size, 0);
      if (reservedForMap.length < need) {
        for (const r of this.allocate(need - reservedForMap.length)) for (let k = 0; k < r.count; k++) reservedForMap.push(r.pba + k);
      }
      if (this.dirtyLeaves.size === before && reservedForMap.length >= need) break;
    }
    // Emptiness: a leaf with no bit set, or a node with no present child, becomes a hole.
    const leafNonEmpty = (i: number): boolean => !isZero(this.active, i * BLOCK, (i + 1) * BLOCK);
    const nodeNonEmpty = (l: number, i: number): boolean => {
      const childCount = l === 0 ? this.leafCount : this.nodePtrs[l - 1]!.length;
      for (let c = i * FANOUT; c < Math.min(childCount, (i + 1) * FANOUT); c++) {
        if (l === 0) {
          if (this.dirtyLeaves.has(c) ? leafNonEmpty(c) : this.leafPtrs[c] !== null) return true;
        } else if (dirtyNodes[l - 1]!.has(c) ? nodeNonEmpty(l - 1, c) : this.nodePtrs[l - 1]![c] !== null) {
          return true;
        }
      }
      return false;
    };
    const countNeeded = (): number => {
      let n = 0;
      for (const i of this.dirtyLeaves) if (leafNonEmpty(i)) n++;
      for (let l = 0; l < this.height; l++) for (const i of dirtyNodes[l]!) if (nodeNonEmpty(l, i)) n++;
      return n;
    };
    reservedForMap.sort((x, y) => x - y);
    for (let n = countNeeded(); n < reservedForMap.length; n = countNeeded()) {
      // Surplus (a leaf or node turned out empty): give back the last block; its leaf is already dirty.
      this.unallocate(reservedForMap.pop()!);
    }
    // Build leaves, then nodes bottom-up, assigning the reserved blocks in order.
    const out: NewBlock[] = [];
    let next = 0;
    const take = (): number => {
      const p = reservedForMap[next++];
      assert(p !== undefined, 'space-map fixpoint reserved too few blocks');
      return p;
    };
    const leaves = [...this.dirtyLeaves].sort((x, y) => x - y);
    for (const i of leaves) {
      if (!leafNonEmpty(i)) continue;
      const buf = Buffer.from(this.active.subarray(i * BLOCK, (i + 1) * BLOCK));
      const pba = take();
      const prevPba = prevLeaf.get(i);
      out.push(prevPba !== undefined ? { pba, buf, prevPba } : { pba, buf });
      this.leafPtrs[i] = { pba, birth: cp, crc: crc32c(buf) };
    }
    for (let l = 0; l < this.height; l++) {
      const childCount = l === 0 ? this.leafCount : this.nodePtrs[l - 1]!.length;
      const children = l === 0 ? this.leafPtrs : this.nodePtrs[l - 1]!;
      for (const i of [...dirtyNodes[l]!].sort((x, y) => x - y)) {
        if (!nodeNonEmpty(l, i)) continue;
        const buf = Buffer.alloc(BLOCK);
        const pba = take();
        writeNodeHeader(buf, { type: NODE_TYPE_SPACE_MAP, level: l, index: i }, pba, cp, uuid);
        for (let c = i * FANOUT; c < Math.min(childCount, (i + 1) * FANOUT); c++) encodePtr(buf, ptrSlotOffset(c - i * FANOUT), children[c]!);
        this.nodePtrs[l]![i] = { pba, birth: cp, crc: crc32c(buf) };
        const prevPba = prevNode.get(`${l}/${i}`);
        out.push(prevPba !== undefined ? { pba, buf, prevPba } : { pba, buf });
      }
    }
    assert(next === reservedForMap.length, `space map used ${next} of ${reservedForMap.length} reserved blocks`);
    assert(this.nodePtrs[this.height - 1]![0] !== null, 'space-map root became a hole');
    this.dirtyLeaves.clear();
    return out;
  }

  /** Every pba the live space-map tree occupies (for check()). */
  treeBlocks(): number[] {
    const out: number[] = [];
    for (const p of this.leafPtrs) if (p) out.push(p.pba);
    for (const lvl of this.nodePtrs) for (const p of lvl) if (p) out.push(p.pba);
    return out;
  }

  /** Full consistency of the in-memory counters (O(device); for tests and check()). */
  verifyCounters(): string[] {
    const problems: string[] = [];
    const used = popcountOr(this.active, this.summary);
    if (used !== this.usedCount) problems.push(`space map: used counter ${this.usedCount} but ${used} blocks are set`);
    if (popcount(this.reservedOld) !== this.reservedCountOld || popcount(this.reservedNew) !== this.reservedCountNew) problems.push('space map: reserved counters disagree with the reserved bitmaps');
    if (popcount(this.held) !== this.heldCount) problems.push('space map: the held counter disagrees with the held bitmap');
    if (this.earlyCount > 0 && popcount(this.early) !== this.earlyCount) problems.push('space map: the early counter disagrees with the early bitmap');
    let overlap = 0;
    for (let i = 0; i < this.active.length; i++) {
      const u = this.active[i]! | this.summary[i]!;
      const h = this.held[i]!;
      const e = this.early[i]!;
      if ((u & this.reservedOld[i]!) !== 0 || (u & this.reservedNew[i]!) !== 0 || (this.reservedOld[i]! & this.reservedNew[i]!) !== 0 || ((u | this.reservedOld[i]! | this.reservedNew[i]!) & h) !== 0 || ((u | this.reservedOld[i]! | this.reservedNew[i]! | h) & e) !== 0) overlap++;
    }
    if (overlap > 0) problems.push(`space map: ${overlap} bitmap bytes have blocks both reserved and in use`);
    const marked: [string, Buffer, Uint8Array][] = [['reservedOld', this.reservedOld, this.reservedOldLeaves], ['reservedNew', this.reservedNew, this.reservedNewLeaves], ['held', this.held, this.heldLeaves]];
    for (const [name, b, marks] of marked) {
      for (let leaf = 0; leaf < this.leafCount; leaf++) {
        if (marks[leaf] === 0 && !isZero(b, leaf * BLOCK, (leaf + 1) * BLOCK)) problems.push(`space map: ${name} leaf ${leaf} has blocks but is not marked`);
      }
    }
    return problems;
  }

  /** pbas set in a but not in b (capped), for problem reports. */
  static difference(a: Buffer, b: Buffer, cap: number): { count: number; sample: number[] } {
    let count = 0;
    const sample: number[] = [];
    for (let i = 0; i < a.length; i++) {
      const d = a[i]! & ~b[i]!;
      if (d === 0) continue;
      count += pop8(d);
      for (let bit = 0; bit < 8 && sample.length < cap; bit++) if ((d & (1 << bit)) !== 0) sample.push(i * 8 + bit);
    }
    return { count, sample };
  }
}
