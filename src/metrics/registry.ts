/**
 * A small Prometheus registry and text exposition (format 0.0.4): counters, gauges and
 * histograms with labels, plus collectors run at each scrape (for values read from
 * elsewhere, e.g. a volume's stats). Anything in the process may register its own
 * metrics here (the NBD server, volumes, later the mirror): that is the extension hook.
 *
 * Limits: METRICS_MAX (metric families per registry), SERIES_PER_METRIC_MAX (label
 * combinations per family), LABEL_VALUE_BYTES_MAX.
 *
 * Invariants:
 * - Names and label names are valid Prometheus identifiers, checked at registration; a
 *   family name is registered once (a second registration is a programming error).
 * - A counter never decreases: inc() takes only non-negative finite amounts, and
 *   setTotal() (mirroring a monotonic total kept elsewhere) never goes below the value.
 * - A histogram's buckets are strictly increasing finite bounds; the exposition adds
 *   +Inf, and its cumulative counts, _sum and _count are consistent with observe().
 * - A series beyond SERIES_PER_METRIC_MAX is folded into one with every label "other",
 *   so a runaway label value cannot grow memory without bound.
 */
import { assert } from '../util/assert';

export const METRICS_MAX = 512;
export const SERIES_PER_METRIC_MAX = 256;
export const LABEL_VALUE_BYTES_MAX = 128;

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

type Kind = 'counter' | 'gauge' | 'histogram';

function escapeLabel(v: string): string {
  return v.slice(0, LABEL_VALUE_BYTES_MAX).replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

function labelText(names: readonly string[], values: readonly string[], extra?: string): string {
  const parts = names.map((n, i) => `${n}="${escapeLabel(values[i] ?? '')}"`);
  if (extra !== undefined) parts.push(extra);
  return parts.length === 0 ? '' : `{${parts.join(',')}}`;
}

abstract class Family<S> {
  private readonly series = new Map<string, { values: string[]; s: S }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly kind: Kind,
    readonly labelNames: readonly string[],
  ) {
    assert(NAME_RE.test(name), `bad metric name ${name}`);
    for (const l of labelNames) assert(LABEL_RE.test(l) && l !== 'le', `bad label name ${l} on ${name}`);
  }

  protected abstract fresh(): S;

  /** The series for these label values (created on first use). */
  protected child(values: readonly string[]): S {
    assert(values.length === this.labelNames.length, `${this.name} takes ${this.labelNames.length} label values`);
    const key = values.join('\u0000');
    let e = this.series.get(key);
    if (e === undefined) {
      const vs = this.series.size < SERIES_PER_METRIC_MAX ? [...values] : values.map(() => 'other');
      const k = vs.join('\u0000');
      e = this.series.get(k) ?? { values: vs, s: this.fresh() };
      this.series.set(k, e);
    }
    return e.s;
  }

  /** Drops the series whose label values `gone` picks (e.g. a mirror the receiver no longer has). */
  removeWhere(gone: (values: readonly string[]) => boolean): void {
    for (const [k, e] of this.series) if (gone(e.values)) this.series.delete(k);
  }

  protected abstract lines(out: string[], values: readonly string[], s: S): void;

  expose(out: string[]): void {
    out.push(`# HELP ${this.name} ${this.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`);
    out.push(`# TYPE ${this.name} ${this.kind}`);
    for (const { values, s } of this.series.values()) this.lines(out, values, s);
  }
}

export interface CounterChild {
  inc(amount?: number): void;
  /** Mirrors a monotonic total kept elsewhere (never decreases the counter). */
  setTotal(total: number): void;
  get(): number;
}

export class Counter extends Family<{ v: number }> {
  constructor(name: string, help: string, labelNames: readonly string[]) {
    super(name, help, 'counter', labelNames);
  }
  protected fresh(): { v: number } {
    return { v: 0 };
  }
  labels(...values: string[]): CounterChild {
    const s = this.child(values);
    return {
      inc: (amount = 1) => {
        if (!(amount >= 0 && amount !== Infinity)) assert(false, `counter ${this.name} cannot go down (inc ${amount})`);
        s.v += amount;
      },
      setTotal: (total) => {
        if (total > s.v) s.v = total;
      },
      get: () => s.v,
    };
  }
  protected lines(out: string[], values: readonly string[], s: { v: number }): void {
    out.push(`${this.name}${labelText(this.labelNames, values)} ${formatValue(s.v)}`);
  }
}

export interface GaugeChild {
  set(v: number): void;
  inc(amount?: number): void;
  get(): number;
}

export class Gauge extends Family<{ v: number }> {
  constructor(name: string, help: string, labelNames: readonly string[]) {
    super(name, help, 'gauge', labelNames);
  }
  protected fresh(): { v: number } {
    return { v: 0 };
  }
  labels(...values: string[]): GaugeChild {
    const s = this.child(values);
    return { set: (v) => void (s.v = v), inc: (a = 1) => void (s.v += a), get: () => s.v };
  }
  protected lines(out: string[], values: readonly string[], s: { v: number }): void {
    out.push(`${this.name}${labelText(this.labelNames, values)} ${formatValue(s.v)}`);
  }
}

interface HistSeries {
  counts: number[];
  sum: number;
  count: number;
}

export interface HistogramChild {
  observe(v: number): void;
}

export class Histogram extends Family<HistSeries> {
  constructor(
    name: string,
    help: string,
    labelNames: readonly string[],
    readonly bounds: readonly number[],
  ) {
    super(name, help, 'histogram', labelNames);
    assert(bounds.length > 0, `${name}: a histogram needs buckets`);
    for (let i = 0; i < bounds.length; i++) {
      assert(Number.isFinite(bounds[i] as number) && (i === 0 || (bounds[i] as number) > (bounds[i - 1] as number)), `${name}: buckets must increase`);
    }
  }
  protected fresh(): HistSeries {
    return { counts: new Array<number>(this.bounds.length).fill(0), sum: 0, count: 0 };
  }
  labels(...values: string[]): HistogramChild {
    const s = this.child(values);
    return {
      observe: (v) => {
        let i = 0;
        while (i < this.bounds.length && v > (this.bounds[i] as number)) i++;
        if (i < this.bounds.length) s.counts[i] = (s.counts[i] as number) + 1;
        s.sum += v;
        s.count++;
      },
    };
  }
  protected lines(out: string[], values: readonly string[], s: HistSeries): void {
    let cum = 0;
    for (let i = 0; i < this.bounds.length; i++) {
      cum += s.counts[i] as number;
      out.push(`${this.name}_bucket${labelText(this.labelNames, values, `le="${formatValue(this.bounds[i] as number)}"`)} ${cum}`);
    }
    assert(cum <= s.count, 'histogram buckets within count');
    out.push(`${this.name}_bucket${labelText(this.labelNames, values, 'le="+Inf"')} ${s.count}`);
    out.push(`${this.name}_sum${labelText(this.labelNames, values)} ${formatValue(s.sum)}`);
    out.push(`${this.name}_count${labelText(this.labelNames, values)} ${s.count}`);
  }
}

export class MetricsRegistry {
  private readonly families = new Map<string, Family<unknown>>();
  private readonly collectors: Array<() => void> = [];

  private add<F extends Family<unknown>>(f: F): F {
    assert(!this.families.has(f.name), `metric ${f.name} registered twice`);
    assert(this.families.size < METRICS_MAX, `more than ${METRICS_MAX} metrics`);
    this.families.set(f.name, f);
    return f;
  }

  counter(name: string, help: string, labelNames: readonly string[] = []): Counter {
    return this.add(new Counter(name, help, labelNames));
  }

  gauge(name: string, help: string, labelNames: readonly string[] = []): Gauge {
    return this.add(new Gauge(name, help, labelNames));
  }

  histogram(name: string, help: string, labelNames: readonly string[], bounds: readonly number[]): Histogram {
    return this.add(new Histogram(name, help, labelNames, bounds));
  }

  /** Runs before every exposition: refresh gauges (or totals) read from elsewhere. */
  onCollect(fn: () => void): void {
    this.collectors.push(fn);
  }

  /** The text exposition (format 0.0.4). A failing collector is skipped, not fatal. */
  expose(): string {
    for (const c of this.collectors) {
      try {
        c();
      } catch {
        // a collector reading a closing volume: its metrics keep their last values
      }
    }
    const out: string[] = [];
    for (const f of this.families.values()) f.expose(out);
    return out.join('\n') + '\n';
  }
}

/** Content type of the text exposition. */
export const EXPOSITION_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
