/**
 * `scrub` of a RAID volume directory (src/raid/scrub.ts does the work): an unserved
 * volume is opened here (read-only without --repair, so nothing can be written; read-write
 * with it, the tree mounted on its committed roots and the NVRAM left alone: a repair
 * rewrites blocks with the content their checksums name, so a later replay is unaffected);
 * a served one is scrubbed by the serving process through DIR/control.sock, its progress
 * polled meanwhile (and shown by `status`).
 *
 * Both keep the scrub's checkpoint in DIR/scrub-progress.json (scrub-progress.ts): a scrub
 * killed in its parity pass goes on from there when run again (served or not).
 *
 * Invariants:
 * - A volume that is not RAID is refused with one line, before anything is opened for
 *   writing; so is --repair on a volume whose RAID has failed (read-only), and a scrub
 *   without --repair of a volume whose stripe journal holds a batch to replay (it would
 *   call the batch's stripes parity errors; --repair replays it at the open).
 * - The lock is held for the whole unserved scrub and released on every path.
 */
import * as path from 'path';
import * as fs from 'fs';
import { BlockTree } from '../tree/tree';
import { RaidDevice } from '../raid/raid-device';
import { scrubRaid, type ScrubProgress, type ScrubReport } from '../raid/scrub';
import { scrubCheckpointStore } from './scrub-progress';
import { CONTROL_SOCKET_NAME, controlRequest } from './engine-control';
import { lockVolumeDir, volumeDirInUse } from './dir-lock';
import { openMemberDevice } from './dir';
import { readLabel } from './label';
import { journalPendingText } from '../raid/journal-file';

const SCRUB_PROGRESS_POLL_MS = 250;
const SCRUB_ANSWER_TIMEOUT_MS = 24 * 3600 * 1000;

export interface DirScrubReport extends ScrubReport {
  dir: string;
  /** Scrubbed by the serving process (through its control socket). */
  served: boolean;
}

export interface DirScrubOptions {
  repair: boolean;
  onProgress?: (p: ScrubProgress) => void;
  /** Average read rate limit, bytes per second. */
  rateBytesPerSec?: number;
}

export async function scrubVolumeDir(dir: string, opts: DirScrubOptions): Promise<DirScrubReport> {
  const absDir = path.resolve(dir);
  const label = await readLabel(absDir);
  if (!label.raid) throw new Error(`${absDir} is not a RAID volume: there is nothing to scrub (use nvmirror check)`);
  if (await volumeDirInUse(absDir)) return scrubThroughControl(absDir, opts);
  const lock = await lockVolumeDir(absDir, !opts.repair).catch((e: unknown) => {
    const msg = e instanceof Error ? e.message : String(e);
    throw new Error(msg.includes('already in use') ? `${msg}; run scrub again to scrub it through the serving process` : msg);
  });
  try {
    const dev = await openMemberDevice(absDir, label, !opts.repair);
    try {
      if (!(dev instanceof RaidDevice)) throw new Error(`${absDir}: its device is not a RAID device`);
      if (opts.repair && dev.health().state === 'failed') throw new Error(`${dev.health().failure ?? 'too many members lost'}; scrub without --repair reports what can still be read`);
      // A read-only scrub cannot replay the stripe journal: the batch's stripes would be reported as parity errors that are none.
      const pending = dev.health().journalPending;
      if (pending) throw new Error(`${journalPendingText(pending)}; scrub --repair (or serve) replays it first, a read-only scrub would report those stripes' parity as errors`);
      const tree = await BlockTree.open(dev);
      try {
        if (tree.volumeUuid !== label.uuid) throw new Error(`the members belong to volume ${tree.volumeUuid}, the label says ${label.uuid}`);
        const r = await scrubRaid(tree, dev, { ...opts, store: scrubCheckpointStore(absDir, label.uuid) });
        if (opts.repair) await dev.sync();
        return { dir: absDir, served: false, ...r };
      } finally {
        await tree.close();
      }
    } finally {
      await dev.close();
    }
  } finally {
    await lock.release();
  }
}

async function scrubThroughControl(absDir: string, opts: DirScrubOptions): Promise<DirScrubReport> {
  const sockPath = path.join(absDir, CONTROL_SOCKET_NAME);
  if (!fs.existsSync(sockPath)) throw new Error(`volume ${absDir} is open in another process that has no control socket; stop it before running scrub`);
  let finished = false;
  const poll = async (): Promise<void> => {
    for (let first = true; !finished && opts.onProgress; first = false) {
      if (!first) await new Promise((r) => setTimeout(r, SCRUB_PROGRESS_POLL_MS));
      if (finished) return;
      const r = await controlRequest(sockPath, { op: 'scrub-progress' }, 10_000).catch(() => undefined);
      if (!finished && r?.ok && r.progress) opts.onProgress(r.progress as ScrubProgress);
    }
  };
  const polling = poll();
  try {
    const r = await controlRequest(sockPath, { op: 'scrub', repair: opts.repair, ...(opts.rateBytesPerSec !== undefined ? { rateBytesPerSec: opts.rateBytesPerSec } : {}) }, SCRUB_ANSWER_TIMEOUT_MS);
    if (!r.ok) throw new Error(`serving process: ${r.error}`);
    return { dir: absDir, served: true, ...(r.scrub as ScrubReport) };
  } finally {
    finished = true;
    await polling;
  }
}
