/**
 * The space map's bitmap helpers: the same results as the plain byte loops and fill(0), and
 * they write only the words that change; and the space map's per-CP passes visit only the
 * leaves that may hold bits, so a mostly-zero bitmap stays mostly unbacked memory (a 1 TiB
 * device's five bitmaps are 32 MiB each; passes over the two reserved ones every CP made
 * 64 MiB resident: on this kernel even reads of untouched pages count).
 */
import { strict as assert } from 'assert';
import fc from 'fast-check';
import { clearSetWords, moveInto, orInto, setBit } from '../../src/util/bitmap';
import { SpaceMap } from '../../src/tree/spacemap';
import { BITS_PER_LEAF, BLOCK } from '../../src/tree/layout';

const MIB = 1024 * 1024;

function rssBytes(): number {
  return process.memoryUsage().rss;
}

describe('util: bitmap helpers', () => {
  it('orInto, moveInto and clearSetWords match byte loops and fill(0) (property, odd offsets and lengths too)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 300 }), fc.uint8Array({ minLength: 0, maxLength: 300 }), fc.nat(3), fc.nat(300), fc.nat(300), (a, b, skew, s, e) => {
        const n = Math.min(a.length, b.length);
        // Views at byte offset `skew` into a larger buffer: the word path and the byte path both run.
        const dst = Buffer.alloc(n + skew).subarray(skew);
        Buffer.from(a.subarray(0, n)).copy(dst);
        const src = Buffer.alloc(n + skew).subarray(skew);
        Buffer.from(b.subarray(0, n)).copy(src);
        const want = Buffer.from(dst.map((v, i) => v | src[i]!));
        const d1 = Buffer.from(dst);
        orInto(d1, src);
        assert.deepEqual(d1, want);
        const d2 = Buffer.from(dst);
        const s2 = Buffer.from(src);
        moveInto(d2, s2);
        assert.deepEqual(d2, want);
        assert.ok(s2.every((v) => v === 0));
        const start = Math.min(s, n);
        const end = Math.max(start, Math.min(e, n));
        const c = Buffer.alloc(n + skew).subarray(skew);
        Buffer.from(a.subarray(0, n)).copy(c);
        const expect = Buffer.from(c).fill(0, start, end);
        clearSetWords(c, start, end);
        assert.deepEqual(c, expect);
      }),
      { seed: 20261204, numRuns: 300 },
    );
  });

  it('SpaceMap.runsOf with leaf marks finds the same runs, and reads only the marked leaves (RSS; a full scan is the negative control)', () => {
    // 64 MiB (a 2 TiB device): over glibc's largest mmap threshold (32 MiB), so calloc gets
    // fresh, untouched pages, never recycled ones that are resident already.
    const leaves = 16384;
    const size = leaves * BLOCK;
    // Whether this kernel counts reads of untouched pages in RSS (it maps the shared zero
    // page on some; on this one reads make the pages resident): measured, not assumed.
    const probe = Buffer.alloc(size);
    const p0 = rssBytes();
    let sum = 0;
    for (let i = 0; i < size; i += 4096) sum += probe[i]!;
    const readsCount = rssBytes() - p0 > size / 2;
    assert.equal(sum, 0);
    const b = Buffer.alloc(size);
    const marks = new Uint8Array(leaves);
    const bits = [5, 6, 7, BITS_PER_LEAF - 1, BITS_PER_LEAF, 1000 * BITS_PER_LEAF + 3, (leaves - 1) * BITS_PER_LEAF + 17];
    for (const p of bits) {
      setBit(b, p);
      marks[Math.floor(p / BITS_PER_LEAF)] = 1;
    }
    marks[4000] = 1; // a marked leaf may be empty
    const before = rssBytes();
    const runs = SpaceMap.runsOf(b, marks);
    const grew = rssBytes() - before;
    assert.deepEqual(runs, [{ pba: 5, count: 3 }, { pba: BITS_PER_LEAF - 1, count: 2 }, { pba: 1000 * BITS_PER_LEAF + 3, count: 1 }, { pba: (leaves - 1) * BITS_PER_LEAF + 17, count: 1 }]);
    assert.ok(grew < 4 * MIB, `RSS grew ${(grew / MIB).toFixed(1)} MiB reading 5 marked leaves`);
    const mid = rssBytes();
    assert.deepEqual(SpaceMap.runsOf(b), runs);
    const full = rssBytes() - mid;
    // The control: where reads count, the unmarked scan makes the bitmap resident.
    if (readsCount) assert.ok(full > size / 2, `a full scan grew RSS by only ${(full / MIB).toFixed(1)} MiB`);
  });
});
