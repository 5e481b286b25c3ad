/**
 * The native addon against known vectors and real files: crc32c, XOR, RAID-6 P+Q,
 * positional I/O with syncs, punch hole + SEEK_DATA/SEEK_HOLE, flock, mmap/msync, and
 * argument validation (bad input throws a JS error, never crashes the process).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as native from '../../src/io/native';

type Raw = Record<string, (...args: unknown[]) => unknown>;
const raw = (): Raw => native.addon() as unknown as Raw;

/** GF(2^8) multiply by 2, polynomial 0x11d (the reference formula in engine-notes.md). */
const mul2 = (a: number): number => ((a << 1) ^ (a & 0x80 ? 0x1d : 0)) & 0xff;

function pqModel(data: Buffer[]): { p: Buffer; q: Buffer } {
  const n = data[0]!.length;
  const p = Buffer.alloc(n);
  const q = Buffer.alloc(n);
  for (let j = 0; j < n; j++) {
    let pb = 0;
    let qb = 0;
    for (let i = data.length - 1; i >= 0; i--) {
      pb ^= data[i]![j]!;
      qb = mul2(qb) ^ data[i]![j]!;
    }
    p[j] = pb;
    q[j] = qb;
  }
  return { p, q };
}

function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s;
  };
}

function randomBuffer(rnd: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = rnd() >>> 24;
  return b;
}

describe('native addon', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-native-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('crc32c', () => {
    it('matches the check value for "123456789"', () => {
      const b = Buffer.from('123456789');
      assert.equal(native.crc32c(b), 0xe3069283);
      assert.equal(native.crc32cPortable(b), 0xe3069283);
    });

    it('of nothing is 0 and of 32 zero bytes is 0x8a9136aa', () => {
      assert.equal(native.crc32c(Buffer.alloc(0)), 0);
      assert.equal(native.crc32c(Buffer.alloc(32)), 0x8a9136aa);
    });

    it('chains through the seed: crc(b, crc(a)) == crc(a+b)', () => {
      const rnd = seeded(7);
      const a = randomBuffer(rnd, 1000);
      const b = randomBuffer(rnd, 3001);
      const whole = native.crc32c(Buffer.concat([a, b]));
      assert.equal(native.crc32c(b, 0, b.length, native.crc32c(a)), whole);
      assert.equal(native.crc32cPortable(b, 0, b.length, native.crc32cPortable(a)), whole);
    });

    it('hardware and table paths agree at every length and alignment', () => {
      const rnd = seeded(11);
      const buf = randomBuffer(rnd, 4200);
      for (let off = 0; off < 9; off++) {
        for (const len of [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 100, 4096, 4191 - off]) {
          assert.equal(native.crc32c(buf, off, len, 0x12345678), native.crc32cPortable(buf, off, len, 0x12345678), `off ${off} len ${len}`);
        }
      }
      assert.equal(typeof native.crc32cHardware(), 'boolean');
    });

    it('hardware and table paths agree across the striped lengths (3 x 1360 and 3 x 8192 bytes), joined with a seed', () => {
      const rnd = seeded(13);
      const buf = randomBuffer(rnd, 3 * 8192 * 3 + 5000);
      const short = 3 * 1360;
      const long = 3 * 8192;
      const lens = [short - 1, short, short + 1, short + 8, 2 * short, long - 1, long, long + 1, long + short, long + short + 7, 2 * long + 3 * short + 13, 3 * long + 4096];
      for (const off of [0, 1, 5, 8]) {
        for (const len of lens) {
          assert.equal(native.crc32c(buf, off, len, 0x9e3779b9), native.crc32cPortable(buf, off, len, 0x9e3779b9), `off ${off} len ${len}`);
        }
      }
      const whole = native.crc32c(buf, 0, buf.length, 0);
      assert.equal(whole, native.crc32cPortable(buf, 0, buf.length, 0));
      assert.equal(native.crc32c(buf, long + 3, buf.length - long - 3, native.crc32c(buf, 0, long + 3)), whole, 'chains through the seed across stripes');
    });

    it('crc32cWide (three chains) equals crc32c at every length around its 4080-byte chunks, any offset, any seed', () => {
      const rnd = seeded(19);
      const buf = randomBuffer(rnd, 5 * 4080 + 4200);
      const chunk = 3 * 1360;
      const lens = [0, 1, 7, 8, 64, chunk - 1, chunk, chunk + 1, chunk + 16, 4096, 4096 + 64, 2 * chunk - 8, 2 * chunk, 2 * chunk + 9, 4 * chunk + 4095, 5 * chunk + 4100];
      for (const off of [0, 1, 3, 8, 64]) {
        for (const len of lens) {
          for (const seed of [0, 0x9e3779b9]) {
            assert.equal(native.crc32cWide(buf, off, len, seed), native.crc32cPortable(buf, off, len, seed), `off ${off} len ${len} seed ${seed}`);
          }
        }
      }
      assert.equal(native.crc32cWide(Buffer.from('123456789')), 0xe3069283);
      assert.throws(() => native.crc32cWide(buf, buf.length - 4, 5), RangeError);
    });

    it('the AVX-512 folding path equals the table path at every length around its 64- and 256-byte steps, any offset, any seed; on in this process wherever the CPU has it', function () {
      const flags = fs.readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1]?.split(/\s+/) ?? [];
      const cpuHas = ['avx512f', 'avx512vl', 'vpclmulqdq', 'pclmulqdq', 'sse4_2'].every((f) => flags.includes(f));
      // The fast path must not be off silently on a CPU that has it (the benchmark counts on it).
      if (process.env.NVMIRROR_CRC_NO_AVX512 === undefined) assert.equal(native.crc32cFolding(), cpuHas, `folding ${native.crc32cFolding()}, CPU flags say ${cpuHas}`);
      if (!native.crc32cFolding()) {
        assert.throws(() => native.crc32cFold(Buffer.alloc(4096)), /no AVX-512/);
        return;
      }
      const rnd = seeded(29);
      const buf = randomBuffer(rnd, 3 * 4096 + 400);
      const lens = [256, 257, 263, 319, 320, 511, 512, 513, 575, 576, 1000, 4095, 4096, 4097, 4096 + 255, 8192, 3 * 4096 + 300];
      for (const off of [0, 1, 7, 8, 63, 64]) {
        for (const len of lens) {
          for (const seed of [0, 0x9e3779b9, 0xffffffff]) {
            const want = native.crc32cPortable(buf, off, len, seed);
            assert.equal(native.crc32cFold(buf, off, len, seed), want, `fold off ${off} len ${len} seed ${seed}`);
            assert.equal(native.crc32cWide(buf, off, len, seed), want, `wide off ${off} len ${len} seed ${seed}`);
          }
        }
      }
      // Random spans, and the patterns a carry-less product gets wrong first (all ones, one bit).
      for (let i = 0; i < 300; i++) {
        const len = 256 + (rnd() % (buf.length - 256 - 64));
        const off = rnd() % 64;
        const seed = rnd();
        assert.equal(native.crc32cFold(buf, off, len, seed), native.crc32cPortable(buf, off, len, seed), `random off ${off} len ${len} seed ${seed}`);
      }
      const ones = Buffer.alloc(4096, 0xff);
      assert.equal(native.crc32cFold(ones), native.crc32cPortable(ones));
      for (const bit of [0, 7, 8 * 255, 8 * 4095 + 7]) {
        const b = Buffer.alloc(4096);
        b[bit >> 3] = 1 << (bit & 7);
        assert.equal(native.crc32cFold(b), native.crc32cPortable(b), `one bit at ${bit}`);
      }
      assert.throws(() => native.crc32cFold(buf, 0, 255), RangeError);
    });

    it('crc32cExtendBlock extends a crc32c of any length and seed by a 4 KiB block from that block\'s crc32c alone', () => {
      const rnd = seeded(23);
      const buf = randomBuffer(rnd, 4 * 4096 + 200);
      for (const head of [0, 1, 56, 64, 4096]) {
        for (const seed of [0, 0x9e3779b9, 0xffffffff]) {
          let c = native.crc32cPortable(buf, 0, head, seed);
          for (let b = 0; b < 3; b++) {
            const blockCrc = native.crc32cPortable(buf, head + b * 4096, 4096, 0);
            c = native.crc32cExtendBlock(c, blockCrc);
            assert.equal(c, native.crc32cPortable(buf, 0, head + (b + 1) * 4096, seed), `head ${head} seed ${seed} blocks ${b + 1}`);
          }
        }
      }
      const zero = Buffer.alloc(4096);
      assert.equal(native.crc32cExtendBlock(native.crc32c(zero), native.crc32c(zero)), native.crc32c(Buffer.alloc(8192)));
    });

    it('crc32cBlocks gives each 4 KiB block its crc32c in one call, and refuses out-of-bounds arguments', () => {
      const rnd = seeded(17);
      const buf = randomBuffer(rnd, 9 * 4096 + 3);
      const out = Buffer.alloc(8 * 4);
      native.crc32cBlocks(buf, 3, 8, out);
      for (let i = 0; i < 8; i++) assert.equal(out.readUInt32LE(i * 4), native.crc32cPortable(buf, 3 + i * 4096, 4096, 0), `block ${i}`);
      assert.throws(() => native.crc32cBlocks(buf, 4, 9, Buffer.alloc(36)), RangeError);
      assert.throws(() => native.crc32cBlocks(buf, 0, 8, Buffer.alloc(31)), RangeError);
      assert.throws(() => native.crc32cBlocks(buf, -1, 1, out), RangeError);
      assert.throws(() => native.crc32cBlocks(buf, 0, native.CRC_BLOCKS_MAX + 1, out), RangeError);
    });

    it('respects offset and length', () => {
      const b = Buffer.from('xx123456789yy');
      assert.equal(native.crc32c(b, 2, 9), 0xe3069283);
    });
  });

  describe('xorInto', () => {
    it('xors src into dst over length bytes only', () => {
      const rnd = seeded(3);
      for (const n of [0, 1, 31, 32, 33, 4096, 4099]) {
        const dst = randomBuffer(rnd, n + 5);
        const src = randomBuffer(rnd, n + 5);
        const expect = Buffer.from(dst);
        for (let i = 0; i < n; i++) expect[i] = dst[i]! ^ src[i]!;
        native.xorInto(dst, src, n);
        assert.deepEqual(dst, expect);
      }
    });
  });

  describe('pqGen', () => {
    it('matches the P+Q test vector of engine-notes.md', () => {
      const data = [0, 1, 2, 3].map((i) => {
        const b = Buffer.alloc(64);
        for (let j = 0; j < 64; j++) b[j] = (i * 0x1f + j * 7 + 1) & 0xff;
        return b;
      });
      assert.equal(data[0]!.subarray(0, 8).toString('hex'), '01080f161d242b32');
      assert.equal(data[3]!.subarray(0, 8).toString('hex'), '5e656c737a81888f');
      const p = Buffer.alloc(64);
      const q = Buffer.alloc(64);
      native.pqGen(data, p, q);
      assert.equal(p.subarray(0, 8).toString('hex'), '400c00040084809c');
      assert.equal(q.subarray(0, 8).toString('hex'), '774c3d8ee34b3241');
      const model = pqModel(data);
      assert.deepEqual(p, model.p);
      assert.deepEqual(q, model.q);
    });

    it('gives Q = g^i for a single 1 in column i (2^8 = 0x1d)', () => {
      const cols = Array.from({ length: 9 }, () => Buffer.alloc(1));
      cols[8]![0] = 1;
      const p = Buffer.alloc(1);
      const q = Buffer.alloc(1);
      native.pqGen(cols, p, q);
      assert.equal(p[0], 1);
      assert.equal(q[0], 0x1d);
      cols[8]![0] = 0;
      cols[1]![0] = 0x8e; // inv(2): g * 0x8e == 1
      native.pqGen(cols, p, q);
      assert.equal(q[0], 1);
    });

    it('matches a scalar model for odd lengths and many columns', () => {
      const rnd = seeded(5);
      for (const [cols, n] of [[1, 5], [2, 32], [3, 33], [7, 4099], [16, 100]] as const) {
        const data = Array.from({ length: cols }, () => randomBuffer(rnd, n));
        const p = Buffer.alloc(n);
        const q = Buffer.alloc(n);
        native.pqGen(data, p, q);
        const model = pqModel(data);
        assert.deepEqual(p, model.p, `P cols ${cols} n ${n}`);
        assert.deepEqual(q, model.q, `Q cols ${cols} n ${n}`);
      }
    });
  });

  describe('file I/O', () => {
    it('pwrite then pread round-trips, with and without sync', async () => {
      const fd = fs.openSync(path.join(dir, 'rw.img'), 'w+');
      try {
        const data = randomBuffer(seeded(1), 10000);
        await native.pwrite(fd, data, 0, 5000, 4096, false);
        await native.pwrite(fd, data, 5000, 5000, 4096 + 5000, true);
        await native.fdatasync(fd);
        // The writeback hint (sync_file_range WRITE after the write) changes no byte.
        const big = randomBuffer(seeded(2), 1 << 20);
        await native.pwrite(fd, big, 0, big.length, 1 << 20, false, true);
        const bigBack = Buffer.alloc(big.length);
        assert.equal(await native.pread(fd, bigBack, 0, big.length, 1 << 20), big.length);
        assert.ok(bigBack.equals(big), 'a write with the writeback hint reads back');
        const raw = (native.addon() as unknown as { pwrite(...a: unknown[]): void });
        assert.throws(() => raw.pwrite(fd, big, 0, 4096, 0, false, 'yes', () => undefined), /writeback/);
        const back = Buffer.alloc(10000);
        assert.equal(await native.pread(fd, back, 0, 10000, 4096), 10000);
        assert.deepEqual(back, data);
        const head = Buffer.alloc(4096, 0xff);
        assert.equal(await native.pread(fd, head, 0, 4096, 0), 4096);
        assert.ok(head.equals(Buffer.alloc(4096)), 'the gap before the first write reads as zeroes');
      } finally {
        fs.closeSync(fd);
      }
    });

    it('pread stops at end of file and reports the count', async () => {
      const file = path.join(dir, 'short.img');
      fs.writeFileSync(file, Buffer.from('hello world'));
      const fd = fs.openSync(file, 'r');
      try {
        const b = Buffer.alloc(64);
        assert.equal(await native.pread(fd, b, 10, 64 - 10, 6), 5);
        assert.equal(b.toString('utf8', 10, 15), 'world');
        assert.equal(await native.pread(fd, b, 0, 10, 1000), 0);
      } finally {
        fs.closeSync(fd);
      }
    });

    it('pwritev writes buffers back to back', async () => {
      const file = path.join(dir, 'vec.img');
      const fd = fs.openSync(file, 'w+');
      try {
        const bufs = [Buffer.from('abc'), Buffer.alloc(0), Buffer.from('defgh'), Buffer.alloc(5000, 0x41)];
        await native.pwritev(fd, bufs, 10, true);
      } finally {
        fs.closeSync(fd);
      }
      const got = fs.readFileSync(file);
      assert.equal(got.length, 10 + 8 + 5000);
      assert.equal(got.toString('latin1', 10, 18), 'abcdefgh');
      assert.ok(got.subarray(18).equals(Buffer.alloc(5000, 0x41)));
    });

    it('pwritev keeps the buffers it was given: emptying the caller\'s array (and a GC) before it completes changes nothing', async () => {
      const file = path.join(dir, 'vec-keep.img');
      const fd = fs.openSync(file, 'w+');
      const parts = 256;
      const expected = Buffer.alloc(parts * 4096);
      try {
        for (let round = 0; round < 8; round++) {
          // Views of fresh 1 MiB buffers nobody else holds once the array is emptied.
          const bufs: Buffer[] = [];
          for (let i = 0; i < parts; i++) {
            const b = Buffer.alloc(8192, (round * 31 + i) & 0xff).subarray(4096);
            bufs.push(b);
            b.copy(expected, i * 4096);
          }
          const p = native.pwritev(fd, bufs, 0, false);
          bufs.length = 0;
          (globalThis as { gc?: () => void }).gc?.();
          await p;
          assert.ok(fs.readFileSync(file).equals(expected), `round ${round}`);
        }
      } finally {
        fs.closeSync(fd);
      }
    });

    it('pwriteBatch keeps the buffers it was given: emptying the caller\'s arrays (and a GC) before it completes changes nothing', async () => {
      const file = path.join(dir, 'batch-keep.img');
      const fd = fs.openSync(file, 'w+');
      const writes = 128;
      const expected = Buffer.alloc(2 * writes * 4096);
      fs.ftruncateSync(fd, expected.length);
      try {
        for (let round = 0; round < 8; round++) {
          // Every other 4 KiB block, in reverse order, from views nobody else holds.
          const bufs: Buffer[] = [];
          const positions: number[] = [];
          for (let i = 0; i < writes; i++) {
            const b = Buffer.alloc(8192, (round * 37 + i) & 0xff).subarray(4096);
            const at = (2 * (writes - 1 - i) + (round & 1)) * 4096;
            bufs.push(b);
            positions.push(at);
            b.copy(expected, at);
          }
          const p = native.pwriteBatch(fd, bufs, positions);
          bufs.length = 0;
          positions.length = 0;
          (globalThis as { gc?: () => void }).gc?.();
          const errors = await p;
          assert.equal(errors.length, writes);
          assert.ok(errors.every((e) => e === null), `round ${round}: ${errors.find((e) => e !== null)?.message}`);
          assert.ok(fs.readFileSync(file).equals(expected), `round ${round}`);
        }
      } finally {
        fs.closeSync(fd);
      }
    });

    it('preadBatchCrc reads scattered blocks whole with their crc32c, and fails the call on a short read', async () => {
      const file = path.join(dir, 'batch-read.img');
      const rnd = seeded(11);
      const image = randomBuffer(rnd, 64 * 4096);
      fs.writeFileSync(file, image);
      const fd = fs.openSync(file, 'r');
      try {
        // Out of order, one repeated, the last block of the file.
        const blocks = [63, 0, 17, 17, 5, 40];
        const bufs = blocks.map(() => Buffer.alloc(4096, 0xee));
        const crcs = Buffer.alloc(4 * blocks.length);
        await native.preadBatchCrc(fd, bufs, blocks.map((b) => b * 4096), crcs);
        blocks.forEach((b, i) => {
          const want = image.subarray(b * 4096, (b + 1) * 4096);
          assert.ok(bufs[i]!.equals(want), `block ${b}`);
          assert.equal(crcs.readUInt32LE(4 * i), native.crc32c(want), `crc of block ${b}`);
        });
        // A block that straddles the end of the file: the whole call fails, with EIO.
        await assert.rejects(native.preadBatchCrc(fd, [Buffer.alloc(4096), Buffer.alloc(4096)], [0, 63 * 4096 + 512], Buffer.alloc(8)), (e: NodeJS.ErrnoException) => e.code === 'EIO' && /short read/.test(e.message));
        assert.throws(() => native.preadBatchCrc(fd, [Buffer.alloc(4096)], [0], Buffer.alloc(3)), RangeError);
        assert.throws(() => native.preadBatchCrc(fd, [], [], Buffer.alloc(4)), RangeError);
      } finally {
        fs.closeSync(fd);
      }
    });

    it('pwritev with the writeback hint writes the same bytes', async () => {
      const file = path.join(dir, 'writev-hint.img');
      const fd = fs.openSync(file, 'w+');
      try {
        const rnd = seeded(12);
        const parts = [randomBuffer(rnd, 4096), randomBuffer(rnd, 512 * 1024), randomBuffer(rnd, 4096)];
        await native.pwritev(fd, parts, 8192, false, true);
        await native.fdatasync(fd);
        const back = Buffer.alloc(8192 + 520 * 1024);
        fs.readSync(fd, back, 0, back.length, 0);
        assert.ok(back.subarray(8192).equals(Buffer.concat(parts)));
        assert.ok(back.subarray(0, 8192).equals(Buffer.alloc(8192)));
      } finally {
        fs.closeSync(fd);
      }
    });

    it('pwritevDirect writes an O_DIRECT descriptor from buffers of any alignment and size, and refuses unaligned positions and totals', async () => {
      const file = path.join(dir, 'direct.img');
      fs.writeFileSync(file, Buffer.alloc(0));
      const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_DIRECT);
      const rnd = seeded(7);
      // 1 + 8191 + 2 MiB + 4096 bytes: parts that straddle 4 KiB and the 1 MiB bounce buffer.
      const parts = [randomBuffer(rnd, 1), randomBuffer(rnd, 8191), randomBuffer(rnd, 2 * 1024 * 1024 + 1).subarray(1), randomBuffer(rnd, 4096)];
      try {
        await native.pwritevDirect(fd, parts, 3 * 4096);
        await assert.rejects(native.pwritevDirect(fd, [Buffer.alloc(4096)], 100), /position must be a multiple of 4096/);
        await assert.rejects(native.pwritevDirect(fd, [Buffer.alloc(4095)], 4096), /total length must be a multiple of 4096/);
        assert.throws(() => native.pwritevDirect(fd, [], 0), RangeError);
      } finally {
        fs.closeSync(fd);
      }
      const got = fs.readFileSync(file);
      assert.equal(got.length, 3 * 4096 + 8192 + 2 * 1024 * 1024 + 4096);
      assert.ok(got.subarray(0, 3 * 4096).equals(Buffer.alloc(3 * 4096)));
      assert.ok(got.subarray(3 * 4096).equals(Buffer.concat(parts)));
      await assert.rejects(native.pwritevDirect(1 << 20, [Buffer.alloc(4096)], 0), /EBADF/);
    });

    it('punch hole shows up through SEEK_DATA/SEEK_HOLE and reads as zeroes', async () => {
      const file = path.join(dir, 'holes.img');
      const fd = fs.openSync(file, 'w+');
      try {
        const mib = 1024 * 1024;
        await native.pwrite(fd, Buffer.alloc(mib, 0x5a), 0, mib, 0, true);
        await native.fallocate(fd, native.FALLOC_PUNCH_HOLE, 256 * 1024, 256 * 1024);
        assert.equal(fs.fstatSync(fd).size, mib, 'punching keeps the size');
        assert.equal(await native.seekData(fd, 0), 0);
        assert.equal(await native.seekHole(fd, 0), 256 * 1024);
        assert.equal(await native.seekData(fd, 256 * 1024), 512 * 1024);
        assert.equal(await native.seekHole(fd, 512 * 1024), mib, 'end of file counts as a hole');
        assert.equal(await native.seekData(fd, mib), -1, 'no data past the end');
        const b = Buffer.alloc(256 * 1024, 1);
        await native.pread(fd, b, 0, b.length, 256 * 1024);
        assert.ok(b.equals(Buffer.alloc(256 * 1024)));

        await native.fallocate(fd, native.FALLOC_ZERO_RANGE, 1000, 3000);
        const z = Buffer.alloc(5000);
        await native.pread(fd, z, 0, 5000, 0);
        assert.ok(z.subarray(1000, 4000).equals(Buffer.alloc(3000)));
        assert.equal(z[999], 0x5a);
        assert.equal(z[4000], 0x5a);

        await native.fallocate(fd, native.FALLOC_ALLOCATE, 0, 4 * mib);
        assert.equal(fs.fstatSync(fd).size, mib, 'allocate keeps the size');
      } finally {
        fs.closeSync(fd);
      }
    });

    it('reports errno as an Error with code, errno and the call name', async () => {
      const file = path.join(dir, 'ro.img');
      fs.writeFileSync(file, Buffer.alloc(4096));
      const fd = fs.openSync(file, 'r');
      try {
        await assert.rejects(native.pwrite(fd, Buffer.alloc(10), 0, 10, 0, false), (e: native.NativeError) => {
          assert.equal(e.code, 'EBADF');
          assert.equal(e.errno, -9);
          assert.equal(e.syscall, 'pwrite');
          assert.match(e.message, /EBADF.*pwrite/);
          return true;
        });
        await assert.rejects(native.fallocate(fd, native.FALLOC_PUNCH_HOLE, 0, 4096), { code: 'EBADF', syscall: 'fallocate' });
      } finally {
        fs.closeSync(fd);
      }
      // fd 2^30 is certainly not open.
      await assert.rejects(native.fdatasync(2 ** 30), { code: 'EBADF', syscall: 'fdatasync' });
      await assert.rejects(native.seekData(2 ** 30, 0), { code: 'EBADF' });
    });

    it('preadNowait copies cached data on the calling thread; pwriteNowait writes or says why not', async () => {
      const file = path.join(dir, 'nowait.img');
      const fd = fs.openSync(file, 'w+');
      try {
        const data = randomBuffer(seeded(9), 8192);
        await native.pwrite(fd, data, 0, 8192, 0, false);
        const back = Buffer.alloc(8192);
        assert.equal(native.preadNowait(fd, back, 100, 8000, 100), 8000, 'just-written pages are in the page cache');
        assert.ok(back.subarray(100, 8100).equals(data.subarray(100, 8100)));
        assert.equal(native.preadNowait(fd, back, 0, 10, 8192), 0, 'end of file');
        const n = native.pwriteNowait(fd, Buffer.from('nowait'), 0, 6, 4096);
        assert.ok(n === 6 || n === native.NOWAIT_UNSUPPORTED || n === native.NOWAIT_WOULD_BLOCK, `pwriteNowait gave ${n}`);
        if (n === 6) assert.equal(fs.readFileSync(file).toString('latin1', 4096, 4102), 'nowait');
        assert.throws(() => native.preadNowait(fd, Buffer.alloc(2 * native.NOWAIT_MAX_BYTES), 0, native.NOWAIT_MAX_BYTES + 1, 0), RangeError);
        assert.throws(() => native.pwriteNowait(fd, back, 8000, 500, 0), RangeError);
      } finally {
        fs.closeSync(fd);
      }
      assert.equal(native.preadNowait(2 ** 30, Buffer.alloc(1), 0, 1, 0), native.NOWAIT_WOULD_BLOCK, 'errors defer to the async path');
    });

    it('flockExclusive fails for a second open of the same file', () => {
      const file = path.join(dir, 'lock.img');
      fs.writeFileSync(file, '');
      const a = fs.openSync(file, 'r');
      const b = fs.openSync(file, 'r');
      try {
        assert.equal(native.flockExclusive(a), true);
        assert.equal(native.flockExclusive(a), true, 'taking it again on the same fd is fine');
        assert.equal(native.flockExclusive(b), false);
      } finally {
        fs.closeSync(a);
      }
      try {
        assert.equal(native.flockExclusive(b), true, 'free once the holder closed');
      } finally {
        fs.closeSync(b);
      }
    });
  });

  describe('mmap', () => {
    it('stores through the mapping are in the file after msync and reopen', async () => {
      const file = path.join(dir, 'nvram.img');
      fs.writeFileSync(file, Buffer.alloc(3 * 4096));
      const fd = fs.openSync(file, 'r+');
      const m = native.mmap(fd, 3 * 4096);
      assert.equal(m.length, 3 * 4096);
      m.write('record-one', 100);
      m.write('record-two', 4096 + 4000); // spans a page boundary
      await native.msync(m, 4096 + 4000, 10);
      await native.msync(m, 100, 10);
      native.munmap(m);
      fs.closeSync(fd);
      const back = fs.readFileSync(file);
      assert.equal(back.toString('latin1', 100, 110), 'record-one');
      assert.equal(back.toString('latin1', 8096, 8106), 'record-two');
    });

    it('munmap makes later use safe and a second munmap is a no-op', async () => {
      const file = path.join(dir, 'unmap.img');
      fs.writeFileSync(file, Buffer.alloc(4096));
      const fd = fs.openSync(file, 'r+');
      const m = native.mmap(fd, 4096);
      const slice = m.subarray(0, 16);
      native.munmap(m);
      native.munmap(m);
      // The Buffer (and every view of it) is detached: element stores are ignored, bulk
      // operations throw a JS TypeError, nothing can fault.
      assert.equal(m.length, 0);
      assert.equal(slice.length, 0);
      m[0] = 1;
      assert.equal(m[0], undefined);
      assert.throws(() => slice.fill(2), TypeError);
      assert.throws(() => raw().msync!(m, 0, 1, () => undefined), TypeError);
      fs.closeSync(fd);
      assert.ok(fs.readFileSync(file).equals(Buffer.alloc(4096)), 'writes after munmap never reach the file');
    });

    it('recachePages keeps the contents, and reports a bad fd and a short file', async () => {
      const file = path.join(dir, 'recache.img');
      const data = randomBuffer(seeded(7), 3 * 1024 * 1024 + 4096);
      fs.writeFileSync(file, data);
      const fd = fs.openSync(file, 'r+');
      const m = native.mmap(fd, data.length);
      m.write('stored before', 5000); // dirty in the page cache, not yet on disk
      await native.recachePages(fd, data.length);
      assert.equal(m.toString('latin1', 5000, 5013), 'stored before');
      native.munmap(m);
      data.write('stored before', 5000);
      assert.ok(fs.readFileSync(file).equals(data), 'recachePages changes no byte of the file');
      await assert.rejects(native.recachePages(fd, data.length + 4096), (e: NodeJS.ErrnoException) => e.code === 'EIO' && e.syscall === 'pread');
      fs.closeSync(fd);
      await assert.rejects(native.recachePages(fd, 4096), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
    });

    it('msync re-checks its range against the live mapping', () => {
      const file = path.join(dir, 'range.img');
      fs.writeFileSync(file, Buffer.alloc(2 * 4096));
      const fd = fs.openSync(file, 'r+');
      const m = native.mmap(fd, 2 * 4096);
      const noop = (): void => undefined;
      assert.throws(() => raw().msync!(m, 4096, 4097, noop), RangeError);
      assert.throws(() => raw().msync!(m, -1, 1, noop), RangeError);
      assert.throws(() => raw().msync!(m, 0, 0.5, noop), RangeError);
      assert.throws(() => raw().msync!(m.subarray(4096), 0, 1, noop), TypeError);
      assert.throws(() => raw().msync!(m, 0, 1), TypeError);
      native.munmap(m);
      fs.closeSync(fd);
    });

    it('munmap refuses a Buffer that mmap did not return', () => {
      assert.throws(() => native.munmap(Buffer.alloc(4096)), TypeError);
    });
  });

  describe('bad arguments', () => {
    const noop = (): void => undefined;
    const buf = Buffer.alloc(16);
    const cases: Array<[string, () => unknown, new (...a: never[]) => Error]> = [
      ['pread fd not a number', () => raw().pread!('3', buf, 0, 1, 0, noop), TypeError],
      ['pread negative fd', () => raw().pread!(-1, buf, 0, 1, 0, noop), RangeError],
      ['pread fractional offset', () => raw().pread!(0, buf, 0.5, 1, 0, noop), RangeError],
      ['pread NaN position', () => raw().pread!(0, buf, 0, 1, NaN, noop), RangeError],
      ['pread Infinity position', () => raw().pread!(0, buf, 0, 1, Infinity, noop), RangeError],
      ['pread beyond the buffer', () => raw().pread!(0, buf, 8, 9, 0, noop), RangeError],
      ['pread not a buffer', () => raw().pread!(0, 'abc', 0, 1, 0, noop), TypeError],
      ['pread no callback', () => raw().pread!(0, buf, 0, 1, 0), TypeError],
      ['pwrite sync not boolean', () => raw().pwrite!(0, buf, 0, 1, 0, 1, noop), TypeError],
      ['pwrite missing arguments', () => raw().pwrite!(), TypeError],
      ['pwritev not an array', () => raw().pwritev!(0, buf, 0, false, false, noop), TypeError],
      ['pwritev empty array', () => raw().pwritev!(0, [], 0, false, false, noop), RangeError],
      ['pwritev element not a buffer', () => raw().pwritev!(0, [buf, 7], 0, false, false, noop), TypeError],
      ['setNice above 19', () => raw().setNice!(20), RangeError],
      ['setNice not a number', () => raw().setNice!('0'), TypeError],
      ['pwritev writeback not boolean', () => raw().pwritev!(0, [buf], 0, false, 1, noop), TypeError],
      ['preadBatchCrc not arrays', () => raw().preadBatchCrc!(0, buf, [0], Buffer.alloc(4), noop), TypeError],
      ['preadBatchCrc count mismatch', () => raw().preadBatchCrc!(0, [Buffer.alloc(4096)], [0, 4096], Buffer.alloc(8), noop), RangeError],
      ['preadBatchCrc buffer under 4096 bytes', () => raw().preadBatchCrc!(0, [buf], [0], Buffer.alloc(4), noop), RangeError],
      ['preadBatchCrc negative position', () => raw().preadBatchCrc!(0, [Buffer.alloc(4096)], [-4096], Buffer.alloc(4), noop), RangeError],
      ['preadBatchCrc crcs too short', () => raw().preadBatchCrc!(0, [Buffer.alloc(4096)], [0], Buffer.alloc(3), noop), RangeError],
      ['preadBatchCrc element not a buffer', () => raw().preadBatchCrc!(0, ['x'], [0], Buffer.alloc(4), noop), TypeError],
      ['pwritevDirect not an array', () => raw().pwritevDirect!(0, buf, 0, noop), TypeError],
      ['pwritevDirect no callback', () => raw().pwritevDirect!(0, [Buffer.alloc(4096)], 0), TypeError],
      ['pwritevDirect unaligned position', () => raw().pwritevDirect!(0, [Buffer.alloc(4096)], 512, noop), RangeError],
      ['pwritevDirect unaligned total', () => raw().pwritevDirect!(0, [buf], 0, noop), RangeError],
      ['fallocate bad mode', () => raw().fallocate!(0, 7, 0, 1, noop), RangeError],
      ['fallocate zero length', () => raw().fallocate!(0, 1, 0, 0, noop), RangeError],
      ['seek bad whence', () => raw().seek!(0, 0, 0, noop), RangeError],
      ['mmap zero length', () => raw().mmap!(0, 0), RangeError],
      ['msync of a plain buffer', () => raw().msync!(buf, 0, 1, noop), TypeError],
      ['crc32c beyond the buffer', () => raw().crc32c!(buf, 10, 7, 0), RangeError],
      ['crc32c negative seed', () => raw().crc32c!(buf, 0, 1, -1), RangeError],
      ['crc32c seed too large', () => raw().crc32c!(buf, 0, 1, 2 ** 32), RangeError],
      ['xorInto length too long', () => raw().xorInto!(buf, Buffer.alloc(8), 9), RangeError],
      ['xorInto src not a buffer', () => raw().xorInto!(buf, null, 1), TypeError],
      ['pqGen data not an array', () => raw().pqGen!(buf, buf, buf), TypeError],
      ['pqGen no columns', () => raw().pqGen!([], buf, Buffer.alloc(16)), RangeError],
      ['pqGen too many columns', () => raw().pqGen!(Array.from({ length: 254 }, () => buf), buf, Buffer.alloc(16)), RangeError],
      ['pqGen column length differs', () => raw().pqGen!([buf, Buffer.alloc(15)], Buffer.alloc(16), Buffer.alloc(16)), RangeError],
      ['pqGen q length differs', () => raw().pqGen!([buf], Buffer.alloc(16), Buffer.alloc(8)), RangeError],
      ['pqGen column not a buffer', () => raw().pqGen!([buf, {}], Buffer.alloc(16), Buffer.alloc(16)), TypeError],
      ['flockExclusive string', () => raw().flockExclusive!('x'), TypeError],
      ['recachePages negative length', () => raw().recachePages!(0, -1, noop), RangeError],
      ['recachePages fd not a number', () => raw().recachePages!('0', 4096, noop), TypeError],
      ['recachePages no callback', () => raw().recachePages!(0, 4096), TypeError],
      ['lowerPriority negative', () => raw().lowerPriority!(-1), RangeError],
      ['lowerPriority over 19', () => raw().lowerPriority!(20), RangeError],
      ['lowerPriority not a number', () => raw().lowerPriority!('5'), TypeError],
    ];
    for (const [name, call, type] of cases) {
      it(`throws ${type.name} for ${name}`, () => {
        assert.throws(call, type);
      });
    }

    it('the TypeScript wrappers reject bad ranges before native code runs', () => {
      assert.throws(() => native.pread(0, buf, 0, 17, 0), RangeError);
      assert.throws(() => native.pwritev(0, [], 0, false), RangeError);
      assert.throws(() => native.fallocate(0, 9, 0, 1), RangeError);
      assert.throws(() => native.msync(buf, 10, 10), RangeError);
      assert.throws(() => native.recachePages(0, -4096), RangeError);
      assert.throws(() => native.pqGen([buf], buf, Buffer.alloc(3)), RangeError);
    });
  });
});
