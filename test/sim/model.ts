/**
 * The simulator's reference model: the volume as a byte array, plus, for blocks whose
 * contents are uncertain (an operation failed or was cut off by a crash, so it may or
 * may not have taken effect), the set of contents the block may hold.
 *
 * Invariants:
 * - For every lbn in `cands`, the set has >= 2 distinct 4 KiB versions and `bytes`
 *   holds one of them; for every other lbn `bytes` is the only acceptable content.
 * - An acknowledged change applies to every candidate; an uncertain change adds the
 *   changed version of every candidate. Candidate sets are capped (CANDS_MAX): past the
 *   cap `overflow` is set and the simulator must resolve them (read back) before more.
 * - verify() collapses a block's candidates to those that match what was read: once the
 *   engine has shown a version, it must keep showing it (it came from the NVRAM region
 *   or the tree, both of which survive a process crash).
 */
import { BLOCK_SIZE_BYTES } from '../../src/io/types';

const BS = BLOCK_SIZE_BYTES;
export const CANDS_MAX = 64;

function dedupe(list: Buffer[]): Buffer[] {
  const out: Buffer[] = [];
  for (const b of list) if (!out.some((o) => o.equals(b))) out.push(b);
  return out;
}

export class Image {
  readonly bytes: Buffer;
  readonly cands = new Map<number, Buffer[]>();
  overflow = false;

  constructor(readonly sizeBytes: number, from?: Image) {
    this.bytes = Buffer.alloc(sizeBytes);
    if (from) {
      from.bytes.copy(this.bytes);
      for (const [lbn, list] of from.cands) this.cands.set(lbn, list.map((b) => Buffer.from(b)));
    }
  }

  clone(): Image {
    return new Image(this.sizeBytes, this);
  }

  get uncertainBlocks(): number {
    return this.cands.size;
  }

  private block(lbn: number): Buffer {
    return this.bytes.subarray(lbn * BS, (lbn + 1) * BS);
  }

  /** A copy of `blk` (block lbn) with [offset, offset+length) written (data) or zeroed (null). */
  private static patched(blk: Buffer, lbn: number, offset: number, length: number, data: Buffer | null): Buffer {
    const out = Buffer.from(blk);
    const from = Math.max(offset, lbn * BS);
    const to = Math.min(offset + length, (lbn + 1) * BS);
    if (data) data.copy(out, from - lbn * BS, from - offset, to - offset);
    else out.fill(0, from - lbn * BS, to - lbn * BS);
    return out;
  }

  private setBlock(lbn: number, list: Buffer[]): void {
    const d = dedupe(list);
    d[0]!.copy(this.bytes, lbn * BS);
    if (d.length === 1) this.cands.delete(lbn);
    else {
      this.cands.set(lbn, d);
      if (d.length > CANDS_MAX) this.overflow = true;
    }
  }

  /** An acknowledged write (data) or trim/zero (null) of [offset, offset+length). */
  apply(offset: number, length: number, data: Buffer | null): void {
    for (let lbn = Math.floor(offset / BS); lbn * BS < offset + length; lbn++) {
      const list = this.cands.get(lbn) ?? [this.block(lbn)];
      this.setBlock(lbn, list.map((b) => Image.patched(b, lbn, offset, length, data)));
    }
  }

  /** A change that may or may not have happened, block by block. */
  applyMaybe(offset: number, length: number, data: Buffer | null): void {
    for (let lbn = Math.floor(offset / BS); lbn * BS < offset + length; lbn++) {
      const list = (this.cands.get(lbn) ?? [this.block(lbn)]).map((b) => Buffer.from(b));
      this.setBlock(lbn, [...list, ...list.map((b) => Image.patched(b, lbn, offset, length, data))]);
    }
  }

  /**
   * Checks bytes read at `offset` against the model, collapsing uncertain blocks to the
   * versions that match. Returns a one-line problem, or null.
   */
  verify(offset: number, actual: Buffer): string | null {
    const end = offset + actual.length;
    for (let lbn = Math.floor(offset / BS); lbn * BS < end; lbn++) {
      const from = Math.max(offset, lbn * BS);
      const to = Math.min(end, (lbn + 1) * BS);
      const got = actual.subarray(from - offset, to - offset);
      const list = this.cands.get(lbn);
      if (list) {
        const ok = list.filter((c) => c.subarray(from - lbn * BS, to - lbn * BS).equals(got));
        if (ok.length === 0) return `block ${lbn} bytes [${from}, ${to}) match none of its ${list.length} possible versions`;
        this.setBlock(lbn, ok);
        continue;
      }
      const want = this.bytes.subarray(from, to);
      if (!want.equals(got)) {
        let i = 0;
        while (i < got.length && got[i] === want[i]) i++;
        return `block ${lbn}: byte ${from + i} is 0x${got[i]!.toString(16)}, the model says 0x${want[i]!.toString(16)} (range [${from}, ${to}))`;
      }
    }
    return null;
  }

  /** True if [offset, offset+length) may be all zeroes. */
  mayBeZero(offset: number, length: number): boolean {
    const end = offset + length;
    for (let lbn = Math.floor(offset / BS); lbn * BS < end; lbn++) {
      const from = Math.max(offset, lbn * BS) - lbn * BS;
      const to = Math.min(end, (lbn + 1) * BS) - lbn * BS;
      const list = this.cands.get(lbn) ?? [this.block(lbn)];
      if (!list.some((c) => c.subarray(from, to).every((x) => x === 0))) return false;
    }
    return true;
  }
}
