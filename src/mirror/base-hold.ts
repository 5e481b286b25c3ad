/**
 * The mirror base on a source volume across restarts: the destination's CP that the
 * relationship records (DIR/mirror-source.json), held against reuse again when a process
 * opens the volume, so the relationship resumes with a resync instead of a baseline.
 *
 * - holdRecordedBase: re-holds that CP and every later one the superblock ring still has
 *   (the destination may have committed one of them, its ack lost), and the older CP a
 *   reader of the destination was pinned to, if recorded. Used by the mirror
 *   source (source.ts) and, for `serve --no-mirror`, by DetachedBase.
 * - DetachedBase: the tree's CP sink while the volume is served without its mirror. It
 *   ships nothing; it keeps the base held (oldestNeededCp), so the session without the
 *   mirror does not reuse the blocks the destination's committed image references, and
 *   the next mirrored session resyncs only what was born since. Out of space, the hold
 *   breaks (holdBroken): the relationship then names no base (-1) at once, before any
 *   such block is reused, and the next mirrored session takes a full baseline.
 *
 * Invariants:
 * - A base is named as held only after holdCommitted succeeded for it in this process.
 * - The relationship file is rewritten only to drop a base (never to name a new one).
 */
import type { Logger } from 'pino';
import type { BlockTreeApi, CpBlock, CpMeta, CpSink } from '../tree/types';
import { RING_SLOTS } from '../tree/layout';
import { readRelationship, writeRelationship } from './relationship';

export interface HeldBase {
  /** The destination's CP, held. */
  destCp: number;
  /** Its superblock as the relationship keeps it (once it has left the ring), if recorded. */
  superblock?: Buffer;
  /** An older CP a reader of the destination was pinned to, held too. */
  pinned?: { cp: number; superblock: Buffer };
}

/**
 * Holds the relationship's recorded base (and the later CPs still in the ring) in `tree`,
 * before recovery's CPs can reuse anything. Undefined when there is none, or it can no
 * longer be held (logged: a baseline follows).
 */
export async function holdRecordedBase(dir: string, tree: BlockTreeApi, log: Logger): Promise<HeldBase | undefined> {
  const cpNow = tree.stats().cpNumber;
  const rel = readRelationship(dir);
  if (!rel || rel.destCp < 0 || rel.destCp > cpNow) return undefined;
  const kept = rel.destSuperblock !== undefined ? Buffer.from(rel.destSuperblock, 'base64') : undefined;
  const why = await tree.holdCommitted(rel.destCp, kept);
  if (why !== null) {
    log.warn({ destCp: rel.destCp, reason: why }, 'the destination\'s CP can no longer be kept: it gets a full baseline');
    return undefined;
  }
  // The destination may have committed any CP shipped after it (its ack lost with the
  // crash), and a failback rolls back to such a CP: hold every later one the ring still
  // has, as the run before the restart did.
  for (let c = Math.max(rel.destCp + 1, cpNow - RING_SLOTS + 1); c < cpNow; c++) {
    const w = await tree.holdCommitted(c);
    if (w !== null) log.warn({ cp: c, reason: w }, 'a CP after the destination\'s cannot be held');
  }
  // An older CP a reader of the destination was pinned to: held as the run before did, so
  // that reader keeps its CP (if not, the destination releases it before the resync lands).
  let pinned: { cp: number; superblock: Buffer } | undefined;
  if (rel.pinnedCp !== undefined && rel.pinnedSuperblock !== undefined) {
    const sb = Buffer.from(rel.pinnedSuperblock, 'base64');
    const w = await tree.holdCommitted(rel.pinnedCp, sb);
    if (w === null) pinned = { cp: rel.pinnedCp, superblock: sb };
    else log.warn({ cp: rel.pinnedCp, reason: w }, 'the CP a reader of the destination is pinned to cannot be held: the destination releases that reader if a CP reuses its blocks');
  }
  return { destCp: rel.destCp, ...(kept ? { superblock: kept } : {}), ...(pinned ? { pinned } : {}) };
}

/**
 * For a read-write open of `dir` without its mirror (`serve --no-mirror`, `attach`,
 * `snapshot` and `repair --accept-nvram-loss` of a volume not served): the
 * beforeRecovery hook that keeps the recorded base, or undefined when none is recorded.
 */
export function keepBaseWithoutMirror(dir: string, log: Logger): ((tree: BlockTreeApi) => Promise<void>) | undefined {
  const rel = readRelationship(dir);
  if (!rel || rel.destCp < 0) return undefined;
  return async (tree) => {
    await DetachedBase.attach(dir, tree, log);
  };
}

/** The CP sink of a volume served without its recorded mirror (`serve --no-mirror`): keeps the base. */
export class DetachedBase implements CpSink {
  private held: HeldBase | undefined;

  private constructor(
    private readonly dir: string,
    private readonly log: Logger,
  ) {}

  /** Before NVRAM recovery (its CPs must not reuse the base either): holds the base and becomes the tree's CP sink. */
  static async attach(dir: string, tree: BlockTreeApi, log: Logger): Promise<DetachedBase> {
    const d = new DetachedBase(dir, log);
    d.held = await holdRecordedBase(dir, tree, log);
    if (d.held) log.info({ destCp: d.held.destCp }, 'opened without the mirror: the destination\'s CP stays held, so the mirror resumes with a resync');
    tree.setCpSink(d);
    return d;
  }

  oldestNeededCp(): number | undefined {
    const h = this.held;
    return h ? Math.min(h.destCp, h.pinned?.cp ?? h.destCp) : undefined;
  }

  holdBroken(cp: number, reason: string): void {
    this.log.error({ cp, reason }, 'mirror base lost: out of space while keeping the destination\'s blocks; the mirror gets a full baseline when it resumes');
    this.held = undefined;
    const rel = readRelationship(this.dir);
    if (!rel) return;
    try {
      // At once, before any block is reused: a later session must not trust the old base.
      const { destSuperblock: _sb, pinnedCp: _p, pinnedSuperblock: _psb, ...rest } = rel;
      writeRelationship(this.dir, { ...rest, destCp: -1 });
    } catch (e) {
      this.log.error({ err: e instanceof Error ? e.message : String(e) }, 'cannot write the mirror state file');
    }
  }

  async blocks(_cp: number, _blocks: readonly CpBlock[]): Promise<void> {
    // Nothing is shipped without the mirror.
  }

  async committed(_cp: number, _slot: number, _superblock: Buffer, _meta: CpMeta): Promise<void> {
    // Nothing is shipped without the mirror.
  }
}
