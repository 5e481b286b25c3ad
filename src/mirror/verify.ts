/**
 * Online verify: compares one CP as both sides hold it. Reads that CP's superblock on
 * each side, then every root (live and snapshots), descending only where the pointers
 * differ (tree/diff.ts). No data block is read on either side. Run by the source
 * (`nvmirror verify SRC_DIR`) or the destination (`nvmirror verify DIR/<uuid>`); each
 * reads the other's blocks over the mirror connection (READ_REQ).
 *
 * Invariants:
 * - Both sides must hold the CP's blocks intact while it runs: the source holds them
 *   (the CP is its mirror base or pinned), the destination never overwrites its
 *   committed CP.
 * - A superblock that does not verify, or a slot that holds another CP, is reported as
 *   a difference, never compared as if it were the CP.
 */
import { diffTrees, type NodeSide } from '../tree/diff';
import { RING_SLOTS, decodeSuperblock, type BlockPtr } from '../tree/layout';

export interface VerifyReport {
  cp: number;
  superblocksEqual: boolean;
  rootsEqual: boolean;
  /** Data blocks whose pointers differ (-1: could not compare). */
  blocksDiffering: number;
  differences: string[];
}

/** `here` and `there` read raw blocks of each side; `thereName` names the other side in the report. */
export async function verifyCp(cp: number, here: NodeSide, there: NodeSide, thereName: string): Promise<VerifyReport> {
  const slot = cp % RING_SLOTS;
  const mineRaw = await here.read(slot);
  const theirsRaw = await there.read(slot);
  const mine = decodeSuperblock(mineRaw);
  const theirs = decodeSuperblock(theirsRaw);
  const fail = (why: string): VerifyReport => ({ cp, superblocksEqual: false, rootsEqual: false, blocksDiffering: -1, differences: [why] });
  if (typeof mine === 'string' || mine.cpNumber !== cp) throw new Error(`this side no longer holds CP ${cp} in its superblock ring`);
  if (typeof theirs === 'string') return fail(`${thereName}'s superblock of CP ${cp} does not verify: ${theirs}`);
  if (theirs.cpNumber !== cp) return fail(`${thereName}'s slot holds CP ${theirs.cpNumber}, not CP ${cp}`);
  const geometry = { height: mine.treeHeight, lbnCount: mine.sizeBytes / 4096, deviceBlocks: mine.deviceBlocks, volumeUuid: mine.volumeUuid };
  const differences: string[] = [];
  let blocks = 0;
  const compare = async (what: string, a: BlockPtr | null, b: BlockPtr | null): Promise<boolean> => {
    const d = await diffTrees(here, there, a, b, geometry);
    blocks += d.blocksDiffering;
    for (const r of d.ranges) differences.push(`${what}: lbns ${r.startLbn}-${r.endLbn - 1} differ`);
    if (d.blocksDiffering > 0) differences.push(`${what}: ${d.blocksDiffering} blocks differ (${d.nodesRead} address blocks read)`);
    return d.blocksDiffering === 0;
  };
  const rootsEqual = await compare('live tree', mine.root, theirs.root);
  const names = new Set([...mine.snapshots.map((s) => s.name), ...theirs.snapshots.map((s) => s.name)]);
  for (const n of names) {
    const a = mine.snapshots.find((s) => s.name === n);
    const b = theirs.snapshots.find((s) => s.name === n);
    if (!a || !b) differences.push(`snapshot ${n}: only on ${a ? 'this side' : thereName}`);
    else await compare(`snapshot ${n}`, a.root, b.root);
  }
  return { cp, superblocksEqual: mineRaw.equals(theirsRaw), rootsEqual, blocksDiffering: blocks, differences };
}

/** Verify's reads of the other side's blocks over the mirror connection: ids, answers, a timeout. */
export class RemoteReads {
  /** A read not answered in this time fails. */
  static readonly TIMEOUT_MS = 30_000;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (b: Buffer) => void; reject: (e: Error) => void }>();

  constructor(private readonly peerName: string) {}

  /** Sends READ_REQ for one block through `send(id)` and resolves with the answer. */
  read(send: (id: number) => void, timeoutMs = RemoteReads.TIMEOUT_MS): Promise<Buffer> {
    const id = (this.nextId = (this.nextId + 1) >>> 0);
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${this.peerName} did not answer a read within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (b) => {
          clearTimeout(timer);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      send(id);
    });
  }

  /** Delivers READ_RESP `id`; false if it was not asked for (a protocol error for the caller). */
  answer(id: number, data: Buffer): boolean {
    const r = this.pending.get(id);
    if (!r) return false;
    this.pending.delete(id);
    r.resolve(Buffer.from(data));
    return true;
  }

  failAll(e: Error): void {
    for (const r of this.pending.values()) r.reject(e);
    this.pending.clear();
  }
}
