/**
 * The rebuild of one RAID member (replace-member), offline or while served: drives
 * RaidDevice.startRebuild .. finishRebuild. Copies the head, then rebuilds every stripe in
 * use (the space map: active | summary) in ascending order, skipping the ones already
 * current on the new member (written whole since the rebuild began, or done by an
 * earlier run), then once more every stripe in use that is still not current (stripes
 * that came into use meanwhile are written whole, so this finds only what a write that
 * began before the rebuild left). Progress is persisted (after the new member is synced)
 * at the end of a batch of BATCH_STRIPES stripes, at most every PROGRESS_PERSIST_MS (on
 * the injected clock), as "every stripe in use below N is current".
 *
 * Invariants:
 * - The persisted progress N never runs ahead of what is durable on the new member: it is
 *   written only after syncRebuildTarget(), and only stripes < N were passed.
 * - The rate limit (bytes per second, on the injected clock) holds over any window
 *   longer than RATE_BURST_MS: at most rate x (window + RATE_BURST_MS) bytes.
 * - Memory: the stripe list (one number per stripe in use) and, at a time,
 *   REBUILD_RUNS_IN_FLIGHT runs of at most REBUILD_RUN_STRIPES_MAX stripes' units per member.
 */
import type { Clock } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { testBit } from '../util/bitmap';
import { assert } from '../util/assert';
import { forEachLimit } from '../util/work';
import { RATE_BURST_MS, RateLimiter } from '../util/rate';
import type { RaidDevice, RebuildStatus } from './raid-device';

const B = BLOCK_SIZE_BYTES;
/** Stripes in use per batch: a batch's stripes run concurrently, the batches in order (progress is persisted only at a batch's end). */
export const BATCH_STRIPES = 64;
/** Progress is persisted (the new member synced first) at the end of a batch when this long has passed since the last time. */
export const PROGRESS_PERSIST_MS = 1000;
/** Stripe runs rebuilt at once inside a batch. */
export const REBUILD_RUNS_IN_FLIGHT = 4;
/** Consecutive stripes rebuilt as one run (one read per member, one write: large I/Os) where the level allows. */
export const REBUILD_RUN_STRIPES_MAX = 16;
/** The shortest window the progress figures' rate is taken over. */
const RATE_WINDOW_MIN_MS = 1000;
export interface RebuildRunOptions {
  raid: RaidDevice;
  /** The blocks in use now (the tree's usedBitmap(): active | summary). */
  usedBitmap: () => Buffer;
  clock: Clock;
  rateBytesPerSec?: number;
  /** Persists "every stripe in use below nextStripe is current on the new member". */
  persist: (nextStripe: number) => Promise<void>;
  /** Checked before each stripe: a reason to stop (the volume is closing), or undefined. */
  stopReason?: () => string | undefined;
  /** (tests) stop like a crash would after this many stripes in this run: progress persisted, an error thrown. */
  stopAfterStripes?: number;
  onProgress?: (s: RebuildStatus) => void;
}

export interface RebuildRunResult {
  stripesRebuilt: number;
  /** Of them, in the final pass (stripes a write that began before the rebuild left). */
  stripesLate: number;
  resumedAtStripe: number;
  bytesWritten: number;
  durationMs: number;
}

/** The stripes holding a block in use, ascending. */
export function stripesInUse(used: Buffer, stripeDataBlocks: number, stripes: number): number[] {
  const out: number[] = [];
  for (let s = 0; s < stripes; s++) {
    for (let p = s * stripeDataBlocks; p < (s + 1) * stripeDataBlocks; p++) {
      if (testBit(used, p)) {
        out.push(s);
        break;
      }
    }
  }
  return out;
}

/**
 * Runs the rebuild the RaidDevice has started (startRebuild), up to the point where every
 * stripe in use is current on the new member and that is durable; the caller then puts
 * it in service (finishRebuild, labels, volume label). Throws on a stop, a failure of
 * the new member, or a stripe the others cannot rebuild.
 */
export async function runRebuild(status: Omit<RebuildStatus, 'stripesDone' | 'stripesTotal' | 'stripesRebuilt' | 'doneBytes' | 'totalBytes' | 'bytesPerSec' | 'startedMs'>, o: RebuildRunOptions): Promise<RebuildRunResult> {
  const g = o.raid.geometry;
  const t0 = o.clock.nowMs();
  const unitBytes = g.unitBlocks * B;
  const limiter = o.rateBytesPerSec !== undefined ? new RateLimiter(o.rateBytesPerSec, o.clock) : undefined;
  let bytes = await o.raid.rebuildHead();
  const stripes = stripesInUse(o.usedBitmap(), g.stripeDataBlocks, g.stripes);
  const st: RebuildStatus = {
    ...status, startedMs: t0, stripesDone: 0, stripesTotal: stripes.length, stripesRebuilt: 0, doneBytes: 0, totalBytes: stripes.length * unitBytes, bytesPerSec: 0,
    ...(o.rateBytesPerSec !== undefined ? { rateBytesPerSec: o.rateBytesPerSec } : {}),
  };
  const publish = (): void => {
    // Over at least RATE_WINDOW_MIN_MS, and never above the limit: the first runs' burst must not promise an early end.
    const sec = Math.max(RATE_WINDOW_MIN_MS, o.clock.nowMs() - t0) / 1000;
    st.stripesRebuilt = rebuilt;
    st.doneBytes = st.stripesDone * unitBytes;
    st.bytesPerSec = Math.round(Math.min((rebuilt * unitBytes) / sec, o.rateBytesPerSec ?? Infinity));
    const eta = st.bytesPerSec > 0 ? Math.round((st.totalBytes - st.doneBytes) / st.bytesPerSec) : undefined;
    if (eta !== undefined) st.etaSeconds = eta;
    else delete st.etaSeconds;
    o.raid.rebuildStatus = { ...st };
    o.onProgress?.({ ...st });
  };
  let rebuilt = 0;
  publish();
  const headStripes = Math.ceil(g.headBlocks / g.stripeDataBlocks);
  // Rate-limited: runs of at most a tenth of a second's worth, so a pause (and a stop) stays short.
  const runMax = o.rateBytesPerSec !== undefined ? Math.max(1, Math.min(REBUILD_RUN_STRIPES_MAX, Math.floor(o.rateBytesPerSec / 10 / unitBytes))) : REBUILD_RUN_STRIPES_MAX;
  /** Consecutive stripes (ascending input) as runs: one stripe each unless the level rebuilds runs. */
  const runsOf = (ss: number[]): { first: number; count: number }[] => {
    const runs: { first: number; count: number }[] = [];
    for (const s of ss) {
      const last = runs[runs.length - 1];
      if (last && o.raid.canRebuildRuns() && s >= headStripes && last.first >= headStripes && last.first + last.count === s && last.count < runMax) last.count++;
      else runs.push({ first: s, count: 1 });
    }
    return runs;
  };
  const one = async (run: { first: number; count: number }): Promise<void> => {
    const why = o.stopReason?.();
    if (why !== undefined) throw new Error(`rebuild stopped at stripe ${run.first}: ${why}`);
    const n = run.count === 1 ? await o.raid.rebuildStripe(run.first) : await o.raid.rebuildRun(run.first, run.count);
    if (n > 0) {
      rebuilt += run.count;
      bytes += n;
      await limiter?.take(n);
    }
  };
  let persistedMs = o.clock.nowMs();
  for (let b = 0; b < stripes.length; b += BATCH_STRIPES) {
    const batch = stripes.slice(b, b + BATCH_STRIPES);
    if (o.stopAfterStripes !== undefined && rebuilt >= o.stopAfterStripes) {
      await o.raid.syncRebuildTarget();
      await o.persist(batch[0]!);
      throw new Error(`stopped after ${o.stopAfterStripes} stripes or more (${rebuilt}; test hook): run again to resume at stripe ${batch[0]!}`);
    }
    await forEachLimit(runsOf(batch.filter((s) => !o.raid.isRebuilt(s))), REBUILD_RUNS_IN_FLIGHT, async (run) => {
      await one(run);
      st.stripesDone += run.count;
      publish();
    });
    st.stripesDone = b + batch.length;
    // Every stripe in use below the batch's last + 1 is current: durable first, then say so.
    if (o.clock.nowMs() - persistedMs >= PROGRESS_PERSIST_MS) {
      await o.raid.syncRebuildTarget();
      await o.persist(batch[batch.length - 1]! + 1);
      persistedMs = o.clock.nowMs();
    }
    publish();
  }
  // The final pass: stripes in use now that are not current (a write that began before the rebuild).
  const late = stripesInUse(o.usedBitmap(), g.stripeDataBlocks, g.stripes).filter((s) => !o.raid.isRebuilt(s));
  await forEachLimit(runsOf(late), REBUILD_RUNS_IN_FLIGHT, one);
  await o.raid.syncRebuildTarget();
  await o.persist(g.stripes);
  publish();
  return { stripesRebuilt: rebuilt, stripesLate: late.length, resumedAtStripe: status.resumedAtStripe, bytesWritten: bytes, durationMs: o.clock.nowMs() - t0 };
}
