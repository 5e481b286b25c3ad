/** Parses sizes like "64M", "1G", "4096", "1.5G", "10GiB". Throws Error with a one-line message. */
const UNITS: Record<string, number> = {
  '': 1, B: 1,
  K: 1024, KB: 1024, KIB: 1024,
  M: 1024 ** 2, MB: 1024 ** 2, MIB: 1024 ** 2,
  G: 1024 ** 3, GB: 1024 ** 3, GIB: 1024 ** 3,
  T: 1024 ** 4, TB: 1024 ** 4, TIB: 1024 ** 4,
  P: 1024 ** 5, PB: 1024 ** 5, PIB: 1024 ** 5,
};

export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  if (!m) throw new Error(`bad size "${text}": expected a number with an optional K/M/G/T suffix`);
  const unit = UNITS[(m[2] ?? '').toUpperCase()];
  if (unit === undefined) throw new Error(`bad size "${text}": unknown unit "${m[2]}"`);
  const value = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(value)) throw new Error(`bad size "${text}": too large`);
  return value;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}
