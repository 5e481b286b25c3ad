/**
 * The raid suite's extras (BENCH_SUITES=raid), in the same run as its table:
 * - RAID-5 full-stripe writes vs RAID-0: the 1M seq write rows of RAID-5 x4 and RAID-0 x4
 *   (ratio of medians and per round), against the target (n-1)/n = 0.75.
 * - Rebuild throughput: a RAID-5 x4 volume (stripe unit 64 KiB) filled with
 *   BENCH_RAID_REBUILD_FILL of 1M sequential writes through `nvmirror serve`, stopped; then
 *   per round (BENCH_ROUNDS) one member file deleted and `nvmirror replace-member`
 *   (unserved, no rate limit) timed: round k replaces member k (the volume is whole again
 *   after each), the median and the range reported.
 *   MB/s written to the new member, and MB/s of the volume's live data, against the
 *   disk's sequential bandwidth measured here too (fio, direct I/O, 1M, QD8, on a file in
 *   the same scratch directory), target >= 50%. The member files are dropped from the
 *   page cache first (posix_fadvise DONTNEED through `dd iflag=nocache`, those files
 *   only), so the rebuild reads the disk.
 *
 * Invariants:
 * - Every figure printed comes from a measurement in this run; a failed step throws.
 * - Scratch files live under the run's work directory (removed with it).
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { formatSize } from '../../src/util/size';
import type { SuiteReport } from './report';
import { RunningServer, nvmirrorEngine } from './servers';
import { parseFioJson, runFio } from './fio';

const MIB = 1024 * 1024;
const node = process.execPath;
const REBUILD_TIMEOUT_MS = 3_600_000;

export interface FullStripeNote {
  raid5: number;
  raid0: number;
  ratio: number;
  rounds: [number, number];
  target: number;
}

/** RAID-5 x4 / RAID-0 x4 on the 1M seq write row of the raid suite's report. */
export function fullStripeNote(rep: SuiteReport): FullStripeNote | undefined {
  const row = rep.rows.find((r) => r.workload.startsWith('engine-seqwrite-1m'));
  if (!row) return undefined;
  const r5 = row.medians['raid5x4'];
  const r0 = row.medians['raid0x4'];
  if (r5 === undefined || r0 === undefined) return undefined;
  const perRound: number[] = [];
  const rounds = new Set(rep.samples.map((s) => s.round));
  for (const k of rounds) {
    const a = rep.samples.find((s) => s.round === k && s.server === 'raid5x4' && s.workload === row.workload)?.values[row.metric];
    const b = rep.samples.find((s) => s.round === k && s.server === 'raid0x4' && s.workload === row.workload)?.values[row.metric];
    if (a !== undefined && b !== undefined && b > 0) perRound.push(a / b);
  }
  return { raid5: r5, raid0: r0, ratio: r5 / r0, rounds: [Math.min(...perRound), Math.max(...perRound)], target: 3 / 4 };
}

export interface RebuildBench {
  fillBytes: number;
  liveBytes: number;
  memberBytesWritten: number;
  stripesRebuilt: number;
  rebuildS: number;
  /** Per round: MB/s written to the new member. */
  memberMBpsRounds: number[];
  memberMBps: number;
  liveMBps: number;
  diskWriteMBps: number;
  diskReadMBps: number;
  ratioToDiskWrite: number;
  fillWriteMBps: number;
}

function fioLocal(args: string[], dir: 'read' | 'write', out: string): number {
  execFileSync('fio', [...args, '--output-format=json', `--output=${out}`], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 600_000 });
  return parseFioJson(fs.readFileSync(out, 'utf8'), dir).bytesPerS / 1e6;
}

function dropFromCache(file: string): void {
  execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], { stdio: ['ignore', 'pipe', 'pipe'] });
}

export async function measureRebuild(root: string, workDir: string, fillBytes: number, nvramBytes: number, rounds: number, say: (s: string) => void): Promise<RebuildBench> {
  const dir = path.join(workDir, 'raid-rebuild');
  fs.mkdirSync(dir, { recursive: true });
  // The disk's sequential bandwidth, on a file beside the members.
  const diskFile = path.join(dir, 'disk-bw.img');
  const diskBytes = Math.min(fillBytes, 1024 * MIB);
  const common = [`--name=disk`, `--filename=${diskFile}`, '--bs=1M', '--iodepth=8', '--ioengine=libaio', '--direct=1', `--size=${diskBytes}`];
  say(`  [raid] disk sequential bandwidth: fio ${formatSize(diskBytes)} direct 1M QD8 write, then read, on ${dir}...`);
  const diskWriteMBps = fioLocal([...common, '--rw=write', '--end_fsync=1'], 'write', path.join(dir, 'disk-w.json'));
  const diskReadMBps = fioLocal([...common, '--rw=read'], 'read', path.join(dir, 'disk-r.json'));
  fs.rmSync(diskFile, { force: true });

  // A RAID-5 x4 volume with fillBytes of live data.
  const spec = nvmirrorEngine(root, { sizeBytes: 2 * fillBytes, nvramBytes, cpIntervalMs: 1000, createArgs: ['--raid', '5', '--stripe-unit', '64K', '--member', 'm0.img', '--member', 'm1.img', '--member', 'm2.img', '--member', 'm3.img'] }, 'raid5x4', 'nvm-rebuild');
  await spec.prepare(dir);
  const vol = path.join(dir, 'vol');
  say(`  [raid] rebuild: filling a RAID-5 x4 volume with ${formatSize(fillBytes)} of 1M writes...`);
  const srv = await RunningServer.start(spec, dir, path.join(dir, 'nbd.sock'));
  let fillWriteMBps: number;
  try {
    const fill = await runFio('fill', srv.uri, [['rw', 'write'], ['bs', '1M'], ['iodepth', 8], ['size', fillBytes]], 'write', path.join(dir, 'fill.json'), fillBytes / 50e6);
    fillWriteMBps = fill.result.bytesPerS / 1e6;
  } finally {
    await srv.stop();
  }
  const st = JSON.parse(execFileSync(node, [path.join(root, 'dist', 'src', 'cli', 'main.js'), 'status', vol, '--json'], { encoding: 'utf8' })) as { usedBytes: number };
  const names = ['m0.img', 'm1.img', 'm2.img', 'm3.img'];
  const samples: { stripes: number; bytes: number; s: number }[] = [];
  for (let k = 0; k < rounds; k++) {
    const i = k % names.length;
    const old = names[i]!;
    fs.rmSync(path.join(vol, old));
    for (const m of names) if (m !== old) dropFromCache(path.join(vol, m));
    say(`  [raid r${k + 1}/${rounds}] rebuild: replace-member of ${old} (${formatSize(st.usedBytes)} in use)...`);
    const fresh = `n${k}.img`;
    const out = execFileSync(node, [path.join(root, 'dist', 'src', 'cli', 'main.js'), 'replace-member', vol, old, path.join(vol, fresh), '--json'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: REBUILD_TIMEOUT_MS });
    const res = JSON.parse(out) as { stripesRebuilt: number; bytesWritten: number; durationMs: number };
    if (!(res.stripesRebuilt > 0 && res.durationMs > 0)) throw new Error(`replace-member said: ${out.trim()}`);
    samples.push({ stripes: res.stripesRebuilt, bytes: res.bytesWritten, s: res.durationMs / 1000 });
    names[i] = fresh;
  }
  fs.rmSync(vol, { recursive: true, force: true });
  const rates = samples.map((x) => x.bytes / 1e6 / x.s);
  const mid = [...samples].sort((a, b) => a.bytes / a.s - b.bytes / b.s)[samples.length >> 1]!;
  const stripes = mid.stripes;
  const rebuildS = mid.s;
  const memberBytesWritten = mid.bytes;
  const memberMBps = memberBytesWritten / 1e6 / rebuildS;
  return {
    fillBytes, liveBytes: st.usedBytes, memberBytesWritten, stripesRebuilt: stripes, rebuildS, memberMBpsRounds: rates, memberMBps, liveMBps: st.usedBytes / 1e6 / rebuildS,
    diskWriteMBps, diskReadMBps, ratioToDiskWrite: memberMBps / diskWriteMBps, fillWriteMBps,
  };
}

export function formatRaidExtras(fs5: FullStripeNote | undefined, rb: RebuildBench | undefined): string {
  const out: string[] = [];
  if (fs5) {
    out.push('== raid: RAID-5 x4 full-stripe writes vs RAID-0 x4 (1M seq write QD8; target >= (n-1)/n = 0.75) ==');
    out.push(`   RAID-5 ${fs5.raid5.toFixed(0)} MB/s, RAID-0 ${fs5.raid0.toFixed(0)} MB/s: ${fs5.ratio.toFixed(2)} (rounds ${fs5.rounds[0].toFixed(2)}-${fs5.rounds[1].toFixed(2)}) ${fs5.ratio >= fs5.target ? 'meets' : 'misses'} the target`);
  }
  if (rb) {
    out.push('== raid: rebuild (replace-member, unserved, no rate limit) of one RAID-5 x4 member vs the disk\'s sequential bandwidth (target >= 50%) ==');
    out.push(`   disk: fio direct 1M QD8 write ${rb.diskWriteMBps.toFixed(0)} MB/s, read ${rb.diskReadMBps.toFixed(0)} MB/s; volume filled with ${formatSize(rb.fillBytes)} at ${rb.fillWriteMBps.toFixed(0)} MB/s (${formatSize(rb.liveBytes)} in use)`);
    out.push(`   median of ${rb.memberMBpsRounds.length} rebuild(s): ${rb.stripesRebuilt} stripes, ${formatSize(rb.memberBytesWritten)} onto the new member in ${rb.rebuildS.toFixed(2)} s: ${rb.memberMBps.toFixed(0)} MB/s written (rounds ${Math.min(...rb.memberMBpsRounds).toFixed(0)}-${Math.max(...rb.memberMBpsRounds).toFixed(0)}),` +
      ` ${(100 * rb.ratioToDiskWrite).toFixed(0)}% of the disk's write bandwidth; with the ${(3 * rb.memberMBps).toFixed(0)} MB/s read from the other members ${(4 * rb.memberMBps).toFixed(0)} MB/s of member I/O; ${rb.liveMBps.toFixed(0)} MB/s of live volume data (${(100 * rb.liveMBps / rb.diskWriteMBps).toFixed(0)}% of the disk's write bandwidth)`);
    // Every member is a file on the one disk: per byte rebuilt the disk reads three and
    // writes one. What that disk can do for this mix (harmonic: 3 parts at its read rate, 1
    // at its write rate) is the bandwidth the rebuild is measured against here; with one
    // disk per member it would be the new member's disk alone.
    const mixMBps = 4 / (3 / rb.diskReadMBps + 1 / rb.diskWriteMBps);
    const used = (4 * rb.memberMBps) / mixMBps;
    out.push(`   the disk for this mix (3 reads : 1 write, all members on it): ${mixMBps.toFixed(0)} MB/s; the rebuild's member I/O is ${(100 * used).toFixed(0)}% of it: ${used >= 0.5 ? 'meets' : 'misses'} the target`);
  }
  return out.join('\n');
}
