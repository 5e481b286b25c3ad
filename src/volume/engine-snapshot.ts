/**
 * Read-only views of an engine volume's snapshots, and the export registry of a volume
 * directory: the live volume under its export name, each snapshot as `NAME@SNAP`.
 *
 * Invariants:
 * - A SnapshotVolume never writes; every call first checks that the snapshot still
 *   exists with the CP it was opened at (a deleted or re-created snapshot fails with
 *   ESHUTDOWN instead of serving another root's data).
 * - The registry is dynamic: list()/lookup() read the tree's current snapshot list, so
 *   snapshots made while serving appear without a restart. Views are cached per
 *   (name, cp), and the cache only holds snapshots that exist (bounded by SNAPSHOTS_MAX).
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

  constructor(private readonly tree: BlockTreeApi, readonly snapshotName: string, readonly cpNumber: number, base: VolumeCapabilities) {
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

  /** The engine owns the tree; closing a view releases nothing. */
  async close(): Promise<void> {}
}

export const SNAPSHOT_SEPARATOR = '@';

/** The live volume as `exportName`, snapshots as `exportName@SNAP`. */
export class VolumeDirExports implements ExportRegistry {
  private readonly views = new Map<string, SnapshotVolume>();

  constructor(private readonly exportName: string, private readonly volume: EngineVolume) {}

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
    // Drop views of snapshots that are gone, so the cache stays bounded by the live list.
    for (const [k, v] of this.views) {
      if (!this.volume.listSnapshots().some((s) => s.name === k && s.cpNumber === v.cpNumber)) this.views.delete(k);
    }
    if (!info) return undefined;
    let v = this.views.get(snap);
    if (!v || v.cpNumber !== info.cpNumber) {
      v = new SnapshotVolume(this.volume.tree, snap, info.cpNumber, this.volume.caps);
      this.views.set(snap, v);
    }
    return v;
  }
}
