import { strict as assert } from 'assert';
import { BufferPool, POOL_MIN_BYTES } from '../../src/nbd/buffer-pool';

describe('nbd buffer pool', () => {
  it('reuses a released buffer of the same rounded size', () => {
    const pool = new BufferPool(8 * 1024 * 1024);
    const a = pool.take(1024 * 1024 + 16);
    assert.equal(a.length, 1024 * 1024 + 64 * 1024, 'rounded up to 64 KiB');
    pool.release(a);
    assert.equal(pool.bytesPooled, a.length);
    const b = pool.take(1024 * 1024 + 100);
    assert.equal(b, a, 'same buffer handed out again');
    assert.equal(pool.bytesPooled, 0);
  });

  it('never pools more than its cap', () => {
    const pool = new BufferPool(2 * 1024 * 1024);
    const bufs = [pool.take(1024 * 1024), pool.take(1024 * 1024), pool.take(1024 * 1024)];
    for (const b of bufs) pool.release(b);
    assert.equal(pool.bytesPooled, 2 * 1024 * 1024);
  });

  it('refuses small sizes and double or foreign releases', () => {
    const pool = new BufferPool(1 << 20);
    assert.throws(() => pool.take(POOL_MIN_BYTES - 1));
    const a = pool.take(POOL_MIN_BYTES);
    pool.release(a);
    assert.throws(() => pool.release(a), /not out of this pool/);
    assert.throws(() => pool.release(Buffer.alloc(POOL_MIN_BYTES)), /not out of this pool/);
  });
});
