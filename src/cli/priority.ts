/**
 * Background work runs below the threads that answer clients.
 *
 * A CP builds the tree on the event loop and writes it through libuv's pool while the
 * NBD connection threads answer WRITEs from the NVRAM; on a 2-core machine the two fought
 * for the CPU and the p99 of QD1 writes during CPs rose to 3-4.7x the p99 outside them
 * (test/crash/cp-latency.test.ts). So the event loop runs BACKGROUND_NICE_DELTA nice
 * levels below the priority the process started with, and so does libuv's pool, whose
 * threads are made later and inherit it; the threads that answer clients (NBD
 * connections and their read pool, the NVRAM persist pool, the mirror's receive thread)
 * are made by the addon's launcher and keep the starting priority (native/priority.cc).
 * When clients leave the CPU idle the background gets all of it; when they keep it busy,
 * a CP gets a smaller share. Once the active NVRAM half fills while a CP runs (writers
 * would soon wait for it), the CP is urgent and the event loop goes back to the starting
 * priority until it ends (where the process may raise a priority; below).
 *
 * Imported by main.ts right after threadpool.ts: before anything starts libuv's pool.
 * NVMIRROR_BACKGROUND_NICE sets the delta (0 turns this off).
 */
import * as os from 'os';
import { addon } from '../io/native';
import { log } from '../util/log';
import { pauseBusyPoll } from '../nbd/native-transmission';
import { setCpRunningHandler, setCpUrgencyHandler } from '../util/urgency';

export const BACKGROUND_NICE_DELTA = 10;

function delta(): number {
  const v = process.env.NVMIRROR_BACKGROUND_NICE;
  if (v === undefined || v === '') return BACKGROUND_NICE_DELTA;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 19) {
    process.stderr.write(`nvmirror: NVMIRROR_BACKGROUND_NICE must be an integer in [0, 19], not ${JSON.stringify(v)}\n`);
    process.exit(2);
  }
  return n;
}

const d = delta();
if (d > 0) {
  const foreground = os.getPriority();
  const background = addon().lowerPriority(d);
  // While a CP is urgent (the active NVRAM half is filling and writers will wait for this
  // CP: cp/runner.ts) the event loop runs at the clients' threads' priority: a niced CP
  // losing the CPU to them then only lengthens the stall they are about to hit. Raising a
  // thread's priority again needs CAP_SYS_NICE (or RLIMIT_NICE); without it the CP stays
  // niced, said once.
  let refusedLogged = false;
  setCpUrgencyHandler((urgent) => {
    if (addon().setNice(urgent ? foreground : background)) return;
    if (!refusedLogged) {
      refusedLogged = true;
      log().info({ background, foreground }, 'urgent CPs keep the background priority: raising the event loop\'s priority back needs CAP_SYS_NICE or RLIMIT_NICE');
    }
  });
}

// While a CP runs, the NBD connection threads do not busy-poll (native/busy_poll.h). A
// spinning thread yields between polls; with a CP's threads runnable, the yield hands its
// CPU to one of them and, being still runnable itself, the thread gets no wake-up
// preemption when the next request arrives: it waits out the CP thread's time slice. At
// QD1, that test/crash/cp-latency.test.ts's ratio (p99 of writes during CPs / outside) was
// 1.07-3.19x over five runs, median 2.49x (a CI run failed its 3x bound at 3.17x); paused
// during CPs, 1.43-2.9x, median 1.78x, in the same alternating runs (docs/benchmarks.md,
// "Busy-poll paused during CPs"). The p50 during CPs moves 35 -> 37 us; outside CPs nothing
// changes (the CPUs idle there, and spinning saves the wake-up).
setCpRunningHandler((running) => pauseBusyPoll(running));
