/**
 * The receiver's timeouts on a simulated clock (ReceiverOptions.clock): a connection that
 * never completes a HELLO is closed at HELLO_TIMEOUT_MS, a welcomed source that falls
 * silent is ended at RECEIVER_IDLE_TIMEOUT_MS, and a silent session gives way to the same
 * source's new connection only once it has been silent for SESSION_SILENT_REPLACE_MS; none
 * of them a moment before. Real loopback sockets and the receiver in this process (as in
 * mirror-hello-race); only time is simulated, so a minute of silence takes milliseconds.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { Writable } from 'stream';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { HELLO_TIMEOUT_MS, RECEIVER_IDLE_TIMEOUT_MS, SESSION_SILENT_REPLACE_MS } from '../../src/mirror/receiver-session';
import { FrameWriter, MsgType, type OutMessage } from '../../src/mirror/wire';
import { rootGeneration } from '../../src/tree/lineage';
import { SimClock } from '../../src/sim/clock';
import { rawPeer as peer, until, type RawPeer } from './mirror-raw-peer';

const UUID = '7e570000-4567-89ef-0011-223344556677';

function helloMsg(): OutMessage {
  return {
    type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 1 << 30, deviceBlocks: 1 << 18, nvramBytes: 8 << 20, mode: 'sync',
    sourceCp: 0, streamFromSeq: 1, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '7e577e577e577e57', lineage: [rootGeneration(UUID)], earlier: [],
  };
}

/** Real time for the sockets to do what they would (a close that should not happen has had its chance). */
const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 100));

describe('mirror receiver: HELLO, idle and silence timeouts on a simulated clock', function () {
  this.timeout(30_000);
  let tmp: string;
  let rx: MirrorReceiver;
  let port: number;
  let clock: SimClock;
  let logs: string[];

  beforeEach(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-rx-timeouts-'));
    clock = new SimClock();
    logs = [];
    const sink = new Writable({ write: (chunk: Buffer, _e, cb) => { logs.push(chunk.toString()); cb(); } });
    rx = new MirrorReceiver({ dir: tmp, logger: pino({ level: 'info' }, sink), clock });
    port = (await rx.listen('127.0.0.1', 0)).port;
  });

  afterEach(async () => {
    await rx.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  let isClosed = false;
  const watch = (p: RawPeer): RawPeer => {
    isClosed = false;
    void p.closed.then(() => { isClosed = true; });
    return p;
  };
  const welcomed = (p: RawPeer): boolean => p.got.some((m) => m.type === MsgType.Welcome);
  const logged = (re: RegExp): boolean => logs.some((l) => re.test(l));

  for (const what of ['nothing', 'a HELLO frame cut short'] as const) {
    it(`a connection that sends ${what} is closed at the HELLO timeout, not before`, async () => {
      const p = watch(await peer(port));
      if (what !== 'nothing') {
        const parts = new FrameWriter().frame(helloMsg());
        const bytes = Buffer.concat(parts);
        p.raw(bytes.subarray(0, bytes.length - 5));
      }
      await until('the receiver took the connection', () => rx.stats().connections === 1);
      await clock.advanceBy(HELLO_TIMEOUT_MS - 1);
      await settle();
      assert.equal(isClosed, false, `closed before the HELLO timeout (${HELLO_TIMEOUT_MS} ms)`);
      await clock.advanceBy(1);
      await until('the connection closed at the HELLO timeout', () => isClosed);
      assert.ok(logged(/no HELLO in time/), 'the log says why');
      await until('the session forgotten', () => rx.stats().connections === 0);
      assert.equal(rx.stats().mirrors.length, 0, 'no mirror was made');
    });
  }

  it('a welcomed source that sends nothing more is ended at the idle timeout, not before, and its reconnect is welcomed', async () => {
    const p = watch(await peer(port));
    p.send(helloMsg());
    await until('welcomed', () => welcomed(p));
    await settle(); // the hand-off to the receive thread is done before time moves
    await clock.advanceBy(RECEIVER_IDLE_TIMEOUT_MS - 1);
    await settle();
    assert.equal(isClosed, false, `ended before the idle timeout (${RECEIVER_IDLE_TIMEOUT_MS} ms)`);
    assert.ok(rx.stats().mirrors[0]!.connected);
    await clock.advanceBy(1);
    await until('the connection closed at the idle timeout', () => isClosed);
    assert.ok(logged(new RegExp(`nothing received for ${RECEIVER_IDLE_TIMEOUT_MS} ms`)), 'the log says why');
    await until('the mirror shows its source gone', () => rx.stats().mirrors.every((m) => !m.connected));
    const again = await peer(port);
    again.send(helloMsg());
    await until('the reconnect welcomed', () => welcomed(again));
    again.destroy();
  });

  it('a silent session gives way to the same source\'s new connection only after SESSION_SILENT_REPLACE_MS of silence', async () => {
    const old = watch(await peer(port));
    old.send(helloMsg());
    await until('welcomed', () => welcomed(old));
    await settle();
    await clock.advanceBy(SESSION_SILENT_REPLACE_MS - 1);
    const early = await peer(port);
    early.send(helloMsg());
    await until('the early reconnect answered', () => early.got.some((m) => m.type === MsgType.Refuse));
    const refusal = early.got.find((m) => m.type === MsgType.Refuse);
    assert.match(refusal && refusal.type === MsgType.Refuse ? refusal.reason : '', /already connected/);
    assert.equal(isClosed, false, 'the old session was ended by a reconnect before it had been silent long enough');
    early.destroy();
    await clock.advanceBy(1);
    const late = await peer(port);
    late.send(helloMsg());
    await until('the late reconnect welcomed', () => welcomed(late));
    await until('the old connection closed', () => isClosed);
    assert.ok(logged(/old connection was silent: the old one is ended/), 'the log says why');
    late.destroy();
  });
});
