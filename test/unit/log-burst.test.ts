/**
 * LogBurst (src/util/log-burst.ts) on an injected clock: the first lines of a window are
 * the caller's, the rest one summary at the window's end (or at the next event after it,
 * or at flush), never twice, and nothing is left out of both.
 */
import { strict as assert } from 'assert';
import { LogBurst, type BurstClock } from '../../src/util/log-burst';

class FakeClock implements BurstClock {
  now = 1000;
  timers: Array<{ at: number; fn: () => void; live: boolean }> = [];
  nowMs(): number {
    return this.now;
  }
  setTimeout(fn: () => void, ms: number): { cancel(): void } {
    const t = { at: this.now + ms, fn, live: true };
    this.timers.push(t);
    return { cancel: () => { t.live = false; } };
  }
  advance(ms: number): void {
    this.now += ms;
    for (const t of this.timers) {
      if (t.live && t.at <= this.now) {
        t.live = false;
        t.fn();
      }
    }
  }
}

describe('LogBurst', () => {
  it('logs the first lines of a window, sums the rest once at its end, and starts again after it', () => {
    const clock = new FakeClock();
    const sums: Array<[number, number]> = [];
    const b = new LogBurst((n, ms) => sums.push([n, ms]), clock, 3, 10_000);
    const own = Array.from({ length: 1000 }, () => b.take()).filter((x) => x).length;
    assert.equal(own, 3);
    assert.deepEqual(sums, [], 'not before the window ends');
    clock.advance(9_999);
    assert.deepEqual(sums, []);
    clock.advance(1);
    assert.deepEqual(sums, [[997, 10_000]], 'the rest, once');
    clock.advance(60_000);
    assert.deepEqual(sums, [[997, 10_000]], 'never twice');
    // A new window: its own lines again.
    assert.deepEqual([b.take(), b.take(), b.take(), b.take()], [true, true, true, false]);
    b.flush();
    assert.deepEqual(sums, [[997, 10_000], [1, 10_000]], 'flush says what is left');
    b.flush();
    assert.equal(sums.length, 2, 'and only once');
  });

  it('the next event after a window says the last window\'s count first, whatever the timer did', () => {
    const clock = new FakeClock();
    const sums: number[] = [];
    const b = new LogBurst((n) => sums.push(n), { nowMs: () => clock.now, setTimeout: () => ({ cancel: () => undefined }) }, 2, 1000);
    for (let i = 0; i < 5; i++) b.take();
    clock.now += 1500;
    assert.equal(b.take(), true);
    assert.deepEqual(sums, [3]);
  });
});
