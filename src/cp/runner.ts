/**
 * The consistency-point scheduler: decides when a CP runs (a half filled, the interval
 * timer fired, or someone asked: snapshot ops, flush-to-tree, close) and runs them one
 * at a time.
 *
 * Invariants:
 * - At most one CP runs at a time (`loop` is the only caller of commitHalf after open).
 * - A demand with target seq T resolves only after a CP whose watermark is >= T is
 *   durable; its snapshot ops are applied in that CP (so a snapshot holds every write
 *   acknowledged before it was asked for).
 * - The timer only freezes a non-empty active half; the loop never spins: each pass
 *   either commits a half, commits the pending ops, or stops.
 * - Pending demands are capped (DEMANDS_MAX); more are refused with an error, not queued.
 * - A failed CP fails the log (EIO for every later write) and every pending demand;
 *   the durable state on disk is the previous CP plus the NVRAM, which recovery replays.
 */
import type { Clock } from '../io/types';
import type { BlockTreeApi, CommitResult, SnapshotOp } from '../tree/types';
import type { NvLog } from '../nvlog/log';
import { VolumeError } from '../util/errors';
import { assert } from '../util/assert';
import { log as logger } from '../util/log';
import { yieldNow } from '../util/work';
import { beginCp, beginUrgentCp } from '../util/urgency';
import { commitHalf } from './commit-half';
import type { EarlyPlacer } from './early-place';

export const DEMANDS_MAX = 1024;
/**
 * A running CP is urgent once the active half is this full: at the rate it filled, writers
 * will wait for this CP before long. Under a sustained 4k random write load on a 2-core
 * machine the background-priority CP took about as long as a half took to fill; at the
 * clients' priority it ends sooner and the NVRAM-full stalls shorten (docs/benchmarks.md).
 */
export const URGENT_ACTIVE_FILL = 0.25;
/** How often a running CP looks at the active half (ms). */
const URGENCY_POLL_MS = 5;
export const CP_INTERVAL_MS_DEFAULT = 10_000;

export interface CpRunnerOptions {
  log: NvLog;
  tree: BlockTreeApi;
  clock: Clock;
  /** Timer period; 0 disables the timer. */
  cpIntervalMs: number;
  /** Places large writes' data ahead of their CP (early-place.ts); told when each half's CP begins and ends. */
  placer?: EarlyPlacer | undefined;
}

export interface CpStats {
  cpsRun: number;
  running: boolean;
  lastCpDurationMs: number;
  lastCpEndMs: number;
  cpDurationMsMax: number;
  /** CPs that became urgent while they ran (URGENT_ACTIVE_FILL). */
  urgentCps: number;
  /** Why the volume stopped taking writes: the CP that failed (absent while none has). */
  failure?: string;
  /** Its VolumeError code: what the clients' writes fail with (ENOSPC for a full file system). */
  failureCode?: string;
}

interface Demand {
  targetSeq: number;
  ops: SnapshotOp[];
  resolve: (r: CommitResult | undefined) => void;
  reject: (e: Error) => void;
}

export class CpRunner {
  private readonly log: NvLog;
  private readonly tree: BlockTreeApi;
  private readonly clock: Clock;
  private readonly intervalMs: number;
  private readonly placer: EarlyPlacer | undefined;
  private timer: { cancel(): void } | undefined;
  private loopPromise: Promise<void> | undefined;
  private looping = false;
  private readonly demands: Demand[] = [];
  private failure: VolumeError | undefined;
  private stopped = false;
  private readonly st: CpStats = { cpsRun: 0, running: false, lastCpDurationMs: 0, lastCpEndMs: 0, cpDurationMsMax: 0, urgentCps: 0 };
  /** Called after each CP commits (for status, control socket, mirroring later). */
  onCommitted: ((r: CommitResult) => void) | undefined;

  constructor(opts: CpRunnerOptions) {
    assert(opts.cpIntervalMs >= 0 && Number.isFinite(opts.cpIntervalMs), `bad cpIntervalMs ${opts.cpIntervalMs}`);
    this.log = opts.log;
    this.tree = opts.tree;
    this.clock = opts.clock;
    this.intervalMs = opts.cpIntervalMs;
    this.placer = opts.placer;
    this.log.onFrozen = () => this.kick();
    this.armTimer();
  }

  stats(): CpStats {
    return { ...this.st, ...(this.failure ? { failure: this.failure.message, failureCode: this.failure.code } : {}) };
  }

  private armTimer(): void {
    if (this.intervalMs === 0 || this.stopped) return;
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined;
      if (this.stopped) return;
      if (!this.st.running) this.log.freezeActive(); // triggers kick() through onFrozen
      this.armTimer();
    }, this.intervalMs);
  }

  /** Starts the loop if it is not running. */
  kick(): void {
    if (this.looping || this.failure) return;
    // Set before loop() runs: its synchronous part may freeze a half, which calls kick() again.
    this.looping = true;
    this.loopPromise = this.loop().finally(() => {
      this.looping = false;
      this.loopPromise = undefined;
      // Work may have arrived while the loop was finishing.
      if (!this.failure && (this.log.frozenHalf() || this.demands.length > 0)) this.kick();
    });
  }

  /**
   * Runs CPs until everything appended before this call is in the tree, applying `ops`
   * in the CP that gets there. Resolves with that CP's result (undefined if nothing
   * needed committing and there were no ops).
   */
  requestCp(ops: SnapshotOp[] = []): Promise<CommitResult | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.stopped) return Promise.reject(new VolumeError('ESHUTDOWN', 'volume is closing'));
    if (this.demands.length >= DEMANDS_MAX) return Promise.reject(new VolumeError('ENOMEM', `more than ${DEMANDS_MAX} CP requests pending`));
    return new Promise((resolve, reject) => {
      this.demands.push({ targetSeq: this.log.lastSeq, ops: [...ops], resolve, reject });
      this.kick();
    });
  }

  private async loop(): Promise<void> {
    try {
      // kick() runs inside the append that froze a half (onFrozen): start the CP on the
      // next event-loop turn, so that write is answered first and the CP's first slice
      // does not run inside a client request.
      await yieldNow();
      for (;;) {
        const frozen = this.log.frozenHalf();
        const committedSeq = this.tree.stats().meta.nvlogSeq;
        if (frozen) {
          const ready = this.demands.filter((d) => d.targetSeq <= frozen.lastSeq);
          const ops = ready.flatMap((d) => d.ops);
          const r = await this.runOne(async () => {
            const res = await commitHalf(this.log, this.tree, frozen, { nvlogSeq: frozen.lastSeq, nvlogEpoch: this.log.epoch }, ops, this.placer);
            this.log.releaseFrozen(frozen);
            return res.commits[res.commits.length - 1];
          });
          this.settle(ready, r);
          continue;
        }
        if (this.demands.length === 0) return;
        // Demands beyond the committed watermark need the active half frozen first.
        if (this.demands.some((d) => d.targetSeq > committedSeq)) {
          if (!this.log.freezeActive()) {
            if (this.log.failed) throw new VolumeError('EIO', 'NVRAM log failed');
            assert(false, 'active half empty but a demand is beyond the committed watermark');
          }
          continue;
        }
        // Everything demanded is committed: an empty CP applies pending snapshot ops.
        const ready = [...this.demands];
        const ops = ready.flatMap((d) => d.ops);
        if (ops.length === 0) {
          this.settle(ready, undefined);
          continue;
        }
        const r = await this.runOne(() => this.tree.commitCp([], { nvlogSeq: committedSeq, nvlogEpoch: this.tree.stats().meta.nvlogEpoch }, ops));
        this.settle(ready, r);
      }
    } catch (e) {
      const err = e instanceof VolumeError ? e : new VolumeError('EIO', `consistency point failed: ${e instanceof Error ? e.message : String(e)}`);
      logger().error({ err: e }, 'consistency point failed; the volume stops taking writes (recovery will replay the NVRAM log)');
      this.failure = err;
      this.log.fail(err);
      for (const d of this.demands.splice(0)) d.reject(err);
    }
  }

  /**
   * Watches the active half while a CP runs: once it is URGENT_ACTIVE_FILL full (or
   * appends already wait for space), writers will wait for this CP, and the process is
   * told (util/urgency.ts) until the CP ends. Returns the stop function.
   */
  private watchUrgency(): () => void {
    let timer: { cancel(): void } | undefined;
    let stopped = false;
    let endUrgent: (() => void) | undefined;
    const check = (): void => {
      timer = undefined;
      if (stopped) return;
      if (this.log.spaceWaitersCount > 0 || this.log.activeFill() >= URGENT_ACTIVE_FILL) {
        this.st.urgentCps++;
        endUrgent = beginUrgentCp();
        return;
      }
      timer = this.clock.setTimeout(check, URGENCY_POLL_MS);
    };
    check();
    return () => {
      stopped = true;
      timer?.cancel();
      endUrgent?.();
    };
  }

  private async runOne(fn: () => Promise<CommitResult | undefined>): Promise<CommitResult | undefined> {
    const t0 = this.clock.nowMs();
    this.st.running = true;
    const endCp = beginCp();
    const stopWatch = this.watchUrgency();
    try {
      const r = await fn();
      const t1 = this.clock.nowMs();
      this.st.cpsRun++;
      this.st.lastCpDurationMs = t1 - t0;
      this.st.lastCpEndMs = t1;
      this.st.cpDurationMsMax = Math.max(this.st.cpDurationMsMax, t1 - t0);
      if (r) {
        logger().debug({ cp: r.cpNumber, startMs: t0, durationMs: t1 - t0, blocksWritten: r.blocksWritten, dataBlocks: r.dataBlocks, earlyBlocks: r.earlyBlocks, blocksFreed: r.blocksFreed, phases: r.phases }, 'consistency point committed');
        this.onCommitted?.(r);
      }
      return r;
    } finally {
      stopWatch();
      endCp();
      this.st.running = false;
    }
  }

  private settle(ready: Demand[], r: CommitResult | undefined): void {
    for (const d of ready) {
      const i = this.demands.indexOf(d);
      assert(i >= 0, 'demand settled twice');
      this.demands.splice(i, 1);
      d.resolve(r);
    }
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /** Waits for the running CP, commits everything logged, and stops the timer. */
  /**
   * Runs a final CP and stops. Rejects if any CP failed (then, or earlier): a close that
   * could not commit everything acknowledged must not look clean (the NVRAM still holds
   * the records, and the next open replays them).
   */
  async close(): Promise<void> {
    this.armTimerCancel();
    try {
      if (!this.failure) await this.requestCp();
    } finally {
      this.stopped = true;
      this.armTimerCancel();
      await this.loopPromise;
    }
    if (this.failure) throw this.failure;
  }

  private armTimerCancel(): void {
    this.timer?.cancel();
    this.timer = undefined;
  }
}
