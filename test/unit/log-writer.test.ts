/**
 * The log writer (native/log_writer.cc, src/util/log.ts) against a real pipe nobody reads.
 *
 * A child process logs through createLogger() with its stderr on a FIFO that the test holds
 * open for reading but does not read: pino's old synchronous write blocked the child's
 * event loop there forever (the test would time out). Then the test reads the FIFO and
 * checks what arrived: the lines in order, a gap exactly as large as the child says it
 * dropped, a warn line with that count standing where the gap is, and the lines after it.
 */
import { strict as assert } from 'node:assert';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const LOG_JS = path.resolve(__dirname, '../../src/util/log.js');

function mkfifo(dir: string): string {
  const p = path.join(dir, 'stderr.fifo');
  const r = spawnSync('mkfifo', [p]);
  assert.equal(r.status, 0, `mkfifo: ${String(r.stderr)}`);
  return p;
}

/** Everything readable from a non-blocking descriptor now ('' when empty; null at EOF). */
function readAvailable(fd: number): string | null {
  const buf = Buffer.alloc(1 << 20);
  let out = '';
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, buf.length, null);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return out;
      throw e;
    }
    if (n === 0) return out.length > 0 ? out : null;
    out += buf.subarray(0, n).toString('utf8');
  }
}

describe('log writer: bad arguments', () => {
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const raw = require('bindings')('nvmirror_native') as { logWriterStart: (...a: unknown[]) => unknown; logWriterWrite: (...a: unknown[]) => unknown; logWriterFlush: (...a: unknown[]) => unknown; logWriterStats: () => unknown };
  it('refuses a bad descriptor, capacity, line or timeout with a message naming the call', () => {
    assert.throws(() => raw.logWriterStart('2', 1 << 20), /logWriterStart: fd must be a number/);
    assert.throws(() => raw.logWriterStart(-1, 1 << 20), /logWriterStart: fd must be an integer/);
    assert.throws(() => raw.logWriterStart(2, 100), /logWriterStart: capacityBytes must be an integer in \[4096/);
    assert.throws(() => raw.logWriterStart(2, 1e12), /logWriterStart: capacityBytes/);
    assert.throws(() => raw.logWriterWrite(42), /logWriterWrite: (line must be a string or a Buffer|the log writer is not started)/);
    assert.throws(() => raw.logWriterFlush(-5), /logWriterFlush: timeoutMs must be an integer/);
    assert.equal(typeof (raw.logWriterStats() as { started: boolean }).started, 'boolean');
  });
});

describe('log writer: stderr that nobody reads', function () {
  this.timeout(60_000);

  it('never blocks the event loop: drops past its queue, counts them and says so in the log', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-logw-'));
    const fifo = mkfifo(dir);
    const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const childErr = fs.openSync(fifo, fs.constants.O_WRONLY);
    // The child logs 40000 lines of ~300 bytes (12 MB: past the 64 KiB pipe and the 1 MiB
    // queue), tells the test what it counted, waits for "go", waits for the queue to drain
    // (the test reads now), logs one more line and exits.
    const script = `
      const { createLogger, logDroppedLines, flushLog, LOG_QUEUE_BYTES_MAX } = require(${JSON.stringify(LOG_JS)});
      const log = createLogger('info');
      let ticks = 0;
      const t = setInterval(() => ticks++, 1);
      const pad = 'x'.repeat(200);
      for (let i = 0; i < 40000; i++) log.info({ seq: i, pad }, 'line');
      setTimeout(() => {
        clearInterval(t);
        process.stdout.write(JSON.stringify({ dropped: logDroppedLines(), cap: LOG_QUEUE_BYTES_MAX, ticks }) + '\\n');
        process.stdin.once('data', () => { if (!flushLog(20000)) process.exit(9); log.info({ seq: 'after' }, 'after the reader came back'); process.exit(0); });
      }, 50);
    `;
    const child = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', childErr] });
    fs.closeSync(childErr);
    try {
      const first = await new Promise<string>((resolve, reject) => {
        let out = '';
        child.stdout!.setEncoding('utf8');
        child.stdout!.on('data', (s: string) => {
          out += s;
          const nl = out.indexOf('\n');
          if (nl >= 0) resolve(out.slice(0, nl));
        });
        child.on('exit', (code) => reject(new Error(`child exited ${code} before reporting`)));
      });
      const stats = JSON.parse(first) as { dropped: number; cap: number; ticks: number };
      assert.ok(stats.dropped > 30000, `most of 12 MB cannot fit a 1 MiB queue: dropped ${stats.dropped}`);
      assert.ok(stats.ticks > 0, 'the child event loop ran timers while stderr was full');

      // Now read: the log arrives in order, with the gap and the note, then the last line.
      let text = '';
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      child.stdin!.write('go\n');
      let done = false;
      void exited.then(() => (done = true));
      for (;;) {
        const got = readAvailable(reader);
        if (got === null) break;
        text += got;
        if (got === '' && done) {
          const rest = readAvailable(reader);
          if (rest === null) break;
          text += rest;
        }
        await new Promise((r) => setTimeout(r, 5));
      }
      assert.equal(await exited, 0);

      // Walk the log: numbered lines in order; each note stands exactly where its lines are
      // missing (the next number is the one after the gap); the line logged after the reader
      // came back is last, after every number was written or counted.
      const lines = text.trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      let next = 0;
      let notes = 0;
      let notedDrops = 0;
      let written = 0;
      for (const [i, l] of lines.entries()) {
        if (typeof l.droppedLines === 'number') {
          assert.equal(l.level, 40, 'a drop note is a warning');
          assert.ok(l.droppedLines > 0);
          next += l.droppedLines;
          notedDrops += l.droppedLines;
          notes++;
        } else if (typeof l.seq === 'number') {
          assert.equal(l.seq, next, `line ${i}: in order, with each gap noted`);
          next++;
          written++;
        } else {
          assert.equal(l.seq, 'after', `line ${i}: ${JSON.stringify(l).slice(0, 200)}`);
          assert.equal(i, lines.length - 1, 'the line after the reader came back is last');
          assert.equal(next, 40000, 'every line before it was written or counted as dropped');
        }
      }
      assert.ok(notes >= 1, 'a line says that lines were dropped');
      assert.equal(lines[lines.length - 1]?.seq, 'after');
      assert.equal(notedDrops, stats.dropped, 'the notes count exactly the dropped lines');
      assert.equal(written + stats.dropped, 40000);
    } finally {
      child.kill('SIGKILL');
      fs.closeSync(reader);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('writes out everything queued at exit when the reader keeps up', () => {
    const script = `
      const { createLogger } = require(${JSON.stringify(LOG_JS)});
      const log = createLogger('info');
      for (let i = 0; i < 2000; i++) log.info({ seq: i }, 'line');
      process.exit(3);
    `;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', maxBuffer: 64 << 20 });
    assert.equal(r.status, 3);
    const seqs = r.stderr.trimEnd().split('\n').map((l) => (JSON.parse(l) as { seq: number }).seq);
    assert.deepEqual(seqs, Array.from({ length: 2000 }, (_, i) => i));
  });
});
