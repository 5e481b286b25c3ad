/**
 * Host-side checks of the attach path that need no nbd driver: device-name parsing,
 * argument validation (TypeScript edge and the addon's own re-checks), the socketpair,
 * and the CLI's one-line errors. The kernel itself is exercised in attach.test.ts (VM).
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { strict as assert } from 'assert';
import { addon } from '../../src/io/native';
import { AttachError, kernelAttach, parseNbdDevice, socketPair } from '../../src/attach/kernel';
import { mountPoints } from '../../src/attach/attach';

const CLI = path.resolve(__dirname, '../../src/cli/main.js');

function cli(...args: string[]): { code: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 30_000 });
  return { code: r.status, stderr: r.stderr };
}

const good = { device: '/dev/nbd0', fds: [100], sizeBytes: 1 << 20, blockSizeBytes: 512, flags: 1, timeoutS: 30, deadConnTimeoutS: 0, method: 'auto' as const };

describe('attach (host side, no nbd driver needed)', () => {
  it('parseNbdDevice accepts /dev/nbdN and refuses every other name', () => {
    assert.equal(parseNbdDevice('/dev/nbd0'), 0);
    assert.equal(parseNbdDevice('/dev/nbd15'), 15);
    assert.equal(parseNbdDevice('/dev/nbd65535'), 65535);
    for (const bad of ['/dev/nbd', '/dev/nbd01', '/dev/sda', 'nbd0', '/dev/nbd0p1', '/dev/nbd65536', '/dev/nbd-1', ' /dev/nbd0']) {
      assert.throws(() => parseNbdDevice(bad), (e: unknown) => e instanceof AttachError && e.code === 'EINVAL' && e.message.includes('expected /dev/nbdN'), bad);
    }
  });

  it('kernelAttach refuses bad arguments with precise messages before the kernel is asked', () => {
    const cases: Array<[Partial<typeof good>, RegExp]> = [
      [{ fds: [] }, /1 to 16 connections, got 0/],
      [{ fds: new Array(17).fill(3) }, /1 to 16 connections, got 17/],
      [{ fds: [-1] }, /fd must be an integer/],
      [{ blockSizeBytes: 1000 }, /block size must be one of 512, 1024, 2048, 4096/],
      [{ blockSizeBytes: 8192 }, /block size must be one of/],
      [{ sizeBytes: 100 }, /size must be an integer from 512/],
      [{ sizeBytes: 1000 }, /the volume size 1000 is not a multiple of the block size 512/],
      [{ sizeBytes: 4096 + 512, blockSizeBytes: 4096 }, /not a multiple of the block size 4096/],
      [{ timeoutS: 0 }, /timeout must be an integer from 1/],
      [{ flags: 0x10000 }, /flags must be an integer from 0 to 65535/],
      [{ device: '/dev/loop0' }, /expected \/dev\/nbdN/],
    ];
    for (const [patch, want] of cases) {
      assert.throws(() => kernelAttach({ ...good, ...patch }), (e: unknown) => e instanceof AttachError && want.test(e.message), JSON.stringify(patch).slice(0, 80));
    }
  });

  it('the addon re-checks its arguments and throws instead of crashing', () => {
    const raw = addon() as unknown as Record<string, (...a: unknown[]) => unknown>;
    const cb = (): void => undefined;
    const attach = raw.nbdAttach as (...a: unknown[]) => unknown;
    const detach = raw.nbdDetach as (...a: unknown[]) => unknown;
    assert.throws(() => attach('/dev/sda', [3], 1 << 20, 512, 0, 30, cb), /device must be \/dev\/nbdN/);
    assert.throws(() => attach('/dev/nbd0', [], 1 << 20, 512, 0, 30, cb), /1\.\.16 fds, got 0/);
    assert.throws(() => attach('/dev/nbd0', ['x'], 1 << 20, 512, 0, 30, cb), /fds must hold file descriptors/);
    assert.throws(() => attach('/dev/nbd0', [3], 1000, 512, 0, 30, cb), /multiple of blockSizeBytes/);
    assert.throws(() => attach('/dev/nbd0', [3], 1 << 20, 768, 0, 30, cb), /power of two/);
    assert.throws(() => attach('/dev/nbd0', [3], 1 << 20, 512, 0, 30, { method: 'tcp' }, cb), /opts.method/);
    assert.throws(() => attach('/dev/nbd0', [3], 1 << 20, 512, 0, 30, { deadConnTimeoutS: -1 }, cb), /deadConnTimeoutS/);
    assert.throws(() => attach('/dev/nbd0', [3], 1 << 20, 512, 0, 30), /callback must be a function/);
    assert.throws(() => detach(42, cb), /device must be a string/);
    assert.throws(() => detach('/dev/nbd0'), /callback must be a function/);
  });

  it('socketPair returns a connected stream pair usable by net.Socket', async () => {
    const [a, b] = socketPair();
    assert.ok(a >= 0 && b >= 0 && a !== b);
    const sa = new net.Socket({ fd: a, readable: true, writable: true });
    const sb = new net.Socket({ fd: b, readable: true, writable: true });
    const payload = Buffer.alloc(256 * 1024, 0x5a);
    const got: Buffer[] = [];
    const received = new Promise<Buffer>((resolve) => {
      sb.on('data', (c: Buffer) => got.push(c));
      sb.on('end', () => resolve(Buffer.concat(got)));
    });
    sa.end(payload);
    const data = await received;
    assert.equal(data.length, payload.length);
    assert.ok(data.equals(payload));
    sa.destroy();
    sb.destroy();
  });

  it('mountPoints finds nothing for a device that is not mounted and does not throw for a missing one', () => {
    assert.deepEqual(mountPoints('/dev/null'), []);
    assert.deepEqual(mountPoints('/dev/nbd-none'), []);
  });

  it('the CLI refuses bad invocations with one-line errors', () => {
    let r = cli('attach', '/dev/nbd0');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /give exactly one of --memory SIZE, --file PATH or a volume directory/);
    r = cli('attach', '--memory', '1M', '--file', '/x', '/dev/nbd0');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /give exactly one of/);
    r = cli('attach', '--memory', '1M', '--block-size', '1000', '/dev/nbd0');
    assert.equal(r.code, 2);
    assert.match(r.stderr, /expected one of 512, 1024, 2048, 4096/);
    r = cli('attach', '--memory', '1M', '--connections', '17', '/dev/nbd0');
    assert.equal(r.code, 2);
    assert.match(r.stderr, /expected an integer from 1 to 16/);
    r = cli('attach', '--file', '/nonexistent/disk.img', '/dev/nbd0');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /no such file: \/nonexistent\/disk.img/);
    // A mirrored volume directory: attach does not run the mirror, so it is refused unless
    // --no-mirror says to attach it without (before anything is opened or asked of the kernel).
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-attach-'));
    try {
      const dir = path.join(tmp, 'v');
      assert.equal(cli('create', dir, '--size', '16M', '--nvram-size', '1M').code, 0);
      fs.writeFileSync(path.join(dir, 'mirror-source.json'), JSON.stringify({ peer: '10.0.0.2:7000', mode: 'sync', policy: 'strict', link: { mirrorInsecure: true }, destCp: 0 }));
      r = cli('attach', dir, '/dev/nbd0');
      assert.equal(r.code, 1);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`^nvmirror: ${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is mirrored to 10\\.0\\.0\\.2:7000 \\(sync, strict\\), and attach does not run the mirror: give --no-mirror to attach it without`));
      // With --no-mirror it gets as far as the kernel (no nbd driver on this host, or no root in CI's sense).
      r = cli('attach', dir, '/dev/nbd0', '--no-mirror');
      assert.doesNotMatch(r.stderr, /is mirrored to/);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
    r = cli('detach', '/dev/sda');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /bad device "\/dev\/sda": expected \/dev\/nbdN/);
  });
});
