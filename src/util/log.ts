import pino, { Logger } from 'pino';

/**
 * Structured logs with pino: human-readable (pino-pretty) when stderr is a terminal,
 * JSON lines otherwise. Logs go to stderr so stdout stays for command output.
 */
let root: Logger | undefined;

export function createLogger(level = process.env.NVMIRROR_LOG_LEVEL ?? 'info'): Logger {
  const pretty = process.stderr.isTTY === true;
  if (pretty) {
    // pino-pretty as a synchronous stream, so nothing is lost on exit.
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const prettyFactory = require('pino-pretty') as (o: object) => NodeJS.WritableStream;
    root = pino({ level }, prettyFactory({ destination: 2, sync: true, colorize: true, ignore: 'pid,hostname' }) as never);
  } else {
    root = pino({ level, base: { pid: process.pid } }, pino.destination({ dest: 2, sync: true }));
  }
  return root;
}

export function log(): Logger {
  return root ?? createLogger();
}

export type { Logger };
