/**
 * An NvramRegion held in process memory: for tests and simulations (and for the
 * recording layer, which wraps it). persist() only validates its arguments.
 *
 * Invariant: `buffer` is exactly sizeBytes long and is never reallocated.
 */
import type { NvramRegion } from '../io/types';
import { assert } from '../util/assert';

export class MemoryNvram implements NvramRegion {
  readonly buffer: Buffer;
  private closed = false;
  constructor(readonly sizeBytes: number, initial?: Buffer) {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes > 0, `bad NVRAM size ${sizeBytes}`);
    this.buffer = Buffer.alloc(sizeBytes);
    if (initial) {
      assert(initial.length === sizeBytes, 'initial image size mismatch');
      initial.copy(this.buffer);
    }
  }
  persist(offset: number, length: number): Promise<void> {
    assert(!this.closed, 'persist after close');
    assert(offset >= 0 && length >= 0 && offset + length <= this.sizeBytes, `persist ${offset}+${length} out of range`);
    return Promise.resolve();
  }
  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }
}
