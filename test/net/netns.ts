/**
 * Two "hosts" on one machine for network tests: a pair of Linux network namespaces
 * joined by a veth pair, with processes run inside them and link faults made with the
 * tools this kernel has (no netem here: loss and cuts with nftables, outages with
 * `ip link set down`, bandwidth with a tbf qdisc; delay, stalls and corruption belong to
 * the TCP relay in ./relay.ts, which can run inside a namespace via its CLI mode).
 *
 * Invariants:
 * - namespace names carry a prefix, this process's pid and random bits, so parallel runs
 *   (other engineers, other mocha processes) never collide; interface names are at most
 *   15 characters (IFNAMSIZ - 1) and are created directly inside their namespaces, so
 *   they never appear in the root namespace;
 * - each pair gets its own 10.X.Y.0/24 subnet (X from the pid, Y from a per-process
 *   counter); the addresses exist only inside the pair's namespaces, so a clash with
 *   another process's pair would be harmless anyway;
 * - every process started through a pair is tracked; destroy() kills them, then kills
 *   anything else still inside either namespace (`ip netns pids`), then deletes both
 *   namespaces (which removes the veth pair). destroy() is idempotent;
 * - a process 'exit' hook does the same synchronously for every pair not yet destroyed,
 *   so a failing test (or a mocha --exit) leaks no namespace; so do SIGTERM, SIGINT and
 *   SIGHUP (then the signal is raised again if nothing else handles it). Only SIGKILL of
 *   the test process can leak one (names start with the prefix and the pid, to find them);
 * - fault state lives in namespace a: blackhole() rules in an nftables table of its
 *   own (replaced atomically on every call), rateLimit() as the root qdisc of a's veth.
 *   Both survive linkDown()/linkUp().
 */
import { ChildProcess, spawn, spawnSync, SpawnOptions, StdioOptions } from 'child_process';
import * as crypto from 'crypto';

export type HostName = 'a' | 'b';

export interface Host {
  /** The network namespace's name (as in `ip netns list`). */
  readonly ns: string;
  /** This host's IPv4 address on the veth link (no prefix length). */
  readonly addr: string;
  /** The veth interface's name inside the namespace. */
  readonly dev: string;
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit status, or null when the process died from a signal (see `signal`). */
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface SpawnInNsOptions {
  stdio?: StdioOptions;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface ExecInNsOptions {
  /** Written to the process's stdin, which is then closed. */
  input?: string | Buffer;
  /** Killed (SIGKILL) after this long; the result then has signal 'SIGKILL'. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Time a spawned process gets after SIGTERM before destroy() sends SIGKILL. */
export const KILL_GRACE_MS = 2_000;
/** Default limit for exec() and for every `ip`/`nft`/`tc` command the harness runs. */
export const EXEC_TIMEOUT_MS = 30_000;
/** Longest interface name Linux accepts (IFNAMSIZ 16, less the NUL). */
export const MAX_IFNAME_CHARS = 15;
/** tbf parameters for rateLimit(): bucket size and the most a packet may queue. */
export const TBF_BURST = '32kbit';
export const TBF_LATENCY = '400ms';

const NFT_TABLE = 'nvmirror_test';

/** PATH with the sbin directories, so `ip`, `nft` and `tc` are found from any shell. */
export const TOOL_ENV: NodeJS.ProcessEnv = {
  ...process.env,
  PATH: `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/local/sbin:/usr/sbin:/sbin`,
};

/** Runs a command (not in a namespace) and collects its output; never rejects on exit status. */
function run(cmd: string, args: readonly string[], opts: ExecInNsOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: opts.env ?? TOOL_ENV,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    });
    collect(child, opts).then(resolve, reject);
  });
}

function collect(child: ChildProcess, opts: ExecInNsOptions): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? EXEC_TIMEOUT_MS);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        code,
        signal,
      });
    });
    // A child that exits without reading its stdin makes our write fail with EPIPE.
    child.stdin?.on('error', () => undefined);
    child.stdin?.end(opts.input ?? '');
  });
}

/** Runs a command that must succeed; the error names the command and its stderr. */
async function must(cmd: string, args: readonly string[], input?: string): Promise<string> {
  const r = await run(cmd, args, input !== undefined ? { input } : {});
  if (r.code !== 0) {
    const why = r.stderr.trim() || (r.signal !== null ? `killed by ${r.signal}` : `exit ${r.code}`);
    throw new Error(`${cmd} ${args.join(' ')}: ${why}`);
  }
  return r.stdout;
}

let availability: Promise<string | null> | undefined;

/**
 * null when this process can make namespace pairs and faults (root, `ip`, `tc`, `nft`,
 * and creating a namespace really works), else a one-line reason. Cached.
 * Callers: fail under CI (process.env.CI === 'true'), skip with the reason elsewhere.
 */
export function netnsAvailable(): Promise<string | null> {
  availability ??= (async (): Promise<string | null> => {
    if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
    if (process.getuid?.() !== 0) return 'network namespaces need root (run the tests as root)';
    for (const [tool, args, pkg] of [
      ['ip', ['-V'], 'iproute2'],
      ['tc', ['-V'], 'iproute2'],
      ['nft', ['--version'], 'nftables'],
    ] as const) {
      const r = await run(tool, args).catch(() => null);
      if (r === null || r.code !== 0) return `no \`${tool}\` (apt-get install ${pkg}; scripts/install-test-deps.sh does)`;
    }
    const probe = `nvt-probe-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
    const added = await run('ip', ['netns', 'add', probe]);
    if (added.code !== 0) return `ip netns add fails: ${added.stderr.trim().split('\n')[0] ?? ''}`;
    await run('ip', ['netns', 'del', probe]);
    return null;
  })();
  return availability;
}

/** Second octet of this process's subnets, and the counter for the third. */
const SUBNET_X = 100 + (process.pid % 100);
let subnetCounter = 0;

/** Pairs not yet destroyed, for the synchronous 'exit' cleanup. */
const live = new Set<HostPair>();
let exitHookInstalled = false;

/** Signals whose default action ends the process without an 'exit' event. */
const FATAL_SIGNALS: readonly NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

function destroyAllSync(): void {
  for (const pair of [...live]) pair.destroySync();
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', destroyAllSync);
  // A signal that would kill us cleans up first, then (when nobody else handles it)
  // is raised again with our handler gone, so the process still dies of it.
  for (const sig of FATAL_SIGNALS) {
    const onSignal = (): void => {
      destroyAllSync();
      process.off(sig, onSignal);
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

export interface HostPairOptions {
  /** Start of both namespace names (default 'nvt-'); keep it short and [a-z0-9-]. */
  prefix?: string;
}

/** Creates two namespaces joined by a veth pair, both ends and both `lo` up. */
export async function createHostPair(opts: HostPairOptions = {}): Promise<HostPair> {
  const prefix = opts.prefix ?? 'nvt-';
  if (!/^[A-Za-z0-9_.-]{0,32}$/.test(prefix)) throw new Error(`bad namespace prefix ${JSON.stringify(prefix)}`);
  const rand = crypto.randomBytes(3).toString('hex');
  const base = `${prefix}${process.pid}-${rand}`;
  const y = subnetCounter++ % 256;
  const a: Host = { ns: `${base}-a`, addr: `10.${SUBNET_X}.${y}.1`, dev: `nv${rand}a` };
  const b: Host = { ns: `${base}-b`, addr: `10.${SUBNET_X}.${y}.2`, dev: `nv${rand}b` };
  if (a.dev.length > MAX_IFNAME_CHARS) throw new Error(`interface name ${a.dev} too long`);
  const pair = new HostPair(a, b);
  installExitHook();
  live.add(pair);
  try {
    await must('ip', ['netns', 'add', a.ns]);
    await must('ip', ['netns', 'add', b.ns]);
    await must('ip', ['link', 'add', a.dev, 'netns', a.ns, 'type', 'veth', 'peer', 'name', b.dev, 'netns', b.ns]);
    for (const h of [a, b]) {
      await must('ip', ['-n', h.ns, 'addr', 'add', `${h.addr}/24`, 'dev', h.dev]);
      await must('ip', ['-n', h.ns, 'link', 'set', 'dev', 'lo', 'up']);
      await must('ip', ['-n', h.ns, 'link', 'set', 'dev', h.dev, 'up']);
    }
  } catch (e) {
    await pair.destroy();
    throw e;
  }
  return pair;
}

export class HostPair {
  private readonly children = new Set<ChildProcess>();
  private destroying: Promise<void> | undefined;
  private nftReady = false;

  constructor(
    readonly a: Host,
    readonly b: Host,
  ) {}

  host(name: HostName): Host {
    return name === 'a' ? this.a : this.b;
  }

  get destroyed(): boolean {
    return this.destroying !== undefined;
  }

  /**
   * Starts `cmd args` inside the host's namespace (`ip netns exec`, which execs, so the
   * ChildProcess's pid is the command's). stdio defaults to pipes. Killed by destroy().
   */
  spawn(host: HostName, cmd: string, args: readonly string[] = [], opts: SpawnInNsOptions = {}): ChildProcess {
    if (this.destroyed) throw new Error('HostPair: spawn after destroy');
    const options: SpawnOptions = {
      stdio: opts.stdio ?? ['pipe', 'pipe', 'pipe'],
      env: opts.env ?? TOOL_ENV,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    };
    const child = spawn('ip', ['netns', 'exec', this.host(host).ns, cmd, ...args], options);
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    child.once('error', () => this.children.delete(child));
    return child;
  }

  /** Runs `cmd args` inside the host's namespace to completion; never rejects on exit status. */
  async exec(host: HostName, cmd: string, args: readonly string[] = [], opts: ExecInNsOptions = {}): Promise<ExecResult> {
    const spawnOpts: SpawnInNsOptions = { stdio: ['pipe', 'pipe', 'pipe'] };
    if (opts.env !== undefined) spawnOpts.env = opts.env;
    if (opts.cwd !== undefined) spawnOpts.cwd = opts.cwd;
    return collect(this.spawn(host, cmd, args, spawnOpts), opts);
  }

  /** Sets both veth ends down: the route goes, connects fail, live connections see silence. */
  async linkDown(): Promise<void> {
    await must('ip', ['-n', this.a.ns, 'link', 'set', 'dev', this.a.dev, 'down']);
    await must('ip', ['-n', this.b.ns, 'link', 'set', 'dev', this.b.dev, 'down']);
  }

  /** Sets both veth ends up again (addresses and qdiscs were kept). */
  async linkUp(): Promise<void> {
    await must('ip', ['-n', this.a.ns, 'link', 'set', 'dev', this.a.dev, 'up']);
    await must('ip', ['-n', this.b.ns, 'link', 'set', 'dev', this.b.dev, 'up']);
  }

  /**
   * Drops `percent` % of the packets between a and b, in both directions, each packet
   * independently (nftables in namespace a: output to b's address and input from it).
   * 100 is a cut that TCP does not notice: no RST, no FIN, no ICMP; connections live on
   * and resume when it is lifted. `on` false lifts it (percent is then ignored).
   */
  async blackhole(on: boolean, percent = 100): Promise<void> {
    if (on && !(Number.isInteger(percent) && percent >= 1 && percent <= 100)) {
      throw new Error(`blackhole: percent must be an integer in 1..100, got ${percent}`);
    }
    // nft rejects `numgen random mod 100 < 100` (out of range): 100 % is a plain drop.
    const match = percent >= 100 ? '' : ` numgen random mod 100 < ${percent}`;
    const lines = [
      `table inet ${NFT_TABLE} {`,
      '  chain out { type filter hook output priority 0; policy accept; }',
      '  chain in { type filter hook input priority 0; policy accept; }',
      '}',
      `flush chain inet ${NFT_TABLE} out`,
      `flush chain inet ${NFT_TABLE} in`,
    ];
    if (on) {
      lines.push(`add rule inet ${NFT_TABLE} out ip daddr ${this.b.addr}${match} drop`);
      lines.push(`add rule inet ${NFT_TABLE} in ip saddr ${this.b.addr}${match} drop`);
    } else if (!this.nftReady) {
      return; // nothing was ever added: nothing to lift (and no need for nft)
    }
    await must('ip', ['netns', 'exec', this.a.ns, 'nft', '-f', '-'], lines.join('\n') + '\n');
    this.nftReady = true;
  }

  /** Limits a's egress (a -> b only) to `mbit` Mbit/s with a tbf qdisc; null removes it. */
  async rateLimit(mbit: number | null): Promise<void> {
    const dev = ['dev', this.a.dev, 'root'];
    if (mbit === null) {
      const r = await run('ip', ['netns', 'exec', this.a.ns, 'tc', 'qdisc', 'del', ...dev]);
      // Deleting when no root qdisc was added is not an error for us.
      if (r.code !== 0 && !/handle of zero|No such file|Invalid handle/i.test(r.stderr)) {
        throw new Error(`tc qdisc del: ${r.stderr.trim()}`);
      }
      return;
    }
    if (!(mbit > 0 && Number.isFinite(mbit))) throw new Error(`rateLimit: bad rate ${mbit} Mbit/s`);
    const kbit = Math.max(1, Math.round(mbit * 1000));
    await must('ip', [
      'netns', 'exec', this.a.ns, 'tc', 'qdisc', 'replace', ...dev,
      'tbf', 'rate', `${kbit}kbit`, 'burst', TBF_BURST, 'latency', TBF_LATENCY,
    ]);
  }

  /**
   * Kills every process this pair started (SIGTERM, SIGKILL after KILL_GRACE_MS) and any
   * other process left in either namespace, then deletes both namespaces. Idempotent.
   */
  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      const waits = [...this.children].map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            const t = setTimeout(() => {
              c.kill('SIGKILL');
              resolve();
            }, KILL_GRACE_MS);
            c.once('exit', () => {
              clearTimeout(t);
              resolve();
            });
            c.kill('SIGTERM');
          }),
      );
      await Promise.all(waits);
      for (const h of [this.a, this.b]) {
        const pids = await run('ip', ['netns', 'pids', h.ns]).catch(() => null);
        for (const p of pids?.stdout.split(/\s+/) ?? []) killPid(p);
        await run('ip', ['netns', 'del', h.ns]).catch(() => null);
      }
      live.delete(this);
    })();
    return this.destroying;
  }

  /** The 'exit'-hook variant of destroy(): synchronous, SIGKILL only. */
  destroySync(): void {
    for (const c of this.children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const h of [this.a, this.b]) {
      const pids = spawnSync('ip', ['netns', 'pids', h.ns], { encoding: 'utf8', env: TOOL_ENV, timeout: EXEC_TIMEOUT_MS });
      for (const p of (pids.stdout ?? '').split(/\s+/)) killPid(p);
      spawnSync('ip', ['netns', 'del', h.ns], { env: TOOL_ENV, timeout: EXEC_TIMEOUT_MS, stdio: 'ignore' });
    }
    live.delete(this);
    this.destroying ??= Promise.resolve();
  }
}

function killPid(p: string): void {
  const pid = Number(p);
  if (!Number.isSafeInteger(pid) || pid <= 1 || pid === process.pid) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}
