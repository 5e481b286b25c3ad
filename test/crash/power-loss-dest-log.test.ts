/**
 * Power loss on the mirror's destination, by enumeration: its log of the source's
 * records (src/mirror/dest-log.ts). A sync mirror acknowledges a FLUSH only once the
 * destination answered the DURABLE_REQ for it with durableSeq, i.e. once DestLog.persist()
 * returned; every record up to that durableSeq must survive a power loss of the
 * destination's host at any later moment (until a committed CP covers it), or a failover
 * after it loses a write a client was told is durable.
 *
 * A seeded workload runs against a DestLog over a recording region (src/io/recording.ts)
 * on a 2 MiB ring, so records wrap around it many times: records of 1-64 blocks (now and
 * then up to 256), persists, CPs committed (the watermark released), new streams (a
 * reconnect whose first seq reuses or skips seqs), and restarts of the receiving process
 * (a new DestLog over the same memory, as the process's page cache: what it recovers is in
 * memory, not necessarily on disk). Stores are captured after every record. For crash
 * points spread over the timeline (every persist, the events around it, and random ones)
 * it builds states (only what is durable; everything; prefixes; random subsets with
 * pages torn at 512 bytes) and reopens the log from each, as a restarted receiver does,
 * with the committed watermark of that moment. Every state must:
 * - open, and recover a run of consecutive seqs right after the watermark;
 * - hold every record up to the newest durableSeq the log had reported by then (lowered
 *   by any new stream that started below it since), byte for byte;
 * - hold nothing that was never written: each recovered record is a version appended
 *   for its seq (type, flags, offset, length and payload);
 * - report no damage (the durable mark on disk never claims a record a power loss took).
 * A failure names the seed (NVMIRROR_SEED=... reruns it), the crash point and the state.
 */
import { strict as assert } from 'assert';
import { DestLog } from '../../src/mirror/dest-log';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import {
  IoRecorder, RecordingNvram, buildState, crashPoint, emptyImage, prefixChoices, randomChoices, type UnitChoice,
} from '../../src/io/recording';
import { prng } from './harness';

const UUID = '0de57106-0000-4000-8000-00000000c0de';
const WRITER = '00000000000000aa';
const RING_BYTES = 2 * 1024 * 1024;
const BS = 4096;
const PAGE = 4096;
const OPS = 160;
/** Records the workload stores at least (it goes on past OPS until then). */
const APPENDED_MIN = 60;
/** Crash points checked per workload when the timeline is longer (every persist and its neighbours come first). */
const POINTS_MAX = 360;

interface Version {
  seq: number;
  stream: number;
  type: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  payload: Buffer;
}

/** What the log had said is durable: every record up to durableSeq, as these versions. */
interface Promise_ {
  eventIndex: number;
  durableSeq: number;
  expected: Map<number, Version>;
}

/** A payload whose every 512-byte sector names its record, its stream and its place (torn pages show). */
function payloadFor(seq: number, stream: number, blocks: number, salt: number): Buffer {
  const b = Buffer.alloc(blocks * BS);
  for (let s = 0; s < b.length / 512; s++) {
    const at = s * 512;
    b.writeUInt32LE(seq, at);
    b.writeUInt32LE(stream, at + 4);
    b.writeUInt32LE(s, at + 8);
    b.writeUInt32LE((salt ^ Math.imul(s + 1, 0x9e3779b1)) >>> 0, at + 12);
  }
  return b;
}

function sameRecord(v: Version, r: { seq: number; type: number; flags: number; offsetBytes: number; lengthBytes: number; payload: Buffer }): boolean {
  return v.seq === r.seq && v.type === r.type && v.flags === r.flags && v.offsetBytes === r.offsetBytes && v.lengthBytes === r.lengthBytes && v.payload.equals(r.payload);
}

async function runWorkload(seed: number): Promise<{ states: number; points: number; events: number; appended: number; restarts: number }> {
  const rnd = prng(seed);
  const int = (lo: number, hi: number): number => lo + Math.floor(rnd() * (hi - lo + 1));
  const recorder = new IoRecorder({ bytesMax: 512 * 1024 * 1024 });
  const mem = new MemoryNvram(RING_BYTES);
  const region = new RecordingNvram(mem, recorder, 'log');
  const base = emptyImage();
  let log = await DestLog.over(region, UUID, 'fresh');
  let stream = 1;
  let nextSeq = 1;
  let committed = 0;
  await log.startDurably(1, 0, WRITER);
  /** The current stream's stored versions, by seq. */
  const current = new Map<number, Version>();
  /** Every version ever appended, by seq. */
  const ever = new Map<number, Version[]>();
  const promises: Promise_[] = [{ eventIndex: 0, durableSeq: 0, expected: new Map() }];
  const commits: Array<{ eventIndex: number; seq: number }> = [{ eventIndex: 0, seq: 0 }];
  const starts: Array<{ eventIndex: number; fromSeq: number }> = [];
  const persistAt: number[] = [];
  let appended = 0;
  let restarts = 0;

  const promiseNow = (): void => {
    const d = log.durableSeq;
    const expected = new Map<number, Version>();
    for (let s = committed + 1; s <= d; s++) {
      const v = current.get(s);
      assert.ok(v, `seed ${seed}: the log says ${d} is durable, but record ${s} was never stored in this stream`);
      expected.set(s, v);
    }
    promises.push({ eventIndex: recorder.events.length, durableSeq: d, expected });
  };

  // OPS operations, then on until APPENDED_MIN records were stored (a seed whose draws
  // fill the ring and drop many appends would otherwise exercise too little), at most 4 x OPS.
  for (let op = 0; op < OPS || (appended < APPENDED_MIN && op < OPS * 4); op++) {
    const r = rnd();
    if (r < 0.62) {
      const blocks = rnd() < 0.08 ? int(65, 256) : int(1, 64);
      const v: Version = {
        seq: nextSeq, stream, type: int(1, 3), flags: int(0, 1), offsetBytes: int(0, 1 << 20) * BS, lengthBytes: blocks * BS,
        payload: payloadFor(nextSeq, stream, blocks, (rnd() * 0xffffffff) >>> 0),
      };
      if (log.append(v.seq, v.type, v.flags, v.offsetBytes, v.lengthBytes, v.payload)) {
        current.set(v.seq, v);
        const list = ever.get(v.seq) ?? [];
        list.push(v);
        ever.set(v.seq, list);
        appended++;
      }
      nextSeq++;
      recorder.capture();
    } else if (r < 0.8) {
      await log.persist();
      persistAt.push(recorder.events.length);
      promiseNow();
    } else if (r < 0.9) {
      // A CP committed on the mirror (its superblock synced first): the watermark moves.
      const top = Math.max(committed, nextSeq - 1);
      const seq = int(committed, top);
      if (seq > committed) {
        committed = seq;
        commits.push({ eventIndex: recorder.events.length, seq });
        log.committed(seq);
        for (const s of [...current.keys()]) if (s <= seq) current.delete(s);
      }
    } else if (r < 0.96) {
      // A reconnect: the source's next stream starts at its last seq + 1, which may reuse
      // seqs this log stored (the source lost them) or skip some (a catch-up follows).
      const fromSeq = int(committed + 1, nextSeq + 2);
      // (The stream voids earlier promises from its first seq on as soon as its header may be on disk.)
      starts.push({ eventIndex: recorder.events.length, fromSeq });
      await log.startDurably(fromSeq, committed, WRITER);
      stream++;
      for (const s of [...current.keys()]) if (s >= fromSeq) current.delete(s);
      // Records below fromSeq count only as a run ending at fromSeq - 1 (start()'s rule).
      nextSeq = fromSeq;
      recorder.capture();
    } else {
      // The receiving process restarts: its page cache (this memory) stays; what it
      // recovers must be made durable before it counts as such.
      recorder.capture();
      log = await DestLog.over(region, UUID, 'recover', committed);
      restarts++;
      const rec = [...log.recordsAfter(committed)];
      current.clear();
      for (const x of rec) {
        const v = (ever.get(x.seq) ?? []).find((c) => sameRecord(c, x));
        assert.ok(v, `seed ${seed}: a restart recovered record ${x.seq}, which was never appended as it reads`);
        current.set(x.seq, v);
      }
      const last = rec.length > 0 ? rec[rec.length - 1]!.seq : committed;
      const fromSeq = last + 1;
      starts.push({ eventIndex: recorder.events.length, fromSeq });
      await log.startDurably(fromSeq, committed, WRITER);
      stream++;
      nextSeq = fromSeq;
      promiseNow(); // what a WELCOME would report held and durable
      recorder.capture();
    }
  }
  await log.persist();
  persistAt.push(recorder.events.length);
  promiseNow();

  const events = recorder.events;
  // Crash points: every persist and its neighbours, then random ones, up to POINTS_MAX.
  const pointSet = new Set<number>([0, events.length]);
  for (const at of persistAt) for (const d of [-2, -1, 0, 1]) if (at + d >= 0 && at + d <= events.length) pointSet.add(at + d);
  for (const p of promises) pointSet.add(p.eventIndex);
  for (const c of commits) pointSet.add(c.eventIndex);
  const points = [...pointSet].sort((a, b) => a - b);
  while (points.length > POINTS_MAX) points.splice(int(1, points.length - 2), 1);
  for (let i = 0; points.length < POINTS_MAX && i < POINTS_MAX; i++) points.push(int(0, events.length));

  let states = 0;
  for (const at of points) {
    const cp = crashPoint(base, events, at);
    const watermark = [...commits].reverse().find((c) => c.eventIndex <= at)!.seq;
    const promise = [...promises].reverse().find((p) => p.eventIndex <= at)!;
    let promisedSeq = promise.durableSeq;
    // A stream started after that promise (at the same event index too: it came after the
    // persist) voids it from its first seq on: the source resends from there.
    for (const st of starts) if (st.eventIndex >= promise.eventIndex && st.eventIndex <= at) promisedSeq = Math.min(promisedSeq, st.fromSeq - 1);
    const choiceSets: Array<{ name: string; choices: UnitChoice[] }> = [
      { name: 'durable only', choices: cp.pending.map(() => ({ version: -1 })) },
      { name: 'everything', choices: cp.pending.map((u) => ({ version: u.versions.length - 1 })) },
      { name: 'half the pending stores', choices: prefixChoices(cp, Math.floor(cp.order.length / 2)) },
      { name: 'random subset', choices: randomChoices(cp, rnd) },
      { name: 'random subset', choices: randomChoices(cp, rnd) },
    ];
    for (const { name, choices } of choiceSets) {
      const img = buildState(cp, choices);
      const bytes = Buffer.alloc(RING_BYTES);
      for (const [page, data] of img.pages.get('log') ?? new Map<number, Buffer>()) data.copy(bytes, page * PAGE);
      const where = `seed ${seed} (NVMIRROR_SEED=${seed}), crash after event ${at} of ${events.length}, state "${name}", watermark ${watermark}, promised through ${promisedSeq}`;
      let reopened: DestLog;
      try {
        reopened = await DestLog.over(new MemoryNvram(RING_BYTES, bytes), UUID, 'recover', watermark);
      } catch (e) {
        assert.fail(`${where}: the log does not open: ${e instanceof Error ? e.message : String(e)}`);
      }
      // A power loss is not damage: the durable mark on disk never claims a record that is not there.
      assert.equal(reopened.damage, undefined, `${where}: the log reports damage ${JSON.stringify(reopened.damage)} after a power loss`);
      const rec = [...reopened.recordsAfter(watermark)];
      rec.forEach((x, i) => assert.equal(x.seq, watermark + 1 + i, `${where}: recovered seqs ${rec.map((y) => y.seq).join(',')} are not consecutive after the watermark`));
      for (let s = watermark + 1; s <= promisedSeq; s++) {
        const x = rec[s - watermark - 1];
        assert.ok(x, `${where}: record ${s} was acknowledged durable and is gone (recovered through ${watermark + rec.length})`);
        assert.ok(sameRecord(promise.expected.get(s)!, x), `${where}: record ${s} was acknowledged durable and reads back otherwise`);
      }
      for (const x of rec) {
        assert.ok((ever.get(x.seq) ?? []).some((v) => sameRecord(v, x)), `${where}: recovered record ${x.seq} was never appended as it reads`);
      }
      states++;
    }
  }
  return { states, points: points.length, events: events.length, appended, restarts };
}

describe('power loss: the mirror destination\'s log keeps every record it acknowledged durable', function () {
  this.timeout(300_000);
  const env = process.env.NVMIRROR_SEED;
  const seeds = env !== undefined ? [Number(env)] : [1, 2, (Date.now() % 1_000_000) + 3];
  for (const seed of seeds) {
    it(`seed ${seed}: every crash state opens and holds every record up to the acknowledged durableSeq, and nothing never written`, async () => {
      const r = await runWorkload(seed);
      process.stdout.write(`      dest-log power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed}): ${r.appended} records (${r.restarts} restarts), ${r.events} events, ${r.points} crash points, ${r.states} states\n`);
      assert.ok(r.appended > 50 && r.states > 500, `the workload ran too little (${r.appended} records, ${r.states} states)`);
    });
  }
});
