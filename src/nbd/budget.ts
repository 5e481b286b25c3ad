/**
 * One memory budget for the whole NBD server: the bytes of request payloads being
 * received and of READ replies not yet taken by the kernel, over every connection.
 * A connection charges a request before it buffers anything for it; when the budget is
 * spent it stops reading from its socket and waits in line (FIFO) until others release.
 *
 * Invariants:
 * - usedBytes <= capacityBytes, always (a charge that does not fit waits, it is never
 *   granted in part or over the cap).
 * - Every charge is released exactly once by its owner (the connection ledger in
 *   transmission.ts releases whatever a closed connection still holds, at once).
 * - Waiters are granted in arrival order; a waiter is never granted while an earlier one
 *   still waits (no starvation of large requests by small ones).
 * - capacityBytes >= MAX_PAYLOAD_BYTES, so every admissible request can be granted once
 *   the others have released.
 */
import { assert } from '../util/assert';
import { MEMORY_BUDGET_BYTES_MIN } from './limits';

interface Waiter {
  bytes: number;
  grant: () => void;
  cancelled: boolean;
}

export class MemoryBudget {
  private used = 0;
  private peak = 0;
  private readonly waiters: Waiter[] = [];

  constructor(readonly capacityBytes: number) {
    assert(Number.isSafeInteger(capacityBytes) && capacityBytes >= MEMORY_BUDGET_BYTES_MIN, `memory budget ${capacityBytes} below ${MEMORY_BUDGET_BYTES_MIN} bytes`);
  }

  get usedBytes(): number {
    return this.used;
  }

  get peakBytes(): number {
    return this.peak;
  }

  get waiting(): number {
    return this.waiters.length;
  }

  /** Charges `bytes` now if they fit and nobody waits ahead; false otherwise. */
  tryCharge(bytes: number): boolean {
    this.check(bytes);
    if (this.waiters.length > 0 || this.used + bytes > this.capacityBytes) return false;
    this.add(bytes);
    return true;
  }

  /**
   * Queues a charge; `grant` runs (on a later tick) once `bytes` are charged to the
   * caller, who then owns them. Returns a cancel function for a caller that goes away
   * first (after a grant it does nothing: release what was granted instead).
   */
  wait(bytes: number, grant: () => void): () => void {
    this.check(bytes);
    const w: Waiter = { bytes, grant, cancelled: false };
    this.waiters.push(w);
    this.grantWaiters();
    return () => {
      if (w.cancelled) return;
      w.cancelled = true;
      const i = this.waiters.indexOf(w);
      if (i >= 0) this.waiters.splice(i, 1);
      this.grantWaiters();
    };
  }

  release(bytes: number): void {
    assert(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= this.used, `budget release of ${bytes} with ${this.used} used`);
    this.used -= bytes;
    this.grantWaiters();
  }

  private check(bytes: number): void {
    assert(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= this.capacityBytes, `budget charge of ${bytes} bytes (capacity ${this.capacityBytes})`);
  }

  private add(bytes: number): void {
    this.used += bytes;
    if (this.used > this.peak) this.peak = this.used;
    assert(this.used <= this.capacityBytes);
  }

  private grantWaiters(): void {
    for (;;) {
      const w = this.waiters[0];
      if (!w || this.used + w.bytes > this.capacityBytes) return;
      this.waiters.shift();
      this.add(w.bytes);
      w.cancelled = true; // a late cancel must not touch the queue again
      // Granted on a later tick: release() is called from deep inside request handling.
      process.nextTick(w.grant);
    }
  }
}
