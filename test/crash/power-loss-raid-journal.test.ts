/**
 * Power loss by enumeration over a nearly full RAID-5 volume whose CPs write partial
 * stripes (issue 9's write hole): the engine's own RAID volume with its stripe journal.
 *
 * A RAID-5 x4 (8 KiB unit: 6 data blocks a stripe) of 66 blocks of tree space, filled and
 * overwritten by an unrecorded prologue until no whole free stripe is left, so the
 * recorded CPs take the allocator's single-block fallback: their stripes are partial, next
 * to live blocks, and go through the stripe journal (the test asserts that they did:
 * RaidDevice.stats.journaledStripes > 0 in every workload, so it fails if the fallback is
 * no longer reached). The journal device is recorded on the same timeline as the members
 * and the NVRAM (power-loss-enum.ts), so crash states hold journal batches torn, whole and
 * unreleased, with the members' cells landed, not landed or torn. Every state must (as in
 * power-loss-raid.test.ts) open, with its journal replayed (assembleRaidMembers, as
 * openMemberDevice does), check clean, hold a prefix of the workload with every FLUSHed,
 * FUA or checkpointed op, have consistent parity on every stripe holding a block in use
 * (after the replay, and again after recovery and a clean close), and read the same volume
 * with a member removed (each state: one member, rotating).
 *
 * Negative control: the same enumeration without the journal (and without the parity check,
 * which would report the stale parity first) finds a state whose degraded open reads wrong
 * or fails: the test can see the write hole.
 *
 * Workloads: NVMIRROR_POWERLOSS_JOURNAL_WORKLOADS (default 1, about 700 crash states; the seed is printed).
 */
import { strict as assert } from 'assert';
import { RING_SLOTS } from '../../src/tree/layout';
import { RaidGeometry, tolerance } from '../../src/raid/geometry';
import { RaidDevice } from '../../src/raid/raid-device';
import { assembleRaidMembers, labelNewMembers } from '../../src/volume/raid-members';
import { JOURNAL_HEADER_SLOTS, journalBlocksFor } from '../../src/raid/stripe-journal';
import type { BlockDevice } from '../../src/io/types';
import { UUID, VOLUME_BLOCKS, enumerate, record, type Layout, type Op, quietEngineLogs, liveStripeParityProblem } from './power-loss-enum';
import { prng, seedFromEnv } from './harness';

const B = 4096;
/** The smallest tree space the tree formats (64 blocks; 66 as the geometry rounds it). */
const LOGICAL_BLOCKS_MIN = 64;
const LEVEL = 5;
const MEMBERS = 4;
const UNIT_BYTES = 8192;
const WORKLOADS = Number(process.env.NVMIRROR_POWERLOSS_JOURNAL_WORKLOADS ?? 1);
const spec = { level: LEVEL as 5, stripeUnitBytes: UNIT_BYTES };
const memberBlocks = RaidGeometry.memberBlocksFor(LEVEL, MEMBERS, UNIT_BYTES, LOGICAL_BLOCKS_MIN);
const g = new RaidGeometry(LEVEL, MEMBERS, UNIT_BYTES, memberBlocks, RING_SLOTS);
/** A small journal (two whole stripes' cells): a CP's partial stripes take several batches. */
const JOURNAL_BLOCKS = JOURNAL_HEADER_SLOTS + 2 * journalBlocksFor(MEMBERS * g.unitBlocks);

/** Opens that replayed a journal batch (to show the enumeration reached live batches). */
let replayingOpens = 0;

function layoutOf(withJournal: boolean, parityCheck: boolean): Layout {
  const W = g.stripeDataBlocks;
  const assemble = async (devs: Array<BlockDevice | null>, readOnly: boolean, journal?: BlockDevice): Promise<RaidDevice> => {
    const raid = await assembleRaidMembers(devs.map((d, i) => (d === null ? { name: `m${i}`, dev: null, missingReason: 'removed by the test' } : { name: `m${i}`, dev: d })), spec, memberBlocks, UUID, readOnly,
      journal ? { journalDev: journal } : {});
    if ((raid.health().journal?.replayedStripes ?? 0) > 0) replayingOpens++;
    return raid;
  };
  return {
    name: `RAID-${LEVEL} x${MEMBERS} (unit ${UNIT_BYTES / 1024} KiB, nearly full) ${withJournal ? 'with' : 'WITHOUT'} its stripe journal`,
    members: Array.from({ length: MEMBERS }, (_, i) => `m${i}`),
    memberBlocks,
    tolerance: tolerance(LEVEL, MEMBERS),
    ...(withJournal ? { journal: { name: 'journal', blocks: JOURNAL_BLOCKS } } : {}),
    lost: (dev) => {
      assert.ok(dev instanceof RaidDevice);
      return dev.health().memberStatus.filter((m) => m.state !== 'online').map((m) => m.index);
    },
    prepare: (devs) => labelNewMembers(devs, spec, memberBlocks, UUID),
    assemble,
    ...(parityCheck ? {
      // The image as the next read-write open sees it: the journal replayed (on this copy), then every live stripe's parity.
      checkImage: async (devs: BlockDevice[], journal?: BlockDevice): Promise<string | undefined> => {
        let raid: RaidDevice;
        try {
          raid = await assemble(devs, false, journal);
        } catch (e) {
          return `members do not assemble (journal replayed): ${(e as Error).message}`;
        }
        try {
          return await liveStripeParityProblem(raid, W);
        } finally {
          await raid.close();
        }
      },
    } : {}),
  };
}

/** Fills every block, then overwrites single blocks CP after CP until the free space is scattered over partly live stripes. */
function prologue(rnd: () => number): Op[] {
  const ops: Op[] = [];
  for (let lbn = 0; lbn < VOLUME_BLOCKS; lbn += 2) ops.push({ k: 'write', off: lbn * B, len: 2 * B, fua: false, seed: 1000 + lbn });
  ops.push({ k: 'cp' });
  for (let round = 0; round < 8; round++) {
    for (let k = 0; k < 3; k++) ops.push({ k: 'write', off: Math.floor(rnd() * VOLUME_BLOCKS) * B, len: B, fua: false, seed: Math.floor(rnd() * 1e9) });
    ops.push({ k: 'cp' });
  }
  return ops;
}

/** The recorded part: single-block and short writes, a FLUSH, a FUA, two CPs (each on partial stripes). */
function workload(rnd: () => number): Op[] {
  const w = (len: number, fua = false): Op => ({ k: 'write', off: Math.floor(rnd() * (VOLUME_BLOCKS - 1)) * B, len, fua, seed: Math.floor(rnd() * 1e9) });
  return [w(B), w(2 * B), { k: 'flush' }, w(B), { k: 'cp' }, w(B, true), w(B), { k: 'cp' }];
}

describe('crash: power loss over a nearly full RAID-5 volume whose CPs write partial stripes through the stripe journal', function () {
  quietEngineLogs();
  this.timeout(600_000);

  it(`every crash state of ${WORKLOADS} workloads opens with its journal replayed, checks clean, holds every FLUSHed write, has consistent parity and reads the same with a member removed`, async () => {
    const seed = seedFromEnv();
    console.log(`      RAID journal power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    const layout = layoutOf(true, true);
    let states = 0;
    let points = 0;
    let maxEvents = 0;
    let journaled = 0;
    let rmw = 0;
    const failures: string[] = [];
    const t0 = Date.now();
    replayingOpens = 0;
    for (let w = 0; w < WORKLOADS && failures.length === 0; w++) {
      const pro = prologue(rnd);
      const ops = workload(rnd);
      const r = await record(layout, ops, false, pro);
      maxEvents = Math.max(maxEvents, r.rec.events.length);
      // The partial-stripe path was taken (else this test proves nothing about the write hole).
      assert.ok(r.journaledStripes > 0, `workload ${w}: no stripe went through the journal (${r.rmwStripes} by read-modify-write): the volume is not full enough to reach the fallback`);
      journaled += r.journaledStripes;
      rmw += r.rmwStripes;
      const st = r.raidStats!;
      console.log(`      workload ${w}: prologue (10 CPs) ${st.prologue.full} whole stripes, ${st.prologue.journaled} through the journal in ${st.prologue.batches} batches; ` +
        `recorded (3 CPs, the last at close) ${st.recorded.full} whole, ${st.recorded.journaled} through the journal in ${st.recorded.batches} batches`);
      const res = await enumerate(layout, r, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)})`);
      states += res.states;
      points += res.points;
      failures.push(...res.failures);
    }
    console.log(`      ${states} crash states at ${points} crash points (up to ${maxEvents} I/O events per workload; ${journaled} stripes through the journal, ${rmw} partial in all; ${replayingOpens} opens replayed a batch) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    assert.deepEqual(failures, []);
    assert.ok(replayingOpens > 0, 'no crash state left a journal batch to replay');
  });

  it('negative control: without the journal the same enumeration finds a state whose degraded open reads wrong or fails (the write hole)', async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed);
    const layout = layoutOf(false, false);
    const failures: string[] = [];
    let states = 0;
    let rmw = 0;
    for (let w = 0; w < 4 && failures.length === 0; w++) {
      const r = await record(layout, workload(rnd), false, prologue(rnd));
      rmw += r.rmwStripes;
      assert.equal(r.journaledStripes, 0);
      const res = await enumerate(layout, r, rnd, `seed ${seed} workload ${w} without the journal`);
      states += res.states;
      failures.push(...res.failures);
    }
    console.log(`      without the journal: ${states} crash states, ${rmw} stripes by read-modify-write; first failure: ${failures[0] ?? 'none'}`);
    assert.ok(rmw > 0, 'no stripe was written by read-modify-write');
    assert.ok(failures.length > 0, 'the enumeration found no write hole without the journal');
    assert.match(failures[0]!, /removed/);
  });
});
