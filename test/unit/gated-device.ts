/**
 * A block device over a MemoryBlockDevice whose writes can be held (to stop a CP part-way
 * and look at it), which records its write calls and can fail reads of chosen blocks like
 * a bad sector. For the tree's unit tests.
 */
import type { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES, type BlockDevice } from '../../src/io/types';

export class GatedDevice implements BlockDevice {
  gate: Promise<void> | null = null;
  private open: (() => void) | null = null;
  writeCalls: { pba: number; count: number }[] = [];
  /** Writes that waited at the gate. */
  heldWrites = 0;
  /** Reads touching these pbas fail like a bad sector. */
  failReads = new Set<number>();
  constructor(readonly inner: MemoryBlockDevice) {}
  get blockCount(): number {
    return this.inner.blockCount;
  }
  hold(): void {
    this.gate = new Promise((r) => (this.open = r));
  }
  release(): void {
    this.open?.();
    this.gate = null;
  }
  readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    for (let p = pba; p < pba + count; p++) if (this.failReads.has(p)) return Promise.reject(new Error(`injected media error at pba ${p}`));
    return this.inner.readBlocks(pba, count, dst);
  }
  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    this.writeCalls.push({ pba, count: data.length / BLOCK_SIZE_BYTES });
    if (this.gate) {
      this.heldWrites++;
      await this.gate;
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
