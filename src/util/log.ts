import pino, { Logger } from 'pino';
import bindings from 'bindings';

/**
 * Structured logs with pino: human-readable (pino-pretty) when stderr is a terminal,
 * JSON lines otherwise. Logs go to stderr so stdout stays for command output.
 *
 * JSON lines leave through the addon's log writer (native/log_writer.cc): the event loop
 * copies a line into a queue of at most LOG_QUEUE_BYTES_MAX and one thread writes it to
 * stderr. A reader that stops reading (a full pipe) costs dropped lines, counted and noted
 * in the log where they went missing, never a blocked event loop: before, one full pipe
 * stopped the CPs and with them every client write. At exit the queue is written out,
 * waiting at most LOG_EXIT_FLUSH_MS for a slow reader.
 *
 * Invariants:
 * - The event loop never blocks on stderr for a JSON line (the terminal's pretty output
 *   stays synchronous: a person is reading it).
 * - One writer per process; its queue is bounded; every dropped line is counted
 *   (logDroppedLines()) and reported by a warn line once the queue has room again.
 */
let root: Logger | undefined;

/** The most bytes of log lines waiting for stderr; beyond it lines are dropped and counted. */
export const LOG_QUEUE_BYTES_MAX = 1024 * 1024;
/** At exit, how long to wait for stderr's reader to take the queued lines. */
export const LOG_EXIT_FLUSH_MS = 2000;

interface RawLogWriter {
  logWriterStart(fd: number, capacityBytes: number): void;
  logWriterWrite(line: string): boolean;
  logWriterFlush(timeoutMs: number): boolean;
  logWriterStats(): { started: boolean; queuedBytes?: number; capacityBytes?: number; droppedLines?: number; writtenLines?: number; writeErrors?: number };
}

let writer: RawLogWriter | undefined;

/** The addon's writer on fd 2, started once; flushed at exit. */
function stderrWriter(): RawLogWriter {
  if (writer) return writer;
  const w = bindings('nvmirror_native') as RawLogWriter;
  w.logWriterStart(2, LOG_QUEUE_BYTES_MAX);
  process.on('exit', () => {
    w.logWriterFlush(LOG_EXIT_FLUSH_MS);
  });
  writer = w;
  return w;
}

/** A pino destination over the log writer: write() never blocks. */
export function nonBlockingStderr(): { write(line: string): boolean } {
  const w = stderrWriter();
  return { write: (line: string) => w.logWriterWrite(line) };
}

/** Lines dropped because stderr's reader fell LOG_QUEUE_BYTES_MAX behind (0 before any JSON log). */
export function logDroppedLines(): number {
  return writer?.logWriterStats().droppedLines ?? 0;
}

/** Waits (blocking) until the queued lines are on stderr, at most timeoutMs; true if they are. */
export function flushLog(timeoutMs = LOG_EXIT_FLUSH_MS): boolean {
  return writer ? writer.logWriterFlush(timeoutMs) : true;
}

export function createLogger(level = process.env.NVMIRROR_LOG_LEVEL ?? 'info'): Logger {
  const pretty = process.stderr.isTTY === true;
  if (pretty) {
    // pino-pretty as a synchronous stream, so nothing is lost on exit.
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const prettyFactory = require('pino-pretty') as (o: object) => NodeJS.WritableStream;
    root = pino({ level }, prettyFactory({ destination: 2, sync: true, colorize: true, ignore: 'pid,hostname' }) as never);
  } else {
    root = pino({ level, base: { pid: process.pid } }, nonBlockingStderr() as never);
  }
  return root;
}

export function log(): Logger {
  return root ?? createLogger();
}

export type { Logger };
