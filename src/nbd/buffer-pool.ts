/**
 * A bounded pool of large buffers for READ replies and WRITE payloads, so that a stream
 * of 1 MiB requests does not allocate (and make V8 collect) a fresh 1 MiB buffer each
 * time. Sizes are rounded up to 64 KiB; each size keeps its own free list.
 *
 * Invariants:
 * - Buffers smaller than POOL_MIN_BYTES are not pooled (Node's own slab serves them).
 * - The free lists together never hold more than maxPooledBytes; beyond that a released
 *   buffer is simply dropped for the garbage collector.
 * - A buffer is released only by its single owner, once nothing refers to it any more
 *   (a reply: after the socket has taken it; a payload: after the volume's write settled).
 */
import { assert } from '../util/assert';
import { allocAligned } from '../io/aligned';

export const POOL_MIN_BYTES = 64 * 1024;
const GRANULE_BYTES = 64 * 1024;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;
  private readonly outstanding = new WeakSet<Buffer>();

  constructor(readonly maxPooledBytes: number) {
    assert(maxPooledBytes >= 0);
  }

  /** Whether take(n) would come from the pool (and must be released). */
  static pooled(n: number): boolean {
    return n >= POOL_MIN_BYTES;
  }

  /** A buffer of at least n bytes (exactly the rounded size); release it when done. */
  take(n: number): Buffer {
    assert(BufferPool.pooled(n), 'small buffers are not pooled');
    const size = Math.ceil(n / GRANULE_BYTES) * GRANULE_BYTES;
    const list = this.free.get(size);
    const b = list?.pop();
    if (b) {
      this.pooledBytes -= size;
      this.outstanding.add(b);
      return b;
    }
    const fresh = allocAligned(size);
    this.outstanding.add(fresh);
    return fresh;
  }

  release(b: Buffer): void {
    assert(this.outstanding.has(b), 'released a buffer that is not out of this pool');
    this.outstanding.delete(b);
    if (this.pooledBytes + b.length > this.maxPooledBytes) return;
    let list = this.free.get(b.length);
    if (!list) {
      list = [];
      this.free.set(b.length, list);
    }
    list.push(b);
    this.pooledBytes += b.length;
  }

  get bytesPooled(): number {
    return this.pooledBytes;
  }
}

/** One pool per process: connections share it, so its cap bounds the whole server. */
export const sharedBufferPool = new BufferPool(64 * 1024 * 1024);
