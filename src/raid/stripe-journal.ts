/**
 * The stripe journal: closes RAID-4/5/6's write hole for stripes written by
 * read-modify-write (a mirror destination, whose CPs place blocks by the SOURCE's
 * allocator, so its own stripes are written partially; docs/raid.md "Mirrors with another
 * geometry").
 *
 * Before a batch of partial stripes is written to the members, every block the batch will
 * write (the new data blocks and the parity rows they change: "cells", each a column and a
 * row of its stripe's units) is written here and synced. Then the members are written and
 * synced, then the batch is released (the epoch advances, durably). A crash anywhere in
 * between leaves a batch that the next read-write open replays (RaidDevice.replayJournal)
 * before anything reads those stripes: the cells are written again, so data and parity agree.
 *
 * On disk (a BlockDevice, e.g. DIR/raid-journal.bin):
 *   blocks 0, 1   header slots: the epoch E; the newest slot that verifies counts (a torn
 *                 header write leaves the other slot, one epoch older: its batch is replayed
 *                 again, which is harmless, see below)
 *   blocks 2..    the batch of epoch E: entries, each one header block (epoch, index, the
 *                 batch's entry count, stripe, geometry, the cells' column and row, crc32c
 *                 of the cells and of the header) and its cells, one block each
 *
 * Invariants:
 * - A batch is replayed whole or not at all: only if every entry 0..n-1 of the current
 *   epoch verifies. (Members are written only after the whole batch is durable, so a
 *   batch that is not whole was never started on the members.)
 * - Replaying a batch is idempotent: its stripes are locked from before the journal
 *   write until after the release, so no other write reaches them meanwhile, and the
 *   cells are the stripes' final contents at those positions.
 * - Entries of an older epoch never verify as the current one (the epoch is in every
 *   entry header), so a released batch is never replayed over later writes.
 * - The journal holds at most capacityBlocks blocks (the caller splits larger batches).
 */
import type { BlockDevice } from '../io/types';
import { BLOCK_SIZE_BYTES } from '../io/types';
import { crc32c } from '../io/checksum';
import { assert } from '../util/assert';

const B = BLOCK_SIZE_BYTES;
const HEADER_MAGIC = 0x4e564a48; // 'NVJH'
const ENTRY_MAGIC = 0x4e564a45; // 'NVJE'
const JOURNAL_VERSION = 1;
/** Header slots at the start of the journal device. */
export const JOURNAL_HEADER_SLOTS = 2;
/** Bytes of an entry header before the cell list. */
const ENTRY_FIXED_BYTES = 56;
/** Cells (column u16, row u16) one entry header can list. */
export const JOURNAL_CELLS_PER_ENTRY_MAX = Math.floor((B - 4 - ENTRY_FIXED_BYTES) / 4);
/** Default journal size: 16 MiB (a mirrored CP's partial stripes go through it in batches of this size). */
export const JOURNAL_BYTES_DEFAULT = 16 * 1024 * 1024;

export interface JournalCell {
  /** 0..k-1 data columns, k = P, k+1 = Q (parity.ts's column order). */
  column: number;
  /** Block offset inside the stripe's unit. */
  row: number;
  /** One block. */
  data: Buffer;
}

export interface JournalStripe {
  stripe: number;
  cells: JournalCell[];
}

/** The geometry a journal belongs to (checked on every entry: a journal of another geometry is refused). */
export interface JournalGeometry {
  level: number;
  members: number;
  unitBlocks: number;
  stripes: number;
  /** Data + parity columns of a stripe. */
  columns: number;
}

export class StripeJournalError extends Error {
  override name = 'StripeJournalError';
}

/** Blocks a stripe's cells take in the journal (entry headers included). */
export function journalBlocksFor(cells: number): number {
  return Math.ceil(cells / JOURNAL_CELLS_PER_ENTRY_MAX) + cells;
}

export class StripeJournal {
  /** Blocks available for a batch. */
  readonly capacityBlocks: number;
  private epoch: number;
  /** Entries of the current epoch written and not released. */
  private live = false;
  private closed = false;

  private constructor(private readonly dev: BlockDevice, private readonly geometry: JournalGeometry, epoch: number) {
    this.capacityBlocks = dev.blockCount - JOURNAL_HEADER_SLOTS;
    this.epoch = epoch;
  }

  /** Opens a journal device (a blank one is initialised at epoch 1, durably). Reads nothing else. */
  static async open(dev: BlockDevice, geometry: JournalGeometry, readOnly = false): Promise<StripeJournal> {
    const maxStripeCells = geometry.columns * geometry.unitBlocks;
    assert(geometry.columns <= 0xffff && geometry.unitBlocks <= 0xffff, 'journal: geometry beyond the cell encoding');
    if (dev.blockCount < JOURNAL_HEADER_SLOTS + journalBlocksFor(maxStripeCells)) {
      throw new StripeJournalError(`stripe journal of ${dev.blockCount} blocks cannot hold one stripe (${journalBlocksFor(maxStripeCells)} blocks + ${JOURNAL_HEADER_SLOTS} header blocks)`);
    }
    const slots = Buffer.alloc(JOURNAL_HEADER_SLOTS * B);
    await dev.readBlocks(0, JOURNAL_HEADER_SLOTS, slots);
    let epoch = 0;
    for (let s = 0; s < JOURNAL_HEADER_SLOTS; s++) {
      const e = decodeHeader(slots.subarray(s * B, (s + 1) * B));
      if (e !== undefined && e > epoch) epoch = e;
    }
    const j = new StripeJournal(dev, geometry, Math.max(1, epoch));
    if (epoch === 0 && !readOnly) await j.writeHeader(1);
    return j;
  }

  get currentEpoch(): number {
    return this.epoch;
  }

  /**
   * The batch of the current epoch, if it is whole (every entry verifies); else none.
   * Throws StripeJournalError for a whole batch that names another geometry.
   */
  async pending(): Promise<JournalStripe[]> {
    assert(!this.closed, 'journal closed');
    const byStripe = new Map<number, JournalStripe>();
    const order: JournalStripe[] = [];
    let at = JOURNAL_HEADER_SLOTS;
    let total = -1;
    const hdr = Buffer.alloc(B);
    for (let index = 0; total < 0 || index < total; index++) {
      if (at >= this.dev.blockCount) return [];
      await this.dev.readBlocks(at, 1, hdr);
      const e = decodeEntry(hdr, this.epoch, index);
      if (e === undefined) return []; // not whole: never started on the members
      if (total < 0) total = e.batchEntries;
      if (e.batchEntries !== total || at + 1 + e.cells.length > this.dev.blockCount) return [];
      const payload = Buffer.alloc(e.cells.length * B);
      if (e.cells.length > 0) await this.dev.readBlocks(at + 1, e.cells.length, payload);
      if (crc32c(payload) !== e.payloadCrc) return [];
      const g = this.geometry;
      if (e.level !== g.level || e.members !== g.members || e.unitBlocks !== g.unitBlocks) {
        throw new StripeJournalError(`the stripe journal holds a batch for RAID-${e.level} of ${e.members} members with ${e.unitBlocks}-block units, this volume is RAID-${g.level} of ${g.members} with ${g.unitBlocks}: refusing to replay it`);
      }
      if (!(e.stripe < g.stripes) || e.cells.some((c) => c.column >= g.columns || c.row >= g.unitBlocks)) {
        throw new StripeJournalError(`the stripe journal's entry ${index} names stripe ${e.stripe} or a cell outside the geometry: refusing to replay it`);
      }
      let s = byStripe.get(e.stripe);
      if (!s) {
        s = { stripe: e.stripe, cells: [] };
        byStripe.set(e.stripe, s);
        order.push(s);
      }
      e.cells.forEach((c, k) => s.cells.push({ column: c.column, row: c.row, data: payload.subarray(k * B, (k + 1) * B) }));
      at += 1 + e.cells.length;
    }
    this.live = order.length > 0;
    return order;
  }

  /** Writes a batch (it must fit capacityBlocks) and syncs it: after this resolves, a crash replays it. */
  async record(stripes: readonly JournalStripe[]): Promise<void> {
    assert(!this.closed, 'journal closed');
    assert(!this.live, 'journal: a batch is recorded while the previous one is not released');
    const entries: { stripe: number; cells: JournalCell[] }[] = [];
    for (const s of stripes) {
      assert(s.cells.length > 0, 'journal: a stripe without cells');
      for (let k = 0; k < s.cells.length; k += JOURNAL_CELLS_PER_ENTRY_MAX) entries.push({ stripe: s.stripe, cells: s.cells.slice(k, k + JOURNAL_CELLS_PER_ENTRY_MAX) });
    }
    const blocks = entries.reduce((n, e) => n + 1 + e.cells.length, 0);
    assert(blocks <= this.capacityBlocks, `journal: batch of ${blocks} blocks exceeds ${this.capacityBlocks}`);
    const buf = Buffer.alloc(blocks * B);
    let at = 0;
    entries.forEach((e, index) => {
      const payload = buf.subarray((at + 1) * B, (at + 1 + e.cells.length) * B);
      e.cells.forEach((c, k) => {
        assert(c.data.length === B, 'journal: a cell is one block');
        c.data.copy(payload, k * B);
      });
      encodeEntry(buf.subarray(at * B, (at + 1) * B), {
        epoch: this.epoch, index, batchEntries: entries.length, stripe: e.stripe, payloadCrc: crc32c(payload),
        level: this.geometry.level, members: this.geometry.members, unitBlocks: this.geometry.unitBlocks, cells: e.cells,
      });
      at += 1 + e.cells.length;
    });
    try {
      await this.dev.writeBlocks(JOURNAL_HEADER_SLOTS, buf);
      await this.dev.sync();
    } catch (e) {
      // Nothing reached the members: end this epoch so no part of the failed write ever counts.
      await this.writeHeader(this.epoch + 1).catch(() => undefined);
      throw e;
    }
    this.live = true;
  }

  /** The batch's stripes are durable on the members: its entries stop counting (epoch + 1, durably). */
  async release(): Promise<void> {
    assert(!this.closed, 'journal closed');
    await this.writeHeader(this.epoch + 1);
    this.live = false;
  }

  private async writeHeader(epoch: number): Promise<void> {
    const b = Buffer.alloc(B);
    b.writeUInt32LE(HEADER_MAGIC, 0);
    b.writeUInt32LE(JOURNAL_VERSION, 4);
    b.writeUInt32LE(epoch % 2 ** 32, 8);
    b.writeUInt32LE(Math.floor(epoch / 2 ** 32), 12);
    b.writeUInt32LE(crc32c(b, 0, B - 4), B - 4);
    await this.dev.writeBlocks(epoch % JOURNAL_HEADER_SLOTS, b);
    await this.dev.sync();
    this.epoch = epoch;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.dev.close();
  }
}

function decodeHeader(b: Buffer): number | undefined {
  if (b.readUInt32LE(0) !== HEADER_MAGIC || b.readUInt32LE(4) !== JOURNAL_VERSION) return undefined;
  if (crc32c(b, 0, B - 4) !== b.readUInt32LE(B - 4)) return undefined;
  return b.readUInt32LE(8) + b.readUInt32LE(12) * 2 ** 32;
}

interface EntryFields {
  epoch: number;
  index: number;
  batchEntries: number;
  stripe: number;
  payloadCrc: number;
  level: number;
  members: number;
  unitBlocks: number;
  cells: { column: number; row: number }[];
}

function encodeEntry(b: Buffer, e: EntryFields): void {
  assert(e.cells.length <= JOURNAL_CELLS_PER_ENTRY_MAX, 'journal: too many cells for one entry');
  b.fill(0);
  b.writeUInt32LE(ENTRY_MAGIC, 0);
  b.writeUInt32LE(JOURNAL_VERSION, 4);
  b.writeUInt32LE(e.epoch % 2 ** 32, 8);
  b.writeUInt32LE(Math.floor(e.epoch / 2 ** 32), 12);
  b.writeUInt32LE(e.index, 16);
  b.writeUInt32LE(e.batchEntries, 20);
  b.writeUInt32LE(e.stripe % 2 ** 32, 24);
  b.writeUInt32LE(Math.floor(e.stripe / 2 ** 32), 28);
  b.writeUInt32LE(e.cells.length, 32);
  b.writeUInt32LE(e.payloadCrc, 36);
  b.writeUInt32LE(e.level, 40);
  b.writeUInt32LE(e.members, 44);
  b.writeUInt32LE(e.unitBlocks, 48);
  e.cells.forEach((c, k) => {
    b.writeUInt16LE(c.column, ENTRY_FIXED_BYTES + k * 4);
    b.writeUInt16LE(c.row, ENTRY_FIXED_BYTES + k * 4 + 2);
  });
  b.writeUInt32LE(crc32c(b, 0, B - 4), B - 4);
}

function decodeEntry(b: Buffer, epoch: number, index: number): EntryFields | undefined {
  if (b.readUInt32LE(0) !== ENTRY_MAGIC || b.readUInt32LE(4) !== JOURNAL_VERSION) return undefined;
  if (crc32c(b, 0, B - 4) !== b.readUInt32LE(B - 4)) return undefined;
  const e = b.readUInt32LE(8) + b.readUInt32LE(12) * 2 ** 32;
  if (e !== epoch || b.readUInt32LE(16) !== index) return undefined;
  const n = b.readUInt32LE(32);
  const batchEntries = b.readUInt32LE(20);
  if (n > JOURNAL_CELLS_PER_ENTRY_MAX || batchEntries < 1 || index >= batchEntries) return undefined;
  const cells: { column: number; row: number }[] = [];
  for (let k = 0; k < n; k++) cells.push({ column: b.readUInt16LE(ENTRY_FIXED_BYTES + k * 4), row: b.readUInt16LE(ENTRY_FIXED_BYTES + k * 4 + 2) });
  return {
    epoch: e, index, batchEntries, stripe: b.readUInt32LE(24) + b.readUInt32LE(28) * 2 ** 32, payloadCrc: b.readUInt32LE(36),
    level: b.readUInt32LE(40), members: b.readUInt32LE(44), unitBlocks: b.readUInt32LE(48), cells,
  };
}
