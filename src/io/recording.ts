/**
 * Recording I/O: BlockDevice and NvramRegion wrappers that log every write, sync,
 * discard, NVRAM store and persist into one shared timeline, so that tests can rebuild
 * the storage as it could be after a power loss at any point (crash-state enumeration),
 * and count syncs.
 *
 * NVRAM stores are plain memory writes into the mapping and cannot be intercepted; the
 * recorder discovers them by diffing the region against a shadow copy, page by page,
 * just before it records any other event (and when a test calls `capture()`). A page
 * store therefore appears in the timeline no later than the next I/O event that
 * followed it, which is exactly the order the engine observed.
 *
 * Invariants:
 * - Every event holds its own copy of the data (later writes never alias it).
 * - The timeline is append-only and capped (eventsMax, bytesMax): exceeding a cap is a
 *   test bug and asserts, it never drops events silently.
 * - Power-loss semantics modelled: a member write is durable only after a later sync of
 *   that member; an NVRAM page store is durable only after a later persist covering the
 *   page. Anything not yet durable may survive wholly, partly (torn at 512-byte sector
 *   granularity) or not at all, independently per block/page.
 */
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES, type BlockDevice, type NvramRegion } from './types';

export const SECTOR_BYTES = 512;
const PAGE_BYTES = 4096;

export type IoEvent =
  | { kind: 'write'; device: string; pba: number; data: Buffer }
  /** Covers the writes of `device` recorded before event index `coversBefore` (the sync's start). */
  | { kind: 'sync'; device: string; coversBefore: number }
  | { kind: 'discard'; device: string; pba: number; count: number }
  | { kind: 'store'; device: string; page: number; data: Buffer }
  /** Covers the stores of pages [firstPage, endPage) recorded before event index `coversBefore`. */
  | { kind: 'persist'; device: string; firstPage: number; endPage: number; coversBefore: number };

export interface RecorderOptions {
  eventsMax?: number;
  bytesMax?: number;
}

export interface IoCounts {
  writes: number;
  syncs: number;
  discards: number;
  persists: number;
}

export class IoRecorder {
  readonly events: IoEvent[] = [];
  readonly counts: IoCounts = { writes: 0, syncs: 0, discards: 0, persists: 0 };
  private bytes = 0;
  private readonly eventsMax: number;
  private readonly bytesMax: number;
  private readonly nvrams: RecordingNvram[] = [];
  /** When false, I/O passes through and nothing is recorded (counts still kept). */
  recording = true;

  constructor(opts: RecorderOptions = {}) {
    this.eventsMax = opts.eventsMax ?? 1_000_000;
    this.bytesMax = opts.bytesMax ?? 1024 * 1024 * 1024;
  }

  /** @internal */
  attachNvram(n: RecordingNvram): void {
    this.nvrams.push(n);
  }

  /** Records NVRAM page stores made since the last capture. */
  capture(): void {
    for (const n of this.nvrams) n.captureStores();
  }

  /** @internal */
  push(e: IoEvent, bytes: number): void {
    if (!this.recording) return;
    assert(this.events.length < this.eventsMax, `recorder: more than ${this.eventsMax} events`);
    this.bytes += bytes;
    assert(this.bytes <= this.bytesMax, `recorder: more than ${this.bytesMax} bytes recorded`);
    this.events.push(e);
  }

  /** Clears the timeline (e.g. after setup, once the images are taken as the base). */
  reset(): void {
    this.capture();
    this.events.length = 0;
    this.bytes = 0;
  }
}

export class RecordingBlockDevice implements BlockDevice {
  constructor(readonly inner: BlockDevice, readonly recorder: IoRecorder, readonly name: string) {}
  get blockCount(): number {
    return this.inner.blockCount;
  }
  readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    return this.inner.readBlocks(pba, count, dst);
  }
  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    this.recorder.capture();
    await this.inner.writeBlocks(pba, data);
    // Recorded at completion: a write is only ever made durable by a sync issued after it completed.
    this.recorder.counts.writes++;
    this.recorder.push({ kind: 'write', device: this.name, pba, data: Buffer.from(data) }, data.length);
  }
  async sync(): Promise<void> {
    this.recorder.capture();
    // Only writes completed before the sync started are covered by it.
    const e: IoEvent = { kind: 'sync', device: this.name, coversBefore: this.recorder.events.length };
    await this.inner.sync();
    this.recorder.counts.syncs++;
    this.recorder.push(e, 0);
  }
  async discard(pba: number, count: number): Promise<void> {
    this.recorder.capture();
    await this.inner.discard(pba, count);
    this.recorder.counts.discards++;
    this.recorder.push({ kind: 'discard', device: this.name, pba, count }, 0);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export class RecordingNvram implements NvramRegion {
  private readonly shadow: Buffer;
  constructor(readonly inner: NvramRegion, readonly recorder: IoRecorder, readonly name: string) {
    assert(inner.sizeBytes % PAGE_BYTES === 0, 'NVRAM size must be whole pages');
    this.shadow = Buffer.from(inner.buffer);
    recorder.attachNvram(this);
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get buffer(): Buffer {
    return this.inner.buffer;
  }
  /** @internal Diffs the region against the shadow and records changed pages as stores. */
  captureStores(): void {
    const buf = this.inner.buffer;
    if (buf.length === 0) return; // unmapped
    for (let at = 0; at < buf.length; at += PAGE_BYTES) {
      if (buf.compare(this.shadow, at, at + PAGE_BYTES, at, at + PAGE_BYTES) === 0) continue;
      buf.copy(this.shadow, at, at, at + PAGE_BYTES);
      this.recorder.push({ kind: 'store', device: this.name, page: at / PAGE_BYTES, data: Buffer.from(buf.subarray(at, at + PAGE_BYTES)) }, PAGE_BYTES);
    }
  }
  async persist(offset: number, length: number): Promise<void> {
    this.recorder.capture();
    const firstPage = Math.floor(offset / PAGE_BYTES);
    const endPage = Math.ceil((offset + length) / PAGE_BYTES);
    const coversBefore = this.recorder.events.length;
    await this.inner.persist(offset, length);
    this.recorder.counts.persists++;
    this.recorder.push({ kind: 'persist', device: this.name, firstPage, endPage, coversBefore }, 0);
  }
  close(): Promise<void> {
    this.recorder.capture();
    return this.inner.close();
  }
}

// ---- crash-state construction ----

/** A storage image: member blocks (sparse, absent = base) and NVRAM pages per device name. */
export interface StorageImage {
  blocks: Map<string, Map<number, Buffer>>;
  pages: Map<string, Map<number, Buffer>>;
}

export function emptyImage(): StorageImage {
  return { blocks: new Map(), pages: new Map() };
}

function cloneImage(img: StorageImage): StorageImage {
  const out = emptyImage();
  for (const [d, m] of img.blocks) out.blocks.set(d, new Map(m));
  for (const [d, m] of img.pages) out.pages.set(d, new Map(m));
  return out;
}

function setIn(m: Map<string, Map<number, Buffer>>, device: string, key: number, data: Buffer | undefined): void {
  let inner = m.get(device);
  if (!inner) {
    inner = new Map();
    m.set(device, inner);
  }
  if (data === undefined) inner.delete(key);
  else inner.set(key, data);
}

/** One unit of not-yet-durable state at a crash point: a block or page with its candidate versions. */
export interface PendingUnit {
  space: 'blocks' | 'pages';
  device: string;
  key: number;
  /** Durable version (undefined = whatever the base holds / zeroes). */
  durable: Buffer | undefined;
  /** Versions written after the durable one, oldest first (undefined entry = discarded). */
  versions: Array<Buffer | undefined>;
  /** Timeline index of each version's event. */
  eventIndexes: number[];
}

export interface CrashPoint {
  /** Number of timeline events that happened before the crash. */
  eventIndex: number;
  /** What is certainly durable. */
  durable: StorageImage;
  /** What may or may not have reached stable storage. */
  pending: PendingUnit[];
  /** Pending unit of every pending version, in timeline order (for prefix states). */
  order: number[];
}

/**
 * Computes the crash point after the first `eventIndex` events of `events`, over the
 * `base` image (the state when recording started, treated as durable).
 */
export function crashPoint(base: StorageImage, events: readonly IoEvent[], eventIndex: number): CrashPoint {
  assert(eventIndex >= 0 && eventIndex <= events.length, 'crashPoint: index out of range');
  const durable = cloneImage(base);
  const pendingMap = new Map<string, PendingUnit>();
  const keyOf = (space: string, device: string, key: number): string => `${space}\u0000${device}\u0000${key}`;
  const addVersion = (space: 'blocks' | 'pages', device: string, key: number, data: Buffer | undefined, at: number): void => {
    const k = keyOf(space, device, key);
    let u = pendingMap.get(k);
    if (!u) {
      u = { space, device, key, durable: durable[space].get(device)?.get(key), versions: [], eventIndexes: [] };
      pendingMap.set(k, u);
    }
    u.versions.push(data);
    u.eventIndexes.push(at);
  };
  /** Makes the versions recorded before `before` durable (the newest of them wins). */
  const settle = (k: string, u: PendingUnit, before: number): void => {
    let n = 0;
    while (n < u.eventIndexes.length && u.eventIndexes[n]! < before) n++;
    if (n === 0) return;
    const v = u.versions[n - 1];
    setIn(durable[u.space], u.device, u.key, v);
    u.durable = v;
    u.versions.splice(0, n);
    u.eventIndexes.splice(0, n);
    if (u.versions.length === 0) pendingMap.delete(k);
  };
  for (let i = 0; i < eventIndex; i++) {
    const e = events[i]!;
    switch (e.kind) {
      case 'write':
        for (let b = 0; b < e.data.length / BLOCK_SIZE_BYTES; b++) {
          addVersion('blocks', e.device, e.pba + b, e.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES), i);
        }
        break;
      case 'discard':
        // Contents become undefined: model as "may keep the old data or read zeroes" (capped).
        for (let b = 0; b < Math.min(e.count, 4096); b++) addVersion('blocks', e.device, e.pba + b, undefined, i);
        break;
      case 'store':
        addVersion('pages', e.device, e.page, e.data, i);
        break;
      case 'sync':
        for (const [k, u] of [...pendingMap]) if (u.space === 'blocks' && u.device === e.device) settle(k, u, e.coversBefore);
        break;
      case 'persist':
        for (const [k, u] of [...pendingMap]) {
          if (u.space === 'pages' && u.device === e.device && u.key >= e.firstPage && u.key < e.endPage) settle(k, u, e.coversBefore);
        }
        break;
    }
  }
  const pending = [...pendingMap.values()];
  const flat: Array<{ at: number; unit: number }> = [];
  pending.forEach((u, unit) => u.eventIndexes.forEach((at) => flat.push({ at, unit })));
  flat.sort((a, b) => a.at - b.at);
  return { eventIndex, durable, pending, order: flat.map((f) => f.unit) };
}

/** A choice per pending unit: -1 = durable only, v >= 0 = version v, or torn between durable and version v. */
export interface UnitChoice {
  version: number;
  /** If set, only these 512-byte sectors take the chosen version; the rest keep the durable data. */
  tornSectors?: number[];
}

function tear(durable: Buffer | undefined, version: Buffer | undefined, sectors: readonly number[], sizeBytes: number): Buffer {
  const out = Buffer.alloc(sizeBytes);
  if (durable) durable.copy(out);
  const src = version ?? Buffer.alloc(sizeBytes);
  for (const s of sectors) src.copy(out, s * SECTOR_BYTES, s * SECTOR_BYTES, (s + 1) * SECTOR_BYTES);
  return out;
}

/** Builds the image of a crash point with one choice per pending unit. */
export function buildState(cp: CrashPoint, choices: ReadonlyArray<UnitChoice>): StorageImage {
  assert(choices.length === cp.pending.length, 'one choice per pending unit');
  const img = cloneImage(cp.durable);
  cp.pending.forEach((u, i) => {
    const c = choices[i]!;
    if (c.version < 0) return;
    assert(c.version < u.versions.length, 'choice beyond versions');
    const v = u.versions[c.version];
    const size = u.space === 'blocks' ? BLOCK_SIZE_BYTES : PAGE_BYTES;
    const data = c.tornSectors ? tear(u.durable, v, c.tornSectors, size) : v;
    setIn(img[u.space], u.device, u.key, data ?? Buffer.alloc(size));
  });
  return img;
}

/** Choices for "the first n pending writes in timeline order reached storage". */
export function prefixChoices(cp: CrashPoint, n: number): UnitChoice[] {
  const choices: UnitChoice[] = cp.pending.map(() => ({ version: -1 }));
  const seen = new Array<number>(cp.pending.length).fill(0);
  for (let i = 0; i < Math.min(n, cp.order.length); i++) {
    const u = cp.order[i]!;
    choices[u] = { version: seen[u]! };
    seen[u]!++;
  }
  return choices;
}

/** Random choices: each unit independently durable-only, some version, or a torn version. */
export function randomChoices(cp: CrashPoint, rnd: () => number): UnitChoice[] {
  return cp.pending.map((u) => {
    const r = rnd();
    if (r < 0.3) return { version: -1 };
    const version = Math.floor(rnd() * u.versions.length);
    if (r < 0.8) return { version };
    const size = u.space === 'blocks' ? BLOCK_SIZE_BYTES : PAGE_BYTES;
    const sectors: number[] = [];
    for (let s = 0; s < size / SECTOR_BYTES; s++) if (rnd() < 0.5) sectors.push(s);
    return { version, tornSectors: sectors };
  });
}

/** Writes an image's blocks into a BlockDevice-like sink and pages into an NVRAM buffer. */
export function imageBlocks(img: StorageImage, device: string): Map<number, Buffer> {
  return img.blocks.get(device) ?? new Map();
}

export function imagePages(img: StorageImage, device: string): Map<number, Buffer> {
  return img.pages.get(device) ?? new Map();
}
