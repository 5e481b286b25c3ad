/**
 * Process crash: the real server (`nvmirror serve DIR`) under a pipelined write load is
 * killed with SIGKILL at random moments (CPs run constantly: 1 MiB NVRAM, short CP
 * intervals), restarted, and every write whose reply arrived must read back; a block
 * may instead hold the write still in flight on it when the server died. The client
 * never has two requests in flight on one block, so each block has exactly one or two
 * allowed contents. Rounds alternate plain writes, FUA writes and periodic FLUSHes.
 * A negative control runs the same checker against an empty volume: it must fail.
 * The seed is printed; NVMIRROR_SEED=N reruns it.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient, NbdClosedError } from './nbd-client';
import { prng, runCli, seedFromEnv, ServedVolume } from './harness';

const BS = 4096;
const VOLUME_BYTES = 64 * 1024 * 1024;
/** Writes land in the first WORKING_BLOCKS blocks, so blocks are overwritten often. */
const WORKING_BLOCKS = 2048;
const QUEUE_DEPTH = 32;
const ROUNDS = Number(process.env.NVMIRROR_CRASH_ROUNDS ?? 20);
const ZERO = Buffer.alloc(BS);

type Mode = 'plain' | 'fua' | 'flush';

interface World {
  /** Last acknowledged contents per block (absent = zeroes). */
  acked: Map<number, Buffer>;
  /** Contents of the write in flight on a block when the server died. */
  inflight: Map<number, Buffer>;
  writeId: number;
  ackedWrites: number;
  killedInFlight: number;
  landedInFlight: number;
}

/** A recognisable block: lbn and write id in the first 16 bytes, then PRNG bytes. */
function blockContent(lbn: number, writeId: number): Buffer {
  const b = Buffer.allocUnsafe(BS);
  const r = prng(writeId * 7919 + lbn);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE(Math.floor(r() * 0x100000000) >>> 0, i);
  b.writeUInt32LE(0xb10cb10c, 0);
  b.writeUInt32LE(lbn, 4);
  b.writeDoubleLE(writeId, 8);
  return b;
}

function describeBlock(b: Buffer): string {
  if (b.equals(ZERO)) return 'zeroes';
  if (b.readUInt32LE(0) === 0xb10cb10c) return `write ${b.readDoubleLE(8)} of lbn ${b.readUInt32LE(4)}`;
  return `other data (${b.subarray(0, 8).toString('hex')})`;
}

/** Reads every block the world knows about; returns the problems; adopts what it read. */
async function verify(c: NbdClient, w: World, adopt: boolean): Promise<string[]> {
  const lbns = [...new Set([...w.acked.keys(), ...w.inflight.keys()])].sort((a, b) => a - b);
  const problems: string[] = [];
  for (let i = 0; i < lbns.length; i += 64) {
    const batch = lbns.slice(i, i + 64);
    const got = await Promise.all(batch.map((l) => c.read(l * BS, BS)));
    batch.forEach((lbn, j) => {
      const g = got[j]!;
      const want = w.acked.get(lbn) ?? ZERO;
      const alt = w.inflight.get(lbn);
      if (g.equals(want)) return;
      if (alt && g.equals(alt)) {
        w.landedInFlight++;
        if (adopt) w.acked.set(lbn, alt);
        return;
      }
      problems.push(`lbn ${lbn}: holds ${describeBlock(g)}, expected ${describeBlock(want)}${alt ? ` or in-flight ${describeBlock(alt)}` : ''}`);
    });
  }
  if (adopt) w.inflight.clear();
  return problems;
}

/** Keeps QUEUE_DEPTH requests in flight until the connection dies; returns once all have settled. */
async function load(c: NbdClient, w: World, mode: Mode, rnd: () => number, errors: string[]): Promise<void> {
  const busy = new Set<number>();
  const settled: Promise<void>[] = [];
  let sinceFlush = 0;
  const issueOne = (): void => {
    // Pick a request whose blocks are all idle.
    for (let attempt = 0; attempt < 16; attempt++) {
      const r = rnd();
      const count = r < 0.1 ? 2 + Math.floor(rnd() * 7) : 1;
      const lbn = Math.floor(rnd() * (WORKING_BLOCKS - count));
      let free = true;
      for (let i = 0; i < count; i++) if (busy.has(lbn + i)) free = false;
      if (!free) continue;
      const lbns = Array.from({ length: count }, (_, i) => lbn + i);
      const contents: Buffer[] = [];
      let send: () => Promise<void>;
      const fua = mode === 'fua';
      if (r >= 0.1 && r < 0.16) {
        // A 512-byte write into the middle of a block: merges with the current contents.
        const sector = Math.floor(rnd() * 8);
        const id = ++w.writeId;
        const piece = blockContent(lbn, id).subarray(0, 512);
        const next = Buffer.from(w.acked.get(lbn) ?? ZERO);
        piece.copy(next, sector * 512);
        contents.push(next);
        send = () => c.write(lbn * BS + sector * 512, piece, fua);
      } else if (r >= 0.16 && r < 0.2) {
        contents.push(ZERO);
        send = () => c.trim(lbn * BS, BS, fua);
      } else {
        for (const l of lbns) contents.push(blockContent(l, ++w.writeId));
        const data = Buffer.concat(contents);
        send = () => c.write(lbn * BS, data, fua);
      }
      for (const l of lbns) busy.add(l);
      const p = send().then(
        () => {
          lbns.forEach((l, i) => w.acked.set(l, contents[i]!));
          w.ackedWrites++;
        },
        (e: unknown) => {
          if (e instanceof NbdClosedError) {
            lbns.forEach((l, i) => w.inflight.set(l, contents[i]!));
            w.killedInFlight++;
          } else {
            errors.push(`request on lbn ${lbn}: ${(e as Error).message}`);
          }
        },
      ).finally(() => {
        for (const l of lbns) busy.delete(l);
        if (!c.isClosed) issueOne();
      });
      settled.push(p);
      if (mode === 'flush' && ++sinceFlush >= 16) {
        sinceFlush = 0;
        settled.push(c.flush().catch((e: unknown) => {
          if (!(e instanceof NbdClosedError)) errors.push(`flush: ${(e as Error).message}`);
        }));
      }
      return;
    }
  };
  for (let i = 0; i < QUEUE_DEPTH; i++) issueOne();
  // Wait until the connection is gone, then until every request has settled.
  while (!c.isClosed) await new Promise((r) => setTimeout(r, 20));
  let n = 0;
  while (n !== settled.length) {
    n = settled.length;
    await Promise.all(settled.slice());
  }
}

describe('crash: kill -9 of the real server under load', function () {
  this.timeout(300_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-crash-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it(`keeps every acknowledged write across ${ROUNDS} kills (plain, FUA, FLUSH; CPs running)`, async () => {
    const seed = seedFromEnv();
    console.log(`      process-crash seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    const dir = path.join(tmp, 'vol');
    const sock = path.join(tmp, 's');
    const created = await runCli(['create', dir, '--size', String(VOLUME_BYTES), '--nvram-size', '1M']);
    assert.equal(created.code, 0, created.stderr);
    const w: World = { acked: new Map(), inflight: new Map(), writeId: 0, ackedWrites: 0, killedInFlight: 0, landedInFlight: 0 };
    const t0 = Date.now();
    const intervals = [20, 100, 1000];
    for (let round = 0; round < ROUNDS; round++) {
      const mode: Mode = (['plain', 'fua', 'flush'] as const)[round % 3]!;
      const cpInterval = intervals[Math.floor(rnd() * intervals.length)]!;
      const server = await ServedVolume.start(dir, sock, ['--cp-interval', String(cpInterval)]);
      const c = await NbdClient.connect(sock, '');
      const problems = await verify(c, w, true);
      assert.deepEqual(problems, [], `seed ${seed} round ${round}: after restart:\n${problems.slice(0, 20).join('\n')}`);
      const errors: string[] = [];
      const killAfterMs = 150 + Math.floor(rnd() * 900);
      const killer = setTimeout(() => server.kill9(), killAfterMs);
      await load(c, w, mode, rnd, errors);
      clearTimeout(killer);
      const exit = await server.exited;
      assert.equal(exit.signal, 'SIGKILL', `seed ${seed} round ${round}: server died on its own: ${server.stderr}`);
      assert.deepEqual(errors, [], `seed ${seed} round ${round}: request errors`);
      if (round % 7 === 6) {
        // `check` on the killed volume (before recovery): the tree verifies, the NVRAM records are valid.
        const chk = await runCli(['check', dir]);
        assert.equal(chk.code, 0, `seed ${seed} round ${round}: check after kill:\n${chk.stdout}${chk.stderr}`);
      }
    }
    // Final restart, verification, clean stop and check.
    const server = await ServedVolume.start(dir, sock, ['--cp-interval', '1000']);
    const c = await NbdClient.connect(sock, '');
    const problems = await verify(c, w, true);
    assert.deepEqual(problems, [], `seed ${seed}: final verification:\n${problems.slice(0, 20).join('\n')}`);
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
    const chk = await runCli(['check', dir]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    console.log(`      ${ROUNDS} kills in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${w.ackedWrites} acknowledged requests, ` +
      `${w.acked.size} blocks verified each restart, ${w.killedInFlight} requests in flight at kills (${w.landedInFlight} blocks of them landed)`);
    assert.ok(w.ackedWrites > ROUNDS * 50, `too little load: ${w.ackedWrites} acknowledged writes`);

    // Negative control: the same checker against an empty volume must report losses.
    const empty = path.join(tmp, 'empty');
    assert.equal((await runCli(['create', empty, '--size', String(VOLUME_BYTES), '--nvram-size', '1M'])).code, 0);
    const sock2 = path.join(tmp, 's2');
    const s2 = await ServedVolume.start(empty, sock2);
    const c2 = await NbdClient.connect(sock2, '');
    const lost = await verify(c2, w, false);
    await c2.close();
    await s2.stop();
    assert.ok(lost.length > 0, 'negative control: the checker found nothing missing on an empty volume');
  });
});
