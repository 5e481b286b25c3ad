/**
 * nbdinfo (libnbd) against a real `nvmirror serve`: export listing, the exact fields of
 * --json, and --map of base:allocation after writes and trims.
 * Runs for every backend in BACKENDS, over Unix and TCP.
 */
import { strict as assert } from 'assert';
import { BACKENDS, TRANSPORTS, MiB, Server, cleanupAll, requireTools, runOk, startServer } from './harness';

interface MapExtent {
  offset: number;
  length: number;
  type: number;
}

/** Merges neighbouring extents of the same type, so that split points do not matter. */
function mergeExtents(extents: MapExtent[]): MapExtent[] {
  const out: MapExtent[] = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, type: e.type });
  }
  return out;
}

async function map(uri: string): Promise<MapExtent[]> {
  const out = await runOk('nbdinfo', ['--map', '--json', uri], { timeoutMs: 30_000 });
  const parsed = JSON.parse(out) as Array<{ offset: number; length: number; type: number; description: string }>;
  assert.ok(Array.isArray(parsed) && parsed.length > 0, `nbdinfo --map printed no extents: ${out}`);
  return mergeExtents(parsed.map((e) => ({ offset: e.offset, length: e.length, type: e.type })));
}

const SIZE_BYTES = 64 * MiB;
const EXPORT_NAME = 'e2e-disk';

for (const backend of BACKENDS) {
  for (const transport of TRANSPORTS) {
    describe(`e2e nbdinfo: ${backend} backend over ${transport}`, function () {
      this.timeout(60_000);
      let server: Server;

      before(async function () {
        requireTools(this, 'nbdinfo', 'qemu-io');
        server = await startServer({ backend, transport, sizeBytes: SIZE_BYTES, exportName: EXPORT_NAME });
      });
      after(async function () {
        if (server) assert.equal(await server.stop(), 0, 'server exits 0 on SIGTERM');
        await cleanupAll();
      });

      it('prints a URI line for the endpoint it listens on', function () {
        const want = transport === 'unix' ? `socket=${server.socketPath}` : `nbd://127.0.0.1:${server.port}/`;
        assert.ok(server.printed.some((l) => l.includes(want)), `printed: ${JSON.stringify(server.printed)}`);
      });

      it('--list shows the one export with its name and size', async function () {
        const out = await runOk('nbdinfo', ['--list', '--json', server.uri]);
        const j = JSON.parse(out) as { protocol: string; TLS: boolean; exports: Array<Record<string, unknown>> };
        assert.equal(j.protocol, 'newstyle-fixed');
        assert.equal(j.TLS, false);
        assert.equal(j.exports.length, 1, out);
        const e = j.exports[0] ?? {};
        assert.equal(e['export-name'], EXPORT_NAME);
        assert.equal(e['export-size'], SIZE_BYTES);
        const text = await runOk('nbdinfo', ['--list', server.uri]);
        assert.match(text, new RegExp(`export="${EXPORT_NAME}":`));
        assert.match(text, /export-size: 67108864 \(64M\)/);
      });

      it('--json reports the exact size, name, flags and block sizes', async function () {
        const out = await runOk('nbdinfo', ['--json', server.uri]);
        const j = JSON.parse(out) as { protocol: string; structured: boolean; exports: Array<Record<string, unknown>> };
        assert.equal(j.protocol, 'newstyle-fixed');
        assert.equal(j.structured, true, 'structured replies negotiated');
        assert.equal(j.exports.length, 1);
        const e = j.exports[0] ?? {};
        assert.equal(e['export-name'], EXPORT_NAME);
        assert.equal(e['export-size'], SIZE_BYTES);
        assert.equal(typeof e['description'], 'string', 'NBD_INFO_DESCRIPTION sent');
        assert.ok((e['description'] as string).length > 0, 'description not empty');
        assert.deepEqual(e['contexts'], ['base:allocation']);
        const expectTrue = ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn', 'can_df'];
        for (const k of expectTrue) assert.equal(e[k], true, `${k} should be true: ${out}`);
        assert.equal(e['is_read_only'], false);
        assert.equal(e['is_rotational'], false);
        const min = e['block_size_minimum'];
        const pref = e['block_size_preferred'];
        const max = e['block_size_maximum'];
        assert.equal(typeof min, 'number', `block sizes advertised: ${out}`);
        assert.ok(typeof min === 'number' && min >= 1 && min <= 65536 && (min & (min - 1)) === 0, `minimum ${min} is a power of 2 <= 64 KiB`);
        assert.equal(pref, 4096);
        assert.equal(max, 64 * MiB);
      });

      it('--map shows data where written and holes after trim and write -z', async function () {
        // Fresh volume: all hole+zero.
        assert.deepEqual(await map(server.uri), [{ offset: 0, length: SIZE_BYTES, type: 3 }]);
        await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 8M', '-c', 'discard 2M 2M', '-c', 'write -z -u 6M 1M', '-c', 'flush', server.uri]);
        const extents = await map(server.uri);
        // write -z -u may punch a hole (3) or leave allocated zeroes (2); it must say zero.
        const zeroed = extents.find((e) => e.offset === 6 * MiB);
        assert.ok(zeroed && (zeroed.type === 3 || zeroed.type === 2), `zeroed range: ${JSON.stringify(extents)}`);
        assert.deepEqual(extents, [
          { offset: 0, length: 2 * MiB, type: 0 },
          { offset: 2 * MiB, length: 2 * MiB, type: 3 },
          { offset: 4 * MiB, length: 2 * MiB, type: 0 },
          { offset: 6 * MiB, length: 1 * MiB, type: zeroed.type },
          { offset: 7 * MiB, length: 1 * MiB, type: 0 },
          { offset: 8 * MiB, length: SIZE_BYTES - 8 * MiB, type: 3 },
        ]);
        // Data reads back around the holes; holes read as zeroes.
        await runOk('qemu-io', [
          '-f', 'raw', '-r',
          '-c', 'read -P 0xab 0 2M',
          '-c', 'read -P 0 2M 2M',
          '-c', 'read -P 0xab 4M 2M',
          '-c', 'read -P 0 6M 1M',
          '-c', 'read -P 0xab 7M 1M',
          server.uri,
        ]);
        const totals = await runOk('nbdinfo', ['--map', '--totals', server.uri]);
        // 5 MiB data (7.8% of 64 MiB), the rest zero (hole,zero unless write -z kept allocation).
        assert.match(totals, /^\s*5242880\s+7\.8%\s+0 data$/m, totals);
        if (zeroed.type === 3) assert.match(totals, /^\s*61865984\s+92\.2%\s+3 hole,zero$/m, totals);
        else assert.match(totals, /^\s*1048576\s+1\.6%\s+2 zero$/m, totals);
      });
    });
  }
}
