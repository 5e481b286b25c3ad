/**
 * The copy-on-write block tree (src/tree) over the real in-memory BlockDevice:
 * format/open, reads and block status, commits, space accounting and reuse, snapshots,
 * superblock-ring fallback, corruption detection (EIO + check), concurrency of reads
 * with a commit.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { FileBlockDevice } from '../../src/io/file-device';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { crc32c, crc32cBlock, crc32cImplementation, crc32cPortable } from '../../src/io/checksum';
import { FANOUT, NODE_MAGIC, NODE_TYPE_DATA_TREE, RING_SLOTS, decodeSuperblock } from '../../src/tree/layout';
import { BlockTree } from '../../src/tree/tree';
import { GatedDevice } from './gated-device';
import { DISCARD_RUN_BLOCKS_MIN } from '../../src/tree/commit';
import type { BlockChange, CpMeta } from '../../src/tree/types';
import { VolumeError } from '../../src/util/errors';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/volume/types';

const B = BLOCK_SIZE_BYTES;
const UUID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const GiB = 1024 ** 3;
const meta = (n: number): CpMeta => ({ nvlogSeq: n, nvlogEpoch: 1 });

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

function writes(entries: [number, number | null][]): BlockChange[] {
  return entries.map(([lbn, seed]) => ({ lbn, data: seed === null ? null : block(seed) }));
}

async function fresh(sizeBytes: number, deviceBlocks = 4096): Promise<{ dev: MemoryBlockDevice; tree: BlockTree }> {
  const dev = new MemoryBlockDevice(deviceBlocks);
  await BlockTree.format(dev, { sizeBytes, volumeUuid: UUID });
  return { dev, tree: await BlockTree.open(dev) };
}

async function flipByte(dev: MemoryBlockDevice, pba: number, offset: number): Promise<void> {
  const b = dev.peekBlock(pba);
  b[offset] = b[offset]! ^ 0x5a;
  await dev.writeBlocks(pba, b);
}

async function expectEio(p: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof VolumeError && e.code === 'EIO' && pattern.test(e.message));
}

async function assertCheckOk(tree: BlockTree): Promise<void> {
  const r = await tree.check();
  assert.deepEqual(r.problems, []);
  assert.ok(r.ok);
  assert.equal(r.blocksReachable, r.blocksAccounted);
}

describe('tree: crc32c', () => {
  it('matches the standard check value in both implementations', () => {
    const v = Buffer.from('123456789');
    assert.equal(crc32cPortable(v), 0xe3069283);
    assert.equal(crc32c(v), 0xe3069283);
    assert.ok(['native', 'portable'].includes(crc32cImplementation()));
  });

  it('portable and selected implementations agree on random blocks', () => {
    for (let s = 0; s < 20; s++) {
      const b = block(s);
      assert.equal(crc32cPortable(b, 3, 4000), crc32c(b, 3, 4000));
    }
  });

  it('crc32cBlock (three chains) is crc32c of the 4 KiB block at the offset', () => {
    const two = Buffer.concat([block(1), block(2), Buffer.alloc(B)]);
    for (const off of [0, 7, B, 2 * B]) assert.equal(crc32cBlock(two, off), crc32cPortable(two, off, B), `offset ${off}`);
    assert.equal(crc32cBlock(Buffer.alloc(B, 0xff)), crc32c(Buffer.alloc(B, 0xff)));
    assert.throws(() => crc32cBlock(two, 2 * B + 1), RangeError);
  });
});

describe('tree: format and open', () => {
  it('an empty 100 GiB volume costs a handful of blocks and reads as one hole', async () => {
    const { dev, tree } = await fresh(100 * GiB, 1 << 20);
    const st = tree.stats();
    assert.equal(st.sizeBytes, 100 * GiB);
    assert.equal(st.cpNumber, 0);
    assert.equal(tree.height, 4);
    assert.ok(st.usedBlocks <= RING_SLOTS + 4, `used ${st.usedBlocks}`);
    assert.ok(dev.allocatedBlocks <= RING_SLOTS + 4, `device holds ${dev.allocatedBlocks} blocks`);
    assert.equal(await tree.readBlock(12345), null);
    const ext = await tree.blockStatus(0, (100 * GiB) / B / 2, 8);
    assert.deepEqual(ext, [{ lengthBytes: 50 * GiB, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    await assertCheckOk(tree);
  });

  it('refuses a device without the magic, a too-small device, and bad sizes with one-line errors', async () => {
    const blank = new MemoryBlockDevice(256);
    await assert.rejects(BlockTree.open(blank), /not an nvmirror volume/);
    const { dev } = await fresh(GiB, 512);
    const smaller = new MemoryBlockDevice(300);
    for (let p = 0; p < 300; p++) await smaller.writeBlocks(p, dev.peekBlock(p));
    await assert.rejects(BlockTree.open(smaller), /device too small: it has 300 blocks but the volume was formatted on 512/);
    await assert.rejects(BlockTree.format(new MemoryBlockDevice(16), { sizeBytes: GiB, volumeUuid: UUID }), /device too small/);
    await assert.rejects(BlockTree.format(new MemoryBlockDevice(256), { sizeBytes: 1000, volumeUuid: UUID }), /bad volume size/);
    await assert.rejects(BlockTree.format(new MemoryBlockDevice(256), { sizeBytes: GiB, volumeUuid: 'nope' }), /bad volume UUID/);
    // Every slot torn: no valid superblock.
    for (let s = 0; s < RING_SLOTS; s++) await flipByte(dev, s, 100);
    await assert.rejects(BlockTree.open(dev), (e: unknown) => e instanceof Error && /no valid superblock/.test(e.message) && !e.message.includes('\n'));
  });
});

describe('tree: reads, writes and commits', () => {
  it('reads back written blocks after commit and after reopen; trims make holes', async () => {
    const { dev, tree } = await fresh(4 * GiB);
    const r1 = await tree.commitCp(writes([[0, 1], [1, 2], [5000, 3], [1_000_000, 4]]), meta(10));
    assert.equal(r1.cpNumber, 1);
    assert.ok(r1.blocksWritten >= 4 + tree.height);
    assert.ok((await tree.readBlock(0))!.equals(block(1)));
    assert.ok((await tree.readBlock(5000))!.equals(block(3)));
    assert.equal(await tree.readBlock(2), null);
    await tree.commitCp(writes([[1, null], [5000, 5]]), meta(11));
    const again = await BlockTree.open(dev);
    assert.equal(again.cpNumber, 2);
    assert.deepEqual(again.stats().meta, meta(11));
    assert.ok((await again.readBlock(0))!.equals(block(1)));
    assert.equal(await again.readBlock(1), null);
    assert.ok((await again.readBlock(5000))!.equals(block(5)));
    assert.ok((await again.readBlock(1_000_000))!.equals(block(4)));
    const range = Buffer.alloc(3 * B, 0xff);
    await again.readRange(0, 3, range);
    assert.ok(range.subarray(0, B).equals(block(1)));
    assert.ok(range.subarray(B).equals(Buffer.alloc(2 * B)));
    await assertCheckOk(again);
  });

  it('stores all-zero blocks as holes and reports them as hole|zero', async () => {
    const { tree } = await fresh(GiB);
    const used0 = tree.stats().usedBlocks;
    await tree.commitCp([{ lbn: 7, data: Buffer.alloc(B) }, { lbn: 8, data: block(8) }], meta(1));
    assert.equal(await tree.readBlock(7), null);
    const ext = await tree.blockStatus(6, 4, 10);
    assert.deepEqual(ext, [
      { lengthBytes: 2 * B, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: B, flags: 0 },
      { lengthBytes: B, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
    assert.deepEqual(await tree.blockStatus(6, 4, 1), [{ lengthBytes: 2 * B, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    assert.ok(tree.stats().usedBlocks > used0);
  });

  it('block status merges runs of data across address blocks and skips hole subtrees', async () => {
    const { tree } = await fresh(64 * GiB, 8192);
    const changes: BlockChange[] = [];
    for (let l = FANOUT - 10; l < FANOUT + 10; l++) changes.push({ lbn: l, data: block(l) });
    await tree.commitCp(changes, meta(1));
    const ext = await tree.blockStatus(0, (64 * GiB) / B, 10);
    assert.deepEqual(ext, [
      { lengthBytes: (FANOUT - 10) * B, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: 20 * B, flags: 0 },
      { lengthBytes: 64 * GiB - (FANOUT + 10) * B, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
  });

  it('block status gives a shorter (still exact) answer when it runs out of address-block reads', async () => {
    const { dev, tree } = await fresh(64 * GiB, 8192);
    const changes: BlockChange[] = [];
    for (let l = 0; l < 4 * FANOUT; l++) if (l % FANOUT !== 5) changes.push({ lbn: l, data: block(l) });
    await tree.commitCp(changes, meta(1));
    const small = await BlockTree.open(dev, { statusNodeBudget: 2 + tree.height - 1 });
    const ext = await small.blockStatus(0, 4 * FANOUT, 100);
    // Root path plus two level-0 nodes: lbns 0..2*FANOUT-1, with the hole at 5 and FANOUT+5.
    assert.deepEqual(ext, [
      { lengthBytes: 5 * B, flags: 0 },
      { lengthBytes: B, flags: 3 },
      { lengthBytes: (FANOUT - 1) * B, flags: 0 },
      { lengthBytes: B, flags: 3 },
      { lengthBytes: (FANOUT - 6) * B, flags: 0 },
    ]);
    const all = await tree.blockStatus(0, 4 * FANOUT, 100);
    assert.equal(all.reduce((n, e) => n + e.lengthBytes, 0), 4 * FANOUT * B);
    assert.equal(all.length, 9);
  });

  it('writes each CP in few large contiguous writes', async () => {
    const inner = new MemoryBlockDevice(8192);
    await BlockTree.format(inner, { sizeBytes: 16 * GiB, volumeUuid: UUID });
    const dev = new GatedDevice(inner);
    const tree = await BlockTree.open(dev);
    const changes: BlockChange[] = [];
    for (let i = 0; i < 1000; i++) changes.push({ lbn: (i * 7919) % ((16 * GiB) / B), data: block(i) });
    const res = await tree.commitCp(changes, meta(1));
    const dataCalls = dev.writeCalls.filter((c) => c.pba >= RING_SLOTS);
    // One region per level (data, each address level, space map), each cut at 256-block boundaries.
    assert.ok(dataCalls.length <= Math.ceil(res.blocksWritten / 256) + tree.height + 2, `${dataCalls.length} write calls for ${res.blocksWritten} blocks`);
    assert.ok(dataCalls.some((c) => c.count >= 200), 'large writes');
    await assertCheckOk(tree);
  });

  it('times each CP\'s phases by its clock: the member sync and the superblock are told apart, and they add up to the duration', async () => {
    // A clock that moves only when the device says: each sync takes 40 ms, a superblock
    // write 3 ms, everything else no time.
    let now = 1_000;
    const clock = { nowMs: () => now, setTimeout: (fn: () => void, ms: number) => { const t = setTimeout(fn, ms); return { cancel: () => clearTimeout(t) }; } };
    const inner = new MemoryBlockDevice(8192);
    await BlockTree.format(inner, { sizeBytes: 16 * GiB, volumeUuid: UUID });
    const dev = new (class extends GatedDevice {
      override async writeBlocks(pba: number, data: Buffer): Promise<void> {
        if (pba < RING_SLOTS) now += 3;
        return super.writeBlocks(pba, data);
      }
      override async sync(): Promise<void> {
        now += 40;
        return super.sync();
      }
    })(inner);
    const tree = await BlockTree.open(dev, { clock });
    assert.equal(tree.stats().lastCp, undefined, 'no CP yet this session');
    const changes: BlockChange[] = [];
    for (let i = 0; i < 300; i++) changes.push({ lbn: (i * 7919) % ((16 * GiB) / B), data: i % 10 === 0 ? Buffer.alloc(B) : block(i) });
    const r = await tree.commitCp(changes, meta(1));
    assert.deepEqual(r.phases, { prepareMs: 0, addressMs: 0, dataMs: 0, spaceMapMs: 0, syncMs: 40, superblockMs: 43, sinkMs: 0 });
    assert.equal(r.durationMs, 40, 'the duration (kept in the superblock) ends before the superblock');
    assert.equal(r.dataBlocks, 270, 'zero blocks are holes, not data');
    assert.ok(r.blocksWritten > r.dataBlocks, 'address and space-map blocks besides');
    assert.deepEqual(tree.stats().lastCp, r);
    const r2 = await tree.commitCp(writes([[1, 7]]), meta(2));
    assert.equal(r2.dataBlocks, 1);
    assert.deepEqual(tree.stats().cpPhaseTotalsMs, { prepareMs: 0, addressMs: 0, dataMs: 0, spaceMapMs: 0, syncMs: 80, superblockMs: 86, sinkMs: 0 });
    await assertCheckOk(tree);
  });

  it('a failed CP is reported only after every write it started has settled: none lands after the failure', async () => {
    // The first write (a data run) waits for the test; every later one fails at once (the
    // address blocks' among them). A CP that rejected at the first address failure would
    // leave the held write to land after the caller reopened the tree and reused its blocks.
    const inner = new MemoryBlockDevice(8192);
    await BlockTree.format(inner, { sizeBytes: 16 * GiB, volumeUuid: UUID });
    let calls = 0;
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => (release = r));
    let heldLanded = false;
    let settled = false;
    const lateWrites: number[] = [];
    const dev = new (class extends GatedDevice {
      override async writeBlocks(pba: number, data: Buffer): Promise<void> {
        if (settled) lateWrites.push(pba);
        if (++calls > 1) throw new Error('injected write error');
        await held;
        await super.writeBlocks(pba, data);
        heldLanded = true;
      }
    })(inner);
    const tree = await BlockTree.open(dev);
    const changes: BlockChange[] = [];
    for (let i = 0; i < 1000; i++) changes.push({ lbn: (i * 7919) % ((16 * GiB) / B), data: block(i) });
    const p = tree.commitCp(changes, meta(1));
    p.then(() => (settled = true), () => (settled = true));
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(calls > 2, `the CP went on to other writes (${calls})`);
    assert.equal(settled, false, 'the CP settled while its first write was still in flight');
    release();
    await assert.rejects(p, /injected write error/);
    assert.ok(heldLanded, 'the held write had landed before the CP was reported failed');
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(lateWrites, [], 'writes the failed CP started after it was reported');
  });

  it('a read through cached address blocks reaches the device in the same call; a cold one walks, both return the right bytes', async () => {
    const inner = new MemoryBlockDevice(8192);
    await BlockTree.format(inner, { sizeBytes: 16 * GiB, volumeUuid: UUID });
    const dev = new GatedDevice(inner);
    let deviceReads = 0;
    const readBlocks = dev.readBlocks.bind(dev);
    dev.readBlocks = (pba, count, dst) => {
      deviceReads++;
      return readBlocks(pba, count, dst);
    };
    await BlockTree.open(dev).then((t) => t.commitCp(writes([[5, 5], [6, 6], [40_000, 7]]), meta(1)));
    const tree = await BlockTree.open(dev); // cold cache
    const cold = Buffer.alloc(2 * B);
    const readsBefore = deviceReads;
    await tree.readRange(5, 2, cold);
    assert.equal(deviceReads, readsBefore + tree.height + 1, 'a cold read reads the path of address blocks, then one data run');
    assert.ok(cold.equals(Buffer.concat([block(5), block(6)])));
    // The path to lbn 7 is cached now: the data read starts before readRange returns.
    const warm = Buffer.alloc(3 * B, 0xee);
    const before = deviceReads;
    const warmRead = tree.readRange(4, 3, warm);
    assert.equal(deviceReads, before + 1, 'the data run was read without waiting for the cached address blocks');
    await warmRead;
    assert.ok(warm.equals(Buffer.concat([Buffer.alloc(B), block(5), block(6)])));
    const far = Buffer.alloc(B);
    await tree.readRange(40_000, 1, far);
    assert.ok(far.equals(block(7)));
    await flipByte(inner, (await tree.locate(6)).data!.pba, 100);
    await expectEio(tree.readRange(5, 2, Buffer.alloc(2 * B)), /checksum mismatch in data block: lbn 6/);
  });

  it('readLeaves gives the level-0 address blocks of a range in order, skips hole subtrees and stops at its budget', async () => {
    const { tree } = await fresh(GiB);
    await tree.commitCp(writes([[0, 1], [FANOUT + 5, 2], [3 * FANOUT, 3], [FANOUT * FANOUT + 1, 4]]), meta(1));
    const got: number[] = [];
    await tree.readLeaves(0, 4 * FANOUT, (base, node) => {
      assert.equal(node.length, B);
      got.push(base);
    }, 100);
    assert.deepEqual(got, [0, FANOUT, 3 * FANOUT], 'the three leaves that exist below the range, none for the hole at 2*FANOUT');
    const within: number[] = [];
    await tree.readLeaves(FANOUT + 5, 1, (base) => within.push(base), 100);
    assert.deepEqual(within, [FANOUT], 'the leaf holding the one lbn');
    const few: number[] = [];
    await tree.readLeaves(0, FANOUT * FANOUT + 2, (base) => few.push(base), 3);
    assert.ok(few.length >= 1 && few.length < 4, `a budget of 3 address blocks stops early (${few.join(',')})`);
  });

  it('a CP never changes an address block buffer someone else holds (the cache\'s, a reader\'s); it edits only its own copy', async () => {
    const { tree } = await fresh(GiB);
    await tree.commitCp(writes([[0, 1], [1, 2]]), meta(1));
    // A reader holds the cached leaf (the block map keeps leaves like this between CPs).
    const held: Buffer[] = [];
    await tree.readLeaves(0, 2, (_base, node) => held.push(node), 10);
    await tree.readRange(0, 1, Buffer.alloc(B));
    assert.equal(held.length, 1);
    const before = Buffer.from(held[0]!);
    await tree.commitCp(writes([[2, 3], [1, null]]), meta(2));
    assert.ok(held[0]!.equals(before), 'the held leaf changed under its reader');
    const out = Buffer.alloc(3 * B);
    await tree.readRange(0, 3, out);
    assert.ok(out.subarray(0, B).equals(block(1)) && out.subarray(B, 2 * B).equals(Buffer.alloc(B)) && out.subarray(2 * B).equals(block(3)));
    await assertCheckOk(tree);
  });

  it('rejects bad changes before changing anything', async () => {
    const { tree } = await fresh(GiB);
    await assert.rejects(tree.commitCp([{ lbn: GiB / B, data: block(1) }], meta(1)), /outside the volume/);
    await assert.rejects(tree.commitCp([{ lbn: 1, data: Buffer.alloc(100) }], meta(1)), /has 100 bytes/);
    await assert.rejects(tree.commitCp([], { nvlogSeq: -1, nvlogEpoch: 0 }), /nvlogSeq/);
    await assert.rejects(tree.commitCp([], meta(1), [{ kind: 'delete', name: 'nope' }]), /no snapshot named "nope"/);
    await assert.rejects(tree.commitCp([], meta(1), [{ kind: 'create', name: 'a@b' }]), /bad snapshot name/);
    const r = await tree.commitCp(writes([[3, 3]]), meta(1));
    assert.equal(r.cpNumber, 1);
    await assertCheckOk(tree);
  });
});

/** A 1 GiB tree on a 4096-block memory device whose discards are recorded (and passed on). */
async function treeRecordingDiscards(): Promise<{ inner: MemoryBlockDevice; discards: { pba: number; count: number }[]; tree: BlockTree }> {
  const inner = new MemoryBlockDevice(4096);
  await BlockTree.format(inner, { sizeBytes: GiB, volumeUuid: UUID });
  const dev = new GatedDevice(inner);
  const discards: { pba: number; count: number }[] = [];
  dev.discard = (pba, count) => {
    discards.push({ pba, count });
    return inner.discard(pba, count);
  };
  return { inner, discards, tree: await BlockTree.open(dev) };
}

describe('tree: space accounting', () => {
  it('trimmed space is freed and reused; rewriting forever fits a small device', async () => {
    // 300 live blocks rewritten each CP on 700 blocks: only works if freed blocks come back.
    const { dev, tree } = await fresh(GiB, 700);
    const baseline = tree.stats().usedBlocks;
    for (let round = 0; round < 30; round++) {
      const changes: BlockChange[] = [];
      for (let l = 0; l < 300; l++) changes.push({ lbn: l * 3, data: block(round * 1000 + l) });
      await tree.commitCp(changes, meta(round));
    }
    assert.ok((await tree.readBlock(297))!.equals(block(29 * 1000 + 99)));
    const full = tree.stats().usedBlocks;
    assert.ok(full >= baseline + 300, `used ${full}`);
    const trims: BlockChange[] = [];
    for (let l = 0; l < 300; l++) trims.push({ lbn: l * 3, data: null });
    const res = await tree.commitCp(trims, meta(100));
    assert.ok(res.blocksFreed >= 300, `freed ${res.blocksFreed}`);
    assert.ok(tree.stats().usedBlocks <= baseline + 2, `used ${tree.stats().usedBlocks} after trimming all (baseline ${baseline})`);
    await assertCheckOk(tree);
    // The freed space is reusable two CPs later (warm: the next CP's allocations take it
    // first), and what that CP did not take is discarded at the one after (thin member).
    const held = dev.allocatedBlocks;
    await tree.commitCp([], meta(101));
    await tree.commitCp([], meta(101));
    await tree.commitCp([], meta(101));
    assert.ok(dev.allocatedBlocks <= held - 300, `device still holds ${dev.allocatedBlocks} blocks (was ${held})`);
    const changes: BlockChange[] = [];
    for (let l = 0; l < 450; l++) changes.push({ lbn: 100_000 + l, data: block(l) });
    await tree.commitCp(changes, meta(102));
    assert.ok((await tree.readBlock(100_449))!.equals(block(449)));
    await assertCheckOk(tree);
  });

  it('scattered freed blocks are reused without a discard each; a freed run of DISCARD_RUN_BLOCKS_MIN or more is discarded', async () => {
    const { discards, tree } = await treeRecordingDiscards();
    // 400 blocks in one run, then every third one rewritten: its old copy is a single freed block.
    await tree.commitCp(Array.from({ length: 400 }, (_, l) => ({ lbn: l, data: block(l) })), meta(1));
    for (let round = 0; round < 4; round++) {
      await tree.commitCp(Array.from({ length: 40 }, (_, k) => ({ lbn: k * 3, data: block(1000 * (round + 1) + k) })), meta(2 + round));
    }
    assert.deepEqual(discards.filter((d) => d.count < DISCARD_RUN_BLOCKS_MIN), [], 'no punch-hole for a short run');
    assert.ok((await tree.readBlock(3))!.equals(block(4001)));
    // Trimming the whole range frees long runs: those go back to the device.
    await tree.commitCp(Array.from({ length: 400 }, (_, l) => ({ lbn: l, data: null })), meta(10));
    await tree.commitCp([], meta(10));
    await tree.commitCp([], meta(10));
    await tree.commitCp([], meta(10));
    const discarded = discards.reduce((n, d) => n + d.count, 0);
    assert.ok(discarded >= 400 - 4 * 40, `discarded ${discarded} blocks`);
    assert.ok(discards.every((d) => d.count >= DISCARD_RUN_BLOCKS_MIN), 'only long runs');
    await assertCheckOk(tree);
  });

  it('blocks released at a CP are taken first by that CP (warm: no punch-hole, no new device block); what it leaves is discarded at the next', async () => {
    const { inner, discards, tree } = await treeRecordingDiscards();
    // 400 blocks rewritten whole every CP: each CP frees a run of 400, reusable two CPs later.
    const rounds = 12;
    const steady: number[] = [];
    for (let round = 0; round < rounds; round++) {
      await tree.commitCp(Array.from({ length: 400 }, (_, l) => ({ lbn: l, data: block(round * 1000 + l) })), meta(1 + round));
      if (round >= 4) steady.push(inner.allocatedBlocks);
    }
    assert.equal(discards.length, 0, 'rewritten runs are reused, not punched');
    // Next fit alone would walk on into new device blocks every CP (and punch the old ones).
    assert.ok(Math.max(...steady) - Math.min(...steady) <= 16, `the device holds ${steady.join(', ')} blocks: it must stop growing`);
    assert.ok((await tree.readBlock(399))!.equals(block((rounds - 1) * 1000 + 399)));
    await assertCheckOk(tree);
    // A trim: released two CPs later, kept warm for that CP (empty: it takes only a few for
    // its space map), discarded at the next.
    const sum = (): number => discards.reduce((n, d) => n + d.count, 0);
    await tree.commitCp(Array.from({ length: 400 }, (_, l) => ({ lbn: l, data: null })), meta(100));
    await tree.commitCp([], meta(100));
    await tree.commitCp([], meta(100));
    const before = sum();
    await tree.commitCp([], meta(100));
    assert.ok(sum() - before >= 380, `discarded ${sum() - before} blocks one CP after the trimmed ones were released`);
    await assertCheckOk(tree);
  });

  it('ENOSPC leaves the tree usable; trimming makes room again', async () => {
    const { tree } = await fresh(GiB, 256);
    const big: BlockChange[] = [];
    for (let l = 0; l < 400; l++) big.push({ lbn: l, data: block(l) });
    await assert.rejects(tree.commitCp(big, meta(1)), (e: unknown) => e instanceof VolumeError && e.code === 'ENOSPC');
    await tree.commitCp(big.slice(0, 200), meta(2));
    await assert.rejects(tree.commitCp(big.slice(200, 300), meta(3)), (e: unknown) => e instanceof VolumeError && e.code === 'ENOSPC');
    await tree.commitCp(big.slice(0, 150).map((c) => ({ lbn: c.lbn, data: null })), meta(4));
    await tree.commitCp(big.slice(200, 300), meta(5));
    assert.ok((await tree.readBlock(299))!.equals(block(299)));
    assert.equal(await tree.readBlock(10), null);
    await assertCheckOk(tree);
  });
});

describe('tree: snapshots', () => {
  it('a snapshot holds its blocks, reads its own root, and deleting it releases them', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[1, 1], [2, 2], [300, 3]]), meta(1));
    await tree.commitCp(writes([[4, 4]]), meta(2), [{ kind: 'create', name: 'snap1' }]);
    assert.deepEqual(tree.listSnapshots().map((s) => [s.name, s.cpNumber]), [['snap1', 2]]);
    const usedAtSnap = tree.stats().usedBlocks;
    await tree.commitCp(writes([[1, 11], [2, null], [300, null], [4, 14]]), meta(3));
    const usedAfter = tree.stats().usedBlocks;
    assert.ok(usedAfter > usedAtSnap, 'overwritten blocks stay held by the snapshot');
    const snap = tree.snapshotReader('snap1')!;
    assert.equal(snap.cpNumber, 2);
    assert.ok((await snap.readBlock(1))!.equals(block(1)));
    assert.ok((await snap.readBlock(2))!.equals(block(2)));
    assert.ok((await snap.readBlock(300))!.equals(block(3)));
    assert.ok((await tree.readBlock(1))!.equals(block(11)));
    assert.equal(await tree.readBlock(2), null);
    assert.deepEqual(await snap.blockStatus(0, 3, 4), [{ lengthBytes: B, flags: 3 }, { lengthBytes: 2 * B, flags: 0 }]);
    await assertCheckOk(tree);
    // Survives reopen.
    const re = await BlockTree.open(dev);
    assert.ok((await re.snapshotReader('snap1')!.readBlock(300))!.equals(block(3)));
    await assertCheckOk(re);
    await re.commitCp([], meta(4), [{ kind: 'delete', name: 'snap1' }]);
    assert.deepEqual(re.listSnapshots(), []);
    assert.ok(re.stats().usedBlocks < usedAfter - 2, `delete released blocks: ${re.stats().usedBlocks} vs ${usedAfter}`);
    assert.equal(re.snapshotReader('snap1'), undefined);
    await assertCheckOk(re);
    assert.ok((await re.readBlock(1))!.equals(block(11)));
  });

  it('deleting a middle snapshot keeps what the others need', async () => {
    const { tree } = await fresh(GiB);
    await tree.commitCp(writes([[1, 1], [2, 2], [3, 3]]), meta(1), [{ kind: 'create', name: 'a' }]);
    await tree.commitCp(writes([[1, 11], [4, 4]]), meta(2), [{ kind: 'create', name: 'b' }]);
    await tree.commitCp(writes([[2, 22], [4, 44], [1, null]]), meta(3), [{ kind: 'create', name: 'c' }]);
    await tree.commitCp(writes([[3, null], [4, null], [2, null]]), meta(4));
    const reader = tree.snapshotReader('b')!;
    await tree.commitCp([], meta(5), [{ kind: 'delete', name: 'b' }]);
    await assert.rejects(reader.readBlock(1), (e: unknown) => e instanceof VolumeError && e.code === 'ESHUTDOWN');
    await assertCheckOk(tree);
    const a = tree.snapshotReader('a')!;
    const c = tree.snapshotReader('c')!;
    assert.ok((await a.readBlock(1))!.equals(block(1)));
    assert.ok((await a.readBlock(3))!.equals(block(3)));
    assert.equal(await a.readBlock(4), null);
    assert.equal(await c.readBlock(1), null);
    assert.ok((await c.readBlock(2))!.equals(block(22)));
    assert.ok((await c.readBlock(4))!.equals(block(44)));
    // Create and delete in one CP; then delete all.
    await tree.commitCp(writes([[9, 9]]), meta(6), [{ kind: 'create', name: 'd' }, { kind: 'delete', name: 'a' }, { kind: 'delete', name: 'c' }]);
    assert.deepEqual(tree.listSnapshots().map((s) => s.name), ['d']);
    await assertCheckOk(tree);
    await tree.commitCp(writes([[9, null]]), meta(7), [{ kind: 'delete', name: 'd' }]);
    await tree.commitCp([], meta(8));
    await tree.commitCp([], meta(9));
    assert.ok(tree.stats().usedBlocks <= RING_SLOTS + 4, `used ${tree.stats().usedBlocks} with everything deleted`);
    await assertCheckOk(tree);
  });

  it('refuses duplicate names and more than the maximum number of snapshots', async () => {
    const { tree } = await fresh(GiB);
    await tree.commitCp([], meta(1), [{ kind: 'create', name: 's' }]);
    await assert.rejects(tree.commitCp([], meta(2), [{ kind: 'create', name: 's' }]), /already exists/);
    const ops = Array.from({ length: 31 }, (_, i) => ({ kind: 'create' as const, name: `n${i}` }));
    await tree.commitCp([], meta(2), ops);
    await assert.rejects(tree.commitCp([], meta(3), [{ kind: 'create', name: 'x' }]), /maximum of 32/);
    await assertCheckOk(tree);
  });
});

describe('tree: superblock ring', () => {
  it('a torn newest slot falls back to the previous CP', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[1, 1]]), meta(1));
    await tree.commitCp(writes([[1, 2]]), meta(2));
    const slot = 2 % RING_SLOTS;
    const torn = dev.peekBlock(slot);
    torn.fill(0, 2048); // second half of the sector run never made it
    await dev.writeBlocks(slot, torn);
    const re = await BlockTree.open(dev);
    assert.equal(re.cpNumber, 1);
    assert.ok((await re.readBlock(1))!.equals(block(1)));
    await assertCheckOk(re);
    // The next CP reuses the slot and everything is consistent.
    await re.commitCp(writes([[1, 3]]), meta(3));
    const re2 = await BlockTree.open(dev);
    assert.equal(re2.cpNumber, 2);
    assert.ok((await re2.readBlock(1))!.equals(block(3)));
    await assertCheckOk(re2);
  });

  it('a newest superblock whose root block is corrupt is skipped', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[1, 1]]), meta(1));
    await tree.commitCp(writes([[1, 2]]), meta(2));
    const { path } = await tree.locate(1);
    await flipByte(dev, path[0]!.pba, 3000);
    const re = await BlockTree.open(dev);
    assert.equal(re.cpNumber, 1);
    assert.ok((await re.readBlock(1))!.equals(block(1)));
  });

  it('wraps around the ring many times', async () => {
    const { dev, tree } = await fresh(GiB);
    for (let i = 1; i <= 3 * RING_SLOTS + 2; i++) await tree.commitCp(writes([[i % 5, i]]), meta(i));
    const re = await BlockTree.open(dev);
    assert.equal(re.cpNumber, 3 * RING_SLOTS + 2);
    assert.ok((await re.readBlock((3 * RING_SLOTS + 2) % 5))!.equals(block(3 * RING_SLOTS + 2)));
    await assertCheckOk(re);
  });
});

describe('tree: corruption', () => {
  it('a flipped byte in a data block is EIO for that lbn only, and check names it', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[10, 10], [11, 11], [12, 12]]), meta(1));
    const { data } = await tree.locate(11);
    await flipByte(dev, data!.pba, 17);
    const re = await BlockTree.open(dev);
    await expectEio(re.readBlock(11), new RegExp(`lbn 11 at pba ${data!.pba}`));
    assert.ok((await re.readBlock(10))!.equals(block(10)));
    assert.ok((await re.readBlock(12))!.equals(block(12)));
    await expectEio(re.readRange(10, 3, Buffer.alloc(3 * B)), /lbn 11/);
    const r = await re.check();
    assert.equal(r.ok, false);
    assert.ok(r.problems.some((p) => p.includes(`data block lbn 11 at pba ${data!.pba}: checksum mismatch`)), r.problems.join('\n'));
  });

  it('a flipped byte in an address block is EIO for its range, and check names it', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[10, 10], [FANOUT + 1, 11]]), meta(1));
    const { path } = await tree.locate(10);
    const leafNode = path[path.length - 1]!;
    await flipByte(dev, leafNode.pba, 64 + 10 * 24 + 2);
    const re = await BlockTree.open(dev);
    await expectEio(re.readBlock(10), new RegExp(`address block at pba ${leafNode.pba} \\(level 0, lbns 0-${FANOUT - 1}\\)`));
    await expectEio(re.readBlock(11), /address block/);
    await expectEio(re.blockStatus(0, 5, 4), /address block/);
    assert.ok((await re.readBlock(FANOUT + 1))!.equals(block(11)));
    const r = await re.check();
    assert.equal(r.ok, false);
    assert.ok(r.problems.some((p) => p.includes(`pba ${leafNode.pba}`) && p.includes('checksum mismatch')), r.problems.join('\n'));
    // What lies below it is said as not checked, not as leaked blocks or an accounting error.
    assert.ok(r.problems.some((p) => p.startsWith('live tree: 1 blocks in use lie below the 1 address block(s) that could not be read (not checked)')), r.problems.join('\n'));
    assert.ok(!r.problems.some((p) => /leaked|space accounting/.test(p)), r.problems.join('\n'));
  });

  it('a space-map block that cannot be read is one problem, and the map is said not compared (not every block "free")', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[10, 10], [FANOUT + 1, 11]]), meta(1));
    const sb = decodeSuperblock(dev.peekBlock(1 % RING_SLOTS));
    assert.ok(typeof sb !== 'string');
    await flipByte(dev, sb.smapRoot.pba, 200);
    const r = await tree.check();
    assert.equal(r.ok, false);
    assert.ok(r.problems.some((p) => p.includes(`space-map node level 0 index 0 at pba ${sb.smapRoot.pba}`)), r.problems.join('\n'));
    assert.ok(r.problems.includes('live tree: space map not compared with the tree (1 block(s) of it could not be read)'), r.problems.join('\n'));
    assert.ok(!r.problems.some((p) => /marked free|differs from disk|space accounting/.test(p)), r.problems.join('\n'));
  });

  it('a misdirected write (right contents, wrong place) is caught by the header', async () => {
    const { dev, tree } = await fresh(GiB);
    await tree.commitCp(writes([[10, 10], [FANOUT + 1, 11]]), meta(1));
    const a = (await tree.locate(10)).path.at(-1)!;
    const b = (await tree.locate(FANOUT + 1)).path.at(-1)!;
    // Block a's contents land at b's address (and its checksum field would match a, not b).
    await dev.writeBlocks(b.pba, dev.peekBlock(a.pba));
    const re = await BlockTree.open(dev);
    await expectEio(re.readBlock(FANOUT + 1), /checksum mismatch|misdirected/);
    assert.ok((await re.readBlock(10))!.equals(block(10)));
  });
});

describe('tree: on a member file (address blocks a CP rewrites, read in batches off the event loop)', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-tree-file-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('CPs over a cold cache read back every block; a corrupt leaf fails the CP that rewrites it with EIO, counted, and the committed tree stays', async () => {
    const file = path.join(dir, 'member.img');
    const dev = await FileBlockDevice.create(file, 8192);
    await BlockTree.format(dev, { sizeBytes: 64 * FANOUT * B, volumeUuid: UUID });
    // A 16-block cache: nearly every leaf a CP rewrites comes from the device.
    let tree = await BlockTree.open(dev, { cacheBlocks: 16, writeChunkBlocks: 8 });
    const model = new Map<number, number>();
    let seed = 1;
    const rnd = (): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 8);
    for (let cp = 1; cp <= 6; cp++) {
      const entries: [number, number][] = [];
      for (let i = 0; i < 200; i++) {
        const lbn = rnd() % (64 * FANOUT);
        const v = rnd() % 100000;
        entries.push([lbn, v]);
        model.set(lbn, v);
      }
      await tree.commitCp(writes(entries), meta(cp));
      if (cp % 2 === 0) tree = await BlockTree.open(dev, { cacheBlocks: 16, writeChunkBlocks: 8 });
    }
    for (const [lbn, v] of model) assert.ok((await tree.readBlock(lbn))!.equals(block(v)), `lbn ${lbn}`);
    await assertCheckOk(tree);
    // Corrupt the leaf over one written lbn, on the file, then rewrite a block under it.
    const lbn = [...model.keys()][0]!;
    const leaf = (await tree.locate(lbn)).path.at(-1)!;
    const raw = Buffer.alloc(B);
    const fd = fs.openSync(file, 'r+');
    fs.readSync(fd, raw, 0, B, leaf.pba * B);
    raw[100] = raw[100]! ^ 0x5a;
    fs.writeSync(fd, raw, 0, B, leaf.pba * B);
    fs.closeSync(fd);
    const re = await BlockTree.open(dev, { cacheBlocks: 16 });
    const before = re.cpNumber;
    await expectEio(re.commitCp(writes([[lbn, 7]]), meta(100)), new RegExp(`bad address block at pba ${leaf.pba} \\(level 0`));
    assert.equal(re.errorCounts.checksum, 1);
    assert.equal(re.cpNumber, before);
    const again = await BlockTree.open(dev);
    assert.equal(again.cpNumber, before);
    await expectEio(again.readBlock(lbn), /address block/);
    await dev.close();
  });
});

describe('tree: the CP sink', () => {
  it('takes the CP\'s blocks one call at a time in write order (data, address blocks level by level, space map) while the batches\' writes overlap', async () => {
    const dev = new MemoryBlockDevice(32768);
    await BlockTree.format(dev, { sizeBytes: 4 * GiB, volumeUuid: UUID });
    // 8-block batches: a CP of 600 scattered blocks has dozens of address batches in flight.
    const tree = await BlockTree.open(dev, { writeChunkBlocks: 8 });
    const calls: string[] = [];
    let inCall = 0;
    let maxInCall = 0;
    const entries: [number, number][] = [];
    for (let i = 0; i < 600; i++) entries.push([(i * 7919 * 64) % (GiB / B), i]);
    const dataBlocks = new Set(entries.map(([, v]) => block(v).toString('hex')));
    // Address blocks by their header; the space map's (nodes, and leaves without a header) are the rest.
    const kind = (b: { buf: Buffer }): string => {
      if (dataBlocks.has(b.buf.toString('hex'))) return 'data';
      return b.buf.readUInt32LE(0) === NODE_MAGIC && b.buf.readUInt16LE(4) === NODE_TYPE_DATA_TREE ? `L${b.buf.readUInt16LE(6)}` : 'smap';
    };
    tree.setCpSink({
      oldestNeededCp: () => undefined,
      holdBroken: () => undefined,
      blocks: async (_cp, bl) => {
        maxInCall = Math.max(maxInCall, ++inCall);
        // An address block's crc32c comes with it (a mirror sends it with the block's delta).
        for (const b of bl) if (kind(b).startsWith('L')) assert.equal(b.nodeCrc, crc32c(b.buf), `address block at pba ${b.pba}: nodeCrc`);
        const kinds = new Set(bl.map(kind));
        assert.ok(kinds.size <= 1, `one kind of block per call, got ${[...kinds].join(',')}`);
        if (kinds.size === 1) calls.push([...kinds][0]!);
        // A slow peer: later batches' device writes finish before this call does.
        await new Promise((r) => setTimeout(r, 1 + (calls.length % 3)));
        inCall--;
      },
      committed: async () => undefined,
    });
    await tree.commitCp(writes(entries), meta(1));
    assert.equal(maxInCall, 1, 'never two sink calls at once');
    assert.equal(calls[0], 'data');
    const order = ['data', 'L0', 'L1', 'L2', 'L3', 'smap'];
    for (let i = 1; i < calls.length; i++) assert.ok(order.indexOf(calls[i]!) >= order.indexOf(calls[i - 1]!), `call ${i}: ${calls[i - 1]} then ${calls[i]}`);
    assert.ok(calls.filter((c) => c === 'L0').length >= 8, `${calls.length} calls: ${calls.join(' ')}`);
    assert.equal(calls.at(-1), 'smap');
    for (const [lbn, v] of entries) assert.ok((await tree.readBlock(lbn))!.equals(block(v)));
  });
});

describe('tree: device errors', () => {
  it('a failing device read is EIO for that lbn, a problem in check, and never a silent rollback at mount', async () => {
    const inner = new MemoryBlockDevice(1024);
    await BlockTree.format(inner, { sizeBytes: GiB, volumeUuid: UUID });
    const dev = new GatedDevice(inner);
    const tree = await BlockTree.open(dev);
    await tree.commitCp(writes([[1, 1], [2, 2]]), meta(1));
    await tree.commitCp(writes([[3, 3]]), meta(2));
    const d2 = (await tree.locate(2)).data!;
    dev.failReads.add(d2.pba);
    await expectEio(tree.readBlock(2), new RegExp(`device read of data block lbn 2 at pba ${d2.pba} failed`));
    assert.ok((await tree.readBlock(1))!.equals(block(1)));
    const r = await tree.check();
    assert.ok(r.problems.some((p) => p.includes(`pba ${d2.pba}`) && p.includes('injected media error')), r.problems.join('\n'));
    // The newest root unreadable: open fails instead of mounting CP 1.
    const root = (await tree.locate(3)).path[0]!;
    const fresh2 = await BlockTree.open(dev);
    dev.failReads.add(root.pba);
    await assert.rejects(BlockTree.open(dev), /device read of live tree root block at pba \d+ failed/);
    dev.failReads.clear();
    assert.equal((await BlockTree.open(dev)).cpNumber, 2);
    assert.equal(fresh2.cpNumber, 2);
  });
});

describe('tree: concurrency with a commit', () => {
  it('reads during a commit see the previous root; freed blocks are not reused until later', async () => {
    const inner = new MemoryBlockDevice(4096);
    await BlockTree.format(inner, { sizeBytes: GiB, volumeUuid: UUID });
    const dev = new GatedDevice(inner);
    const tree = await BlockTree.open(dev);
    await tree.commitCp(writes([[1, 1], [2, 2]]), meta(1));
    const old1 = (await tree.locate(1)).data!;
    dev.hold();
    const commit = tree.commitCp(writes([[1, 100], [2, null]]), meta(2));
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(tree.cpNumber, 1);
    assert.ok((await tree.readBlock(1))!.equals(block(1)), 'old data while the commit is in flight');
    assert.ok((await tree.readBlock(2))!.equals(block(2)));
    dev.release();
    await commit;
    assert.equal(tree.cpNumber, 2);
    assert.ok((await tree.readBlock(1))!.equals(block(100)));
    // The next CP must not overwrite the block freed by CP 2.
    dev.writeCalls = [];
    await tree.commitCp(writes([[5, 5], [6, 6], [7, 7]]), meta(3));
    assert.ok(!dev.writeCalls.some((c) => old1.pba >= c.pba && old1.pba < c.pba + c.count), 'freed block reused one CP later');
    await assertCheckOk(tree);
  });

  it('a 64 MiB commit does not block the event loop for long', async function () {
    this.timeout(60_000);
    const { tree } = await fresh(16 * GiB, 40_000);
    const changes: BlockChange[] = [];
    for (let i = 0; i < 16384; i++) changes.push({ lbn: (i * 104729) % ((16 * GiB) / B), data: block(i) });
    let maxGapMs = 0;
    let ticks = 0;
    let last = Date.now();
    let running = true;
    const tick = (): void => {
      const now = Date.now();
      maxGapMs = Math.max(maxGapMs, now - last);
      last = now;
      ticks++;
      if (running) setImmediate(tick);
    };
    setImmediate(tick);
    const t0 = Date.now();
    const res = await tree.commitCp(changes, meta(1));
    const wallMs = Date.now() - t0;
    running = false;
    assert.ok(res.blocksWritten >= 16384);
    // Relative to the commit's own wall time, so that a busy machine does not make it flaky:
    // a commit that ran in one piece would block for all of it.
    assert.ok(ticks >= 20, `only ${ticks} event-loop turns during a ${wallMs} ms commit`);
    assert.ok(maxGapMs < Math.max(100, wallMs / 4), `event loop blocked for ${maxGapMs} ms of a ${wallMs} ms commit`);
    assert.ok((await tree.readBlock((5000 * 104729) % ((16 * GiB) / B)))!.equals(block(5000)));
  });
});
