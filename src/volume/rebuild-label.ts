/**
 * `nvmirror repair DIR --rebuild-label`: a volume directory whose label (nvmirror.json) is
 * lost or damaged gets it back from what the member(s) and the NVRAM log say of
 * themselves: the tree's newest superblock (volume uuid, size), each RAID member's own
 * label (level, stripe unit, member count, its index), the NVRAM log's header (its
 * volume's uuid) and the files' sizes. Nothing but the label is written.
 *
 * Invariants:
 * - A readable, valid label is never replaced; a damaged one is kept beside the new one
 *   (nvmirror.json.damaged-MS).
 * - The new label is written only when the tree mounts read-only from the members it
 *   names (newest CP without a rollback, or the rollback said), every member belongs to
 *   the same volume, and the NVRAM log's header (when readable) names that volume too.
 * - The volume directory's lock is held throughout (no server runs meanwhile).
 */
import * as fs from 'fs';
import * as path from 'path';
import type { BlockDevice } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { FileBlockDevice } from '../io/file-device';
import { BlockTree } from '../tree/tree';
import { LABEL_COPIES } from '../raid/geometry';
import { newestLabel, type RaidLabel } from '../raid/label';
import { readRegionHeader, HEADER_PAGE_BYTES } from '../nvlog/format';
import { LABEL_NAME, newLabel, pathExists, readLabel, writeLabel, type VolumeLabel } from './label';
import { lockVolumeDir } from './dir-lock';
import { openRaidMembers } from './raid-members';
import { CLEAN_STOP_NAME } from './clean-stop';
import { RAID_JOURNAL_NAME } from '../raid/journal-file';

const BS = BLOCK_SIZE_BYTES;
/** Where `nvmirror create` puts them unless told otherwise. */
const DEFAULT_MEMBER = 'member-0.img';
const DEFAULT_NVRAM = 'nvram.log';

export interface RebuildLabelResult {
  label: VolumeLabel;
  cpNumber: number;
  /** Where the damaged label was moved, if there was one. */
  movedAside: string | undefined;
  /** Said, not refused: e.g. the NVRAM log's header could not be read. */
  notes: string[];
}

/** A path as the label keeps it: relative to DIR when inside it. */
function asLabelPath(absDir: string, p: string): string {
  const rel = path.relative(absDir, p);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : p;
}

async function raidLabelOf(file: string): Promise<RaidLabel | undefined> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const area = Buffer.alloc(LABEL_COPIES * BS);
    const { bytesRead } = await fh.read(area, 0, area.length, 0);
    if (bytesRead < area.length) return undefined;
    const l = newestLabel(area);
    return typeof l === 'string' ? undefined : l;
  } finally {
    await fh.close();
  }
}

export async function rebuildLabel(dir: string, opts: { members?: string[]; nvram?: string } = {}): Promise<RebuildLabelResult> {
  const absDir = path.resolve(dir);
  const labelPath = path.join(absDir, LABEL_NAME);
  let damage: string | undefined;
  try {
    await readLabel(absDir);
  } catch (e) {
    damage = e instanceof Error ? e.message : String(e);
  }
  if (damage === undefined) throw new Error(`${labelPath} is readable: nothing to rebuild (run nvmirror check ${dir})`);
  if (!fs.existsSync(absDir) || !fs.statSync(absDir).isDirectory()) throw new Error(damage);
  const lock = await lockVolumeDir(absDir).catch((e: unknown) => {
    const msg = e instanceof Error ? e.message : String(e);
    throw new Error(msg.includes('already in use') ? `${msg}; stop it before repairing` : msg);
  });
  try {
    const notes: string[] = [];
    // The members: as given (in order), else the files of DIR that carry a RAID label, else DIR/member-0.img.
    let files = (opts.members ?? []).map((m) => path.resolve(m));
    if (files.length === 0) {
      const skip = new Set([LABEL_NAME, CLEAN_STOP_NAME, RAID_JOURNAL_NAME, opts.nvram !== undefined ? path.basename(opts.nvram) : DEFAULT_NVRAM]);
      const found: Array<{ file: string; label: RaidLabel }> = [];
      for (const name of fs.readdirSync(absDir).sort()) {
        const file = path.join(absDir, name);
        let regular = false;
        try {
          regular = fs.statSync(file).isFile();
        } catch {
          /* a dangling link: not a member here */
        }
        if (skip.has(name) || !regular) continue;
        const l = await raidLabelOf(file);
        if (l) found.push({ file, label: l });
      }
      if (found.length > 0) {
        const uuids = [...new Set(found.map((f) => f.label.volumeUuid))];
        if (uuids.length > 1) throw new Error(`${absDir} holds RAID members of ${uuids.length} volumes (${uuids.join(', ')}): name this volume's members with --member, in order`);
        const n = found[0]!.label.members;
        const byIndex = new Map<number, string>();
        for (const f of found) if (!byIndex.has(f.label.memberIndex)) byIndex.set(f.label.memberIndex, f.file);
        const missing = Array.from({ length: n }, (_, i) => i).filter((i) => !byIndex.has(i));
        if (missing.length > 0) throw new Error(`member(s) ${missing.join(', ')} of ${n} of RAID volume ${uuids[0]} are not in ${absDir}: name every member with --member, in order`);
        files = Array.from({ length: n }, (_, i) => byIndex.get(i)!);
      } else {
        files = [path.join(absDir, DEFAULT_MEMBER)];
      }
    }
    for (const f of files) if (!(await pathExists(f))) throw new Error(`member ${f} does not exist (name the members with --member, in order)`);
    // One member without a RAID label is a plain volume; otherwise every member carries its place.
    const labels = await Promise.all(files.map(raidLabelOf));
    let r0: RaidLabel | undefined;
    if (files.length > 1 || labels[0] !== undefined) {
      for (let i = 0; i < files.length; i++) {
        const l = labels[i];
        if (!l) throw new Error(`member ${files[i]} carries no RAID label`);
        if (l.memberIndex !== i || l.members !== files.length) throw new Error(`member ${files[i]} is member ${l.memberIndex} of ${l.members}, not ${i} of ${files.length}: name the members in order`);
        if (l.volumeUuid !== labels[0]!.volumeUuid) throw new Error(`member ${files[i]} belongs to volume ${l.volumeUuid}, member 0 to ${labels[0]!.volumeUuid}`);
      }
      r0 = labels[0];
    }

    // The tree, read-only, from those members.
    let dev: BlockDevice;
    if (r0) {
      dev = await openRaidMembers(files.map((f) => ({ name: asLabelPath(absDir, f), path: f })), { level: r0.level, stripeUnitBytes: r0.unitBytes }, r0.memberBlocks, r0.volumeUuid, true);
    } else {
      dev = await FileBlockDevice.open(files[0]!, { readOnly: true });
    }
    let uuid: string;
    let sizeBytes: number;
    let cpNumber: number;
    const memberBlocks = r0 ? r0.memberBlocks : dev.blockCount;
    try {
      const tree = await BlockTree.open(dev);
      try {
        const st = tree.stats();
        uuid = st.volumeUuid;
        sizeBytes = st.sizeBytes;
        cpNumber = st.cpNumber;
        if (tree.rollback) notes.push(`the newest CP ${tree.rollback.newestCp} does not verify: CP ${tree.rollback.mountedCp} mounts (the NVRAM log replays on top at the next serve)`);
      } finally {
        await tree.close();
      }
    } catch (e) {
      throw new Error(`the member${files.length > 1 ? 's' : ''} hold${files.length > 1 ? '' : 's'} no volume that mounts: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      await dev.close();
    }
    if (r0 && r0.volumeUuid !== uuid) throw new Error(`the RAID members are labelled for volume ${r0.volumeUuid}, the tree on them is ${uuid}`);

    // The NVRAM log: its size, and its header's volume.
    const nvramAbs = path.resolve(absDir, opts.nvram ?? DEFAULT_NVRAM);
    if (!(await pathExists(nvramAbs))) throw new Error(`the NVRAM log ${nvramAbs} does not exist (name it with --nvram; if it is lost too, rebuild the label with --nvram naming where it was, then nvmirror repair ${dir} --recreate-nvram)`);
    const nvramSize = fs.statSync(nvramAbs).size;
    const head = Buffer.alloc(HEADER_PAGE_BYTES);
    const fd = fs.openSync(nvramAbs, 'r');
    try {
      fs.readSync(fd, head, 0, head.length, 0);
    } finally {
      fs.closeSync(fd);
    }
    const h = readRegionHeader(head);
    if (h && h.uuid !== uuid) throw new Error(`the NVRAM log ${nvramAbs} belongs to volume ${h.uuid}, the member(s) to ${uuid}`);
    if (!h) notes.push(`the NVRAM log's header cannot be read: serve will say what is wrong with it (nvmirror repair ${dir} --recreate-nvram if the last session stopped cleanly)`);
    else if (h.regionSizeBytes !== nvramSize) notes.push(`the NVRAM log's header says ${h.regionSizeBytes} bytes, the file has ${nvramSize}`);

    const label = newLabel({
      uuid,
      sizeBytes,
      members: files.map((f) => ({ path: asLabelPath(absDir, f), blockCount: memberBlocks })),
      nvram: { path: asLabelPath(absDir, nvramAbs), sizeBytes: h?.regionSizeBytes ?? nvramSize },
      createdMs: Date.now(),
      ...(r0 ? { raid: { level: r0.level, stripeUnitBytes: r0.unitBytes } } : {}),
    });
    let movedAside: string | undefined;
    if (await pathExists(labelPath)) {
      movedAside = `${labelPath}.damaged-${Date.now()}`;
      await fs.promises.rename(labelPath, movedAside);
    }
    await writeLabel(absDir, label);
    await readLabel(absDir); // what was written validates
    return { label, cpNumber, movedAside, notes };
  } finally {
    await lock.release();
  }
}
