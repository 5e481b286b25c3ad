/**
 * A block of a mirror that fails verification under a reader (mirror-dir.ts healBlock): the
 * reader gets the source's copy if it verifies, and the mirror's bad copy is rewritten only
 * when nothing else can be writing that pba (the reader is on the committed CP, which uses
 * the block, and no commit is under way); otherwise it is served and left (counted).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import type { RepairSource } from '../../src/tree/types';
import { baselinedMirror, blockOf } from './mirror-baseline-helper';

const UUID = '3d1c0b9a-0000-4000-8000-0000000bea11';
const DEVICE_BLOCKS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;

describe('mirror: a damaged block served from the source and rewritten', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-heal-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('rewritten when the reader is on the committed CP; only served for an older CP or during a commit; a copy that does not verify is refused', async () => {
    const b = await baselinedMirror(tmp, UUID, VOLUME_BYTES, DEVICE_BLOCKS, log);
    const m = b.mirror;
    try {
      // lbn 2 holds blockOf(200) (CP 2, i = 0): find its pba on the mirror.
      const want = blockOf(200);
      let pba = -1;
      for (let p = 8; p < DEVICE_BLOCKS && pba < 0; p++) if ((await m.readRaw([p])).equals(want)) pba = p;
      assert.ok(pba > 0);
      let answer: Buffer = want;
      const source: RepairSource = { name: 'the test source', read: async () => Buffer.from(answer) };
      m.repairSource = source;
      const bad = Buffer.from(want);
      bad[7] = bad[7]! ^ 1;
      await m.writeBlocks(pba, bad, false);

      // A copy that does not verify: refused (EIO), nothing written.
      answer = blockOf(999);
      await assert.rejects(m.view!.readBlock(2), /checksum mismatch/);
      assert.equal(m.blocksServedFromSource, 0);
      assert.ok((await m.readRaw([pba])).equals(bad));

      // The committed CP's reader: served and rewritten.
      answer = want;
      assert.ok((await m.view!.readBlock(2))!.equals(want));
      for (let i = 0; i < 100 && m.blocksHealed === 0; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(m.blocksServedFromSource, 1);
      assert.equal(m.blocksHealed, 1);
      assert.ok((await m.readRaw([pba])).equals(want), 'the bad copy was rewritten');

      // A reader on an older CP (the view of CP - 1), or a commit under way: served only.
      const repairFor = (cp: number): RepairSource => (m as unknown as { repairFor(cp: number): RepairSource }).repairFor(cp);
      await m.writeBlocks(pba, bad, false);
      repairFor(b.cp - 1).repaired!(pba, want);
      (m as unknown as { committing: boolean }).committing = true;
      repairFor(b.cp).repaired!(pba, want);
      (m as unknown as { committing: boolean }).committing = false;
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(m.blocksServedFromSource, 3);
      assert.equal(m.blocksHealed, 1, 'neither was rewritten');
      assert.ok((await m.readRaw([pba])).equals(bad));
      // A block the committed CP does not use (free space): never rewritten.
      let free = -1;
      for (let p = DEVICE_BLOCKS - 1; p > 8 && free < 0; p--) if (!(await m.readRaw([p])).some((x) => x !== 0)) free = p;
      repairFor(b.cp).repaired!(free, want);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(m.blocksHealed, 1);
      assert.ok(!(await m.readRaw([free])).some((x) => x !== 0), 'a free block is not written');
    } finally {
      await m.close();
    }
  });
});
