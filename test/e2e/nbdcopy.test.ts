/**
 * nbdcopy (libnbd) against a real `nvmirror serve`: a random image copied in with 4
 * connections (multi-conn), read back with 1, checksums compared. For the file backend
 * the image file itself is compared too; stored backends (file, engine) are read back
 * again after a clean restart. Runs for every backend, over Unix and TCP.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';
import {
  BACKENDS, TRANSPORTS, MiB, Server, cleanupAll, makeTempDir, requireTools, restartServer, runOk, sha256File, startServer,
  writeRandomFile,
} from './harness';

const SIZE_BYTES = 64 * MiB;

for (const backend of BACKENDS) {
  for (const transport of TRANSPORTS) {
    describe(`e2e nbdcopy: ${backend} backend over ${transport}`, function () {
      this.timeout(90_000);
      let server: Server;
      let tmp: string;

      before(async function () {
        requireTools(this, 'nbdcopy', 'nbdinfo');
        tmp = makeTempDir('nvm-e2e-nbdcopy-');
        server = await startServer({ backend, transport, sizeBytes: SIZE_BYTES });
      });
      after(async function () {
        if (server) assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
        await cleanupAll();
      });

      it('advertises multi-conn, so nbdcopy really uses 4 connections', async function () {
        // nbdinfo --can exits 0 when the flag is set, 2 when it is not.
        await runOk('nbdinfo', ['--can', 'multi-conn', server.uri]);
      });

      it('copies in with 4 connections and reads back identically with 1', async function () {
        const src = path.join(tmp, 'src.raw');
        writeRandomFile(src, SIZE_BYTES, 0x1234567);
        // A zero stretch and a sparse region, so nbdcopy also sends zero requests.
        const fd = fs.openSync(src, 'r+');
        fs.writeSync(fd, Buffer.alloc(8 * MiB), 0, 8 * MiB, 16 * MiB);
        fs.closeSync(fd);
        fs.truncateSync(src, 48 * MiB);
        fs.truncateSync(src, SIZE_BYTES);
        const want = sha256File(src);

        // Prefill with a pattern so that the zeroes have to be written.
        const fill = path.join(tmp, 'fill.raw');
        fs.writeFileSync(fill, Buffer.alloc(SIZE_BYTES, 0xee));
        await runOk('nbdcopy', ['--connections=4', fill, server.uri], { timeoutMs: 60_000 });
        fs.rmSync(fill);

        await runOk('nbdcopy', ['--connections=4', '--requests=16', '--flush', src, server.uri], { timeoutMs: 60_000 });
        const back = path.join(tmp, 'back.raw');
        await runOk('nbdcopy', ['--connections=1', server.uri, back], { timeoutMs: 60_000 });
        assert.equal(fs.statSync(back).size, SIZE_BYTES);
        assert.equal(sha256File(back), want, 'read back with 1 connection equals the source');

        // And with 4 reading connections.
        const back4 = path.join(tmp, 'back4.raw');
        await runOk('nbdcopy', ['--connections=4', server.uri, back4], { timeoutMs: 60_000 });
        assert.equal(sha256File(back4), want, 'read back with 4 connections equals the source');

        if (backend === 'file' && server.imagePath !== undefined) {
          assert.equal(sha256File(server.imagePath), want, 'the raw image file holds the data at the same offsets');
        }

        // Stored volumes keep everything across a clean restart.
        if (backend !== 'memory') {
          assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
          server = await restartServer(server);
          const again = path.join(tmp, 'again.raw');
          await runOk('nbdcopy', ['--connections=1', server.uri, again], { timeoutMs: 60_000 });
          assert.equal(sha256File(again), want, 'read back after a restart equals the source');
        }
      });
    });
  }
}
