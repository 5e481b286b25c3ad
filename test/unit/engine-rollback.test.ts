/**
 * A newest CP whose superblock slot verifies was durably committed. If its tree does not
 * verify at mount and the NVRAM no longer holds the writes since the previous CP, opening
 * the older CP read-write would silently lose acknowledged writes: the open must refuse,
 * naming both CPs; a read-only open may salvage the older CP (and says so loudly).
 */
import { strict as assert } from 'assert';
import { BlockTree } from '../../src/tree/tree';
import { decodeSuperblock, RING_SLOTS } from '../../src/tree/layout';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';

const UUID = '5eed0000-1111-4222-8333-444455558888';
const BS = 4096;

async function open(dev: MemoryBlockDevice, nvram: MemoryNvram, readOnly: boolean): Promise<EngineVolume> {
  return EngineVolume.open({ tree: await BlockTree.open(dev), region: new MemoryNvram(nvram.sizeBytes, nvram.buffer), readOnly, cpIntervalMs: 0 });
}

describe('engine open after the newest CP fails to verify', () => {
  it('refuses read-write when the NVRAM cannot cover the lost CP, and salvages read-only', async () => {
    const dev = new MemoryBlockDevice(8192);
    await BlockTree.format(dev, { sizeBytes: 64 * 1024 * 1024, volumeUuid: UUID });
    const nvram = new MemoryNvram(256 * 1024); // two ~126 KiB halves: they rotate quickly
    await NvLog.format(nvram, UUID);

    let v = await open(dev, nvram, false);
    const a = Buffer.alloc(BS, 0xa1);
    await v.write(0, a, false);
    await v.checkpoint();
    await v.close();

    // Second session: enough distinct writes to rotate both halves several times, so the
    // NVRAM records right after the first session's watermark are overwritten.
    v = await open(dev, nvram, false);
    for (let i = 1; i <= 200; i++) await v.write(i * BS, Buffer.alloc(BS, i & 0xff), false);
    await v.close();

    const tree = await BlockTree.open(dev);
    const newestCp = tree.stats().cpNumber;
    await tree.close();
    const sb = decodeSuperblock(dev.peekBlock(newestCp % RING_SLOTS));
    assert.ok(typeof sb !== 'string' && sb.root !== null, 'newest superblock decodes');
    const rootPba = sb.root.pba;
    const root = Buffer.from(dev.peekBlock(rootPba));
    root[200] = (root[200] ?? 0) ^ 0xff;
    await dev.writeBlocks(rootPba, root);

    await assert.rejects(open(dev, nvram, false), (e: Error) => {
      assert.match(e.message, new RegExp(`newest committed CP ${newestCp} does not verify`));
      assert.match(e.message, /would silently lose acknowledged writes; refusing to open read-write/);
      return true;
    });

    const ro = await open(dev, nvram, true);
    assert.deepEqual(await ro.read(0, BS), a, 'the older CP still holds the first session');
    await ro.close();
  });

  it('opens normally when nothing was lost', async () => {
    const dev = new MemoryBlockDevice(4096);
    await BlockTree.format(dev, { sizeBytes: 16 * 1024 * 1024, volumeUuid: UUID });
    const nvram = new MemoryNvram(256 * 1024);
    await NvLog.format(nvram, UUID);
    let v = await open(dev, nvram, false);
    await v.write(BS, Buffer.alloc(BS, 7), false);
    await v.close();
    v = await open(dev, nvram, false);
    assert.deepEqual(await v.read(BS, BS), Buffer.alloc(BS, 7));
    await v.close();
  });
});
