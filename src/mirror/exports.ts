/**
 * The destination's read-only NBD exports: each mirror as `<source-uuid>` and its
 * snapshots as `<source-uuid>@SNAP`, always from a committed CP.
 *
 * Invariants:
 * - A connection stays on the root it connected to (its MirrorView holds that CP's tree
 *   view) while newer CPs land: a filesystem mounted read-only never sees blocks change.
 * - The oldest CP any live view uses is reported to the source (onPinChange), which
 *   keeps that CP's blocks from being reused; a view held longer than pinHoldMsMax is
 *   expired (its reads fail with ESHUTDOWN, a log line says so) so a forgotten client
 *   cannot hold space on the source forever.
 * - A view whose old CP a newer CP is about to overwrite (its source did not hold it) is
 *   expired the same way before the write starts (pin-guard.ts), never read as EIO.
 * - A mirror with a partial baseline is not exported (lookup finds nothing; whyMissing
 *   tells the client why).
 * - Memory: one view object per NBD connection (the NBD server caps connections).
 */
import type { Logger } from 'pino';
import type { ExportInfo, ExportRegistry } from '../volume/exports';
import type { BlockTree } from '../tree/tree';
import type { TreeReader } from '../tree/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { readTreeRange } from '../volume/engine';
import { SNAPSHOT_SEPARATOR } from '../volume/engine-snapshot';
import { clipExtents } from '../volume/extents';
import { VolumeError } from '../util/errors';
import type { Extent, Volume, VolumeCapabilities, ZeroOptions } from '../volume/types';
import { assert } from '../util/assert';
import type { MirrorDir } from './mirror-dir';
import type { PinnedReaders } from './pin-guard';

const BS = BLOCK_SIZE_BYTES;
export const PIN_HOLD_MS_MAX_DEFAULT = 10 * 60_000;
const PIN_CHECK_INTERVAL_MS = 1000;

/** Not multi-conn: each connection is pinned to the CP it connected at, so two connections of one client could see two CPs. */
const CAPS: VolumeCapabilities = {
  readOnly: true, canFlush: true, canFua: false, canTrim: false, canZero: false, canFastZero: false, canCache: true,
  canMultiConn: false, rotational: false, minBlockSizeBytes: 1, preferredBlockSizeBytes: BS, maxPayloadBytes: 32 * 1024 * 1024,
};

/** A read-only volume pinned to one committed CP of a mirror (one per NBD connection). */
export class MirrorView implements Volume {
  readonly sizeBytes: number;
  readonly caps = CAPS;
  readonly description: string;
  sinceMs = Date.now();
  expired = false;
  private expiredWhy = '';
  private pinned = false;
  private revoke: (() => void) | undefined;

  constructor(
    private readonly owner: MirrorExports,
    readonly sourceUuid: string,
    readonly cp: number,
    /** The superblock of that CP (the pin guard reads its space map). */
    readonly superblock: Buffer,
    private readonly reader: TreeReader,
    sizeBytes: number,
    what: string,
  ) {
    this.sizeBytes = sizeBytes;
    this.description = `read-only mirror of ${sourceUuid}, ${what} at CP ${cp}`;
  }

  /**
   * Pins the view's CP (reported to the source) once it serves a connection: the
   * handshake also looks exports up (INFO, LIST), and those lookups must not pin.
   */
  private pin(): void {
    if (this.pinned || this.expired) return;
    this.pinned = true;
    this.sinceMs = Date.now();
    this.owner.pin(this);
  }

  private check(): void {
    this.pin();
    if (this.expired) throw new VolumeError('ESHUTDOWN', `${this.expiredWhy}; reconnect for the newest CP`);
  }

  async read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    this.check();
    assert(offset >= 0 && length >= 0 && offset + length <= this.sizeBytes, 'mirror read out of range');
    assert(dst === undefined || dst.length === length, 'read: dst must be exactly length bytes');
    const out = dst ?? Buffer.allocUnsafe(length);
    if (length === 0) return out;
    await readTreeRange(this.reader, offset, length, out);
    this.check();
    return out;
  }

  write(): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'a mirror is read-only'));
  }
  async flush(): Promise<void> {}
  trim(): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'a mirror is read-only'));
  }
  zero(_o: number, _l: number, _z: ZeroOptions): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'a mirror is read-only'));
  }
  async cache(): Promise<void> {}

  async blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    this.check();
    const startLbn = Math.floor(offset / BS);
    const endLbn = Math.ceil((offset + length) / BS);
    const ext = await this.reader.blockStatus(startLbn, endLbn - startLbn, maxExtents);
    return clipExtents(ext, offset - startLbn * BS, length, maxExtents);
  }

  detach(): void {
    if (this.pinned) this.owner.unpin(this);
  }

  onRevoke(revoke: () => void): void {
    this.revoke = revoke;
    this.pin();
  }

  /** Ends this view: reads fail from now on, and its NBD connection is closed. */
  expire(why = `this connection held mirror CP ${this.cp} longer than allowed`): void {
    this.expiredWhy ||= why;
    this.expired = true;
    this.revoke?.();
  }

  async close(): Promise<void> {}
}

export class MirrorExports implements ExportRegistry, PinnedReaders {
  private readonly mirrors = new Map<string, MirrorDir>();
  private readonly pins = new Map<string, Set<MirrorView>>();
  private readonly lastReported = new Map<string, number>();
  private pinListener: ((uuid: string, cp: number) => void) | undefined;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly log: Logger, private readonly pinHoldMsMax = PIN_HOLD_MS_MAX_DEFAULT) {
    this.timer = setInterval(() => this.expireOld(), PIN_CHECK_INTERVAL_MS);
    this.timer.unref();
  }

  onPinChange(f: (uuid: string, cp: number) => void): void {
    this.pinListener = f;
  }

  attach(m: MirrorDir): void {
    this.mirrors.set(m.label.sourceUuid, m);
    m.pins.attach(this);
  }

  /** The source is gone and its mirror closed: views on it fail from now on. */
  detachSource(m: MirrorDir): void {
    if (this.mirrors.get(m.label.sourceUuid) === m) this.mirrors.delete(m.label.sourceUuid);
    for (const v of this.pins.get(m.label.sourceUuid) ?? []) v.expire(`the mirror of ${m.label.sourceUuid} was closed`);
    this.pins.delete(m.label.sourceUuid);
    m.pins.reset();
  }

  /** A partial baseline began: no new view of it. */
  invalidate(uuid: string): void {
    for (const v of this.pins.get(uuid) ?? []) v.expire('a full baseline is overwriting the mirror');
    this.pins.delete(uuid);
    this.mirrors.get(uuid)?.pins.reset();
  }

  committed(m: MirrorDir): void {
    this.mirrors.set(m.label.sourceUuid, m);
  }

  list(): ExportInfo[] {
    const out: ExportInfo[] = [];
    for (const [uuid, m] of this.mirrors) {
      if (!m.view || m.baselinePartial) continue;
      out.push({ name: uuid, description: `read-only mirror of ${uuid} at CP ${m.committedCp}` });
      for (const s of m.view.listSnapshots()) out.push({ name: `${uuid}${SNAPSHOT_SEPARATOR}${s.name}`, description: `snapshot ${s.name} of the mirror of ${uuid}` });
    }
    return out;
  }

  lookup(name: string): Volume | undefined {
    const [uuid, snap] = name.split(SNAPSHOT_SEPARATOR, 2) as [string, string | undefined];
    const m = this.mirrors.get(uuid);
    if (!m || !m.view || m.baselinePartial) return undefined;
    const tree: BlockTree = m.view;
    const reader = snap === undefined ? tree : tree.snapshotReader(snap);
    if (!reader) return undefined;
    return new MirrorView(this, uuid, m.committedCp, m.committed!.raw, reader, m.label.sizeBytes, snap === undefined ? 'live' : `snapshot ${snap}`);
  }

  whyMissing(name: string): string | undefined {
    const [uuid, snap] = name.split(SNAPSHOT_SEPARATOR, 2) as [string, string | undefined];
    const m = this.mirrors.get(uuid);
    if (!m) return undefined;
    if (!m.view || m.baselinePartial) return `export "${name}": the mirror's baseline is in progress (no committed CP to read yet)`;
    if (snap !== undefined && !m.view.listSnapshots().some((x) => x.name === snap)) return `export "${name}": the mirror has no snapshot "${snap}" (at CP ${m.committedCp})`;
    return undefined;
  }

  pin(v: MirrorView): void {
    let set = this.pins.get(v.sourceUuid);
    if (!set) this.pins.set(v.sourceUuid, (set = new Set()));
    set.add(v);
    // Looked up at a CP a newer one has replaced since (during the handshake): the guard's map may lack it.
    this.mirrors.get(v.sourceUuid)?.pins.pinnedLate(v.cp);
    this.report(v.sourceUuid);
  }

  unpin(v: MirrorView): void {
    this.pins.get(v.sourceUuid)?.delete(v);
    this.report(v.sourceUuid);
  }

  /** The oldest CP a live view of this mirror uses, or -1. */
  oldestPinnedCp(uuid: string): number {
    let min = -1;
    for (const v of this.pins.get(uuid) ?? []) if (!v.expired && (min === -1 || v.cp < min)) min = v.cp;
    return min;
  }

  /** The live readers of a mirror: how many, the oldest CP one is pinned to (-1: none), and the longest pin so far. */
  readerStats(uuid: string): { readers: number; oldestPinnedCp: number; longestPinMs: number } {
    let readers = 0;
    let since = Infinity;
    for (const v of this.pins.get(uuid) ?? []) {
      if (v.expired) continue;
      readers++;
      since = Math.min(since, v.sinceMs);
    }
    return { readers, oldestPinnedCp: this.oldestPinnedCp(uuid), longestPinMs: readers > 0 ? Math.max(0, Date.now() - since) : 0 };
  }

  oldPins(uuid: string, committedCp: number): Array<{ cp: number; superblock: Buffer }> {
    const out = new Map<number, Buffer>();
    for (const v of this.pins.get(uuid) ?? []) if (!v.expired && v.cp < committedCp) out.set(v.cp, v.superblock);
    return [...out].map(([cp, superblock]) => ({ cp, superblock }));
  }

  release(uuid: string, cps: readonly number[], reason: string): number {
    const set = this.pins.get(uuid);
    if (!set) return 0;
    let n = 0;
    for (const v of set) {
      if (!cps.includes(v.cp)) continue;
      set.delete(v);
      n++;
      this.log.warn({ source: uuid, cp: v.cp, reason }, 'mirror reader released: a newer CP writes blocks of the CP it reads (its connection is closed; a reconnect gets the newest CP)');
      v.expire(`mirror CP ${v.cp} is being overwritten (${reason})`);
    }
    this.report(uuid);
    return n;
  }

  private report(uuid: string): void {
    const cp = this.oldestPinnedCp(uuid);
    if (this.lastReported.get(uuid) === cp) return;
    this.lastReported.set(uuid, cp);
    this.pinListener?.(uuid, cp);
  }

  private expireOld(): void {
    const now = Date.now();
    for (const [uuid, set] of this.pins) {
      for (const v of set) {
        if (now - v.sinceMs > this.pinHoldMsMax) {
          set.delete(v);
          this.log.warn({ source: uuid, cp: v.cp, heldMs: now - v.sinceMs }, 'mirror reader held its CP longer than allowed: its connection is closed (a reconnect gets the newest CP)');
          v.expire();
        }
      }
      this.report(uuid);
    }
  }

  close(): void {
    clearInterval(this.timer);
  }
}
