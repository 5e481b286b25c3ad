/**
 * Deliberately broken layers for the simulator's negative controls: each one lies (it
 * reports success for something it did not do), and the simulator must notice.
 *
 * Invariant: the lies are seeded (same seed, same lies) and are the only difference
 * from the layer they wrap.
 */
import type { BlockDevice } from '../../src/io/types';
import type { SeededRandom } from '../../src/sim/random';
import type { Extent, Volume, VolumeCapabilities, ZeroOptions } from '../../src/volume/types';

/** A member that drops a write (all its blocks) with probability p and reports success. */
export class LostWriteDevice implements BlockDevice {
  lost = 0;
  constructor(private readonly inner: BlockDevice, private readonly rnd: SeededRandom, private readonly p: number) {}
  get blockCount(): number {
    return this.inner.blockCount;
  }
  readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    return this.inner.readBlocks(pba, count, dst);
  }
  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    // The superblock ring (pba 0..) is spared so that the volume still mounts.
    if (pba >= 64 && this.rnd.chance(this.p)) {
      this.lost++;
      return;
    }
    return this.inner.writeBlocks(pba, data);
  }
  sync(): Promise<void> {
    return this.inner.sync();
  }
  discard(pba: number, count: number): Promise<void> {
    return this.inner.discard(pba, count);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** A volume that acknowledges a write without doing it, with probability p. */
export class DroppingVolume implements Volume {
  dropped = 0;
  constructor(private readonly inner: Volume, private readonly rnd: SeededRandom, private readonly p: number) {}
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get caps(): VolumeCapabilities {
    return this.inner.caps;
  }
  get description(): string {
    return this.inner.description;
  }
  read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    return this.inner.read(offset, length, dst);
  }
  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.rnd.chance(this.p)) {
      this.dropped++;
      return;
    }
    return this.inner.write(offset, data, fua);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.inner.trim(offset, length, fua);
  }
  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.inner.zero(offset, length, opts);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }
  blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length, maxExtents);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
