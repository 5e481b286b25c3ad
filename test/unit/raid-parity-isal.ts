/**
 * Builds and runs the ISA-L helper (raid-parity-isal.c) for the parity tests and the
 * parity benchmark: ISA-L (Debian's libisal-dev) is an independent implementation of the
 * same P+Q code, so it is both an oracle and a yardstick.
 *
 * Invariants:
 * - The helper is compiled at most once per process, into a fresh temporary directory
 *   that is removed at exit; a missing header, library or compiler is reported as a
 *   reason string, never thrown, so callers decide between skip and failure.
 * - Every run is bounded: HELPER_TIMEOUT_MS and HELPER_OUTPUT_BYTES_MAX.
 */
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

const HELPER_TIMEOUT_MS = 60_000;
const HELPER_OUTPUT_BYTES_MAX = 64 * 1024 * 1024;
const ISAL_HEADER = '/usr/include/isa-l/raid.h';

/** The C source, found from the compiled location (dist/test/unit) or the source tree. */
function helperSource(): string {
  const candidates = [path.join(__dirname, 'raid-parity-isal.c'), path.resolve(__dirname, '../../../test/unit/raid-parity-isal.c')];
  const found = candidates.find((p) => fs.existsSync(p));
  if (found === undefined) throw new Error(`raid-parity-isal.c not found (looked in ${candidates.join(', ')})`);
  return found;
}

let built: { binary: string } | { missing: string } | undefined;

/** The helper's path, or why it cannot be built here (e.g. libisal-dev not installed). */
export function isalHelper(): { binary: string } | { missing: string } {
  if (built) return built;
  if (!fs.existsSync(ISAL_HEADER)) {
    built = { missing: `ISA-L is not installed (${ISAL_HEADER} missing; apt-get install libisal-dev, or run scripts/install-test-deps.sh)` };
    return built;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvmirror-isal-'));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  const binary = path.join(dir, 'parity-isal');
  const cc = process.env.CC ?? 'cc';
  const res = spawnSync(cc, ['-O2', '-Wall', '-Wextra', '-o', binary, helperSource(), '-lisal'], { encoding: 'utf8', timeout: HELPER_TIMEOUT_MS });
  if (res.error || res.status !== 0) {
    built = { missing: `building the ISA-L helper with ${cc} failed: ${res.error?.message ?? res.stderr.trim()}` };
    return built;
  }
  built = { binary };
  return built;
}

function run(binary: string, args: string[], input?: Buffer): Buffer {
  return execFileSync(binary, args, { input, timeout: HELPER_TIMEOUT_MS, maxBuffer: HELPER_OUTPUT_BYTES_MAX });
}

/** ISA-L's xor_gen P, and pq_gen's P and Q, for k >= 2 data columns. */
export function isalGen(binary: string, data: readonly Buffer[]): { xorP: Buffer; p: Buffer; q: Buffer } {
  const n = data[0]!.length;
  const out = run(binary, ['gen', String(data.length), String(n)], Buffer.concat(data));
  if (out.length !== 3 * n) throw new Error(`ISA-L helper wrote ${out.length} bytes, expected ${3 * n}`);
  return { xorP: out.subarray(0, n), p: out.subarray(n, 2 * n), q: out.subarray(2 * n) };
}

/** Data columns x < y rebuilt by ISA-L (matrix inversion + ec_encode_data) from the others and P, Q. */
export function isalDecode(binary: string, columns: readonly Buffer[], x: number, y: number): { dx: Buffer; dy: Buffer } {
  const n = columns[0]!.length;
  const k = columns.length - 2;
  const out = run(binary, ['decode', String(k), String(n), String(x), String(y)], Buffer.concat(columns));
  if (out.length !== 2 * n) throw new Error(`ISA-L helper wrote ${out.length} bytes, expected ${2 * n}`);
  return { dx: out.subarray(0, n), dy: out.subarray(n) };
}

/** ISA-L throughput, MB/s of data per round, timed in C on one thread. op: p (xor_gen), pq (pq_gen), dd (two-data decode). */
export function isalBench(binary: string, op: 'p' | 'pq' | 'dd', k: number, columnBytes: number, rounds: number): number[] {
  const out = run(binary, ['bench', op, String(k), String(columnBytes), String(rounds)]).toString('utf8');
  return out.trim().split('\n').map(Number);
}
