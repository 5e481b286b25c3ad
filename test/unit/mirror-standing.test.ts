/** standing.ts: what a HELLO finds, decided from the lineages and the mirror's log; the refusal's tag survives the trip to the source. */
import { strict as assert } from 'assert';
import { baseInUseTag, decideStanding, parseBaseInUse, parseStanding, refusalText, standingLine, type MirrorSide } from '../../src/mirror/standing';
import { rootGeneration, startGeneration } from '../../src/tree/lineage';

const ROOT = [rootGeneration('5a1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0')];
const FORK = startGeneration(ROOT, 10, '00000000000000b2'); // promoted from CP 10

const mirror = (cp: number, over: Partial<MirrorSide> = {}, lineage = ROOT): MirrorSide => ({ committed: { lineage, cp, nvlogSeq: cp * 100 }, newestStoredSeq: 0, promoted: false, ...over });

describe('mirror standing', () => {
  it('a new mirror, the same CP, or the source ahead on its own line: in step, nothing refused', () => {
    assert.equal(decideStanding({ lineage: ROOT, cp: 5, lastSeq: 500 }, { committed: undefined, newestStoredSeq: 0, promoted: false }).kind, 'in-step');
    const same = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1010 }, mirror(10, { newestStoredSeq: 1010 }));
    assert.deepEqual([same.kind, same.current, same.commonCp], ['in-step', 'both', 10]);
    const ahead = decideStanding({ lineage: ROOT, cp: 14, lastSeq: 1400 }, mirror(10, { newestStoredSeq: 1200 }));
    assert.deepEqual([ahead.kind, ahead.current, ahead.commonCp], ['in-step', 'source', 10]);
  });

  it('the mirror holds records past the source\'s newest seq (the source lost its NVRAM): mirror ahead, refused', () => {
    const s = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1000 }, mirror(10, { newestStoredSeq: 1042 }));
    assert.deepEqual([s.kind, s.current, s.destinationSeq, s.sourceSeq], ['mirror-ahead', 'destination', 1042, 1000]);
    const text = refusalText(s, '/rx/x', false);
    assert.match(text, /^refused: the mirror \/rx\/x is current: it holds records up to seq 1042, past this source's newest seq 1000 .*Promote the mirror \(nvmirror promote \/rx\/x\)/);
    assert.deepEqual(parseStanding(`refused the stream: ${text}`), s);
  });

  it('the source lost its NVRAM and then wrote new records over the same seqs: its first stream says the seq it started at, and the mirror is still found ahead', () => {
    // Started at 1000 (its NVRAM lost records 1001..1042), then wrote up to 1100 before connecting.
    const s = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1000 }, mirror(10, { newestStoredSeq: 1042 }));
    assert.deepEqual([s.kind, s.current, s.destinationSeq, s.sourceSeq], ['mirror-ahead', 'destination', 1042, 1000]);
    assert.match(refusalText(s, '/rx/x', false), /it holds records up to seq 1042, past this source's newest seq 1000 of the same history \(its NVRAM or disk was lost\?\)/);
    // Its NVRAM intact (it started holding every record the mirror has): in step.
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1042 }, mirror(10, { newestStoredSeq: 1042 })).kind, 'in-step');
    // A later stream of the same process (no startedAtSeq): the mirror's records past 1000 are its own.
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100 }, mirror(10, { newestStoredSeq: 1042 })).kind, 'in-step');
  });

  it('records this very process stored on an earlier stream (its WELCOME lost) are its own; the same records from another process are not', () => {
    const P = '5eed5eed5eed5eed';
    // The process started at 1000, its first stream (from 1001) reached the mirror, which
    // stored 1001..1042 before the link went without an answer; it says HELLO again.
    const again = { lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1000, processId: P };
    assert.equal(decideStanding(again, mirror(10, { newestStoredSeq: 1042, writer: { id: P, fromSeq: 1001 } })).kind, 'in-step');
    // Another process (this one lost its NVRAM: the mirror's 1001..1042 came from before): ahead.
    assert.equal(decideStanding(again, mirror(10, { newestStoredSeq: 1042, writer: { id: 'aaaaaaaaaaaaaaaa', fromSeq: 1001 } })).kind, 'mirror-ahead');
    assert.equal(decideStanding(again, mirror(10, { newestStoredSeq: 1042 })).kind, 'mirror-ahead', 'no known writer');
    // This process's records begin at 1021, but 1001..1020 came from an earlier one: ahead, by those.
    const s = decideStanding(again, mirror(10, { newestStoredSeq: 1042, writer: { id: P, fromSeq: 1021 } }));
    assert.deepEqual([s.kind, s.sourceSeq], ['mirror-ahead', 1000]);
    // ... unless this process started holding them.
    assert.equal(decideStanding({ ...again, startedAtSeq: 1020 }, mirror(10, { newestStoredSeq: 1042, writer: { id: P, fromSeq: 1021 } })).kind, 'in-step');
    // Never records past the source's newest, whoever stored them.
    assert.equal(decideStanding({ ...again, lastSeq: 1030, startedAtSeq: 1000 }, mirror(10, { newestStoredSeq: 1042, writer: { id: P, fromSeq: 1001 } })).kind, 'mirror-ahead');
  });

  it('a session without the mirror in between (serve --no-mirror after an NVRAM loss): its start travels in the next HELLO, and the mirror is still found ahead', () => {
    const P1 = '1111111111111111';
    const P2 = '2222222222222222';
    const P3 = '3333333333333333';
    // P1 streamed 1001..1042 and was welcomed; the NVRAM was lost back to 1000; P2 served
    // without the mirror from 1000 to 1100; P3 starts at 1100 with the mirror.
    const p3 = { lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1100, processId: P3 };
    const m = mirror(10, { newestStoredSeq: 1042, writer: { id: P1, fromSeq: 1001 }, newestStoredBeforeWriter: 0 });
    assert.equal(decideStanding(p3, m).kind, 'in-step', 'without the earlier session the loss is hidden');
    const s = decideStanding({ ...p3, earlier: [{ id: P2, startedAtSeq: 1000 }] }, m);
    assert.deepEqual([s.kind, s.current, s.sourceSeq, s.destinationSeq], ['mirror-ahead', 'destination', 1000, 1042]);
    // P2 started holding every record the mirror has (no loss): in step.
    assert.equal(decideStanding({ ...p3, earlier: [{ id: P2, startedAtSeq: 1042 }] }, m).kind, 'in-step');
  });

  it('records an earlier session stored itself (its WELCOME lost, then it was killed) need only be held by the sessions after it', () => {
    const P1 = '1111111111111111';
    const P2 = '2222222222222222';
    // P1 started at 1000 and streamed 1001..1042 (another process's records end at 990);
    // the WELCOME never reached it, so its session stays in the record.
    const m = mirror(10, { newestStoredSeq: 1042, writer: { id: P1, fromSeq: 1001 }, newestStoredBeforeWriter: 990 });
    // P2 started holding them (P1 was killed, its NVRAM intact): in step.
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1050, processId: P2, earlier: [{ id: P1, startedAtSeq: 1000 }] }, m).kind, 'in-step');
    // P2 started at 1020 (the NVRAM lost 1021..1050): P1's 1021..1042 are gone here.
    const s = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1020, processId: P2, earlier: [{ id: P1, startedAtSeq: 1000 }] }, m);
    assert.deepEqual([s.kind, s.sourceSeq], ['mirror-ahead', 1020]);
    // The older records (to 990) must be held by every session, P1 included.
    const older = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1050, processId: P2, earlier: [{ id: P1, startedAtSeq: 980 }] }, m);
    assert.deepEqual([older.kind, older.sourceSeq], ['mirror-ahead', 980]);
    // Without newestStoredBeforeWriter the older records are taken to reach fromSeq - 1.
    const { newestStoredBeforeWriter: _n, ...unknownOlder } = m;
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1050, processId: P2, earlier: [{ id: P1, startedAtSeq: 999 }] }, unknownOlder).kind, 'mirror-ahead');
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1100, startedAtSeq: 1050, processId: P2, earlier: [{ id: P1, startedAtSeq: 999 }] }, m).kind, 'in-step');
  });

  it('the mirror holds a later CP of the source\'s own line (the source lost its disk): mirror ahead', () => {
    const s = decideStanding({ lineage: ROOT, cp: 8, lastSeq: 800 }, mirror(12));
    assert.deepEqual([s.kind, s.current, s.commonCp], ['mirror-ahead', 'destination', 8]);
    assert.match(standingLine(s, 'source'), /^primary: this side; current: the mirror; last common CP 8, since then the source wrote 0 CP\(s\), the mirror 4; the mirror holds records to seq 1200, the source to 800$/);
  });

  it('a promoted mirror: current when its old source wrote nothing since, split brain when it did (a CP or a record the promote did not replay)', () => {
    const p = (over: Partial<MirrorSide>): MirrorSide => mirror(13, { promoted: true, promotedThroughSeq: 1050, ...over }, FORK);
    const stale = decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1050 }, p({}));
    assert.deepEqual([stale.kind, stale.current, stale.commonCp], ['promoted', 'destination', 10]);
    assert.equal(decideStanding({ lineage: ROOT, cp: 10, lastSeq: 1051 }, p({})).kind, 'split-brain');
    const both = decideStanding({ lineage: ROOT, cp: 12, lastSeq: 1200 }, p({}));
    assert.deepEqual([both.kind, both.current, both.commonCp, both.sourceCp - both.commonCp, both.destinationCp - both.commonCp], ['split-brain', 'each-its-own', 10, 2, 3]);
    const text = refusalText(both, '/rx/y', true);
    assert.match(text, /^split brain refused: \/rx\/y was promoted at CP 10 \(the last CP both sides hold\) and is a primary now at CP 13 \(3 CP\(s\) since\); this source is at CP 12 \(2 CP\(s\) since\)/);
    assert.deepEqual(parseStanding(text), both);
  });

  it('two sides that each went on from a common CP without a promote are a split brain; no common CP is refused as unrelated', () => {
    const other = startGeneration(ROOT, 6, '00000000000000c3');
    const s = decideStanding({ lineage: ROOT, cp: 9, lastSeq: 900 }, mirror(8, {}, other));
    assert.deepEqual([s.kind, s.commonCp], ['split-brain', 6]);
    assert.match(refusalText(s, '/rx/z', false), /^split brain refused: this source and the mirror \/rx\/z both wrote after CP 6/);
    const far = decideStanding({ lineage: [{ id: '00000000000000d4', firstCp: 3 }], cp: 9, lastSeq: 900 }, mirror(8));
    assert.equal(far.kind, 'unrelated');
  });

  it('a refusal for a block the committed CP uses carries that CP and block (the source then drops its damaged base); no other refusal does', () => {
    const reason = `refused the stream: the CP writes pba 10, which the committed CP 2 uses (a confused or hostile source, or one whose copy of that CP was damaged): refused ${baseInUseTag(2, 10)}`;
    assert.deepEqual(parseBaseInUse(reason), { cp: 2, pba: 10 });
    assert.equal(parseBaseInUse('refused the stream: frame 1 (type 4): checksum mismatch'), undefined);
    assert.equal(parseBaseInUse(`${baseInUseTag(2, 10)} and more`), undefined, 'only at the end');
  });

  it('a long directory name still leaves the tag inside the REFUSE cap; another refusal has no standing', () => {
    const s = decideStanding({ lineage: ROOT, cp: 12, lastSeq: 1200 }, mirror(13, { promoted: true, promotedThroughSeq: 0 }, FORK));
    const text = `refused the stream: ${refusalText(s, `/${'d'.repeat(900)}`, true)}`;
    assert.ok(Buffer.byteLength(text) <= 1024, `${Buffer.byteLength(text)} bytes`);
    assert.deepEqual(parseStanding(text), s);
    assert.equal(parseStanding('refused the stream: mirror member was truncated'), undefined);
  });
});
