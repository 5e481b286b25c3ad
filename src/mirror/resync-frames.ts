/**
 * The frames of a resync or a baseline (source side): the blocks the walk of a pinned
 * CP yields (tree/born-after.ts) go out in CP_BLOCKS frames of up to BLOCKS_PER_FRAME_MAX
 * blocks, their data as views of the walk's read buffers (never copied), and metadata
 * deltas in CP_DELTAS frames; source.ts's sendResync drives it and sends the commit.
 *
 * Invariants:
 * - Blocks go out in the walk's order, each frame's pbas with the crc32c the walk checked
 *   the block against (the frame's checksum is combined from them).
 * - A run's read buffer goes back to the walk (its release) only once the link has taken
 *   every frame with a view of it: frames are numbered as sent and the link calls back,
 *   in order, once each is written; after end() no buffer is given back (the walk and its
 *   pool are gone, so nothing reuses one still lent).
 * - Bounded: at most one frame of blocks and one of deltas are being filled; a frame goes
 *   out only when the link has room (and --mirror-rate allows: the limiter).
 */
import type { RateLimiter } from '../util/rate';
import { assert } from '../util/assert';
import { BLOCKS_PER_FRAME_MAX, DELTAS_PER_FRAME_MAX, DELTAS_RAW_MAX_BYTES, MsgType, deltaEntryBytes, type CpDelta, type OutMessage } from './wire';
import type { BlockPtr } from '../tree/layout';

/** A CP_BLOCKS frame whose data are views of the walk's buffers. */
export interface LentBlocks {
  type: MsgType.CpBlocks;
  cp: number;
  pbas: number[];
  data: Buffer[];
  crcs: number[];
}

/** What the frames need of the connection. */
export interface ResyncLink {
  /** The connection is gone: nothing more is sent (the walk stops at its next block). */
  readonly closed: boolean;
  /** Resolves when the link's queue has room for another frame (or the connection is gone). */
  waitRoom(): Promise<void>;
  send(m: OutMessage): void;
  /** Sends a frame of views; `written` is called once the link no longer reads them, frames in send order. */
  sendLent(m: LentBlocks, written: () => void): void;
}

const EMPTY = Buffer.alloc(0);

/**
 * On a Node socket (the event-loop link): `written` once everything written before is
 * written, by an empty write's callback; never when that write fails. Node calls the
 * callbacks of writes still buffered at a destroy with an error at once, and the one
 * libuv was writing later, when it completes: called for those, `written` would come out
 * of order and give back a buffer libuv may still be sending from. A link that fails
 * gives nothing back; the walk reads into fresh buffers and ends at its next block.
 */
export function afterSocketWrites(socket: { write(b: Buffer, cb: (err?: Error | null) => void): boolean }, written: () => void): void {
  socket.write(EMPTY, (err) => {
    if (!err) written();
  });
}

export class ResyncFrames {
  private pbas: number[] = [];
  private crcs: number[] = [];
  private data: Buffer[] = [];
  private deltas: CpDelta[] = [];
  private deltaBytes = 0;
  private framesSent = 0;
  private framesWritten = 0;
  /** Runs whose buffers the frames up to `upTo` view, oldest first. */
  private readonly held: Array<{ upTo: number; release: () => void }> = [];
  private ended = false;

  constructor(
    private readonly cp: number,
    private readonly link: ResyncLink,
    private readonly o: {
      limiter?: RateLimiter | undefined;
      /** Blocks sent as data in a frame (progress, counters). */
      blocksSent: (n: number) => void;
      /** Blocks sent as deltas in a frame. */
      deltasSent: (n: number) => void;
    },
  ) {}

  /**
   * Blocks ptrs[from..] of a run (buf holds them all, ptrs.length x 4 KiB) go into frames;
   * `release` gives its buffer back once every frame viewing it is written.
   */
  async addRun(ptrs: readonly BlockPtr[], buf: Buffer, from: number, release: () => void): Promise<void> {
    let k = from;
    while (k < ptrs.length) {
      const take = Math.min(ptrs.length - k, BLOCKS_PER_FRAME_MAX - this.pbas.length);
      assert(take > 0, 'a full frame left unsent');
      for (let i = k; i < k + take; i++) {
        this.pbas.push(ptrs[i]!.pba);
        this.crcs.push(ptrs[i]!.crc);
      }
      this.data.push(buf.subarray(k * 4096, (k + take) * 4096));
      k += take;
      if (this.pbas.length === BLOCKS_PER_FRAME_MAX) await this.flushBlocks();
    }
    // Its last blocks are in the frame being filled, or in the last one sent.
    this.held.push({ upTo: this.pbas.length > 0 ? this.framesSent + 1 : this.framesSent, release });
    this.written(this.framesWritten);
  }

  /** A metadata block as a delta (a CP_DELTAS frame goes out when the next one would not fit). */
  async addDelta(d: CpDelta): Promise<void> {
    if (this.deltas.length >= DELTAS_PER_FRAME_MAX || this.deltaBytes + deltaEntryBytes(d) > DELTAS_RAW_MAX_BYTES) await this.flushDeltas();
    this.deltas.push(d);
    this.deltaBytes += deltaEntryBytes(d);
  }

  /** Sends what is being filled. */
  async flush(): Promise<void> {
    await this.flushBlocks();
    await this.flushDeltas();
  }

  /** No buffer is given back from now on (the walk is over). */
  end(): void {
    this.ended = true;
    this.held.length = 0;
  }

  private async flushBlocks(): Promise<void> {
    if (this.pbas.length === 0) return;
    // The frame leaves the batch whatever happens (a dropped connection ends the walk at its next block).
    const m: LentBlocks = { type: MsgType.CpBlocks, cp: this.cp, pbas: this.pbas, data: this.data, crcs: this.crcs };
    const n = m.pbas.length;
    this.pbas = [];
    this.crcs = [];
    this.data = [];
    await this.o.limiter?.take(n * 4096);
    await this.link.waitRoom();
    if (this.link.closed) return;
    const no = ++this.framesSent;
    this.link.sendLent(m, () => this.written(no));
    this.o.blocksSent(n);
  }

  private async flushDeltas(): Promise<void> {
    if (this.deltas.length === 0) return;
    const group = this.deltas;
    const bytes = this.deltaBytes;
    this.deltas = [];
    this.deltaBytes = 0;
    await this.o.limiter?.take(bytes);
    await this.link.waitRoom();
    if (this.link.closed) return;
    this.link.send({ type: MsgType.CpDeltas, cp: this.cp, deltas: group });
    this.o.deltasSent(group.length);
  }

  /** Frames up to `n` are written: the runs they viewed go back to the walk. */
  private written(n: number): void {
    if (this.ended) return;
    assert(n >= this.framesWritten, 'frames are written in order');
    this.framesWritten = n;
    while (this.held.length > 0 && this.held[0]!.upTo <= this.framesWritten) this.held.shift()!.release();
  }
}
