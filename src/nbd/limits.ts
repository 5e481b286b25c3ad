/**
 * Every limit of the NBD server that protects it from hostile or broken clients, in one
 * place, each with its unit and reason; the README lists the same names. Per-request
 * wire limits (payload, option sizes) are in protocol.ts.
 *
 * Memory: the bytes of request payloads being received and of READ replies not yet
 * taken by the kernel are charged to ONE server-wide budget (budget.ts,
 * MEMORY_BUDGET_BYTES_DEFAULT); a connection stops reading while it waits for budget.
 * Outside the budget: the buffer pool's free lists (buffer-pool.ts, 64 MiB), each
 * connection's handshake queue (< 160 KiB), the native data path's 64 KiB input stage per
 * connection (native/nbd_serve.cc) and reply headers. With the defaults the
 * server's RSS stays below RSS_BOUND_BYTES (measured by test/e2e/fuzz.test.ts).
 */
import { assert } from '../util/assert';
import { MAX_PAYLOAD_BYTES } from './protocol';

const MiB = 1024 * 1024;

/** A charge this small may pass waiting large ones (the budget's small lane)... */
export const SMALL_CHARGE_BYTES_MAX = 1 * MiB;
/** ...as long as such passing charges outstanding stay within this (less in a budget too small for it)... */
export const SMALL_LANE_BYTES_MAX = 16 * MiB;
/** ...and never below this... */
export const SMALL_LANE_BYTES_MIN = 4 * MiB;
/**
 * ...and one connection's within this: a client that never reads its replies holds at
 * most this much of the lane (until --stall-timeout drops it), not all of it.
 */
export const SMALL_LANE_BYTES_PER_OWNER = 2 * MiB;
/**
 * Default server-wide budget for bytes in flight (`serve --memory-budget`): two maximal
 * requests in line beside the full small lane (with only one, one client stalling in
 * the middle of a 64 MiB WRITE would hold every other large request until --stall-timeout).
 */
export const MEMORY_BUDGET_BYTES_DEFAULT = 2 * MAX_PAYLOAD_BYTES + SMALL_LANE_BYTES_MAX;
/** Smallest budget accepted: room for one maximal request and the smallest lane. */
export const MEMORY_BUDGET_BYTES_MIN = MAX_PAYLOAD_BYTES + SMALL_LANE_BYTES_MIN;
/** Largest budget accepted (a typo guard). */
export const MEMORY_BUDGET_BYTES_MAX = 64 * 1024 * MiB;
/** Documented bound on the server's resident memory with the default budget. */
export const RSS_BOUND_BYTES = 512 * MiB;

/** Concurrent connections (handshake and transmission), `serve --max-connections`. */
export const MAX_CONNECTIONS_DEFAULT = 128;
/** A handshake that does not reach transmission within this is dropped. */
export const HANDSHAKE_TIMEOUT_MS = 60_000;
/**
 * When every connection slot is taken, a new client gets the slot of the connection idle
 * the longest (transmission, nothing in flight for EVICT_IDLE_MS_MIN), or else of the oldest handshake that has
 * lasted at least this long; if there is neither, the new client is refused.
 */
export const EVICT_HANDSHAKE_AGE_MS_MIN = 5_000;
/** A transmission connection is evictable only once idle this long (spares busy QD1 clients). */
export const EVICT_IDLE_MS_MIN = 1_000;

/** Requests in flight on one connection; beyond that we stop reading its socket. */
export const MAX_INFLIGHT_REQUESTS_PER_CONNECTION = 256;
/** READ/WRITE bytes in flight on one connection (fairness under the shared budget). */
export const MAX_INFLIGHT_BYTES_PER_CONNECTION = 64 * MiB;
/** Reply bytes queued in one socket (not yet taken by the kernel) before we stop reading. */
export const MAX_QUEUED_REPLY_BYTES_PER_CONNECTION = 16 * MiB;

/**
 * A client that leaves replies unread (no byte taken by the kernel), or stops in the
 * middle of a request, for this long is dropped (`serve --stall-timeout`; 0 = never).
 */
export const STALL_TIMEOUT_MS_DEFAULT = 30_000;
/**
 * A client with nothing in flight that sends nothing for this long is dropped
 * (`serve --idle-timeout`). Off (0) by default: an idle /dev/nbdX client is normal and
 * dropping it would fail its filesystem; slots are reclaimed by eviction instead.
 */
export const IDLE_TIMEOUT_MS_DEFAULT = 0;
/** After DISC or on shutdown, a client that does not close within this is destroyed. */
export const LINGER_MS = 2_000;
/** While a shutdown waits this long and more, it logs what each connection is waiting for. */
export const SHUTDOWN_REPORT_MS = 5_000;
/** How often connections are checked against the timeouts (at most). */
export const SWEEP_INTERVAL_MS_MAX = 1_000;

assert(MEMORY_BUDGET_BYTES_DEFAULT >= MEMORY_BUDGET_BYTES_MIN, 'the default budget must admit a maximal request');
assert(MAX_INFLIGHT_BYTES_PER_CONNECTION >= MAX_PAYLOAD_BYTES, 'one maximal request must fit a connection');
assert(MAX_INFLIGHT_BYTES_PER_CONNECTION < MEMORY_BUDGET_BYTES_DEFAULT, 'one connection cannot take the whole default budget');
assert(RSS_BOUND_BYTES >= MEMORY_BUDGET_BYTES_DEFAULT + 64 * MiB + 128 * MiB, 'bound = budget + pool + runtime');
