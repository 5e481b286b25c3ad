/**
 * `replace-member DIR OLD NEW` on an unserved RAID volume: rebuilds member OLD's contents
 * onto a new file NEW from the other members, only for the stripes in use (the space
 * map: active | summary) plus the head copies, then labels NEW as that member
 * (generation + 1 on every member in service, so OLD is stale if it comes back) and
 * names it in nvmirror.json. OLD is never read (it may be gone or failing).
 *
 * Resume: DIR/replace-member.json records the replacement and the next stripe to rebuild,
 * written durably every PROGRESS_EVERY_STRIPES stripes after NEW is synced; a run that
 * finds it (same OLD and NEW) goes on from there. Order at the end: labels on the
 * members (NEW in service), then nvmirror.json, then the marker is removed; a crash in
 * between is finished by running the same command again.
 *
 * Invariants:
 * - Bad input (not RAID, RAID-0, OLD not a member, NEW already a member or an existing
 *   file without a matching marker, another replacement in progress, a served volume)
 *   is one line and changes nothing.
 * - NEW is in service (labelled, listed) only once every stripe in use has been rebuilt
 *   onto it and synced.
 * - Memory: one stripe unit per member at a time, plus one bit per device block.
 */
import * as fs from 'fs';
import * as path from 'path';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { FileBlockDevice, writeFileDurably } from '../io/file-device';
import { BlockTree } from '../tree/tree';
import { testBit } from '../tree/bitmap';
import { openRaidMembers } from '../raid/members';
import { LABEL_COPIES } from '../raid/geometry';
import { lockVolumeDir, readLabel, volumeDirInUse, writeLabel } from './dir';

const B = BLOCK_SIZE_BYTES;
export const REPLACE_MARKER_NAME = 'replace-member.json';
const PROGRESS_EVERY_STRIPES = 64;

interface Marker {
  uuid: string;
  index: number;
  old: string;
  /** NEW as the volume label will name it. */
  new: string;
  /** The CP the rebuild copies (a volume served in between has moved on: start again). */
  cpNumber: number;
  nextStripe: number;
}

export interface ReplaceProgress {
  stripesDone: number;
  stripesTotal: number;
  unitBytes: number;
}

export interface ReplaceResult {
  index: number;
  old: string;
  new: string;
  stripesRebuilt: number;
  /** Stripes already rebuilt by an earlier, interrupted run. */
  resumedAt: number;
  bytesWritten: number;
  durationMs: number;
}

function resolveIn(dir: string, p: string): string {
  return path.isAbsolute(p) ? p : path.join(dir, p);
}

/**
 * @param opts.stopAfterStripes (tests) stop like a crash would, after rebuilding that many
 *   stripes in this run: NEW synced, the marker at the next stripe, an error thrown.
 */
export async function replaceMember(dir: string, oldArg: string, newArg: string, opts: { onProgress?: (p: ReplaceProgress) => void; stopAfterStripes?: number } = {}): Promise<ReplaceResult> {
  const t0 = Date.now();
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  if (!label.raid) throw new Error(`${absDir} is not a RAID volume: it has no member to replace`);
  if (label.raid.level === 0) throw new Error('RAID-0 has no redundancy: a member cannot be rebuilt');
  const absNew = path.resolve(newArg);
  const rel = path.relative(absDir, absNew);
  const newName = rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : absNew;
  const markerPath = path.join(absDir, REPLACE_MARKER_NAME);
  const marker = fs.existsSync(markerPath) ? (JSON.parse(fs.readFileSync(markerPath, 'utf8')) as Marker) : undefined;
  const byArg = (a: string): number => label.members.findIndex((m, i) => m.path === a || resolveIn(absDir, m.path) === path.resolve(a) || resolveIn(absDir, m.path) === resolveIn(absDir, a) || String(i) === a);
  let index = byArg(oldArg);
  if (marker) {
    if (marker.uuid !== label.uuid || marker.new !== newName || (index >= 0 && index !== marker.index) || (index < 0 && marker.old !== oldArg)) {
      throw new Error(`a replacement of member ${marker.index} ${marker.old} by ${marker.new} is in progress (${markerPath}): run replace-member ${absDir} ${marker.old} ${marker.new} to finish it`);
    }
    index = marker.index;
    if (label.members[index]!.path === newName) {
      // The crash came after nvmirror.json named NEW: only the marker is left.
      await fs.promises.rm(markerPath);
      return { index, old: marker.old, new: newName, stripesRebuilt: 0, resumedAt: marker.nextStripe, bytesWritten: 0, durationMs: Date.now() - t0 };
    }
  } else {
    if (index < 0) throw new Error(`${oldArg} is not a member of ${absDir} (members: ${label.members.map((m, i) => `${i} ${m.path}`).join(', ')})`);
    if (byArg(newArg) >= 0) throw new Error(`${newArg} is already a member of ${absDir}`);
    if (fs.existsSync(absNew)) throw new Error(`${absNew} exists: give a new file (replace-member creates it)`);
  }
  if (await volumeDirInUse(absDir)) throw new Error(`volume ${absDir} is served: stop it first (replace-member while served is not built yet)`);
  const lock = await lockVolumeDir(absDir, false);
  try {
    const memberBlocks = label.members[0]!.blockCount;
    const files = label.members.map((m) => ({ name: m.path, path: resolveIn(absDir, m.path) }));
    const raid = await openRaidMembers(files, label.raid, memberBlocks, label.uuid, false, { index, file: { name: newName, path: absNew } });
    let dev: FileBlockDevice | undefined;
    try {
      const h = raid.health();
      if (h.state === 'failed') throw new Error(`${h.failure ?? 'too many members lost'}: member ${index} cannot be rebuilt`);
      const g = raid.geometry;
      const tree = await BlockTree.open(raid);
      const used = tree.usedBitmap();
      await tree.close();
      const W = g.stripeDataBlocks;
      const stripes: number[] = [];
      for (let s = 0; s < g.stripes; s++) {
        for (let p = s * W; p < (s + 1) * W; p++) {
          if (testBit(used, p)) {
            stripes.push(s);
            break;
          }
        }
      }
      const cpNumber = tree.cpNumber;
      const resumable = marker !== undefined && marker.cpNumber === cpNumber && fs.existsSync(absNew);
      const start = resumable ? marker.nextStripe : 0;
      const oldName = label.members[index]!.path;
      const writeMarker = (nextStripe: number): Promise<void> => writeFileDurably(absDir, REPLACE_MARKER_NAME, `${JSON.stringify({ uuid: label.uuid, index, old: marker?.old ?? oldName, new: newName, cpNumber, nextStripe } satisfies Marker)}\n`);
      if (resumable) {
        dev = await FileBlockDevice.open(absNew);
        if (dev.blockCount < memberBlocks) throw new Error(`${absNew} has ${dev.blockCount} blocks, the member needs ${memberBlocks}`);
      } else {
        if (fs.existsSync(absNew)) await fs.promises.rm(absNew); // an interrupted run's copy of another CP: start again
        dev = await FileBlockDevice.create(absNew, memberBlocks);
        await writeMarker(0);
      }
      // The head copies (the superblock ring), then the stripes in use.
      const head = Buffer.alloc(g.headBlocks * B);
      await raid.readBlocks(0, g.headBlocks, head);
      await dev.writeBlocks(LABEL_COPIES, head);
      const skipped = stripes.filter((s) => s < start).length;
      let done = skipped;
      let bytes = head.length;
      let sinceMark = 0;
      for (const s of stripes) {
        if (s < start) continue;
        if (opts.stopAfterStripes !== undefined && done - skipped >= opts.stopAfterStripes) {
          await dev.sync();
          await writeMarker(s);
          throw new Error(`stopped after ${opts.stopAfterStripes} stripes (test hook): run again to resume at stripe ${s}`);
        }
        const unit = await raid.rebuildUnit(s, index);
        await dev.writeBlocks(g.unitStart(s), unit);
        bytes += unit.length;
        done++;
        opts.onProgress?.({ stripesDone: done, stripesTotal: stripes.length, unitBytes: g.unitBlocks * B });
        if (++sinceMark >= PROGRESS_EVERY_STRIPES) {
          sinceMark = 0;
          await dev.sync();
          await writeMarker(s + 1);
        }
      }
      await dev.sync();
      // NEW in service: labels (generation + 1) on every member in service, then the volume label.
      raid.adoptMember(index, newName, dev);
      dev = undefined; // the RAID device owns it now
      await raid.sync();
      const after = raid.health();
      if (after.memberStatus[index]!.state !== 'online') throw new Error(`the new member ${newName} left service while labelling: ${after.memberStatus[index]!.reason ?? ''}`);
      label.members[index] = { path: newName, blockCount: memberBlocks };
      await writeLabel(absDir, label);
      await fs.promises.rm(markerPath, { force: true });
      return { index, old: marker?.old ?? oldName, new: newName, stripesRebuilt: done - skipped, resumedAt: start, bytesWritten: bytes, durationMs: Date.now() - t0 };
    } finally {
      await dev?.close().catch(() => undefined);
      await raid.close();
    }
  } finally {
    await lock.release();
  }
}
