/**
 * The mirror fault suite's rig (test/mirror/faults*.test.ts): a source (`serve DIR
 * --mirror-to`) in namespace a, a receiver (`receive`) in namespace b, joined by a veth
 * pair, with the fault-injecting relay (test/net/relay.ts) on the source's side of the
 * link: the source connects to the relay on a's loopback, the relay to the receiver
 * across the veth. So relay faults (delay, stall, cut, corruption, duplication) and link
 * faults (nftables loss, cuts, link down) both sit on the mirror's path. Clients reach
 * both sides over Unix sockets (the namespaces share the file system).
 *
 * Invariants:
 * - every run has a seed (NVMIRROR_SEED or a random one) that drives the writer and the
 *   fault schedule; a failing test prints it with the logs' tails (printFailure);
 * - namespaces, processes and the relay go with Rig.destroy(), which is idempotent, and
 *   with netns.ts's exit hooks if the test process dies;
 * - AckedWriter keeps at most `queueDepth` requests in flight and never two on one
 *   block; `acked` holds, per block, the write id of the last acknowledged write (its
 *   contents are a pure function of block and id), so memory is O(working blocks);
 * - converge() asserts equality only after a checkpoint that holds every write so far:
 *   the mirror's root equals the source's, `verify` says identical from both sides,
 *   and the two exported devices have the same checksum.
 */
import * as assert from 'assert';
import * as cp from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createHostPair, type HostPair } from '../net/netns';
import { NO_FAULTS, startRelayIn, type RemoteRelay } from '../net/relay';
import { NbdClient, NbdClosedError } from '../crash/nbd-client';
import { controlRequest } from '../../src/volume/engine-control';
import { BIN, md5OfExport, receiverProbe, sh, sleep, sourceStatus, until } from './helpers';
import { prng, seedFromEnv } from '../crash/harness';

export const BS = 4096;
/** Longest wait for the mirror to converge once every fault is lifted. */
export const CONVERGE_TIMEOUT_MS = 120_000;
/** Lines of each log printed when a test fails. */
const LOG_TAIL_LINES = 40;

// The seed and the PRNG are the crash tests' (NVMIRROR_SEED reruns a run).
export { prng, seedFromEnv };

/** Contents of block `lbn` written by write `id` (id 0: never written, zeroes). */
export function blockContent(lbn: number, id: number): Buffer {
  const b = Buffer.alloc(BS);
  if (id === 0) return b;
  let x = (Math.imul(lbn + 1, 0x9e3779b1) ^ Math.imul(id, 0x85ebca6b)) >>> 0 || 1;
  for (let i = 0; i < BS; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  b.writeUInt32LE(lbn, 0);
  b.writeUInt32LE(id, 4);
  return b;
}

export interface Memory {
  rssKiB: number;
  hwmKiB: number;
}

/** VmRSS and VmHWM of a process, or undefined once it is gone. */
export function memoryOf(pid: number | undefined): Memory | undefined {
  if (pid === undefined) return undefined;
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kib = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN);
    return { rssKiB: kib('VmRSS'), hwmKiB: kib('VmHWM') };
  } catch {
    return undefined;
  }
}

/**
 * A pipelined client writing seeded blocks (1..4 blocks, 10 % FUA, 5 % trims, a FLUSH
 * every 32 requests) into the first `blocks` blocks of an export, recording every
 * acknowledged write. Errors (any reply other than success) are collected, not thrown.
 */
export class AckedWriter {
  /** Per block: id of the last acknowledged write (absent: never written). */
  readonly acked = new Map<number, number>();
  readonly errors: string[] = [];
  ackedWrites = 0;
  private nextId = 1;
  private stopping = false;
  private readonly busy = new Set<number>();
  private readonly rnd: () => number;
  private client: NbdClient | undefined;
  private running: Promise<void> | undefined;

  /** `prior`: an earlier writer on the same device, whose acknowledged writes this one inherits. */
  constructor(
    private readonly socket: string,
    seed: number,
    prior?: AckedWriter,
    readonly blocks = 8192,
    readonly queueDepth = 16,
  ) {
    this.rnd = prng(seed ^ 0x5eed);
    if (prior) {
      assert.strictEqual(prior.blocks, blocks, 'a writer inherits from one over the same blocks');
      for (const [lbn, id] of prior.acked) this.acked.set(lbn, id);
      this.nextId = prior.nextId;
    }
  }

  async start(): Promise<void> {
    this.client = await NbdClient.connect(this.socket, '');
    this.running = this.run(this.client);
  }

  private async run(c: NbdClient): Promise<void> {
    const inFlight = new Set<Promise<void>>();
    let sinceFlush = 0;
    while (!this.stopping && !c.isClosed) {
      while (inFlight.size >= this.queueDepth) await Promise.race(inFlight);
      if (this.stopping) break;
      const p = ++sinceFlush % 32 === 0 ? this.flush(c) : this.one(c);
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
      if (inFlight.size < this.queueDepth) await new Promise((r) => setImmediate(r));
    }
    await Promise.all(inFlight);
  }

  private async flush(c: NbdClient): Promise<void> {
    await c.flush().catch((e: unknown) => this.errors.push(`flush: ${(e as Error).message}`));
  }

  private async one(c: NbdClient): Promise<void> {
    const r = this.rnd();
    const count = 1 + Math.floor(this.rnd() * 4);
    let lbn = Math.floor(this.rnd() * (this.blocks - count));
    for (let tries = 0; tries < 8 && this.anyBusy(lbn, count); tries++) lbn = Math.floor(this.rnd() * (this.blocks - count));
    if (this.anyBusy(lbn, count)) return;
    for (let i = 0; i < count; i++) this.busy.add(lbn + i);
    const ids: number[] = [];
    try {
      if (r < 0.05) {
        for (let i = 0; i < count; i++) ids.push(0);
        await c.trim(lbn * BS, count * BS, false);
      } else {
        const parts: Buffer[] = [];
        for (let i = 0; i < count; i++) {
          const id = this.nextId++;
          ids.push(id);
          parts.push(blockContent(lbn + i, id));
        }
        await c.write(lbn * BS, Buffer.concat(parts), r > 0.9);
      }
      ids.forEach((id, i) => this.acked.set(lbn + i, id));
      this.ackedWrites++;
    } catch (e) {
      if (!(e instanceof NbdClosedError && this.stopping)) this.errors.push(`${r < 0.05 ? 'trim' : 'write'} at block ${lbn}+${count}: ${(e as Error).message}`);
    } finally {
      for (let i = 0; i < count; i++) this.busy.delete(lbn + i);
    }
  }

  private anyBusy(lbn: number, count: number): boolean {
    for (let i = 0; i < count; i++) if (this.busy.has(lbn + i)) return true;
    return false;
  }

  /** Stops issuing, waits for every request in flight, disconnects. */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.running;
    await this.client?.close();
    this.client = undefined;
  }

  /**
   * Reads the working blocks back through `socket` (export `name`) and returns one line
   * per block whose contents are not those of its last acknowledged write (at most `limit`).
   */
  async check(socket: string, name: string, limit = 10): Promise<string[]> {
    const c = await NbdClient.connect(socket, name);
    const bad: string[] = [];
    const CHUNK_BLOCKS = 256;
    try {
      for (let lbn0 = 0; lbn0 < this.blocks && bad.length < limit; lbn0 += CHUNK_BLOCKS) {
        const n = Math.min(CHUNK_BLOCKS, this.blocks - lbn0);
        const got = await c.read(lbn0 * BS, n * BS);
        for (let i = 0; i < n && bad.length < limit; i++) {
          const want = blockContent(lbn0 + i, this.acked.get(lbn0 + i) ?? 0);
          const have = got.subarray(i * BS, (i + 1) * BS);
          if (!have.equals(want)) bad.push(`block ${lbn0 + i}: want write ${this.acked.get(lbn0 + i) ?? 0}, have write ${have.readUInt32LE(4)} (lbn tag ${have.readUInt32LE(0)})`);
        }
      }
    } finally {
      await c.close();
    }
    return bad;
  }
}

export interface RigOptions {
  mode: 'sync' | 'async';
  policy?: 'available' | 'strict';
  /** Namespace prefix (short, unique to the test file). */
  prefix: string;
  receiverPort: number;
  relayPort: number;
  seed: number;
  /** --mirror-stall-timeout of the source (ms). */
  stallTimeoutMs?: number;
  size?: string;
  /** Where the receiver's DIR lives (default: in the rig's temporary directory). */
  dstDir?: string;
  /** Where the source's volume directory lives (default: in the rig's temporary directory). */
  srcDir?: string;
}

export interface Convergence {
  /** From the call (faults already lifted) to roots equal at a CP holding every write. */
  ms: number;
  /** Bytes the relay forwarded toward the receiver meanwhile (the resend after the fault). */
  bytesToReceiver: number;
  /** Data blocks the source sent meanwhile (resync, CP data). */
  dataBlocksSent: number;
  cp: number;
}

/** The fields of the receiver's `status --json` (per mirror) the tests read. */
export interface ReceiverMirrorStatus {
  sourceUuid: string;
  committedCp: number;
  connected: boolean;
  heldSeq: number;
  /** Records its log had to drop (ring full: a long catch-up), since the receiver started. */
  recordsDropped: number;
  lastError?: string;
}

interface SourceStats {
  state: string;
  connected: boolean;
  rootsEqual: boolean;
  sourceCp: number;
  destCp: number;
  dataBlocksSent: number;
  lastError?: string;
}

export class Rig {
  source: cp.ChildProcess | undefined;
  receiver: cp.ChildProcess | undefined;
  readonly src: string;
  readonly dst: string;
  readonly srcSock: string;
  readonly expSock: string;
  readonly uuid: string;

  private constructor(
    readonly o: RigOptions,
    readonly pair: HostPair,
    readonly tmp: string,
    readonly relay: RemoteRelay,
  ) {
    this.src = o.srcDir ?? path.join(tmp, 'src');
    this.dst = o.dstDir ?? path.join(tmp, 'dst');
    this.srcSock = path.join(tmp, 'src.sock');
    this.expSock = path.join(tmp, 'exp.sock');
    sh(BIN, ['create', this.src, '--size', o.size ?? '128M', '--nvram-size', '8M']);
    this.uuid = (JSON.parse(fs.readFileSync(path.join(this.src, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid;
  }

  /** Two hosts, the relay, a receiver and a mirroring source, in sync. */
  static async start(o: RigOptions): Promise<Rig> {
    const pair = await createHostPair({ prefix: o.prefix });
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), `${o.prefix}-`));
    try {
      const relay = await startRelayIn(pair, 'a', {
        listenHost: '127.0.0.1', listenPort: o.relayPort, targetHost: pair.b.addr, targetPort: o.receiverPort, seed: o.seed,
      });
      const rig = new Rig(o, pair, tmp, relay);
      await rig.startReceiver();
      await rig.startSource(false);
      await until('mirror in sync', () => rig.status()?.state === 'in-sync', 90_000);
      return rig;
    } catch (e) {
      await pair.destroy();
      fs.rmSync(tmp, { recursive: true, force: true });
      throw e;
    }
  }

  get sourceLog(): string {
    return path.join(this.tmp, 'sv.log');
  }

  get receiverLog(): string {
    return path.join(this.tmp, 'rx.log');
  }

  readLog(which: 'source' | 'receiver'): string {
    try {
      return fs.readFileSync(which === 'source' ? this.sourceLog : this.receiverLog, 'utf8');
    } catch {
      return '';
    }
  }

  async startReceiver(): Promise<void> {
    fs.rmSync(this.expSock, { force: true });
    const args = ['receive', this.dst, '--listen', `${this.pair.b.addr}:${this.o.receiverPort}`, '--export-socket', this.expSock, '--mirror-insecure'];
    this.receiver = this.pair.spawn('b', BIN, args, { stdio: ['ignore', 'ignore', fs.openSync(this.receiverLog, 'a')] });
    const r = this.receiver;
    await until('receiver socket', () => fs.existsSync(this.expSock) || r.exitCode !== null, 90_000);
    if (r.exitCode !== null) throw new Error(`the receiver exited (${r.exitCode}): ${this.readLog('receiver').slice(-2000)}`);
  }

  async startSource(resume = true): Promise<void> {
    fs.rmSync(this.srcSock, { force: true });
    const mirror = resume ? [] : ['--mirror-to', `127.0.0.1:${this.o.relayPort}`, '--mirror-mode', this.o.mode, '--mirror-policy', this.o.policy ?? 'available', '--mirror-insecure'];
    const args = ['serve', this.src, '--socket', this.srcSock, '--cp-interval', '300', ...mirror, '--mirror-stall-timeout', String(this.o.stallTimeoutMs ?? 2000)];
    this.source = this.pair.spawn('a', BIN, args, { stdio: ['ignore', 'ignore', fs.openSync(this.sourceLog, 'a')] });
    await until('source socket', () => fs.existsSync(this.srcSock), 90_000);
  }

  async stop(which: 'source' | 'receiver', signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const p = which === 'source' ? this.source : this.receiver;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const done = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await done;
  }

  /** The source's mirror section of `status --json`. */
  status(): SourceStats | undefined {
    return sourceStatus(this.src) as unknown as SourceStats | undefined;
  }

  /** The receiver's own status (`status DIR --json` on its directory). */
  receiverStatus(): ReceiverMirrorStatus | undefined {
    const probed = receiverProbe<ReceiverMirrorStatus>(this.dst);
    if (probed) return probed.mirrors?.find((m) => m.sourceUuid === this.uuid);
    try {
      const s = JSON.parse(sh(BIN, ['status', this.dst, '--json'])) as { mirrors?: ReceiverMirrorStatus[] };
      return s.mirrors?.find((m) => m.sourceUuid === this.uuid);
    } catch {
      return undefined;
    }
  }

  /** Every fault off: relay, nftables, link. */
  async clearFaults(): Promise<void> {
    await this.relay.set({ ...NO_FAULTS });
    await this.pair.blackhole(false);
    await this.pair.linkUp();
  }

  /**
   * Waits for the mirror to converge after the faults were lifted: a checkpoint that
   * holds every write so far, then roots equal at it, `verify` identical from both sides,
   * and byte-identical exported devices.
   */
  async converge(): Promise<Convergence> {
    const t0 = Date.now();
    const relay0 = (await this.relay.stats()).bytes.toTarget;
    const blocks0 = this.status()?.dataBlocksSent ?? 0;
    const r = await controlRequest(path.join(this.src, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r.ok, `checkpoint: ${r.ok ? '' : r.error}`);
    const cpNow = r.cpNumber as number;
    const st = await until('roots equal at the checkpoint', () => {
      const m = this.status();
      return m && m.state === 'in-sync' && m.rootsEqual && m.destCp === m.sourceCp && m.destCp >= cpNow ? m : undefined;
    }, CONVERGE_TIMEOUT_MS);
    const ms = Date.now() - t0;
    const bytesToReceiver = (await this.relay.stats()).bytes.toTarget - relay0;
    for (const dir of [this.src, path.join(this.dst, this.uuid)]) {
      const v = sh(BIN, ['verify', dir]);
      assert.match(v, /^identical at CP \d+ \(roots equal, superblocks equal\)$/m, `verify ${dir}: ${v}`);
    }
    const a = md5OfExport(`nbd+unix:///?socket=${this.srcSock}`);
    const b = md5OfExport(`nbd+unix:///${this.uuid}?socket=${this.expSock}`);
    assert.strictEqual(b, a, 'the mirror export differs from the source');
    return { ms, bytesToReceiver, dataBlocksSent: st.dataBlocksSent - blocks0, cp: st.destCp };
  }

  /** The md5 of the mirror's export (its newest committed CP). */
  mirrorMd5(): string {
    return md5OfExport(`nbd+unix:///${this.uuid}?socket=${this.expSock}`);
  }

  /** Counts matches of `re` in a log. */
  count(which: 'source' | 'receiver', re: RegExp): number {
    return (this.readLog(which).match(new RegExp(re.source, 'g')) ?? []).length;
  }

  printFailure(title: string): void {
    process.stderr.write(`\n  FAILED "${title}" with seed ${this.o.seed} (rerun with NVMIRROR_SEED=${this.o.seed})\n`);
    for (const w of ['source', 'receiver'] as const) {
      process.stderr.write(`--- ${w} log (tail)\n${this.readLog(w).split('\n').slice(-LOG_TAIL_LINES).join('\n')}\n`);
    }
  }

  async destroy(): Promise<void> {
    await this.relay.close().catch(() => undefined);
    await this.pair.destroy();
    fs.rmSync(this.tmp, { recursive: true, force: true });
  }
}

/** Runs `f` while sampling the memory of the given processes every `everyMs`; returns the peaks. */
export async function samplingMemory<T>(pids: Record<string, number | undefined>, everyMs: number, f: () => Promise<T>): Promise<{ result: T; peakKiB: Record<string, number> }> {
  const peakKiB: Record<string, number> = {};
  const sample = (): void => {
    for (const [k, pid] of Object.entries(pids)) {
      const m = memoryOf(pid);
      if (m) peakKiB[k] = Math.max(peakKiB[k] ?? 0, m.rssKiB);
    }
  };
  sample();
  const t = setInterval(sample, everyMs);
  try {
    const result = await f();
    sample();
    return { result, peakKiB };
  } finally {
    clearInterval(t);
  }
}

export { sleep, until };
