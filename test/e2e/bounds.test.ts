/**
 * The server stays bounded and reachable under hostile clients (issue 11 points 4-7), on
 * raw sockets against a real `nvmirror serve`:
 * - 4: one memory budget for the whole server: many clients pipelining 32 MiB writes and
 *   closing keep the RSS under RSS_BOUND_BYTES (512 MiB), a closed connection's buffers
 *   are released at once (a 64 MiB write gets through right after), shutdown is quick;
 * - 5: a client that sends 1 MiB READs and never reads replies is not answered into an
 *   unbounded queue, and is dropped after --stall-timeout; so is one that stops in the
 *   middle of a WRITE payload;
 * - 6: DISC followed by >= 64 KiB of bytes, then close, leaks no connection (130 of them,
 *   more than the 128 slots, and a new client still gets in); nor does ABORT (found by
 *   the fuzzer: the server half-closed, stopped reading, and never saw the FIN);
 * - 7: --idle-timeout drops idle clients (not busy ones); when every slot is taken, the
 *   longest-idle connection, or the oldest stalled handshake, makes room for a new one.
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import * as fs from 'fs';
import { MiB, Server, cleanupAll, rssBytes, sleep, startServer } from './harness';
import {
  CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT, RawConn, Session, clientFlags, negotiate, nextCookie, option, readGreeting, request, simpleCommand, simpleRead,
  targetOf,
} from './rawnbd';

const RSS_BOUND_BYTES = 512 * MiB;

/** Open sockets of a process (its /proc/PID/fd entries that are sockets). */
function socketCount(pid: number): number {
  let n = 0;
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('socket:')) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/** Samples a process's RSS every 50 ms until stopped; returns the peak. */
function rssSampler(pid: number): { stop(): number } {
  let peak = rssBytes(pid);
  const t = setInterval(() => {
    try {
      peak = Math.max(peak, rssBytes(pid));
    } catch {
      // exited
    }
  }, 50);
  return {
    stop: () => {
      clearInterval(t);
      return peak;
    },
  };
}

async function healthy(server: Server): Promise<void> {
  assert.ok(server.alive(), `server died:\n${server.stderr().slice(-3000)}`);
  const s = await negotiate(await RawConn.connect(targetOf(server), 5000));
  try {
    const data = crypto.randomBytes(4096);
    assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 4096, length: 4096 }, data), 0);
    const r = await simpleRead(s, 4096, 4096);
    assert.ok(r.data?.equals(data), 'a well-behaved client reads back its write');
  } finally {
    s.conn.destroy();
  }
}

describe('e2e bounded under hostile clients (issue 11 points 4-7)', function () {
  this.timeout(90_000);
  const conns: RawConn[] = [];
  async function session(server: Server): Promise<Session> {
    const c = await RawConn.connect(targetOf(server));
    conns.push(c);
    return negotiate(c);
  }
  afterEach(function () {
    for (const c of conns.splice(0)) c.destroy();
  });
  after(async function () {
    await cleanupAll();
  });

  it('4: 48 clients pipelining 32 MiB writes and closing keep the engine under 512 MiB RSS; buffers are released at close', async function () {
    const server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 512 * MiB });
    const payload = Buffer.alloc(32 * MiB, 0x6b);
    const sampler = rssSampler(server.pid);
    for (let round = 0; round < 3; round++) {
      const clients = await Promise.all(Array.from({ length: 16 }, () => session(server)));
      for (const [i, s] of clients.entries()) {
        for (let k = 0; k < 4; k++) {
          const off = ((i * 4 + k) % 14) * 32 * MiB;
          s.conn.socket.write(request({ type: CMD.WRITE, cookie: nextCookie(), offset: off, length: payload.length }));
          s.conn.socket.write(payload);
        }
      }
      await sleep(1500);
      for (const s of clients) s.conn.destroy();
    }
    // Released at once: a 64 MiB write from a new client goes through promptly.
    const s = await session(server);
    const big = crypto.randomBytes(64 * MiB);
    const t0 = Date.now();
    assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 448 * MiB, length: big.length }, big), 0);
    assert.ok(Date.now() - t0 < 10_000, `64 MiB write after the abuse took ${Date.now() - t0} ms`);
    const peak = sampler.stop();
    process.stdout.write(`      peak server RSS under 48 pipelining clients: ${(peak / MiB).toFixed(0)} MiB\n`);
    assert.ok(peak < RSS_BOUND_BYTES, `peak RSS ${(peak / MiB).toFixed(0)} MiB >= ${RSS_BOUND_BYTES / MiB} MiB`);
    await healthy(server);
    const t1 = Date.now();
    assert.equal(await server.stop(), 0);
    assert.ok(Date.now() - t1 < 10_000, `shutdown took ${Date.now() - t1} ms`);
  });

  it('5: a client sending 1 MiB READs and never reading is bounded and dropped after --stall-timeout', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 256 * MiB, extraArgs: ['--stall-timeout', '2s'] });
    const s = await session(server);
    s.conn.socket.pause(); // never read a reply
    const before = rssBytes(server.pid);
    const sampler = rssSampler(server.pid);
    // 1 GiB of READs, one request at a time as the socket takes them.
    for (let i = 0; i < 1024 && !s.conn.isClosed; i++) {
      if (!s.conn.socket.write(request({ type: CMD.READ, cookie: nextCookie(), offset: (i % 200) * MiB, length: MiB }))) {
        await sleep(5);
      }
    }
    const deadline = Date.now() + 8000;
    while (!/read none of its/.test(server.stderr()) && Date.now() < deadline) await sleep(100);
    const peak = sampler.stop();
    process.stdout.write(`      RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB while replies were not read\n`);
    assert.ok(peak - before < 128 * MiB, `RSS grew by ${((peak - before) / MiB).toFixed(0)} MiB for unread replies`);
    assert.match(server.stderr(), /read none of its/, 'the server drops a client that reads nothing (stall timeout)');
    await healthy(server);
    assert.equal(await server.stop(), 0);
  });

  it('5: a slow but steady reader of an 8 MiB reply is not mistaken for a stalled one', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB, extraArgs: ['--stall-timeout', '1500ms'] });
    const s = await session(server);
    const sock = s.conn.socket;
    sock.removeAllListeners('data');
    sock.pause();
    let got = 0;
    const total = 8 * MiB + 16;
    await s.conn.write(request({ type: CMD.READ, cookie: nextCookie(), offset: 0, length: 8 * MiB }));
    // Read up to 512 KiB every 50 ms: the whole reply takes longer than the stall timeout.
    const t0 = Date.now();
    while (got < total && !s.conn.isClosed && Date.now() - t0 < 30_000) {
      for (let k = 0; k < 8 && got < total; k++) {
        const b = sock.read(Math.min(65536, total - got)) as Buffer | null;
        if (b === null) break;
        got += b.length;
      }
      await sleep(50);
    }
    const ms = Date.now() - t0;
    process.stdout.write(`      8 MiB reply read in ${ms} ms\n`);
    assert.ok(!s.conn.isClosed, `a steady reader was dropped after ${got} bytes:\n${server.stderr().slice(-800)}`);
    assert.equal(got, total);
    assert.ok(ms > 3000, `the reader was slower than the stall timeout (${ms} ms), else this proves nothing`);
    assert.equal(await server.stop(), 0);
  });

  it('5: a client that stops in the middle of a 64 MiB WRITE payload is dropped after --stall-timeout, its budget released', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 256 * MiB, extraArgs: ['--stall-timeout', '1s', '--memory-budget', '100M'] });
    const s = await session(server);
    await s.conn.write(request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: 64 * MiB }));
    await s.conn.writeFiller(MiB);
    assert.ok(await s.conn.waitClosed(5000), 'a client stalled mid-payload is dropped');
    // Its 64 MiB charge is back: another 64 MiB write fits the 100 MiB budget.
    const t = await session(server);
    const big = crypto.randomBytes(64 * MiB);
    assert.equal(await simpleCommand(t, { type: CMD.WRITE, offset: 0, length: big.length }, big), 0);
    await healthy(server);
    assert.equal(await server.stop(), 0);
  });

  it('6: 130 clients sending DISC and 64 KiB more, then closing, leak no connection', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB });
    const baseline = socketCount(server.pid);
    const junk = Buffer.alloc(128 * 1024, 0x11);
    for (let batch = 0; batch < 13; batch++) {
      await Promise.all(
        Array.from({ length: 10 }, async () => {
          const s = await session(server);
          // After DISC: a well-formed WRITE header and part of its payload (no framing error to end it).
          const disc = request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 });
          const write = request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: MiB });
          await s.conn.write(Buffer.concat([disc, write, junk]));
          s.conn.destroy();
        }),
      );
    }
    const deadline = Date.now() + 5000;
    while (socketCount(server.pid) > baseline && Date.now() < deadline) await sleep(100);
    const after = socketCount(server.pid);
    process.stdout.write(`      server sockets: ${baseline} before, ${after} after 130 DISC+junk clients\n`);
    assert.ok(after <= baseline, `server holds ${after - baseline} leaked connections`);
    await healthy(server);
    assert.equal(await server.stop(), 0);
  });

  it('6: 40 clients sending ABORT and 256 KiB more, then closing, leak no connection, and the server stops promptly', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB });
    const baseline = socketCount(server.pid);
    await Promise.all(
      Array.from({ length: 40 }, async () => {
        const c = await RawConn.connect(targetOf(server));
        conns.push(c);
        await readGreeting(c);
        await c.write(Buffer.concat([clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), option(OPT.ABORT)]));
        await c.read(20, 'reading the ABORT reply');
        // More bytes after ABORT, then close (as with DISC: they must not keep it open).
        c.socket.write(Buffer.alloc(256 * 1024, 0x33));
        await sleep(50);
        c.destroy();
      }),
    );
    const deadline = Date.now() + 5000;
    while (socketCount(server.pid) > baseline && Date.now() < deadline) await sleep(100);
    assert.ok(socketCount(server.pid) <= baseline, `server holds ${socketCount(server.pid) - baseline} connections after ABORT`);
    const t0 = Date.now();
    assert.equal(await server.stop(), 0);
    assert.ok(Date.now() - t0 < 5000, `stop took ${Date.now() - t0} ms`);
  });

  it('7: --idle-timeout drops an idle client but not a busy one', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB, extraArgs: ['--idle-timeout', '1s'] });
    const idle = await session(server);
    const busy = await session(server);
    const t0 = Date.now();
    while (Date.now() - t0 < 2500) {
      assert.equal((await simpleRead(busy, 0, 512)).error, 0, 'the busy client keeps being served');
      await sleep(250);
    }
    assert.ok(await idle.conn.waitClosed(2000), 'the idle client is dropped');
    assert.ok(!busy.conn.isClosed, 'the busy client is still connected');
    assert.match(server.stderr(), /idle for 1000 ms/);
    assert.equal(await server.stop(), 0);
  });

  it('7: when every slot is taken by idle clients, the longest-idle one makes room for a new client', async function () {
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB, extraArgs: ['--max-connections', '8'] });
    const idle: Session[] = [];
    for (let i = 0; i < 8; i++) idle.push(await session(server));
    await sleep(1200); // idle for longer than EVICT_IDLE_MS_MIN
    await healthy(server);
    assert.ok(await (idle[0] as Session).conn.waitClosed(2000), 'the longest-idle client was evicted');
    assert.ok(!(idle[7] as Session).conn.isClosed, 'the most recent idle client was kept');
    assert.equal(await server.stop(), 0);
  });

  it('7: when every slot is taken by stalled handshakes, the oldest makes room after 5 s', async function () {
    this.timeout(30_000);
    const server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB, extraArgs: ['--max-connections', '4'] });
    for (let i = 0; i < 4; i++) {
      const c = await RawConn.connect(targetOf(server));
      conns.push(c);
      await readGreeting(c);
    }
    await sleep(5200);
    await healthy(server);
    assert.equal(await server.stop(), 0);
  });
});
