// crc32c (Castagnoli), XOR and RAID-6 P+Q parity. All synchronous and allocation-free.
//
// Invariants:
// - crc32c(data, seed) is the standard reflected CRC-32C with pre/post inversion, so
//   crc32c("123456789", 0) == 0xe3069283 and crc32c(b, crc32c(a, 0)) == crc32c(a+b, 0).
//   The SSE4.2 path and the table path give identical results (tested via crc32cPortable).
// - pqGen computes, for every byte j, P[j] = XOR_i D_i[j] and Q[j] = sum_i g^i * D_i[j]
//   over GF(2^8) with polynomial 0x11d and g = 2 (Horner from the last column), reading
//   all columns before writing p and q for each word, so p/q may alias a data column.
// - No function reads or writes outside the bounds it validated.
#include "common.h"

#include <immintrin.h>
#include <nmmintrin.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace nvm {
namespace {

constexpr uint32_t kCrc32cPolyReflected = 0x82F63B78u;
constexpr size_t kMaxPqColumns = 253;

uint32_t g_table[8][256];
bool g_hw = false;

void BuildTable() {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1u) ? kCrc32cPolyReflected : 0u);
    g_table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++) {
    for (int t = 1; t < 8; t++) g_table[t][i] = (g_table[t - 1][i] >> 8) ^ g_table[0][g_table[t - 1][i] & 0xff];
  }
}

// Slicing-by-8 over the (already inverted) running crc.
uint32_t Crc32cTable(uint32_t crc, const uint8_t* p, size_t n) {
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = (crc >> 8) ^ g_table[0][(crc ^ *p++) & 0xff];
    n--;
  }
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;  // little-endian (x86-64, aarch64)
    crc = g_table[7][lo & 0xff] ^ g_table[6][(lo >> 8) & 0xff] ^ g_table[5][(lo >> 16) & 0xff] ^
          g_table[4][lo >> 24] ^ g_table[3][hi & 0xff] ^ g_table[2][(hi >> 8) & 0xff] ^
          g_table[1][(hi >> 16) & 0xff] ^ g_table[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    crc = (crc >> 8) ^ g_table[0][(crc ^ *p++) & 0xff];
    n--;
  }
  return crc;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(uint32_t crc, const uint8_t* p, size_t n) {
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  uint64_t c = crc;
  while (n >= 32) {
    uint64_t a, b, d, e;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + 8, 8);
    std::memcpy(&d, p + 16, 8);
    std::memcpy(&e, p + 24, 8);
    c = _mm_crc32_u64(c, a);
    c = _mm_crc32_u64(c, b);
    c = _mm_crc32_u64(c, d);
    c = _mm_crc32_u64(c, e);
    p += 32;
    n -= 32;
  }
  while (n >= 8) {
    uint64_t a;
    std::memcpy(&a, p, 8);
    c = _mm_crc32_u64(c, a);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n > 0) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  return crc;
}

// Reads (buf, offset, length, seed) and validates them; false = exception pending.
bool CrcArgs(const Napi::CallbackInfo& info, const char* fn, const uint8_t** data, size_t* len, uint32_t* seed) {
  Napi::Buffer<uint8_t> buf;
  int64_t off, n, s;
  if (!GetBuffer(info, 0, fn, "buf", &buf) || !GetInt(info, 1, fn, "offset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 2, fn, "length", 0, kMaxSafeInteger, &n) || !GetInt(info, 3, fn, "seed", 0, 0xffffffffLL, &s))
    return false;
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(n) > buf.Length()) {
    ThrowRange(info.Env(), std::string(fn) + ": offset+length exceeds the buffer");
    return false;
  }
  *data = buf.Data() + off;
  *len = static_cast<size_t>(n);
  *seed = static_cast<uint32_t>(s);
  return true;
}

// crc32c(buf, offset, length, seed) -> uint32
Napi::Value Crc32c(const Napi::CallbackInfo& info) {
  const uint8_t* p;
  size_t n;
  uint32_t seed;
  if (!CrcArgs(info, "crc32c", &p, &n, &seed)) return info.Env().Undefined();
  uint32_t crc = ~seed;
  crc = g_hw ? Crc32cSse42(crc, p, n) : Crc32cTable(crc, p, n);
  return Napi::Number::New(info.Env(), static_cast<double>(~crc));
}

// crc32cBlocks(buf, offset, count, out): the crc32c (seed 0) of each of `count` 4 KiB blocks
// starting at buf[offset], written to out (>= 4 * count bytes) as little-endian uint32s:
// one call for a run of blocks instead of one per block.
constexpr int64_t kCrcBlockBytes = 4096;
constexpr int64_t kCrcBlocksMax = 65536;  // 256 MiB per call
Napi::Value Crc32cBlocks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> buf, out;
  int64_t off, count;
  if (!GetBuffer(info, 0, "crc32cBlocks", "buf", &buf) || !GetInt(info, 1, "crc32cBlocks", "offset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 2, "crc32cBlocks", "count", 0, kCrcBlocksMax, &count) || !GetBuffer(info, 3, "crc32cBlocks", "out", &out))
    return env.Undefined();
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(count) * kCrcBlockBytes > buf.Length()) {
    ThrowRange(env, "crc32cBlocks: offset+count*4096 exceeds the buffer");
    return env.Undefined();
  }
  if (static_cast<uint64_t>(count) * 4 > out.Length()) {
    ThrowRange(env, "crc32cBlocks: out holds fewer than count uint32s");
    return env.Undefined();
  }
  const uint8_t* p = buf.Data() + off;
  for (int64_t i = 0; i < count; i++) {
    uint32_t c = Crc32cOf(p, kCrcBlockBytes);
    uint8_t le[4] = {static_cast<uint8_t>(c), static_cast<uint8_t>(c >> 8), static_cast<uint8_t>(c >> 16), static_cast<uint8_t>(c >> 24)};
    std::memcpy(out.Data() + 4 * i, le, 4);
    p += kCrcBlockBytes;
  }
  return env.Undefined();
}

// crc32cPortable(buf, offset, length, seed): the table path, so tests can compare both.
Napi::Value Crc32cPortable(const Napi::CallbackInfo& info) {
  const uint8_t* p;
  size_t n;
  uint32_t seed;
  if (!CrcArgs(info, "crc32cPortable", &p, &n, &seed)) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), static_cast<double>(~Crc32cTable(~seed, p, n)));
}

// 32-byte generic vectors: AVX2 in the avx2 clone, pairs of SSE2 ops otherwise.
typedef uint8_t V32u __attribute__((vector_size(32)));
typedef int8_t V32s __attribute__((vector_size(32)));

__attribute__((target_clones("avx2", "default"))) void XorBytes(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    V32u a, b;
    std::memcpy(&a, dst + i, 32);
    std::memcpy(&b, src + i, 32);
    a ^= b;
    std::memcpy(dst + i, &a, 32);
  }
  for (; i < n; i++) dst[i] ^= src[i];
}

inline uint8_t Mul2(uint8_t a) { return static_cast<uint8_t>((a << 1) ^ ((a & 0x80) ? 0x1d : 0)); }

__attribute__((target_clones("avx2", "default"))) void PqBytes(const uint8_t* const* cols, size_t ncols, uint8_t* p,
                                                              uint8_t* q, size_t n) {
  const V32s zero = {};
  V32u poly;
  std::memset(&poly, 0x1d, sizeof poly);
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    V32u pv, qv;
    std::memcpy(&pv, cols[ncols - 1] + j, 32);
    qv = pv;
    for (size_t i = ncols - 1; i-- > 0;) {
      V32u d;
      std::memcpy(&d, cols[i] + j, 32);
      pv ^= d;
      // q = q*2 ^ d; bytes with the top bit set reduce by 0x1d.
      V32u hi = reinterpret_cast<V32u>(reinterpret_cast<V32s>(qv) < zero);
      qv = (qv + qv) ^ (hi & poly) ^ d;
    }
    std::memcpy(p + j, &pv, 32);
    std::memcpy(q + j, &qv, 32);
  }
  for (; j < n; j++) {
    uint8_t pb = cols[ncols - 1][j];
    uint8_t qb = pb;
    for (size_t i = ncols - 1; i-- > 0;) {
      uint8_t d = cols[i][j];
      pb ^= d;
      qb = Mul2(qb) ^ d;
    }
    p[j] = pb;
    q[j] = qb;
  }
}

// xorInto(dst, src, length)
Napi::Value XorInto(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> dst, src;
  int64_t n;
  if (!GetBuffer(info, 0, "xorInto", "dst", &dst) || !GetBuffer(info, 1, "xorInto", "src", &src) ||
      !GetInt(info, 2, "xorInto", "length", 0, kMaxSafeInteger, &n))
    return env.Undefined();
  if (static_cast<uint64_t>(n) > dst.Length() || static_cast<uint64_t>(n) > src.Length()) {
    ThrowRange(env, "xorInto: length exceeds a buffer");
    return env.Undefined();
  }
  XorBytes(dst.Data(), src.Data(), static_cast<size_t>(n));
  return env.Undefined();
}

// pqGen(data[], p, q)
Napi::Value PqGen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowType(env, "pqGen: data must be an array of Buffers");
    return env.Undefined();
  }
  Napi::Buffer<uint8_t> p, q;
  if (!GetBuffer(info, 1, "pqGen", "p", &p) || !GetBuffer(info, 2, "pqGen", "q", &q)) return env.Undefined();
  Napi::Array data = info[0].As<Napi::Array>();
  uint32_t ncols = data.Length();
  if (ncols < 1 || ncols > kMaxPqColumns) {
    ThrowRange(env, "pqGen: 1.." + std::to_string(kMaxPqColumns) + " data columns, got " + std::to_string(ncols));
    return env.Undefined();
  }
  size_t n = p.Length();
  if (q.Length() != n) {
    ThrowRange(env, "pqGen: p and q must have the same length");
    return env.Undefined();
  }
  const uint8_t* cols[kMaxPqColumns];
  for (uint32_t i = 0; i < ncols; i++) {
    Napi::Value v = data.Get(i);
    if (!v.IsBuffer()) {
      ThrowType(env, "pqGen: data[" + std::to_string(i) + "] must be a Buffer");
      return env.Undefined();
    }
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    if (b.Length() != n) {
      ThrowRange(env, "pqGen: all columns must have the same length");
      return env.Undefined();
    }
    cols[i] = b.Data();
  }
  if (n > 0) PqBytes(cols, ncols, p.Data(), q.Data(), n);
  return env.Undefined();
}

// A 4 KiB block in three crc32 chains (the instruction's latency is 3 cycles, its
// throughput 1 per cycle): stripes [0, S), [S, 2S), [2S, 3S) from registers (c, 0, 0),
// joined with the linear "append S zero bytes" operator on the register,
//   reg(c, A || B) = shift_|B|(reg(c, A)) ^ reg(0, B),
// a 32x32 GF(2) matrix applied as 4 byte-indexed tables; then the last 16 bytes.
// Used by Crc32cOf (the NBD threads' reads), crc32cBlocks (the CP's and the tree reads'
// per-block checksums) and crc32cWide (the mirror's records); the JS-facing crc32c keeps
// one chain (docs/benchmarks.md, "The CP stall", on why that one stays as it is).
constexpr size_t kStripeBytes = 1360;
static_assert(kStripeBytes % 8 == 0 && 3 * kStripeBytes <= 4096 && (4096 - 3 * kStripeBytes) % 8 == 0, "stripes of whole words in a block");
uint32_t g_shift[4][256];

// A linear operator on the 32-bit register, given by its images of the 32 unit vectors,
// as four byte-indexed tables: op(c) = t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ ...
void ShiftTables(const uint32_t basis[32], uint32_t t[4][256]) {
  for (int k = 0; k < 4; k++) {
    for (uint32_t v = 0; v < 256; v++) {
      uint32_t r = 0;
      for (int j = 0; j < 8; j++) {
        if ((v >> j) & 1u) r ^= basis[8 * k + j];
      }
      t[k][v] = r;
    }
  }
}

// g_shift: the register after kStripeBytes zero bytes, per byte of the input register.
__attribute__((target("sse4.2"))) void BuildStripeShift() {
  uint32_t basis[32];
  for (int i = 0; i < 32; i++) {
    uint64_t c = uint64_t{1} << i;
    for (size_t n = 0; n < kStripeBytes; n += 8) c = _mm_crc32_u64(c, 0);
    basis[i] = static_cast<uint32_t>(c);
  }
  ShiftTables(basis, g_shift);
}

inline uint32_t StripeShift(uint32_t c) {
  return g_shift[0][c & 0xff] ^ g_shift[1][(c >> 8) & 0xff] ^ g_shift[2][(c >> 16) & 0xff] ^ g_shift[3][c >> 24];
}

// Any length, from a running register: whole 3 x kStripeBytes chunks in three chains
// (as above), the rest in one. The same crc32c as Crc32cSse42, ~2.5x faster per byte.
__attribute__((target("sse4.2"))) uint32_t Crc32cWideSse42(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c0 = crc;
  while (n >= 3 * kStripeBytes) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < kStripeBytes; i += 8) {
      uint64_t a, b, d;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + kStripeBytes + i, 8);
      std::memcpy(&d, p + 2 * kStripeBytes + i, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
    }
    c0 = StripeShift(StripeShift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^ static_cast<uint32_t>(c2);
    p += 3 * kStripeBytes;
    n -= 3 * kStripeBytes;
  }
  return Crc32cSse42(static_cast<uint32_t>(c0), p, n);
}

// Spans of >= 256 bytes by carry-less multiplication (AVX-512 + VPCLMULQDQ, where the
// CPU and the OS's saved state have them): the span is folded, 64 bytes per 512-bit
// register, four registers at a time, into one 128-bit remainder with the same crc32c
// register as the span's bytes, which two crc32 instructions then reduce; the tail goes
// on in three chains. A 128-bit lane [q0, q1] (q0 the earlier 8 bytes) carried D bits
// forward is clmul(q0, K(D + 32)) ^ clmul(q1, K(D - 32)), with K(n) the bit-reflected
// x^n mod P shifted left by one (P the Castagnoli polynomial 0x1EDC6F41), computed by
// hand and checked against the table path (test/unit/native.test.ts, crc32c).
struct FoldK {
  uint64_t q0, q1;
};
constexpr FoldK kFold128 = {0xf20c0dfeull, 0x14cd00bd6ull};
constexpr FoldK kFold256 = {0x1384aa63aull, 0xba4fc28eull};
constexpr FoldK kFold384 = {0x1c291d04ull, 0x1d82c63daull};
constexpr FoldK kFold512 = {0x740eef02ull, 0x9e4addf8ull};
constexpr FoldK kFold2048 = {0xdcb17aa4ull, 0xb9e02b86ull};
constexpr size_t kFoldMinBytes = 256;
bool g_fold = false;

#define NVM_FOLD_TARGET __attribute__((target("sse4.2,pclmul,avx512f,avx512vl,vpclmulqdq")))

NVM_FOLD_TARGET inline __m512i FoldK512(FoldK k) {
  const long long a = static_cast<long long>(k.q0), b = static_cast<long long>(k.q1);
  return _mm512_set_epi64(b, a, b, a, b, a, b, a);
}

// x carried forward by k's distance, xor y (per 128-bit lane).
NVM_FOLD_TARGET inline __m512i Fold512(__m512i x, __m512i k, __m512i y) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11), y, 0x96);
}

NVM_FOLD_TARGET inline __m128i Fold128(__m128i x, FoldK k) {
  const __m128i kk = _mm_set_epi64x(static_cast<long long>(k.q1), static_cast<long long>(k.q0));
  return _mm_xor_si128(_mm_clmulepi64_si128(x, kk, 0x00), _mm_clmulepi64_si128(x, kk, 0x11));
}

// The register after n >= kFoldMinBytes bytes from register crc (no inversions).
NVM_FOLD_TARGET uint32_t Crc32cFoldAvx512(uint32_t crc, const uint8_t* p, size_t n) {
  __m512i x0 = _mm512_loadu_si512(p);
  __m512i x1 = _mm512_loadu_si512(p + 64);
  __m512i x2 = _mm512_loadu_si512(p + 128);
  __m512i x3 = _mm512_loadu_si512(p + 192);
  // The register enters as an xor into the span's first four bytes.
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  p += 256;
  n -= 256;
  const __m512i k2048 = FoldK512(kFold2048);
  while (n >= 256) {
    x0 = Fold512(x0, k2048, _mm512_loadu_si512(p));
    x1 = Fold512(x1, k2048, _mm512_loadu_si512(p + 64));
    x2 = Fold512(x2, k2048, _mm512_loadu_si512(p + 128));
    x3 = Fold512(x3, k2048, _mm512_loadu_si512(p + 192));
    p += 256;
    n -= 256;
  }
  const __m512i k512 = FoldK512(kFold512);
  x1 = Fold512(x0, k512, x1);
  x2 = Fold512(x1, k512, x2);
  x3 = Fold512(x2, k512, x3);
  while (n >= 64) {
    x3 = Fold512(x3, k512, _mm512_loadu_si512(p));
    p += 64;
    n -= 64;
  }
  // Four lanes into one: lane i carried (3 - i) x 128 bits.
  alignas(64) __m128i lane[4];
  _mm512_store_si512(lane, x3);
  __m128i r = _mm_xor_si128(Fold128(lane[0], kFold384), Fold128(lane[1], kFold256));
  r = _mm_xor_si128(r, Fold128(lane[2], kFold128));
  r = _mm_xor_si128(r, lane[3]);
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(r)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(r, 1)));
  return Crc32cWideSse42(static_cast<uint32_t>(c), p, n);
}

#undef NVM_FOLD_TARGET

// The fastest path this CPU has for a span from a running register (no inversions).
inline uint32_t Crc32cFast(uint32_t crc, const uint8_t* p, size_t n) {
  if (g_fold && n >= kFoldMinBytes) return Crc32cFoldAvx512(crc, p, n);
  return g_hw ? Crc32cWideSse42(crc, p, n) : Crc32cTable(crc, p, n);
}

// Whether the CPU and the OS run AVX-512 with VPCLMULQDQ: the instructions (cpuid) and
// the OS saving the opmask and 512-bit register state (XCR0 bits 1, 2, 5, 6, 7).
bool FoldSupported() {
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
        __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2"))) {
    return false;
  }
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6u) == 0xe6u;
}

// One 4 KiB block, seed 0.
uint32_t Crc32cBlockFast(const uint8_t* p) {
  return ~Crc32cFast(~0u, p, 4096);
}

// crc32cWide(buf, offset, length, seed) -> uint32: the same value as crc32c, by the fastest
// path the CPU has (Crc32cFast: folding, else three chains).
// For the mirror's record path (mirror/*.ts); the engine's calls keep crc32c (see above).
Napi::Value Crc32cWide(const Napi::CallbackInfo& info) {
  const uint8_t* p;
  size_t n;
  uint32_t seed;
  if (!CrcArgs(info, "crc32cWide", &p, &n, &seed)) return info.Env().Undefined();
  uint32_t crc = ~seed;
  crc = Crc32cFast(crc, p, n);
  return Napi::Number::New(info.Env(), static_cast<double>(~crc));
}

// crc32cFold(buf, offset, length, seed) -> uint32: the folding path alone (lengths >= 256),
// so tests compare it with the table path; throws where the CPU lacks it (crc32cFolding).
Napi::Value Crc32cFoldJs(const Napi::CallbackInfo& info) {
  const uint8_t* p;
  size_t n;
  uint32_t seed;
  if (!CrcArgs(info, "crc32cFold", &p, &n, &seed)) return info.Env().Undefined();
  if (!g_fold) {
    ThrowRange(info.Env(), "crc32cFold: this CPU (or NVMIRROR_CRC_NO_AVX512) has no AVX-512 VPCLMULQDQ path");
    return info.Env().Undefined();
  }
  if (n < kFoldMinBytes) {
    ThrowRange(info.Env(), "crc32cFold: length must be >= 256");
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(~Crc32cFoldAvx512(~seed, p, n)));
}

// g_blockShift: the register after 4096 zero bytes, per byte of the input register (any
// CPU: built with the table code). Extends a running crc32c by a block whose own crc32c
// is known (Crc32cExtendBlock) without reading the block again.
uint32_t g_blockShift[4][256];

void BuildBlockShift() {
  static const uint8_t kZeros[4096] = {};
  uint32_t basis[32];
  for (int i = 0; i < 32; i++) basis[i] = Crc32cTable(uint32_t{1} << i, kZeros, sizeof kZeros);
  ShiftTables(basis, g_blockShift);
}

// crc32cExtendBlock(crc, blockCrc) -> uint32: crc32c(A || B) from crc32c(A) (any seed) and
// crc32c(B) of a 4 KiB block B (tests check the native appender's arithmetic with it).
Napi::Value Crc32cExtendBlockJs(const Napi::CallbackInfo& info) {
  int64_t crc, blockCrc;
  if (!GetInt(info, 0, "crc32cExtendBlock", "crc", 0, 0xffffffffLL, &crc) ||
      !GetInt(info, 1, "crc32cExtendBlock", "blockCrc", 0, 0xffffffffLL, &blockCrc)) {
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), static_cast<double>(Crc32cExtendBlock(static_cast<uint32_t>(crc), static_cast<uint32_t>(blockCrc))));
}

}  // namespace

// With R the register update (crc32c = ~R(~seed, data)), R(s, B) = shift(s) ^ R(0, B), and
// R(0, B) = ~crc32c(B) ^ shift(~0): so ~R(~crc, B) = shift(crc) ^ crc32c(B).
uint32_t Crc32cExtendBlock(uint32_t crc, uint32_t blockCrc) {
  return g_blockShift[0][crc & 0xff] ^ g_blockShift[1][(crc >> 8) & 0xff] ^ g_blockShift[2][(crc >> 16) & 0xff] ^
         g_blockShift[3][crc >> 24] ^ blockCrc;
}

uint32_t Crc32cOf(const uint8_t* p, size_t n) {
  if (g_hw && n == 4096) return Crc32cBlockFast(p);
  uint32_t c = g_hw ? Crc32cSse42(~0u, p, n) : Crc32cTable(~0u, p, n);
  return ~c;
}

uint32_t Crc32cSeeded(uint32_t seed, const uint8_t* p, size_t n) {
  return ~(g_hw ? Crc32cSse42(~seed, p, n) : Crc32cTable(~seed, p, n));
}

uint32_t Crc32cSeededWide(uint32_t seed, const uint8_t* p, size_t n) {
  return ~Crc32cFast(~seed, p, n);
}

void InitChecksum(Napi::Env env, Napi::Object exports) {
  // Once per process, even when worker threads load the addon concurrently.
  static std::once_flag once;
  std::call_once(once, [] {
    BuildTable();
    __builtin_cpu_init();
    g_hw = __builtin_cpu_supports("sse4.2");
    if (g_hw) BuildStripeShift();
    g_fold = g_hw && FoldSupported() && getenv("NVMIRROR_CRC_NO_AVX512") == nullptr;
    BuildBlockShift();
  });
  exports.Set("crc32c", Napi::Function::New(env, Crc32c, "crc32c"));
  exports.Set("crc32cBlocks", Napi::Function::New(env, Crc32cBlocks, "crc32cBlocks"));
  exports.Set("crc32cWide", Napi::Function::New(env, Crc32cWide, "crc32cWide"));
  exports.Set("crc32cExtendBlock", Napi::Function::New(env, Crc32cExtendBlockJs, "crc32cExtendBlock"));
  exports.Set("crc32cPortable", Napi::Function::New(env, Crc32cPortable, "crc32cPortable"));
  exports.Set("crc32cHardware", Napi::Boolean::New(env, g_hw));
  exports.Set("crc32cFold", Napi::Function::New(env, Crc32cFoldJs, "crc32cFold"));
  exports.Set("crc32cFolding", Napi::Boolean::New(env, g_fold));
  exports.Set("xorInto", Napi::Function::New(env, XorInto, "xorInto"));
  exports.Set("pqGen", Napi::Function::New(env, PqGen, "pqGen"));
}

}  // namespace nvm
