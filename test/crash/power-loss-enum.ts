/**
 * Power loss by enumeration, the shared part (power-loss.test.ts: one member;
 * power-loss-raid.test.ts: RAID-5/6 over several members). Small seeded workloads
 * (writes whole and partial, trims, FUA, FLUSH, CPs, a final close) run against the real
 * engine and tree over a recording layer whose members and NVRAM share ONE recorder
 * timeline. For every point of the timeline we build crash states: what was
 * synced/persisted, plus none / all / each prefix / random subsets (with 512-byte torn
 * blocks and pages) of what was not, independently per member block (so, over RAID,
 * stripes torn across members and labels or ring copies on some members only). Every
 * state must open (recovery: newest valid root + NVRAM replay), pass the tree's check,
 * hold the volume exactly as it was after some prefix of the workload that includes
 * every FLUSHed, FUA or checkpointed operation, pass the layout's own check of the image
 * (RAID: parity of every live stripe), and (layouts that tolerate it) open with a member
 * removed and read the same. A layout may have a stripe journal device beside its members
 * (power-loss-raid-journal.test.ts): it is recorded on the same timeline, built from the
 * same image, and never removed (it lives beside the volume's label, not on a member).
 *
 * Invariants:
 * - A Layout builds every device from member images only: nothing carries over between
 *   crash states except the recorded timeline.
 * - The first problem of a workload stops its enumeration and is returned with the
 *   workload, the crash point and the state, so a failure names what to replay.
 */
import { strict as assert } from 'assert';
import { BlockTree } from '../../src/tree/tree';
import type { RaidDevice } from '../../src/raid/raid-device';
import { testBit } from '../../src/util/bitmap';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';
import { keepOpen, type BlockDevice } from '../../src/io/types';
import {
  IoRecorder, RecordingBlockDevice, RecordingNvram, buildState, crashPoint, emptyImage, prefixChoices, randomChoices,
  type StorageImage,
} from '../../src/io/recording';
import { prng } from './harness';
import { log as engineLog } from '../../src/util/log';

export const UUID = '90e71055-0000-4000-8000-00000000c0de';
const BS = 4096;
export const VOLUME_BLOCKS = 24;
const NVRAM_BYTES = 160 * 1024;
const PAGE = 4096;
const NVRAM_NAME = 'nv';

/**
 * How a volume sits on its members. `assemble` gets one device per member (null: the
 * member is removed) built from an image; `checkImage` may report a problem with a crash
 * image before recovery touches it.
 */
export interface Layout {
  name: string;
  /** Recorder device names, one per member. */
  members: string[];
  memberBlocks: number;
  /** Members that may be removed while every block stays readable. */
  tolerance: number;
  /** Writes what a new volume's members hold before the tree is formatted (RAID: labels). */
  prepare(devs: BlockDevice[]): Promise<void>;
  /** `journal`: the layout's journal device (when it has one), built from the same image. */
  assemble(devs: Array<BlockDevice | null>, readOnly: boolean, journal?: BlockDevice): Promise<BlockDevice>;
  checkImage?(devs: BlockDevice[], journal?: BlockDevice): Promise<string | undefined>;
  /** A stripe journal device beside the members (recorder name, blocks); absent: none. */
  journal?: { name: string; blocks: number };
  /** Members the assembled device has out of service (stale, missing). */
  lost(dev: BlockDevice): number[];
}

export type Op =
  | { k: 'write'; off: number; len: number; fua: boolean; seed: number }
  | { k: 'trim'; lbn: number; count: number }
  | { k: 'flush' }
  | { k: 'cp' };

export function genWorkload(rnd: () => number): Op[] {
  const n = 5 + Math.floor(rnd() * 5);
  const ops: Op[] = [];
  for (let i = 0; i < n; i++) {
    const r = rnd();
    if (r < 0.45) {
      const lbn = Math.floor(rnd() * (VOLUME_BLOCKS - 4));
      ops.push({ k: 'write', off: lbn * BS, len: (1 + Math.floor(rnd() * 4)) * BS, fua: rnd() < 0.3, seed: Math.floor(rnd() * 1e9) });
    } else if (r < 0.6) {
      const lbn = Math.floor(rnd() * VOLUME_BLOCKS);
      const a = Math.floor(rnd() * BS);
      const len = 1 + Math.floor(rnd() * (BS - a));
      ops.push({ k: 'write', off: lbn * BS + a, len, fua: rnd() < 0.3, seed: Math.floor(rnd() * 1e9) });
    } else if (r < 0.7) {
      const lbn = Math.floor(rnd() * (VOLUME_BLOCKS - 3));
      ops.push({ k: 'trim', lbn, count: 1 + Math.floor(rnd() * 3) });
    } else if (r < 0.85) {
      ops.push({ k: 'flush' });
    } else {
      ops.push({ k: 'cp' });
    }
  }
  return ops;
}

function bytes(seed: number, n: number): Buffer {
  const r = prng(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(r() * 256);
  return b;
}

export interface Recorded {
  base: StorageImage;
  rec: IoRecorder;
  /** Volume contents after op j (index 0 = before any op). */
  states: Buffer[];
  /** (eventIndex, opCount): from eventIndex on, the first opCount ops are durable. */
  promises: Array<{ at: number; ops: number }>;
  /** If set, no crash state may hold more than the first maxOps ops. */
  maxOps?: number;
  /** Stripes the RAID layer completed by read-modify-write while recording (0 elsewhere). */
  rmwStripes: number;
  /** Of those, the stripes written through the stripe journal (0 without one). */
  journaledStripes: number;
  /** The RAID layer's stripe writes while recording, and during the prologue (record()'s). */
  raidStats?: { recorded: RaidStripeStats; prologue: RaidStripeStats };
}

export interface RaidStripeStats {
  full: number;
  rmw: number;
  journaled: number;
  batches: number;
}

function imageOf(mems: MemoryBlockDevice[], layout: Layout, nvram: Buffer, journal?: MemoryBlockDevice): StorageImage {
  const img = emptyImage();
  const zero = Buffer.alloc(BS);
  const add = (name: string, m: MemoryBlockDevice): void => {
    const blocks = new Map<number, Buffer>();
    for (let pba = 0; pba < m.blockCount; pba++) {
      const b = m.peekBlock(pba);
      if (!b.equals(zero)) blocks.set(pba, b);
    }
    img.blocks.set(name, blocks);
  };
  mems.forEach((m, i) => add(layout.members[i]!, m));
  if (layout.journal && journal) add(layout.journal.name, journal);
  const pages = new Map<number, Buffer>();
  for (let p = 0; p < NVRAM_BYTES / PAGE; p++) pages.set(p, Buffer.from(nvram.subarray(p * PAGE, (p + 1) * PAGE)));
  img.pages.set(NVRAM_NAME, pages);
  return img;
}

/** Member devices holding an image's blocks. */
async function membersOf(img: StorageImage, layout: Layout): Promise<MemoryBlockDevice[]> {
  return Promise.all(layout.members.map(async (name) => {
    const dev = new MemoryBlockDevice(layout.memberBlocks);
    for (const [pba, b] of img.blocks.get(name) ?? new Map<number, Buffer>()) await dev.writeBlocks(pba, b);
    return dev;
  }));
}

/** The layout's journal device holding an image's journal blocks (undefined: the layout has none). */
async function journalOf(img: StorageImage, layout: Layout): Promise<MemoryBlockDevice | undefined> {
  if (!layout.journal) return undefined;
  const dev = new MemoryBlockDevice(layout.journal.blocks);
  for (const [pba, b] of img.blocks.get(layout.journal.name) ?? new Map<number, Buffer>()) await dev.writeBlocks(pba, b);
  return dev;
}

function nvramOf(img: StorageImage): Buffer {
  const nvImage = Buffer.alloc(NVRAM_BYTES);
  for (const [p, b] of img.pages.get(NVRAM_NAME) ?? new Map<number, Buffer>()) b.copy(nvImage, p * PAGE);
  return nvImage;
}

function rmwOf(dev: BlockDevice): RaidStripeStats {
  const stats = (dev as { stats?: { fullStripeWrites?: number; rmwStripeWrites?: number; journaledStripes?: number; journalBatches?: number } }).stats;
  return { full: stats?.fullStripeWrites ?? 0, rmw: stats?.rmwStripeWrites ?? 0, journaled: stats?.journaledStripes ?? 0, batches: stats?.journalBatches ?? 0 };
}

/** Runs ops against a volume and its model (prologue and recorded workload alike); `promise(n)`: the first n ops are durable now. */
async function runOps(v: EngineVolume, model: Buffer, ops: Op[], promise: (opsDone: number) => void, states?: Buffer[]): Promise<void> {
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    switch (op.k) {
      case 'write': {
        const d = bytes(op.seed, op.len);
        await v.write(op.off, d, op.fua);
        d.copy(model, op.off);
        if (op.fua) promise(i + 1);
        break;
      }
      case 'trim':
        await v.trim(op.lbn * BS, op.count * BS, false);
        model.fill(0, op.lbn * BS, (op.lbn + op.count) * BS);
        break;
      case 'flush':
        await v.flush();
        promise(i + 1);
        break;
      case 'cp':
        await v.checkpoint();
        promise(i + 1);
        break;
    }
    states?.push(Buffer.from(model));
  }
}

/**
 * Records `ops` from a new volume. `prologue` runs first, unrecorded (its result, after a
 * clean close, is the base image and state 0): e.g. to fill the volume so that the
 * recorded CPs find no whole free stripe.
 */
export async function record(layout: Layout, ops: Op[], lying = false, prologue: Op[] = []): Promise<Recorded> {
  const mems = layout.members.map(() => new MemoryBlockDevice(layout.memberBlocks));
  const jmem = layout.journal ? new MemoryBlockDevice(layout.journal.blocks) : undefined;
  await layout.prepare(mems);
  const fmt = await layout.assemble(mems.map(keepOpen), false, jmem && keepOpen(jmem));
  await BlockTree.format(fmt, { sizeBytes: VOLUME_BLOCKS * BS, volumeUuid: UUID });
  await fmt.sync();
  await fmt.close();
  let nv = new MemoryNvram(NVRAM_BYTES);
  await NvLog.format(nv, UUID);
  const model = Buffer.alloc(VOLUME_BLOCKS * BS);
  let prologueStats: RaidStripeStats = { full: 0, rmw: 0, journaled: 0, batches: 0 };
  if (prologue.length > 0) {
    const pdev = await layout.assemble(mems.map(keepOpen), false, jmem && keepOpen(jmem));
    const pv = await EngineVolume.open({ tree: await BlockTree.open(pdev), region: nv, readOnly: false, cpIntervalMs: 0 });
    await runOps(pv, model, prologue, () => undefined);
    await pv.close();
    prologueStats = rmwOf(pdev);
    await pdev.close();
    nv = new MemoryNvram(NVRAM_BYTES, Buffer.from(nv.buffer)); // (the closed volume closed its region)
  }
  const base = imageOf(mems, layout, nv.buffer, jmem);
  const live = await membersOf(base, layout);
  const rec = new IoRecorder();
  const devs = live.map((m, i) => new RecordingBlockDevice(m, rec, layout.members[i]!));
  const liveJournal = await journalOf(base, layout);
  const recording = new RecordingNvram(nv, rec, NVRAM_NAME);
  const region = lying ? Object.assign(Object.create(recording) as RecordingNvram, { persist: () => Promise.resolve() }) : recording;
  const dev = await layout.assemble(devs, false, liveJournal && new RecordingBlockDevice(liveJournal, rec, layout.journal!.name));
  const tree = await BlockTree.open(dev);
  // Writes of >= 2 blocks are placed ahead of their CP (a plain layout's tree offers it):
  // their writes to free blocks are in the recorded timeline like every other.
  const v = await EngineVolume.open({ tree, region, readOnly: false, cpIntervalMs: 0, earlyPlacement: { minBlocks: 2, keepFreeBlocks: 64 } });
  const states: Buffer[] = [Buffer.from(model)];
  const promises: Recorded['promises'] = [];
  const promise = (opsDone: number): void => {
    rec.capture();
    promises.push({ at: rec.events.length, ops: opsDone });
  };
  await runOps(v, model, ops, promise, states);
  const rmw = rmwOf(dev);
  await v.close();
  const closed = rmwOf(dev); // (with the final CP's)
  await dev.close(); // (background discards land before the timeline ends)
  promise(ops.length);
  rec.capture();
  return { base, rec, states, promises, rmwStripes: rmw.rmw, journaledStripes: rmw.journaled, raidStats: { recorded: closed, prologue: prologueStats } };
}

/** Which members a state's degraded open leaves out (cycles through them). */
let degradedTurn = 0;

/** Opens an image's volume and recovers it; returns the volume and its contents, or a problem. */
interface OpenedState {
  v: EngineVolume;
  dev: BlockDevice;
  got: Buffer;
  /** The CP the tree mounted (before any replay). */
  mountedCp: number;
  nv: MemoryNvram;
  mems: MemoryBlockDevice[];
  journal: MemoryBlockDevice | undefined;
}

async function closeState(s: { v: EngineVolume; dev: BlockDevice }): Promise<void> {
  await s.v.close();
  await s.dev.close();
}

/** The members a degraded open leaves out: `count` (1 or 2) distinct ones of `candidates`, rotating with `turn`. */
function removedSet(turn: number, candidates: number[], count: number): number[] {
  const n = candidates.length;
  assert.ok(count >= 1 && count <= 2 && n > count, `removedSet: ${count} of ${n}`);
  const first = turn % n;
  if (count === 1) return [candidates[first]!];
  return [candidates[first]!, candidates[(first + 1 + (Math.floor(turn / n) % (n - 1))) % n]!];
}

async function openState(layout: Layout, img: StorageImage, removed: number[]): Promise<OpenedState | string> {
  const mems = await membersOf(img, layout);
  const journal = await journalOf(img, layout);
  const nv = new MemoryNvram(NVRAM_BYTES, nvramOf(img));
  let v: EngineVolume;
  let dev: BlockDevice;
  let mountedCp: number;
  try {
    dev = await layout.assemble(mems.map((m, i) => (removed.includes(i) ? null : keepOpen(m))), false, journal && keepOpen(journal));
    const tree = await BlockTree.open(dev);
    mountedCp = tree.cpNumber;
    v = await EngineVolume.open({ tree, region: nv, readOnly: false, cpIntervalMs: 0 });
  } catch (e) {
    return `does not open${removed.length === 0 ? '' : ` with member(s) ${removed.join(', ')} removed`}: ${(e as Error).message}`;
  }
  try {
    return { v, dev, got: await v.read(0, VOLUME_BLOCKS * BS), mountedCp, nv, mems, journal };
  } catch (e) {
    await closeState({ v, dev }).catch(() => undefined);
    return `does not read${removed.length === 0 ? '' : ` with member(s) ${removed.join(', ')} removed`}: ${(e as Error).message}`;
  }
}

/** Which op prefix a volume's contents are ("the state after op j", the newest that matches). */
function stateName(r: Recorded, got: Buffer): string {
  for (let j = r.states.length - 1; j >= 0; j--) if (r.states[j]!.equals(got)) return `the state after op ${j}`;
  return 'a state that is no prefix of the workload';
}

/** Opens a crash state, checks it, and returns a problem string or undefined. */
export async function tryState(layout: Layout, img: StorageImage, r: Recorded, durableOps: number): Promise<string | undefined> {
  if (layout.checkImage) {
    const j = await journalOf(img, layout);
    const problem = await layout.checkImage((await membersOf(img, layout)).map(keepOpen), j && keepOpen(j));
    if (problem) return problem;
  }
  const opened = await openState(layout, img, []);
  if (typeof opened === 'string') return opened;
  const { v, dev, got, nv, mems, journal } = opened;
  const lost = layout.lost(dev);
  let match = -1;
  const top = Math.min(r.states.length - 1, r.maxOps ?? Number.MAX_SAFE_INTEGER);
  /** A problem if `seen` is no prefix between durableOps and top. */
  const prefixProblem = (seen: Buffer): string | undefined => {
    match = -1;
    for (let j = top; j >= durableOps; j--) if (r.states[j]!.equals(seen)) { match = j; break; }
    if (match >= 0) return undefined;
    const any = r.states.findIndex((s) => s.equals(seen));
    if (any > top) return `holds the state after op ${any}, beyond the ${top} ops it can have`;
    return any >= 0 ? `holds the state after op ${any}, but ops up to ${durableOps} were durable` : 'holds a state that is no prefix of the workload';
  };
  try {
    const report = await v.tree.check();
    if (!report.ok) return `check fails: ${report.problems.slice(0, 3).join('; ')}`;
    const p = prefixProblem(got);
    if (p) return p;
    // The recovered volume must also survive its own reopen, and its image pass the layout's check.
    await closeState({ v, dev });
    const dev2 = await layout.assemble(mems.map(keepOpen), false, journal && keepOpen(journal));
    const v2 = await EngineVolume.open({ tree: await BlockTree.open(dev2), region: new MemoryNvram(NVRAM_BYTES, nv.buffer), readOnly: false, cpIntervalMs: 0 });
    const again = await v2.read(0, VOLUME_BLOCKS * BS);
    await closeState({ v: v2, dev: dev2 });
    if (!again.equals(got)) return 'changes across a clean reopen after recovery';
    if (layout.checkImage) {
      const problem = await layout.checkImage(mems.map(keepOpen), journal && keepOpen(journal));
      if (problem) return `after recovery and a clean close: ${problem}`;
    }
  } finally {
    await closeState({ v, dev }).catch(() => undefined);
  }
  if (layout.tolerance > lost.length) {
    // The write-hole check: the crash image with members removed (as many more as the level
    // tolerates) recovers the same volume.
    const inService = layout.members.map((_, i) => i).filter((i) => !lost.includes(i));
    const removed = removedSet(degradedTurn++, inService, layout.tolerance - lost.length);
    const deg = await openState(layout, img, removed);
    if (typeof deg === 'string') return deg;
    await closeState(deg);
    // The same root must read the same; another (a newer CP's superblock only on the removed
    // members, not yet durable) must still be a durable prefix.
    if (deg.mountedCp === opened.mountedCp && !deg.got.equals(got)) return `with member(s) ${removed.join(', ')} removed it reads ${stateName(r, deg.got)} from CP ${deg.mountedCp}, with every member ${stateName(r, got)} from the same CP`;
    const p = prefixProblem(deg.got);
    if (p) return `with member(s) ${removed.join(', ')} removed it ${p}`;
  }
  return undefined;
}

/**
 * Records a recovery (open read-write, then close) of a crash state, as a timeline of
 * its own; with `removed`, that member is absent during the recovery (it does not appear
 * in the new timeline) and present again, as the crash left it, in every state built
 * from it: it must be recognised as stale.
 */
export async function recordRecovery(layout: Layout, img: StorageImage, r: Recorded, durableOps: number, removed: number | null = null): Promise<Recorded> {
  const mems = await membersOf(img, layout);
  const journal = await journalOf(img, layout);
  const nvImage = nvramOf(img);
  const nv = new MemoryNvram(NVRAM_BYTES, nvImage);
  const rec = new IoRecorder();
  const dev = await layout.assemble(mems.map((m, i) => (i === removed ? null : new RecordingBlockDevice(keepOpen(m), rec, layout.members[i]!))), false,
    journal && new RecordingBlockDevice(keepOpen(journal), rec, layout.journal!.name));
  const tree = await BlockTree.open(dev);
  const v = await EngineVolume.open({ tree, region: new RecordingNvram(nv, rec, NVRAM_NAME), readOnly: false, cpIntervalMs: 0 });
  // What this recovery recovers: every crash during it must end in exactly this state.
  const got = await v.read(0, VOLUME_BLOCKS * BS);
  let recovered = -1;
  for (let j = r.states.length - 1; j >= 0; j--) if (r.states[j]!.equals(got)) { recovered = j; break; }
  assert.ok(recovered >= durableOps, `the recovery itself lost durable ops (state ${recovered} < ${durableOps})`);
  const rmw = rmwOf(dev);
  await closeState({ v, dev });
  rec.capture();
  const base = emptyImage();
  for (const name of [...layout.members, ...(layout.journal ? [layout.journal.name] : [])]) base.blocks.set(name, new Map(img.blocks.get(name) ?? []));
  const pages = new Map<number, Buffer>();
  for (let p = 0; p < NVRAM_BYTES / PAGE; p++) pages.set(p, Buffer.from(nvImage.subarray(p * PAGE, (p + 1) * PAGE)));
  base.pages.set(NVRAM_NAME, pages);
  return { base, rec, states: r.states, promises: [{ at: 0, ops: recovered }], maxOps: recovered, rmwStripes: rmw.rmw, journaledStripes: rmw.journaled };
}

export interface EnumerateResult {
  states: number;
  points: number;
  failures: string[];
}

export async function enumerate(layout: Layout, r: Recorded, rnd: () => number, what: string): Promise<EnumerateResult> {
  const events = r.rec.events;
  const failures: string[] = [];
  let states = 0;
  let points = 0;
  for (let i = 0; i <= events.length && failures.length === 0; i++) {
    const cp = crashPoint(r.base, events, i);
    points++;
    let durableOps = 0;
    for (const p of r.promises) if (p.at <= i) durableOps = Math.max(durableOps, p.ops);
    const choices = [
      cp.pending.map(() => ({ version: -1 })),
      prefixChoices(cp, cp.order.length),
    ];
    const step = Math.max(1, Math.floor(cp.order.length / 6));
    for (let n = 1; n < cp.order.length; n += step) choices.push(prefixChoices(cp, n));
    for (let k = 0; k < 4 && cp.pending.length > 0; k++) choices.push(randomChoices(cp, rnd));
    for (const ch of choices) {
      states++;
      const problem = await tryState(layout, buildState(cp, ch), r, durableOps);
      if (problem) {
        const e = events[i - 1];
        failures.push(`${layout.name} ${what}: crash at event ${i}/${events.length} (${e ? `${e.kind} ${e.device}` : 'start'}), ${cp.pending.length} pending units: ${problem}`);
        break;
      }
    }
  }
  return { states, points, failures };
}

/** The durable op count at a crash point. */
export function durableAt(r: Recorded, eventIndex: number): number {
  let durableOps = 0;
  for (const p of r.promises) if (p.at <= eventIndex) durableOps = Math.max(durableOps, p.ops);
  return durableOps;
}

/** Single-member layout: the tree straight on its one member (the ring at pbas 0..7). */
export function singleLayout(deviceBlocks: number): Layout {
  return {
    name: 'single',
    members: ['m0'],
    memberBlocks: deviceBlocks,
    tolerance: 0,
    lost: () => [],
    prepare: () => Promise.resolve(),
    assemble: (devs) => {
      const d = devs[0];
      assert.ok(d, 'the single member is required');
      return Promise.resolve(d);
    },
  };
}

export { buildState, crashPoint, prefixChoices };

/**
 * Inside a describe(): the engine's own info lines (one "NVRAM replay" and "raid: member
 * labels updated" per opened crash state, and the warnings the states cause by design:
 * thousands per run) off while its tests run; errors still print.
 */
export function quietEngineLogs(): void {
  let saved: string | undefined;
  before(() => {
    saved = engineLog().level;
    engineLog().level = 'error';
  });
  after(() => {
    if (saved !== undefined) engineLog().level = saved;
  });
}

/** The first live stripe of `raid` (stripe width W blocks) whose parity does not match its data, or undefined. */
export async function liveStripeParityProblem(raid: RaidDevice, W: number): Promise<string | undefined> {
  try {
    const tree = await BlockTree.open(raid);
    const used = tree.usedBitmap();
    const everyMember = raid.health().state === 'online';
    // The head's blocks (the superblock ring) are used but do not live in their stripe: they
    // are read from every member's label area, and their places in the striped area hold
    // zeroes. A stripe whose only used blocks are head blocks holds nothing its parity
    // protects (a CP may write the rest of it whole, without the journal, and a crash may
    // tear that write: nothing live is lost).
    const head = raid.geometry.headBlocks;
    for (let s = 0; s < raid.geometry.stripes; s++) {
      let live = false;
      for (let p = Math.max(s * W, head); p < (s + 1) * W && !live; p++) live = testBit(used, p);
      if (!live) continue;
      const r = await raid.scrubStripe(s, false);
      if (r.verdict === 'mismatch') return `live stripe ${s} has parity that does not match its data (member(s) ${r.members.join(', ')})`;
      if (r.verdict === 'unverifiable' && everyMember) return `live stripe ${s} cannot be checked with every member in service`;
    }
    await tree.close();
    return undefined;
  } catch (e) {
    return `parity check cannot run: ${(e as Error).message}`;
  }
}
