/**
 * A failover onto a mirror whose log is damaged before its durable mark (a record that
 * was stored durably, i.e. acknowledged, no longer verifies). Found by hand: promote
 * replayed up to the damage, said the log held nothing more and exited 0, dropping the
 * acknowledged records after it without a word. Now promote refuses, naming the damaged
 * seq and how far the log held records durably, and changes nothing; with
 * --accept-log-loss it promotes the prefix and says what was lost (report, replayEnd
 * "LOST: ..."). Damage past the mark (records a power loss may take) is a log's end.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { promoteMirror } from '../../src/mirror/promote';
import { readRole } from '../../src/mirror/role';
import { DEST_LOG_NAME } from '../../src/mirror/dest-log';
import { MIRROR_LABEL_NAME, MirrorDir } from '../../src/mirror/mirror-dir';
import { RecordType } from '../../src/nvlog/format';
import { openVolumeDir } from '../../src/volume/dir';
import { BS, baselinedMirror, blockOf } from './mirror-baseline-helper';

const UUID = '9e0d0e5e-0000-4000-8000-0000000da7a5';
const DEVICE_BLOCKS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;
const RECORDS = 24;
const DAMAGED = 10; // the 10th record after the base
const WRITER = '00000000000000ac';

/** The whole image of the promoted volume in `dir`. */
async function promotedImage(dir: string): Promise<Buffer> {
  const opened = await openVolumeDir(dir, { readOnly: true, control: false, cpIntervalMs: 0 });
  try {
    return await opened.volume.read(0, VOLUME_BYTES);
  } finally {
    await opened.close();
  }
}

describe('mirror: promote over a log damaged in the middle', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-promote-dmg-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  /**
   * A committed mirror with RECORDS records after its base in its log, persisted after the
   * first `persisted` of them only, the `damaged`-th one flipped; and the image before it.
   */
  async function damagedMirror(damaged = DAMAGED, persisted = RECORDS): Promise<{ b: Awaited<ReturnType<typeof baselinedMirror>>; prefix: Buffer }> {
    const b = await baselinedMirror(tmp, UUID, VOLUME_BYTES, DEVICE_BLOCKS, log);
    const prefix = Buffer.from(b.volume);
    const mlog = b.mirror.log;
    mlog.start(b.nvlogSeq + 1, b.nvlogSeq, WRITER);
    for (let i = 0; i < RECORDS; i++) {
      const seq = b.nvlogSeq + 1 + i;
      const lbn = (i * 37) % (VOLUME_BYTES / BS - 2);
      const payload = Buffer.concat([blockOf(5000 + i), blockOf(6000 + i)]);
      assert.ok(mlog.append(seq, RecordType.Write, 0, lbn * BS, payload.length, payload), `record ${seq} stored`);
      if (i < damaged - 1) payload.copy(prefix, lbn * BS);
      if (i === persisted - 1) await mlog.persist();
    }
    await b.mirror.close();
    // One byte of the record's payload flipped in the file.
    const file = path.join(b.dir, DEST_LOG_NAME);
    const bytes = fs.readFileSync(file);
    const at = bytes.indexOf(blockOf(5000 + damaged - 1));
    assert.ok(at > 0, 'the record is in the log');
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([bytes[at + 100]! ^ 0xff]), 0, 1, at + 100);
    fs.closeSync(fd);

    return { b, prefix };
  }

  it('is refused naming the damaged seq and the acknowledged records after it; --accept-log-loss promotes the prefix and says what was lost', async () => {
    const { b, prefix } = await damagedMirror();
    const firstMissing = b.nvlogSeq + DAMAGED;
    const lastValid = b.nvlogSeq + RECORDS;
    await assert.rejects(promoteMirror(b.dir, { force: false, logger: log }), (e: Error) => {
      assert.match(e.message, new RegExp(`the mirror's log is damaged: record seq ${firstMissing} cannot be read, though every record through seq ${lastValid} was stored durably \\(writes the source acknowledged\\): a promote replays only up to seq ${firstMissing - 1} and loses the rest\\..*nvmirror promote .* --accept-log-loss$`));
      return true;
    });
    assert.ok(fs.existsSync(path.join(b.dir, MIRROR_LABEL_NAME)), 'still a mirror');
    assert.equal(readRole(b.dir), undefined, 'not promoted');

    const r = await promoteMirror(b.dir, { force: false, logger: log, acceptLogLoss: true });
    assert.deepEqual(r.logLoss, { firstMissingSeq: firstMissing, durableThroughSeq: lastValid, validAfter: RECORDS - DAMAGED });
    assert.equal(r.recordsReplayed, DAMAGED - 1);
    assert.match(r.replayEnd, new RegExp(`^LOST: the log is damaged at seq ${firstMissing}; the records from it through seq ${lastValid} are not replayed`));
    assert.ok((await promotedImage(b.dir)).equals(prefix), 'the base plus the records before the damage');
  });

  it('damage past the durable mark is the log\'s end, as a power loss leaves it: promoted without --accept-log-loss, up to the damage', async () => {
    const persisted = 16;
    const damaged = 20;
    const { b, prefix } = await damagedMirror(damaged, persisted);
    const r = await promoteMirror(b.dir, { force: false, logger: log });
    assert.equal(r.logLoss, undefined);
    assert.equal(r.recordsReplayed, damaged - 1);
    assert.match(r.replayEnd, new RegExp(`^replay stopped after seq ${b.nvlogSeq + damaged - 1}, the last record the log holds`));
    assert.ok((await promotedImage(b.dir)).equals(prefix), 'the base plus the records before the damage');
  });

  it('the receiver opening such a mirror says so: an error line, and its status shows it (lastError) until a CP commits', async () => {
    const { b } = await damagedMirror();
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (l: string) => void lines.push(l) });
    const m = await MirrorDir.openOrCreate(tmp, b.hello, logger);
    try {
      const want = `the mirror's log is damaged: record seq ${b.nvlogSeq + DAMAGED} cannot be read, though every record through seq ${b.nvlogSeq + RECORDS} was stored durably`;
      assert.ok(lines.some((l) => l.includes('"level":50') && l.includes(want)), lines.join(''));
      assert.ok(m.lastError?.startsWith(want), m.lastError);
      assert.deepEqual(m.log.damage, { firstMissingSeq: b.nvlogSeq + DAMAGED, durableThroughSeq: b.nvlogSeq + RECORDS, validAfter: RECORDS - DAMAGED });
    } finally {
      await m.close();
    }
  });
});
