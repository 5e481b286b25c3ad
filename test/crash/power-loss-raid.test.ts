/**
 * Power loss by enumeration over RAID (issue 9): the enumeration of power-loss.test.ts
 * (power-loss-enum.ts) over a RaidDevice of RAID-5 x3, RAID-5 x4, RAID-6 x4 and RAID-6 x5
 * (workload w takes layout w mod 4), each member a recording device on the one shared
 * timeline, so crash states hold stripes torn across members (some members' units of a
 * stripe written, others not), ring copies on some members only, and labels on some
 * members only (the degraded recoveries). Every state must, besides what the single-member
 * enumeration asks:
 * - have consistent parity (P, and Q on RAID-6) on every stripe that holds a block in use,
 *   in the crash image as it is and again after recovery and a clean close
 *   (RaidDevice.scrubStripe, nothing written);
 * - open with one member removed (RAID-6: two) and read exactly what it reads with every
 *   member: the write-hole check (whole-stripe CPs write only stripes no durable root
 *   references, so a torn stripe is never live).
 * And a recovery that runs with a member removed, crashed at every point, with the member
 * back as the crash left it: every state opens, holds exactly what the recovery
 * recovers, and parity is consistent wherever every member is in service.
 *
 * Workloads: NVMIRROR_POWERLOSS_WORKLOADS (default 4 here; the seed is printed).
 */
import { strict as assert } from 'assert';
import { RING_SLOTS } from '../../src/tree/layout';
import { RaidGeometry, tolerance, type RaidLevel } from '../../src/raid/geometry';
import { RaidDevice } from '../../src/raid/raid-device';
import { assembleRaidMembers, labelNewMembers } from '../../src/volume/raid-members';
import { buildState, crashPoint, prefixChoices } from '../../src/io/recording';
import { UUID, durableAt, enumerate, genWorkload, record, recordRecovery, type Layout, quietEngineLogs, liveStripeParityProblem } from './power-loss-enum';
import { prng, seedFromEnv } from './harness';

const B = 4096;
/** Logical (tree) blocks of every layout: as the single-member test's device. */
const LOGICAL_BLOCKS_MIN = 1024;
const WORKLOADS = Number(process.env.NVMIRROR_POWERLOSS_WORKLOADS ?? 4);

function raidLayout(level: RaidLevel, members: number, unitBytes: number): Layout {
  const spec = { level, stripeUnitBytes: unitBytes };
  const memberBlocks = RaidGeometry.memberBlocksFor(level, members, unitBytes, LOGICAL_BLOCKS_MIN);
  const g = new RaidGeometry(level, members, unitBytes, memberBlocks, RING_SLOTS);
  const W = g.stripeDataBlocks;
  return {
    name: `RAID-${level} x${members} (unit ${unitBytes / 1024} KiB)`,
    members: Array.from({ length: members }, (_, i) => `m${i}`),
    memberBlocks,
    tolerance: tolerance(level, members),
    lost: (dev) => {
      assert.ok(dev instanceof RaidDevice);
      return dev.health().memberStatus.filter((m) => m.state !== 'online').map((m) => m.index);
    },
    prepare: (devs) => labelNewMembers(devs, spec, memberBlocks, UUID),
    assemble: (devs, readOnly) => assembleRaidMembers(devs.map((d, i) => (d === null ? { name: `m${i}`, dev: null, missingReason: 'removed by the test' } : { name: `m${i}`, dev: d })), spec, memberBlocks, UUID, readOnly),
    checkImage: async (devs) => {
      let raid: RaidDevice;
      try {
        raid = await assembleRaidMembers(devs.map((d, i) => ({ name: `m${i}`, dev: d })), spec, memberBlocks, UUID, true);
      } catch (e) {
        return `members do not assemble: ${(e as Error).message}`;
      }
      try {
        return await liveStripeParityProblem(raid, W);
      } finally {
        await raid.close();
      }
    },
  };
}

const LAYOUTS: Layout[] = [
  raidLayout(5, 3, 4096),
  raidLayout(5, 4, 8192),
  raidLayout(6, 4, 4096),
  raidLayout(6, 5, 4096),
];

describe('crash: power loss by crash-state enumeration over RAID-5 and RAID-6', function () {
  quietEngineLogs();
  this.timeout(600_000);

  it(`every crash state of ${WORKLOADS} small workloads opens, checks clean, holds a durable prefix, has consistent parity and reads the same degraded`, async () => {
    const seed = seedFromEnv();
    console.log(`      RAID power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    let statesTried = 0;
    let crashPoints = 0;
    let maxEvents = 0;
    let rmwStripes = 0;
    const failures: string[] = [];
    const t0 = Date.now();
    for (let w = 0; w < WORKLOADS && failures.length === 0; w++) {
      const layout = LAYOUTS[w % LAYOUTS.length]!;
      const ops = genWorkload(rnd);
      const r = await record(layout, ops);
      maxEvents = Math.max(maxEvents, r.rec.events.length);
      rmwStripes += r.rmwStripes;
      const res = await enumerate(layout, r, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)})`);
      statesTried += res.states;
      crashPoints += res.points;
      failures.push(...res.failures);
    }
    console.log(`      ${statesTried} crash states at ${crashPoints} crash points (up to ${maxEvents} I/O events per workload, ${rmwStripes} stripes by read-modify-write) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    assert.deepEqual(failures, []);
    // Whole-stripe CPs: these workloads never take the read-modify-write fallback.
    assert.equal(rmwStripes, 0, 'a workload wrote a stripe by read-modify-write');
  });

  it('power loss during a recovery that runs with a member removed: the member comes back stale, every state holds what the recovery recovers', async () => {
    const seed = seedFromEnv();
    console.log(`      RAID degraded-recovery power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed ^ 0x5eed);
    let statesTried = 0;
    let recoveries = 0;
    const failures: string[] = [];
    for (let w = 0; w < LAYOUTS.length && failures.length === 0; w++) {
      const layout = LAYOUTS[w]!;
      const ops = genWorkload(rnd);
      const r = await record(layout, ops);
      const events = r.rec.events;
      // A crash state with unreplayed NVRAM records: a point with pending stores, all of them landed.
      const i = 1 + Math.floor(rnd() * events.length);
      const cp = crashPoint(r.base, events, i);
      const durableOps = durableAt(r, i);
      const img = buildState(cp, prefixChoices(cp, cp.order.length));
      const removed = Math.floor(rnd() * layout.members.length);
      const rr = await recordRecovery(layout, img, r, durableOps, removed);
      recoveries++;
      const res = await enumerate(layout, rr, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)}) crash at ${i}, then a crash during its recovery without member ${removed}`);
      statesTried += res.states;
      failures.push(...res.failures);
    }
    console.log(`      ${statesTried} crash states during ${recoveries} degraded recoveries`);
    assert.deepEqual(failures, []);
  });
});
