/**
 * Bounded memory: a 100 GiB thin volume under sustained random 4 KiB writes at queue
 * depth 32 over its whole range (many times the NVRAM size, CPs running back to back)
 * keeps the server's peak RSS (VmHWM, which includes the touched NVRAM mapping) under
 * 256 MiB. Prints the figures.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from './nbd-client';
import { prng, runCli, ServedVolume } from './harness';

const BS = 4096;
const RUN_MS = Number(process.env.NVMIRROR_MEMORY_MS ?? 12_000);
const QD = 32;
const RSS_MAX_BYTES = 256 * 1024 * 1024;

function peakRssBytes(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /VmHWM:\s+(\d+) kB/.exec(status);
  assert.ok(m, 'no VmHWM in /proc status');
  return Number(m[1]) * 1024;
}

describe('crash: bounded memory', function () {
  this.timeout(180_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-mem-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('a 100 GiB thin volume under sustained random writes stays under 256 MiB RSS', async () => {
    const dir = path.join(tmp, 'vol');
    const sock = path.join(tmp, 's');
    assert.equal((await runCli(['create', dir, '--size', '100G'])).code, 0);
    const server = await ServedVolume.start(dir, sock, ['--log-level', 'debug']);
    const c = await NbdClient.connect(sock, '');
    const rnd = prng(7);
    const blocks = (100 * 1024 ** 3) / BS;
    const data = Buffer.alloc(BS);
    let writes = 0;
    let peak = 0;
    const end = Date.now() + RUN_MS;
    const worker = async (): Promise<void> => {
      while (Date.now() < end) {
        data.writeUInt32LE(writes, 0);
        await c.write(Math.floor(rnd() * blocks) * BS, data, false);
        writes++;
        if (writes % 2048 === 0) peak = Math.max(peak, peakRssBytes(server.pid));
      }
    };
    await Promise.all(Array.from({ length: QD }, () => worker()));
    peak = Math.max(peak, peakRssBytes(server.pid));
    await c.close();
    assert.equal(await server.stop(), 0, server.stderr);
    const cps = server.stderr.split('\n').filter((l) => l.includes('"consistency point committed"')).length;
    const mib = (b: number): string => (b / 1024 / 1024).toFixed(1);
    console.log(`      ${writes} random 4 KiB writes (${mib(writes * BS)} MiB, ${(writes / (RUN_MS / 1000)).toFixed(0)} IOPS) over 100 GiB, ${cps} CPs; peak RSS ${mib(peak)} MiB`);
    assert.ok(writes * BS > 2 * 64 * 1024 * 1024, 'the load did not exceed the NVRAM size');
    assert.ok(peak < RSS_MAX_BYTES, `peak RSS ${mib(peak)} MiB`);
  });
});
