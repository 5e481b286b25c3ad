/**
 * Fault-injecting I/O for the seeded simulator (test/sim): FaultyBlockDevice and
 * FaultyNvramRegion wrap a real device/region and, driven by a FaultInjector, fail
 * reads, writes, syncs, discards and persists with EIO, delay calls on an injected
 * Clock, and flip a bit in a block that was read (silent corruption). The recording
 * layer (recording.ts) is the complement: it enumerates power-loss states; this one
 * exercises the engine's error paths.
 *
 * Invariants:
 * - Every decision is a pure function of (seed, fault kind, device, address, how many
 *   times that (kind, device, address) was decided before): a seed replays the same
 *   faults even if unrelated I/O is reordered. Only the occurrence table is state, and
 *   it is capped (OCCURRENCES_MAX entries; past that it restarts, documented loss of
 *   order-independence, never of boundedness).
 * - With the injector disabled (or all rates 0) the wrappers change nothing: the same
 *   calls reach the inner object, with no simulated delay and no failure.
 * - An injected failure throws an InjectedIoError (code 'EIO', like a Node errno
 *   error). A failed write may have written a prefix of its blocks (torn), as a real
 *   device may; a failed read, sync, discard or persist changes nothing underneath.
 * - Corruption only alters the caller's buffer, never the stored blocks.
 * - After crash() a wrapper never touches its inner object again and every call from
 *   then on stays pending forever: the process that issued it is dead.
 * - After lose() a block device wrapper fails every read, write, sync and discard with an
 *   injected EIO (counted) and never touches its inner device again: a pulled disk.
 * - A wrapper injects only the kinds its options allow (all by default).
 * - The injector remembers the last RECENT_MAX faults (for failure reports) and counts
 *   every kind.
 */
import { hash32, hashString, unitFrom } from './random';
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES, type BlockDevice, type Clock, type NvramRegion } from '../io/types';

export type FaultKind = 'read' | 'write' | 'sync' | 'discard' | 'corrupt' | 'persist' | 'latency';
export const FAULT_KINDS: readonly FaultKind[] = ['read', 'write', 'sync', 'discard', 'corrupt', 'persist', 'latency'];

/** Probability of each fault per call (0 = never). Latency delays are uniform in [1, latencyMsMax]. */
export interface FaultRates {
  readError: number;
  writeError: number;
  syncError: number;
  discardError: number;
  corruptRead: number;
  persistError: number;
  latency: number;
  latencyMsMax: number;
}

export const NO_FAULTS: Readonly<FaultRates> = Object.freeze({
  readError: 0, writeError: 0, syncError: 0, discardError: 0, corruptRead: 0, persistError: 0, latency: 0, latencyMsMax: 0,
});

export interface InjectedFault {
  kind: FaultKind;
  device: string;
  /** pba for block devices, byte offset for regions. */
  at: number;
  count: number;
  /** Extra detail: delay, torn-write prefix, flipped bit. */
  detail: string;
}

const OCCURRENCES_MAX = 1 << 20;
const RECENT_MAX = 64;
const KIND_CODE: Record<FaultKind, number> = { read: 1, write: 2, sync: 3, discard: 4, corrupt: 5, persist: 6, latency: 7 };

function validateRates(r: FaultRates): void {
  for (const [k, v] of Object.entries(r)) {
    if (k === 'latencyMsMax') assert(Number.isSafeInteger(v) && v >= 0, `bad latencyMsMax ${v}`);
    else assert(typeof v === 'number' && v >= 0 && v <= 1, `fault rate ${k} must be in [0, 1], got ${v}`);
  }
}

export class FaultInjector {
  /** When false no fault of any kind is injected. */
  enabled = true;
  private ratesValue: FaultRates;
  private readonly occurrences = new Map<string, number>();
  readonly counts: Record<FaultKind, number> = { read: 0, write: 0, sync: 0, discard: 0, corrupt: 0, persist: 0, latency: 0 };
  readonly recent: InjectedFault[] = [];
  /** Every call any wrapper saw, faulty or not (a simulator's activity probe). */
  calls = 0;

  constructor(readonly seed: number, rates: FaultRates = NO_FAULTS) {
    assert(Number.isSafeInteger(seed) && seed >= 0, `bad fault seed ${seed}`);
    validateRates(rates);
    this.ratesValue = { ...rates };
  }

  get rates(): Readonly<FaultRates> {
    return this.ratesValue;
  }

  set rates(r: FaultRates) {
    validateRates(r);
    this.ratesValue = { ...r };
  }

  /** Faults that can fail or corrupt (everything but latency). */
  get errorsInjected(): number {
    let n = 0;
    for (const k of FAULT_KINDS) if (k !== 'latency') n += this.counts[k];
    return n;
  }

  /** A uniform draw for the nth decision of (kind, device, key). */
  private draw(kind: FaultKind, device: string, key: number): number {
    const id = `${kind}/${device}/${key}`;
    const n = this.occurrences.get(id) ?? 0;
    if (this.occurrences.size >= OCCURRENCES_MAX && n === 0) this.occurrences.clear();
    this.occurrences.set(id, n + 1);
    return hash32(this.seed, KIND_CODE[kind], hashString(device), key, n);
  }

  private probability(kind: FaultKind): number {
    const r = this.ratesValue;
    switch (kind) {
      case 'read': return r.readError;
      case 'write': return r.writeError;
      case 'sync': return r.syncError;
      case 'discard': return r.discardError;
      case 'corrupt': return r.corruptRead;
      case 'persist': return r.persistError;
      case 'latency': return r.latency;
    }
  }

  /**
   * Decides whether to inject `kind` at (device, key). Returns undefined for no, or a
   * 32-bit value the caller may use to shape the fault (which bit, how long, ...).
   */
  decide(kind: FaultKind, device: string, key: number, count: number): number | undefined {
    if (!this.enabled) return undefined;
    const p = this.probability(kind);
    if (p <= 0) return undefined;
    const h = this.draw(kind, device, key);
    if (unitFrom(h) >= p) return undefined;
    return hash32(h, 0xfa);
  }

  /** Records an injected fault (counts and the recent list). */
  note(f: InjectedFault): void {
    this.counts[f.kind]++;
    this.recent.push(f);
    if (this.recent.length > RECENT_MAX) this.recent.shift();
  }

  /** Simulated delay in ms for a call, 0 for none. */
  latencyMs(device: string, key: number, count: number): number {
    this.calls++;
    const max = this.ratesValue.latencyMsMax;
    if (max <= 0) return 0;
    const h = this.decide('latency', device, key, count);
    if (h === undefined) return 0;
    const ms = 1 + (h % max);
    this.note({ kind: 'latency', device, at: key, count, detail: `${ms} ms` });
    return ms;
  }
}

/** The error an injected fault throws (shaped like a Node errno error). */
export class InjectedIoError extends Error {
  override name = 'InjectedIoError';
  readonly code = 'EIO';
  readonly injected = true;
}

export interface FaultyOptions {
  injector: FaultInjector;
  /** Drives latency; the simulator's clock. */
  clock: Clock;
  /** Names the device in decisions and reports; distinct wrappers over one store should share it. */
  name: string;
  /** The fault kinds this wrapper may inject (default: every kind). A RAID simulation gives most members only 'corrupt' and 'latency'. */
  kinds?: readonly FaultKind[];
}

function never<T>(): Promise<T> {
  return new Promise<T>(() => undefined);
}

export class FaultyBlockDevice implements BlockDevice {
  private readonly injector: FaultInjector;
  private readonly clock: Clock;
  readonly name: string;
  private readonly kinds: ReadonlySet<FaultKind>;
  private crashed = false;
  private lost = false;

  constructor(readonly inner: BlockDevice, opts: FaultyOptions) {
    this.injector = opts.injector;
    this.clock = opts.clock;
    this.name = opts.name;
    this.kinds = new Set(opts.kinds ?? FAULT_KINDS);
  }

  /** The device is gone (a pulled disk): every later call fails with an injected EIO, nothing more reaches the inner device. */
  lose(): void {
    this.lost = true;
  }

  private decide(kind: FaultKind, pba: number, count: number): number | undefined {
    if (this.lost && kind !== 'corrupt' && kind !== 'latency') return 0;
    if (!this.kinds.has(kind)) return undefined;
    return this.injector.decide(kind, this.name, pba, count);
  }

  get blockCount(): number {
    return this.inner.blockCount;
  }

  /** The process is gone: nothing more reaches the inner device, every call hangs. */
  crash(): void {
    this.crashed = true;
  }

  get isCrashed(): boolean {
    return this.crashed;
  }

  private async delay(pba: number, count: number): Promise<boolean> {
    const ms = this.kinds.has('latency') ? this.injector.latencyMs(this.name, pba, count) : 0;
    if (ms > 0) await new Promise<void>((resolve) => this.clock.setTimeout(resolve, ms));
    return !this.crashed;
  }

  private fail(kind: FaultKind, pba: number, count: number, detail = ''): InjectedIoError {
    this.injector.note({ kind, device: this.name, at: pba, count, detail });
    return new InjectedIoError(`injected EIO: ${kind} of blocks [${pba}, ${pba + count}) on ${this.name}${detail ? ` (${detail})` : ''}`);
  }

  async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    if (this.crashed || !(await this.delay(pba, count))) return never();
    if (this.decide('read', pba, count) !== undefined) throw this.fail('read', pba, count);
    await this.inner.readBlocks(pba, count, dst);
    if (this.crashed) return never();
    const h = this.decide('corrupt', pba, count);
    if (h !== undefined) {
      const bit = h % (count * BLOCK_SIZE_BYTES * 8);
      const byte = bit >>> 3;
      dst[byte] = dst[byte]! ^ (1 << (bit & 7));
      this.injector.note({ kind: 'corrupt', device: this.name, at: pba, count, detail: `flipped bit ${bit & 7} of byte ${byte}` });
    }
  }

  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    const count = data.length / BLOCK_SIZE_BYTES;
    if (this.crashed || !(await this.delay(pba, count))) return never();
    const h = this.decide('write', pba, count);
    if (h !== undefined) {
      const torn = this.lost ? 0 : h % (count + 1); // blocks that made it before the error
      if (torn > 0) await this.inner.writeBlocks(pba, data.subarray(0, torn * BLOCK_SIZE_BYTES));
      throw this.fail('write', pba, count, `${torn} of ${count} blocks written`);
    }
    await this.inner.writeBlocks(pba, data);
    if (this.crashed) return never();
  }

  async sync(): Promise<void> {
    if (this.crashed || !(await this.delay(0, 0))) return never();
    if (this.decide('sync', 0, 0) !== undefined) throw this.fail('sync', 0, 0);
    await this.inner.sync();
    if (this.crashed) return never();
  }

  async discard(pba: number, count: number): Promise<void> {
    if (this.crashed || !(await this.delay(pba, count))) return never();
    if (this.decide('discard', pba, count) !== undefined) throw this.fail('discard', pba, count);
    await this.inner.discard(pba, count);
    if (this.crashed) return never();
  }

  close(): Promise<void> {
    if (this.crashed) return Promise.resolve();
    return this.inner.close();
  }
}

export class FaultyNvramRegion implements NvramRegion {
  private readonly injector: FaultInjector;
  private readonly clock: Clock;
  readonly name: string;
  private crashed = false;

  constructor(readonly inner: NvramRegion, opts: FaultyOptions) {
    this.injector = opts.injector;
    this.clock = opts.clock;
    this.name = opts.name;
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }

  get buffer(): Buffer {
    return this.inner.buffer;
  }

  crash(): void {
    this.crashed = true;
  }

  async persist(offset: number, length: number): Promise<void> {
    if (this.crashed) return never();
    const ms = this.injector.latencyMs(this.name, offset, length);
    if (ms > 0) await new Promise<void>((resolve) => this.clock.setTimeout(resolve, ms));
    if (this.crashed) return never();
    if (this.injector.decide('persist', this.name, offset, length) !== undefined) {
      this.injector.note({ kind: 'persist', device: this.name, at: offset, count: length, detail: '' });
      throw new InjectedIoError(`injected EIO: persist of [${offset}, ${offset + length}) on ${this.name}`);
    }
    await this.inner.persist(offset, length);
    if (this.crashed) return never();
  }

  close(): Promise<void> {
    if (this.crashed) return Promise.resolve();
    return this.inner.close();
  }
}
