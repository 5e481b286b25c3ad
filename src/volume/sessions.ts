/**
 * The session record, DIR/sessions.json: for each read-write session of the volume since
 * a consumer last acknowledged them, a random id and the newest NVRAM record seq the
 * volume held when that session started (after recovery, before any client write).
 *
 * Why: records past a session's start seq are that session's own. A session that started
 * lower than an earlier one lost records (its NVRAM or disk); a mirror that holds records
 * past that seq holds ones this volume lost, even when a later session has since written
 * new records over the same seqs. The mirror source (src/mirror/source.ts) sends these in
 * HELLO and acknowledges them once a destination welcomes it, so a session served without
 * the mirror (`serve --no-mirror`, `attach`) in between is not forgotten.
 *
 * Invariants:
 * - A read-write open records its session durably (temp file, fsync, rename, fsync DIR)
 *   before any client write can append a record; oldest first, at most SESSIONS_MAX.
 * - Past SESSIONS_MAX the two oldest merge into one with the newer id and the lower
 *   start seq: a merge only makes a consumer's check stricter (records by the dropped id
 *   count as another's), never laxer.
 * - A file that does not parse is no sessions (recordSessionStart says so; the caller
 *   warns), never an error.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { syncDirectory } from '../io/file-device';

export const SESSIONS_NAME = 'sessions.json';
/** Sessions kept (the current one included). */
export const SESSIONS_MAX = 16;
const SESSIONS_FILE_MAX_BYTES = 16 * 1024;
const SEQ_MAX = Number.MAX_SAFE_INTEGER;

export interface VolumeSession {
  /** 8 random bytes, 16 hex digits. */
  id: string;
  /** The newest NVRAM record seq the volume held when the session started. */
  startedAtSeq: number;
}

function valid(s: unknown): s is VolumeSession {
  if (typeof s !== 'object' || s === null) return false;
  const o = s as Record<string, unknown>;
  return typeof o.id === 'string' && /^[0-9a-f]{16}$/.test(o.id) && o.id !== '0000000000000000' &&
    typeof o.startedAtSeq === 'number' && Number.isSafeInteger(o.startedAtSeq) && o.startedAtSeq >= 0 && o.startedAtSeq <= SEQ_MAX;
}

/** The recorded sessions, oldest first; undefined when the file exists but does not parse. */
export function readSessions(dir: string): VolumeSession[] | undefined {
  let text: string;
  try {
    const fd = fs.openSync(path.join(dir, SESSIONS_NAME), 'r');
    try {
      const buf = Buffer.alloc(SESSIONS_FILE_MAX_BYTES);
      const n = fs.readSync(fd, buf, 0, buf.length, 0);
      text = buf.toString('utf8', 0, n);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    return undefined;
  }
  try {
    const v = JSON.parse(text) as { sessions?: unknown };
    if (!Array.isArray(v.sessions) || v.sessions.length > SESSIONS_MAX || !v.sessions.every(valid)) return undefined;
    return v.sessions.map((s) => ({ id: s.id, startedAtSeq: s.startedAtSeq }));
  } catch {
    return undefined;
  }
}

/** `list` merged down to `max` entries (see the invariants): the lowest start survives. */
export function mergeSessions(list: readonly VolumeSession[], max: number): VolumeSession[] {
  const out = [...list];
  while (out.length > max) {
    const [a, b] = out.splice(0, 2) as [VolumeSession, VolumeSession];
    out.unshift({ id: b.id, startedAtSeq: Math.min(a.startedAtSeq, b.startedAtSeq) });
  }
  return out;
}

/** `list` with `next` appended, merged down to SESSIONS_MAX. */
export function appendSession(list: readonly VolumeSession[], next: VolumeSession): VolumeSession[] {
  return mergeSessions([...list, next], SESSIONS_MAX);
}

function encode(list: readonly VolumeSession[]): string {
  return `${JSON.stringify({ sessions: list })}\n`;
}

/**
 * Records a new read-write session that starts at `startedAtSeq`, durably; returns it,
 * and whether an unreadable record was replaced (the caller warns: what the earlier
 * sessions started from is lost, and a consumer's check is the laxer for it).
 */
export async function recordSessionStart(dir: string, startedAtSeq: number): Promise<{ session: VolumeSession; unreadable: boolean }> {
  const session: VolumeSession = { id: crypto.randomBytes(8).toString('hex'), startedAtSeq };
  const prev = readSessions(dir);
  const base = prev ?? [];
  const p = path.join(dir, SESSIONS_NAME);
  const tmp = `${p}.tmp-${process.pid}`;
  const fh = await fs.promises.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(encode(appendSession(base, session)));
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.promises.rename(tmp, p);
  await syncDirectory(dir);
  return { session, unreadable: prev === undefined };
}

/**
 * A consumer has taken every recorded session into account (the mirror: a destination
 * welcomed this session's stream): the record is emptied. Synchronous, no fsync: a record
 * left behind by a crash only keeps the consumer's check stricter.
 */
export function acknowledgeSessions(dir: string): void {
  const p = path.join(dir, SESSIONS_NAME);
  fs.writeFileSync(`${p}.tmp`, encode([]));
  fs.renameSync(`${p}.tmp`, p);
}
