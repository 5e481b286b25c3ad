/**
 * Tests of the network test infrastructure: the fault-injecting TCP relay
 * (test/net/relay.ts) in this process on 127.0.0.1, and the two-host network-namespace
 * harness (test/net/netns.ts) with processes, blackholes, link outages, rate limits and a
 * relay running inside a namespace.
 *
 * Invariants:
 * - every server, socket, relay and namespace a test makes is closed in afterEach/after,
 *   also when the test fails;
 * - the netns suite needs root, `ip`, `tc` and `nft`: under CI (CI=true) their absence
 *   fails the suite, elsewhere it is skipped with the reason;
 * - every wait has a limit; the whole file runs in well under 20 s.
 */
import { strict as assert } from 'assert';
import { ChildProcess, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as readline from 'readline';
import { createHostPair, HostPair, netnsAvailable } from '../net/netns';
import { Relay, startRelay, startRelayIn } from '../net/relay';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Limit for any single wait on a socket event in these tests. */
const WAIT_MS = 5_000;

/** Deterministic test bytes. */
function pattern(len: number, seed = 7): Buffer {
  const b = Buffer.alloc(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

/** A server on 127.0.0.1 that records what each connection sent; echoes if asked. */
class TestServer {
  readonly received: Buffer[][] = [];
  readonly sockets: net.Socket[] = [];
  readonly ended: Array<Promise<Buffer>> = [];
  private readonly server: net.Server;
  constructor(readonly mode: 'echo' | 'sink' | 'paused') {
    this.server = net.createServer({ allowHalfOpen: true }, (s) => {
      const chunks: Buffer[] = [];
      this.received.push(chunks);
      this.sockets.push(s);
      s.on('error', () => undefined);
      this.ended.push(
        new Promise((resolve) => {
          s.on('end', () => {
            s.end();
            resolve(Buffer.concat(chunks));
          });
          s.on('close', () => resolve(Buffer.concat(chunks)));
        }),
      );
      if (mode === 'paused') s.pause();
      s.on('data', (d: Buffer) => {
        chunks.push(d);
        if (mode === 'echo') s.write(d);
      });
    });
  }
  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    return (this.server.address() as net.AddressInfo).port;
  }
  bytes(conn = 0): Buffer {
    return Buffer.concat(this.received[conn] ?? []);
  }
  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

interface ClientResult {
  data: Buffer;
  /** Bytes read at each 'data' event's arrival, with its time since connect. */
  arrivals: Array<{ atMs: number; bytes: number }>;
  endedCleanly: boolean;
}

/** Connects, writes `writes` (each its own write() call, `gapMs` apart), ends, reads to close. */
async function talk(port: number, writes: readonly Buffer[], gapMs = 0, endAfterWrite = true): Promise<ClientResult> {
  const sock = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  const t0 = Date.now();
  const chunks: Buffer[] = [];
  const arrivals: ClientResult['arrivals'] = [];
  let endedCleanly = false;
  sock.on('data', (d: Buffer) => {
    chunks.push(d);
    arrivals.push({ atMs: Date.now() - t0, bytes: d.length });
  });
  sock.on('end', () => {
    endedCleanly = true;
    sock.end(); // a client that reads EOF closes too
  });
  const closed = new Promise<void>((resolve) => sock.on('close', () => resolve()));
  sock.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  for (const w of writes) {
    sock.write(w);
    if (gapMs > 0) await sleep(gapMs);
  }
  if (endAfterWrite) sock.end();
  await withTimeout(closed, WAIT_MS, 'client socket close');
  return { data: Buffer.concat(chunks), arrivals, endedCleanly };
}

function diffOffsets(a: Buffer, b: Buffer): number[] {
  assert.equal(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) out.push(i);
  return out;
}

function popcount8(x: number): number {
  let n = 0;
  for (let v = x; v !== 0; v >>= 1) n += v & 1;
  return n;
}

describe('net harness: fault-injecting relay', function () {
  this.timeout(10_000);
  let server: TestServer | undefined;
  let relay: Relay | undefined;

  afterEach(async () => {
    await relay?.close();
    await server?.close();
    relay = undefined;
    server = undefined;
  });

  async function setup(mode: TestServer['mode'], faults: Parameters<typeof startRelay>[0]['faults'] = {}, seed = 1): Promise<Relay> {
    server = new TestServer(mode);
    const port = await server.listen();
    relay = await startRelay({ targetHost: '127.0.0.1', targetPort: port, seed, faults });
    return relay;
  }

  it('relay forwards bytes exactly both ways and counts them', async () => {
    const r = await setup('echo');
    const data = pattern(3 * MiB + 17);
    const writes = [data.subarray(0, 1), data.subarray(1, MiB), data.subarray(MiB)];
    const res = await talk(r.port, writes);
    assert.ok(res.data.equals(data), 'echo through the relay returns the same bytes');
    assert.ok(res.endedCleanly, 'the client sees a clean EOF after the echo');
    assert.deepEqual(r.bytes, { toTarget: data.length, toClient: data.length });
    assert.equal(r.accepted, 1);
    const t0 = Date.now();
    while (r.live !== 0 && Date.now() - t0 < WAIT_MS) await sleep(10);
    assert.equal(r.live, 0, 'the connection is forgotten once both sides closed');
  });

  it('relay delays each chunk by delayMs and keeps their order', async () => {
    const DELAY_MS = 150;
    const r = await setup('echo', { delayMs: DELAY_MS });
    const pieces = Array.from({ length: 5 }, (_, i) => pattern(1000 + i, i + 1));
    const t0 = Date.now();
    const res = await talk(r.port, pieces, 20);
    assert.ok(res.data.equals(Buffer.concat(pieces)), 'bytes in order');
    const first = res.arrivals[0];
    assert.ok(first !== undefined);
    // Each direction adds DELAY_MS: the first echo comes back after at least 2 * DELAY_MS.
    assert.ok(first.atMs >= 2 * DELAY_MS - 5, `first echo after ${first.atMs} ms`);
    assert.ok(Date.now() - t0 < 2 * DELAY_MS + 2_000);
    // Changing the delay at run time does not reorder: a shorter delay waits behind a longer one.
    r.set({ delayMs: 400 });
    const sock = net.connect({ host: '127.0.0.1', port: r.port });
    const got: Buffer[] = [];
    sock.on('data', (d: Buffer) => got.push(d));
    await new Promise<void>((res2) => sock.once('connect', () => res2()));
    sock.write('A');
    await sleep(50);
    r.set({ delayMs: 0 });
    sock.write('B');
    await sleep(30);
    assert.equal(Buffer.concat(got).length, 0, 'B does not overtake A');
    const t1 = Date.now();
    while (Buffer.concat(got).length < 2 && Date.now() - t1 < WAIT_MS) await sleep(10);
    assert.equal(Buffer.concat(got).toString(), 'AB');
    sock.destroy();
  });

  it('relay cuts the stream after exactly N bytes', async () => {
    const N = 10_007;
    const r = await setup('sink', { cutAfterBytes: N, cutDirection: 'toTarget' });
    const data = pattern(200 * KiB);
    const res = await talk(r.port, [data.subarray(0, 5000), data.subarray(5000)], 0, false);
    const atTarget = await withTimeout(server!.ended[0]!, WAIT_MS, 'target sees EOF');
    assert.equal(atTarget.length, N);
    assert.ok(atTarget.equals(data.subarray(0, N)));
    assert.equal(r.bytes.toTarget, N);
    assert.ok(res.endedCleanly, 'the client gets a FIN');
  });

  it('relay cuts the stream after exactly N bytes toward the client', async () => {
    const N = 777;
    const r = await setup('echo', { cutAfterBytes: N, cutDirection: 'toClient' });
    const data = pattern(64 * KiB, 3);
    const res = await talk(r.port, [data], 0, false);
    assert.equal(res.data.length, N);
    assert.ok(res.data.equals(data.subarray(0, N)));
    assert.ok(res.endedCleanly);
    assert.equal(r.bytes.toClient, N);
  });

  it('relay flips exactly the expected bits, the same for the same seed', async () => {
    const EVERY = 1000;
    const data = pattern(10 * EVERY + 500);
    const runOnce = async (seed: number, chunk: number): Promise<{ out: Buffer; flips: Relay['flips'] }> => {
      const r = await setup('sink', { flipEveryBytes: EVERY, flipDirection: 'toTarget' }, seed);
      const writes: Buffer[] = [];
      for (let i = 0; i < data.length; i += chunk) writes.push(data.subarray(i, i + chunk));
      await talk(r.port, writes, 1);
      const out = await withTimeout(server!.ended[0]!, WAIT_MS, 'sink EOF');
      const flips = [...r.flips];
      await r.close();
      await server!.close();
      relay = undefined;
      server = undefined;
      return { out, flips };
    };
    const one = await runOnce(42, 4096);
    const offsets = diffOffsets(one.out, data);
    assert.deepEqual(offsets, Array.from({ length: 10 }, (_, i) => (i + 1) * EVERY - 1));
    for (const o of offsets) assert.equal(popcount8(one.out[o]! ^ data[o]!), 1, `one bit flipped at ${o}`);
    assert.deepEqual(
      one.flips.map((f) => [f.offset, f.direction, 1 << f.bit]),
      offsets.map((o) => [o, 'toTarget', one.out[o]! ^ data[o]!]),
      'the flip log names each flipped bit',
    );
    const again = await runOnce(42, 333); // other chunking, same seed: same corruption
    assert.ok(again.out.equals(one.out));
    const other = await runOnce(43, 4096);
    assert.deepEqual(diffOffsets(other.out, data), offsets);
    assert.ok(!other.out.equals(one.out), 'another seed flips other bits');
  });

  it('relay flipProbability corrupts a seeded, chunking-independent set of bytes', async () => {
    const P = 0.01;
    const data = pattern(100_000, 9);
    const runOnce = async (chunk: number): Promise<Buffer> => {
      const r = await setup('sink', { flipProbability: P, flipDirection: 'toTarget' }, 5);
      const writes: Buffer[] = [];
      for (let i = 0; i < data.length; i += chunk) writes.push(data.subarray(i, i + chunk));
      await talk(r.port, writes);
      const out = await withTimeout(server!.ended[0]!, WAIT_MS, 'sink EOF');
      assert.equal(r.flips.length, diffOffsets(out, data).length);
      await r.close();
      await server!.close();
      relay = undefined;
      server = undefined;
      return out;
    };
    const a = await runOnce(65536);
    const b = await runOnce(1000);
    assert.ok(a.equals(b));
    const n = diffOffsets(a, data).length;
    assert.ok(n > 700 && n < 1300, `${n} flips for p=${P} over ${data.length} bytes`);
  });

  it('relay duplicates whole chunks by seed, and duplication leaves the flips as they were', async () => {
    const CHUNK = 1000;
    const data = pattern(50 * CHUNK, 13);
    const runOnce = async (faults: Parameters<typeof startRelay>[0]['faults']): Promise<{ out: Buffer; dups: number; flips: number[] }> => {
      const r = await setup('sink', faults, 8);
      const writes: Buffer[] = [];
      for (let i = 0; i < data.length; i += CHUNK) writes.push(data.subarray(i, i + CHUNK));
      await talk(r.port, writes, 2); // 2 ms apart: one write is one chunk at the relay
      const out = await withTimeout(server!.ended[0]!, WAIT_MS, 'sink EOF');
      const res = { out, dups: r.stats().duplicates, flips: r.flips.map((f) => f.offset) };
      await r.close();
      await server!.close();
      relay = undefined;
      server = undefined;
      return res;
    };
    const none = await runOnce({ duplicateProbability: 0 });
    assert.ok(none.out.equals(data));
    const all = await runOnce({ duplicateProbability: 1, duplicateDirection: 'toTarget' });
    assert.equal(all.out.length, 2 * data.length, 'every chunk went twice');
    assert.ok(all.dups >= 1 && all.dups <= 50, `${all.dups} duplicates for at most 50 chunks`);
    const half = await runOnce({ duplicateProbability: 0.5, flipEveryBytes: 3001, flipDirection: 'toTarget' });
    assert.ok(half.dups >= 1 && half.dups < 50, `${half.dups} of about 50 chunks duplicated at p=0.5`);
    const extra = half.out.length - data.length;
    assert.ok(extra > 0 && extra % CHUNK === 0, `${extra} extra bytes: duplicates are whole chunks`);
    const noDup = await runOnce({ flipEveryBytes: 3001, flipDirection: 'toTarget' });
    assert.deepEqual(half.flips, noDup.flips, 'duplication moved a flip');
    assert.deepEqual(noDup.flips, Array.from({ length: 16 }, (_, i) => (i + 1) * 3001 - 1));
  });

  it('relay stall holds the bytes then releases them in order', async () => {
    const r = await setup('echo', { stall: true });
    const data = pattern(300 * KiB, 11);
    const done = talk(r.port, [data]);
    await sleep(300);
    assert.equal(r.bytes.toTarget, 0, 'nothing forwarded while stalled');
    assert.equal(server!.bytes().length, 0);
    r.set({ stall: false });
    const res = await done;
    assert.ok(res.data.equals(data));
    assert.deepEqual(r.bytes, { toTarget: data.length, toClient: data.length });
  });

  it('relay stops reading from a client whose target does not read (bounded buffering)', async () => {
    const MAX = 256 * KiB;
    server = new TestServer('paused');
    const port = await server.listen();
    relay = await startRelay({ targetHost: '127.0.0.1', targetPort: port, maxBufferedBytes: MAX });
    const sock = net.connect({ host: '127.0.0.1', port: relay.port });
    sock.on('error', () => undefined);
    await new Promise<void>((r) => sock.once('connect', () => r()));
    const data = pattern(64 * MiB, 13);
    sock.write(data);
    await sleep(500);
    const forwarded = relay.bytes.toTarget;
    // What left the relay sits in kernel socket buffers (a few MiB on loopback), not in the relay.
    assert.ok(forwarded < 24 * MiB, `relay forwarded ${forwarded} bytes to a target that reads nothing`);
    assert.ok(relay.stats().queuedBytes <= MAX, `relay holds ${relay.stats().queuedBytes} bytes`);
    assert.ok(sock.writableLength > 0, 'the client feels the backpressure');
    await sleep(200);
    assert.equal(relay.bytes.toTarget, forwarded, 'and the relay stays put');
    // The target starts reading: everything arrives, intact.
    const target = server.sockets[0]!;
    const ended = server.ended[0]!;
    target.resume();
    sock.end();
    const got = await withTimeout(ended, 10_000, 'all 64 MiB at the target');
    assert.ok(got.equals(data));
    sock.destroy();
  });

  it('relay holds at most maxBufferedBytes while delaying a fast sender', async () => {
    const MAX = 128 * KiB;
    const CHUNK_MAX = 64 * KiB; // one socket read can overshoot the bound by this much
    server = new TestServer('sink');
    const port = await server.listen();
    relay = await startRelay({ targetHost: '127.0.0.1', targetPort: port, maxBufferedBytes: MAX, faults: { delayMs: 100 } });
    const data = pattern(1 * MiB, 17);
    let peak = 0;
    const sampler = setInterval(() => {
      peak = Math.max(peak, relay?.stats().queuedBytes ?? 0);
    }, 5);
    try {
      await talk(relay.port, [data]);
    } finally {
      clearInterval(sampler);
    }
    const got = await withTimeout(server.ended[0]!, WAIT_MS, 'sink EOF');
    assert.ok(got.equals(data));
    assert.ok(peak > 0 && peak <= MAX + CHUNK_MAX, `peak queue ${peak} bytes`);
  });

  it('relay closes the client when the target refuses the connection', async () => {
    server = new TestServer('sink');
    const port = await server.listen();
    await server.close(); // nothing listens on `port` any more
    server = undefined;
    relay = await startRelay({ targetHost: '127.0.0.1', targetPort: port });
    const res = await talk(relay.port, [Buffer.from('lost')], 0, false);
    assert.equal(res.data.length, 0);
    assert.equal(relay.live, 0);
  });

  it('relay dropConnections destroys every live pair', async () => {
    const r = await setup('echo');
    const res = [talk(r.port, [Buffer.from('x')], 0, false), talk(r.port, [Buffer.from('y')], 0, false)];
    const t0 = Date.now();
    while (r.bytes.toClient < 2 && Date.now() - t0 < WAIT_MS) await sleep(5);
    assert.equal(r.live, 2);
    r.dropConnections();
    const [a, b] = await Promise.all(res);
    assert.equal(a!.data.toString(), 'x');
    assert.equal(b!.data.toString(), 'y');
    assert.equal(r.live, 0);
    assert.deepEqual(r.stats(), { bytes: { toTarget: 2, toClient: 2 }, accepted: 2, live: 0, flips: 0, duplicates: 0, queuedBytes: 0 });
  });
});

/** A TCP echo server in node, for a namespace: prints "ready" once listening. */
const ECHO_SERVER_JS = `
const [host, port] = process.argv.slice(1);
require('net').createServer((s) => { s.on('error', () => {}); s.pipe(s); })
  .listen(Number(port), host, () => console.log('ready'));
`;

/** Connects, sends a payload, prints JSON {ok, echo} or {ok:false, error} within timeoutMs. */
const ECHO_CLIENT_JS = `
const [host, port, payload, timeoutMs] = process.argv.slice(1);
const s = require('net').connect({ host, port: Number(port) });
let got = '';
const done = (r) => { console.log(JSON.stringify(r)); process.exit(0); };
setTimeout(() => done({ ok: false, error: 'timeout', got }), Number(timeoutMs));
s.on('error', (e) => done({ ok: false, error: e.code || e.message }));
s.on('connect', () => s.write(payload));
s.on('data', (d) => { got += d.toString('latin1'); if (got.length >= payload.length) done({ ok: true, echo: got }); });
`;

/** A long-lived client: each stdin line goes to the server; each echoed byte goes to stdout. */
const LINE_CLIENT_JS = `
const [host, port] = process.argv.slice(1);
const s = require('net').connect({ host, port: Number(port) }, () => console.log('connected'));
s.on('error', (e) => { console.log('error ' + (e.code || e.message)); process.exit(1); });
s.on('data', (d) => process.stdout.write(d));
require('readline').createInterface({ input: process.stdin }).on('line', (l) => s.write(l + '\\n'));
`;

interface EchoAnswer {
  ok: boolean;
  echo?: string;
  error?: string;
}

describe('net harness: network namespaces', function () {
  this.timeout(15_000);
  let pair: HostPair | undefined;
  const ECHO_PORT = 7000;

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`netns tests need: ${why}`);
      process.stdout.write(`      skipping the netns tests: ${why}\n`);
      this.skip();
    }
  });

  afterEach(async () => {
    await pair?.destroy();
    pair = undefined;
  });

  async function startEcho(p: HostPair): Promise<ChildProcess> {
    const child = p.spawn('b', process.execPath, ['-e', ECHO_SERVER_JS, p.b.addr, String(ECHO_PORT)]);
    await withTimeout(
      new Promise<void>((resolve, reject) => {
        child.stdout!.once('data', () => resolve());
        child.once('exit', (code) => reject(new Error(`echo server exited ${code}`)));
      }),
      WAIT_MS,
      'echo server ready',
    );
    return child;
  }

  async function echoFromA(p: HostPair, payload: string, timeoutMs: number, port = ECHO_PORT, host = p.b.addr): Promise<EchoAnswer> {
    const r = await p.exec('a', process.execPath, ['-e', ECHO_CLIENT_JS, host, String(port), payload, String(timeoutMs)]);
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as EchoAnswer;
  }

  it('netns pair: an echo server in b is reachable from a', async () => {
    pair = await createHostPair();
    assert.match(pair.a.ns, new RegExp(`^nvt-${process.pid}-[0-9a-f]{6}-a$`));
    assert.ok(pair.a.dev.length <= 15 && pair.b.dev.length <= 15);
    const listed = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    assert.ok(listed.includes(pair.a.ns) && listed.includes(pair.b.ns));
    await startEcho(pair);
    assert.deepEqual(await echoFromA(pair, 'hello b', 3000), { ok: true, echo: 'hello b' });
    const addrs = await pair.exec('a', 'ip', ['-4', '-o', 'addr', 'show']);
    assert.match(addrs.stdout, new RegExp(`lo .*127\\.0\\.0\\.1`));
    assert.ok(addrs.stdout.includes(`${pair.a.addr}/24`));
    // The root namespace cannot see b: the hosts are isolated from this machine.
    const fromRoot = spawnSync('ip', ['route', 'get', pair.b.addr], { encoding: 'utf8' }).stdout;
    assert.ok(!fromRoot.includes(pair.a.dev), 'no route from the root namespace over the veth');
  });

  it('netns blackhole 100% stalls a live connection and new connects; lifting it resumes', async () => {
    pair = await createHostPair();
    await startEcho(pair);
    const client = pair.spawn('a', process.execPath, ['-e', LINE_CLIENT_JS, pair.b.addr, String(ECHO_PORT)]);
    const lines: string[] = [];
    readline.createInterface({ input: client.stdout! }).on('line', (l) => lines.push(l));
    const waitLine = async (want: string, ms: number): Promise<boolean> => {
      const t0 = Date.now();
      while (!lines.includes(want) && Date.now() - t0 < ms) await sleep(10);
      return lines.includes(want);
    };
    assert.ok(await waitLine('connected', WAIT_MS));
    client.stdin!.write('one\n');
    assert.ok(await waitLine('one', WAIT_MS));

    await pair.blackhole(true);
    client.stdin!.write('two\n');
    const [two, fresh] = await Promise.all([waitLine('two', 700), echoFromA(pair, 'new', 700)]);
    assert.equal(two, false, 'nothing gets through a blackhole');
    assert.deepEqual(fresh, { ok: false, error: 'timeout', got: '' }, 'a connect times out');
    assert.equal(client.exitCode, null, 'the live connection does not notice');

    await pair.blackhole(false);
    assert.ok(await waitLine('two', 5_000), 'TCP retransmits once the blackhole is lifted');
    assert.deepEqual(await echoFromA(pair, 'after', 3000), { ok: true, echo: 'after' });
  });

  it('netns blackhole with a percentage drops some packets but TCP still delivers', async () => {
    pair = await createHostPair();
    await startEcho(pair);
    const rules = async (): Promise<string[]> =>
      (await pair!.exec('a', 'nft', ['list', 'ruleset'])).stdout.split('\n').filter((l) => /drop/.test(l)).map((l) => l.trim());
    await pair.blackhole(true, 100);
    await pair.blackhole(true, 10); // replaces, never adds to, the rules
    assert.deepEqual(await rules(), [
      `ip daddr ${pair.b.addr} numgen random mod 100 < 10 drop`,
      `ip saddr ${pair.b.addr} numgen random mod 100 < 10 drop`,
    ]);
    const ans = await echoFromA(pair, 'x'.repeat(2000), 8_000);
    assert.equal(ans.ok, true, 'TCP gets through 10 % loss');
    await pair.blackhole(false);
    assert.deepEqual(await rules(), []);
    await assert.rejects(pair.blackhole(true, 0), /1\.\.100/);
  });

  it('netns linkDown makes b unreachable and linkUp restores it', async () => {
    pair = await createHostPair();
    await startEcho(pair);
    await pair.linkDown();
    const down = await echoFromA(pair, 'ping', 700);
    assert.equal(down.ok, false, 'no route while the link is down');
    await pair.linkUp();
    let up: EchoAnswer = { ok: false };
    const t0 = Date.now();
    while (!up.ok && Date.now() - t0 < WAIT_MS) up = await echoFromA(pair, 'pong', 1000);
    assert.deepEqual(up, { ok: true, echo: 'pong' });
  });

  it('netns rateLimit caps the bandwidth from a to b', async () => {
    pair = await createHostPair();
    // A sink in b that prints how many bytes it got once the sender closes.
    const sink = pair.spawn('b', process.execPath, [
      '-e',
      `let n = 0; require('net').createServer((s) => { s.on('data', (d) => n += d.length);
         s.on('end', () => { console.log(n); process.exit(0); }); })
       .listen(7001, process.argv[1], () => console.log('ready'));`,
      pair.b.addr,
    ]);
    const out = readline.createInterface({ input: sink.stdout! });
    const lines: string[] = [];
    out.on('line', (l) => lines.push(l));
    const t0 = Date.now();
    while (!lines.includes('ready') && Date.now() - t0 < WAIT_MS) await sleep(10);
    const RATE_MBIT = 4;
    const BYTES = 256 * KiB; // 0.5 s at 4 Mbit/s
    await pair.rateLimit(RATE_MBIT);
    const send = await pair.exec('a', process.execPath, [
      '-e',
      `const t0 = Date.now(); const s = require('net').connect(7001, process.argv[1], () => s.end(Buffer.alloc(${BYTES})));
       s.on('close', () => console.log(Date.now() - t0));`,
      pair.b.addr,
    ]);
    const ms = Number(send.stdout.trim());
    const floorMs = ((BYTES * 8) / (RATE_MBIT * 1e6)) * 1000 * 0.7;
    assert.ok(ms >= floorMs, `256 KiB at ${RATE_MBIT} Mbit/s took ${ms} ms (expected >= ${floorMs.toFixed(0)})`);
    await pair.rateLimit(null);
    await pair.rateLimit(null); // idempotent
  });

  it('netns relay inside a forwards to b, counts and corrupts by seed', async () => {
    pair = await createHostPair();
    await startEcho(pair);
    const r = await startRelayIn(pair, 'a', {
      listenHost: '127.0.0.1',
      targetHost: pair.b.addr,
      targetPort: ECHO_PORT,
      seed: 3,
    });
    assert.deepEqual(await echoFromA(pair, 'via relay', 3000, r.port, '127.0.0.1'), { ok: true, echo: 'via relay' });
    await r.set({ flipEveryBytes: 4, flipDirection: 'toTarget' });
    const ans = await echoFromA(pair, 'abcdefgh', 3000, r.port, '127.0.0.1');
    assert.equal(ans.ok, true);
    const echo = Buffer.from(ans.echo ?? '', 'latin1');
    assert.deepEqual(diffOffsets(echo, Buffer.from('abcdefgh')), [3, 7]);
    const st = await r.stats();
    assert.deepEqual(st.bytes, { toTarget: 17, toClient: 17 });
    assert.equal(st.flips, 2);
    await r.close();
  });

  for (const death of ['an exception', 'SIGTERM'] as const) {
    it(`netns leaks no namespace or process when the test process dies of ${death}`, async () => {
      const script = `
        const { createHostPair } = require(${JSON.stringify(require.resolve('../net/netns'))});
        createHostPair({ prefix: 'nvtx-' }).then((p) => {
          const c = p.spawn('b', 'sleep', ['30']);
          c.once('spawn', () => {
            console.log(JSON.stringify({ a: p.a.ns, b: p.b.ns, pid: c.pid }));
            setTimeout(() => { ${death === 'SIGTERM' ? "process.kill(process.pid, 'SIGTERM')" : "throw new Error('test failed')"}; }, 100);
          });
        });`;
      const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 10_000 });
      if (death === 'SIGTERM') assert.equal(r.signal, 'SIGTERM', 'the child still dies of the signal');
      else assert.equal(r.status, 1, 'the child died of its exception');
      const made = JSON.parse(r.stdout.trim()) as { a: string; b: string; pid: number };
      const listed = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
      assert.ok(!listed.includes(made.a) && !listed.includes(made.b), listed);
      // Dead: gone, or a zombie waiting for init to reap it (state Z in /proc/PID/stat).
      const state = (): string => {
        try {
          return fs.readFileSync(`/proc/${made.pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0] ?? 'gone';
        } catch {
          return 'gone';
        }
      };
      const t0 = Date.now();
      while (!['gone', 'Z', 'X'].includes(state()) && Date.now() - t0 < WAIT_MS) await sleep(10);
      assert.ok(['gone', 'Z', 'X'].includes(state()), `the process spawned in b was killed (state ${state()})`);
    });
  }

  it('netns destroy removes both namespaces and the processes in them', async () => {
    pair = await createHostPair({ prefix: 'nvtd-' });
    const server = await startEcho(pair);
    const { a, b } = pair;
    await pair.destroy();
    await pair.destroy(); // idempotent
    assert.ok(server.exitCode !== null || server.signalCode !== null, 'the echo server was killed');
    const listed = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    assert.ok(!listed.includes(a.ns) && !listed.includes(b.ns), listed);
    assert.throws(() => pair!.spawn('a', 'true'), /after destroy/);
  });
});
