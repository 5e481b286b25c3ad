/**
 * Applying a source's CPs to its mirror directory: the receiver's half of CP shipping
 * (receiver-session.ts hands each CP frame here, in stream order).
 *
 *   CP_BEGIN     checks the base (the mirror's committed CP, or -1: a baseline), marks a
 *                baseline partial
 *   CP_BLOCKS    blocks as sent, written at their pbas
 *   CP_REFS      blocks the mirror's log holds (seed 003), written from the log's mapping
 *   CP_DELTAS    metadata blocks rebuilt from the committed block they replace (delta.ts)
 *   CP_COMMIT    every write done and synced, then the superblock (mirror-dir.ts)
 *   CP_ABORT     an async CP abandoned: its staged blocks dropped, the committed CP stays
 *
 * Invariants:
 * - A CP is applied only on top of its base CP (refused otherwise, before any write), and
 *   committed only when every block it announced was written, synced, and its superblock
 *   verifies for this source: the committed image changes only by a whole, verified CP.
 * - A reference to a record the log dropped (ring full) ends the connection as a
 *   DroppedRecordError, not a refusal (the source could not know yet); any other
 *   reference to a record the log lacks is a protocol error.
 * - Every block is checked before it is staged: a reference against the crc32c the log
 *   computed when its record arrived, a rebuilt block against the crc32c the source sent,
 *   and its pba against the blocks the committed CP (and the CPs readers pin) use
 *   (MirrorDir.checkWritable).
 * - A referenced block is written from the log's mapping (a view, not a copy): every write
 *   of a CP completes before the CP commits and the log releases the records it covers.
 * - Bounded: at most RUNS_OPEN_MAX staged runs (<= COMBINE_BLOCKS_MAX blocks each, views
 *   of their frames' slabs, held until written) and APPLY_WRITES_MAX writes in flight.
 */
import type { Logger } from 'pino';
import { crc32cWide } from '../io/native';
import { allocAligned } from '../io/aligned';
import { assert } from '../util/assert';
import type { Slicer } from '../util/work';
import type { Superblock } from '../tree/layout';
import { MirrorProtocolError, type CpAbort, type CpBegin, type CpBlocks, type CpCommit, type CpDelta, type CpDeltas, type CpKind, type CpRefs } from './wire';
import { APPLY_WRITES_MAX, BASELINE_PROGRESS_BLOCKS, type MirrorDir } from './mirror-dir';
import type { MirrorExports } from './exports';
import { applyDeltaInPlace, DELTA_FROM_ZEROES } from './delta';
import { BlockSlots, type FrameSlab, type SlabPool } from './slab-pool';

/** Delta bases read in one call at most (a 256 KiB scratch buffer per connection). */
const BASE_READ_BLOCKS_MAX = 64;
/** Blocks between two delta bases read along with them rather than in a second call. */
const BASE_READ_GAP_MAX = 4;
/** Largest combined write while applying a CP (1 MiB). */
const COMBINE_BLOCKS_MAX = 256;
/** Staged runs open at once while applying a CP (stage()): at most 8 x 1 MiB of views. */
const RUNS_OPEN_MAX = 8;

/**
 * A CP referenced a record this log had to drop (its ring was full). Not the source's
 * fault: it learns of the drop from the next RECORD_ACK (storedFromSeq) and may have
 * referenced the record before that arrived. The connection ends without a refusal; the
 * next one resyncs from the committed CP, which never moved.
 */
export class DroppedRecordError extends Error {
  constructor(readonly cp: number, readonly seq: number) {
    super(`CP ${cp} references record ${seq}, which this mirror's log dropped while its ring was full: the connection ends and the source resyncs`);
    this.name = 'DroppedRecordError';
  }
}

/** Physically contiguous blocks staged for one write (views of their frames' slabs). */
interface StagedRun {
  pba: number;
  blocks: number;
  parts: Buffer[];
  slabs: FrameSlab[];
  reread: boolean;
}

interface Applying {
  cp: number;
  baseCp: number;
  kind: CpKind;
  blocks: number;
}

export class CpApplier {
  private applying: Applying | undefined;
  private writesInFlight = 0;
  private writeWaiters: Array<() => void> = [];
  /** Staged runs being combined, oldest first (at most RUNS_OPEN_MAX; see stage()). */
  private runs: StagedRun[] = [];
  /** Where runs of delta bases are read (BASE_READ_BLOCKS_MAX blocks; made on the first CP_DELTAS). */
  private baseScratch: Buffer | undefined;
  private writeError: Error | undefined;
  /**
   * The baseline's progress record being made durable (a member sync, then the marker)
   * behind the stream: blocks keep arriving and being written meanwhile. At most one at a
   * time; whatever changes the baseline state (a CP_BEGIN, the commit) or ends the session
   * waits for it first. Its failure becomes writeError.
   */
  private progress: Promise<void> | undefined;

  /** slicer: the session's (a CP's frames yield to the loop so records and their acks get through). */
  constructor(
    private readonly mirror: MirrorDir,
    private readonly slabs: SlabPool,
    private readonly exports: MirrorExports | undefined,
    private readonly slicer: Slicer,
    private readonly log: Logger,
  ) {}

  /** A baseline or resync being applied (blocks received so far); undefined between them and during ordinary CPs. */
  catchUp(): { cp: number; baseCp: number; blocks: number } | undefined {
    const a = this.applying;
    return a && a.kind !== 'cp' ? { cp: a.cp, baseCp: a.baseCp, blocks: a.blocks } : undefined;
  }

  /** CP_BEGIN: refused unless it builds on the committed CP (or starts a baseline, or resumes the one in progress). */
  async begin(m: CpBegin): Promise<void> {
    const mirror = this.mirror;
    if (this.applying) throw new MirrorProtocolError(`CP ${m.cp} begins while CP ${this.applying.cp} is being applied`);
    await this.settled();
    if (m.kind === 'resume') {
      const r = mirror.baselineResume;
      if (!r || r.cp !== m.cp) throw new MirrorProtocolError(`resume of a baseline toward CP ${m.cp}, but this mirror has ${r ? `one toward CP ${r.cp}` : 'none'} in progress`);
      this.log.info({ cp: m.cp, blocks: r.blocks }, 'baseline resumed');
      this.applying = { cp: m.cp, baseCp: -1, kind: m.kind, blocks: r.blocks };
      return;
    }
    if (m.baseCp !== mirror.committedCp && m.baseCp !== -1) {
      throw new MirrorProtocolError(`CP ${m.cp} is built on CP ${m.baseCp}, but this mirror holds CP ${mirror.committedCp}`);
    }
    if (m.cp <= mirror.committedCp) throw new MirrorProtocolError(`CP ${m.cp} is not newer than the committed CP ${mirror.committedCp}`);
    if (m.baseCp === -1) {
      if (mirror.committedCp !== -1) this.log.warn({ cp: m.cp, committedCp: mirror.committedCp }, 'full baseline over an older image: the mirror is inconsistent until it completes');
      await mirror.setBaselinePartial(m.cp, 0);
      this.exports?.invalidate(mirror.label.sourceUuid);
    }
    this.applying = { cp: m.cp, baseCp: m.baseCp, kind: m.kind, blocks: 0 };
  }

  /** CP_BLOCKS: the blocks as sent (views of the frame's slab, held by the runs that write them). */
  async blocks(m: CpBlocks): Promise<void> {
    const mirror = this.mirror;
    const a = this.checkApplying(m.cp);
    // Coalesce physically contiguous blocks into one write.
    let i = 0;
    while (i < m.pbas.length) {
      let j = i + 1;
      while (j < m.pbas.length && m.pbas[j] === m.pbas[j - 1]! + 1) j++;
      await this.stage(m.pbas[i]!, m.data.subarray(i * 4096, j * 4096), m.slab);
      i = j;
    }
    const before = a.blocks;
    a.blocks += m.pbas.length;
    mirror.blocksApplied += m.pbas.length;
    const crossed = !this.progress && Math.floor(a.blocks / BASELINE_PROGRESS_BLOCKS) > Math.floor(before / BASELINE_PROGRESS_BLOCKS);
    if (crossed && a.baseCp === -1) {
      // Every block up to here written (not yet synced), then the sync and the record
      // run behind the stream: the baseline does not stop for the disk (it stopped for
      // ~40% of its time when it waited here).
      await this.flushRuns();
      await this.waitWrites(0);
      if (this.writeError) throw this.writeError;
      this.behindStream(mirror.baselineProgress(a.cp, a.blocks));
    } else if (crossed && a.kind === 'resync') {
      // A resync records no progress (it restarts from its base), but its blocks are
      // synced behind the stream too: the commit's sync then has only the tail left,
      // instead of stopping the stream for all of it.
      this.behindStream(mirror.syncBlocks());
    }
  }

  /** CP_REFS: blocks of records the log holds. */
  async refs(m: CpRefs): Promise<void> {
    const mirror = this.mirror;
    const a = this.checkApplying(m.cp);
    // Each referenced block is written from the log's mapping, not copied: the log
    // releases records only at the commit, after every write of the CP completed
    // (commit()), and a new stream of this source starts only once the session's writes
    // are done (Session.release()). Each is checked against the crc32c the log computed
    // when the record arrived; all are checked before any is staged.
    const views: Buffer[] = [];
    for (const r of m.refs) {
      if (mirror.log.dropped(r.seq)) throw new DroppedRecordError(m.cp, r.seq);
      const v = mirror.log.blockView(r.seq, r.index, r.crc);
      if (typeof v === 'string') throw new MirrorProtocolError(`CP ${m.cp}: reference to ${v}`);
      views.push(v);
    }
    for (let i = 0; i < m.refs.length; i++) {
      await this.stage(m.refs[i]!.pba, views[i]!);
      if ((i & 63) === 63) await this.slicer.maybeYield();
    }
    a.blocks += m.refs.length;
    mirror.refsApplied += m.refs.length;
  }

  /** CP_DELTAS: metadata blocks rebuilt from the committed blocks they replace, each checked against the source's crc32c. */
  async deltas(m: CpDeltas): Promise<void> {
    const mirror = this.mirror;
    const a = this.checkApplying(m.cp);
    const slots = new BlockSlots(this.slabs, m.deltas.length);
    try {
      await this.readBases(m.deltas, slots);
      for (let i = 0; i < m.deltas.length; i++) {
        const d = m.deltas[i]!;
        const b = slots.block(i);
        const why = applyDeltaInPlace(b, d.delta);
        if (why !== undefined) throw new MirrorProtocolError(`CP ${m.cp}: delta for pba ${d.pba}: ${why}`);
        const crc = crc32cWide(b);
        if (crc !== d.crc) throw new MirrorProtocolError(`CP ${m.cp}: block at pba ${d.pba} rebuilt from pba ${d.prevPba} has crc ${crc.toString(16)}, the source says ${d.crc.toString(16)}`);
      }
      // Metadata blocks: the next CP's deltas read them as their bases, so they stay in the page cache.
      for (let i = 0; i < m.deltas.length; i++) {
        await this.stage(m.deltas[i]!.pba, slots.block(i), slots.slabOf(i), true);
        if ((i & 63) === 63) await this.slicer.maybeYield();
      }
    } finally {
      slots.release();
    }
    a.blocks += m.deltas.length;
    mirror.deltasApplied += m.deltas.length;
  }

  /** CP_COMMIT: every block written and synced, then the superblock; returns it (the caller acknowledges it). */
  async commit(m: CpCommit): Promise<Superblock> {
    const mirror = this.mirror;
    const a = this.checkApplying(m.cp);
    if (m.blockCount !== a.blocks) throw new MirrorProtocolError(`CP ${m.cp}: ${a.blocks} blocks arrived, the commit says ${m.blockCount}`);
    await this.flushRuns();
    await this.waitWrites(0);
    await this.settled();
    if (this.writeError) throw this.writeError;
    const sb = await mirror.applyCommit(m.cp, m.slot, m.superblock);
    mirror.lastError = undefined;
    this.applying = undefined;
    mirror.cpsApplied++;
    this.exports?.committed(mirror);
    this.log.debug({ cp: m.cp, kind: a.kind, blocks: a.blocks }, 'mirror CP committed');
    return sb;
  }

  /** CP_ABORT: an async CP the source abandoned; the mirror stays at its committed CP. */
  async abort(m: CpAbort): Promise<void> {
    const mirror = this.mirror;
    const a = this.checkApplying(m.cp);
    if (a.kind !== 'cp') throw new MirrorProtocolError(`abort of a ${a.kind} toward CP ${m.cp}: only a CP may be abandoned`);
    // Its blocks went to blocks the committed CP does not use (refused as they
    // arrived otherwise); the staged run is dropped, and the writes in flight end
    // before anything that follows (the resync) may write the same blocks.
    this.dropRuns();
    await this.waitWrites(0);
    await this.settled();
    if (this.writeError) throw this.writeError;
    this.applying = undefined;
    mirror.cpsAborted++;
    this.log.info({ cp: m.cp, blocks: a.blocks, committedCp: mirror.committedCp }, 'CP abandoned by the source (async, peer slower than its CPs): the mirror stays at its committed CP');
  }

  /** The session ended: whoever waits for a write slot looks again (the writes in flight still complete). */
  wake(): void {
    const w = this.writeWaiters;
    this.writeWaiters = [];
    for (const f of w) f();
  }

  /** Waits until no write of this applier is in flight and no progress record is being made (Session.release()). */
  async idle(): Promise<void> {
    await this.settled();
    await this.waitWrites(0);
  }

  /**
   * Puts each delta's base (the committed block at prevPba, or zeroes) into its slot. The
   * bases are read in runs of adjacent pbas (a CP allocates its metadata blocks in runs,
   * so the next CP's bases mostly are too): one read per run instead of one per block.
   */
  private async readBases(deltas: readonly CpDelta[], slots: BlockSlots): Promise<void> {
    const order: number[] = [];
    for (let i = 0; i < deltas.length; i++) {
      if (deltas[i]!.prevPba === DELTA_FROM_ZEROES) slots.block(i).fill(0);
      else order.push(i);
    }
    order.sort((x, y) => deltas[x]!.prevPba - deltas[y]!.prevPba);
    const scratch = (this.baseScratch ??= allocAligned(BASE_READ_BLOCKS_MAX * 4096)); // aligned: io/aligned.ts
    let k = 0;
    while (k < order.length) {
      const first = deltas[order[k]!]!.prevPba;
      // The span [first, first + span) covers deltas order[k..end): the next base joins it
      // across a gap of up to BASE_READ_GAP_MAX blocks (read and dropped: a 4 KiB copy
      // costs less than a call to the kernel).
      let end = k + 1;
      let span = 1;
      while (end < order.length) {
        const p = deltas[order[end]!]!.prevPba;
        if (p - (first + span) > BASE_READ_GAP_MAX || p - first + 1 > BASE_READ_BLOCKS_MAX) break;
        span = Math.max(span, p - first + 1);
        end++;
      }
      await this.slicer.maybeYield();
      await this.mirror.readBlocks(first, span, scratch.subarray(0, span * 4096));
      for (let j = k; j < end; j++) {
        const at = (deltas[order[j]!]!.prevPba - first) * 4096;
        scratch.copy(slots.block(order[j]!), 0, at, at + 4096);
      }
      k = end;
    }
  }

  private checkApplying(cp: number): Applying {
    const a = this.applying;
    if (!a || a.cp !== cp) throw new MirrorProtocolError(`blocks for CP ${cp} outside CP_BEGIN/CP_COMMIT`);
    return a;
  }

  /**
   * Stages blocks for writing, combining physically contiguous ones (a CP allocates in
   * runs, but references and deltas arrive one block each, and a walk interleaves a data
   * run with the address blocks that point to it) into writes of up to COMBINE_BLOCKS_MAX
   * blocks. Up to RUNS_OPEN_MAX runs stay open at once, so a block elsewhere does not end
   * the run it interrupts: a resync's ~1,000 single address blocks among its data had cut
   * its writes to ~200 KiB on average (1 MiB with this). A full run is written at once;
   * when a new run needs room, the oldest open one is written.
   */
  private async stage(pba: number, data: Buffer, slab?: FrameSlab, reread = false): Promise<void> {
    // Refused as it arrives, not when the run is flushed.
    const blocks = data.length / 4096;
    const overBase = this.applying !== undefined && this.applying.baseCp !== -1;
    this.mirror.checkWritable(pba, blocks, overBase);
    // A block an older CP's reader still uses: that reader is released before the write is staged.
    if (overBase && this.mirror.pins.mayConflict(pba, blocks)) await this.mirror.pins.resolve(pba, blocks, this.applying!.cp);
    let run = this.runs.find((r) => r.pba + r.blocks === pba);
    if (run && run.blocks + blocks > COMBINE_BLOCKS_MAX) {
      await this.flushRun(run);
      run = undefined;
    }
    if (!run) {
      if (this.runs.length >= RUNS_OPEN_MAX) await this.flushRun(this.runs[0]!);
      run = { pba, blocks: 0, parts: [], slabs: [], reread: false };
      this.runs.push(run);
    }
    run.parts.push(data);
    run.blocks += blocks;
    run.reread ||= reread;
    // The run holds the slab its view is of until its write completes (slab-pool.ts).
    if (slab && !run.slabs.includes(slab)) {
      this.slabs.hold(slab);
      run.slabs.push(slab);
    }
    if (run.blocks === COMBINE_BLOCKS_MAX) await this.flushRun(run);
  }

  /** Writes one staged run (it leaves the open runs first). */
  private async flushRun(run: StagedRun): Promise<void> {
    const i = this.runs.indexOf(run);
    assert(i >= 0, 'flushing a run that is not open');
    this.runs.splice(i, 1);
    await this.write(run.pba, run.parts, run.slabs, run.reread);
  }

  /** Writes every staged run, oldest first. */
  private async flushRuns(): Promise<void> {
    while (this.runs.length > 0) await this.flushRun(this.runs[0]!);
  }

  /** Drops the staged runs unwritten (no I/O has their views: their slabs go back). */
  private dropRuns(): void {
    const runs = this.runs;
    this.runs = [];
    for (const run of runs) for (const sl of run.slabs) this.slabs.release(sl);
  }

  /** Writes a run; the slabs its views are of are released when the write has completed (or failed). */
  private async write(pba: number, data: readonly Buffer[], slabs: readonly FrameSlab[] = [], reread = false): Promise<void> {
    if (this.writeError) throw this.writeError;
    await this.waitWrites(APPLY_WRITES_MAX - 1);
    this.writesInFlight++;
    // writeBlocks refuses a block synchronously, before any I/O starts.
    let io: Promise<void>;
    try {
      io = this.mirror.writeBlocks(pba, data, this.applying !== undefined && this.applying.baseCp !== -1, reread ? { reread } : undefined);
    } catch (e) {
      this.writesInFlight--;
      throw e;
    }
    io.then(
      () => this.writeDone(slabs),
      (e: unknown) => {
        this.writeError = e instanceof Error ? e : new Error(String(e));
        this.writeDone(slabs);
      },
    );
  }

  private writeDone(slabs: readonly FrameSlab[]): void {
    for (const sl of slabs) this.slabs.release(sl);
    this.writesInFlight--;
    const w = this.writeWaiters;
    this.writeWaiters = [];
    for (const f of w) f();
  }

  private async waitWrites(max: number): Promise<void> {
    while (this.writesInFlight > max) await new Promise<void>((r) => this.writeWaiters.push(r));
  }

  /** Runs a sync (and progress record) behind the stream; its failure fails the CP being applied. */
  private behindStream(p: Promise<void>): void {
    this.progress = p.then(
      () => { this.progress = undefined; },
      (e: unknown) => {
        this.progress = undefined;
        this.writeError ??= e instanceof Error ? e : new Error(String(e));
      },
    );
  }

  /** Waits for the sync or progress record in flight, if any (its failure is in writeError, thrown by the next step). */
  async settled(): Promise<void> {
    while (this.progress) await this.progress;
  }
}
