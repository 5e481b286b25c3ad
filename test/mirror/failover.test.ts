/**
 * Failover (issue 8): the source (`serve --mirror-to`) in namespace a, the receiver in
 * namespace b, joined by a veth pair.
 *
 * - Sync, RPO 0: a pipelined client (test/crash/ack-checker.ts: plain, FUA or FLUSH
 *   rounds, never two requests on one block) records every acknowledged write; the
 *   primary is killed with SIGKILL at a random moment (CPs every 100 ms, so often mid-CP);
 *   the mirror is promoted while its receiver runs; every acknowledged write must read
 *   back from the promoted volume (a block may instead hold the write in flight on it).
 *   Every 4th round the receiver is killed mid-load and restarted, and the primary is
 *   killed mid-resync (the receiver frozen with SIGSTOP as the resync starts); the run
 *   fails if none of those kills landed mid-resync.
 * - Async: after a kill -9 the promoted mirror is exactly one of the source's committed
 *   CPs (its root equals that CP's root in the source's superblock ring, and it checks).
 * - Fan-in: three sources into one receiver; one is killed and promoted; the other two
 *   stay in sync and byte-identical.
 * - Split brain: the old primary, restarted, is refused by name (state split-brain) and
 *   the promoted volume does not change.
 * - Mirror ahead: a source that lost its NVRAM is refused by a mirror whose log holds
 *   records past its newest seq (state mirror-ahead), also after a session served
 *   without the mirror wrote new records over those seqs, and a promote gets them back.
 * The seed is printed; NVMIRROR_SEED=N reruns it; NVMIRROR_FAILOVER_ROUNDS sets the
 * number of sync rounds (20 by default, as in CI).
 */
import { strict as assert } from 'assert';
import * as cp from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createHostPair, netnsAvailable, type HostPair } from '../net/netns';
import { BIN, md5OfExport, sh, sourceStatus, until } from './helpers';
import { NbdClient } from '../crash/nbd-client';
import { load, verify, type Mode, type World } from '../crash/ack-checker';
import { prng, seedFromEnv } from '../crash/harness';
import { BLOCK, RING_SLOTS, decodeSuperblock } from '../../src/tree/layout';
import { rootBytes } from '../../src/mirror/mirror-dir';
import { MIRROR_STATE_NAME } from '../../src/mirror/relationship';
import { readSessions } from '../../src/volume/sessions';
import { controlRequest } from '../../src/volume/engine-control';

const PORT = 17031;
const ROUNDS = Number(process.env.NVMIRROR_FAILOVER_ROUNDS ?? 20);
/** The old primary's receiver (failback), on namespace a. */
const PORT_BACK = 17032;
const SPLIT_ROUNDS = Number(process.env.NVMIRROR_SPLIT_ROUNDS ?? 10);
/** Every this many RPO rounds, the receiver is killed mid-load too. */
const RX_CRASH_EVERY = Number(process.env.NVMIRROR_RX_CRASH_EVERY ?? 4);

interface PromoteJson {
  promotedFromCp: number;
  promotedRoot: string;
  recordsReplayed: number;
  bytesReplayed: number;
  lastSeq: number;
  cpNumber: number;
}

/** The roots of the CPs in a member's superblock ring, by CP number. */
function ringRoots(member: string, uuid: string): Map<number, string> {
  const fd = fs.openSync(member, 'r');
  const out = new Map<number, string>();
  try {
    const buf = Buffer.alloc(RING_SLOTS * BLOCK);
    fs.readSync(fd, buf, 0, buf.length, 0);
    for (let s = 0; s < RING_SLOTS; s++) {
      const d = decodeSuperblock(buf.subarray(s * BLOCK, (s + 1) * BLOCK));
      if (typeof d !== 'string' && d.volumeUuid === uuid) out.set(d.cpNumber, rootBytes(d).toString('hex'));
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

/**
 * The source's committed CPs a destination can hold: those in its member's superblock ring,
 * and the base it keeps with the relationship (DIR/mirror-source.json: the destination's
 * newest acknowledged CP and its superblock, kept after it has left the ring, as an async
 * mirror more than RING_SLOTS CPs behind is).
 */
function sourceRoots(dir: string, uuid: string): Map<number, string> {
  const out = ringRoots(path.join(dir, 'member-0.img'), uuid);
  const rel = JSON.parse(fs.readFileSync(path.join(dir, MIRROR_STATE_NAME), 'utf8')) as { destSuperblock?: string };
  if (rel.destSuperblock !== undefined) {
    const d = decodeSuperblock(Buffer.from(rel.destSuperblock, 'base64'));
    if (typeof d !== 'string' && d.volumeUuid === uuid && !out.has(d.cpNumber)) out.set(d.cpNumber, rootBytes(d).toString('hex'));
  }
  return out;
}

async function vethBytes(pair: HostPair): Promise<number> {
  const a = pair.host('a');
  let n = 0;
  for (const k of ['tx_bytes', 'rx_bytes']) n += Number((await pair.exec('a', 'cat', [`/sys/class/net/${a.dev}/statistics/${k}`])).stdout.trim());
  return n;
}

describe('mirror failover: promote (two hosts)', function () {
  this.timeout(600_000);
  let pair: HostPair;
  let tmp: string;
  let receiver: cp.ChildProcess | undefined;
  const procs: cp.ChildProcess[] = [];

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`network namespaces unavailable in CI: ${why}`);
      this.skip();
    }
  });

  beforeEach(async () => {
    pair = await createHostPair({ prefix: 'nvf8' });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-failover-'));
  });

  afterEach(async function () {
    if (this.currentTest?.state === 'failed') {
      for (const f of fs.readdirSync(tmp).filter((n) => n.endsWith('.log'))) {
        process.stderr.write(`--- ${f}\n${fs.readFileSync(path.join(tmp, f), 'utf8').split('\n').slice(-25).join('\n')}\n`);
      }
    }
    for (const p of [...procs, receiver]) if (p && !exited(p)) p.kill('SIGKILL');
    procs.length = 0;
    receiver = undefined;
    await pair.destroy();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  function logFd(name: string): number {
    return fs.openSync(path.join(tmp, `${name}.log`), 'a');
  }

  async function startReceiver(): Promise<void> {
    const expSock = path.join(tmp, 'exp.sock');
    fs.rmSync(expSock, { force: true });
    receiver = pair.spawn('b', BIN, ['receive', path.join(tmp, 'dst'), '--listen', `${pair.host('b').addr}:${PORT}`, '--export-socket', expSock, '--mirror-insecure'], {
      stdio: ['ignore', 'ignore', logFd('rx')],
    });
    await until('receiver socket', () => fs.existsSync(expSock), 90_000);
  }

  function createSource(name: string, size = '64M'): { dir: string; sock: string; uuid: string } {
    const dir = path.join(tmp, name);
    sh(BIN, ['create', dir, '--size', size, '--nvram-size', '2M']);
    const uuid = (JSON.parse(fs.readFileSync(path.join(dir, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid;
    return { dir, sock: path.join(tmp, `${name}.sock`), uuid };
  }

  async function startSource(s: { dir: string; sock: string }, name: string, args: string[]): Promise<cp.ChildProcess> {
    fs.rmSync(s.sock, { force: true });
    const p = pair.spawn('a', BIN, ['serve', s.dir, '--socket', s.sock, ...args], { stdio: ['ignore', 'ignore', logFd(name)] });
    procs.push(p);
    await until(`${name} socket`, () => fs.existsSync(s.sock), 90_000);
    return p;
  }

  function mirrorArgs(mode: 'sync' | 'async', policy = 'available'): string[] {
    return ['--cp-interval', '100', '--mirror-to', `${pair.host('b').addr}:${PORT}`, '--mirror-mode', mode, '--mirror-policy', policy, '--mirror-insecure', '--mirror-stall-timeout', '5000'];
  }

  /** A process killed by a signal has signalCode set and exitCode null. */
  function exited(p: cp.ChildProcess): boolean {
    return p.exitCode !== null || p.signalCode !== null;
  }

  async function kill9(p: cp.ChildProcess): Promise<void> {
    if (exited(p)) return;
    const done = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await done;
  }

  /** Promotes DIR/<uuid> while the receiver runs (retrying while it still sees the killed source's connection). */
  async function promote(uuid: string): Promise<PromoteJson> {
    const dir = path.join(tmp, 'dst', uuid);
    let last = '';
    const t0 = Date.now();
    while (Date.now() - t0 < 20_000) {
      const r = cp.spawnSync(BIN, ['promote', dir, '--json'], { encoding: 'utf8', timeout: 120_000 });
      if (r.status === 0) return JSON.parse(r.stdout) as PromoteJson;
      last = `${r.stdout}${r.stderr}`;
      if (!/is connected and still primary/.test(last)) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    throw new Error(`promote ${dir} failed: ${last}`);
  }

  async function servePromoted(uuid: string, name: string): Promise<{ sock: string; proc: cp.ChildProcess }> {
    const sock = path.join(tmp, `${name}.sock`);
    fs.rmSync(sock, { force: true });
    const proc = cp.spawn(BIN, ['serve', path.join(tmp, 'dst', uuid), '--socket', sock], { stdio: ['ignore', 'ignore', logFd(name)] });
    procs.push(proc);
    await until(`${name} socket`, () => fs.existsSync(sock), 90_000);
    return { sock, proc };
  }

  async function stopGracefully(p: cp.ChildProcess): Promise<void> {
    if (exited(p)) return;
    const done = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await done;
  }

  it(`sync, RPO 0: ${ROUNDS} kill -9s of the primary under load (plain, FUA, FLUSH; mid-CP; every 4th with the receiver killed too, mid-resync); each promoted mirror holds every acknowledged write`, async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed);
    process.stdout.write(`      seed ${seed} (NVMIRROR_SEED=${seed} reruns it)\n`);
    await startReceiver();
    let acked = 0;
    let checked = 0;
    let inflightLanded = 0;
    let replayed = 0;
    let receiverCrashes = 0;
    let killedMidResync = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const s = createSource(`s${round}`);
      const src = await startSource(s, `sv${round}`, mirrorArgs('sync', 'strict'));
      await until(`round ${round}: mirror in sync`, () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
      const mode: Mode = (['plain', 'fua', 'flush'] as const)[round % 3]!;
      // Every 4th round the receiver is killed mid-load and restarted: the source resyncs
      // (strict policy: writes fail with EIO meanwhile, so their outcome is open) and the
      // primary dies at a random moment, often mid-resync; the mirror's log must have kept
      // what it held across its own crash.
      const receiverCrash = round % RX_CRASH_EVERY === RX_CRASH_EVERY - 1;
      const w: World = { acked: new Map(), inflight: new Map(), writeId: round * 10_000_000, ackedWrites: 0, killedInFlight: 0, landedInFlight: 0, ...(receiverCrash ? { failed: new Map() } : {}) };
      const c = await NbdClient.connect(s.sock, '');
      const errors: string[] = [];
      const killAfterMs = 200 + Math.floor(rnd() * 800);
      // Receiver-crash rounds: the primary dies while it resyncs the restarted receiver. The
      // source's log is watched for the resync's start; the receiver is then frozen
      // (SIGSTOP: it cannot acknowledge the resync's commit, so the resync cannot end) and
      // the primary killed, which makes the kill land mid-resync whatever the resync's
      // length. If no resync starts within afterRestartMs + 3 s, the kill happens anyway.
      const killer = receiverCrash ? undefined : setTimeout(() => void kill9(src), killAfterMs);
      let restarted: Promise<void> = Promise.resolve();
      const afterRestartMs = Math.floor(rnd() * 1000);
      const when = receiverCrash ? 'the receiver killed and restarted, the primary killed as its resync started' : `kill at ${killAfterMs} ms`;
      const rxKiller = receiverCrash ? setTimeout(() => {
        restarted = (async () => {
          const logPath = path.join(tmp, `sv${round}.log`);
          await kill9(receiver!);
          const from = fs.statSync(logPath).size;
          await startReceiver();
          const deadline = Date.now() + afterRestartMs + 3000;
          while (Date.now() < deadline && !fs.readFileSync(logPath, 'utf8').slice(from).includes('mirror resync started')) {
            await new Promise((r) => setTimeout(r, 2));
          }
          const frozen = receiver!;
          frozen.kill('SIGSTOP');
          try {
            await kill9(src);
          } finally {
            frozen.kill('SIGCONT');
          }
        })();
      }, 100 + Math.floor(rnd() * 300)) : undefined;
      await load(c, w, mode, rnd, errors);
      if (killer) clearTimeout(killer);
      await restarted;
      await kill9(src);
      if (receiverCrash) {
        const log = fs.readFileSync(path.join(tmp, `sv${round}.log`), 'utf8');
        const lastStart = log.lastIndexOf('mirror resync started');
        if (lastStart >= 0 && log.indexOf('mirror resync done', lastStart) < 0) killedMidResync++;
        receiverCrashes++;
      } else {
        assert.deepEqual(errors, [], `seed ${seed} round ${round}: requests failed before the kill`);
      }
      assert.ok(w.ackedWrites > 0, `seed ${seed} round ${round}: no write was acknowledged (${when})`);
      const p = await promote(s.uuid);
      replayed += p.recordsReplayed;
      const served = await servePromoted(s.uuid, `p${round}`);
      const c2 = await NbdClient.connect(served.sock, '');
      const problems = await verify(c2, w, false);
      await c2.close();
      await stopGracefully(served.proc);
      if (problems.length > 0) process.stderr.write(`errors ${errors.length} (${errors.slice(0, 3).join('; ')}), failed blocks ${w.failed?.size}, inflight ${w.inflight.size}, acked ${w.ackedWrites}\n`);
      assert.deepEqual(problems.slice(0, 10), [], `seed ${seed} round ${round} (${mode}, ${when}): ${problems.length} acknowledged block(s) lost on the promoted mirror`);
      acked += w.ackedWrites;
      checked += w.acked.size;
      inflightLanded += w.landedInFlight;
    }
    process.stdout.write(`      ${ROUNDS} failovers: ${acked} acknowledged writes, ${checked} blocks checked on the promoted mirrors, 0 lost; ` +
      `${replayed} log records replayed by promote; ${inflightLanded} in-flight blocks had landed; ` +
      `${receiverCrashes} rounds with the receiver killed mid-load (${killedMidResync} primaries killed mid-resync)\n`);
    // The issue asks for kills mid-resync too: at least one of those rounds must have been one.
    if (receiverCrashes > 0) assert.ok(killedMidResync > 0, `seed ${seed}: no primary was killed mid-resync in ${receiverCrashes} receiver-crash rounds`);
  });

  it('async: after a kill -9 the promoted mirror is exactly one of the source\'s committed CPs', async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed + 1);
    await startReceiver();
    for (let round = 0; round < 3; round++) {
      const s = createSource(`a${round}`);
      const src = await startSource(s, `sva${round}`, mirrorArgs('async'));
      await until('mirror in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
      const w: World = { acked: new Map(), inflight: new Map(), writeId: 0, ackedWrites: 0, killedInFlight: 0, landedInFlight: 0 };
      const c = await NbdClient.connect(s.sock, '');
      const errors: string[] = [];
      const killer = setTimeout(() => void kill9(src), 300 + Math.floor(rnd() * 700));
      await load(c, w, 'plain', rnd, errors);
      clearTimeout(killer);
      await kill9(src);
      const ring = sourceRoots(s.dir, s.uuid);
      const p = await promote(s.uuid);
      assert.equal(p.recordsReplayed, 0, 'async mode forwards no records');
      assert.equal(ring.get(p.promotedFromCp), p.promotedRoot,
        `seed ${seed} round ${round}: the promoted mirror's CP ${p.promotedFromCp} root ${p.promotedRoot} is not the source's (its ring and kept base: ${[...ring].map(([k, v]) => `${k}:${v.slice(0, 16)}`).join(' ')})`);
      const chk = sh(BIN, ['check', path.join(tmp, 'dst', s.uuid)], 120_000);
      assert.match(chk, /: ok$/m, chk);
    }
  });

  it('fan-in: three sources into one receiver; one killed and promoted, the other two stay in sync and identical', async () => {
    await startReceiver();
    const srcs = [createSource('f0'), createSource('f1'), createSource('f2')];
    const procsF = [];
    for (let i = 0; i < 3; i++) procsF.push(await startSource(srcs[i]!, `svf${i}`, mirrorArgs('sync')));
    for (const s of srcs) await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    for (let i = 0; i < 3; i++) sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(0x41 + i).toString(16)} 0 8M`, `nbd+unix:///?socket=${srcs[i]!.sock}`]);
    // Source 1 dies mid-write; the others keep writing.
    const w1 = cp.spawn('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 8M 32M', `nbd+unix:///?socket=${srcs[1]!.sock}`], { stdio: 'ignore' });
    // Listen from the start: the write may end before the kill (then a later once('exit') never fires).
    const w1Exited = new Promise((r) => w1.once('exit', r));
    await new Promise((r) => setTimeout(r, 300));
    await kill9(procsF[1]!);
    await w1Exited;
    const p = await promote(srcs[1]!.uuid);
    assert.ok(p.cpNumber > p.promotedFromCp);
    for (const i of [0, 2]) sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(0x51 + i).toString(16)} 4M 4M`, `nbd+unix:///?socket=${srcs[i]!.sock}`]);
    for (const i of [0, 2]) {
      const s = srcs[i]!;
      const r = await controlRequest(path.join(s.dir, 'control.sock'), { op: 'checkpoint' }, 60_000);
      assert.ok(r.ok);
      await until(`source ${i} in sync after the failover of source 1`, () => {
        const m = sourceStatus(s.dir);
        return m && m.state === 'in-sync' && m.rootsEqual && m.destCp >= (r.cpNumber as number) ? m : undefined;
      }, 60_000);
      assert.equal(md5OfExport(`nbd+unix:///${s.uuid}?socket=${path.join(tmp, 'exp.sock')}`), md5OfExport(`nbd+unix:///?socket=${s.sock}`), `source ${i}'s mirror differs`);
    }
    // The promoted one holds source 1's first 8 MiB.
    const served = await servePromoted(srcs[1]!.uuid, 'pf1');
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x42 0 8M', `nbd+unix:///?socket=${served.sock}`]);
  });

  it('a source that lost its NVRAM is refused by a mirror holding records past its newest seq (mirror-ahead), also after it wrote over those seqs before reconnecting (a session without the mirror in between, or the same process), and those records survive to a promote', async () => {
    await startReceiver();
    const s = createSource('ahead');
    // CPs only every hour: the acknowledged writes below stay as records (here in the NVRAM, there in the log).
    const args = mirrorArgs('sync').map((a, i, all) => (all[i - 1] === '--cp-interval' ? '1h' : a));
    const src = await startSource(s, 'svahead', args);
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7a 8M 256k', `nbd+unix:///?socket=${s.sock}`]);
    const before = sourceStatus(s.dir)!;
    assert.ok(before.heldSeq >= before.lastSeq && before.sourceCp === before.destCp, 'the destination holds every record, no CP since');
    await kill9(src);
    // The source's NVRAM is lost (its records area zeroed): it restarts at its last CP.
    const nvram = path.join(s.dir, 'nvram.log');
    const fd = fs.openSync(nvram, 'r+');
    const size = fs.fstatSync(fd).size;
    fs.writeSync(fd, Buffer.alloc(size - 4096), 0, size - 4096, 4096);
    fs.closeSync(fd);
    // First a session without the mirror (serve --no-mirror): it starts at the last CP and
    // writes new records over the mirror's seqs and past them, then a final CP. The next
    // mirrored session starts holding more records than the mirror has, but the seq the
    // session without the mirror started from (DIR/sessions.json) travels in its HELLO.
    const alone = await startSource(s, 'svahead-alone', ['--no-mirror', '--cp-interval', '1h']);
    sh('qemu-io', ['-f', 'raw', ...Array.from({ length: 16 }, (_, i) => ['-c', `write -P 0x5d ${32 + i}M 4k`]).flat(), `nbd+unix:///?socket=${s.sock}`]);
    await stopGracefully(alone);
    const sessions = readSessions(s.dir)!;
    assert.ok(sessions.length >= 1 && sessions[0]!.startedAtSeq < before.heldSeq, `the session without the mirror started below the mirror's records: ${JSON.stringify(sessions)}, mirror to ${before.heldSeq}`);
    const again = await startSource(s, 'svahead2', args);
    const st = await until('the source says the mirror is ahead', () => {
      const m = sourceStatus(s.dir);
      return m?.state === 'mirror-ahead' ? m : undefined;
    }, 30_000);
    assert.match(st.lastError ?? '', /the mirror .* is current: it holds records up to seq \d+, past this source's newest seq \d+ .*nvmirror promote/);
    assert.equal(st.standing?.current, 'destination');
    assert.ok(st.standing.destinationSeq > st.standing.sourceSeq, JSON.stringify(st.standing));
    assert.match(sh(BIN, ['status', s.dir]), /current: the mirror; .*the mirror holds records to seq \d+, the source to \d+/);
    const rx = JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as { standings: Array<{ sourceUuid: string; kind: string; current: string }> };
    assert.deepEqual(rx.standings.filter((x) => x.sourceUuid === s.uuid).map((x) => [x.kind, x.current]), [['mirror-ahead', 'destination']]);
    await stopGracefully(again);
    // The same source again, but it writes past the mirror's records before it reaches the
    // mirror (the receiver is down meanwhile): its newest seq is now past the mirror's, yet
    // those are other records. Its HELLO says the seq it started at, so it is still refused.
    await kill9(receiver!);
    const third = await startSource(s, 'svahead3', args);
    sh('qemu-io', ['-f', 'raw', ...Array.from({ length: 16 }, (_, i) => ['-c', `write -P 0x3c ${16 + i}M 4k`]).flat(), `nbd+unix:///?socket=${s.sock}`]);
    const wrote = sourceStatus(s.dir)!;
    assert.ok(wrote.lastSeq > st.standing!.destinationSeq, `the source's new records (to seq ${wrote.lastSeq}) reach past the mirror's (${st.standing!.destinationSeq})`);
    await startReceiver();
    const st3 = await until('the source says the mirror is ahead, after writing over its seqs', () => {
      const m = sourceStatus(s.dir);
      return m?.state === 'mirror-ahead' ? m : undefined;
    }, 60_000);
    assert.match(st3.lastError ?? '', /holds records up to seq \d+, past this source's newest seq \d+ of the same history/);
    await stopGracefully(third);
    // Nothing was rolled back there: promoting the mirror gives the acknowledged write back.
    const p = await promote(s.uuid);
    assert.ok(p.recordsReplayed > 0, 'the log kept the records');
    const served = await servePromoted(s.uuid, 'pahead');
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x7a 8M 256k', `nbd+unix:///?socket=${served.sock}`]);
  });

  it('split brain: the old primary restarted is refused by name and the promoted volume does not change', async () => {
    await startReceiver();
    const s = createSource('sb');
    const src = await startSource(s, 'svsb', mirrorArgs('sync'));
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 4M', `nbd+unix:///?socket=${s.sock}`]);
    await kill9(src);
    const p = await promote(s.uuid);
    // Where the source stood before (primary) is not shown under the promoted entry.
    assert.doesNotMatch(sh(BIN, ['status', path.join(tmp, 'dst')]), /its old source connected/);
    const served = await servePromoted(s.uuid, 'psb');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x62 4M 1M', `nbd+unix:///?socket=${served.sock}`]);
    const before = md5OfExport(`nbd+unix:///?socket=${served.sock}`);
    // The old primary comes back with its recorded relationship and writes on its own.
    await startSource(s, 'svsb2', []);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x63 0 1M', `nbd+unix:///?socket=${s.sock}`]);
    const st = await until('old primary reports split brain', () => {
      const m = sourceStatus(s.dir);
      return m?.state === 'split-brain' ? m : undefined;
    }, 30_000);
    assert.match(st.lastError ?? '', new RegExp(`promoted at CP ${p.promotedFromCp} \\(the last CP both sides hold\\)`));
    const rx = fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8');
    assert.match(rx, /split brain refused/);
    assert.equal(md5OfExport(`nbd+unix:///?socket=${served.sock}`), before, 'the promoted volume changed');
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x61 0 4M', '-c', 'read -P 0x62 4M 1M', `nbd+unix:///?socket=${served.sock}`]);
    // The receive directory says which of its entries is a primary now.
    const rxStatus = sh(BIN, ['status', path.join(tmp, 'dst')]);
    assert.match(rxStatus, new RegExp(`^promoted +${s.uuid}: .*a primary volume now \\(served\\), promoted from CP ${p.promotedFromCp}$`, 'm'), rxStatus);
    // The old primary's refused connection is (its standing as it came back).
    assert.match(rxStatus, /^ +its old source connected: /m, rxStatus);
    const text = sh(BIN, ['status', path.join(tmp, 'dst', s.uuid), '--json']);
    const js = JSON.parse(text) as { role?: { state: string; promotedFromCp: number } };
    assert.equal(js.role?.state, 'promoted');
    assert.equal(js.role?.promotedFromCp, p.promotedFromCp);
  });

  it(`split brain, ${SPLIT_ROUNDS} times with different timings: refused until the old primary is demoted; failback resyncs only what changed, both sides identical, its own writes kept`, async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed + 2);
    process.stdout.write(`      seed ${seed} (NVMIRROR_SEED=${seed} reruns it)\n`);
    await startReceiver();
    let refusals = 0;
    let resyncWire = 0;
    let changed = 0;
    for (let round = 0; round < SPLIT_ROUNDS; round++) {
      const tag = `seed ${seed} round ${round}`;
      const s = createSource(`b${round}`);
      const src = await startSource(s, `svb${round}`, mirrorArgs('sync'));
      await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
      sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 24M', `nbd+unix:///?socket=${s.sock}`]);
      await kill9(src);
      await promote(s.uuid);
      // The new primary writes 1-4 MiB; the old primary comes back on its own (split brain) and writes too.
      const bMiB = 1 + Math.floor(rnd() * 4);
      const promotedDir = path.join(tmp, 'dst', s.uuid);
      const bSock = path.join(tmp, `nb${round}.sock`);
      let b = pair.spawn('b', BIN, ['serve', promotedDir, '--socket', bSock], { stdio: ['ignore', 'ignore', logFd(`nb${round}`)] });
      procs.push(b);
      await until('promoted volume served', () => fs.existsSync(bSock), 60_000);
      sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x32 32M ${bMiB}M`, `nbd+unix:///?socket=${bSock}`]);
      const old = await startSource(s, `svo${round}`, []);
      await new Promise((r) => setTimeout(r, Math.floor(rnd() * 400)));
      sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 48M 1M', `nbd+unix:///?socket=${s.sock}`]);
      const st = await until('split brain refused', () => {
        const m = sourceStatus(s.dir);
        return m?.state === 'split-brain' ? m : undefined;
      }, 30_000);
      assert.match(st.lastError ?? '', /split brain refused: .* was promoted at CP \d+ \(the last CP both sides hold\)/, tag);
      refusals++;
      await stopGracefully(old);
      // Resolution: the old primary is demoted (its state kept), then mirrors the new one.
      const refused = cp.spawnSync(BIN, ['demote', s.dir, '--into', path.join(tmp, `back${round}`)], { encoding: 'utf8' });
      assert.notEqual(refused.status, 0, `${tag}: demote without --discard-my-changes`);
      assert.match(refused.stderr, /--discard-my-changes/);
      const dem = JSON.parse(sh(BIN, ['demote', s.dir, '--into', path.join(tmp, `back${round}`), '--discard-my-changes', '--json'])) as { keptIn: string; mirrorDir: string };
      if (round === 0) {
        const st0 = sh(BIN, ['status', path.join(tmp, `back${round}`)]);
        assert.match(st0, new RegExp(`^demoted +${s.uuid}: demoted .*waiting for the other side of the failover to connect`, 'm'), st0);
      }
      const backSock = path.join(tmp, `back${round}.sock`);
      const back = pair.spawn('a', BIN, ['receive', path.join(tmp, `back${round}`), '--listen', `${pair.host('a').addr}:${PORT_BACK}`, '--export-socket', backSock, '--mirror-insecure'], {
        stdio: ['ignore', 'ignore', logFd(`back${round}`)],
      });
      procs.push(back);
      await until('receiver on the old primary', () => fs.existsSync(backSock), 60_000);
      await stopGracefully(b);
      const wire0 = await vethBytes(pair);
      b = pair.spawn('b', BIN, ['serve', promotedDir, '--socket', bSock, '--cp-interval', '200', '--mirror-to', `${pair.host('a').addr}:${PORT_BACK}`, '--mirror-mode', 'sync', '--mirror-insecure'], {
        stdio: ['ignore', 'ignore', logFd(`nb${round}`)],
      });
      procs.push(b);
      // (status of a volume nobody serves takes its lock for a moment: wait until it is served)
      await until('promoted volume served again', () => fs.existsSync(path.join(promotedDir, 'control.sock')), 60_000);
      await until('failback in sync', () => {
        const m = sourceStatus(promotedDir);
        return m && m.state === 'in-sync' && m.rootsEqual ? m : undefined;
      }, 60_000);
      const wire = (await vethBytes(pair)) - wire0;
      if (round === 0) {
        // The old primary's receiver shows the standing brought up to date by the CPs since HELLO.
        const inSync = sourceStatus(promotedDir)!;
        const back0 = /last common CP (\d+), since then the source wrote 0 CP\(s\), the mirror 0$/m.exec(sh(BIN, ['status', path.join(tmp, `back${round}`)]));
        assert.ok(back0 && Number(back0[1]) >= inSync.destCp, `${tag}: the old primary's receiver status after the failback: ${back0?.[0]}`);
      }
      resyncWire += wire;
      changed += bMiB * 1024 * 1024;
      // Only what changed since the common CP travels (a full copy would be over 24 MiB).
      assert.ok(wire < bMiB * 1024 * 1024 + 2 * 1024 * 1024, `${tag}: the failback resync moved ${wire} bytes for ${bMiB} MiB changed`);
      const rxLog = fs.readFileSync(path.join(tmp, `back${round}.log`), 'utf8');
      assert.match(rxLog, /failback: rolled back to CP \d+/, tag);
      assert.doesNotMatch(fs.readFileSync(path.join(tmp, `nb${round}.log`), 'utf8'), /mirror baseline started/, `${tag}: a full baseline`);
      // Both sides identical; the old primary's own write is in what demote kept.
      assert.equal(md5OfExport(`nbd+unix:///${s.uuid}?socket=${backSock}`), md5OfExport(`nbd+unix:///?socket=${bSock}`), `${tag}: the two sides differ after failback`);
      const keptSock = path.join(tmp, `kept${round}.sock`);
      const kept = cp.spawn(BIN, ['serve', dem.keptIn, '--read-only', '--socket', keptSock], { stdio: ['ignore', 'ignore', logFd(`kept${round}`)] });
      procs.push(kept);
      await until('kept copy served', () => fs.existsSync(keptSock), 60_000);
      sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x33 48M 1M', '-c', 'read -P 0x31 0 24M', `nbd+unix:///?socket=${keptSock}`]);
      sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 48M 1M', '-c', `read -P 0x32 32M ${bMiB}M`, `nbd+unix:///${s.uuid}?socket=${backSock}`]);
      for (const p of [kept, b, back]) await stopGracefully(p);
    }
    process.stdout.write(`      ${SPLIT_ROUNDS} split brains: ${refusals} refused until demoted; failback resync ${resyncWire} bytes on the wire for ${changed} bytes changed on the new primaries\n`);
  });

  it('split brain resolved the other way: the promoted side is demoted (its changes kept, then discarded), becomes the old primary\'s mirror again and resyncs from the common CP, no full copy', async () => {
    await startReceiver();
    const s = createSource('dp');
    const src = await startSource(s, 'svdp', mirrorArgs('sync'));
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 24M', `nbd+unix:///?socket=${s.sock}`]);
    const r0 = await controlRequest(path.join(s.dir, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r0.ok);
    await until('the destination holds that CP', () => {
      const m = sourceStatus(s.dir);
      return m && m.rootsEqual && m.destCp >= (r0.cpNumber as number) ? m : undefined;
    }, 60_000);
    await kill9(src);
    const p = await promote(s.uuid);
    // The old primary holds the CP it last saw acknowledged: the promote's base, or the one before (an ack lost with the kill).
    const acked = (JSON.parse(fs.readFileSync(path.join(s.dir, 'mirror-source.json'), 'utf8')) as { destCp: number }).destCp;
    assert.ok(acked === p.promotedFromCp || acked === p.promotedFromCp - 1, `the old primary holds CP ${acked}, the mirror was promoted from CP ${p.promotedFromCp}`);
    const promotedDir = path.join(tmp, 'dst', s.uuid);
    // Both sides write on their own: a split brain, refused.
    const served = await servePromoted(s.uuid, 'pdp');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 32M 1M', `nbd+unix:///?socket=${served.sock}`]);
    await stopGracefully(served.proc);
    // The base CP is kept whole by the promote's snapshot: taken in a CP that changes no
    // block, it names the base's own root and space-map root, so none of the base's blocks
    // (data, address or space map) is reused while the promoted side runs alone.
    const role = JSON.parse(fs.readFileSync(path.join(promotedDir, 'role.json'), 'utf8')) as { baseSuperblock: string; baseSnapshot: string };
    const base = decodeSuperblock(Buffer.from(role.baseSuperblock, 'base64'));
    const ring = Buffer.alloc(RING_SLOTS * BLOCK);
    const mfd = fs.openSync(path.join(promotedDir, 'member-0.img'), 'r');
    fs.readSync(mfd, ring, 0, ring.length, 0);
    fs.closeSync(mfd);
    const newest = Array.from({ length: RING_SLOTS }, (_, i) => decodeSuperblock(ring.subarray(i * BLOCK, (i + 1) * BLOCK)))
      .filter((d) => typeof d !== 'string' && d.volumeUuid === s.uuid)
      .reduce((a, b) => (typeof b !== 'string' && (typeof a === 'string' || b.cpNumber > a.cpNumber) ? b : a));
    assert.ok(typeof base !== 'string' && typeof newest !== 'string' && newest.cpNumber > base.cpNumber);
    const snap = newest.snapshots.find((x) => x.name === role.baseSnapshot);
    assert.ok(snap, `the promoted volume keeps the snapshot ${role.baseSnapshot}`);
    assert.deepEqual([snap.root, snap.smapRoot], [base.root, base.smapRoot], 'the snapshot names the base CP\'s own tree and space map');
    const old = await startSource(s, 'svdp2', []);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x23 40M 2M', `nbd+unix:///?socket=${s.sock}`]);
    assert.ok((await controlRequest(path.join(s.dir, 'control.sock'), { op: 'checkpoint' }, 60_000)).ok);
    const sb = await until('split brain refused', () => {
      const m = sourceStatus(s.dir);
      return m?.state === 'split-brain' ? m : undefined;
    }, 30_000);
    assert.equal(sb.standing?.current, 'each-its-own');
    assert.equal(sb.standing.commonCp, p.promotedFromCp);
    assert.match(sh(BIN, ['status', s.dir]), new RegExp(`primary: both \\(split brain\\); current: neither alone .*last common CP ${p.promotedFromCp}, since then the source wrote [1-9]\\d* CP\\(s\\), the mirror [1-9]`));
    // Resolution: the promoted side's changes are discarded (kept first); it becomes the mirror again, in place.
    const dem = JSON.parse(sh(BIN, ['demote', promotedDir, '--into', path.join(tmp, 'dst'), '--discard-my-changes', '--json'])) as { keptIn: string; mirrorDir: string };
    assert.equal(dem.mirrorDir, promotedDir);
    const wire0 = await vethBytes(pair);
    // The old primary, still retrying, is taken back by the running receiver and resyncs from the common CP.
    await until('old primary in sync again', () => {
      const m = sourceStatus(s.dir);
      return m && m.state === 'in-sync' && m.rootsEqual ? m : undefined;
    }, 60_000);
    const wire = (await vethBytes(pair)) - wire0;
    assert.ok(wire < 6 * 1024 * 1024, `the resync moved ${wire} bytes for 2 MiB written on the old primary (a full copy is over 24 MiB)`);
    process.stdout.write(`      promoted side demoted: resync from CP ${p.promotedFromCp} moved ${wire} bytes on the veth for 2 MiB written on the old primary\n`);
    assert.match(fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8'), new RegExp(`failback: rolled back to CP ${acked}`));
    assert.doesNotMatch(fs.readFileSync(path.join(tmp, 'svdp2.log'), 'utf8'), /mirror baseline started/);
    const st = sourceStatus(s.dir)!;
    assert.equal(st.standing?.current, 'both');
    assert.equal(md5OfExport(`nbd+unix:///${s.uuid}?socket=${path.join(tmp, 'exp.sock')}`), md5OfExport(`nbd+unix:///?socket=${s.sock}`), 'the two sides differ after the resync');
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x23 40M 2M', '-c', 'read -P 0 32M 1M', `nbd+unix:///${s.uuid}?socket=${path.join(tmp, 'exp.sock')}`]);
    // What the promoted side wrote is in the copy demote kept.
    const keptSock = path.join(tmp, 'keptdp.sock');
    procs.push(cp.spawn(BIN, ['serve', dem.keptIn, '--read-only', '--socket', keptSock], { stdio: ['ignore', 'ignore', logFd('keptdp')] }));
    await until('kept copy served', () => fs.existsSync(keptSock), 60_000);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x22 32M 1M', '-c', 'read -P 0x21 0 24M', `nbd+unix:///?socket=${keptSock}`]);
    await stopGracefully(old);
  });

  it('failback over a damaged base: the old primary\'s copy of the common CP no longer verifies, so a full baseline follows (logged), never a silently different mirror', async () => {
    await startReceiver();
    const s = createSource('dmg');
    const src = await startSource(s, 'svdmg', mirrorArgs('sync'));
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 0 8M', `nbd+unix:///?socket=${s.sock}`]);
    await kill9(src);
    const p = await promote(s.uuid);
    const promotedDir = path.join(tmp, 'dst', s.uuid);
    sh(BIN, ['demote', s.dir, '--into', path.join(tmp, 'backd'), '--discard-my-changes']);
    // Damage the old primary's copy of the common CP: its root block.
    const member = path.join(s.dir, 'member-0.img');
    const fd = fs.openSync(member, 'r+');
    const ring = Buffer.alloc(RING_SLOTS * BLOCK);
    fs.readSync(fd, ring, 0, ring.length, 0);
    const sb = decodeSuperblock(ring.subarray((p.promotedFromCp % RING_SLOTS) * BLOCK, (p.promotedFromCp % RING_SLOTS + 1) * BLOCK));
    assert.ok(typeof sb !== 'string' && sb.cpNumber === p.promotedFromCp && sb.root, 'the base is in the ring');
    fs.writeSync(fd, Buffer.alloc(BLOCK, 0xee), 0, BLOCK, sb.root.pba * BLOCK);
    fs.closeSync(fd);
    const backSock = path.join(tmp, 'backd.sock');
    procs.push(pair.spawn('a', BIN, ['receive', path.join(tmp, 'backd'), '--listen', `${pair.host('a').addr}:${PORT_BACK}`, '--export-socket', backSock, '--mirror-insecure'], { stdio: ['ignore', 'ignore', logFd('backd')] }));
    await until('receiver on the old primary', () => fs.existsSync(backSock), 60_000);
    const bSock = path.join(tmp, 'nbd.sock');
    procs.push(pair.spawn('b', BIN, ['serve', promotedDir, '--socket', bSock, '--mirror-to', `${pair.host('a').addr}:${PORT_BACK}`, '--mirror-mode', 'sync', '--mirror-insecure'], { stdio: ['ignore', 'ignore', logFd('nbd')] }));
    await until('promoted volume served', () => fs.existsSync(path.join(promotedDir, 'control.sock')), 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 16M 1M', `nbd+unix:///?socket=${bSock}`]);
    // A CP that holds that write, then the mirror must hold that CP (the exports show committed CPs).
    const r = await controlRequest(path.join(promotedDir, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r.ok, `checkpoint: ${String(r.error)}`);
    await until('in sync after a full baseline', () => {
      const m = sourceStatus(promotedDir);
      return m && m.state === 'in-sync' && m.rootsEqual && m.destCp >= (r.cpNumber as number) ? m : undefined;
    }, 60_000);
    assert.match(fs.readFileSync(path.join(tmp, 'backd.log'), 'utf8'), new RegExp(`copy of CP ${p.promotedFromCp} no longer verifies`));
    assert.match(fs.readFileSync(path.join(tmp, 'nbd.log'), 'utf8'), /mirror baseline started/);
    assert.equal(md5OfExport(`nbd+unix:///${s.uuid}?socket=${backSock}`), md5OfExport(`nbd+unix:///?socket=${bSock}`));
  });

  it('failback after the old primary went on for more than 8 CPs on its own: the base comes from the superblock it kept, no full copy', async () => {
    await startReceiver();
    const s = createSource('far');
    const src = await startSource(s, 'svfar', mirrorArgs('sync'));
    await until('in sync', () => sourceStatus(s.dir)?.state === 'in-sync', 60_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x51 0 8M', `nbd+unix:///?socket=${s.sock}`]);
    const r0 = await controlRequest(path.join(s.dir, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r0.ok);
    await until('the destination holds that CP', () => {
      const m = sourceStatus(s.dir);
      return m && m.rootsEqual && m.destCp >= (r0.cpNumber as number) ? m : undefined;
    }, 60_000);
    await kill9(src);
    const p = await promote(s.uuid);
    // The old primary comes back (its recorded relationship: refused as split brain, but it
    // keeps holding the destination's CP) and commits twelve CPs on its own (its ring holds eight).
    const old = await startSource(s, 'svfar2', []);
    for (let i = 0; i < 12; i++) {
      sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(0x60 + i).toString(16)} ${16 + i}M 256k`, `nbd+unix:///?socket=${s.sock}`]);
      assert.ok((await controlRequest(path.join(s.dir, 'control.sock'), { op: 'checkpoint' }, 60_000)).ok);
    }
    await stopGracefully(old);
    sh(BIN, ['demote', s.dir, '--into', path.join(tmp, 'backf'), '--discard-my-changes']);
    const backSock = path.join(tmp, 'backf.sock');
    procs.push(pair.spawn('a', BIN, ['receive', path.join(tmp, 'backf'), '--listen', `${pair.host('a').addr}:${PORT_BACK}`, '--export-socket', backSock, '--mirror-insecure'], { stdio: ['ignore', 'ignore', logFd('backf')] }));
    await until('receiver on the old primary', () => fs.existsSync(backSock), 60_000);
    const promotedDir = path.join(tmp, 'dst', s.uuid);
    const bSock = path.join(tmp, 'nbf.sock');
    procs.push(pair.spawn('b', BIN, ['serve', promotedDir, '--socket', bSock, '--mirror-to', `${pair.host('a').addr}:${PORT_BACK}`, '--mirror-mode', 'sync', '--mirror-insecure'], { stdio: ['ignore', 'ignore', logFd('nbf')] }));
    await until('promoted volume served', () => fs.existsSync(path.join(promotedDir, 'control.sock')), 60_000);
    await until('failback in sync', () => {
      const m = sourceStatus(promotedDir);
      return m && m.state === 'in-sync' && m.rootsEqual ? m : undefined;
    }, 60_000);
    assert.match(fs.readFileSync(path.join(tmp, 'backf.log'), 'utf8'), new RegExp(`failback: rolled back to CP ${p.promotedFromCp}`));
    assert.doesNotMatch(fs.readFileSync(path.join(tmp, 'nbf.log'), 'utf8'), /mirror baseline started/);
    assert.equal(md5OfExport(`nbd+unix:///${s.uuid}?socket=${backSock}`), md5OfExport(`nbd+unix:///?socket=${bSock}`));
  });
});
