/**
 * The source's timing on a simulated clock (MirrorSourceOptions.clock, and through it the
 * link's): a destination that takes the connection and never answers HELLO is dropped
 * when the stall timeout has passed (at the first once-a-second check after it), not
 * before, with the reason in status; and it is redialed after the backoff, which doubles
 * from 200 ms to its 5 s cap, to the millisecond. The source and its engine volume run in
 * this process on real files; the peer is an in-memory stream (the network seam) that
 * swallows what it is sent; only time is simulated.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import type * as net from 'net';
import { Duplex } from 'stream';
import pino from 'pino';
import { MirrorSource } from '../../src/mirror/source';
import { createVolumeDir, openVolumeDir, type OpenedVolumeDir } from '../../src/volume/dir';
import { SimClock } from '../../src/sim/clock';

const STALL_MS = 8000;
/** The link's redial backoff: RECONNECT_MS_MIN doubling to RECONNECT_MS_MAX (source-link.ts). */
const BACKOFF_MS = [200, 400, 800, 1600, 3200, 5000, 5000];

describe('mirror source: the stall timeout and the redial backoff on a simulated clock', function () {
  this.timeout(60_000);
  let tmp: string;
  let vol: OpenedVolumeDir | undefined;
  let source: MirrorSource | undefined;

  afterEach(async () => {
    await source?.stop();
    source?.detach();
    await vol?.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('a destination that never answers HELLO: dropped once the stall timeout passed, not before; redialed after 200 ms doubling to 5 s', async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-src-timeouts-'));
    const dir = path.join(tmp, 'vol');
    await createVolumeDir(dir, { sizeBytes: 8 << 20, nvramSizeBytes: 4 << 20 });
    const clock = new SimClock();
    const dials: number[] = [];
    let bytesToPeer = 0;
    const dial = (): net.Socket => {
      dials.push(clock.nowMs());
      // Takes everything, answers nothing: a wedged receiver, or a port that is not one.
      const d = new Duplex({
        read() {},
        write(chunk: Buffer, _enc, cb) {
          bytesToPeer += chunk.length;
          cb();
        },
      });
      Object.assign(d, { remoteAddress: 'sim', remotePort: 1 });
      setImmediate(() => d.emit('connect'));
      return d as unknown as net.Socket;
    };
    const ticksFrom = clock.nowMs(); // the source checks once a second from its start
    const s = new MirrorSource({
      dir, peer: { host: 'sim', port: 1 }, mode: 'async', policy: 'available', logger: pino({ level: 'silent' }),
      link: { mirrorInsecure: true }, stallTimeoutMs: STALL_MS, dial, clock,
    });
    source = s;
    vol = await openVolumeDir(dir, { readOnly: false, control: false, cpIntervalMs: 0, beforeRecovery: (t) => s.attachTree(t) });
    s.attachVolume(vol.volume);
    await clock.advanceBy(0);
    assert.equal(dials.length, 1, 'dialed once');
    for (let i = 0; i < BACKOFF_MS.length; i++) {
      const t0 = dials[i]!;
      for (let k = 0; k < 50 && bytesToPeer === 0; k++) await clock.advanceBy(0);
      assert.ok(bytesToPeer > 0, `connection ${i + 1}: the source sent its HELLO`);
      const errorBefore = s.stats().lastError;
      // The check runs once a second: the first one more than STALL_MS after HELLO drops.
      const dropAt = ticksFrom + (Math.floor((t0 + STALL_MS - ticksFrom) / 1000) + 1) * 1000;
      await clock.advanceBy(dropAt - 1 - clock.nowMs());
      assert.equal(dials.length, i + 1, `connection ${i + 1} redialed before it was dropped`);
      assert.equal(s.stats().lastError, errorBefore, `connection ${i + 1} dropped before the stall timeout`);
      await clock.advanceBy(1);
      assert.match(String(s.stats().lastError), new RegExp(`no WELCOME from the destination within ${STALL_MS} ms of HELLO`), `connection ${i + 1}: status says why`);
      // The redial: not a millisecond before the backoff.
      await clock.advanceBy(BACKOFF_MS[i]! - 1);
      assert.equal(dials.length, i + 1, `redial ${i + 1} before its ${BACKOFF_MS[i]} ms backoff`);
      bytesToPeer = 0;
      await clock.advanceBy(1);
      assert.equal(dials.length, i + 2, `redial ${i + 1} after ${BACKOFF_MS[i]} ms`);
      assert.equal(dials[i + 1]! - dropAt, BACKOFF_MS[i]);
    }
  });
});
