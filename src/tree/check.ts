/**
 * check(): a full, read-only walk of every root (live tree and each snapshot), straight
 * from the device (no cache), verifying every address block (checksum and header),
 * every data block's checksum, every space-map block, and that space accounting matches
 * reachability exactly:
 * - the live space map == ring + live data tree + live space-map tree;
 * - each snapshot's space map == ring + its data tree + its space-map tree;
 * - the in-memory maps equal what is on disk (active; summary == OR of snapshot maps).
 * Blocks freed by recent CPs but not yet reusable are free on disk and are not expected
 * anywhere. Problems name blocks (pba) and, for data, lbns.
 *
 * Invariants:
 * - Memory: a few bitmaps of one bit per device block, plus one L0 node's data run at a
 *   time per I/O slot. Problems are capped at MAX_PROBLEMS lines (plus a count).
 * - Within one tree (data tree + its space-map tree) no block is referenced twice.
 * - A child's birth CP never exceeds its parent's, nor the root's CP.
 * - The lineage is valid, and every older CP of this volume left in the superblock ring
 *   is on its line (same generation at that CP): the ring holds one history.
 * - A walk cut short (an address or space-map block that cannot be read or verified) is
 *   one problem: the comparisons it leaves meaningless (blocks below it "leaked", a lost
 *   space map's "free" blocks, the accounting totals) are said as not checked, if at all.
 * - A block that fails verification on a device with redundancy (RAID: readRepaired) is
 *   a problem only if no rebuilt version verifies (the device counts and, when writable,
 *   heals the bad copy: a check of a served RAID volume repairs what it reads).
 */
import type { BlockDevice, Clock } from '../io/types';
import { clearBit, orInto, popcount, setBit, testBit } from '../util/bitmap';
import { crc32c } from '../io/checksum';
import {
  BITS_PER_LEAF, BLOCK, BlockPtr, FANOUT, NODE_TYPE_DATA_TREE, NODE_TYPE_SPACE_MAP, RING_SLOTS, Superblock, decodePtr,
  decodeSuperblock, heightFor, ptrSlotOffset, slotsPerPointer, verifyNode,
} from './layout';
import { SpaceMap } from './spacemap';
import { generationAt, lineageProblem, lineageString } from './lineage';
import type { CheckReport, RepairSource } from './types';
import { repairFromSource } from './verified-read';
import { slicerFor, forEachLimit } from '../util/work';

const MAX_PROBLEMS = 200;
const MAX_READ_RUN = 64;

export interface CheckInput {
  dev: BlockDevice;
  sb: Superblock;
  uuid: Buffer;
  active: Buffer;
  summary: Buffer;
  used: number;
  counterProblems: string[];
  ioConcurrency: number;
  /** What CPU slices are measured on (slicerFor); wall time without one. */
  clock?: Clock;
  /** Progress: called with the running count of blocks read (no more than once per read). */
  onBlocksRead?: (blocks: number) => void;
  /** Where a block that fails verification is fetched again after the device's own redundancy (a mirror: verified-read.ts). */
  repair?: { source: RepairSource; mayHeal: boolean; volumeUuid: string; onRepaired: () => void };
}

/** One root's walk: what it reached, its space map as read, and the blocks whose subtrees it could not walk. */
interface Walk {
  reach: Buffer;
  map: Buffer;
  treeCut: number;
  mapCut: number;
}

export async function runCheck(input: CheckInput): Promise<CheckReport> {
  const { dev, sb, uuid } = input;
  const problems: string[] = [];
  let dropped = 0;
  const problem = (s: string): void => {
    if (problems.length < MAX_PROBLEMS) problems.push(s);
    else dropped++;
  };
  for (const p of input.counterProblems) problem(p);
  const deviceBlocks = sb.deviceBlocks;
  const mapBytes = input.active.length;
  const leafCount = Math.ceil(deviceBlocks / BITS_PER_LEAF);
  const smapHeight = heightFor(leafCount);
  const lbnCount = sb.sizeBytes / BLOCK;
  const union = Buffer.alloc(mapBytes);
  const dataVerified = Buffer.alloc(mapBytes);
  const slicer = slicerFor(input.clock);

  /** Reads blocks; a device error becomes a problem line and null. */
  let blocksRead = 0;
  const readBlocks = async (pba: number, count: number, what: string): Promise<Buffer | null> => {
    const b = Buffer.alloc(count * BLOCK);
    try {
      await dev.readBlocks(pba, count, b);
      blocksRead += count;
      input.onBlocksRead?.(blocksRead);
      return b;
    } catch (e) {
      problem(`device read of ${what} at pba ${pba} failed: ${e instanceof Error ? e.message : String(e)}`);
      return null;
    }
  };

  /** A block that failed verification: a device with redundancy (RAID) may rebuild one that verifies (and heal its bad copy). */
  let repairedFromSource = 0;
  const repaired = async (pba: number, view: Buffer, ok: (b: Buffer) => boolean): Promise<boolean> => {
    if (dev.readRepaired && (await dev.readRepaired(pba, view, ok).catch(() => false))) return true;
    const r = input.repair;
    if (!r || !(await repairFromSource(r.source, dev, pba, view, ok, r.mayHeal, r.volumeUuid))) return false;
    repairedFromSource++;
    r.onRepaired();
    return true;
  };

  /** Walks one root: data tree + space-map tree; returns reachable set and on-disk map. */
  const walkRoot = async (label: string, cp: number, root: BlockPtr | null, smapRoot: BlockPtr): Promise<Walk> => {
    const reach = Buffer.alloc(mapBytes);
    const map = Buffer.alloc(mapBytes);
    // Address / space-map blocks that could not be read or verified: what lies below them was not walked.
    let treeCut = 0;
    let mapCut = 0;
    for (let p = 0; p < RING_SLOTS; p++) setBit(reach, p);
    const mark = (p: BlockPtr, what: string): boolean => {
      if (testBit(reach, p.pba)) {
        problem(`${label}: pba ${p.pba} (${what}) is referenced more than once`);
        return false;
      }
      setBit(reach, p.pba);
      return true;
    };
    const decodeAt = (node: Buffer, nodePtr: BlockPtr, slot: number, what: string): BlockPtr | null => {
      const c = decodePtr(node, ptrSlotOffset(slot), deviceBlocks);
      if (typeof c === 'string') {
        problem(`${label}: ${what} at pba ${nodePtr.pba} slot ${slot}: ${c}`);
        return null;
      }
      if (c && c.birth > nodePtr.birth) {
        problem(`${label}: ${what} at pba ${nodePtr.pba} slot ${slot} points at pba ${c.pba} born at CP ${c.birth}, after its parent (CP ${nodePtr.birth})`);
        return null;
      }
      return c;
    };
    // Data tree.
    const dataRec = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
      const lo = index * slotsPerPointer(level + 1);
      const what = `address block level ${level} (lbns ${lo}-${Math.min(lbnCount, lo + slotsPerPointer(level + 1)) - 1})`;
      if (!mark(ptr, what)) return;
      const node = await readBlocks(ptr.pba, 1, `${label}: ${what}`);
      if (!node) {
        treeCut++;
        return;
      }
      const id = { type: NODE_TYPE_DATA_TREE, level, index };
      const bad = verifyNode(node, ptr, id, uuid);
      if (bad && !(await repaired(ptr.pba, node, (b) => verifyNode(b, ptr, id, uuid) === null))) {
        problem(`${label}: ${what} at pba ${ptr.pba}: ${bad}`);
        treeCut++;
        return;
      }
      if (level > 0) {
        for (let s = 0; s < FANOUT; s++) {
          const ci = index * FANOUT + s;
          const c = decodeAt(node, ptr, s, what);
          if (!c) continue;
          if (ci * slotsPerPointer(level) >= lbnCount) {
            problem(`${label}: ${what} at pba ${ptr.pba} slot ${s} points past the end of the volume`);
            continue;
          }
          await dataRec(c, level - 1, ci);
        }
        return;
      }
      // Level 0: collect data pointers, read them in contiguous runs, verify each.
      const runs: { lbn: number; ptrs: BlockPtr[] }[] = [];
      for (let s = 0; s < FANOUT; s++) {
        const lbn = lo + s;
        const c = decodeAt(node, ptr, s, what);
        if (!c) continue;
        if (lbn >= lbnCount) {
          problem(`${label}: ${what} at pba ${ptr.pba} slot ${s} maps lbn ${lbn} past the end of the volume`);
          continue;
        }
        if (!mark(c, `data block lbn ${lbn}`)) continue;
        if (testBit(dataVerified, c.pba)) continue;
        setBit(dataVerified, c.pba);
        const last = runs[runs.length - 1];
        const prev = last?.ptrs[last.ptrs.length - 1];
        if (last && prev && prev.pba + 1 === c.pba && last.lbn + last.ptrs.length === lbn && last.ptrs.length < MAX_READ_RUN) last.ptrs.push(c);
        else runs.push({ lbn, ptrs: [c] });
      }
      await forEachLimit(runs, input.ioConcurrency, async (r) => {
        const buf = await readBlocks(r.ptrs[0]!.pba, r.ptrs.length, `${label}: data blocks lbn ${r.lbn}-${r.lbn + r.ptrs.length - 1}`);
        if (!buf) return;
        for (let i = 0; i < r.ptrs.length; i++) {
          const p = r.ptrs[i]!;
          const crc = crc32c(buf, i * BLOCK, BLOCK);
          if (crc !== p.crc && !(await repaired(p.pba, buf.subarray(i * BLOCK, (i + 1) * BLOCK), (b) => crc32c(b) === p.crc))) {
            problem(`${label}: data block lbn ${r.lbn + i} at pba ${p.pba}: checksum mismatch (expected ${p.crc.toString(16).padStart(8, '0')}, got ${crc.toString(16).padStart(8, '0')})`);
            clearBit(dataVerified, p.pba);
          }
        }
      });
      await slicer.maybeYield();
    };
    if (root) {
      if (root.birth > cp) problem(`${label}: root pba ${root.pba} born at CP ${root.birth}, after its CP ${cp}`);
      await dataRec(root, sb.treeHeight - 1, 0);
    }
    // Space-map tree.
    const smapRec = async (ptr: BlockPtr, level: number, index: number): Promise<void> => {
      const what = `space-map node level ${level} index ${index}`;
      if (!mark(ptr, what)) return;
      const node = await readBlocks(ptr.pba, 1, `${label}: ${what}`);
      if (!node) {
        mapCut++;
        return;
      }
      const id = { type: NODE_TYPE_SPACE_MAP, level, index };
      const bad = verifyNode(node, ptr, id, uuid);
      if (bad && !(await repaired(ptr.pba, node, (b) => verifyNode(b, ptr, id, uuid) === null))) {
        problem(`${label}: ${what} at pba ${ptr.pba}: ${bad}`);
        mapCut++;
        return;
      }
      const childCount = level === 0 ? leafCount : Math.ceil(leafCount / slotsPerPointer(level));
      for (let s = 0; s < FANOUT; s++) {
        const ci = index * FANOUT + s;
        const c = decodeAt(node, ptr, s, what);
        if (!c) continue;
        if (ci >= childCount) {
          problem(`${label}: ${what} at pba ${ptr.pba} slot ${s} points past the space map`);
          continue;
        }
        if (level > 0) {
          await smapRec(c, level - 1, ci);
          continue;
        }
        if (!mark(c, `space-map leaf ${ci}`)) continue;
        const leaf = await readBlocks(c.pba, 1, `${label}: space-map leaf ${ci}`);
        if (!leaf) {
          mapCut++;
          continue;
        }
        const crc = crc32c(leaf);
        if (crc !== c.crc && !(await repaired(c.pba, leaf, (b) => crc32c(b) === c.crc))) {
          problem(`${label}: space-map leaf ${ci} at pba ${c.pba}: checksum mismatch`);
          mapCut++;
          continue;
        }
        const end = Math.min(mapBytes, (ci + 1) * BLOCK);
        leaf.copy(map, ci * BLOCK, 0, end - ci * BLOCK);
      }
    };
    if (smapRoot.birth > cp) problem(`${label}: space-map root pba ${smapRoot.pba} born at CP ${smapRoot.birth}, after its CP ${cp}`);
    await smapRec(smapRoot, smapHeight - 1, 0);
    for (let p = deviceBlocks; p < mapBytes * 8; p++) {
      if (testBit(map, p)) {
        problem(`${label}: space map marks pba ${p} past the end of the device`);
        break;
      }
    }
    return { reach, map, treeCut, mapCut };
  };

  // A walk cut short by an unreadable block leaves the comparisons below it meaningless
  // (blocks below it would read as "leaked", a lost space-map block as everything free):
  // each is said once as not compared, never as a second problem of its own.
  const compare = (label: string, w: Walk): void => {
    if (w.mapCut > 0) {
      problem(`${label}: space map not compared with the tree (${w.mapCut} block(s) of it could not be read)`);
      return;
    }
    const leaked = SpaceMap.difference(w.map, w.reach, 10);
    if (leaked.count > 0 && w.treeCut > 0) problem(`${label}: ${leaked.count} blocks in use lie below the ${w.treeCut} address block(s) that could not be read (not checked), e.g. pba ${leaked.sample.join(', ')}`);
    else if (leaked.count > 0) problem(`${label}: ${leaked.count} blocks marked in use but unreachable (leaked), e.g. pba ${leaked.sample.join(', ')}`);
    const lost = SpaceMap.difference(w.reach, w.map, 10);
    if (lost.count > 0) problem(`${label}: ${lost.count} reachable blocks marked free in the space map, e.g. pba ${lost.sample.join(', ')}`);
  };

  const live = await walkRoot('live tree', sb.cpNumber, sb.root, sb.smapRoot);
  compare('live tree', live);
  let cut = live.treeCut + live.mapCut;
  if (live.mapCut === 0 && !live.map.equals(input.active)) {
    const a = SpaceMap.difference(input.active, live.map, 10);
    const b = SpaceMap.difference(live.map, input.active, 10);
    problem(`space map in memory differs from disk: ${a.count} blocks only in memory (e.g. ${a.sample.join(', ')}), ${b.count} only on disk (e.g. ${b.sample.join(', ')})`);
  }
  orInto(union, live.reach);
  const snapUnion = Buffer.alloc(mapBytes);
  for (const s of sb.snapshots) {
    const label = `snapshot ${s.name}`;
    const r = await walkRoot(label, s.cp, s.root, s.smapRoot);
    compare(label, r);
    cut += r.treeCut + r.mapCut;
    orInto(union, r.reach);
    orInto(snapUnion, r.map);
  }
  if (cut === 0 && !snapUnion.equals(input.summary)) {
    const a = SpaceMap.difference(input.summary, snapUnion, 10);
    const b = SpaceMap.difference(snapUnion, input.summary, 10);
    problem(`snapshot summary in memory differs from the snapshots' maps: ${a.count} blocks only in memory (e.g. ${a.sample.join(', ')}), ${b.count} only on disk (e.g. ${b.sample.join(', ')})`);
  }
  await checkLineage(dev, sb, problem);
  const blocksReachable = popcount(union);
  if (cut === 0 && blocksReachable !== input.used) problem(`space accounting: ${blocksReachable} blocks reachable from all roots but ${input.used} counted in use`);
  if (dropped > 0) problems.push(`... and ${dropped} more problems`);
  return { ok: problems.length === 0, problems, blocksReachable, blocksAccounted: input.used, ...(repairedFromSource > 0 ? { repaired: repairedFromSource } : {}) };
}

/** The committed lineage is valid and every older CP of this volume in the ring lies on it. */
async function checkLineage(dev: BlockDevice, sb: Superblock, problem: (s: string) => void): Promise<void> {
  const lp = lineageProblem(sb.lineage, sb.cpNumber);
  if (lp !== null) {
    problem(`CP ${sb.cpNumber}: ${lp}`);
    return;
  }
  const ring = Buffer.alloc(RING_SLOTS * BLOCK);
  try {
    await dev.readBlocks(0, RING_SLOTS, ring);
  } catch (e) {
    problem(`device read of the superblock ring failed: ${e instanceof Error ? e.message : String(e)}`);
    return;
  }
  for (let s = 0; s < RING_SLOTS; s++) {
    const d = decodeSuperblock(ring.subarray(s * BLOCK, (s + 1) * BLOCK));
    if (typeof d === 'string' || d.volumeUuid !== sb.volumeUuid || d.cpNumber >= sb.cpNumber) continue;
    const mine = generationAt(sb.lineage, sb.cpNumber, d.cpNumber);
    const theirs = generationAt(d.lineage, d.cpNumber, d.cpNumber);
    if (mine !== undefined && mine !== theirs) {
      problem(`lineage: CP ${d.cpNumber} in ring slot ${s} is of generation ${theirs ?? '?'} (${lineageString(d.lineage)}), not of this volume's ${mine} (${lineageString(sb.lineage)})`);
    }
  }
}
