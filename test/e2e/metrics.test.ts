/**
 * `serve --metrics HOST:PORT` (issue 11 point 15): scraped with a plain HTTP GET while a
 * client does I/O on a volume directory, the exposition parses strictly and its counters
 * move: requests and bytes by command, latency histograms, errors by kind, connections,
 * CPs and NVRAM fill. A block corrupted on disk and read shows up as a checksum error.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as http from 'http';
import * as net from 'net';
import * as path from 'path';
import { MiB, NVMIRROR_BIN, cleanupAll, freePort, makeTempDir, requireTools, restartServer, run, runOk, sleep, startServer, type Server } from './harness';
import { parseExposition, type Exposition } from './exposition';
import { CMD, ERR, RawConn, negotiate, simpleCommand, simpleRead, targetOf } from './rawnbd';

const BS = 4096;

function get(url: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (s: string) => (body += s));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
  });
}

async function scrape(url: string): Promise<Exposition> {
  const r = await get(url);
  assert.equal(r.status, 200);
  assert.match(r.type, /^text\/plain; version=0\.0\.4/);
  return parseExposition(r.body);
}

async function startWithMetrics(): Promise<{ server: Server; url: string }> {
  const port = await freePort();
  const server = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 64 * MiB, extraArgs: ['--metrics', `127.0.0.1:${port}`, '--cp-interval', '300ms'] });
  return { server, url: `http://127.0.0.1:${port}/metrics` };
}

function block(tag: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ (0x5eed0000 + tag)) >>> 0, i);
  return b;
}

describe('e2e metrics endpoint (issue 11 point 15)', function () {
  this.timeout(30_000);
  after(async function () {
    await cleanupAll();
  });

  it('counters move while a client does I/O, and every scrape parses', async function () {
    const { server, url } = await startWithMetrics();
    try {
      const before = await scrape(url);
      assert.equal(before.get('nvmirror_nbd_requests_total', { command: 'write' }), 0);
      assert.equal(before.get('nvmirror_volume_nvram_size_bytes'), 16 * MiB);
      const s = await negotiate(await RawConn.connect(targetOf(server)));
      // One WRITE of 1 MiB first, into a fresh volume (beyond the 64 KiB ones' range): its
      // blocks are placed before its CP and taken there. (Once blocks are being rewritten,
      // placement waits for enough warm blocks: the 64 KiB loop below would not leave them.)
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 62 * MiB, length: MiB }, Buffer.alloc(MiB, 0x3c)), 0);
      const scrapes: Exposition[] = [];
      let writes = 0;
      const stopAt = Date.now() + 1_500;
      const payload = Buffer.alloc(64 * 1024, 0xa5);
      while (Date.now() < stopAt) {
        for (let i = 0; i < 16; i++, writes++) {
          assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: ((writes * 64 * 1024) % (60 * MiB)), length: payload.length }, payload), 0);
        }
        assert.equal((await simpleRead(s, 0, 64 * 1024)).error, 0);
        scrapes.push(await scrape(url)); // while the connection is open
      }
      assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
      assert.equal((await simpleRead(s, 64 * MiB - 512, 1024)).error, ERR.EINVAL, 'a read past the end');
      await sleep(700); // a CP or two at --cp-interval 300ms
      // Whole blocks the tree holds: the first READ fills the NBD threads' block map, the next ones are answered there.
      for (let i = 0; i < 3; i++) assert.equal((await simpleRead(s, 0, 64 * 1024)).error, 0);
      const after = await scrape(url);
      assert.ok((after.get('nvmirror_volume_early_blocks_total', { result: 'placed' }) ?? 0) >= 256, `blocks placed before their CP: ${after.get('nvmirror_volume_early_blocks_total', { result: 'placed' })}`);
      assert.ok((after.get('nvmirror_volume_early_blocks_total', { result: 'adopted' }) ?? 0) >= 256, `placed blocks a CP took: ${after.get('nvmirror_volume_early_blocks_total', { result: 'adopted' })}`);
      // FLUSH then WRITE, twenty times: the threads answer the FLUSHes, and a WRITE right
      // after one goes to the NVRAM file with pwrite (a stall of this process cannot miss all).
      for (let i = 0; i < 20; i++) {
        assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
        assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: i * 64 * 1024, length: payload.length }, payload), 0);
      }
      const later = await scrape(url);
      assert.ok((later.get('nvmirror_volume_thread_flushes_total') ?? 0) >= 20, `FLUSHes the threads answered: ${later.get('nvmirror_volume_thread_flushes_total')}`);
      assert.ok((later.get('nvmirror_volume_thread_file_stores_total') ?? 0) >= 1, `WRITEs stored with pwrite after a FLUSH: ${later.get('nvmirror_volume_thread_file_stores_total')}`);
      assert.ok((later.get('nvmirror_volume_thread_file_stores_total') ?? 0) <= (later.get('nvmirror_volume_thread_writes_total') ?? 0));
      s.conn.destroy();

      // Monotonic across scrapes, and moving.
      const series = [before, ...scrapes, after].map((e) => e.get('nvmirror_nbd_requests_total', { command: 'write' }) ?? -1);
      for (let i = 1; i < series.length; i++) assert.ok((series[i] as number) >= (series[i - 1] as number), `write counter went down: ${series.join(',')}`);
      assert.equal(after.get('nvmirror_nbd_requests_total', { command: 'write' }), writes + 1);
      assert.equal(after.get('nvmirror_nbd_bytes_total', { command: 'write' }), writes * payload.length + MiB);
      assert.equal(after.get('nvmirror_nbd_requests_total', { command: 'flush' }), 1);
      assert.ok((after.get('nvmirror_nbd_bytes_total', { command: 'read' }) ?? 0) >= scrapes.length * 64 * 1024);
      assert.equal(after.get('nvmirror_nbd_request_duration_seconds_count', { command: 'write' }), writes + 1);
      assert.ok((after.get('nvmirror_nbd_request_duration_seconds_sum', { command: 'write' }) ?? 0) > 0);
      assert.equal(after.get('nvmirror_nbd_errors_total', { kind: 'EINVAL' }), 1);
      assert.ok(scrapes.every((e) => e.get('nvmirror_nbd_connections') === 1), 'one open connection while it did I/O');
      assert.equal(after.get('nvmirror_nbd_connections_total', { outcome: 'accepted' }), 1);
      // The engine: CPs ran, the NVRAM filled and drained, space is in use.
      assert.ok((after.get('nvmirror_volume_cps_total') ?? 0) > (before.get('nvmirror_volume_cps_total') ?? 0), 'CPs counted');
      assert.ok((after.get('nvmirror_volume_cp_phase_seconds_total', { phase: 'sync' }) ?? 0) > 0, 'CP time spent syncing counted');
      for (const phase of ['prepare', 'address', 'data', 'space_map', 'superblock', 'sink']) assert.ok((after.get('nvmirror_volume_cp_phase_seconds_total', { phase }) ?? -1) >= 0, `CP phase ${phase} exposed`);
      const fills = scrapes.map((e) => e.get('nvmirror_volume_nvram_fill_ratio') ?? -1);
      assert.ok(fills.every((f) => f >= 0 && f <= 1) && fills.some((f) => f > 0), `NVRAM fill seen: ${fills.join(',')}`);
      assert.ok((after.get('nvmirror_volume_used_bytes') ?? 0) > (before.get('nvmirror_volume_used_bytes') ?? 0));
      assert.equal(after.get('nvmirror_volume_checksum_errors_total'), 0);
      assert.ok((after.get('nvmirror_volume_thread_reads_total', { result: 'hit' }) ?? 0) >= 1, 'READs answered from the block map');
      // Only GET /metrics is served.
      assert.equal((await get(url.replace('/metrics', '/nope'))).status, 404);
      process.stdout.write(`      (${writes} writes, ${scrapes.length} scrapes, ${after.get('nvmirror_volume_cps_total')} CPs, fill max ${Math.max(...fills).toFixed(3)})\n`);
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  it('real clients (nbdinfo, qemu-io) are served on the native data path by default, and on the stream path with NVMIRROR_NBD_NATIVE=0', async function () {
    requireTools(this, 'nbdinfo', 'qemu-io');
    for (const dataPath of ['native', 'stream'] as const) {
      const port = await freePort();
      const server = await startServer({
        backend: 'memory',
        transport: 'unix',
        sizeBytes: 64 * MiB,
        extraArgs: ['--metrics', `127.0.0.1:${port}`],
        ...(dataPath === 'stream' ? { env: { NVMIRROR_NBD_NATIVE: '0' } } : {}),
      });
      try {
        const url = `http://127.0.0.1:${port}/metrics`;
        await runOk('nbdinfo', ['--json', server.uri]);
        const out = await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 0 1M', '-c', 'read -P 0x5c 0 1M', server.uri]);
        assert.doesNotMatch(out, /fail|error|mismatch/i, out);
        const e = await scrape(url);
        const other = dataPath === 'native' ? 'stream' : 'native';
        assert.equal(e.get('nvmirror_nbd_transmissions_total', { path: dataPath }), 2, `nbdinfo and qemu-io on the ${dataPath} path`);
        assert.equal(e.get('nvmirror_nbd_transmissions_total', { path: other }) ?? 0, 0, `none on the ${other} path`);
        assert.equal(e.get('nvmirror_nbd_requests_total', { command: 'write' }), 1);
      } finally {
        assert.equal(await server.stop(), 0);
      }
    }
  });

  it('a metrics address in use is a one-line error, and the volume is left closed', async function () {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const port = (blocker.address() as net.AddressInfo).port;
    const dir = makeTempDir('nvm-e2e-metrics-');
    try {
      const vol = path.join(dir, 'vol');
      const r = await run(process.execPath, [NVMIRROR_BIN, 'serve', vol, '--create', '16M', '--socket', path.join(dir, 's.sock'), '--metrics', `127.0.0.1:${port}`], { timeoutMs: 20_000 });
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, new RegExp(`metrics: 127\\.0\\.0\\.1:${port} is already in use`));
      assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
      const st = await run(process.execPath, [NVMIRROR_BIN, 'status', vol, '--json'], { timeoutMs: 20_000 });
      assert.equal(st.code, 0, st.stderr);
      assert.doesNotMatch(st.stdout, /"served":\s*true/, 'not left served or locked');
    } finally {
      await new Promise<void>((r) => blocker.close(() => r()));
    }
  });

  it('a block corrupted on disk, then read, counts as a checksum error', async function () {
    const { server, url } = await startWithMetrics();
    const data = block(7);
    const s = await negotiate(await RawConn.connect(targetOf(server)));
    assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 100 * BS, length: BS }, data), 0);
    s.conn.destroy();
    assert.equal(await server.stop(), 0); // final CP: the block is in the member file
    const member = path.join(server.volumeDir as string, 'member-0.img');
    const image = fs.readFileSync(member);
    const at = image.indexOf(data);
    assert.ok(at >= 0 && at % BS === 0, 'the block is stored verbatim');
    const fd = fs.openSync(member, 'r+');
    fs.writeSync(fd, Buffer.from([image[at + 1234]! ^ 0xff]), 0, 1, at + 1234);
    fs.closeSync(fd);
    const again = await restartServer(server);
    try {
      const s2 = await negotiate(await RawConn.connect(targetOf(again)));
      assert.equal((await simpleRead(s2, 100 * BS, BS)).error, ERR.EIO);
      assert.equal((await simpleRead(s2, 0, BS)).error, 0, 'other blocks still read');
      s2.conn.destroy();
      const e = await scrape(url);
      assert.equal(e.get('nvmirror_volume_checksum_errors_total'), 1);
      assert.equal(e.get('nvmirror_nbd_errors_total', { kind: 'checksum' }), 1);
      assert.equal(e.get('nvmirror_nbd_requests_total', { command: 'read' }), 2);
    } finally {
      assert.equal(await again.stop(), 0);
    }
  });
});
