/**
 * A RAID volume directory through the engine (createVolumeDir / openVolumeDir, real
 * files): it round-trips writes through CPs and reopens; losing one member keeps it
 * serving degraded; losing one more than the level tolerates makes the CP fail with the
 * RAID error and every later write fail; reads serve what can be rebuilt and refuse the
 * rest by name, never a guess; a
 * read-write open past the tolerance is refused, a read-only one serves. Wrong member
 * counts are one-line errors that create nothing.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createVolumeDir, openVolumeDir, volumeDirStatus } from '../../src/volume/dir';

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
});
