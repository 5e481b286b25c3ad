/**
 * `demote` stopped where a crash could stop it, and run again: in the copy of this side's
 * state (step 2), after recording what step 3 does, and after the volume label was renamed
 * away but before the mirror label was written. Each re-run ends where an uninterrupted
 * demote ends: one complete copy of the volume (servable, the same bytes), the directory no
 * longer a volume, the member labelled as the mirror of its volume at the CP it stopped at.
 * Before, a re-run failed on the copy it had begun (EEXIST) or on the mirror directory it
 * had made ("already exists"), and a stop between the mirror label and the volume label's
 * rename left a directory that was both.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { demoteVolume, type DemoteStep } from '../../src/mirror/demote';
import type { MirrorLabel } from '../../src/mirror/mirror-dir';
import { createVolumeDir, openVolumeDir } from '../../src/volume/dir';

const BS = 4096;
const VOLUME_BYTES = 8 * 1024 * 1024;

describe('mirror: demote interrupted and run again', function () {
  this.timeout(60_000);
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-demote-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  /** A volume with a few CPs of data; returns its image. */
  async function volumeWithData(dir: string): Promise<Buffer> {
    await createVolumeDir(dir, { sizeBytes: VOLUME_BYTES, nvramSizeBytes: 1024 * 1024 });
    const want = Buffer.alloc(VOLUME_BYTES);
    const v = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0 });
    try {
      for (let i = 0; i < 40; i++) {
        const b = Buffer.alloc(BS, (i % 250) + 1);
        const off = ((i * 97) % (VOLUME_BYTES / BS)) * BS;
        await v.volume.write(off, b, false);
        b.copy(want, off);
        if (i % 10 === 9) await v.volume.checkpoint();
      }
      // Some left in the NVRAM: the demote's own open replays and commits them.
      await v.volume.write(VOLUME_BYTES - BS, Buffer.alloc(BS, 0xee), false);
      want.fill(0xee, VOLUME_BYTES - BS);
    } finally {
      await v.close();
    }
    return want;
  }

  async function assertDemoted(dir: string, into: string, want: Buffer): Promise<void> {
    const kept = fs.readdirSync(dir).filter((n) => n.startsWith('pre-failback-cp'));
    assert.equal(kept.length, 1, `one copy of this side's state: ${kept.join(', ')}`);
    assert.ok(!fs.existsSync(path.join(dir, 'nvmirror.json')), 'the directory is no longer a volume');
    assert.ok(fs.existsSync(path.join(dir, 'nvmirror.json.demoted')));
    const uuid = fs.readdirSync(into)[0]!;
    const ml = JSON.parse(fs.readFileSync(path.join(into, uuid, 'mirror.json'), 'utf8')) as MirrorLabel;
    assert.equal(ml.sourceUuid, uuid);
    assert.equal(ml.memberPath, path.join(dir, 'member-0.img'), 'the member, in place');
    assert.equal(ml.demoted?.fromDir, dir);
    assert.equal(ml.demoted?.keptIn, path.join(dir, kept[0]!));
    assert.equal(`pre-failback-cp${ml.demoted?.cp}`, kept[0], 'the copy is of the CP the mirror label names');
    await assert.rejects(openVolumeDir(dir, { readOnly: true, control: false, cpIntervalMs: 0 }), /was demoted/);
    await assert.rejects(demoteVolume(dir, into, { logger: log }), /was demoted/, 'a finished demote is not done twice');
    const opened = await openVolumeDir(path.join(dir, kept[0]!), { readOnly: true, control: false, cpIntervalMs: 0 });
    try {
      assert.ok((await opened.volume.read(0, VOLUME_BYTES)).equals(want), 'the kept copy holds every write');
    } finally {
      await opened.close();
    }
  }

  it('--into a volume directory or a mirror directory is refused before anything is written', async () => {
    const dir = path.join(tmp, 'vol');
    await volumeWithData(dir);
    const other = path.join(tmp, 'other');
    await createVolumeDir(other, { sizeBytes: VOLUME_BYTES, nvramSizeBytes: 1024 * 1024 });
    const mirror = path.join(tmp, 'rx', '0d0d0d0d-4567-49ef-8011-223344556677');
    fs.mkdirSync(mirror, { recursive: true });
    fs.writeFileSync(path.join(mirror, 'mirror.json'), '{}\n');
    const before = fs.readdirSync(dir).sort();
    await assert.rejects(demoteVolume(dir, other, { logger: log }), /^Error: --into: .*other is a volume directory \(nvmirror\.json\)/);
    await assert.rejects(demoteVolume(dir, mirror, { logger: log }), /^Error: --into: .* is a mirror directory \(mirror\.json\): give the directory that holds it/);
    assert.deepEqual(fs.readdirSync(dir).sort(), before, 'the volume changed');
    assert.ok(!fs.readdirSync(other).some((n) => /^[0-9a-f-]{36}$/.test(n)), 'a mirror directory was made inside a volume directory');
  });

  const stops: DemoteStep[] = ['member-copied', 'recorded', 'renamed'];
  for (const stop of stops) {
    it(`stopped at "${stop}", the re-run finishes it`, async () => {
      const dir = path.join(tmp, 'vol');
      const into = path.join(tmp, 'rx');
      const want = await volumeWithData(dir);
      const stopped = demoteVolume(dir, into, { logger: log, afterStep: (s) => { if (s === stop) throw new Error('stopped here'); } });
      await assert.rejects(stopped, /stopped here/);
      if (stop === 'renamed') {
        await assert.rejects(openVolumeDir(dir, { readOnly: true, control: false, cpIntervalMs: 0 }), /was demoted/, 'no longer a volume once its label is renamed');
        assert.ok(!fs.existsSync(path.join(into)) || fs.readdirSync(into).every((u) => !fs.existsSync(path.join(into, u, 'mirror.json'))), 'and not yet a mirror');
      }
      if (stop !== 'member-copied') await assert.rejects(demoteVolume(dir, path.join(tmp, 'elsewhere'), { logger: log }), /run it again with --into/, 'finished where it began');
      const r = await demoteVolume(dir, into, { logger: log });
      assert.equal(r.mirrorDir, path.join(into, r.volumeUuid));
      await assertDemoted(dir, into, want);
    });
  }
});
