/**
 * fio's nbd ioengine (libnbd) against a real `nvmirror serve` over a Unix socket, every
 * write checked with verify=crc32c: sequential, random with mixed block sizes (bssplit),
 * and 4 parallel jobs on separate regions. A separate write-then-verify_only run, with one
 * block corrupted behind fio's back, shows that verification does catch bad data.
 * Runs for every backend in BACKENDS.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';
import { BACKENDS, MiB, Server, cleanupAll, makeTempDir, requireTools, run, runOk, startServer } from './harness';

const SIZE_BYTES = 128 * MiB;

interface FioJobResult {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

function jobFile(dir: string, name: string, uri: string, body: string): string {
  const file = path.join(dir, `${name}.fio`);
  fs.writeFileSync(file, `[global]\nioengine=nbd\nuri=${uri}\nverify=crc32c\nverify_fatal=1\ndo_verify=1\n${body}`);
  return file;
}

async function fio(file: string): Promise<FioJobResult[]> {
  // Run in the job's temp dir: fio writes its verify state files into the working directory.
  const out = await runOk('fio', ['--output-format=json', file], { timeoutMs: 60_000, cwd: path.dirname(file) });
  // fio may print notes before the JSON document.
  const start = out.indexOf('{');
  const parsed = JSON.parse(out.slice(start)) as { jobs: FioJobResult[] };
  for (const j of parsed.jobs) assert.equal(j.error, 0, `fio job ${j.jobname} error ${j.error}`);
  return parsed.jobs;
}

for (const backend of BACKENDS) {
  describe(`e2e fio nbd engine with verify=crc32c: ${backend} backend over unix`, function () {
    this.timeout(90_000);
    let server: Server;
    let tmp: string;

    before(async function () {
      requireTools(this, 'fio', 'qemu-io');
      tmp = makeTempDir('nvm-e2e-fio-');
      server = await startServer({ backend, transport: 'unix', sizeBytes: SIZE_BYTES });
    });
    after(async function () {
      if (server) assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
      await cleanupAll();
    });

    it('sequential 64k writes at QD8 verify', async function () {
      const jobs = await fio(jobFile(tmp, 'seq', server.uri, '[seq]\nrw=write\nbs=64k\niodepth=8\noffset=0\nsize=32M\n'));
      assert.equal(jobs[0]?.write.io_bytes, 32 * MiB);
      assert.equal(jobs[0]?.read.io_bytes, 32 * MiB, 'every written block read back for verification');
    });

    it('random writes of mixed sizes (bssplit 512..1M) at QD16 verify', async function () {
      const jobs = await fio(
        jobFile(
          tmp,
          'mixed',
          server.uri,
          '[mixed]\nrw=randwrite\nbssplit=512/10:4k/40:16k/20:64k/15:256k/10:1m/5\nblockalign=512\niodepth=16\n' +
            'offset=32M\nsize=32M\nrandrepeat=1\nrandseed=4242\n',
        ),
      );
      const written = jobs[0]?.write.io_bytes ?? 0;
      assert.equal(written, 32 * MiB);
      assert.equal(jobs[0]?.read.io_bytes, written);
    });

    it('4 parallel jobs on separate 16 MiB regions verify', async function () {
      const jobs = await fio(
        jobFile(
          tmp,
          'par',
          server.uri,
          '[par]\nrw=randwrite\nbs=4k\niodepth=8\nnumjobs=4\noffset=64M\noffset_increment=16M\nsize=16M\n',
        ),
      );
      assert.equal(jobs.length, 4);
      for (const j of jobs) {
        assert.equal(j.write.io_bytes, 16 * MiB, `job ${j.jobname}`);
        assert.equal(j.read.io_bytes, 16 * MiB, `job ${j.jobname}`);
      }
    });

    it('random 4k READs and WRITEs mixed (randrw) at QD16 verify, over the whole volume', async function () {
      // The native path answers both kinds on its thread (engine: the block map and the
      // NVRAM appender), sharing its receive buffers: a WRITE that waited for one while a
      // READ's came back once hung the connection (the thread slept, unwoken).
      const jobs = await fio(jobFile(tmp, 'rw', server.uri, '[rw]\nrw=randrw\nbs=4k\niodepth=16\noffset=0\nsize=64M\nrandrepeat=1\nrandseed=77\n'));
      assert.ok((jobs[0]?.write.io_bytes ?? 0) > 16 * MiB, 'about half of 64 MiB written');
      assert.ok((jobs[0]?.read.io_bytes ?? 0) >= (jobs[0]?.write.io_bytes ?? 0), 'every written block read back (plus the random READs)');
    });

    it('verify_only passes on intact data and fails after one block is corrupted', async function () {
      const body = '[vo]\nrw=write\nbs=4k\niodepth=4\noffset=0\nsize=4M\n';
      await fio(jobFile(tmp, 'vo-write', server.uri, body));
      const verifyOnly = jobFile(tmp, 'vo-check', server.uri, `verify_only=1\n${body}`);
      await fio(verifyOnly);
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x00 1M 4k', server.uri]);
      const r = await run('fio', ['--output-format=json', verifyOnly], { timeoutMs: 60_000, cwd: tmp });
      assert.notEqual(r.code, 0, `fio verify_only should fail on the corrupted block:\n${r.stdout.slice(-2000)}`);
      assert.match(`${r.stdout}${r.stderr}`, /verify|bad magic|crc32c/i);
    });
  });
}
