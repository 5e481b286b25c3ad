/**
 * tree/spacemap: warm blocks. Runs released at a CP (keepWarm) are what that CP's
 * allocations take first, in order, skipping any block that is not allocatable; what is
 * left of them when a later CP keeps its own is handed back as cold (to be discarded):
 * exactly the leftover blocks that are still allocatable, never one in use. Checked
 * against a per-block model under random runs, some overlapping blocks in use.
 */
import { strict as assert } from 'assert';
import fc from 'fast-check';
import { RING_SLOTS } from '../../src/tree/layout';
import { SpaceMap, type Run } from '../../src/tree/spacemap';

const DEVICE = 1024;

function expand(runs: Run[]): number[] {
  const out: number[] = [];
  for (const r of runs) for (let p = r.pba; p < r.pba + r.count; p++) out.push(p);
  return out;
}

type Step = { kind: 'keep'; runs: { pba: number; count: number }[]; newCp: boolean } | { kind: 'alloc'; count: number };

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  fc.record({
    kind: fc.constant('keep' as const),
    runs: fc.array(
      fc.integer({ min: RING_SLOTS, max: DEVICE - 1 }).chain((pba) => fc.record({ pba: fc.constant(pba), count: fc.integer({ min: 1, max: Math.min(200, DEVICE - pba) }) })),
      { maxLength: 4 },
    ),
    newCp: fc.boolean(),
  }),
  fc.record({ kind: fc.constant('alloc' as const), count: fc.integer({ min: 0, max: 120 }) }),
);

describe('tree: space map warm blocks', () => {
  it('a CP takes its warm blocks first and in order; the next CP gets back exactly the leftover blocks still allocatable (property)', () => {
    fc.assert(
      fc.property(fc.array(stepArb, { minLength: 1, maxLength: 30 }), (steps) => {
        const m = SpaceMap.createEmpty(DEVICE);
        let cp = 1;
        let queue: number[] = []; // the model's warm blocks in order (not yet passed over)
        for (const s of steps) {
          if (s.kind === 'keep') {
            if (s.newCp) cp++;
            const leftover = s.newCp ? queue.filter((p) => m.isAllocatable(p)) : [];
            const cold = m.keepWarm(s.runs.map((r) => ({ ...r })), cp);
            if (s.newCp) {
              assert.deepEqual(expand(cold), leftover, `cold blocks at CP ${cp}`);
              for (const r of cold) assert.ok(r.count > 0, 'no empty cold run');
              queue = [];
            } else {
              assert.deepEqual(cold, [], 'the same CP hands back nothing');
            }
            queue.push(...expand(s.runs));
          } else {
            if (s.count > m.free) continue;
            // The model: the first s.count allocatable blocks of the queue, then next fit.
            const want: number[] = [];
            const taken = new Set<number>();
            let k = 0;
            for (; k < queue.length && want.length < s.count; k++) {
              const p = queue[k]!;
              if (m.isAllocatable(p) && !taken.has(p)) {
                want.push(p);
                taken.add(p);
              }
            }
            const got = expand(m.allocate(s.count));
            assert.equal(got.length, s.count);
            assert.deepEqual(got.slice(0, want.length), want, 'warm blocks first, in order');
            queue = queue.slice(k);
            if (want.length < s.count) queue = [];
            for (const p of got) assert.ok(!m.isAllocatable(p), `block ${p} allocated`);
          }
        }
      }),
      { numRuns: 300, seed: Number(process.env.NVMIRROR_SEED ?? 20261204) },
    );
  });

  it('a warm block in use (the safety net) is neither allocated again nor handed back as cold', () => {
    const m = SpaceMap.createEmpty(DEVICE);
    const first = m.allocate(50); // next fit: [RING_SLOTS, RING_SLOTS + 50)
    assert.deepEqual(first, [{ pba: RING_SLOTS, count: 50 }]);
    m.keepWarm([{ pba: RING_SLOTS + 40, count: 60 }], 1); // its first 10 blocks are in use
    assert.deepEqual(m.allocate(5), [{ pba: RING_SLOTS + 50, count: 5 }]);
    assert.deepEqual(m.keepWarm([{ pba: 600, count: 300 }], 2), [{ pba: RING_SLOTS + 55, count: 45 }]);
    assert.deepEqual(m.allocate(1), [{ pba: 600, count: 1 }]);
    assert.deepEqual(m.keepWarm([], 3), [{ pba: 601, count: 299 }], 'a long leftover, checked eight blocks a step');
    // A warm run over blocks in use that no allocation passed over: only its free stretch is cold.
    assert.deepEqual(m.keepWarm([{ pba: RING_SLOTS + 20, count: 60 }], 4), []);
    assert.deepEqual(m.keepWarm([], 5), [{ pba: RING_SLOTS + 55, count: 25 }], 'blocks in use are never cold');
  });
});
