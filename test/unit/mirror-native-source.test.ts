/**
 * The source's side of a sync mirror's plain link on the native thread (native/mirror_rx.cc
 * in source mode, src/mirror/native-rx.ts, NvLog.forwardNative): the records the NBD
 * threads' appender writes go on the link as they are appended, in seq order with the
 * frames TypeScript sends, nothing before what `first` queued; a RECORD_ACK from the
 * destination releases their held replies on the thread, never beyond the records the link
 * carried; a hostile destination is refused with wire.ts's words and releases nothing.
 * The destination here is a real loopback socket read by wire.ts's FrameParser.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { NvLog } from '../../src/nvlog/log';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { EV_ERROR, EV_FRAME, EV_SENT, NativeRx, plainFd, type RxEvent } from '../../src/mirror/native-rx';
import * as v8 from 'v8';
import * as vm from 'vm';
import { crc32cWide } from '../../src/io/native';
import { decodeBody, FrameParser, FrameWriter, MsgType, type Message } from '../../src/mirror/wire';
import { until } from '../mirror/helpers';
import { SCHED_BATCH, threadsNamed } from '../threads';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

const UUID = '0123abcd-0000-4000-8000-00000000beef';
const BS = 4096;
const VOLUME_BYTES = 256 * BS;

function block(fill: number, blocks = 1): Buffer {
  return Buffer.alloc(BS * blocks, fill & 0xff);
}

/** A running log with the threads' appender (the region in memory). */
async function freshLog(): Promise<NvLog> {
  const region = new MemoryNvram(4 * 1024 * 1024);
  await NvLog.format(region, UUID);
  const log = NvLog.open(region, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false });
  await log.beginEpoch();
  return log;
}

interface Rig {
  log: NvLog;
  rx: NativeRx;
  /** What the destination read, in order. */
  got: Message[];
  /** Frames and errors the source's thread handed to TypeScript. */
  events: RxEvent[];
  fromDest: Message[];
  dest: net.Socket;
  client: net.Socket;
  close(): void;
}

describe('mirror: the source\'s records on the link\'s native thread', function () {
  this.timeout(60_000);
  let server: net.Server;
  let accepted: net.Socket[] = [];
  before(async () => {
    server = net.createServer((s) => accepted.push(s));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  });
  after(() => server.close());

  async function rig(): Promise<Rig> {
    const log = await freshLog();
    log.enableNativeAppends(VOLUME_BYTES, undefined);
    log.setNativeGate(true); // replies held for the replica, as a sync mirror's are
    accepted = [];
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    client.pause(); // Node never reads it: the thread does (as source.ts does)
    await new Promise<void>((r) => client.once('connect', () => r()));
    await until('accept', () => accepted.length === 1);
    const dest = accepted[0]!;
    const got: Message[] = [];
    const parser = new FrameParser();
    dest.on('data', (d) => got.push(...parser.push(d)));
    const r = { log, got, events: [], fromDest: [], dest, client } as unknown as Rig;
    r.rx = new NativeRx(plainFd(client)!, Buffer.alloc(0), 0, 0, (evs) => {
      for (const e of evs) {
        r.events.push(e);
        if (e.kind === EV_FRAME) {
          const body = Buffer.alloc(e.bytes);
          r.rx.take(body);
          r.fromDest.push(decodeBody(e.type, body));
        }
      }
    }, undefined, { source: true });
    r.close = () => {
      log.forwardNative(undefined);
      r.rx.close(false);
      client.destroy();
      dest.destroy();
      log.close();
    };
    return r;
  }

  const records = (r: Rig): Array<Message & { type: MsgType.Record }> => r.got.filter((m): m is Message & { type: MsgType.Record } => m.type === MsgType.Record);

  it('queues the threads\' records behind what `first` sent, in seq order with TypeScript\'s frames; an ack releases at most what the link carried', async () => {
    const r = await rig();
    const na = r.log.nativeAppender!;
    assert.ok(na.append(0, block(1)), 'seq 1: before the link: not forwarded');
    let from = 0;
    r.log.forwardNative((app, fromSeq) => r.rx.forward(app, fromSeq), (fromSeq) => {
      from = fromSeq;
      r.rx.send({ type: MsgType.Ping, nowMs: fromSeq }); // stands in for HELLO
    });
    assert.equal(from, 2, 'the first record forwarded is the next seq');
    assert.ok(na.append(BS, block(2, 2)), 'seq 2');
    assert.ok(na.append(8 * BS, block(3)), 'seq 3');
    r.rx.send({ type: MsgType.Ping, nowMs: 77 });
    assert.ok(na.append(9 * BS, block(4)), 'seq 4');
    await until('4 frames at the destination', () => r.got.length >= 4);
    assert.equal(r.got[0]!.type, MsgType.Ping);
    assert.equal((r.got[0] as Message & { type: MsgType.Ping }).nowMs, 2, 'nothing went out before `first`\'s frame');
    const recs = records(r);
    assert.deepEqual(recs.map((m) => m.seq), [2, 3, 4]);
    assert.deepEqual(r.got.map((m) => m.type), [MsgType.Ping, MsgType.Record, MsgType.Record, MsgType.Ping, MsgType.Record], 'one stream, in the order queued');
    assert.deepEqual(recs[0]!.payload, block(2, 2));
    assert.equal(recs[0]!.offsetBytes, BS);
    assert.equal(recs[0]!.lengthBytes, 2 * BS);
    assert.deepEqual(recs[2]!.payload, block(4));
    assert.equal(r.rx.stats().forwarded, 3);

    // The destination acknowledges: the thread releases (not the event loop).
    const w = new FrameWriter();
    assert.equal(na.marks.released, 0);
    r.dest.write(Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 3, durableSeq: 0, storedFromSeq: 1 })));
    await until('release to 3', () => na.marks.released === 3);
    // An ack beyond what the link carried releases only what it carried.
    r.dest.write(Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 1000, durableSeq: 0, storedFromSeq: 1 })));
    await until('the ack reached TypeScript', () => r.fromDest.some((m) => m.type === MsgType.RecordAck && m.heldSeq === 1000));
    assert.equal(na.marks.released, 4, 'released up to the last record forwarded, not 1000');
    assert.equal(r.events.filter((e) => e.kind === EV_ERROR).length, 0);

    // Unlinked: the next record is not forwarded.
    r.log.forwardNative(undefined);
    assert.ok(na.append(10 * BS, block(5)), 'seq 5');
    r.rx.send({ type: MsgType.Ping, nowMs: 99 });
    await until('the last ping', () => r.got.some((m) => m.type === MsgType.Ping && m.nowMs === 99));
    assert.deepEqual(records(r).map((m) => m.seq), [2, 3, 4], 'seq 5 stayed home');
    r.close();
  });

  it('the link\'s thread runs under SCHED_BATCH: woken per record and per ack, it does not preempt the NBD threads', async () => {
    const before = new Set(threadsNamed('nvm-mirror-rx').map((t) => t.tid));
    const r = await rig();
    const mine = (): ReturnType<typeof threadsNamed> => threadsNamed('nvm-mirror-rx').filter((t) => !before.has(t.tid));
    await until('the link thread under SCHED_BATCH', () => mine().length === 1 && mine()[0]!.policy === SCHED_BATCH);
    r.close();
  });

  it('a link made before the appender forwards its records too (the appender attaches when it is made)', async () => {
    const log = await freshLog();
    const attached: number[] = [];
    log.forwardNative((_app, fromSeq) => attached.push(fromSeq));
    await log.appendWrite(0, [block(1)], 0);
    log.enableNativeAppends(VOLUME_BYTES, undefined);
    assert.deepEqual(attached, [2], 'attached from the seq after the log\'s own append');
    log.close();
  });

  for (const [what, mangle] of [
    ['a flipped checksum bit', (f: Buffer) => { f.writeUInt8(f.readUInt8(20) ^ 1, 20); }],
    ['a replayed frame number', (f: Buffer) => { f.writeUInt32LE(0, 12); }],
    ['bad magic', (f: Buffer) => { f.writeUInt8(f.readUInt8(0) ^ 0xff, 0); }],
  ] as Array<[string, (f: Buffer) => void]>) {
    it(`a hostile destination (${what}) is refused and releases nothing`, async () => {
      const r = await rig();
      const na = r.log.nativeAppender!;
      r.log.forwardNative((app, fromSeq) => r.rx.forward(app, fromSeq));
      assert.ok(na.append(0, block(1)));
      assert.ok(na.append(BS, block(2)));
      await until('2 records', () => records(r).length === 2);
      const w = new FrameWriter();
      r.dest.write(Buffer.concat(w.frame({ type: MsgType.Ping, nowMs: 1 })));
      const bad = Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 2, durableSeq: 0, storedFromSeq: 1 }));
      mangle(bad); // a replayed frame number: frame 1 again as 0
      r.dest.write(bad);
      await until('the error', () => r.events.some((e) => e.kind === EV_ERROR));
      const err = r.events.find((e) => e.kind === EV_ERROR) as RxEvent & { kind: typeof EV_ERROR };
      assert.ok(err.protocol, 'a protocol error');
      assert.match(err.text, /checksum|frame number|magic/);
      assert.equal(na.marks.released, 0, 'nothing released');
      r.close();
    });
  }

  it('lent CP_BLOCKS frames go out from the caller\'s buffers, EV_SENT says when they may be reused, the checksum comes from the blocks\' crcs; close() copies what is queued', async () => {
    const r = await rig();
    r.dest.pause(); // the socket fills: frames wait in the thread's queue, still lent
    // Four reusable buffers of 8 blocks; frame n takes buffer n % 4, filled with n.
    const bufs = [0, 1, 2, 3].map(() => Buffer.alloc(8 * BS));
    const frames = 160; // 5 MiB: beyond what a paused loopback socket takes
    let sentTo = 0;
    const fill = (n: number): Buffer => bufs[n % 4]!.fill(n & 0xff);
    let next = 1;
    const crcsOf = (b: Buffer): number[] => Array.from({ length: 8 }, (_, i) => crc32cWide(b.subarray(i * BS, (i + 1) * BS)));
    const sendUpTo = (limit: number): void => {
      // A buffer is reused only once every frame that used it is sent (token <= sentTo).
      while (next <= limit && next - sentTo <= 4) {
        const b = fill(next);
        // Two views of one buffer: a frame may span runs.
        r.rx.sendLent({ type: MsgType.CpBlocks, cp: 9, pbas: Array.from({ length: 8 }, (_, i) => 100 + 8 * next + i), data: [b.subarray(0, 3 * BS), b.subarray(3 * BS)], crcs: crcsOf(b) }, next);
        next++;
      }
    };
    sendUpTo(frames);
    assert.ok(next <= 5, 'only four buffers: the fifth frame waits for an EV_SENT');
    await new Promise((res) => setTimeout(res, 100));
    r.dest.resume();
    while (next <= frames) {
      const sent = r.events.filter((e): e is RxEvent & { kind: typeof EV_SENT } => e.kind === EV_SENT);
      const top = sent.length > 0 ? sent[sent.length - 1]!.token : 0;
      assert.ok(top >= sentTo, 'EV_SENT tokens increase');
      sentTo = top;
      sendUpTo(frames);
      await new Promise((res) => setImmediate(res));
    }
    await until('every frame at the destination', () => r.got.length >= frames);
    assert.equal(r.events.filter((e) => e.kind === EV_ERROR).length, 0);
    for (let n = 1; n <= frames; n++) {
      const m = r.got[n - 1]!;
      assert.equal(m.type, MsgType.CpBlocks);
      const cb = m as Message & { type: MsgType.CpBlocks };
      assert.equal(cb.pbas[0], 100 + 8 * n);
      assert.ok(cb.data.equals(Buffer.alloc(8 * BS, n & 0xff)), `frame ${n} carries what its buffer held when it was lent`);
    }
    await until('the last EV_SENT', () => r.events.some((e) => e.kind === EV_SENT && e.token === frames));

    r.close();
  });

  it('a lent buffer nothing else references outlives a garbage collection until it is sent; a wrong block crc is refused by the destination', async () => {
    const r = await rig();
    r.dest.pause();
    r.dest.removeAllListeners('data');
    const parser = new FrameParser();
    const got: Message[] = [];
    let refused = '';
    r.dest.on('data', (d) => {
      try {
        got.push(...parser.push(d));
      } catch (e) {
        refused = (e as Error).message;
      }
    });
    r.dest.pause();
    const frames = 48; // 12 MiB: most of it waits in the thread's queue
    for (let n = 1; n <= frames; n++) {
      const b = Buffer.alloc(64 * BS, n); // referenced by the message only
      const crcs = Array.from({ length: 64 }, (_, i) => crc32cWide(b.subarray(i * BS, (i + 1) * BS)));
      r.rx.sendLent({ type: MsgType.CpBlocks, cp: 4, pbas: Array.from({ length: 64 }, (_, i) => 64 * n + i), data: [b], crcs }, n);
    }
    assert.ok(r.rx.stats().queuedBytes > 4 * 1024 * 1024, 'frames wait in the queue');
    for (let i = 0; i < 4; i++) {
      gc();
      Buffer.alloc(32 * 1024 * 1024, 0xdd); // reuses what a collected buffer held, if any was
      await new Promise((res) => setImmediate(res));
    }
    r.dest.resume();
    await until('every frame', () => got.length === frames || refused !== '');
    assert.equal(refused, '', 'no frame was damaged');
    got.forEach((m, i) => assert.ok((m as Message & { type: MsgType.CpBlocks }).data.equals(Buffer.alloc(64 * BS, i + 1)), `frame ${i + 1}`));

    // A wrong crc makes the frame's checksum wrong: the destination refuses the frame.
    const wrong = Buffer.alloc(8 * BS, 1);
    const crcs = Array.from({ length: 8 }, (_, i) => crc32cWide(wrong.subarray(i * BS, (i + 1) * BS)));
    crcs[5] = (crcs[5]! ^ 1) >>> 0;
    r.rx.sendLent({ type: MsgType.CpBlocks, cp: 9, pbas: [1, 2, 3, 4, 5, 6, 7, 8], data: [wrong], crcs }, frames + 1);
    await until('refused', () => refused !== '');
    assert.match(refused, /checksum/);
    assert.equal(got.length, frames);
    r.close();
  });

  it('close() copies the lent frames still queued: the caller may reuse its buffers at once', async () => {
    const r = await rig();
    r.dest.pause();
    const b = Buffer.alloc(64 * BS, 7);
    const crcs = Array.from({ length: 64 }, (_, i) => crc32cWide(b.subarray(i * BS, (i + 1) * BS)));
    let token = 0;
    for (let i = 0; i < 64; i++) r.rx.sendLent({ type: MsgType.CpBlocks, cp: 3, pbas: Array.from({ length: 64 }, (_, k) => 1000 + 64 * i + k), data: [b], crcs }, ++token);
    assert.ok(r.rx.stats().queuedBytes > 1024 * 1024, 'frames wait in the queue');
    const parser = new FrameParser();
    const got: Message[] = [];
    r.dest.removeAllListeners('data');
    r.dest.on('data', (d) => got.push(...parser.push(d)));
    r.rx.close(true); // flush what is queued, then end
    b.fill(0xee); // the caller's buffer is its own again
    r.dest.resume();
    await until('every frame', () => got.length === 64);
    for (const m of got) assert.ok((m as Message & { type: MsgType.CpBlocks }).data.equals(Buffer.alloc(64 * BS, 7)), 'the bytes as lent, not as overwritten after close()');
    r.client.destroy();
    r.dest.destroy();
    r.log.close();
  });

  it('a FLUSH on the threads under the replica asks the link for the destination\'s durable ack, answers only with it, and hands the FLUSH back when the link cannot tell', async () => {
    const r = await rig();
    const na = r.log.nativeAppender!;
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-flush-')), 'nvram.file');
    fs.writeFileSync(file, Buffer.alloc(BS));
    // Held replies (the gate) and no link yet: the threads do not answer FLUSH themselves.
    assert.ok(na.setFlushFile(file));
    assert.equal(na.flush(), 0, 'under a replica without its link: TypeScript answers');
    assert.equal(r.got.filter((m) => m.type === MsgType.DurableReq).length, 0);
    r.log.forwardNative((app, fromSeq) => r.rx.forward(app, fromSeq));
    assert.ok(na.append(0, block(1)), 'seq 1');
    assert.ok(na.append(BS, block(2)), 'seq 2');
    await until('2 records', () => records(r).length === 2);
    assert.deepEqual(records(r).map((m) => m.seq), [1, 2]);
    // No ack comes (this test's destination answers only when told): after its wait the
    // round hands the FLUSH back, and the request went out behind the records.
    assert.equal(na.flush(), 0, 'no durable ack: handed back');
    await until('the DURABLE_REQ', () => r.got.some((m) => m.type === MsgType.DurableReq));
    const reqAt = r.got.findIndex((m) => m.type === MsgType.DurableReq);
    assert.equal((r.got[reqAt] as Message & { type: MsgType.DurableReq }).seq, 2, 'every record in the region');
    assert.deepEqual(r.got.slice(0, reqAt).filter((m) => m.type === MsgType.Record).map((m) => (m as Message & { type: MsgType.Record }).seq), [1, 2], 'behind the records it covers');
    const flushesBefore = na.flushes;
    // An ack that holds them but says nothing durable is not enough.
    const w = new FrameWriter();
    r.dest.write(Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 2, durableSeq: 1, storedFromSeq: 1 })));
    await until('the ack reached TypeScript', () => r.fromDest.some((m) => m.type === MsgType.RecordAck && m.durableSeq === 1));
    assert.equal(na.flush(), 0, 'durable through 1 of 2: handed back');
    assert.equal(r.got.filter((m) => m.type === MsgType.DurableReq).length, 1, 'the same target is not asked for twice');
    // Durable through 2: answered on the thread.
    r.dest.write(Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 2, durableSeq: 2, storedFromSeq: 1 })));
    await until('the second ack', () => r.fromDest.some((m) => m.type === MsgType.RecordAck && m.durableSeq === 2));
    assert.equal(na.flush(), 1, 'durable here and there: answered');
    assert.equal(na.flushes, flushesBefore + 1);
    // The target covers what the destination acknowledged holding beyond the region (a
    // WRITE TypeScript answered after that ack): held 9 makes the next request ask for 9.
    r.dest.write(Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 9, durableSeq: 2, storedFromSeq: 1 })));
    await until('the third ack', () => r.fromDest.some((m) => m.type === MsgType.RecordAck && m.heldSeq === 9));
    assert.equal(na.flush(), 0);
    await until('the second DURABLE_REQ', () => r.got.filter((m) => m.type === MsgType.DurableReq).length === 2);
    assert.equal((r.got.filter((m) => m.type === MsgType.DurableReq)[1] as Message & { type: MsgType.DurableReq }).seq, 9);
    // The link fails (a hostile ack): a FLUSH does not wait for it.
    const bad = Buffer.concat(w.frame({ type: MsgType.RecordAck, heldSeq: 9, durableSeq: 9, storedFromSeq: 1 }));
    bad.writeUInt8(bad.readUInt8(20) ^ 1, 20);
    r.dest.write(bad);
    await until('the error', () => r.events.some((e) => e.kind === EV_ERROR));
    assert.equal(na.flush(), 0, 'a failed link: handed back');
    r.close();
  });
});
