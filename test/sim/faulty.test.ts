/**
 * The simulator's building blocks on their own: the fault-injecting wrappers over a real
 * MemoryBlockDevice / MemoryNvram, the simulated clock and the seeded generator.
 */
import { strict as assert } from 'assert';
import { MemoryBlockDevice } from '../../src/io/memory-device';
import { MemoryNvram } from '../../src/nvlog/memory-region';
import { FaultInjector, FaultyBlockDevice, FaultyNvramRegion, InjectedIoError, NO_FAULTS } from '../../src/sim/faulty-device';
import { SimClock, SimStallError } from '../../src/sim/clock';
import { SeededRandom, hash32 } from '../../src/sim/random';

const BS = 4096;
const all = (p: number) => ({ ...NO_FAULTS, readError: p, writeError: p, syncError: p, discardError: p, persistError: p });

describe('simulator building blocks', () => {
  it('SeededRandom replays by seed, forks independently, stays in range', () => {
    const a = new SeededRandom(42);
    const b = new SeededRandom(42);
    const xs = Array.from({ length: 1000 }, () => a.next());
    assert.deepEqual(Array.from({ length: 1000 }, () => b.next()), xs);
    assert.ok(xs.every((x) => x >= 0 && x < 1));
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
    const c = new SeededRandom(42);
    c.fork(1).next();
    assert.equal(c.next(), xs[0]); // forking does not advance the parent
    assert.notEqual(new SeededRandom(42).fork(1).next(), new SeededRandom(42).fork(2).next());
    assert.notEqual(hash32(1, 2), hash32(2, 1));
    for (let i = 0; i < 100; i++) assert.ok(a.range(3, 5) >= 3 && a.range(3, 5) <= 5);
  });

  it('SimClock fires timers in due order only when driven, cancels, and reports hangs', async () => {
    const clock = new SimClock(0);
    const fired: string[] = [];
    clock.setTimeout(() => fired.push('b'), 20);
    clock.setTimeout(() => fired.push('a'), 10);
    const c = clock.setTimeout(() => fired.push('never'), 15);
    clock.setTimeout(() => fired.push('a2'), 10);
    c.cancel();
    await new Promise((r) => setTimeout(r, 5));
    assert.equal(fired.length, 0); // real time does not move simulated time
    await clock.run(clock.sleep(12));
    assert.deepEqual(fired, ['a', 'a2']);
    assert.equal(clock.nowMs(), 12);
    await clock.advanceBy(100);
    assert.deepEqual(fired, ['a', 'a2', 'b']);
    assert.equal(clock.nowMs(), 112);
    clock.setTimeout(() => fired.push('dead'), 1);
    clock.cancelAll();
    assert.equal(clock.pendingTimers, 0);
    await assert.rejects(clock.run(new Promise<void>(() => undefined)), SimStallError);
    assert.deepEqual(fired, ['a', 'a2', 'b']);
  });

  it('with faults disabled the wrappers pass everything through', async () => {
    const clock = new SimClock(0);
    const inj = new FaultInjector(1, all(1));
    inj.enabled = false;
    const mem = new MemoryBlockDevice(16);
    const dev = new FaultyBlockDevice(mem, { injector: inj, clock, name: 'd' });
    const data = Buffer.alloc(2 * BS, 7);
    await dev.writeBlocks(3, data);
    await dev.sync();
    const out = Buffer.alloc(2 * BS);
    await dev.readBlocks(3, 2, out);
    assert.deepEqual(out, data);
    await dev.discard(3, 1);
    assert.equal(mem.peekBlock(3).every((x) => x === 0), true);
    const region = new FaultyNvramRegion(new MemoryNvram(8192), { injector: inj, clock, name: 'n' });
    await region.persist(0, 4096);
    assert.equal(inj.errorsInjected, 0);
  });

  it('injects EIO per kind, torn writes leave a prefix, corruption flips one bit of the copy only', async () => {
    const clock = new SimClock(0);
    const mem = new MemoryBlockDevice(64);
    const base = Buffer.alloc(8 * BS, 0x5a);
    await mem.writeBlocks(0, base);
    const inj = new FaultInjector(9, all(1));
    const dev = new FaultyBlockDevice(mem, { injector: inj, clock, name: 'd' });
    await assert.rejects(dev.readBlocks(0, 1, Buffer.alloc(BS)), (e: unknown) => e instanceof InjectedIoError && e.code === 'EIO');
    await assert.rejects(dev.sync(), InjectedIoError);
    await assert.rejects(dev.discard(0, 1), InjectedIoError);
    const torn: number[] = [];
    for (let i = 0; i < 20; i++) {
      const pba = 16 + (i % 6) * 8;
      const data = Buffer.alloc(4 * BS, i + 1);
      await assert.rejects(dev.writeBlocks(pba, data), InjectedIoError);
      let n = 0;
      while (n < 4 && mem.peekBlock(pba + n)[0] === i + 1) n++;
      for (let k = n; k < 4; k++) assert.notEqual(mem.peekBlock(pba + k)[0], i + 1, 'not a prefix');
      torn.push(n);
    }
    assert.ok(new Set(torn).size > 1, `torn prefixes ${torn}`);
    await assert.rejects(new FaultyNvramRegion(new MemoryNvram(8192), { injector: inj, clock, name: 'n' }).persist(0, 4096), InjectedIoError);
    assert.equal(inj.counts.write, 20);

    inj.rates = { ...NO_FAULTS, corruptRead: 1 };
    const out = Buffer.alloc(8 * BS);
    await dev.readBlocks(0, 8, out);
    let bits = 0;
    for (let i = 0; i < out.length; i++) bits += ((out[i]! ^ 0x5a).toString(2).match(/1/g) ?? []).length;
    assert.equal(bits, 1);
    assert.deepEqual(mem.peekBlock(0), Buffer.alloc(BS, 0x5a));
  });

  it('decisions replay by seed and address, whatever the order of calls', async () => {
    const pattern = async (order: number[]): Promise<Map<number, boolean>> => {
      const inj = new FaultInjector(5, { ...NO_FAULTS, readError: 0.5 });
      const dev = new FaultyBlockDevice(new MemoryBlockDevice(64), { injector: inj, clock: new SimClock(0), name: 'd' });
      const m = new Map<number, boolean>();
      for (const pba of order) m.set(pba, await dev.readBlocks(pba, 1, Buffer.alloc(BS)).then(() => false, () => true));
      return m;
    };
    const fwd = Array.from({ length: 40 }, (_, i) => i);
    const a = await pattern(fwd);
    const b = await pattern([...fwd].reverse());
    assert.deepEqual([...b].sort((x, y) => x[0] - y[0]), [...a].sort((x, y) => x[0] - y[0]));
    const failures = [...a.values()].filter(Boolean).length;
    assert.ok(failures > 5 && failures < 35, `${failures} of 40`);
  });

  it('latency resolves on simulated time; after crash() nothing reaches the device', async () => {
    const clock = new SimClock(0);
    const inj = new FaultInjector(3, { ...NO_FAULTS, latency: 1, latencyMsMax: 50 });
    const mem = new MemoryBlockDevice(8);
    const dev = new FaultyBlockDevice(mem, { injector: inj, clock, name: 'd' });
    let done = false;
    const p = dev.writeBlocks(1, Buffer.alloc(BS, 1)).then(() => { done = true; });
    await new Promise((r) => setImmediate(r));
    assert.equal(done, false);
    assert.equal(clock.pendingTimers, 1);
    await clock.run(p);
    assert.ok(clock.nowMs() >= 1 && clock.nowMs() <= 50);
    assert.equal(mem.peekBlock(1)[0], 1);
    const q = dev.writeBlocks(2, Buffer.alloc(BS, 2));
    dev.crash();
    await clock.advanceBy(100);
    let settled = false;
    q.then(() => { settled = true; }, () => { settled = true; });
    await new Promise((r) => setImmediate(r));
    assert.equal(settled, false);
    assert.equal(mem.peekBlock(2)[0], 0);
  });
});
