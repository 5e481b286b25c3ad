/**
 * Extent helpers shared by the volumes that answer block status in whole blocks.
 *
 * Invariant: clipExtents returns contiguous extents starting exactly at the byte offset
 * asked for, each longer than zero, totalling at most `length`, at most `maxExtents`.
 */
import type { Extent } from './types';

/**
 * Clips extents that start `skipBytes` before the requested offset (block-aligned
 * answers) to the byte range [offset, offset + length) and to maxExtents.
 */
export function clipExtents(extents: Iterable<Extent>, skipBytes: number, length: number, maxExtents: number): Extent[] {
  const out: Extent[] = [];
  let skip = skipBytes;
  let remaining = length;
  for (const e of extents) {
    if (out.length >= maxExtents || remaining === 0) break;
    let len = e.lengthBytes;
    const s = Math.min(skip, len);
    len -= s;
    skip -= s;
    len = Math.min(len, remaining);
    if (len <= 0) continue;
    out.push({ lengthBytes: len, flags: e.flags });
    remaining -= len;
  }
  return out;
}
