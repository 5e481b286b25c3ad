/**
 * A volume's role record, DIR/role.json: written by `promote` when a mirror becomes a
 * primary (which CP it was promoted from, its new generation). A receiver refuses the
 * old source of a directory that has one (split brain is refused, never merged).
 */
import * as fs from 'fs';
import * as path from 'path';
import { MIRROR_LABEL_NAME } from './mirror-dir';

export const ROLE_NAME = 'role.json';
/** mirror.json, once promoted (kept: it names the source this volume was a mirror of). */
export const PROMOTED_LABEL_NAME = `${MIRROR_LABEL_NAME}.promoted`;

export interface RoleRecord {
  format: 'nvmirror-role';
  role: 'primary';
  /** The source this volume mirrored, and the last CP it committed from it (both sides hold it). */
  promotedFromCp: number;
  promotedRoot: string;
  promotedMs: number;
  /** The snapshot that keeps that CP's blocks. */
  baseSnapshot: string;
  /** The last record replayed from the source's log (its seq), and how many. */
  lastSeq: number;
  recordsReplayed: number;
  /** The lineage generation (tree/lineage.ts) that starts at promotedFromCp + 1: CPs after the base are this side's own. The superblocks are the authority; this is the readable copy. */
  generation: string;
  /** The base CP's superblock (base64), kept for a failback that demotes this side (the base may leave the ring). */
  baseSuperblock?: string;
}

export function readRole(dir: string): RoleRecord | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(path.join(dir, ROLE_NAME), 'utf8')) as RoleRecord;
    return v.format === 'nvmirror-role' && typeof v.promotedFromCp === 'number' ? v : undefined;
  } catch {
    return undefined;
  }
}

