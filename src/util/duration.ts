/**
 * Parses durations like "500ms", "10s", "2m", "1h", "1.5s" into milliseconds. A bare
 * number takes `bareUnit` (callers say which, for backward compatibility). Throws Error
 * with a one-line message.
 */
const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

export type DurationUnit = 'ms' | 's' | 'm' | 'h';

export function parseDurationMs(text: string, bareUnit: DurationUnit): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/i.exec(text);
  if (!m) throw new Error(`bad duration "${text}": expected a number with an optional ms/s/m/h suffix, e.g. 10s`);
  const unit = UNIT_MS[(m[2] ?? bareUnit).toLowerCase()];
  if (unit === undefined) throw new Error(`bad duration "${text}"`);
  const value = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(value)) throw new Error(`bad duration "${text}": too large`);
  return value;
}

export function formatDurationMs(ms: number): string {
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
