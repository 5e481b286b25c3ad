/**
 * CP urgency: a seam between the engine, which knows when a CP has become what clients
 * wait for, and the process, which decides what that changes (the CLI raises the event
 * loop's priority back to the clients' threads' while any CP is urgent:
 * src/cli/priority.ts). With no handler set (tests, library use) it only counts.
 *
 * Invariants:
 * - The handler sees changes only: true when the first urgent CP begins, false when the
 *   last one ends (one process may run many volumes' CPs, e.g. a receiver's fan-in).
 * - Each begin's end function counts once, however often it is called.
 * - A handler that throws is dropped after logging once: urgency is a hint, never a CP failure.
 */
import { assert } from './assert';
import { log } from './log';

type Handler = (urgent: boolean) => void;

let handler: Handler | undefined;
let urgentCount = 0;

/** Sets (or clears, with undefined) the process's handler. */
export function setCpUrgencyHandler(h: Handler | undefined): void {
  handler = h;
}

function tell(urgent: boolean): void {
  const h = handler;
  if (!h) return;
  try {
    h(urgent);
  } catch (e) {
    handler = undefined;
    log().warn({ err: e instanceof Error ? e.message : String(e) }, 'CP urgency handler failed; CPs keep the background priority');
  }
}

/** A CP became what clients wait for; call the returned function when it ends. */
export function beginUrgentCp(): () => void {
  if (urgentCount++ === 0) tell(true);
  let ended = false;
  return () => {
    if (ended) return;
    ended = true;
    assert(urgentCount > 0, 'urgent CP count below zero');
    if (--urgentCount === 0) tell(false);
  };
}

/** How many CPs are urgent now (tests). */
export function urgentCpCount(): number {
  return urgentCount;
}
