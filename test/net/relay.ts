/**
 * A seeded, fault-injecting TCP relay for tests: listens on host:port, and forwards each
 * accepted connection ("client") to a fixed target ("target"), byte for byte, while
 * faults set at run time delay, stall, cut or corrupt the streams. It stands in for
 * netem (which this kernel lacks): run it in the test process, or inside a network
 * namespace with startRelayIn() (this file is also a CLI: see runCli()).
 *
 * Invariants:
 * - order: the bytes of one direction of one connection leave in the order they came;
 *   a delay holds each chunk `delayMs` after its arrival, in a FIFO (a later chunk never
 *   overtakes an earlier one, even when delayMs shrinks at run time);
 * - bounded memory: per direction at most maxBufferedBytes are queued (plus one socket
 *   chunk, twice when it is duplicated); the source socket is paused while the queue is full, while the destination's
 *   write() has returned false (until 'drain'), and while stalled;
 * - stall: while `stall` is set nothing is read or forwarded in either direction on any
 *   connection (the kernel's socket buffers fill and TCP's window closes); clearing it
 *   forwards what was held, in order;
 * - cut: with cutAfterBytes = N, the receiver in cutDirection gets exactly the first N
 *   bytes of the connection's stream in that direction (offsets count from the
 *   connection's start), then EOF; both sockets are then closed (FIN, a RST only if the
 *   peer keeps sending past CUT_LINGER_MS). A connection already past N when the fault is
 *   set is cut when its next byte in that direction arrives;
 * - corruption: a flipped byte has exactly one bit inverted. flipEveryBytes = N flips the
 *   bytes at stream offsets N-1, 2N-1, ...; flipProbability = p flips each byte with
 *   probability p; a byte picked by both is flipped once. Which bits (and which bytes for
 *   p) come from a PRNG seeded by (seed, connection index in accept order, direction), so
 *   for faults set before the connection is accepted the corruption is a pure function of
 *   the seed and the byte stream, independent of how the stream is chunked. Every flip is
 *   logged in `flips` (the newest MAX_FLIP_LOG entries);
 * - duplication: with duplicateProbability = p each chunk read from a socket (in
 *   duplicateDirection) is forwarded twice in a row with probability p, decided by a PRNG
 *   seeded like the flips' but a stream of its own (so turning duplication on never
 *   changes which bits are flipped); a duplicate counts in `bytes` and `duplicates`, and
 *   its bytes are not stream offsets (flip and cut offsets count the source's bytes);
 * - counting: `bytes` counts, per direction, the bytes handed to the destination socket
 *   (after corruption and truncation): the bytes on the wire beyond the relay;
 * - close() and dropConnections() leave no socket or timer behind.
 */
import * as net from 'net';
import * as readline from 'readline';
import type { ChildProcess } from 'child_process';
import { hash32, SeededRandom } from '../../src/sim/random';
import type { HostName, HostPair } from './netns';

export type Direction = 'toTarget' | 'toClient';
export const DIRECTIONS: readonly Direction[] = ['toTarget', 'toClient'];

export interface RelayFaults {
  /** Each chunk is forwarded this long after it arrived (0: at once). */
  delayMs: number;
  /** Stop reading and forwarding, both ways, on every connection, until cleared. */
  stall: boolean;
  /** Close both sides once this many bytes went in cutDirection (null: never). */
  cutAfterBytes: number | null;
  cutDirection: Direction;
  /** Flip one bit of every Nth byte (null: never). */
  flipEveryBytes: number | null;
  /** Flip one bit of each byte with this probability (0: never). */
  flipProbability: number;
  flipDirection: Direction | 'both';
  /** Forward each chunk twice with this probability (0: never). */
  duplicateProbability: number;
  duplicateDirection: Direction | 'both';
}

export const NO_FAULTS: Readonly<RelayFaults> = Object.freeze({
  delayMs: 0,
  stall: false,
  cutAfterBytes: null,
  cutDirection: 'toTarget',
  flipEveryBytes: null,
  flipProbability: 0,
  flipDirection: 'both',
  duplicateProbability: 0,
  duplicateDirection: 'both',
});

/** Default bound on the bytes queued per direction of a connection. */
export const RELAY_MAX_BUFFERED_BYTES = 1024 * 1024;
/**
 * After a cut or a peer's close, the remaining socket gets this long to close before it is
 * destroyed (the wait restarts while the relay still has bytes on their way to it).
 */
export const CUT_LINGER_MS = 2_000;
/** Flip records kept (the newest). */
export const MAX_FLIP_LOG = 10_000;

export interface RelayOptions {
  targetHost: string;
  targetPort: number;
  /** Default 127.0.0.1. */
  listenHost?: string;
  /** Default 0: a free port (see Relay.port). */
  listenPort?: number;
  /** PRNG seed for corruption (non-negative safe integer, default 1). */
  seed?: number;
  /** Faults from the start (the rest as NO_FAULTS). */
  faults?: Partial<RelayFaults>;
  maxBufferedBytes?: number;
}

export interface FlipRecord {
  /** Connection index, in accept order from 0. */
  conn: number;
  direction: Direction;
  /** Offset of the byte in that direction's stream of that connection. */
  offset: number;
  /** Bit inverted (0 = least significant). */
  bit: number;
}

export interface RelayStats {
  bytes: Record<Direction, number>;
  accepted: number;
  live: number;
  flips: number;
  /** Chunks forwarded twice (duplicateProbability). */
  duplicates: number;
  /** Bytes held in the relay's queues right now, over all connections and directions. */
  queuedBytes: number;
}

/** Starts a relay; resolves once it is listening. */
export async function startRelay(opts: RelayOptions): Promise<Relay> {
  const relay = new Relay(opts);
  await relay.listening;
  return relay;
}

export class Relay {
  /** Bytes handed to the destination socket, per direction, over all connections. */
  readonly bytes: Record<Direction, number> = { toTarget: 0, toClient: 0 };
  /** The newest MAX_FLIP_LOG bit flips, in the order they were made. */
  readonly flips: FlipRecord[] = [];
  /** Connections accepted so far. */
  accepted = 0;
  readonly listening: Promise<void>;

  private current: RelayFaults;
  private readonly server: net.Server;
  private readonly conns = new Set<Connection>();
  private flipCount = 0;
  private duplicateCount = 0;
  private closed = false;
  readonly seed: number;
  readonly maxBufferedBytes: number;

  constructor(private readonly opts: RelayOptions) {
    this.seed = opts.seed ?? 1;
    if (!(Number.isSafeInteger(this.seed) && this.seed >= 0)) throw new Error(`relay: bad seed ${this.seed}`);
    this.maxBufferedBytes = opts.maxBufferedBytes ?? RELAY_MAX_BUFFERED_BYTES;
    if (!(this.maxBufferedBytes >= 1)) throw new Error(`relay: bad maxBufferedBytes ${this.maxBufferedBytes}`);
    this.current = { ...NO_FAULTS };
    this.set(opts.faults ?? {});
    this.server = net.createServer({ allowHalfOpen: true }, (sock) => this.accept(sock));
    this.listening = new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(opts.listenPort ?? 0, opts.listenHost ?? '127.0.0.1', () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  get host(): string {
    const a = this.server.address();
    return a !== null && typeof a === 'object' ? a.address : (this.opts.listenHost ?? '127.0.0.1');
  }

  get port(): number {
    const a = this.server.address();
    if (a === null || typeof a !== 'object') throw new Error('relay: not listening');
    return a.port;
  }

  get faults(): Readonly<RelayFaults> {
    return this.current;
  }

  /** Live connections (accepted and not yet fully closed). */
  get live(): number {
    return this.conns.size;
  }

  stats(): RelayStats {
    let queuedBytes = 0;
    for (const c of this.conns) queuedBytes += c.queuedBytes();
    return { bytes: { ...this.bytes }, accepted: this.accepted, live: this.live, flips: this.flipCount, duplicates: this.duplicateCount, queuedBytes };
  }

  /** Changes faults at run time; unnamed faults keep their values. */
  set(patch: Partial<RelayFaults>): void {
    const next: RelayFaults = { ...this.current, ...patch };
    if (!(Number.isFinite(next.delayMs) && next.delayMs >= 0)) throw new Error(`relay: bad delayMs ${next.delayMs}`);
    if (next.cutAfterBytes !== null && !(Number.isSafeInteger(next.cutAfterBytes) && next.cutAfterBytes >= 0)) {
      throw new Error(`relay: bad cutAfterBytes ${next.cutAfterBytes}`);
    }
    if (next.flipEveryBytes !== null && !(Number.isSafeInteger(next.flipEveryBytes) && next.flipEveryBytes >= 1)) {
      throw new Error(`relay: bad flipEveryBytes ${next.flipEveryBytes}`);
    }
    if (!(next.flipProbability >= 0 && next.flipProbability <= 1)) {
      throw new Error(`relay: bad flipProbability ${next.flipProbability}`);
    }
    if (!(next.duplicateProbability >= 0 && next.duplicateProbability <= 1)) {
      throw new Error(`relay: bad duplicateProbability ${next.duplicateProbability}`);
    }
    const flipChanged =
      next.flipEveryBytes !== this.current.flipEveryBytes ||
      next.flipProbability !== this.current.flipProbability ||
      next.flipDirection !== this.current.flipDirection;
    this.current = next;
    for (const c of this.conns) c.faultsChanged(flipChanged);
  }

  /** Destroys every live connection (both sockets, at once, no FIN handshake). */
  dropConnections(): void {
    for (const c of [...this.conns]) c.destroy();
  }

  /** Stops listening and destroys every connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const done = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.dropConnections();
    await done;
  }

  /** @internal */
  recordFlip(f: FlipRecord): void {
    this.flipCount++;
    this.flips.push(f);
    if (this.flips.length > MAX_FLIP_LOG) this.flips.splice(0, this.flips.length - MAX_FLIP_LOG);
  }

  /** @internal */
  recordDuplicate(): void {
    this.duplicateCount++;
  }

  /** @internal */
  forgetConnection(c: Connection): void {
    this.conns.delete(c);
  }

  private accept(client: net.Socket): void {
    if (this.closed) {
      client.destroy();
      return;
    }
    const target = net.connect({ host: this.opts.targetHost, port: this.opts.targetPort, allowHalfOpen: true });
    this.conns.add(new Connection(this, this.accepted++, client, target));
  }
}

/** One accepted client and its target connection: two Pipes. */
class Connection {
  private readonly pipes: Record<Direction, Pipe>;
  private lingerTimer: NodeJS.Timeout | undefined;
  private closedSockets = 0;
  dead = false;
  cutDone = false;

  constructor(
    readonly relay: Relay,
    readonly index: number,
    readonly client: net.Socket,
    readonly target: net.Socket,
  ) {
    client.setNoDelay(true);
    target.setNoDelay(true);
    this.pipes = {
      toTarget: new Pipe(this, 'toTarget', client, target),
      toClient: new Pipe(this, 'toClient', target, client),
    };
    for (const [sock, other] of [
      [client, target],
      [target, client],
    ] as const) {
      // Any socket error (target refused, reset by a peer) ends the whole connection.
      sock.on('error', () => this.destroy());
      sock.once('close', (hadError) => this.socketClosed(sock, other, hadError));
    }
  }

  pipeFrom(sock: net.Socket): Pipe {
    return sock === this.client ? this.pipes.toTarget : this.pipes.toClient;
  }

  faultsChanged(flipChanged: boolean): void {
    for (const d of DIRECTIONS) this.pipes[d].faultsChanged(flipChanged);
  }

  queuedBytes(): number {
    return this.pipes.toTarget.queued + this.pipes.toClient.queued;
  }

  /** Called by a pipe once the cut point's bytes are all handed to its destination. */
  cut(): void {
    if (this.cutDone || this.dead) return;
    this.cutDone = true;
    for (const d of DIRECTIONS) this.pipes[d].discard();
    // FIN both ways; keep reading (and dropping) so unread data does not turn into a
    // RST that could destroy bytes the receiver has not read yet.
    for (const s of [this.client, this.target]) {
      s.on('data', () => undefined);
      s.resume();
      s.end();
    }
    this.startLinger();
  }

  private socketClosed(sock: net.Socket, other: net.Socket, hadError: boolean): void {
    this.closedSockets++;
    if (this.closedSockets >= 2) {
      this.finish();
      return;
    }
    if (hadError) {
      this.destroy();
      return;
    }
    // What `sock` sent still goes to `other` (then FIN); what `other` sends has nowhere to go.
    this.pipeFrom(other).discard();
    other.on('data', () => undefined);
    other.resume();
    this.pipeFrom(sock).sourceEnded();
    this.startLinger();
  }

  /** Destroys both sockets CUT_LINGER_MS from now, or later while bytes are still on their way. */
  private startLinger(): void {
    if (this.lingerTimer !== undefined || this.dead) return;
    this.lingerTimer = setTimeout(() => {
      this.lingerTimer = undefined;
      const inFlight = this.queuedBytes() + this.client.writableLength + this.target.writableLength;
      if (inFlight > 0 && !this.client.destroyed && !this.target.destroyed) this.startLinger();
      else this.destroy();
    }, CUT_LINGER_MS);
  }

  destroy(): void {
    if (this.dead) return;
    this.client.destroy();
    this.target.destroy();
    this.finish();
  }

  private finish(): void {
    if (this.dead) return;
    this.dead = true;
    if (this.lingerTimer !== undefined) clearTimeout(this.lingerTimer);
    for (const d of DIRECTIONS) this.pipes[d].discard();
    this.relay.forgetConnection(this);
  }
}

interface Queued {
  data: Buffer;
  dueMs: number;
}

/** One direction of a connection: src's bytes, queued, faulted, written to dst. */
class Pipe {
  private queue: Queued[] = [];
  private head = 0;
  private queuedBytes = 0;
  /** Stream offset of the next byte to arrive from src. */
  private received = 0;
  private srcEnded = false;
  private dstEnded = false;
  /** The cut point is in the queue: once it drains, cut. No more input is taken. */
  private cutPending = false;
  private blocked = false;
  private discarded = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly rng: SeededRandom;
  /** Duplication's own stream (so enabling it never shifts the flips). */
  private readonly dupRng: SeededRandom;
  /** Next stream offsets to corrupt (Infinity: none). */
  private nextEvery = Infinity;
  private nextRandom = Infinity;

  constructor(
    private readonly conn: Connection,
    private readonly dir: Direction,
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
  ) {
    this.rng = new SeededRandom(hash32(conn.relay.seed, conn.index, dir === 'toTarget' ? 0 : 1));
    this.dupRng = new SeededRandom(hash32(conn.relay.seed, conn.index, dir === 'toTarget' ? 2 : 3));
    src.on('data', (chunk: Buffer) => this.onData(chunk));
    src.once('end', () => this.sourceEnded());
    dst.on('drain', () => {
      this.blocked = false;
      this.pump();
    });
    this.faultsChanged(true); // sets the flip points, and pauses src if stalled
  }

  get queued(): number {
    return this.queuedBytes;
  }

  private get faults(): Readonly<RelayFaults> {
    return this.conn.relay.faults;
  }

  faultsChanged(flipChanged: boolean): void {
    if (flipChanged) {
      const f = this.faults;
      const applies = f.flipDirection === 'both' || f.flipDirection === this.dir;
      const n = f.flipEveryBytes;
      this.nextEvery = applies && n !== null ? Math.ceil((this.received + 1) / n) * n - 1 : Infinity;
      this.nextRandom = applies && f.flipProbability > 0 ? this.received + this.gap() : Infinity;
    }
    this.pump();
  }

  /** Geometric gap before the next random flip (0 = the very next byte). */
  private gap(): number {
    const p = this.faults.flipProbability;
    if (p >= 1) return 0;
    const u = this.rng.next();
    return Math.floor(Math.log(1 - u) / Math.log(1 - p));
  }

  private onData(chunk: Buffer): void {
    if (this.discarded || this.cutPending || this.conn.cutDone) return;
    const f = this.faults;
    let data = chunk;
    let cutHere = false;
    if (f.cutAfterBytes !== null && f.cutDirection === this.dir) {
      const allowed = Math.max(0, f.cutAfterBytes - this.received);
      if (allowed <= data.length) {
        data = data.subarray(0, allowed);
        cutHere = true;
      }
    }
    data = this.corrupt(data);
    this.received += data.length;
    if (data.length > 0) {
      const dueMs = Date.now() + f.delayMs;
      this.queue.push({ data, dueMs });
      this.queuedBytes += data.length;
      const dup = f.duplicateDirection === 'both' || f.duplicateDirection === this.dir;
      if (dup && f.duplicateProbability > 0 && this.dupRng.next() < f.duplicateProbability) {
        this.queue.push({ data, dueMs });
        this.queuedBytes += data.length;
        this.conn.relay.recordDuplicate();
      }
    }
    if (cutHere) this.cutPending = true;
    this.pump();
  }

  /** Applies the bit flips that fall in [received, received + data.length). */
  private corrupt(data: Buffer): Buffer {
    const end = this.received + data.length;
    let out = data;
    for (;;) {
      const at = Math.min(this.nextEvery, this.nextRandom);
      if (at >= end) break;
      if (out === data) out = Buffer.from(data); // never write into a buffer we did not allocate
      const bit = this.rng.int(8);
      const i = at - this.received;
      out[i] = (out[i]! ^ (1 << bit)) & 0xff;
      this.conn.relay.recordFlip({ conn: this.conn.index, direction: this.dir, offset: at, bit });
      const n = this.faults.flipEveryBytes;
      if (this.nextEvery === at) this.nextEvery = n !== null ? at + n : Infinity;
      if (this.nextRandom === at) this.nextRandom = at + 1 + this.gap();
    }
    return out;
  }

  sourceEnded(): void {
    this.srcEnded = true;
    this.pump();
  }

  /** Drops everything queued and all later input; this direction forwards nothing more. */
  discard(): void {
    this.discarded = true;
    this.queue = [];
    this.head = 0;
    this.queuedBytes = 0;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Forwards every due chunk it can, then decides whether src may be read. */
  private pump(): void {
    if (this.discarded) return;
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    const stalled = this.faults.stall;
    while (!stalled && !this.blocked && this.head < this.queue.length) {
      const item = this.queue[this.head]!;
      const wait = item.dueMs - Date.now();
      if (wait > 0) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          this.pump();
        }, wait);
        break;
      }
      this.head++;
      this.queuedBytes -= item.data.length;
      if (this.dst.destroyed || this.dst.writableEnded) continue;
      this.conn.relay.bytes[this.dir] += item.data.length;
      if (!this.dst.write(item.data)) this.blocked = true;
    }
    if (this.head > 64 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    const empty = this.head >= this.queue.length;
    if (empty && !stalled) {
      if (this.cutPending) {
        this.conn.cut();
        return;
      }
      if (this.srcEnded && !this.dstEnded) {
        this.dstEnded = true;
        if (!this.dst.destroyed) this.dst.end();
      }
    }
    const hold = stalled || this.blocked || this.cutPending || this.queuedBytes >= this.conn.relay.maxBufferedBytes;
    if (hold) this.src.pause();
    else if (!this.srcEnded) this.src.resume();
  }
}

// ---------------------------------------------------------------------------------------
// Running a relay inside a network namespace: this file as a CLI, driven over stdio.
//
//   node relay.js '{"targetHost":"10.1.2.2","targetPort":7000,"listenHost":"10.1.2.1"}'
//
// prints {"event":"listening","host":...,"port":...} on stdout, then takes one JSON
// command per stdin line: {"set":{...faults}}, {"drop":true}, {"stats":true} (answered
// with {"event":"stats",...}); every command is acknowledged with {"event":"ok","id":N}
// where N counts commands from 1. It exits when stdin closes, or on SIGTERM.
// ---------------------------------------------------------------------------------------

/** Limit for the child relay's answers (listening, command acknowledgements). */
export const RELAY_CLI_REPLY_TIMEOUT_MS = 10_000;

export interface RemoteRelay {
  readonly host: string;
  readonly port: number;
  readonly process: ChildProcess;
  set(patch: Partial<RelayFaults>): Promise<void>;
  dropConnections(): Promise<void>;
  stats(): Promise<RelayStats>;
  close(): Promise<void>;
}

/** Starts a relay as a process inside `host`'s namespace of `pair`; killed by pair.destroy(). */
export async function startRelayIn(pair: HostPair, host: HostName, opts: RelayOptions): Promise<RemoteRelay> {
  const child = pair.spawn(host, process.execPath, [__filename, JSON.stringify(opts)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = readline.createInterface({ input: child.stdout! });
  const waiting: Array<(msg: Record<string, unknown>) => void> = [];
  let exited = false;
  const failAll = (why: string): void => {
    exited = true;
    for (const w of waiting.splice(0)) w({ event: 'error', message: why });
  };
  child.once('exit', (code, signal) => failAll(`relay process exited (${code ?? signal})`));
  lines.on('line', (line) => {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    waiting.shift()?.(msg);
  });
  const next = (): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      if (exited) return reject(new Error('relay process has exited'));
      const t = setTimeout(() => reject(new Error('relay process did not answer in time')), RELAY_CLI_REPLY_TIMEOUT_MS);
      waiting.push((msg) => {
        clearTimeout(t);
        if (msg.event === 'error') reject(new Error(String(msg.message)));
        else resolve(msg);
      });
    });
  const command = async (cmd: Record<string, unknown>): Promise<Record<string, unknown>> => {
    const answer = next();
    child.stdin!.write(JSON.stringify(cmd) + '\n');
    return answer;
  };
  const hello = await next();
  return {
    host: String(hello.host),
    port: Number(hello.port),
    process: child,
    set: async (patch) => {
      await command({ set: patch });
    },
    dropConnections: async () => {
      await command({ drop: true });
    },
    stats: async () => (await command({ stats: true })).stats as RelayStats,
    close: async () => {
      if (exited) return;
      const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.stdin!.end();
      const t = setTimeout(() => child.kill('SIGKILL'), RELAY_CLI_REPLY_TIMEOUT_MS);
      await gone;
      clearTimeout(t);
    },
  };
}

async function runCli(arg: string | undefined): Promise<void> {
  const opts = JSON.parse(arg ?? '{}') as RelayOptions;
  const relay = await startRelay(opts);
  const say = (msg: object): void => {
    process.stdout.write(JSON.stringify(msg) + '\n');
  };
  say({ event: 'listening', host: relay.host, port: relay.port });
  const stop = (): void => {
    void relay.close().then(() => process.exit(0));
  };
  process.once('SIGTERM', stop);
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('close', stop);
  let id = 0;
  rl.on('line', (line) => {
    id++;
    try {
      const cmd = JSON.parse(line) as { set?: Partial<RelayFaults>; drop?: boolean; stats?: boolean };
      if (cmd.set !== undefined) relay.set(cmd.set);
      if (cmd.drop === true) relay.dropConnections();
      say(cmd.stats === true ? { event: 'stats', id, stats: relay.stats() } : { event: 'ok', id });
    } catch (e) {
      say({ event: 'error', id, message: e instanceof Error ? e.message : String(e) });
    }
  });
}

if (require.main === module) {
  runCli(process.argv[2]).catch((e: unknown) => {
    process.stderr.write(`relay: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
}
