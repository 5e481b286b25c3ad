/**
 * MemoryBlockDevice: an in-memory BlockDevice for tests and simulation. Sparse: a block
 * that was never written (or was discarded) holds no memory and reads as zeroes.
 *
 * Invariants:
 * - Every stored block is exactly 4096 bytes and owned by the device (writes copy in,
 *   reads copy out), so callers can never alias its contents.
 * - Every request lies inside [0, blockCount) (asserted: the caller validated it).
 * - No call is accepted after close().
 * - `stats` counts every completed call, so tests can check what the engine issued.
 */
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES, BlockDevice } from './types';

/** 2^40 blocks (4 PiB) keeps byte offsets exact in a JS number. */
export const MEMORY_DEVICE_BLOCKS_MAX = 2 ** 40;

export interface MemoryBlockDeviceStats {
  blocksRead: number;
  blocksWritten: number;
  syncs: number;
  blocksDiscarded: number;
}

export class MemoryBlockDevice implements BlockDevice {
  readonly blockCount: number;
  readonly stats: MemoryBlockDeviceStats = { blocksRead: 0, blocksWritten: 0, syncs: 0, blocksDiscarded: 0 };
  private readonly blocks = new Map<number, Buffer>();
  private closed = false;

  constructor(blockCount: number) {
    if (!Number.isSafeInteger(blockCount) || blockCount < 1 || blockCount > MEMORY_DEVICE_BLOCKS_MAX) {
      throw new RangeError(`block count must be 1..${MEMORY_DEVICE_BLOCKS_MAX}, got ${blockCount}`);
    }
    this.blockCount = blockCount;
  }

  /** Number of blocks currently holding memory. */
  get allocatedBlocks(): number {
    return this.blocks.size;
  }

  /** A copy of one block's contents (zeroes if never written). */
  peekBlock(pba: number): Buffer {
    this.checkRange(pba, 1);
    const b = this.blocks.get(pba);
    return b === undefined ? Buffer.alloc(BLOCK_SIZE_BYTES) : Buffer.from(b);
  }

  private checkRange(pba: number, count: number): void {
    assert(!this.closed, 'memory device is closed');
    assert(Number.isSafeInteger(pba) && pba >= 0, `bad pba ${pba}`);
    assert(Number.isSafeInteger(count) && count >= 1, `bad block count ${count}`);
    assert(pba + count <= this.blockCount, `blocks [${pba}, ${pba + count}) beyond device of ${this.blockCount}`);
  }

  async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    this.checkRange(pba, count);
    assert(dst.length === count * BLOCK_SIZE_BYTES, `readBlocks: dst is ${dst.length} bytes, expected ${count * BLOCK_SIZE_BYTES}`);
    for (let i = 0; i < count; i++) {
      const b = this.blocks.get(pba + i);
      const at = i * BLOCK_SIZE_BYTES;
      if (b === undefined) dst.fill(0, at, at + BLOCK_SIZE_BYTES);
      else b.copy(dst, at);
    }
    this.stats.blocksRead += count;
  }

  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    assert(data.length > 0 && data.length % BLOCK_SIZE_BYTES === 0, `writeBlocks: length ${data.length} is not whole blocks`);
    const count = data.length / BLOCK_SIZE_BYTES;
    this.checkRange(pba, count);
    for (let i = 0; i < count; i++) {
      let b = this.blocks.get(pba + i);
      if (b === undefined) {
        b = Buffer.allocUnsafeSlow(BLOCK_SIZE_BYTES);
        this.blocks.set(pba + i, b);
      }
      data.copy(b, 0, i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
    }
    this.stats.blocksWritten += count;
  }

  async sync(): Promise<void> {
    assert(!this.closed, 'memory device is closed');
    this.stats.syncs++;
  }

  async discard(pba: number, count: number): Promise<void> {
    this.checkRange(pba, count);
    if (count <= this.blocks.size) {
      for (let i = 0; i < count; i++) this.blocks.delete(pba + i);
    } else {
      // Large range over a sparse device: walk what is stored instead of the range.
      for (const key of [...this.blocks.keys()]) if (key >= pba && key < pba + count) this.blocks.delete(key);
    }
    this.stats.blocksDiscarded += count;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.blocks.clear();
  }
}
