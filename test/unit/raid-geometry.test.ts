/**
 * RAID geometry: for every level and member count, locate() is a bijection from the
 * logical data blocks onto the striped area's data positions (logicalOf() inverts it),
 * parity never lands on a data position, the capacity formulas hold, and RAID-5/6 follow
 * md's left-symmetric layout.
 */
import { strict as assert } from 'assert';
import fc from 'fast-check';
import {
  LABEL_AREA_BLOCKS, RAID_LEVELS, RaidGeometry, geometryProblem, minMembers, tolerance, type RaidLevel,
} from '../../src/raid/geometry';

const KiB = 1024;

describe('raid geometry', () => {
  it('maps every logical data block to a distinct data position and back (every level, 2-9 members)', () => {
    for (const level of RAID_LEVELS) {
      for (let n = minMembers(level); n <= 9; n++) {
        for (const unit of [4 * KiB, 16 * KiB]) {
          const stripes = 2 * n + 9; // every rotation at least twice, and more than the head
          const g = new RaidGeometry(level, n, unit, LABEL_AREA_BLOCKS + stripes * (unit / 4096) + unit / 4096 - 1, 8);
          assert.equal(g.stripes, stripes);
          const seen = new Set<string>();
          for (let p = g.headBlocks; p < g.logicalBlocks; p++) {
            const loc = g.locate(p);
            const key = `${loc.member}/${loc.memberBlock}`;
            assert.ok(!seen.has(key), `RAID-${level} n=${n}: pba ${p} collides at ${key}`);
            seen.add(key);
            assert.equal(g.logicalOf(loc.member, loc.memberBlock), p);
          }
          // Every member position of the striped area is data, parity, or a head position.
          let data = 0, parity = 0, head = 0;
          for (let m = 0; m < n; m++) {
            for (let b = LABEL_AREA_BLOCKS; b < LABEL_AREA_BLOCKS + stripes * g.unitBlocks; b++) {
              const r = g.logicalOf(m, b);
              if (r === 'P' || r === 'Q') parity++;
              else if (r === null) head++;
              else data++;
            }
            assert.equal(g.logicalOf(m, 0), null, 'the label area holds no logical block');
          }
          const copies = level === 1 ? n : 1;
          assert.equal(data, (g.logicalBlocks - g.headBlocks) * copies);
          assert.equal(head, g.headBlocks * copies);
          assert.equal(parity, stripes * g.unitBlocks * g.parityMembers);
        }
      }
    }
  });

  it('keeps P, Q and the data columns of a stripe on distinct members (property)', () => {
    fc.assert(fc.property(fc.constantFrom<RaidLevel>(4, 5, 6), fc.integer({ min: 3, max: 32 }), fc.integer({ min: 0, max: 1_000_000 }), (level, n, stripe) => {
      fc.pre(n >= minMembers(level));
      const g = new RaidGeometry(level, n, 64 * KiB, LABEL_AREA_BLOCKS + (stripe + 1) * 16, 8);
      const members = [g.pMember(stripe), ...(level === 6 ? [g.qMember(stripe)] : [])];
      for (let d = 0; d < g.dataMembers; d++) members.push(g.dataMember(stripe, d));
      assert.equal(new Set(members).size, n, 'every member has exactly one role');
      for (let d = 0; d < g.dataMembers; d++) assert.equal(g.roleOf(stripe, g.dataMember(stripe, d)), d);
      assert.equal(g.roleOf(stripe, g.pMember(stripe)), 'P');
    }));
  });

  it('has the capacity (n - parity) x stripes x unit and the tolerance of its level', () => {
    fc.assert(fc.property(fc.constantFrom<RaidLevel>(0, 1, 4, 5, 6), fc.integer({ min: 2, max: 32 }), fc.integer({ min: 1, max: 64 }), fc.integer({ min: 0, max: 1 << 20 }), (level, n, unitBlocks, extra) => {
      fc.pre(n >= minMembers(level));
      const memberBlocks = LABEL_AREA_BLOCKS + extra + unitBlocks;
      const g = new RaidGeometry(level, n, unitBlocks * 4096, memberBlocks, 0);
      const stripes = Math.floor((memberBlocks - LABEL_AREA_BLOCKS) / unitBlocks);
      const dataMembers = level === 1 ? 1 : level === 6 ? n - 2 : level === 4 || level === 5 ? n - 1 : n;
      assert.equal(g.logicalBlocks, stripes * unitBlocks * dataMembers);
      assert.equal(tolerance(level, n), level === 1 ? n - 1 : level === 6 ? 2 : level === 0 ? 0 : 1);
      // memberBlocksFor is the inverse: enough member blocks for the capacity, and no stripe more.
      const need = RaidGeometry.memberBlocksFor(level, n, unitBlocks * 4096, g.logicalBlocks);
      assert.ok(need <= memberBlocks && new RaidGeometry(level, n, unitBlocks * 4096, need, 0).logicalBlocks === g.logicalBlocks);
    }));
  });

  it('follows md\'s left-symmetric layouts for RAID-5 and RAID-6', () => {
    const r5 = new RaidGeometry(5, 4, 4096, LABEL_AREA_BLOCKS + 8, 0);
    // md raid5 left-symmetric, 4 disks: stripe 0 P on disk 3, data D0..D2 on 0,1,2; stripe 1 P on 2, D0 on 3, D1 on 0, D2 on 1.
    assert.deepEqual([0, 1, 2].map((d) => r5.dataMember(0, d)), [0, 1, 2]);
    assert.equal(r5.pMember(1), 2);
    assert.deepEqual([0, 1, 2].map((d) => r5.dataMember(1, d)), [3, 0, 1]);
    const r6 = new RaidGeometry(6, 5, 4096, LABEL_AREA_BLOCKS + 8, 0);
    // md raid6 left-symmetric, 5 disks: stripe 0 P on 4, Q on 0, D0..D2 on 1,2,3; stripe 1 P on 3, Q on 4, data on 0,1,2.
    assert.deepEqual([r6.pMember(0), r6.qMember(0)], [4, 0]);
    assert.deepEqual([0, 1, 2].map((d) => r6.dataMember(0, d)), [1, 2, 3]);
    assert.deepEqual([r6.pMember(1), r6.qMember(1)], [3, 4]);
    assert.deepEqual([0, 1, 2].map((d) => r6.dataMember(1, d)), [0, 1, 2]);
    const r4 = new RaidGeometry(4, 4, 4096, LABEL_AREA_BLOCKS + 8, 0);
    for (let s = 0; s < 8; s++) assert.equal(r4.pMember(s), 3, 'RAID-4 parity is always on the last member');
  });

  it('refuses wrong member counts and stripe units with one-line reasons', () => {
    assert.equal(geometryProblem(6, 3, 65536), 'RAID-6 needs at least 4 members (2 data + P + Q), got 3');
    assert.equal(geometryProblem(5, 2, 65536), 'RAID-5 needs at least 3 members (2 data + parity), got 2');
    assert.equal(geometryProblem(1, 1, 65536), 'RAID-1 needs at least 2 members, got 1');
    assert.equal(geometryProblem(3, 4, 65536), 'unsupported RAID level 3: use 0, 1, 4, 5 or 6');
    assert.match(geometryProblem(5, 4, 6000) ?? '', /bad stripe unit 6000 bytes/);
    assert.equal(geometryProblem(5, 4, 65536), null);
  });
});
