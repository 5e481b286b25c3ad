/**
 * The control socket of a served volume directory (DIR/control.sock): JSON lines, one
 * request per line, one response line each, answered in order. Lets `nvmirror status`
 * and `nvmirror snapshot` talk to the process that holds the volume's lock.
 *
 * Requests:  {"op":"status"} | {"op":"snapshot","kind":"create"|"delete","name":N[,"force":true]}
 *            | {"op":"list"} | {"op":"checkpoint"} | {"op":"verify"}
 *            | {"op":"check"} (the tree check on the committed roots; answers when done)
 *            | {"op":"check-progress"} (blocks read so far by a running check, or null)
 *            | {"op":"scrub","repair":B[,"rateBytesPerSec":N]} (RAID scrub; answers when done) | {"op":"scrub-progress"}
 *            | {"op":"replace-member","old":S,"new":ABSPATH,"rateBytesPerSec"?:N} (answers when
 *              the new member is in service) | {"op":"replace-progress"}
 * Responses: {"ok":true,...} | {"ok":false,"error":"one line"}
 *
 * Invariants:
 * - A request line is at most CONTROL_LINE_MAX_BYTES; a longer one closes the
 *   connection. At most CONTROL_CONNECTIONS_MAX connections at once; more are closed.
 * - One request per connection is handled at a time (responses stay in order); lines
 *   received meanwhile are buffered up to the line cap, then the connection is closed.
 * - Only the process holding the volume lock listens, so any socket file found at
 *   start-up is stale and is removed.
 */
import * as fs from 'fs';
import * as net from 'net';
import { log as logger } from '../util/log';
import { RATE_MIN_BYTES_PER_SEC } from '../util/rate';
import { MAX_SNAPSHOT_NAME_BYTES } from '../tree/layout';

export const CONTROL_SOCKET_NAME = 'control.sock';
export const CONTROL_LINE_MAX_BYTES = 64 * 1024;
export const CONTROL_CONNECTIONS_MAX = 16;
/** sun_path holds 108 bytes including the terminating NUL. */
export const UNIX_PATH_MAX_BYTES = 107;

export type ControlRequest =
  | { op: 'status' }
  | { op: 'list' }
  | { op: 'checkpoint' }
  | { op: 'check'; source?: string }
  | { op: 'check-progress' }
  | { op: 'scrub'; repair: boolean; rateBytesPerSec?: number }
  | { op: 'scrub-progress' }
  | { op: 'replace-member'; old: string; new: string; rateBytesPerSec?: number }
  | { op: 'replace-progress' }
  | { op: 'verify'; source?: string }
  | { op: 'release'; source: string; force: boolean }
  | { op: 'unrelease'; source: string }
  | { op: 'snapshot'; kind: 'create' | 'delete'; name: string; force?: boolean };

export type ControlResponse = { ok: true; [k: string]: unknown } | { ok: false; error: string };

export function parseControlRequest(line: string): ControlRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new Error('request is not JSON');
  }
  if (typeof v !== 'object' || v === null) throw new Error('request must be a JSON object');
  const o = v as Record<string, unknown>;
  switch (o.op) {
    case 'check':
      if (o.source !== undefined && (typeof o.source !== 'string' || !/^[0-9a-f-]{36}$/.test(o.source))) throw new Error('check source must be a volume uuid');
      return typeof o.source === 'string' ? { op: 'check', source: o.source } : { op: 'check' };
    case 'status':
    case 'list':
    case 'checkpoint':
    case 'check-progress':
    case 'scrub-progress':
    case 'replace-progress':
      return { op: o.op };
    case 'replace-member': {
      if (typeof o.old !== 'string' || o.old.length === 0 || o.old.length > 4096) throw new Error('replace-member old must be a member name or index');
      if (typeof o.new !== 'string' || !o.new.startsWith('/') || o.new.length > 4096) throw new Error('replace-member new must be an absolute path');
      if (o.rateBytesPerSec !== undefined && !(Number.isSafeInteger(o.rateBytesPerSec) && (o.rateBytesPerSec as number) >= RATE_MIN_BYTES_PER_SEC)) throw new Error(`replace-member rateBytesPerSec must be an integer >= ${RATE_MIN_BYTES_PER_SEC}`);
      return { op: 'replace-member', old: o.old, new: o.new, ...(o.rateBytesPerSec !== undefined ? { rateBytesPerSec: o.rateBytesPerSec as number } : {}) };
    }
    case 'scrub':
      if (typeof o.repair !== 'boolean') throw new Error('scrub repair must be true or false');
      if (o.rateBytesPerSec !== undefined && !(typeof o.rateBytesPerSec === 'number' && Number.isSafeInteger(o.rateBytesPerSec) && o.rateBytesPerSec > 0)) throw new Error('scrub rateBytesPerSec must be a positive integer');
      return typeof o.rateBytesPerSec === 'number' ? { op: 'scrub', repair: o.repair, rateBytesPerSec: o.rateBytesPerSec } : { op: 'scrub', repair: o.repair };
    case 'verify':
      if (o.source !== undefined && (typeof o.source !== 'string' || !/^[0-9a-f-]{36}$/.test(o.source))) throw new Error('verify source must be a volume uuid');
      return typeof o.source === 'string' ? { op: 'verify', source: o.source } : { op: 'verify' };
    case 'snapshot':
      if (o.kind !== 'create' && o.kind !== 'delete') throw new Error('snapshot kind must be "create" or "delete"');
      if (typeof o.name !== 'string' || o.name.length === 0) throw new Error('snapshot name must be a non-empty string');
      if (o.name.length > MAX_SNAPSHOT_NAME_BYTES) throw new Error(`snapshot name of ${o.name.length} characters is longer than ${MAX_SNAPSHOT_NAME_BYTES} bytes`);
      if (o.force !== undefined && typeof o.force !== 'boolean') throw new Error('snapshot force must be true or false');
      return { op: 'snapshot', kind: o.kind, name: o.name, ...(o.force === true ? { force: true } : {}) };
    case 'release':
      if (typeof o.source !== 'string' || !/^[0-9a-f-]{36}$/.test(o.source)) throw new Error('release source must be a volume uuid');
      if (typeof o.force !== 'boolean') throw new Error('release force must be true or false');
      return { op: 'release', source: o.source, force: o.force };
    case 'unrelease':
      if (typeof o.source !== 'string' || !/^[0-9a-f-]{36}$/.test(o.source)) throw new Error('unrelease source must be a volume uuid');
      return { op: 'unrelease', source: o.source };
    default:
      throw new Error(`unknown op ${JSON.stringify(o.op)}`);
  }
}

export class ControlServer {
  private readonly sockets = new Set<net.Socket>();
  private constructor(private readonly server: net.Server, readonly path: string) {}

  static async listen(socketPath: string, handle: (req: ControlRequest) => Promise<Record<string, unknown>>): Promise<ControlServer> {
    if (Buffer.byteLength(socketPath) > UNIX_PATH_MAX_BYTES) {
      throw new Error(`control socket path ${socketPath} is longer than ${UNIX_PATH_MAX_BYTES} bytes; use a shorter volume directory path`);
    }
    await fs.promises.rm(socketPath, { force: true });
    const server = net.createServer();
    const cs = new ControlServer(server, socketPath);
    server.on('connection', (s) => cs.serve(s, handle));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (e) => logger().error({ err: e.message }, 'control socket error'));
    return cs;
  }

  private serve(s: net.Socket, handle: (req: ControlRequest) => Promise<Record<string, unknown>>): void {
    if (this.sockets.size >= CONTROL_CONNECTIONS_MAX) {
      s.destroy();
      return;
    }
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
    s.on('error', () => s.destroy());
    let buf = '';
    const lines: string[] = [];
    let busy = false;
    const next = async (): Promise<void> => {
      if (busy) return;
      busy = true;
      while (lines.length > 0 && !s.destroyed) {
        const line = lines.shift()!;
        let resp: ControlResponse;
        try {
          const req = parseControlRequest(line);
          resp = { ok: true, ...(await handle(req)) };
        } catch (e) {
          resp = { ok: false, error: e instanceof Error ? e.message : String(e) };
        }
        if (!s.destroyed) s.write(`${JSON.stringify(resp)}\n`);
      }
      busy = false;
    };
    s.setEncoding('utf8');
    s.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        lines.push(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
      const pending = buf.length + lines.reduce((n, l) => n + l.length, 0);
      if (pending > CONTROL_LINE_MAX_BYTES) {
        s.destroy();
        return;
      }
      void next();
    });
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await fs.promises.rm(this.path, { force: true });
  }
}

/** Sends one request to a control socket and returns the response; rejects with a one-line Error. */
export function controlRequest(socketPath: string, req: ControlRequest, timeoutMs: number): Promise<ControlResponse> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(socketPath);
    let buf = '';
    let done = false;
    const finish = (e: Error | undefined, r?: ControlResponse): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      if (e) reject(e);
      else resolve(r as ControlResponse);
    };
    const timer = setTimeout(() => finish(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`)), timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => s.write(`${JSON.stringify(req)}\n`));
    s.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > CONTROL_LINE_MAX_BYTES * 16) return finish(new Error('control response too long'));
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      try {
        const v = JSON.parse(buf.slice(0, nl)) as ControlResponse;
        if (typeof v !== 'object' || v === null || typeof v.ok !== 'boolean') throw new Error('bad response');
        finish(undefined, v);
      } catch {
        finish(new Error('control socket answered with something that is not a response'));
      }
    });
    s.on('error', (e) => finish(new Error(`cannot reach ${socketPath}: ${e.message}`)));
    s.on('close', () => finish(new Error(`${socketPath} closed the connection without answering`)));
  });
}
