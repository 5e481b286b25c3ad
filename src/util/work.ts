/**
 * Helpers that keep long tree work off the event loop's critical path: a bounded
 * concurrency pool for I/O and a cooperative yield for CPU loops.
 *
 * Invariants:
 * - forEachLimit never runs more than `limit` calls at once and rejects with the first
 *   error after every started call has settled.
 * - Slicer.maybeYield yields (setImmediate) once `budgetMs` of CPU work has run since the
 *   last yield, counted across every caller of one Slicer: concurrent callers wait for the
 *   same yield, so one event-loop turn runs at most one budget of their work (plus the
 *   work between two maybeYield calls).
 */
import { performance } from 'node:perf_hooks';
import { assert } from './assert';

export async function forEachLimit<T>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  assert(Number.isInteger(limit) && limit >= 1, `concurrency limit ${limit}`);
  let next = 0;
  let failed: { e: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failed === undefined && next < items.length) {
      const i = next++;
      try {
        await fn(items[i]!, i);
      } catch (e) {
        if (failed === undefined) failed = { e };
      }
    }
  };
  const n = Math.min(limit, items.length);
  const workers: Promise<void>[] = [];
  for (let k = 0; k < n; k++) workers.push(worker());
  await Promise.all(workers);
  if (failed !== undefined) throw failed.e;
}

export function yieldNow(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * 0.25 ms: what a CP slice may add to a client request's latency. With CPs running most
 * of the time (a small NVRAM under steady writes), a request waits behind a slice about
 * as often as the p99 looks: at 1 ms the p99 of QD1 writes during CPs sat at 0.9-1.05 ms
 * (test/crash/cp-latency, quiet machine), at 0.25 ms 0.39-0.52 ms, CPs as long.
 */
export const SLICE_BUDGET_MS_DEFAULT = 0.25;

const RESOLVED: Promise<void> = Promise.resolve();

/**
 * A Slicer on `clock`'s slice time (Clock.sliceNowMs) when it has one, else on wall time.
 * Engine code that runs under the simulator makes its Slicers here.
 */
export function slicerFor(clock: { sliceNowMs?(): number } | undefined, budgetMs = SLICE_BUDGET_MS_DEFAULT): Slicer {
  const slice = clock?.sliceNowMs?.bind(clock);
  return slice ? new Slicer(budgetMs, slice) : new Slicer(budgetMs);
}

export class Slicer {
  private last: number;
  /** The yield in progress: every caller that arrives while it is pending waits for the same turn. */
  private pending: Promise<void> | undefined;

  /** @param nowMs a monotonic clock in ms (tests inject one) */
  constructor(private readonly budgetMs = SLICE_BUDGET_MS_DEFAULT, private readonly nowMs: () => number = () => performance.now()) {
    assert(budgetMs >= 0 && Number.isFinite(budgetMs), `slice budget ${budgetMs} ms`);
    this.last = nowMs();
  }

  /**
   * Yields (setImmediate) once the budget is spent. Callers running concurrently on one
   * Slicer (the workers of a forEachLimit) share the budget and the yield: when each
   * queued its own setImmediate, they all resumed in the same check phase, each with a
   * fresh budget, so one event-loop turn ran up to (workers x budget) of CP work before
   * the loop polled for client requests again.
   */
  maybeYield(): Promise<void> {
    if (this.pending) return this.pending;
    if (this.nowMs() - this.last < this.budgetMs) return RESOLVED;
    const p = yieldNow().then(() => {
      this.pending = undefined;
      this.last = this.nowMs();
    });
    this.pending = p;
    return p;
  }
}
