/**
 * The metrics registry and exposition (src/metrics/registry.ts), the NBD observer's
 * metrics (src/metrics/nbd-metrics.ts) and the error kinds (src/nbd/errors.ts): the text
 * parses strictly, counters only go up, histograms are cumulative, label values are
 * escaped and bounded, and other code can register its own metrics.
 */
import { strict as assert } from 'assert';
import { MetricsRegistry, SERIES_PER_METRIC_MAX } from '../../src/metrics/registry';
import { NbdMetrics } from '../../src/metrics/nbd-metrics';
import { errorKind } from '../../src/nbd/errors';
import * as P from '../../src/nbd/protocol';
import { VolumeError } from '../../src/util/errors';
import { parseExposition } from '../e2e/exposition';
import { registerReceiverMetrics } from '../../src/mirror/metrics';
import type { ReceiverStats } from '../../src/mirror/receiver';

describe('metrics registry', function () {
  it('exposes counters, gauges and histograms in a text format that parses', function () {
    const r = new MetricsRegistry();
    const c = r.counter('t_requests_total', 'requests', ['command']);
    c.labels('read').inc();
    c.labels('read').inc(2);
    c.labels('write').inc();
    r.gauge('t_fill_ratio', 'fill').labels().set(0.25);
    const h = r.histogram('t_latency_seconds', 'latency', ['command'], [0.001, 0.01, 0.1]);
    for (const v of [0.0005, 0.005, 0.005, 0.05, 5]) h.labels('read').observe(v);
    const e = parseExposition(r.expose());
    assert.equal(e.get('t_requests_total', { command: 'read' }), 3);
    assert.equal(e.get('t_requests_total', { command: 'write' }), 1);
    assert.equal(e.get('t_fill_ratio'), 0.25);
    assert.equal(e.types.get('t_latency_seconds'), 'histogram');
    assert.equal(e.get('t_latency_seconds_bucket', { command: 'read', le: '0.001' }), 1);
    assert.equal(e.get('t_latency_seconds_bucket', { command: 'read', le: '0.01' }), 3);
    assert.equal(e.get('t_latency_seconds_bucket', { command: 'read', le: '0.1' }), 4);
    assert.equal(e.get('t_latency_seconds_bucket', { command: 'read', le: '+Inf' }), 5);
    assert.equal(e.get('t_latency_seconds_count', { command: 'read' }), 5);
    assert.ok(Math.abs((e.get('t_latency_seconds_sum', { command: 'read' }) ?? 0) - 5.0605) < 1e-9);
  });

  it('counters never go down: inc refuses negatives, setTotal ignores a lower total', function () {
    const c = new MetricsRegistry().counter('t_total', 'x').labels();
    c.setTotal(10);
    c.setTotal(7);
    assert.equal(c.get(), 10);
    assert.throws(() => c.inc(-1), /cannot go down/);
  });

  it('escapes label values and folds series beyond the cap into "other"', function () {
    const r = new MetricsRegistry();
    const c = r.counter('t_by_name_total', 'x', ['name']);
    c.labels('a "quoted"\\ name\nwith newline').inc();
    for (let i = 0; i < SERIES_PER_METRIC_MAX + 10; i++) c.labels(`n${i}`).inc();
    const e = parseExposition(r.expose());
    assert.equal(e.get('t_by_name_total', { name: 'a "quoted"\\ name\nwith newline' }), 1);
    assert.equal(e.samples.filter((s) => s.name === 't_by_name_total').length, SERIES_PER_METRIC_MAX + 1);
    assert.equal(e.get('t_by_name_total', { name: 'other' }), 11);
  });

  it('lets other parts register metrics and collectors; a failing collector is skipped', function () {
    const r = new MetricsRegistry();
    let lag = 0;
    const g = r.gauge('t_mirror_lag_cps', 'set by a collector').labels();
    r.onCollect(() => g.set(lag));
    r.onCollect(() => {
      throw new Error('closing');
    });
    lag = 3;
    assert.equal(parseExposition(r.expose()).get('t_mirror_lag_cps'), 3);
    assert.throws(() => r.gauge('t_mirror_lag_cps', 'again'), /registered twice/);
    assert.throws(() => r.gauge('bad-name', 'x'), /bad metric name/);
  });
});

describe('receiver metrics (receive --metrics)', function () {
  it('one series per mirror the receiver has open; a mirror it no longer has leaves the exposition', function () {
    const mirror = (uuid: string, cp: number): ReceiverStats['mirrors'][number] => ({
      sourceUuid: uuid, dir: `/m/${uuid}`, connected: true, committedCp: cp, root: '', heldSeq: 0, durableSeq: 0, logUsedBytes: 4096, recordsStored: 10, recordsDropped: 0, blocksServedFromSource: 0, blocksHealed: 0,
      droppingFromSeq: 0, readersReleased: 1, readers: 2, oldestPinnedCp: cp - 1, longestPinMs: 3000, cpsApplied: cp, cpsAborted: 0, blocksApplied: 5, refsApplied: 6,
      deltasApplied: 7, bytesIn: 1 << 20, baselinePartial: false, lastCommitMs: 1_700_000_000_000, lastError: undefined,
    });
    let stats: ReceiverStats = { connections: 2, mirrors: [mirror('a', 12), mirror('b', 30)] };
    const r = new MetricsRegistry();
    registerReceiverMetrics(r, { stats: () => stats });
    let text = r.expose();
    assert.match(text, /^nvmirror_receiver_committed_cp\{source="a"\} 12$/m);
    assert.match(text, /^nvmirror_receiver_cp_blocks_total\{source="b",as="reference"\} 6$/m);
    assert.match(text, /^nvmirror_receiver_oldest_pinned_cp\{source="b"\} 29$/m);
    assert.match(text, /^nvmirror_receiver_longest_pin_seconds\{source="a"\} 3$/m);
    assert.equal(parseExposition(text).get('nvmirror_receiver_sources_connected'), 2);
    stats = { connections: 1, mirrors: [mirror('b', 31)] }; // a was promoted: the receiver let it go
    text = r.expose();
    assert.doesNotMatch(text, /source="a"/);
    assert.match(text, /^nvmirror_receiver_committed_cp\{source="b"\} 31$/m);
    parseExposition(text);
  });
});

describe('NBD metrics', function () {
  it('count requests, bytes of successes, latency and errors by kind', function () {
    const r = new MetricsRegistry();
    const m = new NbdMetrics(r);
    m.attachServer({ connectionCount: 2, budget: { usedBytes: 4096 } });
    m.connectionAccepted();
    m.request(P.CMD_READ, 4096, undefined, 0.2);
    m.request(P.CMD_WRITE, 8192, undefined, 3);
    m.request(P.CMD_READ, 4096, 'checksum', 1);
    m.request(P.CMD_READ, 512, 'EINVAL', 0.01);
    m.request(999, 0, 'EINVAL', 0.01);
    m.clientError('protocol');
    const e = parseExposition(r.expose());
    assert.equal(e.get('nvmirror_nbd_requests_total', { command: 'read' }), 3);
    assert.equal(e.get('nvmirror_nbd_requests_total', { command: 'unknown' }), 1);
    assert.equal(e.get('nvmirror_nbd_bytes_total', { command: 'read' }), 4096);
    assert.equal(e.get('nvmirror_nbd_bytes_total', { command: 'write' }), 8192);
    assert.equal(e.get('nvmirror_nbd_errors_total', { kind: 'checksum' }), 1);
    assert.equal(e.get('nvmirror_nbd_errors_total', { kind: 'EINVAL' }), 2);
    assert.equal(e.get('nvmirror_nbd_errors_total', { kind: 'protocol' }), 1);
    assert.equal(e.get('nvmirror_nbd_request_duration_seconds_count', { command: 'write' }), 1);
    assert.equal(e.get('nvmirror_nbd_request_duration_seconds_bucket', { command: 'write', le: '0.0025' }), 0);
    assert.equal(e.get('nvmirror_nbd_request_duration_seconds_bucket', { command: 'write', le: '0.005' }), 1);
    assert.equal(e.get('nvmirror_nbd_connections'), 2);
    assert.equal(e.get('nvmirror_nbd_connections_total', { outcome: 'accepted' }), 1);
    assert.equal(e.get('nvmirror_nbd_memory_budget_used_bytes'), 4096);
    assert.equal(m.checksumErrors(), 1);
  });

  it('name an EIO caused by a checksum mismatch "checksum", other errors by errno', function () {
    assert.equal(errorKind(P.EIO, new VolumeError('EIO', 'checksum mismatch in data block: lbn 1 at pba 9 (expected 0, got 1)')), 'checksum');
    assert.equal(errorKind(P.EIO, new VolumeError('EIO', 'device read of data at pba 9 failed: EIO')), 'EIO');
    assert.equal(errorKind(P.EIO, new Error('checksum mismatch')), 'EIO', 'only the volume says what a checksum error is');
    assert.equal(errorKind(P.ENOSPC), 'ENOSPC');
    assert.equal(errorKind(P.EINVAL), 'EINVAL');
  });
});
