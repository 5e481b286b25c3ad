/**
 * Preload (`node -r precise-timers.js test/net/relay.js OPTS`) that gives the TCP relay of
 * test/net/relay.ts sub-millisecond delays, for the mirror suite's "1 ms RTT" runs.
 *
 * Why: the relay holds each chunk until `arrival + delayMs` (Date.now() arithmetic) and
 * waits with setTimeout. Node rounds every timeout below 1 ms up to 1 ms and Date.now()
 * is whole milliseconds, so any delayMs > 0 costs at least ~1.1 ms per direction:
 * delayMs 0.5 each way measured 2.3 ms of round trip (relay without delay: 0.12 ms).
 *
 * What it changes, in the relay's process only:
 * - Date.now() returns fractional milliseconds (same epoch, from the monotonic clock);
 * - setTimeout with a delay below SHORT_TIMER_MS fires from a worker thread that sleeps
 *   with Atomics.wait (sub-millisecond timeouts) and wakes the main loop with a message;
 *   clearTimeout cancels those. Longer timers are Node's own.
 *
 * Invariants: a short timer never fires before its due time (the relay re-checks with
 * Date.now() anyway); the worker sleeps while no short timer is pending (no spinning).
 */
import { isMainThread, Worker } from 'worker_threads';

const SHORT_TIMER_MS = 5;

interface ShortTimer {
  due: number;
  fn: (...args: unknown[]) => void;
  args: unknown[];
  cancelled: boolean;
  /** Looks enough like a Node Timeout for callers that ref/unref it. */
  ref(): ShortTimer;
  unref(): ShortTimer;
  hasRef(): boolean;
}

const hr = (): number => Number(process.hrtime.bigint()) / 1e6;

const WORKER_SOURCE = `
const { workerData, parentPort } = require('worker_threads');
const deadline = new Float64Array(workerData, 0, 1);
const seq = new Int32Array(workerData, 8, 1);
const hr = () => Number(process.hrtime.bigint()) / 1e6;
let fired = -1;
for (;;) {
  const s = Atomics.load(seq, 0);
  const d = deadline[0];
  if (s === fired || d === Infinity) { Atomics.wait(seq, 0, s); continue; }
  const now = hr();
  if (d > now) { Atomics.wait(seq, 0, s, d - now); continue; }
  fired = s;
  parentPort.postMessage(0);
}
`;

function install(): void {
  const origin = Date.now() - hr();
  Date.now = (): number => origin + hr();

  const shared = new SharedArrayBuffer(16);
  const deadline = new Float64Array(shared, 0, 1);
  const seq = new Int32Array(shared, 8, 1);
  deadline[0] = Infinity;
  let pending: ShortTimer[] = [];
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: shared });
  worker.unref();

  const arm = (): void => {
    let next = Infinity;
    for (const t of pending) if (t.due < next) next = t.due;
    deadline[0] = next;
    Atomics.add(seq, 0, 1);
    Atomics.notify(seq, 0);
  };
  worker.on('message', () => {
    const now = hr();
    const due = pending.filter((t) => !t.cancelled && t.due <= now);
    pending = pending.filter((t) => !t.cancelled && t.due > now);
    arm();
    for (const t of due) t.fn(...t.args);
  });

  const nodeSetTimeout = globalThis.setTimeout;
  const nodeClearTimeout = globalThis.clearTimeout;
  const short = (fn: (...args: unknown[]) => void, ms: number, args: unknown[]): ShortTimer => {
    const t: ShortTimer = {
      due: hr() + Math.max(0, ms),
      fn,
      args,
      cancelled: false,
      ref: () => t,
      unref: () => t,
      hasRef: () => true,
    };
    pending.push(t);
    if (t.due < (deadline[0] as number)) arm();
    return t;
  };
  const patchedSetTimeout = ((fn: (...args: unknown[]) => void, ms?: number, ...args: unknown[]) => {
    if (typeof fn === 'function' && typeof ms === 'number' && ms < SHORT_TIMER_MS) return short(fn, ms, args);
    return nodeSetTimeout(fn, ms, ...args);
  }) as unknown as typeof setTimeout;
  globalThis.setTimeout = patchedSetTimeout;
  globalThis.clearTimeout = ((h: unknown) => {
    if (h !== null && typeof h === 'object' && pending.includes(h as ShortTimer)) {
      (h as ShortTimer).cancelled = true;
      pending = pending.filter((t) => t !== h);
      return;
    }
    nodeClearTimeout(h as Parameters<typeof clearTimeout>[0]);
  }) as typeof clearTimeout;
}

if (isMainThread) install();
