/**
 * qemu-io and qemu-img (QEMU's NBD client) against a real `nvmirror serve`: pattern
 * writes and reads, discard, write-zeroes, FUA, asynchronous writes + flush, and a full
 * image convert + compare. Runs for every backend in BACKENDS, over Unix and TCP.
 */
import { strict as assert } from 'assert';
import * as path from 'path';
import {
  BACKENDS, TRANSPORTS, MiB, NVMIRROR_BIN, Server, cleanupAll, makeTempDir, requireTools, run, runOk, startServer, writeRandomFile,
} from './harness';
import * as fs from 'fs';

const SIZE_BYTES = 64 * MiB;

/** Runs qemu-io commands against a URI; fails on a non-zero exit or any failure message. */
async function qemuIo(uri: string, cmds: string[], readOnly = false): Promise<string> {
  const args = ['-f', 'raw'];
  if (readOnly) args.push('-r');
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  const r = await run('qemu-io', args, { timeoutMs: 60_000 });
  const all = `${r.stdout}\n${r.stderr}`;
  assert.equal(r.code, 0, `qemu-io ${cmds.join(' ; ')} exited ${r.code}:\n${all}`);
  assert.doesNotMatch(all, /fail|error|mismatch/i, `qemu-io reported a failure:\n${all}`);
  return r.stdout;
}

for (const backend of BACKENDS) {
  for (const transport of TRANSPORTS) {
    describe(`e2e qemu-io/qemu-img: ${backend} backend over ${transport}`, function () {
      this.timeout(60_000);
      let server: Server;
      let tmp: string;

      before(async function () {
        requireTools(this, 'qemu-io', 'qemu-img');
        tmp = makeTempDir('nvm-e2e-qemu-');
        server = await startServer({ backend, transport, sizeBytes: SIZE_BYTES });
      });
      after(async function () {
        if (server) assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
        await cleanupAll();
      });

      it('pattern writes read back, aligned and unaligned', async function () {
        await qemuIo(server.uri, [
          'write -P 0xab 0 1M',
          'write -P 0x11 1000 3000', // unaligned inside the first MiB
          'write -P 0x22 2M 4k',
          'write -P 0x33 60M 4M', // the last 4 MiB, up to the end
        ]);
        await qemuIo(server.uri, [
          'read -P 0xab 0 1000',
          'read -P 0x11 1000 3000',
          'read -P 0xab 4000 1044576',
          'read -P 0x22 2M 4k',
          'read -P 0 1M 1M',
          'read -P 0x33 60M 4M',
        ], true);
      });

      it('writes larger than the 32 MiB payload limit are split by qemu and read back', async function () {
        await qemuIo(server.uri, ['write -P 0x77 8M 40M', 'flush']);
        await qemuIo(server.uri, ['read -P 0x77 8M 40M'], true);
      });

      it('discard and write -z read back as zeroes; neighbours keep their data', async function () {
        await qemuIo(server.uri, ['write -P 0x5c 0 4M', 'discard 1M 1M', 'write -z 2M 512k', 'write -z -u 3M 64k']);
        await qemuIo(server.uri, [
          'read -P 0x5c 0 1M',
          'read -P 0 1M 1M',
          'read -P 0 2M 512k',
          'read -P 0x5c 2560k 512k',
          'read -P 0 3M 64k',
          'read -P 0x5c 3136k 960k',
        ], true);
      });

      it('FUA writes, aio_write + aio_flush + flush all land', async function () {
        await qemuIo(server.uri, [
          'write -f -P 0x61 10M 64k', // FUA
          'aio_write -P 0x62 11M 64k',
          'aio_write -P 0x63 12M 1M',
          // Overlapping in-flight writes have no defined order in NBD: keep them disjoint.
          'aio_write -P 0x65 13M 4k',
          'aio_flush',
          'flush',
        ]);
        await qemuIo(server.uri, [
          'read -P 0x61 10M 64k',
          'read -P 0x62 11M 64k',
          'read -P 0x63 12M 1M',
          'read -P 0x65 13M 4k',
        ], true);
      });

      if (backend === 'engine') {
        it('engine: FUA writes are answered on the NBD thread by a flush round of the NVRAM file, and read back', async function () {
          const flushes = async (): Promise<number> =>
            (JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', server.volumeDir!, '--json'])) as { threadFlushes?: number }).threadFlushes ?? 0;
          const before = await flushes();
          // 48-60 MiB: nothing the tests before wrote.
          const writes = Array.from({ length: 12 }, (_, i) => `write -f -P 0x${(0x70 + i).toString(16)} ${48 + i}M ${4 << (i % 5)}k`);
          // One unaligned FUA write: not whole blocks, so TypeScript writes it (and it lands too).
          await qemuIo(server.uri, [...writes, `write -f -P 0x7f ${59 * MiB + 512 * 1024} 1000`]);
          const after = await flushes();
          // 12 rounds for the FUA writes (qemu-io's own FLUSH at exit may add one).
          assert.ok(after - before >= 12, `flush rounds on the NBD threads: ${after - before}`);
          await qemuIo(server.uri, [
            ...Array.from({ length: 12 }, (_, i) => `read -P 0x${(0x70 + i).toString(16)} ${48 + i}M ${4 << (i % 5)}k`),
            `read -P 0x7f ${59 * MiB + 512 * 1024} 1000`,
            `read -P 0 ${59 * MiB + 512 * 1024 + 1000} 3096`,
          ], true);
        });
      }

      it('a wrong pattern is reported (the checks above can fail)', async function () {
        await qemuIo(server.uri, ['write -P 0x42 20M 4k']);
        const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x43 20M 4k', server.uri]);
        assert.match(`${r.stdout}${r.stderr}`, /Pattern verification failed/);
      });

      it('qemu-img info sees the size; convert of a random image then compare is identical', async function () {
        const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', '-f', 'raw', server.uri])) as { 'virtual-size': number };
        assert.equal(info['virtual-size'], SIZE_BYTES);

        // Prefill with 0xff so zero regions of the source must really be written as zeroes.
        await qemuIo(server.uri, ['write -P 0xff 0 64M']);
        const src = path.join(tmp, `src-${backend}-${transport}.raw`);
        writeRandomFile(src, SIZE_BYTES, 0xc0ffee);
        // A zero region in the middle (qemu-img sends it as write-zeroes) and a sparse tail.
        const fd = fs.openSync(src, 'r+');
        fs.writeSync(fd, Buffer.alloc(8 * MiB), 0, 8 * MiB, 24 * MiB);
        fs.closeSync(fd);
        fs.truncateSync(src, 56 * MiB);
        fs.truncateSync(src, SIZE_BYTES);
        await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, server.uri], { timeoutMs: 60_000 });
        const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, server.uri], { timeoutMs: 60_000 });
        assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
        assert.match(cmp.stdout, /Images are identical/);

        // One changed byte is seen by compare.
        const srcByte = fs.readFileSync(src).readUInt8(40 * MiB);
        await qemuIo(server.uri, [`write -P 0x${(srcByte ^ 0xff).toString(16)} 40M 1`]);
        const diff = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, server.uri], { timeoutMs: 60_000 });
        assert.equal(diff.code, 1, `compare after a change: ${diff.stdout}${diff.stderr}`);
        assert.match(diff.stdout, /Content mismatch at offset 41943040!/);
      });
    });
  }
}
