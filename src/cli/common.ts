/** Small helpers shared by CLI commands: argument parsers with one-line errors. */
import * as fs from 'fs';
import * as path from 'path';
import { InvalidArgumentError } from 'commander';
import { DurationUnit, formatDurationMs, parseDurationMs } from '../util/duration';
import { parseSize } from '../util/size';
import type { VolumeSpec } from '../volume/open';
import { LABEL_NAME } from '../volume/label';
import { MIRROR_LABEL_NAME } from '../mirror/mirror-dir';
import { RECEIVE_LOCK_NAME, isReceiveDir } from '../mirror/receive-dir';

export function sizeArg(value: string): number {
  try {
    const n = parseSize(value);
    if (n <= 0) throw new Error(`bad size "${value}": must be greater than zero`);
    return n;
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
}

/** A size argument within [minBytes, maxBytes]. */
export function sizeRangeArg(minBytes: number, maxBytes: number) {
  return (value: string): number => {
    const n = sizeArg(value);
    if (n < minBytes || n > maxBytes) throw new InvalidArgumentError(`expected a size from ${minBytes} to ${maxBytes} bytes, got "${value}"`);
    return n;
  };
}

/** A duration argument ("10s", "500ms", "2m"; a bare number is in bareUnit), in ms within [minMs, maxMs]; 0 allowed when allowZero. */
export function durationArg(minMs: number, maxMs: number, bareUnit: DurationUnit, allowZero = false) {
  return (value: string): number => {
    let ms: number;
    try {
      ms = parseDurationMs(value, bareUnit);
    } catch (e) {
      throw new InvalidArgumentError((e as Error).message);
    }
    if (allowZero && ms === 0) return 0;
    if (ms < minMs || ms > maxMs) {
      throw new InvalidArgumentError(`expected a duration from ${formatDurationMs(minMs)} to ${formatDurationMs(maxMs)}${allowZero ? ' (or 0 for never)' : ''}, got "${value}"`);
    }
    return ms;
  };
}

export function intArg(min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer from ${min} to ${max}, got "${value}"`);
    return n;
  };
}

export function hostPortArg(value: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(value) ?? /^()()(\d+)$/.exec(value);
  if (!m) throw new InvalidArgumentError(`expected HOST:PORT, got "${value}"`);
  const host = m[1] || m[2] || '127.0.0.1';
  const port = Number(m[3]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`bad port in "${value}"`);
  return { host, port };
}

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export function logLevelArg(value: string): string {
  if (!LOG_LEVELS.includes(value)) throw new InvalidArgumentError(`expected one of ${LOG_LEVELS.join(', ')}`);
  return value;
}

/** Installs SIGINT/SIGTERM handlers: the first runs `stop` then exits 0; a second exits at once. */
export function onStopSignals(stop: () => Promise<void>, log: { info(o: object, m: string): void; error(o: object, m: string): void }): void {
  let stopping = false;
  const handler = (sig: NodeJS.Signals): void => {
    if (stopping) {
      process.stderr.write(`nvmirror: second ${sig}, exiting without a clean stop\n`);
      process.exit(1);
    }
    stopping = true;
    log.info({ signal: sig }, 'stopping: finishing in-flight requests');
    stop().then(
      () => process.exit(0),
      (e: unknown) => {
        log.error({ err: (e as Error).message }, 'error while stopping');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

/** The volume arguments shared by `serve` and `attach`. */
export interface VolumeArgs {
  memory?: number;
  file?: string;
  readOnly?: boolean;
  export: string;
  cpInterval?: number;
}

/**
 * For commands that take a volume directory: one line saying what DIR is when it is one
 * of the mirror's directories instead (a mirror RECEIVE_DIR/<source-uuid>, or a receive
 * directory), with `mirrorHint`: what to do with a mirror instead. Anything else is left
 * to readLabel (a demoted volume has its own message there).
 */
export function refuseMirrorSide(dir: string, mirrorHint: string): void {
  if (fs.existsSync(path.join(dir, LABEL_NAME)) || fs.existsSync(path.join(dir, `${LABEL_NAME}.demoted`))) return;
  if (fs.existsSync(path.join(dir, MIRROR_LABEL_NAME))) {
    throw new Error(`${dir} is a mirror (${MIRROR_LABEL_NAME}), not a volume: ${mirrorHint}, or make it a volume with: nvmirror promote ${dir}`);
  }
  if (isReceiveDir(dir)) {
    throw new Error(`${dir} is a receive directory (${RECEIVE_LOCK_NAME}), not a volume: its mirrors are ${path.join(dir, '<source-uuid>')}`);
  }
}

/**
 * Turns `--memory SIZE | --file PATH | DIR` into a VolumeSpec, refusing a missing file
 * or directory with a one-line error before anything is opened.
 */
export function volumeSpecFromArgs(dir: string | undefined, o: VolumeArgs): VolumeSpec {
  const given = [o.memory !== undefined, o.file !== undefined, dir !== undefined].filter(Boolean).length;
  if (given === 0) throw new Error('nothing to serve: give --memory SIZE, --file PATH or a volume directory');
  if (given > 1) throw new Error('give exactly one of --memory SIZE, --file PATH or a volume directory');
  if (o.file !== undefined && !fs.existsSync(o.file)) throw new Error(`no such file: ${o.file}`);
  if (dir !== undefined && !fs.existsSync(dir)) {
    throw new Error(`no such volume directory: ${dir} (create one with: nvmirror create ${dir} --size SIZE)`);
  }
  if (dir !== undefined) refuseMirrorSide(dir, 'read it through its receiver\'s exports (receive --export-socket or --export-listen)');
  return {
    readOnly: o.readOnly === true,
    exportName: o.export,
    ...(o.memory !== undefined ? { memory: o.memory } : {}),
    ...(o.file !== undefined ? { file: path.resolve(o.file) } : {}),
    ...(dir !== undefined ? { dir: path.resolve(dir) } : {}),
    ...(o.cpInterval !== undefined ? { cpIntervalMs: o.cpInterval } : {}),
  };
}
