/**
 * Profiles nvmirror's per-request cost: starts `nvmirror serve` under `node --cpu-prof`,
 * drives it with one fio workload of the benchmark, stops it cleanly (the profile is
 * written at exit) and prints the hottest functions by self and inclusive time.
 *
 *   node dist/scripts/bench/profile.js [memory|file|engine] [WORKLOAD_ID] [SECONDS]
 *   (defaults: memory randwrite-4k-qd1 10; BENCH_PROFILE_DIR keeps the .cpuprofile)
 *
 * Invariants:
 * - Time is attributed from the profile's samples and timeDeltas; a function's inclusive
 *   time counts each sample once even when the function recurses.
 * - Output is capped at TOP_N rows per table.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { runFio } from './fio';
import { nvmirrorEngine, nvmirrorFile, nvmirrorMemory, RunningServer, ServerSpec } from './servers';
import { baseWorkloads, engineWorkloads, prefillOptions } from './workloads';
import { loadConfig } from './config';

const TOP_N = 30;

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  hitCount?: number;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

function frameKey(n: ProfileNode, root: string): string {
  const f = n.callFrame;
  let url = f.url.replace(/^file:\/\//, '');
  if (url.startsWith(root)) url = url.slice(root.length + 1);
  const name = f.functionName === '' ? '(anonymous)' : f.functionName;
  return url === '' ? name : `${name} ${url}:${f.lineNumber + 1}`;
}

export function summarize(p: CpuProfile, root: string): string {
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of p.nodes) byId.set(n.id, n);
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  const byFile = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const id = p.samples[i] as number;
    const dt = (p.timeDeltas[i + 1] ?? p.timeDeltas[i] ?? 0) / 1000; // µs -> ms
    const node = byId.get(id);
    if (!node) continue;
    total += dt;
    const k = frameKey(node, root);
    if (node.callFrame.functionName === '(idle)') {
      idle += dt;
      continue;
    }
    self.set(k, (self.get(k) ?? 0) + dt);
    const file = node.callFrame.url === '' ? `(native/${node.callFrame.functionName})` : frameKey({ ...node, callFrame: { ...node.callFrame, functionName: '' } }, root).replace(/^\(anonymous\) /, '').replace(/:\d+$/, '');
    byFile.set(file, (byFile.get(file) ?? 0) + dt);
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const n = byId.get(cur);
      if (!n) break;
      const key = frameKey(n, root);
      if (seen.has(key)) continue;
      seen.add(key);
      incl.set(key, (incl.get(key) ?? 0) + dt);
    }
  }
  const busy = total - idle;
  const table = (title: string, m: Map<string, number>): string[] => {
    const rows = [...m.entries()].sort((a, b) => b[1] - a[1]).slice(0, TOP_N);
    return [title, ...rows.map(([k, v]) => `  ${v.toFixed(0).padStart(7)} ms ${((100 * v) / Math.max(1e-9, busy)).toFixed(1).padStart(5)}%  ${k}`)];
  };
  return [
    `profile: ${total.toFixed(0)} ms sampled, ${idle.toFixed(0)} ms idle, ${busy.toFixed(0)} ms busy (percentages are of busy time)`,
    ...table('-- self time by function', self),
    ...table('-- self time by file', byFile),
    ...table('-- inclusive time by function', incl),
  ].join('\n');
}

async function main(): Promise<void> {
  const [backend = 'memory', workloadId = 'randwrite-4k-qd1', secondsText = '10'] = process.argv.slice(2);
  const seconds = Number(secondsText);
  if (!Number.isInteger(seconds) || seconds < 1 || seconds > 600) throw new Error(`SECONDS must be 1..600, got "${secondsText}"`);
  process.env.BENCH_RUNTIME = String(seconds);
  const c = loadConfig([]);
  if (c === 'help') return;
  const keep = process.env.BENCH_PROFILE_DIR;
  const dir = keep ? path.resolve(keep) : fs.mkdtempSync(path.join(os.tmpdir(), 'nvmirror-profile-'));
  fs.mkdirSync(dir, { recursive: true });
  const sizeBytes = backend === 'engine' ? c.engineSizeBytes : c.sizeBytes;
  let spec: ServerSpec;
  if (backend === 'memory') spec = nvmirrorMemory(c.repoRoot, sizeBytes);
  else if (backend === 'file') spec = nvmirrorFile(c.repoRoot, sizeBytes);
  else if (backend === 'engine') spec = nvmirrorEngine(c.repoRoot, { sizeBytes, nvramBytes: c.nvramBytes, cpIntervalMs: c.cpIntervalMs });
  else throw new Error(`backend must be memory, file or engine, got "${backend}"`);
  const all = [...baseWorkloads(c, sizeBytes), ...engineWorkloads(c, sizeBytes)];
  const w = all.find((x) => x.id === workloadId);
  if (!w) throw new Error(`unknown workload "${workloadId}"; one of: ${all.map((x) => x.id).join(', ')}`);

  await spec.prepare(dir);
  const profDir = path.join(dir, 'prof');
  fs.rmSync(profDir, { recursive: true, force: true });
  const server = await RunningServer.start(spec, dir, path.join(dir, 'p.sock'), ['--cpu-prof', `--cpu-prof-dir=${profDir}`, '--cpu-prof-interval=100']);
  try {
    if (w.prefill) await runFio('prefill', server.uri, prefillOptions(sizeBytes), 'write', path.join(dir, 'prefill.json'), 60);
    const cpu0 = server.cpuSeconds();
    const run = await runFio(w.id, server.uri, w.opts, w.dir, path.join(dir, 'fio.json'), w.expectedS);
    const cpu1 = server.cpuSeconds();
    const r = run.result;
    process.stdout.write(
      `${backend} ${w.label}: ${r.iops.toFixed(0)} IOPS, clat p50 ${r.clatP50Us.toFixed(1)} us, p99 ${r.clatP99Us.toFixed(1)} us; ` +
        `server CPU ${(((cpu1 - cpu0) * 1e6) / Math.max(1, r.ios)).toFixed(1)} us per I/O (incl. ramp) under the profiler\n`,
    );
  } catch (e) {
    await server.kill();
    throw e;
  }
  await server.stop();
  await spec.cleanup(dir);
  const files = fs.readdirSync(profDir).filter((f) => f.endsWith('.cpuprofile'));
  if (files.length !== 1) throw new Error(`expected one .cpuprofile in ${profDir}, found ${files.length}`);
  const prof = JSON.parse(fs.readFileSync(path.join(profDir, files[0] as string), 'utf8')) as CpuProfile;
  process.stdout.write(summarize(prof, c.repoRoot) + '\n');
  if (keep) process.stdout.write(`profile kept in ${path.join(profDir, files[0] as string)}\n`);
  else fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((e: unknown) => {
  process.stderr.write(`profile FAILED: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
});
