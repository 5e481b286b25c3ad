/** A run of a volume's address space and what it holds (NBD base:allocation), shared by the tree and the volumes. */
/** Extent flags, identical to NBD base:allocation bits. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  lengthBytes: number;
  /** EXTENT_HOLE | EXTENT_ZERO bits. */
  flags: number;
}
