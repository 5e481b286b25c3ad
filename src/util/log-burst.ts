/**
 * A cap on log lines for events that come in floods (a damaged region of a member read
 * block by block, every request of a client failing the same way): the first
 * LOG_BURST_LINES events of a window are logged one by one, the rest are counted and said
 * in one summary line when the window ends. The counters in status and the metrics keep
 * the exact numbers; the log keeps examples and the total, not one line per block.
 *
 * Invariants:
 * - Per window (LOG_BURST_WINDOW_MS from its first event), at most LOG_BURST_LINES events
 *   are logged one by one plus one summary; no event is left out of both.
 * - The summary of a window is said at its end (a timer that does not keep the process
 *   alive), at the next event after it, or at flush(), whichever comes first; never twice.
 */

/** Events logged one by one per window. */
export const LOG_BURST_LINES = 10;
/** The window, ms. */
export const LOG_BURST_WINDOW_MS = 10_000;

export interface BurstClock {
  nowMs(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
}

const wallClock: BurstClock = {
  nowMs: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return { cancel: () => clearTimeout(t) };
  },
};

export class LogBurst {
  private windowStartMs = -Infinity;
  private logged = 0;
  private left = 0;
  private timer: { cancel(): void } | undefined;

  /** `summary(n, windowMs)`: logs that n more events of the window were left out. */
  constructor(private readonly summary: (n: number, windowMs: number) => void, private readonly clock: BurstClock = wallClock,
    private readonly lines = LOG_BURST_LINES, private readonly windowMs = LOG_BURST_WINDOW_MS) {}

  /** One event: true when the caller logs it itself, false when it is counted for the summary. */
  take(): boolean {
    const now = this.clock.nowMs();
    if (now - this.windowStartMs >= this.windowMs) {
      this.flush();
      this.windowStartMs = now;
      this.logged = 0;
    }
    if (this.logged < this.lines) {
      this.logged++;
      return true;
    }
    this.left++;
    if (!this.timer) this.timer = this.clock.setTimeout(() => this.flush(), Math.max(0, this.windowStartMs + this.windowMs - now));
    return false;
  }

  /** Says the count left out so far, if any (e.g. at close). */
  flush(): void {
    this.timer?.cancel();
    this.timer = undefined;
    if (this.left === 0) return;
    const n = this.left;
    this.left = 0;
    this.summary(n, this.windowMs);
  }
}
