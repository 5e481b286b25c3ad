/**
 * mirror/pin-guard.ts on real space maps (a block tree on a memory device): a write over
 * a block only an older pinned CP uses releases that CP's readers first; a stale bit (a
 * reader gone) or a block outside every old pinned CP releases nobody; a reader pinned
 * late (its CP replaced during its handshake) is covered before the next write; a pinned
 * CP whose space map no longer reads back is released rather than trusted. The whole
 * path, with a source that did not hold a reader's CP, runs in test/mirror/mirror.test.ts.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { RING_SLOTS, decodeSuperblock, type Superblock } from '../../src/tree/layout';
import { bitmapBytes, readActiveMap, readSummaryMap } from '../../src/tree/spacemap-read';
import { PinGuard, type PinnedReaders } from '../../src/mirror/pin-guard';
import { testBit } from '../../src/util/bitmap';

const B = BLOCK_SIZE_BYTES;
const UUID = '5a1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0';
const LBNS = 64;

interface Cp {
  sb: Superblock;
  raw: Buffer;
  active: Buffer;
  summary: Buffer;
}

class Readers implements PinnedReaders {
  pins = new Map<number, Buffer>(); // cp -> superblock: one reader each
  released: Array<{ cps: number[]; reason: string }> = [];
  oldPins(_uuid: string, committedCp: number): Array<{ cp: number; superblock: Buffer }> {
    return [...this.pins].filter(([cp]) => cp < committedCp).map(([cp, superblock]) => ({ cp, superblock }));
  }
  release(_uuid: string, cps: readonly number[], reason: string): number {
    let n = 0;
    for (const cp of cps) if (this.pins.delete(cp)) n++;
    this.released.push({ cps: [...cps], reason });
    return n;
  }
}

describe('mirror: readers of older CPs are released before a CP writes their blocks (pin-guard.ts)', () => {
  let dev: MemoryBlockDevice;
  let tree: BlockTree;
  let cps: Cp[];
  let committed: number;
  let readers: Readers;
  let guard: PinGuard;
  const read = async (pba: number): Promise<Buffer> => {
    const b = Buffer.alloc(B);
    await dev.readBlocks(pba, 1, b);
    return b;
  };

  /** Every LBN rewritten with `fill`: the CP's data blocks are new, the last CP's freed. */
  async function cp(fill: number): Promise<Cp> {
    const r = await tree.commitCp(Array.from({ length: LBNS }, (_, lbn) => ({ lbn, data: Buffer.alloc(B, fill) })), { nvlogSeq: fill, nvlogEpoch: 1 });
    const raw = Buffer.alloc(B);
    await dev.readBlocks(r.cpNumber % RING_SLOTS, 1, raw);
    const sb = decodeSuperblock(raw);
    assert.ok(typeof sb !== 'string');
    const active = Buffer.alloc(bitmapBytes(sb));
    const summary = Buffer.alloc(bitmapBytes(sb));
    await readActiveMap(read, sb, active, -1);
    await readSummaryMap(read, sb, summary);
    return { sb, raw, active, summary };
  }

  /** A block CP `a` uses and CP `b` does not. */
  function onlyIn(a: Cp, b: Cp): number {
    for (let p = RING_SLOTS; p < a.sb.deviceBlocks; p++) if (testBit(a.active, p) && !testBit(b.active, p) && !testBit(b.summary, p)) return p;
    throw new Error('no such block');
  }

  function freeInAll(): number {
    for (let p = RING_SLOTS; p < cps[0]!.sb.deviceBlocks; p++) if (cps.every((c) => !testBit(c.active, p))) return p;
    throw new Error('no free block');
  }

  /** The guard as the destination keeps it: the outgoing CP retired at each commit. */
  function commitOnDestination(next: Cp): void {
    const prev = cps.find((c) => c.sb.cpNumber === committed)!;
    guard.retire(prev.sb, { active: prev.active, summary: prev.summary });
    committed = next.sb.cpNumber;
  }

  beforeEach(async () => {
    dev = new MemoryBlockDevice(4096);
    await BlockTree.format(dev, { sizeBytes: LBNS * B, volumeUuid: UUID });
    tree = await BlockTree.open(dev, {});
    cps = [await cp(1), await cp(2), await cp(3)];
    committed = cps[0]!.sb.cpNumber;
    readers = new Readers();
    guard = new PinGuard(UUID, read, () => committed);
    guard.attach(readers);
  });

  afterEach(async () => {
    await tree.close();
  });

  it('a block of an older pinned CP: its reader is released before the write; then nothing more is guarded', async () => {
    const [c1, c2] = cps as [Cp, Cp, Cp];
    readers.pins.set(c1.sb.cpNumber, c1.raw); // a reader on the committed CP
    commitOnDestination(c2); // ... which becomes an old one
    const p = onlyIn(c1, c2);
    assert.equal(guard.mayConflict(freeInAll(), 1), false, 'a block no CP uses');
    assert.equal(guard.mayConflict(p, 1), true);
    await guard.resolve(p, 1, c2.sb.cpNumber + 1);
    assert.deepEqual(readers.released.map((r) => r.cps), [[c1.sb.cpNumber]]);
    assert.match(readers.released[0]!.reason, new RegExp(`CP ${c2.sb.cpNumber + 1} writes blocks \\[${p}, ${p + 1}\\) that CP ${c1.sb.cpNumber} still uses`));
    assert.equal(guard.released, 1);
    assert.equal(guard.mayConflict(p, 1), false, 'no reader left on an old CP');
  });

  it('a stale bit (the reader left) or a block outside every old pinned CP releases nobody, and the map becomes exact', async () => {
    const [c1, c2, c3] = cps as [Cp, Cp, Cp];
    readers.pins.set(c1.sb.cpNumber, c1.raw);
    commitOnDestination(c2);
    readers.pins.set(c2.sb.cpNumber, c2.raw); // a second reader, on CP 2
    commitOnDestination(c3);
    readers.pins.delete(c1.sb.cpNumber); // the first one leaves: its bits are stale
    const stale = onlyIn(c1, c2);
    assert.equal(guard.mayConflict(stale, 1), true, 'the map is a superset');
    await guard.resolve(stale, 1, c3.sb.cpNumber + 1);
    assert.equal(readers.released.length, 0, 'nobody uses that block any more');
    assert.equal(guard.mayConflict(stale, 1), false, 'exact after the resolve');
    assert.equal(guard.mayConflict(onlyIn(c2, c3), 1), true, 'CP 2\'s reader is still guarded');
  });

  it('a reader pinned late (its CP replaced during its handshake) is covered before the next write', async () => {
    const [c1, c2] = cps as [Cp, Cp, Cp];
    commitOnDestination(c2); // nobody was pinned to CP 1 at this commit: nothing retired
    const p = onlyIn(c1, c2);
    assert.equal(guard.mayConflict(p, 1), false);
    readers.pins.set(c1.sb.cpNumber, c1.raw);
    guard.pinnedLate(c1.sb.cpNumber);
    assert.equal(guard.mayConflict(freeInAll(), 1), true, 'any write resolves first');
    await guard.resolve(freeInAll(), 1, c2.sb.cpNumber + 1);
    assert.equal(readers.released.length, 0);
    assert.equal(guard.mayConflict(freeInAll(), 1), false);
    assert.equal(guard.mayConflict(p, 1), true, 'CP 1\'s blocks are in the map now');
    await guard.resolve(p, 1, c2.sb.cpNumber + 1);
    assert.deepEqual(readers.released.map((r) => r.cps), [[c1.sb.cpNumber]]);
  });

  it('a pinned CP whose space map no longer reads back is released, not trusted', async () => {
    const [c1, c2] = cps as [Cp, Cp, Cp];
    readers.pins.set(c1.sb.cpNumber, c1.raw);
    commitOnDestination(c2);
    await dev.writeBlocks(c1.sb.smapRoot.pba, Buffer.alloc(B, 0xee));
    const p = onlyIn(c1, c2);
    await guard.resolve(p, 1, c2.sb.cpNumber + 1);
    assert.deepEqual(readers.released.map((r) => r.cps), [[c1.sb.cpNumber]]);
    assert.match(readers.released[0]!.reason, new RegExp(`the space map of CP ${c1.sb.cpNumber} no longer reads back`));
  });
});
