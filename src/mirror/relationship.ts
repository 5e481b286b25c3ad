/**
 * The mirror relationship as a source volume directory records it:
 * DIR/mirror-source.json = { peer, mode, policy, link, rateBytesPerSec?, destCp, destSuperblock,
 * pinnedCp?, pinnedSuperblock?, updatedMs }.
 * `serve DIR` resumes it without flags; `destCp` is the destination's CP whose blocks
 * this volume holds (-1: only a baseline can follow); `pinnedCp` an older CP a reader of
 * the destination's export was pinned to, held too (a hint: a pin not held costs that
 * reader its connection, never data: pin-guard.ts).
 *
 * Invariants:
 * - Written synchronously and durably (a few KiB with the base's superblock: temp file,
 *   fdatasync, rename, directory fsync; ~1 ms here, once a CP) so two writes never land
 *   out of order, a power loss leaves the old file or the new one (never an empty one),
 *   and a lost base is on disk before any block is reused.
 * - A file that does not parse or lacks a field is never half-used: readRelationship
 *   treats it as absent, and relationshipProblem says what is wrong with it (serve
 *   refuses to resume from it rather than serve unmirrored without a word).
 */
import * as fs from 'fs';
import * as path from 'path';
import type { LinkArgs } from './link';
import type { MirrorMode } from './wire';
import { RATE_MIN_BYTES_PER_SEC } from '../util/rate';

export const MIRROR_STATE_NAME = 'mirror-source.json';

export type MirrorPolicy = 'available' | 'strict';

export interface MirrorRelationship {
  peer: string;
  mode: MirrorMode;
  policy: MirrorPolicy;
  link: LinkArgs;
  /** The cap on a baseline's and a resync's block traffic, bytes per second (absent: none). */
  rateBytesPerSec?: number;
  /** The destination's CP whose blocks this volume holds, or -1. */
  destCp: number;
  /** That CP's superblock (base64), so it can be held again after a restart once it has left the ring. */
  destSuperblock?: string;
  /** An older CP (< destCp) a reader of the destination was pinned to, held as well, with its superblock (base64). */
  pinnedCp?: number;
  pinnedSuperblock?: string;
}

/** Writes the relationship durably (throws on an I/O error; the caller logs it). */
export function writeRelationship(dir: string, rel: MirrorRelationship): void {
  const p = path.join(dir, MIRROR_STATE_NAME);
  const tmp = `${p}.tmp`;
  const fd = fs.openSync(tmp, 'w', 0o644);
  try {
    fs.writeSync(fd, JSON.stringify({ ...rel, updatedMs: Date.now() }) + '\n');
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, p);
  const dfd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
}

/**
 * What is wrong with DIR's relationship file, if it exists and readRelationship cannot use
 * it (undefined: absent, or usable).
 */
export function relationshipProblem(dir: string): string | undefined {
  const p = path.join(dir, MIRROR_STATE_NAME);
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? undefined : `cannot read it (${code ?? (e as Error).message})`;
  }
  if (readRelationship(dir) !== undefined) return undefined;
  return text.trim() === '' ? 'it is empty' : 'it is not a mirror relationship (damaged, or written by something else)';
}

export function readRelationship(dir: string): MirrorRelationship | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(path.join(dir, MIRROR_STATE_NAME), 'utf8')) as Record<string, unknown>;
    if (typeof v.peer !== 'string' || (v.mode !== 'sync' && v.mode !== 'async') || (v.policy !== 'available' && v.policy !== 'strict')) return undefined;
    const l = (typeof v.link === 'object' && v.link !== null ? v.link : {}) as Record<string, unknown>;
    const link: LinkArgs = {};
    for (const k of ['mirrorPsk', 'mirrorTlsCert', 'mirrorTlsKey', 'mirrorTlsCa'] as const) if (typeof l[k] === 'string') link[k] = l[k] as string;
    if (l.mirrorInsecure === true) link.mirrorInsecure = true;
    const rel: MirrorRelationship = { peer: v.peer, mode: v.mode, policy: v.policy, link, destCp: typeof v.destCp === 'number' ? v.destCp : -1 };
    if (typeof v.rateBytesPerSec === 'number' && Number.isSafeInteger(v.rateBytesPerSec) && v.rateBytesPerSec >= RATE_MIN_BYTES_PER_SEC) rel.rateBytesPerSec = v.rateBytesPerSec;
    if (typeof v.destSuperblock === 'string' && v.destSuperblock.length <= 8192) rel.destSuperblock = v.destSuperblock;
    if (typeof v.pinnedCp === 'number' && Number.isSafeInteger(v.pinnedCp) && v.pinnedCp >= 0 && v.pinnedCp < rel.destCp && typeof v.pinnedSuperblock === 'string' && v.pinnedSuperblock.length <= 8192) {
      rel.pinnedCp = v.pinnedCp;
      rel.pinnedSuperblock = v.pinnedSuperblock;
    }
    return rel;
  } catch {
    return undefined;
  }
}
