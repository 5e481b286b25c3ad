/**
 * The stripe journal's file, DIR/raid-journal.bin, for every RAID-4/5/6 directory: an
 * engine RAID volume's and a RAID mirror destination's (src/mirror/mirror-dir.ts). One
 * place decides its name, its size and how it is opened, so a volume, its mirror, a
 * promoted mirror and a demoted volume (which share directories) agree on it.
 *
 * Invariants:
 * - Only parity levels have one (RAID-0/1 write through: nothing partial to journal).
 * - A read-write open creates it when absent (sparse, then the directory synced, so a
 *   batch made durable in it is never in a file whose name a power loss can lose).
 * - A read-only open never creates or writes it; it only reads it when it exists.
 * - Its size holds at least four whole stripes' cells (JOURNAL_BYTES_DEFAULT otherwise).
 */
import * as fs from 'fs';
import * as path from 'path';
import { FileBlockDevice, syncDirectory } from '../io/file-device';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { assert } from '../util/assert';
import type { RaidGeometry } from './geometry';
import type { JournalPending } from './raid-device';
import { JOURNAL_BYTES_DEFAULT, JOURNAL_HEADER_SLOTS, journalBlocksFor } from './stripe-journal';

export const RAID_JOURNAL_NAME = 'raid-journal.bin';
/** Whole stripes' cells a journal holds at least (a wide RAID-6 with large units needs more than the default size). */
const JOURNAL_STRIPES_MIN = 4;

/** Blocks of a new journal file for geometry g. */
export function raidJournalBlocks(g: RaidGeometry): number {
  assert(g.parityMembers > 0, `RAID-${g.level} has no stripe journal`);
  const stripeCells = (g.dataMembers + g.parityMembers) * g.unitBlocks;
  return Math.max(JOURNAL_BYTES_DEFAULT / BLOCK_SIZE_BYTES, JOURNAL_HEADER_SLOTS + JOURNAL_STRIPES_MIN * journalBlocksFor(stripeCells));
}

/**
 * Opens (read-write: creating it if absent) the stripe journal at `journalPath` for
 * geometry g. Undefined: no journal (not a parity level, or read-only and absent).
 */
export async function openRaidJournalFile(journalPath: string, g: RaidGeometry, readOnly: boolean): Promise<FileBlockDevice | undefined> {
  if (g.parityMembers === 0) return undefined;
  if (readOnly) return fs.existsSync(journalPath) ? FileBlockDevice.open(journalPath, { readOnly: true }) : undefined;
  if (fs.existsSync(journalPath)) return FileBlockDevice.open(journalPath, {});
  const dev = await FileBlockDevice.create(journalPath, raidJournalBlocks(g));
  try {
    await syncDirectory(path.dirname(journalPath));
  } catch (e) {
    await dev.close().catch(() => undefined);
    throw e;
  }
  return dev;
}

/** One line on a journal batch a read-only open found and left (status, check). */
export function journalPendingText(p: JournalPending): string {
  if (p.problem !== undefined) return `stripe journal ${RAID_JOURNAL_NAME} cannot be read: ${p.problem}`;
  return `stripe journal: a batch of ${p.stripes} stripe(s) an interrupted write left is pending replay (epoch ${p.epoch}); the next read-write open replays it. Until then those stripes' parity may not match their data: reads are right with every member in service, a member lost meanwhile may make their blocks an EIO (never wrong data)`;
}
