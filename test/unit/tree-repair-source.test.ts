/**
 * BlockTree.setRepairSource (verified-read.ts): a block that fails verification is asked of
 * the repair source (a mirror, in serve); its copy is served and written over the bad one
 * only if it verifies against the same pointer. A copy that does not verify, a source that
 * fails, or no source: the read is refused with EIO and counted, as before.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BlockTree } from '../../src/tree/tree';
import type { RepairSource } from '../../src/tree/types';
import { RING_SLOTS } from '../../src/tree/layout';

const B = 4096;
const UUID = '7a3c2e10-5b4d-4e6f-8a9b-0c1d2e3f4a5b';

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 3, 2654435761) + i) >>> 0, i);
  return b;
}

/** The pba holding data equal to want (the only one). */
async function pbaOf(dev: MemoryBlockDevice, want: Buffer): Promise<number> {
  const buf = Buffer.alloc(B);
  const found: number[] = [];
  for (let p = 0; p < dev.blockCount; p++) {
    await dev.readBlocks(p, 1, buf);
    if (buf.equals(want)) found.push(p);
  }
  assert.equal(found.length, 1, `copies of the block: ${found.join(', ')}`);
  return found[0]!;
}

async function damage(dev: MemoryBlockDevice, pba: number): Promise<void> {
  const buf = Buffer.alloc(B);
  await dev.readBlocks(pba, 1, buf);
  buf[123] = buf[123]! ^ 0x40;
  await dev.writeBlocks(pba, buf);
}

/** A memory device whose reads of the blocks in `failing` fail with EIO (a bad sector), until written. */
class BadSectors extends MemoryBlockDevice {
  readonly failing = new Set<number>();
  override async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    for (let p = pba; p < pba + count; p++) if (this.failing.has(p)) throw Object.assign(new Error(`EIO: i/o error, read (pba ${p})`), { code: 'EIO' });
    return super.readBlocks(pba, count, dst);
  }
  override async writeBlocks(pba: number, data: Buffer): Promise<void> {
    for (let p = pba; p < pba + data.length / B; p++) this.failing.delete(p);
    return super.writeBlocks(pba, data);
  }
}

describe('tree: a repair source for blocks that fail verification', () => {
  it('a copy that verifies is served and rewritten; one that does not, a failing source, or none: EIO, counted', async () => {
    const dev = new MemoryBlockDevice(8192);
    await BlockTree.format(dev, { sizeBytes: 16 * 1024 * 1024, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    try {
      await t.commitCp([10, 20, 30, 40].map((lbn) => ({ lbn, data: block(lbn) })), { nvlogSeq: 1, nvlogEpoch: 1 });
      // What the other side holds: the good blocks, keyed by pba.
      const good = new Map<number, Buffer>();
      for (const lbn of [10, 20, 30, 40]) good.set(await pbaOf(dev, block(lbn)), block(lbn));
      const asked: number[] = [];
      let mode: 'good' | 'wrong' | 'fail' = 'good';
      const src: RepairSource = {
        name: 'the test peer',
        read: async (pba) => {
          asked.push(pba);
          if (mode === 'fail') throw new Error('peer gone');
          return mode === 'good' ? Buffer.from(good.get(pba) ?? Buffer.alloc(B)) : block(999);
        },
      };

      // No source: refused.
      const p10 = await pbaOf(dev, block(10));
      await damage(dev, p10);
      await assert.rejects(t.readBlock(10), /checksum mismatch/);
      assert.deepEqual(t.stats().errors, { checksum: 1, io: 0, repaired: 0 });

      t.setRepairSource(src);
      // A good copy: served, rewritten, counted as repaired (not as an error).
      assert.ok((await t.readBlock(10))!.equals(block(10)));
      assert.deepEqual(asked, [p10]);
      assert.deepEqual(t.stats().errors, { checksum: 1, io: 0, repaired: 1 });
      const onDisk = Buffer.alloc(B);
      await dev.readBlocks(p10, 1, onDisk);
      assert.ok(onDisk.equals(block(10)), 'the bad copy was rewritten');
      assert.ok((await t.readBlock(10))!.equals(block(10)));
      assert.equal(asked.length, 1, 'read again: nothing more to repair');

      // A range read (one device read for the run) repairs the damaged block inside it.
      const p30 = await pbaOf(dev, block(30));
      await damage(dev, p30);
      const range = Buffer.alloc(31 * B);
      await t.readRange(10, 31, range);
      assert.ok(range.subarray(20 * B, 21 * B).equals(block(30)));
      assert.deepEqual(t.stats().errors, { checksum: 1, io: 0, repaired: 2 });

      // The source's copy does not verify: refused, never served.
      const p20 = await pbaOf(dev, block(20));
      await damage(dev, p20);
      mode = 'wrong';
      await assert.rejects(t.readBlock(20), /checksum mismatch/);
      // The source fails: refused.
      mode = 'fail';
      await assert.rejects(t.readBlock(20), /checksum mismatch/);
      assert.deepEqual(t.stats().errors, { checksum: 3, io: 0, repaired: 2 });
      // Detached: not asked again.
      t.setRepairSource(undefined);
      const before = asked.length;
      await assert.rejects(t.readBlock(20), /checksum mismatch/);
      assert.equal(asked.length, before);

      // A damaged address block is repaired the same way (the node cache dropped by a reopen).
      mode = 'good';
      const t2 = await BlockTree.open(dev);
      try {
        const nodes = new Map<number, Buffer>();
        t2.setRepairSource({ name: 'the test peer', read: async (pba) => Buffer.from(nodes.get(pba)!) });
        // Every block that is not data: the level-0 address block among them.
        const buf = Buffer.alloc(B);
        for (let p = 0; p < dev.blockCount; p++) {
          await dev.readBlocks(p, 1, buf);
          if (!buf.equals(Buffer.alloc(B)) && ![...good.values()].some((g) => g.equals(buf))) nodes.set(p, Buffer.from(buf));
        }
        // Damage every one past the superblock ring: reads must still succeed.
        const damaged: number[] = [];
        for (const p of nodes.keys()) {
          if (p < RING_SLOTS) continue;
          await damage(dev, p);
          damaged.push(p);
        }
        assert.ok(damaged.length > 0);
        assert.ok((await t2.readBlock(40))!.equals(block(40)), 'read through repaired address blocks');
        assert.ok(t2.stats().errors.repaired >= 1, JSON.stringify(t2.stats().errors));
        assert.equal(t2.stats().errors.checksum, 0);
      } finally {
        await t2.close();
      }
    } finally {
      await t.close();
    }
  });

  it('a block the device cannot read (EIO) is taken from the source when its copy verifies, and rewritten; without a source, or a copy that does not verify: EIO', async () => {
    const dev = new BadSectors(8192);
    await BlockTree.format(dev, { sizeBytes: 16 * 1024 * 1024, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    try {
      // Eight adjacent blocks: one device read for the run.
      await t.commitCp(Array.from({ length: 8 }, (_, i) => ({ lbn: 100 + i, data: block(100 + i) })), { nvlogSeq: 1, nvlogEpoch: 1 });
      const p103 = await pbaOf(dev, block(103));
      dev.failing.add(p103);
      const range = Buffer.alloc(8 * B);
      await assert.rejects(t.readRange(100, 8, range), /device read of data blocks lbn 100-107 at pba \d+ failed/);
      assert.deepEqual(t.stats().errors, { checksum: 0, io: 1, repaired: 0 });
      let answer = block(103);
      t.setRepairSource({ name: 'the test peer', read: async () => Buffer.from(answer) });
      answer = block(7); // does not verify
      await assert.rejects(t.readRange(100, 8, range), new RegExp(`device read of data blocks lbn 100-107 at pba ${p103} failed`));
      assert.deepEqual(t.stats().errors, { checksum: 0, io: 2, repaired: 0 });
      answer = block(103);
      await t.readRange(100, 8, range);
      for (let i = 0; i < 8; i++) assert.ok(range.subarray(i * B, (i + 1) * B).equals(block(100 + i)), `lbn ${100 + i}`);
      assert.deepEqual(t.stats().errors, { checksum: 0, io: 2, repaired: 1 });
      assert.ok(!dev.failing.has(p103), 'rewritten (the sector remapped)');
      assert.ok((await t.readBlock(103))!.equals(block(103)));
    } finally {
      await t.close();
    }
  });
});
