/**
 * A destination whose log ring filled and dropped records (a long catch-up: the records
 * keep coming while no CP releases any) must tell the source so, and must not hold
 * against it a reference it could not have known was bad. The test plays the source on a
 * real loopback socket against `receive` in this process (the native receive thread
 * when the addon has it):
 *   - once a record is dropped, every RECORD_ACK's storedFromSeq is 2^53-1: no record
 *     may be referenced (the source then sends the CP's blocks as data);
 *   - a CP that references a dropped record anyway (built before that ack arrived) ends
 *     the connection without a REFUSE, the committed image unchanged, and the next
 *     connection is welcomed;
 *   - a reference to a record never sent is still refused (a protocol error).
 * The CI fault suite met the first case under a flapping link: a catch-up dropped
 * records, the source's CP after it referenced one, and the receiver refused an honest
 * source (`CP 62: reference to record 18587 is not in the log`).
 */
import { strict as assert } from 'assert';
import { formatReceiver } from '../../src/cli/status';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { crc32c } from '../../src/io/native';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { NO_REFERENCES_FROM_SEQ } from '../../src/mirror/dest-log';
import { rootGeneration } from '../../src/tree/lineage';
import { BLOCK_BYTES, MsgType, type Message } from '../../src/mirror/wire';
import { rawPeer as peer, until as untilMs, type RawPeer } from './mirror-raw-peer';

const UUID = '0d0d0d0d-4567-49ef-8011-223344556677';
const MIB = 1024 * 1024;
/** The source's NVRAM: the destination's log is 16 MiB (its minimum), 15 records of 1 MiB. */
const NVRAM_BYTES = 4 * MIB;
const RECORDS_SENT = 20;

function hello(p: RawPeer, processId: string): void {
  p.send({
    type: MsgType.Hello, sourceUuid: UUID, sizeBytes: 64 * MIB, deviceBlocks: 64 * MIB / BLOCK_BYTES, nvramBytes: NVRAM_BYTES, mode: 'sync',
    sourceCp: 0, streamFromSeq: 1, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId, lineage: [rootGeneration(UUID)], earlier: [],
  });
}

/** The crc32c of one block of record `seq`'s payload (every byte `seq`). */
function crcOf(seq: number): number {
  return crc32c(Buffer.alloc(BLOCK_BYTES, seq));
}

/** Waits up to 10 s (20 MiB of records through the log, on a loaded CI machine). */
function until(what: string, f: () => boolean): Promise<void> {
  return untilMs(what, f, 10_000);
}

function acks(p: RawPeer): Array<Message & { type: MsgType.RecordAck }> {
  return p.got.filter((m): m is Message & { type: MsgType.RecordAck } => m.type === MsgType.RecordAck);
}

describe('mirror receiver: records dropped from a full log, and references to them', function () {
  this.timeout(60_000);
  let tmp: string;
  let rx: MirrorReceiver;
  let port: number;
  const lines: string[] = [];

  beforeEach(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-dropped-ref-'));
    lines.length = 0;
    rx = new MirrorReceiver({ dir: tmp, logger: pino({ level: 'info' }, { write: (s: string) => void lines.push(s) }) });
    port = (await rx.listen('127.0.0.1', 0)).port;
  });

  afterEach(async () => {
    await rx.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** A welcomed stream whose first RECORDS_SENT 1 MiB records overflow the log. */
  async function overflow(): Promise<RawPeer> {
    const p = await peer(port);
    hello(p, '0123456789abcdef');
    await until('WELCOME', () => p.got.some((m) => m.type === MsgType.Welcome));
    const w = p.got.find((m) => m.type === MsgType.Welcome)!;
    assert.ok(w.type === MsgType.Welcome && w.storedFromSeq === 1, 'a fresh log: references from record 1 on');
    for (let seq = 1; seq <= RECORDS_SENT; seq++) {
      p.send({ type: MsgType.Record, seq, recordType: 1, flags: 0, offsetBytes: (seq - 1) * MIB, lengthBytes: MIB, payload: Buffer.alloc(MIB, seq) });
    }
    await until('the records dropped', () => (rx.stats().mirrors[0]?.recordsDropped ?? 0) === RECORDS_SENT - (rx.stats().mirrors[0]?.recordsStored ?? 0) && (rx.stats().mirrors[0]?.recordsStored ?? 0) > 0);
    return p;
  }

  it('once a record is dropped the acks name no record as referable; a reference to one ends the connection without a refusal', async () => {
    const p = await overflow();
    const st = rx.stats().mirrors[0]!;
    assert.ok(st.recordsStored >= 10 && st.recordsStored < RECORDS_SENT, `stored ${st.recordsStored} of ${RECORDS_SENT} 1 MiB records in a 16 MiB log`);
    const firstDropped = st.recordsStored + 1;
    assert.equal(st.droppingFromSeq, firstDropped, 'the receiver\'s status says its log drops records, from which one');
    assert.match(formatReceiver('/rx', rx.stats()), new RegExp(`\\(${st.recordsStored} records stored, ${st.recordsDropped} dropped\\); FULL: dropping records from seq ${firstDropped} until a CP covers them`));
    // A connection that has not said HELLO is not a source (the header said "2 source(s) connected" beside "source connected").
    assert.match(formatReceiver('/rx', rx.stats()), /^receiver {3}\/rx, 1 source\(s\) connected\n/);
    const bare = net.connect(port, '127.0.0.1');
    await until('the bare connection counted', () => rx.stats().connections === 2);
    assert.match(formatReceiver('/rx', rx.stats()), /^receiver {3}\/rx, 1 source\(s\) connected, 1 other connection\(s\) \(in a handshake, or refused\)\n/);
    bare.destroy();
    await until('an ack after the drop', () => acks(p).some((a) => a.storedFromSeq === NO_REFERENCES_FROM_SEQ));
    const last = acks(p).at(-1)!;
    assert.equal(last.storedFromSeq, NO_REFERENCES_FROM_SEQ, 'the newest ack still names no record as referable');
    assert.equal(last.heldSeq, firstDropped - 1, 'held stops before the first dropped record');
    for (const a of acks(p)) assert.ok(a.storedFromSeq === 1 || a.storedFromSeq === NO_REFERENCES_FROM_SEQ, `ack storedFromSeq ${a.storedFromSeq}`);

    // A baseline (the mirror holds no CP) referencing a stored record, then a dropped one.
    p.send({ type: MsgType.CpBegin, cp: 1, baseCp: -1, kind: 'resync' });
    p.send({ type: MsgType.CpRefs, cp: 1, refs: [{ pba: 1000, seq: 1, index: 0, crc: crcOf(1) }] });
    p.send({ type: MsgType.CpRefs, cp: 1, refs: [{ pba: 1001, seq: firstDropped, index: 0, crc: crcOf(firstDropped) }] });
    await p.closed;
    assert.equal(p.got.filter((m) => m.type === MsgType.Refuse).length, 0, 'the source was refused for a record the destination dropped');
    assert.ok(lines.some((l) => /a CP referenced a record the log dropped/.test(l) && l.includes(`"seq":${firstDropped}`)), 'the receiver says why the connection ended');
    assert.ok(!lines.some((l) => /mirror stream refused/.test(l)), 'logged as a refusal');
    await until('the session gone', () => rx.stats().mirrors.every((m) => !m.connected));
    assert.equal(rx.stats().mirrors[0]!.committedCp, -1, 'the committed image moved');
    assert.match(rx.stats().mirrors[0]!.lastError ?? '', /^$|dropped/, 'no refusal recorded as the mirror\'s last error');

    // The next connection (same process: its records stay its own) is welcomed.
    const q = await peer(port);
    hello(q, '0123456789abcdef');
    await until('WELCOME again', () => q.got.some((m) => m.type === MsgType.Welcome || m.type === MsgType.Refuse));
    const w = q.got[0]!;
    assert.equal(w.type, MsgType.Welcome, `answered ${JSON.stringify(w)}`);
    assert.ok(w.type === MsgType.Welcome && w.storedFromSeq !== NO_REFERENCES_FROM_SEQ, 'a new stream starts with an undropped log');
    q.destroy();
  });

  it('a reference to a record never sent is still refused', async () => {
    const p = await overflow();
    const st = rx.stats().mirrors[0]!;
    p.send({ type: MsgType.CpBegin, cp: 1, baseCp: -1, kind: 'resync' });
    p.send({ type: MsgType.CpRefs, cp: 1, refs: [{ pba: 1001, seq: RECORDS_SENT + 5, index: 0, crc: crcOf(1) }] });
    await p.closed;
    const refuse = p.got.find((m) => m.type === MsgType.Refuse);
    assert.ok(refuse && refuse.type === MsgType.Refuse, `no REFUSE after a reference to record ${RECORDS_SENT + 5}, never sent (stored ${st.recordsStored})`);
    assert.match(refuse.reason, new RegExp(`reference to record ${RECORDS_SENT + 5} is not in the log`));
    assert.equal(rx.stats().mirrors[0]!.committedCp, -1);
  });
});

