/**
 * replace-member (src/volume/replace-member.ts) on a RAID-5 volume directory of member
 * files: a deleted member is rebuilt onto a new file, interrupted mid-way (the test hook
 * stops it as a crash would, after the new file is synced and the marker written) and
 * resumed; then the volume opens with every member in service, reads everything right,
 * checks and scrubs clean, and still reads right with another member lost (so the new
 * one holds real data). Bad input is one line and changes nothing.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createVolumeDir, openVolumeParts } from '../../src/volume/dir';
import { RaidDevice } from '../../src/raid/raid-device';
import { scrubRaid } from '../../src/raid/scrub';
import { REPLACE_MARKER_NAME, replaceMember } from '../../src/volume/replace-member';
import type { BlockChange } from '../../src/tree/types';

const MiB = 1024 * 1024;
const B = 4096;
const LBNS = 1500;

function block(lbn: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(lbn + 7, 2654435761) + i) >>> 0, i);
  return b;
}

async function withVolume<T>(dir: string, readOnly: boolean, fn: (p: Awaited<ReturnType<typeof openVolumeParts>>) => Promise<T>): Promise<T> {
  const p = await openVolumeParts(dir, readOnly);
  try {
    return await fn(p);
  } finally {
    await p.tree.close();
    if (!readOnly) await p.dev.sync();
    await p.dev.close();
    await p.region.close();
    await p.lock.release();
  }
}

async function expectAll(dir: string): Promise<void> {
  await withVolume(dir, true, async ({ tree }) => {
    for (let lbn = 0; lbn < LBNS; lbn++) assert.ok((await tree.readBlock(lbn))!.equals(block(lbn)), `lbn ${lbn}`);
    assert.deepEqual((await tree.check()).problems, []);
  });
}

describe('raid replace-member', function () {
  this.timeout(120_000);
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-raid-replace-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('RAID-5: rebuilds a deleted member onto a new file, resumes after an interruption, and the volume is whole again', async () => {
    const vol = path.join(tmp, 'vol');
    await createVolumeDir(vol, { sizeBytes: 16 * MiB, nvramSizeBytes: 4 * MiB, raid: { level: 5, stripeUnitBytes: 16 * 1024 }, members: ['m0.img', 'm1.img', 'm2.img', 'm3.img'] });
    await withVolume(vol, false, async ({ tree }) => {
      for (let cp = 0; cp < 3; cp++) {
        const changes: BlockChange[] = [];
        for (let lbn = cp * 500; lbn < (cp + 1) * 500; lbn++) changes.push({ lbn, data: block(lbn) });
        await tree.commitCp(changes, { nvlogSeq: 0, nvlogEpoch: 0 });
      }
    });
    fs.rmSync(path.join(vol, 'm1.img'));
    const label = fs.readFileSync(path.join(vol, 'nvmirror.json'), 'utf8');

    // Bad input: one line, nothing changed.
    await assert.rejects(replaceMember(vol, 'nope.img', path.join(vol, 'n1.img')), /^Error: nope\.img is not a member of .* \(members: 0 m0\.img, 1 m1\.img, 2 m2\.img, 3 m3\.img\)$/);
    await assert.rejects(replaceMember(vol, 'm1.img', path.join(vol, 'm2.img')), /m2\.img is already a member/);
    fs.writeFileSync(path.join(tmp, 'exists.img'), 'x');
    await assert.rejects(replaceMember(vol, 'm1.img', path.join(tmp, 'exists.img')), /exists: give a new file/);
    assert.equal(fs.readFileSync(path.join(vol, 'nvmirror.json'), 'utf8'), label);
    assert.ok(!fs.existsSync(path.join(vol, 'n1.img')) && !fs.existsSync(path.join(vol, REPLACE_MARKER_NAME)));

    // Interrupted after 10 stripes: the marker says where to go on; the volume still lists m1.img.
    await assert.rejects(replaceMember(vol, 'm1.img', path.join(vol, 'n1.img'), { stopAfterStripes: 10 }), /stopped after 10 stripes/);
    const marker = JSON.parse(fs.readFileSync(path.join(vol, REPLACE_MARKER_NAME), 'utf8')) as { nextStripe: number };
    assert.ok(marker.nextStripe > 0);
    assert.equal(fs.readFileSync(path.join(vol, 'nvmirror.json'), 'utf8'), label);
    await assert.rejects(replaceMember(vol, 'm2.img', path.join(vol, 'n2.img')), /a replacement of member 1 m1\.img by n1\.img is in progress/);

    const r = await replaceMember(vol, 'm1.img', path.join(vol, 'n1.img'));
    assert.equal(r.resumedAt, marker.nextStripe);
    assert.equal(r.index, 1);
    assert.equal(r.new, 'n1.img');
    assert.ok(r.stripesRebuilt > 0);
    assert.ok(!fs.existsSync(path.join(vol, REPLACE_MARKER_NAME)));

    await withVolume(vol, true, async ({ dev, tree }) => {
      const h = (dev as RaidDevice).health();
      assert.equal(h.state, 'online', 'no longer degraded');
      assert.deepEqual(h.memberStatus.map((m) => [m.name, m.state]), [['m0.img', 'online'], ['n1.img', 'online'], ['m2.img', 'online'], ['m3.img', 'online']]);
      const s = await scrubRaid(tree, dev as RaidDevice, { repair: false });
      assert.deepEqual([s.ok, s.checksumErrors, s.parityErrors, s.stripesUnverifiable], [true, 0, 0, 0], 'every stripe in use is consistent with the new member');
    });
    await expectAll(vol);
    // The new member holds real data: lose another one and everything still reads right.
    fs.rmSync(path.join(vol, 'm3.img'));
    await expectAll(vol);
  });
});
