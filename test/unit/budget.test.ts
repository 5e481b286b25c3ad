/**
 * The server-wide memory budget (src/nbd/budget.ts) and the request parser's admission
 * hook (src/nbd/wire.ts): never over the cap, FIFO grants, cancel, and a blocked parser
 * delivers the same requests whatever the chunking and wherever it blocked.
 */
import { strict as assert } from 'assert';
import { Charge, MemoryBudget } from '../../src/nbd/budget';
import { MEMORY_BUDGET_BYTES_DEFAULT, MEMORY_BUDGET_BYTES_MIN, SMALL_CHARGE_BYTES_MAX, SMALL_LANE_BYTES_MAX, SMALL_LANE_BYTES_MIN, SMALL_LANE_BYTES_PER_OWNER } from '../../src/nbd/limits';
import * as P from '../../src/nbd/protocol';
import { Request, RequestParser, writeU64 } from '../../src/nbd/wire';

const MiB = 1024 * 1024;
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('MemoryBudget', function () {
  it('never charges over its capacity and grants large waiters in arrival order', async function () {
    const cap = MEMORY_BUDGET_BYTES_MIN;
    const b = new MemoryBudget(cap);
    const first = b.tryCharge(cap - 8 * MiB);
    assert.ok(first);
    assert.equal(b.tryCharge(16 * MiB), undefined, 'over the cap');
    const order: string[] = [];
    b.wait(16 * MiB, () => order.push('big1'));
    b.wait(2 * MiB, () => order.push('big2')); // above SMALL_CHARGE_BYTES_MAX: no lane
    assert.equal(b.tryCharge(2 * MiB), undefined, 'a large charge does not pass a waiter, even when it would fit');
    await tick();
    assert.deepEqual(order, []);
    b.release(first);
    await tick();
    assert.deepEqual(order, ['big1', 'big2']);
    assert.equal(b.usedBytes, 18 * MiB);
    assert.ok(b.peakBytes <= cap);
  });

  it('lets small charges pass waiting large ones through a bounded lane', async function () {
    const cap = MEMORY_BUDGET_BYTES_MIN;
    const b = new MemoryBudget(cap);
    assert.equal(b.laneBytes, SMALL_LANE_BYTES_MIN, 'the smallest budget has the smallest lane');
    const bulk = b.tryCharge(cap - b.laneBytes - MiB);
    assert.ok(bulk);
    let bigGranted = false;
    b.wait(P.MAX_PAYLOAD_BYTES, () => (bigGranted = true));
    const smalls: Charge[] = [];
    for (;;) {
      const c = b.tryCharge(SMALL_CHARGE_BYTES_MAX);
      if (!c) break;
      assert.ok(c.lane, 'passing a waiter is a lane charge');
      smalls.push(c);
    }
    assert.equal(smalls.length * SMALL_CHARGE_BYTES_MAX, b.laneBytes, 'the lane is bounded');
    b.release(bulk);
    await tick();
    assert.ok(bigGranted, 'the large waiter fits beside a full lane');
    for (const c of smalls) b.release(c);
    assert.equal(b.usedBytes, P.MAX_PAYLOAD_BYTES);
  });

  it('gives one owner at most its share of the lane: a client that never reads cannot close it to the others', async function () {
    const b = new MemoryBudget(MEMORY_BUDGET_BYTES_DEFAULT);
    assert.equal(b.laneBytes, SMALL_LANE_BYTES_MAX, 'the default budget has the full lane');
    const bulk = b.tryCharge(MEMORY_BUDGET_BYTES_DEFAULT - P.MAX_PAYLOAD_BYTES + MiB);
    assert.ok(bulk);
    let bigGranted = false;
    b.wait(P.MAX_PAYLOAD_BYTES, () => (bigGranted = true));
    // A hog (one connection) takes what it can through the lane: its share, no more.
    const hog = {};
    const hogs: Charge[] = [];
    for (let c = b.tryCharge(SMALL_CHARGE_BYTES_MAX, hog); c; c = b.tryCharge(SMALL_CHARGE_BYTES_MAX, hog)) hogs.push(c);
    assert.equal(hogs.length * SMALL_CHARGE_BYTES_MAX, SMALL_LANE_BYTES_PER_OWNER);
    assert.equal(b.laneBytesOf(hog), SMALL_LANE_BYTES_PER_OWNER);
    // Its further small requests wait; another connection's 4 KiB passes at once.
    let hogWaitGranted = false;
    b.wait(4096, () => (hogWaitGranted = true), hog);
    const other = {};
    const c = b.tryCharge(4096, other);
    assert.ok(c?.lane, 'another connection still passes through the lane');
    // A waiter of another owner queued behind the large one is granted through the lane too.
    let otherWaitGranted = false;
    const otherMore = b.tryCharge(SMALL_CHARGE_BYTES_MAX, other);
    assert.ok(otherMore?.lane);
    assert.equal(b.tryCharge(SMALL_CHARGE_BYTES_MAX, other), undefined, 'beyond its share another owner waits too');
    b.wait(4096, () => (otherWaitGranted = true), {});
    await tick();
    assert.ok(otherWaitGranted, 'a queued small waiter of another owner passes');
    assert.ok(!hogWaitGranted, 'the hog waits for its own releases (or the large waiter)');
    b.release(hogs.pop() as Charge);
    await tick();
    assert.ok(hogWaitGranted, 'once under its share, the hog passes again');
    assert.ok(!bigGranted);
    b.release(bulk);
    await tick();
    assert.ok(bigGranted, 'the large waiter fits beside the lane');
    assert.ok(b.peakBytes <= MEMORY_BUDGET_BYTES_DEFAULT);
  });

  it('keeps the lane as a reserve large charges never take', async function () {
    const b = new MemoryBudget(MEMORY_BUDGET_BYTES_DEFAULT);
    assert.equal(MEMORY_BUDGET_BYTES_DEFAULT - b.laneBytes, 2 * P.MAX_PAYLOAD_BYTES, 'two maximal requests fit beside the lane');
    assert.ok(b.tryCharge(P.MAX_PAYLOAD_BYTES - 2 * MiB));
    assert.ok(b.tryCharge(P.MAX_PAYLOAD_BYTES), 'the line fills up to the reserve');
    assert.equal(b.tryCharge(2 * MiB + 1), undefined, 'a large charge never eats into the lane');
    assert.ok(b.tryCharge(2 * MiB), 'the line is full');
    const small = b.tryCharge(4096, {});
    assert.ok(small?.lane, 'with the line full and nobody waiting, a small charge takes the lane');
    let granted: Charge | undefined;
    b.wait(4096, (c) => (granted = c), {});
    await tick();
    assert.ok(granted?.lane, 'so does a small waiter at the head of the line');
    assert.ok(b.usedBytes <= MEMORY_BUDGET_BYTES_DEFAULT);
  });

  it('a cancelled waiter is skipped and the next one granted', async function () {
    const b = new MemoryBudget(MEMORY_BUDGET_BYTES_MIN);
    const all = b.tryCharge(MEMORY_BUDGET_BYTES_MIN - b.laneBytes); // the line is now full
    assert.ok(all);
    let got = 0;
    const cancel = b.wait(2 * MiB, () => (got += 1));
    b.wait(2 * MiB, () => (got += 10));
    cancel();
    b.release(all);
    await tick();
    assert.equal(got, 10);
    assert.equal(b.waiting, 0);
  });

  it('refuses a charge it could never grant (an internal error, not a wait forever)', function () {
    const b = new MemoryBudget(MEMORY_BUDGET_BYTES_MIN);
    assert.throws(() => b.tryCharge(MEMORY_BUDGET_BYTES_MIN));
  });
});

function header(type: number, cookie: number, length: number): Buffer {
  const h = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  h.writeUInt32BE(P.REQUEST_MAGIC, 0);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(cookie, 12);
  writeU64(h, 4096, 16);
  h.writeUInt32BE(length, 24);
  return h;
}

describe('RequestParser admission (admit / unblock)', function () {
  const wire = Buffer.concat([
    header(P.CMD_WRITE, 1, 100),
    Buffer.alloc(100, 0xaa),
    header(P.CMD_READ, 2, 4096),
    header(P.CMD_FLUSH, 3, 0),
    header(P.CMD_WRITE, 4, 50),
    Buffer.alloc(50, 0xbb),
  ]);

  it('delivers the same requests for every split point when every admission waits once', async function () {
    for (let split = 0; split <= wire.length; split++) {
      const seen: string[] = [];
      let blocked: Request | undefined;
      const refused = new Set<number>();
      const p = new RequestParser({
        onRequest: (r) => seen.push(`${r.type}:${r.cookieLo}:${r.payload?.toString('hex').slice(0, 2) ?? ''}`),
        onFramingError: (m) => assert.fail(m),
        admit: (r) => {
          if (refused.has(r.cookieLo)) return true;
          refused.add(r.cookieLo);
          blocked = r;
          return false;
        },
      });
      p.feed(wire.subarray(0, split));
      p.feed(wire.subarray(split));
      while (blocked !== undefined) {
        assert.ok(p.isBlocked);
        blocked = undefined;
        p.unblock();
        await Promise.resolve();
      }
      assert.deepEqual(seen, ['1:1:aa', '0:2:', '3:3:', '1:4:bb'], `split at ${split}`);
    }
  });

  it('asks admission only for READ and WRITE of 1..MAX_PAYLOAD_BYTES', function () {
    const asked: number[] = [];
    const p = new RequestParser({ onRequest: () => undefined, onFramingError: (m) => assert.fail(m), admit: (r) => (asked.push(r.cookieLo), true) });
    p.feed(Buffer.concat([header(P.CMD_READ, 1, 0), header(P.CMD_TRIM, 2, 4096), header(P.CMD_READ, 3, P.MAX_PAYLOAD_BYTES + 1), header(P.CMD_READ, 4, 1)]));
    assert.deepEqual(asked, [4]);
  });
});
