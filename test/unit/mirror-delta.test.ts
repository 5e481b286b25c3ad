/** delta.ts: encode/apply round-trips for any pair of blocks, and malformed deltas are refused, never applied wrongly. */
import { strict as assert } from 'assert';
import * as fc from 'fast-check';
import { applyDelta, applyDeltaInPlace, encodeDelta, encodeDeltaJs, encodeDeltaRuns, DELTA_MAX_BYTES } from '../../src/mirror/delta';
import { FANOUT, encodePtr, nodeEditRuns, ptrSlotOffset, writeNodeHeader } from '../../src/tree/layout';
import { deltaEncode } from '../../src/io/native';

const SEED = Number(process.env.MIRROR_FC_SEED ?? Date.now() % 1_000_000);

describe('mirror block deltas', () => {
  before(() => process.stdout.write(`      (fast-check seed ${SEED}; MIRROR_FC_SEED=${SEED} replays)\n`));

  it('apply(prev, encode(prev, next)) is next for any edits, and the delta is small when few words change', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 4096, maxLength: 4096 }), fc.array(fc.record({ at: fc.nat(4095), v: fc.nat(255) }), { maxLength: 200 }), (p, edits) => {
        const prev = Buffer.from(p);
        const next = Buffer.from(prev);
        for (const e of edits) next[e.at] = e.v;
        const d = encodeDelta(prev, next);
        if (d === undefined) {
          assert.ok(edits.length > 20, 'a handful of edits must fit a delta');
          return;
        }
        assert.ok(d.length <= DELTA_MAX_BYTES);
        const out = applyDelta(prev, d);
        assert.ok(Buffer.isBuffer(out) && out.equals(next));
        if (prev.equals(next)) assert.equal(d.length, 0);
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('the native encoder writes exactly what the TypeScript one does (runs, bridges, the size limit), and apply in place rebuilds next', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 4096, maxLength: 4096 }),
        // Clustered word edits (runs, single-word gaps that bridge, far-apart runs) and a few stray bytes.
        fc.array(fc.record({ word: fc.nat(511), words: fc.integer({ min: 1, max: 12 }), gap: fc.nat(2) }), { maxLength: 40 }),
        fc.array(fc.record({ at: fc.nat(4095), v: fc.nat(255) }), { maxLength: 10 }),
        (p, runs, bytes) => {
          const prev = Buffer.from(p);
          const next = Buffer.from(prev);
          for (const r of runs) {
            for (let w = r.word; w < Math.min(512, r.word + r.words); w += 1 + (r.gap === 2 ? 1 : 0)) next[w * 8 + (r.gap % 8)] = (next[w * 8 + (r.gap % 8)] ?? 0) ^ 0xa5;
          }
          for (const e of bytes) next[e.at] = e.v;
          const js = encodeDeltaJs(prev, next);
          const native = encodeDelta(prev, next);
          assert.deepEqual(native, js);
          if (native !== undefined) {
            const out = Buffer.from(prev);
            assert.equal(applyDeltaInPlace(out, native), undefined);
            assert.ok(out.equals(next));
          }
        },
      ),
      { seed: SEED, numRuns: 400 },
    );
    // At the limit: one run of the most words that fit DELTA_MAX_BYTES, then one word more.
    const prev = Buffer.alloc(4096);
    const fits = Buffer.from(prev);
    const words = Math.floor((DELTA_MAX_BYTES - 4) / 8);
    fits.fill(1, 0, words * 8);
    assert.equal(encodeDelta(prev, fits)!.length, 4 + words * 8);
    assert.deepEqual(encodeDelta(prev, fits), encodeDeltaJs(prev, fits));
    fits.fill(1, 0, (words + 1) * 8);
    assert.equal(encodeDelta(prev, fits), undefined);
    assert.equal(encodeDeltaJs(prev, fits), undefined);
    // The addon re-checks its arguments and never writes past out.
    assert.throws(() => deltaEncode(Buffer.alloc(100), Buffer.alloc(4096), Buffer.alloc(10)), /4096/);
    assert.throws(() => deltaEncode('x' as unknown as Buffer, Buffer.alloc(4096), Buffer.alloc(10)), TypeError);
    const small = Buffer.alloc(16, 0xee);
    const far = Buffer.from(prev);
    far.fill(7, 0, 64);
    assert.equal(deltaEncode(prev, far, small.subarray(0, 8)), -1);
    assert.ok(small.subarray(8).every((b) => b === 0xee));
  });

  it('a header and one pointer changed cost a few dozen bytes', () => {
    const prev = Buffer.alloc(4096, 0x11);
    const next = Buffer.from(prev);
    next.writeUInt32LE(1234, 24); // own address
    next.writeUInt32LE(99, 32); // birth
    next.fill(0x22, 64 + 24 * 7, 64 + 24 * 8); // one pointer
    const d = encodeDelta(prev, next)!;
    assert.ok(d.length <= 64, `${d.length} bytes`);
    assert.ok((applyDelta(prev, d) as Buffer).equals(next));
  });

  it('a node edited at some slots: the delta from the edit\'s word runs (no old contents) rebuilds it from the old version', () => {
    const uuid = Buffer.alloc(16, 0x5a);
    const id = { type: 1, level: 0, index: 77 };
    fc.assert(
      fc.property(
        fc.array(fc.record({ slot: fc.nat(FANOUT - 1), pba: fc.integer({ min: 8, max: 2 ** 40 }), crc: fc.nat(), empty: fc.boolean() }), { maxLength: 90 }),
        fc.array(fc.record({ slot: fc.nat(FANOUT - 1), pba: fc.integer({ min: 8, max: 2 ** 40 }), crc: fc.nat() }), { maxLength: 60 }),
        (edits, before) => {
          const old = Buffer.alloc(4096);
          for (const b of before) encodePtr(old, ptrSlotOffset(b.slot), { pba: b.pba, birth: 3, crc: b.crc });
          writeNodeHeader(old, id, 1000, 3, uuid);
          const next = Buffer.from(old);
          for (const e of edits) encodePtr(next, ptrSlotOffset(e.slot), e.empty ? null : { pba: e.pba, birth: 4, crc: e.crc });
          writeNodeHeader(next, id, 2000, 4, uuid);
          const runs = nodeEditRuns(edits.map((e) => e.slot));
          for (let i = 2; i < runs.length; i += 2) assert.ok(runs[i]! > runs[i - 2]! + runs[i - 1]! - 1, 'increasing, not overlapping');
          const d = encodeDeltaRuns(next, runs);
          if (d === undefined) {
            assert.ok(edits.length > 50, 'a few dozen slots fit a delta');
            return;
          }
          const out = applyDelta(old, d);
          assert.ok(Buffer.isBuffer(out) && out.equals(next), 'rebuilt exactly');
          // At most a run header and a whole slot more per edited slot than comparing the blocks gives.
          const compared = encodeDelta(old, next);
          if (compared) assert.ok(d.length <= compared.length + 28 * new Set(edits.map((e) => e.slot)).size, `${d.length} vs ${compared.length}`);
        },
      ),
      { seed: SEED, numRuns: 200 },
    );
    assert.throws(() => encodeDeltaRuns(Buffer.alloc(4096), [3, 1, 2, 1]), /out of order/);
    assert.throws(() => encodeDeltaRuns(Buffer.alloc(4096), [510, 3]), /out of the block/);
    assert.throws(() => encodeDeltaRuns(Buffer.alloc(4096), [1]), /pairs/);
  });

  it('malformed deltas are refused with a reason: truncated, out of order, out of the block, zero-length runs', () => {
    const prev = Buffer.alloc(4096);
    const run = (first: number, count: number, bytes = count * 8): Buffer => {
      const h = Buffer.alloc(4 + bytes);
      h.writeUInt16LE(first, 0);
      h.writeUInt16LE(count, 2);
      return h;
    };
    assert.match(applyDelta(prev, Buffer.from([1, 0])) as string, /truncated run header/);
    assert.match(applyDelta(prev, run(3, 2, 8)) as string, /truncated run/);
    assert.match(applyDelta(prev, run(510, 3)) as string, /out of the block/);
    assert.match(applyDelta(prev, run(0, 0)) as string, /out of order or out of the block/);
    assert.match(applyDelta(prev, Buffer.concat([run(10, 1), run(5, 1)])) as string, /out of order/);
    assert.match(applyDelta(Buffer.alloc(100), Buffer.alloc(0)) as string, /not 4 KiB/);
  });
});
