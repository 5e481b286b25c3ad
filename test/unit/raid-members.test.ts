/**
 * A RAID volume's member files and their labels (src/volume/raid-members.ts), on real files:
 * swapped and foreign members are refused by name; missing, truncated, unlabelled and
 * stale members open out of service with the reason; a member faulted at run time is
 * recorded in the other members' labels, so it is stale at the next open; a superblock
 * ring torn across members (a crash mid-CP) is made whole by the next read-write open.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createRaidMembers, openRaidMembers, raidMemberBlocks, type RaidMemberFile } from '../../src/volume/raid-members';
import type { RaidDevice } from '../../src/raid/raid-device';
import { LABEL_COPIES } from '../../src/raid/geometry';
import { RING_SLOTS } from '../../src/tree/layout';
import { BlockTree } from '../../src/tree/tree';

const UUID = '11111111-2222-4333-8444-555555555555';
const OTHER = '99999999-2222-4333-8444-555555555555';
const SPEC = { level: 5 as const, stripeUnitBytes: 16 * 1024 };

describe('raid members', () => {
  let tmp: string;
  let files: RaidMemberFile[];
  let memberBlocks: number;
  const open: RaidDevice[] = [];

  beforeEach(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nvm-raid-members-'));
    files = [0, 1, 2, 3].map((i) => ({ name: `m${i}.img`, path: path.join(tmp, `m${i}.img`) }));
    memberBlocks = raidMemberBlocks(SPEC, 4, 1200);
    const dev = await createRaidMembers(files, SPEC, memberBlocks, UUID);
    await dev.writeBlocks(100, Buffer.alloc(4096 * 40, 7));
    await dev.sync();
    await dev.close();
  });
  afterEach(async () => {
    for (const d of open.splice(0)) await d.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const openAll = async (readOnly = false): Promise<RaidDevice> => {
    const d = await openRaidMembers(files, SPEC, memberBlocks, UUID, readOnly);
    open.push(d);
    return d;
  };

  it('opens a healthy set online and reads what was written', async () => {
    const d = await openAll();
    assert.equal(d.health().state, 'online');
    const b = Buffer.alloc(4096);
    await d.readBlocks(120, 1, b);
    assert.ok(b.equals(Buffer.alloc(4096, 7)));
  });

  it('refuses swapped members and a member of another volume by name, changing nothing', async () => {
    const before = fs.readFileSync(files[0]!.path);
    fs.renameSync(files[1]!.path, path.join(tmp, 'x'));
    fs.renameSync(files[2]!.path, files[1]!.path);
    fs.renameSync(path.join(tmp, 'x'), files[2]!.path);
    await assert.rejects(openAll(), /^Error: member 1 m1\.img holds member 2 of this volume \(members swapped\?\): refusing to open/);
    await assert.rejects(openRaidMembers(files, SPEC, memberBlocks, OTHER, false), /^Error: member 0 m0\.img belongs to another volume \(uuid 11111111-2222-4333-8444-555555555555\), not to this one \(99999999-2222-4333-8444-555555555555\): refusing to open/);
    await assert.rejects(openRaidMembers(files, { level: 5, stripeUnitBytes: 64 * 1024 }, memberBlocks, UUID, false), /its label \(RAID-5, 4 members, unit 16384, .*\) disagrees with the volume label/);
    assert.ok(fs.readFileSync(files[0]!.path).equals(before), 'nothing written');
  });

  it('opens missing, truncated and unlabelled members out of service, with the reason', async () => {
    fs.rmSync(files[3]!.path);
    let d = await openAll(true);
    assert.equal(d.health().memberStatus[3]!.state, 'missing');
    assert.match(d.health().memberStatus[3]!.reason ?? '', /cannot open: no such file/);
    const b = Buffer.alloc(4096);
    await d.readBlocks(120, 1, b);
    assert.ok(b.equals(Buffer.alloc(4096, 7)), 'degraded read');
    fs.writeFileSync(files[3]!.path, Buffer.alloc(memberBlocks * 4096)); // a blank file
    fs.truncateSync(files[2]!.path, 300 * 4096);
    d = await openAll(true);
    assert.match(d.health().memberStatus[3]!.reason ?? '', /no RAID label: not a member of this volume/);
    assert.match(d.health().memberStatus[2]!.reason ?? '', new RegExp(`truncated: 300 blocks, the volume needs ${memberBlocks}`));
    assert.equal(d.health().state, 'failed');
    assert.match(d.health().failure ?? '', /lost 2 of 4 members, more than the 1 it tolerates/);
  });

  it('a member truncated below its label area (to nothing, or to its labels only) is out of service, not a failed open', async () => {
    const labelsOf1 = fs.readFileSync(files[1]!.path).subarray(0, LABEL_COPIES * 4096);
    fs.truncateSync(files[1]!.path, 0);
    let d = await openAll(true);
    assert.equal(d.health().memberStatus[1]!.state, 'faulted');
    assert.equal(d.health().memberStatus[1]!.reason, 'too small to hold a label (0 blocks)');
    assert.equal(d.health().state, 'degraded');
    const b = Buffer.alloc(4096);
    await d.readBlocks(120, 1, b);
    assert.ok(b.equals(Buffer.alloc(4096, 7)), 'degraded read');
    await d.close();
    open.splice(0);
    // Its labels back, nothing after them (shorter than the label area and head ring).
    fs.writeFileSync(files[1]!.path, labelsOf1);
    d = await openAll(true);
    assert.equal(d.health().memberStatus[1]!.state, 'faulted');
    assert.match(d.health().memberStatus[1]!.reason ?? '', new RegExp(`^truncated: ${labelsOf1.length / 4096} blocks, the volume needs ${memberBlocks}$`));
  });

  it('a member that missed writes is stale at the next open', async () => {
    fs.renameSync(files[1]!.path, path.join(tmp, 'away'));
    const d = await openAll();
    await d.writeBlocks(200, Buffer.alloc(4096 * 12, 9));
    await d.sync(); // writes generation 2 to the members in service, naming member 1 out of service
    await d.close();
    open.splice(0);
    fs.renameSync(path.join(tmp, 'away'), files[1]!.path);
    const again = await openAll(true);
    assert.equal(again.health().memberStatus[1]!.state, 'faulted');
    assert.match(again.health().memberStatus[1]!.reason ?? '', /stale: its label is generation 1, the volume's is 2 \(it missed writes while out of service\)/);
    const b = Buffer.alloc(4096 * 12);
    await again.readBlocks(200, 12, b);
    assert.ok(b.equals(Buffer.alloc(4096 * 12, 9)), 'the stale member is not read');
  });

  it('a read-write open puts the newest superblock on every member before anything builds on it (a ring torn by a crash mid-CP)', async () => {
    const HEAD = RING_SLOTS * 4096;
    const headOf = (i: number): Buffer => {
      const fd = fs.openSync(files[i]!.path, 'r');
      try {
        const b = Buffer.alloc(HEAD);
        fs.readSync(fd, b, 0, HEAD, LABEL_COPIES * 4096);
        return b;
      } finally {
        fs.closeSync(fd);
      }
    };
    let d = await openAll();
    await BlockTree.format(d, { sizeBytes: 2 * 1024 * 1024, volumeUuid: UUID });
    let tree = await BlockTree.open(d);
    await tree.commitCp([{ lbn: 3, data: Buffer.alloc(4096, 1) }], { nvlogSeq: 1, nvlogEpoch: 1 });
    const cpBefore = tree.cpNumber;
    const before = [1, 2, 3].map(headOf);
    await tree.commitCp([{ lbn: 3, data: Buffer.alloc(4096, 2) }], { nvlogSeq: 2, nvlogEpoch: 1 });
    await tree.close();
    await d.close();
    open.splice(0);
    // The crash: the newest CP's ring write reached member 0 only.
    [1, 2, 3].forEach((i, k) => {
      const fd = fs.openSync(files[i]!.path, 'r+');
      fs.writeSync(fd, before[k]!, 0, HEAD, LABEL_COPIES * 4096);
      fs.closeSync(fd);
    });
    assert.ok(!headOf(1).equals(headOf(0)), 'the rings differ');
    d = await openAll();
    assert.ok([1, 2, 3].every((i) => headOf(i).equals(headOf(0))), 'every member holds the newest ring after a read-write open');
    await d.close();
    open.splice(0);
    // Member 0 lost: the CP the read-write open served is still the one mounted.
    fs.rmSync(files[0]!.path);
    d = await openAll(true);
    tree = await BlockTree.open(d);
    assert.equal(tree.cpNumber, cpBefore + 1);
    assert.ok((await tree.readBlock(3))?.equals(Buffer.alloc(4096, 2)));
    await tree.close();
  });
});
