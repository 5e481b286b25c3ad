/**
 * `promote` stopped part-way through its replay (as a crash would stop it, after the
 * replay's first CPs of its own) and run again: the re-run starts from the base the first
 * run recorded (promote.base), not from the newest CP, which is then one of the replay's
 * (a CP the old primary never had, whose nvlogSeq counts the new volume's records). The
 * promoted volume holds the base plus every record of the mirror's log, the role names
 * the base's CP and root (what a failback resumes from), and one promoted-cp snapshot
 * keeps the base.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { promoteMirror } from '../../src/mirror/promote';
import { readRole } from '../../src/mirror/role';
import { RecordType } from '../../src/nvlog/format';
import { openVolumeDir } from '../../src/volume/dir';
import { BS, baselinedMirror, blockOf } from './mirror-baseline-helper';

const UUID = '9e0d0e5e-0000-4000-8000-00000000fa11';
const DEVICE_BLOCKS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;
const RECORDS = 24;
const WRITER = '00000000000000ab';

describe('mirror: promote interrupted and run again', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-promote-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('the re-run replays from the recorded base: every record in, the role names the base CP and root, one snapshot of the base', async () => {
    const b = await baselinedMirror(tmp, UUID, VOLUME_BYTES, DEVICE_BLOCKS, log);
    // The source's records after the baseline, as a sync mirror's log holds them.
    const want = Buffer.from(b.volume);
    const mlog = b.mirror.log;
    mlog.start(b.nvlogSeq + 1, b.nvlogSeq, WRITER);
    for (let i = 0; i < RECORDS; i++) {
      const seq = b.nvlogSeq + 1 + i;
      const lbn = (i * 37) % (VOLUME_BYTES / BS - 2);
      const payload = Buffer.concat([blockOf(5000 + i), blockOf(6000 + i)]);
      assert.ok(mlog.append(seq, RecordType.Write, 0, lbn * BS, payload.length, payload), `record ${seq} stored`);
      payload.copy(want, lbn * BS);
    }
    await mlog.persist();
    await b.mirror.close();

    // Stopped after 10 records: the volume's clean stop commits them in a CP of its own.
    await assert.rejects(promoteMirror(b.dir, { force: false, logger: log, afterRecord: (n) => { if (n === 10) throw new Error('stopped here'); } }), /stopped here/);
    assert.ok(fs.existsSync(path.join(b.dir, 'promote.base')), 'the base is recorded');

    const report = await promoteMirror(b.dir, { force: false, logger: log });
    assert.equal(report.promotedFromCp, b.cp, 'the role names the base CP');
    assert.equal(report.promotedRoot, b.root, 'and its root');
    assert.equal(report.baseSnapshot, `promoted-cp${b.cp}`);
    assert.equal(report.recordsReplayed, RECORDS, 'the re-run replays every record after the base (again: each overwrites its range)');
    assert.equal(readRole(b.dir)?.promotedFromCp, b.cp);
    assert.ok(!fs.existsSync(path.join(b.dir, 'promote.base')), 'removed once done');

    const opened = await openVolumeDir(b.dir, { readOnly: true, control: false, cpIntervalMs: 0 });
    try {
      const v = opened.volume;
      assert.deepEqual(v.listSnapshots().filter((s) => s.name.startsWith('promoted-')).map((s) => s.name), [`promoted-cp${b.cp}`], 'one snapshot, of the base');
      const got = await v.read(0, VOLUME_BYTES);
      assert.ok(got.equals(want), 'the promoted volume is the base plus every record');
    } finally {
      await opened.close();
    }
  });
});
