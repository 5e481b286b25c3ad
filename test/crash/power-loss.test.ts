/**
 * Power loss by enumeration: small seeded workloads (writes whole and partial, trims,
 * FUA, FLUSH, CPs, a final close) run against the real engine and tree over a recording
 * layer. For every point of the recorded I/O timeline we build crash states: what was
 * synced/persisted, plus none / all / each prefix / random subsets (with 512-byte torn
 * blocks and pages) of what was not. Every state must open (recovery: newest valid
 * root + NVRAM replay), pass the tree's check, and hold the volume exactly as it was
 * after some prefix of the workload that includes every FLUSHed, FUA or checkpointed
 * operation (the log replays in order and stops at the first invalid record, so a
 * recovered volume is always a prefix).
 */
import { strict as assert } from 'assert';
import { enumerate, genWorkload, record, recordRecovery, singleLayout, durableAt, type Op, quietEngineLogs } from './power-loss-enum';
import { buildState, crashPoint, prefixChoices } from '../../src/io/recording';
import { prng, seedFromEnv } from './harness';

const BS = 4096;
const DEVICE_BLOCKS = 1024;
const WORKLOADS = Number(process.env.NVMIRROR_POWERLOSS_WORKLOADS ?? 12);
const layout = singleLayout(DEVICE_BLOCKS);

describe('crash: power loss by crash-state enumeration', function () {
  quietEngineLogs();
  this.timeout(600_000);

  it(`every crash state of ${WORKLOADS} small workloads opens, checks clean and holds a durable prefix`, async () => {
    const seed = seedFromEnv();
    console.log(`      power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    let statesTried = 0;
    let crashPoints = 0;
    let maxEvents = 0;
    const failures: string[] = [];
    const t0 = Date.now();
    for (let w = 0; w < WORKLOADS && failures.length === 0; w++) {
      const ops = genWorkload(rnd);
      const r = await record(layout, ops);
      maxEvents = Math.max(maxEvents, r.rec.events.length);
      const res = await enumerate(layout, r, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)})`);
      statesTried += res.states;
      crashPoints += res.points;
      failures.push(...res.failures);
    }
    console.log(`      ${statesTried} crash states at ${crashPoints} crash points (up to ${maxEvents} I/O events per workload) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    assert.deepEqual(failures, []);
  });

  it('power loss during recovery: every crash state of a recovery opens and holds exactly what the recovery recovers', async () => {
    const seed = seedFromEnv();
    console.log(`      recovery power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed ^ 0x5eed);
    let statesTried = 0;
    let recoveries = 0;
    const failures: string[] = [];
    for (let w = 0; w < Math.ceil(WORKLOADS / 2) && failures.length === 0; w++) {
      const ops = genWorkload(rnd);
      const r = await record(layout, ops);
      const events = r.rec.events;
      for (let k = 0; k < 3 && failures.length === 0; k++) {
        // A crash state with unreplayed NVRAM records: a point with pending stores, all of them landed.
        const i = 1 + Math.floor(rnd() * events.length);
        const cp = crashPoint(r.base, events, i);
        const durableOps = durableAt(r, i);
        const img = buildState(cp, prefixChoices(cp, cp.order.length));
        const rr = await recordRecovery(layout, img, r, durableOps);
        recoveries++;
        const res = await enumerate(layout, rr, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)}) crash at ${i}, then a crash during its recovery`);
        statesTried += res.states;
        failures.push(...res.failures);
      }
    }
    console.log(`      ${statesTried} crash states during ${recoveries} recoveries`);
    assert.deepEqual(failures, []);
  });

  it('negative control: an NVRAM whose persist lies loses FLUSHed writes, and the enumeration sees it', async () => {
    const rnd = prng(12345);
    const ops: Op[] = [
      { k: 'write', off: 0, len: 2 * BS, fua: false, seed: 1 },
      { k: 'flush' },
      { k: 'write', off: 3 * BS + 100, len: 200, fua: true, seed: 2 },
    ];
    const r = await record(layout, ops, true);
    const res = await enumerate(layout, r, rnd, 'lying NVRAM');
    assert.ok(res.failures.length > 0, 'the enumeration found no lost durable write');
    assert.match(res.failures[0]!, /durable|prefix/);
  });
});
