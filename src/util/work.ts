/**
 * Helpers that keep long tree work off the event loop's critical path: a bounded
 * concurrency pool for I/O and a cooperative yield for CPU loops.
 *
 * Invariants:
 * - forEachLimit never runs more than `limit` calls at once and rejects with the first
 *   error after every started call has settled.
 * - Slicer.maybeYield yields (setImmediate) at most every `budgetMs` of CPU work.
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

export class Slicer {
  private last = performance.now();
  /** 1 ms: a CP slice must not add more than that to a client request's latency. */
  constructor(private readonly budgetMs = 1) {}

  async maybeYield(): Promise<void> {
    const now = performance.now();
    if (now - this.last < this.budgetMs) return;
    await yieldNow();
    this.last = performance.now();
  }
}
