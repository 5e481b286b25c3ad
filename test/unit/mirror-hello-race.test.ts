/**
 * HELLOs of one source on several connections at once (the receiver in this process, real
 * loopback sockets): exactly one connection gets WELCOME and the stream; every other is
 * refused with "already connected" and changes nothing. A relay that held a stalled link
 * delivers the source's reconnect attempts together when the stall lifts; two sessions
 * admitted for one source would each start its log's stream and interleave records
 * ("record seq N where M was due"). The race needs a HELLO to wait on I/O (opening the
 * mirror, an old session finishing its CP): opening the mirror is slowed here, as a slow
 * disk would.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { rootGeneration } from '../../src/tree/lineage';
import { MsgType } from '../../src/mirror/wire';
import { rawPeer as peer, until, type RawPeer } from './mirror-raw-peer';

const UUID = '0123abcd-4567-89ef-0011-223344556677';
/** How long opening the mirror takes here (the window in which other HELLOs arrive). */
const OPEN_DELAY_MS = 100;

/** This source's HELLO, from the start of its log. */
function hello(p: RawPeer): void {
  p.send({
    type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 1 << 30, deviceBlocks: 1 << 18, nvramBytes: 8 << 20, mode: 'sync',
    sourceCp: 0, streamFromSeq: 1, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '5eed5eed5eed5eed', lineage: [rootGeneration(UUID)], earlier: [],
  });
}

describe('mirror receiver: HELLOs of one source on several connections at once', function () {
  this.timeout(30_000);
  let tmp: string;
  let rx: MirrorReceiver;
  let port: number;

  beforeEach(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-hello-race-'));
    rx = new MirrorReceiver({ dir: tmp, logger: pino({ level: 'silent' }) });
    port = (await rx.listen('127.0.0.1', 0)).port;
    const open = rx.openMirror.bind(rx);
    rx.openMirror = async (...args) => {
      await new Promise((r) => setTimeout(r, OPEN_DELAY_MS));
      return open(...args);
    };
  });

  afterEach(async () => {
    await rx.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const welcomed = (p: RawPeer): boolean => p.got.some((m) => m.type === MsgType.Welcome);
  const refusal = (p: RawPeer): string | undefined => {
    const m = p.got.find((x) => x.type === MsgType.Refuse);
    return m && m.type === MsgType.Refuse ? m.reason : undefined;
  };

  for (const first of ['a new mirror', 'a mirror an earlier connection opened'] as const) {
    it(`${first}: one of four simultaneous HELLOs is welcomed, the others are refused as already connected`, async () => {
      if (first !== 'a new mirror') {
        const p0 = await peer(port);
        hello(p0);
        await until('the first connection welcomed', () => welcomed(p0));
        p0.destroy();
        await until('the first connection gone', () => rx.stats().mirrors.every((m) => !m.connected));
      }
      const peers = await Promise.all([0, 1, 2, 3].map(() => peer(port)));
      for (const p of peers) hello(p);
      await until('every connection answered', () => peers.every((p) => welcomed(p) || refusal(p) !== undefined));
      // Any late second WELCOME would show within the open delay.
      await new Promise((r) => setTimeout(r, 3 * OPEN_DELAY_MS));
      const w = peers.filter(welcomed);
      assert.equal(w.length, 1, `${w.length} connections of one source were welcomed`);
      for (const p of peers.filter((x) => !welcomed(x))) assert.match(refusal(p)!, /already (connected|in use)/);
      const st = rx.stats().mirrors;
      assert.equal(st.length, 1);
      assert.ok(st[0]!.connected);
      for (const p of peers) p.destroy();
    });
  }
});
