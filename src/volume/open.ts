/**
 * Opens the volume named on the command line (`--memory SIZE`, `--file PATH` or a
 * volume directory) and the export registry that serves it. Shared by `serve` and
 * `attach`, so both open volumes the same way.
 */
import type { ExportRegistry } from './exports';
import { StaticExports } from './exports';
import type { Volume } from './types';
import type { BlockTreeApi } from '../tree/types';

export interface VolumeSpec {
  memory?: number;
  file?: string;
  dir?: string;
  readOnly: boolean;
  exportName: string;
  /** Engine tuning, passed through to volume directories. */
  cpIntervalMs?: number;
  /** Volume directories: called with the mounted tree before NVRAM recovery commits anything (a mirror attaches its CP sink here). */
  beforeRecovery?: (tree: BlockTreeApi) => Promise<void>;
}

export interface OpenedVolume {
  volume: Volume;
  exports: ExportRegistry;
  /** What is served, for humans: "memory 1 GiB", "file /x.img", "volume /dir". */
  what: string;
  close(): Promise<void>;
}

export async function openVolume(spec: VolumeSpec): Promise<OpenedVolume> {
  const given = [spec.memory !== undefined, spec.file !== undefined, spec.dir !== undefined].filter(Boolean).length;
  if (given !== 1) throw new Error('give exactly one of --memory SIZE, --file PATH or a volume directory');
  if (spec.memory !== undefined) {
    const { MemoryVolume } = await import('./memory');
    const volume = MemoryVolume.create(spec.memory, { readOnly: spec.readOnly });
    return single(volume, spec.exportName, `memory`);
  }
  if (spec.file !== undefined) {
    const { FileVolume } = await import('./file');
    const volume = await FileVolume.open(spec.file, { readOnly: spec.readOnly });
    return single(volume, spec.exportName, `file ${spec.file}`);
  }
  const { openVolumeDir } = await import('./dir');
  const dir = spec.dir as string;
  const opened = await openVolumeDir(dir, {
    readOnly: spec.readOnly,
    exportName: spec.exportName,
    ...(spec.cpIntervalMs !== undefined ? { cpIntervalMs: spec.cpIntervalMs } : {}),
    ...(spec.beforeRecovery ? { beforeRecovery: spec.beforeRecovery } : {}),
  });
  return { volume: opened.volume, exports: opened.exports, what: `volume ${dir}`, close: () => opened.close() };
}

function single(volume: Volume, exportName: string, what: string): OpenedVolume {
  return { volume, exports: new StaticExports([[exportName, volume]]), what, close: () => volume.close() };
}
