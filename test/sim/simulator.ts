/**
 * The seeded, fault-injecting simulator of the storage engine (VOPR style): one seed
 * picks a volume shape, fault rates and a random workload, and runs it against an
 * EngineVolume over in-memory storage wrapped in the faulty layers (src/sim/faulty-device.ts),
 * on a simulated clock (src/sim/clock.ts), checking every answer against a byte-array
 * model (model.ts).
 *
 * Storage outlives each engine "incarnation": the MemoryBlockDevice is shared, the
 * NVRAM bytes are copied out when an incarnation ends (clean close, or a process crash:
 * the volume object is dropped mid-flight, its wrappers fenced so the dead process
 * touches nothing again, its timers cancelled).
 *
 * Invariants checked:
 * - A read returns exactly the model's bytes, or fails with VolumeError EIO only if a
 *   read or corruption fault was injected while it ran.
 * - A write/trim/zero/flush/CP/snapshot op fails only with VolumeError EIO, and only
 *   after some fault was injected into this incarnation (the engine may then stay
 *   failed). A failed or crash-interrupted op leaves its blocks "either version".
 * - No acknowledged op is lost across a crash or close + reopen; a clean close leaves
 *   nothing to replay.
 * - After every reopen (verification runs with faults off): tree.check() is clean, the
 *   whole volume equals the model, the snapshot list equals the model's, and every
 *   snapshot reads back its point-in-time contents.
 * - A read-only open of crashed storage shows the same contents (NVRAM as an overlay).
 * - Nothing hangs: a pending op with no timer to fire is a SimStallError.
 * - RAID runs (opts.raid): only the victims (at most the level's tolerance) ever leave
 *   service, the RAID never fails, and after every reopen every stripe holding a block
 *   in use has parity that matches its data (with every member in service).
 * On failure a SimFailure carries the seed and the tail of the op trace.
 *
 * Bounded: ops per run (opts.ops), volume <= 512 KiB, <= SNAPSHOTS_SIM_MAX snapshots,
 * trace ring of TRACE_MAX lines.
 */
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { REGION_MIN_BYTES } from '../../src/nvlog/format';
import { EngineVolume } from '../../src/volume/engine';
import { SnapshotVolume } from '../../src/volume/engine-snapshot';
import { isVolumeError } from '../../src/util/errors';
import { EXTENT_HOLE, EXTENT_ZERO, type Volume } from '../../src/volume/types';
import { BLOCK_SIZE_BYTES, keepOpen, type BlockDevice } from '../../src/io/types';
import {
  FaultInjector, FaultyBlockDevice, FaultyNvramRegion, NO_FAULTS, FAULT_KINDS, type FaultKind, type FaultRates,
} from '../../src/sim/faulty-device';
import { SimClock, SimStallError } from '../../src/sim/clock';
import { RING_SLOTS } from '../../src/tree/layout';
import { testBit } from '../../src/util/bitmap';
import { RaidGeometry, tolerance } from '../../src/raid/geometry';
import { RaidDevice } from '../../src/raid/raid-device';
import { assembleRaidMembers, labelNewMembers } from '../../src/volume/raid-members';
import { PARITY_INLINE } from '../../src/raid/parity';
import { SeededRandom } from '../../src/sim/random';
import { Image } from './model';

const BS = BLOCK_SIZE_BYTES;
const UUID = '51a05eed-0000-4000-8000-00000000c0de';
const TRACE_MAX = 200;
const SNAPSHOTS_SIM_MAX = 4;
/** Open attempts with faults on before the simulator retries with faults off. */
const FAULTY_OPEN_ATTEMPTS = 3;

export interface SimOptions {
  seed: number;
  /** Workload ops (default 150). */
  ops?: number;
  /** Force faults on/off (default: the seed decides; about 1 seed in 5 runs without faults). */
  faults?: boolean;
  /** Trace lines in a failure report (default 30). */
  traceTail?: number;
  /** Inject read corruption during open too (default false: see the report on rollback). */
  corruptDuringOpen?: boolean;
  /** Receives every trace line as it happens (SIM_TRACE=1 prints them). */
  onTrace?: (line: string) => void;
  /** Negative controls: a layer between the memory device and the faulty layer... */
  wrapDevice?: (dev: BlockDevice, rnd: SeededRandom) => BlockDevice;
  /** ...or around each engine volume the workload talks to. */
  wrapVolume?: (v: Volume, rnd: SeededRandom) => Volume;
  /**
   * A RAID-5/6 volume over `members` memory members (assembled by their labels at every
   * open) instead of one member. I/O errors and a lost member (one for RAID-5, two for
   * RAID-6 at most) go only to the victims; corrupted reads and latency to every member.
   */
  raid?: { level: 5 | 6; members: number };
}

/** Stripe units a RAID simulation picks from. */
const RAID_UNIT_BYTES = [4096, 8192, 16384];
/** Tree blocks of the device (single member: the member itself). */
const DEVICE_BLOCKS = 4096;

/** The block devices of one incarnation: what the tree mounts, and the wrappers to fence when it ends. */
interface Storage {
  dev: BlockDevice;
  members: FaultyBlockDevice[];
}

function crashAll(st: Storage): void {
  for (const m of st.members) m.crash();
}


export interface SimStats {
  seed: number;
  ops: number;
  opsByKind: Record<string, number>;
  failedOps: number;
  crashes: number;
  cleanReopens: number;
  openRetries: number;
  checks: number;
  bytesVerified: number;
  faults: Record<FaultKind, number>;
  simulatedMs: number;
  faultsOn: boolean;
  /** RAID runs: members lost (pulled) during the run, and members faulted by the RAID layer (counted at each open). */
  membersLost: number;
  membersFaulted: number;
  /** Blocks written ahead of their CP (early data placement), over every incarnation that ended. */
  earlyPlacedBlocks: number;
}

export class SimFailure extends Error {
  override name = 'SimFailure';
  constructor(readonly seed: number, message: string) {
    super(message);
  }
}

interface SnapModel {
  image: Image;
  /** 'maybe': a create or delete failed; it may or may not exist. */
  state: 'exists' | 'maybe';
}

interface Incarnation {
  dev: Storage;
  /** The tree the engine mounted (the engine's own handle has no space map). */
  tree: BlockTree;
  region: FaultyNvramRegion;
  engine: EngineVolume;
  view: Volume;
  /** injector.errorsInjected when this incarnation started opening. */
  errorsAtStart: number;
}

type Mutation =
  | { kind: 'write'; offset: number; data: Buffer; fua: boolean }
  | { kind: 'trim' | 'zero'; offset: number; length: number; fua: boolean; noHole: boolean };

function errText(e: unknown): string {
  if (isVolumeError(e)) return `VolumeError ${e.code}: ${e.message}`;
  if (e instanceof Error) return `${e.name}: ${e.message}`;
  return String(e);
}

export class Simulator {
  readonly rnd: SeededRandom;
  private readonly clock = new SimClock();
  private readonly injector: FaultInjector;
  private readonly rates: FaultRates;
  private readonly faultsOn: boolean;
  private readonly sizeBytes: number;
  private readonly nvramBytes: number;
  private readonly cpIntervalMs: number;
  private readonly mems: MemoryBlockDevice[];
  private readonly below: BlockDevice[];
  private readonly raidSpec: { level: 5 | 6; stripeUnitBytes: number } | undefined;
  private readonly memberBlocks: number;
  /** RAID: members that may get I/O errors and be lost (at most the level's tolerance). */
  private readonly victims: number[] = [];
  /** RAID: op index at which a victim is pulled (-1: never), and the members pulled so far. */
  private readonly loseAtOp: number;
  private readonly pulled = new Set<number>();
  private nvram: Buffer;
  private inc: Incarnation | undefined;
  private readonly model: Image;
  private readonly snaps = new Map<string, SnapModel>();
  private snapCounter = 0;
  private readonly traceLines: string[] = [];
  private opIndex = 0;
  /** Ops left before a forced recovery (after a failure); -1 = none pending. */
  private recoverIn = -1;
  /** The last incarnation ended with a successful close: nothing may be left to replay. */
  private cleanlyClosed = false;
  readonly stats: SimStats;

  constructor(readonly opts: SimOptions) {
    this.rnd = new SeededRandom(opts.seed);
    const shape = this.rnd.fork(1);
    this.sizeBytes = shape.pick([16, 48, 96, 128]) * BS;
    this.nvramBytes = shape.pick([REGION_MIN_BYTES, REGION_MIN_BYTES, REGION_MIN_BYTES + 128 * 1024]);
    this.cpIntervalMs = shape.pick([0, 20, 100, 1000]);
    this.faultsOn = opts.faults ?? !shape.chance(0.2);
    const scale = shape.pick([0.25, 0.5, 1, 2]);
    this.rates = {
      readError: 0.01 * scale,
      writeError: 0.01 * scale,
      syncError: 0.02 * scale,
      discardError: 0.05 * scale,
      corruptRead: 0.005 * scale,
      persistError: 0.004 * scale,
      latency: shape.pick([0, 0.2, 0.6]),
      latencyMsMax: shape.pick([1, 5, 50]),
    };
    this.injector = new FaultInjector(this.rnd.fork(2).next32(), this.faultsOn ? this.rates : NO_FAULTS);
    this.injector.enabled = false;
    this.clock.activity = () => this.injector.calls;
    if (opts.raid) {
      const rs = this.rnd.fork(5);
      const { level, members } = opts.raid;
      if (opts.wrapDevice) throw new Error('wrapDevice is for single-member runs');
      this.raidSpec = { level, stripeUnitBytes: rs.pick(RAID_UNIT_BYTES) };
      this.memberBlocks = RaidGeometry.memberBlocksFor(level, members, this.raidSpec.stripeUnitBytes, DEVICE_BLOCKS);
      const order = Array.from({ length: members }, (_, i) => i);
      for (let k = 0; k < tolerance(level, members); k++) this.victims.push(order.splice(rs.int(order.length), 1)[0]!);
      this.loseAtOp = this.faultsOn && rs.chance(0.6) ? rs.range(1, opts.ops ?? 150) : -1;
      this.mems = order.concat(this.victims).map(() => new MemoryBlockDevice(this.memberBlocks));
      this.below = this.mems.map(keepOpen);
    } else {
      this.raidSpec = undefined;
      this.memberBlocks = DEVICE_BLOCKS;
      this.loseAtOp = -1;
      this.mems = [new MemoryBlockDevice(DEVICE_BLOCKS)];
      this.below = [opts.wrapDevice ? opts.wrapDevice(this.mems[0]!, this.rnd.fork(3)) : this.mems[0]!];
    }
    this.nvram = Buffer.alloc(this.nvramBytes);
    this.model = new Image(this.sizeBytes);
    this.stats = {
      seed: opts.seed, ops: 0, opsByKind: {}, failedOps: 0, crashes: 0, cleanReopens: 0, openRetries: 0, checks: 0, earlyPlacedBlocks: 0,
      bytesVerified: 0, faults: this.injector.counts, simulatedMs: 0, faultsOn: this.faultsOn, membersLost: 0, membersFaulted: 0,
    };
  }

  // ---- reporting ----

  private trace(line: string): void {
    const text = `#${this.opIndex} t=${this.clock.nowMs() - 1_700_000_000_000}ms ${line}`;
    this.opts.onTrace?.(text);
    this.traceLines.push(text);
    if (this.traceLines.length > TRACE_MAX) this.traceLines.shift();
  }

  fail(message: string): never {
    const tail = this.traceLines.slice(-(this.opts.traceTail ?? 30));
    const faults = this.injector.recent.filter((f) => f.kind !== 'latency').slice(-10);
    throw new SimFailure(this.opts.seed, [
      `simulation seed ${this.opts.seed} failed at op #${this.opIndex}: ${message}`,
      `replay: SIM_SEED=${this.opts.seed} npx mocha dist/test/sim/simulator.test.js`,
      `volume ${this.sizeBytes / BS} blocks, NVRAM ${this.nvramBytes} bytes, cpIntervalMs ${this.cpIntervalMs}, faults ${this.faultsOn ? JSON.stringify(this.rates) : 'off'}`,
      ...(this.raidSpec ? [`RAID-${this.raidSpec.level} x${this.mems.length}, unit ${this.raidSpec.stripeUnitBytes} bytes, victims ${this.victims.join(', ')}, pulled ${[...this.pulled].join(', ') || 'none'} (pull at op ${this.loseAtOp})`] : []),
      `last ${tail.length} ops:`,
      ...tail.map((l) => `  ${l}`),
      `last injected faults: ${faults.length === 0 ? 'none' : ''}`,
      ...faults.map((f) => `  ${f.kind} ${f.device} at ${f.at} x${f.count} ${f.detail}`),
    ].join('\n'));
  }

  private get live(): Incarnation {
    if (!this.inc) this.fail('no engine is open');
    return this.inc;
  }

  /** An op failed: fine only as EIO after a fault was injected into this incarnation. */
  private expectFaultError(e: unknown, what: string): void {
    if (e instanceof SimFailure) throw e;
    if (e instanceof SimStallError) this.fail(`${what} hung: ${e.message}`);
    if (!isVolumeError(e) || e.code !== 'EIO') this.fail(`${what} failed with an unexpected error: ${errText(e)}`);
    if (this.injector.errorsInjected <= this.live.errorsAtStart) this.fail(`${what} failed with EIO but no fault was injected: ${errText(e)}`);
    this.stats.failedOps++;
    if (this.recoverIn < 0) this.recoverIn = this.rnd.range(0, 4);
  }

  /** A read failed: fine only as EIO with a read/corruption fault injected while it ran. */
  private expectReadFault(e: unknown, what: string, readFaultsBefore: number): void {
    if (e instanceof SimFailure) throw e;
    if (e instanceof SimStallError) this.fail(`${what} hung: ${e.message}`);
    if (!isVolumeError(e) || e.code !== 'EIO') this.fail(`${what} failed with an unexpected error: ${errText(e)}`);
    if (this.readFaults() <= readFaultsBefore) this.fail(`${what} failed with EIO but no read fault was injected while it ran: ${errText(e)}`);
    this.stats.failedOps++;
  }

  private readFaults(): number {
    return this.injector.counts.read + this.injector.counts.corrupt;
  }

  // ---- incarnations ----

  private async format(): Promise<void> {
    let dev: BlockDevice = this.mems[0]!;
    if (this.raidSpec) {
      await labelNewMembers(this.below, this.raidSpec, this.memberBlocks, UUID);
      dev = await assembleRaidMembers(this.below.map((d, i) => ({ name: `member${i}`, dev: d })), this.raidSpec, this.memberBlocks, UUID, false, { parity: PARITY_INLINE });
    }
    await BlockTree.format(dev, { sizeBytes: this.sizeBytes, volumeUuid: UUID, clock: this.clock });
    if (dev !== this.mems[0]) {
      await dev.sync();
      await dev.close();
    }
    const region = new MemoryNvram(this.nvramBytes);
    await NvLog.format(region, UUID, this.rnd.fork(4));
    this.nvram = Buffer.from(region.buffer);
  }

  /** Ends the current incarnation as a process crash: fence it, keep its NVRAM bytes. */
  private crashNow(): void {
    const inc = this.inc;
    if (!inc) return;
    this.stats.earlyPlacedBlocks += inc.engine.placer?.stats.placedBlocks ?? 0;
    crashAll(inc.dev);
    inc.region.crash();
    this.clock.cancelAll();
    this.nvram = Buffer.from(inc.region.buffer);
    this.inc = undefined;
    this.cleanlyClosed = false;
  }

  private async wrappers(): Promise<{ dev: Storage; region: FaultyNvramRegion }> {
    const common = { injector: this.injector, clock: this.clock };
    const region = new FaultyNvramRegion(new MemoryNvram(this.nvramBytes, this.nvram), { ...common, name: 'nvram' });
    const members = this.below.map((d, i) => new FaultyBlockDevice(d, {
      ...common, name: `member${i}`, ...(this.raidSpec && !this.victims.includes(i) ? { kinds: ['corrupt', 'latency'] as const } : {}),
    }));
    if (!this.raidSpec) return { dev: { dev: members[0]!, members }, region };
    // A pulled member is missing at every later open.
    const raid = await assembleRaidMembers(members.map((m, i) => (this.pulled.has(i) ? { name: `member${i}`, dev: null, missingReason: 'pulled by the simulator' } : { name: `member${i}`, dev: m })), this.raidSpec, this.memberBlocks, UUID, false, { parity: PARITY_INLINE });
    return { dev: { dev: raid, members }, region };
  }

  /** RAID: the members out of service must be victims only, and no more than the level tolerates. */
  private checkRaid(dev: BlockDevice, what: string): void {
    if (!(dev instanceof RaidDevice)) return;
    const h = dev.health();
    const out = h.memberStatus.filter((m) => m.state !== 'online');
    this.stats.membersFaulted = Math.max(this.stats.membersFaulted, out.length);
    for (const m of out) if (!this.victims.includes(m.index)) this.fail(`${what}: member ${m.index} is out of service but no I/O error was injected into it (${m.reason ?? ''})`);
    if (h.state === 'failed') this.fail(`${what}: the RAID failed within the level's tolerance: ${h.failure ?? ''}`);
  }

  /** RAID, faults off: every stripe holding a block in use has parity that matches its data. */
  private async checkParity(tree: BlockTree, dev: BlockDevice): Promise<void> {
    if (!(dev instanceof RaidDevice)) return;
    if (dev.health().state !== 'online') return;
    const g = dev.geometry;
    const W = g.stripeDataBlocks;
    const used = tree.usedBitmap();
    for (let s = 0; s < g.stripes; s++) {
      let live = false;
      for (let p = s * W; p < (s + 1) * W && !live; p++) live = testBit(used, p);
      if (!live) continue;
      const r = await this.clock.run(dev.scrubStripe(s, false));
      if (r.verdict === 'mismatch') this.fail(`live stripe ${s}: parity does not match its data (member(s) ${r.members.join(', ')})`);
    }
  }

  /** RAID: pulls a victim now (every later call on it fails; it is missing at every later open). */
  private maybePull(): void {
    if (this.opIndex !== this.loseAtOp || !this.inc) return;
    const candidates = this.victims.filter((v) => !this.pulled.has(v));
    if (candidates.length === 0) return;
    const i = this.rnd.pick(candidates);
    this.pulled.add(i);
    this.inc.dev.members[i]!.lose();
    this.stats.membersLost++;
    this.trace(`member ${i} pulled`);
  }

  /** Opens an engine on the storage (retrying failed opens, last with faults off), then verifies it. */
  private async open(faults: boolean): Promise<void> {
    if (this.inc) this.fail('open while an engine is open');
    const rnd = this.rnd.fork(1000 + this.opIndex);
    for (let attempt = 0; ; attempt++) {
      const withFaults = faults && attempt < FAULTY_OPEN_ATTEMPTS;
      this.injector.enabled = withFaults;
      const saved = this.injector.rates;
      if (!this.opts.corruptDuringOpen) this.injector.rates = { ...saved, corruptRead: 0 };
      const errorsAtStart = this.injector.errorsInjected;
      let dev: Storage | undefined;
      let region: FaultyNvramRegion | undefined;
      try {
        ({ dev, region } = await this.clock.run(this.wrappers()));
        const tree = await this.clock.run(BlockTree.open(dev.dev, { clock: this.clock, cacheBlocks: rnd.pick([16, 64, 1024]), writeChunkBlocks: rnd.pick([1, 4, 256]), ioConcurrency: rnd.pick([1, 3, 8]) }));
        // Early data placement with small thresholds (a 4096-block device): writes of >= 4 blocks are written ahead of their CP, faults and crashes among those writes.
        const engine = await this.clock.run(EngineVolume.open({ tree, region, readOnly: false, clock: this.clock, random: rnd.fork(7), cpIntervalMs: this.cpIntervalMs, earlyPlacement: { minBlocks: 4, keepFreeBlocks: 1024 } }));
        const view = this.opts.wrapVolume ? this.opts.wrapVolume(engine, rnd.fork(8)) : engine;
        this.inc = { dev, tree, region, engine, view, errorsAtStart };
        this.trace(`opened (attempt ${attempt + 1}, faults ${withFaults ? 'on' : 'off'}, replayed ${engine.stats().replay.records} records)`);
        // A close that resolved must have left everything in the tree. (Known engine gap: a
        // volume whose log already failed resolves close() without a final CP, see the report;
        // so this is only held when no fault was injected into the closed incarnation.)
        if (this.cleanlyClosed && engine.stats().replay.records > 0) {
          this.fail(`the last close succeeded but open replayed ${engine.stats().replay.records} NVRAM records (close must leave everything in the tree)`);
        }
        this.cleanlyClosed = false;
        break;
      } catch (e) {
        if (e instanceof SimFailure) throw e;
        if (dev) crashAll(dev);
        if (region) {
          region.crash();
          this.nvram = Buffer.from(region.buffer);
        }
        this.clock.cancelAll();
        if (!withFaults || this.injector.errorsInjected <= errorsAtStart) this.fail(`open failed ${withFaults ? 'with no fault injected' : 'with faults off'}: ${errText(e)}`);
        this.trace(`open attempt ${attempt + 1} failed (injected): ${errText(e)}`);
        this.stats.openRetries++;
      } finally {
        this.injector.rates = saved;
      }
    }
    this.checkRaid(this.live.dev.dev, 'open');
    await this.verifyAll();
    this.injector.enabled = this.faultsOn;
  }

  /** With faults off: tree check, the whole volume, the snapshot list and every snapshot. */
  private async verifyAll(): Promise<void> {
    const { engine, view } = this.live;
    const wasEnabled = this.injector.enabled;
    this.injector.enabled = false;
    const report = await this.clock.run(engine.tree.check());
    this.stats.checks++;
    if (!report.ok) this.fail(`tree.check() after open: ${report.problems.slice(0, 5).join('; ')}`);
    await this.checkParity(this.live.tree, this.live.dev.dev);
    await this.readCompare(view, this.model, 0, this.sizeBytes, 'full read after open', false);
    const listed = new Map(engine.listSnapshots().map((s) => [s.name, s]));
    for (const [name, snap] of [...this.snaps]) {
      if (!listed.has(name)) {
        if (snap.state === 'exists') this.fail(`snapshot ${name} is gone after reopen`);
        this.snaps.delete(name);
        this.trace(`snapshot ${name}: the failed op left it absent`);
      } else if (snap.state === 'maybe') {
        snap.state = 'exists';
        this.trace(`snapshot ${name}: the failed op left it present`);
      }
    }
    for (const name of listed.keys()) if (!this.snaps.has(name)) this.fail(`snapshot ${name} exists but the model has no such snapshot`);
    for (const [name, snap] of this.snaps) {
      const sv = new SnapshotVolume(engine.tree, name, listed.get(name)!.cpNumber, engine.caps);
      await this.readCompare(sv, snap.image, 0, this.sizeBytes, `full read of snapshot ${name}`, false);
    }
    if (this.model.uncertainBlocks > 0) this.fail(`${this.model.uncertainBlocks} blocks still uncertain after a full read`);
    this.recoverIn = -1;
    this.injector.enabled = wasEnabled;
  }

  /** Reads and checks against `image`; EIO is accepted only when `faultsAllowed` and a read fault was injected. */
  private async readCompare(vol: Volume, image: Image, offset: number, length: number, what: string, faultsAllowed: boolean): Promise<void> {
    const before = this.readFaults();
    let got: Buffer;
    try {
      got = await this.clock.run(vol.read(offset, length));
    } catch (e) {
      if (!faultsAllowed) this.fail(`${what} [${offset}, +${length}) failed with faults off: ${errText(e)}`);
      this.expectReadFault(e, `${what} [${offset}, +${length})`, before);
      this.trace(`  -> EIO (injected)`);
      return;
    }
    const problem = image.verify(offset, got);
    if (problem) this.fail(`${what} [${offset}, +${length}) returned wrong data: ${problem}`);
    this.stats.bytesVerified += length;
  }

  // ---- workload ----

  private randomRange(maxBlocks = 12): { offset: number; length: number } {
    const r = this.rnd;
    let offset: number;
    let length: number;
    switch (r.int(4)) {
      case 0: // whole blocks
        offset = r.int(this.sizeBytes / BS) * BS;
        length = r.range(1, maxBlocks) * BS;
        break;
      case 1: // inside one block
        offset = r.int(this.sizeBytes);
        length = r.range(1, BS);
        break;
      case 2: // 512-byte sectors
        offset = r.int(this.sizeBytes / 512) * 512;
        length = r.range(1, maxBlocks * 8) * 512;
        break;
      default: // anything
        offset = r.int(this.sizeBytes);
        length = r.range(1, maxBlocks * BS);
    }
    length = Math.max(1, Math.min(length, this.sizeBytes - offset));
    return { offset, length };
  }

  private randomData(length: number): Buffer {
    const b = Buffer.allocUnsafe(length);
    const r = this.rnd;
    const mode = r.int(4);
    if (mode === 0) b.fill(0); // zero data: the tree stores it as a hole
    else if (mode === 1) b.fill(r.int(256));
    else {
      const whole = length - (length % 4);
      for (let i = 0; i < whole; i += 4) b.writeUInt32LE(r.next32(), i);
      for (let i = whole; i < length; i++) b[i] = r.int(256);
    }
    return b;
  }

  private randomMutation(range = this.randomRange()): Mutation {
    const r = this.rnd;
    const k = r.weighted([6, 1, 1]);
    const fua = r.chance(0.2);
    if (k === 0) return { kind: 'write', offset: range.offset, data: this.randomData(range.length), fua };
    return { kind: k === 1 ? 'trim' : 'zero', offset: range.offset, length: range.length, fua, noHole: r.chance(0.3) };
  }

  private describe(m: Mutation): string {
    if (m.kind === 'write') return `write [${m.offset}, +${m.data.length})${m.fua ? ' fua' : ''}`;
    return `${m.kind} [${m.offset}, +${m.length})${m.fua ? ' fua' : ''}${m.kind === 'zero' && m.noHole ? ' nohole' : ''}`;
  }

  private start(m: Mutation): Promise<void> {
    const v = this.live.view;
    if (m.kind === 'write') return v.write(m.offset, m.data, m.fua);
    if (m.kind === 'trim') return v.trim(m.offset, m.length, m.fua);
    return v.zero(m.offset, m.length, { fua: m.fua, noHole: m.noHole, fastZero: false });
  }

  private settleMutation(m: Mutation, outcome: 'ok' | 'maybe'): void {
    const length = m.kind === 'write' ? m.data.length : m.length;
    const data = m.kind === 'write' ? m.data : null;
    if (outcome === 'ok') this.model.apply(m.offset, length, data);
    else this.model.applyMaybe(m.offset, length, data);
  }

  private async opMutation(m: Mutation): Promise<void> {
    this.trace(this.describe(m));
    try {
      await this.clock.run(this.start(m));
    } catch (e) {
      this.expectFaultError(e, this.describe(m));
      this.trace(`  -> failed: ${errText(e)}`);
      this.settleMutation(m, 'maybe');
      return;
    }
    this.settleMutation(m, 'ok');
  }

  private async opRead(): Promise<void> {
    const { offset, length } = this.randomRange(40);
    this.trace(`read [${offset}, +${length})`);
    await this.readCompare(this.live.view, this.model, offset, length, 'read', true);
  }

  /** An op that may fail only with an injected fault and changes no data. */
  private async opControl(what: string, run: () => Promise<unknown>): Promise<boolean> {
    this.trace(what);
    try {
      await this.clock.run(run());
      return true;
    } catch (e) {
      this.expectFaultError(e, what);
      this.trace(`  -> failed: ${errText(e)}`);
      return false;
    }
  }

  private async opSnapshotCreate(): Promise<void> {
    const name = `s${++this.snapCounter}`;
    const image = this.model.clone();
    const ok = await this.opControl(`snapshot create ${name}`, () => this.live.engine.snapshot({ kind: 'create', name }));
    this.snaps.set(name, { image, state: ok ? 'exists' : 'maybe' });
  }

  private async opSnapshotDelete(name: string): Promise<void> {
    const ok = await this.opControl(`snapshot delete ${name}`, () => this.live.engine.snapshot({ kind: 'delete', name }));
    if (ok) this.snaps.delete(name);
    else this.snaps.get(name)!.state = 'maybe';
  }

  private async opSnapshotRead(name: string): Promise<void> {
    const { engine } = this.live;
    const info = engine.listSnapshots().find((s) => s.name === name);
    if (!info) this.fail(`snapshot ${name} is not listed`);
    const { offset, length } = this.randomRange(40);
    this.trace(`snapshot read ${name} [${offset}, +${length})`);
    const sv = new SnapshotVolume(engine.tree, name, info.cpNumber, engine.caps);
    await this.readCompare(sv, this.snaps.get(name)!.image, offset, length, `snapshot ${name} read`, true);
  }

  private async opBlockStatus(): Promise<void> {
    const { offset, length } = this.randomRange(64);
    const maxExtents = this.rnd.pick([1, 2, 16]);
    this.trace(`block status [${offset}, +${length}) max ${maxExtents}`);
    const before = this.readFaults();
    let ext;
    try {
      ext = await this.clock.run(this.live.view.blockStatus(offset, length, maxExtents));
    } catch (e) {
      this.expectReadFault(e, 'block status', before);
      return;
    }
    if (ext.length < 1 || ext.length > maxExtents) this.fail(`block status gave ${ext.length} extents (max ${maxExtents})`);
    let at = offset;
    for (const e of ext) {
      if (!(e.lengthBytes > 0) || at + e.lengthBytes > offset + length) this.fail(`block status extent ${JSON.stringify(e)} at ${at} is empty or beyond the query`);
      if ((e.flags & ~(EXTENT_HOLE | EXTENT_ZERO)) !== 0) this.fail(`block status flags ${e.flags}`);
      if ((e.flags & EXTENT_ZERO) !== 0 && !this.model.mayBeZero(at, e.lengthBytes)) this.fail(`block status says [${at}, +${e.lengthBytes}) reads as zeroes, the model has data there`);
      at += e.lengthBytes;
    }
  }

  /** 2-4 ops on disjoint byte ranges at once (writes, trims, zeroes, reads). */
  private async opConcurrent(): Promise<void> {
    const ranges: { offset: number; length: number }[] = [];
    const n = this.rnd.range(2, 4);
    for (let tries = 0; ranges.length < n && tries < 20; tries++) {
      const r = this.randomRange(6);
      if (ranges.every((o) => r.offset + r.length <= o.offset || o.offset + o.length <= r.offset)) ranges.push(r);
    }
    const jobs = ranges.map((r) => (this.rnd.chance(0.25) ? { read: r } : { mut: this.randomMutation(r) }));
    this.trace(`concurrent: ${jobs.map((j) => ('mut' in j && j.mut ? this.describe(j.mut) : `read [${j.read!.offset}, +${j.read!.length})`)).join(' | ')}`);
    const before = this.readFaults();
    const promises = jobs.map((j) => ('mut' in j && j.mut ? this.start(j.mut) : this.live.view.read(j.read!.offset, j.read!.length)));
    const all = Promise.allSettled(promises);
    await this.clock.run(all);
    const results = await all;
    results.forEach((res, i) => {
      const j = jobs[i]!;
      if ('mut' in j && j.mut) {
        if (res.status === 'fulfilled') this.settleMutation(j.mut, 'ok');
        else {
          this.expectFaultError(res.reason, this.describe(j.mut));
          this.trace(`  -> ${this.describe(j.mut)} failed: ${errText(res.reason)}`);
          this.settleMutation(j.mut, 'maybe');
        }
      } else if (res.status === 'fulfilled') {
        const problem = this.model.verify(j.read!.offset, res.value as Buffer);
        if (problem) this.fail(`concurrent read [${j.read!.offset}, +${j.read!.length}) returned wrong data: ${problem}`);
      } else {
        this.expectReadFault(res.reason, 'concurrent read', before);
      }
    });
  }

  private async opCloseReopen(): Promise<void> {
    const inc = this.live;
    this.trace('close');
    let closed = true;
    try {
      await this.clock.run(inc.engine.close());
    } catch (e) {
      this.expectFaultError(e, 'close');
      this.trace(`  -> close failed: ${errText(e)}`);
      closed = false;
    }
    this.stats.earlyPlacedBlocks += inc.engine.placer?.stats.placedBlocks ?? 0;
    crashAll(inc.dev); // nothing of this incarnation may touch storage any more
    inc.region.crash();
    this.clock.cancelAll();
    this.nvram = Buffer.from(inc.region.buffer);
    this.inc = undefined;
    this.cleanlyClosed = closed && this.injector.errorsInjected === inc.errorsAtStart;
    this.stats.cleanReopens++;
    await this.open(this.faultsOn && this.recoverIn < 0 && this.model.uncertainBlocks === 0);
  }

  private async opCrashReopen(): Promise<void> {
    this.trace('crash');
    this.crashNow();
    this.stats.crashes++;
    if (this.rnd.chance(0.25)) await this.readOnlyLook();
    await this.open(this.faultsOn && this.recoverIn < 0 && this.model.uncertainBlocks === 0);
  }

  /** Starts a mutation or control op, lets it run a few scheduler steps, then crashes. */
  private async opCrashDuring(): Promise<void> {
    const r = this.rnd;
    const k = r.weighted([5, 1, 1, 1]);
    const st: { outcome: 'pending' | 'ok' | 'failed'; error: unknown } = { outcome: 'pending', error: undefined };
    let p: Promise<unknown>;
    let settle: (o: 'ok' | 'maybe') => void;
    if (k === 0) {
      const m = this.randomMutation();
      this.trace(`${this.describe(m)} (crash during it)`);
      p = this.start(m);
      settle = (o) => this.settleMutation(m, o);
    } else if (k === 1) {
      this.trace('checkpoint (crash during it)');
      p = this.live.engine.checkpoint();
      settle = () => undefined;
    } else if (k === 2) {
      this.trace('flush (crash during it)');
      p = this.live.view.flush();
      settle = () => undefined;
    } else {
      const name = `s${++this.snapCounter}`;
      const image = this.model.clone();
      if ([...this.snaps.values()].length >= SNAPSHOTS_SIM_MAX) {
        this.trace('no room for a snapshot: crash only');
        p = Promise.resolve();
        settle = () => undefined;
      } else {
        this.trace(`snapshot create ${name} (crash during it)`);
        p = this.live.engine.snapshot({ kind: 'create', name });
        settle = (o) => this.snaps.set(name, { image, state: o === 'ok' ? 'exists' : 'maybe' });
      }
    }
    p.then(() => { st.outcome = 'ok'; }, (e: unknown) => { st.outcome = 'failed'; st.error = e; });
    await this.clock.step(r.range(0, 12));
    this.trace(`  crash with the op ${st.outcome}`);
    if (st.outcome === 'failed') this.expectFaultError(st.error, 'op interrupted by crash');
    this.crashNow();
    this.stats.crashes++;
    settle(st.outcome === 'ok' ? 'ok' : 'maybe');
    await this.open(this.faultsOn && this.recoverIn < 0 && this.model.uncertainBlocks === 0);
  }

  /** Opens the crashed storage read-only (NVRAM replayed as an overlay) and compares everything. */
  private async readOnlyLook(): Promise<void> {
    this.injector.enabled = false;
    const { dev, region } = await this.clock.run(this.wrappers());
    const tree = await this.clock.run(BlockTree.open(dev.dev, { clock: this.clock }));
    const engine = await this.clock.run(EngineVolume.open({ tree, region, readOnly: true, clock: this.clock }));
    this.trace('read-only look at the crashed storage');
    // Reads only: collapse on a throw-away copy so the read-write open still sees the choices.
    const probe = this.model.clone();
    const got = await this.clock.run(engine.read(0, this.sizeBytes));
    const problem = probe.verify(0, got);
    if (problem) this.fail(`read-only open of crashed storage returned wrong data: ${problem}`);
    await this.clock.run(engine.close());
    crashAll(dev);
    this.clock.cancelAll();
  }

  private async opAdvanceTime(): Promise<void> {
    const ms = this.rnd.range(1, Math.max(50, this.cpIntervalMs * 3));
    this.trace(`advance time ${ms} ms`);
    await this.clock.advanceBy(ms);
  }

  private async recover(): Promise<void> {
    this.trace(`recover (${this.model.uncertainBlocks} uncertain blocks)`);
    if (this.rnd.chance(0.5)) await this.opCloseReopen();
    else await this.opCrashReopen();
  }

  async run(): Promise<SimStats> {
    try {
      return await this.runInner();
    } catch (e) {
      if (e instanceof SimFailure) throw e;
      this.fail(`unexpected exception: ${errText(e)}${e instanceof Error && e.stack ? `\n${e.stack.split('\n').slice(1, 6).join('\n')}` : ''}`);
    }
  }

  private async runInner(): Promise<SimStats> {
    const total = this.opts.ops ?? 150;
    const r = this.rnd;
    await this.format();
    await this.open(false);
    this.injector.enabled = this.faultsOn;
    const kinds = ['write', 'read', 'trim', 'zero', 'flush', 'checkpoint', 'time', 'snap-create', 'snap-delete', 'snap-read', 'status', 'concurrent', 'close', 'crash', 'crash-during'] as const;
    const weights = [30, 20, 4, 4, 6, 4, 5, 3, 2, 4, 3, 5, 2, 3, 3];
    for (this.opIndex = 1; this.opIndex <= total; this.opIndex++) {
      if (this.recoverIn === 0 || this.model.overflow) {
        await this.recover();
        continue;
      }
      if (this.recoverIn > 0) this.recoverIn--;
      this.maybePull();
      const kind = kinds[r.weighted(weights)]!;
      this.stats.opsByKind[kind] = (this.stats.opsByKind[kind] ?? 0) + 1;
      this.stats.ops++;
      switch (kind) {
        case 'write':
        case 'trim':
        case 'zero': {
          const range = this.randomRange();
          const fua = r.chance(0.2);
          await this.opMutation(kind === 'write' ? { kind, offset: range.offset, data: this.randomData(range.length), fua } : { kind, offset: range.offset, length: range.length, fua, noHole: r.chance(0.3) });
          break;
        }
        case 'read': await this.opRead(); break;
        case 'flush': await this.opControl('flush', () => this.live.view.flush()); break;
        case 'checkpoint': await this.opControl('checkpoint', () => this.live.engine.checkpoint()); break;
        case 'time': await this.opAdvanceTime(); break;
        case 'snap-create':
          if (this.snaps.size < SNAPSHOTS_SIM_MAX) await this.opSnapshotCreate();
          break;
        case 'snap-delete': {
          const names = [...this.snaps].filter(([, s]) => s.state === 'exists').map(([n]) => n);
          if (names.length > 0) await this.opSnapshotDelete(r.pick(names));
          break;
        }
        case 'snap-read': {
          const names = [...this.snaps].filter(([, s]) => s.state === 'exists').map(([n]) => n);
          if (names.length > 0) await this.opSnapshotRead(r.pick(names));
          break;
        }
        case 'status': await this.opBlockStatus(); break;
        case 'concurrent': await this.opConcurrent(); break;
        case 'close': await this.opCloseReopen(); break;
        case 'crash': await this.opCrashReopen(); break;
        case 'crash-during': await this.opCrashDuring(); break;
      }
      if (this.inc) this.checkRaid(this.inc.dev.dev, `after op ${kind}`);
    }
    // The end: faults off, close cleanly, reopen and verify everything once more.
    this.opIndex = total + 1;
    this.injector.enabled = false;
    this.trace('final close');
    try {
      await this.clock.run(this.live.engine.close());
      this.cleanlyClosed = this.injector.errorsInjected === this.live.errorsAtStart;
    } catch (e) {
      this.expectFaultError(e, 'final close');
    }
    const inc = this.live;
    crashAll(inc.dev);
    inc.region.crash();
    this.clock.cancelAll();
    this.nvram = Buffer.from(inc.region.buffer);
    this.inc = undefined;
    await this.open(false);
    await this.clock.run(this.live.engine.close());
    this.inc = undefined;
    this.stats.simulatedMs = this.clock.nowMs() - 1_700_000_000_000;
    return this.stats;
  }
}

export async function runSimulation(opts: SimOptions): Promise<SimStats> {
  return new Simulator(opts).run();
}

export function faultSummary(counts: Record<FaultKind, number>): string {
  return FAULT_KINDS.filter((k) => counts[k] > 0).map((k) => `${k} ${counts[k]}`).join(', ') || 'none';
}
