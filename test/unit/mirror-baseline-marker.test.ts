/**
 * A baseline's marker (DIR/baseline.partial) left by a stop between the baseline's commit
 * (its superblock synced) and the marker's removal: the mirror has committed the baseline,
 * so the next open removes the marker and serves the committed image, `check` says so as
 * a note (not a problem), `status` shows the committed CP, and a failover's `promote`
 * takes it (it refused the mirror as an interrupted baseline). Left in place it read as a baseline still in progress (no
 * view, no exports) and offered the source a resume of a CP this mirror already holds,
 * whose commit the mirror then refused ("not newer than the committed CP"): a loop until
 * the source stopped keeping that baseline, then a whole baseline again. A marker
 * toward a newer CP than the committed one is a baseline in progress and stays.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { CpApplier } from '../../src/mirror/apply';
import { BASELINE_MARKER_NAME, MIRROR_LABEL_NAME, MirrorDir, checkMirrorDir, mirrorDirSummary, newestSuperblock, type MirrorLabel } from '../../src/mirror/mirror-dir';
import { promoteMirror } from '../../src/mirror/promote';
import { SlabPool } from '../../src/mirror/slab-pool';
import { MsgType } from '../../src/mirror/wire';
import { RING_SLOTS } from '../../src/tree/layout';
import { BlockTree } from '../../src/tree/tree';
import { Slicer } from '../../src/util/work';

const UUID = 'ba5e11e0-0000-4000-8000-0000000a11ce';
const BS = 4096;
const DEVICE_BLOCKS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;

function blockOf(seed: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

describe('mirror: the marker of a baseline that committed', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-marker-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('is removed by the next open, which serves the committed image, and by promote; a marker toward a newer CP stays a baseline in progress', async () => {
    // The source: a few CPs on a memory device.
    const srcDev = new MemoryBlockDevice(DEVICE_BLOCKS);
    await BlockTree.format(srcDev, { sizeBytes: VOLUME_BYTES, volumeUuid: UUID });
    const src = await BlockTree.open(srcDev);
    for (let cp = 0; cp < 3; cp++) await src.commitCp(Array.from({ length: 40 }, (_, i) => ({ lbn: i * 7 + cp, data: blockOf(cp * 100 + i) })), { nvlogSeq: cp + 1, nvlogEpoch: 1 });
    const want = Buffer.alloc(VOLUME_BYTES);
    await src.readRange(0, VOLUME_BYTES / BS, want);
    await src.close();
    const top = await newestSuperblock(srcDev, UUID);
    assert.ok(top);
    const cp = top.sb.cpNumber;

    // A baseline of every block the source holds, applied and committed by a real mirror directory.
    const dir = path.join(tmp, UUID); // the receiver's DIR/<source-uuid>
    const hello = { sourceUuid: UUID, sizeBytes: VOLUME_BYTES, deviceBlocks: DEVICE_BLOCKS, nvramBytes: 4 * 1024 * 1024 };
    let mirror = await MirrorDir.openOrCreate(tmp, hello, log);
    const applier = new CpApplier(mirror, new SlabPool(64 * BS, 4), undefined, new Slicer(), log);
    await applier.begin({ type: MsgType.CpBegin, cp, baseCp: -1, kind: 'resync' });
    const marker = path.join(dir, BASELINE_MARKER_NAME);
    assert.ok(fs.existsSync(marker), 'a baseline in progress is marked');
    const markerText = fs.readFileSync(marker, 'utf8');
    const b = Buffer.alloc(BS);
    let sent = 0;
    for (let p = RING_SLOTS; p < DEVICE_BLOCKS; p++) {
      await srcDev.readBlocks(p, 1, b);
      if (!b.some((x) => x !== 0)) continue;
      await applier.blocks({ type: MsgType.CpBlocks, cp, pbas: [p], data: Buffer.from(b) });
      sent++;
    }
    await applier.commit({ type: MsgType.CpCommit, cp, slot: cp % RING_SLOTS, blockCount: sent, superblock: top.raw });
    await applier.idle();
    assert.equal(mirror.committedCp, cp);
    assert.equal(mirror.baselinePartial, false);
    assert.ok(!fs.existsSync(marker), 'the commit removes the marker');
    await mirror.close();

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
