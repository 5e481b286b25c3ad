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
import * as net from 'net';
import { NvLog } from '../../src/nvlog/log';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { EV_ERROR, EV_FRAME, NativeRx, plainFd, type RxEvent } from '../../src/mirror/native-rx';
import { decodeBody, FrameParser, FrameWriter, MsgType, type Message } from '../../src/mirror/wire';
import { until } from '../mirror/helpers';
import { SCHED_BATCH, threadsNamed } from '../threads';

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
});
