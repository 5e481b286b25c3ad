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
 * a CP gets a smaller share, and a full NVRAM half then holds writes until the CP is done,
 * as it always did.
 *
 * Imported by main.ts right after threadpool.ts: before anything starts libuv's pool.
 * NVMIRROR_BACKGROUND_NICE sets the delta (0 turns this off).
 */
import { addon } from '../io/native';

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
if (d > 0) addon().lowerPriority(d);
