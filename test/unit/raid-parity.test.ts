/**
 * RAID parity (src/raid/parity.ts, native/parity.cc) against the reference
 * (src/raid/parity-ref.ts): the vector in engine-notes.md, every single and double erasure
 * for 2..16 data columns (seeded property test), sync vs async, and bad arguments.
 */
import { strict as assert } from 'assert';
import * as fc from 'fast-check';
import * as parity from '../../src/raid/parity';
import * as ref from '../../src/raid/parity-ref';

const SEED = Number(process.env.PARITY_FC_SEED ?? Date.now() % 1_000_000);

/** engine-notes.md "Double parity": 4 data columns, D_i[j] = (i*0x1f + j*7 + 1) & 0xff. */
const VECTOR_P = Buffer.from([0x40, 0x0c, 0x00, 0x04, 0x00, 0x84, 0x80, 0x9c]);
const VECTOR_Q = Buffer.from([0x77, 0x4c, 0x3d, 0x8e, 0xe3, 0x4b, 0x32, 0x41]);

function vectorData(length: number): Buffer[] {
  return [0, 1, 2, 3].map((i) => {
    const b = Buffer.alloc(length);
    for (let j = 0; j < length; j++) b[j] = (i * 0x1f + j * 7 + 1) & 0xff;
    return b;
  });
}

/** Deterministic column contents from a seed (xorshift32), so a failure replays from its seed. */
function columnsFrom(seed: number, count: number, length: number): Buffer[] {
  let s = seed >>> 0 || 1;
  return Array.from({ length: count }, () => {
    const b = Buffer.alloc(length);
    for (let j = 0; j < length; j++) {
      s ^= s << 13;
      s >>>= 0;
      s ^= s >>> 17;
      s ^= s << 5;
      s >>>= 0;
      b[j] = s & 0xff;
    }
    return b;
  });
}

/** Every set of 1..maxLost distinct column indexes out of n. */
function erasures(n: number, maxLost: number): number[][] {
  const out: number[][] = [];
  for (let x = 0; x < n; x++) {
    out.push([x]);
    if (maxLost >= 2) for (let y = x + 1; y < n; y++) out.push([x, y], [y, x]);
  }
  return out;
}

const garbage = (length: number): Buffer => Buffer.alloc(length, 0xa5);

describe('RAID parity', () => {
  before(() => process.stdout.write(`      (fast-check seed ${SEED}; PARITY_FC_SEED=${SEED} replays)\n`));

  describe('the engine-notes.md vector', () => {
    it('reference P and Q match the vector and its field checks', () => {
      assert.equal(ref.gfPow2(8), 0x1d);
      assert.equal(ref.gfInv(2), 0x8e);
      const data = vectorData(64);
      const p = Buffer.alloc(64);
      const q = Buffer.alloc(64);
      ref.computePQ(data, p, q);
      assert.deepEqual(p.subarray(0, 8), VECTOR_P);
      assert.deepEqual(q.subarray(0, 8), VECTOR_Q);
    });

    it('computePQ and computePQAsync match the vector, computeP the vector P', async () => {
      const data = vectorData(256);
      const p = garbage(256);
      const q = garbage(256);
      parity.computePQ(data, p, q);
      assert.deepEqual(p.subarray(0, 8), VECTOR_P);
      assert.deepEqual(q.subarray(0, 8), VECTOR_Q);
      const pa = garbage(256);
      const qa = garbage(256);
      await parity.computePQAsync(data, pa, qa);
      assert.ok(pa.equals(p) && qa.equals(q));
      const p1 = garbage(256);
      parity.computeP(data, p1);
      assert.ok(p1.equals(p));
    });
  });

  describe('property: every single and double erasure reconstructs exactly', () => {
    it('P+Q, k = 2..16: native equals reference, sync equals async, every erasure rebuilds', async () => {
      await fc.assert(
        fc.asyncProperty(fc.integer({ min: 2, max: 16 }), fc.integer({ min: 1, max: 4 }), fc.nat(), async (k, units, contentSeed) => {
          const length = units * parity.PARITY_ALIGN_BYTES;
          const data = columnsFrom(contentSeed, k, length);
          const p = garbage(length);
          const q = garbage(length);
          parity.computePQ(data, p, q);
          const rp = Buffer.alloc(length);
          const rq = Buffer.alloc(length);
          ref.computePQ(data, rp, rq);
          assert.ok(p.equals(rp) && q.equals(rq), `computePQ differs from the reference (k ${k}, seed ${contentSeed})`);
          const ap = garbage(length);
          const aq = garbage(length);
          await parity.computePQAsync(data, ap, aq);
          assert.ok(ap.equals(p) && aq.equals(q), 'computePQAsync differs from computePQ');
          const pOnly = garbage(length);
          parity.computeP(data, pOnly);
          assert.ok(pOnly.equals(p), 'computeP differs from computePQ');
          const pOnlyAsync = garbage(length);
          await parity.computePAsync(data, pOnlyAsync);
          assert.ok(pOnlyAsync.equals(p), 'computePAsync differs from computeP');

          const good = [...data, p, q];
          for (const lost of erasures(k + 2, 2)) {
            const cols = good.map((b) => Buffer.from(b));
            for (const i of lost) cols[i]!.fill(0x5a);
            const refCols = cols.map((b) => Buffer.from(b));
            const asyncCols = cols.map((b) => Buffer.from(b));
            parity.reconstruct(cols, lost, 2);
            ref.reconstruct(refCols, lost, 2);
            await parity.reconstructAsync(asyncCols, lost, 2);
            cols.forEach((b, i) => {
              assert.ok(b.equals(good[i]!), `reconstruct of [${lost}] differs at column ${i} (k ${k}, seed ${contentSeed})`);
              assert.ok(refCols[i]!.equals(good[i]!), `reference reconstruct of [${lost}] differs at column ${i}`);
              assert.ok(asyncCols[i]!.equals(good[i]!), `reconstructAsync of [${lost}] differs at column ${i}`);
            });
          }
        }),
        { seed: SEED, numRuns: 40 },
      );
    });

    it('P only, k = 2..16: every single erasure rebuilds, sync and async', async () => {
      await fc.assert(
        fc.asyncProperty(fc.integer({ min: 2, max: 16 }), fc.integer({ min: 1, max: 4 }), fc.nat(), async (k, units, contentSeed) => {
          const length = units * parity.PARITY_ALIGN_BYTES;
          const data = columnsFrom(contentSeed, k, length);
          const p = garbage(length);
          parity.computeP(data, p);
          const good = [...data, p];
          for (const lost of erasures(k + 1, 1)) {
            const cols = good.map((b) => Buffer.from(b));
            cols[lost[0]!]!.fill(0x5a);
            const asyncCols = cols.map((b) => Buffer.from(b));
            const refCols = cols.map((b) => Buffer.from(b));
            parity.reconstruct(cols, lost, 1);
            await parity.reconstructAsync(asyncCols, lost, 1);
            ref.reconstruct(refCols, lost, 1);
            cols.forEach((b, i) => {
              assert.ok(b.equals(good[i]!), `reconstruct of [${lost}] differs at column ${i} (k ${k}, seed ${contentSeed})`);
              assert.ok(asyncCols[i]!.equals(good[i]!), `reconstructAsync of [${lost}] differs at column ${i}`);
              assert.ok(refCols[i]!.equals(good[i]!), `reference reconstruct of [${lost}] differs at column ${i}`);
            });
          }
        }),
        { seed: SEED, numRuns: 40 },
      );
    });
  });
});
