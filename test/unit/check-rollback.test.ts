/**
 * `check` on a volume directory whose newest committed CP no longer verifies: mount rolls
 * back to an older CP, and check must say so (a problem naming both CPs), never "ok".
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { checkVolumeDir } from '../../src/volume/dir-ops';
import { createVolumeDir, openVolumeDir } from '../../src/volume/dir';
import { decodeSuperblock, RING_SLOTS } from '../../src/tree/layout';

const BS = 4096;

/** Flips one byte of the newest CP's data-tree root block in the member file; returns that CP. */
export function damageNewestRoot(member: string): number {
  const fd = fs.openSync(member, 'r+');
  try {
    const ring = Buffer.alloc(RING_SLOTS * BS);
    fs.readSync(fd, ring, 0, ring.length, 0);
    let newest: { cp: number; pba: number } | undefined;
    for (let s = 0; s < RING_SLOTS; s++) {
      const sb = decodeSuperblock(ring.subarray(s * BS, (s + 1) * BS));
      if (typeof sb === 'string' || sb.root === null) continue;
      if (!newest || sb.cpNumber > newest.cp) newest = { cp: sb.cpNumber, pba: sb.root.pba };
    }
    assert.ok(newest, 'a superblock with a root');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, newest.pba * BS + 300);
    b[0] = b[0]! ^ 0xff;
    fs.writeSync(fd, b, 0, 1, newest.pba * BS + 300);
    fs.fsyncSync(fd);
    return newest.cp;
  } finally {
    fs.closeSync(fd);
  }
}

describe('check reports a mount-time rollback', function () {
  this.timeout(60_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-rollback-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('check is not ok when the newest CP does not verify and an older one was mounted', async () => {
    const dir = path.join(tmp, 'v');
    await createVolumeDir(dir, { sizeBytes: 64 * 1024 * 1024, nvramSizeBytes: 1024 * 1024 });
    const v = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    await v.volume.write(0, Buffer.alloc(BS, 1), false);
    await v.volume.checkpoint();
    await v.volume.write(BS, Buffer.alloc(BS, 2), false);
    await v.close(); // final CP
    const before = await checkVolumeDir(dir);
    assert.ok(before.ok, before.problems.join('\n'));

    const newestCp = damageNewestRoot(path.join(dir, 'member-0.img'));
    const r = await checkVolumeDir(dir);
    assert.equal(r.ok, false, 'check must not say ok after a rollback');
    assert.ok(r.problems.some((p) => new RegExp(`newest committed CP ${newestCp} does not verify, CP \\d+ was mounted instead`).test(p)), r.problems.join('\n'));
  });
});
