/**
 * tree/diff.ts and tree/born-after.ts over two real trees that share a base CP and then
 * diverge: the diff names exactly the lbns whose contents differ, reading only the
 * address blocks on differing paths; the born-after walk yields exactly the blocks
 * written after the base.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { BLOCK_SIZE_BYTES } from '../../src/io/types';
import { BlockTree } from '../../src/tree/tree';
import { diffTrees, type NodeSide } from '../../src/tree/diff';
import { countBornAfter, walkBornAfter, walkBornAfterRuns, type BornRun } from '../../src/tree/born-after';
import { FileBlockDevice } from '../../src/io/file-device';
import type { BlockDevice } from '../../src/io/types';
import { crc32c } from '../../src/io/checksum';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { decodeSuperblock } from '../../src/tree/layout';
import type { BlockChange } from '../../src/tree/types';
import { applyDelta, encodeDelta } from '../../src/mirror/delta';

const B = BLOCK_SIZE_BYTES;
const UUID = '1f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const SIZE = 256 * 1024 * 1024;

function block(seed: number): Buffer {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(seed + 7, 2654435761) + i * 40503) >>> 0, i);
  return b;
}

function side(dev: MemoryBlockDevice): NodeSide & { reads: number } {
  const s = {
    reads: 0,
    read: async (pba: number): Promise<Buffer> => {
      s.reads++;
      const b = Buffer.alloc(B);
      await dev.readBlocks(pba, 1, b);
      return b;
    },
  };
  return s;
}

async function copyDevice(from: MemoryBlockDevice, blocks: number): Promise<MemoryBlockDevice> {
  const to = new MemoryBlockDevice(blocks);
  const buf = Buffer.alloc(B);
  for (let p = 0; p < blocks; p++) {
    await from.readBlocks(p, 1, buf);
    await to.writeBlocks(p, buf);
  }
  return to;
}

describe('tree diff and born-after walk', () => {
  it('diff names exactly the lbns written differently after a common CP, and reads nothing where pointers agree', async () => {
    const blocks = 16384;
    const devA = new MemoryBlockDevice(blocks);
    await BlockTree.format(devA, { sizeBytes: SIZE, volumeUuid: UUID });
    const base = await BlockTree.open(devA);
    const common: BlockChange[] = [];
    for (let l = 0; l < 3000; l += 7) common.push({ lbn: l, data: block(l) });
    await base.commitCp(common, { nvlogSeq: 1, nvlogEpoch: 1 });
    await base.close();
    const devB = await copyDevice(devA, blocks);
    const a = await BlockTree.open(devA);
    const b = await BlockTree.open(devB);
    // A rewrites 10, 21 and 20000-20003 and trims 14; B rewrites 10 with other data and writes 50000.
    await a.commitCp([{ lbn: 10, data: block(1) }, { lbn: 14, data: null }, ...[20000, 20001, 20002, 20003].map((l) => ({ lbn: l, data: block(l) })), { lbn: 21, data: block(5) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    await b.commitCp([{ lbn: 10, data: block(2) }, { lbn: 50000, data: block(3) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    const sbA = decodeSuperblock(a.pinCommitted().superblock);
    const sbB = decodeSuperblock(b.pinCommitted().superblock);
    assert.ok(typeof sbA !== 'string' && typeof sbB !== 'string');
    const sa = side(devA);
    const sb = side(devB);
    const d = await diffTrees(sa, sb, sbA.root, sbB.root, { height: sbA.treeHeight, lbnCount: SIZE / B, deviceBlocks: sbA.deviceBlocks, volumeUuid: UUID });
    // 21 was written on A only (B still has the common version, A's new block differs in pba/birth): it differs too.
    assert.deepEqual(d.ranges, [{ startLbn: 10, endLbn: 11 }, { startLbn: 14, endLbn: 15 }, { startLbn: 21, endLbn: 22 }, { startLbn: 20000, endLbn: 20004 }, { startLbn: 50000, endLbn: 50001 }]);
    assert.equal(d.blocksDiffering, 8);
    // Only the paths to the differing leaves were read: the root, and per side at most the touched address blocks.
    assert.ok(sa.reads <= 8 && sb.reads <= 8, `read ${sa.reads} / ${sb.reads} address blocks`);
    const same = await diffTrees(sa, sa, sbA.root, sbA.root, { height: sbA.treeHeight, lbnCount: SIZE / B, deviceBlocks: sbA.deviceBlocks, volumeUuid: UUID });
    assert.equal(same.blocksDiffering, 0);
  });

  it('born-after yields exactly the blocks a later CP wrote, and every block of the state from CP -1', async () => {
    const blocks = 16384;
    const dev = new MemoryBlockDevice(blocks);
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    await t.commitCp([0, 1, 2, 500, 9000].map((l) => ({ lbn: l, data: block(l) })), { nvlogSeq: 1, nvlogEpoch: 1 });
    const seen1 = new Set<number>();
    const v1 = t.pinCommitted();
    const n1 = await walkBornAfter(v1, -1, async (b) => void seen1.add(b.pba));
    assert.equal(await countBornAfter(v1, -1), n1, 'the count (nodes only) = the blocks the full walk emits');
    v1.release();
    const written: number[] = [];
    t.setCpSink({
      oldestNeededCp: () => undefined,
      holdBroken: () => undefined,
      blocks: async (_cp, bl) => void written.push(...bl.map((x) => x.pba)),
      committed: async () => undefined,
    });
    await t.commitCp([{ lbn: 1, data: block(100) }, { lbn: 7000, data: block(7) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    t.setCpSink(undefined);
    const v2 = t.pinCommitted();
    const after: number[] = [];
    await walkBornAfter(v2, 1, async (b) => void after.push(b.pba));
    assert.equal(await countBornAfter(v2, 1), after.length, 'the count = the blocks born after CP 1');
    v2.release();
    assert.deepEqual([...after].sort((x, y) => x - y), [...written].sort((x, y) => x - y), 'born after CP 1 = what CP 2 wrote');
    assert.ok(seen1.size >= 5 + 1, 'a full walk covers every data block and the metadata');
  });

  it('born-after refuses a run holding a corrupt data block before it emits any block of that run', async () => {
    const blocks = 16384;
    const dev = new MemoryBlockDevice(blocks);
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    await t.commitCp([10, 11, 12, 13].map((l) => ({ lbn: l, data: block(l) })), { nvlogSeq: 1, nvlogEpoch: 1 });
    const v = t.pinCommitted();
    const data = new Map<number, Buffer>();
    await walkBornAfter(v, -1, async (b) => void data.set(b.pba, Buffer.from(b.buf)));
    // The pbas of lbns 10..13: the walk's blocks whose contents are theirs.
    const pbas = [10, 11, 12, 13].map((l) => [...data].find(([, buf]) => buf.equals(block(l)))![0]).sort((a, b) => a - b);
    assert.deepEqual(pbas.map((p) => p - pbas[0]!), [0, 1, 2, 3], 'one run of four blocks');
    const bad = Buffer.alloc(BLOCK_SIZE_BYTES);
    await dev.readBlocks(pbas[2]!, 1, bad);
    bad[100] = bad[100]! ^ 1;
    await dev.writeBlocks(pbas[2]!, bad);
    const emitted: number[] = [];
    await assert.rejects(walkBornAfter(v, -1, async (b) => void emitted.push(b.pba)), new RegExp(`data block at pba ${pbas[2]}: checksum mismatch`));
    assert.ok(pbas.every((p) => !emitted.includes(p)), `no block of the damaged run was emitted: ${emitted.join(',')}`);
    v.release();
  });

  it('born-after with the base superblock: every metadata block comes with its base counterpart, a small delta away; a bad base changes nothing but the hints', async () => {
    const blocks = 32768;
    const dev = new MemoryBlockDevice(blocks);
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    // The base: a block every 64 lbns (every level-0 node of the 256 MiB volume holds some).
    const lbnCount = SIZE / B;
    const baseWrites: BlockChange[] = [];
    for (let l = 0; l < lbnCount; l += 64) baseWrites.push({ lbn: l, data: block(l) });
    await t.commitCp(baseWrites, { nvlogSeq: 1, nvlogEpoch: 1 });
    const baseView = t.pinCommitted();
    const baseCp = baseView.cpNumber;
    const baseSb = Buffer.from(baseView.superblock);
    baseView.release();
    // The base stays intact, as a mirror's committed CP is held on the source.
    t.setCpSink({ oldestNeededCp: () => baseCp, holdBroken: () => assert.fail('hold broken'), blocks: async () => undefined, committed: async () => undefined });
    // Three CPs of scattered writes after it, and a trim.
    for (let c = 0; c < 3; c++) {
      const w: BlockChange[] = [];
      for (let l = 17 + c * 5; l < lbnCount; l += 97) w.push({ lbn: l, data: block(l * 3 + c) });
      w.push({ lbn: 64 * (c + 1), data: null });
      await t.commitCp(w, { nvlogSeq: 2 + c, nvlogEpoch: 1 });
    }
    const v = t.pinCommitted();
    const plain: number[] = [];
    await walkBornAfterRuns(v, baseCp, async (run) => {
      assert.equal(run.prev, undefined, 'no base given, no counterpart');
      plain.push(...run.ptrs.map((p) => p.pba));
      run.release();
    });
    const withBase: number[] = [];
    let metadata = 0;
    let deltaBytes = 0;
    let tooBig = 0;
    const scratch = Buffer.alloc(B);
    await walkBornAfterRuns(v, baseCp, async (run) => {
      withBase.push(...run.ptrs.map((p) => p.pba));
      if (run.prev) {
        metadata++;
        assert.equal(run.ptrs.length, 1);
        assert.notEqual(run.prev.pba, run.ptrs[0]!.pba);
        // The counterpart is the committed base block at prev.pba, and the delta rebuilds the new block from it.
        await dev.readBlocks(run.prev.pba, 1, scratch);
        assert.ok(scratch.equals(run.prev.buf), `counterpart at pba ${run.prev.pba} is the block on the device`);
        const d = encodeDelta(run.prev.buf, run.buf);
        if (!d) {
          tooBig++; // an upper node whose every child changed
          run.release();
          return;
        }
        deltaBytes += d.length;
        const rebuilt = applyDelta(run.prev.buf, d);
        assert.ok(Buffer.isBuffer(rebuilt) && rebuilt.equals(run.buf));
        assert.equal(crc32c(rebuilt), run.ptrs[0]!.crc);
      }
      run.release();
    }, { baseSuperblock: baseSb });
    assert.deepEqual(withBase, plain, 'the same blocks in the same order with or without the base');
    // Every level-0 node (256 MiB / 168 lbns = 391), the upper levels and the space map changed; all had a counterpart.
    assert.ok(metadata >= 391, `${metadata} metadata blocks had a counterpart`);
    assert.ok(tooBig <= 4, `${tooBig} counterparts too far from their block for a delta (only the upper nodes may be)`);
    assert.ok(deltaBytes < (metadata - tooBig) * 600, `deltas average ${(deltaBytes / (metadata - tooBig)).toFixed(0)} bytes`);
    // A base superblock of another CP, or garbage: no counterparts, the same walk.
    for (const bad of [Buffer.from(v.superblock), Buffer.alloc(B, 7)]) {
      const again: number[] = [];
      await walkBornAfterRuns(v, baseCp, async (run) => {
        assert.equal(run.prev, undefined);
        again.push(...run.ptrs.map((p) => p.pba));
        run.release();
      }, { baseSuperblock: bad });
      assert.deepEqual(again, plain);
    }
    // A damaged counterpart is no counterpart (the walk does not fail for a hint).
    let damagedPba = -1;
    await walkBornAfterRuns(v, baseCp, async (run) => {
      if (run.prev && damagedPba < 0) damagedPba = run.prev.pba;
      run.release();
    }, { baseSuperblock: baseSb });
    await dev.readBlocks(damagedPba, 1, scratch);
    scratch[200] = scratch[200]! ^ 0xff;
    await dev.writeBlocks(damagedPba, scratch);
    const afterDamage: number[] = [];
    await walkBornAfterRuns(v, baseCp, async (run) => {
      assert.ok(!run.prev || run.prev.pba !== damagedPba, 'the damaged block offered as a counterpart');
      afterDamage.push(...run.ptrs.map((p) => p.pba));
      run.release();
    }, { baseSuperblock: baseSb });
    assert.deepEqual(afterDamage, plain);
    v.release();
    t.setCpSink(undefined);
  });

  it('a resync walk emits data in runs sorted by pba (each CP\'s blocks adjacent), exactly the blocks born after the base, each verified', async () => {
    const blocks = 65536;
    const dev = new MemoryBlockDevice(blocks);
    await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
    const t = await BlockTree.open(dev);
    await t.commitCp([0, 5000, 9000].map((l) => ({ lbn: l, data: block(l) })), { nvlogSeq: 1, nvlogEpoch: 1 });
    const baseCp = t.pinCommitted().cpNumber;
    t.pinCommitted().release();
    const written = new Set<number>();
    t.setCpSink({
      oldestNeededCp: () => baseCp,
      holdBroken: () => assert.fail('hold broken'),
      blocks: async (_cp, bl) => bl.forEach((x) => written.add(x.pba)),
      committed: async () => undefined,
    });
    // Four CPs of scattered single-block writes (every 53rd lbn from a different start),
    // the later ones overwriting some of the earlier: in lbn order no two are adjacent.
    const lbnCount = SIZE / B;
    for (let c = 0; c < 4; c++) {
      const w: BlockChange[] = [];
      for (let l = c * 13; l < lbnCount; l += 53) w.push({ lbn: l, data: block(l * 5 + c) });
      // A snapshot after the second: its tree shares most blocks with the live one (each counted once).
      await t.commitCp(w, { nvlogSeq: 2 + c, nvlogEpoch: 1 }, c === 1 ? [{ kind: 'create', name: 's1' }] : []);
    }
    t.setCpSink(undefined);
    const v = t.pinCommitted();
    const emitted: number[] = [];
    let dataRuns = 0;
    let dataBlocks = 0;
    await walkBornAfterRuns(v, baseCp, async (run) => {
      run.ptrs.forEach((p, k) => assert.equal(crc32c(run.buf.subarray(k * B, (k + 1) * B)), p.crc, `block at pba ${p.pba}`));
      for (let k = 1; k < run.ptrs.length; k++) assert.equal(run.ptrs[k]!.pba, run.ptrs[k - 1]!.pba + 1, 'a run is adjacent blocks');
      if (run.ptrs.length > 1) {
        dataRuns++;
        dataBlocks += run.ptrs.length;
      }
      emitted.push(...run.ptrs.map((p) => p.pba));
      run.release();
    });
    assert.equal(await countBornAfter(v, baseCp), emitted.length, 'the count (nodes only) = the blocks the resync walk emits');
    assert.equal(await countBornAfter(v, -1), await walkBornAfter(v, -1, async () => undefined), 'and for a full walk');
    v.release();
    // Exactly the blocks the CPs wrote that are still referenced: every one emitted was written after the base, none twice.
    assert.equal(new Set(emitted).size, emitted.length, 'a block emitted twice');
    assert.ok(emitted.every((p) => written.has(p)), 'a block not born after the base was emitted');
    const liveData = new Set<number>();
    for (let l = 0; l < lbnCount; l++) if ([0, 1, 2, 3].some((c) => l >= c * 13 && (l - c * 13) % 53 === 0)) liveData.add(l);
    // 4,946 writes (some to the same lbn): every live lbn's block went out, in a handful of runs.
    assert.ok(dataBlocks >= liveData.size * 0.95, `${dataBlocks} data blocks in runs of 2 or more, of ${liveData.size} live lbns written`);
    assert.ok(dataRuns <= 16, `${dataRuns} data runs: the window was not sorted by pba`);
  });

  for (const kind of ['file', 'memory'] as const) {
    it(`born-after by runs (${kind} device): a level-0 buffer is reused only once every run in it was released; a held run never changes`, async () => {
      const blocks = 16384;
      const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-born-'));
      try {
        // The file device reads and checksums a run in one pool job (preadCrc); memory reads then checksums.
        const dev: BlockDevice = kind === 'file' ? await FileBlockDevice.create(path.join(tmp, 'm'), blocks) : new MemoryBlockDevice(blocks);
        await BlockTree.format(dev, { sizeBytes: SIZE, volumeUuid: UUID });
        const t = await BlockTree.open(dev);
        // 40 level-0 nodes (168 lbns each), 2 runs of data in each: written by two CPs, so
        // the two parts of a node are far apart on the device.
        const lbns: number[] = [];
        for (const ks of [[0, 1, 2, 3, 4], [10, 11, 12]]) {
          const part: number[] = [];
          for (let n = 0; n < 40; n++) for (const k of ks) part.push(n * 168 + k);
          await t.commitCp(part.map((l) => ({ lbn: l, data: block(l) })), { nvlogSeq: lbns.length + 1, nvlogEpoch: 1 });
          lbns.push(...part);
        }
        const v = t.pinCommitted();
        const held: Array<{ run: BornRun; copy: Buffer }> = [];
        const arrays = new Set<ArrayBuffer>();
        let dataRuns = 0;
        let emitted = 0;
        const byPba = new Map<number, number>();
        await walkBornAfterRuns(v, -1, async (run) => {
          emitted += run.ptrs.length;
          run.ptrs.forEach((p, k) => {
            assert.equal(crc32c(run.buf.subarray(k * B, (k + 1) * B)), p.crc, `block at pba ${p.pba} is what its pointer says`);
            byPba.set(p.pba, crc32c(run.buf.subarray(k * B, (k + 1) * B)));
          });
          if (run.ptrs.length >= 3) {
            dataRuns++;
            arrays.add(run.buf.buffer as ArrayBuffer);
          }
          if (dataRuns <= 40) held.push({ run, copy: Buffer.from(run.buf) }); // the first 20 nodes' runs: held to the end
          else run.release();
        });
        // Held runs are intact after 20 more nodes were read; the later ones reused released buffers.
        held.forEach(({ run, copy }, i) => assert.ok(run.buf.equals(copy), `held run ${i} changed under its holder`));
        assert.equal(dataRuns, 80, 'two data runs per level-0 node');
        assert.ok(arrays.size < 40, `the last 20 nodes' data went to ${arrays.size - 20} buffers: released ones were not reused`);
        assert.ok(arrays.size >= 20, 'held buffers were reused');
        for (const h of held) h.run.release();
        assert.throws(() => held[0]!.run.release(), /released twice/);
        // Every data block and the metadata reached the walk once.
        assert.equal(byPba.size, emitted);
        assert.ok(emitted >= lbns.length + 40);
        v.release();
        await t.close();
      } finally {
        fs.rmSync(tmp, { recursive: true, force: true });
      }
    });
  }
});
