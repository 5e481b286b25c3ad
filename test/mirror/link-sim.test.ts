/**
 * The mirror over a seeded in-memory link: a source (its engine volume) and `receive`
 * in this process, joined through the network seam (MirrorSourceOptions.dial,
 * MirrorReceiver.accept) by a pair of streams that a seed drives. Every chunk either side
 * writes is split at seeded offsets and each piece delivered after a seeded delay, in
 * order; a link may be cut after a seeded number of bytes toward either side, or flip one
 * bit in a seeded share of its pieces toward the receiver; the workload cuts links too.
 * The workload's draws are a function of the seed; a link's draw from a stream of their
 * own (seed, link number), but how its bytes come in chunks depends on timing: a seed
 * replays the same workload and link faults, not the same interleaving.
 * (The namespace suites run the same over real TCP with whole processes; this one reaches
 * every frame boundary and a cut at any byte, quickly, and prints the seed.)
 *
 * Under seeded writes, trims, FLUSHes and CPs (policy available: writes go on while the
 * link is down), the source must keep serving; once links are clean again it must
 * converge: in sync, roots equal, and the mirror's committed image, read back from its
 * member through verified reads, byte-identical to the source's volume. A flipped bit is
 * refused by the receiver (the frame's checksum) and never reaches the committed image.
 * A failure names the seed (NVMIRROR_SEED=... reruns it).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import type * as net from 'net';
import { Duplex } from 'stream';
import pino from 'pino';
import { MirrorReceiver } from '../../src/mirror/receiver';
import { MirrorSource } from '../../src/mirror/source';
import { MEMBER_NAME, newestSuperblock } from '../../src/mirror/mirror-dir';
import { createVolumeDir, openVolumeDir, type OpenedVolumeDir } from '../../src/volume/dir';
import { FileBlockDevice } from '../../src/io/file-device';
import { BlockTree } from '../../src/tree/tree';
import { SeededRandom } from '../../src/sim/random';
import { until } from './helpers';

const MIB = 1024 * 1024;
const VOLUME_BYTES = 32 * MIB;
const OPS = 160;
const CONVERGE_MS = 30_000;
/** The first links dialed are faulty (each redial waits longer: the source's backoff doubles up to 5 s). */
const FAULTY_LINKS_MAX = 4;
/** Links the workload cuts at most. */
const WORKLOAD_CUTS_MAX = 6;
/** How long the workload goes on for the faulty links to be dialed. */
const FAULTS_WAIT_MS = 10_000;

interface LinkFaults {
  /** Cut the link once this many bytes went toward the receiver / the source (undefined: never). */
  cutToReceiverAfter?: number;
  cutToSourceAfter?: number;
  /** Share of the pieces toward the receiver with one bit flipped. */
  flipShare: number;
}

/** One direction of a link: pieces delivered in order after seeded delays. */
class Direction {
  bytes = 0;
  private lastAt = 0;
  constructor(private readonly rnd: SeededRandom, private readonly to: () => Duplex, private readonly cutAfter: number | undefined, private readonly flipShare: number, private readonly cut: () => void) {}

  send(chunk: Buffer, done: () => void): void {
    let at = 0;
    while (at < chunk.length) {
      const n = Math.min(chunk.length - at, 1 + this.rnd.int(Math.max(1, Math.min(chunk.length, 96 * 1024))));
      let piece = Buffer.from(chunk.subarray(at, at + n));
      at += n;
      if (this.cutAfter !== undefined && this.bytes + piece.length >= this.cutAfter) {
        piece = piece.subarray(0, Math.max(0, this.cutAfter - this.bytes));
        this.deliver(piece, () => this.cut());
        this.bytes = this.cutAfter;
        done();
        return;
      }
      if (this.flipShare > 0 && piece.length > 0 && this.rnd.next() < this.flipShare) {
        const i = this.rnd.int(piece.length);
        piece[i] = piece[i]! ^ (1 << this.rnd.int(8));
      }
      this.bytes += piece.length;
      this.deliver(piece, at >= chunk.length ? done : undefined);
    }
  }

  /** The writer ended: end of stream for the reader, after every piece before it. */
  end(): void {
    this.deliver(null);
  }

  /** Pieces on their way, oldest first, each with when it arrives. */
  private readonly queue: Array<{ piece: Buffer | null; dueMs: number; then: (() => void) | undefined }> = [];
  private pumping = false;

  /** Delivers after a seeded delay (0-2 ms), never ahead of an earlier piece (null: end of stream). */
  private deliver(piece: Buffer | null, then?: () => void): void {
    this.lastAt = Math.max(this.lastAt, Date.now() + (this.rnd.next() < 0.7 ? 0 : this.rnd.int(3)));
    this.queue.push({ piece, dueMs: this.lastAt, then });
    if (!this.pumping) {
      this.pumping = true;
      setImmediate(() => this.pump());
    }
  }

  /** One timer at a time for the oldest piece: the pieces leave in the order they came. */
  private pump(): void {
    const now = Date.now();
    while (this.queue.length > 0 && this.queue[0]!.dueMs <= now) {
      const { piece, then } = this.queue.shift()!;
      const d = this.to();
      if (!d.destroyed && (piece === null || piece.length > 0)) d.push(piece);
      then?.();
    }
    if (this.queue.length === 0) {
      this.pumping = false;
      return;
    }
    setTimeout(() => this.pump(), Math.max(1, this.queue[0]!.dueMs - now));
  }
}

/** A pair of connected in-memory streams shaped like sockets (remoteAddress, 'connect'). */
function simLink(rnd: SeededRandom, faults: LinkFaults): { source: net.Socket; receiver: net.Socket; cut: () => void } {
  let a!: Duplex;
  let b!: Duplex;
  let cutDone = false;
  const cut = (): void => {
    if (cutDone) return;
    cutDone = true;
    a.destroy(new Error('link cut'));
    b.destroy(new Error('link cut'));
  };
  const toReceiver = new Direction(rnd, () => b, faults.cutToReceiverAfter, faults.flipShare, cut);
  const toSource = new Direction(rnd, () => a, faults.cutToSourceAfter, 0, cut);
  // One end writes into `out`. writev: what the writer queued meanwhile goes as one chunk
  // (a socket's writes coalesce too).
  const end = (out: Direction): Duplex => new Duplex({
    write: (chunk: Buffer, _e, cb) => out.send(chunk, () => cb()),
    writev: (chunks, cb) => out.send(Buffer.concat(chunks.map((c) => c.chunk as Buffer)), () => cb()),
    read: () => undefined,
    final: (cb) => {
      out.end();
      cb();
    },
  });
  a = end(toReceiver);
  b = end(toSource);
  for (const d of [a, b]) {
    Object.assign(d, { remoteAddress: 'sim', remotePort: 0 });
    d.on('error', () => undefined);
    // One end destroyed (a side dropping its connection) closes the other, as a socket's peer sees it.
    d.on('close', cut);
  }
  return { source: a as unknown as net.Socket, receiver: b as unknown as net.Socket, cut };
}

describe('mirror over a seeded in-memory link (the network seam)', function () {
  this.timeout(120_000);
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-linksim-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  const env = process.env.NVMIRROR_SEED;
  const seeds = env !== undefined ? [Number(env)] : [7, (Date.now() % 1_000_000) + 8];
  for (const seed of seeds) {
    it(`seed ${seed}: splits, delays, cuts and flipped bits on the link; the source serves throughout and the mirror converges byte-identical`, async () => {
      const rnd = new SeededRandom(seed);
      const lines: string[] = [];
      const logger = pino({ level: 'info' }, { write: (s: string) => void lines.push(s) });
      const srcDir = path.join(tmp, 'src');
      const rxDir = path.join(tmp, 'rx');
      fs.mkdirSync(rxDir);
      await createVolumeDir(srcDir, { sizeBytes: VOLUME_BYTES, nvramSizeBytes: 4 * MIB });
      const rx = new MirrorReceiver({ dir: rxDir, logger: logger.child({ side: 'receiver' }) });
      let clean = false;
      let links = 0;
      let flipsOn = 0;
      let current: ReturnType<typeof simLink> | undefined;
      let faultyLinks = 0;
      let cuts = 0;
      const dial = (): net.Socket => {
        links++;
        // Each link draws from its own stream (seed, link number): the workload's draws
        // stay the same whatever the timing; the link's own depend on how its bytes come.
        const lrnd = new SeededRandom((seed * 7919 + links) >>> 0);
        const faulty = !clean && faultyLinks < FAULTY_LINKS_MAX;
        if (faulty) faultyLinks++;
        const faults: LinkFaults = { flipShare: 0 };
        if (faulty) {
          // Each kind at least once: cut toward the receiver, flipped bits, cut toward the source, then any.
          const kind = faultyLinks <= 3 ? faultyLinks - 1 : lrnd.int(3);
          if (kind === 0) faults.cutToReceiverAfter = 1 + lrnd.int(MIB);
          else if (kind === 2) faults.cutToSourceAfter = 1 + lrnd.int(4096);
          else {
            faults.flipShare = 0.05;
            flipsOn++;
          }
        }
        const l = simLink(lrnd, faults);
        current = l;
        rx.accept(l.receiver);
        setImmediate(() => l.source.emit('connect'));
        return l.source;
      };
      const source = new MirrorSource({
        dir: srcDir, peer: { host: 'sim', port: 1 }, mode: 'sync', policy: 'available', logger: logger.child({ side: 'source' }),
        link: { mirrorInsecure: true }, stallTimeoutMs: 8000, dial,
      });
      let vol: OpenedVolumeDir | undefined;
      const where = `seed ${seed} (NVMIRROR_SEED=${seed})`;
      try {
        vol = await openVolumeDir(srcDir, { readOnly: false, control: false, cpIntervalMs: 0, beforeRecovery: (t) => source.attachTree(t) });
        source.attachVolume(vol.volume);
        const v = vol.volume;
        // OPS operations, then more (same kinds) until every faulty link was dialed: the
        // source redials after a backoff, so the faults take a few seconds of writing.
        const t0 = Date.now();
        for (let op = 0; op < OPS || (faultyLinks < FAULTY_LINKS_MAX && Date.now() - t0 < FAULTS_WAIT_MS); op++) {
          const r = rnd.next();
          const off = rnd.int(VOLUME_BYTES / 4096 - 16) * 4096;
          if (r < 0.7) {
            const len = (1 + rnd.int(16)) * 4096;
            const data = Buffer.alloc(len);
            for (let i = 0; i < len; i += 4) data.writeUInt32LE((seed * 2654435761 + op * 40503 + i) >>> 0, i);
            await v.write(off, data, rnd.next() < 0.05);
          } else if (r < 0.78) {
            await v.trim(off, (1 + rnd.int(8)) * 4096, false);
          } else if (r < 0.86) {
            await v.flush();
          } else if (r < 0.95) {
            await v.checkpoint();
          } else if (cuts < WORKLOAD_CUTS_MAX) {
            cuts++;
            current?.cut();
          }
          if (rnd.next() < 0.3 || op >= OPS) await new Promise((res) => setTimeout(res, rnd.int(3)));
        }
        // Clean links from here on: the mirror must converge.
        clean = true;
        current?.cut();
        await v.checkpoint();
        const cpNow = (): number => source.stats().sourceCp;
        await until(`${where}: in sync with equal roots`, () => {
          const s = source.stats();
          return s.state === 'in-sync' && s.rootsEqual && s.destCp === cpNow();
        }, CONVERGE_MS).catch((e: unknown) => {
          throw new Error(`${e instanceof Error ? e.message : String(e)}; source ${JSON.stringify(source.stats())}; log tail:\n${lines.slice(-15).join('')}`);
        });
        const want = await v.read(0, VOLUME_BYTES);
        // The mirror's committed image from its member, read through verified reads.
        const uuid = v.tree.volumeUuid;
        const member = await FileBlockDevice.open(path.join(rxDir, uuid, MEMBER_NAME), { readOnly: true });
        try {
          const found = await newestSuperblock(member, uuid);
          assert.ok(found, `${where}: the mirror has no committed CP`);
          assert.equal(found.sb.cpNumber, source.stats().sourceCp, `${where}: the mirror's committed CP`);
          const view = await BlockTree.openView(member, found.raw);
          const got = Buffer.alloc(VOLUME_BYTES);
          try {
            await view.readRange(0, VOLUME_BYTES / 4096, got);
          } finally {
            await view.close();
          }
          assert.ok(got.equals(want), `${where}: the mirror's image differs from the source's volume`);
        } finally {
          await member.close();
        }
        const connected = lines.filter((l) => /"msg":"mirror connected"/.test(l)).length;
        const refusedStream = lines.filter((l) => /checksum/.test(l) && /"side":"receiver"/.test(l)).length;
        process.stdout.write(`      ${where}: ${links} links dialed (${faultyLinks} faulty, ${flipsOn} flipping bits), ${connected} welcomed, ${refusedStream} receiver log lines on checksums, converged at CP ${source.stats().sourceCp}\n`);
        assert.ok(links > FAULTY_LINKS_MAX && faultyLinks === FAULTY_LINKS_MAX && flipsOn >= 1, `${where}: only ${links} links, ${faultyLinks} faulty, ${flipsOn} flipping bits: the faults did not run`);
      } finally {
        await vol?.close();
        await source.stop();
        source.detach();
        await rx.close();
      }
    });
  }
});
