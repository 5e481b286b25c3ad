/**
 * RAID geometry: pure arithmetic that maps the tree's flat block space (logical pbas)
 * onto member devices. No I/O, no state beyond the parameters.
 *
 * Member layout (every member, in 4 KiB blocks):
 *   [0, LABEL_AREA_BLOCKS)        label area: LABEL_COPIES label slots, then the head
 *                                 copies (the first `headBlocks` logical blocks, mirrored
 *                                 on every member: the tree's superblock ring)
 *   [LABEL_AREA_BLOCKS, ...)      the striped area: stripe s occupies member blocks
 *                                 LABEL_AREA_BLOCKS + s*unitBlocks .. +unitBlocks on
 *                                 every member (one stripe unit per member)
 *
 * Logical block p (p >= headBlocks) lives in stripe s = floor(p / W) (W = dataMembers *
 * unitBlocks, the stripe's data blocks), data column d = floor((p mod W) / unitBlocks),
 * at member block LABEL_AREA_BLOCKS + s*unitBlocks + (p mod unitBlocks). Logical blocks
 * [0, headBlocks) are the head: they are not stored in the striped area (their striped
 * positions are never written and count as zeroes in parity).
 *
 * Levels (md's conventions):
 * - RAID-0: no parity; column d on member d.
 * - RAID-1: n-way mirror; one data column, held by every member.
 * - RAID-4: dedicated parity on the last member; column d on member d.
 * - RAID-5: rotating parity, md's left-symmetric layout: P on member (n-1) - (s mod n),
 *   column d on member (P + 1 + d) mod n.
 * - RAID-6: md's left-symmetric P+Q: P on (n-1) - (s mod n), Q on (P + 1) mod n, column d
 *   on (P + 2 + d) mod n; column d is Q's coefficient index (g^d).
 *
 * Invariants (asserted on every mapping):
 * - locate() is a bijection from logical blocks [headBlocks, logicalBlocks) onto the
 *   data positions of the striped area; logicalOf() is its inverse.
 * - A stripe's P, Q and data members are pairwise distinct (RAID-1 aside: all hold data).
 * - Every member block a mapping returns lies in the striped area of a member.
 */
import { assert } from '../util/assert';
import { BLOCK_SIZE_BYTES } from '../io/types';

export type RaidLevel = 0 | 1 | 4 | 5 | 6;
export const RAID_LEVELS: readonly RaidLevel[] = [0, 1, 4, 5, 6];

/** Member blocks reserved at the start of every member for labels and the head copies. */
export const LABEL_AREA_BLOCKS = 16;
/** Label slots (alternating generations) at the start of the label area. */
export const LABEL_COPIES = 2;
/** Largest head (the tree's superblock ring is 8 blocks). */
export const HEAD_BLOCKS_MAX = LABEL_AREA_BLOCKS - LABEL_COPIES;

export const STRIPE_UNIT_DEFAULT_BYTES = 64 * 1024;
export const STRIPE_UNIT_MIN_BYTES = BLOCK_SIZE_BYTES;
export const STRIPE_UNIT_MAX_BYTES = 16 * 1024 * 1024;
/** Most members a volume may have (GF(2^8) allows 255 data columns; we stop well short). */
export const MEMBERS_MAX = 32;

/** Parity columns per stripe. */
export function parityCount(level: RaidLevel): number {
  return level === 4 || level === 5 ? 1 : level === 6 ? 2 : 0;
}

export function minMembers(level: RaidLevel): number {
  return level === 6 ? 4 : level === 4 || level === 5 ? 3 : 2;
}

/** Members that may be lost while every block stays readable. */
export function tolerance(level: RaidLevel, members: number): number {
  return level === 1 ? members - 1 : parityCount(level);
}

/** A one-line problem with a level/member-count/stripe-unit combination, or null. */
export function geometryProblem(level: number, members: number, unitBytes: number): string | null {
  if (!RAID_LEVELS.includes(level as RaidLevel)) return `unsupported RAID level ${level}: use 0, 1, 4, 5 or 6`;
  const lv = level as RaidLevel;
  const min = minMembers(lv);
  if (!Number.isInteger(members) || members < min) {
    const why = lv === 6 ? ' (2 data + P + Q)' : lv === 4 || lv === 5 ? ' (2 data + parity)' : '';
    return `RAID-${lv} needs at least ${min} members${why}, got ${members}`;
  }
  if (members > MEMBERS_MAX) return `RAID-${lv} with ${members} members: at most ${MEMBERS_MAX} are supported`;
  if (!Number.isSafeInteger(unitBytes) || unitBytes < STRIPE_UNIT_MIN_BYTES || unitBytes > STRIPE_UNIT_MAX_BYTES || unitBytes % BLOCK_SIZE_BYTES !== 0) {
    return `bad stripe unit ${unitBytes} bytes: a multiple of 4 KiB from 4 KiB to 16 MiB`;
  }
  return null;
}

export interface Location {
  stripe: number;
  /** Data column in the stripe, [0, dataMembers). */
  column: number;
  member: number;
  memberBlock: number;
}

export class RaidGeometry {
  readonly dataMembers: number;
  readonly parityMembers: number;
  readonly unitBlocks: number;
  /** Data blocks per stripe (W). */
  readonly stripeDataBlocks: number;
  readonly stripes: number;
  /** The logical block space: stripes * stripeDataBlocks. */
  readonly logicalBlocks: number;

  /**
   * @param memberBlocks blocks of the smallest member (the rest of larger ones is unused)
   * @param headBlocks logical blocks [0, headBlocks) mirrored in every member's label area
   */
  constructor(readonly level: RaidLevel, readonly members: number, unitBytes: number, readonly memberBlocks: number, readonly headBlocks: number) {
    const problem = geometryProblem(level, members, unitBytes);
    assert(problem === null, problem ?? '');
    assert(Number.isInteger(headBlocks) && headBlocks >= 0 && headBlocks <= HEAD_BLOCKS_MAX, `head of ${headBlocks} blocks`);
    this.parityMembers = parityCount(level);
    this.dataMembers = level === 1 ? 1 : members - this.parityMembers;
    this.unitBlocks = unitBytes / BLOCK_SIZE_BYTES;
    this.stripeDataBlocks = this.dataMembers * this.unitBlocks;
    assert(Number.isSafeInteger(memberBlocks) && memberBlocks >= 0, `member of ${memberBlocks} blocks`);
    this.stripes = Math.max(0, Math.floor((memberBlocks - LABEL_AREA_BLOCKS) / this.unitBlocks));
    this.logicalBlocks = this.stripes * this.stripeDataBlocks;
  }

  /** Member blocks the given logical capacity needs on each member (inverse of the capacity formula). */
  static memberBlocksFor(level: RaidLevel, members: number, unitBytes: number, logicalBlocks: number): number {
    const g = new RaidGeometry(level, members, unitBytes, LABEL_AREA_BLOCKS, 0);
    const stripes = Math.ceil(logicalBlocks / g.stripeDataBlocks);
    return LABEL_AREA_BLOCKS + stripes * g.unitBlocks;
  }

  /** P's member for a stripe (-1 without parity). */
  pMember(stripe: number): number {
    if (this.parityMembers === 0) return -1;
    if (this.level === 4) return this.members - 1;
    return this.members - 1 - (stripe % this.members);
  }

  /** Q's member for a stripe (-1 unless RAID-6). */
  qMember(stripe: number): number {
    if (this.level !== 6) return -1;
    return (this.pMember(stripe) + 1) % this.members;
  }

  /** The member holding data column d of a stripe (RAID-1: member 0, the first copy). */
  dataMember(stripe: number, column: number): number {
    assert(Number.isInteger(column) && column >= 0 && column < this.dataMembers, `column ${column}`);
    switch (this.level) {
      case 0:
      case 1:
      case 4:
        return column;
      case 5:
        return (this.pMember(stripe) + 1 + column) % this.members;
      case 6:
        return (this.pMember(stripe) + 2 + column) % this.members;
    }
  }

  /** The data column a member holds in a stripe, 'P', 'Q', or (RAID-1) column 0 on every member. */
  roleOf(stripe: number, member: number): number | 'P' | 'Q' {
    assert(Number.isInteger(member) && member >= 0 && member < this.members, `member ${member}`);
    if (this.level === 1) return 0;
    if (member === this.pMember(stripe)) return 'P';
    if (member === this.qMember(stripe)) return 'Q';
    switch (this.level) {
      case 0:
      case 4:
        return member;
      case 5:
        return (member - this.pMember(stripe) - 1 + 2 * this.members) % this.members;
      case 6:
        return (member - this.pMember(stripe) - 2 + 2 * this.members) % this.members;
    }
  }

  /** First member block of a stripe's unit (the same on every member). */
  unitStart(stripe: number): number {
    assert(Number.isInteger(stripe) && stripe >= 0 && stripe < this.stripes, `stripe ${stripe} outside [0, ${this.stripes})`);
    return LABEL_AREA_BLOCKS + stripe * this.unitBlocks;
  }

  stripeOf(pba: number): number {
    return Math.floor(pba / this.stripeDataBlocks);
  }

  /** Where logical block pba (not in the head) is stored. */
  locate(pba: number): Location {
    assert(Number.isSafeInteger(pba) && pba >= this.headBlocks && pba < this.logicalBlocks, `pba ${pba} outside [${this.headBlocks}, ${this.logicalBlocks})`);
    const stripe = Math.floor(pba / this.stripeDataBlocks);
    const within = pba - stripe * this.stripeDataBlocks;
    const column = Math.floor(within / this.unitBlocks);
    const member = this.dataMember(stripe, column);
    const memberBlock = this.unitStart(stripe) + (within - column * this.unitBlocks);
    // Postconditions: a data position, inside the striped area, never a parity member.
    assert(member >= 0 && member < this.members && member !== this.pMember(stripe) && member !== this.qMember(stripe), `pba ${pba} mapped onto a parity member`);
    assert(memberBlock >= LABEL_AREA_BLOCKS && memberBlock < LABEL_AREA_BLOCKS + this.stripes * this.unitBlocks, `pba ${pba} mapped outside the striped area`);
    return { stripe, column, member, memberBlock };
  }

  /** Inverse of locate(): the logical block at a member position, 'P'/'Q' for parity, null for the label area or the unused tail. */
  logicalOf(member: number, memberBlock: number): number | 'P' | 'Q' | null {
    assert(Number.isSafeInteger(memberBlock) && memberBlock >= 0, `member block ${memberBlock}`);
    if (memberBlock < LABEL_AREA_BLOCKS) return null;
    const stripe = Math.floor((memberBlock - LABEL_AREA_BLOCKS) / this.unitBlocks);
    if (stripe >= this.stripes) return null;
    const role = this.roleOf(stripe, member);
    if (role === 'P' || role === 'Q') return role;
    const pba = stripe * this.stripeDataBlocks + role * this.unitBlocks + (memberBlock - this.unitStart(stripe));
    return pba < this.headBlocks ? null : pba;
  }

  describe(): string {
    return `RAID-${this.level}, ${this.members} members, stripe unit ${(this.unitBlocks * BLOCK_SIZE_BYTES) / 1024} KiB`;
  }
}
