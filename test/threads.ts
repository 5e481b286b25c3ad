/**
 * A process's threads as /proc shows them (/proc/PID/task/TID): name, nice value (stat
 * field 19) and scheduling policy (field 41), for tests of the priority and policy the
 * native threads run at.
 */
import * as fs from 'fs';

export const SCHED_OTHER = 0;
export const SCHED_BATCH = 3;

export interface ThreadInfo {
  tid: number;
  comm: string;
  nice: number;
  policy: number;
}

/** Each live thread of pid (default: this process); a thread that ends while it is read is left out. */
export function threadsOf(pid: number | 'self' = 'self'): ThreadInfo[] {
  const out: ThreadInfo[] = [];
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // from field 3 (state) on
      const comm = fs.readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim();
      out.push({ tid: Number(t), comm, nice: Number(fields[19 - 3]), policy: Number(fields[41 - 3]) });
    } catch {
      // ended meanwhile
    }
  }
  return out;
}

/** This process's live threads named `comm`. */
export function threadsNamed(comm: string): ThreadInfo[] {
  return threadsOf().filter((t) => t.comm === comm);
}
