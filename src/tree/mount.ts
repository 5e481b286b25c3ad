/**
 * Format and mount: writing an empty volume (CP 0), choosing the superblock to mount from
 * the 8-slot ring, and verifying what a superblock references before the tree
 * (BlockTree.open / openView) is built on it.
 *
 * Invariants:
 * - open mounts the newest superblock whose checksum, root blocks and space map verify;
 *   one that does not verify is read a second time before an older CP is tried, and a
 *   mount that falls back past a newer durable CP says so (TreeRollback).
 * - A failed device read (DeviceReadError) is never taken for corruption: it fails the
 *   open instead of rolling back to an older CP, which would lose committed data.
 * - Only superblocks of the newest one's format (volume UUID, device and volume size)
 *   are candidates; a slot holds only CPs n with n % 8 equal to the slot.
 * - A root block's birth CP is at most its superblock's (or snapshot's) CP.
 */
import type { BlockDevice, Clock } from '../io/types';
import { systemClock } from '../io/types';
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { log } from '../util/log';
import { crc32c } from '../io/checksum';
import {
  BLOCK, BlockPtr, MAX_DEVICE_BLOCKS, MAX_VOLUME_BYTES, MIN_DEVICE_BLOCKS, NODE_TYPE_DATA_TREE, NodeId, RING_SLOTS, Superblock,
  decodePtr, decodeSuperblock, encodeSuperblock, heightFor, ptrSlotOffset, verifyNode,
} from './layout';
import { uuidToBytes } from '../util/bytes';
import { rootGeneration } from './lineage';
import { SpaceMap, SpaceMapLoader } from './spacemap';
import type { TreeRollback } from './types';
import { repairedRead } from './verified-read';

export interface FormatOptions {
  /** Logical size of the volume; a positive multiple of 4096, at most 2^50. */
  sizeBytes: number;
  /** The volume's UUID (8-4-4-4-12 hex); stamped into every metadata block. */
  volumeUuid: string;
  clock?: Clock;
}

/** The device's allocation unit (a RAID stripe's data blocks; 1 for a plain device). */
export function allocUnitOf(dev: BlockDevice): number {
  const u = dev.allocUnitBlocks ?? 1;
  assert(Number.isSafeInteger(u) && u >= 1, `device allocation unit ${u}`);
  return u;
}

/** The device failed a read during mount (as opposed to data that does not verify). */
class DeviceReadError extends Error {
  override name = 'DeviceReadError';
}

/** Writes an empty volume (CP 0) onto dev; every superblock slot but the first is zeroed. */
export async function formatVolume(dev: BlockDevice, opts: FormatOptions): Promise<void> {
  const { sizeBytes } = opts;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % BLOCK !== 0) throw new Error(`bad volume size ${sizeBytes}: must be a positive multiple of ${BLOCK} bytes`);
  if (sizeBytes > MAX_VOLUME_BYTES) throw new Error(`volume size ${sizeBytes} exceeds the maximum of ${MAX_VOLUME_BYTES} bytes`);
  const uuid = uuidToBytes(opts.volumeUuid);
  if (dev.blockCount < MIN_DEVICE_BLOCKS) throw new Error(`device too small: ${dev.blockCount} blocks of 4 KiB, need at least ${MIN_DEVICE_BLOCKS}`);
  const clock = opts.clock ?? systemClock;
  const deviceBlocks = Math.min(dev.blockCount, MAX_DEVICE_BLOCKS);
  const smap = SpaceMap.createEmpty(deviceBlocks, allocUnitOf(dev));
  const blocks = smap.buildCommit(0, uuid);
  for (const b of blocks) await dev.writeBlocks(b.pba, b.buf);
  await dev.sync();
  const sb: Superblock = {
    volumeUuid: opts.volumeUuid.toLowerCase(), sizeBytes, deviceBlocks, cpNumber: 0, timestampMs: Math.max(0, Math.floor(clock.nowMs())),
    lastCpDurationMs: 0, nvlogSeq: 0, nvlogEpoch: 0, treeHeight: heightFor(sizeBytes / BLOCK), smapHeight: smap.height,
    root: null, smapRoot: smap.root, usedBlocks: smap.used, snapshots: [], lineage: [rootGeneration(opts.volumeUuid)],
  };
  const ring = Buffer.alloc(RING_SLOTS * BLOCK);
  encodeSuperblock(sb).copy(ring, 0);
  await dev.writeBlocks(0, ring);
  await dev.sync();
}

/**
 * Reads the superblock ring and mounts (with `mount`) the newest superblock that
 * verifies, newest first; sets `rollback` on the result when that is not the newest.
 */
export async function mountNewest<T extends { rollback: TreeRollback | undefined }>(dev: BlockDevice, mount: (sb: Superblock) => Promise<T>): Promise<T> {
  if (dev.blockCount < RING_SLOTS) throw new Error(`device too small: ${dev.blockCount} blocks cannot hold the superblock ring`);
  const ring = Buffer.alloc(RING_SLOTS * BLOCK);
  await dev.readBlocks(0, RING_SLOTS, ring);
  const candidates: Superblock[] = [];
  const reasons: string[] = [];
  for (let s = 0; s < RING_SLOTS; s++) {
    const d = decodeSuperblock(ring.subarray(s * BLOCK, (s + 1) * BLOCK));
    if (typeof d === 'string') reasons.push(`slot ${s}: ${d}`);
    else if (d.cpNumber % RING_SLOTS !== s) reasons.push(`slot ${s}: holds CP ${d.cpNumber}, which belongs in slot ${d.cpNumber % RING_SLOTS}`);
    else candidates.push(d);
  }
  if (candidates.length === 0) {
    if (reasons.every((r) => r.endsWith('bad magic'))) throw new Error('not an nvmirror volume: no superblock slot has the nvmirror magic');
    throw new Error(`no valid superblock (${reasons.join('; ')})`);
  }
  candidates.sort((a, b) => b.cpNumber - a.cpNumber);
  const newest = candidates[0]!;
  if (dev.blockCount < newest.deviceBlocks) {
    throw new Error(`device too small: it has ${dev.blockCount} blocks but the volume was formatted on ${newest.deviceBlocks}`);
  }
  const failures: string[] = [];
  for (const sb of candidates) {
    if (sb.volumeUuid !== newest.volumeUuid || sb.deviceBlocks !== newest.deviceBlocks || sb.sizeBytes !== newest.sizeBytes) {
      failures.push(`CP ${sb.cpNumber}: belongs to another format of this device`);
      continue;
    }
    try {
      let tree: T;
      try {
        tree = await mount(sb);
      } catch (e) {
        if (e instanceof DeviceReadError) throw e;
        // Read it again before giving up on a durable CP: a one-off bad read must not roll back.
        tree = await mount(sb);
      }
      if (sb !== newest) {
        log().error({ cp: sb.cpNumber, newest: newest.cpNumber, skipped: failures }, 'block tree: mounted an older CP because newer superblocks did not verify');
        tree.rollback = {
          mountedCp: sb.cpNumber,
          newestCp: newest.cpNumber,
          newestMeta: { nvlogSeq: newest.nvlogSeq, nvlogEpoch: newest.nvlogEpoch },
          reasons: failures.slice(),
        };
      }
      return tree;
    } catch (e) {
      // A device error is not corruption: rolling back to an older CP would lose committed data.
      if (e instanceof DeviceReadError) throw e;
      const msg = e instanceof Error ? e.message : String(e);
      failures.push(`CP ${sb.cpNumber}: ${msg}`);
      log().warn({ cp: sb.cpNumber, err: msg }, 'block tree: superblock does not verify, trying an older one');
    }
  }
  throw new Error(`no superblock verifies (${failures.join('; ')})`);
}

/**
 * Verifies the root blocks sb references (live and snapshots) and loads its space map;
 * throws (a DeviceReadError if the device failed a read) when something does not verify.
 */
export async function loadCommitted(dev: BlockDevice, sb: Superblock): Promise<SpaceMap> {
  const uuid = uuidToBytes(sb.volumeUuid);
  const deviceBlocks = sb.deviceBlocks;
  const readVerified = async (ptr: BlockPtr, what: string, id: NodeId | null): Promise<Buffer> => {
    const buf = Buffer.alloc(BLOCK);
    try {
      await dev.readBlocks(ptr.pba, 1, buf);
    } catch (e) {
      throw new DeviceReadError(`device read of ${what} at pba ${ptr.pba} failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    const problem = id ? verifyNode(buf, ptr, id, uuid) : crc32c(buf) === ptr.crc ? null : 'checksum mismatch';
    if (problem && !(await repairedRead(dev, ptr.pba, buf, (b) => (id ? verifyNode(b, ptr, id, uuid) : crc32c(b) === ptr.crc ? null : 'x') === null))) {
      throw new Error(`${what} at pba ${ptr.pba}: ${problem}`);
    }
    return buf;
  };
  const loader: SpaceMapLoader = {
    readNode: (ptr, id) => readVerified(ptr, `space-map node level ${id.level} index ${id.index}`, id),
    readLeaf: (ptr, i) => readVerified(ptr, `space-map leaf ${i}`, null),
    decodeChild: (node, slot, what) => {
      const p = decodePtr(node, ptrSlotOffset(slot), deviceBlocks);
      if (typeof p === 'string') throw new Error(`${what}: ${p}`);
      return p;
    },
  };
  const roots: { name: string; cp: number; root: BlockPtr | null }[] = [{ name: 'live tree', cp: sb.cpNumber, root: sb.root }];
  for (const s of sb.snapshots) roots.push({ name: `snapshot ${s.name}`, cp: s.cp, root: s.root });
  for (const r of roots) {
    if (r.root === null) continue;
    if (r.root.birth > r.cp) throw new Error(`${r.name} root born at CP ${r.root.birth}, after its CP ${r.cp}`);
    await readVerified(r.root, `${r.name} root block`, { type: NODE_TYPE_DATA_TREE, level: sb.treeHeight - 1, index: 0 });
  }
  const smap = await SpaceMap.load(deviceBlocks, sb.smapRoot, sb.snapshots.map((s) => s.smapRoot), loader, allocUnitOf(dev));
  if (smap.used !== sb.usedBlocks) log().warn({ recorded: sb.usedBlocks, counted: smap.used }, 'block tree: superblock used-block count differs from the space map');
  return smap;
}

/** Decodes a superblock for a read-only view and verifies its root blocks (no space map). */
export async function verifyViewRoots(dev: BlockDevice, superblock: Buffer): Promise<Superblock> {
  const sb = decodeSuperblock(superblock);
  if (typeof sb === 'string') throw new VolumeError('EIO', `superblock does not verify: ${sb}`);
  const uuid = uuidToBytes(sb.volumeUuid);
  const roots = [sb.root, ...sb.snapshots.map((s) => s.root)];
  for (const r of roots) {
    if (r === null) continue;
    const buf = Buffer.alloc(BLOCK);
    await dev.readBlocks(r.pba, 1, buf);
    const problem = verifyNode(buf, r, { type: NODE_TYPE_DATA_TREE, level: sb.treeHeight - 1, index: 0 }, uuid);
    if (problem) throw new VolumeError('EIO', `CP ${sb.cpNumber} root block at pba ${r.pba}: ${problem}`);
  }
  return sb;
}
