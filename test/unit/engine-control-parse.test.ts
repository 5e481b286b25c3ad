/**
 * The control socket's request parser (src/volume/engine-control.ts): what it refuses,
 * with a message that names the problem (the CLI prints it as it is).
 */
import { strict as assert } from 'assert';
import { parseControlRequest } from '../../src/volume/engine-control';
import { MAX_SNAPSHOT_NAME_BYTES } from '../../src/tree/layout';

describe('control requests: parsing', () => {
  it('a snapshot name too long is refused by its length, not called empty', () => {
    const long = 'z'.repeat(300);
    assert.throws(() => parseControlRequest(JSON.stringify({ op: 'snapshot', kind: 'create', name: long })), new RegExp(`^Error: snapshot name of 300 characters is longer than ${MAX_SNAPSHOT_NAME_BYTES} bytes$`));
    assert.throws(() => parseControlRequest(JSON.stringify({ op: 'snapshot', kind: 'create', name: '' })), /^Error: snapshot name must be a non-empty string$/);
    assert.deepEqual(parseControlRequest(JSON.stringify({ op: 'snapshot', kind: 'delete', name: 'a' })), { op: 'snapshot', kind: 'delete', name: 'a' });
  });

  it('an unknown op is named', () => {
    assert.throws(() => parseControlRequest(JSON.stringify({ op: 'format' })), /^Error: unknown op "format"$/);
  });
});
