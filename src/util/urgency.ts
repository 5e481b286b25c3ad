/**
 * CP activity: a seam between the engine, which knows when a CP runs and when it has
 * become what clients wait for, and the process, which decides what that changes. Two
 * signals:
 * - running: some CP of the process is running (the CLI stops the NBD threads'
 *   busy-polling meanwhile: src/cli/priority.ts);
 * - urgent: some CP is what clients wait for (the CLI raises the event loop's priority
 *   back to the clients' threads' meanwhile: src/cli/priority.ts).
 * With no handler set (tests, library use) each only counts.
 *
 * Invariants:
 * - A handler sees changes only: true when the first CP (urgent CP) begins, false when
 *   the last one ends (one process may run many volumes' CPs, e.g. a receiver's fan-in).
 * - Each begin's end function counts once, however often it is called.
 * - A handler that throws is dropped after logging once: these are hints, never a CP failure.
 */
import { assert } from './assert';
import { log } from './log';

type Handler = (on: boolean) => void;

class Signal {
  handler: Handler | undefined;
  count = 0;

  constructor(private readonly name: string, private readonly droppedMsg: string) {}

  private tell(on: boolean): void {
    const h = this.handler;
    if (!h) return;
    try {
      h(on);
    } catch (e) {
      this.handler = undefined;
      log().warn({ err: e instanceof Error ? e.message : String(e) }, this.droppedMsg);
    }
  }

  begin(): () => void {
    if (this.count++ === 0) this.tell(true);
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      assert(this.count > 0, `${this.name} count below zero`);
      if (--this.count === 0) this.tell(false);
    };
  }
}

const urgent = new Signal('urgent CP', 'CP urgency handler failed; CPs keep the background priority');
const running = new Signal('running CP', 'CP running handler failed; the NBD threads keep busy-polling during CPs');

/** Sets (or clears, with undefined) the process's urgency handler. */
export function setCpUrgencyHandler(h: Handler | undefined): void {
  urgent.handler = h;
}

/** A CP became what clients wait for; call the returned function when it ends. */
export function beginUrgentCp(): () => void {
  return urgent.begin();
}

/** How many CPs are urgent now (tests). */
export function urgentCpCount(): number {
  return urgent.count;
}

/** Sets (or clears, with undefined) the process's handler for CPs running. */
export function setCpRunningHandler(h: Handler | undefined): void {
  running.handler = h;
}

/** A CP began; call the returned function when it ends. */
export function beginCp(): () => void {
  return running.begin();
}

/** How many CPs run now (tests). */
export function runningCpCount(): number {
  return running.count;
}
