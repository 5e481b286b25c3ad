/**
 * NBD wire constants (doc/proto.md of NetworkBlockDevice/nbd). Names follow the spec.
 * Limits that protect the server from hostile clients live here too, each with its
 * reason, and their relationships are asserted at load.
 */
import { assert } from '../util/assert';

// NBDMAGIC 0x4e42444d41474943 and IHAVEOPT 0x49484156454f5054, as 32-bit halves.
export const NBDMAGIC_HI = 0x4e42444d;
export const NBDMAGIC_LO = 0x41474943;
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
export const OPTION_REPLY_MAGIC_HI = 0x0003e889;
export const OPTION_REPLY_MAGIC_LO = 0x045565a9;

export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;
export const KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;

// Info types.
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags.
export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_FUA = 1 << 3;
export const TFLAG_ROTATIONAL = 1 << 4;
export const TFLAG_SEND_TRIM = 1 << 5;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
export const TFLAG_SEND_DF = 1 << 7;
export const TFLAG_CAN_MULTI_CONN = 1 << 8;
export const TFLAG_SEND_RESIZE = 1 << 9;
export const TFLAG_SEND_CACHE = 1 << 10;
export const TFLAG_SEND_FAST_ZERO = 1 << 11;

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

// Command flags.
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/**
 * Which command flags each command accepts; anything else is EINVAL. FUA is accepted on
 * every command (the spec: a server that advertises SEND_FUA MUST accept it on all of
 * them) and ignored where it means nothing (READ, FLUSH, CACHE, BLOCK_STATUS, DISC).
 */
export const ALLOWED_CMD_FLAGS: Record<number, number> = {
  [CMD_READ]: CMD_FLAG_FUA | CMD_FLAG_DF,
  [CMD_WRITE]: CMD_FLAG_FUA,
  [CMD_DISC]: CMD_FLAG_FUA,
  [CMD_FLUSH]: CMD_FLAG_FUA,
  [CMD_TRIM]: CMD_FLAG_FUA,
  [CMD_CACHE]: CMD_FLAG_FUA,
  [CMD_WRITE_ZEROES]: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  [CMD_BLOCK_STATUS]: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
};

// Structured reply.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// Errors.
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

export const META_CONTEXT_BASE_ALLOCATION = 'base:allocation';
/** Our id for base:allocation (transient per spec; any non-zero value works). */
export const META_CONTEXT_BASE_ALLOCATION_ID = 1;

// Sizes of fixed headers.
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

// Limits (hostile-input protection).
/**
 * Largest WRITE payload / READ length we accept, and advertise in NBD_INFO_BLOCK_SIZE:
 * 64 MiB, as nbdkit (clients that never see BLOCK_SIZE, e.g. over EXPORT_NAME, send up
 * to this). Above the spec's 32 MiB floor; a volume whose own per-call limit is lower is
 * served in pieces (see transmission.ts). Every byte of it is charged to the server-wide
 * memory budget (budget.ts) before it is buffered.
 */
export const MAX_PAYLOAD_BYTES = 64 * 1024 * 1024;
/** The spec's floor: a server must accept payloads up to this without BLOCK_SIZE. */
export const SPEC_MIN_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** Largest option payload we read; anything bigger is refused without being buffered. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Strings (names, descriptions, queries) are at most 4096 bytes per the spec. */
export const MAX_STRING_BYTES = 4096;
/** Options a client may send before transmission; more is a misbehaving client. */
export const MAX_OPTIONS = 128;
/** Extents returned by one BLOCK_STATUS reply. */
export const MAX_EXTENTS_PER_REPLY = 2048;

assert(MAX_OPTION_BYTES >= 4 + MAX_STRING_BYTES + 2 + 2 * 16, 'an INFO/GO with a maximal name must fit');
assert(MAX_PAYLOAD_BYTES >= SPEC_MIN_MAX_PAYLOAD_BYTES, 'payloads up to 32 MiB must be accepted');
assert(MAX_PAYLOAD_BYTES < 2 ** 32, 'a request length is a u32');

// base:allocation bits (same values as EXTENT_HOLE / EXTENT_ZERO in src/volume/types.ts).
export const EXTENT_HOLE_BIT = 1;
export const EXTENT_ZERO_BIT = 2;
