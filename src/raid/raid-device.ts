/**
 * RaidDevice: one BlockDevice over several member BlockDevices (geometry.ts), so the
 * block tree above stays unchanged. RAID-0 stripes, RAID-1 mirrors, RAID-4/5/6 keep
 * parity (parity.ts, computed on the thread pool). The head (the tree's superblock ring)
 * is mirrored in every member's label area.
 *
 * Writes (parity levels): blocks are gathered per stripe in a bounded write-back buffer.
 * A stripe whose data blocks are all written is written as a full stripe, its parity
 * computed from the new data only (a call that covers whole stripes skips the buffer:
 * parity straight from the caller's buffer). A stripe still partial at sync() (or when the buffer
 * is full) is completed by reading the rest of its data (read-modify-write, correct but
 * slower; the tree's allocator avoids it by handing a CP whole free stripes and padding
 * the last one). Reads serve buffered blocks from the buffer.
 *
 * Members: online, faulted (an I/O error, a deleted file, a stale label; the reason is
 * kept) or missing (absent at open). A faulted or missing member is never read or
 * written again in this session. Reads of its blocks are rebuilt from the other members;
 * writes go on to the others. Every change of the members' states is written to the
 * labels of the members still online (generation + 1) at the next sync(), before sync()
 * returns, so a member that missed writes is known to be stale at the next open.
 *
 * Invariants:
 * - Never returns data it cannot vouch for: a block that cannot be read or rebuilt is an
 *   error (VolumeError EIO), never zeroes or a guess.
 * - Once more members are lost than the level tolerates (`failure` set), every write and
 *   sync is refused with one clear error: the volume is read-only; reads go on for what
 *   can still be read or rebuilt.
 * - A stripe's data and parity (RAID-1: its copies) on disk change only under its stripe
 *   lock, and parity is always computed over the whole stripe (the head's striped
 *   positions count as zeroes).
 * - The write-back buffer holds at most pendingBytesMax bytes (a stripe larger than that
 *   is written through at once).
 * - Discards cover whole stripes only and run in the background (at most
 *   DISCARDS_IN_FLIGHT_MAX): a write to a stripe starts only after every discard in
 *   flight over it has finished on every member.
 * - A read-only RaidDevice writes nothing: no self-heal rewrite, no label update.
 * - With a stripe journal (stripe-journal.ts; every read-write open of a RAID-4/5/6
 *   volume or mirror destination has one, journal-file.ts), a partial stripe
 *   is never written to the members before the blocks it will write (new data and the
 *   parity rows they change) are durable in the journal, and the journal batch is
 *   released only after those member writes are synced; its stripes stay locked from the
 *   journal write to the release. replayJournal() runs before the device serves anything.
 * - Rebuild (startRebuild .. finishRebuild): the member being rebuilt ('rebuilding') is
 *   never read, but every write that reaches the members (stripes, head, discards, syncs)
 *   reaches it too, so a stripe written after startRebuild is current on it. A stripe is
 *   marked rebuilt (one byte per stripe) only under its stripe lock, after its unit was
 *   written to the new member whole (by rebuildStripe, or by a stripe write that began
 *   after startRebuild). The new member gets no label until finishRebuild: it counts as
 *   out of service (for the tolerance and in the labels) until then.
 */
import type { BlockDevice } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { assert } from '../util/assert';
import { LogBurst } from '../util/log-burst';
import { log } from '../util/log';
import { VolumeError } from '../util/errors';
import { forEachLimit } from '../util/work';
import { LABEL_COPIES, RaidGeometry, tolerance } from './geometry';
import { encodeRaidLabel, labelSlot } from './label';
import { PARITY_THREAD_POOL, type ParityOps } from './parity';
import { journalBlocksFor, type JournalCell, type JournalStripe, type StripeJournal } from './stripe-journal';

const B = BLOCK_SIZE_BYTES;
/** Default bound of the write-back stripe buffer. */
export const PENDING_BYTES_MAX_DEFAULT = 64 * 1024 * 1024;
/** Discards in flight at once (each covers a run of whole stripes). */
const DISCARDS_IN_FLIGHT_MAX = 64;
/** Member I/Os in flight at once for one request. */
const MEMBER_IO_CONCURRENCY = 8;
/** The lock key of the head (stripe locks are keyed by stripe number >= 0). */
const HEAD_LOCK = -1;

export type MemberState = 'online' | 'faulted' | 'missing' | 'rebuilding';

export interface MemberErrorCounts {
  read: number;
  write: number;
  checksum: number;
  healed: number;
}

export interface MemberStatus {
  index: number;
  name: string;
  state: MemberState;
  reason?: string;
  errors: MemberErrorCounts;
}

/** A rebuild in progress (set by its driver, src/raid/rebuild.ts; shown by status). */
export interface RebuildStatus {
  index: number;
  old: string;
  new: string;
  startedMs: number;
  /** Stripes already rebuilt by an earlier, interrupted run (resumed from there). */
  resumedAtStripe: number;
  /** Stripes in use that are current on the new member (skipped ones included), of those in use at the start. */
  stripesDone: number;
  stripesTotal: number;
  /** Stripes this run rebuilt (read from the others and written). */
  stripesRebuilt: number;
  doneBytes: number;
  totalBytes: number;
  bytesPerSec: number;
  etaSeconds?: number;
  /** The rate limit, if any. */
  rateBytesPerSec?: number;
}

export interface RaidHealth {
  level: number;
  members: number;
  stripeUnitBytes: number;
  /** online: every member in service; degraded: some lost, all data readable; failed: more lost than tolerated (read-only). */
  state: 'online' | 'degraded' | 'failed';
  tolerance: number;
  generation: number;
  failure?: string;
  memberStatus: MemberStatus[];
  /** Stripes written whole from new data, and by read-modify-write, since open. */
  stripeWrites: { full: number; readModifyWrite: number };
  /** Partial stripes written through the stripe journal since open, and journal batches (absent: no journal). */
  journal?: { stripes: number; batches: number; replayedStripes: number };
  /** A read-only open found a batch in the stripe journal that the next read-write open replays (see JournalPending). */
  journalPending?: JournalPending;
  rebuild?: RebuildStatus;
}

/**
 * What a read-only open saw in the stripe journal it cannot replay: the stripes of a
 * batch an interrupted write left (their parity may not match their data until the next
 * read-write open replays it), or why the journal could not be read.
 */
export interface JournalPending {
  stripes: number;
  epoch: number;
  problem?: string;
}

export interface RaidMemberSpec {
  name: string;
  /** null: the member is missing (missingReason says why). */
  dev: BlockDevice | null;
  missingReason?: string;
  /** Set: the member is present but not to be used (stale, truncated, ...). */
  faultReason?: string;
}

export interface RaidDeviceOptions {
  geometry: RaidGeometry;
  volumeUuid: string;
  /** The volume's newest label generation (labels written later carry generation + 1). */
  generation: number;
  members: RaidMemberSpec[];
  readOnly?: boolean;
  /** Which of the members' copies of a head block to serve (default: the first readable). */
  headPick?: (copies: Buffer[]) => number;
  /** Checked at every sync(): a reason the member `index` (now named `name`) must leave service (e.g. its file was deleted), or null. */
  probe?: (index: number, name: string) => Promise<string | null>;
  pendingBytesMax?: number;
  /** Parity work (default: the thread pool; the simulator injects PARITY_INLINE). */
  parity?: ParityOps;
  /** Some member's label names another uuid (see volume/raid-members.ts OpenRaidExtra.formerUuid): relabel every member at the next sync(). */
  relabel?: boolean;
  /** Partial stripes go through this journal before they reach the members (no write hole); replay it with replayJournal() after open. */
  journal?: StripeJournal;
  /** Read-only: the journal batch this open leaves for the next read-write open (shown by health()). */
  journalPending?: JournalPending;
}

interface Member {
  name: string;
  dev: BlockDevice | null;
  state: MemberState;
  reason: string | undefined;
  errors: MemberErrorCounts;
}

/** A stripe being gathered: its data blocks in logical order, and which are present. */
interface PendingStripe {
  buf: Buffer;
  have: Uint8Array;
  count: number;
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export class RaidDevice implements BlockDevice {
  readonly blockCount: number;
  /** The tree allocates whole stripes on parity levels (1 block otherwise). */
  readonly allocUnitBlocks: number;
  readonly geometry: RaidGeometry;
  private readonly members: Member[];
  private readonly uuid: string;
  private generation: number;
  private readonly readOnly: boolean;
  private readonly headPick: ((copies: Buffer[]) => number) | undefined;
  private readonly probe: ((index: number, name: string) => Promise<string | null>) | undefined;
  private readonly pendingBytesMax: number;
  private readonly parity: ParityOps;
  private readonly pending = new Map<number, PendingStripe>();
  /** `have` of a stripe whose every data block is present. */
  private readonly allPresent: Uint8Array;
  private readonly locks = new Map<number, Promise<void>>();
  /** Discards in flight, by stripe range [first, last). */
  private readonly discards = new Set<{ first: number; last: number; done: Promise<void> }>();
  private labelsDirty = false;
  private readonly scrubLog = new LogBurst((n, ms) => log().warn({ volume: this.uuid, stripes: n },
    `raid: scrub found ${n} more stripe(s) whose redundancy does not match its data within ${ms / 1000} s (one line each left out; the scrub's report lists them)`));
  /** A damaged region is read block by block: examples and a count in the log, the exact numbers per member in health(). */
  private readonly healLog = new LogBurst((n, ms) => log().warn({ volume: this.uuid, blocks: n },
    `raid: ${n} more block(s) failed their checksum within ${ms / 1000} s and were served rebuilt (one line each left out; status counts them per member)`));
  /** Stripes written whole from new data, and stripes completed by read-modify-write. */
  readonly stats = { fullStripeWrites: 0, rmwStripeWrites: 0, journaledStripes: 0, journalBatches: 0, replayedStripes: 0 };
  private readonly journal: StripeJournal | undefined;
  private readonly journalPending: JournalPending | undefined;
  /** One journal batch at a time (taken after the batch's stripe locks). */
  private journalTail: Promise<void> = Promise.resolve();
  private failure: string | undefined;
  private closed = false;
  /** The rebuild in progress: which member, and which stripes are current on it (1 byte per stripe). */
  private rebuild: { index: number; old: string; done: Uint8Array; resumedAt: number } | undefined;
  /** Its progress, as its driver reports it (for status). */
  rebuildStatus: RebuildStatus | undefined;

  constructor(opts: RaidDeviceOptions) {
    const g = opts.geometry;
    assert(opts.members.length === g.members, `RaidDevice: ${opts.members.length} member specs for ${g.members} members`);
    this.geometry = g;
    this.blockCount = g.logicalBlocks;
    this.allocUnitBlocks = g.parityMembers > 0 ? g.stripeDataBlocks : 1;
    this.uuid = opts.volumeUuid;
    this.generation = opts.generation;
    this.readOnly = opts.readOnly ?? false;
    this.headPick = opts.headPick;
    this.probe = opts.probe;
    this.pendingBytesMax = opts.pendingBytesMax ?? PENDING_BYTES_MAX_DEFAULT;
    this.parity = opts.parity ?? PARITY_THREAD_POOL;
    this.journal = g.parityMembers > 0 ? opts.journal : undefined;
    this.journalPending = opts.journalPending;
    if (this.journal) {
      assert(!this.readOnly, 'a read-only RAID device takes no journal');
      assert(journalBlocksFor((g.dataMembers + g.parityMembers) * g.unitBlocks) <= this.journal.capacityBlocks, 'stripe journal smaller than one stripe');
    }
    this.allPresent = new Uint8Array(g.stripeDataBlocks).fill(1);
    this.members = opts.members.map((m) => {
      if (m.dev === null) return { name: m.name, dev: null, state: 'missing' as const, reason: m.missingReason ?? 'missing', errors: { read: 0, write: 0, checksum: 0, healed: 0 } };
      // Out of service (never read or written): it may be any size, e.g. a file truncated to nothing.
      if (m.faultReason !== undefined) return { name: m.name, dev: m.dev, state: 'faulted' as const, reason: m.faultReason, errors: { read: 0, write: 0, checksum: 0, healed: 0 } };
      assert(m.dev.blockCount >= LABEL_COPIES + g.headBlocks, `member ${m.name} too small for its label area`);
      return { name: m.name, dev: m.dev, state: 'online' as const, reason: undefined, errors: { read: 0, write: 0, checksum: 0, healed: 0 } };
    });
    if (this.members.some((m) => m.state !== 'online') || opts.relabel === true) this.labelsDirty = true;
    this.checkFailure();
  }

  // ---------------------------------------------------------------- state

  private lostCount(): number {
    return this.members.filter((m) => m.state !== 'online').length;
  }

  private checkFailure(): void {
    const lost = this.members.map((m, i) => ({ m, i })).filter(({ m }) => m.state !== 'online');
    const tol = tolerance(this.geometry.level, this.geometry.members);
    if (this.failure === undefined && lost.length > tol) {
      const names = lost.map(({ m, i }) => `member ${i} ${m.name}: ${m.state}, ${m.reason ?? ''}`).join('; ');
      this.failure = `RAID-${this.geometry.level} volume has lost ${lost.length} of ${this.geometry.members} members, more than the ${tol} it tolerates (${names}): read-only, blocks on the lost members cannot be read`;
      log().error({ volume: this.uuid }, `raid: ${this.failure}`);
    }
  }

  /** Takes a member out of service (once); the labels say so at the next sync(). */
  private fault(i: number, reason: string): void {
    const m = this.members[i]!;
    if (m.state === 'rebuilding') {
      // Already out of service: the rebuild stops (its driver sees the state).
      m.state = 'faulted';
      m.reason = `rebuild failed: ${reason}`;
      log().error({ volume: this.uuid, member: i, path: m.name, reason }, 'raid: the member being rebuilt failed');
      return;
    }
    if (m.state !== 'online') return;
    m.state = 'faulted';
    m.reason = reason;
    this.labelsDirty = true;
    log().error({ volume: this.uuid, member: i, path: m.name, reason }, 'raid: member taken out of service');
    this.checkFailure();
  }

  private online(i: number): BlockDevice | null {
    const m = this.members[i]!;
    return m.state === 'online' ? m.dev : null;
  }

  /** Where writes go: the members in service and the one being rebuilt. */
  private writeTarget(i: number): BlockDevice | null {
    const m = this.members[i]!;
    return m.state === 'online' || m.state === 'rebuilding' ? m.dev : null;
  }

  health(): RaidHealth {
    const lost = this.lostCount();
    const g = this.geometry;
    return {
      level: g.level,
      members: g.members,
      stripeUnitBytes: g.unitBlocks * B,
      state: this.failure !== undefined ? 'failed' : lost > 0 ? 'degraded' : 'online',
      tolerance: tolerance(g.level, g.members),
      generation: this.generation,
      ...(this.failure !== undefined ? { failure: this.failure } : {}),
      memberStatus: this.members.map((m, index) => ({ index, name: m.name, state: m.state, ...(m.reason !== undefined ? { reason: m.reason } : {}), errors: { ...m.errors } })),
      stripeWrites: { full: this.stats.fullStripeWrites, readModifyWrite: this.stats.rmwStripeWrites },
      ...(this.journal ? { journal: { stripes: this.stats.journaledStripes, batches: this.stats.journalBatches, replayedStripes: this.stats.replayedStripes } } : {}),
      ...(this.journalPending ? { journalPending: { ...this.journalPending } } : {}),
      ...(this.rebuildStatus ? { rebuild: { ...this.rebuildStatus } } : {}),
    };
  }

  private refuseWrites(): void {
    if (this.failure !== undefined) throw new VolumeError('EIO', this.failure);
    assert(!this.readOnly, 'write to a read-only RAID device');
  }

  // ---------------------------------------------------------------- member I/O

  private async memberRead(i: number, memberBlock: number, count: number, dst: Buffer): Promise<boolean> {
    const dev = this.online(i);
    if (!dev) return false;
    try {
      await dev.readBlocks(memberBlock, count, dst);
      return true;
    } catch (e) {
      this.members[i]!.errors.read++;
      this.fault(i, `read error: ${message(e)}`);
      return false;
    }
  }

  private async memberWrite(i: number, memberBlock: number, data: Buffer): Promise<void> {
    const dev = this.writeTarget(i);
    if (!dev) return;
    try {
      await dev.writeBlocks(memberBlock, data);
    } catch (e) {
      this.members[i]!.errors.write++;
      this.fault(i, `write error: ${message(e)}`);
    }
  }

  private async withStripe<T>(stripe: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(stripe) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => { release = r; });
    const tail = prev.then(() => mine);
    this.locks.set(stripe, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.locks.get(stripe) === tail) this.locks.delete(stripe);
    }
  }

  // ---------------------------------------------------------------- ranges

  private checkRange(pba: number, count: number): void {
    assert(!this.closed, 'RAID device is closed');
    if (!(Number.isSafeInteger(pba) && pba >= 0 && Number.isSafeInteger(count) && count >= 1 && pba + count <= this.blockCount)) {
      assert(false, `RAID device: blocks [${pba}, +${count}) outside [0, ${this.blockCount})`);
    }
  }

  /** Splits [pba, pba+count) (outside the head) into runs that stay inside one stripe unit. */
  private unitRuns(pba: number, count: number): { pba: number; count: number }[] {
    const u = this.geometry.unitBlocks;
    const runs: { pba: number; count: number }[] = [];
    for (let p = pba; p < pba + count;) {
      const n = Math.min(pba + count - p, u - (p % u));
      runs.push({ pba: p, count: n });
      p += n;
    }
    return runs;
  }

  // ---------------------------------------------------------------- reads

  async readBlocks(pba: number, count: number, dst: Buffer): Promise<void> {
    this.checkRange(pba, count);
    assert(dst.length === count * B, `readBlocks: dst is ${dst.length} bytes, expected ${count * B}`);
    const head = this.geometry.headBlocks;
    let p = pba;
    if (p < head) {
      const n = Math.min(count, head - p);
      for (let k = 0; k < n; k++) await this.readHead(p + k, dst.subarray(k * B, (k + 1) * B));
      p += n;
    }
    if (p >= pba + count) return;
    await forEachLimit(this.unitRuns(p, pba + count - p), MEMBER_IO_CONCURRENCY, async (r) => {
      const off = (r.pba - pba) * B;
      await this.readRun(r.pba, r.count, dst.subarray(off, off + r.count * B));
    });
  }

  private async readHead(p: number, dst: Buffer): Promise<void> {
    (await this.headCopies(p)).best.copy(dst);
  }

  /** Every readable copy of head block p (with the member it came from) and the one served (headPick). */
  private async headCopies(p: number): Promise<{ copies: Array<{ member: number; buf: Buffer }>; best: Buffer }> {
    const copies: Array<{ member: number; buf: Buffer }> = [];
    for (let i = 0; i < this.members.length; i++) {
      const b = Buffer.alloc(B);
      if (await this.memberRead(i, LABEL_COPIES + p, 1, b)) copies.push({ member: i, buf: b });
    }
    if (copies.length === 0) throw new VolumeError('EIO', `RAID: no member in service holds head block ${p}`);
    const k = this.headPick ? this.headPick(copies.map((c) => c.buf)) : 0;
    assert(k >= 0 && k < copies.length, 'headPick out of range');
    return { copies, best: copies[k]!.buf };
  }

  /** Reads a run inside one stripe unit: buffered blocks from the buffer, the rest from its member, else rebuilt. */
  private async readRun(pba: number, count: number, dst: Buffer): Promise<void> {
    const g = this.geometry;
    const loc = g.locate(pba);
    const pend = this.pending.get(loc.stripe);
    if (pend) {
      const base = loc.stripe * g.stripeDataBlocks;
      let allThere = true;
      for (let k = 0; k < count; k++) if (pend.have[pba + k - base] === 0) allThere = false;
      if (allThere) {
        pend.buf.copy(dst, 0, (pba - base) * B, (pba - base + count) * B);
        return;
      }
      // Mixed: block by block (rare: a read of a stripe being gathered).
      if (count > 1) {
        for (let k = 0; k < count; k++) await this.readRun(pba + k, 1, dst.subarray(k * B, (k + 1) * B));
        return;
      }
    }
    if (g.level === 1) {
      for (let i = 0; i < g.members; i++) if (await this.memberRead(i, loc.memberBlock, count, dst)) return;
      throw new VolumeError('EIO', `RAID-1: no member in service can read blocks [${pba}, +${count})`);
    }
    if (await this.memberRead(loc.member, loc.memberBlock, count, dst)) return;
    await this.withStripe(loc.stripe, async () => {
      const cols = await this.rebuildColumns(loc.stripe, loc.memberBlock - g.unitStart(loc.stripe), count, [loc.column]);
      cols[loc.column]!.copy(dst);
    });
  }

  /** Column index (parity.ts order: data 0..k-1, P = k, Q = k+1) -> member, for a stripe. */
  private columnMember(stripe: number, col: number): number {
    const g = this.geometry;
    if (col < g.dataMembers) return g.dataMember(stripe, col);
    return col === g.dataMembers ? g.pMember(stripe) : g.qMember(stripe);
  }

  /**
   * Reads every column of a stripe's blocks [off, off+count) within the unit from the
   * members in service, treating `assumeBad` columns (and unreadable ones) as lost, and
   * rebuilds the lost ones from parity. Throws EIO when more are lost than parity covers.
   * The caller holds the stripe lock.
   */
  private async rebuildColumns(stripe: number, off: number, count: number, assumeBad: number[]): Promise<Buffer[]> {
    const g = this.geometry;
    const total = g.dataMembers + g.parityMembers;
    const cols: Buffer[] = [];
    const lost: number[] = [];
    const start = g.unitStart(stripe) + off;
    for (let c = 0; c < total; c++) cols.push(Buffer.alloc(count * B));
    await forEachLimit(cols.map((_, c) => c), MEMBER_IO_CONCURRENCY, async (c) => {
      if (assumeBad.includes(c) || !(await this.memberRead(this.columnMember(stripe, c), start, count, cols[c]!))) lost.push(c);
    });
    this.zeroHead(stripe, off, count, cols);
    if (lost.length === 0) return cols;
    if (lost.length > g.parityMembers) {
      throw new VolumeError('EIO', `RAID-${g.level}: stripe ${stripe} has ${lost.length} columns lost (members ${lost.map((c) => this.columnMember(stripe, c)).join(', ')}), parity covers ${g.parityMembers}: the blocks cannot be rebuilt`);
    }
    lost.sort((a, b) => a - b);
    await this.parity.reconstruct(cols, lost, g.parityMembers as 1 | 2);
    this.zeroHead(stripe, off, count, cols);
    return cols;
  }

  /** The head's positions in the striped area are zeroes by definition (never written there). */
  private zeroHead(stripe: number, off: number, count: number, cols: Buffer[]): void {
    const g = this.geometry;
    const base = stripe * g.stripeDataBlocks;
    if (base >= g.headBlocks) return;
    for (let c = 0; c < g.dataMembers; c++) {
      for (let k = 0; k < count; k++) if (base + c * g.unitBlocks + off + k < g.headBlocks) cols[c]!.fill(0, k * B, (k + 1) * B);
    }
  }

  /**
   * Self-heal: block pba failed the caller's check (verify(block) false). Rebuilds it from
   * the mirror copies or parity, assuming its member wrong (RAID-6 also: it and any one
   * other column), until a version verifies; serves that (into dst), rewrites it on the
   * member that held the bad copy, and counts the error and the heal there. Returns false
   * (and counts a checksum error) when no version verifies.
   */
  async readRepaired(pba: number, dst: Buffer, verify: (block: Buffer) => boolean, opts?: { heal?: boolean }): Promise<boolean> {
    const heal = opts?.heal ?? true;
    this.checkRange(pba, 1);
    assert(dst.length === B, 'readRepaired: one block');
    const g = this.geometry;
    if (pba < g.headBlocks || g.level === 0) return false;
    const loc = g.locate(pba);
    if (this.pending.get(loc.stripe)?.have[pba - loc.stripe * g.stripeDataBlocks] === 1) return false; // not on disk yet: not a device fault
    return this.withStripe(loc.stripe, async () => {
      const good = await this.findGood(loc.stripe, loc.column, loc.memberBlock, verify);
      const holder = g.level === 1 ? good?.badMembers ?? [] : [loc.member];
      if (good === undefined) {
        for (const m of holder) this.members[m]!.errors.checksum++;
        return false;
      }
      good.block.copy(dst);
      for (const m of holder) {
        const mm = this.members[m]!;
        mm.errors.checksum++;
        if (heal && !this.readOnly && this.failure === undefined && mm.state === 'online') {
          await this.memberWrite(m, loc.memberBlock, good.block);
          if (mm.state === 'online') mm.errors.healed++;
        }
      }
      if (this.healLog.take()) log().warn({ volume: this.uuid, pba, members: holder, healed: heal && !this.readOnly }, 'raid: block failed its checksum; served a rebuilt copy that verifies');
      return true;
    });
  }

  private async findGood(stripe: number, column: number, memberBlock: number, verify: (b: Buffer) => boolean): Promise<{ block: Buffer; badMembers: number[] } | undefined> {
    const g = this.geometry;
    if (g.level === 1) {
      const bad: number[] = [];
      for (let i = 0; i < g.members; i++) {
        const b = Buffer.alloc(B);
        if (!(await this.memberRead(i, memberBlock, 1, b))) continue;
        if (verify(b)) return { block: b, badMembers: bad };
        bad.push(i);
      }
      return undefined;
    }
    const off = memberBlock - g.unitStart(stripe);
    const attempts: number[][] = [[column]];
    if (g.parityMembers === 2) for (let c = 0; c < g.dataMembers + 2; c++) if (c !== column) attempts.push([column, c]);
    for (const bad of attempts) {
      let cols: Buffer[];
      try {
        cols = await this.rebuildColumns(stripe, off, 1, bad);
      } catch {
        continue; // too many lost with this assumption
      }
      if (verify(cols[column]!)) return { block: cols[column]!, badMembers: [] };
    }
    return undefined;
  }

  /**
   * Scrub of one stripe's redundancy (the caller has verified its live blocks' checksums
   * first, so the data as read is the truth): reads every column of the whole unit under
   * the stripe lock, recomputes P (and Q) from the data (RAID-1: compares every copy with
   * the first readable one) and names the members whose redundancy differs. With
   * `repair` (and a writable device) rewrites those columns from the data and counts a
   * checksum error and a heal on each; without, writes nothing and counts nothing.
   * 'unverifiable': a column is out of service or unreadable, or the stripe is being
   * gathered in the write-back buffer (it will be written whole).
   */
  async scrubStripe(stripe: number, repair: boolean): Promise<{ verdict: 'clean' | 'mismatch' | 'unverifiable'; members: number[]; rewritten: boolean }> {
    assert(!this.closed, 'RAID device is closed');
    const g = this.geometry;
    assert(Number.isInteger(stripe) && stripe >= 0 && stripe < g.stripes, `scrub of stripe ${stripe} outside [0, ${g.stripes})`);
    if (g.level === 0) return { verdict: 'clean', members: [], rewritten: false };
    await this.discardsDone(stripe, stripe + 1);
    return this.withStripe(stripe, async () => {
      if (this.pending.has(stripe)) return { verdict: 'unverifiable' as const, members: [], rewritten: false };
      const U = g.unitBlocks * B;
      const start = g.unitStart(stripe);
      const total = g.level === 1 ? g.members : g.dataMembers + g.parityMembers;
      const memberOf = (c: number): number => (g.level === 1 ? c : this.columnMember(stripe, c));
      const cols: Buffer[] = [];
      for (let c = 0; c < total; c++) cols.push(Buffer.alloc(U));
      const readable = await Promise.all(cols.map((b, c) => this.memberRead(memberOf(c), start, g.unitBlocks, b)));
      let expected: Buffer[];
      let checkCols: number[];
      if (g.level === 1) {
        const first = readable.indexOf(true);
        if (first < 0 || readable.filter((r) => r).length < 2) return { verdict: 'unverifiable' as const, members: [], rewritten: false };
        checkCols = cols.map((_, c) => c).filter((c) => readable[c] && c !== first);
        expected = cols.map(() => cols[first]!);
      } else {
        if (readable.some((r) => !r)) return { verdict: 'unverifiable' as const, members: [], rewritten: false };
        this.zeroHead(stripe, 0, g.unitBlocks, cols);
        const data = cols.slice(0, g.dataMembers);
        const P = Buffer.alloc(U);
        const Q = Buffer.alloc(U);
        if (g.parityMembers === 2) await this.parity.computePQ(data, P, Q);
        else await this.parity.computeP(data, P);
        expected = [...data, P, Q];
        checkCols = g.parityMembers === 2 ? [g.dataMembers, g.dataMembers + 1] : [g.dataMembers];
      }
      const bad = checkCols.filter((c) => !cols[c]!.equals(expected[c]!));
      const members = bad.map(memberOf);
      if (bad.length === 0) return { verdict: 'clean' as const, members, rewritten: false };
      let rewritten = false;
      if (repair && !this.readOnly && this.failure === undefined) {
        for (const c of bad) {
          const m = memberOf(c);
          this.members[m]!.errors.checksum++;
          await this.memberWrite(m, start, expected[c]!);
          if (this.members[m]!.state === 'online') this.members[m]!.errors.healed++;
        }
        rewritten = bad.every((c) => this.members[memberOf(c)]!.state === 'online');
      }
      if (this.scrubLog.take()) log().warn({ volume: this.uuid, stripe, members, rewritten }, 'raid: scrub found a stripe whose redundancy does not match its data');
      return { verdict: 'mismatch' as const, members, rewritten };
    });
  }

  // ---------------------------------------------------------------- rebuild

  /**
   * Starts rebuilding member `index` onto `dev` (a new, unlabelled member named `name`):
   * from now on every write reaches it; it is never read. A member still in service is
   * taken out of service first (refused when that loses more than the level tolerates).
   * `doneBelow`: stripes [0, doneBelow) are current on `dev` already (a resumed rebuild
   * whose every write since it began reached `dev`).
   */
  startRebuild(index: number, name: string, dev: BlockDevice, doneBelow: number): void {
    assert(!this.closed, 'RAID device is closed');
    const g = this.geometry;
    assert(g.level !== 0, 'RAID-0 has no redundancy to rebuild from');
    assert(this.rebuild === undefined, 'one rebuild at a time');
    assert(Number.isInteger(index) && index >= 0 && index < g.members, `rebuild of member ${index} of ${g.members}`);
    assert(Number.isInteger(doneBelow) && doneBelow >= 0 && doneBelow <= g.stripes, `rebuild resumed at stripe ${doneBelow} of ${g.stripes}`);
    assert(dev.blockCount >= g.memberBlocks, `rebuild target ${name} is too small`);
    this.refuseWrites();
    const m = this.members[index]!;
    if (m.state === 'online') {
      const tol = tolerance(g.level, g.members);
      if (this.lostCount() + 1 > tol) throw new Error(`member ${index} ${m.name} is in service and ${this.lostCount()} of ${g.members} members are out already: taking it out would lose more than the ${tol} RAID-${g.level} tolerates`);
      this.fault(index, `being replaced by ${name}`);
    }
    const oldName = m.name;
    const oldDev = m.dev;
    const done = new Uint8Array(g.stripes);
    done.fill(1, 0, doneBelow);
    this.members[index] = { name, dev, state: 'rebuilding', reason: `being rebuilt in place of ${oldName}`, errors: { read: 0, write: 0, checksum: 0, healed: 0 } };
    this.rebuild = { index, old: oldName, done, resumedAt: doneBelow };
    this.labelsDirty = true;
    void oldDev?.close().catch(() => undefined);
    log().info({ volume: this.uuid, member: index, old: oldName, new: name, doneBelow }, 'raid: rebuild started');
  }

  /** The member being rebuilt is still being rebuilt (not failed). Throws its failure otherwise. */
  private checkRebuilding(): { index: number; done: Uint8Array; resumedAt: number } {
    const r = this.rebuild;
    assert(r !== undefined, 'no rebuild in progress');
    const m = this.members[r.index]!;
    if (m.state !== 'rebuilding') throw new Error(`member ${r.index} ${m.name}: ${m.reason ?? 'left the rebuild'}`);
    return r;
  }

  /** The stripe the rebuild started from (every stripe below was current on the new member at startRebuild). */
  rebuildResumedAt(): number {
    return this.checkRebuilding().resumedAt;
  }

  /** Whether stripe s is current on the member being rebuilt. */
  isRebuilt(stripe: number): boolean {
    return this.checkRebuilding().done[stripe] === 1;
  }

  /** Copies the head (the superblock ring) onto the member being rebuilt, under the head lock (head writes take it too). */
  async rebuildHead(): Promise<number> {
    const r = this.checkRebuilding();
    const g = this.geometry;
    return this.withStripe(HEAD_LOCK, async () => {
      const head = Buffer.alloc(g.headBlocks * B);
      for (let p = 0; p < g.headBlocks; p++) await this.readHead(p, head.subarray(p * B, (p + 1) * B));
      await this.memberWrite(r.index, LABEL_COPIES, head);
      this.checkRebuilding();
      return head.length;
    });
  }

  /**
   * Rebuilds one stripe's unit of the member being rebuilt from the others (its data
   * column or parity; RAID-1 a copy), under the stripe lock; nothing if it is current
   * already. Returns the bytes written. Throws EIO when the others cannot rebuild it, and
   * the member's failure if it failed.
   */
  async rebuildStripe(stripe: number): Promise<number> {
    const r = this.checkRebuilding();
    const g = this.geometry;
    assert(Number.isInteger(stripe) && stripe >= 0 && stripe < g.stripes, `rebuild of stripe ${stripe} outside [0, ${g.stripes})`);
    await this.discardsDone(stripe, stripe + 1);
    return this.withStripe(stripe, async () => {
      if (r.done[stripe] === 1) return 0;
      const start = g.unitStart(stripe);
      let unit: Buffer;
      if (g.level === 1) {
        unit = Buffer.alloc(g.unitBlocks * B);
        let found = false;
        for (let i = 0; i < g.members && !found; i++) if (i !== r.index && (await this.memberRead(i, start, g.unitBlocks, unit))) found = true;
        if (!found) throw new VolumeError('EIO', `RAID-1: no member in service can read stripe ${stripe}`);
      } else {
        const role = g.roleOf(stripe, r.index);
        const col = role === 'P' ? g.dataMembers : role === 'Q' ? g.dataMembers + 1 : role;
        unit = (await this.rebuildColumns(stripe, 0, g.unitBlocks, [col]))[col]!;
      }
      await this.memberWrite(r.index, start, unit);
      this.checkRebuilding();
      r.done[stripe] = 1;
      return unit.length;
    });
  }

  /**
   * Rebuilds a run of consecutive stripes [first, first+count) at once, with one read per
   * member and one write (RAID-1: a copy; RAID-4/5: the XOR of every other member, which
   * is the lost unit whatever its role). Holds the run's stripe locks, taken in ascending
   * order (nobody else holds two). Only for RAID-1/4/5 and stripes outside the head.
   * Returns the bytes written.
   */
  async rebuildRun(first: number, count: number): Promise<number> {
    const r = this.checkRebuilding();
    const g = this.geometry;
    assert(this.canRebuildRuns(), `RAID-${g.level} rebuilds stripe by stripe`);
    assert(Number.isInteger(first) && Number.isInteger(count) && count >= 1 && first >= 0 && first + count <= g.stripes, `rebuild run [${first}, +${count}) outside [0, ${g.stripes})`);
    assert(first * g.stripeDataBlocks >= g.headBlocks, 'a rebuild run holds no head position');
    await this.discardsDone(first, first + count);
    const locked = async (s: number): Promise<number> => {
      if (s < first + count) return this.withStripe(s, () => locked(s + 1));
      const start = g.unitStart(first);
      const blocks = count * g.unitBlocks;
      const others: Buffer[] = [];
      // Not zeroed: a successful read fills each whole, computeP writes all of out, a failed read is never used.
      for (let i = 0; i < g.members; i++) if (i !== r.index) others.push(Buffer.allocUnsafe(blocks * B));
      const ok = await Promise.all(others.map((b, k) => this.memberRead(k < r.index ? k : k + 1, start, blocks, b)));
      let out: Buffer;
      if (g.level === 1) {
        const k = ok.indexOf(true);
        if (k < 0) throw new VolumeError('EIO', `RAID-1: no member in service can read stripes [${first}, +${count})`);
        out = others[k]!;
      } else {
        if (ok.some((x) => !x)) throw new VolumeError('EIO', `RAID-${g.level}: stripes [${first}, +${count}) have another column lost: the unit of member ${r.index} cannot be rebuilt`);
        out = Buffer.allocUnsafe(blocks * B);
        await this.parity.computeP(others, out);
      }
      await this.memberWrite(r.index, start, out);
      this.checkRebuilding();
      for (let s2 = first; s2 < first + count; s2++) r.done[s2] = 1;
      return out.length;
    };
    return locked(first);
  }

  /** Whether rebuildRun serves this level (RAID-1/4/5: the lost unit is a copy or the XOR of the others). */
  canRebuildRuns(): boolean {
    const l = this.geometry.level;
    return l === 1 || l === 4 || l === 5;
  }

  /** Makes what was written to the member being rebuilt durable. */
  async syncRebuildTarget(): Promise<void> {
    const r = this.checkRebuilding();
    const m = this.members[r.index]!;
    try {
      await m.dev!.sync();
    } catch (e) {
      m.errors.write++;
      this.fault(r.index, `sync failed: ${message(e)}`);
    }
    this.checkRebuilding();
  }

  /**
   * Puts the rebuilt member in service (the caller rebuilt every stripe in use): the next
   * sync() writes generation + 1 labels to every member in service, the new one included
   * (so the one it replaced is stale at the next open).
   */
  finishRebuild(): void {
    const r = this.checkRebuilding();
    const m = this.members[r.index]!;
    m.state = 'online';
    m.reason = undefined;
    this.rebuild = undefined;
    this.rebuildStatus = undefined;
    this.labelsDirty = true;
    log().info({ volume: this.uuid, member: r.index, name: m.name }, 'raid: rebuilt member in service');
  }

  /** Stops a rebuild (the member stays out of service; a later run resumes from its persisted progress). */
  abortRebuild(reason: string): void {
    const r = this.rebuild;
    if (!r) return;
    const m = this.members[r.index]!;
    if (m.state === 'rebuilding') {
      m.state = 'faulted';
      m.reason = `rebuild stopped: ${reason}`;
    }
    this.rebuild = undefined;
    this.rebuildStatus = undefined;
  }

  // ---------------------------------------------------------------- writes

  async writeBlocks(pba: number, data: Buffer): Promise<void> {
    assert(data.length > 0 && data.length % B === 0, `writeBlocks: ${data.length} bytes is not whole blocks`);
    const count = data.length / B;
    this.checkRange(pba, count);
    this.refuseWrites();
    const g = this.geometry;
    let p = pba;
    if (p < g.headBlocks) {
      const n = Math.min(count, g.headBlocks - p);
      const at = p;
      // Under the head lock: a rebuild's copy of the head must not overwrite a newer superblock on the new member.
      await this.withStripe(HEAD_LOCK, () => forEachLimit(this.members.map((_, i) => i), MEMBER_IO_CONCURRENCY, (i) => this.memberWrite(i, LABEL_COPIES + at, data.subarray(0, n * B))));
      p += n;
    }
    if (p < pba + count) {
      const rest = data.subarray((p - pba) * B);
      await this.discardsDone(g.stripeOf(p), g.stripeOf(pba + count - 1) + 1);
      if (g.parityMembers === 0) await this.writeThrough(p, rest);
      else await this.gather(p, rest);
    }
    this.refuseWrites();
  }

  /** RAID-0/1: straight to the member(s) (RAID-1 under the stripe lock, for scrub). */
  private async writeThrough(pba: number, data: Buffer): Promise<void> {
    const g = this.geometry;
    await forEachLimit(this.unitRuns(pba, data.length / B), MEMBER_IO_CONCURRENCY, async (r) => {
      const loc = g.locate(r.pba);
      const buf = data.subarray((r.pba - pba) * B, (r.pba - pba + r.count) * B);
      // RAID-1 under the stripe lock: a scrub comparing the copies must not see a write land on some of them.
      if (g.level === 1) await this.withStripe(loc.stripe, () => Promise.all(this.members.map((_, i) => this.memberWrite(i, loc.memberBlock, buf))));
      else await this.memberWrite(loc.member, loc.memberBlock, buf);
    });
  }

  /** Parity levels: into the stripe buffer; complete stripes are written at once. */
  private async gather(pba: number, data: Buffer): Promise<void> {
    const g = this.geometry;
    const W = g.stripeDataBlocks;
    const end = pba + data.length / B;
    const stripes: number[] = [];
    for (let s = g.stripeOf(pba); s * W < end; s++) stripes.push(s);
    await forEachLimit(stripes, MEMBER_IO_CONCURRENCY, (s) => this.withStripe(s, async () => {
      const base = s * W;
      const lo = Math.max(pba, base);
      const hi = Math.min(end, base + W);
      let e = this.pending.get(s);
      if (!e && lo === base && hi === base + W && base >= g.headBlocks) {
        // The whole stripe in this call: parity straight from the caller's buffer, no copy.
        await this.flushStripe(s, { buf: data.subarray((lo - pba) * B, (hi - pba) * B), have: this.allPresent, count: W });
        return;
      }
      if (!e) {
        e = this.newPending(s);
        this.pending.set(s, e);
      }
      data.copy(e.buf, (lo - base) * B, (lo - pba) * B, (hi - pba) * B);
      for (let q = lo; q < hi; q++) {
        if (e.have[q - base] === 0) {
          e.have[q - base] = 1;
          e.count++;
        }
      }
      if (e.count === W || W * B > this.pendingBytesMax) {
        if (e.count < W && this.journal) {
          await this.writeJournaled([s]);
          return;
        }
        this.pending.delete(s);
        await this.flushStripe(s, e);
      }
    }));
    // Bound the buffer: flush the oldest partial stripes (read-modify-write).
    while (this.pending.size * W * B > this.pendingBytesMax) {
      if (this.journal) {
        // Through the journal, in batches: the oldest half of the buffer.
        await this.flushBatch([...this.pending.keys()].slice(0, Math.max(1, Math.ceil(this.pending.size / 2))));
        continue;
      }
      const s = this.pending.keys().next().value as number;
      await this.withStripe(s, async () => {
        const e = this.pending.get(s);
        if (!e) return;
        this.pending.delete(s);
        await this.flushStripe(s, e);
      });
    }
  }

  private newPending(stripe: number): PendingStripe {
    const g = this.geometry;
    const W = g.stripeDataBlocks;
    const e: PendingStripe = { buf: Buffer.alloc(W * B), have: new Uint8Array(W), count: 0 };
    for (let q = stripe * W; q < Math.min(g.headBlocks, (stripe + 1) * W); q++) {
      e.have[q - stripe * W] = 1;
      e.count++;
    }
    return e;
  }

  /**
   * Writes a gathered stripe (the caller holds its lock): a full one from its new data
   * only; a partial one after reading the rest of its data (rebuilt if a member is out).
   */
  private async flushStripe(stripe: number, e: PendingStripe): Promise<void> {
    const g = this.geometry;
    const U = g.unitBlocks * B;
    const k = g.dataMembers;
    assert(this.journal === undefined || e.count === g.stripeDataBlocks, `partial stripe ${stripe} written around the stripe journal`);
    const rebuild = this.rebuild;
    const dirty: boolean[] = [];
    for (let c = 0; c < k; c++) dirty.push(e.have.subarray(c * g.unitBlocks, (c + 1) * g.unitBlocks).some((h) => h === 1));
    // The member being rebuilt gets its whole unit (its old data came rebuilt from the others above).
    const rebuildCol = rebuild ? this.columnOf(stripe, rebuild.index) : -1;
    if (rebuildCol >= 0 && rebuildCol < k) dirty[rebuildCol] = true;
    if (e.count === g.stripeDataBlocks) this.stats.fullStripeWrites++;
    else this.stats.rmwStripeWrites++;
    if (e.count < g.stripeDataBlocks) {
      const old = await this.rebuildColumns(stripe, 0, g.unitBlocks, []);
      for (let q = 0; q < g.stripeDataBlocks; q++) if (e.have[q] === 0) old[Math.floor(q / g.unitBlocks)]!.copy(e.buf, q * B, (q % g.unitBlocks) * B, (q % g.unitBlocks + 1) * B);
    }
    const headInStripe = Math.max(0, Math.min(g.stripeDataBlocks, g.headBlocks - stripe * g.stripeDataBlocks));
    if (headInStripe > 0) e.buf.fill(0, 0, headInStripe * B); // (only ever a buffer of our own: the head is never in a caller's whole stripe)
    const data: Buffer[] = [];
    for (let c = 0; c < k; c++) data.push(e.buf.subarray(c * U, (c + 1) * U));
    const P = Buffer.alloc(U);
    if (g.parityMembers === 2) {
      const Q = Buffer.alloc(U);
      await this.parity.computePQ(data, P, Q);
      data.push(P, Q);
      dirty.push(true, true);
    } else {
      await this.parity.computeP(data, P);
      data.push(P);
      dirty.push(true);
    }
    const start = g.unitStart(stripe);
    await forEachLimit(data.map((_, c) => c).filter((c) => dirty[c]), MEMBER_IO_CONCURRENCY, (c) => this.memberWrite(this.columnMember(stripe, c), start, data[c]!));
    if (rebuild && this.rebuild === rebuild && this.members[rebuild.index]!.state === 'rebuilding') rebuild.done[stripe] = 1;
  }

  /** The column (parity.ts order) member i holds in a stripe. */
  private columnOf(stripe: number, i: number): number {
    const role = this.geometry.roleOf(stripe, i);
    return role === 'P' ? this.geometry.dataMembers : role === 'Q' ? this.geometry.dataMembers + 1 : role;
  }

  /** Takes the locks of `stripes` (in ascending order, so two batches never deadlock), then fn. */
  private async withStripes<T>(stripes: readonly number[], fn: () => Promise<T>): Promise<T> {
    const sorted = [...new Set(stripes)].sort((a, b) => a - b);
    const take = (k: number): Promise<T> => (k === sorted.length ? fn() : this.withStripe(sorted[k]!, () => take(k + 1)));
    return take(0);
  }

  /** Journal mode: writes the gathered stripes among `stripes` (locking them), partial ones through the journal. */
  private async flushBatch(stripes: readonly number[]): Promise<void> {
    await this.withStripes(stripes, () => this.writeJournaled(stripes));
  }

  /**
   * Journal mode, the caller holds the locks of `stripes`: full stripes are written as
   * usual; partial ones are completed (read-modify-write) into cells, the cells made
   * durable in the journal in batches that fit it, written to the members, the members
   * synced, and the batch released. A stripe leaves the buffer only once it is written.
   */
  private async writeJournaled(stripes: readonly number[]): Promise<void> {
    const journal = this.journal;
    assert(journal !== undefined, 'writeJournaled without a journal');
    const W = this.geometry.stripeDataBlocks;
    let batch: JournalStripe[] = [];
    let batchBlocks = 0;
    const writeBatch = async (): Promise<void> => {
      if (batch.length === 0) return;
      const todo = batch;
      batch = [];
      batchBlocks = 0;
      const prev = this.journalTail;
      let release!: () => void;
      this.journalTail = new Promise<void>((r) => { release = r; });
      await prev;
      try {
        this.refuseWrites();
        await journal.record(todo);
        await forEachLimit(todo, MEMBER_IO_CONCURRENCY, (j) => this.writeCells(j));
        await this.syncMembers();
        this.refuseWrites(); // a failed volume keeps its batch: the next open replays it
        await journal.release();
        this.stats.journalBatches++;
        this.stats.journaledStripes += todo.length;
        for (const j of todo) this.pending.delete(j.stripe);
      } finally {
        release();
      }
    };
    for (const s of [...new Set(stripes)].sort((a, b) => a - b)) {
      const e = this.pending.get(s);
      if (!e) continue;
      if (e.count === W) {
        this.pending.delete(s);
        await this.flushStripe(s, e);
        continue;
      }
      const j = await this.completeStripe(s, e);
      const n = journalBlocksFor(j.cells.length);
      if (batchBlocks + n > journal.capacityBlocks) await writeBatch();
      batch.push(j);
      batchBlocks += n;
    }
    await writeBatch();
  }

  /**
   * A partial stripe's writes as cells: its new data blocks, and P (and Q) at the rows
   * they change, the parity computed over the whole stripe (the rest read back, or
   * rebuilt if a member is out). The caller holds the stripe lock.
   */
  private async completeStripe(stripe: number, e: PendingStripe): Promise<JournalStripe> {
    const g = this.geometry;
    const U = g.unitBlocks * B;
    const k = g.dataMembers;
    const W = g.stripeDataBlocks;
    const base = stripe * W;
    this.stats.rmwStripeWrites++;
    const old = await this.rebuildColumns(stripe, 0, g.unitBlocks, []);
    const dirty = new Uint8Array(W);
    for (let q = 0; q < W; q++) {
      if (e.have[q] === 1 && base + q >= g.headBlocks) dirty[q] = 1;
      else if (e.have[q] === 0) old[Math.floor(q / g.unitBlocks)]!.copy(e.buf, q * B, (q % g.unitBlocks) * B, (q % g.unitBlocks + 1) * B);
    }
    const headInStripe = Math.max(0, Math.min(W, g.headBlocks - base));
    if (headInStripe > 0) e.buf.fill(0, 0, headInStripe * B);
    const data: Buffer[] = [];
    for (let c = 0; c < k; c++) data.push(e.buf.subarray(c * U, (c + 1) * U));
    const P = Buffer.alloc(U);
    const Q = Buffer.alloc(U);
    if (g.parityMembers === 2) await this.parity.computePQ(data, P, Q);
    else await this.parity.computeP(data, P);
    const cells: JournalCell[] = [];
    for (let row = 0; row < g.unitBlocks; row++) {
      let touched = false;
      for (let c = 0; c < k; c++) {
        if (dirty[c * g.unitBlocks + row] === 1) {
          touched = true;
          cells.push({ column: c, row, data: data[c]!.subarray(row * B, (row + 1) * B) });
        }
      }
      if (!touched) continue;
      cells.push({ column: k, row, data: P.subarray(row * B, (row + 1) * B) });
      if (g.parityMembers === 2) cells.push({ column: k + 1, row, data: Q.subarray(row * B, (row + 1) * B) });
    }
    assert(cells.length > 0, `partial stripe ${stripe} with nothing to write`);
    return { stripe, cells };
  }

  /** Writes a journaled stripe's cells to their members (runs of consecutive rows per column). */
  private async writeCells(j: JournalStripe): Promise<void> {
    const g = this.geometry;
    const start = g.unitStart(j.stripe);
    const byCol = new Map<number, JournalCell[]>();
    for (const c of j.cells) {
      const l = byCol.get(c.column) ?? [];
      l.push(c);
      byCol.set(c.column, l);
    }
    for (const [col, cells] of byCol) {
      cells.sort((a, b) => a.row - b.row);
      for (let i = 0; i < cells.length;) {
        let n = 1;
        while (i + n < cells.length && cells[i + n]!.row === cells[i]!.row + n) n++;
        const run = n === 1 ? cells[i]!.data : Buffer.concat(cells.slice(i, i + n).map((c) => c.data));
        await this.memberWrite(this.columnMember(j.stripe, col), start + cells[i]!.row, run);
        i += n;
      }
    }
  }

  /**
   * Replays the journal's last batch, if a crash left one (see stripe-journal.ts): writes
   * its cells to the members in service, syncs them, releases the batch. Call it after
   * open, before anything reads. Returns the stripes replayed.
   */
  async replayJournal(): Promise<number> {
    const journal = this.journal;
    if (!journal) return 0;
    this.refuseWrites();
    const todo = await journal.pending();
    if (todo.length === 0) return 0;
    await this.withStripes(todo.map((j) => j.stripe), async () => {
      await forEachLimit(todo, MEMBER_IO_CONCURRENCY, (j) => this.writeCells(j));
      await this.syncMembers();
      this.refuseWrites();
      await journal.release();
    });
    this.stats.replayedStripes += todo.length;
    log().warn({ volume: this.uuid, stripes: todo.length, epoch: journal.currentEpoch }, 'raid: replayed the stripe journal of an interrupted write (data and parity of those stripes agree again)');
    return todo.length;
  }

  /**
   * Makes every member in service hold the head this device serves (per block, the copy
   * headPick chooses: the newest superblock), then syncs. A crash during a CP's ring
   * write leaves the newest superblock on some members only; the engine mounts it and
   * may release the log records it covers, so before anything builds on it, it must be on
   * every member in service: else a later open without the members that held it (as many
   * as the level tolerates) would mount the CP before and the released records would be
   * gone (power-loss-raid.test.ts, the recovery with a member removed). Call it after
   * open (and replayJournal), before the tree is mounted read-write. Returns the head
   * blocks rewritten (0: every member in service already agreed; nothing written).
   */
  async settleHead(): Promise<number> {
    assert(!this.closed, 'RAID device is closed');
    if (this.readOnly || this.failure !== undefined) return 0;
    const g = this.geometry;
    let rewritten = 0;
    await this.withStripe(HEAD_LOCK, async () => {
      for (let p = 0; p < g.headBlocks; p++) {
        const { copies, best } = await this.headCopies(p);
        const behind = copies.filter((c) => !c.buf.equals(best)).map((c) => c.member);
        if (behind.length === 0) continue;
        await forEachLimit(behind, MEMBER_IO_CONCURRENCY, (i) => this.memberWrite(i, LABEL_COPIES + p, best));
        rewritten++;
      }
    });
    if (rewritten > 0) {
      await this.sync();
      log().warn({ volume: this.uuid, blocks: rewritten }, 'raid: members disagreed on the superblock ring (a crash during a consistency point); the newest copy is now on every member in service');
    }
    return rewritten;
  }

  /** Writes every gathered stripe (partial ones by read-modify-write). */
  private async flushAll(): Promise<void> {
    const stripes = [...this.pending.keys()].sort((a, b) => a - b);
    if (this.journal) {
      await this.flushBatch(stripes);
      return;
    }
    await forEachLimit(stripes, MEMBER_IO_CONCURRENCY, (s) => this.withStripe(s, async () => {
      const e = this.pending.get(s);
      if (!e) return;
      this.pending.delete(s);
      await this.flushStripe(s, e);
    }));
  }

  async sync(): Promise<void> {
    assert(!this.closed, 'RAID device is closed');
    if (this.readOnly) return;
    this.refuseWrites();
    await this.flushAll();
    if (this.probe) {
      for (let i = 0; i < this.members.length; i++) {
        if (this.writeTarget(i) === null) continue;
        const why = await this.probe(i, this.members[i]!.name).catch((e: unknown) => `probe failed: ${message(e)}`);
        if (why !== null) this.fault(i, why);
      }
    }
    await this.syncMemberDevices();
    for (let round = 0; this.labelsDirty && this.failure === undefined && round <= this.members.length; round++) await this.writeLabels();
    this.refuseWrites();
  }

  /**
   * Syncs the members in service and nothing else: no write-back stripe is flushed (a CP
   * gathering stripes is not disturbed), no label written. Scrub calls it to make its
   * rewrites durable before it records its progress.
   */
  async syncMembers(): Promise<void> {
    assert(!this.closed, 'RAID device is closed');
    if (this.readOnly) return;
    await this.syncMemberDevices();
  }

  private async syncMemberDevices(): Promise<void> {
    await Promise.all(this.members.map(async (m, i) => {
      const dev = this.writeTarget(i);
      if (!dev) return;
      try {
        await dev.sync();
      } catch (e) {
        m.errors.write++;
        this.fault(i, `sync failed: ${message(e)}`);
      }
    }));
  }

  /** Writes generation + 1 (the members' states as they are now) to every member in service, and syncs them. */
  private async writeLabels(): Promise<void> {
    this.labelsDirty = false;
    this.generation++;
    const g = this.geometry;
    const outOfService = this.members.map((m) => m.state !== 'online');
    await Promise.all(this.members.map((_, i) => {
      if (!this.online(i)) return Promise.resolve();
      const label = encodeRaidLabel({
        volumeUuid: this.uuid, memberIndex: i, members: g.members, level: g.level, unitBytes: g.unitBlocks * B, headBlocks: g.headBlocks,
        generation: this.generation, memberBlocks: g.memberBlocks, logicalBlocks: g.logicalBlocks, outOfService,
      });
      return this.memberWrite(i, labelSlot(this.generation), label);
    }));
    await this.syncMemberDevices();
    log().info({ volume: this.uuid, generation: this.generation, outOfService }, 'raid: member labels updated');
  }

  /**
   * Discards whole stripes inside [pba, pba+count) on every member (data and parity, so
   * parity stays consistent: punched holes read as zeroes). Returns once the discard is
   * started, off the caller's critical path: a later write to those stripes waits for it
   * (discardsDone), and at most DISCARDS_IN_FLIGHT_MAX run at once.
   */
  async discard(pba: number, count: number): Promise<void> {
    this.checkRange(pba, count);
    if (this.readOnly || this.failure !== undefined) return;
    const g = this.geometry;
    const W = g.stripeDataBlocks;
    // Whole stripes only: a partial one would leave its parity stale.
    const first = Math.ceil(Math.max(pba, g.headBlocks) / W);
    const last = Math.floor((pba + count) / W); // exclusive
    if (first >= last) return;
    for (let s = first; s < last; s++) assert(!this.pending.has(s), `discard of stripe ${s} while it is being written`);
    while (this.discards.size >= DISCARDS_IN_FLIGHT_MAX) await Promise.race([...this.discards].map((d) => d.done));
    const done = Promise.all(this.members.map(async (_, i) => {
      const dev = this.writeTarget(i);
      if (!dev) return;
      await dev.discard(g.unitStart(first), (last - first) * g.unitBlocks).catch((e: unknown) => {
        log().warn({ member: i, err: message(e) }, 'raid: discard failed (ignored: a hint)');
      });
    })).then(() => undefined);
    const entry = { first, last, done };
    this.discards.add(entry);
    void done.then(() => this.discards.delete(entry));
  }

  /** Waits for the discards in flight that overlap stripes [first, last) (a write must land after them). */
  private async discardsDone(first: number, last: number): Promise<void> {
    for (const d of [...this.discards]) if (d.first < last && first < d.last) await d.done;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.healLog.flush();
    this.scrubLog.flush();
    await Promise.all([...this.discards].map((d) => d.done));
    if (!this.readOnly && this.pending.size > 0 && this.failure === undefined) await this.flushAll().catch(() => undefined);
    this.closed = true;
    for (const m of this.members) await m.dev?.close().catch(() => undefined);
    await this.journal?.close().catch(() => undefined);
  }
}
