/**
 * Power loss by enumeration: small seeded workloads (writes whole and partial, trims,
 * FUA, FLUSH, CPs, a final close) run against the real engine and tree over a recording
 * layer. For every point of the recorded I/O timeline we build crash states: what was
 * synced/persisted, plus none / all / each prefix / random subsets (with 512-byte torn
 * blocks and pages) of what was not. Every state must open (recovery: newest valid
 * root + NVRAM replay), pass the tree's check, and hold the volume exactly as it was
 * after some prefix of the workload that includes every FLUSHed, FUA or checkpointed
 * operation (the log replays in order and stops at the first invalid record, so a
 * recovered volume is always a prefix).
 */
import { strict as assert } from 'assert';
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { NvLog } from '../../src/nvlog/log';
import { EngineVolume } from '../../src/volume/engine';
import {
  IoRecorder, RecordingBlockDevice, RecordingNvram, buildState, crashPoint, emptyImage, prefixChoices, randomChoices,
  type StorageImage,
} from '../../src/io/recording';
import { prng, seedFromEnv } from './harness';

const UUID = '90e71055-0000-4000-8000-00000000c0de';
const BS = 4096;
const VOLUME_BLOCKS = 24;
const DEVICE_BLOCKS = 1024;
const NVRAM_BYTES = 160 * 1024;
const PAGE = 4096;
const WORKLOADS = Number(process.env.NVMIRROR_POWERLOSS_WORKLOADS ?? 12);

type Op =
  | { k: 'write'; off: number; len: number; fua: boolean; seed: number }
  | { k: 'trim'; lbn: number; count: number }
  | { k: 'flush' }
  | { k: 'cp' };

function genWorkload(rnd: () => number): Op[] {
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

interface Recorded {
  base: StorageImage;
  baseDev: Map<number, Buffer>;
  baseNvram: Buffer;
  rec: IoRecorder;
  /** Volume contents after op j (index 0 = before any op). */
  states: Buffer[];
  /** (eventIndex, opCount): from eventIndex on, the first opCount ops are durable. */
  promises: Array<{ at: number; ops: number }>;
  /** If set, no crash state may hold more than the first maxOps ops. */
  maxOps?: number;
}

async function record(ops: Op[], lying = false): Promise<Recorded> {
  const mem = new MemoryBlockDevice(DEVICE_BLOCKS);
  await BlockTree.format(mem, { sizeBytes: VOLUME_BLOCKS * BS, volumeUuid: UUID });
  const nv = new MemoryNvram(NVRAM_BYTES);
  await NvLog.format(nv, UUID);
  const baseDev = new Map<number, Buffer>();
  const zero = Buffer.alloc(BS);
  for (let pba = 0; pba < DEVICE_BLOCKS; pba++) {
    const b = mem.peekBlock(pba);
    if (!b.equals(zero)) baseDev.set(pba, b);
  }
  const baseNvram = Buffer.from(nv.buffer);
  const rec = new IoRecorder();
  const dev = new RecordingBlockDevice(mem, rec, 'm0');
  const recording = new RecordingNvram(nv, rec, 'nv');
  const region = lying ? Object.assign(Object.create(recording) as RecordingNvram, { persist: () => Promise.resolve() }) : recording;
  const tree = await BlockTree.open(dev);
  const v = await EngineVolume.open({ tree, region, readOnly: false, cpIntervalMs: 0 });
  const model = Buffer.alloc(VOLUME_BLOCKS * BS);
  const states: Buffer[] = [Buffer.from(model)];
  const promises: Recorded['promises'] = [];
  const promise = (opsDone: number): void => {
    rec.capture();
    promises.push({ at: rec.events.length, ops: opsDone });
  };
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
    states.push(Buffer.from(model));
  }
  await v.close();
  promise(ops.length);
  rec.capture();
  const base = emptyImage();
  base.blocks.set('m0', new Map(baseDev));
  const pages = new Map<number, Buffer>();
  for (let p = 0; p < NVRAM_BYTES / PAGE; p++) pages.set(p, Buffer.from(baseNvram.subarray(p * PAGE, (p + 1) * PAGE)));
  base.pages.set('nv', pages);
  return { base, baseDev, baseNvram, rec, states, promises };
}

/** Opens a crash state, checks it, and returns a problem string or undefined. */
async function tryState(img: StorageImage, r: Recorded, durableOps: number): Promise<string | undefined> {
  const dev = new MemoryBlockDevice(DEVICE_BLOCKS);
  for (const [pba, b] of img.blocks.get('m0') ?? new Map<number, Buffer>()) await dev.writeBlocks(pba, b);
  const nvImage = Buffer.alloc(NVRAM_BYTES);
  for (const [p, b] of img.pages.get('nv') ?? new Map<number, Buffer>()) b.copy(nvImage, p * PAGE);
  const nv = new MemoryNvram(NVRAM_BYTES, nvImage);
  let v: EngineVolume;
  try {
    const tree = await BlockTree.open(dev);
    v = await EngineVolume.open({ tree, region: nv, readOnly: false, cpIntervalMs: 0 });
  } catch (e) {
    return `does not open: ${(e as Error).message}`;
  }
  try {
    const report = await v.tree.check();
    if (!report.ok) return `check fails: ${report.problems.slice(0, 3).join('; ')}`;
    const got = await v.read(0, VOLUME_BLOCKS * BS);
    let match = -1;
    const top = Math.min(r.states.length - 1, r.maxOps ?? Number.MAX_SAFE_INTEGER);
    for (let j = top; j >= durableOps; j--) if (r.states[j]!.equals(got)) { match = j; break; }
    if (match < 0) {
      const any = r.states.findIndex((s) => s.equals(got));
      if (any > top) return `holds the state after op ${any}, beyond the ${top} ops it can have`;
      return any >= 0 ? `holds the state after op ${any}, but ops up to ${durableOps} were durable` : 'holds a state that is no prefix of the workload';
    }
    // The recovered volume must also survive its own reopen.
    await v.close();
    const tree2 = await BlockTree.open(dev);
    const v2 = await EngineVolume.open({ tree: tree2, region: new MemoryNvram(NVRAM_BYTES, nv.buffer), readOnly: false, cpIntervalMs: 0 });
    const again = await v2.read(0, VOLUME_BLOCKS * BS);
    await v2.close();
    if (!again.equals(got)) return 'changes across a clean reopen after recovery';
    return undefined;
  } finally {
    await v.close().catch(() => undefined);
  }
}

/** Records a recovery (open read-write, then close) of a crash state, as a timeline of its own. */
async function recordRecovery(img: StorageImage, r: Recorded, durableOps: number): Promise<Recorded> {
  const mem = new MemoryBlockDevice(DEVICE_BLOCKS);
  for (const [pba, b] of img.blocks.get('m0') ?? new Map<number, Buffer>()) await mem.writeBlocks(pba, b);
  const nvImage = Buffer.alloc(NVRAM_BYTES);
  for (const [p, b] of img.pages.get('nv') ?? new Map<number, Buffer>()) b.copy(nvImage, p * PAGE);
  const nv = new MemoryNvram(NVRAM_BYTES, nvImage);
  const rec = new IoRecorder();
  const tree = await BlockTree.open(new RecordingBlockDevice(mem, rec, 'm0'));
  const v = await EngineVolume.open({ tree, region: new RecordingNvram(nv, rec, 'nv'), readOnly: false, cpIntervalMs: 0 });
  // What this recovery recovers: every crash during it must end in exactly this state.
  const got = await v.read(0, VOLUME_BLOCKS * BS);
  let recovered = -1;
  for (let j = r.states.length - 1; j >= 0; j--) if (r.states[j]!.equals(got)) { recovered = j; break; }
  assert.ok(recovered >= durableOps, `the recovery itself lost durable ops (state ${recovered} < ${durableOps})`);
  await v.close();
  rec.capture();
  const base = emptyImage();
  base.blocks.set('m0', new Map(img.blocks.get('m0') ?? []));
  const pages = new Map<number, Buffer>();
  for (let p = 0; p < NVRAM_BYTES / PAGE; p++) pages.set(p, Buffer.from(nvImage.subarray(p * PAGE, (p + 1) * PAGE)));
  base.pages.set('nv', pages);
  return { base, baseDev: new Map(), baseNvram: nvImage, rec, states: r.states, promises: [{ at: 0, ops: recovered }], maxOps: recovered };
}

async function enumerate(r: Recorded, rnd: () => number, what: string): Promise<{ states: number; points: number; failures: string[] }> {
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
      const problem = await tryState(buildState(cp, ch), r, durableOps);
      if (problem) {
        failures.push(`${what}: crash at event ${i}/${events.length} (${events[i - 1]?.kind ?? 'start'}), ${cp.pending.length} pending units: ${problem}`);
        break;
      }
    }
  }
  return { states, points, failures };
}

describe('crash: power loss by crash-state enumeration', function () {
  this.timeout(600_000);

  it(`every crash state of ${WORKLOADS} small workloads opens, checks clean and holds a durable prefix`, async () => {
    const seed = seedFromEnv();
    console.log(`      power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed);
    let statesTried = 0;
    let crashPoints = 0;
    let maxEvents = 0;
    const failures: string[] = [];
    const t0 = Date.now();
    for (let w = 0; w < WORKLOADS && failures.length === 0; w++) {
      const ops = genWorkload(rnd);
      const r = await record(ops);
      maxEvents = Math.max(maxEvents, r.rec.events.length);
      const res = await enumerate(r, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)})`);
      statesTried += res.states;
      crashPoints += res.points;
      failures.push(...res.failures);
    }
    console.log(`      ${statesTried} crash states at ${crashPoints} crash points (up to ${maxEvents} I/O events per workload) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    assert.deepEqual(failures, []);
  });

  it('power loss during recovery: every crash state of a recovery opens and holds exactly what the recovery recovers', async () => {
    const seed = seedFromEnv();
    console.log(`      recovery power-loss seed ${seed} (rerun with NVMIRROR_SEED=${seed})`);
    const rnd = prng(seed ^ 0x5eed);
    let statesTried = 0;
    let recoveries = 0;
    const failures: string[] = [];
    for (let w = 0; w < Math.ceil(WORKLOADS / 2) && failures.length === 0; w++) {
      const ops = genWorkload(rnd);
      const r = await record(ops);
      const events = r.rec.events;
      for (let k = 0; k < 3 && failures.length === 0; k++) {
        // A crash state with unreplayed NVRAM records: a point with pending stores, all of them landed.
        const i = 1 + Math.floor(rnd() * events.length);
        const cp = crashPoint(r.base, events, i);
        let durableOps = 0;
        for (const p of r.promises) if (p.at <= i) durableOps = Math.max(durableOps, p.ops);
        const img = buildState(cp, prefixChoices(cp, cp.order.length));
        const rr = await recordRecovery(img, r, durableOps);
        recoveries++;
        const res = await enumerate(rr, rnd, `seed ${seed} workload ${w} (${JSON.stringify(ops)}) crash at ${i}, then a crash during its recovery`);
        statesTried += res.states;
        failures.push(...res.failures);
      }
    }
    console.log(`      ${statesTried} crash states during ${recoveries} recoveries`);
    assert.deepEqual(failures, []);
  });

  it('negative control: an NVRAM whose persist lies loses FLUSHed writes, and the enumeration sees it', async () => {
    const rnd = prng(12345);
    const ops: Op[] = [
      { k: 'write', off: 0, len: 2 * BS, fua: false, seed: 1 },
      { k: 'flush' },
      { k: 'write', off: 3 * BS + 100, len: 200, fua: true, seed: 2 },
    ];
    const r = await record(ops, true);
    const res = await enumerate(r, rnd, 'lying NVRAM');
    assert.ok(res.failures.length > 0, 'the enumeration found no lost durable write');
    assert.match(res.failures[0]!, /durable|prefix/);
  });
});
