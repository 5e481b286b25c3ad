/**
 * The file system under a thin member fills up while a client writes (a real tmpfs,
 * mounted small): the CP that cannot write its blocks stops the volume taking writes.
 * The client sees ENOSPC (the error a file system above reports as "No space left on
 * device"), not a media error; `status` says why and what to do; nothing acknowledged is
 * lost; and once there is room, a restart replays the NVRAM log and the volume checks clean.
 * Found by hand: status said "No known data errors" while every write failed with EIO.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';
import {
  MiB, NVMIRROR_BIN, cleanupAll, isRoot, makeTempDir, onCleanup, requireCondition, requireTools, run, runOk, runSyncQuiet, startServer, writeRandomFile,
} from './harness';
import type { VolumeStatus } from '../../src/volume/served';

describe('e2e: the members\' file system fills up', function () {
  this.timeout(180_000);
  after(cleanupAll);

  it('writes fail with ENOSPC, status says why, nothing acknowledged is lost, and a restart with room replays the log', async function () {
    requireCondition(this, isRoot(), 'root (mounts a small tmpfs)');
    requireTools(this, 'nbdcopy');
    const tmp = makeTempDir('nvm-e2e-full-');
    const mnt = path.join(tmp, 'mnt');
    fs.mkdirSync(mnt);
    await runOk('mount', ['-t', 'tmpfs', '-o', 'size=40M', 'tmpfs', mnt]);
    onCleanup(() => void runSyncQuiet('umount', ['-l', mnt]));
    const vol = path.join(mnt, 'v');
    await runOk(process.execPath, [NVMIRROR_BIN, 'create', vol, '--size', '256M', '--nvram-size', '8M']);
    const data = path.join(tmp, 'data.bin');
    writeRandomFile(data, 96 * MiB, 7);

    let srv = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 256 * MiB, existingStoragePath: vol });
    // One request at a time, in order: every byte below the first failure was acknowledged.
    const w = await run('nbdcopy', ['--connections=1', '--requests=1', '--request-size=1048576', data, srv.uri], { timeoutMs: 120_000 });
    assert.notEqual(w.code, 0, 'the writes cannot all fit');
    const m = /write at offset (\d+) failed: No space left on device/.exec(w.stderr);
    assert.ok(m, `the client sees ENOSPC: ${w.stderr}`);
    const acked = Number(m[1]);
    assert.ok(acked >= 8 * MiB && acked % MiB === 0, `failed at ${acked}`);

    const st = JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol, '--json'])) as VolumeStatus;
    assert.match(st.cpFailure ?? '', /^commit of CP \d+ failed: ENOSPC: /);
    const text = await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol]);
    assert.match(text, /\nerrors: {4}WRITES FAILING: commit of CP \d+ failed: ENOSPC: .*; the volume takes no writes \(they fail with ENOSPC\) until it is restarted\. Every acknowledged write is kept in the NVRAM log and replayed at the restart: free space on the members' file system first\n/);
    await srv.stop();

    await runOk('mount', ['-o', 'remount,size=400M', mnt]);
    srv = await startServer({ backend: 'engine', transport: 'unix', sizeBytes: 256 * MiB, existingStoragePath: vol });
    const back = path.join(tmp, 'back.bin');
    await runOk('nbdcopy', [srv.uri, back], { timeoutMs: 120_000 });
    const got = fs.readFileSync(back).subarray(0, acked);
    const want = fs.readFileSync(data).subarray(0, acked);
    assert.ok(got.equals(want), `every acknowledged byte (${acked}) reads back`);
    const after = JSON.parse(await runOk(process.execPath, [NVMIRROR_BIN, 'status', vol, '--json'])) as VolumeStatus;
    assert.equal(after.cpFailure, undefined);
    assert.equal(await srv.stop(), 0);
    const checked = await run(process.execPath, [NVMIRROR_BIN, 'check', vol], { timeoutMs: 60_000 });
    assert.equal(checked.code, 0, checked.stdout + checked.stderr);
  });
});
