/**
 * Reconnects at the worst moments, the source and `receive` in this process, joined by a
 * relay the test controls:
 *
 * A source that reconnects while the destination is still committing the CP its old
 * connection sent: the destination's WELCOME must name the CP it will hold once that
 * commit ends, or the source resyncs from the CP before it and the destination rightly
 * refuses ("CP n is built on CP m, but this mirror holds CP m+1"). The mirror fault suite
 * hit this once under 20 % loss and a cut; here it is made to happen every time: the
 * source and `receive` run in this process, joined by a relay the test can cut, and the
 * destination's commit of one CP is held back until the source has reconnected.
 * (Fails without the receiver waiting for an ended session's message in progress.)
 *
 * A source process whose first HELLO was taken but whose WELCOME was lost on the way:
 * the destination stored the records the source forwarded behind that HELLO, past the
 * seq the process started at. The next HELLO (same process, same start seq) must be
 * welcomed, not refused as if the mirror held records the source lost (mirror-ahead):
 * the destination's log names the process that stored them. (Fails without the writer
 * check in standing.ts / dest-log.ts.)
 *
 * A catch-up whose records overflow the destination's log (it drops them until a
 * committed CP covers them), still dropping once the source is in sync again: no CP may
 * reference a dropped record. The fresh-clone CI met this once under a flapping link
 * ("CP 62: reference to record 18587 is not in the log"); here two commits are held
 * back to make it happen every time. (Fails, with that refusal, without the log's acks
 * naming no record referable while it drops: dest-log.ts referableFromSeq.)
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { MirrorSource } from '../../src/mirror/source';
import { MirrorDir } from '../../src/mirror/mirror-dir';
import { createVolumeDir, openVolumeDir, type OpenedVolumeDir } from '../../src/volume/dir';
import { sleep, until } from './helpers';

const MIB = 1024 * 1024;
/** How long the destination's commit is held back: well past the source's first reconnect (200 ms). */
const COMMIT_HOLD_MS = 1500;
const CONVERGE_MS = 20_000;


/**
 * A TCP relay to `port` whose connections the test can cut (both ends destroyed at once, no
 * FIN first), which can swallow what the destination sends (`swallow = true`) and turn
 * new connections away (`refuse = true`).
 */
async function relay(port: number): Promise<{ port: number; cut: () => void; close: () => Promise<void>; refuse: boolean; swallow: boolean; swallowed: number }> {
  const pairs = new Set<[net.Socket, net.Socket]>();
  const server = net.createServer((client) => {
    if (r.refuse) {
      client.destroy();
      return;
    }
    const up = net.connect(port, '127.0.0.1');
    const pair: [net.Socket, net.Socket] = [client, up];
    pairs.add(pair);
    const gone = (): void => {
      client.destroy();
      up.destroy();
      pairs.delete(pair);
    };
    client.on('error', gone).on('close', gone);
    up.on('error', gone).on('close', gone);
    client.pipe(up);
    up.on('data', (d: Buffer) => {
      if (r.swallow) r.swallowed += d.length;
      else client.write(d);
    });
  });
  await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
  const r = {
    refuse: false,
    swallow: false,
    swallowed: 0,
    port: (server.address() as net.AddressInfo).port,
    cut: () => {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    close: () => new Promise<void>((res) => server.close(() => res())),
  };
  return r;
}

describe('mirror: a reconnect while the destination commits a CP', function () {
  this.timeout(60_000);
  let tmp: string;
  const applyCommit = MirrorDir.prototype.applyCommit;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-reconnect-')); });
  after(() => {
    MirrorDir.prototype.applyCommit = applyCommit;
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** A source volume directory, a receiver in this process and a relay to it, logging into `lines`. */
  async function setUp(src: string, rxName: string) {
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(s) });
    const srcDir = path.join(tmp, src);
    const rxDir = path.join(tmp, rxName);
    fs.mkdirSync(rxDir);
    await createVolumeDir(srcDir, { sizeBytes: 64 * MIB, nvramSizeBytes: 4 * MIB });
    const rx = new MirrorReceiver({ dir: rxDir, logger: logger.child({ side: 'receiver' }) });
    const addr = await rx.listen('127.0.0.1', 0);
    return { lines, logger, srcDir, rx, link: await relay(addr.port) };
  }

  /**
   * A source process on `rig`'s volume, through its relay, for the length of `phase` (its
   * volume open, CPs only when asked), then stopped.
   */
  async function withSource(
    rig: Awaited<ReturnType<typeof setUp>>,
    phase: (v: OpenedVolumeDir['volume'], source: MirrorSource) => Promise<void>,
    stallTimeoutMs?: number,
  ): Promise<void> {
    const source = new MirrorSource({
      dir: rig.srcDir, peer: { host: '127.0.0.1', port: rig.link.port }, mode: 'sync', policy: 'available',
      logger: rig.logger.child({ side: 'source' }), link: { mirrorInsecure: true }, ...(stallTimeoutMs !== undefined ? { stallTimeoutMs } : {}),
    });
    let vol: OpenedVolumeDir | undefined;
    try {
      vol = await openVolumeDir(rig.srcDir, { readOnly: false, control: false, cpIntervalMs: 0, beforeRecovery: (t) => source.attachTree(t) });
      source.attachVolume(vol.volume);
      await phase(vol.volume, source);
    } finally {
      await vol?.close();
      await source.stop();
      source.detach();
    }
  }

  /** A first write and CP, mirrored: the baseline done, roots equal. */
  async function firstCp(v: OpenedVolumeDir['volume'], source: MirrorSource): Promise<void> {
    await v.write(0, Buffer.alloc(64 * 1024, 1), false);
    await v.checkpoint();
    await until('the baseline and first CP', () => source.stats().state === 'in-sync' && source.stats().rootsEqual, CONVERGE_MS);
  }

  it('the source is welcomed at the CP being committed and goes on from it: no refusal, roots equal', async () => {
    const rig = await setUp('src', 'rx');
    const { lines, rx, link } = rig;
    try {
      await withSource(rig, async (v, source) => {
        await firstCp(v, source);
        const heldCp = source.stats().sourceCp + 1;

        // The next CP's commit on the destination: the link is cut as it starts, and it ends
        // only after the source has had time to reconnect and say HELLO.
        let held = 0;
        MirrorDir.prototype.applyCommit = async function (this: MirrorDir, ...args: Parameters<MirrorDir['applyCommit']>) {
          if (args[0] === heldCp && held++ === 0) {
            link.cut();
            await sleep(COMMIT_HOLD_MS);
          }
          return applyCommit.apply(this, args);
        };
        await v.write(MIB, Buffer.alloc(256 * 1024, 2), false);
        await v.checkpoint();
        await v.write(2 * MIB, Buffer.alloc(64 * 1024, 3), false);
        await v.checkpoint();
        await until(`roots equal at CP ${heldCp + 1} or later`, () => {
          const s = source.stats();
          return s.state === 'in-sync' && s.rootsEqual && s.destCp >= heldCp + 1;
        }, CONVERGE_MS);
        assert.equal(held, 1, 'the commit of the CP in flight was held back once');
        const connected = lines.filter((l) => /"msg":"mirror connected"/.test(l)).map((l) => JSON.parse(l) as { destCp: number });
        assert.ok(connected.length >= 2, `the source reconnected (connected ${connected.length} times)`);
        // The WELCOME after the cut names the CP whose commit was in progress (the one the
        // mirror holds once it ends), not the one before it.
        assert.equal(connected[1]!.destCp, heldCp, `WELCOME after the cut said CP ${connected[1]!.destCp}; the destination was committing CP ${heldCp}`);
        const refusals = lines.filter((l) => /mirror stream refused|built on CP/.test(l));
        assert.deepEqual(refusals, [], 'the destination refused the honest source\'s stream');
      });
    } finally {
      MirrorDir.prototype.applyCommit = applyCommit;
      await rx.close();
      await link.close();
    }
  });

  it('a catch-up that overflows the destination\'s log: while it drops records no CP references one (they go as data); never refused, roots equal', async () => {
    // 4 MiB of NVRAM: the destination's log is 16 MiB (its minimum).
    const rig = await setUp('src3', 'rx3');
    const { lines, rx, link } = rig;
    // Commits held while `holdNext` is set: the first commit after it waits for release().
    let holdNext = false;
    const heldCps: number[] = [];
    let release: (() => void) | undefined;
    MirrorDir.prototype.applyCommit = async function (this: MirrorDir, ...args: Parameters<MirrorDir['applyCommit']>) {
      if (holdNext) {
        holdNext = false;
        heldCps.push(args[0]);
        await new Promise<void>((r) => (release = r));
      }
      return applyCommit.apply(this, args);
    };
    try {
      await withSource(rig, async (v, source) => {
        try {
          await firstCp(v, source);
          // The destination misses a CP: the next connection catches up from a base that
          // precedes its stream, so the destination can release none of its records until
          // the catch-up commits.
          link.refuse = true;
          link.cut();
          await until('the source saw the cut', () => source.stats().state !== 'in-sync', CONVERGE_MS);
          await v.write(MIB, Buffer.alloc(64 * 1024, 2), false);
          await v.checkpoint();
          holdNext = true;
          link.refuse = false;
          await until('the catch-up\'s commit held', () => heldCps.length === 1, CONVERGE_MS);
          // Meanwhile the clients are answered from the NVRAM (policy available) and their
          // records overflow the destination's log.
          for (let i = 0; i < 24; i++) await v.write((4 + i) * MIB, Buffer.alloc(MIB, 0x10 + i), false);
          await until('records dropped', () => rx.stats().mirrors[0]!.recordsDropped > 0, CONVERGE_MS);
          // The catch-up goes on (its later CPs); the next commit is held too, and a write made
          // meanwhile is dropped after the CPs it ships: the log is still dropping in sync.
          holdNext = true;
          release!();
          await until('a later commit held', () => heldCps.length === 2, CONVERGE_MS);
          await sleep(300); // the CP the catch-up's end asks for runs first
          const droppedBefore = rx.stats().mirrors[0]!.recordsDropped;
          const late = v.write(40 * MIB, Buffer.alloc(64 * 1024, 0x33), false);
          await until('the late write\'s record dropped', () => rx.stats().mirrors[0]!.recordsDropped > droppedBefore, CONVERGE_MS);
          release!();
          await until('in sync', () => source.stats().state === 'in-sync' && source.stats().destCp === source.stats().sourceCp, CONVERGE_MS);
          await v.checkpoint(); // ships the late write's block: as data, not as a reference to its dropped record
          await late;
          await v.checkpoint();
          await until('roots equal', () => {
            const s = source.stats();
            return s.state === 'in-sync' && s.rootsEqual && s.destCp === s.sourceCp;
          }, CONVERGE_MS);
          const bad = lines.filter((l) => /mirror stream refused|is not in the log|record the log dropped/.test(l));
          assert.deepEqual(bad, [], 'a CP referenced a record the destination dropped');
          assert.ok(rx.stats().mirrors[0]!.recordsDropped > 0);
        } finally {
          // Before the volume closes (its last CP must not wait on a held commit).
          holdNext = false;
          release?.();
        }
      });
    } finally {
      MirrorDir.prototype.applyCommit = applyCommit;
      await rx.close();
      await link.close();
    }
  });

  it('a source process whose first WELCOME was lost, after the destination stored its records: welcomed on the next HELLO, never refused as mirror-ahead', async () => {
    const rig = await setUp('src2', 'rx2');
    const { lines, rx, link } = rig;
    const run = (phase: (v: OpenedVolumeDir['volume'], source: MirrorSource) => Promise<void>): Promise<void> => withSource(rig, phase, 1000);
    try {
      // A first process: baseline, a CP on both sides, then a clean stop.
      await run(firstCp);
      await until('the first connection gone', () => rx.stats().mirrors.every((m) => !m.connected), CONVERGE_MS);
      const heldBefore = rx.stats().mirrors[0]!.heldSeq;
      // A second process: the destination takes its first HELLO, but its WELCOME never
      // arrives; the writes made meanwhile go to the destination behind that HELLO and are
      // stored there (the client is answered once the source gives up on the WELCOME).
      link.swallow = true;
      await run(async (v, source) => {
        await until('the second process said HELLO', () => rx.stats().mirrors.some((m) => m.connected), CONVERGE_MS);
        const from = lines.length;
        const writes = Promise.all([0, 1, 2, 3].map((i) => v.write((8 + i) * MIB, Buffer.alloc(64 * 1024, 0x20 + i), false)));
        await until('the destination stored the records behind the HELLO', () => rx.stats().mirrors[0]!.heldSeq >= heldBefore + 4, CONVERGE_MS);
        await writes; // answered once the source gives up on the WELCOME (policy available)
        assert.ok(link.swallowed > 0, 'the WELCOME was swallowed');
        await until('the source gave up on that connection', () => lines.slice(from).some((l) => /"side":"source"/.test(l) && /"msg":"mirror disconnected"/.test(l)), CONVERGE_MS);
        link.swallow = false;
        link.cut();
        // It says HELLO again with the same start seq: welcomed, then in sync.
        await v.checkpoint();
        await until('in sync again, roots equal', () => source.stats().state === 'in-sync' && source.stats().rootsEqual && source.stats().destCp === source.stats().sourceCp, CONVERGE_MS);
      });
      const refused = lines.filter((l) => /mirror-ahead|is current: it holds records|mirror stream refused|do not stand in step/.test(l));
      assert.deepEqual(refused, [], 'the source was refused for its own records');
    } finally {
      await rx.close();
      await link.close();
    }
  });
});
