/**
 * Read-only views of an engine volume's snapshots, and the export registry of a volume
 * directory: the live volume under its export name, each snapshot as `NAME@SNAP`.
 *
 * Invariants:
 * - A SnapshotVolume never writes; every call first checks that the snapshot still
 *   exists with the CP it was opened at (a deleted or re-created snapshot fails with
 *   ESHUTDOWN instead of serving another root's data).
 * - The registry is dynamic: list()/lookup() read the tree's current snapshot list, so
 *   snapshots made while serving appear without a restart. Each lookup makes its own
 *   view (a few fields); a view an NBD connection serves (onRevoke) is counted as a
 *   reader of its snapshot until the connection ends (detach): at most one per
 *   connection, so bounded by the server's connection limit.
 * - A snapshot with readers is deleted only when forced (served.ts); its readers'
 *   connections are then closed (revoked), never served another root's blocks.
 */
import type { ExportInfo, ExportRegistry } from './exports';
import type { BlockTreeApi } from '../tree/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { assert } from '../util/assert';
import { clipExtents } from './extents';
import { VolumeError } from '../util/errors';
import { readTreeRange, type EngineVolume } from './engine';
import type { Extent, Volume, VolumeCapabilities, ZeroOptions } from './types';

const BS = BLOCK_SIZE_BYTES;

export class SnapshotVolume implements Volume {
  readonly sizeBytes: number;
  readonly caps: VolumeCapabilities;
  readonly description: string;

  constructor(
    private readonly tree: BlockTreeApi,
    readonly snapshotName: string,
    readonly cpNumber: number,
    base: VolumeCapabilities,
    private readonly readers?: Map<string, Set<SnapshotVolume>>,
  ) {
    this.sizeBytes = tree.sizeBytes;
    this.description = `snapshot ${snapshotName} (CP ${cpNumber}) of volume ${tree.volumeUuid}`;
    this.caps = { ...base, readOnly: true, canTrim: false, canZero: false, canFastZero: false };
  }

  private reader() {
    const info = this.tree.listSnapshots().find((s) => s.name === this.snapshotName);
    const r = this.tree.snapshotReader(this.snapshotName);
    if (!info || !r || info.cpNumber !== this.cpNumber) throw new VolumeError('ESHUTDOWN', `snapshot ${this.snapshotName} no longer exists`);
    return r;
  }

  async read(offset: number, length: number, dst?: Buffer): Promise<Buffer> {
    assert(offset >= 0 && length >= 0 && offset + length <= this.sizeBytes, 'snapshot read out of range');
    assert(dst === undefined || dst.length === length, 'read: dst must be exactly length bytes');
    const out = dst ?? Buffer.allocUnsafe(length);
    if (length === 0) return out;
    await readTreeRange(this.reader(), offset, length, out);
    this.reader(); // deleted while we read: the blocks may have been reused
    return out;
  }

  write(_offset: number, _data: Buffer, _fua: boolean): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'snapshots are read-only'));
  }
  async flush(): Promise<void> {
    this.reader();
  }
  trim(_offset: number, _length: number, _fua: boolean): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'snapshots are read-only'));
  }
  zero(_offset: number, _length: number, _opts: ZeroOptions): Promise<void> {
    return Promise.reject(new VolumeError('EPERM', 'snapshots are read-only'));
  }
  async cache(_offset: number, _length: number): Promise<void> {
    this.reader();
  }

  async blockStatus(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    const r = this.reader();
    const startLbn = Math.floor(offset / BS);
    const endLbn = Math.ceil((offset + length) / BS);
    const ext = await r.blockStatus(startLbn, endLbn - startLbn, maxExtents);
    const out = clipExtents(ext, offset - startLbn * BS, length, maxExtents);
    assert(out.length >= 1, 'snapshot blockStatus produced nothing');
    return out;
  }

  /** How a serving connection is ended when the snapshot goes away under it (set by the NBD server). */
  private revoke: (() => void) | undefined;

  /** The NBD server serves this view on a connection: it counts as a reader until detach(). */
  onRevoke(revoke: () => void): void {
    this.revoke = revoke;
    let set = this.readers?.get(this.snapshotName);
    if (this.readers && !set) this.readers.set(this.snapshotName, (set = new Set()));
    set?.add(this);
  }

  /** The connection ended. */
  detach(): void {
    this.revoke = undefined;
    const set = this.readers?.get(this.snapshotName);
    set?.delete(this);
    if (set && set.size === 0) this.readers!.delete(this.snapshotName);
  }

  /** Ends the connection serving this view (its snapshot is being deleted). */
  revokeNow(): void {
    const r = this.revoke;
    this.detach();
    r?.();
  }

  /** The engine owns the tree; closing a view releases nothing. */
  async close(): Promise<void> {}
}

export const SNAPSHOT_SEPARATOR = '@';

/** The live volume as `exportName`, snapshots as `exportName@SNAP`. */
export class VolumeDirExports implements ExportRegistry {
  /** Views served on NBD connections, by snapshot name. */
  private readonly readers = new Map<string, Set<SnapshotVolume>>();

  constructor(private readonly exportName: string, private readonly volume: EngineVolume) {}

  /** The export that serves snapshot `name`. */
  snapshotExport(name: string): string {
    return `${this.exportName}${SNAPSHOT_SEPARATOR}${name}`;
  }

  /** NBD connections reading snapshot `name` now. */
  snapshotReaders(name: string): number {
    return this.readers.get(name)?.size ?? 0;
  }

  /** Closes every NBD connection reading snapshot `name` (it was deleted); returns how many. */
  revokeSnapshot(name: string): number {
    const set = [...(this.readers.get(name) ?? [])];
    for (const v of set) v.revokeNow();
    return set.length;
  }

  list(): ExportInfo[] {
    const out: ExportInfo[] = [{ name: this.exportName, description: this.volume.description }];
    for (const s of this.volume.listSnapshots()) {
      out.push({ name: `${this.exportName}${SNAPSHOT_SEPARATOR}${s.name}`, description: `read-only snapshot ${s.name} (CP ${s.cpNumber})` });
    }
    return out;
  }

  lookup(name: string): Volume | undefined {
    if (name === this.exportName) return this.volume;
    const prefix = `${this.exportName}${SNAPSHOT_SEPARATOR}`;
    if (!name.startsWith(prefix)) return undefined;
    const snap = name.slice(prefix.length);
    const info = this.volume.listSnapshots().find((s) => s.name === snap);
    if (!info) return undefined;
    return new SnapshotVolume(this.volume.tree, snap, info.cpNumber, this.volume.caps, this.readers);
  }
}
