/**
 * The log's native appender (native/nv_append.h): the NBD connection threads append an
 * engine volume's plain WRITEs of whole blocks to the NVRAM region themselves and answer
 * them, while the log owns everything else. This wrapper only carries the calls; the
 * rules of who appends when live in NvLog (log.ts, "native appends").
 *
 * Invariants:
 * - The appender writes only into the lease the log gave it with resume() (the rest of
 *   the active half, from the log's writeEnd and nextSeq), and only until drain(true)
 *   or close(); drain returns every record it wrote since the last drain, in seq order.
 * - close() returns after any append in progress ended; none starts after it. The log
 *   closes it before its region is closed. Replies still held then get EIO.
 * - A held reply goes out only once release() covers its seq (the caller's promise that
 *   the replica holds the record) or failHeld()/close() fails it.
 * - FLUSH is answered by the threads only between setFlushFile(path) and
 *   setFlushFile(null) or close(), and never again after one of their fdatasyncs failed
 *   (the DONE event tells the volume, which fails the log).
 */
import { addon } from '../io/native';
import { assert } from '../util/assert';

const BLOCK = 4096;

/**
 * What the appender wrote, one call per record (a whole-block write in the active half):
 * its seq, the region offset of its header, the volume range it covers, and the crc32c of
 * each of its 4 KiB blocks (blockCrcs[crcAt + i] for block i; the array is shared by the
 * drain's records). Fields, not an object: this runs for every WRITE the threads answer.
 */
export type NativeRecordSink = (seq: number, at: number, offsetBytes: number, lengthBytes: number, blockCrcs: Uint32Array, crcAt: number) => void;

interface AppenderCalls {
  nbdAppenderNew(region: Buffer, epoch: number, salt: number, payloadMaxBytes: number, volumeBytes: number, map: object | null): object;
  nbdAppenderResume(a: object, writeEnd: number, halfEnd: number, nextSeq: number, durableSeq: number): boolean;
  nbdAppenderDrain(a: object, pause: boolean): [Float64Array, Uint32Array];
  nbdAppenderAppend(a: object, offsetBytes: number, data: Buffer): boolean;
  nbdAppenderSetDurable(a: object, seq: number): void;
  nbdAppenderGate(a: object, on: boolean): void;
  nbdAppenderRelease(a: object, seq: number): void;
  nbdAppenderFailHeld(a: object): void;
  nbdAppenderClose(a: object): void;
  nbdAppenderStats(a: object): number;
  nbdAppenderFileStores(a: object): number;
  nbdAppenderMarks(a: object): Float64Array;
  nbdAppenderUnforward(a: object): void;
  nbdAppenderFlushFile(a: object, path: string | null): boolean;
  nbdAppenderFlush(a: object): number;
  nbdAppenderFlushes(a: object): number;
}

const FIELDS = 4;

function calls(): AppenderCalls {
  return addon() as unknown as AppenderCalls;
}

export class NativeAppender {
  private constructor(readonly handle: object) {}

  static create(region: Buffer, epoch: number, salt: number, payloadMaxBytes: number, volumeBytes: number, map: object | undefined): NativeAppender {
    return new NativeAppender(calls().nbdAppenderNew(region, epoch, salt, payloadMaxBytes, volumeBytes, map ?? null));
  }

  /** Leases [writeEnd, halfEnd) from seq nextSeq on; false if the appender refused (closed, undrained records). */
  resume(writeEnd: number, halfEnd: number, nextSeq: number, durableSeq: number): boolean {
    return calls().nbdAppenderResume(this.handle, writeEnd, halfEnd, nextSeq, durableSeq);
  }

  /** The records written since the last drain, in seq order; `pause`: and no more until resume. */
  drain(pause: boolean, each: NativeRecordSink): void {
    const [a, crcs] = calls().nbdAppenderDrain(this.handle, pause);
    let crcAt = 0;
    for (let i = 0; i < a.length; i += FIELDS) {
      const lengthBytes = a[i + 3] as number;
      each(a[i] as number, a[i + 1] as number, a[i + 2] as number, lengthBytes, crcs, crcAt);
      crcAt += lengthBytes / BLOCK;
    }
    assert(crcAt === crcs.length, `the appender drained ${crcs.length} block checksums for ${crcAt} blocks`);
  }

  /** Records <= seq are durable: the next records say so (replay tells damage from a torn tail by it). */
  setDurable(seq: number): void {
    calls().nbdAppenderSetDurable(this.handle, seq);
  }

  /** The append a connection thread makes (tests drive it directly). */
  append(offsetBytes: number, data: Buffer): boolean {
    return calls().nbdAppenderAppend(this.handle, offsetBytes, data);
  }

  /**
   * Held replies (a sync mirror): while on, a thread that appends a WRITE keeps its reply
   * until release() covers its seq or failHeld() fails it. Off releases every record
   * appended so far and holds no more.
   */
  setGate(on: boolean): void {
    calls().nbdAppenderGate(this.handle, on);
  }

  /** The replica holds every record <= seq: the threads' held replies up to it go out. */
  release(seq: number): void {
    calls().nbdAppenderRelease(this.handle, seq);
  }

  /** Every held reply of a record appended so far gets EIO (the replica is lost, strict policy). */
  failHeld(): void {
    calls().nbdAppenderFailHeld(this.handle);
  }

  /**
   * The threads answer a plain FLUSH themselves (fdatasync of the NVRAM file at `path`
   * through a descriptor of their own), or no more (null). False: refused (closed, or an
   * fdatasync of theirs failed) or the file did not open.
   */
  setFlushFile(path: string | null): boolean {
    return calls().nbdAppenderFlushFile(this.handle, path);
  }

  /** The FLUSH a connection thread makes (tests): 1 durable, 0 not served there, -errno failed. */
  flush(): number {
    return calls().nbdAppenderFlush(this.handle);
  }

  /** FLUSHes the threads made durable. */
  get flushes(): number {
    return calls().nbdAppenderFlushes(this.handle);
  }

  /** Records appended by the threads so far. */
  get appends(): number {
    return calls().nbdAppenderStats(this.handle);
  }

  /** Of those, records stored with pwrite through the flush file (appends within a few ms of a FLUSH round) rather than through the mapping. */
  get fileStores(): number {
    return calls().nbdAppenderFileStores(this.handle);
  }

  /** No record goes to a mirror link from now on (native-rx.ts forward() links one). */
  unforward(): void {
    calls().nbdAppenderUnforward(this.handle);
  }

  /** The held replies' marks: every record <= released was released, <= failed failed (if not released). */
  get marks(): { released: number; failed: number } {
    const m = calls().nbdAppenderMarks(this.handle);
    return { released: m[0]!, failed: m[1]! };
  }

  close(): void {
    calls().nbdAppenderClose(this.handle);
  }
}
