/**
 * One memory budget for the whole NBD server: the bytes of request payloads being
 * received and of READ replies not yet taken by the kernel, over every connection.
 * A connection charges a request before it buffers anything for it; when the budget is
 * spent it stops reading from its socket and waits in line until others release.
 *
 * Invariants:
 * - usedBytes <= capacityBytes, always (a charge that does not fit waits, it is never
 *   granted in part or over the cap): charges in line stay <= capacityBytes - laneBytes,
 *   lane charges <= laneBytes. The lane's bytes are a reserve large charges never take,
 *   so small requests flow even while 64 MiB ones hold the rest of the budget.
 * - Every charge is released exactly once by its owner (the connection ledger in
 *   transmission.ts releases whatever a closed connection still holds, at once).
 * - Waiters are granted in arrival order, with one exception: a small charge
 *   (<= SMALL_CHARGE_BYTES_MAX) may pass waiting ones through the small lane, as long as
 *   the lane's outstanding charges stay <= laneBytes (SMALL_LANE_BYTES_MAX, less in a
 *   budget too small for it) and its owner's (a connection's) <= SMALL_LANE_BYTES_PER_OWNER.
 *   A well-behaved client's 4 KiB request thus waits for the next release, not behind
 *   every queued 64 MiB write, even while a client that never reads its replies holds
 *   the lane charges it could get; and a large waiter is delayed by at most laneBytes of
 *   small charges (no starvation).
 * - capacityBytes >= MAX_PAYLOAD_BYTES + laneBytes, so every admissible request can be
 *   granted once the others have released.
 */
import { assert } from '../util/assert';
import { MEMORY_BUDGET_BYTES_MIN, SMALL_CHARGE_BYTES_MAX, SMALL_LANE_BYTES_MAX, SMALL_LANE_BYTES_MIN, SMALL_LANE_BYTES_PER_OWNER } from './limits';
import { MAX_PAYLOAD_BYTES } from './protocol';

assert(MEMORY_BUDGET_BYTES_MIN >= MAX_PAYLOAD_BYTES + SMALL_LANE_BYTES_MIN, 'a maximal request must fit beside a full small lane');
assert(SMALL_LANE_BYTES_PER_OWNER >= SMALL_CHARGE_BYTES_MAX && SMALL_LANE_BYTES_PER_OWNER <= SMALL_LANE_BYTES_MIN, 'one owner can take a lane charge, and never the whole lane alone');

/** A granted charge; give it back to release(). */
export interface Charge {
  readonly bytes: number;
  /** Granted through the small lane (passing waiters). */
  readonly lane: boolean;
  /** Whose lane share it counts in (a lane charge only). */
  readonly owner?: object;
}

interface Waiter {
  bytes: number;
  owner: object | undefined;
  grant: (c: Charge) => void;
  cancelled: boolean;
}

export class MemoryBudget {
  private used = 0;
  private laneUsed = 0;
  private peak = 0;
  private readonly waiters: Waiter[] = [];
  /** Lane bytes outstanding per owner (no entry at 0). */
  private readonly laneByOwner = new Map<object, number>();
  /** The small lane's size: SMALL_LANE_BYTES_MAX, or what a smaller budget leaves beside a maximal request. */
  readonly laneBytes: number;

  constructor(readonly capacityBytes: number) {
    assert(Number.isSafeInteger(capacityBytes) && capacityBytes >= MEMORY_BUDGET_BYTES_MIN, `memory budget ${capacityBytes} below ${MEMORY_BUDGET_BYTES_MIN} bytes`);
    this.laneBytes = Math.min(SMALL_LANE_BYTES_MAX, capacityBytes - MAX_PAYLOAD_BYTES);
    assert(this.laneBytes >= SMALL_LANE_BYTES_MIN);
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

  /** Lane bytes `owner` holds now. */
  laneBytesOf(owner: object): number {
    return this.laneByOwner.get(owner) ?? 0;
  }

  /**
   * A charge now if `bytes` fit (in line, or through the small lane within `owner`'s
   * share); undefined otherwise. `owner` is the connection (any object; undefined: no
   * lane share of its own to respect).
   */
  tryCharge(bytes: number, owner?: object): Charge | undefined {
    this.check(bytes);
    if (this.waiters.length === 0 && this.lineFits(bytes)) return this.add(bytes, undefined);
    if (this.laneFits(bytes, owner)) return this.add(bytes, owner ?? this);
    return undefined;
  }

  /**
   * Queues a charge; `grant` runs (on a later tick) once it is charged to the caller,
   * who then owns it. Returns a cancel function for a caller that goes away first (after
   * a grant it does nothing: release what was granted instead).
   */
  wait(bytes: number, grant: (c: Charge) => void, owner?: object): () => void {
    this.check(bytes);
    const w: Waiter = { bytes, owner, grant, cancelled: false };
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
      assert(c.bytes <= this.laneUsed && c.owner !== undefined);
      this.laneUsed -= c.bytes;
      const left = (this.laneByOwner.get(c.owner) ?? 0) - c.bytes;
      assert(left >= 0, 'lane release beyond the owner\'s share');
      if (left === 0) this.laneByOwner.delete(c.owner);
      else this.laneByOwner.set(c.owner, left);
    }
    this.grantWaiters();
  }

  private check(bytes: number): void {
    assert(Number.isSafeInteger(bytes) && bytes > 0 && bytes <= this.capacityBytes - this.laneBytes, `budget charge of ${bytes} bytes (capacity ${this.capacityBytes})`);
  }

  private lineFits(bytes: number): boolean {
    return this.used - this.laneUsed + bytes <= this.capacityBytes - this.laneBytes;
  }

  private laneFits(bytes: number, owner: object | undefined): boolean {
    if (bytes > SMALL_CHARGE_BYTES_MAX || this.laneUsed + bytes > this.laneBytes) return false;
    return owner === undefined || this.laneBytesOf(owner) + bytes <= SMALL_LANE_BYTES_PER_OWNER;
  }

  /** Charges `bytes`; `laneOwner` set: through the lane, in that owner's share. */
  private add(bytes: number, laneOwner: object | undefined): Charge {
    this.used += bytes;
    if (laneOwner !== undefined) {
      this.laneUsed += bytes;
      this.laneByOwner.set(laneOwner, this.laneBytesOf(laneOwner) + bytes);
    }
    if (this.used > this.peak) this.peak = this.used;
    assert(this.used - this.laneUsed <= this.capacityBytes - this.laneBytes && this.laneUsed <= this.laneBytes);
    return laneOwner !== undefined ? { bytes, lane: true, owner: laneOwner } : { bytes, lane: false };
  }

  private grantWaiters(): void {
    // In order while the head fits in line; then small waiters (the head too) through the lane.
    for (let i = 0; i < this.waiters.length; ) {
      const w = this.waiters[i] as Waiter;
      let laneOwner: object | undefined;
      if (i === 0 && this.lineFits(w.bytes)) laneOwner = undefined;
      else if (this.laneFits(w.bytes, w.owner)) laneOwner = w.owner ?? this;
      else {
        i++;
        continue;
      }
      this.waiters.splice(i, 1);
      const c = this.add(w.bytes, laneOwner);
      w.cancelled = true; // a late cancel must not touch the queue again
      // Granted on a later tick: release() is called from deep inside request handling.
      process.nextTick(() => w.grant(c));
    }
  }
}
