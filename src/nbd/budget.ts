/**
 * One memory budget for the whole NBD server: the bytes of request payloads being
 * received and of READ replies not yet taken by the kernel, over every connection.
 * A connection charges a request before it buffers anything for it; when the budget is
 * spent it stops reading from its socket and waits in line until others release.
 *
 * Invariants:
 * - usedBytes <= capacityBytes, always (a charge that does not fit waits, it is never
 *   granted in part or over the cap).
 * - Every charge is released exactly once by its owner (the connection ledger in
 *   transmission.ts releases whatever a closed connection still holds, at once).
 * - Waiters are granted in arrival order, with one exception: a small charge
 *   (<= SMALL_CHARGE_BYTES_MAX) may pass waiting ones through the small lane, as long as
 *   the lane's outstanding charges stay <= SMALL_LANE_BYTES. A well-behaved client's 4 KiB
 *   request thus waits for the next release, not behind every queued 64 MiB write; and
 *   a large waiter is delayed by at most SMALL_LANE_BYTES of small charges (no starvation).
 * - capacityBytes >= MAX_PAYLOAD_BYTES + SMALL_LANE_BYTES, so every admissible request
 *   can be granted once the others have released.
 */
import { assert } from '../util/assert';
import { MEMORY_BUDGET_BYTES_MIN, SMALL_CHARGE_BYTES_MAX, SMALL_LANE_BYTES } from './limits';
import { MAX_PAYLOAD_BYTES } from './protocol';

assert(MEMORY_BUDGET_BYTES_MIN >= MAX_PAYLOAD_BYTES + SMALL_LANE_BYTES, 'a maximal request must fit beside a full small lane');

/** A granted charge; give it back to release(). */
export interface Charge {
  readonly bytes: number;
  /** Granted through the small lane (passing waiters). */
  readonly lane: boolean;
}

interface Waiter {
  bytes: number;
  grant: (c: Charge) => void;
  cancelled: boolean;
}

export class MemoryBudget {
  private used = 0;
  private laneUsed = 0;
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

  /** A charge now if `bytes` fit (in line, or through the small lane); undefined otherwise. */
  tryCharge(bytes: number): Charge | undefined {
    this.check(bytes);
    if (this.used + bytes > this.capacityBytes) return undefined;
    if (this.waiters.length === 0) return this.add(bytes, false);
    if (this.laneFits(bytes)) return this.add(bytes, true);
    return undefined;
  }

  /**
   * Queues a charge; `grant` runs (on a later tick) once it is charged to the caller,
   * who then owns it. Returns a cancel function for a caller that goes away first (after
   * a grant it does nothing: release what was granted instead).
   */
  wait(bytes: number, grant: (c: Charge) => void): () => void {
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

  release(c: Charge): void {
    assert(c.bytes > 0 && c.bytes <= this.used, `budget release of ${c.bytes} with ${this.used} used`);
    this.used -= c.bytes;
    if (c.lane) {
      assert(c.bytes <= this.laneUsed);
      this.laneUsed -= c.bytes;
    }
    this.grantWaiters();
  }

  private check(bytes: number): void {
    assert(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= this.capacityBytes - SMALL_LANE_BYTES, `budget charge of ${bytes} bytes (capacity ${this.capacityBytes})`);
  }

  private laneFits(bytes: number): boolean {
    return bytes <= SMALL_CHARGE_BYTES_MAX && this.laneUsed + bytes <= SMALL_LANE_BYTES;
  }

  private add(bytes: number, lane: boolean): Charge {
    this.used += bytes;
    if (lane) this.laneUsed += bytes;
    if (this.used > this.peak) this.peak = this.used;
    assert(this.used <= this.capacityBytes && this.laneUsed <= SMALL_LANE_BYTES);
    return { bytes, lane };
  }

  private grantWaiters(): void {
    // In order while the head fits; then small waiters behind it through the lane.
    for (let i = 0; i < this.waiters.length; ) {
      const w = this.waiters[i] as Waiter;
      if (this.used + w.bytes > this.capacityBytes) {
        i++;
        continue;
      }
      let lane: boolean;
      if (i === 0) lane = false;
      else if (this.laneFits(w.bytes)) lane = true;
      else {
        i++;
        continue;
      }
      this.waiters.splice(i, 1);
      const c = this.add(w.bytes, lane);
      w.cancelled = true; // a late cancel must not touch the queue again
      // Granted on a later tick: release() is called from deep inside request handling.
      process.nextTick(() => w.grant(c));
    }
  }
}
