/**
 * The engine's block map for the NBD threads (src/volume/engine-read-map.ts,
 * native/read_map.h), below the NBD layer (test/unit/nbd-native.test.ts drives it through
 * real connections, racing READs with WRITEs and CPs):
 * - a read's leaves are put only if no append and no CP came between the read's start
 *   and the fill; lbns the log holds are left out; a leaf walked again puts nothing new
 *   until the next append or CP;
 * - pointers that do not decode (flags, a pba outside the device, the superblock ring)
 *   are not put; a closed map puts nothing and has let go of its member fd; the addon
 *   re-checks its arguments.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { EngineReadMap } from '../../src/volume/engine-read-map';
import { addon } from '../../src/io/native';
import { FANOUT, NODE_HEADER_BYTES, PTR_BYTES, PTR_FLAG_PRESENT } from '../../src/tree/layout';
import { writeU64 } from '../../src/util/bytes';

const SIZE_BYTES = 16 * 1024 * 1024;
const DEVICE_BLOCKS = 8192;
const none = (): ((lbn: number) => boolean) => () => false;

/** A level-0 address block: slot i -> pba (0: a hole). */
function leaf(pbas: number[]): Buffer {
  const b = Buffer.alloc(4096);
  pbas.forEach((pba, i) => {
    if (pba === 0) return;
    const at = NODE_HEADER_BYTES + i * PTR_BYTES;
    writeU64(b, at, pba);
    writeU64(b, at + 8, 1);
    b.writeUInt32LE(0x1234, at + 16);
    b.writeUInt16LE(PTR_FLAG_PRESENT, at + 20);
  });
  return b;
}

describe('engine read map (the NBD threads\' map of the live tree)', function () {
  let dir: string;
  let fd: number;
  let map: EngineReadMap;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-readmap-'));
    fd = fs.openSync(path.join(dir, 'member.img'), 'w+');
    map = EngineReadMap.create(fd, SIZE_BYTES, DEVICE_BLOCKS);
  });
  afterEach(() => {
    map.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('puts a read\'s leaves only if no CP came since the read began, without the lbns an append dropped meanwhile', () => {
    const leaves = new Map([[0, leaf([])], [FANOUT, leaf([100, 101])]]);
    let t = map.token(7);
    assert.equal(map.fill(t, 8, leaves, none), 0, 'a CP committed between');
    t = map.token(8);
    map.changed(5, 1); // an append during the read
    map.changed(FANOUT + 1, 2);
    assert.equal(map.fill(t, 8, leaves, none), 2 * FANOUT - 3, 'every slot of both leaves but the three lbns appended meanwhile');
    assert.equal(map.fill(map.token(8), 8, leaves, none), 0, 'the same leaves again put nothing new (the appended lbns stay in the log until a CP)');
    assert.equal(map.fill(map.token(9), 9, leaves, none), 2 * FANOUT, 'after a CP they are put again');
    t = map.token(9);
    map.clear();
    assert.equal(map.fill(t, 9, leaves, none), 0, 'a clear between: nothing');
    t = map.token(9);
    for (let i = 0; i < 5000; i++) map.changed(10 * FANOUT, 1);
    assert.equal(map.fill(t, 9, leaves, none), 0, 'more drops between than the map remembers: nothing');
  });

  it('leaves out the lbns the log holds', () => {
    const held = new Set([FANOUT, FANOUT + 1, 2 * FANOUT - 1]);
    let asked: [number, number] | undefined;
    const put = map.fill(map.token(1), 1, new Map([[FANOUT, leaf([100])]]), (from, to) => {
      asked = [from, to];
      return (l) => held.has(l);
    });
    assert.deepEqual(asked, [FANOUT, 2 * FANOUT]);
    assert.equal(put, FANOUT - 3);
  });

  it('does not put pointers that do not decode, nor lbns past the volume\'s end', () => {
    const bad = leaf([100, DEVICE_BLOCKS, 3, 200]); // slot 1 past the device, slot 2 in the ring
    bad.writeUInt16LE(2, NODE_HEADER_BYTES + 3 * PTR_BYTES + 20); // slot 3: unknown flags
    bad.writeUInt8(1, NODE_HEADER_BYTES + 4 * PTR_BYTES + 9); // slot 4: a hole with a non-zero field
    assert.equal(map.fill(map.token(1), 1, new Map([[0, bad]]), none), FANOUT - 4);
    const lastBase = Math.floor(SIZE_BYTES / 4096 / FANOUT) * FANOUT;
    assert.equal(map.fill(map.token(2), 2, new Map([[lastBase, leaf([])]]), none), SIZE_BYTES / 4096 - lastBase, 'the last leaf up to the end');
  });

  it('leaves out an lbn a thread\'s append dropped after the read began, though the log did not tell', () => {
    const leaves = new Map([[0, leaf([100, 101])]]);
    const t = map.token(3);
    (addon() as unknown as { nbdReadMapDrop(m: object, lbn: number, n: number): void }).nbdReadMapDrop(map.handle, 1, 1);
    assert.equal(map.fill(t, 3, leaves, none), FANOUT - 1, 'skipped natively: the drop is in the map\'s memory');
    assert.equal(map.fill(map.token(3), 3, leaves, none), 0, 'and the leaf is marked as put');
  });

  it('puts nothing once closed, and closing releases its copy of the member fd at once', () => {
    const fds = (): number => fs.readdirSync('/proc/self/fd').length;
    const before = fds();
    const other = EngineReadMap.create(fd, SIZE_BYTES, DEVICE_BLOCKS);
    assert.equal(fds(), before + 1, 'the map holds a dup of the fd');
    other.close();
    assert.equal(fds(), before, 'closed with the map, not at garbage collection');
    map.close();
    assert.equal(map.fill(map.token(1), 1, new Map([[0, leaf([])]]), none), 0);
  });

  it('the addon re-checks its arguments', () => {
    type Raw = Record<string, (...a: unknown[]) => unknown>;
    const raw = addon() as unknown as Raw;
    const call = (fn: string, ...args: unknown[]): unknown => (raw[fn] as (...a: unknown[]) => unknown)(...args);
    assert.throws(() => call('nbdReadMapNew', -1, SIZE_BYTES, DEVICE_BLOCKS, 12), RangeError, 'a bad fd');
    assert.throws(() => call('nbdReadMapNew', fd, SIZE_BYTES, DEVICE_BLOCKS, 30), RangeError, 'too many slots');
    const h = map.handle;
    assert.throws(() => call('nbdReadMapPutLeaf', h, Buffer.alloc(4095), 0, Buffer.alloc(FANOUT), 0), RangeError, 'a short node');
    assert.throws(() => call('nbdReadMapPutLeaf', h, Buffer.alloc(4096), 1, Buffer.alloc(FANOUT), 0), RangeError, 'a base inside a leaf');
    assert.throws(() => call('nbdReadMapPutLeaf', h, Buffer.alloc(4096), 0, Buffer.alloc(3), 0), RangeError, 'a short skip mask');
    for (const fn of ['nbdReadMapPutLeaf', 'nbdReadMapDrop', 'nbdReadMapClear', 'nbdReadMapClose', 'nbdReadMapStats']) {
      assert.throws(() => call(fn, {}, Buffer.alloc(4096), 0, Buffer.alloc(FANOUT)), TypeError, fn);
    }
    assert.throws(() => call('nbdServeDirectEngine', {}, h, 2), TypeError, 'not a connection');
    assert.deepEqual(call('nbdReadMapStats', h), [0, 0, 0]);
  });
});
