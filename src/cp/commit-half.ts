/**
 * Draining one frozen NVRAM half into the block tree: build the BlockChange list from
 * the half's index and commit it.
 *
 * Invariants:
 * - The changes are exactly the half's final effect: for every lbn the half wrote, its
 *   newest logged 4 KiB; for every lbn inside one of its zero ranges that the half did
 *   not later write and that the tree holds data for, a hole.
 * - Only the last commit of a half carries the half's watermark (its last seq) and the
 *   snapshot ops. Earlier commits (when the change list is larger than a chunk, e.g. a
 *   trim of a large allocated range) carry the previous watermark: if the process dies
 *   between them, replay re-applies the whole half, which is idempotent because it
 *   overwrites every lbn the half touched.
 * - Data buffers handed to the tree are views into the NVRAM region; the half is not
 *   written or released until every commit using them has resolved.
 * - With an EarlyPlacer: its writes for the half have ended before the first commit, a
 *   change names an early block only where the index's payload for the lbn is the one
 *   that was placed, and the placer hears that the half's CP ended, however it ended.
 * - Work is chunked (at most CHUNK_NODES_MAX distinct level-0 address blocks and
 *   CHUNK_CHANGES_MAX changes per commit, tree queries capped) so memory stays bounded,
 *   and the loop over the half's blocks yields the event loop (Slicer).
 */
import { EXTENT_HOLE } from '../util/extent';
import type { BlockChange, BlockTreeApi, CommitResult, CpMeta, SnapshotOp } from '../tree/types';
import type { Half, NvLog } from '../nvlog/log';
import { FANOUT } from '../tree/layout';
import { assert } from '../util/assert';
import { slicerFor } from '../util/work';
import type { EarlyPlacer } from './early-place';

/**
 * A commit's transient memory is dominated by the address blocks it rewrites (old and
 * new copy, ~8 KiB each); the changes themselves are views into the NVRAM. So a commit
 * is bounded by distinct level-0 address blocks (CHUNK_NODES_MAX, 32 MiB) and, loosely,
 * by changes: a 32 MiB half of random 4k writes on a 2 GiB volume (~3100 level-0 blocks)
 * or of sequential writes (48 blocks) is one commit, one pair of syncs.
 */
export const CHUNK_NODES_MAX = 4096;
export const CHUNK_CHANGES_MAX = 65536;
/** Blocks asked of tree.blockStatus per call while expanding a zero range. */
const STATUS_QUERY_BLOCKS = 1 << 20;
const STATUS_QUERY_EXTENTS = 4096;

export interface HalfCommitResult {
  commits: CommitResult[];
  blocksWritten: number;
  blocksFreed: number;
}

/**
 * Commits `half` into the tree with final meta `meta` and snapshot `ops`. The log must
 * keep the half frozen until this resolves.
 */
export async function commitHalf(log: NvLog, tree: BlockTreeApi, half: Half, meta: CpMeta, ops: SnapshotOp[] = [], placer?: EarlyPlacer): Promise<HalfCommitResult> {
  const placed = placer ? await placer.settle(half) : undefined;
  let adopted = 0;
  try {
    return await commitHalfInner(log, tree, half, meta, ops, placed, (r) => (adopted += r.earlyBlocks));
  } finally {
    placer?.finish(half, adopted);
  }
}

async function commitHalfInner(
  log: NvLog, tree: BlockTreeApi, half: Half, meta: CpMeta, ops: SnapshotOp[], placed: ReadonlyMap<number, number> | undefined, onCommitted: (r: CommitResult) => void,
): Promise<HalfCommitResult> {
  const blocks = half.index.blocks;
  const out: HalfCommitResult = { commits: [], blocksWritten: 0, blocksFreed: 0 };
  let chunk: BlockChange[] = [];
  const chunkNodes = new Set<number>();
  const generation = half.generation;
  /** Adds a change; true when the chunk is full and must be committed. */
  const add = (c: BlockChange): boolean => {
    chunk.push(c);
    chunkNodes.add(Math.floor(c.lbn / FANOUT));
    return chunk.length >= CHUNK_CHANGES_MAX || chunkNodes.size >= CHUNK_NODES_MAX;
  };

  const commit = async (final: boolean): Promise<void> => {
    chunk.sort((a, b) => a.lbn - b.lbn);
    const m = final ? meta : tree.stats().meta;
    const r = await tree.commitCp(chunk, m, final ? ops : []);
    assert(half.generation === generation, 'half was released during its CP');
    out.commits.push(r);
    onCommitted(r);
    out.blocksWritten += r.blocksWritten;
    out.blocksFreed += r.blocksFreed;
    chunk = [];
    chunkNodes.clear();
  };

  // Holes: the merged zero ranges, restricted to what the tree holds and the half did not rewrite.
  for (const range of half.index.mergedZeroRanges()) {
    let lbn = range.startLbn;
    while (lbn < range.endLbn) {
      const count = Math.min(range.endLbn - lbn, STATUS_QUERY_BLOCKS);
      const extents = await tree.blockStatus(lbn, count, STATUS_QUERY_EXTENTS);
      assert(extents.length > 0, 'tree.blockStatus returned no extent');
      for (const e of extents) {
        assert(e.lengthBytes > 0 && e.lengthBytes % 4096 === 0, `tree extent of ${e.lengthBytes} bytes`);
        const n = e.lengthBytes / 4096;
        assert(lbn + n <= range.endLbn, 'tree extent beyond the query');
        if ((e.flags & EXTENT_HOLE) === 0) {
          for (let i = 0; i < n; i++) {
            if (blocks.has(lbn + i)) continue;
            if (add({ lbn: lbn + i, data: null })) await commit(false);
          }
        }
        lbn += n;
      }
    }
  }
  // ~1 us per block: a 32 MiB half is 8192 of them, so the loop yields (the half is frozen:
  // its index does not change while the loop waits).
  const slicer = slicerFor(tree.clock);
  let n = 0;
  for (const [lbn, regionOffset] of blocks) {
    if ((++n & 63) === 0) await slicer.maybeYield();
    const early = placed?.get(regionOffset);
    if (add({ lbn, data: log.blockView(regionOffset), origin: log.originOf(half, regionOffset), crc: half.blockCrc(regionOffset), early })) await commit(false);
  }
  await commit(true);
  return out;
}
