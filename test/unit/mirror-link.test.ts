/**
 * Security of the mirror link (src/mirror/link.ts): linkSecurity() turns the command
 * line options into exactly one of PSK / certificates / insecure with one-line errors,
 * and serverTls()/clientTls() give options with which a real TLS 1.3 PSK handshake over
 * loopback succeeds with the same key and fails with another key, an unknown identity,
 * or a plaintext peer (no byte of the mirror protocol reaches either side); with
 * certificates (openssl test PKI), only peers whose certificates the CA signed connect.
 * Each failure has a plain explanation (explainTlsError: what status and the log say).
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import * as tls from 'tls';
import { clientTls, explainTlsError, linkSecurity, serverTls, type LinkArgs, type LinkSecurity } from '../../src/mirror/link';
import { FrameWriter, FRAME_MAGIC, MsgType } from '../../src/mirror/wire';
import { makeTestPki, type TestPki } from '../e2e/certs';

const KEY_A = '00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff';
const KEY_B = 'ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100';
/** How long a handshake attempt may take before the test calls it hung. */
const ATTEMPT_TIMEOUT_MS = 3000;

function errorOf(f: () => unknown): Error {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof Error, String(e));
    return e;
  }
  assert.fail('expected an error');
}

/** Asserts linkSecurity(o) fails with a one-line message matching `re`. */
function refuses(o: LinkArgs, re: RegExp): string {
  const e = errorOf(() => linkSecurity(o));
  assert.match(e.message, re);
  assert.doesNotMatch(e.message, /\n/, 'a one-line error');
  assert.ok(e.message.length < 300, `a short error: ${e.message}`);
  return e.message;
}

interface Attempt {
  /** The client finished its handshake. */
  clientSecure: boolean;
  clientError: string | undefined;
  /** Handshakes the server completed. */
  serverSecure: number;
  serverErrors: string[];
  /** Bytes the server's application saw (through TLS). */
  serverGot: Buffer;
  /** Bytes the client's application saw. */
  clientGot: Buffer;
}

/** Starts a TLS server as the receiver does (TLS 1.3 only) that echoes what it receives after "ok:". */
async function tlsServer(sec: LinkSecurity): Promise<{ port: number; state: Pick<Attempt, 'serverSecure' | 'serverErrors'> & { got: Buffer[] }; close: () => Promise<void> }> {
  const opts = serverTls(sec);
  assert.ok(opts);
  const state = { serverSecure: 0, serverErrors: [] as string[], got: [] as Buffer[] };
  const sockets = new Set<net.Socket>();
  const srv = tls.createServer({ ...opts, minVersion: 'TLSv1.3' }, (s) => {
    state.serverSecure++;
    s.on('data', (d: Buffer) => {
      state.got.push(d);
      s.write(Buffer.concat([Buffer.from('ok:'), d]));
    });
    s.on('error', () => undefined);
  });
  srv.on('connection', (s: net.Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  srv.on('tlsClientError', (e) => state.serverErrors.push(e.message));
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  return {
    port,
    state,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  };
}

/** Connects with the source's options (as source.ts does), sends `hello`, waits for the echo, an error or a close. */
async function attempt(serverSec: LinkSecurity, clientSec: LinkSecurity): Promise<Attempt> {
  const srv = await tlsServer(serverSec);
  try {
    const copts = clientTls(clientSec);
    assert.ok(copts);
    const hello = Buffer.concat(new FrameWriter().frame({ type: MsgType.Ping, nowMs: 42 }));
    const res = await new Promise<Omit<Attempt, 'serverSecure' | 'serverErrors' | 'serverGot'>>((resolve) => {
      const got: Buffer[] = [];
      let clientSecure = false;
      let clientError: string | undefined;
      const s = tls.connect({ ...copts, host: '127.0.0.1', port: srv.port, minVersion: 'TLSv1.3' });
      const done = (): void => {
        clearTimeout(timer);
        s.destroy();
        resolve({ clientSecure, clientError, clientGot: Buffer.concat(got) });
      };
      const timer = setTimeout(() => {
        clientError = clientError ?? `no outcome within ${ATTEMPT_TIMEOUT_MS} ms`;
        done();
      }, ATTEMPT_TIMEOUT_MS);
      s.on('secureConnect', () => {
        clientSecure = true;
        assert.equal(s.getProtocol(), 'TLSv1.3');
        s.write(hello);
      });
      s.on('data', (d: Buffer) => {
        got.push(d);
        if (Buffer.concat(got).length >= 3 + hello.length) done();
      });
      s.on('error', (e) => {
        clientError = e.message;
        done();
      });
      s.on('close', done);
    });
    // Let the server side record its error, if any.
    await new Promise((r) => setTimeout(r, 50));
    return { ...res, serverSecure: srv.state.serverSecure, serverErrors: [...srv.state.serverErrors], serverGot: Buffer.concat(srv.state.got) };
  } finally {
    await srv.close();
  }
}

function assertRefused(a: Attempt, what: string): void {
  assert.equal(a.serverSecure, 0, `${what}: the server completed a handshake`);
  assert.equal(a.serverGot.length, 0, `${what}: the server read application data`);
  assert.ok(!a.clientGot.toString('latin1').startsWith('ok:'), `${what}: the client got an answer`);
  // (In TLS 1.3 a client may finish its side before the server rejects its certificate; it then sees the connection end.)
  assert.ok(a.clientError === undefined || !/no outcome within/.test(a.clientError), `${what}: the attempt hung`);
}

describe('mirror link security', () => {
  let dir: string;
  const file = (name: string, text: string): string => {
    const p = path.join(dir, name);
    fs.writeFileSync(p, text, { mode: 0o600 });
    return p;
  };
  let pskA: string;
  let pskB: string;
  let pskOther: string;
  let pskBoth: string;

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvmirror-link-'));
    pskA = file('a.psk', `# mirror key\nmirror:${KEY_A}\n`);
    pskB = file('b.psk', `mirror:${KEY_B}\n`);
    pskOther = file('other.psk', `stranger:${KEY_A}\n`);
    pskBoth = file('both.psk', `first:${KEY_B}\n\nmirror:${KEY_A}\n`);
  });

  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('linkSecurity argument validation', () => {
    it('refuses no option at all, naming the choices', () => {
      refuses({}, /needs --mirror-psk FILE or --mirror-tls-cert\/--mirror-tls-key\/--mirror-tls-ca \(or --mirror-insecure for plaintext\)/);
      refuses({ mirrorInsecure: false }, /needs --mirror-psk/);
    });

    it('refuses two (or three) choices at once', () => {
      const two = /^choose one of --mirror-psk, --mirror-tls-\* and --mirror-insecure$/;
      refuses({ mirrorPsk: pskA, mirrorInsecure: true }, two);
      refuses({ mirrorPsk: pskA, mirrorTlsCert: 'c.pem', mirrorTlsKey: 'k.pem', mirrorTlsCa: 'ca.pem' }, two);
      refuses({ mirrorTlsCa: 'ca.pem', mirrorInsecure: true }, two);
      refuses({ mirrorPsk: pskA, mirrorTlsKey: 'k.pem', mirrorInsecure: true }, two);
    });

    it('refuses partial certificate options', () => {
      const together = /^--mirror-tls-cert, --mirror-tls-key and --mirror-tls-ca go together$/;
      refuses({ mirrorTlsCert: pskA }, together);
      refuses({ mirrorTlsCert: pskA, mirrorTlsKey: pskA }, together);
      refuses({ mirrorTlsKey: pskA, mirrorTlsCa: pskA }, together);
      refuses({ mirrorTlsCa: pskA }, together);
    });

    it('refuses an unreadable file, naming it and the reason', () => {
      const missing = path.join(dir, 'missing.psk');
      assert.equal(refuses({ mirrorPsk: missing }, /^cannot read mirror PSK file /), `cannot read mirror PSK file ${missing}: ENOENT`);
      assert.equal(refuses({ mirrorPsk: dir }, /^cannot read mirror PSK file /), `cannot read mirror PSK file ${dir}: EISDIR`);
      assert.equal(
        refuses({ mirrorTlsCert: pskA, mirrorTlsKey: missing, mirrorTlsCa: pskA }, /^cannot read key /),
        `cannot read key ${missing}: ENOENT`,
      );
      assert.equal(
        refuses({ mirrorTlsCert: missing, mirrorTlsKey: pskA, mirrorTlsCa: pskA }, /^cannot read certificate /),
        `cannot read certificate ${missing}: ENOENT`,
      );
      refuses({ mirrorTlsCert: pskA, mirrorTlsKey: pskA, mirrorTlsCa: missing }, /^cannot read CA certificate .*: ENOENT$/);
      // A key file is tiny: one past the cap is refused before it is read (the key in it is valid).
      const huge = file('huge.psk', `${'#'.repeat(1024 * 1024 - 1)}\nmirror:${KEY_A}\n`);
      assert.equal(refuses({ mirrorPsk: huge }, /is larger than/), `mirror PSK file ${huge} is larger than 1048576 bytes`);
    });

    it('refuses an empty PSK file or one with a bad line, naming the file', () => {
      const empty = file('empty.psk', '');
      const blank = file('blank.psk', '# only a comment\n\n   \n');
      const bad = file('bad.psk', `mirror:${KEY_A}\nmirror-without-key\n`);
      const odd = file('odd.psk', 'mirror:abc\n');
      for (const p of [empty, blank]) assert.match(refuses({ mirrorPsk: p }, /no key/), new RegExp(p.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')));
      assert.match(refuses({ mirrorPsk: bad }, /line 2/), /bad\.psk/);
      assert.match(refuses({ mirrorPsk: odd }, /line 1/), /odd\.psk/);
    });

    it('gives the chosen security', () => {
      assert.deepStrictEqual(linkSecurity({ mirrorInsecure: true }), { kind: 'insecure' });
      assert.equal(serverTls({ kind: 'insecure' }), undefined);
      assert.equal(clientTls({ kind: 'insecure' }), undefined);
      const psk = linkSecurity({ mirrorPsk: pskBoth });
      assert.equal(psk.kind, 'psk');
      assert.ok(psk.kind === 'psk');
      assert.deepStrictEqual([...psk.keys.keys()], ['first', 'mirror']);
      assert.equal(psk.keys.get('mirror')?.toString('hex'), KEY_A);
      const cert = linkSecurity({ mirrorTlsCert: pskA, mirrorTlsKey: pskB, mirrorTlsCa: pskOther });
      assert.equal(cert.kind, 'cert');
      assert.ok(cert.kind === 'cert');
      assert.equal(cert.key.toString(), `mirror:${KEY_B}\n`);
      const so = serverTls(cert);
      assert.ok(so);
      assert.equal(so.requestCert, true, 'the destination verifies the source\'s certificate');
      assert.equal(so.rejectUnauthorized, true);
    });
  });

  describe('TLS 1.3 PSK handshake over loopback', function () {
    this.timeout(10_000);

    it('succeeds with the same key: data flows both ways', async () => {
      const sec = linkSecurity({ mirrorPsk: pskA });
      const a = await attempt(sec, sec);
      assert.equal(a.clientError, undefined);
      assert.equal(a.clientSecure, true);
      assert.equal(a.serverSecure, 1);
      assert.deepStrictEqual(a.serverErrors, []);
      assert.equal(a.serverGot.readUInt32LE(0), FRAME_MAGIC, 'the mirror frame arrived intact');
      assert.equal(a.clientGot.toString('latin1', 0, 3), 'ok:');
      assert.ok(a.clientGot.subarray(3).equals(a.serverGot));
    });

    it('the destination accepts any identity of its file; the source offers only its first', async () => {
      // Server keys: first (KEY_B), mirror (KEY_A); the client offers mirror (KEY_A).
      const a = await attempt(linkSecurity({ mirrorPsk: pskBoth }), linkSecurity({ mirrorPsk: pskA }));
      assert.equal(a.clientError, undefined);
      assert.equal(a.serverSecure, 1);
      // The client's file is both.psk: it offers "first", which a server holding only a.psk does not know.
      const b = await attempt(linkSecurity({ mirrorPsk: pskA }), linkSecurity({ mirrorPsk: pskBoth }));
      assertRefused(b, 'first identity unknown to the server');
    });

    it('fails with a different key for the same identity', async () => {
      const a = await attempt(linkSecurity({ mirrorPsk: pskA }), linkSecurity({ mirrorPsk: pskB }));
      assertRefused(a, 'wrong key');
      assert.ok(a.serverErrors.length >= 1, 'the server reports the failed handshake (tlsClientError)');
      // Each side's explanation, as status and the log give it.
      assert.match(explainTlsError(a.serverErrors[0]!, 'destination'), /^the source's pre-shared key differs from this side's \(--mirror-psk files not the same\) \[binder does not verify\]$/);
      if (a.clientError !== undefined) assert.match(explainTlsError(a.clientError, 'source'), /^the destination refused the TLS handshake: it does not accept this side's key .*\[.*alert \d+\]$/);
    });

    it('fails with an identity the server does not know', async () => {
      const a = await attempt(linkSecurity({ mirrorPsk: pskA }), linkSecurity({ mirrorPsk: pskOther }));
      assertRefused(a, 'unknown identity');
      assert.ok(a.serverErrors.length >= 1, 'the server reports the failed handshake (tlsClientError)');
      assert.match(explainTlsError(a.serverErrors[0]!, 'destination'), /^the source offered no key identity or cipher this side has/);
    });

    it('refuses a plaintext client speaking the mirror protocol to a PSK server', async () => {
      const srv = await tlsServer(linkSecurity({ mirrorPsk: pskA }));
      try {
        const got: Buffer[] = [];
        const outcome = await new Promise<string>((resolve) => {
          const s = net.connect({ host: '127.0.0.1', port: srv.port });
          const timer = setTimeout(() => {
            s.destroy();
            resolve('timeout');
          }, ATTEMPT_TIMEOUT_MS);
          s.on('connect', () => {
            for (const part of new FrameWriter().frame({ type: MsgType.Hello, sourceUuid: '0123abcd-4567-89ef-0011-223344556677', sizeBytes: 1 << 30, deviceBlocks: 1 << 18, nvramBytes: 64 << 20, mode: 'sync', sourceCp: 3, streamFromSeq: 1, baseCp: -1, baseRoot: Buffer.alloc(24), lastSeq: 0, startedAtSeq: -1, processId: '5eed5eed5eed5eed', lineage: [{ id: '00000000000000a1', firstCp: 0 }], earlier: [] })) s.write(part);
          });
          s.on('data', (d: Buffer) => got.push(d));
          s.on('error', () => undefined);
          s.on('close', () => {
            clearTimeout(timer);
            resolve('closed');
          });
        });
        await new Promise((r) => setTimeout(r, 50));
        assert.equal(outcome, 'closed', 'the server closes the connection');
        assert.equal(srv.state.serverSecure, 0);
        assert.equal(Buffer.concat(srv.state.got).length, 0, 'no plaintext byte reaches the application');
        assert.ok(srv.state.serverErrors.length >= 1, 'the server reports the failed handshake');
        assert.match(explainTlsError(srv.state.serverErrors[0]!, 'destination'), /^a plaintext client: a source without --mirror-psk or --mirror-tls-\*, or not a mirror source \[wrong version number\]$/);
        const back = Buffer.concat(got);
        assert.ok(back.length < 4 || back.readUInt32LE(0) !== FRAME_MAGIC, 'the server sent no mirror frame');
      } finally {
        await srv.close();
      }
    });
  });

  describe('TLS 1.3 with certificates over loopback', function () {
    this.timeout(20_000);
    let pki: TestPki;
    const read = (p: string): Buffer => fs.readFileSync(p);
    const sec = (cert: string, key: string, ca: string): LinkSecurity => ({ kind: 'cert', cert: read(cert), key: read(key), ca: read(ca) });

    before(async () => {
      pki = await makeTestPki(fs.mkdtempSync(path.join(dir, 'pki-')));
    });

    it('succeeds when both certificates are signed by the CA both sides trust (options read by linkSecurity)', async () => {
      const server = linkSecurity({ mirrorTlsCert: pki.serverCert, mirrorTlsKey: pki.serverKey, mirrorTlsCa: pki.caCert });
      const g = pki.goodClientDir;
      const client = linkSecurity({ mirrorTlsCert: path.join(g, 'client-cert.pem'), mirrorTlsKey: path.join(g, 'client-key.pem'), mirrorTlsCa: path.join(g, 'ca-cert.pem') });
      const a = await attempt(server, client);
      assert.equal(a.clientError, undefined);
      assert.equal(a.serverSecure, 1);
      assert.equal(a.serverGot.readUInt32LE(0), FRAME_MAGIC);
      assert.equal(a.clientGot.toString('latin1', 0, 3), 'ok:');
    });

    it('refuses a source whose certificate another CA signed', async () => {
      const server = sec(pki.serverCert, pki.serverKey, pki.caCert);
      const o = pki.otherCaClientDir;
      const a = await attempt(server, sec(path.join(o, 'client-cert.pem'), path.join(o, 'client-key.pem'), path.join(o, 'ca-cert.pem')));
      assertRefused(a, 'client certificate from another CA');
      assert.ok(a.serverErrors.length >= 1 || a.clientError !== undefined);
    });

    it('a source that does not trust the destination\'s CA refuses the destination', async () => {
      const server = sec(pki.serverCert, pki.serverKey, pki.caCert);
      const w = pki.wrongTrustClientDir;
      const a = await attempt(server, sec(path.join(w, 'client-cert.pem'), path.join(w, 'client-key.pem'), path.join(w, 'ca-cert.pem')));
      assertRefused(a, 'server certificate not trusted');
      assert.equal(a.clientSecure, false);
      assert.ok(a.clientError !== undefined);
      assert.match(explainTlsError(a.clientError, 'source'), /^the destination's certificate is not signed by this side's --mirror-tls-ca \[/);
    });
  });
});
