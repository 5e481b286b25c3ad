/**
 * The NVRAM log with the NBD threads' native appender (src/nvlog/native-append.ts,
 * native/nv_append.h): records the appender writes are the log's own format, in one seq
 * order with the log's appends, indexed before anything reads the log, never written
 * while the log holds the half, and replayed after a crash like any other.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { MmapNvram } from '../../src/io/mmap-nvram';
import { NvLog } from '../../src/nvlog/log';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import type { NvramRegion } from '../../src/io/types';
import { RecordType } from '../../src/nvlog/format';
import { scanRegion } from '../../src/nvlog/replay';
import { addon } from '../../src/io/native';
import { crc32c } from '../../src/io/checksum';
import { prng, seedFromEnv } from '../crash/harness';
import { logged } from './nvlog-helpers';

const UUID = '0123abcd-0000-4000-8000-00000000cafe';
const BS = 4096;
const VOLUME_BYTES = 64 * BS;

function block(fill: number, blocks = 1): Buffer {
  return Buffer.alloc(BS * blocks, fill & 0xff);
}

async function freshLog(region: NvramRegion): Promise<NvLog> {
  await NvLog.format(region, UUID);
  const log = NvLog.open(region, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: false });
  await log.beginEpoch();
  return log;
}

describe('nvlog: native appends (the NBD threads)', () => {
  it('shares one seq order with the log, is indexed before any lookup, and replays after a crash', async () => {
    const region = new MemoryNvram(1024 * 1024);
    const log = await freshLog(region);
    const seen: number[] = [];
    log.onAppend = (r) => {
      seen.push(r.seq);
      if (r.type === RecordType.Write) assert.equal(Buffer.concat(r.payload as Buffer[]).length, r.lengthBytes, 'the hook gets the payload');
    };
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    assert.ok(na.append(0, block(1)), 'thread append 1');
    assert.ok(na.append(2 * BS, block(2, 2)), 'thread append 2 (two blocks)');
    assert.equal(await log.appendWrite(BS, [block(3)], 0), 3, 'the log appends after the threads: seq 3');
    assert.ok(na.append(BS, block(4)), 'thread append after the log: seq 4, overwrites lbn 1');
    await log.appendZero(RecordType.Zero, 3 * BS, BS, 0);
    assert.equal(log.lastSeq, 5);
    assert.deepEqual(logged(log, 0), block(1));
    assert.deepEqual(logged(log, 1), block(4), 'the newest record wins, whoever wrote it');
    assert.deepEqual(logged(log, 2), block(2));
    assert.equal(logged(log, 3), 'zero');
    assert.deepEqual(seen, [1, 2, 3, 4, 5], 'the append hook saw every record in seq order');
    assert.equal(na.appends, 3);

    // kill -9: the region as it is (MAP_SHARED pages survive); replay finds every record.
    const copy = new MemoryNvram(region.sizeBytes, region.buffer);
    const scan = scanRegion(copy, UUID, 0);
    assert.deepEqual(scan.chain.map((r) => r.header.seq), [1, 2, 3, 4, 5]);
    assert.equal(scan.damage, undefined);
    assert.equal(scan.unflushedGap, undefined);
    const after = NvLog.open(copy, { volumeUuid: UUID, committed: { nvlogSeq: 0, nvlogEpoch: 0 }, readOnly: true });
    assert.deepEqual(logged(after, 1), block(4));
    assert.deepEqual(logged(after, 2), block(2));
    assert.equal(logged(after, 3), 'zero');
    log.close();
  });

  it('hands the log the crc32c of each block the threads append (the CP takes it as is); the log\'s own records leave theirs to the CP', async () => {
    const log = await freshLog(new MemoryNvram(1024 * 1024));
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    const data = Buffer.alloc(3 * BS);
    for (let i = 0; i < data.length; i += 7) data[i] = (i * 31 + 5) & 0xff;
    assert.ok(na.append(4 * BS, data), 'thread append of three blocks');
    await log.appendWrite(10 * BS, [block(9)], 0);
    assert.ok(na.append(11 * BS, block(7)), 'thread append after the log\'s');
    assert.deepEqual(logged(log, 5), data.subarray(BS, 2 * BS), 'the lookup takes the threads\' records in');
    const half = log.halves[0];
    for (const lbn of [4, 5, 6, 11]) {
      const off = half.index.blocks.get(lbn)!;
      assert.equal(half.blockCrc(off), crc32c(logged(log, lbn) as Buffer), `crc of lbn ${lbn}`);
    }
    const own = half.index.blocks.get(10)!;
    assert.equal(half.blockCrc(own), undefined, 'a record the log wrote: the CP checksums it');
    const off4 = half.index.blocks.get(4)!;
    half.reset();
    assert.equal(half.blockCrc(off4), undefined, 'a reset half knows no checksum');
    na.close();
    log.close();
  });

  it('a thread\'s record after a flush proves the flushed ones durable (replay tells mid-log damage from a torn tail)', async () => {
    const region = new MemoryNvram(1024 * 1024);
    const log = await freshLog(region);
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    for (let i = 0; i < 4; i++) assert.ok(na.append(i * BS, block(i + 1)));
    await log.flush();
    assert.ok(na.append(8 * BS, block(9)));
    assert.equal(log.lastSeq, 5);
    const scan = scanRegion(new MemoryNvram(region.sizeBytes, region.buffer), UUID, 0);
    assert.equal(scan.chain[4]!.header.durableSeq, 4, 'seq 5 says seqs 1..4 were durable');
    // Damage seq 2's payload: seqs 2..4 were flushed, so this is mid-log damage, not a torn tail.
    const copy = new MemoryNvram(region.sizeBytes, region.buffer);
    const at = scan.chain[1]!.payloadOffset;
    copy.buffer[at + 7] = copy.buffer[at + 7]! ^ 0xff;
    const damaged = scanRegion(copy, UUID, 0);
    assert.deepEqual(damaged.damage, { firstLostSeq: 2, lastLostSeq: 5, lastDurableLostSeq: 4, validRecordsAfter: 3 });
    log.close();
  });

  it('appends nothing into a frozen half: a freeze takes the threads\' records in and moves them to the other half', async () => {
    const region = new MemoryNvram(1024 * 1024);
    const log = await freshLog(region);
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    for (let i = 0; i < 5; i++) assert.ok(na.append(i * BS, block(10 + i)));
    assert.ok(log.freezeActive());
    const frozen = log.frozenHalf();
    assert.ok(frozen);
    assert.equal(frozen.records, 5, 'the frozen half holds every record the threads wrote before the freeze');
    assert.equal(frozen.lastSeq, 5);
    assert.ok(na.append(6 * BS, block(20)), 'the threads go on in the new active half');
    assert.equal(log.lastSeq, 6);
    assert.equal(frozen.records, 5, 'and nothing more lands in the frozen one');
    assert.deepEqual(logged(log, 6), block(20));
    log.releaseFrozen(frozen);
    assert.deepEqual(logged(log, 6), block(20));
    log.close();
  });

  it('refuses what is not whole blocks inside the volume, beyond a record, while blocked, when full, and after close', async () => {
    const region = new MemoryNvram(1024 * 1024); // halves of ~512 KiB: records of at most 128 KiB
    const log = await freshLog(region);
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    assert.equal(na.append(100, block(1)), false, 'unaligned offset');
    assert.equal(na.append(0, Buffer.alloc(BS + 512)), false, 'partial block');
    assert.equal(na.append(0, Buffer.alloc(0)), false, 'empty');
    assert.equal(na.append(VOLUME_BYTES - BS, block(1, 2)), false, 'beyond the volume');
    assert.equal(na.append(0, block(1, 64)), false, 'larger than a record may be (256 KiB)');
    log.setNativeBlocked('test', true);
    assert.equal(na.append(0, block(1)), false, 'blocked');
    log.setNativeBlocked('test', false);
    assert.ok(na.append(0, block(1)), 'unblocked');
    // Fill the active half: the threads stop at its end (the log, not they, switches halves).
    let n = 1;
    while (na.append((n % 64) * BS, block(n, 1))) n++;
    const used = log.stats().activeUsedBytes;
    assert.ok(used + 64 + BS > log.stats().halfSizeBytes, `the half is full (${used} bytes used)`);
    assert.equal(await log.appendWrite(0, [block(99)], 0), n + 1, 'the log switches halves for its own append');
    assert.ok(na.append(BS, block(98)), 'and the threads append into the new half');
    assert.equal(log.lastSeq, n + 2);
    // A region that is not a file: the threads leave FLUSH to the log.
    assert.equal(na.flush(), 0, 'no FLUSH on the threads for a memory region');
    assert.equal(na.setFlushFile('/nonexistent/nvram'), false, 'a file that does not open is refused');
    assert.equal(na.flush(), 0);
    const raw = addon() as unknown as Record<string, (...a: unknown[]) => unknown>;
    assert.throws(() => raw.nbdAppenderFlushFile!(na.handle, 5), TypeError, 'a path that is not a string');
    assert.throws(() => raw.nbdAppenderFlushFile!(na.handle, ''), TypeError, 'an empty path');
    assert.throws(() => raw.nbdAppenderFlush!({}), TypeError, 'not an appender');
    log.disableNativeAppends();
    assert.equal(na.append(0, block(1)), false, 'closed');
    assert.throws(() => raw.nbdAppenderAppend!({}, 0, block(1)), TypeError, 'not an appender');
    assert.throws(() => raw.nbdAppenderNew!(region.buffer, 1, 2, 100, VOLUME_BYTES, null), RangeError, 'a record cap below a block');
    assert.throws(() => raw.nbdServeDirectEngine!({}, null, null, 3), TypeError, 'not a connection');
    log.close();
  });

  it('stores records with pwrite while FLUSHes come often and through the mapping otherwise: the same bytes either way', async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-native-store-'));
    try {
      const region = await MmapNvram.open(path.join(tmp, 'nvram.log'), { sizeBytes: 1024 * 1024, create: true });
      const log = await freshLog(region);
      const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
      assert.ok(na.setFlushFile(region.path));
      assert.ok(na.append(0, block(1)), 'an append before any FLUSH');
      assert.equal(na.fileStores, 0, 'no FLUSH yet: stored through the mapping');
      // A FLUSH round, then appends right after it: through the file. (Each pair is tried
      // many times so that a stall of the test process longer than the window cannot fail it.)
      for (let i = 0; i < 20; i++) {
        assert.equal(na.flush(), 1);
        assert.ok(na.append((2 + 2 * i) * BS, block(10 + i, 2)));
      }
      assert.ok(na.fileStores >= 1, `stored through the file: ${na.fileStores} of 20`);
      await new Promise((r) => setTimeout(r, 20));
      const before = na.fileStores;
      assert.ok(na.append(50 * BS, block(50)));
      assert.equal(na.fileStores, before, 'long after the last FLUSH: through the mapping again');
      assert.equal(na.appends, 22);
      // Whichever way each went, the log reads them back, and the file, the mapping and
      // replay agree on every record.
      assert.deepEqual(logged(log, 0), block(1));
      for (let i = 0; i < 20; i++) {
        assert.deepEqual(logged(log, 2 + 2 * i), block(10 + i), `lbn ${2 + 2 * i}`);
        assert.deepEqual(logged(log, 3 + 2 * i), block(10 + i), `lbn ${3 + 2 * i}`);
      }
      assert.deepEqual(logged(log, 50), block(50));
      const onDisk = fs.readFileSync(region.path);
      assert.ok(onDisk.equals(region.buffer), 'the file and the mapping hold the same bytes');
      const scan = scanRegion(new MemoryNvram(onDisk.length, onDisk), UUID, 0);
      assert.deepEqual(scan.chain.map((r) => r.header.seq), Array.from({ length: 22 }, (_, i) => i + 1));
      assert.equal(scan.damage, undefined);
      log.close();
      await region.close();
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });

  it('keeps the threads out while writers wait for space, and lets them in again once the waiters are written', async () => {
    const region = new MemoryNvram(1024 * 1024);
    const log = await freshLog(region);
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    // Fill both halves with the log's own appends: the next one waits for a CP.
    const big = block(7, 16);
    let seq = 0;
    for (;;) {
      const st = log.stats();
      if (st.activeUsedBytes + 64 + big.length > st.halfSizeBytes && log.frozenHalf() !== undefined) break;
      seq = await log.appendWrite(0, [big], 0);
    }
    const waiting = log.appendWrite(0, [big], 0);
    assert.equal(log.stats().spaceWaiters, 1);
    assert.equal(na.append(BS, block(1)), false, 'no thread append jumps the queue');
    log.releaseFrozen(log.frozenHalf()!);
    assert.equal(await waiting, seq + 1);
    assert.ok(na.append(BS, block(2)), 'the queue is empty again');
    assert.equal(log.lastSeq, seq + 2);
    log.close();
  });

  it('matches a model under random thread and log appends, freezes and releases (property, seeded)', async () => {
    const seed = seedFromEnv();
    const rnd = prng(seed);
    const region = new MemoryNvram(512 * 1024);
    const log = await freshLog(region);
    const na = log.enableNativeAppends(VOLUME_BYTES, undefined);
    const model = new Map<number, number>(); // lbn -> fill byte, as the log must show it
    let fill = 0;
    let committed = 0; // the last seq of the last half released (a CP's watermark)
    const release = (f: NonNullable<ReturnType<NvLog['frozenHalf']>>): void => {
      committed = f.lastSeq;
      log.releaseFrozen(f);
    };
    try {
      for (let step = 0; step < 3000; step++) {
        const r = rnd();
        const lbn = Math.floor(rnd() * 60);
        const blocks = 1 + Math.floor(rnd() * 4);
        fill = (fill + 1) & 0xff;
        if (r < 0.6) {
          if (na.append(lbn * BS, block(fill, blocks))) for (let k = 0; k < blocks; k++) model.set(lbn + k, fill);
        } else if (r < 0.8) {
          const p = log.appendWrite(lbn * BS, [block(fill, blocks)], 0);
          for (let k = 0; k < blocks; k++) model.set(lbn + k, fill);
          if (log.stats().spaceWaiters > 0) {
            const f = log.frozenHalf();
            if (f) release(f); // the CP "committed" it: the model keeps its blocks (the tree would)
          }
          await p;
        } else if (r < 0.9) {
          log.freezeActive();
        } else {
          const f = log.frozenHalf();
          if (f) {
            // A CP committed the frozen half: its blocks move to the "tree" (the model keeps them).
            release(f);
          }
        }
        // Every block the log still holds reads as the model says.
        if (step % 50 === 0) {
          for (let l = 0; l < 64; l++) {
            const got = logged(log, l);
            if (got instanceof Buffer) assert.equal(got[0], model.get(l), `seed ${seed} step ${step}: lbn ${l}`);
          }
        }
      }
      // Crash now: replay of the region holds contiguous seqs up to lastSeq (nothing torn, no gap).
      const last = log.lastSeq;
      const scan = scanRegion(new MemoryNvram(region.sizeBytes, region.buffer), UUID, committed);
      const seqs = scan.chain.map((c) => c.header.seq);
      assert.equal(seqs[0], committed + 1, `seed ${seed}: replay starts after the watermark`);
      assert.equal(seqs[seqs.length - 1], last, `seed ${seed}: replay reaches the last seq`);
      for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], seqs[i - 1]! + 1, `seed ${seed}: contiguous`);
      assert.ok(na.appends > 500, `seed ${seed}: the threads appended (${na.appends})`);
    } catch (e) {
      console.error(`      seed ${seed} (NVMIRROR_SEED=${seed} repeats it)`);
      throw e;
    }
    log.close();
  });
});
