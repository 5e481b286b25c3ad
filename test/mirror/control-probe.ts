/**
 * `node control-probe.js SOCKET [OP]`: one request on a control socket (a served volume's
 * or a receiver's), its JSON answer on stdout. What the tests poll with: it loads nothing
 * but `net`, so it starts in ~40 ms where `nvmirror status --json` takes ~450 ms of a CPU,
 * and the polls of a two-CPU machine no longer slow the processes under test.
 */
import * as net from 'net';

const [sock, op = 'status'] = process.argv.slice(2);
if (!sock) {
  process.stderr.write('usage: control-probe SOCKET [OP]\n');
  process.exit(2);
}
const timer = setTimeout(() => {
  process.stderr.write(`no answer from ${sock}\n`);
  process.exit(1);
}, 10_000);
const s = net.createConnection(sock);
let buf = '';
s.setEncoding('utf8');
s.on('connect', () => s.write(`${JSON.stringify({ op })}\n`));
s.on('data', (c: string) => {
  buf += c;
  const nl = buf.indexOf('\n');
  if (nl < 0) return;
  process.stdout.write(buf.slice(0, nl));
  clearTimeout(timer);
  s.destroy();
});
s.on('error', (e) => {
  process.stderr.write(`${e.message}\n`);
  process.exitCode = 1;
  clearTimeout(timer);
});
