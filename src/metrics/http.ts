/**
 * The metrics endpoint: a plain HTTP server answering `GET /metrics` with the registry's
 * text exposition (and `GET /` with a pointer to it). Nothing else is served.
 *
 * Limits: METRICS_CONNECTIONS_MAX concurrent scrapers, METRICS_REQUEST_TIMEOUT_MS per
 * request, METRICS_HEADERS_BYTES_MAX of request headers; a scrape body is never read.
 *
 * Invariants:
 * - Only GET and HEAD are answered (405 otherwise); any path but / and /metrics is 404.
 * - A scrape builds the exposition synchronously: it sees one consistent instant.
 * - close() stops listening and ends open scrapes; it resolves once the listener is gone.
 */
import * as http from 'http';
import type { AddressInfo } from 'net';
import { EXPOSITION_CONTENT_TYPE, type MetricsRegistry } from './registry';

export const METRICS_CONNECTIONS_MAX = 16;
export const METRICS_REQUEST_TIMEOUT_MS = 10_000;
export const METRICS_HEADERS_BYTES_MAX = 16 * 1024;

export interface MetricsEndpoint {
  readonly address: AddressInfo;
  close(): Promise<void>;
}

export function serveMetrics(registry: MetricsRegistry, host: string, port: number): Promise<MetricsEndpoint> {
  const srv = http.createServer({ maxHeaderSize: METRICS_HEADERS_BYTES_MAX }, (req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    if (url === '/metrics') {
      const body = registry.expose();
      res.writeHead(200, { 'Content-Type': EXPOSITION_CONTENT_TYPE, 'Content-Length': Buffer.byteLength(body) });
      res.end(req.method === 'HEAD' ? undefined : body);
    } else if (url === '/') {
      res.writeHead(200, { 'Content-Type': 'text/plain' }).end('nvmirror metrics: GET /metrics\n');
    } else {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found: GET /metrics\n');
    }
  });
  srv.maxConnections = METRICS_CONNECTIONS_MAX;
  srv.requestTimeout = METRICS_REQUEST_TIMEOUT_MS;
  srv.headersTimeout = METRICS_REQUEST_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    srv.once('error', (e: NodeJS.ErrnoException) => {
      const where = `${host}:${port}`;
      if (e.code === 'EADDRINUSE') reject(new Error(`metrics: ${where} is already in use`));
      else if (e.code === 'EACCES') reject(new Error(`metrics: permission denied listening on ${where}`));
      else reject(new Error(`metrics: cannot listen on ${where}: ${e.message}`));
    });
    srv.listen({ host, port, exclusive: true }, () => {
      srv.removeAllListeners('error');
      srv.on('error', () => undefined);
      resolve({
        address: srv.address() as AddressInfo,
        close: () =>
          new Promise<void>((r) => {
            srv.close(() => r());
            srv.closeAllConnections();
          }),
      });
    });
  });
}
