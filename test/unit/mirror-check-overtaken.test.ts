/**
 * `nvmirror check` of a mirror its receiver holds runs in the receiver on the committed
 * CP, pinned like a reader's (MirrorReceiver.checkMirror). If the pin guard must end that
 * pin (a newer CP writes blocks of it: its source did not hold them), what the check read
 * proves nothing: it runs again on the newest committed CP, and after CHECK_ATTEMPTS_MAX
 * overtaken attempts it fails saying so; never an "ok" from a CP whose blocks changed under
 * it, and no pin left behind.
 *
 * A real source (an engine volume with MirrorSource) and `receive` with its exports, in
 * this process over loopback TCP. The guard's decision is played by calling the exports'
 * release() (what PinGuard calls) while the check runs.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { CHECK_ATTEMPTS_MAX, MirrorReceiver } from '../../src/mirror/receiver';
import { MirrorExports } from '../../src/mirror/exports';
import { MirrorSource } from '../../src/mirror/source';
import { createVolumeDir, openVolumeDir, type OpenedVolumeDir } from '../../src/volume/dir';
import { until } from '../mirror/helpers';

const MIB = 1024 * 1024;

describe('mirror check run by the receiver, overtaken by CPs that write blocks of its CP', function () {
  this.timeout(60_000);
  let tmp: string;
  let rx: MirrorReceiver;
  let exportsReg: MirrorExports;
  let source: MirrorSource;
  let vol: OpenedVolumeDir;
  let uuid: string;
  const lines: string[] = [];

  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-check-overtaken-'));
    const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(s) });
    const srcDir = path.join(tmp, 'src');
    const rxDir = path.join(tmp, 'rx');
    fs.mkdirSync(rxDir);
    await createVolumeDir(srcDir, { sizeBytes: 16 * MIB, nvramSizeBytes: 2 * MIB });
    exportsReg = new MirrorExports(logger.child({ side: 'exports' }));
    rx = new MirrorReceiver({ dir: rxDir, logger: logger.child({ side: 'receiver' }), exports: exportsReg });
    const port = (await rx.listen('127.0.0.1', 0)).port;
    source = new MirrorSource({
      dir: srcDir, peer: { host: '127.0.0.1', port }, mode: 'sync', policy: 'available', logger: logger.child({ side: 'source' }),
      link: { mirrorInsecure: true }, stallTimeoutMs: 8000,
    });
    vol = await openVolumeDir(srcDir, { readOnly: false, control: false, cpIntervalMs: 0, beforeRecovery: (t) => source.attachTree(t) });
    source.attachVolume(vol.volume);
    uuid = vol.volume.tree.volumeUuid;
    for (let i = 0; i < 8; i++) await vol.volume.write(i * 2 * MIB, Buffer.alloc(256 * 1024, 0x40 + i), false);
    await vol.volume.checkpoint();
    await until('in sync with equal roots', () => {
      const s = source.stats();
      return s.state === 'in-sync' && s.rootsEqual && s.destCp === s.sourceCp;
    }, 30_000);
  });

  after(async () => {
    await vol?.close();
    await source?.stop();
    source?.detach();
    await rx?.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const readers = (): number => exportsReg.readerStats(uuid).readers;

  it('a check nobody overtakes is ok on the committed CP and leaves no pin', async () => {
    const cp = source.stats().destCp;
    const r = await rx.checkMirror(uuid);
    assert.deepEqual(r.problems, []);
    assert.ok(r.ok);
    assert.ok(r.notes.some((n) => n.includes(`checked by the receiver (pid ${process.pid}) on CP ${cp}`)), r.notes.join('\n'));
    assert.ok(!r.notes.some((n) => /overtaken/.test(n)), r.notes.join('\n'));
    assert.equal(readers(), 0, 'the check\'s pin is gone');
  });

  it('overtaken once: runs again on the newest committed CP and says so; the released pin is logged', async () => {
    const cp = source.stats().destCp;
    lines.length = 0;
    const p = rx.checkMirror(uuid);
    // The check pinned its CP synchronously; the guard ends that pin (a CP must write its blocks).
    assert.equal(readers(), 1, 'the check pins the committed CP like a reader');
    assert.equal(exportsReg.release(uuid, [cp], 'test: a CP writes blocks of it'), 1);
    const r = await p;
    assert.ok(r.ok, r.problems.join('\n'));
    assert.ok(r.notes.some((n) => n === `the check was overtaken 1 time(s) (a newer CP wrote blocks of the CP it read: its source did not hold them) and ran again on CP ${cp}`), r.notes.join('\n'));
    assert.ok(lines.some((l) => /mirror check overtaken/.test(l) && l.includes(`"cp":${cp}`) && l.includes('"attempt":1')), 'the receiver logs the overtaken attempt');
    assert.ok(lines.some((l) => /mirror reader released/.test(l)), 'the release is logged like a reader\'s');
    assert.equal(readers(), 0, 'no pin left behind');
  });

  it(`overtaken on every attempt: fails after ${CHECK_ATTEMPTS_MAX} saying why, never ok, no pin left behind`, async () => {
    const cp = source.stats().destCp;
    let releases = 0;
    // Each attempt's pin ends as soon as it is made (the guard on every CP).
    const timer = setInterval(() => {
      releases += exportsReg.release(uuid, [cp], 'test: every CP writes blocks of it');
    }, 0);
    try {
      const p = rx.checkMirror(uuid);
      releases += exportsReg.release(uuid, [cp], 'test: every CP writes blocks of it');
      await assert.rejects(p, new RegExp(`^Error: the check was overtaken ${CHECK_ATTEMPTS_MAX} times, last on CP ${cp}: newer CPs wrote blocks of the CP it read \\(its source did not hold them\\); run check again$`));
    } finally {
      clearInterval(timer);
    }
    assert.equal(releases, CHECK_ATTEMPTS_MAX, 'each attempt pinned once and was released once');
    assert.equal(readers(), 0, 'no pin left behind');
    // The mirror is fine: the next check, not overtaken, is ok.
    const again = await rx.checkMirror(uuid);
    assert.ok(again.ok, again.problems.join('\n'));
  });
});
