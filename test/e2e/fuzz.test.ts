/**
 * A seeded, bounded NBD protocol fuzzer on raw sockets against a real `nvmirror serve`
 * (engine backend). Slots of hostile actors run back to back until the deadline: garbage
 * handshakes, random options, random requests with a strict reply checker, pipelined
 * 32/64 MiB writes then close, READs never read, DISC followed by junk, idle holders,
 * stalls in the middle of a payload. Meanwhile a well-behaved probe writes, reads back
 * and disconnects every 500 ms.
 *
 * It asserts: no reply breaks the spec (valid requests, FUA on any command and up to the
 * advertised 64 MiB, succeed; chunks are well framed, an OFFSET_DATA chunk covers >= 1
 * byte; every reply matches an outstanding cookie); no request goes unanswered (20 s for
 * small ones, 60 s on a connection with large ones: REPLY_TIMEOUT_*); every probe succeeds; the server's
 * peak RSS stays under RSS_BOUND_BYTES (512 MiB); once the actors are gone, the server
 * holds no more sockets than before (no leaked connections).
 *
 * Seed: NVM_FUZZ_SEED (printed on every run; a failure is replayed with it). Time:
 * NVM_FUZZ_SECONDS (default 30, within CI's 60 s bound; run longer by hand).
 * NVM_FUZZ_BACKEND picks the backend (default engine), NVM_FUZZ_SERVER_ARGS adds serve
 * arguments (e.g. "--log-level debug"), NVM_FUZZ_LOG=FILE saves the server's log. NVM_FUZZ_LEGACY=1 starts the server without the timeout options (to measure builds
 * that predate them).
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import * as fs from 'fs';
import { SeededRandom } from '../../src/sim/random';
import { SMALL_CHARGE_BYTES_MAX } from '../../src/nbd/limits';
import { MiB, Server, cleanupAll, rssBytes, sleep, startServer } from './harness';
import {
  CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT, RawConn, Session, clientFlags, goData, metaContextData,
  negotiate, nextCookie, option, optionHeader, readGreeting, request, simpleCommand, simpleRead, targetOf,
} from './rawnbd';

const SEED = process.env['NVM_FUZZ_SEED'] !== undefined ? Number(process.env['NVM_FUZZ_SEED']) : crypto.randomInt(0, 2 ** 31);
const DURATION_MS = Number(process.env['NVM_FUZZ_SECONDS'] ?? '30') * 1000;
const LEGACY = process.env['NVM_FUZZ_LEGACY'] === '1';
const BACKEND = (process.env['NVM_FUZZ_BACKEND'] ?? 'engine') as 'engine' | 'memory' | 'file';
const SIZE_BYTES = 256 * MiB;
const RSS_BOUND_BYTES = 512 * MiB;
const SLOTS = 16;
const MAX_CONNECTIONS = 32;
const STALL_TIMEOUT_S = 3;
/**
 * A request is lost if its reply does not come within this: 20 s, plus 40 s on a
 * connection that sent a READ or WRITE larger than the budget's small lane takes (those
 * queue in the budget's FIFO behind up to MAX_CONNECTIONS x 64 MiB of other large
 * requests, ~2 GiB: the actors offer more 32/64 MiB writes than the engine absorbs on
 * two shared cores, so 20-30 s waits are backpressure, not a hang). Small requests pass
 * the large ones through the lane (budget.ts) and keep the 20 s bound.
 */
const REPLY_TIMEOUT_SMALL_MS = 20_000;
const REPLY_TIMEOUT_LARGE_MS = 60_000;
/** An actor still running after this is reported as hung and cut off. */
const ACTOR_TIMEOUT_MS = REPLY_TIMEOUT_LARGE_MS + 10_000;
/** The probe's own region, far from what actors write (they stay below it). */
const PROBE_BASE = SIZE_BYTES - 4 * MiB;
const ACTOR_SPAN_BYTES = PROBE_BASE;

/** Open sockets of a process; -1 once it has exited. */
function socketCount(pid: number): number {
  let n = 0;
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return -1;
  }
  for (const fd of fds) {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('socket:')) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

interface Outstanding {
  type: number;
  length: number;
  /** A request the spec says must succeed (we check its final error is 0). */
  mustSucceed: boolean;
  what: string;
  error: number;
}

/**
 * Reads replies as they stream in and checks them against the outstanding requests.
 * Violations are collected, not thrown: the actor carries on and the test reports them.
 */
class ReplyChecker {
  private buf: Buffer = Buffer.alloc(0);
  readonly pending = new Map<bigint, Outstanding>();
  private dead = false;
  constructor(
    private readonly structured: boolean,
    private readonly violations: string[],
    private readonly tag: string,
  ) {}

  /** Bytes of reply data still to skip (READ data is counted, never buffered). */
  private skip = 0;

  feed(chunk: Buffer): void {
    let c = chunk;
    while (c.length > 0 && !this.dead) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, c.length);
        this.skip -= k;
        c = c.subarray(k);
        continue;
      }
      this.buf = this.buf.length === 0 ? c : Buffer.concat([this.buf, c]);
      c = c.subarray(c.length);
      this.parse();
    }
  }

  /** Consumes `n` bytes of reply data: what is buffered now, the rest as it arrives. */
  private skipData(n: number): void {
    const k = Math.min(n, this.buf.length);
    this.buf = this.buf.subarray(k);
    this.skip = n - k;
  }

  private parse(): void {
    while (!this.dead && this.skip === 0) {
      if (this.buf.length < 4) return;
      const magic = this.buf.readUInt32BE(0);
      if (magic === 0x67446698) {
        if (this.buf.length < 16) return;
        const error = this.buf.readUInt32BE(4);
        const cookie = this.buf.readBigUInt64BE(8);
        const req = this.pending.get(cookie);
        if (!req) return this.fail(`simple reply for unknown cookie ${cookie}`);
        if (this.structured && req.type === CMD.READ) return this.fail(`simple reply to a READ with structured replies (${req.what})`);
        this.buf = this.buf.subarray(16);
        this.done(cookie, req, error);
        this.skipData(req.type === CMD.READ && error === 0 ? req.length : 0);
      } else if (magic === 0x668e33ef) {
        if (this.buf.length < 20) return;
        const flags = this.buf.readUInt16BE(4);
        const type = this.buf.readUInt16BE(6);
        const cookie = this.buf.readBigUInt64BE(8);
        const len = this.buf.readUInt32BE(16);
        const req = this.pending.get(cookie);
        if (!req) return this.fail(`structured chunk for unknown cookie ${cookie}`);
        if (!this.structured) return this.fail('structured chunk without structured replies');
        if (len > 64 * MiB + 64) return this.fail(`chunk length ${len}`);
        let error = 0;
        if (type === CHUNK.OFFSET_DATA || type === CHUNK.OFFSET_HOLE) {
          if (type === CHUNK.OFFSET_DATA && len < 9) return this.fail(`OFFSET_DATA chunk of ${len} bytes covers no data (${req.what})`);
          this.buf = this.buf.subarray(20);
          this.skipData(len);
        } else {
          if (len > 64 * 1024) return this.fail(`chunk type ${type} of ${len} bytes`);
          if (this.buf.length < 20 + len) return;
          const data = this.buf.subarray(20, 20 + len);
          this.buf = this.buf.subarray(20 + len);
          if ((type & 0x8000) !== 0) {
            if (len < 6 || data.readUInt16BE(4) + 6 !== len) return this.fail(`malformed ERROR chunk (${req.what})`);
            error = data.readUInt32BE(0);
          } else if (type === CHUNK.BLOCK_STATUS) {
            if (len < 12 || (len - 4) % 8 !== 0) return this.fail(`malformed BLOCK_STATUS chunk (${req.what})`);
          } else if (type === CHUNK.NONE) {
            if (len !== 0) return this.fail('NONE chunk with data');
          } else {
            return this.fail(`unknown chunk type ${type}`);
          }
        }
        if (error !== 0 && req.error === 0) req.error = error;
        if ((flags & CHUNK_FLAG_DONE) !== 0) this.done(cookie, req, req.error);
      } else {
        return this.fail(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }

  private done(cookie: bigint, req: Outstanding, error: number): void {
    this.pending.delete(cookie);
    if (req.mustSucceed && error !== 0) this.violations.push(`${this.tag}: ${req.what} failed with error ${error}`);
  }

  private fail(msg: string): void {
    this.dead = true;
    this.violations.push(`${this.tag}: ${msg}`);
  }
}

/** Distinct kinds of violation (numbers and tags stripped), with counts, most frequent first. */
function kinds(vs: string[]): string[] {
  const m = new Map<string, number>();
  for (const v of vs) {
    const k = v.replace(/^seed \d+ slot \d+ actor \d+ /, '').replace(/0x[0-9a-f]+|\d+/g, 'N').slice(0, 120);
    m.set(k, (m.get(k) ?? 0) + 1);
  }
  return [...m].sort((a, b) => b[1] - a[1]).slice(0, 6).map(([k, n]) => `${n} x ${k}`);
}

const LENGTHS = [0, 1, 512, 4096, 65536, MiB, 32 * MiB, 64 * MiB, 64 * MiB + 1];

describe(`e2e NBD protocol fuzzer (seed ${SEED}, ${DURATION_MS / 1000} s)`, function () {
  this.timeout(DURATION_MS + ACTOR_TIMEOUT_MS + 60_000);
  let server: Server;
  const violations: string[] = [];
  const live = new Set<RawConn>();

  before(async function () {
    process.stdout.write(`      fuzz seed ${SEED} (replay: NVM_FUZZ_SEED=${SEED} NVM_FUZZ_SECONDS=${DURATION_MS / 1000})\n`);
    const extra = ['--max-connections', String(MAX_CONNECTIONS)];
    if (!LEGACY) extra.push('--stall-timeout', `${STALL_TIMEOUT_S}s`);
    extra.push(...(process.env['NVM_FUZZ_SERVER_ARGS'] ?? '').split(' ').filter(Boolean));
    server = await startServer({ backend: BACKEND, transport: 'unix', sizeBytes: SIZE_BYTES, extraArgs: extra });
  });
  after(async function () {
    for (const c of live) c.destroy();
    try {
      if (server?.alive()) await server.stop();
    } finally {
      if (process.env['NVM_FUZZ_LOG'] !== undefined && server) fs.writeFileSync(process.env['NVM_FUZZ_LOG'], server.stderr());
      await cleanupAll();
    }
  });

  /** The connections of the actor running in each slot, destroyed if it overruns. */
  const slotConns = new Map<number, Set<RawConn>>();
  /** The longest a randomRequests actor waited for its last reply (after its last request). */
  const slowest = { small: 0, large: 0 };
  let currentSlot = -1;
  async function connect(): Promise<RawConn> {
    const slot = currentSlot;
    const c = await RawConn.connect(targetOf(server), 5000);
    live.add(c);
    slotConns.get(slot)?.add(c);
    c.socket.once('close', () => {
      live.delete(c);
      slotConns.get(slot)?.delete(c);
    });
    return c;
  }

  // ------------------------------------------------------------------ the actors

  async function garbageHandshake(r: SeededRandom): Promise<void> {
    const c = await connect();
    if (r.chance(0.5)) await readGreeting(c).catch(() => undefined);
    await c.write(crypto.randomBytes(r.int(8192) + 1));
    await sleep(r.int(200));
    c.destroy();
  }

  async function randomOptions(r: SeededRandom): Promise<void> {
    const c = await connect();
    await readGreeting(c);
    await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    const n = r.int(20) + 1;
    for (let i = 0; i < n && !c.isClosed; i++) {
      const k = r.int(7);
      if (k === 0) await c.write(option(OPT.LIST));
      else if (k === 1) await c.write(option(OPT.STRUCTURED_REPLY));
      else if (k === 2) await c.write(option(OPT.INFO, goData(r.chance(0.5) ? '' : crypto.randomBytes(r.int(64)).toString('hex'))));
      else if (k === 3) await c.write(option(OPT.SET_META_CONTEXT, metaContextData('', ['base:allocation', 'x:y'])));
      else if (k === 4) await c.write(option(r.int(20), crypto.randomBytes(r.int(300))));
      else if (k === 5) await c.write(Buffer.concat([optionHeader(r.int(20), r.chance(0.5) ? 0xffffffff : r.int(1 << 20)), crypto.randomBytes(r.int(1024))]));
      else await c.write(option(OPT.GO, goData('')));
    }
    await sleep(r.int(300));
    c.destroy();
  }

  /** Random requests, mostly valid, with a strict reply checker. */
  async function randomRequests(r: SeededRandom, tag: string): Promise<void> {
    const structured = r.chance(0.6);
    const s = await negotiate(await connect(), { structured, blockStatus: structured && r.chance(0.7) });
    const checker = new ReplyChecker(structured, violations, tag);
    s.conn.socket.removeAllListeners('data');
    s.conn.socket.on('data', (b: Buffer) => checker.feed(b));
    const n = r.int(24) + 1;
    let large = false;
    for (let i = 0; i < n && !s.conn.isClosed; i++) {
      const type = r.chance(0.9) ? r.int(8) : r.int(20);
      if (type === CMD.DISC) continue;
      let flags = r.chance(0.5) ? CMD_FLAG.FUA : 0;
      if (r.chance(0.1)) flags |= 1 << r.int(16);
      if (type === CMD.READ && structured && r.chance(0.3)) flags |= CMD_FLAG.DF;
      if (type === CMD.BLOCK_STATUS && r.chance(0.5)) flags |= CMD_FLAG.REQ_ONE;
      if (type === CMD.WRITE_ZEROES && r.chance(0.3)) flags |= CMD_FLAG.NO_HOLE;
      let length = LENGTHS[r.int(LENGTHS.length)] as number;
      if (r.chance(0.05)) length = r.int(2 ** 32);
      if (type === CMD.FLUSH) length = 0;
      let offset = type === CMD.FLUSH ? 0 : r.int(Math.max(1, ACTOR_SPAN_BYTES - Math.min(length, ACTOR_SPAN_BYTES)));
      if (r.chance(0.05)) offset = SIZE_BYTES - r.int(4096);
      const known: Record<number, number> = {
        [CMD.READ]: CMD_FLAG.FUA | (structured ? CMD_FLAG.DF : 0),
        [CMD.WRITE]: CMD_FLAG.FUA,
        [CMD.FLUSH]: CMD_FLAG.FUA,
        [CMD.TRIM]: CMD_FLAG.FUA,
        [CMD.CACHE]: CMD_FLAG.FUA,
        [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE,
        ...(s.metaContextId !== undefined ? { [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE } : {}),
      };
      const allowed = known[type];
      const inRange = offset + length <= ACTOR_SPAN_BYTES;
      const sizeOk = type === CMD.READ || type === CMD.WRITE ? length > 0 && length <= 64 * MiB : type !== CMD.BLOCK_STATUS || length > 0;
      const mustSucceed = allowed !== undefined && (flags & ~allowed) === 0 && inRange && sizeOk;
      const cookie = nextCookie();
      const what = `type ${type} flags 0x${flags.toString(16)} ${length}@${offset}`;
      checker.pending.set(cookie, { type, length, mustSucceed, what, error: 0 });
      if ((type === CMD.READ || type === CMD.WRITE) && length > SMALL_CHARGE_BYTES_MAX) large = true;
      await s.conn.write(request({ type, flags, cookie, offset, length }));
      if (type === CMD.WRITE && length <= 64 * MiB + 1) await s.conn.writeFiller(length, r.int(256));
    }
    const sent = Date.now();
    const bound = large ? REPLY_TIMEOUT_LARGE_MS : REPLY_TIMEOUT_SMALL_MS;
    while (checker.pending.size > 0 && !s.conn.isClosed && Date.now() < sent + bound) await sleep(20);
    if (checker.pending.size > 0 && !s.conn.isClosed) {
      violations.push(`${tag}: ${checker.pending.size} requests unanswered after ${bound / 1000} s: ${[...checker.pending.values()].map((p) => p.what).slice(0, 3).join('; ')}`);
    } else if (checker.pending.size === 0) {
      const ms = Date.now() - sent;
      if (large) slowest.large = Math.max(slowest.large, ms);
      else slowest.small = Math.max(slowest.small, ms);
    }
    s.conn.destroy();
  }

  async function pipelineAndClose(r: SeededRandom): Promise<void> {
    const s = await negotiate(await connect());
    const payload = Buffer.alloc(r.chance(0.5) ? 32 * MiB : 64 * MiB, r.int(256));
    const k = r.int(4) + 1;
    for (let i = 0; i < k; i++) {
      s.conn.socket.write(request({ type: CMD.WRITE, cookie: nextCookie(), offset: r.int(ACTOR_SPAN_BYTES - payload.length), length: payload.length }));
      s.conn.socket.write(payload);
    }
    await sleep(r.int(1500));
    s.conn.destroy();
  }

  async function neverRead(r: SeededRandom): Promise<void> {
    const s = await negotiate(await connect(), { structured: r.chance(0.5) });
    s.conn.socket.pause();
    const until = Date.now() + 2000 + r.int(4000);
    while (Date.now() < until && !s.conn.isClosed) {
      if (!s.conn.socket.write(request({ type: CMD.READ, cookie: nextCookie(), offset: r.int(ACTOR_SPAN_BYTES - MiB), length: MiB }))) await sleep(20);
    }
    s.conn.destroy();
  }

  async function discAndJunk(r: SeededRandom): Promise<void> {
    const s = await negotiate(await connect());
    const junk = Buffer.alloc(64 * 1024 + r.int(256 * 1024), r.int(256));
    const hdr = request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: MiB });
    await s.conn.write(Buffer.concat([request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }), hdr, junk]));
    await sleep(r.int(100));
    s.conn.destroy();
  }

  async function idleHolder(r: SeededRandom): Promise<void> {
    const s = await negotiate(await connect());
    await sleep(1000 + r.int(6000));
    s.conn.destroy();
  }

  async function midPayloadStall(r: SeededRandom): Promise<void> {
    const s = await negotiate(await connect());
    await s.conn.write(request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: 64 * MiB }));
    await s.conn.writeFiller(r.int(8 * MiB));
    await sleep(1000 + r.int(5000));
    s.conn.destroy();
  }

  const ACTORS: Array<[string, number]> = [
    ['garbageHandshake', 2], ['randomOptions', 2], ['randomRequests', 6], ['pipelineAndClose', 2],
    ['neverRead', 1], ['discAndJunk', 2], ['idleHolder', 1], ['midPayloadStall', 1],
  ];

  async function runSlot(slot: number, deadline: number, counts: Map<string, number>): Promise<void> {
    const r = new SeededRandom(SEED).fork(slot + 1);
    let i = 0;
    while (Date.now() < deadline && server.alive()) {
      const name = (ACTORS[r.weighted(ACTORS.map((a) => a[1]))] as [string, number])[0];
      const ar = r.fork(1000 + i++);
      counts.set(name, (counts.get(name) ?? 0) + 1);
      const tag = `seed ${SEED} slot ${slot} actor ${i} ${name}`;
      slotConns.set(slot, new Set());
      const actor = async (): Promise<void> => {
        switch (name) {
          case 'garbageHandshake': return garbageHandshake(ar);
          case 'randomOptions': return randomOptions(ar);
          case 'randomRequests': return randomRequests(ar, tag);
          case 'pipelineAndClose': return pipelineAndClose(ar);
          case 'neverRead': return neverRead(ar);
          case 'discAndJunk': return discAndJunk(ar);
          case 'idleHolder': return idleHolder(ar);
          case 'midPayloadStall': return midPayloadStall(ar);
        }
      };
      currentSlot = slot; // read synchronously by connect() before its first await
      const run = actor();
      currentSlot = -1;
      let timer: NodeJS.Timeout | undefined;
      const overran = new Promise<'overran'>((r) => (timer = setTimeout(() => r('overran'), ACTOR_TIMEOUT_MS)));
      try {
        if ((await Promise.race([run, overran])) === 'overran') {
          violations.push(`${tag}: hung for ${ACTOR_TIMEOUT_MS} ms (the server neither served nor dropped it)`);
          for (const c of slotConns.get(slot) ?? []) c.destroy();
          await run.catch(() => undefined);
        }
      } catch (e) {
        // A hostile actor being cut off is expected; failing to connect or to negotiate is not.
        const msg = (e as Error).message;
        if (/ECONNREFUSED|ENOENT|reading the server greeting|connect timed out/.test(msg)) violations.push(`${tag}: could not connect: ${msg}`);
      } finally {
        clearTimeout(timer);
      }
    }
  }

  it('keeps answering a well-behaved client, bounded in memory and connections, with spec-conformant replies', async function () {
    const baselineSockets = socketCount(server.pid);
    const startRss = rssBytes(server.pid);
    let peakRss = rssBytes(server.pid);
    let peakSockets = baselineSockets;
    const sampler = setInterval(() => {
      try {
        peakRss = Math.max(peakRss, rssBytes(server.pid));
        peakSockets = Math.max(peakSockets, socketCount(server.pid));
      } catch {
        // exited: reported below
      }
    }, 100);
    const deadline = Date.now() + DURATION_MS;
    const counts = new Map<string, number>();
    const slots = Array.from({ length: SLOTS }, (_, i) => runSlot(i, deadline, counts));

    // The probe: a well-behaved client every 500 ms.
    const probeRandom = new SeededRandom(SEED).fork(999);
    let probes = 0;
    const probeFailures: string[] = [];
    let probeMaxMs = 0;
    let probeWriteMaxMs = 0;
    while (Date.now() < deadline && server.alive()) {
      const t0 = Date.now();
      let s: Session | undefined;
      try {
        s = await negotiate(await RawConn.connect(targetOf(server), 5000));
        const off = PROBE_BASE + probeRandom.int(1000) * 4096;
        const data = crypto.randomBytes(4096);
        const tw = Date.now();
        const w = await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: off, length: 4096 }, data);
        probeWriteMaxMs = Math.max(probeWriteMaxMs, Date.now() - tw);
        assert.equal(w, 0, `probe write: error ${w}`);
        const back = await simpleRead(s, off, 4096);
        assert.ok(back.data?.equals(data), 'probe data reads back');
        probes++;
      } catch (e) {
        probeFailures.push(`at +${Math.round((t0 - deadline + DURATION_MS) / 1000)} s: ${(e as Error).message}`);
      } finally {
        s?.conn.destroy();
      }
      probeMaxMs = Math.max(probeMaxMs, Date.now() - t0);
      await sleep(500);
    }
    await Promise.all(slots);
    for (const c of live) c.destroy();
    // Everything the actors opened is closed; the server must let go of all of it.
    const settle = Date.now() + (STALL_TIMEOUT_S + 5) * 1000;
    while (server.alive() && socketCount(server.pid) > baselineSockets && Date.now() < settle) await sleep(200);
    clearInterval(sampler);
    const afterSockets = socketCount(server.pid);
    const alive = server.alive();
    const report = [
      `seed ${SEED}: ${[...counts].map(([k, v]) => `${k} ${v}`).join(', ')}`,
      `probes ok ${probes}, failed ${probeFailures.length}, slowest ${probeMaxMs} ms (its write ${probeWriteMaxMs} ms)`,
      `random requests: the longest wait for the replies after the last request ${slowest.small} ms (${slowest.large} ms on connections with requests > 1 MiB)`,
      `server RSS ${(startRss / MiB).toFixed(0)} MiB at start, peak ${(peakRss / MiB).toFixed(0)} MiB; sockets: ${baselineSockets} before, peak ${peakSockets}, ${afterSockets} after`,
      `violations ${violations.length}`,
      ...kinds(violations).map((k) => `  ${k}`),
    ];
    process.stdout.write(report.map((l) => `      ${l}\n`).join(''));
    if (process.env['NVM_FUZZ_LOG'] !== undefined) fs.writeFileSync(process.env['NVM_FUZZ_LOG'], server.stderr());
    assert.ok(alive, `server died (seed ${SEED}):\n${server.stderr().slice(-1500)}`);
    assert.deepEqual(violations.slice(0, 10), [], `protocol violations (seed ${SEED})`);
    assert.deepEqual(probeFailures.slice(0, 10), [], `the well-behaved client failed (seed ${SEED})`);
    assert.ok(peakRss < RSS_BOUND_BYTES, `peak RSS ${(peakRss / MiB).toFixed(0)} MiB >= ${RSS_BOUND_BYTES / MiB} MiB (seed ${SEED})`);
    assert.ok(afterSockets <= baselineSockets, `${afterSockets - baselineSockets} connections leaked (seed ${SEED})`);
    const t = Date.now();
    assert.equal(await server.stop(), 0);
    assert.ok(Date.now() - t < 10_000, `shutdown took ${Date.now() - t} ms`);
  });
});
