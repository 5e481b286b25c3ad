/**
 * A mirror directory holding a committed baseline, made as a receiver makes it: a source
 * tree on a memory device commits a few CPs (nvlogSeq 1..3), and every block it holds goes
 * through a real MirrorDir's CpApplier as one baseline, then its superblock. For the
 * mirror's unit tests (a baseline's marker, promote).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';
import type { Logger } from 'pino';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { CpApplier } from '../../src/mirror/apply';
import { BASELINE_MARKER_NAME, MirrorDir, newestSuperblock, rootBytes, type MirrorHello } from '../../src/mirror/mirror-dir';
import { SlabPool } from '../../src/mirror/slab-pool';
import { MsgType } from '../../src/mirror/wire';
import { RING_SLOTS } from '../../src/tree/layout';
import { BlockTree } from '../../src/tree/tree';
import { Slicer } from '../../src/util/work';

export const BS = 4096;

export function blockOf(seed: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

export interface BaselinedMirror {
  /** The mirror, open (the caller closes it). */
  mirror: MirrorDir;
  /** DIR/<source-uuid>. */
  dir: string;
  hello: MirrorHello;
  /** The baseline's CP, its root (hex) and the source record seq it covers. */
  cp: number;
  root: string;
  nvlogSeq: number;
  /** The source's volume at that CP. */
  volume: Buffer;
  /** baseline.partial as it was while the baseline ran. */
  markerText: string;
}

export async function baselinedMirror(receiverDir: string, uuid: string, sizeBytes: number, deviceBlocks: number, log: Logger): Promise<BaselinedMirror> {
  const srcDev = new MemoryBlockDevice(deviceBlocks);
  await BlockTree.format(srcDev, { sizeBytes, volumeUuid: uuid });
  const src = await BlockTree.open(srcDev);
  for (let cp = 0; cp < 3; cp++) await src.commitCp(Array.from({ length: 40 }, (_, i) => ({ lbn: i * 7 + cp, data: blockOf(cp * 100 + i) })), { nvlogSeq: cp + 1, nvlogEpoch: 1 });
  const volume = Buffer.alloc(sizeBytes);
  await src.readRange(0, sizeBytes / BS, volume);
  await src.close();
  const top = await newestSuperblock(srcDev, uuid);
  assert.ok(top);
  const cp = top.sb.cpNumber;

  const dir = path.join(receiverDir, uuid);
  const hello: MirrorHello = { sourceUuid: uuid, sizeBytes, deviceBlocks, nvramBytes: 4 * 1024 * 1024 };
  const mirror = await MirrorDir.openOrCreate(receiverDir, hello, log);
  const applier = new CpApplier(mirror, new SlabPool(64 * BS, 4), undefined, new Slicer(), log);
  await applier.begin({ type: MsgType.CpBegin, cp, baseCp: -1, kind: 'resync' });
  const marker = path.join(dir, BASELINE_MARKER_NAME);
  assert.ok(fs.existsSync(marker), 'a baseline in progress is marked');
  const markerText = fs.readFileSync(marker, 'utf8');
  const b = Buffer.alloc(BS);
  let sent = 0;
  for (let p = RING_SLOTS; p < deviceBlocks; p++) {
    await srcDev.readBlocks(p, 1, b);
    if (!b.some((x) => x !== 0)) continue;
    await applier.blocks({ type: MsgType.CpBlocks, cp, pbas: [p], data: Buffer.from(b) });
    sent++;
  }
  await applier.commit({ type: MsgType.CpCommit, cp, slot: cp % RING_SLOTS, blockCount: sent, superblock: top.raw });
  await applier.idle();
  assert.equal(mirror.committedCp, cp);
  assert.equal(mirror.baselinePartial, false);
  assert.ok(!fs.existsSync(marker), 'the commit removes the marker');
  return { mirror, dir, hello, cp, root: rootBytes(top.sb).toString('hex'), nvlogSeq: top.sb.nvlogSeq, volume, markerText };
}
