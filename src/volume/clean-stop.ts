/**
 * The clean-stop record, DIR/nvram.clean: the last read-write session committed every
 * NVRAM record (CP n, watermark seq s) and stopped. It is what lets
 * `repair --recreate-nvram` prove that a lost NVRAM log held nothing the tree lacks.
 *
 * Invariants:
 * - It exists only while no read-write session is open and the last one stopped after a
 *   final CP whose watermark is its last NVRAM seq: written (temp, fsync, rename, fsync
 *   DIR) after that CP, removed (fsync DIR) by a read-write open before any record can
 *   be appended.
 * - A record that does not parse is no record (undefined), never an error.
 */
import * as fs from 'fs';
import * as path from 'path';
import { syncDirectory } from '../io/file-device';
import { pathExists } from './label';

export const CLEAN_STOP_NAME = 'nvram.clean';
const CLEAN_STOP_MAX_BYTES = 4096;

export interface CleanStop {
  uuid: string;
  cpNumber: number;
  nvlogSeq: number;
  stoppedMs: number;
}

/** Records a clean stop durably (temp file, fsync, rename, fsync DIR). */
export async function writeCleanStop(dir: string, rec: CleanStop): Promise<void> {
  const p = path.join(dir, CLEAN_STOP_NAME);
  const tmp = `${p}.tmp-${process.pid}`;
  const fh = await fs.promises.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(`${JSON.stringify(rec)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.promises.rename(tmp, p);
  await syncDirectory(dir);
}

/** Removes the clean-stop record (durably) before a read-write session can append. */
export async function clearCleanStop(dir: string): Promise<void> {
  const p = path.join(dir, CLEAN_STOP_NAME);
  if (!(await pathExists(p))) return;
  await fs.promises.rm(p);
  await syncDirectory(dir);
}

/** The clean-stop record, or undefined if there is none (or it is not one). */
export async function readCleanStop(dir: string): Promise<CleanStop | undefined> {
  let text: string;
  try {
    const fh = await fs.promises.open(path.join(dir, CLEAN_STOP_NAME), 'r');
    try {
      const buf = Buffer.alloc(CLEAN_STOP_MAX_BYTES);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      text = buf.toString('utf8', 0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch {
    return undefined;
  }
  try {
    const o = JSON.parse(text) as Record<string, unknown>;
    const int = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
    if (typeof o.uuid !== 'string' || !int(o.cpNumber) || !int(o.nvlogSeq) || !int(o.stoppedMs)) return undefined;
    return { uuid: o.uuid, cpNumber: o.cpNumber, nvlogSeq: o.nvlogSeq, stoppedMs: o.stoppedMs };
  } catch {
    return undefined;
  }
}
