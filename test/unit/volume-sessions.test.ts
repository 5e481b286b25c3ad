/**
 * sessions.ts: every read-write open of a volume directory records the NVRAM seq it
 * started from, before any client write; read-only opens record nothing; the record is
 * bounded, merges only towards the stricter, and an unreadable one is replaced and said so.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createVolumeDir, openVolumeDir } from '../../src/volume/dir';
import { SESSIONS_MAX, SESSIONS_NAME, acknowledgeSessions, appendSession, mergeSessions, readSessions, recordSessionStart } from '../../src/volume/sessions';

describe('volume sessions (DIR/sessions.json)', () => {
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-sessions-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('each read-write open records the seq it started from; read-only opens record nothing; acknowledging empties it', async () => {
    const dir = path.join(tmp, 'v');
    await createVolumeDir(dir, { sizeBytes: 16 * 1024 * 1024, nvramSizeBytes: 1024 * 1024 });
    assert.deepEqual(readSessions(dir), []);
    const a = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    assert.ok(a.volume.session, 'a read-write open has a session');
    assert.equal(a.volume.session.startedAtSeq, a.volume.log.lastSeq);
    assert.deepEqual(readSessions(dir), [a.volume.session]);
    for (let i = 0; i < 3; i++) await a.volume.write(i * 4096, Buffer.alloc(4096, i + 1), false);
    const wrote = a.volume.log.lastSeq;
    assert.ok(wrote >= 3);
    await a.close();
    const ro = await openVolumeDir(dir, { readOnly: true, control: false });
    assert.equal(ro.volume.session, undefined);
    await ro.close();
    const b = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    assert.equal(b.volume.session!.startedAtSeq, wrote, 'the second session starts where the first stopped');
    assert.notEqual(b.volume.session!.id, a.volume.session.id);
    assert.deepEqual(readSessions(dir), [a.volume.session, b.volume.session]);
    acknowledgeSessions(dir);
    assert.deepEqual(readSessions(dir), []);
    await b.close();
  });

  it(`keeps at most ${SESSIONS_MAX}: the two oldest merge into the newer id with the lower start`, () => {
    let list = Array.from({ length: SESSIONS_MAX }, (_, i) => ({ id: (0x100 + i).toString(16).padStart(16, '0'), startedAtSeq: i === 1 ? 5 : 100 + i }));
    list = appendSession(list, { id: 'ffffffffffffffff', startedAtSeq: 900 });
    assert.equal(list.length, SESSIONS_MAX);
    assert.deepEqual(list[0], { id: '0000000000000101', startedAtSeq: 5 });
    assert.deepEqual(list.at(-1), { id: 'ffffffffffffffff', startedAtSeq: 900 });
    // The lowest start survives any number of merges.
    for (let i = 0; i < 40; i++) list = appendSession(list, { id: (0x900 + i).toString(16).padStart(16, '0'), startedAtSeq: 1000 + i });
    assert.equal(list.length, SESSIONS_MAX);
    assert.equal(Math.min(...list.map((x) => x.startedAtSeq)), 5);
    // The mirror's HELLO takes at most 15 earlier sessions the same way: merged, never cut.
    const earlier = mergeSessions(list, SESSIONS_MAX - 1);
    assert.equal(earlier.length, SESSIONS_MAX - 1);
    assert.equal(Math.min(...earlier.map((x) => x.startedAtSeq)), 5);
  });

  it('an unreadable record is replaced by one with only the new session, and says so', async () => {
    fs.writeFileSync(path.join(tmp, SESSIONS_NAME), '{"sessions": [{"id": "zz", "startedAtSeq": -1}]}\n');
    assert.equal(readSessions(tmp), undefined);
    const r = await recordSessionStart(tmp, 77);
    assert.equal(r.unreadable, true);
    assert.deepEqual(readSessions(tmp), [r.session]);
    const r2 = await recordSessionStart(tmp, 80);
    assert.equal(r2.unreadable, false);
    assert.deepEqual(readSessions(tmp), [r.session, r2.session]);
    fs.writeFileSync(path.join(tmp, SESSIONS_NAME), 'not json');
    assert.equal(readSessions(tmp), undefined);
  });
});
