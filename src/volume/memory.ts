/**
 * MemoryVolume (`serve --memory SIZE`): a sparse volume in memory, like nbdkit's memory
 * plugin. The address space is cut into 64 KiB chunks; a chunk is a hole (absent: reads
 * zeroes, uses no memory), provisioned zeroes (`null`: reads zeroes, uses no memory,
 * reported as allocated zeroes; made by WRITE_ZEROES with NO_HOLE) or data.
 *
 * Data chunks are carved from 1 MiB slabs. A fresh slab comes from the allocator as
 * untouched zero pages (mmap-backed), so taking a chunk costs no zeroing and a 4 KiB
 * write makes only one page resident; a slab whose chunks are all free is dropped, which
 * gives its memory back to the system.
 *
 * Invariants:
 * - Every data chunk is a 64 KiB view owned by the volume; writes copy in, reads copy out.
 * - A chunk handed out for a partial write reads as zeroes outside what is written: a
 *   fresh slab slot is zero; a recycled slot is zeroed before reuse.
 * - For every slab, used + freeSlots.length == SLAB_CHUNKS; a slab is in `partialSlabs`
 *   iff it has both a used and a free slot, and is referenced from nowhere once used == 0.
 * - `groupEntries` counts, per group of 4096 chunks (256 MiB), the chunks present (data or
 *   provisioned) in it; a group with no entry is all hole, which lets blockStatus skip it.
 * - `chunks.size <= chunkCountMax` (the memory cap): a write or NO_HOLE zero that would
 *   exceed it fails with ENOSPC instead of exhausting the process.
 * - trim/zero never leave an all-zero data chunk behind after a partial fill: memory is
 *   freed as soon as a chunk holds nothing but zeroes.
 * - The hot path (read/write) does only synchronous work inside an async function: no
 *   timers, no extra event-loop turns, no allocation on a read into `dst`.
 * - Once directWriteStore() made the native store, every data chunk in `chunks` is
 *   registered in it and nothing else: a chunk is registered when it enters `chunks` and
 *   unregistered before its memory is freed or reused (the native data path copies plain
 *   writes into registered chunks, under the store's lock).
 * - Spares: with the native store, up to SPARE_CHUNKS zeroed chunks are handed to it, so a
 *   plain WRITE of up to a chunk into a hole is answered by the NBD thread too (it registers a spare there,
 *   under the store's lock, and records it). Every public method first adopts what the
 *   threads took (`sync()`: the spare enters `chunks`), so nothing acknowledged is ever
 *   missed; a chunk of our own enters the store only where nothing is (nbdMemStoreAdd), so
 *   a spare the thread placed meanwhile is adopted, not overwritten. Spares are held memory:
 *   they count against the cap (chunks.size + spares.size <= chunkCountMax, handed out only
 *   while at least 2 * SPARE_CHUNKS of room is left, taken back when a write needs the room)
 *   but not in allocatedBytes.
 */
import * as os from 'os';
import { addon } from '../io/native';
import { assert } from '../util/assert';
import { formatSize } from '../util/size';
import { VolumeError } from '../util/errors';
import { EXTENT_HOLE, EXTENT_ZERO, Extent, Volume, VolumeCapabilities, ZeroOptions } from './types';

export const MEMORY_CHUNK_BYTES = 64 * 1024;
const SLAB_BYTES = 1024 * 1024;
const SLAB_CHUNKS = SLAB_BYTES / MEMORY_CHUNK_BYTES;
const GROUP_CHUNKS = 4096;
const GROUP_BYTES = GROUP_CHUNKS * MEMORY_CHUNK_BYTES;
/** Largest volume: 4 PiB (sparse, so only written data costs memory). */
export const MEMORY_VOLUME_SIZE_MAX_BYTES = 4 * 1024 ** 5;
/** blockStatus stops after visiting this many chunks or groups in one call (bounded work). */
const BLOCK_STATUS_VISITS_MAX = 65536;
export const MEMORY_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/**
 * Zeroed chunks the NBD threads may take for WRITEs of up to a chunk into holes (4 MiB). Without them the
 * first write to each 64 KiB chunk went through TypeScript (a hand-off to the event loop
 * and back, ~25-30 us of wake-ups here): on a fresh 1 GiB volume that was a third of a
 * 5 s QD1 random-write run. Refilled when half are gone.
 */
export const SPARE_CHUNKS = 64;

assert(Number.isInteger(SLAB_CHUNKS) && SLAB_CHUNKS >= 1, 'a slab holds whole chunks');
assert(MEMORY_VOLUME_SIZE_MAX_BYTES + GROUP_BYTES <= Number.MAX_SAFE_INTEGER, 'offsets stay exact');

const ZERO_CHUNK = Buffer.alloc(MEMORY_CHUNK_BYTES);

export interface MemoryVolumeOptions {
  readOnly?: boolean;
  /**
   * Cap on memory held by data (and provisioned) chunks; beyond it writes fail with ENOSPC.
   * Default: the smaller of the volume size and half of the machine's RAM.
   */
  maxAllocatedBytes?: number;
}

class Slab {
  readonly memory = Buffer.alloc(SLAB_BYTES);
  /** Free slot numbers (a stack); all free at first. */
  readonly freeSlots: number[] = Array.from({ length: SLAB_CHUNKS }, (_, i) => SLAB_CHUNKS - 1 - i);
  /** 1 when a slot held data before (so it is not known to be zero). */
  readonly recycled = new Uint8Array(SLAB_CHUNKS);
  used = 0;
}

interface DataChunk {
  readonly bytes: Buffer;
  readonly slab: Slab;
  readonly slot: number;
}

/** The addon's MemStore calls (native/nbd_serve.cc). */
interface NativeStoreCalls {
  nbdMemStoreNew(sizeBytes: number, chunkBytes: number): object;
  nbdMemStoreSet(store: object, index: number, chunk: Buffer): void;
  /** Registers chunk at index only if nothing is registered there; false: a spare is. */
  nbdMemStoreAdd(store: object, index: number, chunk: Buffer): boolean;
  /** Zeroed chunks with ids firstId, firstId + 1, ... (mod 2^32). */
  nbdMemStoreAddSpares(store: object, firstId: number, chunks: Buffer[]): void;
  /** [n, index0, id0, ..., withdrawn ids...]: spares taken since the last call (and, with withdraw, every spare left). */
  nbdMemStoreSync(store: object, withdraw: boolean): Float64Array;
  /** Unregisters index if chunk is what is registered there. */
  nbdMemStoreDelete(store: object, index: number, chunk: Buffer): void;
  /** Zeroes [from, to) of a registered chunk; true when the chunk is all zero and was unregistered. */
  nbdMemStoreZeroIn(store: object, index: number, from: number, to: number): boolean;
  nbdMemStoreClose(store: object): void;
}

/** undefined (absent) = hole, null = provisioned zeroes. */
type Chunk = DataChunk | null;

export class MemoryVolume implements Volume {
  readonly sizeBytes: number;
  readonly caps: VolumeCapabilities;
  readonly description: string;
  private readonly chunks = new Map<number, Chunk>();
  private readonly groupEntries = new Map<number, number>();
  private readonly partialSlabs = new Set<Slab>();
  private readonly chunkCountMax: number;
  private dataChunkCount = 0;
  private slabCount = 0;
  private closed = false;
  /** The native store of data chunks (see directWriteStore), made on first use. */
  private store: object | undefined;
  /** Zeroed chunks handed to the store, by id (see the invariants). */
  private readonly spares = new Map<number, DataChunk>();
  private nextSpareId = 0;

  private constructor(sizeBytes: number, readOnly: boolean, maxAllocatedBytes: number) {
    this.sizeBytes = sizeBytes;
    this.chunkCountMax = Math.floor(maxAllocatedBytes / MEMORY_CHUNK_BYTES);
    this.description = `memory ${formatSize(sizeBytes)}`;
    this.caps = {
      readOnly,
      canFlush: true,
      canFua: true,
      canTrim: !readOnly,
      canZero: !readOnly,
      canFastZero: !readOnly,
      canCache: true,
      canMultiConn: true,
      rotational: false,
      minBlockSizeBytes: 1,
      preferredBlockSizeBytes: 4096,
      maxPayloadBytes: MEMORY_MAX_PAYLOAD_BYTES,
    };
  }

  /** A new, all-zero volume of sizeBytes (0..4 PiB). Throws VolumeError('EINVAL') on a bad size. */
  static create(sizeBytes: number, opts: MemoryVolumeOptions = {}): MemoryVolume {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0 || sizeBytes > MEMORY_VOLUME_SIZE_MAX_BYTES) {
      throw new VolumeError('EINVAL', `memory volume size must be 0..${formatSize(MEMORY_VOLUME_SIZE_MAX_BYTES)}, got ${sizeBytes}`);
    }
    const defaultMax = Math.min(sizeBytes, Math.floor(os.totalmem() / 2));
    const maxAllocatedBytes = opts.maxAllocatedBytes ?? defaultMax;
    if (!Number.isSafeInteger(maxAllocatedBytes) || maxAllocatedBytes < 0) {
      throw new VolumeError('EINVAL', `maxAllocatedBytes must be an integer >= 0, got ${maxAllocatedBytes}`);
    }
    return new MemoryVolume(sizeBytes, opts.readOnly ?? false, maxAllocatedBytes);
  }

  /** Bytes held by data chunks. */
  get allocatedBytes(): number {
    this.sync(false);
    return (this.dataChunkCount - this.spares.size) * MEMORY_CHUNK_BYTES;
  }

  /** Spare chunks the native store holds now. */
  get spareChunks(): number {
    return this.spares.size;
  }

  /** Bytes of slabs held (what the process reserves; resident pages may be fewer). */
  get slabBytes(): number {
    return this.slabCount * SLAB_BYTES;
  }

  private checkRange(offset: number, length: number): void {
    assert(!this.closed, 'memory volume is closed');
    assert(Number.isSafeInteger(offset) && offset >= 0, `bad offset ${offset}`);
    assert(Number.isSafeInteger(length) && length > 0, `bad length ${length}`);
    assert(offset + length <= this.sizeBytes, `[${offset}, ${offset + length}) beyond volume of ${this.sizeBytes}`);
  }

  /** Takes a chunk of memory; zeroed unless the caller overwrites all of it. */
  private allocChunk(wholeWrite: boolean): DataChunk {
    let slab: Slab | undefined;
    for (const s of this.partialSlabs) {
      slab = s;
      break;
    }
    if (slab === undefined) {
      slab = new Slab();
      this.slabCount++;
      this.partialSlabs.add(slab);
    }
    const slot = slab.freeSlots.pop();
    assert(slot !== undefined, 'a partial slab has a free slot');
    slab.used++;
    if (slab.freeSlots.length === 0) this.partialSlabs.delete(slab);
    const start = slot * MEMORY_CHUNK_BYTES;
    const bytes = slab.memory.subarray(start, start + MEMORY_CHUNK_BYTES);
    if (slab.recycled[slot] === 1 && !wholeWrite) bytes.fill(0);
    slab.recycled[slot] = 1;
    this.dataChunkCount++;
    return { bytes, slab, slot };
  }

  private freeChunk(chunk: DataChunk): void {
    const slab = chunk.slab;
    assert(slab.used >= 1 && !slab.freeSlots.includes(chunk.slot), 'freeing a chunk twice');
    slab.freeSlots.push(chunk.slot);
    slab.used--;
    this.dataChunkCount--;
    if (slab.used === 0) {
      this.partialSlabs.delete(slab);  // nothing references it now: the GC returns its memory
      this.slabCount--;
    } else {
      this.partialSlabs.add(slab);
    }
  }

  /** Fails with ENOSPC if index is absent and the cap is reached; else accounts a new entry. */
  private reserveEntry(index: number): void {
    if (this.chunks.has(index)) return;
    if (this.chunks.size + this.spares.size >= this.chunkCountMax && this.spares.size > 0) this.sync(true);
    if (this.chunks.has(index)) return; // a spare went there
    if (this.chunks.size + this.spares.size >= this.chunkCountMax) {
      throw new VolumeError('ENOSPC', `memory volume is full: ${formatSize(this.chunkCountMax * MEMORY_CHUNK_BYTES)} allocated`);
    }
    this.countEntry(index, 1);
  }

  private countEntry(index: number, delta: 1 | -1): void {
    const g = Math.floor(index / GROUP_CHUNKS);
    const n = (this.groupEntries.get(g) ?? 0) + delta;
    assert(n >= 0, 'group entry count underflow');
    if (n === 0) this.groupEntries.delete(g);
    else this.groupEntries.set(g, n);
  }

  /**
   * Adopts the spares the NBD threads took (each becomes index's data chunk) and, with
   * withdraw, takes every spare left back (freed); otherwise hands out new ones while there
   * is room. Cheap when there is nothing to do: one native call.
   */
  private sync(withdraw: boolean): void {
    const store = this.store;
    if (store === undefined) return;
    const raw = addon() as unknown as NativeStoreCalls;
    const a = raw.nbdMemStoreSync(store, withdraw);
    const n = a[0]!;
    for (let k = 0; k < n; k++) {
      const index = a[1 + 2 * k]!;
      const id = a[2 + 2 * k]!;
      const chunk = this.spares.get(id);
      assert(chunk !== undefined, `the store took spare ${id}, which it was not given`);
      this.spares.delete(id);
      const prev = this.chunks.get(index);
      assert(!prev, `the store put a spare at chunk ${index}, which holds data`);
      if (prev === undefined) this.countEntry(index, 1);
      this.chunks.set(index, chunk);
    }
    for (let k = 1 + 2 * n; k < a.length; k++) {
      const id = a[k]!;
      const chunk = this.spares.get(id);
      assert(chunk !== undefined, `the store gave back spare ${id}, which it was not given`);
      this.spares.delete(id);
      this.freeChunk(chunk);
    }
    if (withdraw) {
      assert(this.spares.size === 0, 'every spare is back');
      return;
    }
    if (this.spares.size > SPARE_CHUNKS / 2 || this.closed || this.caps.readOnly) return;
    const room = this.chunkCountMax - this.chunks.size - this.spares.size;
    if (room < 2 * SPARE_CHUNKS) return;
    const firstId = this.nextSpareId;
    const bufs: Buffer[] = [];
    while (this.spares.size < SPARE_CHUNKS) {
      const chunk = this.allocChunk(false);
      this.spares.set(this.nextSpareId, chunk);
      this.nextSpareId = (this.nextSpareId + 1) % 0x100000000;
      bufs.push(chunk.bytes);
    }
    raw.nbdMemStoreAddSpares(store, firstId, bufs);
  }

  /** Makes index's entry provisioned zeroes (after reserveEntry), freeing old data memory. */
  private setZeroEntry(index: number): void {
    const prev = this.chunks.get(index);
    if (prev) {
      this.storeDelete(index, prev); // before prev's memory can be reused
      this.freeChunk(prev);
    }
    this.chunks.set(index, null);
  }

  /** A new data chunk at index, which holds none (a hole or provisioned zeroes); ENOSPC at the cap. */
  private newDataChunk(index: number, wholeWrite: boolean): DataChunk {
    const had = this.chunks.has(index);
    this.reserveEntry(index);
    const found = this.chunks.get(index);
    if (found) return found; // reserveEntry took the spares back, and a thread had put one here
    const chunk = this.allocChunk(wholeWrite);
    if (this.store !== undefined && !(addon() as unknown as NativeStoreCalls).nbdMemStoreAdd(this.store, index, chunk.bytes)) {
      // A thread put a spare here since the last sync: that one holds its write.
      this.freeChunk(chunk);
      if (!had) this.countEntry(index, -1);
      this.sync(false);
      const adopted = this.chunks.get(index);
      assert(adopted, `chunk ${index}: the store holds a chunk the volume did not adopt`);
      return adopted;
    }
    this.chunks.set(index, chunk);
    return chunk;
  }

  /**
   * Unregisters index's data chunk `c` from the native store, if c is what is registered
   * there: after a nbdMemStoreZeroIn that unregistered it, a thread may have put a spare at
   * index, which stays (the next sync adopts it).
   */
  private storeDelete(index: number, c: DataChunk): void {
    if (this.store === undefined) return;
    (addon() as unknown as NativeStoreCalls).nbdMemStoreDelete(this.store, index, c.bytes);
  }

  directWriteStore(): object | undefined {
    if (this.caps.readOnly || this.closed) return undefined;
    if (this.store === undefined) {
      const raw = addon() as unknown as NativeStoreCalls;
      const store = raw.nbdMemStoreNew(this.sizeBytes, MEMORY_CHUNK_BYTES);
      for (const [index, c] of this.chunks) if (c) raw.nbdMemStoreSet(store, index, c.bytes);
      this.store = store;
      this.sync(false);
    }
    return this.store;
  }

  /** The NBD threads answered WRITEs (once per batch): adopt the spares they took, hand out more. */
  directWritesDone(): void {
    if (!this.closed) this.sync(false);
  }

  private deleteEntry(index: number): void {
    const prev = this.chunks.get(index);
    if (prev === undefined) return;
    if (prev !== null) {
      this.storeDelete(index, prev);
      this.freeChunk(prev);
    }
    this.chunks.delete(index);
    this.countEntry(index, -1);
  }

  async read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    this.checkRange(offset, length);
    assert(length <= MEMORY_MAX_PAYLOAD_BYTES, `read of ${length} bytes exceeds the payload limit`);
    assert(dst === undefined || dst.length === length, 'read: dst length differs from length');
    this.sync(false);
    const out = dst ?? Buffer.allocUnsafe(length);
    let pos = offset;
    let at = 0;
    while (at < length) {
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const inChunk = pos - index * MEMORY_CHUNK_BYTES;
      const n = Math.min(MEMORY_CHUNK_BYTES - inChunk, length - at);
      const chunk = this.chunks.get(index);
      if (chunk) chunk.bytes.copy(out, at, inChunk, inChunk + n);
      else out.fill(0, at, at + n);
      pos += n;
      at += n;
    }
    return out;
  }

  async write(offset: number, data: Buffer, _fua: boolean): Promise<void> {
    assert(!this.caps.readOnly, 'write to a read-only volume');
    const length = data.length;
    this.checkRange(offset, length);
    assert(length <= MEMORY_MAX_PAYLOAD_BYTES, `write of ${length} bytes exceeds the payload limit`);
    this.sync(false);
    let pos = offset;
    let at = 0;
    while (at < length) {
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const inChunk = pos - index * MEMORY_CHUNK_BYTES;
      const n = Math.min(MEMORY_CHUNK_BYTES - inChunk, length - at);
      const chunk = this.chunks.get(index) || this.newDataChunk(index, n === MEMORY_CHUNK_BYTES);
      data.copy(chunk.bytes, inChunk, at, at + n);
      pos += n;
      at += n;
    }
  }

  async flush(): Promise<void> {
    assert(!this.closed, 'memory volume is closed');
  }

  /** Makes [offset, offset+length) read as zeroes; provision=true keeps it allocated (NO_HOLE). */
  private zeroRange(offset: number, length: number, provision: boolean): void {
    const end = offset + length;
    const first = Math.floor(offset / MEMORY_CHUNK_BYTES);
    const last = Math.floor((end - 1) / MEMORY_CHUNK_BYTES);
    if (!provision && last - first + 1 > this.chunks.size) {
      // A large trim of a sparse volume: visit what is stored, not the whole range.
      for (const index of [...this.chunks.keys()]) {
        if (index >= first && index <= last) this.zeroInChunk(index, offset, end, false);
      }
      return;
    }
    // With provision, the loop is bounded by the cap: reserveEntry throws ENOSPC past it.
    for (let index = first; index <= last; index++) this.zeroInChunk(index, offset, end, provision);
  }

  private zeroInChunk(index: number, offset: number, end: number, provision: boolean): void {
    const chunkStart = index * MEMORY_CHUNK_BYTES;
    const from = Math.max(offset, chunkStart) - chunkStart;
    const to = Math.min(end, chunkStart + MEMORY_CHUNK_BYTES) - chunkStart;
    const chunk = this.chunks.get(index);
    const whole = from === 0 && to === MEMORY_CHUNK_BYTES;
    if (chunk === undefined || chunk === null || whole) {
      if (provision) {
        this.reserveEntry(index);
        this.setZeroEntry(index);
      } else if (chunk !== null || whole) {
        this.deleteEntry(index);
      }
      return;
    }
    // With the native store, zero-then-check happens under its lock (a concurrent copy by
    // the native data path must not land between the check and the chunk's removal).
    const allZero =
      this.store !== undefined
        ? (addon() as unknown as NativeStoreCalls).nbdMemStoreZeroIn(this.store, index, from, to)
        : (chunk.bytes.fill(0, from, to), chunk.bytes.equals(ZERO_CHUNK));
    if (allZero) {
      if (provision) this.setZeroEntry(index);
      else this.deleteEntry(index);
    }
  }

  async trim(offset: number, length: number, _fua: boolean): Promise<void> {
    assert(!this.caps.readOnly, 'trim on a read-only volume');
    this.checkRange(offset, length);
    this.sync(false);
    this.zeroRange(offset, length, false);
  }

  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    assert(!this.caps.readOnly, 'zero on a read-only volume');
    this.checkRange(offset, length);
    this.sync(false);
    this.zeroRange(offset, length, opts.noHole);  // always fast: fastZero needs no check
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
  }

  async blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    assert(Number.isSafeInteger(maxExtents) && maxExtents >= 1, `bad maxExtents ${maxExtents}`);
    this.sync(false);
    const end = offset + length;
    const extents: Extent[] = [];
    let pos = offset;
    for (let visits = 0; pos < end && visits < BLOCK_STATUS_VISITS_MAX; visits++) {
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const group = Math.floor(index / GROUP_CHUNKS);
      let flags: number;
      let next: number;
      if (!this.groupEntries.has(group)) {
        flags = EXTENT_HOLE | EXTENT_ZERO;
        next = (group + 1) * GROUP_BYTES;
      } else {
        const chunk = this.chunks.get(index);
        flags = chunk === undefined ? EXTENT_HOLE | EXTENT_ZERO : chunk === null ? EXTENT_ZERO : 0;
        next = (index + 1) * MEMORY_CHUNK_BYTES;
      }
      const stop = Math.min(next, end);
      const lastExtent = extents[extents.length - 1];
      if (lastExtent !== undefined && lastExtent.flags === flags) {
        lastExtent.lengthBytes += stop - pos;
      } else {
        if (extents.length === maxExtents) break;
        extents.push({ lengthBytes: stop - pos, flags });
      }
      pos = stop;
    }
    assert(extents.length >= 1 && pos > offset, 'blockStatus made no progress');
    return extents;
  }

  async close(): Promise<void> {
    if (this.store !== undefined) (addon() as unknown as NativeStoreCalls).nbdMemStoreClose(this.store);
    this.store = undefined;
    this.closed = true;
    this.chunks.clear();
    this.spares.clear();
    this.groupEntries.clear();
    this.partialSlabs.clear();
    this.dataChunkCount = 0;
    this.slabCount = 0;
  }
}
