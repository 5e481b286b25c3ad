/**
 * Pinning committed roots: a RootHandle per root a read may go through (the live root
 * and each kept snapshot), and PinnedReader, the TreeReader of one snapshot's handle.
 *
 * Invariants:
 * - `inflight` counts the reads (and pins) through the handle that have not finished;
 *   exit() without a matching enter() is an assertion failure.
 * - A handle is retired when a CP replaces its root (the live root) or deletes its
 *   snapshot; the tree releases the blocks freed since then only once every retired
 *   handle is idle (inflight 0), so a read in flight never sees its blocks reused.
 * - idle() resolves once inflight reaches 0 (at once if it is 0).
 */
import { assert } from '../util/assert';
import type { Extent } from '../util/extent';
import type { BlockPtr } from './layout';
import type { TreeReader } from './types';

/** A committed root that reads can be pinned to. */
export class RootHandle {
  inflight = 0;
  retired = false;
  private waiters: (() => void)[] = [];
  constructor(readonly cp: number, readonly root: BlockPtr | null, readonly label: string) {}

  enter(): void {
    this.inflight++;
  }

  exit(): void {
    if (!(this.inflight > 0)) assert(false, `${this.label}: exit without enter`);
    this.inflight--;
    if (this.inflight === 0) {
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    }
  }

  idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

/** The reads of the tree (BlockTree) through a given handle, which pin it while they run. */
export interface PinnedReads {
  readBlockOn(h: RootHandle, lbn: number): Promise<Buffer | null>;
  readRangeOn(h: RootHandle, lbn: number, count: number, dst: Buffer): Promise<void>;
  blockStatusOn(h: RootHandle, lbn: number, count: number, maxExtents: number): Promise<Extent[]>;
}

export class PinnedReader implements TreeReader {
  constructor(private readonly tree: PinnedReads, private readonly handle: RootHandle) {}
  get cpNumber(): number {
    return this.handle.cp;
  }
  readBlock(lbn: number): Promise<Buffer | null> {
    return this.tree.readBlockOn(this.handle, lbn);
  }
  readRange(lbn: number, count: number, dst: Buffer): Promise<void> {
    return this.tree.readRangeOn(this.handle, lbn, count, dst);
  }
  blockStatus(lbn: number, count: number, maxExtents: number): Promise<Extent[]> {
    return this.tree.blockStatusOn(this.handle, lbn, count, maxExtents);
  }
}
