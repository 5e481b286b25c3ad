/**
 * The two simple backends behind the Volume interface: MemoryVolume (sparse, in memory)
 * and FileVolume (a raw image file on the real file system), checked against a plain
 * Buffer model under seeded random operations, plus the edge cases of each.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { FileVolume } from '../../src/volume/file';
import { MEMORY_CHUNK_BYTES, MemoryVolume } from '../../src/volume/memory';
import { VolumeError } from '../../src/util/errors';
import { EXTENT_HOLE, EXTENT_ZERO, Extent, Volume } from '../../src/volume/types';
import { AssertionError } from '../../src/util/assert';

function rng(seed: number): (n: number) => number {
  let s = seed >>> 0;
  return (n: number) => {
    s = (Math.imul(s ^ (s >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0;
    return Math.floor((s / 2 ** 32) * n);
  };
}

function randomData(rand: (n: number) => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  const words = Math.floor(n / 4);
  for (let i = 0; i < words; i++) b.writeUInt32LE(rand(2 ** 32), i * 4);
  for (let i = words * 4; i < n; i++) b[i] = rand(256);
  return b;
}

/** Checks the Volume contract for extents and that every ZERO extent reads as zeroes in the model. */
function checkExtents(extents: Extent[], offset: number, length: number, maxExtents: number, model: Buffer): void {
  assert.ok(extents.length >= 1 && extents.length <= maxExtents, `${extents.length} extents, max ${maxExtents}`);
  let pos = offset;
  let prevFlags = -1;
  for (const e of extents) {
    assert.ok(Number.isSafeInteger(e.lengthBytes) && e.lengthBytes > 0, 'extent length > 0');
    assert.ok(e.flags !== prevFlags, 'neighbouring extents differ');
    assert.equal(e.flags & ~(EXTENT_HOLE | EXTENT_ZERO), 0);
    if ((e.flags & EXTENT_ZERO) !== 0) {
      const slice = model.subarray(pos, pos + e.lengthBytes);
      assert.ok(slice.equals(Buffer.alloc(slice.length)), `extent at ${pos}+${e.lengthBytes} claims zeroes`);
    }
    prevFlags = e.flags;
    pos += e.lengthBytes;
  }
  assert.ok(pos <= offset + length, 'extents stay inside the request');
}

/** Runs seeded random operations against the volume and a Buffer model, checking reads as it goes. */
async function randomOps(vol: Volume, seed: number, ops: number, maxLength: number): Promise<Buffer> {
  const rand = rng(seed);
  const size = vol.sizeBytes;
  const model = Buffer.alloc(size);
  const range = (): [number, number] => {
    const length = 1 + rand(Math.min(maxLength, size));
    const offset = rand(size - length + 1);
    return [offset, length];
  };
  for (let i = 0; i < ops; i++) {
    const kind = rand(10);
    const [offset, length] = range();
    if (kind < 4) {
      const data = randomData(rand, length);
      await vol.write(offset, data, rand(4) === 0);
      data.copy(model, offset);
    } else if (kind < 5) {
      await vol.trim(offset, length, false);
      model.fill(0, offset, offset + length);
    } else if (kind < 6) {
      await vol.zero(offset, length, { noHole: rand(2) === 0, fastZero: false, fua: rand(2) === 0 });
      model.fill(0, offset, offset + length);
    } else if (kind < 9) {
      const useDst = rand(2) === 0;
      const dst = useDst ? Buffer.alloc(length, 0xa5) : undefined;
      const got = await vol.read(offset, length, dst);
      if (dst) assert.equal(got, dst, 'read fills and returns the caller buffer');
      assert.ok(got.equals(model.subarray(offset, offset + length)), `op ${i}: read ${offset}+${length} differs (seed ${seed})`);
    } else {
      const maxExtents = 1 + rand(8);
      checkExtents(await vol.blockStatus(offset, length, maxExtents), offset, length, maxExtents, model);
    }
    if (i % 50 === 49) await vol.flush();
  }
  const all = await vol.read(0, size);
  assert.ok(all.equals(model), `final contents differ (seed ${seed})`);
  checkExtents(await vol.blockStatus(0, size, 1000), 0, size, 1000, model);
  return model;
}

async function concurrentWritesThenFlush(vol: Volume): Promise<void> {
  const writes: Array<Promise<void>> = [];
  for (let i = 0; i < 32; i++) writes.push(vol.write(i * 4096, Buffer.alloc(4096, i + 1), i % 8 === 0));
  await Promise.all(writes);
  await Promise.all(Array.from({ length: 16 }, () => vol.flush()));
  for (let i = 0; i < 32; i++) {
    const b = await vol.read(i * 4096, 4096);
    assert.ok(b.equals(Buffer.alloc(4096, i + 1)));
  }
}

describe('MemoryVolume', () => {
  it('matches a model under random writes, trims, zeroes and reads', async () => {
    const vol = MemoryVolume.create(3 * MEMORY_CHUNK_BYTES * 5 + 777);
    await randomOps(vol, 1, 600, 150_000);
    await vol.close();
  });

  it('advertises the expected capabilities', () => {
    const vol = MemoryVolume.create(1024 ** 3);
    assert.deepEqual(
      { ...vol.caps },
      {
        readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canCache: true,
        canMultiConn: true, rotational: false, minBlockSizeBytes: 1, preferredBlockSizeBytes: 4096, maxPayloadBytes: 32 * 1024 * 1024,
      },
    );
    assert.match(vol.description, /memory 1\.00 GiB/);
  });

  it('reports holes and data, and frees memory on trim and zero', async () => {
    const vol = MemoryVolume.create(16 * MEMORY_CHUNK_BYTES);
    assert.deepEqual(await vol.blockStatus(0, vol.sizeBytes, 10), [{ lengthBytes: vol.sizeBytes, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    await vol.write(MEMORY_CHUNK_BYTES + 10, Buffer.alloc(100, 1), false);
    assert.equal(vol.allocatedBytes, MEMORY_CHUNK_BYTES);
    assert.deepEqual(await vol.blockStatus(0, vol.sizeBytes, 10), [
      { lengthBytes: MEMORY_CHUNK_BYTES, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: MEMORY_CHUNK_BYTES, flags: 0 },
      { lengthBytes: 14 * MEMORY_CHUNK_BYTES, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
    assert.deepEqual(await vol.blockStatus(5, 100, 1), [{ lengthBytes: 100, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    // Zeroing just the written bytes leaves an all-zero chunk, which is freed.
    await vol.zero(MEMORY_CHUNK_BYTES + 10, 100, { noHole: false, fastZero: true, fua: false });
    assert.equal(vol.allocatedBytes, 0);
    await vol.write(0, Buffer.alloc(3 * MEMORY_CHUNK_BYTES, 2), false);
    assert.equal(vol.slabBytes, 1024 * 1024);
    await vol.trim(0, 3 * MEMORY_CHUNK_BYTES, true);
    assert.equal(vol.allocatedBytes, 0);
    assert.equal(vol.slabBytes, 0, 'an empty slab is released');
    assert.ok((await vol.read(0, 3 * MEMORY_CHUNK_BYTES)).equals(Buffer.alloc(3 * MEMORY_CHUNK_BYTES)));
  });

  it('zero with NO_HOLE reports allocated zeroes (ZERO without HOLE) and costs no data memory', async () => {
    const vol = MemoryVolume.create(8 * MEMORY_CHUNK_BYTES);
    await vol.write(0, Buffer.alloc(8 * MEMORY_CHUNK_BYTES, 3), false);
    await vol.zero(2 * MEMORY_CHUNK_BYTES, 4 * MEMORY_CHUNK_BYTES, { noHole: true, fastZero: false, fua: false });
    assert.equal(vol.allocatedBytes, 4 * MEMORY_CHUNK_BYTES);
    assert.deepEqual(await vol.blockStatus(0, vol.sizeBytes, 10), [
      { lengthBytes: 2 * MEMORY_CHUNK_BYTES, flags: 0 },
      { lengthBytes: 4 * MEMORY_CHUNK_BYTES, flags: EXTENT_ZERO },
      { lengthBytes: 2 * MEMORY_CHUNK_BYTES, flags: 0 },
    ]);
    const got = await vol.read(MEMORY_CHUNK_BYTES, 6 * MEMORY_CHUNK_BYTES);
    assert.ok(got.subarray(MEMORY_CHUNK_BYTES, 5 * MEMORY_CHUNK_BYTES).equals(Buffer.alloc(4 * MEMORY_CHUNK_BYTES)));
    assert.equal(got[0], 3);
    // A write into provisioned zeroes makes it data again.
    await vol.write(3 * MEMORY_CHUNK_BYTES + 1, Buffer.from([9]), false);
    assert.deepEqual((await vol.read(3 * MEMORY_CHUNK_BYTES, 3)).toJSON().data, [0, 9, 0]);
  });

  it('serves a 1 PiB sparse volume: writes at the end, bounded block status', async () => {
    const size = 1024 ** 5;
    const vol = MemoryVolume.create(size);
    await vol.write(size - 4096, Buffer.alloc(4096, 7), true);
    assert.ok((await vol.read(size - 4096, 4096)).equals(Buffer.alloc(4096, 7)));
    const t0 = Date.now();
    const head = await vol.blockStatus(0, 2 ** 32, 16);
    assert.deepEqual(head, [{ lengthBytes: 2 ** 32, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    const all = await vol.blockStatus(0, size, 16);
    assert.ok(all.length === 1 && all[0]!.flags === (EXTENT_HOLE | EXTENT_ZERO) && all[0]!.lengthBytes > 2 ** 40, 'a long hole in one bounded step');
    const tail = await vol.blockStatus(size - 2 ** 30, 2 ** 30, 16);
    assert.deepEqual(tail, [
      { lengthBytes: 2 ** 30 - MEMORY_CHUNK_BYTES, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: MEMORY_CHUNK_BYTES, flags: 0 },
    ]);
    await vol.trim(0, size, false);
    assert.equal(vol.allocatedBytes, 0);
    assert.ok(Date.now() - t0 < 2000, 'sparse operations do not walk the whole range');
  });

  it('reuses freed chunk memory, zeroing it for partial writes', async () => {
    const vol = MemoryVolume.create(64 * MEMORY_CHUNK_BYTES);
    await vol.write(0, Buffer.alloc(32 * MEMORY_CHUNK_BYTES, 0xff), false);
    assert.equal(vol.slabBytes, 2 * 1024 * 1024);
    for (let i = 0; i < 32; i += 2) await vol.trim(i * MEMORY_CHUNK_BYTES, MEMORY_CHUNK_BYTES, false);
    assert.equal(vol.allocatedBytes, 16 * MEMORY_CHUNK_BYTES);
    // Sixteen partial writes land in the freed (recycled) slots: no new slab, and zeroes around the data.
    for (let i = 0; i < 16; i++) await vol.write((40 + i) * MEMORY_CHUNK_BYTES + 100, Buffer.from([i + 1]), false);
    assert.equal(vol.slabBytes, 2 * 1024 * 1024);
    for (let i = 0; i < 16; i++) {
      const chunk = await vol.read((40 + i) * MEMORY_CHUNK_BYTES, MEMORY_CHUNK_BYTES);
      const expect = Buffer.alloc(MEMORY_CHUNK_BYTES);
      expect[100] = i + 1;
      assert.ok(chunk.equals(expect), `chunk ${40 + i}`);
    }
  });

  it('fails writes with ENOSPC beyond its memory cap, instead of exhausting the process', async () => {
    const vol = MemoryVolume.create(1024 ** 3, { maxAllocatedBytes: 2 * MEMORY_CHUNK_BYTES });
    await vol.write(0, Buffer.alloc(2 * MEMORY_CHUNK_BYTES, 1), false);
    await assert.rejects(vol.write(5 * MEMORY_CHUNK_BYTES, Buffer.alloc(10, 1), false), (e: VolumeError) => e.code === 'ENOSPC');
    await vol.trim(0, MEMORY_CHUNK_BYTES, false);
    await vol.write(5 * MEMORY_CHUNK_BYTES, Buffer.alloc(10, 1), false);
  });

  it('handles concurrent writes and flushes', async () => {
    await concurrentWritesThenFlush(MemoryVolume.create(1024 * 1024));
  });

  it('validates its size and asserts request ranges', async () => {
    assert.throws(() => MemoryVolume.create(-1), (e: VolumeError) => e.code === 'EINVAL');
    assert.throws(() => MemoryVolume.create(2 ** 60), VolumeError);
    const vol = MemoryVolume.create(4096);
    await assert.rejects(vol.read(4000, 100), AssertionError);
    await assert.rejects(vol.write(0, Buffer.alloc(0), false), AssertionError);
    const ro = MemoryVolume.create(4096, { readOnly: true });
    assert.equal(ro.caps.readOnly, true);
    await assert.rejects(ro.write(0, Buffer.alloc(1), false), AssertionError);
    assert.ok((await ro.read(0, 4096)).equals(Buffer.alloc(4096)));
  });
});

describe('FileVolume', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-filevol-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('matches a model under random writes, trims, zeroes and reads, and keeps data across reopen', async () => {
    const file = path.join(dir, 'random.img');
    const vol = await FileVolume.create(file, 1024 * 1024 + 4096 * 3 + 123);
    const model = await randomOps(vol, 2, 500, 100_000);
    await vol.close();
    await vol.close();
    assert.ok(fs.readFileSync(file).equals(model), 'the image file holds exactly the model');
    const again = await FileVolume.open(file, { readOnly: true });
    assert.equal(again.sizeBytes, model.length);
    assert.ok((await again.read(0, model.length)).equals(model));
    assert.equal(again.caps.readOnly, true);
    await again.close();
  });

  it('advertises the expected capabilities', async () => {
    const vol = await FileVolume.create(path.join(dir, 'caps.img'), 1024 * 1024);
    assert.deepEqual(
      { ...vol.caps },
      {
        readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canCache: true,
        canMultiConn: true, rotational: false, minBlockSizeBytes: 1, preferredBlockSizeBytes: 4096, maxPayloadBytes: 32 * 1024 * 1024,
      },
    );
    assert.match(vol.description, /caps\.img/);
    await vol.close();
  });

  it('trim punches holes that block status reports; zero with fastZero succeeds here', async () => {
    const file = path.join(dir, 'holes.img');
    const mib = 1024 * 1024;
    const vol = await FileVolume.create(file, 4 * mib);
    assert.deepEqual(await vol.blockStatus(0, 4 * mib, 10), [{ lengthBytes: 4 * mib, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    await vol.write(0, Buffer.alloc(4 * mib, 0x11), true);
    assert.deepEqual(await vol.blockStatus(0, 4 * mib, 10), [{ lengthBytes: 4 * mib, flags: 0 }]);
    const used = fs.statSync(file).blocks;
    await vol.trim(mib, mib, true);
    assert.ok(fs.statSync(file).blocks < used, 'trim released space');
    await vol.zero(3 * mib, mib, { noHole: true, fastZero: true, fua: true });
    const extents = await vol.blockStatus(0, 4 * mib, 10);
    assert.deepEqual(extents.slice(0, 3), [
      { lengthBytes: mib, flags: 0 },
      { lengthBytes: mib, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: mib, flags: 0 },
    ]);
    assert.ok((await vol.read(mib, mib)).equals(Buffer.alloc(mib)));
    assert.ok((await vol.read(3 * mib, mib)).equals(Buffer.alloc(mib)));
    assert.deepEqual(await vol.blockStatus(mib + 4096, 8192, 1), [{ lengthBytes: 8192, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    assert.deepEqual(await vol.blockStatus(0, 4 * mib, 1), [{ lengthBytes: mib, flags: 0 }], 'REQ_ONE: one extent');
    await vol.close();
  });

  it('handles concurrent writes (some FUA) and coalesced flushes', async () => {
    const vol = await FileVolume.create(path.join(dir, 'conc.img'), 1024 * 1024);
    await concurrentWritesThenFlush(vol);
    await vol.close();
  });

  it('falls back to writing zeroes when the file system cannot punch or zero, and FAST_ZERO then fails with ENOTSUP', async () => {
    const file = path.join(dir, 'slow.img');
    const vol = await FileVolume.create(file, 3 * 1024 * 1024);
    await vol.write(0, Buffer.alloc(vol.sizeBytes, 0x77), false);
    // Pretend the file system supports neither (what the volume learns after a first ENOTSUP).
    const flags = vol as unknown as { canPunchHole: boolean; canZeroRange: boolean };
    flags.canPunchHole = false;
    flags.canZeroRange = false;
    await assert.rejects(vol.zero(4096, 8192, { noHole: false, fastZero: true, fua: false }), (e: VolumeError) => e.code === 'ENOTSUP');
    assert.ok((await vol.read(4096, 8192)).equals(Buffer.alloc(8192, 0x77)), 'a refused fast zero changes nothing');
    await vol.zero(100, 2.5 * 1024 * 1024, { noHole: false, fastZero: false, fua: true });
    await vol.trim(2.75 * 1024 * 1024, 1000, false);
    const got = await vol.read(0, vol.sizeBytes);
    const expect = Buffer.alloc(vol.sizeBytes, 0x77);
    expect.fill(0, 100, 100 + 2.5 * 1024 * 1024);
    expect.fill(0, 2.75 * 1024 * 1024, 2.75 * 1024 * 1024 + 1000);
    assert.ok(got.equals(expect));
    await vol.close();
  });

  it('zeroes with NO_HOLE where ZERO_RANGE is unsupported (tmpfs: punch then allocate)', async () => {
    const shm = fs.existsSync('/dev/shm') ? fs.mkdtempSync('/dev/shm/nvm-filevol-') : fs.mkdtempSync(path.join(dir, 'shm-'));
    try {
      const vol = await FileVolume.create(path.join(shm, 'z.img'), 1024 * 1024);
      await vol.write(0, Buffer.alloc(1024 * 1024, 0x66), false);
      await vol.zero(8192, 65536, { noHole: true, fastZero: true, fua: false });
      await vol.zero(200_000, 300_000, { noHole: true, fastZero: false, fua: false });
      const expect = Buffer.alloc(1024 * 1024, 0x66);
      expect.fill(0, 8192, 8192 + 65536);
      expect.fill(0, 200_000, 500_000);
      assert.ok((await vol.read(0, 1024 * 1024)).equals(expect));
      const extents = await vol.blockStatus(0, 1024 * 1024, 100);
      assert.equal(extents.reduce((n, e) => n + e.lengthBytes, 0), 1024 * 1024);
      await vol.close();
    } finally {
      fs.rmSync(shm, { recursive: true, force: true });
    }
  });

  it('serves a file whose size is not a multiple of the block size', async () => {
    const file = path.join(dir, 'odd.img');
    fs.writeFileSync(file, Buffer.alloc(1000, 0x33));
    const vol = await FileVolume.open(file);
    assert.equal(vol.sizeBytes, 1000);
    await vol.write(999, Buffer.from([0x44]), true);
    const tail = await vol.read(990, 10);
    assert.deepEqual([...tail], [0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x44]);
    const extents = await vol.blockStatus(0, 1000, 4);
    assert.equal(extents.reduce((n, e) => n + e.lengthBytes, 0), 1000);
    await vol.zero(500, 500, { noHole: false, fastZero: false, fua: false });
    assert.ok((await vol.read(500, 500)).equals(Buffer.alloc(500)));
    assert.equal((await vol.read(499, 1))[0], 0x33);
    await vol.close();
    assert.equal(fs.statSync(file).size, 1000, 'zeroing the tail keeps the size');
  });

  it('serves an empty file', async () => {
    const file = path.join(dir, 'empty.img');
    fs.writeFileSync(file, '');
    const vol = await FileVolume.open(file);
    assert.equal(vol.sizeBytes, 0);
    await vol.flush();
    await vol.close();
  });

  it('a read past a file that shrank under us returns zeroes', async () => {
    const file = path.join(dir, 'shrink.img');
    fs.writeFileSync(file, Buffer.alloc(8192, 0x55));
    const vol = await FileVolume.open(file);
    fs.truncateSync(file, 4096);
    const got = await vol.read(4000, 200);
    assert.ok(got.subarray(0, 96).equals(Buffer.alloc(96, 0x55)));
    assert.ok(got.subarray(96).equals(Buffer.alloc(104)));
    await vol.close();
  });

  it('gives one-line errors for a missing file, a directory and an existing file on create', async () => {
    const missing = path.join(dir, 'missing.img');
    await assert.rejects(FileVolume.open(missing), (e: Error) => e.message === `no such file: ${missing}`);
    await assert.rejects(FileVolume.open(dir), (e: Error) => e.message === `not a regular file: ${dir}`);
    await assert.rejects(FileVolume.create(path.join(dir, 'odd.img'), 10), /^Error: file exists: /);
    await assert.rejects(FileVolume.create(path.join(dir, 'neg.img'), -5), /bad image size/);
  });

  it('maps system errors to VolumeError codes', async () => {
    const file = path.join(dir, 'ro.img');
    fs.writeFileSync(file, Buffer.alloc(4096));
    const vol = await FileVolume.open(file, { readOnly: true });
    // Bypass the read-only assertion to reach the kernel: writing through an O_RDONLY fd fails with EBADF -> EIO.
    (vol.caps as { readOnly: boolean }).readOnly = false;
    await assert.rejects(vol.write(0, Buffer.alloc(10), false), (e: VolumeError) => e instanceof VolumeError && e.code === 'EIO' && /EBADF/.test(e.message));
    (vol.caps as { readOnly: boolean }).readOnly = true;
    await vol.close();
  });

  it('lock: a second locked open of the same image fails', async () => {
    const file = path.join(dir, 'lock.img');
    const a = await FileVolume.create(file, 4096, { lock: true });
    await assert.rejects(FileVolume.open(file, { lock: true }), /in use by another process/);
    await a.close();
    await (await FileVolume.open(file, { lock: true })).close();
  });
});

describe('FileVolume batched writes', () => {
  it('settles each write of a same-tick burst with its own data, and close waits for them', async () => {
    const fs = await import('fs');
    const os = await import('os');
    const path = await import('path');
    const { FileVolume } = await import('../../src/volume/file');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-batch-'));
    const file = path.join(dir, 'img');
    try {
      const sizeBytes = 8 * 1024 * 1024;
      const v = await FileVolume.create(file, sizeBytes);
      const writes: Array<Promise<void>> = [];
      const expect = Buffer.alloc(sizeBytes);
      // 2000 writes in one tick: more than one batch (PWRITE_BATCH_MAX). Disjoint ranges:
      // NBD promises nothing about the order of concurrent overlapping writes.
      for (let i = 0; i < 2000; i++) {
        const len = 512 * (1 + (i % 8));
        const off = i * 4096;
        const b = Buffer.alloc(len, (i % 251) + 1);
        b.copy(expect, off);
        writes.push(v.write(off, b, false));
      }
      const closing = v.close();
      await Promise.all(writes);
      await closing;
      assert.ok(fs.readFileSync(file).equals(expect), 'the image holds every write');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
