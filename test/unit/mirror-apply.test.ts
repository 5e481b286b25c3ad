/**
 * CpApplier (src/mirror/apply.ts) against a real mirror directory: the frames of a CP
 * that a confused or hostile source may send out of place are refused with a message
 * that names the problem, before anything is committed: a CP on a base the mirror does
 * not hold, blocks outside CP_BEGIN/CP_COMMIT, a CP beginning inside another, a
 * reference to a record the log does not hold (or with another checksum), a delta that
 * does not rebuild the block the source announced, a block outside the device, a commit
 * that counts other blocks than arrived, an abort of a baseline. The mirror's committed
 * CP never moves. (The whole stream, with valid commits, runs in test/mirror.)
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { crc32c } from '../../src/io/native';
import { CpApplier } from '../../src/mirror/apply';
import { encodeDelta, ZERO_BLOCK, DELTA_FROM_ZEROES } from '../../src/mirror/delta';
import { MirrorDir } from '../../src/mirror/mirror-dir';
import { SlabPool } from '../../src/mirror/slab-pool';
import { BLOCK_BYTES, MsgType } from '../../src/mirror/wire';
import { Slicer } from '../../src/util/work';

const UUID = 'c0ffee00-1111-4222-8333-444455556666';
const DEVICE_BLOCKS = 8192;

function block(fill: number): Buffer {
  const b = Buffer.alloc(BLOCK_BYTES, fill);
  b.writeUInt32LE(0x4e564d00 + fill, 0);
  return b;
}

describe('mirror: applying CP frames (apply.ts) refuses what is out of place', () => {
  let tmp: string;
  let mirror: MirrorDir;
  let applier: CpApplier;
  const log = pino({ level: 'silent' });

  beforeEach(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-apply-'));
    mirror = await MirrorDir.openOrCreate(tmp, { sourceUuid: UUID, sizeBytes: 16 * 1024 * 1024, deviceBlocks: DEVICE_BLOCKS, nvramBytes: 8 * 1024 * 1024 }, log);
    applier = new CpApplier(mirror, new SlabPool(256 * 1024, 4), undefined, new Slicer(), log);
  });

  afterEach(async () => {
    await applier.idle();
    await mirror.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('a CP on a base the mirror does not hold, and blocks outside a CP, are refused', async () => {
    assert.equal(mirror.committedCp, -1);
    await assert.rejects(applier.begin({ type: MsgType.CpBegin, cp: 5, baseCp: 3, kind: 'cp' }), /CP 5 is built on CP 3, but this mirror holds CP -1/);
    await assert.rejects(applier.blocks({ type: MsgType.CpBlocks, cp: 5, pbas: [100], data: block(1) }), /blocks for CP 5 outside CP_BEGIN\/CP_COMMIT/);
    await assert.rejects(applier.refs({ type: MsgType.CpRefs, cp: 5, refs: [{ pba: 100, seq: 1, index: 0, crc: 0 }] }), /outside CP_BEGIN\/CP_COMMIT/);
    await assert.rejects(applier.commit({ type: MsgType.CpCommit, cp: 5, slot: 0, blockCount: 0, superblock: Buffer.alloc(BLOCK_BYTES) }), /outside CP_BEGIN\/CP_COMMIT/);
    await assert.rejects(applier.begin({ type: MsgType.CpBegin, cp: 9, baseCp: 3, kind: 'resume' }), /resume of a baseline toward CP 9, but this mirror has none in progress/);
    assert.equal(mirror.committedCp, -1);
    assert.equal(mirror.baselinePartial, false, 'nothing began');
  });

  it('inside a baseline: bad references, deltas, pbas, a second CP_BEGIN, a wrong count and an abort are refused; the committed CP stays', async () => {
    await applier.begin({ type: MsgType.CpBegin, cp: 1, baseCp: -1, kind: 'resync' });
    assert.equal(mirror.baselinePartial, true);
    // Contiguous and scattered blocks are taken (written at their pbas at the commit or when a run fills).
    const data = Buffer.concat([block(1), block(2), block(3), block(4)]);
    await applier.blocks({ type: MsgType.CpBlocks, cp: 1, pbas: [100, 101, 102, 200], data });
    assert.equal(mirror.blocksApplied, 4);
    await assert.rejects(applier.begin({ type: MsgType.CpBegin, cp: 2, baseCp: 1, kind: 'cp' }), /CP 2 begins while CP 1 is being applied/);
    await assert.rejects(applier.blocks({ type: MsgType.CpBlocks, cp: 2, pbas: [300], data: block(5) }), /blocks for CP 2 outside/);
    // A reference needs the record in the log.
    await assert.rejects(applier.refs({ type: MsgType.CpRefs, cp: 1, refs: [{ pba: 300, seq: 7, index: 0, crc: 0 }] }), /CP 1: reference to record 7 is not in the log/);
    // A delta must rebuild exactly the block whose crc32c the source sent.
    // (a new metadata block: mostly zeroes, a few words set)
    const want = Buffer.alloc(BLOCK_BYTES);
    want.writeUInt32LE(0x4e564d09, 0);
    want.writeUInt32LE(77, 1024);
    const delta = encodeDelta(ZERO_BLOCK, want);
    assert.ok(delta);
    await assert.rejects(
      applier.deltas({ type: MsgType.CpDeltas, cp: 1, deltas: [{ pba: 400, prevPba: DELTA_FROM_ZEROES, crc: (crc32c(want) ^ 1) >>> 0, delta }] }),
      /CP 1: block at pba 400 rebuilt from pba 0 has crc [0-9a-f]+, the source says [0-9a-f]+/,
    );
    await assert.rejects(
      applier.deltas({ type: MsgType.CpDeltas, cp: 1, deltas: [{ pba: 400, prevPba: DELTA_FROM_ZEROES, crc: crc32c(want), delta: Buffer.from([0xff, 0xff, 0x01, 0x00]) }] }),
      /CP 1: delta for pba 400: /,
    );
    await applier.deltas({ type: MsgType.CpDeltas, cp: 1, deltas: [{ pba: 400, prevPba: DELTA_FROM_ZEROES, crc: crc32c(want), delta }] });
    assert.equal(mirror.deltasApplied, 1);
    // Blocks outside the device (or on the superblock ring) are refused as they arrive.
    await assert.rejects(applier.blocks({ type: MsgType.CpBlocks, cp: 1, pbas: [DEVICE_BLOCKS], data: block(6) }), /CP block at pba 8192 outside \[\d+, 8192\)/);
    await assert.rejects(applier.blocks({ type: MsgType.CpBlocks, cp: 1, pbas: [0], data: block(6) }), /CP block at pba 0 outside/);
    // The commit must count what arrived (4 blocks and 1 delta).
    await assert.rejects(applier.commit({ type: MsgType.CpCommit, cp: 1, slot: 0, blockCount: 6, superblock: Buffer.alloc(BLOCK_BYTES) }), /CP 1: 5 blocks arrived, the commit says 6/);
    // Only a CP may be abandoned, never a baseline or a resync.
    await assert.rejects(applier.abort({ type: MsgType.CpAbort, cp: 1 }), /abort of a resync toward CP 1: only a CP may be abandoned/);
    assert.equal(mirror.committedCp, -1, 'nothing was committed');
  });
});
