/**
 * The one I/O seam below the block tree. Everything the engine persists (member files,
 * the NVRAM region) goes through these interfaces, so that tests can substitute a
 * recording layer (crash-state enumeration) or a fault-injecting one (seeded
 * simulation). RAID (a later issue) is a BlockDevice built over several member
 * BlockDevices; the tree only sees one flat array of 4 KiB physical blocks.
 */
export const BLOCK_SIZE_BYTES = 4096;

/** A flat array of physical 4 KiB blocks. */
export interface BlockDevice {
  readonly blockCount: number;
  /** Reads `count` consecutive blocks starting at physical block `pba` into dst (count*4096 bytes). */
  readBlocks(pba: number, count: number, dst: Buffer): Promise<void>;
  /**
   * Optional (a file): readBlocks, and the crc32c (seed 0) of each block read into crcs
   * (count little-endian uint32s), both off the event loop: for bulk reads the caller
   * verifies (a mirror baseline or resync walks gigabytes this way).
   */
  readBlocksCrc?(pba: number, count: number, dst: Buffer, crcs: Buffer): Promise<void>;
  /**
   * Optional (a file): single blocks at scattered addresses (pbas[i] into dsts[i], 4096
   * bytes each, at most READ_BATCH_MAX), with each one's crc32c (seed 0) into crcs[i],
   * in one call off the event loop: a CP reads the address blocks it rewrites this way.
   */
  readBlocksBatchCrc?(pbas: readonly number[], dsts: readonly Buffer[], crcs: Uint32Array): Promise<void>;
  /**
   * Writes whole blocks at consecutive addresses starting at pba (data.length a multiple of 4096). Not durable until sync().
   * `hint.reread`: the caller reads these blocks again soon (a device that can write around its cache keeps them in it).
   */
  writeBlocks(pba: number, data: Buffer, hint?: WriteHint): Promise<void>;
  /** Makes every completed write durable. */
  sync(): Promise<void>;
  /** Hints that blocks hold no data any more (may punch holes); contents become undefined. */
  discard(pba: number, count: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Optional (a RAID device): the tree allocates in aligned units of this many blocks and
   * reuses a unit only when all of it is free, so a CP writes whole stripes. Absent: 1.
   */
  readonly allocUnitBlocks?: number;
  /**
   * Optional (a device with redundancy): block pba failed the caller's check. Rebuilds it
   * from the redundancy until `verify` accepts a version, puts that into dst (one block),
   * rewrites the bad copy and returns true; false when no version verifies.
   */
  readRepaired?(pba: number, dst: Buffer, verify: (block: Buffer) => boolean): Promise<boolean>;
  /**
   * Optional (a file): writeBlocks of the concatenation of `parts` (each whole blocks, at
   * most WRITE_PARTS_MAX), without concatenating them first (one pwritev).
   */
  writeBlocksV?(pba: number, parts: readonly Buffer[], hint?: WriteHint): Promise<void>;
}

/** What a writer knows about blocks it writes (a hint: it never changes what is written). */
export interface WriteHint {
  /** They are read again soon (a mirror's metadata blocks are the bases of the next CP's deltas): keep them in the page cache. */
  reread?: boolean;
  /** The writer syncs them soon (a CP's blocks, before its superblock): start their writeback now. */
  writeback?: boolean;
}

/** Most blocks one readBlocksBatchCrc takes (the addon's cap). */
export const READ_BATCH_MAX = 1024;

/** Most parts one writeBlocksV takes (the addon's iovec cap). */
export const WRITE_PARTS_MAX = 1024;

/**
 * `d` with a close() that leaves it open: storage that outlives the devices opened on it
 * in turn (the simulator's crash incarnations, the crash tests' assembled images).
 */
export function keepOpen(d: BlockDevice): BlockDevice {
  return {
    get blockCount() { return d.blockCount; },
    readBlocks: (pba, count, dst) => d.readBlocks(pba, count, dst),
    writeBlocks: (pba, data, hint) => d.writeBlocks(pba, data, hint),
    sync: () => d.sync(),
    discard: (pba, count) => d.discard(pba, count),
    close: () => Promise.resolve(),
  };
}

/** A persistent, byte-addressed log region (the NVRAM), e.g. an mmap of a file. */
export interface NvramRegion {
  readonly sizeBytes: number;
  /** The whole region as a Buffer: writes into it survive a process crash (MAP_SHARED). */
  readonly buffer: Buffer;
  /** Makes [offset, offset+length) durable against power loss. */
  persist(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/** Injectable time and randomness, so the engine can run under a seeded simulator. */
export interface Clock {
  nowMs(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
  /**
   * What a Slicer measures CPU slices with (util/work.ts slicerFor): absent, wall time
   * (performance.now); the simulator's clock counts the Slicer's checks instead, so where
   * the engine yields does not depend on how fast the machine is and a seed replays exactly.
   */
  sliceNowMs?(): number;
}

export interface Random {
  /** Uniform in [0, 1). */
  next(): number;
}

export const systemClock: Clock = {
  nowMs: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref?.();
    return { cancel: () => clearTimeout(t) };
  },
};
