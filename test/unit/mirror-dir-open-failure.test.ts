/**
 * A mirror whose open fails part way (its log cannot be made: a full disk, or something
 * in the log's place) releases what it had opened: the next stream of that source opens
 * it once the cause is gone. Found by hand: a receiver on a full file system refused the
 * first stream with ENOSPC, and every later one with "in use by another process:
 * .../member-0.img" (the member left open, with its lock, in the receiver itself) until the
 * receiver was restarted. And the log is never deleted for a reason other than its size.
 * A member found without its mirror.json is taken back when it holds committed CPs of
 * that source (it was made anew, the committed image thrown away, at the source's next
 * connection), made anew when it holds none (a creation cut short).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { MIRROR_LABEL_NAME, MirrorDir, type MirrorHello } from '../../src/mirror/mirror-dir';
import { baselinedMirror } from './mirror-baseline-helper';
import { DEST_LOG_NAME, DestLog, destLogBytesFor } from '../../src/mirror/dest-log';

const UUID = 'fa11ed00-0000-4000-8000-00000000c0de';

describe('mirror: an open that fails part way', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-mirror-open-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('releases the member and its lock: the next open of the same mirror succeeds once the cause is gone', async () => {
    const hello: MirrorHello = { sourceUuid: UUID, sizeBytes: 8 * 1024 * 1024, deviceBlocks: 4096, nvramBytes: 4 * 1024 * 1024 };
    const dir = path.join(tmp, UUID);
    // Something in the log's place that cannot be replaced (a non-empty directory).
    fs.mkdirSync(path.join(dir, DEST_LOG_NAME), { recursive: true });
    fs.writeFileSync(path.join(dir, DEST_LOG_NAME, 'x'), 'x');
    for (let i = 0; i < 2; i++) {
      await assert.rejects(MirrorDir.openOrCreate(tmp, hello, log), (e: Error) => {
        assert.match(e.message, new RegExp(`^the mirror's log ${dir}/${DEST_LOG_NAME} \\(16\\.0 MiB\\): `));
        assert.doesNotMatch(e.message, /in use/);
        return true;
      });
    }
    fs.rmSync(path.join(dir, DEST_LOG_NAME), { recursive: true });
    const m = await MirrorDir.openOrCreate(tmp, hello, log);
    assert.equal(m.committedCp, -1);
    await m.close();
  });

  it('a file where the mirror\'s directory goes is refused by name (not a bare EEXIST as an I/O error), and left as it was', async () => {
    const hello: MirrorHello = { sourceUuid: UUID, sizeBytes: 8 * 1024 * 1024, deviceBlocks: 4096, nvramBytes: 4 * 1024 * 1024 };
    const where = path.join(tmp, UUID);
    fs.writeFileSync(where, 'not a directory');
    await assert.rejects(MirrorDir.openOrCreate(tmp, hello, log), (e: Error) => {
      assert.equal(e.name, 'MirrorDirError');
      assert.equal(e.message, `${where} exists and is not a directory: the mirror of source ${UUID} goes there (move the file away)`);
      return true;
    });
    assert.equal(fs.readFileSync(where, 'utf8'), 'not a directory');
  });

  it('refuses by name what is in the log\'s place and cannot be replaced, leaving it as it was; makes anew a log of another size', async () => {
    const file = path.join(tmp, DEST_LOG_NAME);
    const size = destLogBytesFor(4 * 1024 * 1024);
    const l = await DestLog.open(file, UUID, size);
    await l.close();
    // Not a log file: refused by name, left where it is.
    fs.rmSync(file);
    fs.mkdirSync(file);
    fs.writeFileSync(path.join(file, 'kept'), 'records');
    await assert.rejects(DestLog.open(file, UUID, size), /^Error: the mirror's log .*: /);
    assert.equal(fs.readFileSync(path.join(file, 'kept'), 'utf8'), 'records', 'left as it was');
    fs.rmSync(file, { recursive: true });
    // Another size: replaced.
    fs.writeFileSync(file, Buffer.alloc(4096));
    const again = await DestLog.open(file, UUID, size);
    assert.equal(fs.statSync(file).size, size);
    await again.close();
  });

  it('a member whose mirror.json is lost: one holding committed CPs keeps them (the label made again), one holding none is made anew, one of another size is refused', async () => {
    const b = await baselinedMirror(tmp, UUID, 8 * 1024 * 1024, 4096, log);
    const cp = b.cp;
    await b.mirror.close();
    fs.rmSync(path.join(b.dir, MIRROR_LABEL_NAME));
    const other: MirrorHello = { ...b.hello, deviceBlocks: 8192, sizeBytes: 16 * 1024 * 1024 };
    await assert.rejects(MirrorDir.openOrCreate(tmp, other, log), new RegExp(`member-0\\.img holds CP ${cp} of ${UUID} on 4096 blocks but no mirror\\.json, and the source now has 8192: move it aside to start a new mirror`));
    assert.equal(fs.existsSync(path.join(b.dir, MIRROR_LABEL_NAME)), false, 'nothing written');
    const kept = await MirrorDir.openOrCreate(tmp, b.hello, log);
    assert.equal(kept.committedCp, cp, 'the committed image is kept, not replaced by an empty member');
    await kept.close();
    assert.equal(JSON.parse(fs.readFileSync(path.join(b.dir, MIRROR_LABEL_NAME), 'utf8')).sourceUuid, UUID);

    // A creation cut short: a member with nothing committed and no label is made anew.
    const fresh = '0f0f0f0f-0000-4000-8000-00000000c0de';
    const hello: MirrorHello = { sourceUuid: fresh, sizeBytes: 8 * 1024 * 1024, deviceBlocks: 4096, nvramBytes: 4 * 1024 * 1024 };
    await (await MirrorDir.openOrCreate(tmp, hello, log)).close();
    fs.rmSync(path.join(tmp, fresh, MIRROR_LABEL_NAME));
    const again = await MirrorDir.openOrCreate(tmp, hello, log);
    assert.equal(again.committedCp, -1);
    await again.close();
  });
});
