/**
 * Mirroring between two hosts: the source (`serve DIR --mirror-to`) in namespace a, the
 * receiver (`receive`) in namespace b, joined by a veth pair. NBD clients reach both
 * through Unix sockets (the namespaces share the file system). Wire bytes are read from
 * the veth's own counters, not from nvmirror.
 */
import * as assert from 'assert';
import * as cp from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { TOOL_ENV, createHostPair, netnsAvailable, type HostPair } from '../net/netns';
import { BIN, ROOT, md5OfExport, sh, sourceStatus, until } from './helpers';
import { memoryOf, samplingMemory } from './faults-harness';
import { controlRequest } from '../../src/volume/engine-control';
import { BASELINE_MARKER_NAME } from '../../src/mirror/mirror-dir';
import { CMD, RawConn, negotiate, request } from '../e2e/rawnbd';

const PORT = 17011;
/** The source's --metrics port, on the loopback of namespace a (scraped from inside it). */
const METRICS_PORT = 17012;

function nvramLastSeq(dir: string): number {
  try {
    return (JSON.parse(sh(BIN, ['status', dir, '--json'])) as { nvram: { lastSeq: number } }).nvram.lastSeq;
  } catch {
    return 0;
  }
}

async function txBytes(pair: HostPair): Promise<number> {
  const a = pair.host('a');
  const r = await pair.exec('a', 'cat', [`/sys/class/net/${a.dev}/statistics/tx_bytes`]);
  const b = await pair.exec('a', 'cat', [`/sys/class/net/${a.dev}/statistics/rx_bytes`]);
  return Number(r.stdout.trim()) + Number(b.stdout.trim());
}

describe('mirror: two hosts (network namespaces)', function () {
  this.timeout(180_000);
  let pair: HostPair;
  let tmp: string;

  before(async function () {
    const why = await netnsAvailable();
    if (why !== null) {
      if (process.env.CI === 'true') throw new Error(`network namespaces unavailable in CI: ${why}`);
      this.skip();
    }
  });

  beforeEach(async () => {
    pair = await createHostPair({ prefix: 'nvm' });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-mirror-'));
  });

  afterEach(async function () {
    if (this.currentTest?.state === 'failed') {
      for (const f of ['sv.log', 'rx.log']) {
        const p = path.join(tmp, f);
        if (fs.existsSync(p)) process.stderr.write(`--- ${f}\n${fs.readFileSync(p, 'utf8').split('\n').slice(-30).join('\n')}\n`);
      }
    }
    await pair.destroy();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  interface Setup {
    src: string;
    srcSock: string;
    expSock: string;
    uuid: string;
    mode: 'sync' | 'async';
    extra: string[];
    /** Environment added to the receiver's (e.g. NVMIRROR_MIRROR_NATIVE=0). */
    rxEnv?: NodeJS.ProcessEnv;
    source?: cp.ChildProcess;
    receiver?: cp.ChildProcess;
  }

  async function startReceiver(s: Setup, link: string[] = ['--mirror-insecure'], extra: string[] = []): Promise<void> {
    fs.rmSync(s.expSock, { force: true });
    const b = pair.host('b');
    s.receiver = pair.spawn('b', BIN, ['receive', path.join(tmp, 'dst'), '--listen', `${b.addr}:${PORT}`, '--export-socket', s.expSock, ...link, ...extra], {
      stdio: ['ignore', 'ignore', fs.openSync(path.join(tmp, 'rx.log'), 'a')],
      ...(s.rxEnv ? { env: { ...TOOL_ENV, ...s.rxEnv } } : {}),
    });
    await until('receiver socket', () => fs.existsSync(s.expSock), 90_000);
  }

  async function startSource(s: Setup, link: string[] = ['--mirror-insecure'], resume = false): Promise<void> {
    fs.rmSync(s.srcSock, { force: true });
    const b = pair.host('b');
    const mirrorArgs = resume ? [] : ['--mirror-to', `${b.addr}:${PORT}`, '--mirror-mode', s.mode, ...link];
    s.source = pair.spawn('a', BIN, ['serve', s.src, '--socket', s.srcSock, '--cp-interval', '300', ...mirrorArgs, '--mirror-stall-timeout', '2000', ...s.extra], {
      stdio: ['ignore', 'ignore', fs.openSync(path.join(tmp, 'sv.log'), 'a')],
    });
    await until('source socket', () => fs.existsSync(s.srcSock), 90_000);
  }

  async function stop(p: cp.ChildProcess | undefined, signal: NodeJS.Signals): Promise<void> {
    if (!p || p.exitCode !== null) return;
    const done = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await done;
  }

  function setup(mode: 'sync' | 'async', extra: string[] = [], sizeArg = '256M'): Setup {
    const src = path.join(tmp, 'src');
    sh(BIN, ['create', src, '--size', sizeArg, '--nvram-size', '8M']);
    const uuid = (JSON.parse(fs.readFileSync(path.join(src, 'nvmirror.json'), 'utf8')) as { uuid: string }).uuid;
    return { src, srcSock: path.join(tmp, 'src.sock'), expSock: path.join(tmp, 'exp.sock'), uuid, mode, extra };
  }

  async function start(mode: 'sync' | 'async', extra: string[] = [], sizeArg = '256M', link?: string[], rx: { env?: NodeJS.ProcessEnv; args?: string[] } = {}): Promise<Setup> {
    const s = setup(mode, extra, sizeArg);
    if (rx.env) s.rxEnv = rx.env;
    const src = s.src;
    await startReceiver(s, link, rx.args);
    await startSource(s, link);
    await until('mirror in sync', () => sourceStatus(src)?.state === 'in-sync');
    return s;
  }

  function baselines(): number {
    return (fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8').match(/mirror baseline started/g) ?? []).length;
  }

  function checkMirror(s: Setup): void {
    const out = sh(BIN, ['check', path.join(tmp, 'dst', s.uuid)]);
    assert.match(out, /: ok$/m, out);
  }

  async function inSyncAndIdentical(s: Setup): Promise<void> {
    // A CP that holds every write so far, then the destination's root must equal the source's.
    const r = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r.ok, `checkpoint: ${String(r.error)}`);
    const cpNow = r.cpNumber as number;
    const st = await until('roots equal', () => {
      const m = sourceStatus(s.src);
      return m && m.state === 'in-sync' && m.rootsEqual && m.destCp === m.sourceCp && m.destCp >= cpNow ? m : undefined;
    });
    assert.ok(st.destCp > 0);
    const a = md5OfExport(`nbd+unix:///?socket=${s.srcSock}`);
    const b = md5OfExport(`nbd+unix:///${s.uuid}?socket=${s.expSock}`);
    assert.strictEqual(b, a, 'the mirror export differs from the source');
  }

  // The receiver takes plain streams on its native thread; NVMIRROR_MIRROR_NATIVE=0 keeps
  // them on the event loop (the path TLS links take), checked here over plaintext too.
  for (const [mode, eventLoop] of [['sync', false], ['async', false], ['sync', true]] as const) {
    it(`${mode}${eventLoop ? ' (receiver on the event loop, NVMIRROR_MIRROR_NATIVE=0)' : ''}: after fio with verify the mirror's root equals the source's and both exports are byte-identical`, async () => {
      const withMetrics = mode === 'sync' && !eventLoop;
      const rx = { args: ['--log-level', 'debug', ...(withMetrics ? ['--metrics', `127.0.0.1:${METRICS_PORT}`] : [])], ...(eventLoop ? { env: { NVMIRROR_MIRROR_NATIVE: '0' } } : {}) };
      const s = await start(mode, mode === 'sync' && !eventLoop ? ['--metrics', `127.0.0.1:${METRICS_PORT}`] : [], '256M', undefined, rx);
      const before = await txBytes(pair);
      sh('fio', ['--name=m', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${s.srcSock}`, '--rw=randwrite', '--bs=4k', '--size=64M', '--io_size=16M',
        '--iodepth=16', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=1', `--directory=${tmp}`], 120_000);
      if (mode === 'sync' && !eventLoop) {
        // fsync after every write: the NBD threads answer those FLUSHes themselves, with the
        // destination's durable ack asked for on the link (nv_append.h), not the event loop.
        sh('fio', ['--name=f', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${s.srcSock}`, '--rw=randwrite', '--bs=4k', '--size=64M', '--io_size=1M',
          '--iodepth=1', '--fsync=1', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=1', `--directory=${tmp}`], 120_000);
        const flushes = (): number => (JSON.parse(sh(BIN, ['status', s.src, '--json'])) as { threadFlushes?: number }).threadFlushes ?? 0;
        const f0 = flushes();
        assert.ok(f0 >= 200, `FLUSHes answered on the NBD threads under the sync mirror: ${f0}`);
        // The receive thread's durable acks moved the log's durable mark (header bytes 80..88,
        // src/mirror/dest-log.ts): what tells damage from a power loss's end at a promote.
        const header = Buffer.alloc(96);
        const fd = fs.openSync(path.join(tmp, 'dst', s.uuid, 'source.log'), 'r');
        fs.readSync(fd, header, 0, 96, 0);
        fs.closeSync(fd);
        assert.ok(header.readBigUInt64LE(80) >= 200n, `the mirror's log's durable mark after ${f0} FLUSHes: ${header.readBigUInt64LE(80)}`);
        // FUA WRITEs too: appended, then answered by such a round (read back after the CP below).
        // One may take the shared path when it meets a moment the threads cannot append (a
        // CP switching halves holds the log): a batch of 8 is repeated, up to 3 times, until
        // 8 thread rounds are counted.
        const fuaBatch = (): void => {
          sh('qemu-io', ['-f', 'raw', ...Array.from({ length: 8 }, (_, i) => ['-c', `write -f -P 0x${(0x40 + i).toString(16)} ${90 + i}M 64k`]).flat(), `nbd+unix:///?socket=${s.srcSock}`]);
        };
        const rounds: number[] = [];
        for (let b = 0; b < 3 && (rounds.length === 0 || rounds[rounds.length - 1]! < 8); b++) {
          fuaBatch();
          rounds.push(flushes() - f0);
        }
        assert.ok(rounds[rounds.length - 1]! >= 8, `FUA WRITEs answered by flush rounds on the NBD threads after each batch of 8: ${rounds.join(', ')}`);
      }
      sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 100M 8M', `nbd+unix:///?socket=${s.srcSock}`]);
      await inSyncAndIdentical(s);
      const wire = (await txBytes(pair)) - before;
      const client = 16 * 1024 * 1024 + 8 * 1024 * 1024;
      process.stdout.write(`      ${mode}: ${wire} bytes on the veth for ${client} client bytes written (${(wire / client).toFixed(2)}x)\n`);
      // Every byte on the veth, TCP/IP headers and acks included: resending the data at the CP would be >= 2x.
      assert.ok(wire / client < 1.6, `wire/client ${(wire / client).toFixed(2)}: data travels twice`);
      if (mode === 'sync') {
        const m = sourceStatus(s.src)!;
        assert.ok(m.refsSent > 0, 'sync CPs sent no block as a reference');
        // Address blocks travel as deltas (a sync CP's edited nodes: from the tree's word runs).
        assert.ok(m.deltasSent > 0, 'sync CPs sent no block as a delta');
        // The human status: mode, state, both CPs, roots, and what the references saved.
        const human = sh(BIN, ['status', s.src]);
        assert.match(human, /^mirror +sync to \S+ \(available\): in-sync$/m, human);
        assert.match(human, /CP \d+ here, CP \d+ there \(roots equal\)/, human);
        assert.match(human, /CP blocks as references \d+ \([\d.]+ [KMG]iB saved\), as deltas \d+, as data \d+/, human);
      }
      // Every CP the destination committed came back with a root equal to the source's.
      const m = sourceStatus(s.src)!;
      assert.ok(m.cpsAcknowledged >= 3, `only ${m.cpsAcknowledged} CPs acknowledged`);
      assert.strictEqual(m.rootMismatches, 0);
      const rxLog = fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8');
      // Converged without a stream refused on the way (a bad delta or reference would be, then resynced).
      assert.doesNotMatch(rxLog, /refused the stream/);
      assert.strictEqual(/mirror stream on the native receive thread/.test(rxLog), !eventLoop, `the receiver ${eventLoop ? 'used' : 'did not use'} its native thread`);
      if (mode === 'sync' && !eventLoop) {
        // The same figures in the Prometheus exposition.
        const get = `require('http').get('http://127.0.0.1:${METRICS_PORT}/metrics', (r) => { let b = ''; r.on('data', (d) => (b += d)); r.on('end', () => process.stdout.write(b)); })`;
        const text = (await pair.exec('a', 'node', ['-e', get], { timeoutMs: 10_000 })).stdout;
        assert.match(text, /^nvmirror_mirror_state\{state="in-sync"\} 1$/m);
        assert.match(text, /^nvmirror_mirror_root_mismatches 0$/m);
        const refs = /^nvmirror_mirror_cp_blocks\{as="reference"\} (\d+)$/m.exec(text);
        assert.ok(refs && Number(refs[1]) > 0, 'no references counted in the metrics');
        // The destination's, per source, and its exports' NBD server (the md5 reads above).
        const rxText = (await pair.exec('b', 'node', ['-e', get], { timeoutMs: 10_000 })).stdout;
        const one = (re: RegExp): number => {
          const x = re.exec(rxText);
          assert.ok(x, `${re.source} in the receiver's metrics:\n${rxText.slice(0, 3000)}`);
          return Number(x[1]);
        };
        const src = `source="${s.uuid}"`;
        assert.equal(one(new RegExp(`^nvmirror_receiver_committed_cp\\{${src}\\} (\\d+)$`, 'm')), sourceStatus(s.src)!.destCp);
        assert.equal(one(new RegExp(`^nvmirror_receiver_source_connected\\{${src}\\} (\\d+)$`, 'm')), 1);
        assert.ok(one(new RegExp(`^nvmirror_receiver_cp_blocks_total\\{${src},as="reference"\\} (\\d+)$`, 'm')) > 0);
        assert.ok(one(new RegExp(`^nvmirror_receiver_records_total\\{${src},outcome="stored"\\} (\\d+)$`, 'm')) > 0);
        assert.ok(one(new RegExp(`^nvmirror_receiver_bytes_in_total\\{${src}\\} (\\d+)$`, 'm')) >= 24 * 1024 * 1024);
        assert.equal(one(new RegExp(`^nvmirror_receiver_baseline_partial\\{${src}\\} (\\d+)$`, 'm')), 0);
        assert.ok(one(/^nvmirror_nbd_requests_total\{command="read"\} (\d+)$/m) > 0, 'the exports\' reads counted');
      }
      const v = sh(BIN, ['verify', s.src]);
      assert.match(v, /^identical at CP \d+ \(roots equal, superblocks equal\)$/m, v);
      // And from the destination's side.
      const vd = sh(BIN, ['verify', path.join(tmp, 'dst', s.uuid)]);
      assert.match(vd, /^identical at CP \d+ \(roots equal, superblocks equal\)$/m, vd);
    });
  }

  it('sync: a sequential write costs about one copy on the wire (CP blocks travel as references)', async () => {
    const s = await start('sync');
    const before = await txBytes(pair);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 64M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const wire = (await txBytes(pair)) - before;
    const ratio = wire / (64 * 1024 * 1024);
    process.stdout.write(`      sequential 64 MiB: wire/client bytes ${ratio.toFixed(3)}\n`);
    assert.ok(ratio < 1.08, `wire/client ${ratio.toFixed(3)}: CP data was sent again`);
  });

  it('link cut during writes: available policy keeps serving, resync after restore, devices identical', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await pair.blackhole(true, 100);
    // Writes go on (the peer stops acknowledging; after the stall timeout the source drops it).
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 8M 4M', '-c', 'write -P 0x23 20M 1M', `nbd+unix:///?socket=${s.srcSock}`], 60_000);
    await until('source marks the mirror disconnected', () => sourceStatus(s.src)?.connected === false, 20_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x24 30M 2M', `nbd+unix:///?socket=${s.srcSock}`]);
    // verify meanwhile: one line saying why it cannot, not a bare "not connected".
    const v = cp.spawnSync(BIN, ['verify', s.src], { encoding: 'utf8' });
    assert.equal(v.status, 1);
    assert.match(v.stderr, /^nvmirror: the mirror is not connected( \(.+\))?: verify compares both sides while the destination's receiver runs and the link is up \(see nvmirror status\)\n$/);
    await pair.blackhole(false);
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x24 30M 2M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('a block of the source that fails verification is repaired from the mirror (the read gets the right data, the bad copy is rewritten, status counts it); with the mirror away the read fails with EIO', async () => {
    const s = await start('sync');
    const uri = `nbd+unix:///?socket=${s.srcSock}`;
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 1M 4k', '-c', 'write -P 0x5d 5M 4k', '-c', 'write -P 0x5e 9M 4k', uri]);
    await inSyncAndIdentical(s); // a CP holds both blocks and the destination committed it
    const member = path.join(s.src, 'member-0.img');
    /** The offset of the one 4 KiB block of the member filled with byte b. */
    const findBlock = (b: number, file = member): number => {
      const want = Buffer.alloc(4096, b);
      const fd = fs.openSync(file, 'r');
      try {
        const chunk = Buffer.alloc(16 * 1024 * 1024);
        const found: number[] = [];
        for (let off = 0; ; off += chunk.length) {
          const n = fs.readSync(fd, chunk, 0, chunk.length, off);
          for (let i = 0; i + 4096 <= n; i += 4096) if (chunk[i] === b && chunk.subarray(i, i + 4096).equals(want)) found.push(off + i);
          if (n < chunk.length) break;
        }
        assert.strictEqual(found.length, 1, `blocks of 0x${b.toString(16)} in the member: ${found.join(', ')}`);
        return found[0]!;
      } finally {
        fs.closeSync(fd);
      }
    };
    const damage = (off: number, file = member): void => {
      const fd = fs.openSync(file, 'r+');
      try {
        fs.writeSync(fd, Buffer.from([0xff]), 0, 1, off + 100);
      } finally {
        fs.closeSync(fd);
      }
    };
    const errors = (): { checksum: number; io: number; repaired: number } => (JSON.parse(sh(BIN, ['status', s.src, '--json'])) as { errors: { checksum: number; io: number; repaired: number } }).errors;
    const at5c = findBlock(0x5c);
    const at5d = findBlock(0x5d);
    damage(at5c);
    sh('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5c 1M 4k', uri]);
    assert.deepStrictEqual(errors(), { checksum: 0, io: 0, repaired: 1 });
    assert.strictEqual(findBlock(0x5c), at5c, 'the bad copy was rewritten in place');
    assert.match(sh(BIN, ['status', s.src]), /errors: +No known data errors; 1 block\(s\) failed verification here and were repaired from the mirror/);
    assert.match(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'), new RegExp(`block at pba ${at5c / 4096} failed verification; served the copy from the mirror at .*, and rewrote ours`));
    // `check` of the served volume reads every block: it repairs what it finds the same way.
    const at5e = findBlock(0x5e);
    damage(at5e);
    const chk = sh(BIN, ['check', s.src]);
    assert.match(chk, /1 block\(s\) failed verification on this disk and were repaired from the mirror/);
    assert.match(chk, /: ok$/m);
    assert.strictEqual(findBlock(0x5e), at5e, 'rewritten by the check');
    assert.deepStrictEqual(errors(), { checksum: 0, io: 0, repaired: 2 });
    // A block of the mirror that fails verification: a reader of the export gets the
    // source's copy (it verifies), and the mirror's own is rewritten (the reader is on
    // the committed CP, which uses the block); status says so, check is clean after.
    const mirrorMember = path.join(tmp, 'dst', s.uuid, 'member-0.img');
    const m5d = findBlock(0x5d, mirrorMember);
    damage(m5d, mirrorMember);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x5d 5M 4k', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
    await until('the mirror\'s block rewritten', () => /1 block\(s\) of this mirror failed verification and were served from the source's copy, 1 rewritten here/.test(sh(BIN, ['status', path.join(tmp, 'dst')])) || undefined, 10_000);
    assert.strictEqual(findBlock(0x5d, mirrorMember), m5d, 'rewritten in place');
    // `check` of the mirror while its receiver runs: the receiver checks it (its CP pinned)
    // and repairs what fails from the source the same way.
    const m5e = findBlock(0x5e, mirrorMember);
    damage(m5e, mirrorMember);
    const mchk = sh(BIN, ['check', path.join(tmp, 'dst', s.uuid)]);
    assert.match(mchk, /checked by the receiver \(pid \d+\) on CP \d+/);
    assert.match(mchk, /1 block\(s\) failed verification on this disk and were repaired from the source's copy, 1 rewritten here/);
    assert.match(mchk, /: ok$/m);
    assert.strictEqual(findBlock(0x5e, mirrorMember), m5e, 'rewritten by the check');
    assert.match(sh(BIN, ['status', path.join(tmp, 'dst')]), /2 block\(s\) of this mirror failed verification and were served from the source's copy, 2 rewritten here/);
    // Without the mirror nothing can repair it: the read is refused, loudly.
    await stop(s.receiver, 'SIGTERM');
    await until('source sees the mirror gone', () => sourceStatus(s.src)?.connected === false, 30_000);
    damage(at5d);
    const r = cp.spawnSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5d 5M 4k', uri], { encoding: 'utf8', timeout: 60_000 });
    assert.match(`${r.stdout}${r.stderr}`, /Input\/output error/, 'the damaged block is refused');
    assert.deepStrictEqual(errors(), { checksum: 1, io: 0, repaired: 2 });
  });

  it('strict policy: writes fail with EIO while the peer is cut off', async () => {
    const s = await start('sync', ['--mirror-policy', 'strict']);
    await pair.blackhole(true, 100);
    await until('source marks the mirror disconnected', () => {
      try {
        sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 64k', `nbd+unix:///?socket=${s.srcSock}`], 30_000);
      } catch {
        /* fine */
      }
      return sourceStatus(s.src)?.connected === false;
    }, 30_000);
    const r = cp.spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 64k', `nbd+unix:///?socket=${s.srcSock}`], { encoding: 'utf8', timeout: 30_000 });
    assert.match(r.stdout + r.stderr, /Input\/output error/);
    await pair.blackhole(false);
    await inSyncAndIdentical(s);
  });

  it('writes during a baseline: available answers them from the local NVRAM within a bounded queue (a stopped destination is dropped after the stall timeout; running again, it gets the baseline), strict fails them with EIO; the mirror gets them', async () => {
    // The destination acknowledges none of the stream's records until the baseline's CP
    // commits (it holds nothing before them): a write that waited for its ack waited for
    // the whole baseline, and past the stall timeout (2 s here) dropped the connection.
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 48M', `nbd+unix:///?socket=${s.srcSock}`], 60_000);
    await inSyncAndIdentical(s);
    const svLog = path.join(tmp, 'sv.log');
    const baselineOf = async (policy: 'available' | 'strict'): Promise<number> => {
      await stop(s.receiver, 'SIGKILL');
      await stop(s.source, 'SIGTERM');
      fs.rmSync(path.join(tmp, 'dst'), { recursive: true, force: true });
      await pair.rateLimit(40); // 48 MiB: ~10 s of baseline
      await startReceiver(s);
      s.extra = ['--mirror-policy', policy];
      const logFrom = fs.existsSync(svLog) ? fs.statSync(svLog).size : 0;
      await startSource(s);
      await until('baseline running', () => sourceStatus(s.src)?.state === 'baseline' || undefined, 60_000);
      return logFrom;
    };
    const disconnects = (from: number): string[] => fs.readFileSync(svLog, 'utf8').slice(from).split('\n').filter((l) => /mirror disconnected/.test(l));

    const from = await baselineOf('available');
    // The new mirror has nothing committed to read yet, and says so.
    const early = cp.spawnSync('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', `nbd+unix:///${s.uuid}?socket=${s.expSock}`], { encoding: 'utf8', timeout: 30_000 });
    assert.match(early.stdout + early.stderr, /the mirror's baseline is in progress \(no committed CP to read yet\)/);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x62 1M 64k', '-c', 'flush', '-c', 'write -P 0x63 2M 4k', `nbd+unix:///?socket=${s.srcSock}`], 30_000);
    const during = sourceStatus(s.src);
    assert.strictEqual(during?.state, 'baseline', `the writes were answered only after the baseline: ${JSON.stringify(during)}`);
    assert.deepStrictEqual(disconnects(from), [], 'the writes during the baseline cost the connection');
    // Not waiting for the destination is not queueing without a bound: 3 s of 64 KiB writes
    // at QD32 through the 40 Mbit link go at the link's pace once the queue is full, and
    // the source's RSS grows by that bound at most (without it: ~90 MiB/s here).
    // fio runs beside the sampler (a spawnSync would stop the event loop that samples).
    const runFio = (offset: string): Promise<{ code: number | null; err: string }> => new Promise((resolve) => {
      const fioArgs = ['--name=q', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${s.srcSock}`, '--rw=randwrite', '--bs=64k', '--iodepth=32',
        `--offset=${offset}`, '--size=64M', '--time_based', '--runtime=3', '--thread', `--directory=${tmp}`];
      const f = cp.spawn('fio', fioArgs, { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      f.stderr.on('data', (d: Buffer) => (err += d.toString()));
      const kill = setTimeout(() => f.kill('SIGKILL'), 60_000);
      f.on('exit', (code) => {
        clearTimeout(kill);
        resolve({ code, err });
      });
    });
    /** Peak growth of the source's RSS over 3 s of fio beside it, in bytes. */
    const fioGrowth = async (offset: string, what: string): Promise<number> => {
      const rss0 = (memoryOf(s.source!.pid)?.rssKiB ?? 0) * 1024;
      const { result: fio, peakKiB } = await samplingMemory({ source: s.source!.pid }, 100, () => runFio(offset));
      assert.strictEqual(fio.code, 0, `${what}: ${fio.err}`);
      const peak = (peakKiB.source ?? 0) * 1024;
      process.stdout.write(`      source RSS during 3 s of writes ${what}: ${(rss0 / 2 ** 20).toFixed(0)} -> peak ${(peak / 2 ** 20).toFixed(0)} MiB\n`);
      return peak - rss0;
    };
    const grew = await fioGrowth('128M', 'in the catch-up');
    assert.ok(grew < 120 * 2 ** 20, `the source grew by ${(grew / 2 ** 20).toFixed(0)} MiB queueing records for a slow link`);
    assert.deepStrictEqual(disconnects(from), [], 'the bounded writes cost the connection');

    // A destination that stops reading mid-catch-up (SIGSTOP): no record ack or CP ack is
    // timed in the gap, so its full queue is what finds it. The writes go on (available),
    // the queue stays bounded, the source drops the link after the stall timeout and says
    // why; once the destination runs again the baseline starts over (less than one
    // progress mark, 32 MiB, was durable there) and completes.
    await pair.rateLimit(8); // the baseline must still run when the destination stops
    assert.strictEqual(sourceStatus(s.src)?.state, 'baseline', 'the baseline ended before the destination was stopped');
    const stallLogFrom = fs.statSync(svLog).size;
    process.kill(s.receiver!.pid!, 'SIGSTOP');
    let stalledGrowth: number;
    try {
      stalledGrowth = await fioGrowth('192M', 'with the destination stopped');
      await until('the source drops the stopped destination', () => /read nothing for \d+ ms with \d+ bytes queued \(stalled peer\)/.test(fs.readFileSync(svLog, 'utf8').slice(stallLogFrom)) || undefined, 30_000);
      assert.notStrictEqual(sourceStatus(s.src)?.state, 'in-sync');
    } finally {
      process.kill(s.receiver!.pid!, 'SIGCONT');
    }
    assert.ok(stalledGrowth < 120 * 2 ** 20, `the source grew by ${(stalledGrowth / 2 ** 20).toFixed(0)} MiB with the destination stopped`);
    await pair.rateLimit(null);
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x62 1M 64k', '-c', 'read -P 0x63 2M 4k', '-c', 'read -P 0x61 3M 1M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);

    const from2 = await baselineOf('strict');
    const r = cp.spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x64 1M 64k', `nbd+unix:///?socket=${s.srcSock}`], { encoding: 'utf8', timeout: 30_000 });
    assert.match(r.stdout + r.stderr, /Input\/output error/, 'strict: a write during the baseline was not refused');
    assert.strictEqual(sourceStatus(s.src)?.state, 'baseline');
    assert.deepStrictEqual(disconnects(from2), [], 'the refused write cost the connection');
    await pair.rateLimit(null);
    await inSyncAndIdentical(s);
    // In sync again, strict writes succeed (and reach the mirror before they are answered).
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x65 1M 64k', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x65 1M 64k', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('--mirror-rate caps a baseline (recorded with the relationship, shown in status; 0 removes it); bad values are refused', async () => {
    const s = setup('sync', ['--mirror-rate', '2M', '--metrics', `127.0.0.1:${METRICS_PORT}`]);
    await startSource(s); // no receiver yet: the writes land while the mirror is disconnected
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 8M', `nbd+unix:///?socket=${s.srcSock}`]);
    const rel = (): { rateBytesPerSec?: number } => JSON.parse(fs.readFileSync(path.join(s.src, 'mirror-source.json'), 'utf8')) as { rateBytesPerSec?: number };
    await startReceiver(s);
    await until('baseline running', () => sourceStatus(s.src)?.state === 'baseline' || undefined, 60_000);
    const during = sh(BIN, ['status', s.src]);
    assert.match(during, /baseline to CP \d+: .* sent, .*\/s, limit 2\.00 MiB\/s/);
    // The wire's bytes say how much of them the catch-ups took (a baseline is not steady-state traffic).
    assert.match(during, /on the wire for .* written \(.*, .* of it while baselines and resyncs ran\)/);
    assert.match(sh(BIN, ['status', path.join(tmp, 'dst')]), /baseline to CP \d+ in progress: \d+ blocks \(.*\) received/, 'the destination shows it too');
    assert.strictEqual((sourceStatus(s.src) as { rateLimitBytesPerSec?: number }).rateLimitBytesPerSec, 2 * 1024 * 1024);
    // The same progress for Prometheus.
    const get = `require('http').get('http://127.0.0.1:${METRICS_PORT}/metrics', (r) => { let b = ''; r.on('data', (d) => (b += d)); r.on('end', () => process.stdout.write(b)); })`;
    const text = (await pair.exec('a', 'node', ['-e', get], { timeoutMs: 10_000 })).stdout;
    assert.match(text, /^nvmirror_mirror_rate_limit_bytes_per_second 2097152$/m);
    assert.match(text, /^nvmirror_mirror_catchup_wire_bytes [1-9]\d*$/m);
    assert.match(text, /^nvmirror_mirror_state\{state="baseline"\} 1$/m);
    const sent = /^nvmirror_mirror_catchup_sent_bytes (\d+)$/m.exec(text);
    const total = /^nvmirror_mirror_catchup_total_bytes (\d+)$/m.exec(text);
    assert.ok(sent && total && Number(total[1]) >= 8 * 1024 * 1024 && Number(sent[1]) <= Number(total[1]) + 1024 * 1024, `catch-up progress in the metrics: ${sent?.[0]}, ${total?.[0]}`);
    await inSyncAndIdentical(s);
    const w = sourceStatus(s.src)!;
    assert.ok(w.catchUpWireBytes >= 8 * 1024 * 1024 && w.catchUpWireBytes <= w.bytesOnWire, `catch-up ${w.catchUpWireBytes} of ${w.bytesOnWire} wire bytes after an 8 MiB baseline`);
    // The source's own timing of the baseline (first block to the commit's ack) against
    // its size: no faster than the cap allows (a 100 ms burst, then the rate).
    const done = /"blocks":(\d+),"resumedAt":0,"ms":(\d+),"msg":"mirror baseline done"/.exec(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'));
    assert.ok(done, 'no "mirror baseline done" line');
    const blocks = Number(done[1]);
    const ms = Number(done[2]);
    const floorMs = (blocks * 4096 * 1000) / (2 * 1024 * 1024) - 100;
    process.stdout.write(`      baseline of ${blocks} blocks at --mirror-rate 2M: ${ms} ms (the cap allows no less than ${floorMs.toFixed(0)})\n`);
    assert.ok(blocks >= 2048 && ms >= floorMs * 0.95, `baseline of ${blocks} blocks in ${ms} ms: faster than 2 MiB/s`);
    assert.strictEqual(rel().rateBytesPerSec, 2 * 1024 * 1024);
    // A resync at the cap: its total is not in the superblock, it is counted beside the
    // walk (the nodes born after the base): status shows "of ~TOTAL (P%)", the metrics the total.
    await stop(s.receiver, 'SIGTERM');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x72 16M 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await startReceiver(s);
    type Resync = { state?: string; resync?: { baseCp: number; totalBytes?: number; blocksSent: number } };
    const rs = await until('resync running, its total counted', () => {
      const m = sourceStatus(s.src) as Resync | undefined;
      return m?.state === 'resyncing' && m.resync?.totalBytes !== undefined ? m.resync : undefined;
    }, 60_000);
    assert.ok(rs.baseCp >= 0 && rs.totalBytes! >= 4 * 1024 * 1024 && rs.totalBytes! <= 5 * 1024 * 1024, `resync total ${rs.totalBytes}: the 4 MiB written and their metadata`);
    assert.match(sh(BIN, ['status', s.src]), /resync from CP \d+ to CP \d+: .* of ~4\.\d+ MiB \(\d+%\) sent, .*\/s, limit 2\.00 MiB\/s/);
    assert.match(sh(BIN, ['status', path.join(tmp, 'dst')]), new RegExp(`resync from CP ${rs.baseCp} to CP \\d+ in progress: \\d+ blocks`), 'the destination shows it too');
    await inSyncAndIdentical(s);
    // Resumed without flags the cap stays; --mirror-rate 0 alone removes it.
    await stop(s.source, 'SIGTERM');
    s.extra = ['--mirror-rate', '0'];
    await startSource(s, [], true);
    await inSyncAndIdentical(s);
    assert.strictEqual(rel().rateBytesPerSec, undefined);
    assert.strictEqual((sourceStatus(s.src) as { rateLimitBytesPerSec?: number }).rateLimitBytesPerSec, undefined);
    // --mirror-mode / --mirror-policy alone change the recorded relationship (same destination, no baseline).
    await stop(s.source, 'SIGTERM');
    s.extra = ['--mirror-mode', 'async', '--mirror-policy', 'strict'];
    const baselinesBefore = (fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8').match(/mirror baseline done/g) ?? []).length;
    await startSource(s, [], true);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x73 24M 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    assert.match(sh(BIN, ['status', s.src]), /^mirror +async to \S+ \(strict\): in-sync$/m);
    assert.deepEqual([(rel() as { mode?: string }).mode, (rel() as { policy?: string }).policy], ['async', 'strict'], 'recorded');
    assert.strictEqual((fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8').match(/mirror baseline done/g) ?? []).length, baselinesBefore, 'no new baseline');
    for (const [args, msg] of [
      [['serve', '--memory', '1G', '--socket', path.join(tmp, 'x.sock'), '--mirror-mode', 'async'], /^nvmirror: --mirror-mode: mirroring needs a volume directory \(memory and file volumes are not mirrored\)$/m],
      [['serve', s.src, '--socket', path.join(tmp, 'x.sock'), '--no-mirror', '--mirror-policy', 'strict'], /--mirror-mode\/--mirror-policy and --no-mirror contradict each other/],
      [['serve', s.src, '--socket', path.join(tmp, 'x.sock'), '--mirror-rate', '10'], /bad rate "10": at least 64K per second/],
      [['serve', '--memory', '1G', '--socket', path.join(tmp, 'x.sock'), '--mirror-rate', '5M'], /--mirror-rate needs --mirror-to or a mirror relationship/],
    ] as const) {
      const r = cp.spawnSync(BIN, args, { encoding: 'utf8', timeout: 30_000 });
      assert.notStrictEqual(r.status, 0);
      assert.match(r.stderr, msg);
    }
  });

  it('writes that overfill the destination\'s log during a catch-up: a CP is asked for as it ends, so the next write waits neither for the CP timer nor costs the connection', async () => {
    // The destination can release no record until the catch-up commits, so its log (4 x
    // the 8 MiB NVRAM) overflows and it drops records; it holds them again only once a
    // committed CP covers them. With the CP timer at 60 s, a write after the catch-up used
    // to wait past the 2 s stall timeout and drop the connection.
    const s = setup('sync', ['--mirror-rate', '8M', '--cp-interval', '60000']);
    const uri = `nbd+unix:///?socket=${s.srcSock}`;
    await startSource(s);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x91 0 32M', uri], 60_000);
    await startReceiver(s);
    await until('baseline running', () => sourceStatus(s.src)?.state === 'baseline' || undefined, 60_000);
    const logFrom = fs.statSync(path.join(tmp, 'sv.log')).size;
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x92 64M 48M', uri], 60_000);
    await until('in sync after the catch-up', () => sourceStatus(s.src)?.state === 'in-sync' || undefined, 120_000);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x93 200M 64k', uri], 30_000);
    type RxStatus = { mirrors: Array<{ recordsDropped: number }> };
    const dropped = (JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as RxStatus).mirrors[0]?.recordsDropped ?? 0;
    assert.ok(dropped > 0, 'the destination\'s log never overflowed: the test did not test anything');
    const lost = fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8').slice(logFrom).split('\n').filter((l) => /mirror disconnected/.test(l));
    assert.deepStrictEqual(lost, [], 'a write after the catch-up cost the connection');
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x92 64M 48M', '-c', 'read -P 0x93 200M 64k', '-c', 'read -P 0x91 0 32M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('a reader connected to the mirror keeps its CP while newer CPs land', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 0 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    // One qemu-io session: read, wait (the source writes and CPs land meanwhile), read again.
    const reader = cp.spawn('qemu-io', ['-r', '-f', 'raw', `nbd+unix:///${s.uuid}?socket=${s.expSock}`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    reader.stdout.on('data', (d: Buffer) => (out += d.toString()));
    reader.stdin.write('read -P 0x41 0 1M\n');
    await until('first read', () => /read 1048576/.test(out));
    const cpBefore = sourceStatus(s.src)!.destCp;
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await until('newer CPs on the mirror', () => (sourceStatus(s.src)?.destCp ?? 0) >= cpBefore + 1 && sourceStatus(s.src)?.rootsEqual);
    reader.stdin.write('read -P 0x41 0 1M\n');
    await until('second read', () => (out.match(/read 1048576/g) ?? []).length >= 2 || /verification failed|error/i.test(out), 30_000);
    reader.stdin.end('quit\n');
    setTimeout(() => reader.kill('SIGKILL'), 5000).unref();
    assert.doesNotMatch(out, /Pattern verification failed/, 'the pinned reader saw blocks change');
    assert.strictEqual((out.match(/read 1048576/g) ?? []).length, 2);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x42 0 1M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('snapshots of the source appear on the mirror as <uuid>@NAME with their own contents', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x81 0 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    sh(BIN, ['snapshot', 'create', s.src, 'before']);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x82 0 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const list = sh('nbdinfo', ['--list', `nbd+unix:///?socket=${s.expSock}`]);
    assert.match(list, new RegExp(`${s.uuid}@before`));
    // The receiver's status names them too.
    assert.match(sh(BIN, ['status', path.join(tmp, 'dst', s.uuid)]), new RegExp(`^ +snapshots before \\(CP \\d+\\): exported as ${s.uuid}@before$`, 'm'));
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x81 0 1M', `nbd+unix:///${s.uuid}@before?socket=${s.expSock}`]);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x82 0 1M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
    assert.strictEqual(md5OfExport(`nbd+unix:///${s.uuid}@before?socket=${s.expSock}`), md5OfExport(`nbd+unix:///before?socket=${s.srcSock}`.replace('///before', '///@before')));
    const r = cp.spawnSync('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', `nbd+unix:///${s.uuid}@nosuch?socket=${s.expSock}`], { encoding: 'utf8', timeout: 30_000 });
    assert.match(r.stdout + r.stderr, /the mirror has no snapshot "nosuch" \(at CP \d+\)/);
  });

  it('one memory budget for the receiver: the mirror\'s frames and the export clients\' bytes are charged to it, never past it, and all of it comes back', async () => {
    const s = setup('sync');
    await startReceiver(s, ['--mirror-insecure'], ['--memory-budget', '68M']);
    await startSource(s);
    await until('mirror in sync', () => sourceStatus(s.src)?.state === 'in-sync');
    type RxStatus = { memory: { budgetBytes: number; usedBytes: number; peakBytes: number; waiting: number }; mirrors: { committedCp: number }[] };
    const rxStatus = (): RxStatus => JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as RxStatus;
    // Mirror traffic only (no export client yet): its CP frames are charged.
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 8M', `nbd+unix:///?socket=${s.srcSock}`]);
    const cp = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 30_000);
    assert.ok(cp.ok);
    await until('the CP on the mirror', () => rxStatus().mirrors[0]!.committedCp >= (cp.cpNumber as number) || undefined);
    const m0 = rxStatus().memory;
    assert.strictEqual(m0.budgetBytes, 68 * 1024 * 1024);
    assert.ok(m0.peakBytes > 0, 'the mirror\'s frames were never charged to the budget');
    // Export clients that send 4 MiB READs and never read a reply hold the same budget,
    // all of it but the small lane (68 - 4 MiB); the mirror goes on through that lane.
    const hogs: RawConn[] = [];
    let cookie = 1n;
    try {
      for (let i = 0; i < 12; i++) {
        const c = await RawConn.connect({ socketPath: s.expSock });
        await negotiate(c, { exportName: s.uuid });
        c.socket.pause();
        for (let k = 0; k < 4; k++) c.socket.write(request({ type: CMD.READ, cookie: cookie++, offset: k * 4 * 1024 * 1024, length: 4 * 1024 * 1024 }));
        hogs.push(c);
      }
      await until('export clients hold the budget', () => rxStatus().memory.usedBytes >= 64 * 1024 * 1024 || undefined, 20_000);
      const cpBefore = rxStatus().mirrors[0]!.committedCp;
      sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x32 0 8M', `nbd+unix:///?socket=${s.srcSock}`]);
      const r = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 30_000);
      assert.ok(r.ok);
      await until('the CP applied beside the export clients', () => {
        const st = rxStatus();
        assert.ok(st.memory.usedBytes <= st.memory.budgetBytes, `${st.memory.usedBytes} bytes charged of ${st.memory.budgetBytes}`);
        return st.mirrors[0]!.committedCp >= (r.cpNumber as number) || undefined;
      }, 25_000);
      assert.ok(rxStatus().mirrors[0]!.committedCp > cpBefore);
    } finally {
      for (const c of hogs) c.destroy();
    }
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x32 0 8M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
    // Every charge came back: nothing in use at rest.
    const after = await until('the budget back to 0', () => { const m = rxStatus().memory; return m.usedBytes === 0 ? m : undefined; }, 10_000);
    assert.ok(after.peakBytes <= after.budgetBytes && after.peakBytes > 64 * 1024 * 1024, `peak ${after.peakBytes}`);
  });

  it('a reader pinned longer than --reader-pin-max is released: its connection is closed with a log line, a reconnect reads the newest CP', async () => {
    const s = setup('sync');
    await startReceiver(s, ['--mirror-insecure'], ['--reader-pin-max', '2']);
    await startSource(s);
    await until('mirror in sync', () => sourceStatus(s.src)?.state === 'in-sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x91 0 64k', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const reader = cp.spawn('qemu-io', ['-r', '-f', 'raw', `nbd+unix:///${s.uuid}?socket=${s.expSock}`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    reader.stdout.on('data', (d: Buffer) => (out += d.toString()));
    reader.stderr.on('data', (d: Buffer) => (out += d.toString()));
    reader.stdin.write('read -P 0x91 0 64k\n');
    await until('first read', () => /read 65536/.test(out));
    await until('pin released', () => /held its CP longer than allowed/.test(fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8')) || undefined, 15_000);
    reader.stdin.write('read 0 64k\n');
    await until('second read fails', () => /(failed|error)/i.test(out) || undefined, 15_000).catch((e) => {
      throw new Error(`${(e as Error).message}; reader said: ${out}`);
    });
    reader.stdin.end('quit\n');
    setTimeout(() => reader.kill('SIGKILL'), 3000).unref();
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x91 0 64k', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('a destination pre-created with nvmirror create (its member elsewhere) becomes the mirror', async () => {
    const s = setup('sync');
    const member = path.join(tmp, 'elsewhere', 'mirror-member.img');
    fs.mkdirSync(path.dirname(member));
    sh(BIN, ['create', path.join(tmp, 'dst', s.uuid), '--size', '256M', '--nvram-size', '8M', '--member', member]);
    await startReceiver(s);
    await startSource(s);
    await until('mirror in sync', () => sourceStatus(s.src)?.state === 'in-sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa1 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    assert.ok(!fs.existsSync(path.join(tmp, 'dst', s.uuid, 'member-0.img')), 'a member was created in the mirror directory');
    assert.ok(fs.existsSync(path.join(tmp, 'dst', s.uuid, 'nvmirror.json.before-mirror')), 'the pre-created label was not set aside');
    checkMirror(s);
  });

  it('both sides stop and restart: the relationship (recorded in the volume) resumes without flags and without a new baseline', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x51 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    type RxDirs = { running: boolean; mirrors: Array<{ sourceUuid: string; committedCp: number; root: string }>; directories: Array<{ uuid: string; role: string; cp: number; root?: string; baselinePartial?: boolean }> };
    const rxDir = path.join(tmp, 'dst');
    const live = (JSON.parse(sh(BIN, ['status', rxDir, '--json'])) as RxDirs).mirrors.find((m) => m.sourceUuid === s.uuid);
    assert.ok(live && live.committedCp >= 0, `the running receiver reports no committed CP for ${s.uuid}`);
    // One mirror's status (RECEIVE_DIR/<uuid>): its receiver's, for it alone.
    const one = JSON.parse(sh(BIN, ['status', path.join(rxDir, s.uuid), '--json'])) as RxDirs;
    assert.deepStrictEqual(one.mirrors.map((m) => [m.sourceUuid, m.committedCp]), [[s.uuid, live.committedCp]]);
    // The receiver first, while the source is connected: it must stop promptly anyway.
    const t0 = Date.now();
    await stop(s.receiver, 'SIGTERM');
    assert.ok(Date.now() - t0 < 10_000, `the receiver took ${Date.now() - t0} ms to stop with a source connected`);
    await stop(s.source, 'SIGTERM');
    checkMirror(s);
    // With no receiver running, status reads the mirror's committed CP and root from its ring.
    const stopped = JSON.parse(sh(BIN, ['status', rxDir, '--json'])) as RxDirs;
    const e = stopped.directories.find((x) => x.uuid === s.uuid);
    assert.ok(!stopped.running && e?.role === 'mirror', `status of the stopped receiver's directory: ${JSON.stringify(stopped)}`);
    assert.deepStrictEqual({ cp: e.cp, root: e.root, baselinePartial: e.baselinePartial }, { cp: live.committedCp, root: live.root, baselinePartial: false });
    assert.match(sh(BIN, ['status', rxDir]), new RegExp(`mirror +${s.uuid}: CP ${live.committedCp} committed`));
    assert.match(sh(BIN, ['status', path.join(rxDir, s.uuid)]), new RegExp(`: no receiver running\nmirror +${s.uuid}: CP ${live.committedCp} committed`));
    await startReceiver(s);
    await startSource(s, [], true); // no mirror flags: DIR/mirror-source.json has the relationship
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x52 8M 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    assert.strictEqual(baselines(), 1, 'a restart started a new baseline');
    // The source stopped cleanly while its receiver runs (a planned failover): the writes
    // since the last CP go into a last CP, and the stop waits for the mirror to commit it.
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x53 16M 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await stop(s.source, 'SIGTERM');
    const srcCp = (JSON.parse(sh(BIN, ['status', s.src, '--json'])) as { cpNumber: number }).cpNumber;
    const held = (JSON.parse(sh(BIN, ['status', rxDir, '--json'])) as RxDirs).mirrors.find((m) => m.sourceUuid === s.uuid);
    assert.strictEqual(held?.committedCp, srcCp, 'the mirror holds the source\'s last CP after a clean stop');
    assert.match(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'), new RegExp(`"cp":${srcCp},"msg":"stopping: the mirror holds the last CP"`));
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x53 16M 4M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('a source restarted while its destination is more than 8 CPs behind resumes with a resync (the base superblock is kept with the relationship)', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const destCp = sourceStatus(s.src)!.destCp;
    await stop(s.receiver, 'SIGTERM');
    // Twelve CPs with writes while the destination is away: its CP leaves the ring (8 slots).
    for (let i = 0; i < 12; i++) {
      sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(0x72 + i).toString(16)} ${8 + i}M 256k`, `nbd+unix:///?socket=${s.srcSock}`]);
      const r = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000);
      assert.ok(r.ok);
    }
    const rel = JSON.parse(fs.readFileSync(path.join(s.src, 'mirror-source.json'), 'utf8')) as { destCp: number; destSuperblock?: string };
    assert.equal(rel.destCp, destCp);
    assert.ok(rel.destSuperblock && Buffer.from(rel.destSuperblock, 'base64').length === 4096, 'the base superblock is recorded');
    await stop(s.source, 'SIGTERM');
    await startReceiver(s);
    await startSource(s, [], true);
    await inSyncAndIdentical(s);
    assert.strictEqual(baselines(), 1, 'the restart fell back to a full baseline');
    assert.match(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'), new RegExp(`"baseCp":${destCp},"targetCp":\\d+,"resumeAtBlock":0,"msg":"mirror resync started"`));
  });

  /**
   * In sync, then a session without the mirror that rewrites the same 4 MiB over twelve
   * CPs (every block the destination's CP references is freed, and free to reuse unless
   * that CP is held), then the mirror again. `hidden`: the relationship file is moved aside
   * for that session (it does not know it has a mirror), so nothing holds the base.
   */
  async function sessionWithoutMirror(hidden: boolean, o: { reader?: (s: Setup) => Promise<void>; stopped?: (s: Setup) => void; firstAlone?: string; statusChecks?: boolean } = {}): Promise<{ s: Setup; destCp: number; log: string }> {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x81 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    if (o.reader) await o.reader(s);
    const destCp = sourceStatus(s.src)!.destCp;
    await stop(s.source, 'SIGTERM');
    // Stopped, the volume's status shows the relationship it records.
    if (o.statusChecks) assert.match(sh(BIN, ['status', s.src]), new RegExp(`^mirror +sync to .*: not running \\(recorded; serving the volume resumes it\\)\n +the destination's CP ${destCp} is held here: serving resyncs from it, no baseline$`, 'm'));
    const logFrom = fs.statSync(path.join(tmp, 'sv.log')).size;
    const relFile = path.join(s.src, 'mirror-source.json');
    o.stopped?.(s);
    if (hidden) fs.renameSync(relFile, `${relFile}.aside`);
    fs.rmSync(s.srcSock, { force: true });
    const alone = pair.spawn('a', BIN, ['serve', s.src, '--socket', s.srcSock, '--no-mirror', '--cp-interval', '1h'], { stdio: ['ignore', 'ignore', fs.openSync(path.join(tmp, 'sv.log'), 'a')] });
    await until('source socket', () => fs.existsSync(s.srcSock), 90_000);
    if (o.statusChecks) {
      await until('served alone', () => fs.existsSync(path.join(s.src, 'control.sock')), 30_000);
      assert.match(sh(BIN, ['status', s.src]), /^mirror +sync to .*: not running \(recorded; served without it: a serve without --no-mirror resumes it\)$/m);
    }
    if (o.firstAlone) {
      sh('qemu-io', ['-f', 'raw', '-c', o.firstAlone, `nbd+unix:///?socket=${s.srcSock}`]);
      assert.ok((await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000)).ok);
    }
    for (let i = 0; i < 12; i++) {
      sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x${(0x82 + i).toString(16)} 0 4M`, `nbd+unix:///?socket=${s.srcSock}`]);
      const r = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000);
      assert.ok(r.ok, `checkpoint: ${String(r.error)}`);
    }
    await stop(alone, 'SIGTERM');
    if (hidden) fs.renameSync(`${relFile}.aside`, relFile);
    const rel = JSON.parse(fs.readFileSync(relFile, 'utf8')) as { destCp: number };
    assert.equal(rel.destCp, destCp, 'the relationship still names the destination\'s CP');
    await startSource(s, [], true);
    await inSyncAndIdentical(s);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x8d 0 4M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
    checkMirror(s);
    return { s, destCp, log: fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8').slice(logFrom) };
  }

  it('served for a while without its mirror (--no-mirror), the volume keeps the destination\'s CP: the mirror resumes with a resync from it, no baseline', async () => {
    const { destCp, log } = await sessionWithoutMirror(false, { statusChecks: true });
    assert.match(log, /opened without the mirror: the destination's CP stays held/);
    assert.doesNotMatch(log, /can no longer be kept|is damaged/);
    assert.strictEqual(baselines(), 1, 'the mirror took a full baseline after a session without it');
    assert.match(log, new RegExp(`"baseCp":${destCp},"targetCp":\\d+,"resumeAtBlock":0,"msg":"mirror resync started"`));
  });

  it('a session that did not hold the destination\'s CP reused its blocks: the destination refuses the resync once, the source takes a full baseline (logged), never a stuck mirror', async () => {
    const { destCp, log } = await sessionWithoutMirror(true);
    assert.doesNotMatch(log, /opened without the mirror/);
    assert.match(log, new RegExp(`"destCp":${destCp},"pba":\\d+,"msg":"this volume's copy of the destination's CP is damaged`));
    assert.strictEqual(baselines(), 2, 'a full baseline after the damaged base');
  });

  /**
   * A reader of the mirror pinned to the CP with 0x81; 0x80 over it and nine more CPs (that
   * CP leaves the source's superblock ring while the source holds it for the reader); the
   * source stops, a session without the mirror whose first CP allocates from the device's
   * start (over that CP's blocks unless they are held) and keeps them live; then the
   * resync. `forgetPin`: the pin is struck from the relationship file before that session
   * (a source that did not record it). Returns the reader's second read of 0x81.
   */
  async function readerAcrossSessionWithoutMirror(forgetPin: boolean): Promise<{ out: string; reads: number; rx: string }> {
    let reader: cp.ChildProcess | undefined;
    let out = '';
    let pinnedCp = -1;
    const reads = (): number => (out.match(/read 4194304/g) ?? []).length;
    try {
      await sessionWithoutMirror(false, {
        reader: async (s) => {
          reader = cp.spawn('qemu-io', ['-r', '-f', 'raw', `nbd+unix:///${s.uuid}?socket=${s.expSock}`], { stdio: ['pipe', 'pipe', 'pipe'] });
          reader.stdout!.on('data', (d: Buffer) => (out += d.toString()));
          reader.stderr!.on('data', (d: Buffer) => (out += d.toString()));
          reader.stdin!.write('read -P 0x81 0 4M\n');
          await until('first read', () => reads() >= 1 || undefined);
          const pinned = sourceStatus(s.src)!.destCp;
          sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x80 0 4M', `nbd+unix:///?socket=${s.srcSock}`]);
          for (let i = 0; i < 9; i++) {
            sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x7f ${16 + i}M 64k`, `nbd+unix:///?socket=${s.srcSock}`]);
            assert.ok((await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000)).ok);
          }
          await inSyncAndIdentical(s);
          pinnedCp = pinned;
          // Both sides say which CP a reader keeps held (the md5 reads above have disconnected).
          assert.equal(sourceStatus(s.src)!.readerPinnedCp, pinned);
          assert.match(sh(BIN, ['status', s.src]), new RegExp(`^ +CP ${pinned} held here too: a reader of the mirror is on it$`, 'm'));
          const rxSt = (JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as { mirrors: Array<{ readers: number; oldestPinnedCp: number; longestPinMs: number }> }).mirrors[0]!;
          assert.deepEqual([rxSt.readers, rxSt.oldestPinnedCp], [1, pinned]);
          assert.ok(rxSt.longestPinMs > 0);
          assert.match(sh(BIN, ['status', path.join(tmp, 'dst')]), new RegExp(`^ +1 reader\\(s\\) of the export; the oldest on CP ${pinned} \\(the source holds it\\), the longest for \\d+ s$`, 'm'));
        },
        stopped: (s) => {
          const relFile = path.join(s.src, 'mirror-source.json');
          const rel = JSON.parse(fs.readFileSync(relFile, 'utf8')) as Record<string, unknown>;
          assert.equal(rel.pinnedCp, pinnedCp, 'the reader\'s CP is recorded with the relationship');
          if (forgetPin) {
            delete rel.pinnedCp;
            delete rel.pinnedSuperblock;
            fs.writeFileSync(relFile, JSON.stringify(rel));
          }
        },
        firstAlone: 'write -P 0x7e 64M 4M',
      });
      reader!.stdin!.write('read -P 0x81 0 4M\n');
      await until('second read', () => reads() >= 2 || /failed|error/i.test(out) || undefined, 15_000);
      assert.doesNotMatch(out, /Pattern verification failed/, 'the pinned reader saw its blocks change');
      return { out, reads: reads(), rx: fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8') };
    } finally {
      reader?.kill('SIGKILL');
    }
  }

  it('a reader pinned to an older CP keeps it across a restart of the source and a session without the mirror (the pin is recorded and held)', async () => {
    const { out, reads, rx } = await readerAcrossSessionWithoutMirror(false);
    assert.equal(reads, 2, `the reader's second read: ${out}`);
    assert.doesNotMatch(rx, /mirror reader released/);
  });

  it('a reader pinned to an older CP its source no longer held: released before the resync writes its blocks (connection closed, logged), never EIO or changed data', async () => {
    const { out, reads, rx } = await readerAcrossSessionWithoutMirror(true);
    assert.match(rx, /"cp":\d+,"reason":"CP \d+ writes blocks \[\d+, \d+\) that CP \d+ still uses[^"]*","msg":"mirror reader released/);
    assert.equal(reads, 1, `a read after the release: ${out}`);
    assert.match(out, /read failed/);
    assert.doesNotMatch(rx, /checksum mismatch|does not verify/, 'a read of an overwritten block');
    const st = JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as { mirrors: Array<{ readersReleased: number }> };
    assert.equal(st.mirrors[0]!.readersReleased, 1);
  });

  it('a resync sends address blocks as deltas (against the base, or from zeroes for new ones): scattered 4k writes cost about their own bytes on the wire', async () => {
    const s = await start('sync');
    const uri = `nbd+unix:///?socket=${s.srcSock}`;
    const writes = (first: number, end: number, pattern: number): string[] => {
      const a: string[] = [];
      for (let blk = first; blk < end; blk += 64) a.push('-c', `write -P 0x${pattern.toString(16)} ${blk * 4096} 4k`);
      return a;
    };
    // The base: a block in every level-0 node of the first half of the 256 MiB volume.
    sh('qemu-io', ['-f', 'raw', ...writes(0, 32768, 0x41), uri], 120_000);
    await inSyncAndIdentical(s);
    await stop(s.receiver, 'SIGTERM');
    // 1024 scattered 4 KiB writes (4 MiB) while the destination is away: each of the 391
    // level-0 nodes gets new pointers, the first half's as deltas against the base's, the
    // second half's (new nodes) as deltas from zeroes; sent whole they would add ~1.6 MiB
    // (ratio ~1.4).
    sh('qemu-io', ['-f', 'raw', ...writes(17, 65536, 0x42), uri], 120_000);
    const r = await controlRequest(path.join(s.src, 'control.sock'), { op: 'checkpoint' }, 60_000);
    assert.ok(r.ok);
    const deltas0 = sourceStatus(s.src)!.deltasSent;
    const before = await txBytes(pair);
    await startReceiver(s);
    await inSyncAndIdentical(s);
    const ratio = ((await txBytes(pair)) - before) / (1024 * 4096);
    const deltas = sourceStatus(s.src)!.deltasSent - deltas0;
    process.stdout.write(`      resync of 4 MiB of scattered 4k writes: wire/client bytes ${ratio.toFixed(3)}, ${deltas} blocks as deltas\n`);
    assert.match(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'), /"msg":"mirror resync started"/);
    assert.ok(deltas >= 391, `only ${deltas} metadata blocks travelled as deltas`);
    assert.ok(ratio < 1.15, `wire/client ${ratio.toFixed(3)}: the resync's address blocks travelled whole`);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', `read -P 0x42 ${17 * 4096} 4k`, '-c', `read -P 0x41 ${64 * 4096} 4k`, `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
  });

  it('kill -9 of the source under writes: after restart it resyncs from the held base (no baseline), devices identical', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 8M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const fio = cp.spawn('fio', ['--name=k', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${s.srcSock}`, '--rw=randwrite', '--bs=4k', '--size=128M',
      '--time_based', '--runtime=30', '--iodepth=16', '--thread', `--directory=${tmp}`], { stdio: 'ignore' });
    // Kill only once writes are flowing (a loaded machine can take a while to start fio).
    const seq0 = nvramLastSeq(s.src);
    await until('writes in flight', () => nvramLastSeq(s.src) > seq0 + 200 || undefined, 30_000);
    await stop(s.source, 'SIGKILL');
    fio.kill('SIGKILL');
    checkMirror(s);
    await startSource(s);
    await inSyncAndIdentical(s);
    assert.strictEqual(baselines(), 1, 'the crash restart fell back to a full baseline');
    // Writes were flowing at the kill: recovery committed CPs the destination lacked.
    assert.match(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8'), /mirror resync started/);
  });

  it('kill -9 of the destination mid-CP and mid-baseline: its committed image checks clean every time and it resumes', async () => {
    const s = await start('async', [], '1G');
    for (let round = 0; round < 3; round++) {
      const fio = cp.spawn('fio', ['--name=d', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${s.srcSock}`, '--rw=randwrite', '--bs=64k', '--size=512M',
        '--time_based', '--runtime=30', '--iodepth=8', '--thread', `--directory=${tmp}`], { stdio: 'ignore' });
      // Killed while fio writes (not before its first write: a loaded machine may take a while to start it).
      const written = (): number => (sourceStatus(s.src) as { clientBytes?: number } | undefined)?.clientBytes ?? 0;
      const before = written();
      await until('fio writing', () => written() > before + 4 * 1024 * 1024 || undefined, 60_000);
      await new Promise((r) => setTimeout(r, 300 + round * 400));
      await stop(s.receiver, 'SIGKILL');
      fio.kill('SIGKILL');
      checkMirror(s);
      // The control socket the killed receiver left answers nothing: status reads the directories.
      if (round === 0) assert.match(sh(BIN, ['status', path.join(tmp, 'dst', s.uuid)]), new RegExp(`: no receiver running\nmirror +${s.uuid}: `));
      await startReceiver(s);
      await inSyncAndIdentical(s);
    }
    // Mid-baseline: a fresh destination directory on a slow link, killed once the baseline
    // has made progress durable; the restarted receiver resumes it (no block resent twice
    // before that point).
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 192M', `nbd+unix:///?socket=${s.srcSock}`], 120_000); // >= 49152 blocks to send
    await inSyncAndIdentical(s);
    await stop(s.receiver, 'SIGKILL');
    fs.rmSync(path.join(tmp, 'dst'), { recursive: true, force: true });
    await pair.rateLimit(200);
    await startReceiver(s);
    // The receiver's own record of durable progress (the source's count of blocks sent
    // runs ahead of it by up to the 32 MiB the socket may queue, plus the kernel's buffers).
    const marker = path.join(tmp, 'dst', s.uuid, BASELINE_MARKER_NAME);
    const durable = (): number => {
      try {
        return (JSON.parse(fs.readFileSync(marker, 'utf8')) as { blocks: number }).blocks;
      } catch {
        return 0;
      }
    };
    await until('baseline past its first durable progress', () => durable() > 0 || undefined, 60_000);
    await stop(s.receiver, 'SIGKILL');
    checkMirror(s);
    await startReceiver(s);
    await until('baseline resumed', () => /mirror baseline resumed/.test(fs.readFileSync(path.join(tmp, 'sv.log'), 'utf8')) || undefined, 30_000);
    await pair.rateLimit(null);
    await inSyncAndIdentical(s);
    // The baseline's runs went to the member with O_DIRECT (io/file-device.ts), through kill -9s.
    const rx = JSON.parse(sh(BIN, ['status', path.join(tmp, 'dst'), '--json'])) as { mirrors: Array<{ directWrites?: number }> };
    assert.ok((rx.mirrors[0]?.directWrites ?? 0) > 0, `the destination wrote nothing direct: ${JSON.stringify(rx.mirrors[0])}`);
  });

  it('TLS-PSK link: the same key mirrors; a wrong key and a plaintext source are refused and create nothing', async () => {
    const keys = path.join(tmp, 'keys.psk');
    fs.writeFileSync(keys, `mirror:${'ab'.repeat(32)}\n`);
    const wrong = path.join(tmp, 'wrong.psk');
    fs.writeFileSync(wrong, `mirror:${'cd'.repeat(32)}\n`);
    const s = setup('sync');
    await startReceiver(s, ['--mirror-psk', keys]);
    // A wrong key, then a plaintext source: refused at the TLS handshake, nothing created.
    // Each side says why in plain words (the OpenSSL reason kept in brackets).
    const why: Array<{ link: string[]; receiver: RegExp; source: RegExp }> = [
      { link: ['--mirror-psk', wrong], receiver: /"why":"the source's pre-shared key differs from this side's \(--mirror-psk files not the same\) \[/, source: /^the destination refused the TLS handshake: it does not accept this side's key/ },
      { link: ['--mirror-insecure'], receiver: /"why":"a plaintext client: a source without --mirror-psk or --mirror-tls-\*/, source: /^the destination closed the connection before answering HELLO \(a receiver that expects TLS\?/ },
    ];
    for (const { link, receiver, source } of why) {
      await startSource(s, link);
      await until('refusal logged', () => (fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8').match(/TLS authentication failed/g) ?? []).length > 0 || undefined, 30_000);
      assert.match(fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8'), receiver);
      // The source's control socket may come up after its first connection attempt: wait for its status.
      const st = await until('source status with its error', () => {
        const m = sourceStatus(s.src);
        return m?.lastError ? m : undefined;
      }, 30_000);
      assert.ok(!st.connected && st.destCp === -1, `an unauthenticated source got through (connected ${st.connected}, destination CP ${st.destCp})`);
      assert.match(st.lastError ?? '', source);
      assert.ok(!fs.existsSync(path.join(tmp, 'dst', s.uuid)), 'the receiver created a mirror for an unauthenticated source');
      await stop(s.source, 'SIGTERM');
      fs.writeFileSync(path.join(tmp, 'rx.log'), '');
    }
    await startSource(s, ['--mirror-psk', keys]);
    await until('mirror in sync', () => sourceStatus(s.src)?.state === 'in-sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 2M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
  });

  it('hostile source stream (bad checksum, replayed frame, wrong base, short CP, truncation, forged references) is refused and the mirror is unchanged', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5e 0 2M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const cpBefore = sourceStatus(s.src)!.destCp;
    const md5Before = md5OfExport(`nbd+unix:///${s.uuid}?socket=${s.expSock}`);
    await stop(s.source, 'SIGTERM');
    const label = JSON.parse(fs.readFileSync(path.join(s.src, 'nvmirror.json'), 'utf8')) as { uuid: string; sizeBytes: number; members: { blockCount: number }[] };
    const b = pair.host('b');
    // Each case: a HELLO that the receiver accepts, then one kind of bad stream.
    const script = (attack: string): string => `
      const net = require('net'); const w = require(${JSON.stringify(path.join(ROOT, 'dist/src/mirror/wire.js'))});
      const fw = new w.FrameWriter(); const sock = net.connect(${PORT}, '${b.addr}');
      const send = (m) => { for (const p of fw.frame(m)) sock.write(p); };
      const frames = (m) => Buffer.concat(fw.frame(m));
      let got = Buffer.alloc(0); sock.on('data', (d) => { got = Buffer.concat([got, d]); });
      sock.on('connect', () => {
        send({ type: 1, sourceUuid: '${label.uuid}', sizeBytes: ${label.sizeBytes}, deviceBlocks: ${label.members[0]!.blockCount}, nvramBytes: 8388608, mode: 'sync', sourceCp: ${cpBefore}, streamFromSeq: 1, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 1e12, startedAtSeq: -1, processId: '5eed5eed5eed5eed', lineage: [require(${JSON.stringify(path.join(ROOT, 'dist/src/tree/lineage.js'))}).rootGeneration('${label.uuid}')], earlier: [] });
        const cp = ${cpBefore + 1}; const blk = { type: 8, cp, pbas: [5000], data: Buffer.alloc(4096, 0xee) };
        const rec = { type: 4, seq: 1, recordType: 1, flags: 0, offsetBytes: 0, lengthBytes: 8192, payload: Buffer.alloc(8192, 0xab) };
        ${attack}
      });
      sock.on('close', () => process.exit(0)); setTimeout(() => process.exit(0), 3000);`;
    // A block the committed CP uses (its root), for a CP that would overwrite it.
    const member = fs.openSync(path.join(tmp, 'dst', s.uuid, 'member-0.img'), 'r');
    const sbBuf = Buffer.alloc(4096);
    fs.readSync(member, sbBuf, 0, 4096, (cpBefore % 8) * 4096);
    fs.closeSync(member);
    const rootPba = Number(sbBuf.readBigUInt64LE(96));
    const attacks: Record<string, string> = {
      overwritesCommitted: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); send({ type: 8, cp, pbas: [${rootPba}], data: Buffer.alloc(4096, 0xee) });`,
      badChecksum: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); const f = frames(blk); f[100] ^= 1; sock.write(f);`,
      replayedFrame: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); const f = frames(blk); sock.write(f); sock.write(f);`,
      wrongBase: `send({ type: 7, cp: cp + 5, baseCp: cp + 3, kind: 'cp' }); send(blk);`,
      shortCp: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); send(blk); send({ type: 10, cp, slot: cp % 8, blockCount: 2, superblock: Buffer.alloc(4096) });`,
      badSuperblock: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); send(blk); send({ type: 10, cp, slot: cp % 8, blockCount: 1, superblock: Buffer.alloc(4096, 1) });`,
      truncated: `send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); const f = frames(blk); sock.write(f.subarray(0, 1000)); setTimeout(() => sock.destroy(), 300);`,
      // A record's frame checksum is combined from its blocks' (wire.ts): a flipped payload byte still fails it.
      recordBadChecksum: `const f = frames(rec); f[24 + 40 + 3000] ^= 1; sock.write(f);`,
      // A reference whose crc32c is not the stored block's, and one to a record the log does not hold.
      refWrongCrc: `send(rec); send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); send({ type: 9, cp, refs: [{ pba: 5000, seq: 1, index: 0, crc: 0x12345678 }] });`,
      refMissing: `send(rec); send({ type: 7, cp, baseCp: cp - 1, kind: 'cp' }); send({ type: 9, cp, refs: [{ pba: 5000, seq: 2, index: 0, crc: 0 }] });`,
    };
    const refused: Record<string, RegExp> = {
      overwritesCommitted: /which the committed CP \d+ uses/,
      recordBadChecksum: /frame 1 \(type 4\): checksum mismatch/,
      refWrongCrc: /reference to block 1\/0, whose crc is [0-9a-f]+, not 12345678/,
      refMissing: /reference to record 2 is not in the log/,
    };
    for (const [name, attack] of Object.entries(attacks)) {
      fs.writeFileSync(path.join(tmp, 'rx.log'), '');
      await pair.exec('a', 'node', ['-e', script(attack)], { timeoutMs: 10_000 });
      const log = fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8');
      if (name !== 'truncated') assert.match(log, /mirror stream refused/, `${name}: not refused`);
      const why = refused[name];
      if (why) assert.match(log, why, `${name}: refused for another reason`);
      checkMirror(s);
      assert.strictEqual(md5OfExport(`nbd+unix:///${s.uuid}?socket=${s.expSock}`), md5Before, `${name} changed the mirror`);
    }
    await startSource(s);
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5f 4M 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
  });

  it('hostile peer: random bytes and a wrong-magic stream are refused and the mirror is unchanged', async () => {
    const s = await start('sync');
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
    const b = pair.host('b');
    const junk = "require('net').connect(" + PORT + ", '" + b.addr + "', function () { this.write(require('crypto').randomBytes(65536)); setTimeout(() => process.exit(0), 500); })";
    await pair.exec('a', 'node', ['-e', junk]);
    await pair.exec('a', 'node', ['-e', junk.replace('randomBytes(65536)', "Buffer.from('NVMW' + 'x'.repeat(100))")]);
    const log = fs.readFileSync(path.join(tmp, 'rx.log'), 'utf8');
    assert.match(log, /mirror stream refused/);
    sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x77 0 1M', `nbd+unix:///${s.uuid}?socket=${s.expSock}`]);
    // The real source is still mirroring.
    sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x78 2M 1M', `nbd+unix:///?socket=${s.srcSock}`]);
    await inSyncAndIdentical(s);
  });
});
