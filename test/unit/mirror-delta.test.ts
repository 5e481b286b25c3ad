/** delta.ts: encode/apply round-trips for any pair of blocks, and malformed deltas are refused, never applied wrongly. */
import { strict as assert } from 'assert';
import * as fc from 'fast-check';
import { applyDelta, encodeDelta, DELTA_MAX_BYTES } from '../../src/mirror/delta';

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
