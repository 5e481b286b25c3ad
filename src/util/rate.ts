/**
 * A byte-rate pacer on the injected clock, and the parser for `--rate`-style options
 * (a RAID member's rebuild, a mirror's baseline and resync).
 *
 * Invariant: over any window longer than RATE_BURST_MS, take() lets through at most
 * rate x (window + RATE_BURST_MS) bytes (an idle limiter lets one burst of
 * RATE_BURST_MS's worth go at once).
 */
import { assert } from './assert';

/** The part of the injected clock (io/types.ts Clock) a pacer uses; util/ imports no layer above it. */
export interface PacerClock {
  nowMs(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
}

/** How far ahead of the rate an idle limiter may let a burst go. */
export const RATE_BURST_MS = 100;
/** The lowest rate limit accepted (below it a rebuild or a baseline would take longer than anyone waits). */
export const RATE_MIN_BYTES_PER_SEC = 64 * 1024;

/** A pacer: take(n) returns once n more bytes fit under the rate. */
export class RateLimiter {
  private nextMs: number | undefined;
  constructor(readonly bytesPerSec: number, private readonly clock: PacerClock) {
    assert(Number.isSafeInteger(bytesPerSec) && bytesPerSec >= RATE_MIN_BYTES_PER_SEC, `rate ${bytesPerSec} B/s below ${RATE_MIN_BYTES_PER_SEC}`);
  }

  async take(bytes: number): Promise<void> {
    const now = this.clock.nowMs();
    const from = Math.max(this.nextMs ?? now - RATE_BURST_MS, now - RATE_BURST_MS);
    this.nextMs = from + (bytes * 1000) / this.bytesPerSec;
    const waitMs = this.nextMs - now;
    if (waitMs > 0) await new Promise<void>((resolve) => this.clock.setTimeout(resolve, Math.ceil(waitMs)));
  }
}

/** Parses a rate option: a size per second ("50M", "50M/s"), at least RATE_MIN_BYTES_PER_SEC. One-line errors. */
export function parseRate(text: string, parseSize: (t: string) => number): number {
  const v = parseSize(text.replace(/\/s$/i, ''));
  if (v < RATE_MIN_BYTES_PER_SEC) throw new Error(`bad rate "${text}": at least ${RATE_MIN_BYTES_PER_SEC / 1024}K per second`);
  return v;
}
