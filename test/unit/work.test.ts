/**
 * util/work: the Slicer's budget is shared by concurrent callers (the workers of a
 * forEachLimit), so one event-loop turn runs at most about one budget of their work.
 * Time is a fake clock advanced by the work itself: no timed assertion.
 */
import { strict as assert } from 'assert';
import { Slicer, forEachLimit } from '../../src/util/work';

/** Runs `items` steps of `stepMs` fake milliseconds on `workers` workers; returns the steps run in each event-loop turn. */
async function stepsPerTurn(workers: number, items: number, budgetMs: number, stepMs: number): Promise<number[]> {
  let fakeMs = 0;
  const slicer = new Slicer(budgetMs, () => fakeMs);
  // One tick per event-loop iteration: a setImmediate queued from a setImmediate callback runs in the next one.
  let turn = 0;
  let ticking = true;
  const tick = (): void => {
    turn++;
    if (ticking) setImmediate(tick);
  };
  setImmediate(tick);
  const perTurn = new Map<number, number>();
  await forEachLimit(Array.from({ length: items }), workers, async () => {
    await slicer.maybeYield();
    fakeMs += stepMs;
    perTurn.set(turn, (perTurn.get(turn) ?? 0) + 1);
    await Promise.resolve(); // a cached read resolving: the next step runs in a microtask
  });
  ticking = false;
  return [...perTurn.values()];
}

describe('util/work: Slicer', () => {
  it('concurrent callers share one budget: a turn runs about one budget of their steps, not one per worker', async () => {
    // 0.125 ms steps under a 1 ms budget: 8 steps spend it, plus the steps of workers that
    // resumed together with the one that finds it spent. With one setImmediate per worker
    // each worker resumed with a fresh budget in the same turn: 8 x 8 steps.
    const steps = await stepsPerTurn(8, 2000, 1, 0.125);
    assert.equal(steps.reduce((a, b) => a + b, 0), 2000);
    const max = Math.max(...steps);
    assert.ok(max <= 8 + 8, `${max} steps in one event-loop turn`);
  });

  it('one caller runs a budget of steps per turn', async () => {
    const steps = await stepsPerTurn(1, 200, 1, 0.125);
    assert.ok(Math.max(...steps) <= 9, `${Math.max(...steps)} steps in one turn`);
  });

  it('does not yield while the budget lasts', async () => {
    let fakeMs = 0;
    const slicer = new Slicer(1, () => fakeMs);
    let turns = 0;
    setImmediate(() => turns++);
    for (let i = 0; i < 4; i++) {
      await slicer.maybeYield();
      fakeMs += 0.25;
    }
    assert.equal(turns, 0, 'yielded before the budget was spent');
    await slicer.maybeYield(); // 1 ms spent: yields
    assert.equal(turns, 1, 'did not yield once the budget was spent');
    await slicer.maybeYield(); // a fresh budget
    assert.equal(turns, 1, 'yielded again without spending the budget');
  });
});
