/**
 * A RAID volume directory through the engine (createVolumeDir / openVolumeDir, real
 * files): it round-trips writes through CPs and reopens; losing one member keeps it
 * serving degraded; losing one more than the level tolerates makes the CP fail with the
 * RAID error and every later write fail; reads serve what can be rebuilt and refuse the
 * rest by name, never a guess; a
 * read-write open past the tolerance is refused, a read-only one serves. Wrong member
 * counts are one-line errors that create nothing. The stripe journal (DIR/raid-journal.bin):
 * created by create and by a read-write open of a volume without it; a batch a crash left
 * is reported, and left alone, by read-only opens (status, check) and replayed by the next
 * read-write open.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { checkVolumeDir, volumeDirStatus } from '../../src/volume/dir-ops';
import { createVolumeDir, openVolumeDir } from '../../src/volume/dir';
import { raidDeviceOf } from '../../src/volume/served';
import { readLabel } from '../../src/volume/label';
import { FileBlockDevice } from '../../src/io/file-device';
import { RING_SLOTS } from '../../src/tree/layout';
import { RaidGeometry, type RaidLevel } from '../../src/raid/geometry';
import { RAID_JOURNAL_NAME } from '../../src/raid/journal-file';
import { StripeJournal } from '../../src/raid/stripe-journal';
import { scrubVolumeDir } from '../../src/volume/scrub-dir';

const MiB = 1024 * 1024;

/** Each 4 KiB block of [0, 256 KiB) reads as written or fails as not rebuildable; some of each. */
async function expectServedOrRefused(read: (offset: number, length: number) => Promise<Buffer>, want: Buffer): Promise<void> {
  let served = 0, refused = 0;
  for (let off = 0; off < 256 * 1024; off += 4096) {
    try {
      const got = await read(off, 4096);
      assert.ok(got.equals(want.subarray(off, off + 4096)), `block at ${off} served wrong data`);
      served++;
    } catch (e) {
      assert.match(String(e), /cannot be rebuilt/, 'a block that cannot be rebuilt is an EIO naming why');
      refused++;
    }
  }
  assert.ok(served > 0 && refused > 0, `served ${served}, refused ${refused}`);
}

describe('raid volume directory', function () {
  this.timeout(60_000);
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-raid-vol-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  const create = (dir: string, level: number, n: number): Promise<unknown> =>
    createVolumeDir(dir, { sizeBytes: 16 * MiB, nvramSizeBytes: 4 * MiB, raid: { level, stripeUnitBytes: 16 * 1024 }, members: Array.from({ length: n }, (_, i) => `m${i}.img`) });

  it('refuses wrong member counts with one line and creates nothing', async () => {
    const dir = path.join(tmp, 'v');
    await assert.rejects(create(dir, 6, 3), /^Error: RAID-6 needs at least 4 members \(2 data \+ P \+ Q\), got 3$/);
    await assert.rejects(createVolumeDir(dir, { sizeBytes: 16 * MiB, raid: { level: 5 } }), /^Error: RAID-5 needs at least 3 members \(2 data \+ parity\), got 0 \(give each with --member PATH\)$/);
    await assert.rejects(createVolumeDir(dir, { sizeBytes: 16 * MiB, raid: { level: 1 }, members: ['a', 'a'] }), /every --member must be a different file/);
    assert.ok(!fs.existsSync(path.join(dir, 'nvmirror.json')));
  });

  it('serves degraded with one member lost, and read-only with a clear error past the tolerance', async () => {
    const dir = path.join(tmp, 'v');
    await create(dir, 5, 4);
    const pattern = (v: number): Buffer => Buffer.alloc(256 * 1024, v);
    let opened = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    await opened.volume.write(0, pattern(1), false);
    await opened.volume.checkpoint();
    fs.rmSync(path.join(dir, 'm1.img'));
    await opened.volume.write(MiB, pattern(2), false);
    await opened.volume.checkpoint(); // the probe at sync takes m1 out of service; the CP still commits
    await opened.close();
    const st = await volumeDirStatus(dir);
    assert.equal(st.raid!.state, 'degraded');
    assert.match(st.raid!.memberStatus[1]!.reason ?? '', /cannot open: no such file/);
    opened = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    assert.ok((await opened.volume.read(MiB, 256 * 1024)).equals(pattern(2)));
    fs.rmSync(path.join(dir, 'm3.img'));
    await opened.volume.write(2 * MiB, pattern(3), false);
    await assert.rejects(opened.volume.checkpoint(), /RAID-5 volume has lost 2 of 4 members, more than the 1 it tolerates .*member 3 m3\.img: faulted, member file m3\.img was deleted.*: read-only/);
    await assert.rejects(opened.volume.write(3 * MiB, pattern(4), false));
    await expectServedOrRefused(opened.volume.read.bind(opened.volume), pattern(1));
    await opened.close().catch(() => undefined);
    await assert.rejects(openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 }), /lost 2 of 4 members.*; open it read-only \(serve --read-only, status, check\)/);
    const ro = await openVolumeDir(dir, { readOnly: true, control: false, cpIntervalMs: 0 });
    try {
      await expectServedOrRefused(ro.volume.read.bind(ro.volume), pattern(1));
    } finally {
      await ro.close();
    }
  });

  it('keeps a stripe journal: made by create and by a read-write open without one; a batch left by a crash is reported read-only and replayed read-write', async () => {
    const dir = path.join(tmp, 'v');
    const jp = path.join(dir, RAID_JOURNAL_NAME);
    await create(dir, 5, 4);
    assert.ok(fs.existsSync(jp), 'create --raid 5 makes the journal');
    // A volume from before the journal gets one at its next read-write open (not at a read-only one).
    fs.rmSync(jp);
    await (await openVolumeDir(dir, { readOnly: true, control: false, cpIntervalMs: 0 })).close();
    assert.ok(!fs.existsSync(jp), 'a read-only open creates nothing');
    await (await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 })).close();
    assert.ok(fs.existsSync(jp), 'a read-write open creates the journal');
    // A crash between the journal's sync and the release: a whole batch for the last stripe
    // (never written: zeroes everywhere), X in data column 0 row 0 and P = X there.
    const label = await readLabel(dir);
    const g = new RaidGeometry(label.raid!.level as RaidLevel, label.members.length, label.raid!.stripeUnitBytes, label.members[0]!.blockCount, RING_SLOTS);
    const stripe = g.stripes - 1;
    const x = Buffer.alloc(4096, 0x5a);
    const jdev = await FileBlockDevice.open(jp);
    const j = await StripeJournal.open(jdev, { level: g.level, members: g.members, unitBlocks: g.unitBlocks, stripes: g.stripes, columns: g.dataMembers + g.parityMembers });
    await j.record([{ stripe, cells: [{ column: 0, row: 0, data: x }, { column: g.dataMembers, row: 0, data: x }] }]);
    await j.close();
    const before = fs.readFileSync(jp);
    const st = await volumeDirStatus(dir);
    assert.deepEqual(st.raid!.journalPending, { stripes: 1, epoch: j.currentEpoch });
    const report = await checkVolumeDir(dir);
    assert.ok(report.ok, report.problems.join('; '));
    assert.ok(report.notes.some((n) => /stripe journal: a batch of 1 stripe\(s\) .* pending replay/.test(n)), report.notes.join('\n'));
    // A scrub without --repair cannot replay it: refused with one line rather than calling the batch's stripes parity errors.
    await assert.rejects(scrubVolumeDir(dir, { repair: false }), /stripe journal: a batch of 1 stripe\(s\).*scrub --repair \(or serve\) replays it first/);
    assert.ok(fs.readFileSync(jp).equals(before), 'read-only opens leave the journal as it is');
    const member = (i: number): Buffer => {
      const b = Buffer.alloc(4096);
      const fd = fs.openSync(path.join(dir, label.members[i]!.path), 'r');
      fs.readSync(fd, b, 0, 4096, g.unitStart(stripe) * 4096);
      fs.closeSync(fd);
      return b;
    };
    assert.ok(member(g.dataMember(stripe, 0)).equals(Buffer.alloc(4096)));
    const rw = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    try {
      const h = raidDeviceOf(rw.volume)!.health();
      assert.equal(h.journal?.replayedStripes, 1);
      assert.equal(h.journalPending, undefined);
    } finally {
      await rw.close();
    }
    assert.ok(member(g.dataMember(stripe, 0)).equals(x), 'the replay wrote the data cell');
    assert.ok(member(g.pMember(stripe)).equals(x), 'the replay wrote the parity cell');
    assert.equal((await volumeDirStatus(dir)).raid!.journalPending, undefined, 'nothing pending after the replay');
    assert.equal((await scrubVolumeDir(dir, { repair: false })).uncorrectable, 0, 'after the replay a read-only scrub runs');
  });
});

