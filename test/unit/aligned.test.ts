/**
 * Aligned buffers (src/io/aligned.ts) and the addon's addressMod: the buffers the NBD
 * threads read and receive into start at a 64-byte aligned address (the kernel's copy
 * into a buffer 16 bytes off that ran ~4x slower here), so the grant paths use them.
 */
import { strict as assert } from 'assert';
import { ALIGN_BYTES, allocAligned } from '../../src/io/aligned';
import { addressMod } from '../../src/io/native';
import { BufferPool } from '../../src/nbd/buffer-pool';

describe('aligned buffers', () => {
  it('addressMod reports a view\'s offset from its parent\'s address', () => {
    const raw = Buffer.allocUnsafeSlow(8192);
    const base = addressMod(raw, 4096);
    for (const k of [1, 7, 16, 63, 64, 100]) {
      assert.equal(addressMod(raw.subarray(k), 4096), (base + k) % 4096, `offset ${k}`);
      assert.equal(addressMod(raw.subarray(k), 64), (base + k) % 64, `offset ${k} mod 64`);
    }
  });

  it('addressMod refuses a modulus that is not a power of two in [2, 4096], and a non-buffer', () => {
    const b = Buffer.alloc(16);
    for (const m of [0, 1, 3, 48, 8192, 2.5, -64, NaN]) assert.throws(() => addressMod(b, m), /power of two/, `m=${m}`);
    assert.throws(() => addressMod('x' as unknown as Buffer, 64), /buf/);
  });

  it('allocAligned gives exactly the size asked for, starting on a 64-byte boundary, for every size class', () => {
    // Sizes Node's allocator hands out at different offsets (small, page-sized, mmap-sized).
    for (const size of [1, 63, 4096, 4160, 65536, 1024 * 1024, 3 * 1024 * 1024 + 5]) {
      for (let i = 0; i < 4; i++) {
        const b = allocAligned(size);
        assert.equal(b.length, size);
        assert.equal(addressMod(b, ALIGN_BYTES), 0, `size ${size}`);
        b.fill(0xab); // the whole view is writable memory of its own
        assert.equal(b[size - 1], 0xab);
      }
    }
    assert.throws(() => allocAligned(0));
  });

  it('the NBD buffer pool hands out aligned buffers, fresh and reused', () => {
    const pool = new BufferPool(8 * 1024 * 1024);
    const a = pool.take(1024 * 1024);
    assert.equal(addressMod(a, ALIGN_BYTES), 0);
    pool.release(a);
    const b = pool.take(1024 * 1024);
    assert.equal(b, a, 'reused');
    assert.equal(addressMod(b, ALIGN_BYTES), 0);
  });
});
