/**
 * Security of the mirror link: TLS 1.3 with a pre-shared key (`--mirror-psk FILE`, the
 * psktool format: `identity:hexkey` per line, the same file on both sides; the source
 * uses the first identity) or certificates (`--mirror-tls-cert/-key/-ca`, the CA
 * verifies the peer on both sides). Plaintext only with `--mirror-insecure`.
 *
 * Invariants:
 * - Exactly one of PSK, certificates or insecure is chosen; anything else is a
 *   one-line error before a socket opens.
 * - An unknown PSK identity, a wrong key or a certificate the CA did not sign fails the
 *   handshake: no mirror frame is read from an unauthenticated peer.
 */
import * as fs from 'fs';
import * as tls from 'tls';
import { readPskFile } from '../util/psk';

export interface LinkArgs {
  mirrorPsk?: string;
  mirrorTlsCert?: string;
  mirrorTlsKey?: string;
  mirrorTlsCa?: string;
  mirrorInsecure?: boolean;
}

export type LinkSecurity =
  | { kind: 'insecure' }
  | { kind: 'psk'; keys: Map<string, Buffer> }
  | { kind: 'cert'; cert: Buffer; key: Buffer; ca: Buffer };

export function linkSecurity(o: LinkArgs): LinkSecurity {
  const cert = o.mirrorTlsCert !== undefined || o.mirrorTlsKey !== undefined || o.mirrorTlsCa !== undefined;
  const chosen = [o.mirrorPsk !== undefined, cert, o.mirrorInsecure === true].filter(Boolean).length;
  if (chosen === 0) throw new Error('the mirror link needs --mirror-psk FILE or --mirror-tls-cert/--mirror-tls-key/--mirror-tls-ca (or --mirror-insecure for plaintext)');
  if (chosen > 1) throw new Error('choose one of --mirror-psk, --mirror-tls-* and --mirror-insecure');
  if (o.mirrorInsecure) return { kind: 'insecure' };
  const read = (what: string, p: string): Buffer => {
    try {
      return fs.readFileSync(p);
    } catch (e) {
      throw new Error(`cannot read ${what} ${p}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    }
  };
  if (o.mirrorPsk !== undefined) {
    return { kind: 'psk', keys: readPskFile(o.mirrorPsk, 'mirror PSK file') }; // at least one key, or it throws
  }
  if (o.mirrorTlsCert === undefined || o.mirrorTlsKey === undefined || o.mirrorTlsCa === undefined) {
    throw new Error('--mirror-tls-cert, --mirror-tls-key and --mirror-tls-ca go together');
  }
  return { kind: 'cert', cert: read('certificate', o.mirrorTlsCert), key: read('key', o.mirrorTlsKey), ca: read('CA certificate', o.mirrorTlsCa) };
}

/** Options for the destination's TLS server, or undefined for plaintext. */
export function serverTls(sec: LinkSecurity): tls.TlsOptions | undefined {
  switch (sec.kind) {
    case 'insecure':
      return undefined;
    case 'psk':
      return { pskCallback: (_s: tls.TLSSocket, identity: string) => sec.keys.get(identity) ?? null, ciphers: 'TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256' };
    case 'cert':
      return { cert: sec.cert, key: sec.key, ca: sec.ca, requestCert: true, rejectUnauthorized: true };
  }
}

/** Options for the source's TLS client, or undefined for plaintext. */
export function clientTls(sec: LinkSecurity): tls.ConnectionOptions | undefined {
  switch (sec.kind) {
    case 'insecure':
      return undefined;
    case 'psk': {
      const [identity, psk] = [...sec.keys.entries()][0]!;
      return { pskCallback: () => ({ identity, psk }), ciphers: 'TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256', checkServerIdentity: () => undefined };
    }
    case 'cert':
      return { cert: sec.cert, key: sec.key, ca: sec.ca, checkServerIdentity: () => undefined };
  }
}
