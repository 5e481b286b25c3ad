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
 * - Such a failure is said in plain words on both sides (explainTlsError: the source's
 *   status, the receiver's log line), OpenSSL's reason kept in brackets.
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

/**
 * What a TLS failure on the mirror link means, in the operator's words, from OpenSSL's
 * message ("<hex>:error:<code>:SSL routines:<function>:<reason>:<file>:<line>:..."):
 * `side` is where it was seen. The reason (and an alert number) is kept in brackets;
 * anything not recognised is returned as it came.
 */
export function explainTlsError(message: string, side: 'source' | 'destination'): string {
  const peerName = side === 'source' ? 'the destination' : 'the source';
  // Node's own certificate checks (not OpenSSL's error stack).
  if (/^(self[- ]signed certificate|unable to (get local issuer certificate|verify the first certificate)|certificate signature failure)/.test(message)) {
    return `${peerName}'s certificate is not signed by this side's --mirror-tls-ca [${message.trim()}]`;
  }
  if (/^Hostname\/IP does not match certificate's altnames/.test(message)) return `${peerName}'s certificate does not name the host dialed [${message.trim()}]`;
  const parts = message.split(':');
  const isOpenSsl = parts.length >= 6 && parts[1] === 'error' && /routines$/.test(parts[3] ?? '');
  if (!isOpenSsl) return message;
  const reason = parts[5]!.trim();
  const alert = /SSL alert number (\d+)/.exec(message)?.[1];
  const raw = `[${reason}${alert !== undefined ? `, alert ${alert}` : ''}]`;
  const peer = peerName;
  let why: string | undefined;
  if (/wrong version number|packet length too long|http request|unknown protocol|record layer failure/.test(reason)) {
    why = side === 'source'
      ? 'the destination does not speak TLS here (a receiver run with --mirror-insecure?)'
      : 'a plaintext client: a source without --mirror-psk or --mirror-tls-*, or not a mirror source';
  } else if (/binder does not verify|bad record mac|decryption failed/.test(reason)) {
    why = `${peer}'s pre-shared key differs from this side's (--mirror-psk files not the same)`;
  } else if (/psk identity not found|no shared cipher|no suitable/.test(reason)) {
    why = `${peer} offered no key identity or cipher this side has (--mirror-psk files not the same, or PSK on one side and certificates on the other)`;
  } else if (/certificate verify failed|unable to get local issuer|self.signed/.test(reason)) {
    why = `${peer}'s certificate is not signed by this side's --mirror-tls-ca`;
  } else if (/peer did not return a certificate|certificate required/.test(reason)) {
    why = `${peer} sent no certificate (it runs with --mirror-psk or --mirror-insecure?)`;
  } else if (/alert (illegal parameter|decrypt error|handshake failure|bad record mac|unknown ca|bad certificate|certificate required|unknown psk identity)/.test(reason)) {
    why = `${peer} refused the TLS handshake: it does not accept this side's ${/certificate|unknown ca/.test(reason) ? 'certificate' : 'key (--mirror-psk files not the same?) or certificate'}`;
  }
  return why !== undefined ? `${why} ${raw}` : `TLS: ${reason}${alert !== undefined ? ` (alert ${alert})` : ''}`;
}
