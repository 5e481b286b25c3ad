/**
 * A strict parser of the Prometheus text exposition (format 0.0.4) for the tests: every
 * line is a HELP, a TYPE or a sample of a family whose TYPE came first; label syntax and
 * escapes are checked; counters are >= 0; each histogram series has increasing `le`
 * bounds, cumulative bucket counts, a +Inf bucket equal to _count, and a _sum.
 */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Exposition {
  types: Map<string, string>;
  samples: Sample[];
  /** The value of `name` with exactly these labels (undefined when absent). */
  get(name: string, labels?: Record<string, string>): number | undefined;
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const SAMPLE_RE = new RegExp(`^(${NAME})(\\{(.*)\\})? (\\S+)$`);
const LABEL_RE = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/;

function parseValue(v: string, line: string): number {
  if (v === '+Inf') return Infinity;
  if (v === '-Inf') return -Infinity;
  if (v === 'NaN') return NaN;
  if (!/^-?[0-9.]+(e[-+]?[0-9]+)?$/i.test(v)) throw new Error(`bad value in: ${line}`);
  return Number(v);
}

function parseLabels(text: string, line: string): Record<string, string> {
  const out: Record<string, string> = {};
  let rest = text;
  while (rest.length > 0) {
    const m = LABEL_RE.exec(rest);
    if (!m) throw new Error(`bad labels in: ${line}`);
    const k = m[1] as string;
    if (k in out) throw new Error(`duplicate label ${k} in: ${line}`);
    out[k] = (m[2] as string).replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
    rest = rest.slice(m[0].length);
  }
  return out;
}

function key(labels: Record<string, string>, drop?: string): string {
  return Object.keys(labels)
    .filter((k) => k !== drop)
    .sort()
    .map((k) => `${k}=${labels[k]}`)
    .join(',');
}

export function parseExposition(text: string): Exposition {
  if (!text.endsWith('\n')) throw new Error('exposition must end with a newline');
  const types = new Map<string, string>();
  const helps = new Set<string>();
  const samples: Sample[] = [];
  const seen = new Set<string>();
  for (const line of text.slice(0, -1).split('\n')) {
    if (line.startsWith('#')) {
      const m = new RegExp(`^# (HELP|TYPE) (${NAME}) (.*)$`).exec(line);
      if (!m) throw new Error(`bad comment line: ${line}`);
      const name = m[2] as string;
      if (m[1] === 'TYPE') {
        if (types.has(name)) throw new Error(`second TYPE for ${name}`);
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3] as string)) throw new Error(`bad type: ${line}`);
        types.set(name, m[3] as string);
      } else {
        if (helps.has(name)) throw new Error(`second HELP for ${name}`);
        helps.add(name);
      }
      continue;
    }
    const m = SAMPLE_RE.exec(line);
    if (!m) throw new Error(`bad sample line: ${JSON.stringify(line)}`);
    const name = m[1] as string;
    const labels = parseLabels(m[3] ?? '', line);
    const value = parseValue(m[4] as string, line);
    const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, '');
    const type = types.get(family);
    if (type === undefined) throw new Error(`sample before its TYPE: ${line}`);
    if (family !== name && type !== 'histogram' && type !== 'summary') throw new Error(`suffixed sample of a ${type}: ${line}`);
    if (type === 'counter' && !(value >= 0)) throw new Error(`negative counter: ${line}`);
    const k = `${name}{${key(labels)}}`;
    if (seen.has(k)) throw new Error(`duplicate sample ${k}`);
    seen.add(k);
    samples.push({ name, labels, value });
  }
  for (const [family, type] of types) {
    if (type !== 'histogram') continue;
    const series = new Map<string, Array<[number, number]>>();
    for (const s of samples.filter((x) => x.name === `${family}_bucket`)) {
      const le = s.labels['le'];
      if (le === undefined) throw new Error(`${family}_bucket without le`);
      const k = key(s.labels, 'le');
      series.set(k, [...(series.get(k) ?? []), [parseValue(le, le), s.value]]);
    }
    for (const [k, buckets] of series) {
      for (let i = 1; i < buckets.length; i++) {
        const [a, ca] = buckets[i - 1] as [number, number];
        const [b, cb] = buckets[i] as [number, number];
        if (!(b > a) || cb < ca) throw new Error(`${family}{${k}}: buckets not increasing/cumulative`);
      }
      const last = buckets[buckets.length - 1] as [number, number];
      const count = samples.find((s) => s.name === `${family}_count` && key(s.labels) === k);
      if (last[0] !== Infinity || count === undefined || count.value !== last[1]) throw new Error(`${family}{${k}}: +Inf bucket must equal _count`);
      if (!samples.some((s) => s.name === `${family}_sum` && key(s.labels) === k)) throw new Error(`${family}{${k}}: no _sum`);
    }
  }
  return {
    types,
    samples,
    get: (name, labels = {}) => samples.find((s) => s.name === name && key(s.labels) === key(labels))?.value,
  };
}
