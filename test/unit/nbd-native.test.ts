/**
 * The native transmission path (native/nbd_serve.cc, src/nbd/native-transmission.ts)
 * against real memory, file and engine volumes served by an in-process NbdServer on a
 * Unix socket, driven by the raw client of the e2e tests:
 * - every WRITE message (header and payload) split in two at every byte offset, and every
 *   other command's header split at every offset, with the second part sent only once
 *   the server has received the first (so each split really reaches the thread apart);
 *   every acknowledged write is read back from the volume itself, not over NBD;
 * - hostile input: bad magic, an oversized WRITE, an unknown command, a truncated header
 *   or payload then close, a half header then silence; after each, nothing is written
 *   that was not acknowledged, the budget is fully released and no connection is left;
 * - a file volume's plain WRITEs are written by the thread itself (pwrite), a memory
 *   volume's ones into chunks that hold data copied in by it; FUA ones and ones past the
 *   end take the shared path (the volume's write, its error); WRITE/TRIM/WRITE_ZEROES on
 *   shared chunks match a model;
 * - plain READs of a file / memory volume are served by the thread itself once a buffer of
 *   their size is granted (the first one of a size goes to TypeScript, which grants one):
 *   every size and alignment class, holes, simple and structured replies, compared with the
 *   volume's own read; a READ at the end is served, one past it or of 0 bytes is EINVAL as
 *   before; READs racing WRITEs (plain, FUA, into new memory chunks) return for every byte
 *   a version no older than the last acknowledged one; clients that leave READ replies
 *   unread or close mid-way leave the budget at 0;
 * - the switch: nativeTransmission: false serves the same requests on the stream path.
 */
import { strict as assert } from 'assert';
import { execFileSync } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as net from 'net';
import * as path from 'path';
import { NbdServer } from '../../src/nbd/server';
import { BUSY_POLL_US_DEFAULT, BUSY_POLL_US_MAX, busyPollStats, pauseBusyPoll, setBusyPoll } from '../../src/nbd/native-transmission';
import { StaticExports } from '../../src/volume/exports';
import { createLogger } from '../../src/util/log';
import { addon } from '../../src/io/native';
import { MEMORY_CHUNK_BYTES, MemoryVolume, SPARE_CHUNKS } from '../../src/volume/memory';
import { FileVolume } from '../../src/volume/file';
import { EngineVolume, type ReplicaGate } from '../../src/volume/engine';
import { VolumeError } from '../../src/util/errors';
import { BlockTree } from '../../src/tree/tree';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { FileBlockDevice } from '../../src/io/file-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { MmapNvram } from '../../src/io/mmap-nvram';
import { NvLog } from '../../src/nvlog/log';
import type { Volume } from '../../src/volume/types';
import { NativeRx, plainFd } from '../../src/mirror/native-rx';
import { FrameParser, MsgType, type Message } from '../../src/mirror/wire';
import {
  CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, ERR, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT, RawConn, Session, clientFlags, goData, negotiate, nextCookie, option, readGreeting, readInfoReplies,
  readSimpleReply, request, simpleCommand, simpleRead,
} from '../e2e/rawnbd';

const MiB = 1024 * 1024;
const SIZE_BYTES = 16 * MiB;
const UUID = '5eed0000-1111-4222-8333-444455556610';
const MAX_PAYLOAD_BYTES = 64 * MiB;
/** A bound on every wait below (they poll for a state, they do not measure time). */
const WAIT_MS_MAX = 10_000;

type Kind = 'memory' | 'file' | 'engine' | 'engine-file';
/** The engine on a member file: its CP interval and NVRAM (small: CPs run, blocks move and are reused during the races). */
const ENGINE_FILE_CP_MS = 5;
const ENGINE_FILE_NVRAM_BYTES = 1 * MiB;

async function makeVolume(kind: Kind, dir: string): Promise<Volume> {
  if (kind === 'memory') return MemoryVolume.create(SIZE_BYTES);
  if (kind === 'file') return FileVolume.create(path.join(dir, 'vol.img'), SIZE_BYTES);
  if (kind === 'engine-file') {
    // Twice the volume's blocks: room for the copies CPs write before freeing the old ones.
    const dev = await FileBlockDevice.create(path.join(dir, 'member.img'), 2 * (SIZE_BYTES / 4096) + 64);
    await BlockTree.format(dev, { sizeBytes: SIZE_BYTES, volumeUuid: UUID });
    const nvram = new MemoryNvram(ENGINE_FILE_NVRAM_BYTES);
    await NvLog.format(nvram, UUID);
    return EngineVolume.open({
      tree: await BlockTree.open(dev), region: nvram, readOnly: false, cpIntervalMs: ENGINE_FILE_CP_MS,
      directRead: { fd: dev.readFd() as number, deviceBlocks: dev.blockCount },
    });
  }
  // The engine as `serve` runs it: its NVRAM a memory-mapped file (so the threads answer
  // plain FLUSHes too, with fdatasync of that file).
  const dev = new MemoryBlockDevice(4096);
  await BlockTree.format(dev, { sizeBytes: SIZE_BYTES, volumeUuid: UUID });
  const nvram = await MmapNvram.open(path.join(dir, 'nvram'), { sizeBytes: 8 * MiB, create: true });
  await NvLog.format(nvram, UUID);
  return EngineVolume.open({ tree: await BlockTree.open(dev), region: nvram, readOnly: false, cpIntervalMs: 0 });
}

async function until(what: string, done: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS_MAX;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

interface Rig {
  server: NbdServer;
  volume: Volume;
  socketPath: string;
  dir: string;
}

async function startRig(kind: Kind, native: boolean, busyPollUs?: number): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `nvm-native-${kind}-`));
  const volume = await makeVolume(kind, dir);
  const server = new NbdServer({
    exports: new StaticExports([['', volume]]),
    logger: createLogger('silent'),
    nativeTransmission: native,
    stallTimeoutMs: 1_000,
    ...(busyPollUs !== undefined ? { busyPollUs } : {}),
  });
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listenUnix(socketPath);
  return { server, volume, socketPath, dir };
}

async function stopRig(r: Rig): Promise<void> {
  await r.server.close();
  await r.volume.close();
  fs.rmSync(r.dir, { recursive: true, force: true });
}

/** A session, and the server-side count of bytes it has received so far. */
async function open(r: Rig, structured = false): Promise<Session> {
  const s = await negotiate(await RawConn.connect({ socketPath: r.socketPath }), { structured });
  await until('the connection in transmission', () => r.server.transmissionStates().length === 1);
  return s;
}

function received(r: Rig): number {
  const st = r.server.transmissionStates();
  assert.equal(st.length, 1, 'one connection');
  return (st[0] as Record<string, number>)['bytesReceived'] as number;
}

/** Sends msg in two writes split at `at`, the second once the server holds the first. */
async function sendSplit(r: Rig, s: Session, msg: Buffer, at: number): Promise<void> {
  const base = received(r);
  if (at > 0 && at < msg.length) {
    await s.conn.write(msg.subarray(0, at));
    await until(`the first ${at} bytes at the server`, () => received(r) >= base + at);
    await s.conn.write(msg.subarray(at));
  } else {
    await s.conn.write(msg);
  }
}

function directWrites(r: Rig): number {
  return (r.server.transmissionStates()[0] as Record<string, number>)['directWrites'] as number;
}

function directFlushes(r: Rig): number {
  return (r.server.transmissionStates()[0] as Record<string, number>)['directFlushes'] as number;
}

function directReads(r: Rig): number {
  return (r.server.transmissionStates()[0] as Record<string, number>)['directReads'] as number;
}

interface AnyReply {
  cookie: bigint;
  error: number;
  /** A READ's data (simple reply with error 0, or the OFFSET_DATA chunk's data). */
  data?: Buffer;
}

/**
 * Reads one reply, simple or structured. readLen(cookie) says how many data bytes a simple
 * READ reply carries (undefined: not a READ); a structured READ reply must be a single
 * OFFSET_DATA chunk with the DONE flag at offsetOf(cookie), or a single ERROR chunk.
 */
async function readAnyReply(s: Session, readLen: (c: bigint) => number | undefined, offsetOf: (c: bigint) => number): Promise<AnyReply> {
  const h = await s.conn.read(16, 'a reply header');
  const magic = h.readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) {
    const cookie = h.readBigUInt64BE(8);
    const error = h.readUInt32BE(4);
    const n = readLen(cookie);
    if (n === undefined || error !== 0) return { cookie, error };
    return { cookie, error, data: await s.conn.read(n, 'READ data') };
  }
  assert.equal(magic, STRUCTURED_REPLY_MAGIC, 'a reply magic');
  assert.ok(s.structured, 'structured replies only when negotiated');
  const rest = await s.conn.read(4, 'a structured reply header');
  const flags = h.readUInt16BE(4);
  const type = h.readUInt16BE(6);
  const cookie = h.readBigUInt64BE(8);
  const len = rest.readUInt32BE(0);
  const payload = await s.conn.read(len, 'a chunk payload');
  assert.equal(flags & CHUNK_FLAG_DONE, CHUNK_FLAG_DONE, 'a READ reply is one chunk, flagged DONE');
  if (type === CHUNK.ERROR) return { cookie, error: payload.readUInt32BE(0) };
  assert.equal(type, CHUNK.OFFSET_DATA, 'an OFFSET_DATA chunk');
  assert.equal(Number(payload.readBigUInt64BE(0)), offsetOf(cookie), 'the chunk at the READ\'s offset');
  return { cookie, error: 0, data: payload.subarray(8) };
}

/** One READ, simple or structured as the session negotiated. */
async function readOne(s: Session, offset: number, length: number): Promise<AnyReply> {
  const cookie = nextCookie();
  await s.conn.write(request({ type: CMD.READ, cookie, offset, length }));
  const rep = await readAnyReply(s, () => length, () => offset);
  assert.equal(rep.cookie, cookie);
  return rep;
}

/** Everything released: no connection, nothing charged to the budget. */
async function settled(r: Rig): Promise<void> {
  await until('no connection left and the budget released', () => r.server.connectionCount === 0 && r.server.budget.usedBytes === 0);
}

for (const kind of ['memory', 'file', 'engine'] as const) {
  describe(`native NBD transmission: ${kind} volume`, function () {
    this.timeout(120_000);
    let r: Rig;
    beforeEach(async () => {
      r = await startRig(kind, true);
    });
    afterEach(async () => {
      await stopRig(r);
    });

    it('serves a WRITE split at every byte offset of header and payload; each acknowledged write is in the volume', async () => {
      const s = await open(r);
      const PAYLOAD = 512;
      const msgBytes = 28 + PAYLOAD;
      for (let at = 0; at <= msgBytes; at++) {
        const data = crypto.randomBytes(PAYLOAD);
        const offset = (at % 64) * PAYLOAD + 4096 * 3 + (at % 7);
        const cookie = nextCookie();
        await sendSplit(r, s, request({ type: CMD.WRITE, cookie, offset, length: PAYLOAD }, data), at);
        const reply = await readSimpleReply(s.conn);
        assert.equal(reply.cookie, cookie);
        assert.equal(reply.error, 0, `write split at ${at}`);
        assert.ok((await r.volume.read(offset, PAYLOAD)).equals(data), `the write split at ${at} is in the volume`);
      }
      assert.equal(r.server.nativeTransmissions, 1, 'served by the native thread');
      const direct = directWrites(r);
      if (kind === 'engine') assert.equal(direct, 0, 'the engine takes WRITEs of partial blocks through write() (read-modify-write)');
      else assert.ok(direct > 0, 'the thread wrote plain WRITEs into the file / the memory chunks itself');
      s.conn.destroy();
      await settled(r);
    });

    it('serves a 100 KiB WRITE split around the header, the thread\'s 16 KiB direct-receive threshold and every 997th offset', async () => {
      const s = await open(r);
      const PAYLOAD = 100 * 1024;
      const msgBytes = 28 + PAYLOAD;
      const points = new Set<number>();
      for (let at = 0; at <= msgBytes; at += 997) points.add(at);
      for (const edge of [28, 28 + 16 * 1024, msgBytes - 16 * 1024, 64 * 1024, msgBytes]) for (let d = -2; d <= 2; d++) points.add(Math.max(0, Math.min(msgBytes, edge + d)));
      for (const at of points) {
        const data = crypto.randomBytes(PAYLOAD);
        const offset = 4 * MiB + (at % 5) * 4096;
        const cookie = nextCookie();
        await sendSplit(r, s, request({ type: CMD.WRITE, cookie, offset, length: PAYLOAD }, data), at);
        const reply = await readSimpleReply(s.conn);
        assert.equal(reply.cookie, cookie);
        assert.equal(reply.error, 0, `write split at ${at}`);
        assert.ok((await r.volume.read(offset, PAYLOAD)).equals(data), `the write split at ${at} is in the volume`);
      }
      // (A WRITE that does not fit the rest of the active NVRAM half goes to TypeScript, which switches halves.)
      if (kind === 'engine') assert.ok(directWrites(r) > points.size * 0.9, `the engine's thread appended the whole-block WRITEs to the NVRAM log itself (${directWrites(r)} of ${points.size})`);
      s.conn.destroy();
      await settled(r);
    });

    it('serves READ, FLUSH, TRIM, WRITE_ZEROES and CACHE with their header split at every offset', async () => {
      const s = await open(r);
      const data = crypto.randomBytes(8192);
      await r.volume.write(65536, data, false);
      const cmds = [
        { type: CMD.READ, offset: 65536, length: 8192 },
        { type: CMD.FLUSH, offset: 0, length: 0 },
        { type: CMD.TRIM, offset: 1 * MiB, length: 65536 },
        { type: CMD.WRITE_ZEROES, offset: 2 * MiB, length: 4096 },
        { type: CMD.CACHE, offset: 0, length: 4096 },
      ];
      for (const c of cmds) {
        for (let at = 0; at <= 28; at++) {
          const cookie = nextCookie();
          await sendSplit(r, s, request({ ...c, cookie }), at);
          const reply = await readSimpleReply(s.conn);
          assert.equal(reply.cookie, cookie);
          assert.equal(reply.error, 0, `command ${c.type} split at ${at}`);
          if (c.type === CMD.READ) assert.ok((await s.conn.read(c.length)).equals(data), `READ split at ${at} returns the data`);
        }
      }
      // The engine's NVRAM is a file: its thread answered every FLUSH (fdatasync of it).
      assert.equal(directFlushes(r), kind === 'engine' ? 29 : 0, 'FLUSHes answered by the thread');
      s.conn.destroy();
      await settled(r);
    });

    it('answers 64 pipelined WRITEs then 64 READs, each by its cookie', async () => {
      const s = await open(r);
      const blocks = Array.from({ length: 64 }, () => crypto.randomBytes(4096 + 512));
      const writes = Buffer.concat(blocks.map((b, i) => request({ type: CMD.WRITE, cookie: BigInt(1000 + i), offset: i * 8192, length: b.length }, b)));
      await s.conn.write(writes);
      const seen = new Set<bigint>();
      for (let i = 0; i < 64; i++) {
        const rep = await readSimpleReply(s.conn);
        assert.equal(rep.error, 0);
        seen.add(rep.cookie);
      }
      assert.equal(seen.size, 64, 'one reply per WRITE');
      for (let i = 0; i < 64; i++) assert.ok((await r.volume.read(i * 8192, 4608)).equals(blocks[i] as Buffer), `block ${i} in the volume`);
      for (let i = 0; i < 64; i++) {
        const got = await simpleRead(s, i * 8192, 4608);
        assert.ok(got.data?.equals(blocks[i] as Buffer), `block ${i} read back`);
      }
      s.conn.destroy();
      await settled(r);
    });

    it('WRITEs, TRIMs and WRITE_ZEROES on the same chunks read back as if run one by one (a model says what)', async () => {
      const s = await open(r);
      const BASE = 6 * MiB;
      const SPAN = 256 * 1024;
      const model = Buffer.alloc(SPAN);
      let seed = 12345;
      const rnd = (n: number): number => {
        seed = (seed * 1103515245 + 12345) % 2 ** 31;
        // The high bits: with `seed % n` the low bits repeat every few calls (here every
        // WRITE after a rnd(2) of 0 came out FUA, so no plain WRITE ever raced a READ).
        return Math.floor((seed / 2 ** 31) * n);
      };
      for (let i = 0; i < 300; i++) {
        const off = rnd(SPAN - 1);
        const len = 1 + rnd(Math.min(SPAN - off, 70_000));
        const op = rnd(4);
        if (op <= 1) {
          const data = crypto.randomBytes(len);
          assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: BASE + off, length: len }, data), 0);
          data.copy(model, off);
        } else {
          const type = op === 2 ? CMD.TRIM : CMD.WRITE_ZEROES;
          assert.equal(await simpleCommand(s, { type, offset: BASE + off, length: len }), 0);
          model.fill(0, off, off + len);
        }
        assert.ok((await r.volume.read(BASE, SPAN)).equals(model), `after op ${i} (${op} ${len}@${off})`);
      }
      s.conn.destroy();
      await settled(r);
    });

    it(kind === 'engine'
      ? 'a FUA WRITE of whole blocks is appended and answered by a flush round on the threads; a partial FUA and a WRITE past the end take the shared path'
      : 'FUA WRITEs and WRITEs past the end take the shared path: FUA lands, past the end is ENOSPC and changes nothing', async () => {
      const s = await open(r);
      const before = directWrites(r);
      const engine = r.volume instanceof EngineVolume ? r.volume : undefined;
      const threadFlushes = (): number => engine?.stats().threadFlushes ?? 0;
      const flushesBefore = threadFlushes();
      const byThread = engine ? 1 : 0; // the engine's appender makes flush rounds (its NVRAM is a file here)
      const data = crypto.randomBytes(8192);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: 3 * MiB, length: data.length }, data), 0);
      assert.ok((await r.volume.read(3 * MiB, data.length)).equals(data), 'the FUA write is in the volume');
      assert.equal(directWrites(r), before + byThread, byThread ? 'the thread answered the FUA write' : 'the shared path wrote it');
      assert.equal(threadFlushes() - flushesBefore, byThread, 'after a flush round of its own');
      const part = crypto.randomBytes(1000);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: 4 * MiB + 100, length: part.length }, part), 0);
      assert.ok((await r.volume.read(4 * MiB + 100, part.length)).equals(part), 'the partial FUA write is in the volume');
      const tail = await r.volume.read(SIZE_BYTES - 4096, 4096);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: SIZE_BYTES - 4096, length: 8192 }, crypto.randomBytes(8192)), ERR.ENOSPC);
      assert.ok((await r.volume.read(SIZE_BYTES - 4096, 4096)).equals(tail), 'a WRITE past the end changed nothing');
      assert.equal(directWrites(r), before + byThread, 'neither the partial FUA nor the WRITE past the end was written by the thread itself');
      s.conn.destroy();
      await settled(r);
    });

    it('serves requests the client sent together with its last option (handshake leftover)', async () => {
      const c = await RawConn.connect({ socketPath: r.socketPath });
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      const data = crypto.randomBytes(4096);
      const cookies = [nextCookie(), nextCookie()];
      await c.write(Buffer.concat([
        option(OPT.GO, goData('')),
        request({ type: CMD.WRITE, cookie: cookies[0] as bigint, offset: 8 * MiB, length: data.length }, data),
        request({ type: CMD.FLUSH, cookie: cookies[1] as bigint, offset: 0, length: 0 }),
      ]));
      await readInfoReplies(c, OPT.GO);
      const got = new Set<bigint>();
      for (let i = 0; i < 2; i++) {
        const rep = await readSimpleReply(c);
        assert.equal(rep.error, 0);
        got.add(rep.cookie);
      }
      assert.deepEqual([...got].sort(), [...cookies].sort());
      assert.ok((await r.volume.read(8 * MiB, data.length)).equals(data));
      assert.equal(r.server.nativeTransmissions, 1);
      c.destroy();
      await settled(r);
    });

    it('answers an unknown command with EINVAL and keeps serving', async () => {
      const s = await open(r);
      assert.equal(await simpleCommand(s, { type: 99, offset: 0, length: 0 }), ERR.EINVAL);
      const data = crypto.randomBytes(4096);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 8192, length: 4096 }, data), 0);
      assert.ok((await r.volume.read(8192, 4096)).equals(data));
      s.conn.destroy();
      await settled(r);
    });

    it('refuses a WRITE longer than 64 MiB, skips its payload, and keeps serving', async () => {
      const s = await open(r);
      const cookie = nextCookie();
      const before = await r.volume.read(0, 4096);
      await s.conn.write(request({ type: CMD.WRITE, cookie, offset: 0, length: MAX_PAYLOAD_BYTES + 4096 }));
      const sent = await s.conn.writeFiller(MAX_PAYLOAD_BYTES + 4096, 0x77);
      assert.equal(sent, MAX_PAYLOAD_BYTES + 4096);
      const rep = await readSimpleReply(s.conn, WAIT_MS_MAX);
      assert.equal(rep.cookie, cookie);
      assert.equal(rep.error, ERR.EINVAL, 'an oversized WRITE is refused');
      assert.ok((await r.volume.read(0, 4096)).equals(before), 'nothing of it was written');
      const data = crypto.randomBytes(4096);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 4096, length: 4096 }, data), 0, 'the next request is served');
      assert.ok((await r.volume.read(4096, 4096)).equals(data));
      s.conn.destroy();
      await settled(r);
    });

    it('drops a client with a bad request magic, replies nothing, and serves the next client', async () => {
      const s = await open(r);
      const bad = request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: 4096 }, Buffer.alloc(4096, 1));
      bad.writeUInt32BE(0x12345678, 0);
      await s.conn.write(bad);
      assert.ok(await s.conn.waitClosed(WAIT_MS_MAX), 'the server closes the connection');
      assert.equal(s.conn.available, 0, 'no reply');
      assert.ok((await r.volume.read(0, 4096)).equals(Buffer.alloc(4096)), 'nothing written');
      await settled(r);
      const t = await open(r);
      assert.equal(await simpleCommand(t, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
      t.conn.destroy();
      await settled(r);
    });

    for (const cut of ['in the header', 'in the payload', 'right after the header']) {
      it(`a client that closes ${cut} of a WRITE: nothing written, budget released, no connection left`, async () => {
        const s = await open(r);
        const data = Buffer.alloc(256 * 1024, 0xab);
        const msg = request({ type: CMD.WRITE, cookie: nextCookie(), offset: 1 * MiB, length: data.length }, data);
        const at = cut === 'in the header' ? 13 : cut === 'right after the header' ? 28 : 28 + 100_000;
        const base = received(r);
        await s.conn.write(msg.subarray(0, at));
        await until('the partial message at the server', () => received(r) >= base + at);
        s.conn.destroy();
        await settled(r);
        assert.ok((await r.volume.read(1 * MiB, data.length)).equals(Buffer.alloc(data.length)), 'nothing of the cut WRITE landed');
      });
    }

    it('drops a client that sends half a header then nothing, after the stall timeout', async () => {
      const s = await open(r);
      await s.conn.write(request({ type: CMD.READ, cookie: nextCookie(), offset: 0, length: 4096 }).subarray(0, 11));
      assert.ok(await s.conn.waitClosed(WAIT_MS_MAX), 'dropped');
      await settled(r);
    });

    it('after DISC answers what came before it and closes', async () => {
      const s = await open(r);
      const data = crypto.randomBytes(65536);
      const c1 = nextCookie();
      await s.conn.write(Buffer.concat([
        request({ type: CMD.WRITE, cookie: c1, offset: 0, length: data.length }, data),
        request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }),
      ]));
      const rep = await readSimpleReply(s.conn);
      assert.equal(rep.cookie, c1);
      assert.equal(rep.error, 0);
      assert.ok(await s.conn.waitClosed(WAIT_MS_MAX), 'closed after DISC');
      await settled(r);
      assert.ok((await r.volume.read(0, data.length)).equals(data));
    });
  });
}

for (const kind of ['memory', 'file', 'engine-file'] as const) {
  describe(`native NBD transmission: READs served by the thread, ${kind} volume`, function () {
    // The engine's thread answers whole blocks its map holds: blocks of the tree (not the
    // NVRAM log) whose address block a READ through TypeScript walked since the last append.
    const engine = kind === 'engine-file';
    const servable = (off: number, len: number): boolean => !engine || (off % 4096 === 0 && len % 4096 === 0);
    this.timeout(120_000);
    let r: Rig;
    beforeEach(async () => {
      r = await startRig(kind, true);
    });
    afterEach(async () => {
      await stopRig(r);
    });

    /** Data in every other 64 KiB chunk of the first 2 MiB and the last 256 KiB; the rest holes. */
    async function fill(): Promise<void> {
      for (let off = 0; off < 2 * MiB; off += 128 * 1024) await r.volume.write(off, crypto.randomBytes(64 * 1024), false);
      await r.volume.write(SIZE_BYTES - 256 * 1024, crypto.randomBytes(256 * 1024), false);
      if (engine) await (r.volume as EngineVolume).checkpoint(); // into the tree, out of the log
    }

    const SIZES = [1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537, 200_000, 1 * MiB, 1 * MiB + 1];
    const OFFSETS = [0, 1, 511, 4095, 4096, 65535, 65536, 65536 + 4096, 128 * 1024 - 3, 1 * MiB + 7];

    for (const structured of [false, true]) {
      it(`serves plain READs of every size and alignment with ${structured ? 'structured' : 'simple'} replies; data equals the volume's own read`, async () => {
        await fill();
        const s = await open(r, structured);
        let served = 0;
        let expected = 0;
        for (const len of SIZES) {
          const offsets = [...OFFSETS, SIZE_BYTES - len, SIZE_BYTES - len - 1];
          for (const off of offsets) {
            const before = directReads(r);
            const rep = await readOne(s, off, len);
            assert.equal(rep.error, 0, `READ ${len}@${off}`);
            assert.ok(rep.data?.equals(await r.volume.read(off, len)), `READ ${len}@${off} returns the volume's data`);
            served += directReads(r) - before;
            if (!servable(off, len)) assert.equal(directReads(r), before, `READ ${len}@${off} (not whole blocks) goes to TypeScript`);
            else if (off >= 0) expected++;
          }
          // The first READ of a size went to TypeScript, which granted a buffer of that size.
          const before = directReads(r);
          const rep = await readOne(s, 4096, len);
          assert.ok(rep.data?.equals(await r.volume.read(4096, len)));
          assert.equal(directReads(r), before + (servable(4096, len) ? 1 : 0), `a READ of ${len} bytes after one of that size is served by the thread`);
        }
        if (engine) assert.ok(served >= expected / 2, `most whole-block READs served by the thread (${served} of ${expected})`);
        else assert.ok(served >= SIZES.length * (OFFSETS.length + 1), `most READs served by the thread (${served})`);
        s.conn.destroy();
        await settled(r);
      });
    }

    it('a READ ending at the end is served; past the end, of 0 bytes or with flags it is answered as before', async () => {
      await fill();
      for (const structured of [false, true]) {
        const s = await open(r, structured);
        await readOne(s, 0, 4096); // grants a 4 KiB buffer
        if (engine) await r.volume.read(SIZE_BYTES - 4096, 4096); // maps the last address block
        const before = directReads(r);
        const end = await readOne(s, SIZE_BYTES - 4096, 4096);
        assert.equal(end.error, 0);
        assert.ok(end.data?.equals(await r.volume.read(SIZE_BYTES - 4096, 4096)));
        assert.equal(directReads(r), before + 1, 'the READ ending at the end is served by the thread');
        assert.equal((await readOne(s, SIZE_BYTES - 4096, 8192)).error, ERR.EINVAL, 'past the end');
        assert.equal((await readOne(s, SIZE_BYTES, 1)).error, ERR.EINVAL, 'at the end');
        assert.equal((await readOne(s, 2 ** 52, 4096)).error, ERR.EINVAL, 'far past the end');
        assert.equal((await readOne(s, 0, 0)).error, ERR.EINVAL, '0 bytes');
        const big = await readOne(s, 0, MAX_PAYLOAD_BYTES + 1);
        assert.equal(big.error, structured ? ERR.EOVERFLOW : ERR.EINVAL, 'longer than 64 MiB');
        // DF: EINVAL without structured replies; with them a READ in one chunk (by TypeScript).
        const cookie = nextCookie();
        await s.conn.write(request({ type: CMD.READ, flags: CMD_FLAG.DF, cookie, offset: 0, length: 4096 }));
        const df = await readAnyReply(s, () => 4096, () => 0);
        if (structured) assert.ok(df.data?.equals(await r.volume.read(0, 4096)));
        else assert.equal(df.error, ERR.EINVAL);
        assert.equal(directReads(r), before + 1, 'none of these by the thread');
        s.conn.destroy();
        await settled(r);
      }
    });

    it('READs racing WRITEs (plain, FUA, into holes) never return a byte older than the last acknowledged WRITE', async () => {
      // 32 blocks of 16 KiB; version v of a block is 16 KiB of the byte v (0: never written).
      // One WRITE per block in flight at most, so a block's versions land in order: a READ
      // may return, per byte, any version from the block's last acknowledged one when the
      // READ was sent up to the newest sent before its reply arrived.
      const BLOCK = 16 * 1024;
      const BLOCKS = 32;
      const BASE = 4 * MiB; // holes in the memory volume until written
      const acked = new Array<number>(BLOCKS).fill(0);
      const sent = new Array<number>(BLOCKS).fill(0);
      for (let b = 0; b < BLOCKS; b += 2) {
        await r.volume.write(BASE + b * BLOCK, Buffer.alloc(BLOCK, 1), false);
        acked[b] = sent[b] = 1;
      }
      const s = await open(r);
      type Op = { kind: 'w'; block: number; v: number } | { kind: 'r'; off: number; len: number; floor: number[] };
      const inflight = new Map<bigint, Op>();
      let seed = 4242;
      const rnd = (n: number): number => {
        seed = (seed * 1103515245 + 12345) % 2 ** 31;
        // The high bits: with `seed % n` the low bits repeat every few calls (here every
        // WRITE after a rnd(2) of 0 came out FUA, so no plain WRITE ever raced a READ).
        return Math.floor((seed / 2 ** 31) * n);
      };
      let reads = 0;
      let racing = 0;
      const send = async (): Promise<void> => {
        const cookie = nextCookie();
        const b = rnd(BLOCKS);
        const busy = [...inflight.values()].some((o) => o.kind === 'w' && o.block === b);
        if (rnd(2) === 0 && !busy && (sent[b] as number) < 250) {
          const v = (sent[b] as number) + 1;
          sent[b] = v;
          inflight.set(cookie, { kind: 'w', block: b, v });
          const flags = rnd(4) === 0 ? CMD_FLAG.FUA : 0;
          await s.conn.write(request({ type: CMD.WRITE, flags, cookie, offset: BASE + b * BLOCK, length: BLOCK }, Buffer.alloc(BLOCK, v)));
        } else {
          // The engine's thread serves whole 4 KiB blocks only: those are what its READs are.
          const unit = engine ? 4096 : 1;
          const off = rnd((BLOCKS * BLOCK) / unit - 1) * unit;
          const len = unit * (1 + rnd(Math.min(BLOCKS * BLOCK - off, 3 * BLOCK) / unit));
          if ([...inflight.values()].some((o) => o.kind === 'w')) racing++;
          inflight.set(cookie, { kind: 'r', off, len, floor: [...acked] });
          await s.conn.write(request({ type: CMD.READ, cookie, offset: BASE + off, length: len }));
        }
      };
      const readLen = (c: bigint): number | undefined => {
        const o = inflight.get(c);
        return o?.kind === 'r' ? o.len : undefined;
      };
      const offsetOf = (c: bigint): number => {
        const o = inflight.get(c);
        return o?.kind === 'r' ? BASE + o.off : -1;
      };
      for (let i = 0; i < 16; i++) await send();
      for (let n = 0; n < 3000; n++) {
        const rep = await readAnyReply(s, readLen, offsetOf);
        const op = inflight.get(rep.cookie);
        assert.ok(op !== undefined, 'a reply to a request in flight');
        inflight.delete(rep.cookie);
        assert.equal(rep.error, 0);
        if (op.kind === 'w') {
          acked[op.block] = op.v;
        } else {
          reads++;
          const data = rep.data as Buffer;
          for (let i = 0; i < op.len; i++) {
            const b = Math.floor((op.off + i) / BLOCK);
            const v = data[i] as number;
            if (v < (op.floor[b] as number) || v > (sent[b] as number)) {
              assert.fail(`READ ${op.len}@${op.off}: byte ${i} (block ${b}) is version ${v}; acknowledged before the READ: ${op.floor[b]}, newest sent: ${sent[b]}`);
            }
          }
        }
        if (n < 3000 - 16) await send();
      }
      assert.equal(inflight.size, 0);
      for (let b = 0; b < BLOCKS; b++) {
        assert.ok((await r.volume.read(BASE + b * BLOCK, BLOCK)).equals(Buffer.alloc(BLOCK, acked[b] as number)), `block ${b} holds its last version`);
      }
      assert.ok(reads > 1000 && racing > 500, `READs (${reads}) raced WRITEs in flight (${racing})`);
      // The engine's map holds only blocks the NVRAM log does not: here most READs touch a
      // block rewritten since the last CP (32 blocks, CPs every 5 ms), so fewer are served.
      assert.ok(directReads(r) > (engine ? 20 : reads / 2), `the thread served READs (${directReads(r)} of ${reads})`);
      // The engine's plain WRITEs were appended to the NVRAM log by the thread, racing its READs and the CPs.
      if (engine) assert.ok(directWrites(r) > 200, `the thread appended plain WRITEs itself (${directWrites(r)})`);
      s.conn.destroy();
      await settled(r);
    });

    it('clients that leave READ replies unread, or close with READs in flight, leave the budget at 0', async () => {
      await fill();
      // Unread replies: 1 MiB READs until the thread stops reading; dropped at the stall timeout.
      const s = await open(r);
      await readOne(s, 0, 1 * MiB); // a 1 MiB buffer for the thread
      (s.conn as unknown as { sock: { pause(): void } }).sock.pause();
      const many = Buffer.concat(Array.from({ length: 256 }, (_, i) => request({ type: CMD.READ, cookie: nextCookie(), offset: (i % 8) * MiB, length: 1 * MiB })));
      void s.conn.write(many).catch(() => undefined);
      // (A paused client socket does not see the close: the server's side is watched.)
      await settled(r);
      s.conn.destroy();
      // READs in flight, then close at once; then READs and a cut header.
      for (let round = 0; round < 3; round++) {
        const t = await open(r, round === 1);
        await readOne(t, 0, 4096);
        const reads = Buffer.concat(Array.from({ length: 64 }, (_, i) => request({ type: CMD.READ, cookie: nextCookie(), offset: i * 8192, length: 4096 + (i % 3) * 65536 })));
        await t.conn.write(round === 2 ? Buffer.concat([reads, reads.subarray(0, 13)]) : reads);
        t.conn.destroy();
        await settled(r);
      }
    });
  });
}

describe('native NBD transmission: an engine block that fails its checksum', function () {
  this.timeout(60_000);
  it('is never served by the thread: its READ is EIO from the tree\'s own check, and its neighbours still read', async () => {
    const r = await startRig('engine-file', true);
    try {
      const AT = 1 * MiB;
      const data = crypto.randomBytes(64 * 1024);
      await r.volume.write(AT, data, false);
      await (r.volume as EngineVolume).checkpoint();
      const s = await open(r);
      assert.ok((await readOne(s, AT, 4096)).data?.equals(data.subarray(0, 4096)), 'through TypeScript (a buffer granted, the map filled)');
      let before = directReads(r);
      assert.ok((await readOne(s, AT, 4096)).data?.equals(data.subarray(0, 4096)));
      assert.equal(directReads(r), before + 1, 'then by the thread');
      // Flip one byte of that block in the member file (through the page cache the thread reads).
      const member = path.join(r.dir, 'member.img');
      const image = fs.readFileSync(member);
      const at = image.indexOf(data.subarray(0, 4096));
      assert.ok(at > 0 && at % 4096 === 0, 'the block is in the member file');
      const mfd = fs.openSync(member, 'r+');
      try {
        fs.writeSync(mfd, Buffer.from([(image[at + 100] as number) ^ 0xff]), 0, 1, at + 100);
      } finally {
        fs.closeSync(mfd);
      }
      before = directReads(r);
      assert.equal((await readOne(s, AT, 4096)).error, ERR.EIO, 'the corrupt block is an error, not data');
      assert.equal((await readOne(s, AT, 8192)).error, ERR.EIO, 'so is a READ that covers it');
      assert.equal(directReads(r), before, 'none of these by the thread');
      assert.ok((await readOne(s, AT + 4096, 4096)).data?.equals(data.subarray(4096, 8192)), 'the next block still reads');
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopRig(r);
    }
  });
});

describe('native NBD transmission: engine blocks outside the page cache (the read pool)', function () {
  this.timeout(60_000);

  /** Drops the member file's pages from the page cache (posix_fadvise DONTNEED through GNU dd). */
  function dropCache(file: string): void {
    execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
  }

  function poolReads(r: Rig): number {
    return (r.volume as EngineVolume).stats().threadReads?.poolReads ?? 0;
  }

  it('reads them on the pool at depth: 32 pipelined READs answered by cookie with the right data; a DISC after them waits for them; a client gone mid-read leaves nothing held', async () => {
    const r = await startRig('engine-file', true);
    try {
      const N = 32;
      // 8N blocks: each cold burst reads blocks far from the last one's, which the kernel's
      // readahead for it may still be bringing in after the cache was dropped.
      const data = crypto.randomBytes(8 * N * 4096);
      await r.volume.write(0, data, false);
      await (r.volume as EngineVolume).checkpoint();
      const member = path.join(r.dir, 'member.img');
      const s = await open(r);
      /** N pipelined 4 KiB READs of blocks from..from+N (plus `then`, e.g. a DISC); the replies checked by cookie. */
      async function burst(from: number, then?: Buffer): Promise<void> {
        const cookies = new Map<bigint, number>();
        const reqs: Buffer[] = [];
        for (let i = 0; i < N; i++) {
          const cookie = nextCookie();
          cookies.set(cookie, from + i);
          reqs.push(request({ type: CMD.READ, cookie, offset: (from + i) * 4096, length: 4096 }));
        }
        await s.conn.write(Buffer.concat(then ? [...reqs, then] : reqs));
        for (let i = 0; i < N; i++) {
          const rep = await readSimpleReply(s.conn);
          const block = cookies.get(rep.cookie);
          assert.ok(block !== undefined, `a reply to a READ asked for (cookie ${rep.cookie})`);
          cookies.delete(rep.cookie);
          assert.equal(rep.error, 0);
          assert.ok((await s.conn.read(4096, 'READ data')).equals(data.subarray(block * 4096, (block + 1) * 4096)), `block ${block}`);
        }
      }
      // Through TypeScript first: it grants 4 KiB buffers and maps the leaf (these blocks are now cached).
      await burst(0);
      dropCache(member);
      const pool0 = poolReads(r);
      const reads0 = directReads(r);
      await burst(N);
      // The first pool read's readahead may bring its neighbours in: those the thread copies from the cache.
      assert.ok(poolReads(r) > pool0, `cold READs went to the pool (${poolReads(r) - pool0} of ${N})`);
      assert.ok(directReads(r) - reads0 >= N / 2, `and all but a few were answered by the thread (${directReads(r) - reads0} of ${N})`);
      // Cold again, with a DISC right behind: every READ is answered, then the server closes.
      dropCache(member);
      const pool1 = poolReads(r);
      await burst(5 * N, request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }));
      assert.ok(poolReads(r) > pool1, 'the pool served some of them');
      await until('the server closed after DISC', () => r.server.connectionCount === 0);
      await settled(r);
      // A client that sends cold READs and leaves at once: nothing stays held or charged.
      dropCache(member);
      const s2 = await open(r);
      const reqs: Buffer[] = [];
      for (let i = 0; i < N; i++) reqs.push(request({ type: CMD.READ, cookie: nextCookie(), offset: (2 * N + i) * 4096, length: 4096 }));
      await s2.conn.write(Buffer.concat(reqs));
      s2.conn.destroy();
      await settled(r);
      // The data is still what was written, through the volume's own path.
      assert.ok((await r.volume.read(0, data.length)).equals(data));
    } finally {
      await stopRig(r);
    }
  });
});

describe('native NBD transmission: an engine under a replica gate (a sync mirror)', function () {
  this.timeout(60_000);

  function held(r: Rig): number {
    return (r.server.transmissionStates()[0] as Record<string, number>)['heldReplies'] as number;
  }

  /** A replica gate whose wait() (the TypeScript path) is answered by the test; it records the seqs asked for. */
  function gate(threadReplies: boolean): ReplicaGate & { asked: number[]; fail: boolean } {
    const g = {
      threadReplies,
      asked: [] as number[],
      fail: false,
      wait(seq: number): Promise<void> {
        g.asked.push(seq);
        return g.fail ? Promise.reject(new VolumeError('EIO', 'replica lost (test)')) : Promise.resolve();
      },
    };
    return g;
  }

  async function writeBlocks(s: Session, first: number, n: number, fill: number): Promise<bigint[]> {
    const cookies: bigint[] = [];
    for (let i = 0; i < n; i++) {
      const cookie = nextCookie();
      cookies.push(cookie);
      await s.conn.write(request({ type: CMD.WRITE, cookie, offset: (first + i) * 4096, length: 4096 }, Buffer.alloc(4096, fill + i)));
    }
    return cookies;
  }

  it('the thread appends each WRITE but holds its reply until the replica holds its seq; failed: EIO; open: answered at once', async () => {
    const r = await startRig('engine', true);
    const v = r.volume as EngineVolume;
    try {
      const g = gate(true);
      v.setReplicaGate(g);
      v.replicaProgress(0); // streaming, nothing held by the replica yet
      const s = await open(r);
      const first = await writeBlocks(s, 0, 8, 0x10);
      await until('8 replies held', () => held(r) === 8);
      assert.equal(directWrites(r), 0, 'none answered');
      assert.equal(v.log.lastSeq, 8, 'all 8 records are in the NVRAM log (and taken in by it)');
      await new Promise((res) => setTimeout(res, 20));
      assert.equal(s.conn.available, 0, 'no reply reached the client');

      v.replicaProgress(4); // the replica holds seqs 1..4: exactly the first four WRITEs
      for (let i = 0; i < 4; i++) {
        const rep = await readSimpleReply(s.conn);
        assert.equal(rep.error, 0);
        assert.equal(rep.cookie, first[i]);
      }
      assert.equal(held(r), 4);
      await new Promise((res) => setTimeout(res, 20));
      assert.equal(s.conn.available, 0, 'the rest still held');

      // The replica is lost under the strict policy: the held ones fail, and the thread
      // appends no more (the next WRITE takes wait(), which fails it too).
      g.fail = true;
      v.replicaProgress('fail');
      const failed = new Set(first.slice(4));
      for (let i = 0; i < 4; i++) {
        const rep = await readSimpleReply(s.conn);
        assert.equal(rep.error, ERR.EIO);
        assert.ok(failed.delete(rep.cookie), 'a held WRITE failed, once');
      }
      assert.equal(held(r), 0);
      const [late] = await writeBlocks(s, 20, 1, 0x40);
      const lateRep = await readSimpleReply(s.conn);
      assert.deepEqual([lateRep.cookie, lateRep.error], [late, ERR.EIO]);
      assert.deepEqual(g.asked, [9], 'through the TypeScript path, which asked the gate for seq 9');

      // Not streaming, available policy: the thread appends and answers at once.
      g.fail = false;
      v.replicaProgress('open');
      const open2 = await writeBlocks(s, 30, 3, 0x50);
      for (const c of open2) assert.deepEqual(await readSimpleReply(s.conn), { error: 0, cookie: c });
      assert.equal(directWrites(r), 4 + 3);

      // Streaming again: held until released; releasing past them sends all.
      v.replicaProgress(v.log.lastSeq);
      const again = await writeBlocks(s, 40, 2, 0x60);
      await until('2 replies held', () => held(r) === 2);
      v.replicaProgress(v.log.lastSeq);
      for (const c of again) assert.deepEqual(await readSimpleReply(s.conn), { error: 0, cookie: c });

      // Every WRITE is in the volume, the failed ones included (their records were written;
      // an NBD error leaves the range's contents undefined, and here they are the new data).
      for (const [first0, n, fill] of [[0, 8, 0x10], [20, 1, 0x40], [30, 3, 0x50], [40, 2, 0x60]] as const) {
        for (let i = 0; i < n; i++) {
          const got = await readOne(s, (first0 + i) * 4096, 4096);
          assert.ok(got.data?.equals(Buffer.alloc(4096, fill + i)), `block ${first0 + i}`);
        }
      }
      // Removing the gate answers anything held.
      v.replicaProgress(v.log.lastSeq);
      const last = await writeBlocks(s, 50, 1, 0x70);
      await until('1 reply held', () => held(r) === 1);
      v.setReplicaGate(undefined);
      assert.deepEqual(await readSimpleReply(s.conn), { error: 0, cookie: last[0] });
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopRig(r);
    }
  });

  it('a gate without threadReplies (or NVMIRROR_SYNC_THREAD_REPLIES=0) keeps the thread from appending: every WRITE waits in wait()', async () => {
    for (const how of ['no threadReplies', 'env'] as const) {
      const r = await startRig('engine', true);
      const v = r.volume as EngineVolume;
      const env = process.env.NVMIRROR_SYNC_THREAD_REPLIES;
      try {
        if (how === 'env') process.env.NVMIRROR_SYNC_THREAD_REPLIES = '0';
        const g = gate(how === 'env');
        v.setReplicaGate(g);
        const s = await open(r);
        const cookies = new Set(await writeBlocks(s, 0, 4, 0x20));
        for (let i = 0; i < 4; i++) {
          const rep = await readSimpleReply(s.conn); // in any order: they run concurrently in TypeScript
          assert.equal(rep.error, 0);
          assert.ok(cookies.delete(rep.cookie), 'each WRITE answered once');
        }
        assert.equal(directWrites(r), 0, how);
        assert.deepEqual([...g.asked].sort(), [1, 2, 3, 4], how);
        s.conn.destroy();
        await settled(r);
      } finally {
        if (env === undefined) delete process.env.NVMIRROR_SYNC_THREAD_REPLIES;
        else process.env.NVMIRROR_SYNC_THREAD_REPLIES = env;
        await stopRig(r);
      }
    }
  });
});

describe('native NBD transmission: FLUSH on the thread (an engine whose NVRAM is a file)', function () {
  this.timeout(60_000);

  async function writeBlocks(s: Session, first: number, n: number, fill: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: (first + i) * 4096, length: 4096 }, Buffer.alloc(4096, fill + i)), 0);
    }
  }

  /** stopRig for a volume whose log the test failed: its close reports that failure. */
  async function stopFailedRig(r: Rig): Promise<void> {
    await r.server.close();
    const failed = (r.volume as EngineVolume).log.failed;
    await r.volume.close().catch((e: unknown) => {
      if (!failed) throw e;
    });
    fs.rmSync(r.dir, { recursive: true, force: true });
  }

  /** The durableSeq field of record `seq` in the NVRAM file (src/nvlog/format.ts: magic at 0, seq at 16, durableSeq at 56). */
  function recordDurableSeq(file: string, seq: number): number {
    const b = fs.readFileSync(file);
    for (let at = 0; at + 64 <= b.length; at += 64) {
      if (b.readUInt32LE(at) === 0x4e565231 && b.readBigUInt64LE(at + 16) === BigInt(seq)) return Number(b.readBigUInt64LE(at + 56));
    }
    throw new Error(`record ${seq} not found in ${file}`);
  }

  it('answers a plain FLUSH after its fdatasync (later records say so); with flags, under a replica gate or with the log failed, TypeScript answers it', async () => {
    const r = await startRig('engine', true);
    const v = r.volume as EngineVolume;
    try {
      const s = await open(r);
      await writeBlocks(s, 0, 8, 0x30);
      assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
      assert.equal(directFlushes(r), 1);
      assert.equal(v.stats().threadFlushes, 1);
      // The next record says so: the thread's flush covered seqs 1..8 (replay tells damage to them from a torn tail).
      await writeBlocks(s, 8, 1, 0x40);
      assert.ok(recordDurableSeq(path.join(r.dir, 'nvram'), 9) >= 8, 'record 9 says records up to 8 are durable');
      // A FLUSH with FUA (a flag FLUSH does not take) is the shared path's to answer.
      assert.equal(await simpleCommand(s, { type: CMD.FLUSH, flags: CMD_FLAG.FUA, offset: 0, length: 0 }), 0);
      assert.equal(directFlushes(r), 1, 'a FLUSH with a flag went to TypeScript');

      // A sync mirror's FLUSH waits for the replica's durable ack too: TypeScript's.
      const asked: Array<[number, boolean]> = [];
      v.setReplicaGate({ threadReplies: false, wait: (seq: number, durable: boolean) => { asked.push([seq, durable]); return Promise.resolve(); } });
      assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
      assert.equal(directFlushes(r), 1, 'under a replica gate the thread did not answer it');
      assert.deepEqual(asked, [[v.log.lastSeq, true]], 'the gate was asked for the durable ack of the last record');
      v.setReplicaGate(undefined);
      assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), 0);
      assert.equal(directFlushes(r), 2, 'the gate gone, the thread answers again');

      // The log failed (as after a failed msync of its own): WRITEs are EIO, and FLUSH is the
      // log's to answer (it is durable up to where it was; nothing after it is taken).
      v.log.fail(new VolumeError('EIO', 'NVRAM persist failed (test)'));
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 0, length: 4096 }, Buffer.alloc(4096, 1)), ERR.EIO);
      await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 });
      assert.equal(directFlushes(r), 2, 'the thread answered no FLUSH after the log failed');
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopFailedRig(r);
    }
  });

  it('pipelined FLUSHes among WRITEs are each answered once, by cookie, after the WRITEs before them; a DISC behind FLUSHes answers them first; a client gone with FLUSHes out leaves nothing held', async () => {
    const r = await startRig('engine', true);
    try {
      const s = await open(r);
      // 32 rounds of WRITE + FLUSH sent at once: the flusher takes them in groups.
      const sent: Array<{ cookie: bigint; flush: boolean }> = [];
      const msgs: Buffer[] = [];
      for (let i = 0; i < 32; i++) {
        const w = nextCookie();
        const f = nextCookie();
        sent.push({ cookie: w, flush: false }, { cookie: f, flush: true });
        msgs.push(request({ type: CMD.WRITE, cookie: w, offset: i * 4096, length: 4096 }, Buffer.alloc(4096, i + 1)));
        msgs.push(request({ type: CMD.FLUSH, cookie: f, offset: 0, length: 0 }));
      }
      await s.conn.write(Buffer.concat(msgs));
      const answered: bigint[] = [];
      for (let i = 0; i < sent.length; i++) {
        const rep = await readSimpleReply(s.conn);
        assert.equal(rep.error, 0);
        answered.push(rep.cookie);
      }
      assert.equal(new Set(answered).size, sent.length, 'every request answered once');
      for (let i = 0; i < 32; i++) {
        // A FLUSH's reply never comes before the reply of the WRITE sent before it.
        assert.ok(answered.indexOf(sent[2 * i]!.cookie) < answered.indexOf(sent[2 * i + 1]!.cookie), `WRITE ${i} answered before its FLUSH`);
      }
      assert.equal(directFlushes(r), 32, 'the threads answered all 32');
      // FLUSHes then DISC: each FLUSH answered, then the connection closes.
      const f1 = nextCookie();
      const f2 = nextCookie();
      await s.conn.write(Buffer.concat([
        request({ type: CMD.FLUSH, cookie: f1, offset: 0, length: 0 }),
        request({ type: CMD.FLUSH, cookie: f2, offset: 0, length: 0 }),
        request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }),
      ]));
      const got = new Set([(await readSimpleReply(s.conn)).cookie, (await readSimpleReply(s.conn)).cookie]);
      assert.deepEqual(got, new Set([f1, f2]));
      await settled(r);
      // A client that sends FLUSHes and leaves at once.
      const s2 = await open(r);
      await s2.conn.write(Buffer.concat(Array.from({ length: 16 }, () => request({ type: CMD.FLUSH, cookie: nextCookie(), offset: 0, length: 0 }))));
      s2.conn.destroy();
      await settled(r);
    } finally {
      await stopRig(r);
    }
  });

  it('a FUA WRITE answered by a flush round whose fdatasync fails is EIO and fails the log', async () => {
    const r = await startRig('engine', true);
    const v = r.volume as EngineVolume;
    try {
      const s = await open(r);
      const fifo = path.join(r.dir, 'fifo');
      execFileSync('mkfifo', [fifo]);
      assert.equal(v.log.nativeAppender!.setFlushFile(fifo), true);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: 0, length: 4096 }, Buffer.alloc(4096, 7)), ERR.EIO);
      await until('the log failed', () => v.log.failed);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: 4096, length: 4096 }, Buffer.alloc(4096, 8)), ERR.EIO);
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopFailedRig(r);
    }
  });

  it('under a sync mirror whose link never answers, a FUA WRITE is appended once and TypeScript answers it as a FLUSH of its cookie', async () => {
    const r = await startRig('engine', true);
    const v = r.volume as EngineVolume;
    const server = net.createServer();
    await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
    const accepted: net.Socket[] = [];
    server.on('connection', (c) => accepted.push(c));
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    client.pause();
    await new Promise<void>((res) => client.once('connect', () => res()));
    await until('accepted', () => accepted.length === 1);
    const dest = accepted[0]!;
    const got: Message[] = [];
    const parser = new FrameParser();
    dest.on('data', (d) => got.push(...parser.push(d)));
    const rx = new NativeRx(plainFd(client)!, Buffer.alloc(0), 0, 0, () => undefined, undefined, { source: true });
    const asked: Array<[number, boolean]> = [];
    try {
      v.setReplicaGate({ threadReplies: true, wait: (seq: number, durable: boolean) => { asked.push([seq, durable]); return Promise.resolve(); } });
      v.replicaProgress(0);
      v.log.forwardNative((app, fromSeq) => rx.forward(app, fromSeq));
      const s = await open(r);
      const lastBefore = v.log.lastSeq;
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.WRITE, flags: CMD_FLAG.FUA, cookie, offset: 8 * 4096, length: 4096 }, Buffer.alloc(4096, 0x99)));
      const rep = await readSimpleReply(s.conn, 20_000);
      assert.equal(rep.cookie, cookie);
      assert.equal(rep.error, 0);
      assert.equal(v.log.lastSeq, lastBefore + 1, 'appended once (by the thread), never again by TypeScript');
      assert.deepEqual(asked, [[lastBefore + 1, true]], 'TypeScript answered a FLUSH: the durable ack of every record, the FUA one included');
      assert.deepEqual(got.filter((m) => m.type === MsgType.Record).map((m) => (m as Message & { type: MsgType.Record }).seq), [lastBefore + 1], 'the record went on the link');
      assert.ok(got.some((m) => m.type === MsgType.DurableReq), 'and the round asked for its durable ack first');
      assert.ok((await r.volume.read(8 * 4096, 4096)).equals(Buffer.alloc(4096, 0x99)));
      s.conn.destroy();
      await settled(r);
    } finally {
      v.log.forwardNative(undefined);
      rx.close(false);
      client.destroy();
      dest.destroy();
      server.close();
      await stopRig(r);
    }
  });

  for (const how of ['on the connection thread', 'on the flusher'] as const) {
    it(`a failed fdatasync (${how}) answers that FLUSH with EIO and fails the log: no later FLUSH or WRITE succeeds, and the threads never flush again`, async () => {
      const r = await startRig('engine', true);
      const v = r.volume as EngineVolume;
      try {
        const s = await open(r);
        await writeBlocks(s, 0, 4, 0x50);
        // fdatasync of a FIFO fails (EINVAL): the stand-in for a disk that failed writeback.
        const fifo = path.join(r.dir, 'fifo');
        execFileSync('mkfifo', [fifo]);
        const app = v.log.nativeAppender!;
        assert.equal(app.setFlushFile(fifo), true);
        if (how === 'on the connection thread') {
          // Alone: nothing else to read, no round running: the connection thread flushes.
          assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), ERR.EIO);
        } else {
          // A READ right behind it in the same send: the FLUSH goes to the flusher.
          const f = nextCookie();
          const rd = nextCookie();
          await s.conn.write(Buffer.concat([request({ type: CMD.FLUSH, cookie: f, offset: 0, length: 0 }), request({ type: CMD.READ, cookie: rd, offset: 0, length: 4096 })]));
          const replies = new Map<bigint, number>();
          for (let i = 0; i < 2; i++) {
            const rep = await readSimpleReply(s.conn);
            replies.set(rep.cookie, rep.error);
            if (rep.cookie === rd) assert.ok((await s.conn.read(4096)).equals(Buffer.alloc(4096, 0x50)), 'the READ behind it');
          }
          assert.deepEqual([replies.get(f), replies.get(rd)], [ERR.EIO, 0]);
        }
        await until('the log failed', () => v.log.failed);
        assert.equal(await simpleCommand(s, { type: CMD.FLUSH, offset: 0, length: 0 }), ERR.EIO);
        assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 8 * 4096, length: 4096 }, Buffer.alloc(4096, 2)), ERR.EIO);
        assert.equal(directFlushes(r), 1, 'only the failed one was the thread\'s');
        assert.equal(app.setFlushFile(path.join(r.dir, 'nvram')), false, 'a failed fdatasync is sticky: no flush file is taken again');
        assert.equal(app.flush(), 0, 'and no FLUSH is served there');
        s.conn.destroy();
        await settled(r);
      } finally {
        await stopFailedRig(r);
      }
    });
  }
});

describe('native NBD transmission: the switch', function () {
  this.timeout(60_000);
  it('nativeTransmission: false serves on the stream path', async () => {
    const r = await startRig('memory', false);
    try {
      const s = await open(r);
      const data = crypto.randomBytes(4096);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 0, length: 4096 }, data), 0);
      assert.ok((await simpleRead(s, 0, 4096)).data?.equals(data));
      assert.equal(r.server.transmissionStates()[0]?.['native'], undefined, 'a stream transmission');
      assert.equal(r.server.nativeTransmissions, 0);
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopRig(r);
    }
  });
});

describe('native NBD transmission: a memory volume\'s WRITEs into holes (spare chunks)', function () {
  this.timeout(60_000);
  type Raw = Record<string, (...a: unknown[]) => unknown>;
  const call = (fn: string, ...args: unknown[]): unknown => ((addon() as unknown as Raw)[fn] as (...a: unknown[]) => unknown)(...args);
  const CHUNK_BYTES = MEMORY_CHUNK_BYTES;

  it('the store: a thread takes spares only for chunks with none, records where, registers ours only where nothing is, and gives spares back', () => {
    const store = call('nbdMemStoreNew', 16 * CHUNK_BYTES, CHUNK_BYTES);
    const spareA = Buffer.alloc(CHUNK_BYTES);
    const spareB = Buffer.alloc(CHUNK_BYTES);
    call('nbdMemStoreAddSpares', store, 7, [spareA, spareB]);
    // A WRITE into chunk 1, a hole: one spare taken, recorded with its index.
    assert.equal(call('nbdMemStoreCopyIn', store, CHUNK_BYTES + 100, Buffer.from('abc')), true);
    const taken = call('nbdMemStoreSync', store, false) as Float64Array;
    assert.equal(taken.length, 3);
    assert.equal(taken[0], 1, 'one spare taken');
    assert.equal(taken[1], 1, 'at chunk 1');
    const id = taken[2] as number;
    assert.ok(id === 7 || id === 8, `a spare id it was given (${id})`);
    const used = id === 7 ? spareA : spareB;
    assert.equal(used.toString('latin1', 100, 103), 'abc', 'the write went into the spare');
    assert.equal(used.subarray(0, 100).every((b) => b === 0) && used.subarray(103).every((b) => b === 0), true, 'the rest of it is zero');
    assert.deepEqual([...(call('nbdMemStoreSync', store, false) as Float64Array)], [0], 'taken once, reported once');
    // Two holes with one spare left: nothing taken, nothing copied.
    assert.equal(call('nbdMemStoreCopyIn', store, 3 * CHUNK_BYTES - 4096, Buffer.alloc(8192, 1)), false);
    assert.deepEqual([...(call('nbdMemStoreSync', store, false) as Float64Array)], [0]);
    // More than a chunk into holes goes to TypeScript however many spares there are.
    const extra = [Buffer.alloc(CHUNK_BYTES), Buffer.alloc(CHUNK_BYTES), Buffer.alloc(CHUNK_BYTES)];
    call('nbdMemStoreAddSpares', store, 100, extra);
    assert.equal(call('nbdMemStoreCopyIn', store, 8 * CHUNK_BYTES, Buffer.alloc(CHUNK_BYTES + 4096, 1)), false);
    assert.deepEqual([...(call('nbdMemStoreSync', store, false) as Float64Array)], [0]);
    const extraBack = [...(call('nbdMemStoreSync', store, true) as Float64Array)];
    assert.deepEqual(extraBack.slice(0, 1), [0]);
    assert.deepEqual(extraBack.slice(1).sort((x, y) => x - y), [id === 7 ? 8 : 7, 100, 101, 102], 'withdrawn: every spare left');
    call('nbdMemStoreAddSpares', store, id === 7 ? 8 : 7, [id === 7 ? spareB : spareA]);
    // Ours goes only where nothing is registered.
    const mine = Buffer.alloc(CHUNK_BYTES);
    assert.equal(call('nbdMemStoreAdd', store, 1, mine), false, 'chunk 1 holds the spare');
    assert.equal(call('nbdMemStoreAdd', store, 2, mine), true);
    // Delete only what is registered there.
    call('nbdMemStoreDelete', store, 2, Buffer.alloc(CHUNK_BYTES));
    assert.equal(call('nbdMemStoreCopyIn', store, 2 * CHUNK_BYTES, Buffer.from('x')), true);
    assert.equal(mine[0], 'x'.charCodeAt(0), 'another buffer did not unregister chunk 2');
    assert.deepEqual([...(call('nbdMemStoreSync', store, false) as Float64Array)], [0], 'no spare taken for a registered chunk');
    call('nbdMemStoreDelete', store, 2, mine);
    // Withdraw: the spare left comes back; a hole then goes to TypeScript.
    const back = call('nbdMemStoreSync', store, true) as Float64Array;
    assert.deepEqual([...back], [0, id === 7 ? 8 : 7], 'the other spare came back');
    assert.equal(call('nbdMemStoreCopyIn', store, 5 * CHUNK_BYTES, Buffer.from('y')), false, 'no spare left');
    // Bad arguments.
    assert.throws(() => call('nbdMemStoreAddSpares', store, 0, [Buffer.alloc(4096)]), RangeError, 'a spare is a whole chunk');
    assert.throws(() => call('nbdMemStoreAddSpares', store, 0, 'x'), TypeError);
    assert.throws(() => call('nbdMemStoreAddSpares', store, -1, []), RangeError);
    assert.throws(() => call('nbdMemStoreAddSpares', store, 0, Array.from({ length: 1025 }, () => spareA)), RangeError, 'at most 1024 spares');
    assert.throws(() => call('nbdMemStoreCopyIn', store, 16 * CHUNK_BYTES, Buffer.from('z')), RangeError, 'past the end');
    assert.throws(() => call('nbdMemStoreSync', {}, false), TypeError, 'not a store');
    call('nbdMemStoreClose', store);
    assert.throws(() => call('nbdMemStoreAddSpares', store, 0, [spareA]), RangeError, 'closed');
    assert.equal(call('nbdMemStoreCopyIn', store, 0, Buffer.from('z')), false, 'closed');
  });

  it('the volume adopts a spare a thread filled before its own chunk could go there, and keeps the spares within the cap', async () => {
    const vol = MemoryVolume.create(1024 * CHUNK_BYTES);
    try {
      const store = vol.directWriteStore();
      assert.ok(store !== undefined);
      assert.equal(vol.spareChunks, SPARE_CHUNKS, 'spares handed out with the store');
      assert.equal(vol.allocatedBytes, 0, 'spares are not allocated data');
      // A thread writes into chunk 3 (a hole) after the volume's last look; the volume then
      // makes its own chunk for a write there (the path a FUA WRITE takes): refused by the
      // store, so it adopts the thread's and writes into that.
      const a = crypto.randomBytes(4096);
      const b = crypto.randomBytes(4096);
      assert.equal(call('nbdMemStoreCopyIn', store, 3 * CHUNK_BYTES, a), true);
      (vol as unknown as { newDataChunk(index: number, whole: boolean): { bytes: Buffer } }).newDataChunk(3, false).bytes.set(b, 8192);
      assert.ok((await vol.read(3 * CHUNK_BYTES, 4096)).equals(a), 'the thread\'s write is kept');
      assert.ok((await vol.read(3 * CHUNK_BYTES + 8192, 4096)).equals(b), 'the volume\'s write went into the same chunk');
      assert.ok((await vol.read(3 * CHUNK_BYTES + 4096, 4096)).equals(Buffer.alloc(4096)), 'between them, zeroes');
      assert.equal(vol.allocatedBytes, CHUNK_BYTES, 'one chunk, not two');
      // Trim what the volume holds there, then a thread writes into it again: a new spare.
      await vol.trim(3 * CHUNK_BYTES, CHUNK_BYTES, false);
      assert.equal(vol.allocatedBytes, 0);
      assert.equal(call('nbdMemStoreCopyIn', store, 3 * CHUNK_BYTES + 4096, b), true);
      assert.ok((await vol.read(3 * CHUNK_BYTES + 4096, 4096)).equals(b));
      assert.ok((await vol.read(3 * CHUNK_BYTES, 4096)).equals(Buffer.alloc(4096)), 'the trimmed data is gone');
      const blocks = await vol.blockStatus(0, 8 * CHUNK_BYTES, 16);
      assert.deepEqual(blocks.map((e) => [e.lengthBytes, e.flags]), [[3 * CHUNK_BYTES, 3], [CHUNK_BYTES, 0], [4 * CHUNK_BYTES, 3]], 'block status sees the adopted chunk');
    } finally {
      await vol.close();
    }
    // Near the cap: no spares, and a write that needs the room takes them back first.
    const small = MemoryVolume.create(1024 * CHUNK_BYTES, { maxAllocatedBytes: 2 * SPARE_CHUNKS * CHUNK_BYTES });
    try {
      small.directWriteStore();
      assert.equal(small.spareChunks, SPARE_CHUNKS, 'room for the spares');
      const data = Buffer.alloc(CHUNK_BYTES, 9);
      for (let i = 0; i < 2 * SPARE_CHUNKS; i++) await small.write(i * CHUNK_BYTES, data, false);
      assert.equal(small.spareChunks, 0, 'the spares made room for the writes');
      assert.equal(small.allocatedBytes, 2 * SPARE_CHUNKS * CHUNK_BYTES, 'the whole cap is data');
      await assert.rejects(small.write(2 * SPARE_CHUNKS * CHUNK_BYTES, data, false), /ENOSPC|full/, 'past the cap: ENOSPC');
    } finally {
      await small.close();
    }
  });

  it('plain WRITEs into fresh chunks are answered by the thread, FUA WRITEs into the same chunks by TypeScript; all read back, the neighbours zero', async () => {
    const r = await startRig('memory', true);
    try {
      const s = await open(r);
      const vol = r.volume as MemoryVolume;
      const chunks = SIZE_BYTES / MEMORY_CHUNK_BYTES; // 256
      const expect = new Map<number, Buffer>();
      // One at a time: each plain WRITE into a hole is the thread's (spares are refilled
      // as the thread reports them).
      const before = directWrites(r);
      const sequential = 100;
      for (let c = 0; c < sequential; c++) {
        const data = crypto.randomBytes(4096);
        const offset = c * MEMORY_CHUNK_BYTES + (c % 16) * 4096;
        assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset, length: 4096 }, data), 0);
        expect.set(offset, data);
      }
      assert.ok(directWrites(r) - before > SPARE_CHUNKS, `more WRITEs into holes answered by the thread (${directWrites(r) - before}) than one set of spares`);
      // Pipelined: plain and FUA WRITEs into the same fresh chunks, a different block each.
      const cookies = new Map<bigint, number>();
      for (let c = sequential; c < chunks; c++) {
        for (const [k, fua] of [[1, false], [5, true], [9, false]] as const) {
          const data = crypto.randomBytes(4096);
          const offset = c * MEMORY_CHUNK_BYTES + k * 4096;
          const cookie = nextCookie();
          cookies.set(cookie, offset);
          expect.set(offset, data);
          await s.conn.write(request({ type: CMD.WRITE, flags: fua ? CMD_FLAG.FUA : 0, cookie, offset, length: 4096 }, data));
        }
      }
      for (let i = 0; i < cookies.size; i++) {
        const rep = await readSimpleReply(s.conn);
        assert.ok(cookies.has(rep.cookie), 'a reply to a WRITE sent');
        assert.equal(rep.error, 0, `the WRITE at ${cookies.get(rep.cookie)}`);
      }
      // Everything written reads back, through TypeScript and through the thread; every
      // other block is zero.
      const all = await vol.read(0, SIZE_BYTES);
      for (let off = 0; off < SIZE_BYTES; off += 4096) {
        const want = expect.get(off) ?? Buffer.alloc(4096);
        assert.ok(all.subarray(off, off + 4096).equals(want), `block at ${off}`);
      }
      for (const [off, want] of [...expect].filter((_, i) => i % 17 === 0)) {
        const rep = await readOne(s, off, 4096);
        assert.ok(rep.data?.equals(want), `the thread reads the block at ${off}`);
      }
      assert.equal(vol.allocatedBytes, chunks * MEMORY_CHUNK_BYTES, 'one chunk each, none lost or doubled');
      assert.ok(vol.spareChunks <= SPARE_CHUNKS, 'the spares stay within their bound');
      s.conn.destroy();
      await settled(r);
    } finally {
      await stopRig(r);
    }
  });
});

describe('native NBD transmission: busy-poll at low queue depth', function () {
  this.timeout(60_000);
  /** Writes `count` blocks one at a time (each sent as soon as the reply before it came), then reads each back from the volume. */
  async function writeOneAtATime(r: Rig, count: number): Promise<void> {
    const s = await open(r);
    const blocks: Buffer[] = [];
    for (let i = 0; i < count; i++) {
      const data = crypto.randomBytes(4096);
      blocks.push(data);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: i * 4096, length: 4096 }, data), 0);
    }
    for (let i = 0; i < count; i++) {
      assert.ok((await r.volume.read(i * 4096, 4096)).equals(blocks[i]!), `block ${i} reads back as written`);
    }
    s.conn.destroy();
    await settled(r);
  }

  it('with the window at 0 the threads never spin; at its maximum (1 ms) a client sending each request as its reply comes is polled for, and every write lands', async () => {
    const r0 = await startRig('memory', true, 0);
    try {
      const before = busyPollStats();
      await writeOneAtATime(r0, 200);
      assert.equal(busyPollStats().windows, before.windows, 'no busy-poll window with --busy-poll 0');
    } finally {
      await stopRig(r0);
    }
    const r1 = await startRig('memory', true, BUSY_POLL_US_MAX);
    try {
      const before = busyPollStats();
      await writeOneAtATime(r1, 200);
      const after = busyPollStats();
      // Armed once a request came within 4 ms of the wait beginning: a client in this
      // process answers within that unless the machine stalls it 200 times in a row.
      assert.ok(after.windows > before.windows, `busy-poll windows spun (${after.windows - before.windows})`);
      assert.ok(after.hits > before.hits, 'some window ended in the next request');
      assert.ok(after.spunUs >= before.spunUs, 'spun time only grows');
    } finally {
      await stopRig(r1);
      setBusyPoll(BUSY_POLL_US_DEFAULT);
    }
  });

  it('paused (a CP runs), no thread spins at any window; resumed, the window spins again', async () => {
    const r = await startRig('memory', true, BUSY_POLL_US_MAX);
    try {
      pauseBusyPoll(true);
      const before = busyPollStats();
      await writeOneAtATime(r, 200);
      assert.equal(busyPollStats().windows, before.windows, 'no busy-poll window while paused');
      pauseBusyPoll(false);
      const mid = busyPollStats();
      await writeOneAtATime(r, 200);
      assert.ok(busyPollStats().windows > mid.windows, 'windows spun again after the pause');
    } finally {
      pauseBusyPoll(false);
      await stopRig(r);
      setBusyPoll(BUSY_POLL_US_DEFAULT);
    }
  });

  it('the addon refuses a pause that is not a boolean', () => {
    const raw = addon() as unknown as Record<string, (...a: unknown[]) => unknown>;
    for (const bad of [0, 1, 'true', undefined, null]) assert.throws(() => raw['nbdServeBusyPollPause']!(bad), /nbdServeBusyPollPause: paused must be a boolean/, String(bad));
    pauseBusyPoll(false);
  });

  it('the addon refuses a window that is not an integer in [0, 1000] microseconds', () => {
    const raw = addon() as unknown as Record<string, (...a: unknown[]) => unknown>;
    for (const bad of [-1, 1001, 1.5, Number.NaN, '30', undefined]) assert.throws(() => raw['nbdServeBusyPoll']!(bad), /nbdServeBusyPoll|us/, String(bad));
    raw['nbdServeBusyPoll']!(0);
    raw['nbdServeBusyPoll']!(1000);
    setBusyPoll(BUSY_POLL_US_DEFAULT);
  });
});

describe('native NBD transmission: the addon re-checks its arguments', function () {
  type Raw = Record<string, (...a: unknown[]) => unknown>;
  const raw = (): Raw => addon() as unknown as Raw;
  const call = (fn: string, ...args: unknown[]): unknown => (raw()[fn] as (...a: unknown[]) => unknown)(...args);

  it('nbdServeStart refuses a descriptor that is not a stream socket, and overlong leftover', () => {
    const fd = fs.openSync(__filename, 'r');
    try {
      assert.throws(() => call('nbdServeStart', fd, Buffer.alloc(0), 1024, 1, 1, () => undefined), TypeError);
    } finally {
      fs.closeSync(fd);
    }
    assert.throws(() => call('nbdServeStart', -1, Buffer.alloc(0), 1024, 1, 1, () => undefined), RangeError);
    assert.throws(() => call('nbdServeStart', 0, Buffer.alloc(65537), 1024, 1, 1, () => undefined), RangeError);
    assert.throws(() => call('nbdServeStart', 0, Buffer.alloc(0), 2 ** 40, 1, 1, () => undefined), RangeError);
    assert.throws(() => call('nbdServeStart', 0, Buffer.alloc(0), 1024, 1, 1, 'not a function'), TypeError);
  });

  it('the per-connection calls refuse anything but a handle, and bad buffers or ids', () => {
    for (const fn of ['nbdServeGrant', 'nbdServeRevoke', 'nbdServeSend', 'nbdServeSetReading', 'nbdServeEnd', 'nbdServeAbort', 'nbdServeState', 'nbdServeDirect']) {
      assert.throws(() => call(fn, {}, [], []), TypeError, fn);
    }
  });

  it('on a live handle: grants need ids and non-empty Buffers, sends need Buffers', async () => {
    const [a, b] = call('socketpair') as [number, number];
    let ended!: () => void;
    const closed = new Promise<void>((res) => (ended = res));
    const h = call('nbdServeStart', a, Buffer.alloc(0), 1024, 1, 1024, (ev: Float64Array) => {
      for (let i = 0; i < ev.length; i += 10) if (ev[i] === 6) ended();
    });
    try {
      assert.throws(() => call('nbdServeGrant', h, [1], []), RangeError);
      assert.throws(() => call('nbdServeGrant', h, [-1], [Buffer.alloc(8)]), RangeError);
      assert.throws(() => call('nbdServeGrant', h, [1.5], [Buffer.alloc(8)]), RangeError);
      assert.throws(() => call('nbdServeGrant', h, [1], [Buffer.alloc(0)]), RangeError);
      assert.throws(() => call('nbdServeGrant', h, [1], ['x']), TypeError);
      assert.throws(() => call('nbdServeSend', h, ['x'], 1, 1), TypeError);
      assert.throws(() => call('nbdServeSend', h, [], 1, 1), RangeError);
      assert.throws(() => call('nbdServeSend', h, [Buffer.alloc(1)], -1, 1), RangeError);
      assert.throws(() => call('nbdServeDirect', h, -1, 0, 1), RangeError);
      const fd = fs.openSync(__filename, 'r');
      try {
        assert.throws(() => call('nbdServeDirect', h, fd, 0, 0), RangeError, 'no mode');
        assert.throws(() => call('nbdServeDirect', h, fd, 0, 8), RangeError, 'an unknown mode');
        assert.throws(() => call('nbdServeDirect', h, fd, 0), TypeError, 'modes missing');
      } finally {
        fs.closeSync(fd);
      }
      const store = call('nbdMemStoreNew', 65536, 65536);
      assert.throws(() => call('nbdServeDirectMemory', h, store, 0), RangeError, 'no mode');
      assert.throws(() => call('nbdServeDirectMemory', h, {}, 1), TypeError, 'not a store');
      assert.deepEqual(call('nbdServeRevoke', h), [], 'nothing granted, nothing revoked');
    } finally {
      call('nbdServeAbort', h);
      await closed;
      fs.closeSync(a);
      fs.closeSync(b);
    }
  });
});
