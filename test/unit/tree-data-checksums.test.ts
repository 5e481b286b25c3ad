/**
 * tree/data-checksums: a CP's data blocks checksummed in runs of adjacent views give the
 * same crc32c per block as one call per block, and exactly the all-zero blocks become
 * holes (also inside a run, and a block whose crc is the zero block's but whose bytes are
 * not zero could not exist unnoticed: the byte compare decides).
 */
import { strict as assert } from 'assert';
import { crc32c } from '../../src/io/checksum';
import { CRC_RUN_BLOCKS_MAX, ZERO_BLOCK_CRC, checksumRun, crcScratch } from '../../src/tree/data-checksums';

const B = 4096;

function blockAt(mem: Buffer, i: number): Buffer {
  return mem.subarray(i * B, (i + 1) * B);
}

function runAll(datas: (Buffer | null)[]): { crcs: number[]; calls: number } {
  const crcs = new Array<number>(datas.length).fill(0);
  const scratch = crcScratch();
  let calls = 0;
  for (let i = 0; i < datas.length; ) {
    const next = checksumRun(datas, i, crcs, scratch);
    assert.ok(next > i, 'checksumRun made progress');
    i = next;
    calls++;
  }
  return { crcs, calls };
}

describe('tree: data block checksums in runs', () => {
  it('adjacent views: one run per 256 blocks, each crc equal to its own crc32c; zero blocks inside a run become holes', () => {
    const n = 600;
    const mem = Buffer.alloc(n * B);
    for (let i = 0; i < n; i++) if (i % 7 !== 3) mem.fill((i * 13 + 1) & 0xff, i * B, i * B + 100).writeUInt32LE(i, i * B + 200);
    const datas: (Buffer | null)[] = [];
    for (let i = 0; i < n; i++) datas.push(blockAt(mem, i));
    const want = datas.map((d) => crc32c(d!));
    const { crcs, calls } = runAll(datas);
    assert.equal(calls, Math.ceil(n / CRC_RUN_BLOCKS_MAX));
    for (let i = 0; i < n; i++) {
      if (i % 7 === 3) {
        assert.equal(datas[i], null, `block ${i} (zeroes) is a hole`);
        assert.equal(want[i], ZERO_BLOCK_CRC);
      } else {
        assert.ok(datas[i] !== null, `block ${i} kept`);
        assert.equal(crcs[i], want[i], `crc of block ${i}`);
      }
    }
  });

  it('views that are not back to back (other memory, a gap, out of order, nulls) are checksummed one by one', () => {
    const a = Buffer.alloc(4 * B, 0x11);
    const b = Buffer.alloc(2 * B, 0x22);
    a.writeUInt32LE(7, B); // blocks differ
    const datas: (Buffer | null)[] = [blockAt(a, 0), blockAt(a, 2), blockAt(a, 1), null, blockAt(b, 0), blockAt(a, 3), blockAt(b, 1)];
    const want = datas.map((d) => (d === null ? 0 : crc32c(d)));
    const { crcs, calls } = runAll(datas);
    assert.equal(calls, datas.length);
    for (let i = 0; i < datas.length; i++) assert.equal(crcs[i], want[i], `crc of block ${i}`);
  });

  it('a lone zero block and a run of only zero blocks become holes', () => {
    const mem = Buffer.alloc(5 * B);
    const lone = Buffer.alloc(B);
    const datas: (Buffer | null)[] = [lone, ...[0, 1, 2, 3, 4].map((i) => blockAt(mem, i))];
    runAll(datas);
    assert.deepEqual(datas, [null, null, null, null, null, null]);
  });

  it('known checksums are taken as given (the block is not read for them), in runs of their own; a known zero-block crc still needs zero bytes to make a hole', () => {
    const mem = Buffer.alloc(6 * B, 0x5a);
    mem.fill(0, 2 * B, 3 * B); // block 2: zeroes
    mem.fill(0, 4 * B, 5 * B); // block 4: zeroes, its crc not known
    const datas: (Buffer | null)[] = [0, 1, 2, 3, 4, 5].map((i) => blockAt(mem, i));
    const zeroCrc = ZERO_BLOCK_CRC;
    // Known: 0 (a deliberately wrong value, to show it is not recomputed), 1, 2 (zeroes) and 3
    // (the zero block's crc over bytes that are not zero: kept, the compare decides); 4 and 5 unknown.
    const known: (number | undefined)[] = [0x1234, crc32c(datas[1]!), zeroCrc, zeroCrc, undefined, undefined];
    const crcs = new Array<number>(datas.length).fill(0);
    const scratch = crcScratch();
    const stops: number[] = [];
    for (let i = 0; i < datas.length; ) {
      i = checksumRun(datas, i, crcs, scratch, known);
      stops.push(i);
    }
    assert.deepEqual(stops, [4, 6], 'one run of known checksums, then one of computed ones');
    assert.equal(crcs[0], 0x1234, 'a known crc is not recomputed');
    assert.equal(crcs[1], crc32c(blockAt(mem, 1)));
    assert.equal(datas[2], null, 'a known zero block becomes a hole');
    assert.ok(datas[3] !== null, 'the zero crc alone makes no hole');
    assert.equal(datas[4], null, 'an unknown zero block becomes a hole');
    assert.equal(crcs[5], crc32c(blockAt(mem, 5)));
  });

  it('refuses a scratch Buffer too small for a run', () => {
    assert.throws(() => checksumRun([Buffer.alloc(B)], 0, [0], Buffer.alloc(16)), /scratch/);
  });
});
