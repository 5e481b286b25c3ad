/**
 * A simulated Clock: time only moves when the simulator says so. setTimeout callbacks
 * wait in a heap until the simulator fires them (run/advanceBy), so timer CPs and I/O
 * latency are deterministic and cost no wall-clock time.
 *
 * Invariants:
 * - nowMs() never decreases; a timer fires at exactly its due time, timers due at the
 *   same time fire in the order they were set.
 * - A cancelled timer never fires; cancelAll() drops every pending timer (a simulated
 *   process crash: nothing of the dead process runs again).
 * - Pending timers are capped (TIMERS_MAX): more is a runaway simulation and asserts.
 * - Time jumps to the next timer only at a quiet point: QUIET_TURNS event-loop turns in
 *   a row in which no timer was set and the `activity` probe (e.g. the count of I/O
 *   calls the fault layer saw) did not move. Work that keeps yielding (setImmediate)
 *   without I/O still runs ahead of simulated time. The engine's Slicers yield by this
 *   clock's slice time (sliceNowMs: a count of their checks, not wall time), so the
 *   turns they take, and with them every quiet point, are the same in every run of a seed.
 * - run() never spins forever: it throws SimStallError when the awaited promise stays
 *   pending with no timer to fire for IDLE_TURNS_MAX event-loop turns, or after
 *   turnsMax turns in all.
 */
import type { Clock } from '../io/types';
import { assert } from '../util/assert';

export const TIMERS_MAX = 100_000;
const IDLE_TURNS_MAX = 2000;
export const QUIET_TURNS = 4;
/** What one Slicer check costs in slice time (sliceNowMs). */
export const SLICE_CHECK_MS = 0.0625;
const RUN_TURNS_MAX_DEFAULT = 2_000_000;

interface Timer {
  dueMs: number;
  order: number;
  fn: () => void;
  cancelled: boolean;
}

export class SimStallError extends Error {
  override name = 'SimStallError';
}

/** One real event-loop turn: lets microtasks and setImmediate work run. */
export function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class SimClock implements Clock {
  private now: number;
  private order = 0;
  private readonly heap: Timer[] = [];
  private live = 0;
  /** Timers fired so far (for reports). */
  fired = 0;
  /** Timers ever set (part of the activity that defers a quiet point). */
  private setCount = 0;
  /** A counter that moves whenever the simulated system does something observable. */
  activity: (() => number) | undefined;
  private lastActivity = -1;
  private quietTurns = 0;
  private sliceChecks = 0;

  constructor(startMs = 1_700_000_000_000) {
    assert(Number.isFinite(startMs) && startMs >= 0, `bad start time ${startMs}`);
    this.now = startMs;
  }

  nowMs(): number {
    return this.now;
  }

  /**
   * Slice time for the engine's Slicers: each check counts SLICE_CHECK_MS, so at the
   * default 0.25 ms budget every fourth check yields (about what a check every 64 blocks
   * at ~1 us each gives on a real CPU), at the same points in every run of a seed.
   */
  sliceNowMs(): number {
    return this.sliceChecks++ * SLICE_CHECK_MS;
  }

  setTimeout(fn: () => void, ms: number): { cancel(): void } {
    assert(Number.isFinite(ms), `setTimeout: bad delay ${ms}`);
    assert(this.live < TIMERS_MAX, `simulated clock: more than ${TIMERS_MAX} pending timers`);
    const t: Timer = { dueMs: this.now + Math.max(0, ms), order: this.order++, fn, cancelled: false };
    this.push(t);
    this.live++;
    this.setCount++;
    return {
      cancel: () => {
        if (t.cancelled) return;
        t.cancelled = true;
        this.live--;
      },
    };
  }

  /** Resolves after `ms` of simulated time. */
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => this.setTimeout(resolve, ms));
  }

  get pendingTimers(): number {
    return this.live;
  }

  /** Due time of the earliest live timer, or undefined. */
  nextDueMs(): number | undefined {
    this.dropCancelled();
    return this.heap[0]?.dueMs;
  }

  /** Advances to the earliest timer and fires every timer due then. False if none. */
  fireNext(): boolean {
    const due = this.nextDueMs();
    if (due === undefined) return false;
    if (due > this.now) this.now = due;
    for (;;) {
      this.dropCancelled();
      const t = this.heap[0];
      if (!t || t.dueMs > this.now) break;
      this.pop();
      t.cancelled = true;
      this.live--;
      this.fired++;
      t.fn();
    }
    return true;
  }

  /** Moves time forward by ms, firing every timer due on the way (with event-loop turns between). */
  async advanceBy(ms: number): Promise<void> {
    assert(Number.isFinite(ms) && ms >= 0, `advanceBy: bad ${ms}`);
    const target = this.now + ms;
    for (;;) {
      if (!(await this.quietTurn())) continue;
      const due = this.nextDueMs();
      if (due === undefined || due > target) break;
      this.fireNext();
    }
    this.now = target;
    await turn();
  }

  /** One event-loop turn; true once the system has been quiet for QUIET_TURNS turns. */
  private async quietTurn(): Promise<boolean> {
    await turn();
    const a = this.setCount + (this.activity?.() ?? 0);
    if (a !== this.lastActivity) {
      this.lastActivity = a;
      this.quietTurns = 0;
      return false;
    }
    if (++this.quietTurns < QUIET_TURNS) return false;
    this.quietTurns = 0;
    return true;
  }

  /** Drops every pending timer (the process that set them is gone). */
  cancelAll(): void {
    for (const t of this.heap) t.cancelled = true;
    this.heap.length = 0;
    this.live = 0;
  }

  /**
   * One scheduler step: an event-loop turn; then, if the system has been quiet for
   * QUIET_TURNS turns, simulated time jumps to the next timer. Returns 'fired',
   * 'busy' (not quiet yet) or 'idle' (quiet, and no timer to fire).
   */
  async tick(): Promise<'fired' | 'busy' | 'idle'> {
    if (!(await this.quietTurn())) return 'busy';
    return this.fireNext() ? 'fired' : 'idle';
  }

  /**
   * Drives the simulation until `p` settles: event-loop turns first, and at quiet
   * points simulated time jumps to the next timer. Returns p's outcome.
   */
  async run<T>(p: Promise<T>, turnsMax = RUN_TURNS_MAX_DEFAULT): Promise<T> {
    let done = false;
    p.then(() => { done = true; }, () => { done = true; });
    let idle = 0;
    for (let turns = 0; !done; turns++) {
      if (turns >= turnsMax) throw new SimStallError(`simulation did not settle within ${turnsMax} turns`);
      const r = await this.tick();
      if (done) break;
      if (r === 'idle') {
        if (++idle * QUIET_TURNS >= IDLE_TURNS_MAX) throw new SimStallError(`operation pending with no timer to fire for ${IDLE_TURNS_MAX} turns (hang)`);
      } else if (r === 'fired') idle = 0;
    }
    return p;
  }

  /** Runs `steps` scheduler steps (see tick). */
  async step(steps: number): Promise<void> {
    for (let i = 0; i < steps; i++) await this.tick();
  }

  // ---- binary heap on (dueMs, order) ----

  private less(a: Timer, b: Timer): boolean {
    return a.dueMs < b.dueMs || (a.dueMs === b.dueMs && a.order < b.order);
  }

  private dropCancelled(): void {
    while (this.heap.length > 0 && this.heap[0]!.cancelled) this.pop();
  }

  private push(t: Timer): void {
    const h = this.heap;
    h.push(t);
    let i = h.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(h[i]!, h[parent]!)) break;
      [h[i], h[parent]] = [h[parent]!, h[i]!];
      i = parent;
    }
  }

  private pop(): Timer | undefined {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    if (h.length > 0 && last) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && this.less(h[l]!, h[m]!)) m = l;
        if (r < h.length && this.less(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }
}
