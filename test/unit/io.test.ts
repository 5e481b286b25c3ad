/**
 * The io layer's real implementations on real files: FileBlockDevice (member file),
 * MmapNvram (mapped NVRAM file) and MemoryBlockDevice (the in-memory device).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { DIRECT_WRITE_MIN_BYTES, FileBlockDevice, NOWAIT_READ_BYTES_MAX } from '../../src/io/file-device';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MmapNvram } from '../../src/io/mmap-nvram';
import { BLOCK_SIZE_BYTES, BlockDevice } from '../../src/io/types';
import { AssertionError } from '../../src/util/assert';
import { crc32cBlocks } from '../../src/io/checksum';
import { preadCrc } from '../../src/io/native';

function pattern(seed: number, blocks: number): Buffer {
  const b = Buffer.alloc(blocks * BLOCK_SIZE_BYTES);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
}

/** The behaviour every BlockDevice shares. */
async function exerciseDevice(dev: BlockDevice): Promise<void> {
  assert.equal(dev.blockCount, 64);
  await dev.writeBlocks(3, pattern(1, 2));
  await dev.writeBlocks(63, pattern(2, 1));
  await dev.sync();
  const out = Buffer.alloc(4 * BLOCK_SIZE_BYTES, 0xee);
  await dev.readBlocks(2, 4, out);
  assert.ok(out.subarray(0, BLOCK_SIZE_BYTES).equals(Buffer.alloc(BLOCK_SIZE_BYTES)), 'unwritten block reads as zeroes');
  assert.ok(out.subarray(BLOCK_SIZE_BYTES, 3 * BLOCK_SIZE_BYTES).equals(pattern(1, 2)));
  const last = Buffer.alloc(BLOCK_SIZE_BYTES);
  await dev.readBlocks(63, 1, last);
  assert.ok(last.equals(pattern(2, 1)));
  await dev.discard(3, 1);
  const one = Buffer.alloc(BLOCK_SIZE_BYTES);
  await dev.readBlocks(4, 1, one);
  assert.ok(one.equals(pattern(1, 2).subarray(BLOCK_SIZE_BYTES)), 'discard leaves the neighbour alone');
  await assert.rejects(dev.readBlocks(63, 2, Buffer.alloc(2 * BLOCK_SIZE_BYTES)), AssertionError);
  await assert.rejects(dev.writeBlocks(0, Buffer.alloc(100)), AssertionError);
  await assert.rejects(dev.readBlocks(0, 1, Buffer.alloc(10)), AssertionError);
}

/** Bytes of page cache this process has dirtied so far (/proc/self/io write_bytes), if the kernel tells. */
function dirtiedBytes(): number | undefined {
  try {
    const m = /^write_bytes: (\d+)$/m.exec(fs.readFileSync('/proc/self/io', 'latin1'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

describe('io layer', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-io-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('FileBlockDevice', () => {
    it('reads, writes, syncs and discards blocks of a member file', async () => {
      const file = path.join(dir, 'member-0.img');
      const dev = await FileBlockDevice.create(file, 64);
      await exerciseDevice(dev);
      await dev.close();
      await dev.close();
      assert.equal(fs.statSync(file).size, 64 * BLOCK_SIZE_BYTES);
      const again = await FileBlockDevice.open(file, { readOnly: true });
      const b = Buffer.alloc(BLOCK_SIZE_BYTES);
      await again.readBlocks(63, 1, b);
      assert.ok(b.equals(pattern(2, 1)), 'data survives reopen');
      await assert.rejects(again.writeBlocks(0, pattern(3, 1)), AssertionError);
      await again.close();
    });

    it('writeBlocksV writes its parts in order as one run, and refuses parts that are not whole blocks or past the end', async () => {
      const file = path.join(dir, 'member-v.img');
      const dev = await FileBlockDevice.create(file, 16);
      const parts = [pattern(11, 1), pattern(12, 3), pattern(13, 2)];
      await dev.writeBlocksV(4, parts);
      const got = Buffer.alloc(6 * BLOCK_SIZE_BYTES);
      await dev.readBlocks(4, 6, got);
      assert.ok(got.equals(Buffer.concat(parts)));
      await assert.rejects(dev.writeBlocksV(0, [Buffer.alloc(100)]), AssertionError);
      await assert.rejects(dev.writeBlocksV(14, [pattern(1, 1), pattern(2, 2)]), AssertionError);
      await dev.close();
    });

    it('readBlocksBatchCrc reads scattered blocks with their crc32c, and refuses blocks past the end', async () => {
      const file = path.join(dir, 'member-batch.img');
      const dev = await FileBlockDevice.create(file, 32);
      const data = pattern(21, 32);
      await dev.writeBlocks(0, data);
      const pbas = [31, 2, 9, 2];
      const dsts = pbas.map(() => Buffer.alloc(BLOCK_SIZE_BYTES));
      const crcs = new Uint32Array(pbas.length);
      await dev.readBlocksBatchCrc(pbas, dsts, crcs);
      pbas.forEach((p, i) => {
        const want = data.subarray(p * BLOCK_SIZE_BYTES, (p + 1) * BLOCK_SIZE_BYTES);
        assert.ok(dsts[i]!.equals(want), `pba ${p}`);
        const one = Buffer.alloc(4);
        crc32cBlocks(want, 0, 1, one);
        assert.equal(crcs[i], one.readUInt32LE(0), `crc of pba ${p}`);
      });
      await assert.rejects(dev.readBlocksBatchCrc([1, 32], [Buffer.alloc(BLOCK_SIZE_BYTES), Buffer.alloc(BLOCK_SIZE_BYTES)], new Uint32Array(2)), AssertionError);
      await assert.rejects(dev.readBlocksBatchCrc([1], [Buffer.alloc(100)], new Uint32Array(1)), AssertionError);
      await dev.close();
    });

    it('reads cached blocks on the calling thread and the rest through the thread pool, same bytes', async () => {
      const file = path.join(dir, 'nowait.img');
      const blocks = NOWAIT_READ_BYTES_MAX / BLOCK_SIZE_BYTES + 8;
      const dev = await FileBlockDevice.create(file, blocks);
      const data = pattern(9, blocks);
      await dev.writeBlocks(0, data);
      // Just written: in the page cache, so small reads never need the thread pool.
      const one = Buffer.alloc(BLOCK_SIZE_BYTES);
      await dev.readBlocks(5, 1, one);
      assert.ok(one.equals(data.subarray(5 * BLOCK_SIZE_BYTES, 6 * BLOCK_SIZE_BYTES)));
      const most = Buffer.alloc(NOWAIT_READ_BYTES_MAX);
      await dev.readBlocks(8, NOWAIT_READ_BYTES_MAX / BLOCK_SIZE_BYTES, most);
      assert.ok(most.equals(data.subarray(8 * BLOCK_SIZE_BYTES, 8 * BLOCK_SIZE_BYTES + NOWAIT_READ_BYTES_MAX)));
      assert.equal(dev.nowaitReads, 2, 'both reads came from the page cache on the calling thread');
      // Larger than the cap: the thread pool, same bytes.
      const all = Buffer.alloc(blocks * BLOCK_SIZE_BYTES);
      await dev.readBlocks(0, blocks, all);
      assert.ok(all.equals(data));
      assert.equal(dev.nowaitReads, 2);
      await dev.close();
    });

    it('readBlocksCrc reads like readBlocks and gives each block its crc32c (one pool job); refuses what readBlocks refuses', async () => {
      const file = path.join(dir, 'crc.img');
      const dev = await FileBlockDevice.create(file, 64);
      const data = pattern(5, 64);
      await dev.writeBlocks(0, data);
      const got = Buffer.alloc(20 * BLOCK_SIZE_BYTES);
      const crcs = Buffer.alloc(20 * 4);
      await dev.readBlocksCrc(30, 20, got, crcs);
      assert.ok(got.equals(data.subarray(30 * BLOCK_SIZE_BYTES, 50 * BLOCK_SIZE_BYTES)));
      const want = Buffer.alloc(20 * 4);
      crc32cBlocks(got, 0, 20, want);
      assert.ok(crcs.equals(want), 'the crcs are crc32cBlocks of the blocks read');
      assert.notEqual(crcs.readUInt32LE(0), crcs.readUInt32LE(4));
      await assert.rejects(dev.readBlocksCrc(63, 2, Buffer.alloc(2 * BLOCK_SIZE_BYTES), Buffer.alloc(8)), AssertionError);
      await assert.rejects(dev.readBlocksCrc(0, 2, Buffer.alloc(2 * BLOCK_SIZE_BYTES), Buffer.alloc(4)), AssertionError);
      // The addon checks its arguments itself too.
      const fd = fs.openSync(file, 'r');
      try {
        assert.throws(() => void preadCrc(fd, Buffer.alloc(8192), 0, 5000, 0, Buffer.alloc(8)), /whole blocks/);
        assert.throws(() => void preadCrc(fd, Buffer.alloc(8192), 4096, 8192, 0, Buffer.alloc(8)), /exceeds/);
        // At the end of the file: the count read, and crcs for the whole blocks in it.
        const tail = Buffer.alloc(3 * BLOCK_SIZE_BYTES);
        const tc = Buffer.alloc(12, 0xee);
        assert.equal(await preadCrc(fd, tail, 0, tail.length, 62 * BLOCK_SIZE_BYTES, tc), 2 * BLOCK_SIZE_BYTES);
        const tailWant = Buffer.alloc(8);
        crc32cBlocks(data, 62 * BLOCK_SIZE_BYTES, 2, tailWant);
        assert.ok(tc.subarray(0, 8).equals(tailWant), 'crcs of the two blocks read');
        assert.equal(tc.readUInt32LE(8), 0xeeeeeeee, 'no crc for a block not read');
      } finally {
        fs.closeSync(fd);
      }
      await dev.close();
    });

    it('directWrites: large writes bypass the page cache (any Buffer alignment), small ones do not, and reads see every write in order', async () => {
      const file = path.join(dir, 'direct.img');
      await (await FileBlockDevice.create(file, 1024)).close();
      const dev = await FileBlockDevice.open(file, { directWrites: true });
      const big = DIRECT_WRITE_MIN_BYTES / BLOCK_SIZE_BYTES;
      // A buffered write first, then a direct one over it: the read must see the direct one.
      await dev.writeBlocks(10, pattern(1, 1));
      assert.equal(dev.directWrites, 0, 'a 4 KiB write stays buffered');
      // Memory at an odd address (a view 1 byte into an allocation) and parts of odd sizes.
      const backing = Buffer.alloc(big * BLOCK_SIZE_BYTES + 1);
      pattern(2, big).copy(backing, 1);
      const odd = backing.subarray(1);
      await dev.writeBlocks(8, odd);
      assert.equal(dev.directWrites, 1, 'a 64 KiB write goes direct');
      // writeBlocksV over more than the 1 MiB bounce buffer, parts of 3 and 300 blocks.
      const a = pattern(3, 3);
      const b = pattern(4, 300);
      await dev.writeBlocksV(500, [a, b]);
      assert.equal(dev.directWrites, 2);
      // A buffered write inside the direct range, then read everything back.
      await dev.writeBlocks(9, pattern(5, 1));
      const got = Buffer.alloc((big + 2) * BLOCK_SIZE_BYTES);
      await dev.readBlocks(8, big + 2, got);
      const want = Buffer.concat([pattern(2, big).subarray(0, BLOCK_SIZE_BYTES), pattern(5, 1), pattern(2, big).subarray(2 * BLOCK_SIZE_BYTES), Buffer.alloc(2 * BLOCK_SIZE_BYTES)]);
      assert.ok(got.equals(want), 'the direct write replaced the buffered one, the later buffered one replaced part of it');
      const v = Buffer.alloc(303 * BLOCK_SIZE_BYTES);
      await dev.readBlocks(500, 303, v);
      assert.ok(v.equals(Buffer.concat([a, b])), 'writeBlocksV through the bounce buffer, in order');
      await dev.sync();
      await dev.close();
      // Durable in the file as written (a fresh descriptor, then the whole file through the page cache).
      const f = fs.readFileSync(file);
      assert.ok(f.subarray(500 * BLOCK_SIZE_BYTES, 803 * BLOCK_SIZE_BYTES).equals(Buffer.concat([a, b])));
      // NVMIRROR_DIRECT_WRITES=0 turns it off.
      process.env.NVMIRROR_DIRECT_WRITES = '0';
      try {
        const off = await FileBlockDevice.open(file, { directWrites: true });
        await off.writeBlocks(0, pattern(6, big));
        assert.equal(off.directWrites, 0);
        await off.close();
      } finally {
        delete process.env.NVMIRROR_DIRECT_WRITES;
      }
    });

    it('discard punches a hole in the file', async () => {
      const file = path.join(dir, 'punch.img');
      const dev = await FileBlockDevice.create(file, 256, { preallocate: true });
      await dev.writeBlocks(0, pattern(4, 256));
      await dev.sync();
      const before = fs.statSync(file).blocks;
      await dev.discard(0, 128);
      const afterBlocks = fs.statSync(file).blocks;
      assert.ok(afterBlocks < before, `allocated 512-byte sectors ${before} -> ${afterBlocks}`);
      await dev.close();
    });

    it('ignores a partial block at the end and counts whole blocks', async () => {
      const file = path.join(dir, 'odd.img');
      fs.writeFileSync(file, Buffer.alloc(3 * BLOCK_SIZE_BYTES + 100));
      const dev = await FileBlockDevice.open(file);
      assert.equal(dev.blockCount, 3);
      await dev.close();
    });

    it('refuses to create over an existing file and names a missing one', async () => {
      await assert.rejects(FileBlockDevice.create(path.join(dir, 'odd.img'), 1), /file exists/);
      await assert.rejects(FileBlockDevice.open(path.join(dir, 'missing.img')), /^Error: no such file: .*missing\.img$/);
      await assert.rejects(FileBlockDevice.open(dir), /not a regular file|is a directory/);
      await assert.rejects(FileBlockDevice.create(path.join(dir, 'zero.img'), 0), RangeError);
    });

    it('lock: a second locked open fails while the first is open', async () => {
      const file = path.join(dir, 'locked.img');
      const a = await FileBlockDevice.create(file, 4, { lock: true });
      await assert.rejects(FileBlockDevice.open(file, { lock: true }), /in use by another process/);
      await a.close();
      const b = await FileBlockDevice.open(file, { lock: true });
      await b.close();
    });

    it('a short read (file truncated under us) is an EIO, never zeroes', async () => {
      const file = path.join(dir, 'trunc.img');
      const dev = await FileBlockDevice.create(file, 8);
      fs.truncateSync(file, 2 * BLOCK_SIZE_BYTES);
      await assert.rejects(dev.readBlocks(1, 2, Buffer.alloc(2 * BLOCK_SIZE_BYTES)), { code: 'EIO' });
      await dev.close();
    });
  });

  describe('MmapNvram', () => {
    it('creates a zero-filled, fully allocated file of the requested size', async () => {
      const file = path.join(dir, 'nvram-a');
      const nv = await MmapNvram.open(file, { sizeBytes: 256 * 1024, create: true });
      assert.equal(nv.sizeBytes, 256 * 1024);
      assert.equal(nv.buffer.length, 256 * 1024);
      assert.ok(nv.buffer.equals(Buffer.alloc(256 * 1024)));
      const st = fs.statSync(file);
      assert.equal(st.size, 256 * 1024);
      assert.ok(st.blocks * 512 >= 256 * 1024, 'every page is allocated');
      assert.deepEqual(fs.readdirSync(dir).filter((n) => n.startsWith('nvram-a.tmp')), [], 'no temporary file left');
      await nv.close();
    });

    it('persists stores in the mapping across close and reopen', async () => {
      const file = path.join(dir, 'nvram-b');
      const nv = await MmapNvram.open(file, { sizeBytes: 64 * 1024, create: true });
      nv.buffer.write('first record', 10);
      nv.buffer.write('spans two pages', 4096 - 5);
      await nv.persist(10, 12);
      await nv.persist(4096 - 5, 15);
      await nv.persist(0, 0);
      await nv.close();
      assert.equal(nv.buffer.length, 0, 'the mapping is gone after close');
      await assert.rejects(nv.persist(0, 1), AssertionError);
      const again = await MmapNvram.open(file, { sizeBytes: 64 * 1024 });
      assert.equal(again.buffer.toString('latin1', 10, 22), 'first record');
      assert.equal(again.buffer.toString('latin1', 4091, 4106), 'spans two pages');
      const third = await MmapNvram.open(file);
      assert.equal(third.sizeBytes, 64 * 1024, 'size comes from the file when not given');
      assert.equal(third.buffer.toString('latin1', 10, 22), 'first record', 'two mappings share the pages');
      await third.close();
      await again.close();
    });

    it('refuses a size mismatch, a missing file and bad sizes with clear errors', async () => {
      const file = path.join(dir, 'nvram-c');
      await (await MmapNvram.open(file, { sizeBytes: 16 * 1024, create: true })).close();
      await assert.rejects(MmapNvram.open(file, { sizeBytes: 32 * 1024 }), /is 16384 bytes, expected 32768/);
      await assert.rejects(MmapNvram.open(path.join(dir, 'nope')), /^Error: no such file: /);
      await assert.rejects(MmapNvram.open(path.join(dir, 'bad'), { sizeBytes: 5000, create: true }), RangeError);
      await assert.rejects(MmapNvram.open(path.join(dir, 'bad2'), { create: true }), /needs a size/);
    });

    it('persist asserts its range', async () => {
      const nv = await MmapNvram.open(path.join(dir, 'nvram-d'), { sizeBytes: 8192, create: true });
      await assert.rejects(nv.persist(8000, 200), AssertionError);
      await assert.rejects(nv.persist(-1, 10), AssertionError);
      await assert.rejects(nv.persist(0, -4096), AssertionError);
      await assert.rejects(nv.persist(0.5, 10), AssertionError);
      await assert.rejects(nv.persist(0, Number.NaN), AssertionError);
      await assert.rejects(nv.persist(8192, 1), AssertionError);
      await nv.persist(8192, 0);
      await nv.persist(0, 8192);
      await nv.close();
    });

    it('a store dirties only its own 4 KiB page, so persist writes about its range', async function () {
      // /proc/self/io write_bytes grows by the size of each page-cache folio this process
      // dirties. Cached in large folios (the 1 MiB zero-fill writes of create leave them),
      // one 4 KiB store dirtied 1 MiB and each msync wrote all of it; open() re-caches the
      // file in base pages.
      if (dirtiedBytes() === undefined) this.skip();
      const file = path.join(dir, 'nvram-e');
      const nv = await MmapNvram.open(file, { sizeBytes: 4 * 1024 * 1024, create: true });
      for (let i = 0; i < 8; i++) {
        const at = i * 512 * 1024 + 100 + i;
        const before = dirtiedBytes()!;
        nv.buffer.write(`record ${i}`, at);
        const dirtied = dirtiedBytes()! - before;
        assert.ok(dirtied <= 4096, `store ${i} at ${at} dirtied ${dirtied} bytes of page cache`);
        await nv.persist(at, 8);
      }
      await nv.close();
      // Reopened (the pages are cached in whatever folios the previous mapping left): the same.
      const again = await MmapNvram.open(file, { sizeBytes: 4 * 1024 * 1024 });
      const before = dirtiedBytes()!;
      again.buffer.write('again', 3 * 1024 * 1024 + 17);
      assert.ok(dirtiedBytes()! - before <= 4096, 'a store after reopen dirtied more than its page');
      await again.persist(3 * 1024 * 1024 + 17, 5);
      assert.equal(again.buffer.toString('latin1', 512 * 1024 + 101, 512 * 1024 + 109), 'record 1');
      await again.close();
    });
  });

  describe('MemoryBlockDevice', () => {
    it('behaves like a block device and counts its calls', async () => {
      const dev = new MemoryBlockDevice(64);
      await exerciseDevice(dev);
      assert.ok(dev.stats.blocksWritten === 3 && dev.stats.syncs === 1 && dev.stats.blocksDiscarded === 1);
      assert.equal(dev.allocatedBlocks, 2);
      assert.ok(dev.peekBlock(3).equals(Buffer.alloc(BLOCK_SIZE_BYTES)), 'discarded block reads as zeroes');
      await dev.close();
      await assert.rejects(dev.sync(), AssertionError);
    });

    it('copies data in and out (no aliasing with the caller)', async () => {
      const dev = new MemoryBlockDevice(4);
      const src = pattern(9, 1);
      await dev.writeBlocks(0, src);
      src.fill(0);
      const out = Buffer.alloc(BLOCK_SIZE_BYTES);
      await dev.readBlocks(0, 1, out);
      assert.ok(out.equals(pattern(9, 1)));
      out.fill(1);
      assert.ok(dev.peekBlock(0).equals(pattern(9, 1)));
    });

    it('discards a huge range of a sparse device quickly', async () => {
      const dev = new MemoryBlockDevice(2 ** 40);
      await dev.writeBlocks(2 ** 39, pattern(1, 1));
      await dev.writeBlocks(5, pattern(1, 1));
      await dev.discard(0, 2 ** 40 - 1);
      assert.equal(dev.allocatedBlocks, 0);
      assert.throws(() => new MemoryBlockDevice(0), RangeError);
    });
  });
});
