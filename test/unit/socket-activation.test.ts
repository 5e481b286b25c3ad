/**
 * The LISTEN_FDS handoff (src/nbd/socket-activation.ts): sockets are taken only when
 * LISTEN_PID is ours, fds start at 3, names come from LISTEN_FDNAMES, the variables are
 * removed once taken, and malformed values are one-line errors.
 */
import { strict as assert } from 'assert';
import { LISTEN_FDS_MAX, LISTEN_FDS_START, takeListenFds } from '../../src/nbd/socket-activation';

const PID = 4242;

describe('socket activation (LISTEN_FDS)', function () {
  it('takes nothing when the variables are absent', function () {
    assert.deepEqual(takeListenFds({ PATH: '/bin' }, PID), { kind: 'none' });
  });

  it('refuses the sockets when LISTEN_PID is not our pid, and leaves the environment alone', function () {
    const env = { LISTEN_PID: String(PID + 1), LISTEN_FDS: '1' };
    const a = takeListenFds(env, PID);
    assert.equal(a.kind, 'refused');
    assert.match(a.kind === 'refused' ? a.reason : '', /LISTEN_PID=4243 is not this process \(pid 4242\)/);
    assert.deepEqual(env, { LISTEN_PID: String(PID + 1), LISTEN_FDS: '1' }, 'not ours: not unset either');
  });

  it('takes fds from 3 with their names when LISTEN_PID is ours, and unsets the variables', function () {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: String(PID), LISTEN_FDS: '2', LISTEN_FDNAMES: 'nbd:nbd-tcp', KEEP: 'x' };
    const a = takeListenFds(env, PID);
    assert.deepEqual(a, {
      kind: 'activated',
      sockets: [
        { fd: LISTEN_FDS_START, name: 'nbd' },
        { fd: LISTEN_FDS_START + 1, name: 'nbd-tcp' },
      ],
    });
    assert.equal(LISTEN_FDS_START, 3);
    assert.deepEqual(env, { KEEP: 'x' });
  });

  it('works without LISTEN_FDNAMES', function () {
    const a = takeListenFds({ LISTEN_PID: String(PID), LISTEN_FDS: '1' }, PID);
    assert.deepEqual(a, { kind: 'activated', sockets: [{ fd: 3, name: undefined }] });
  });

  it('rejects malformed, partial, zero and excessive values with one-line errors', function () {
    const bad: Array<[NodeJS.ProcessEnv, RegExp]> = [
      [{ LISTEN_PID: String(PID) }, /needs both LISTEN_PID and LISTEN_FDS/],
      [{ LISTEN_FDS: '1' }, /needs both/],
      [{ LISTEN_PID: 'me', LISTEN_FDS: '1' }, /bad LISTEN_PID="me"/],
      [{ LISTEN_PID: String(PID), LISTEN_FDS: '-1' }, /bad LISTEN_FDS="-1"/],
      [{ LISTEN_PID: String(PID), LISTEN_FDS: '0' }, /passed no sockets/],
      [{ LISTEN_PID: String(PID), LISTEN_FDS: String(LISTEN_FDS_MAX + 1) }, /more than 64 sockets/],
    ];
    for (const [env, re] of bad) {
      assert.throws(() => takeListenFds(env, PID), (e: Error) => re.test(e.message) && !e.message.includes('\n'));
    }
  });
});
