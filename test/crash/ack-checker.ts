/**
 * The acknowledged-write checker shared by the crash and failover tests: a pipelined
 * writer (QUEUE_DEPTH requests in flight, never two on one block) that records the
 * contents of every write whose reply arrived, and of those in flight when the server
 * died; verify() then reads every such block back: it must hold its last acknowledged
 * contents, or the write that was in flight on it.
 */
import { NbdClient, NbdClosedError } from './nbd-client';
import { prng } from './harness';

export const BS = 4096;
export const VOLUME_BYTES = 64 * 1024 * 1024;
/** Writes land in the first WORKING_BLOCKS blocks, so blocks are overwritten often. */
export const WORKING_BLOCKS = 2048;
export const QUEUE_DEPTH = 32;
export const ZERO = Buffer.alloc(BS);

export type Mode = 'plain' | 'fua' | 'flush';

export interface World {
  /** Last acknowledged contents per block (absent = zeroes). */
  acked: Map<number, Buffer>;
  /** Contents of the write in flight on a block when the server died. */
  inflight: Map<number, Buffer>;
  writeId: number;
  ackedWrites: number;
  killedInFlight: number;
  landedInFlight: number;
  /**
   * Contents of writes that failed with an error (not a closed connection) since the
   * block's last acknowledged write, when errors leave the outcome open (a mirror's strict
   * policy fails a write with EIO after it reached the NVRAM): any of them may be there.
   */
  failed?: Map<number, Buffer[]>;
}

/** A recognisable block: lbn and write id in the first 16 bytes, then PRNG bytes. */
export function blockContent(lbn: number, writeId: number): Buffer {
  const b = Buffer.allocUnsafe(BS);
  const r = prng(writeId * 7919 + lbn);
  for (let i = 0; i < BS; i += 4) b.writeUInt32LE(Math.floor(r() * 0x100000000) >>> 0, i);
  b.writeUInt32LE(0xb10cb10c, 0);
  b.writeUInt32LE(lbn, 4);
  b.writeDoubleLE(writeId, 8);
  return b;
}

export function describeBlock(b: Buffer): string {
  if (b.equals(ZERO)) return 'zeroes';
  if (b.readUInt32LE(0) === 0xb10cb10c) return `write ${b.readDoubleLE(8)} of lbn ${b.readUInt32LE(4)}`;
  return `other data (${b.subarray(0, 8).toString('hex')})`;
}

/** Reads every block the world knows about; returns the problems; adopts what it read. */
export async function verify(c: NbdClient, w: World, adopt: boolean): Promise<string[]> {
  const lbns = [...new Set([...w.acked.keys(), ...w.inflight.keys(), ...(w.failed?.keys() ?? [])])].sort((a, b) => a - b);
  const problems: string[] = [];
  for (let i = 0; i < lbns.length; i += 64) {
    const batch = lbns.slice(i, i + 64);
    const got = await Promise.all(batch.map((l) => c.read(l * BS, BS)));
    batch.forEach((lbn, j) => {
      const g = got[j]!;
      const want = w.acked.get(lbn) ?? ZERO;
      const alt = w.inflight.get(lbn);
      if (g.equals(want)) return;
      if (alt && g.equals(alt)) {
        w.landedInFlight++;
        if (adopt) w.acked.set(lbn, alt);
        return;
      }
      if (w.failed?.get(lbn)?.some((f) => g.equals(f))) return;
      problems.push(`lbn ${lbn}: holds ${describeBlock(g)}, expected ${describeBlock(want)}${alt ? ` or in-flight ${describeBlock(alt)}` : ''}`);
    });
  }
  if (adopt) w.inflight.clear();
  return problems;
}

/** Keeps QUEUE_DEPTH requests in flight until the connection dies; returns once all have settled. */
export async function load(c: NbdClient, w: World, mode: Mode, rnd: () => number, errors: string[]): Promise<void> {
  const busy = new Set<number>();
  const settled: Promise<void>[] = [];
  let sinceFlush = 0;
  const issueOne = (): void => {
    // Pick a request whose blocks are all idle.
    for (let attempt = 0; attempt < 16; attempt++) {
      const r = rnd();
      const count = r < 0.1 ? 2 + Math.floor(rnd() * 7) : 1;
      const lbn = Math.floor(rnd() * (WORKING_BLOCKS - count));
      let free = true;
      for (let i = 0; i < count; i++) if (busy.has(lbn + i)) free = false;
      if (!free) continue;
      const lbns = Array.from({ length: count }, (_, i) => lbn + i);
      const contents: Buffer[] = [];
      let send: () => Promise<void>;
      const fua = mode === 'fua';
      // A sector write merges with what the block holds: not modelled after a failed write
      // whose outcome is open (the block may hold either), so such a block gets whole writes.
      if (r >= 0.1 && r < 0.16 && !w.failed?.has(lbn)) {
        // A 512-byte write into the middle of a block: merges with the current contents.
        const sector = Math.floor(rnd() * 8);
        const id = ++w.writeId;
        const piece = blockContent(lbn, id).subarray(0, 512);
        const next = Buffer.from(w.acked.get(lbn) ?? ZERO);
        piece.copy(next, sector * 512);
        contents.push(next);
        send = () => c.write(lbn * BS + sector * 512, piece, fua);
      } else if (r >= 0.16 && r < 0.2) {
        contents.push(ZERO);
        send = () => c.trim(lbn * BS, BS, fua);
      } else {
        for (const l of lbns) contents.push(blockContent(l, ++w.writeId));
        const data = Buffer.concat(contents);
        send = () => c.write(lbn * BS, data, fua);
      }
      for (const l of lbns) busy.add(l);
      const p = send().then(
        () => {
          lbns.forEach((l, i) => {
            w.acked.set(l, contents[i]!);
            w.failed?.delete(l);
          });
          w.ackedWrites++;
        },
        (e: unknown) => {
          if (e instanceof NbdClosedError) {
            lbns.forEach((l, i) => w.inflight.set(l, contents[i]!));
            w.killedInFlight++;
          } else if (w.failed) {
            lbns.forEach((l, i) => w.failed!.set(l, [...(w.failed!.get(l) ?? []), contents[i]!]));
            errors.push(`request on lbn ${lbn}: ${(e as Error).message}`);
          } else {
            errors.push(`request on lbn ${lbn}: ${(e as Error).message}`);
          }
        },
      ).finally(() => {
        for (const l of lbns) busy.delete(l);
        if (!c.isClosed) issueOne();
      });
      settled.push(p);
      if (mode === 'flush' && ++sinceFlush >= 16) {
        sinceFlush = 0;
        settled.push(c.flush().catch((e: unknown) => {
          if (!(e instanceof NbdClosedError)) errors.push(`flush: ${(e as Error).message}`);
        }));
      }
      return;
    }
  };
  for (let i = 0; i < QUEUE_DEPTH; i++) issueOne();
  // Wait until the connection is gone, then until every request has settled.
  while (!c.isClosed) await new Promise((r) => setTimeout(r, 20));
  let n = 0;
  while (n !== settled.length) {
    n = settled.length;
    await Promise.all(settled.slice());
  }
}

