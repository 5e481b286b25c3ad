/**
 * Test PKI made with openssl in a temp dir: a CA, a server certificate (localhost and
 * 127.0.0.1), a client certificate, and a second CA with its own client certificate.
 * The client directories use the layout libnbd and qemu expect (ca-cert.pem,
 * client-cert.pem, client-key.pem).
 *
 * Invariants: keys are P-256 (fast to make); certificates are valid for 2 days; nothing
 * outside `dir` is written.
 */
import * as fs from 'fs';
import * as path from 'path';
import { runOk } from './harness';

export interface TestPki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** Client dir signed by the right CA: ca-cert.pem, client-cert.pem, client-key.pem. */
  goodClientDir: string;
  /** Client dir whose client certificate is signed by another CA (trusts the right CA). */
  otherCaClientDir: string;
  /** Client dir that trusts only the right CA and has no client certificate. */
  noCertClientDir: string;
  /** Client dir that trusts only the other CA (cannot verify the server). */
  wrongTrustClientDir: string;
}

const KEY_ARGS = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

async function makeCa(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, `${name}-cert.pem`);
  const key = path.join(dir, `${name}-key.pem`);
  await runOk('openssl', [
    'req', '-x509', ...KEY_ARGS, '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  return { cert, key };
}

async function makeLeaf(
  dir: string,
  name: string,
  ca: { cert: string; key: string },
  extendedKeyUsage: string,
  subjectAltName?: string,
): Promise<{ cert: string; key: string }> {
  const key = path.join(dir, `${name}-key.pem`);
  const csr = path.join(dir, `${name}.csr`);
  const cert = path.join(dir, `${name}-cert.pem`);
  const ext = path.join(dir, `${name}.ext`);
  await runOk('openssl', ['req', ...KEY_ARGS, '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
  const lines = [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage=${extendedKeyUsage}`,
  ];
  if (subjectAltName !== undefined) lines.push(`subjectAltName=${subjectAltName}`);
  fs.writeFileSync(ext, `${lines.join('\n')}\n`);
  await runOk('openssl', [
    'x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', ext,
  ]);
  return { cert, key };
}

function clientDir(dir: string, name: string, trust: string, leaf?: { cert: string; key: string }): string {
  const d = path.join(dir, name);
  fs.mkdirSync(d);
  fs.copyFileSync(trust, path.join(d, 'ca-cert.pem'));
  if (leaf) {
    fs.copyFileSync(leaf.cert, path.join(d, 'client-cert.pem'));
    fs.copyFileSync(leaf.key, path.join(d, 'client-key.pem'));
    fs.chmodSync(path.join(d, 'client-key.pem'), 0o600);
  }
  return d;
}

export async function makeTestPki(dir: string): Promise<TestPki> {
  const ca = await makeCa(dir, 'ca');
  const other = await makeCa(dir, 'otherca');
  const server = await makeLeaf(dir, 'server', ca, 'serverAuth', 'DNS:localhost,IP:127.0.0.1');
  const client = await makeLeaf(dir, 'client', ca, 'clientAuth');
  const rogue = await makeLeaf(dir, 'rogue-client', other, 'clientAuth');
  return {
    dir,
    caCert: ca.cert,
    serverCert: server.cert,
    serverKey: server.key,
    goodClientDir: clientDir(dir, 'good-client', ca.cert, client),
    otherCaClientDir: clientDir(dir, 'other-ca-client', ca.cert, rogue),
    noCertClientDir: clientDir(dir, 'no-cert-client', ca.cert),
    wrongTrustClientDir: clientDir(dir, 'wrong-trust-client', other.cert, client),
  };
}
