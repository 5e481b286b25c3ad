/**
 * A promote that refuses after the running receiver let go of the mirror, before it
 * changed anything (here: the mirror has no committed CP yet), hands the mirror back
 * (control op `unrelease`): the receiver takes its source again. Was: the receiver went
 * on refusing that source ("released for promote") until it was restarted.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import pino from 'pino';
import { promoteMirror } from '../../src/mirror/promote';
import { MirrorDir, type MirrorHello } from '../../src/mirror/mirror-dir';
import { MirrorReceiver, RECEIVER_SOCKET_NAME } from '../../src/mirror/receiver';
import { ControlServer } from '../../src/volume/engine-control';

const UUID = '9e0d0e5e-0000-4000-8000-0000000da7a5';

describe('mirror: a promote that refuses', () => {
  let tmp: string;
  const log = pino({ level: 'silent' });
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-promote-refused-'));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('hands the mirror back to the running receiver that let go of it (its source is taken again)', async () => {
    const hello: MirrorHello = { sourceUuid: UUID, sizeBytes: 8 * 1024 * 1024, deviceBlocks: 4096, nvramBytes: 4 * 1024 * 1024 };
    await (await MirrorDir.openOrCreate(tmp, hello, log)).close();
    const lines: string[] = [];
    const rx = new MirrorReceiver({ dir: tmp, logger: pino({ level: 'info' }, { write: (l: string) => void lines.push(l) }) });
    await rx.listen('127.0.0.1', 0);
    const control = await ControlServer.listen(path.join(tmp, RECEIVER_SOCKET_NAME), async (req) => {
      if (req.op === 'release') return { release: await rx.release(req.source, req.force) };
      if (req.op === 'unrelease') return { unrelease: rx.unrelease(req.source) };
      throw new Error(`not ${req.op}`);
    });
    try {
      await assert.rejects(promoteMirror(path.join(tmp, UUID), { force: false, logger: log }), /has no committed CP yet: nothing to promote/);
      assert.ok(lines.some((l) => l.includes('mirror released for promote')), 'the promote asked the receiver to let go');
      assert.ok(lines.some((l) => l.includes('promote did not happen: the mirror takes its source again')), lines.join(''));
      assert.deepEqual(rx.unrelease(UUID), { wasReleased: false }, 'no longer released: the source\'s next HELLO opens the mirror');
    } finally {
      await control.close();
      await rx.close();
    }
  });
});
