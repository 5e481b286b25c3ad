/**
 * A volume directory's label, DIR/nvmirror.json: format version, uuid, size, block size,
 * members (RAID level and stripe unit when several), NVRAM path and size.
 *
 * Invariants:
 * - A label is validated whole before anything uses it; every problem is a one-line
 *   Error naming the file and the field.
 * - It is written durably (temp file, fsync, rename, fsync DIR) and last during create.
 * - Relative member/NVRAM paths in it are relative to DIR (resolveIn).
 */
import * as fs from 'fs';
import * as path from 'path';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { writeFileDurably } from '../io/file-device';
import * as native from '../io/native';
import { geometryProblem, type RaidLevel } from '../raid/geometry';

export const LABEL_NAME = 'nvmirror.json';
export const LABEL_FORMAT = 'nvmirror-volume';
export const LABEL_VERSION = 1;
const LABEL_MAX_BYTES = 64 * 1024;
const BS = BLOCK_SIZE_BYTES;

export interface VolumeLabel {
  format: typeof LABEL_FORMAT;
  version: number;
  uuid: string;
  sizeBytes: number;
  blockSizeBytes: number;
  members: Array<{ path: string; blockCount: number }>;
  nvram: { path: string; sizeBytes: number };
  createdMs: number;
  /** A RAID volume (several members); absent: one member. */
  raid?: { level: RaidLevel; stripeUnitBytes: number };
}

/** A label for this format and version (the fixed fields filled in). */
export function newLabel(f: Omit<VolumeLabel, 'format' | 'version' | 'blockSizeBytes'>): VolumeLabel {
  return { format: LABEL_FORMAT, version: LABEL_VERSION, blockSizeBytes: BS, ...f };
}

/** A path of a volume directory's label: absolute as given, else relative to DIR. */
export function resolveIn(dir: string, p: string): string {
  return path.isAbsolute(p) ? p : path.join(dir, p);
}

/** Whether a path exists (lstat: a dangling symlink counts). */
export async function pathExists(p: string): Promise<boolean> {
  try {
    await fs.promises.lstat(p);
    return true;
  } catch {
    return false;
  }
}

function validateLabel(v: unknown, where: string): VolumeLabel {
  const bad = (what: string): never => {
    throw new Error(`${where}: bad volume label (${what})`);
  };
  if (typeof v !== 'object' || v === null) bad('not an object');
  const o = v as Record<string, unknown>;
  if (o.format !== LABEL_FORMAT) bad(`format is not "${LABEL_FORMAT}"`);
  if (o.version !== LABEL_VERSION) bad(`unsupported version ${String(o.version)}`);
  if (typeof o.uuid !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(o.uuid)) bad('uuid');
  if (typeof o.sizeBytes !== 'number' || !Number.isSafeInteger(o.sizeBytes) || o.sizeBytes <= 0 || o.sizeBytes % BS !== 0) bad('sizeBytes');
  if (o.blockSizeBytes !== BS) bad(`blockSizeBytes must be ${BS}`);
  const raid = o.raid as Record<string, unknown> | undefined;
  if (raid !== undefined) {
    if (typeof raid !== 'object' || raid === null || !Array.isArray(o.members)) bad('raid');
    const problem = geometryProblem(Number(raid.level), (o.members as unknown[]).length, Number(raid.stripeUnitBytes));
    if (problem !== null) bad(`raid: ${problem}`);
  } else if (!Array.isArray(o.members) || o.members.length !== 1) {
    bad('exactly one member without raid');
  }
  for (const m of o.members as unknown[]) {
    const mm = m as Record<string, unknown>;
    if (typeof mm !== 'object' || mm === null || typeof mm.path !== 'string' || typeof mm.blockCount !== 'number' || !Number.isSafeInteger(mm.blockCount)) bad('member');
  }
  const nv = o.nvram as Record<string, unknown> | undefined;
  if (typeof nv !== 'object' || nv === null || typeof nv.path !== 'string' || typeof nv.sizeBytes !== 'number' || !Number.isSafeInteger(nv.sizeBytes)) bad('nvram');
  if (typeof o.createdMs !== 'number') bad('createdMs');
  return o as unknown as VolumeLabel;
}

/** Reads and validates DIR/nvmirror.json; one-line errors for every way it can be wrong. */
export async function readLabel(dir: string): Promise<VolumeLabel> {
  const p = path.join(dir, LABEL_NAME);
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(dir);
  } catch {
    throw new Error(`no such volume directory: ${dir}`);
  }
  if (!st.isDirectory()) throw new Error(`not a directory: ${dir}`);
  let text: string;
  try {
    const fst = await fs.promises.stat(p);
    if (fst.size > LABEL_MAX_BYTES) throw new Error(`${p}: label is larger than ${LABEL_MAX_BYTES} bytes`);
    text = await fs.promises.readFile(p, 'utf8');
  } catch (e) {
    if (native.errnoCode(e) === 'ENOENT' && (await pathExists(`${p}.demoted`))) throw new Error(`${dir} was demoted: its member is now a mirror (see ${path.join(dir, 'DEMOTED.json')})`);
    if (native.errnoCode(e) === 'ENOENT') {
      // A member or an NVRAM log without the label beside it: the label was lost, not never made.
      const lost = ['member-0.img', 'nvram.log'].some((n) => fs.existsSync(path.join(dir, n)));
      throw new Error(`${dir} is not an nvmirror volume directory (no ${LABEL_NAME}; ${lost ? `it holds a volume's files: nvmirror repair ${dir} --rebuild-label makes the label again from them` : 'create one with `nvmirror create`'})`);
    }
    throw e;
  }
  const rebuild = ` (nvmirror repair ${dir} --rebuild-label makes it again from the members and the NVRAM log)`;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new Error(`${p}: bad volume label (not JSON)${rebuild}`);
  }
  try {
    return validateLabel(v, p);
  } catch (e) {
    throw new Error(`${e instanceof Error ? e.message : String(e)}${rebuild}`);
  }
}

/** Writes the label durably (temp file, fsync, rename, fsync DIR). */
export async function writeLabel(dir: string, label: VolumeLabel): Promise<void> {
  await writeFileDurably(dir, LABEL_NAME, `${JSON.stringify(label, null, 2)}\n`);
}
