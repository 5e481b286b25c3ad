/**
 * close() after a failed consistency point must not look clean: it rejects with the
 * failure, and the data stays in the NVRAM for the next open to replay. (Found by the
 * seeded simulator, seed 2: a sync fault failed a CP and close() still resolved.)
 */
import { strict as assert } from 'assert';
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';

const UUID = '5eed0000-1111-4222-8333-444455556677';

class FailingSyncDevice extends MemoryBlockDevice {
  failSync = false;
  override async sync(): Promise<void> {
    if (this.failSync) throw Object.assign(new Error('injected sync failure'), { code: 'EIO' });
    return super.sync();
  }
}

describe('engine close after a failed CP', () => {
  it('rejects with the CP failure, and the next open still holds every acknowledged write', async () => {
    const dev = new FailingSyncDevice(4096);
    await BlockTree.format(dev, { sizeBytes: 16 * 1024 * 1024, volumeUuid: UUID });
    const nvram = new MemoryNvram(4 * 1024 * 1024);
    await NvLog.format(nvram, UUID);
    const v = await EngineVolume.open({ tree: await BlockTree.open(dev), region: nvram, readOnly: false, cpIntervalMs: 0 });
    const data = Buffer.alloc(4096, 0x6b);
    await v.write(8192, data, false);
    dev.failSync = true;
    await assert.rejects(v.checkpoint(), 'the CP fails on the injected sync error');
    await assert.rejects(v.close(), 'close must report that the final CP could not run');

    dev.failSync = false;
    const again = await EngineVolume.open({
      tree: await BlockTree.open(dev),
      region: new MemoryNvram(nvram.sizeBytes, nvram.buffer),
      readOnly: false,
      cpIntervalMs: 0,
    });
    assert.deepEqual(await again.read(8192, 4096), data, 'the acknowledged write is replayed from the NVRAM');
    await again.close();
  });
});
