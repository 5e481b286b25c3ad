/**
 * A baseline's marker (DIR/baseline.partial) left by a stop between the baseline's commit
 * (its superblock synced) and the marker's removal: the mirror has committed the baseline,
 * so the next open removes the marker and serves the committed image, `check` says so as
 * a note (not a problem), `status` shows the committed CP, and a failover's `promote`
 * takes it (it refused the mirror as an interrupted baseline). Left in place it read as
 * a baseline still in progress (no view, no exports) and offered the source a resume of
 * a CP this mirror already holds, whose commit the mirror then refused ("not newer than
 * the committed CP"): a loop until the source stopped keeping that baseline, then a whole
 * baseline again. A marker toward a newer CP than the committed one is a baseline in
 * progress and stays.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { BASELINE_MARKER_NAME, MIRROR_LABEL_NAME, MirrorDir, checkMirrorDir, mirrorDirSummary, type MirrorLabel } from '../../src/mirror/mirror-dir';
import { promoteMirror } from '../../src/mirror/promote';
import { BS, baselinedMirror } from './mirror-baseline-helper';

const UUID = 'ba5e11e0-0000-4000-8000-0000000a11ce';
const DEVICE_BLOCKS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;

describe('mirror: the marker of a baseline that committed', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-marker-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('is removed by the next open, which serves the committed image, and by promote; a marker toward a newer CP stays a baseline in progress', async () => {
    const b = await baselinedMirror(tmp, UUID, VOLUME_BYTES, DEVICE_BLOCKS, log);
    const { dir, hello, cp, markerText } = b;
    const want = b.volume;
    const marker = path.join(dir, BASELINE_MARKER_NAME);
    await b.mirror.close();
    let mirror: MirrorDir;

    // A stop between the superblock's sync and the marker's removal leaves this.
    fs.writeFileSync(marker, markerText);
    const checked = await checkMirrorDir(dir);
    assert.deepEqual(checked.problems, [], 'a committed baseline\'s marker is not a problem');
    assert.ok(checked.notes.some((n) => new RegExp(`baseline toward CP ${cp} committed`).test(n)), checked.notes.join('; '));
    mirror = await MirrorDir.openOrCreate(tmp, hello, log);
    try {
      assert.ok(!fs.existsSync(marker), 'the open removes the marker of a committed baseline');
      assert.equal(mirror.baselinePartial, false);
      assert.equal(mirror.baselineResume, undefined, 'no resume is offered');
      assert.equal(mirror.committedCp, cp);
      assert.ok(mirror.view, 'the committed image is served');
      const got = Buffer.alloc(VOLUME_BYTES);
      await mirror.view.readRange(0, VOLUME_BYTES / BS, got);
      assert.ok(got.equals(want), 'the mirror reads back the source\'s volume');
    } finally {
      await mirror.close();
    }

    const label = JSON.parse(fs.readFileSync(path.join(dir, MIRROR_LABEL_NAME), 'utf8')) as MirrorLabel;

    // A baseline toward a newer CP over this image: in progress, kept; not promoted.
    fs.writeFileSync(marker, JSON.stringify({ targetCp: cp + 5, blocks: 12 }) + '\n');
    mirror = await MirrorDir.openOrCreate(tmp, hello, log);
    try {
      assert.ok(fs.existsSync(marker));
      assert.equal(mirror.baselinePartial, true);
      assert.deepEqual(mirror.baselineResume, { cp: cp + 5, blocks: 12 });
    } finally {
      await mirror.close();
    }
    const inProgress = await checkMirrorDir(dir);
    assert.ok(inProgress.problems.some((p) => /full baseline toward CP \d+ is in progress/.test(p)), inProgress.problems.join('; '));
    assert.equal((await mirrorDirSummary(dir, label)).baselinePartial, true, 'status: inconsistent');
    await assert.rejects(promoteMirror(dir, { force: false, logger: log }), /holds no consistent image: a full baseline was interrupted/);
    assert.ok(fs.existsSync(marker));

    // The committed baseline's marker again: status shows the committed CP, and a failover promotes it.
    fs.writeFileSync(marker, markerText);
    const sum = await mirrorDirSummary(dir, label);
    assert.equal(sum.baselinePartial, false, 'status: the committed CP, not an interrupted baseline');
    assert.equal(sum.cp, cp);
    const promoted = await promoteMirror(dir, { force: false, logger: log });
    assert.ok(promoted.cpNumber >= cp, `promoted at CP ${promoted.cpNumber}`);
    assert.ok(!fs.existsSync(marker), 'promote removes the marker of the committed baseline');
  });
});
