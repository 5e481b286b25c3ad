/**
 * The stripe journal (src/raid/stripe-journal.ts) closes the write hole of partial
 * stripes (a mirror destination's CPs): a RAID-5 and a RAID-6 device over recorded memory
 * members and a recorded journal write partial stripes next to live blocks; at every
 * point of the recorded I/O a power loss is taken (nothing, everything, prefixes, and
 * seeded random subsets with torn sectors of what was not yet durable); each state is
 * opened, its journal replayed, and then every live block reads right, every stripe's
 * parity matches its data, and every live block still reads right with any one member
 * (RAID-6: any two) lost. Without the journal the same states leave stale parity.
 * Also: a journal whose batch is not whole replays nothing; one of another geometry is
 * refused with one line.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { IoRecorder, RecordingBlockDevice, buildState, crashPoint, emptyImage, imageBlocks, prefixChoices, randomChoices, type UnitChoice } from '../../src/io/recording';
import { RaidGeometry, type RaidLevel } from '../../src/raid/geometry';
import { RaidDevice, type RaidMemberSpec } from '../../src/raid/raid-device';
import { StripeJournal, StripeJournalError, type JournalGeometry } from '../../src/raid/stripe-journal';
import * as ref from '../../src/raid/parity-ref';
import { SeededRandom } from '../../src/sim/random';

const B = 4096;
const UUID = '11111111-2222-4333-8444-555555555555';
const UNIT_BYTES = 16 * 1024; // 4-block units
const STRIPES = 8;
const MEMBER_BLOCKS = 16 + 4 * STRIPES;
const HEAD = 8;
const JOURNAL_BLOCKS = 2 + 120;
const SEED = Number(process.env.NVMIRROR_SEED ?? 9001);

function jg(g: RaidGeometry): JournalGeometry {
  return { level: g.level, members: g.members, unitBlocks: g.unitBlocks, stripes: g.stripes, columns: g.dataMembers + g.parityMembers };
}

function block(tag: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(tag + i, 2654435761) ^ 0x5bd1e995) >>> 0, i);
  return b;
}

function copyDev(src: MemoryBlockDevice): MemoryBlockDevice {
  const d = new MemoryBlockDevice(src.blockCount);
  for (let p = 0; p < src.blockCount; p++) if (src.peekBlock(p).some((x) => x !== 0)) void d.writeBlocks(p, src.peekBlock(p));
  return d;
}

async function open(g: RaidGeometry, mems: (MemoryBlockDevice | RecordingBlockDevice | null)[], journal?: StripeJournal, pendingBytesMax?: number): Promise<RaidDevice> {
  const members: RaidMemberSpec[] = mems.map((d, i) => (d === null ? { name: `m${i}`, dev: null, missingReason: 'lost by the test' } : { name: `m${i}`, dev: d }));
  return new RaidDevice({ geometry: g, volumeUuid: UUID, generation: 1, members, ...(journal ? { journal } : {}), ...(pendingBytesMax !== undefined ? { pendingBytesMax } : {}) });
}

/** Stripes whose parity on the members does not match their data. */
function staleStripes(g: RaidGeometry, mems: MemoryBlockDevice[]): number[] {
  const bad: number[] = [];
  for (let s = 0; s < g.stripes; s++) {
    const start = g.unitStart(s);
    const col = (m: number): Buffer => Buffer.concat(Array.from({ length: g.unitBlocks }, (_, k) => mems[m]!.peekBlock(start + k)));
    const data: Buffer[] = [];
    for (let c = 0; c < g.dataMembers; c++) data.push(col(g.dataMember(s, c)));
    if (s * g.stripeDataBlocks < HEAD) data[0]!.fill(0, 0, Math.min(g.unitBlocks, HEAD - s * g.stripeDataBlocks) * B);
    const p = Buffer.alloc(g.unitBlocks * B);
    const q = Buffer.alloc(g.unitBlocks * B);
    if (g.parityMembers === 2) ref.computePQ(data, p, q);
    else ref.computeP(data, p);
    if (!col(g.pMember(s)).equals(p) || (g.parityMembers === 2 && !col(g.qMember(s)).equals(q))) bad.push(s);
  }
  return bad;
}

interface Scenario {
  g: RaidGeometry;
  base: MemoryBlockDevice[];
  baseJournal: MemoryBlockDevice;
  live: Map<number, Buffer>;
  recorder: IoRecorder;
}

/** Live blocks (the committed image) in every stripe, then a recorded "CP" that writes free blocks of those stripes partially. */
async function scenario(level: RaidLevel, n: number, useJournal: boolean, bufferStripes?: number): Promise<Scenario> {
  const g = new RaidGeometry(level, n, UNIT_BYTES, MEMBER_BLOCKS, HEAD);
  const W = g.stripeDataBlocks;
  const mems = Array.from({ length: n }, () => new MemoryBlockDevice(MEMBER_BLOCKS));
  const jdev = new MemoryBlockDevice(JOURNAL_BLOCKS);
  const live = new Map<number, Buffer>();
  {
    const raid = await open(g, mems, await StripeJournal.open(jdev, jg(g)));
    // Every other block of every stripe is live (whole stripes at once: the committed image).
    for (let s = 1; s < g.stripes; s++) {
      const buf = Buffer.alloc(W * B);
      for (let q = 0; q < W; q += 2) {
        const b = block(s * 1000 + q);
        b.copy(buf, q * B);
        live.set(s * W + q, b);
      }
      await raid.writeBlocks(s * W, buf);
    }
    await raid.sync();
    assert.deepEqual(staleStripes(g, mems), []);
  }
  const base = mems.map(copyDev);
  const baseJournal = copyDev(jdev);
  const recorder = new IoRecorder();
  const rec = base.map((d, i) => new RecordingBlockDevice(copyDev(d), recorder, `m${i}`));
  const rj = new RecordingBlockDevice(copyDev(baseJournal), recorder, 'journal');
  const raid = await open(g, rec, useJournal ? await StripeJournal.open(rj, jg(g)) : undefined, bufferStripes === undefined ? undefined : bufferStripes * W * B);
  // The CP: single free blocks and short runs in stripes 1..6 (never a whole stripe).
  const rnd = new SeededRandom(SEED + level);
  for (let s = 1; s <= 6; s++) {
    const q = 1 + 2 * Math.floor(rnd.next() * (W / 2 - 1));
    await raid.writeBlocks(s * W + q, block(777 + s));
    if (s % 2 === 0) await raid.writeBlocks(s * W + ((q + 4) % W | 1), block(888 + s));
  }
  await raid.sync();
  assert.ok(raid.health().stripeWrites.readModifyWrite >= 6, 'the CP wrote its stripes by read-modify-write');
  if (useJournal) assert.ok((raid.health().journal?.batches ?? 0) >= (bufferStripes === undefined ? 1 : 2), `journal batches: ${JSON.stringify(raid.health().journal)}`);
  return { g, base, baseJournal, live, recorder };
}

/** Every crash state of the scenario: each is handed to check(). Returns the states checked and how many replayed a batch. */
async function everyState(sc: Scenario, useJournal: boolean, check: (mems: MemoryBlockDevice[], replayed: number, what: string) => Promise<void>): Promise<{ states: number; replays: number }> {
  const events = sc.recorder.events;
  const baseImg = emptyImage();
  const rnd = new SeededRandom(SEED);
  let states = 0;
  let replays = 0;
  for (let i = 0; i <= events.length; i++) {
    const cp = crashPoint(baseImg, events, i);
    const choices: { what: string; c: UnitChoice[] }[] = [
      { what: 'nothing pending', c: prefixChoices(cp, 0) },
      { what: 'everything', c: prefixChoices(cp, cp.order.length) },
      { what: 'half', c: prefixChoices(cp, Math.floor(cp.order.length / 2)) },
    ];
    for (let k = 0; k < 3 && cp.pending.length > 0; k++) choices.push({ what: `random ${k}`, c: randomChoices(cp, () => rnd.next()) });
    for (const ch of choices) {
      const img = buildState(cp, ch.c);
      const mems = sc.base.map((d, m) => {
        const out = copyDev(d);
        for (const [p, b] of imageBlocks(img, `m${m}`)) void out.writeBlocks(p, b);
        return out;
      });
      const jdev = copyDev(sc.baseJournal);
      for (const [p, b] of imageBlocks(img, 'journal')) void jdev.writeBlocks(p, b);
      let replayed = 0;
      if (useJournal) {
        const raid = await open(sc.g, mems, await StripeJournal.open(jdev, jg(sc.g)));
        replayed = await raid.replayJournal();
      }
      if (replayed > 0) replays++;
      states++;
      await check(mems, replayed, `crash after event ${i}/${events.length} (${events[i - 1]?.kind ?? 'start'} ${events[i - 1] && 'device' in events[i - 1]! ? events[i - 1]!.device : ''}), ${ch.what} of the pending writes`);
    }
  }
  return { states, replays };
}

async function readsLive(g: RaidGeometry, mems: (MemoryBlockDevice | null)[], live: Map<number, Buffer>, what: string): Promise<void> {
  const raid = await open(g, mems);
  const b = Buffer.alloc(B);
  for (const [p, want] of live) {
    try {
      await raid.readBlocks(p, 1, b);
    } catch (e) {
      assert.fail(`${what}: live block ${p} unreadable: ${(e as Error).message}`);
    }
    if (!b.equals(want)) assert.fail(`${what}: live block ${p} reads wrong`);
  }
}

describe('raid stripe journal', function () {
  this.timeout(120_000);
  const cases: [RaidLevel, number, number | undefined][] = [[5, 4, undefined], [6, 5, undefined], [5, 4, 2]];
  for (const [level, n, bufferStripes] of cases) {
    const buffer = bufferStripes === undefined ? '' : `, a write-back buffer of ${bufferStripes} stripes (batches flushed as it fills)`;
    it(`RAID-${level} x${n}${buffer}: a power loss at any point of partial-stripe writes leaves parity consistent and live blocks readable with members lost, after replay (seed ${SEED})`, async () => {
      const sc = await scenario(level, n, true, bufferStripes);
      const r = await everyState(sc, true, async (mems, _replayed, what) => {
        assert.deepEqual(staleStripes(sc.g, mems), [], `${what}: stripes with stale parity`);
        await readsLive(sc.g, mems, sc.live, what);
        for (let a = 0; a < n; a++) {
          await readsLive(sc.g, mems.map((d, i) => (i === a ? null : d)), sc.live, `${what}, member ${a} lost`);
          if (level === 6) for (let c = a + 1; c < n; c++) await readsLive(sc.g, mems.map((d, i) => (i === a || i === c ? null : d)), sc.live, `${what}, members ${a} and ${c} lost`);
        }
      });
      assert.ok(r.states > 50, `only ${r.states} crash states`);
      assert.ok(r.replays > 5, `only ${r.replays} states replayed a batch: the crash points miss the window between journal and stripe writes`);
    });
  }

  it('without the journal, the same crash states leave stale parity (the write hole this closes)', async () => {
    const sc = await scenario(5, 4, false);
    let stale = 0;
    await everyState(sc, false, async (mems) => {
      if (staleStripes(sc.g, mems).length > 0) stale++;
    });
    assert.ok(stale > 0, 'no crash state with stale parity: the scenario does not exercise the write hole');
  });

  it('a batch that is not whole replays nothing; a journal of another geometry is refused with one line', async () => {
    const g = new RaidGeometry(5, 4, UNIT_BYTES, MEMBER_BLOCKS, HEAD);
    const jdev = new MemoryBlockDevice(JOURNAL_BLOCKS);
    const j = await StripeJournal.open(jdev, jg(g));
    const cells = (s: number): { stripe: number; cells: { column: number; row: number; data: Buffer }[] } => ({ stripe: s, cells: [{ column: 0, row: 1, data: block(s) }, { column: 3, row: 1, data: block(s + 1) }] });
    await j.record([cells(2), cells(3)]);
    assert.deepEqual((await (await StripeJournal.open(copyDev(jdev), jg(g))).pending()).map((s) => s.stripe), [2, 3]);
    // Tear the second entry: the whole batch counts for nothing.
    const torn = copyDev(jdev);
    const hdr = torn.peekBlock(2 + 3);
    hdr[100] = (hdr[100] ?? 0) ^ 0xff;
    await torn.writeBlocks(2 + 3, hdr);
    assert.deepEqual(await (await StripeJournal.open(torn, jg(g))).pending(), []);
    // Another geometry: refused, naming both.
    const other = new RaidGeometry(6, 5, UNIT_BYTES, MEMBER_BLOCKS, HEAD);
    await assert.rejects((await StripeJournal.open(copyDev(jdev), jg(other))).pending(), (e: unknown) => e instanceof StripeJournalError && /RAID-5 of 4 members .* this volume is RAID-6 of 5/.test(e.message) && !e.message.includes('\n'));
    // Released: nothing pending, and the old entries never count again.
    await j.release();
    const reopened = await StripeJournal.open(copyDev(jdev), jg(g));
    assert.deepEqual(await reopened.pending(), []);
    assert.equal(reopened.currentEpoch, 2);
  });
});
