/**
 * RaidDevice over memory members: writes of every shape read back (and parity on disk
 * matches the data) on every level; every single (RAID-4/5) and double (RAID-6) member
 * loss still reads every block; a member that fails reads is taken out of service; a
 * block that fails its checksum is rebuilt, served, rewritten and counted; one loss too
 * many makes the device refuse writes with a clear error and never return wrong data;
 * full-stripe writes read nothing back.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { FaultInjector, FaultyBlockDevice, NO_FAULTS } from '../../src/sim/faulty-device';
import { systemClock } from '../../src/io/types';
import { crc32c } from '../../src/io/checksum';
import { LABEL_COPIES, RaidGeometry, type RaidLevel } from '../../src/raid/geometry';
import { RaidDevice, type RaidMemberSpec } from '../../src/raid/raid-device';
import { decodeRaidLabel } from '../../src/raid/label';
import * as ref from '../../src/raid/parity-ref';
import { VolumeError } from '../../src/util/errors';
import { SeededRandom } from '../../src/sim/random';

const B = 4096;
const UUID = '11111111-2222-4333-8444-555555555555';
const UNIT_BYTES = 16 * 1024; // 4 blocks: small stripes, many rotations
const MEMBER_BLOCKS = 16 + 4 * 12; // label area + 12 stripes
const HEAD = 8;

interface Rig {
  g: RaidGeometry;
  mems: MemoryBlockDevice[];
  raid: RaidDevice;
}

function rig(level: RaidLevel, n: number, opts: { lost?: number[]; mems?: MemoryBlockDevice[]; wrap?: (i: number, d: MemoryBlockDevice) => RaidMemberSpec['dev'] } = {}): Rig {
  const g = new RaidGeometry(level, n, UNIT_BYTES, MEMBER_BLOCKS, HEAD);
  const mems = opts.mems ?? Array.from({ length: n }, () => new MemoryBlockDevice(MEMBER_BLOCKS));
  const members: RaidMemberSpec[] = mems.map((d, i) => (opts.lost?.includes(i) ? { name: `m${i}`, dev: null, missingReason: 'removed by the test' } : { name: `m${i}`, dev: opts.wrap ? opts.wrap(i, d) : d }));
  return { g, mems, raid: new RaidDevice({ geometry: g, volumeUuid: UUID, generation: 1, members }) };
}

function pattern(seed: number, blocks: number): Buffer {
  const b = Buffer.alloc(blocks * B);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((Math.imul(seed + i, 2654435761) ^ (i >>> 12)) >>> 0, i);
  return b;
}

/** Writes a random mix of whole-stripe, partial and head writes; returns the model (pba -> block). */
async function fill(r: Rig, seed: number): Promise<Map<number, Buffer>> {
  const rnd = new SeededRandom(seed);
  const model = new Map<number, Buffer>();
  const total = r.raid.blockCount;
  for (let op = 0; op < 40; op++) {
    const count = 1 + Math.floor(rnd.next() * Math.min(40, total / 2));
    const pba = Math.floor(rnd.next() * (total - count));
    const data = pattern(seed * 1000 + op, count);
    await r.raid.writeBlocks(pba, data);
    for (let k = 0; k < count; k++) model.set(pba + k, data.subarray(k * B, (k + 1) * B));
    if (op % 7 === 6) await r.raid.sync();
  }
  await r.raid.sync();
  return model;
}

async function expectModel(raid: RaidDevice, model: Map<number, Buffer>, what: string): Promise<void> {
  const all = Buffer.alloc(raid.blockCount * B);
  await raid.readBlocks(0, raid.blockCount, all);
  for (let p = 0; p < raid.blockCount; p++) {
    const want = model.get(p) ?? Buffer.alloc(B);
    if (!all.subarray(p * B, (p + 1) * B).equals(want)) assert.fail(`${what}: block ${p} reads wrong`);
  }
}

/** Parity on the members equals parity recomputed from the data on the members. */
function checkParity(r: Rig): void {
  const { g, mems } = r;
  if (g.parityMembers === 0) return;
  for (let s = 0; s < g.stripes; s++) {
    const start = g.unitStart(s);
    const col = (m: number): Buffer => Buffer.concat(Array.from({ length: g.unitBlocks }, (_, k) => mems[m]!.peekBlock(start + k)));
    const data: Buffer[] = [];
    for (let c = 0; c < g.dataMembers; c++) data.push(col(g.dataMember(s, c)));
    if (s * g.stripeDataBlocks < HEAD) data[0]!.fill(0, 0, Math.min(g.unitBlocks, HEAD - s * g.stripeDataBlocks) * B);
    const p = Buffer.alloc(g.unitBlocks * B);
    const q = Buffer.alloc(g.unitBlocks * B);
    if (g.parityMembers === 2) ref.computePQ(data, p, q);
    else ref.computeP(data, p);
    assert.ok(col(g.pMember(s)).equals(p), `stripe ${s}: P on member ${g.pMember(s)} is stale`);
    if (g.parityMembers === 2) assert.ok(col(g.qMember(s)).equals(q), `stripe ${s}: Q is stale`);
  }
}

describe('raid device', () => {
  const levels: [RaidLevel, number][] = [[0, 3], [1, 3], [4, 4], [5, 4], [5, 3], [6, 6], [6, 4]];
  for (const [level, n] of levels) {
    it(`RAID-${level} x${n}: writes of every shape read back and parity matches the data`, async () => {
      const r = rig(level, n);
      const model = await fill(r, level * 10 + n);
      await expectModel(r.raid, model, 'healthy');
      checkParity(r);
      // The head is mirrored on every member's label area.
      for (const m of r.mems) assert.ok(m.peekBlock(LABEL_COPIES + 3).equals(model.get(3) ?? Buffer.alloc(B)));
    });
  }

  it('RAID-4/5: every single member loss reads every block', async () => {
    for (const level of [4, 5] as RaidLevel[]) {
      const r = rig(level, 4);
      const model = await fill(r, 7);
      for (let lost = 0; lost < 4; lost++) {
        const d = rig(level, 4, { mems: r.mems, lost: [lost] });
        await expectModel(d.raid, model, `RAID-${level} without member ${lost}`);
        assert.equal(d.raid.health().state, 'degraded');
      }
    }
  });

  it('RAID-6: every double member loss reads every block, and degraded writes read back', async () => {
    const r = rig(6, 6);
    const model = await fill(r, 11);
    for (let a = 0; a < 6; a++) {
      for (let b = a + 1; b < 6; b++) {
        const d = rig(6, 6, { mems: r.mems, lost: [a, b] });
        await expectModel(d.raid, model, `RAID-6 without members ${a} and ${b}`);
      }
    }
    const d = rig(6, 6, { mems: r.mems, lost: [1, 4] });
    const more = await fill(d, 12);
    for (const [p, v] of more) model.set(p, v);
    await expectModel(d.raid, model, 'after degraded writes');
    const again = rig(6, 6, { mems: r.mems, lost: [1, 4] });
    await expectModel(again.raid, model, 'degraded writes, reopened');
  });

  it('RAID-1: reads survive n-1 lost members', async () => {
    const r = rig(1, 3);
    const model = await fill(r, 5);
    for (const keep of [0, 1, 2]) await expectModel(rig(1, 3, { mems: r.mems, lost: [0, 1, 2].filter((i) => i !== keep) }).raid, model, `RAID-1 with only member ${keep}`);
  });

  it('takes a member that fails reads out of service, serves rebuilt data, and records it in the labels', async () => {
    const injector = new FaultInjector(1, NO_FAULTS);
    const healthy = rig(5, 4);
    const model = await fill(healthy, 3);
    const r = rig(5, 4, { mems: healthy.mems, wrap: (i, d) => (i === 2 ? new FaultyBlockDevice(d, { injector, clock: systemClock, name: 'm2' }) : d) });
    injector.rates = { ...NO_FAULTS, readError: 1 };
    await expectModel(r.raid, model, 'member 2 failing reads');
    const h = r.raid.health();
    assert.equal(h.state, 'degraded');
    assert.equal(h.memberStatus[2]!.state, 'faulted');
    assert.match(h.memberStatus[2]!.reason ?? '', /^read error: injected EIO/);
    assert.ok(h.memberStatus[2]!.errors.read >= 1);
    await r.raid.writeBlocks(20, pattern(99, 3));
    await r.raid.sync();
    const label = decodeRaidLabel(r.mems[0]!.peekBlock(2 % LABEL_COPIES));
    assert.ok(typeof label !== 'string' && label.generation === 2 && label.outOfService.join() === 'false,false,true,false', 'labels on the members in service name member 2 out of service');
  });

  it('self-heals a block that fails its checksum (RAID-5, RAID-1, RAID-6 with two bad columns) and counts it per member', async () => {
    for (const [level, n] of [[5, 4], [1, 2], [6, 5]] as [RaidLevel, number][]) {
      const r = rig(level, n);
      const model = await fill(r, 21);
      const pba = 40;
      const want = model.get(pba) ?? Buffer.alloc(B);
      const loc = r.g.locate(pba);
      await r.mems[loc.member]!.writeBlocks(loc.memberBlock, pattern(777, 1));
      if (level === 6) {
        const other = r.g.dataMember(loc.stripe, (loc.column + 1) % r.g.dataMembers);
        await r.mems[other]!.writeBlocks(loc.memberBlock, pattern(778, 1));
      }
      const dst = Buffer.alloc(B);
      await r.raid.readBlocks(pba, 1, dst);
      assert.ok(!dst.equals(want), 'the plain read returns the corrupt copy (the caller verifies)');
      const ok = await r.raid.readRepaired(pba, dst, (b) => crc32c(b) === crc32c(want));
      assert.ok(ok && dst.equals(want), `RAID-${level}: the repaired read serves the good version`);
      assert.ok(r.mems[loc.member]!.peekBlock(loc.memberBlock).equals(want), 'the bad copy was rewritten');
      const e = r.raid.health().memberStatus[loc.member]!.errors;
      assert.deepEqual([e.checksum, e.healed], [1, 1]);
      assert.equal(r.raid.health().state, 'online');
      assert.equal(await r.raid.readRepaired(pba, dst, () => false), false, 'nothing verifies: false, never a guess');
    }
  });

  it('refuses writes with a clear error once more members are lost than tolerated, and never returns wrong data', async () => {
    const r = rig(5, 4);
    const model = await fill(r, 31);
    const d = rig(5, 4, { mems: r.mems, lost: [1, 3] });
    assert.equal(d.raid.health().state, 'failed');
    await assert.rejects(d.raid.writeBlocks(30, pattern(1, 1)), (e: unknown) => e instanceof VolumeError && e.code === 'EIO' &&
      /RAID-5 volume has lost 2 of 4 members, more than the 1 it tolerates \(member 1 m1: missing, removed by the test; member 3 m3: missing, removed by the test\): read-only/.test(e.message));
    await assert.rejects(d.raid.sync(), /read-only/);
    let served = 0, refused = 0;
    for (let p = HEAD; p < d.raid.blockCount; p++) {
      const dst = Buffer.alloc(B);
      try {
        await d.raid.readBlocks(p, 1, dst);
      } catch (e) {
        assert.ok(e instanceof VolumeError && e.code === 'EIO' && /cannot be rebuilt/.test(e.message), String(e));
        refused++;
        continue;
      }
      assert.ok(dst.equals(model.get(p) ?? Buffer.alloc(B)), `block ${p} served wrong data`);
      served++;
    }
    assert.ok(served > 0 && refused > 0, `served ${served}, refused ${refused}`);
  });

  it('a member failing writes at run time: the write of the second lost member is refused', async () => {
    const injector = new FaultInjector(2, NO_FAULTS);
    const injector2 = new FaultInjector(3, NO_FAULTS);
    const r = rig(5, 4, { wrap: (i, d) => (i === 0 ? new FaultyBlockDevice(d, { injector, clock: systemClock, name: 'm0' }) : i === 1 ? new FaultyBlockDevice(d, { injector: injector2, clock: systemClock, name: 'm1' }) : d) });
    const model = await fill(r, 41);
    injector.rates = { ...NO_FAULTS, writeError: 1 };
    const data = pattern(5, r.g.stripeDataBlocks);
    await r.raid.writeBlocks(r.g.stripeDataBlocks * 3, data);
    await r.raid.sync();
    for (let k = 0; k < r.g.stripeDataBlocks; k++) model.set(r.g.stripeDataBlocks * 3 + k, data.subarray(k * B, (k + 1) * B));
    assert.equal(r.raid.health().memberStatus[0]!.state, 'faulted');
    await expectModel(r.raid, model, 'one member lost to write errors');
    injector2.rates = { ...NO_FAULTS, writeError: 1 };
    await assert.rejects(r.raid.writeBlocks(r.g.stripeDataBlocks * 5, data), /lost 2 of 4 members/);
    assert.equal(r.raid.health().state, 'failed');
  });

  it('discards whole stripes in the background; a later write to them lands after the discard', async () => {
    const injector = new FaultInjector(5, { ...NO_FAULTS, latency: 1, latencyMsMax: 20 });
    const r = rig(5, 4, { wrap: (i, d) => new FaultyBlockDevice(d, { injector, clock: systemClock, name: `m${i}` }) });
    const W = r.g.stripeDataBlocks;
    await r.raid.discard(0, W * 2); // the head's stripe and a partial range: nothing whole to discard
    for (let round = 0; round < 8; round++) {
      const s0 = 2 + round;
      await r.raid.writeBlocks(s0 * W, pattern(round, W));
      await r.raid.sync();
      const before = r.mems.reduce((n, m) => n + m.stats.blocksDiscarded, 0);
      await r.raid.discard(s0 * W - 1, W + 2); // covers stripe s0 whole, and parts of its neighbours
      assert.equal(r.mems.reduce((n, m) => n + m.stats.blocksDiscarded, 0), before, 'discard() returned before the members discarded');
      const fresh = pattern(100 + round, W);
      await r.raid.writeBlocks(s0 * W, fresh);
      await r.raid.sync();
      assert.equal(r.mems.reduce((n, m) => n + m.stats.blocksDiscarded, 0), before + 4 * r.g.unitBlocks, 'one unit per member, nothing of the neighbours');
      const dst = Buffer.alloc(W * B);
      await r.raid.readBlocks(s0 * W, W, dst);
      assert.ok(dst.equals(fresh), `round ${round}: the write landed after the discard`);
    }
    checkParity(r);
  });

  it('writes whole stripes without reading anything back; a partial stripe is completed by read-modify-write', async () => {
    const r = rig(6, 6);
    const W = r.g.stripeDataBlocks;
    await r.raid.writeBlocks(W * 2, pattern(1, W * 3));
    await r.raid.sync();
    assert.equal(r.mems.reduce((n, m) => n + m.stats.blocksRead, 0), 0, 'full-stripe writes read nothing');
    await r.raid.writeBlocks(W * 6 + 1, pattern(2, 2));
    await r.raid.sync();
    assert.ok(r.mems.reduce((n, m) => n + m.stats.blocksRead, 0) > 0, 'a partial stripe reads the rest of its data');
    checkParity(r);
  });
});
