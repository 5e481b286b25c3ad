/**
 * ResyncFrames (src/mirror/resync-frames.ts): a resync's blocks go out in frames of at
 * most BLOCKS_PER_FRAME_MAX blocks, in the walk's order, as views of the walk's buffers;
 * a run's buffer goes back to the walk only once every frame viewing it is written, and
 * never after end(); deltas go in frames under their caps; nothing goes on a closed link.
 * (The whole resync, over a real link, runs in test/mirror.)
 */
import { strict as assert } from 'assert';
import * as net from 'net';
import { ResyncFrames, afterSocketWrites, type LentBlocks, type ResyncLink } from '../../src/mirror/resync-frames';
import { BLOCKS_PER_FRAME_MAX, DELTAS_PER_FRAME_MAX, MsgType, type CpDelta, type OutMessage } from '../../src/mirror/wire';
import type { BlockPtr } from '../../src/tree/layout';

class FakeLink implements ResyncLink {
  closed = false;
  lent: Array<{ m: LentBlocks; written: () => void }> = [];
  sent: OutMessage[] = [];
  waitRoom(): Promise<void> {
    return Promise.resolve();
  }
  send(m: OutMessage): void {
    this.sent.push(m);
  }
  sendLent(m: LentBlocks, written: () => void): void {
    this.lent.push({ m, written });
  }
  /** The link writes its oldest `n` lent frames. */
  write(n: number): void {
    for (const f of this.lent.splice(0, n)) f.written();
  }
}

function run(firstPba: number, blocks: number): { ptrs: BlockPtr[]; buf: Buffer } {
  const ptrs: BlockPtr[] = [];
  const buf = Buffer.alloc(blocks * 4096);
  for (let i = 0; i < blocks; i++) {
    ptrs.push({ pba: firstPba + i, birth: 1, crc: 0x1000 + firstPba + i });
    buf.writeUInt32LE(firstPba + i, i * 4096);
  }
  return { ptrs, buf };
}

describe('mirror: a resync\'s frames (resync-frames.ts)', () => {
  it('frames of at most 64 blocks in walk order, views of the walk\'s buffers, each run released once its frames are written', async () => {
    const link = new FakeLink();
    let blocks = 0;
    const f = new ResyncFrames(7, link, { blocksSent: (n) => (blocks += n), deltasSent: () => undefined });
    const released: number[] = [];
    const a = run(100, 100); // frame 1: a[0..64); frame 2: a[64..100) + b[0..28)
    const b = run(1000, 30); // ... frame 3: b[28..30)
    await f.addRun(a.ptrs, a.buf, 0, () => released.push(100));
    await f.addRun(b.ptrs, b.buf, 0, () => released.push(1000));
    assert.equal(link.lent.length, 2, 'two full frames went out');
    await f.flush();
    assert.equal(link.lent.length, 3);
    assert.deepEqual(link.lent.map((x) => x.m.pbas.length), [BLOCKS_PER_FRAME_MAX, 64, 2]);
    const pbas = link.lent.flatMap((x) => x.m.pbas);
    assert.deepEqual(pbas, [...a.ptrs, ...b.ptrs].map((p) => p.pba), 'walk order');
    assert.deepEqual(link.lent.flatMap((x) => x.m.crcs), [...a.ptrs, ...b.ptrs].map((p) => p.crc), 'the walk\'s crc32c with each block');
    for (const x of link.lent) {
      assert.equal(x.m.cp, 7);
      assert.equal(x.m.type, MsgType.CpBlocks);
      assert.equal(Buffer.concat(x.m.data).length, x.m.pbas.length * 4096);
    }
    // Views, not copies: the frame's bytes are the run's memory.
    assert.equal(link.lent[0]!.m.data[0]!.buffer, a.buf.buffer);
    assert.equal(blocks, 130);
    assert.deepEqual(released, [], 'nothing released before its frames are written');
    link.write(1);
    assert.deepEqual(released, [], 'run a is still viewed by frame 2');
    link.write(1);
    assert.deepEqual(released, [100]);
    link.write(1);
    assert.deepEqual(released, [100, 1000]);
  });

  it('a resumed walk skips the first blocks of a run; a run whose frames are all written is released at once; none after end()', async () => {
    const link = new FakeLink();
    const f = new ResyncFrames(3, link, { blocksSent: () => undefined, deltasSent: () => undefined });
    const released: number[] = [];
    const a = run(0, 64);
    await f.addRun(a.ptrs, a.buf, 64, () => released.push(0)); // every block skipped: nothing views it
    assert.deepEqual(released, [0]);
    const b = run(500, 70);
    await f.addRun(b.ptrs, b.buf, 6, () => released.push(500)); // blocks 6..70: one full frame
    assert.deepEqual(link.lent.map((x) => x.m.pbas[0]), [506]);
    const c = run(900, 1);
    await f.addRun(c.ptrs, c.buf, 0, () => released.push(900));
    f.end();
    link.write(1);
    assert.deepEqual(released, [0], 'released after end()');
  });

  it('deltas go in frames under their caps; a closed link gets nothing', async () => {
    const link = new FakeLink();
    let deltas = 0;
    const f = new ResyncFrames(9, link, { blocksSent: () => undefined, deltasSent: (n) => (deltas += n) });
    const d = (pba: number): CpDelta => ({ pba, prevPba: pba + 1, crc: pba, delta: Buffer.alloc(40, pba & 0xff) });
    for (let i = 0; i < DELTAS_PER_FRAME_MAX + 5; i++) await f.addDelta(d(i));
    assert.equal(link.sent.length, 1);
    await f.flush();
    assert.deepEqual(link.sent.map((m) => (m.type === MsgType.CpDeltas ? m.deltas.length : -1)), [DELTAS_PER_FRAME_MAX, 5]);
    assert.equal(deltas, DELTAS_PER_FRAME_MAX + 5);
    link.closed = true;
    await f.addDelta(d(1));
    const r = run(0, 3);
    await f.addRun(r.ptrs, r.buf, 0, () => undefined);
    await f.flush();
    assert.equal(link.sent.length, 2);
    assert.equal(link.lent.length, 0);
  });

  it('over a Node socket destroyed mid-write, frames are said written in order and never after a write failed (found by the fault suite: a truncated async stream)', async () => {
    const server = net.createServer((c) => c.pause()); // the peer never reads: writes stay in flight
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    const sock = net.connect(port, '127.0.0.1');
    await new Promise<void>((r) => sock.once('connect', r));
    sock.on('error', () => undefined);
    const order: number[] = [];
    // 24 frames of 1 MiB: the kernel's buffers take a few, libuv is writing one, Node holds the rest.
    for (let i = 1; i <= 24; i++) {
      sock.write(Buffer.alloc(1 << 20, i));
      afterSocketWrites(sock, () => order.push(i));
    }
    await new Promise((r) => setTimeout(r, 100));
    const before = [...order];
    sock.destroy();
    await new Promise((r) => sock.once('close', r));
    await new Promise((r) => setTimeout(r, 50));
    server.close();
    assert.ok(before.length < 24, 'some frames were still unwritten at the destroy');
    for (let i = 1; i < order.length; i++) assert.ok(order[i]! > order[i - 1]!, `written out of order: ${order.join(',')}`);
    assert.deepEqual(order, before, 'nothing is said written after the destroy');
  });
});
