/**
 * Hostile and malformed input on a raw socket, against a real `nvmirror serve`.
 * For each case the server must answer or disconnect as the NBD spec says, and then
 * still serve a fresh client correctly (checked after every test), with its resident
 * memory bounded (VmRSS < 200 MiB even after a 4 GiB write header).
 * Runs for every backend over Unix, and for the memory backend over TCP too.
 */
import { strict as assert } from 'assert';
import * as crypto from 'crypto';
import { BACKENDS, Backend, MiB, Server, Transport, cleanupAll, rssBytes, startServer, sleep } from './harness';
import {
  CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, ERR, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO, OPT, REP, RawClosedError, RawConn,
  Session, TFLAG, clientFlags, goData, metaContextData, negotiate, nextCookie, option, optionHeader, readChunk, readChunksUntilDone,
  readGreeting, readInfoReplies, readOptionReply, readSimpleReply, request, simpleCommand, simpleRead, targetOf,
} from './rawnbd';

const SIZE_BYTES = 128 * MiB;
const RSS_LIMIT_BYTES = 200 * MiB;
/** Offsets used by the health check, far from what the tests write. */
const HEALTH_BASE = 120 * MiB;

/** Plain connections are served on the native thread by default; 'stream' forces the stream path (NVMIRROR_NBD_NATIVE=0). */
const runs: Array<[Backend, Transport, 'native' | 'stream']> = BACKENDS.map((b) => [b, 'unix', 'native'] as [Backend, Transport, 'native']);
runs.push(['memory', 'tcp', 'native'], ['memory', 'unix', 'stream']);

/** Reads either an option reply or a close; returns the reply type or 'closed'. */
async function replyOrClose(c: RawConn, timeoutMs = 10_000): Promise<number | 'closed'> {
  try {
    const r = await readOptionReply(c, timeoutMs);
    return r.type;
  } catch (e) {
    if (e instanceof RawClosedError) return 'closed';
    throw e;
  }
}

/** Reads either a simple reply's error number or a close. */
async function simpleReplyOrClose(c: RawConn, cookie: bigint, timeoutMs = 10_000): Promise<number | 'closed'> {
  try {
    const r = await readSimpleReply(c, timeoutMs);
    assert.equal(r.cookie, cookie, 'reply cookie');
    return r.error;
  } catch (e) {
    if (e instanceof RawClosedError) return 'closed';
    throw e;
  }
}

/** A non-read command with structured replies negotiated: the server may answer simple or structured. */
async function simpleCommandStructured(s: Session, fields: { type: number; offset: number; length: number }, payload?: Buffer): Promise<number> {
  const cookie = nextCookie();
  await s.conn.write(request({ ...fields, cookie }, payload));
  const head = await s.conn.read(4, 'reading a reply magic');
  const magic = head.readUInt32BE(0);
  if (magic === 0x67446698) {
    const rest = await s.conn.read(12);
    assert.equal(rest.readBigUInt64BE(4), cookie);
    return rest.readUInt32BE(0);
  }
  assert.equal(magic, 0x668e33ef, 'reply magic');
  const rest = await s.conn.read(16);
  assert.equal(rest.readBigUInt64BE(4), cookie);
  const data = await s.conn.read(rest.readUInt32BE(12));
  assert.equal(rest.readUInt16BE(0) & CHUNK_FLAG_DONE, CHUNK_FLAG_DONE);
  return (rest.readUInt16BE(2) & 0x8000) !== 0 ? data.readUInt32BE(0) : 0;
}

for (const [backend, transport, dataPath] of runs) {
  describe(`e2e hostile input on a raw socket: ${backend} backend over ${transport}${dataPath === 'stream' ? ' (stream data path)' : ''}`, function () {
    this.timeout(60_000);
    let server: Server;
    let healthSeq = 0;
    const conns: RawConn[] = [];

    async function connect(): Promise<RawConn> {
      const c = await RawConn.connect(targetOf(server));
      conns.push(c);
      return c;
    }
    async function session(opts: { structured?: boolean; blockStatus?: boolean } = {}): Promise<Session> {
      return negotiate(await connect(), opts);
    }
    /** A fresh client can negotiate, write, read back and disconnect; RSS is bounded. */
    async function assertHealthy(): Promise<void> {
      assert.ok(server.alive(), `server died:\n${server.stderr().slice(-4000)}`);
      const s = await session();
      const off = HEALTH_BASE + (healthSeq++ % 1024) * 4096;
      const data = crypto.randomBytes(4096);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: off, length: data.length }, data), 0);
      const r = await simpleRead(s, off, 4096);
      assert.equal(r.error, 0);
      assert.ok(r.data?.equals(data), 'health check data reads back');
      await s.conn.write(request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }));
      assert.ok(await s.conn.waitClosed(5000), 'server closes after NBD_CMD_DISC');
      const rss = rssBytes(server.pid);
      assert.ok(rss < RSS_LIMIT_BYTES, `server RSS ${(rss / MiB).toFixed(1)} MiB >= ${RSS_LIMIT_BYTES / MiB} MiB`);
    }

    before(async function () {
      server = await startServer({ backend, transport, sizeBytes: SIZE_BYTES, ...(dataPath === 'stream' ? { env: { NVMIRROR_NBD_NATIVE: '0' } } : {}) });
    });
    afterEach(async function () {
      for (const c of conns.splice(0)) c.destroy();
      // Every hostile case must leave the server able to serve someone else.
      await assertHealthy();
    });
    after(async function () {
      for (const c of conns.splice(0)) c.destroy();
      if (server) assert.equal(await server.stop(), 0, `server exits 0 on SIGTERM:\n${server.stderr().slice(-2000)}`);
      await cleanupAll();
    });

    // ----------------------------------------------------------------- handshake phase

    it('greets with NBDMAGIC/IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', async function () {
      const c = await connect();
      const g = await readGreeting(c);
      assert.equal(g.handshakeFlags & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
      assert.equal(g.handshakeFlags & FLAG_NO_ZEROES, FLAG_NO_ZEROES);
    });

    it('drops the connection on unknown client flags', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | (1 << 7)));
      await c.write(option(OPT.LIST));
      assert.equal(await replyOrClose(c, 5000), 'closed', 'server must drop a client with unknown flags');
    });

    it('drops the connection on a bad option magic', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      await c.write(optionHeader(OPT.LIST, 0, 0x1122334455667788n));
      assert.ok(await c.waitClosed(5000), 'server must close on a bad IHAVEOPT magic');
    });

    it('drops the connection when garbage replaces the client flags and options', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(crypto.randomBytes(4096));
      assert.ok(await c.waitClosed(5000), 'server must close on garbage');
    });

    for (const [label, opt] of [['GO', OPT.GO], ['LIST', OPT.LIST], ['an unknown option', 0x7abc]] as Array<[string, number]>) {
      it(`answers a 2 GiB option length for ${label} with an error or a disconnect, without buffering it`, async function () {
        const c = await connect();
        await readGreeting(c);
        await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        await c.write(Buffer.concat([optionHeader(opt, 0x80000000), crypto.randomBytes(64 * 1024)]));
        const got = await replyOrClose(c, 10_000);
        assert.ok(got === 'closed' || (got & 0x80000000) !== 0, `got reply type 0x${got.toString(16)}, expected an error or a close`);
        const rss = rssBytes(server.pid);
        assert.ok(rss < RSS_LIMIT_BYTES, `RSS ${(rss / MiB).toFixed(1)} MiB after a 2 GiB option length`);
      });
    }

    it('caps the number of options on one connection', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      const count = 10_000;
      const one = option(0x7abd, Buffer.from('xyz'));
      await c.write(Buffer.concat(Array.from({ length: count }, () => one)));
      let replies = 0;
      for (;;) {
        const got = await replyOrClose(c, 10_000);
        if (got === 'closed') break;
        assert.equal(got, REP.ERR_UNSUP);
        replies++;
        if (replies === count) break;
      }
      assert.ok(replies < count, `server answered all ${count} options without disconnecting`);
    });

    it('answers an unknown option with ERR_UNSUP and keeps negotiating', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      await c.write(option(0x7abe, Buffer.from('some data')));
      const r = await readOptionReply(c);
      assert.equal(r.option, 0x7abe);
      assert.equal(r.type, REP.ERR_UNSUP);
      assert.ok(r.data.length <= 4096, 'error string at most 4096 bytes');
      await c.write(option(OPT.GO, goData('')));
      const info = await readInfoReplies(c, OPT.GO);
      assert.equal(info.sizeBytes, BigInt(SIZE_BYTES));
    });

    it('answers malformed known options with ERR_INVALID / ERR_UNKNOWN and keeps negotiating', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      // LIST takes no data.
      await c.write(option(OPT.LIST, Buffer.from('junk')));
      assert.equal((await readOptionReply(c)).type, REP.ERR_INVALID, 'LIST with data');
      // GO whose name length runs past the option data.
      const bad = goData('abc');
      bad.writeUInt32BE(1000, 0);
      await c.write(option(OPT.GO, bad));
      assert.equal((await readOptionReply(c)).type, REP.ERR_INVALID, 'GO with a name length past the end');
      // GO with an info count past the end.
      const bad2 = goData('', [INFO.NAME]);
      bad2.writeUInt16BE(50, 4);
      await c.write(option(OPT.GO, bad2));
      assert.equal((await readOptionReply(c)).type, REP.ERR_INVALID, 'GO with an info count past the end');
      // INFO for an export that does not exist.
      await c.write(option(OPT.INFO, goData('no-such-export')));
      assert.equal((await readOptionReply(c)).type, REP.ERR_UNKNOWN, 'INFO for an unknown export');
      // A 4 KiB export name: refused, not a crash.
      await c.write(option(OPT.GO, goData('x'.repeat(4096))));
      const long = (await readOptionReply(c)).type;
      assert.ok(long === REP.ERR_UNKNOWN || long === REP.ERR_INVALID || long === REP.ERR_TOO_BIG, `4 KiB name: 0x${long.toString(16)}`);
      // LIST works and names the default export.
      await c.write(option(OPT.LIST));
      const list = await readOptionReply(c);
      assert.equal(list.type, REP.SERVER);
      assert.equal(list.data.readUInt32BE(0), 0, 'the default export has the empty name');
      assert.equal((await readOptionReply(c)).type, REP.ACK);
      // INFO then GO still work on this connection.
      await c.write(option(OPT.INFO, goData('')));
      const info = await readInfoReplies(c, OPT.INFO);
      assert.equal(info.sizeBytes, BigInt(SIZE_BYTES));
      assert.ok(info.blockSizes, 'BLOCK_SIZE info sent when asked');
      await c.write(option(OPT.GO, goData('')));
      await readInfoReplies(c, OPT.GO);
    });

    it('refuses SET_META_CONTEXT before STRUCTURED_REPLY and ignores unknown contexts', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      await c.write(option(OPT.SET_META_CONTEXT, metaContextData('', ['base:allocation'])));
      const first = await readOptionReply(c);
      assert.ok((first.type & 0x80000000) !== 0, `SET_META_CONTEXT without structured replies: 0x${first.type.toString(16)}`);
      await c.write(option(OPT.STRUCTURED_REPLY));
      assert.equal((await readOptionReply(c)).type, REP.ACK);
      await c.write(option(OPT.LIST_META_CONTEXT, metaContextData('', ['nosuch:thing', 'base:allocation'])));
      const names: string[] = [];
      for (;;) {
        const r = await readOptionReply(c);
        if (r.type === REP.ACK) break;
        assert.equal(r.type, REP.META_CONTEXT);
        names.push(r.data.subarray(4).toString('utf8'));
      }
      assert.deepEqual(names, ['base:allocation']);
    });

    it('disconnects on EXPORT_NAME for an unknown export, and serves EXPORT_NAME for the real one', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      await c.write(option(OPT.EXPORT_NAME, Buffer.from('no-such-export')));
      assert.ok(await c.waitClosed(5000), 'EXPORT_NAME has no error reply: the server must close');

      const d = await connect();
      await readGreeting(d);
      await d.write(clientFlags(FLAG_FIXED_NEWSTYLE)); // no NO_ZEROES: expect 124 zero bytes
      await d.write(option(OPT.EXPORT_NAME, Buffer.alloc(0)));
      const reply = await d.read(8 + 2 + 124, 'reading the EXPORT_NAME reply');
      assert.equal(reply.readBigUInt64BE(0), BigInt(SIZE_BYTES));
      assert.ok((reply.readUInt16BE(8) & TFLAG.HAS_FLAGS) !== 0);
      assert.ok(reply.subarray(10).equals(Buffer.alloc(124)), '124 zero bytes');
      const s: Session = { conn: d, greeting: { handshakeFlags: 0 }, info: { sizeBytes: BigInt(SIZE_BYTES), transmissionFlags: 0, replies: [] }, structured: false };
      const r = await simpleRead(s, 0, 512);
      assert.equal(r.error, 0);
    });

    it('acknowledges ABORT and closes', async function () {
      const c = await connect();
      await readGreeting(c);
      await c.write(clientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      await c.write(option(OPT.ABORT));
      const got = await replyOrClose(c, 5000);
      assert.ok(got === REP.ACK || got === 'closed', `ABORT: 0x${got.toString(16)}`);
      assert.ok(await c.waitClosed(5000));
    });

    it('keeps serving others while 20 clients stall mid-handshake', async function () {
      const stalled: RawConn[] = [];
      for (let i = 0; i < 20; i++) {
        const c = await connect();
        stalled.push(c);
        await readGreeting(c);
        await c.write(Buffer.from([0, 0])); // half of the client flags, then nothing
      }
      await assertHealthy();
    });

    // -------------------------------------------------------------- transmission phase

    it('advertises flags and block sizes after GO', async function () {
      const s = await session();
      const f = s.info.transmissionFlags;
      for (const [name, bit] of Object.entries({
        HAS_FLAGS: TFLAG.HAS_FLAGS, SEND_FLUSH: TFLAG.SEND_FLUSH, SEND_FUA: TFLAG.SEND_FUA, SEND_TRIM: TFLAG.SEND_TRIM,
        SEND_WRITE_ZEROES: TFLAG.SEND_WRITE_ZEROES, CAN_MULTI_CONN: TFLAG.CAN_MULTI_CONN,
      })) assert.ok((f & bit) !== 0, `${name} set (flags 0x${f.toString(16)})`);
      assert.equal(f & TFLAG.READ_ONLY, 0);
      // DF only once structured replies are negotiated (spec: MUST NOT be set otherwise).
      assert.equal(f & TFLAG.SEND_DF, 0, 'SEND_DF without structured replies');
      const st = await session({ structured: true });
      assert.ok((st.info.transmissionFlags & TFLAG.SEND_DF) !== 0, 'SEND_DF with structured replies');
      const bs = s.info.blockSizes;
      assert.ok(bs, 'BLOCK_SIZE info');
      assert.ok(bs.minimum >= 1 && bs.minimum <= 65536 && (bs.minimum & (bs.minimum - 1)) === 0, `minimum ${bs.minimum}`);
      assert.equal(bs.preferred % bs.minimum, 0);
      assert.ok(bs.maximum >= 32 * MiB, `maximum ${bs.maximum} >= 32 MiB`);
    });

    it('answers an unknown command with EINVAL and stays connected', async function () {
      const s = await session();
      assert.equal(await simpleCommand(s, { type: 0x42, offset: 0, length: 512 }), ERR.EINVAL);
      assert.equal(await simpleCommand(s, { type: 0xffff, offset: 0, length: 0 }), ERR.EINVAL);
      assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'still connected');
    });

    it('answers an unknown command flag with EINVAL and stays connected', async function () {
      const s = await session();
      assert.equal((await simpleRead(s, 0, 4096, 1 << 9)).error, ERR.EINVAL);
      assert.equal((await simpleRead(s, 0, 4096, 1 << 15)).error, ERR.EINVAL);
      assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'still connected');
    });

    it('answers out-of-range reads, trims and block status with EINVAL', async function () {
      const s = await session();
      assert.equal((await simpleRead(s, SIZE_BYTES - 512, 4096)).error, ERR.EINVAL, 'read across the end');
      assert.equal((await simpleRead(s, SIZE_BYTES, 512)).error, ERR.EINVAL, 'read at the end');
      assert.equal((await simpleRead(s, 1n << 62n, 512)).error, ERR.EINVAL, 'read at 2^62');
      assert.equal((await simpleRead(s, 0xffffffffffffff00n, 4096)).error, ERR.EINVAL, 'read whose end wraps past 2^64');
      assert.equal(await simpleCommand(s, { type: CMD.TRIM, offset: SIZE_BYTES - 512, length: 4096 }), ERR.EINVAL, 'trim across the end');
      assert.equal((await simpleRead(s, SIZE_BYTES - 4096, 4096)).error, 0, 'the last block reads');
    });

    it('answers out-of-range writes with ENOSPC, consuming the payload, and stays connected', async function () {
      const s = await session();
      const data = Buffer.alloc(4096, 0x99);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: SIZE_BYTES - 512, length: 4096 }, data), ERR.ENOSPC);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: SIZE_BYTES, length: 4096 }, data), ERR.ENOSPC);
      const wrap = await simpleCommand(s, { type: CMD.WRITE, offset: 0xfffffffffffff000n, length: 8192 }, Buffer.alloc(8192));
      assert.ok(wrap === ERR.ENOSPC || wrap === ERR.EINVAL, `write whose end wraps: ${wrap}`);
      const wz = await simpleCommand(s, { type: CMD.WRITE_ZEROES, offset: SIZE_BYTES - 512, length: 4096 });
      assert.ok(wz === ERR.ENOSPC || wz === ERR.EINVAL, `write-zeroes across the end: ${wz}`);
      // The payloads were consumed: the next request is parsed correctly.
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: SIZE_BYTES - 4096, length: 4096 }, data), 0);
      const r = await simpleRead(s, SIZE_BYTES - 4096, 4096);
      assert.ok(r.data?.equals(data), 'the last block holds the in-range write');
    });

    it('accepts a 32 MiB write and a 32 MiB read (the spec floor for the maximum payload)', async function () {
      const s = await session();
      const data = crypto.randomBytes(32 * MiB);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 32 * MiB, length: data.length }, data), 0);
      const r = await simpleRead(s, 32 * MiB, 32 * MiB);
      assert.equal(r.error, 0);
      assert.ok(r.data?.equals(data), '32 MiB reads back');
    });

    it('refuses a 96 MiB write (above the 64 MiB maximum payload) without buffering it', async function () {
      const s = await session();
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.WRITE, cookie, offset: 0, length: 96 * MiB }));
      await s.conn.writeFiller(96 * MiB);
      const got = await simpleReplyOrClose(s.conn, cookie, 20_000);
      assert.ok(
        got === 'closed' || got === ERR.EINVAL || got === ERR.EOVERFLOW || got === ERR.ENOMEM,
        `96 MiB write answered ${got}: it must be refused (EINVAL/EOVERFLOW/ENOMEM) or the connection closed`,
      );
      if (got !== 'closed') assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'stays usable after draining');
      const rss = rssBytes(server.pid);
      assert.ok(rss < RSS_LIMIT_BYTES, `RSS ${(rss / MiB).toFixed(1)} MiB after a 96 MiB write`);
    });

    it('refuses a 4 GiB write length without buffering it (error or disconnect, never OOM)', async function () {
      const s = await session();
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.WRITE, cookie, offset: 0, length: 0xffffffff }));
      await s.conn.writeFiller(4 * MiB);
      const got = await simpleReplyOrClose(s.conn, cookie, 10_000);
      assert.ok(
        got === 'closed' || got === ERR.EINVAL || got === ERR.EOVERFLOW || got === ERR.ENOMEM,
        `4 GiB write answered ${got}`,
      );
      await sleep(200);
      const rss = rssBytes(server.pid);
      assert.ok(rss < RSS_LIMIT_BYTES, `RSS ${(rss / MiB).toFixed(1)} MiB after a 4 GiB write header`);
    });

    it('refuses a 4 GiB read length with an error or a disconnect', async function () {
      const s = await session();
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.READ, cookie, offset: 0, length: 0xffffffff }));
      const got = await simpleReplyOrClose(s.conn, cookie, 10_000);
      assert.ok(got === 'closed' || got === ERR.EINVAL || got === ERR.EOVERFLOW || got === ERR.ENOMEM, `4 GiB read answered ${got}`);
      if (got !== 'closed') assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'still connected');
    });

    it('disconnects on garbage after the handshake', async function () {
      const s = await session();
      await s.conn.write(crypto.randomBytes(4096));
      assert.ok(await s.conn.waitClosed(5000), 'server must close on a bad request magic');
    });

    it('disconnects on a request with a bad magic after valid traffic', async function () {
      const s = await session();
      assert.equal((await simpleRead(s, 0, 512)).error, 0);
      await s.conn.write(request({ type: CMD.READ, cookie: nextCookie(), offset: 0, length: 512, magic: 0x12345678 }));
      assert.ok(await s.conn.waitClosed(5000));
    });

    it('survives a client that closes in the middle of a write payload', async function () {
      const s = await session();
      await s.conn.write(request({ type: CMD.WRITE, cookie: nextCookie(), offset: 0, length: 8 * MiB }));
      await s.conn.writeFiller(100_000);
      s.conn.destroy();
      await sleep(100);
    });

    it('answers zero-length requests without disconnecting', async function () {
      const s = await session();
      for (const [name, type] of Object.entries({
        READ: CMD.READ, WRITE: CMD.WRITE, TRIM: CMD.TRIM, WRITE_ZEROES: CMD.WRITE_ZEROES, CACHE: CMD.CACHE, FLUSH: CMD.FLUSH,
      })) {
        const err = await simpleCommand(s, { type, offset: 4096, length: 0 });
        assert.ok(err === 0 || err === ERR.EINVAL, `zero-length ${name}: ${err}`);
      }
      assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'still connected');
    });

    it('handles misaligned requests as its advertised minimum block size says', async function () {
      const s = await session();
      const min = s.info.blockSizes?.minimum ?? 1;
      const data = Buffer.from('misaligned!');
      const w = await simpleCommand(s, { type: CMD.WRITE, offset: 8 * MiB + 3, length: data.length }, data);
      const r = await simpleRead(s, 8 * MiB + 3, data.length);
      if (min === 1) {
        assert.equal(w, 0);
        assert.ok(r.data?.equals(data), 'byte-granular write reads back');
      } else {
        assert.equal(w, ERR.EINVAL, `misaligned write with minimum block ${min}`);
        assert.equal(r.error, ERR.EINVAL, `misaligned read with minimum block ${min}`);
      }
      assert.equal((await simpleRead(s, 0, 4096)).error, 0, 'still connected');
    });

    it('answers pipelined requests exactly once each, matching cookies', async function () {
      const s = await session();
      const n = 64;
      const base = 16 * MiB;
      const blocks = Array.from({ length: n }, (_, i) => Buffer.alloc(4096, i + 1));
      const writes = blocks.map((b, i) => request({ type: CMD.WRITE, cookie: 1000n + BigInt(i), offset: base + i * 4096, length: 4096 }, b));
      await s.conn.write(Buffer.concat(writes));
      const seen = new Set<bigint>();
      for (let i = 0; i < n; i++) {
        const r = await readSimpleReply(s.conn);
        assert.equal(r.error, 0);
        assert.ok(!seen.has(r.cookie), `cookie ${r.cookie} answered twice`);
        seen.add(r.cookie);
      }
      const reads = blocks.map((_, i) => request({ type: CMD.READ, cookie: 2000n + BigInt(i), offset: base + i * 4096, length: 4096 }));
      await s.conn.write(Buffer.concat(reads));
      for (let i = 0; i < n; i++) {
        const r = await readSimpleReply(s.conn);
        assert.equal(r.error, 0);
        const idx = Number(r.cookie - 2000n);
        assert.ok(idx >= 0 && idx < n, `unexpected cookie ${r.cookie}`);
        const d = await s.conn.read(4096);
        assert.ok(d.equals(blocks[idx] as Buffer), `data for cookie ${r.cookie}`);
      }
    });

    it('finishes a write pipelined before DISC, then closes without a reply to DISC', async function () {
      const s = await session();
      const data = Buffer.alloc(65536, 0x3c);
      const cookie = nextCookie();
      await s.conn.write(
        Buffer.concat([
          request({ type: CMD.WRITE, cookie, offset: 20 * MiB, length: data.length }, data),
          request({ type: CMD.DISC, cookie: nextCookie(), offset: 0, length: 0 }),
        ]),
      );
      const r = await readSimpleReply(s.conn);
      assert.equal(r.cookie, cookie);
      assert.equal(r.error, 0);
      assert.ok(await s.conn.waitClosed(5000), 'closed after DISC');
      assert.equal(s.conn.available, 0, 'no reply to DISC');
      const t = await session();
      const back = await simpleRead(t, 20 * MiB, data.length);
      assert.ok(back.data?.equals(data), 'the write before DISC landed');
    });

    // ------------------------------------------------------------- structured replies

    it('sends an out-of-range READ error as a structured ERROR chunk once negotiated', async function () {
      const s = await session({ structured: true });
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.READ, cookie, offset: SIZE_BYTES - 512, length: 4096 }));
      const ch = await readChunk(s.conn);
      assert.equal(ch.cookie, cookie);
      assert.equal(ch.type, CHUNK.ERROR);
      assert.equal(ch.flags & CHUNK_FLAG_DONE, CHUNK_FLAG_DONE);
      assert.equal(ch.data.readUInt32BE(0), ERR.EINVAL);
      const msgLen = ch.data.readUInt16BE(4);
      assert.equal(ch.data.length, 6 + msgLen);
      // A good structured read: data chunks cover the range exactly once.
      const good = nextCookie();
      await s.conn.write(request({ type: CMD.READ, cookie: good, offset: 0, length: 65536, flags: CMD_FLAG.DF }));
      const { chunks, error } = await readChunksUntilDone(s.conn);
      assert.equal(error, 0);
      let covered = 0;
      for (const c of chunks) {
        assert.equal(c.cookie, good);
        if (c.type === CHUNK.OFFSET_DATA) covered += c.data.length - 8;
        else if (c.type === CHUNK.OFFSET_HOLE) covered += c.data.readUInt32BE(8);
        else assert.equal(c.type, CHUNK.NONE);
      }
      assert.equal(covered, 65536);
      // DF: one data chunk at most (or holes), never fragments of data.
      assert.ok(chunks.filter((c) => c.type === CHUNK.OFFSET_DATA).length <= 1, 'DF read is not fragmented');
    });

    it('answers BLOCK_STATUS with REQ_ONE with one extent, and out of range with EINVAL', async function () {
      const s = await session({ blockStatus: true });
      const ctx = s.metaContextId ?? -1;
      // 96 MiB..104 MiB is untouched by the other tests (the health check uses 120 MiB+).
      const base = 96 * MiB;
      assert.equal(await simpleCommandStructured(s, { type: CMD.WRITE, offset: base, length: 65536 }, Buffer.alloc(65536, 1)), 0);
      const cookie = nextCookie();
      await s.conn.write(request({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.REQ_ONE, cookie, offset: base, length: 8 * MiB }));
      const { chunks, error } = await readChunksUntilDone(s.conn);
      assert.equal(error, 0);
      const bs = chunks.filter((c) => c.type === CHUNK.BLOCK_STATUS);
      assert.equal(bs.length, 1);
      const d = (bs[0] as { data: Buffer }).data;
      assert.equal(d.readUInt32BE(0), ctx, 'context id');
      assert.equal(d.length, 4 + 8, 'REQ_ONE: exactly one descriptor');
      const len = d.readUInt32BE(4);
      assert.ok(len > 0 && len <= 65536, `first extent length ${len} covers only the written data`);
      assert.equal(d.readUInt32BE(8) & 1, 0, 'written data is not a hole');
      // Right after the written 64 KiB: a hole that reads as zeroes.
      const after = nextCookie();
      await s.conn.write(request({ type: CMD.BLOCK_STATUS, cookie: after, offset: base + 65536, length: 1 * MiB }));
      const h = await readChunksUntilDone(s.conn);
      assert.equal(h.error, 0);
      const hd = (h.chunks.find((c) => c.type === CHUNK.BLOCK_STATUS) as { data: Buffer }).data;
      assert.ok(hd.length >= 12 && (hd.length - 4) % 8 === 0, 'descriptor list');
      assert.equal(hd.readUInt32BE(8), 3, 'hole,zero after the written data');
      const oob = nextCookie();
      await s.conn.write(request({ type: CMD.BLOCK_STATUS, cookie: oob, offset: SIZE_BYTES, length: 4096 }));
      const r = await readChunksUntilDone(s.conn);
      assert.equal(r.error, ERR.EINVAL);
    });
  });

}

describe('e2e hostile input: read-only export', function () {
  this.timeout(60_000);
  let server: Server;
  before(async function () {
    server = await startServer({ backend: 'memory', transport: 'unix', sizeBytes: 64 * MiB, readOnly: true });
  });
  after(async function () {
    if (server) assert.equal(await server.stop(), 0);
    await cleanupAll();
  });

  it('advertises READ_ONLY and answers writes, trims and zeroes with EPERM, staying connected', async function () {
    const s = await negotiate(await RawConn.connect(targetOf(server)));
    try {
      assert.ok((s.info.transmissionFlags & TFLAG.READ_ONLY) !== 0, 'READ_ONLY flag');
      const data = Buffer.alloc(4096, 0xaa);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, offset: 0, length: 4096 }, data), ERR.EPERM);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE, flags: CMD_FLAG.FUA, offset: 4096, length: 4096 }, data), ERR.EPERM);
      assert.equal(await simpleCommand(s, { type: CMD.TRIM, offset: 0, length: 4096 }), ERR.EPERM);
      assert.equal(await simpleCommand(s, { type: CMD.WRITE_ZEROES, offset: 0, length: 4096 }), ERR.EPERM);
      const r = await simpleRead(s, 0, 4096);
      assert.equal(r.error, 0);
      assert.ok(r.data?.equals(Buffer.alloc(4096)), 'nothing was written');
      assert.ok(server.alive());
    } finally {
      s.conn.destroy();
    }
  });
});
