/**
 * Buffers whose data starts at a 64-byte aligned address.
 *
 * The kernel copies a read's bytes into (and a write's out of) the caller's buffer with
 * `rep movsb`; on this project's machines (AMD EPYC) a destination 8 or 16 bytes off a
 * 32-byte boundary copies at ~2.6 GB/s against ~11.5 GB/s aligned (1 MiB preads of a
 * cached file; docs/benchmarks.md, "Memory and file suites at d746ba2"). malloc hands out large blocks 16
 * bytes past a page boundary, and so does Buffer.allocUnsafeSlow. The NBD threads read
 * and receive straight into granted buffers, so those are carved aligned.
 *
 * Invariant: the result is exactly `size` bytes, a view of an allocation of size + align
 * (the view keeps it alive); its first byte's address is a multiple of `align` (default
 * ALIGN_BYTES; 4096 for memory an O_DIRECT write may take as it is).
 */
import { assert } from '../util/assert';
import { addressMod } from './native';

export const ALIGN_BYTES = 64;

export function allocAligned(size: number, align = ALIGN_BYTES): Buffer {
  assert(Number.isSafeInteger(size) && size > 0 && (align === ALIGN_BYTES || align === 4096), `allocAligned(${size}, ${align})`);
  const raw = Buffer.allocUnsafeSlow(size + align);
  const shift = (align - addressMod(raw, align)) % align;
  return raw.subarray(shift, shift + size);
}
