/**
 * Every device read of an open tree, verified: data-tree address blocks (readNode, with
 * the node cache), the pointers in them (childOf), data blocks (verifyData) and the
 * space-map blocks of older CPs and snapshots (smapLoader). A refused read is a
 * VolumeError('EIO') counted in the tree's `errorCounts` (eio).
 *
 * Invariants:
 * - A committed root never points at a block written in a later CP: a child's birth CP is
 *   at most its parent's, which is at most the root's CP (checked on every read).
 * - Every block read is verified: address blocks by the parent's crc32c and their header
 *   (magic, type, level, own pba, birth, volume, index), data blocks by the parent's
 *   crc32c. A mismatch is a VolumeError('EIO'), an error log line and one more in
 *   `errorCounts.checksum` (a failed device read: `errorCounts.io`); wrong data is never
 *   returned. The counts only grow while the tree is open (`status` reports them). A
 *   device with redundancy (RAID: `readRepaired`) is first asked for a version that
 *   verifies (self-heal), then the repair source if one is attached (a mirror holding the
 *   same block at the same pba: `repairFromSource`, counted in `errorCounts.repaired`);
 *   only if neither has one is the read refused. Another copy is taken only if it
 *   verifies against the same pointer, and then rewritten over the bad one.
 */
import { READ_BATCH_MAX, type BlockDevice } from '../io/types';
import { VolumeError } from '../util/errors';
import { log } from '../util/log';
import { crc32c } from '../io/checksum';
import { LogBurst } from '../util/log-burst';
import {
  BLOCK, BlockPtr, NODE_TYPE_DATA_TREE, NodeId, decodePtr, ptrSlotOffset, slotsPerPointer, verifyNode,
} from './layout';
import type { NodeCache } from './node-cache';
import type { SpaceMapLoader } from './spacemap';
import type { BlockErrorCounts, RepairSource } from './types';

/**
 * A block failed verification: a device with redundancy (RAID) may rebuild a version
 * that passes `ok` (self-heal; it rewrites its bad copy and counts it). Writes it into
 * buf and returns true; false if the device cannot (then the read fails as before).
 */
export async function repairedRead(dev: BlockDevice, pba: number, buf: Buffer, ok: (b: Buffer) => boolean): Promise<boolean> {
  if (!dev.readRepaired) return false;
  try {
    return await dev.readRepaired(pba, buf, ok);
  } catch (e) {
    log().warn({ pba, err: e instanceof Error ? e.message : String(e) }, 'block tree: the device could not rebuild a block that failed verification');
    return false;
  }
}

/**
 * A block at pba failed verification and the device could not rebuild it: asks `src`
 * (a mirror) for its copy, takes it only if it passes ok, writes it into buf and (mayHeal)
 * over the bad copy. Called inside a read or a check, which pins the root it reads
 * through: the block stays referenced (never reused) while it is rewritten, and the
 * rewrite puts back what the tree already says it holds. False: no copy that verifies.
 */
/** Repairs of a damaged region come block by block: examples and a count in the log (status counts them all). */
const repairedLog = new LogBurst((n, ms) => log().warn({ blocks: n }, `block tree: ${n} more block(s) failed verification within ${ms / 1000} s and were served from the repair source (one line each left out; status counts them)`));
const unrepairedLog = new LogBurst((n, ms) => log().warn({ blocks: n }, `block tree: ${n} more block(s) failed verification within ${ms / 1000} s and the repair source could not give a copy that verifies (one line each left out)`));

export async function repairFromSource(src: RepairSource, dev: BlockDevice, pba: number, buf: Buffer, ok: (b: Buffer) => boolean, mayHeal: boolean, volumeUuid: string): Promise<boolean> {
  let copy: Buffer;
  try {
    copy = await src.read(pba);
  } catch (e) {
    if (unrepairedLog.take()) log().warn({ volume: volumeUuid, pba, from: src.name, err: e instanceof Error ? e.message : String(e) }, 'block tree: a block failed verification and could not be read from the repair source');
    return false;
  }
  if (copy.length !== BLOCK || !ok(copy)) {
    if (unrepairedLog.take()) log().warn({ volume: volumeUuid, pba, from: src.name }, 'block tree: a block failed verification and the repair source\'s copy does not verify either');
    return false;
  }
  copy.copy(buf);
  src.repaired?.(pba, copy);
  let rewritten = false;
  if (mayHeal) {
    try {
      await dev.writeBlocks(pba, copy);
      rewritten = true;
    } catch (e) {
      log().warn({ volume: volumeUuid, pba, err: e instanceof Error ? e.message : String(e) }, 'block tree: could not rewrite a repaired block (the next read repairs it again)');
    }
  }
  if (repairedLog.take()) log().warn({ volume: volumeUuid, pba, from: src.name, rewritten }, `block tree: block at pba ${pba} failed verification; served the copy from ${src.name}, which verifies${rewritten ? ', and rewrote ours' : ''}`);
  return true;
}

export class VerifiedReader {
  /** Set while a repair source is attached (BlockTree.setRepairSource). */
  repairSource: RepairSource | undefined;
  /** The device may be written (a bad copy rewritten); false for a read-only open. */
  mayHeal = true;

  constructor(
    private readonly dev: BlockDevice,
    private readonly cache: NodeCache,
    private readonly uuidBytes: Buffer,
    private readonly volumeUuid: string,
    private readonly lbnCount: number,
    private readonly deviceBlocks: number,
    /** The tree's counters (BlockTree.errorCounts), incremented here. */
    private readonly errorCounts: BlockErrorCounts,
  ) {}

  /**
   * A block at pba failed verification: the device's redundancy first (RAID), then the
   * repair source. True when buf now holds a copy that passes ok. Called inside a read,
   * which pins the root it reads through: the block stays referenced (never reused)
   * while it is rewritten, and the rewrite puts back what the tree already says it holds.
   */
  private async repair(pba: number, buf: Buffer, ok: (b: Buffer) => boolean): Promise<boolean> {
    if (await repairedRead(this.dev, pba, buf, ok)) return true;
    if (!this.repairSource || !(await repairFromSource(this.repairSource, this.dev, pba, buf, ok, this.mayHeal, this.volumeUuid))) return false;
    this.errorCounts.repaired++;
    return true;
  }

  eio(message: string, fields: Record<string, unknown>, kind: 'checksum' | 'io' = 'checksum'): VolumeError {
    this.errorCounts[kind]++;
    log().error({ ...fields, volume: this.volumeUuid }, `block tree: ${message}`);
    return new VolumeError('EIO', message);
  }

  private nodeRange(level: number, index: number): string {
    const span = slotsPerPointer(level + 1);
    const lo = index * span;
    const hi = Math.min(this.lbnCount, lo + span) - 1;
    return `lbns ${lo}-${hi}`;
  }

  /** Reads from the device; a device error becomes VolumeError('EIO') naming what was read. */
  async devRead(pba: number, count: number, dst: Buffer, what: string): Promise<void> {
    try {
      await this.dev.readBlocks(pba, count, dst);
    } catch (e) {
      throw this.eio(`device read of ${what} at pba ${pba} failed: ${e instanceof Error ? e.message : String(e)}`, { pba, count }, 'io');
    }
  }

  /**
   * devRead of adjacent data blocks (ptrs in pba order). With a repair source, a device
   * error is retried block by block and a block the device cannot read is taken from the
   * source if its copy matches the pointer's crc32c (and rewritten: a bad sector is
   * usually remapped on write). The caller still verifies every block.
   */
  async readData(ptrs: readonly BlockPtr[], dst: Buffer, what: string): Promise<void> {
    if (!this.repairSource) return this.devRead(ptrs[0]!.pba, ptrs.length, dst, what);
    try {
      await this.dev.readBlocks(ptrs[0]!.pba, ptrs.length, dst);
      return;
    } catch {
      /* which block: one at a time below */
    }
    for (let i = 0; i < ptrs.length; i++) {
      const p = ptrs[i]!;
      await this.readOrRepair(p.pba, dst.subarray(i * BLOCK, (i + 1) * BLOCK), what, (b) => crc32c(b) === p.crc);
    }
  }

  /** One block from the device, or, when the device read fails, a copy from the repair source that passes ok. */
  private async readOrRepair(pba: number, buf: Buffer, what: string, ok: (b: Buffer) => boolean): Promise<void> {
    try {
      await this.dev.readBlocks(pba, 1, buf);
    } catch (e) {
      if (this.repairSource && (await repairFromSource(this.repairSource, this.dev, pba, buf, ok, this.mayHeal, this.volumeUuid))) {
        this.errorCounts.repaired++;
        return;
      }
      throw this.eio(`device read of ${what} at pba ${pba} failed: ${e instanceof Error ? e.message : String(e)}`, { pba, count: 1 }, 'io');
    }
  }

  /**
   * Reads (or finds in the cache) and verifies a data-tree address block. The buffer may be
   * the cache's: read only. lend false: a CP's own read whose caller does not keep the
   * buffer past its synchronous use (a cached buffer stays not lent: NodeCache.takeForEdit).
   */
  async readNode(ptr: BlockPtr, level: number, index: number, cacheIt = true, lend = true): Promise<Buffer> {
    const hit = lend ? this.cache.get(ptr) : this.cache.getForEdit(ptr);
    if (hit) return hit;
    const buf = await this.readUncached(ptr, level, index);
    if (cacheIt) this.cache.put(ptr, buf, true);
    return buf;
  }

  /** Reads and verifies a data-tree address block from the device into a new buffer (the caller's). */
  private async readUncached(ptr: BlockPtr, level: number, index: number): Promise<Buffer> {
    const buf = Buffer.alloc(BLOCK);
    const id = { type: NODE_TYPE_DATA_TREE, level, index };
    await this.readOrRepair(ptr.pba, buf, `address block (level ${level}, ${this.nodeRange(level, index)})`, (b) => verifyNode(b, ptr, id, this.uuidBytes) === null);
    const problem = verifyNode(buf, ptr, id, this.uuidBytes);
    if (problem && !(await this.repair(ptr.pba, buf, (b) => verifyNode(b, ptr, id, this.uuidBytes) === null))) {
      throw this.eio(`bad address block at pba ${ptr.pba} (level ${level}, ${this.nodeRange(level, index)}): ${problem}`, { pba: ptr.pba, level, index });
    }
    return buf;
  }

  /**
   * The address blocks a CP is about to rewrite (null entries: none), verified as readNode
   * does and not cached: from the cache where it has them (its buffers: copy before
   * changing), the rest read in one batch off the event loop when the device can
   * (readBlocksBatchCrc), else one by one. `cached[j]` says whether out[j] is the
   * cache's (not lent: NodeCache.takeForEdit says whether the CP may change it, else it
   * copies); every other returned buffer is the caller's.
   */
  async readNodesForEdit(ptrs: readonly (BlockPtr | null)[], level: number, indexes: readonly number[]): Promise<{ out: (Buffer | null)[]; cached: boolean[] }> {
    const out: (Buffer | null)[] = new Array<Buffer | null>(ptrs.length).fill(null);
    const cached: boolean[] = new Array<boolean>(ptrs.length).fill(false);
    const miss: number[] = [];
    for (let j = 0; j < ptrs.length; j++) {
      const p = ptrs[j];
      if (!p) continue;
      const hit = this.cache.getForEdit(p);
      if (hit) {
        out[j] = hit;
        cached[j] = true;
      } else miss.push(j);
    }
    if (miss.length === 0) return { out, cached };
    if (!this.dev.readBlocksBatchCrc) {
      for (const j of miss) out[j] = await this.readUncached(ptrs[j]!, level, indexes[j]!);
      return { out, cached };
    }
    for (let at = 0; at < miss.length; at += READ_BATCH_MAX) {
      const js = miss.slice(at, at + READ_BATCH_MAX);
      const bufs = js.map(() => Buffer.allocUnsafe(BLOCK));
      const crcs = new Uint32Array(js.length);
      try {
        await this.dev.readBlocksBatchCrc(js.map((j) => ptrs[j]!.pba), bufs, crcs);
      } catch (e) {
        // One at a time, each repairable from the repair source (readUncached).
        if (this.repairSource) {
          for (const j of js) out[j] = await this.readUncached(ptrs[j]!, level, indexes[j]!);
          continue;
        }
        const pbas = js.map((j) => ptrs[j]!.pba);
        throw this.eio(`device read of ${js.length} address blocks (level ${level}, pbas ${pbas[0]}..${pbas[pbas.length - 1]}) failed: ${e instanceof Error ? e.message : String(e)}`, { level, count: js.length }, 'io');
      }
      for (let k = 0; k < js.length; k++) {
        const j = js[k]!;
        const ptr = ptrs[j]!;
        const buf = bufs[k]!;
        const id = { type: NODE_TYPE_DATA_TREE, level, index: indexes[j]! };
        const problem = verifyNode(buf, ptr, id, this.uuidBytes, crcs[k]!);
        if (problem && !(await this.repair(ptr.pba, buf, (b) => verifyNode(b, ptr, id, this.uuidBytes) === null))) {
          throw this.eio(`bad address block at pba ${ptr.pba} (level ${level}, ${this.nodeRange(level, indexes[j]!)}): ${problem}`, { pba: ptr.pba, level, index: indexes[j] });
        }
        out[j] = buf;
      }
    }
    return { out, cached };
  }

  childOf(node: Buffer, parent: BlockPtr, level: number, index: number, slot: number): BlockPtr | null {
    const p = decodePtr(node, ptrSlotOffset(slot), this.deviceBlocks);
    if (typeof p === 'string') throw this.eio(`bad pointer in address block at pba ${parent.pba} (level ${level}, ${this.nodeRange(level, index)}) slot ${slot}: ${p}`, { pba: parent.pba, level, index, slot });
    if (p !== null && p.birth > parent.birth) {
      throw this.eio(`pointer in address block at pba ${parent.pba} slot ${slot} is born at CP ${p.birth}, after its parent (CP ${parent.birth})`, { pba: parent.pba, slot });
    }
    return p;
  }

  async verifyData(buf: Buffer, off: number, ptr: BlockPtr, lbn: number): Promise<void> {
    const crc = crc32c(buf, off, BLOCK);
    if (crc !== ptr.crc && !(await this.repair(ptr.pba, buf.subarray(off, off + BLOCK), (b) => crc32c(b) === ptr.crc))) {
      throw this.eio(`checksum mismatch in data block: lbn ${lbn} at pba ${ptr.pba} (expected ${ptr.crc.toString(16).padStart(8, '0')}, got ${crc.toString(16).padStart(8, '0')})`, { lbn, pba: ptr.pba });
    }
  }

  /** Reads the space-map trees of older CPs or snapshots (`what` names them in errors). */
  smapLoader(what: string): SpaceMapLoader {
    const deviceBlocks = this.deviceBlocks;
    const read = async (ptr: BlockPtr, name: string, id: NodeId | null): Promise<Buffer> => {
      const buf = Buffer.alloc(BLOCK);
      const ok = (b: Buffer): boolean => (id ? verifyNode(b, ptr, id, this.uuidBytes) === null : crc32c(b) === ptr.crc);
      await this.readOrRepair(ptr.pba, buf, name, ok);
      const problem = id ? verifyNode(buf, ptr, id, this.uuidBytes) : crc32c(buf) === ptr.crc ? null : 'checksum mismatch';
      if (problem && !(await this.repair(ptr.pba, buf, ok))) throw this.eio(`${name} at pba ${ptr.pba}: ${problem}`, { pba: ptr.pba });
      return buf;
    };
    return {
      readNode: (ptr, id) => read(ptr, `${what} space-map node level ${id.level} index ${id.index}`, id),
      readLeaf: (ptr, i) => read(ptr, `${what} space-map leaf ${i}`, null),
      decodeChild: (node, slot, name) => {
        const p = decodePtr(node, ptrSlotOffset(slot), deviceBlocks);
        if (typeof p === 'string') throw this.eio(`${name}: ${p}`, {});
        return p;
      },
    };
  }
}
