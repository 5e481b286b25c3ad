/**
 * A RAID volume directory's scrub checkpoint file (DIR/scrub-progress.json): what an
 * interrupted scrub saved to go on from (src/raid/scrub.ts, ScrubCheckpoint), for the
 * unserved scrub and the serving process alike.
 *
 * Invariants:
 * - Written durably (temporary file, fsync, rename, directory fsync): after a crash the
 *   file is the old checkpoint or the new one, never a torn mix.
 * - A file that does not parse, names another volume, or exceeds SCRUB_PROGRESS_BYTES_MAX
 *   is not resumed from (the scrub starts over and replaces it), with a warning in the log.
 */
import * as fs from 'fs';
import * as path from 'path';
import { writeFileDurably } from '../io/file-device';
import type { ScrubCheckpoint, ScrubCheckpointStore } from '../raid/scrub';
import { log } from '../util/log';

export const SCRUB_PROGRESS_NAME = 'scrub-progress.json';
/** Largest checkpoint file read back (a checkpoint carries at most a few thousand stripe numbers). */
const SCRUB_PROGRESS_BYTES_MAX = 1024 * 1024;

export function scrubCheckpointStore(absDir: string, volumeUuid: string): ScrubCheckpointStore {
  const file = path.join(absDir, SCRUB_PROGRESS_NAME);
  return {
    async load(): Promise<ScrubCheckpoint | undefined> {
      let text: string;
      try {
        const st = await fs.promises.stat(file);
        if (st.size > SCRUB_PROGRESS_BYTES_MAX) {
          log().warn({ file, bytes: st.size }, 'scrub: progress file too large, starting over');
          return undefined;
        }
        text = await fs.promises.readFile(file, 'utf8');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
        throw e;
      }
      try {
        const o = JSON.parse(text) as { uuid?: unknown; checkpoint?: unknown };
        if (o.uuid !== volumeUuid) {
          log().warn({ file }, 'scrub: progress file names another volume, starting over');
          return undefined;
        }
        // Shape checked by the scrub (isCheckpoint) before it is trusted.
        return o.checkpoint as ScrubCheckpoint;
      } catch {
        log().warn({ file }, 'scrub: progress file does not parse, starting over');
        return undefined;
      }
    },
    save: (c) => writeFileDurably(absDir, SCRUB_PROGRESS_NAME, `${JSON.stringify({ uuid: volumeUuid, checkpoint: c })}\n`),
    clear: () => fs.promises.rm(file, { force: true }),
  };
}
