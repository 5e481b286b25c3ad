/**
 * A mirror peer that takes the TCP connection and then says nothing (a wedged receiver, a
 * half-open connection, or a port that is not `nvmirror receive`): the source must not
 * wait on it forever. It drops the connection when no WELCOME comes within the stall
 * timeout of its HELLO, says why in `status`, keeps serving (policy available), and
 * reconnects; once a real receiver answers on that port, it is welcomed and in sync.
 * (Without the WELCOME timeout the first connection stays open for the whole test.)
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { MirrorSource } from '../../src/mirror/source';
import { createVolumeDir, openVolumeDir, type OpenedVolumeDir } from '../../src/volume/dir';
import { until } from './helpers';

const MIB = 1024 * 1024;
const STALL_MS = 1000;


describe('mirror: a peer that accepts the connection and never answers', function () {
  this.timeout(60_000);
  let tmp: string;
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-silent-')); });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('the source drops it after the stall timeout, keeps serving, reconnects, and syncs once a receiver answers', async () => {
    const srcDir = path.join(tmp, 'src');
    const rxDir = path.join(tmp, 'rx');
    fs.mkdirSync(rxDir);
    await createVolumeDir(srcDir, { sizeBytes: 32 * MIB, nvramSizeBytes: 4 * MIB });
    // The silent peer: reads (and keeps) whatever comes, never writes a byte.
    const accepted: net.Socket[] = [];
    let helloBytes = 0;
    const silent = net.createServer((s) => {
      accepted.push(s);
      s.on('data', (d: Buffer) => { helloBytes += d.length; });
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as net.AddressInfo).port;
    const logger = pino({ level: 'silent' });
    const source = new MirrorSource({
      dir: srcDir, peer: { host: '127.0.0.1', port }, mode: 'sync', policy: 'available', stallTimeoutMs: STALL_MS,
      logger, link: { mirrorInsecure: true },
    });
    let vol: OpenedVolumeDir | undefined;
    let rx: MirrorReceiver | undefined;
    try {
      vol = await openVolumeDir(srcDir, { readOnly: false, control: false, cpIntervalMs: 0, beforeRecovery: (t) => source.attachTree(t) });
      source.attachVolume(vol.volume);
      await until('a HELLO reaching the silent peer', () => helloBytes > 0, 10_000);
      assert.equal(source.stats().connected, false, 'a connection without WELCOME is not connected');
      // Dropped after the stall timeout (the check runs once a second) and tried again.
      await until('a second connection attempt', () => accepted.length >= 2, 4 * STALL_MS + 5000);
      assert.ok(accepted[0]!.destroyed || accepted[0]!.readableEnded, 'the first connection was closed by the source');
      assert.match(source.stats().lastError ?? '', /no WELCOME from the destination within 1000 ms of HELLO/);
      // Client writes go on meanwhile (policy available).
      await vol.volume.write(0, Buffer.alloc(64 * 1024, 5), true);
      // A real receiver takes over the port: the source is welcomed and catches up.
      for (const s of accepted) s.destroy();
      await new Promise<void>((r) => silent.close(() => r()));
      rx = new MirrorReceiver({ dir: rxDir, logger });
      await rx.listen('127.0.0.1', port);
      await vol.volume.checkpoint();
      await until('in sync with equal roots', () => {
        const st = source.stats();
        return st.connected && st.state === 'in-sync' && st.rootsEqual;
      }, 30_000);
    } finally {
      await vol?.close();
      await source.stop();
      source.detach();
      await rx?.close();
      if (silent.listening) await new Promise<void>((r) => silent.close(() => r()));
    }
  });
});
