/**
 * Every block of a committed state born after a base CP (ZFS's incremental send): the
 * data-tree and space-map blocks of the live root and of every kept snapshot whose birth
 * CP is greater than `baseCp`. With baseCp = -1, every block the state references.
 *
 * Invariants:
 * - A child is never born after its parent, so a subtree whose root was born at or
 *   before the base is skipped whole: the work is proportional to what changed.
 * - Every block is verified before it is emitted (address blocks by header and parent
 *   crc32c, data and space-map leaves by the parent crc32c): a corrupt source block is
 *   an error, never shipped.
 * - Each block is emitted once (a bitmap of emitted pbas: one bit per device block). The
 *   superblock is not emitted: the receiver writes it last, after every block is durable.
 * - With a base superblock (the base CP's, which the destination holds intact), each
 *   metadata block emitted (address block, space-map node or leaf) comes with its
 *   counterpart in the base: the block at the same place (type, level, index) in the
 *   base's live tree, read and verified like any block. It is a hint for a delta and
 *   nothing else: a base that is missing, another shape, or does not verify gives no
 *   counterpart, never an error; the emitted blocks and their order do not change.
 * - Memory: the bitmap; the data of LEAF_LOOKAHEAD + 1 level-0 nodes (FANOUT blocks each,
 *   ~672 KiB), the ones loading ahead and the one being emitted (and with a base, a 4 KiB
 *   counterpart for each), or in a resync RESYNC_LEAF_READS level-0 nodes, one window's
 *   pointers and RESYNC_CHUNKS_AHEAD + 1 chunks of data; the runs the receiver has not
 *   released yet (a sender holds them until its socket has written them, so its socket
 *   queue bounds them); at most FREE_LEAF_BUFS_MAX and FREE_CHUNK_BUFS_MAX idle buffers.
 */
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { allocAligned } from '../io/aligned';
import { crc32c } from '../io/checksum';
import {
  BLOCK, BlockPtr, FANOUT, NODE_TYPE_DATA_TREE, NODE_TYPE_SPACE_MAP, decodePtr, decodeSuperblock, ptrSlotOffset, verifyNode,
  type Superblock,
} from './layout';
import { uuidToBytes } from '../util/bytes';
import type { CommittedView } from './types';

/**
 * Level-0 nodes whose data reads run ahead of the one being emitted. One ahead kept the
 * walk waiting for reads ~70% of a loopback baseline (a read into fresh memory costs ~1-2
 * ms per 672 KiB on this VM); several reads in flight overlap those waits.
 */
const LEAF_LOOKAHEAD = 4;

/**
 * A resync (baseCp >= 0) emits data blocks in windows sorted by pba instead of by lbn:
 * blocks one CP wrote are adjacent on the device in lbn order, so within a window of
 * neighbouring level-0 nodes each CP's blocks form one run, and both the reads here and
 * the receiver's writes go in runs instead of one 4 KiB block at a time (scattered 4 KiB
 * writes otherwise cost one pool job per block on each side). A baseline keeps the lbn
 * order: an interrupted one resumes by counting blocks in that order.
 * RESYNC_WINDOW_BLOCKS data blocks (pointers only) are sorted at once; they are read in
 * chunks of RESYNC_CHUNK_BLOCKS into reused buffers, RESYNC_CHUNKS_AHEAD chunks reading
 * ahead of the one being emitted; level-0 nodes are read RESYNC_LEAF_READS at a time.
 */
const RESYNC_WINDOW_BLOCKS = 8192;
const RESYNC_CHUNK_BLOCKS = 512;
const RESYNC_CHUNKS_AHEAD = 2;
const RESYNC_LEAF_READS = 16;
/** Idle chunk buffers kept for reuse (2 MiB each), as FREE_LEAF_BUFS_MAX for level-0 buffers. */
const FREE_CHUNK_BUFS_MAX = 8;

export interface BornBlock {
  pba: number;
  /** 4 KiB, owned by the receiver. */
  buf: Buffer;
  /** Its crc32c (checked: the parent pointer's). */
  crc: number;
}

/** Blocks emitted together: buf holds ptrs.length blocks, in the order of ptrs, each verified against its pointer. */
export interface BornRun {
  ptrs: readonly BlockPtr[];
  /** ptrs.length x 4 KiB; the receiver's until it calls release(). */
  buf: Buffer;
  /**
   * Nothing reads buf any more: the walk may read later blocks into its memory. Optional
   * (not calling it costs an allocation, never data); at most once.
   */
  release(): void;
  /**
   * A single metadata block's counterpart in the base (walk option baseSuperblock): a
   * committed block of the base CP at the same place in the tree, verified. Absent for
   * data blocks and where the base has nothing there.
   */
  prev?: { pba: number; buf: Buffer };
  /** A single address or space-map block (not client data). */
  metadata?: true;
}

export interface WalkOptions {
  /** Polled between blocks: a true return ends the walk with an ESHUTDOWN error. */
  shouldStop?: () => boolean;
  /** The base CP's superblock (4 KiB): metadata blocks come with their base counterpart (BornRun.prev). */
  baseSuperblock?: Buffer | undefined;
}

/**
 * Idle level-0 data buffers a walk keeps for reuse (FANOUT blocks, ~672 KiB each): as
 * many as a sender that holds them until its socket has written them (source.ts: a
 * native link lends them to its queue of up to 32 MiB) has in use at once, so a buffer
 * released in a burst is not dropped only for a fresh one to be allocated (page faults,
 * garbage) a moment later. Never more than were in use at once; gone with the walk.
 */
const FREE_LEAF_BUFS_MAX = 64;

/**
 * Walks `view` and awaits `emit` for every block born after `baseCp` (emit applies the
 * backpressure). Returns the number of blocks emitted. `shouldStop` is polled between
 * blocks: a true return ends the walk early with an ESHUTDOWN error.
 */
export async function walkBornAfter(
  view: CommittedView,
  baseCp: number,
  emit: (b: BornBlock) => Promise<void>,
  shouldStop: () => boolean = () => false,
): Promise<number> {
  return walkBornAfterRuns(
    view,
    baseCp,
    async (r) => {
      for (let k = 0; k < r.ptrs.length; k++) {
        if (shouldStop()) throw new VolumeError('ESHUTDOWN', 'walk stopped');
        await emit({ pba: r.ptrs[k]!.pba, buf: r.buf.subarray(k * BLOCK, (k + 1) * BLOCK), crc: r.ptrs[k]!.crc });
      }
    },
    shouldStop,
  );
}

/**
 * walkBornAfter by runs: a level-0 node's data blocks that are adjacent on the device come
 * in one call (a bulk sender then handles a few calls per 168 blocks, not one per block);
 * address and space-map blocks come one per call. Same order, same checks.
 */
export async function walkBornAfterRuns(
  view: CommittedView,
  baseCp: number,
  emit: (r: BornRun) => Promise<void>,
  opts: WalkOptions | (() => boolean) = {},
): Promise<number> {
  const o: WalkOptions = typeof opts === 'function' ? { shouldStop: opts } : opts;
  const shouldStop = o.shouldStop ?? (() => false);
  const sb = decodeSuperblock(view.superblock);
  if (typeof sb === 'string') throw new VolumeError('EIO', `pinned superblock does not decode: ${sb}`);
  assert(sb.cpNumber === view.cpNumber, 'view and superblock disagree');
  const uuid = uuidToBytes(sb.volumeUuid);
  const deviceBlocks = sb.deviceBlocks;
  const base = baseCp >= 0 && o.baseSuperblock ? usableBase(o.baseSuperblock, baseCp, sb) : undefined;
  const firstTime = firstTimeOf(deviceBlocks);
  let emitted = 0;
  const out = async (ptr: BlockPtr, buf: Buffer, prev?: Counterpart): Promise<void> => {
    if (shouldStop()) throw new VolumeError('ESHUTDOWN', 'walk stopped');
    emitted++;
    let released = false;
    await emit({
      ptrs: [ptr],
      buf,
      release: () => {
        assert(!released, 'a run released twice');
        released = true;
      },
      ...(prev ? { prev: { pba: prev.ptr.pba, buf: prev.buf } } : {}),
      metadata: true,
    });
  };
  // A level-0 node's data runs are read into one buffer (FANOUT blocks), reused once every
  // run in it was released: a read into fresh memory costs ~1-2 ms per 672 KiB on this VM
  // (the host backs each new page), into reused memory a plain copy. Aligned: the kernel
  // copies into a buffer 16 bytes off a boundary ~4x slower (io/aligned.ts).
  const freeLeafBufs: Buffer[] = [];
  const leafBuf = (runs: number): { buf: Buffer; release: () => void } => {
    const buf = freeLeafBufs.pop() ?? allocAligned(FANOUT * BLOCK);
    let left = runs;
    return {
      buf,
      release: () => {
        assert(left > 0, 'a run of a level-0 node released twice');
        if (--left === 0 && freeLeafBufs.length < FREE_LEAF_BUFS_MAX) freeLeafBufs.push(buf);
      },
    };
  };
  const readOne = async (ptr: BlockPtr): Promise<Buffer> => {
    const buf = Buffer.allocUnsafe(BLOCK);
    await view.readRaw(ptr.pba, 1, buf);
    return buf;
  };
  const child = (node: Buffer, parent: BlockPtr, slot: number, what: string): BlockPtr | null => {
    const p = decodePtr(node, ptrSlotOffset(slot), deviceBlocks);
    if (typeof p === 'string') throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${slot}: ${p}`);
    if (p !== null && p.birth > parent.birth) throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${slot}: child born after its parent`);
    return p;
  };
  // The base's counterparts: read and verified like any block, but a hint only (no error).
  const readBase = async (ptr: BlockPtr | null, self: BlockPtr, id: { type: number; level: number; index: number } | 'leaf'): Promise<Counterpart | undefined> => {
    if (!ptr || ptr.pba === self.pba || ptr.birth > baseCp) return undefined;
    try {
      const buf = await readOne(ptr);
      const bad = id === 'leaf' ? (crc32c(buf) !== ptr.crc ? 'checksum mismatch' : null) : verifyNode(buf, ptr, id, uuid);
      return bad ? undefined : { ptr, buf };
    } catch {
      return undefined;
    }
  };
  const baseChild = (prev: Counterpart | undefined, slot: number): BlockPtr | null => {
    if (!prev) return null;
    const p = decodePtr(prev.buf, ptrSlotOffset(slot), deviceBlocks);
    return typeof p === 'string' ? null : p;
  };

  // Data tree: address blocks carry a verified header; level-0 children are data blocks.
  // Level-0 nodes are loaded (the block read, the reads of its data runs started) up to
  // LEAF_LOOKAHEAD ahead of the one being emitted, so the device and the receiver work at
  // once. Loads start and emits follow the same child order (two nodes of one tree share no
  // child), so the emitted order is deterministic.
  interface Leaf {
    ptr: BlockPtr;
    node: Buffer;
    prev: Counterpart | undefined;
    runs: Array<{ ptrs: BlockPtr[]; buf: Promise<Buffer>; crcs: Buffer; release: () => void }>;
  }
  /** A level-0 node born after the base, verified, with the children to emit (unsorted), or null. */
  const loadLeafNode = async (ptr: BlockPtr, index: number, basePtr: BlockPtr | null): Promise<{ node: Buffer; prev: Counterpart | undefined; want: BlockPtr[] } | null> => {
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return null;
    const [node, prev] = await Promise.all([readOne(ptr), readBase(basePtr, ptr, { type: NODE_TYPE_DATA_TREE, level: 0, index })]);
    const problem = verifyNode(node, ptr, { type: NODE_TYPE_DATA_TREE, level: 0, index }, uuid);
    if (problem) throw new VolumeError('EIO', `address block at pba ${ptr.pba} (level 0): ${problem}`);
    const want: BlockPtr[] = [];
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'address block');
      if (c && c.birth > baseCp && firstTime(c.pba)) want.push(c);
    }
    return { node, prev, want };
  };
  const loadLeaf = async (ptr: BlockPtr, index: number, basePtr: BlockPtr | null): Promise<Leaf | null> => {
    const loaded = await loadLeafNode(ptr, index, basePtr);
    if (!loaded) return null;
    const { node, prev, want } = loaded;
    want.sort((a, b) => a.pba - b.pba);
    const spans = adjacentSpans(want);
    const runs: Leaf['runs'] = [];
    if (spans.length === 0) return { ptr, node, prev, runs };
    // Every run of this node in one (reused) buffer, each read and checksummed in one pool job.
    const lb = leafBuf(spans.length);
    const crcs = Buffer.allocUnsafe(want.length * 4);
    for (const [i, j] of spans) {
      const ptrs = want.slice(i, j);
      const buf = lb.buf.subarray(i * BLOCK, j * BLOCK);
      const runCrcs = crcs.subarray(i * 4, j * 4);
      const read = view.readRawCrc(ptrs[0]!.pba, ptrs.length, buf, runCrcs).then(() => buf);
      read.catch(() => undefined); // awaited in emitLeaf; never an unhandled rejection meanwhile
      runs.push({ ptrs, buf: read, crcs: runCrcs, release: lb.release });
    }
    return { ptr, node, prev, runs };
  };
  const emitLeaf = async (leaf: Leaf): Promise<void> => {
    await out(leaf.ptr, leaf.node, leaf.prev);
    for (const r of leaf.runs) await emitDataRun(r.ptrs, await r.buf, r.crcs, r.release);
  };
  /** Emits a run of data blocks read with their crc32c, every block checked against its parent pointer first. */
  const emitDataRun = async (ptrs: BlockPtr[], buf: Buffer, crcs: Buffer, releaseBuf: () => void): Promise<void> => {
    for (let k = 0; k < ptrs.length; k++) {
      if (crcs.readUInt32LE(k * 4) !== ptrs[k]!.crc) throw new VolumeError('EIO', `data block at pba ${ptrs[k]!.pba}: checksum mismatch`);
    }
    if (shouldStop()) throw new VolumeError('ESHUTDOWN', 'walk stopped');
    emitted += ptrs.length;
    let released = false;
    await emit({
      ptrs,
      buf,
      release: () => {
        assert(!released, 'a run released twice');
        released = true;
        releaseBuf();
      },
    });
  };
  // A resync's windows (see RESYNC_WINDOW_BLOCKS): level-0 nodes are loaded in groups and
  // emitted as loaded; their children collect until a window is full, then go out sorted
  // by pba, in runs of adjacent blocks.
  const freeChunkBufs: Buffer[] = [];
  let pendingLeaves: Array<{ ptr: BlockPtr; index: number; base: BlockPtr | null }> = [];
  let windowPtrs: BlockPtr[] = [];
  const loadPendingLeaves = async (): Promise<void> => {
    const group = pendingLeaves;
    pendingLeaves = [];
    // Read together, emitted in order (every emit awaited: the sender's backpressure).
    const loaded = await Promise.all(group.map((l) => loadLeafNode(l.ptr, l.index, l.base)));
    for (let i = 0; i < group.length; i++) {
      const l = loaded[i];
      if (!l) continue;
      await out(group[i]!.ptr, l.node, l.prev);
      for (const c of l.want) windowPtrs.push(c);
    }
    if (windowPtrs.length >= RESYNC_WINDOW_BLOCKS) await emitWindow();
  };
  const addLeaf = async (ptr: BlockPtr, index: number, base: BlockPtr | null): Promise<void> => {
    pendingLeaves.push({ ptr, index, base });
    if (pendingLeaves.length >= RESYNC_LEAF_READS) await loadPendingLeaves();
  };
  const finishLeaves = async (): Promise<void> => {
    if (pendingLeaves.length > 0) await loadPendingLeaves();
    if (windowPtrs.length > 0) await emitWindow();
  };
  interface Chunk {
    runs: Array<{ ptrs: BlockPtr[]; buf: Buffer; crcs: Buffer }>;
    read: Promise<void>;
    release: () => void;
  }
  const readChunk = (ptrs: BlockPtr[]): Chunk => {
    const buf = freeChunkBufs.pop() ?? allocAligned(RESYNC_CHUNK_BLOCKS * BLOCK);
    const crcs = Buffer.allocUnsafe(ptrs.length * 4);
    const runs: Chunk['runs'] = [];
    const reads: Array<Promise<void>> = [];
    for (const [i, j] of adjacentSpans(ptrs)) {
      const run = { ptrs: ptrs.slice(i, j), buf: buf.subarray(i * BLOCK, j * BLOCK), crcs: crcs.subarray(i * 4, j * 4) };
      runs.push(run);
      reads.push(view.readRawCrc(run.ptrs[0]!.pba, run.ptrs.length, run.buf, run.crcs));
    }
    let left = runs.length;
    const read = Promise.all(reads).then(() => undefined);
    read.catch(() => undefined); // awaited in turn; never an unhandled rejection meanwhile
    return {
      runs,
      read,
      release: () => {
        assert(left > 0, 'a run of a chunk released twice');
        if (--left === 0 && freeChunkBufs.length < FREE_CHUNK_BUFS_MAX) freeChunkBufs.push(buf);
      },
    };
  };
  const emitWindow = async (): Promise<void> => {
    const ptrs = windowPtrs;
    windowPtrs = [];
    ptrs.sort((a, b) => a.pba - b.pba);
    const chunks: Chunk[] = [];
    let next = 0;
    const startChunks = (): void => {
      while (next < ptrs.length && chunks.length < RESYNC_CHUNKS_AHEAD + 1) {
        chunks.push(readChunk(ptrs.slice(next, next + RESYNC_CHUNK_BLOCKS)));
        next += RESYNC_CHUNK_BLOCKS;
      }
    };
    startChunks();
    while (chunks.length > 0) {
      const c = chunks[0]!;
      await c.read;
      chunks.shift();
      startChunks();
      for (const r of c.runs) await emitDataRun(r.ptrs, r.buf, r.crcs, c.release);
    }
  };

  const dataTree = async (ptr: BlockPtr, level: number, index: number, basePtr: BlockPtr | null): Promise<void> => {
    if (level === 0) {
      const leaf = await loadLeaf(ptr, index, basePtr);
      if (leaf) await emitLeaf(leaf);
      return;
    }
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return;
    const id = { type: NODE_TYPE_DATA_TREE, level, index };
    const [node, prev] = await Promise.all([readOne(ptr), readBase(basePtr, ptr, id)]);
    const problem = verifyNode(node, ptr, id, uuid);
    if (problem) throw new VolumeError('EIO', `address block at pba ${ptr.pba} (level ${level}): ${problem}`);
    await out(ptr, node, prev);
    const kids: Array<{ c: BlockPtr; index: number; base: BlockPtr | null }> = [];
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'address block');
      if (c) kids.push({ c, index: index * FANOUT + s, base: baseChild(prev, s) });
    }
    if (level > 1) {
      for (const k of kids) await dataTree(k.c, level - 1, k.index, k.base);
      return;
    }
    if (baseCp >= 0) {
      for (const k of kids) await addLeaf(k.c, k.index, k.base);
      return;
    }
    // Up to LEAF_LOOKAHEAD level-0 nodes loading ahead of the one being emitted.
    const ahead: Array<Promise<Leaf | null>> = [];
    let started = 0;
    const startNext = (): void => {
      while (started < kids.length && ahead.length < LEAF_LOOKAHEAD) {
        const p = loadLeaf(kids[started]!.c, kids[started]!.index, kids[started]!.base);
        p.catch(() => undefined); // awaited below in turn; never an unhandled rejection meanwhile
        ahead.push(p);
        started++;
      }
    };
    startNext();
    while (ahead.length > 0) {
      const leaf = await ahead.shift()!;
      startNext();
      if (leaf) await emitLeaf(leaf);
    }
  };

  // Space map: nodes with headers, leaves verified by the parent's crc.
  const spaceMap = async (ptr: BlockPtr, level: number, index: number, basePtr: BlockPtr | null): Promise<void> => {
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return;
    const id = { type: NODE_TYPE_SPACE_MAP, level, index };
    const [node, prev] = await Promise.all([readOne(ptr), readBase(basePtr, ptr, id)]);
    const problem = verifyNode(node, ptr, id, uuid);
    if (problem) throw new VolumeError('EIO', `space-map node at pba ${ptr.pba} (level ${level}): ${problem}`);
    await out(ptr, node, prev);
    for (let s = 0; s < FANOUT; s++) {
      const c = child(node, ptr, s, 'space-map node');
      if (!c) continue;
      if (level > 0) {
        await spaceMap(c, level - 1, index * FANOUT + s, baseChild(prev, s));
      } else if (c.birth > baseCp && firstTime(c.pba)) {
        const [leaf, leafPrev] = await Promise.all([readOne(c), readBase(baseChild(prev, s), c, 'leaf')]);
        if (crc32c(leaf) !== c.crc) throw new VolumeError('EIO', `space-map leaf at pba ${c.pba}: checksum mismatch`);
        await out(c, leaf, leafPrev);
      }
    }
  };

  // Every data root (live and snapshots) is matched with the base's live root, every
  // space-map root with the base's live space map: a snapshot taken after the base was
  // the live tree once, and blocks already emitted are not emitted again.
  const roots = rootsOf(sb);
  for (const r of roots.data) await dataTree(r, sb.treeHeight - 1, 0, base?.root ?? null);
  await finishLeaves();
  for (const r of roots.smap) await spaceMap(r, sb.smapHeight - 1, 0, base?.smapRoot ?? null);
  return emitted;
}

/**
 * How many blocks walkBornAfterRuns(view, baseCp) would emit, reading only the address
 * and space-map nodes born after the base (never data or space-map leaves): a resync's
 * total for its progress, counted beside the walk itself. Same rules (a subtree born at
 * or before the base skipped whole, each pba counted once); nodes are verified as the
 * walk verifies them, so a damaged one is the same error.
 */
export async function countBornAfter(view: CommittedView, baseCp: number, shouldStop: () => boolean = () => false): Promise<number> {
  const sb = decodeSuperblock(view.superblock);
  if (typeof sb === 'string') throw new VolumeError('EIO', `pinned superblock does not decode: ${sb}`);
  const uuid = uuidToBytes(sb.volumeUuid);
  const deviceBlocks = sb.deviceBlocks;
  const firstTime = firstTimeOf(deviceBlocks);
  let count = 0;
  /** A node born after the base and not counted yet, read and verified (null: skipped). */
  const node = async (ptr: BlockPtr, id: { type: number; level: number; index: number }, what: string): Promise<Buffer | null> => {
    if (ptr.birth <= baseCp || !firstTime(ptr.pba)) return null;
    if (shouldStop()) throw new VolumeError('ESHUTDOWN', 'count stopped');
    const buf = Buffer.allocUnsafe(BLOCK);
    await view.readRaw(ptr.pba, 1, buf);
    const problem = verifyNode(buf, ptr, id, uuid);
    if (problem) throw new VolumeError('EIO', `${what} at pba ${ptr.pba} (level ${id.level}): ${problem}`);
    count++;
    return buf;
  };
  const children = (buf: Buffer, parent: BlockPtr, what: string): Array<BlockPtr | null> => {
    const out: Array<BlockPtr | null> = [];
    for (let s = 0; s < FANOUT; s++) {
      const p = decodePtr(buf, ptrSlotOffset(s), deviceBlocks);
      if (typeof p === 'string') throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${s}: ${p}`);
      if (p !== null && p.birth > parent.birth) throw new VolumeError('EIO', `${what} at pba ${parent.pba} slot ${s}: child born after its parent`);
      out.push(p);
    }
    return out;
  };
  /** Leaves (level-0 children: data blocks, or space-map leaves) born after the base, each pba once. */
  const countLeaves = (kids: Array<BlockPtr | null>): void => {
    for (const c of kids) if (c && c.birth > baseCp && firstTime(c.pba)) count++;
  };
  const dataTree = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
    const buf = await node(ptr, { type: NODE_TYPE_DATA_TREE, level, index }, 'address block');
    if (!buf) return;
    const kids = children(buf, ptr, 'address block');
    if (level === 0) return countLeaves(kids);
    if (level > 1) {
      for (let s = 0; s < FANOUT; s++) if (kids[s]) await dataTree(kids[s]!, level - 1, index * FANOUT + s);
      return;
    }
    // Level-0 nodes RESYNC_LEAF_READS at a time, as the walk reads them; counted in child order.
    for (let s = 0; s < FANOUT; s += RESYNC_LEAF_READS) {
      const group: Array<{ ptr: BlockPtr; index: number }> = [];
      for (let k = s; k < Math.min(FANOUT, s + RESYNC_LEAF_READS); k++) if (kids[k]) group.push({ ptr: kids[k]!, index: index * FANOUT + k });
      const bufs = await Promise.all(group.map((g) => node(g.ptr, { type: NODE_TYPE_DATA_TREE, level: 0, index: g.index }, 'address block')));
      bufs.forEach((b, k) => {
        if (b) countLeaves(children(b, group[k]!.ptr, 'address block'));
      });
    }
  };
  const spaceMap = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
    const buf = await node(ptr, { type: NODE_TYPE_SPACE_MAP, level, index }, 'space-map node');
    if (!buf) return;
    const kids = children(buf, ptr, 'space-map node');
    if (level === 0) return countLeaves(kids);
    for (let s = 0; s < FANOUT; s++) if (kids[s]) await spaceMap(kids[s]!, level - 1, index * FANOUT + s);
  };
  const roots = rootsOf(sb);
  for (const r of roots.data) await dataTree(r, sb.treeHeight - 1, 0);
  for (const r of roots.smap) await spaceMap(r, sb.smapHeight - 1, 0);
  return count;
}

/** A pba's first visit (true) or a repeat: one bit per device block, so a block shared by several roots is taken once. */
function firstTimeOf(deviceBlocks: number): (pba: number) => boolean {
  const seen = Buffer.alloc(Math.ceil(deviceBlocks / 8));
  return (pba) => {
    const m = 1 << (pba & 7);
    const i = pba >>> 3;
    if ((seen[i]! & m) !== 0) return false;
    seen[i] = seen[i]! | m;
    return true;
  };
}

/** [start, end) index spans of ptrs (sorted by pba) whose blocks are adjacent on the device. */
function adjacentSpans(ptrs: readonly BlockPtr[]): Array<[number, number]> {
  const spans: Array<[number, number]> = [];
  for (let i = 0; i < ptrs.length; ) {
    let j = i + 1;
    while (j < ptrs.length && ptrs[j]!.pba === ptrs[j - 1]!.pba + 1) j++;
    spans.push([i, j]);
    i = j;
  }
  return spans;
}

interface Counterpart {
  ptr: BlockPtr;
  buf: Buffer;
}

/** The base superblock when it can serve as a source of counterparts: the base CP's, of the same volume and shape. */
function usableBase(raw: Buffer, baseCp: number, sb: Superblock): Superblock | undefined {
  if (raw.length !== BLOCK) return undefined;
  const b = decodeSuperblock(raw);
  if (typeof b === 'string') return undefined;
  const same = b.cpNumber === baseCp && b.volumeUuid === sb.volumeUuid && b.deviceBlocks === sb.deviceBlocks && b.treeHeight === sb.treeHeight && b.smapHeight === sb.smapHeight;
  return same ? b : undefined;
}

function rootsOf(sb: Superblock): { data: BlockPtr[]; smap: BlockPtr[] } {
  const data: BlockPtr[] = [];
  const smap: BlockPtr[] = [sb.smapRoot];
  if (sb.root) data.push(sb.root);
  for (const s of sb.snapshots) {
    if (s.root) data.push(s.root);
    smap.push(s.smapRoot);
  }
  return { data, smap };
}
