/**
 * The rebuild of a RAID member while the volume is written (src/raid/rebuild.ts,
 * RaidDevice.startRebuild, replaceMemberServed), in process over member files:
 * - the rate limiter paces on the injected clock (virtual time, no wall clock);
 * - a RAID-5 member deleted, then rebuilt by the serving code path while, between the
 *   rebuilt stripes (at each pause of the rate limiter), a client overwrites data and a
 *   CP commits it (freeing stripes and writing new ones): at the end the new member is in
 *   service, scrub is clean, and with another member lost every block reads its newest
 *   version (so whatever was written during the rebuild reached the new member);
 * - status (raid.rebuild) carries progress and an ETA while it runs;
 * - RAID-1 (copies, in runs of stripes) and RAID-6 (P+Q, stripe by stripe): the replaced
 *   member alone (RAID-1) or with the fewest others (RAID-6) reads every block back.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import type { Clock } from '../../src/io/types';
import { createVolumeDir, openVolumeDir, openVolumeParts } from '../../src/volume/dir';
import { raidDeviceOf } from '../../src/volume/served';
import { readLabel } from '../../src/volume/label';
import { RATE_BURST_MS, RateLimiter, parseRate } from '../../src/util/rate';
import { scrubRaid } from '../../src/raid/scrub';
import type { RaidDevice, RebuildStatus } from '../../src/raid/raid-device';
import { REPLACE_MARKER_NAME, replaceMember, replaceMemberServed } from '../../src/volume/replace-member';
import { parseSize } from '../../src/util/size';

const MiB = 1024 * 1024;
const B = 4096;
const LBNS = 1200;

function block(lbn: number, version: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(lbn + 7 + version * 1_000_003, 2654435761) + i) >>> 0, i);
  return b;
}

/** Virtual time: a timer fires (after `hook`) as soon as it is set, the clock jumps by its delay. */
function virtualClock(hook?: () => Promise<void>): Clock & { t: number; sleeps: number } {
  const c = {
    t: 0,
    sleeps: 0,
    nowMs: () => c.t,
    setTimeout: (fn: () => void, ms: number) => {
      c.sleeps++;
      void (async () => {
        if (hook) await hook();
        c.t += ms;
        fn();
      })();
      return { cancel: () => undefined };
    },
  };
  return c;
}

describe('raid rebuild', function () {
  this.timeout(120_000);
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-raid-rebuild-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('the rate limiter lets through no more than the rate (plus one burst) on the injected clock', async () => {
    const clock = virtualClock();
    const rate = 1 * MiB;
    const lim = new RateLimiter(rate, clock);
    const total = 10 * MiB;
    for (let n = 0; n < total; n += 64 * 1024) await lim.take(64 * 1024);
    assert.ok(clock.t >= (total / rate) * 1000 - RATE_BURST_MS, `10 MiB at 1 MiB/s took ${clock.t} virtual ms`);
    assert.ok(clock.t <= (total / rate) * 1000 + 1, `and not much longer: ${clock.t} ms`);
    assert.equal(parseRate('50M', parseSize), 50 * MiB);
    assert.equal(parseRate('50M/s', parseSize), 50 * MiB);
    assert.throws(() => parseRate('1K', parseSize), /^Error: bad rate "1K": at least 64K per second$/);
    assert.throws(() => parseRate('fast', parseSize), /^Error: bad size "fast"/);
  });

  for (const [level, members, lose] of [[1, 3, [0, 2]], [6, 5, [1, 3]]] as [1 | 6, number, number[]][]) {
    it(`RAID-${level}: replace-member (${level === 1 ? 'copies in runs of stripes' : 'P+Q, stripe by stripe'}) leaves a member that holds every block`, async () => {
      const vol = path.join(tmp, `r${level}`);
      const names = Array.from({ length: members }, (_, i) => `m${i}.img`);
      await createVolumeDir(vol, { sizeBytes: 8 * MiB, nvramSizeBytes: 4 * MiB, raid: { level, stripeUnitBytes: 16 * 1024 }, members: names });
      const opened = await openVolumeDir(vol, { readOnly: false, control: false, cpIntervalMs: 0 });
      for (let lbn = 0; lbn < 1000; lbn++) await opened.volume.write(lbn * B, block(lbn, 0), false);
      await opened.volume.checkpoint();
      await opened.close();
      fs.rmSync(path.join(vol, `m${lose[0]!}.img`));
      const r = await replaceMember(vol, `m${lose[0]!}.img`, path.join(vol, 'new.img'));
      assert.ok(r.stripesRebuilt > 0);
      // Lose every other member but the new one can cover (RAID-1: all but one; RAID-6: two more).
      const gone = level === 1 ? names.filter((_, i) => i !== lose[0]) : lose.slice(1).map((i) => `m${i}.img`).concat(['m4.img']);
      for (const n of gone) fs.rmSync(path.join(vol, n), { force: true });
      const p = await openVolumeParts(vol, true);
      try {
        for (let lbn = 0; lbn < 1000; lbn++) assert.ok((await p.tree.readBlock(lbn))!.equals(block(lbn, 0)), `lbn ${lbn}`);
        assert.deepEqual((await p.tree.check()).problems, []);
      } finally {
        await p.tree.close();
        await p.dev.close();
        await p.region.close();
        await p.lock.release();
      }
    });
  }

  it('RAID-5: a member rebuilt while a client overwrites data and CPs commit it is whole at the end', async () => {
    const vol = path.join(tmp, 'vol');
    await createVolumeDir(vol, { sizeBytes: 16 * MiB, nvramSizeBytes: 4 * MiB, raid: { level: 5, stripeUnitBytes: 16 * 1024 }, members: ['m0.img', 'm1.img', 'm2.img', 'm3.img'] });
    const version = new Map<number, number>();
    let opened = await openVolumeDir(vol, { readOnly: false, control: false, cpIntervalMs: 0 });
    for (let lbn = 0; lbn < LBNS; lbn++) {
      await opened.volume.write(lbn * B, block(lbn, 0), false);
      version.set(lbn, 0);
    }
    await opened.volume.checkpoint();
    await opened.close();
    fs.rmSync(path.join(vol, 'm1.img'));

    opened = await openVolumeDir(vol, { readOnly: false, control: false, cpIntervalMs: 0 });
    const volume = opened.volume;
    const raid = raidDeviceOf(volume)!;
    assert.equal(raid.health().state, 'degraded');
    // Between rebuilt stripes: overwrite 40 blocks (a new version) and commit them.
    let round = 0;
    const seen: RebuildStatus[] = [];
    const clock = virtualClock(async () => {
      const st = raid.health().rebuild;
      if (st) seen.push(st);
      if (round >= 40) return;
      round++;
      for (let k = 0; k < 40; k++) {
        const lbn = (round * 97 + k * 29) % LBNS;
        const v = (version.get(lbn) ?? 0) + 1;
        await volume.write(lbn * B, block(lbn, v), false);
        version.set(lbn, v);
      }
      await volume.checkpoint();
    });
    const r = await replaceMemberServed(vol, opened.label, volume, raid, { old: 'm1.img', new: path.join(vol, 'n1.img'), rateBytesPerSec: 64 * 1024 }, clock);
    assert.ok(round >= 5, `the client wrote during the rebuild (${round} rounds)`);
    assert.ok(r.stripesRebuilt > 0 && r.served);
    assert.ok(seen.some((s) => s.doneBytes > 0 && s.doneBytes < s.totalBytes && s.etaSeconds !== undefined && s.rateBytesPerSec === 64 * 1024), 'status showed progress with an ETA');
    assert.equal(raid.health().state, 'online');
    assert.equal(raid.health().memberStatus[1]!.name, 'n1.img');
    assert.equal(raid.health().rebuild, undefined);
    assert.ok(!fs.existsSync(path.join(vol, REPLACE_MARKER_NAME)));
    assert.equal((await readLabel(vol)).members[1]!.path, 'n1.img');
    const s = await scrubRaid(volume.tree as never, raid as RaidDevice, { repair: false });
    assert.deepEqual([s.ok, s.checksumErrors, s.parityErrors, s.stripesUnverifiable], [true, 0, 0, 0]);
    await opened.close();

    // The new member holds every write: lose another member and read everything.
    fs.rmSync(path.join(vol, 'm3.img'));
    const p = await openVolumeParts(vol, true);
    try {
      assert.equal((p.dev as RaidDevice).health().memberStatus[1]!.state, 'online');
      for (let lbn = 0; lbn < LBNS; lbn++) assert.ok((await p.tree.readBlock(lbn))!.equals(block(lbn, version.get(lbn)!)), `lbn ${lbn} version ${version.get(lbn)}`);
      assert.deepEqual((await p.tree.check()).problems, []);
    } finally {
      await p.tree.close();
      await p.dev.close();
      await p.region.close();
      await p.lock.release();
    }
  });
});
