/**
 * Scrub (src/raid/scrub.ts) over a block tree on a RaidDevice of memory members: corrupt
 * data blocks on one member and parity on another are reported without --repair (nothing
 * written, exit status not ok), fixed with it, and a second scrub is clean; RAID-6 repairs
 * two bad columns in one stripe; RAID-1 finds a bad copy the tree never reads; damage
 * beyond the level's tolerance is uncorrectable and never "repaired" with wrong data.
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BlockTree } from '../../src/tree/tree';
import type { BlockChange } from '../../src/tree/types';
import { RING_SLOTS } from '../../src/tree/layout';
import { RaidGeometry, type RaidLevel } from '../../src/raid/geometry';
import { RaidDevice } from '../../src/raid/raid-device';
import { superblockPick } from '../../src/volume/raid-members';
import { SCRUB_CHECKPOINT_STRIPES, scrubRaid, scrubState, type ScrubCheckpoint, type ScrubCheckpointStore, type ScrubProgress } from '../../src/raid/scrub';
import { testBit } from '../../src/util/bitmap';
import type { Clock } from '../../src/io/types';
import { createVolumeDir } from '../../src/volume/dir';
import { scrubVolumeDir } from '../../src/volume/scrub-dir';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

const B = 4096;
const UUID = '11111111-2222-4333-8444-555555555555';
const MiB = 1024 * 1024;
const LBNS = 600;

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 7) >>> 0, i);
  return b;
}

function raidOver(level: RaidLevel, mems: MemoryBlockDevice[], readOnly = false): RaidDevice {
  const g = new RaidGeometry(level, mems.length, 16 * 1024, mems[0]!.blockCount, RING_SLOTS);
  return new RaidDevice({ geometry: g, volumeUuid: UUID, generation: 1, headPick: superblockPick, readOnly, members: mems.map((d, i) => ({ name: `m${i}`, dev: d })) });
}

/** A volume with LBNS blocks written over 3 CPs (lbn -> seed), and a snapshot after the first. */
async function volume(level: RaidLevel, n: number): Promise<{ mems: MemoryBlockDevice[]; model: Map<number, number> }> {
  const mems = Array.from({ length: n }, () => new MemoryBlockDevice(16 + 4 * 600));
  const raid = raidOver(level, mems);
  await BlockTree.format(raid, { sizeBytes: 8 * MiB, volumeUuid: UUID });
  const tree = await BlockTree.open(raid);
  const model = new Map<number, number>();
  for (let cp = 0; cp < 3; cp++) {
    const changes: BlockChange[] = [];
    for (let lbn = cp * 100; lbn < LBNS; lbn += 1 + cp) {
      changes.push({ lbn, data: block(cp * 10000 + lbn) });
      model.set(lbn, cp * 10000 + lbn);
    }
    await tree.commitCp(changes, { nvlogSeq: cp + 1, nvlogEpoch: 1 }, cp === 1 ? [{ kind: 'create', name: 's0' }] : []);
  }
  assert.deepEqual((await tree.check()).problems, []);
  await tree.close();
  await raid.sync();
  return { mems, model };
}

/** Damages one member block (`k` picks a different byte, so damage on several columns never cancels out in parity). */
function flip(dev: MemoryBlockDevice, memberBlock: number, k = 0): void {
  const b = dev.peekBlock(memberBlock);
  b[200 + 17 * k] = b[200 + 17 * k]! ^ (0x5a + k);
  void dev.writeBlocks(memberBlock, b);
}

function digest(mems: MemoryBlockDevice[]): string[] {
  return mems.map((d) => {
    const h = crypto.createHash('sha256');
    for (let p = 0; p < d.blockCount; p++) h.update(d.peekBlock(p));
    return h.digest('hex');
  });
}

async function dataPbas(raid: RaidDevice, model: Map<number, number>): Promise<Map<number, number>> {
  const t = await BlockTree.open(raid);
  const out = new Map<number, number>(); // pba -> lbn
  for (const lbn of model.keys()) out.set((await t.locate(lbn)).data!.pba, lbn);
  await t.close();
  return out;
}

async function scrub(mems: MemoryBlockDevice[], level: RaidLevel, repair: boolean, readOnly = !repair) {
  const raid = raidOver(level, mems, readOnly);
  const tree = await BlockTree.open(raid);
  const r = await scrubRaid(tree, raid, { repair });
  assert.equal(scrubState(raid).last, r, 'the last report stays readable (status)');
  assert.equal(scrubState(raid).running, undefined);
  if (repair) await raid.sync();
  await tree.close();
  return { r, raid };
}

async function expectModel(mems: MemoryBlockDevice[], level: RaidLevel, model: Map<number, number>): Promise<void> {
  const t = await BlockTree.open(raidOver(level, mems, true));
  for (const [lbn, v] of model) assert.ok((await t.readBlock(lbn))!.equals(block(v)), `lbn ${lbn} reads right`);
  await t.close();
}

describe('raid scrub', () => {
  it('RAID-5: reports bad data on one member and bad parity on another without writing, repairs them with --repair, then scrubs clean', async () => {
    const { mems, model } = await volume(5, 4);
    const raid = raidOver(5, mems, true);
    const g = raid.geometry;
    const pbas = await dataPbas(raid, model);
    // Three data blocks on member 1, in three different stripes.
    const bad: number[] = [];
    for (const pba of pbas.keys()) {
      const at = g.locate(pba);
      if (at.member === 1 && !bad.some((p) => g.stripeOf(p) === at.stripe)) bad.push(pba);
      if (bad.length === 3) break;
    }
    assert.equal(bad.length, 3);
    for (const pba of bad) flip(mems[1]!, g.locate(pba).memberBlock);
    // P of another stripe in use, on a member other than 1.
    const pStripe = [...new Set([...pbas.keys()].map((p) => g.stripeOf(p)))].find((s) => g.pMember(s) !== 1 && !bad.some((p) => g.stripeOf(p) === s))!;
    flip(mems[g.pMember(pStripe)]!, g.unitStart(pStripe) + 1);

    const before = digest(mems);
    for (const readOnly of [true, false]) {
      const { r } = await scrub(mems, 5, false, readOnly);
      assert.equal(r.ok, false, 'errors found: not ok (non-zero exit)');
      assert.equal(r.checksumErrors, 3);
      assert.equal(r.parityErrors, 1);
      assert.equal(r.corrected, 0);
      assert.equal(r.uncorrectable, 0);
      assert.equal(r.members[1]!.checksum, 3);
      assert.equal(r.members[g.pMember(pStripe)]!.checksum, 1);
      assert.ok(r.scannedBytes > model.size * B);
      assert.deepEqual(digest(mems), before, `no member changed (device opened ${readOnly ? 'read-only' : 'read-write'})`);
    }

    const { r: fixed } = await scrub(mems, 5, true);
    assert.equal(fixed.ok, true);
    assert.equal(fixed.checksumErrors, 3);
    assert.equal(fixed.parityErrors, 1);
    assert.equal(fixed.corrected, 4);
    assert.equal(fixed.uncorrectable, 0);
    const { r: again } = await scrub(mems, 5, false);
    assert.deepEqual([again.ok, again.checksumErrors, again.parityErrors, again.uncorrectable], [true, 0, 0, 0], 'a second scrub is clean');
    await expectModel(mems, 5, model);
  });

  it('RAID-6: two bad columns in one stripe (two data; data and P) are repaired', async () => {
    const { mems, model } = await volume(6, 6);
    const raid = raidOver(6, mems, true);
    const g = raid.geometry;
    const pbas = await dataPbas(raid, model);
    const [x, y] = [...pbas.keys()].filter((p) => g.locate(p).column === 0).slice(0, 40).filter((p, i, a) => a.findIndex((q) => g.stripeOf(q) === g.stripeOf(p)) === i);
    assert.ok(x !== undefined && y !== undefined && g.stripeOf(x) !== g.stripeOf(y));
    // Stripe of x: data columns 0 and 1 at the same row.
    const ax = g.locate(x);
    flip(mems[ax.member]!, ax.memberBlock);
    flip(mems[g.dataMember(ax.stripe, 1)]!, ax.memberBlock, 1);
    // Stripe of y: data column 0 and P at the same row.
    const ay = g.locate(y);
    flip(mems[ay.member]!, ay.memberBlock);
    flip(mems[g.pMember(ay.stripe)]!, ay.memberBlock, 1);
    const before = digest(mems);
    const { r } = await scrub(mems, 6, false);
    assert.equal(r.ok, false);
    assert.ok(r.checksumErrors >= 2, `${r.checksumErrors} checksum errors`);
    assert.equal(r.uncorrectable, 0);
    assert.deepEqual(digest(mems), before);
    const { r: fixed } = await scrub(mems, 6, true);
    assert.equal(fixed.ok, true, fixed.problems.join('; '));
    assert.equal(fixed.uncorrectable, 0);
    assert.ok(fixed.corrected >= 3, `${fixed.corrected} corrected`);
    const { r: again } = await scrub(mems, 6, false);
    assert.deepEqual([again.ok, again.checksumErrors, again.parityErrors], [true, 0, 0], 'a second scrub is clean');
    await expectModel(mems, 6, model);
  });

  it('RAID-1: a bad second copy (never read by the tree) is found by comparing copies and rewritten from the verified one', async () => {
    const { mems, model } = await volume(1, 3);
    const raid = raidOver(1, mems, true);
    const g = raid.geometry;
    const pba = [...(await dataPbas(raid, model)).keys()][5]!;
    flip(mems[2]!, g.locate(pba).memberBlock);
    const { r } = await scrub(mems, 1, false);
    assert.deepEqual([r.ok, r.checksumErrors, r.parityErrors, r.members[2]!.checksum], [false, 0, 1, 1]);
    const { r: fixed } = await scrub(mems, 1, true);
    assert.deepEqual([fixed.ok, fixed.corrected], [true, 1]);
    assert.ok(mems[2]!.peekBlock(g.locate(pba).memberBlock).equals(mems[0]!.peekBlock(g.locate(pba).memberBlock)));
    const { r: again } = await scrub(mems, 1, false);
    assert.deepEqual([again.ok, again.parityErrors], [true, 0]);
  });

  it('RAID-5: a stripe below a block that could not be rebuilt is compared, never rewritten; its parity rebuilds the data once the block above is back', async () => {
    const { mems, model } = await volume(5, 4);
    const raid = raidOver(5, mems, true);
    const g = raid.geometry;
    // lbn x's leaf (shared by the live tree and the snapshot) and its data block, in different stripes.
    const t = await BlockTree.open(raid);
    let x = -1;
    let leafPba = -1;
    let dataPba = -1;
    for (let lbn = 0; lbn < 168 && x < 0; lbn++) {
      const { data, path: p } = await t.locate(lbn);
      const leaf = p[p.length - 1]!.pba;
      if (data && g.stripeOf(data.pba) !== g.stripeOf(leaf)) [x, leafPba, dataPba] = [lbn, leaf, data.pba];
    }
    await t.close();
    assert.ok(x >= 0, 'a data block outside its leaf\'s stripe');
    const leafAt = g.locate(leafPba);
    const dataAt = g.locate(dataPba);
    // The leaf is lost (its column and P of its row), the data block bad on its one member.
    const lose = (): void => {
      flip(mems[leafAt.member]!, leafAt.memberBlock, 0);
      flip(mems[g.pMember(leafAt.stripe)]!, leafAt.memberBlock, 1);
    };
    lose();
    flip(mems[dataAt.member]!, dataAt.memberBlock, 2);
    const unitOf = (s: number): string[] => mems.map((d) => {
      const h = crypto.createHash('sha256');
      for (let b = g.unitStart(s); b < g.unitStart(s) + g.unitBlocks; b++) h.update(d.peekBlock(b));
      return h.digest('hex');
    });
    const before = unitOf(dataAt.stripe);
    for (const repair of [false, true]) {
      const { r } = await scrub(mems, 5, repair);
      assert.equal(r.ok, false);
      assert.ok(r.uncorrectable >= 1, `${r.uncorrectable} uncorrectable`);
      assert.ok(r.problems.some((p) => p.startsWith(`stripe ${dataAt.stripe}: `) && p.includes('could not be verified') && p.endsWith('left as it is')), r.problems.join('\n'));
      assert.deepEqual(unitOf(dataAt.stripe), before, `the stripe below the lost leaf is not rewritten (repair ${repair})`);
      assert.ok(r.members[g.pMember(dataAt.stripe)]!.checksum >= 1, 'the mismatch counts on the parity member');
    }
    // The leaf comes back (as a mirror's copy would bring it): the bad data block is found and rebuilt from the parity kept.
    lose();
    const { r: fixed } = await scrub(mems, 5, true);
    assert.deepEqual([fixed.ok, fixed.checksumErrors, fixed.uncorrectable], [true, 1, 0], fixed.problems.join('\n'));
    await expectModel(mems, 5, model);
  });

  it('progress is readable while it runs (status), through both passes, and a second scrub at once is refused', async () => {
    const { mems } = await volume(5, 4);
    const raid = raidOver(5, mems, true);
    const tree = await BlockTree.open(raid);
    const seen: ScrubProgress[] = [];
    let refused = '';
    const r = await scrubRaid(tree, raid, {
      repair: false,
      onProgress: (p) => {
        assert.deepEqual(scrubState(raid).running, p, 'status reads the same figures');
        if (seen.length === 0) void scrubRaid(tree, raid, { repair: false }).catch((e: Error) => { refused = e.message; });
        seen.push(p);
      },
    });
    assert.ok(seen.some((p) => p.phase === 'checksums') && seen.some((p) => p.phase === 'parity'));
    for (let i = 1; i < seen.length; i++) assert.ok(seen[i]!.scannedBytes >= seen[i - 1]!.scannedBytes, 'scanned bytes only grow');
    assert.equal(seen[seen.length - 1]!.scannedBytes, r.scannedBytes);
    assert.equal(refused, 'a scrub of this volume is already running');
    await tree.close();
  });

  it('a volume that is not RAID is refused with one line', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-scrub-'));
    try {
      await createVolumeDir(path.join(dir, 'v'), { sizeBytes: 8 * MiB, nvramSizeBytes: 4 * MiB });
      await assert.rejects(scrubVolumeDir(path.join(dir, 'v'), { repair: true }), /^Error: .*\/v is not a RAID volume: there is nothing to scrub \(use nvmirror check\)$/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const [level, n, cols] of [[5, 4, 2], [6, 6, 3]] as [RaidLevel, number, number][]) {
    it(`RAID-${level}: ${cols} bad columns in one row are uncorrectable: reported, not ok, and never rewritten`, async () => {
      const { mems, model } = await volume(level, n);
      const raid = raidOver(level, mems, true);
      const g = raid.geometry;
      const pbas = await dataPbas(raid, model);
      const x = [...pbas.keys()].find((p) => g.locate(p).column === 0)!;
      const at = g.locate(x);
      for (let c = 0; c < cols; c++) flip(mems[g.dataMember(at.stripe, c)]!, at.memberBlock, c);
      const before = digest(mems);
      for (const repair of [false, true]) {
        const { r } = await scrub(mems, level, repair);
        assert.equal(r.ok, false);
        assert.ok(r.uncorrectable >= 1, `${r.uncorrectable} uncorrectable`);
        assert.ok(r.problems.some((p) => p.includes(`pba ${x}`)), r.problems.join('\n'));
        assert.deepEqual(digest(mems), before, `nothing rewritten (repair ${repair})`);
      }
      const t = await BlockTree.open(raidOver(level, mems, true));
      await assert.rejects(t.readBlock(pbas.get(x)!), /checksum|EIO|verify/i, 'the block is an error, never wrong data');
      await t.close();
    });
  }

  it('a scrub that dies after a checkpoint resumes from it: pass 1 skipped, the rest checked, counts carried over, the checkpoint cleared', async () => {
    const { mems } = await volume(5, 4);
    let raid = raidOver(5, mems);
    let tree = await BlockTree.open(raid);
    const g = raid.geometry;
    const used = tree.usedBitmap();
    const usedStripes: number[] = [];
    for (let st = 0; st < g.stripes; st++) {
      let any = false;
      for (let p = st * g.stripeDataBlocks; p < (st + 1) * g.stripeDataBlocks && !any; p++) any = testBit(used, p);
      if (any) usedStripes.push(st);
    }
    assert.ok(usedStripes.length > 2 * SCRUB_CHECKPOINT_STRIPES, `${usedStripes.length} stripes in use: more than two batches`);
    // Stale P in every stripe in use.
    for (const st of usedStripes) flip(mems[g.pMember(st)]!, g.unitStart(st));
    let saved: ScrubCheckpoint | undefined;
    let cleared = 0;
    const store = (dieAtSave: boolean): ScrubCheckpointStore => ({
      load: () => Promise.resolve(saved),
      save: (c) => {
        saved = JSON.parse(JSON.stringify(c)) as ScrubCheckpoint; // as the file would hold it
        return dieAtSave ? Promise.reject(new Error('power cut after the checkpoint')) : Promise.resolve();
      },
      clear: () => {
        saved = undefined;
        cleared++;
        return Promise.resolve();
      },
    });
    await assert.rejects(scrubRaid(tree, raid, { repair: true, store: store(true) }), /power cut/);
    const cp = saved!;
    assert.equal(cp.nextStripe, usedStripes[SCRUB_CHECKPOINT_STRIPES], 'the checkpoint names the first stripe of the second batch');
    assert.deepEqual([cp.parityErrors, cp.parityCorrected, cp.stripesChecked], [SCRUB_CHECKPOINT_STRIPES, SCRUB_CHECKPOINT_STRIPES, SCRUB_CHECKPOINT_STRIPES]);
    await tree.close(); // (the device is left open: closing it would close the memory members)

    // The restart: a new device over the same members, the checkpoint found.
    raid = raidOver(5, mems);
    tree = await BlockTree.open(raid);
    let phases = new Set<string>();
    const r = await scrubRaid(tree, raid, { repair: true, store: store(false), onProgress: (p) => phases.add(p.phase) });
    assert.equal(r.resumedAtStripe, cp.nextStripe);
    assert.deepEqual([...phases], ['parity'], 'pass 1 is not run again');
    assert.deepEqual([r.stripesChecked, r.parityErrors, r.corrected, r.uncorrectable, r.blocksVerified], [usedStripes.length, usedStripes.length, usedStripes.length, 0, cp.blocksVerified]);
    assert.ok(r.ok);
    assert.equal(saved, undefined);
    assert.equal(cleared, 1, 'cleared at the end');
    phases = new Set<string>();
    const again = await scrubRaid(tree, raid, { repair: false, store: store(false), onProgress: (p) => phases.add(p.phase) });
    assert.deepEqual([again.parityErrors, again.checksumErrors, again.resumedAtStripe, [...phases]], [0, 0, undefined, ['checksums', 'parity']], 'clean, and from the start');
    // A checkpoint of the other mode is not resumed from.
    saved = { ...cp, repair: false };
    const other = await scrubRaid(tree, raid, { repair: true, store: store(false) });
    assert.equal(other.resumedAtStripe, undefined);
    await tree.close();
    await raid.close();
  });

  it('--rate paces both passes on the injected clock', async () => {
    const { mems } = await volume(5, 4);
    const raid = raidOver(5, mems);
    const tree = await BlockTree.open(raid);
    let now = 1_000_000;
    let waited = 0;
    const clock: Clock = {
      nowMs: () => now,
      setTimeout: (fn, ms) => {
        now += ms;
        waited++;
        queueMicrotask(fn);
        return { cancel: () => undefined };
      },
    };
    const rate = 4 * MiB;
    const r = await scrubRaid(tree, raid, { repair: false, rateBytesPerSec: rate, clock });
    assert.ok(r.ok && waited > 0);
    // Every byte it read took its turn: the run lasted at least scanned / rate.
    assert.ok(r.durationMs >= Math.floor((r.scannedBytes / rate) * 1000) - 1, `${r.durationMs} ms for ${r.scannedBytes} bytes at ${rate} B/s`);
    await tree.close();
    await raid.close();
  });
});
