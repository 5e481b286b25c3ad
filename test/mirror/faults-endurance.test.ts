/**
 * Endurance (issue 8): a seeded random mix of the network faults of faults-net.test.ts
 * (loss, silent cuts, delay, link flaps, dropped connections, stalls, flipped bits,
 * truncated and duplicated streams, sometimes two at once) under a pipelined writer, for
 * a bounded time, in sync and in async mode. At the end every fault is lifted and the
 * mirror must converge: roots equal, `verify` identical from both sides, byte-identical
 * exports, and every acknowledged write reads back from both sides; or the test fails
 * with its seed and the schedule it ran.
 *
 * NVMIRROR_SOAK_SECONDS sets the time per mode (default ENDURANCE_SECONDS_DEFAULT, for
 * CI); NVMIRROR_SEED replays a run's schedule (the timing of the processes is not
 * replayed, only the faults and the writes).
 */
import * as assert from 'assert';
import { netnsAvailable } from '../net/netns';
import { AckedWriter, Rig, prng, samplingMemory, seedFromEnv, sleep } from './faults-harness';

const RECEIVER_PORT = 17220;
const RELAY_PORT = 17221;
const ENDURANCE_SECONDS_DEFAULT = 35;
/** Longest a single fault lasts (ms). */
const FAULT_MS_MAX = 4000;
const STALL_TIMEOUT_MS = 2000;

function soakSeconds(): number {
  const s = process.env.NVMIRROR_SOAK_SECONDS;
  if (s === undefined) return ENDURANCE_SECONDS_DEFAULT;
  const n = Number(s);
  if (!(Number.isFinite(n) && n >= 5)) throw new Error(`NVMIRROR_SOAK_SECONDS must be a number >= 5, got ${s}`);
  return n;
}

type FaultName = 'loss' | 'cut' | 'delay' | 'flap' | 'drop' | 'stall' | 'flip' | 'truncate' | 'duplicate' | 'calm';
const FAULTS: readonly FaultName[] = ['loss', 'cut', 'delay', 'flap', 'drop', 'stall', 'flip', 'truncate', 'duplicate', 'calm'];

/** Applies one fault (picked with `rnd`) and returns its description; clearFaults() lifts it. */
async function apply(r: Rig, f: FaultName, rnd: () => number, holdMs: number): Promise<string> {
  switch (f) {
    case 'loss': {
      const pct = 5 + Math.floor(rnd() * 30);
      await r.pair.blackhole(true, pct);
      return `loss ${pct} %`;
    }
    case 'cut':
      await r.pair.blackhole(true, 100);
      return 'silent cut';
    case 'delay': {
      const ms = 10 + Math.floor(rnd() * 140);
      await r.relay.set({ delayMs: ms });
      return `delay ${ms} ms each way`;
    }
    case 'flap': {
      // Down for part of the hold, then up (the caller's hold covers the rest).
      await r.pair.linkDown();
      await sleep(Math.floor(holdMs / 2));
      await r.pair.linkUp();
      return `link down ${Math.floor(holdMs / 2)} ms`;
    }
    case 'drop':
      await r.relay.dropConnections();
      return 'connections dropped';
    case 'stall':
      await r.relay.set({ stall: true });
      return 'stalled';
    case 'flip': {
      const every = 1024 + Math.floor(rnd() * 65536);
      await r.relay.set({ flipEveryBytes: every, flipDirection: rnd() < 0.8 ? 'toTarget' : 'both' });
      return `a bit flipped every ${every} bytes`;
    }
    case 'truncate': {
      const n = 100 + Math.floor(rnd() * 200_000);
      await r.relay.set({ cutAfterBytes: n, cutDirection: rnd() < 0.8 ? 'toTarget' : 'toClient' });
      await r.relay.dropConnections();
      return `streams truncated after ${n} bytes`;
    }
    case 'duplicate': {
      const p = Math.round((0.01 + rnd() * 0.5) * 100) / 100;
      await r.relay.set({ duplicateProbability: p });
      return `chunks duplicated with p ${p}`;
    }
    case 'calm':
      return 'no fault';
  }
}

describe('mirror faults: endurance (a seeded random mix of network faults)', function () {
  const seconds = soakSeconds();
  this.timeout((2 * seconds + 300) * 1000);
  const seed = seedFromEnv();
  const figures: string[] = [];

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`network namespaces unavailable in CI: ${why}`);
      this.skip();
    }
  });

  after(() => {
    if (figures.length > 0) process.stdout.write(`      figures (seed ${seed}):\n${figures.map((f) => `        ${f}`).join('\n')}\n`);
  });

  for (const mode of ['sync', 'async'] as const) {
    it(`${mode}: ${seconds} s of random faults under writes, then both sides identical and every acknowledged write on both`, async () => {
      const rnd = prng(seed + (mode === 'sync' ? 0 : 1));
      const schedule: string[] = [];
      const rig = await Rig.start({ mode, prefix: 'nvfault', receiverPort: RECEIVER_PORT, relayPort: RELAY_PORT, seed, stallTimeoutMs: STALL_TIMEOUT_MS });
      try {
        const w = new AckedWriter(rig.srcSock, seed + (mode === 'sync' ? 7 : 8));
        await w.start();
        const t0 = Date.now();
        const pids = { source: rig.source?.pid, receiver: rig.receiver?.pid };
        const { peakKiB } = await samplingMemory(pids, 250, async () => {
          try {
            while (Date.now() - t0 < seconds * 1000) {
              const holdMs = 500 + Math.floor(rnd() * (FAULT_MS_MAX - 500));
              const first = FAULTS[Math.floor(rnd() * FAULTS.length)]!;
              const what = [await apply(rig, first, rnd, holdMs)];
              // Sometimes two at once (on different layers, or both on the relay).
              if (rnd() < 0.25) what.push(await apply(rig, FAULTS[Math.floor(rnd() * FAULTS.length)]!, rnd, holdMs));
              schedule.push(`${((Date.now() - t0) / 1000).toFixed(1)} s: ${what.join(' + ')} for ${holdMs} ms`);
              await sleep(holdMs);
              await rig.clearFaults();
              await sleep(Math.floor(rnd() * 1000));
            }
          } finally {
            await rig.clearFaults();
          }
        });
        await w.stop();
        assert.deepStrictEqual(w.errors, [], 'the client got errors (policy available)');
        const c = await rig.converge();
        assert.deepStrictEqual(await w.check(rig.srcSock, ''), [], 'an acknowledged write is missing on the source');
        assert.deepStrictEqual(await w.check(rig.expSock, rig.uuid), [], 'an acknowledged write is missing on the mirror');
        const relay = await rig.relay.stats();
        figures.push(`${mode}: ${schedule.length} faults in ${seconds} s, ${w.ackedWrites} writes acknowledged, ${relay.accepted} mirror connections, ` +
          `${relay.flips} bits flipped, ${relay.duplicates} chunks duplicated; converged in ${c.ms} ms at CP ${c.cp}; ` +
          `RSS peaks source ${peakKiB.source} KiB, receiver ${peakKiB.receiver} KiB`);
      } catch (e) {
        process.stderr.write(`\n  endurance ${mode} failed with seed ${seed} (NVMIRROR_SEED=${seed}); schedule:\n${schedule.map((s) => `    ${s}`).join('\n')}\n`);
        rig.printFailure(`endurance ${mode}`);
        throw e;
      } finally {
        await rig.destroy();
      }
    });
  }
});
