/**
 * This process's threads by name, with their scheduling policy (/proc/self/task/TID/stat
 * field 41), for tests of the policy a native thread runs under.
 */
import * as fs from 'fs';

export const SCHED_OTHER = 0;
export const SCHED_BATCH = 3;

export interface ThreadPolicy {
  tid: number;
  policy: number;
}

/** The live threads named `comm` (a thread that ends while it is read is left out). */
export function threadsNamed(comm: string): ThreadPolicy[] {
  const out: ThreadPolicy[] = [];
  for (const t of fs.readdirSync('/proc/self/task')) {
    try {
      if (fs.readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim() !== comm) continue;
      const stat = fs.readFileSync(`/proc/self/task/${t}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // from field 3 (state) on
      out.push({ tid: Number(t), policy: Number(fields[41 - 3]) });
    } catch {
      // ended meanwhile
    }
  }
  return out;
}
