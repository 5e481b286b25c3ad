/**
 * What the NBD server reports to an observer (e.g. src/metrics/nbd-metrics.ts), so the
 * protocol code does not depend on how it is measured. Calls are synchronous and cheap;
 * an observer must not throw.
 *
 * Invariants (kept by server.ts and transmission.ts):
 * - request() is called exactly once per request that gets a reply (not DISC, not
 *   requests dropped unanswered at shutdown), when its reply is queued.
 * - connectionAccepted() once per socket taken into a slot, connectionRefused() once per
 *   socket refused (slots full, shutting down). Open connections are read from the
 *   server (connectionCount), not counted here.
 */
export interface NbdObserver {
  /**
   * A reply: the command (NBD CMD_*), the request's length in bytes, the error kind
   * (undefined: success; else an errno name such as EIO, or "checksum" for an EIO whose
   * cause is a checksum mismatch), and the time from its arrival to its reply.
   */
  request(command: number, lengthBytes: number, errorKind: string | undefined, durationMs: number): void;
  /** A client broke the protocol (bad framing) or the handshake failed. */
  clientError(kind: 'protocol' | 'handshake'): void;
  connectionAccepted(): void;
  connectionRefused(): void;
  /** A connection entered transmission, on the native thread or the stream path. */
  transmissionStarted?(path: 'native' | 'stream'): void;
}
