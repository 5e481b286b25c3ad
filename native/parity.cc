// RAID parity: P (XOR), Q (RAID-6, Linux md's convention) and reconstruction of up to two
// lost columns, synchronously or as a thread-pool job. The TypeScript side is
// src/raid/parity.ts; the math and the conventions are in docs/raid.md "Parity".
//
// Conventions: GF(2^8) with polynomial 0x11d, generator g = {02}. k data columns D_i, then
// P = XOR_i D_i, then Q = XOR_i g^i * D_i. Columns are numbered 0..k-1 (data), k (P), k+1 (Q).
//
// Invariants:
// - Arguments are re-checked here (op, k range, column count, every column a Buffer of
//   the same length, a positive multiple of kAlignBytes up to kColumnBytesMax, lost
//   indexes sorted, distinct, in range and allowed for the op, written columns not
//   overlapping any other column), even though src/raid/parity.ts validated them. A bad
//   argument throws a TypeError/RangeError before any byte is written.
// - Only the output columns (P, Q, or the lost columns) are written. Every kernel reads a
//   word of all its inputs before it writes that word of its outputs, and no output is
//   also an input of the same kernel.
// - Three kernel sets give identical results (tests compare them through the `path`
//   argument): AVX-512BW and AVX2 (each compiled with its own target attribute, chosen at
//   run time with __builtin_cpu_supports, so the rest of the addon keeps default flags)
//   and portable (GCC vectors of 16 bytes: SSE2 on x86-64, plus byte tables).
// - A job holds a reference to every column Buffer until its callback has run; Execute()
//   touches no JS value.
#include "common.h"

// The SIMD kernels are x86-64 only; elsewhere the portable ones run (and the path
// argument refuses AVX2/AVX-512 as on a CPU without them).
#if defined(__x86_64__)
#define NVM_PARITY_X86 1
#include <immintrin.h>
#else
#define NVM_PARITY_X86 0
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace nvm {
namespace {

// An invariant the argument checks guarantee; failing it is a bug: crash, do not handle.
#define NVM_PARITY_ASSERT(cond)                                                       \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "native/parity.cc:%d: assertion failed: %s\n", __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

constexpr size_t kAlignBytes = 64;                     // == PARITY_ALIGN_BYTES
constexpr size_t kColumnBytesMax = 16u * 1024 * 1024;  // == PARITY_COLUMN_BYTES_MAX
constexpr uint32_t kPDataColumnsMax = 255;             // == PARITY_P_DATA_COLUMNS_MAX
constexpr uint32_t kPqDataColumnsMax = 253;            // == PARITY_PQ_DATA_COLUMNS_MAX
constexpr uint32_t kColumnsMax = kPDataColumnsMax + 1;
static_assert(kPqDataColumnsMax + 2 <= kColumnsMax, "a P+Q stripe fits the column array");
static_assert(kColumnBytesMax % kAlignBytes == 0, "the column limit is a whole number of units");

// Operation codes, the same numbers as src/raid/parity.ts.
constexpr int kOpP = 0;
constexpr int kOpPq = 1;
constexpr int kOpReconstructP = 2;   // columns = k data + P
constexpr int kOpReconstructPq = 3;  // columns = k data + P + Q

// Kernel choice (the `path` argument, and what "best" resolves to on this CPU).
constexpr int kPathBest = 0;
constexpr int kPathPortable = 1;
constexpr int kPathAvx2 = 2;
constexpr int kPathAvx512 = 3;

constexpr unsigned kPoly = 0x11d;

uint8_t g_exp[510];  // g_exp[i] = g^i, doubled so g_exp[log a + log b] needs no modulo
uint8_t g_log[256];
bool g_avx2 = false;
bool g_avx512 = false;  // AVX-512F + BW (byte ops on 64-byte registers)

void BuildGf() {
  unsigned x = 1;
  for (int i = 0; i < 255; i++) {
    g_exp[i] = static_cast<uint8_t>(x);
    g_exp[i + 255] = static_cast<uint8_t>(x);
    g_log[x] = static_cast<uint8_t>(i);
    x <<= 1;
    if (x & 0x100) x ^= kPoly;
  }
}

uint8_t GfMul(uint8_t a, uint8_t b) {
  if (a == 0 || b == 0) return 0;
  return g_exp[g_log[a] + g_log[b]];
}
uint8_t GfInv(uint8_t a) { return g_exp[(255 - g_log[a]) % 255]; }  // a != 0
uint8_t GfPow2(int e) { return g_exp[((e % 255) + 255) % 255]; }

// Multiplication by a constant c: lo[i] = c*i, hi[i] = c*(i<<4) (for pshufb), full[b] = c*b.
struct MulTable {
  alignas(16) uint8_t lo[16];
  alignas(16) uint8_t hi[16];
  uint8_t full[256];
};

void BuildMulTable(uint8_t c, MulTable* t) {
  for (int i = 0; i < 16; i++) {
    t->lo[i] = GfMul(c, static_cast<uint8_t>(i));
    t->hi[i] = GfMul(c, static_cast<uint8_t>(i << 4));
  }
  for (int b = 0; b < 256; b++) t->full[b] = GfMul(c, static_cast<uint8_t>(b));
}

// ---------------------------------------------------------------------------------------
// Kernels. n is a positive multiple of kAlignBytes. A null column in `cols` is all zeros.

// dst = XOR of src[0..nsrc), nsrc >= 1.
using XorFn = void (*)(const uint8_t* const* src, size_t nsrc, uint8_t* dst, size_t n);
// p = XOR cols, q = XOR g^i cols[i] (Horner from the top); p may be null (only q written).
using PqFn = void (*)(const uint8_t* const* cols, size_t k, uint8_t* p, uint8_t* q, size_t n);
// Two data columns: on entry dx = Pxy, dy = Qxy (partial sums without x, y); on exit the data.
using Recover2Fn = void (*)(const uint8_t* p, const uint8_t* q, uint8_t* dx, uint8_t* dy, const MulTable* a,
                            const MulTable* b, size_t n);
// out ^= c * in... in the two fused forms used after a partial PqGen:
//   DataAndP: on entry dx = Qx, p = Px; dx = g^-x (Q + Qx); p = Px + dx.
//   DataAndQ: on entry dx = Px, q = Qx; dx = P + Px; q = Qx + g^x dx.
using FinishFn = void (*)(const uint8_t* in, uint8_t* dx, uint8_t* out, const MulTable* m, size_t n);

struct Kernels {
  XorFn xorGen;
  PqFn pqGen;
  Recover2Fn recover2;
  FinishFn finishDataAndP;
  FinishFn finishDataAndQ;
};

// --- portable: 16-byte GCC vectors (SSE2 on x86-64) and byte tables ---------------------
typedef uint8_t V16 __attribute__((vector_size(16)));
typedef int8_t V16s __attribute__((vector_size(16)));

inline V16 Load16(const uint8_t* p) {
  V16 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void Store16(uint8_t* p, V16 v) { std::memcpy(p, &v, 16); }
inline V16 Mul2V16(V16 v) {
  const V16s zero = {};
  V16 poly;
  std::memset(&poly, 0x1d, sizeof poly);
  V16 top = reinterpret_cast<V16>(reinterpret_cast<V16s>(v) < zero);
  return (v + v) ^ (top & poly);
}

void XorGenPortable(const uint8_t* const* src, size_t nsrc, uint8_t* dst, size_t n) {
  for (size_t j = 0; j < n; j += 32) {
    V16 a = Load16(src[0] + j), b = Load16(src[0] + j + 16);
    for (size_t i = 1; i < nsrc; i++) {
      a ^= Load16(src[i] + j);
      b ^= Load16(src[i] + j + 16);
    }
    Store16(dst + j, a);
    Store16(dst + j + 16, b);
  }
}

void PqGenPortable(const uint8_t* const* cols, size_t k, uint8_t* p, uint8_t* q, size_t n) {
  for (size_t j = 0; j < n; j += 32) {
    V16 p0 = {}, p1 = {}, q0 = {}, q1 = {};
    for (size_t i = k; i-- > 0;) {
      q0 = Mul2V16(q0);
      q1 = Mul2V16(q1);
      if (cols[i] == nullptr) continue;
      V16 d0 = Load16(cols[i] + j), d1 = Load16(cols[i] + j + 16);
      p0 ^= d0;
      p1 ^= d1;
      q0 ^= d0;
      q1 ^= d1;
    }
    if (p != nullptr) {
      Store16(p + j, p0);
      Store16(p + j + 16, p1);
    }
    Store16(q + j, q0);
    Store16(q + j + 16, q1);
  }
}

void Recover2Portable(const uint8_t* p, const uint8_t* q, uint8_t* dx, uint8_t* dy, const MulTable* a,
                      const MulTable* b, size_t n) {
  for (size_t j = 0; j < n; j++) {
    uint8_t pd = p[j] ^ dx[j];
    uint8_t qd = q[j] ^ dy[j];
    uint8_t x = a->full[pd] ^ b->full[qd];
    dx[j] = x;
    dy[j] = pd ^ x;
  }
}

void FinishDataAndPPortable(const uint8_t* q, uint8_t* dx, uint8_t* p, const MulTable* inv, size_t n) {
  for (size_t j = 0; j < n; j++) {
    uint8_t x = inv->full[q[j] ^ dx[j]];
    dx[j] = x;
    p[j] ^= x;
  }
}

void FinishDataAndQPortable(const uint8_t* p, uint8_t* dx, uint8_t* q, const MulTable* gx, size_t n) {
  for (size_t j = 0; j < n; j++) {
    uint8_t x = p[j] ^ dx[j];
    dx[j] = x;
    q[j] ^= gx->full[x];
  }
}

const Kernels kPortable = {XorGenPortable, PqGenPortable, Recover2Portable, FinishDataAndPPortable,
                           FinishDataAndQPortable};

#if NVM_PARITY_X86
// --- AVX2 -------------------------------------------------------------------------------
#define NVM_AVX2 __attribute__((target("avx2")))

NVM_AVX2 inline __m256i Ld(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
NVM_AVX2 inline void St(uint8_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
NVM_AVX2 inline __m256i X(__m256i a, __m256i b) { return _mm256_xor_si256(a, b); }
// Multiply each byte by {02}: shift left, and reduce by 0x1d the bytes whose top bit was set.
NVM_AVX2 inline __m256i Mul2(__m256i v, __m256i poly) {
  __m256i top = _mm256_cmpgt_epi8(_mm256_setzero_si256(), v);
  return X(_mm256_add_epi8(v, v), _mm256_and_si256(top, poly));
}
// Multiply each byte by the table's constant: two 16-entry lookups, one per nibble.
NVM_AVX2 inline __m256i MulC(__m256i v, __m256i lo, __m256i hi, __m256i mask) {
  __m256i l = _mm256_and_si256(v, mask);
  __m256i h = _mm256_and_si256(_mm256_srli_epi64(v, 4), mask);
  return X(_mm256_shuffle_epi8(lo, l), _mm256_shuffle_epi8(hi, h));
}
NVM_AVX2 inline __m256i Bcast16(const uint8_t* t) {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

NVM_AVX2 void XorGenAvx2(const uint8_t* const* src, size_t nsrc, uint8_t* dst, size_t n) {
  size_t j = 0;
  for (; j + 128 <= n; j += 128) {
    __m256i a = Ld(src[0] + j), b = Ld(src[0] + j + 32), c = Ld(src[0] + j + 64), d = Ld(src[0] + j + 96);
    for (size_t i = 1; i < nsrc; i++) {
      const uint8_t* s = src[i] + j;
      a = X(a, Ld(s));
      b = X(b, Ld(s + 32));
      c = X(c, Ld(s + 64));
      d = X(d, Ld(s + 96));
    }
    St(dst + j, a);
    St(dst + j + 32, b);
    St(dst + j + 64, c);
    St(dst + j + 96, d);
  }
  for (; j < n; j += 64) {
    __m256i a = Ld(src[0] + j), b = Ld(src[0] + j + 32);
    for (size_t i = 1; i < nsrc; i++) {
      a = X(a, Ld(src[i] + j));
      b = X(b, Ld(src[i] + j + 32));
    }
    St(dst + j, a);
    St(dst + j + 32, b);
  }
}

// 128 bytes (four registers each of P and Q) per step; then 64-byte steps for the tail.
// Written out by hand: arrays of __m256i are not kept in registers at -O2. The null check
// is per column per step, not per byte.
NVM_AVX2 void PqGenAvx2(const uint8_t* const* cols, size_t k, uint8_t* p, uint8_t* q, size_t n) {
  const __m256i poly = _mm256_set1_epi8(0x1d);
  const __m256i zero = _mm256_setzero_si256();
  const size_t top = k - 1;
  size_t j = 0;
  for (; j + 128 <= n; j += 128) {
    __m256i p0 = zero, p1 = zero, p2 = zero, p3 = zero;
    if (cols[top] != nullptr) {
      const uint8_t* c = cols[top] + j;
      p0 = Ld(c);
      p1 = Ld(c + 32);
      p2 = Ld(c + 64);
      p3 = Ld(c + 96);
    }
    __m256i q0 = p0, q1 = p1, q2 = p2, q3 = p3;
    for (size_t i = top; i-- > 0;) {
      q0 = Mul2(q0, poly);
      q1 = Mul2(q1, poly);
      q2 = Mul2(q2, poly);
      q3 = Mul2(q3, poly);
      if (cols[i] == nullptr) continue;
      const uint8_t* c = cols[i] + j;
      __m256i d0 = Ld(c), d1 = Ld(c + 32), d2 = Ld(c + 64), d3 = Ld(c + 96);
      p0 = X(p0, d0);
      p1 = X(p1, d1);
      p2 = X(p2, d2);
      p3 = X(p3, d3);
      q0 = X(q0, d0);
      q1 = X(q1, d1);
      q2 = X(q2, d2);
      q3 = X(q3, d3);
    }
    if (p != nullptr) {
      St(p + j, p0);
      St(p + j + 32, p1);
      St(p + j + 64, p2);
      St(p + j + 96, p3);
    }
    St(q + j, q0);
    St(q + j + 32, q1);
    St(q + j + 64, q2);
    St(q + j + 96, q3);
  }
  for (; j < n; j += 64) {
    __m256i p0 = zero, p1 = zero;
    if (cols[top] != nullptr) {
      p0 = Ld(cols[top] + j);
      p1 = Ld(cols[top] + j + 32);
    }
    __m256i q0 = p0, q1 = p1;
    for (size_t i = top; i-- > 0;) {
      q0 = Mul2(q0, poly);
      q1 = Mul2(q1, poly);
      if (cols[i] == nullptr) continue;
      __m256i d0 = Ld(cols[i] + j), d1 = Ld(cols[i] + j + 32);
      p0 = X(p0, d0);
      p1 = X(p1, d1);
      q0 = X(q0, d0);
      q1 = X(q1, d1);
    }
    if (p != nullptr) {
      St(p + j, p0);
      St(p + j + 32, p1);
    }
    St(q + j, q0);
    St(q + j + 32, q1);
  }
}

NVM_AVX2 void Recover2Avx2(const uint8_t* p, const uint8_t* q, uint8_t* dx, uint8_t* dy, const MulTable* a,
                           const MulTable* b, size_t n) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i alo = Bcast16(a->lo), ahi = Bcast16(a->hi), blo = Bcast16(b->lo), bhi = Bcast16(b->hi);
  for (size_t j = 0; j < n; j += 32) {
    __m256i pd = X(Ld(p + j), Ld(dx + j));
    __m256i qd = X(Ld(q + j), Ld(dy + j));
    __m256i x = X(MulC(pd, alo, ahi, mask), MulC(qd, blo, bhi, mask));
    St(dx + j, x);
    St(dy + j, X(pd, x));
  }
}

NVM_AVX2 void FinishDataAndPAvx2(const uint8_t* q, uint8_t* dx, uint8_t* p, const MulTable* inv, size_t n) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i lo = Bcast16(inv->lo), hi = Bcast16(inv->hi);
  for (size_t j = 0; j < n; j += 32) {
    __m256i x = MulC(X(Ld(q + j), Ld(dx + j)), lo, hi, mask);
    St(dx + j, x);
    St(p + j, X(Ld(p + j), x));
  }
}

NVM_AVX2 void FinishDataAndQAvx2(const uint8_t* p, uint8_t* dx, uint8_t* q, const MulTable* gx, size_t n) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i lo = Bcast16(gx->lo), hi = Bcast16(gx->hi);
  for (size_t j = 0; j < n; j += 32) {
    __m256i x = X(Ld(p + j), Ld(dx + j));
    St(dx + j, x);
    St(q + j, X(Ld(q + j), MulC(x, lo, hi, mask)));
  }
}

const Kernels kAvx2 = {XorGenAvx2, PqGenAvx2, Recover2Avx2, FinishDataAndPAvx2, FinishDataAndQAvx2};

// --- AVX-512BW (64-byte registers; ISA-L's own kernels on such CPUs are AVX-512) -------
#define NVM_AVX512 __attribute__((target("avx512f,avx512bw")))
// GCC 12's own avx512fintrin.h (_mm512_undefined_epi32 inside srli/broadcast) trips
// -Wuninitialized; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

NVM_AVX512 inline __m512i Ld5(const uint8_t* p) { return _mm512_loadu_si512(p); }
NVM_AVX512 inline void St5(uint8_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
NVM_AVX512 inline __m512i X5(__m512i a, __m512i b) { return _mm512_xor_si512(a, b); }
// Multiply each byte by {02}: the sign bits become a mask that selects 0x1d.
NVM_AVX512 inline __m512i Mul2x5(__m512i v, __m512i poly) {
  __mmask64 top = _mm512_movepi8_mask(v);
  return X5(_mm512_add_epi8(v, v), _mm512_maskz_mov_epi8(top, poly));
}
NVM_AVX512 inline __m512i MulC5(__m512i v, __m512i lo, __m512i hi, __m512i mask) {
  __m512i l = _mm512_and_si512(v, mask);
  __m512i h = _mm512_and_si512(_mm512_srli_epi64(v, 4), mask);
  return X5(_mm512_shuffle_epi8(lo, l), _mm512_shuffle_epi8(hi, h));
}
NVM_AVX512 inline __m512i Bcast16x5(const uint8_t* t) {
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

NVM_AVX512 void XorGenAvx512(const uint8_t* const* src, size_t nsrc, uint8_t* dst, size_t n) {
  size_t j = 0;
  for (; j + 128 <= n; j += 128) {
    __m512i a = Ld5(src[0] + j), b = Ld5(src[0] + j + 64);
    for (size_t i = 1; i < nsrc; i++) {
      const uint8_t* s = src[i] + j;
      a = X5(a, Ld5(s));
      b = X5(b, Ld5(s + 64));
    }
    St5(dst + j, a);
    St5(dst + j + 64, b);
  }
  for (; j < n; j += 64) {
    __m512i a = Ld5(src[0] + j);
    for (size_t i = 1; i < nsrc; i++) a = X5(a, Ld5(src[i] + j));
    St5(dst + j, a);
  }
}

NVM_AVX512 void PqGenAvx512(const uint8_t* const* cols, size_t k, uint8_t* p, uint8_t* q, size_t n) {
  const __m512i poly = _mm512_set1_epi8(0x1d);
  const __m512i zero = _mm512_setzero_si512();
  const size_t top = k - 1;
  size_t j = 0;
  for (; j + 256 <= n; j += 256) {
    __m512i p0 = zero, p1 = zero, p2 = zero, p3 = zero;
    if (cols[top] != nullptr) {
      const uint8_t* c = cols[top] + j;
      p0 = Ld5(c);
      p1 = Ld5(c + 64);
      p2 = Ld5(c + 128);
      p3 = Ld5(c + 192);
    }
    __m512i q0 = p0, q1 = p1, q2 = p2, q3 = p3;
    for (size_t i = top; i-- > 0;) {
      q0 = Mul2x5(q0, poly);
      q1 = Mul2x5(q1, poly);
      q2 = Mul2x5(q2, poly);
      q3 = Mul2x5(q3, poly);
      if (cols[i] == nullptr) continue;
      const uint8_t* c = cols[i] + j;
      __m512i d0 = Ld5(c), d1 = Ld5(c + 64), d2 = Ld5(c + 128), d3 = Ld5(c + 192);
      p0 = X5(p0, d0);
      p1 = X5(p1, d1);
      p2 = X5(p2, d2);
      p3 = X5(p3, d3);
      q0 = X5(q0, d0);
      q1 = X5(q1, d1);
      q2 = X5(q2, d2);
      q3 = X5(q3, d3);
    }
    if (p != nullptr) {
      St5(p + j, p0);
      St5(p + j + 64, p1);
      St5(p + j + 128, p2);
      St5(p + j + 192, p3);
    }
    St5(q + j, q0);
    St5(q + j + 64, q1);
    St5(q + j + 128, q2);
    St5(q + j + 192, q3);
  }
  for (; j < n; j += 64) {
    __m512i p0 = cols[top] != nullptr ? Ld5(cols[top] + j) : zero;
    __m512i q0 = p0;
    for (size_t i = top; i-- > 0;) {
      q0 = Mul2x5(q0, poly);
      if (cols[i] == nullptr) continue;
      __m512i d0 = Ld5(cols[i] + j);
      p0 = X5(p0, d0);
      q0 = X5(q0, d0);
    }
    if (p != nullptr) St5(p + j, p0);
    St5(q + j, q0);
  }
}

NVM_AVX512 void Recover2Avx512(const uint8_t* p, const uint8_t* q, uint8_t* dx, uint8_t* dy, const MulTable* a,
                               const MulTable* b, size_t n) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i alo = Bcast16x5(a->lo), ahi = Bcast16x5(a->hi), blo = Bcast16x5(b->lo), bhi = Bcast16x5(b->hi);
  for (size_t j = 0; j < n; j += 64) {
    __m512i pd = X5(Ld5(p + j), Ld5(dx + j));
    __m512i qd = X5(Ld5(q + j), Ld5(dy + j));
    __m512i x = X5(MulC5(pd, alo, ahi, mask), MulC5(qd, blo, bhi, mask));
    St5(dx + j, x);
    St5(dy + j, X5(pd, x));
  }
}

NVM_AVX512 void FinishDataAndPAvx512(const uint8_t* q, uint8_t* dx, uint8_t* p, const MulTable* inv, size_t n) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i lo = Bcast16x5(inv->lo), hi = Bcast16x5(inv->hi);
  for (size_t j = 0; j < n; j += 64) {
    __m512i x = MulC5(X5(Ld5(q + j), Ld5(dx + j)), lo, hi, mask);
    St5(dx + j, x);
    St5(p + j, X5(Ld5(p + j), x));
  }
}

NVM_AVX512 void FinishDataAndQAvx512(const uint8_t* p, uint8_t* dx, uint8_t* q, const MulTable* gx, size_t n) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i lo = Bcast16x5(gx->lo), hi = Bcast16x5(gx->hi);
  for (size_t j = 0; j < n; j += 64) {
    __m512i x = X5(Ld5(p + j), Ld5(dx + j));
    St5(dx + j, x);
    St5(q + j, X5(Ld5(q + j), MulC5(x, lo, hi, mask)));
  }
}

#pragma GCC diagnostic pop

const Kernels kAvx512 = {XorGenAvx512, PqGenAvx512, Recover2Avx512, FinishDataAndPAvx512, FinishDataAndQAvx512};
#else
// Never selected (g_avx2 and g_avx512 stay false): the portable kernels stand in.
const Kernels kAvx2 = kPortable;
const Kernels kAvx512 = kPortable;
#endif  // NVM_PARITY_X86

// ---------------------------------------------------------------------------------------
// One validated call: plain data, safe to run on any thread.
struct Task {
  int op = kOpP;
  size_t k = 0;
  size_t n = 0;
  int lost0 = -1;  // lost0 < lost1, or lost1 == -1
  int lost1 = -1;
  const Kernels* kernels = nullptr;  // chosen on the main thread (path), never null when run
  size_t ncols = 0;
  uint8_t* cols[kColumnsMax];  // k data, P, then Q for kOpPq / kOpReconstructPq
};

void RunReconstruct(const Task& t, const Kernels& kn) {
  const size_t k = t.k;
  const size_t pIdx = k;
  const size_t qIdx = k + 1;
  const bool hasQ = t.op == kOpReconstructPq;
  const uint8_t* in[kColumnsMax];
  uint8_t* const* c = t.cols;
  const int x = t.lost0;
  const int y = t.lost1;
  const size_t ncols = t.ncols;

  if (y < 0) {
    if (static_cast<size_t>(x) == qIdx) {  // Q: recompute from the data
      kn.pqGen(c, k, nullptr, c[qIdx], t.n);
      return;
    }
    // A data column or P: the XOR of every other column of data + P.
    size_t m = 0;
    for (size_t i = 0; i <= pIdx; i++) {
      if (i != static_cast<size_t>(x)) in[m++] = c[i];
    }
    kn.xorGen(in, m, c[x], t.n);
    return;
  }
  NVM_PARITY_ASSERT(hasQ && x < y && static_cast<size_t>(y) < ncols);
  for (size_t i = 0; i < k; i++) in[i] = c[i];
  if (static_cast<size_t>(x) == pIdx) {  // P and Q
    kn.pqGen(in, k, c[pIdx], c[qIdx], t.n);
    return;
  }
  in[x] = nullptr;
  if (static_cast<size_t>(y) == qIdx) {  // data x and Q: Dx = P + Px, Q = Qx + g^x Dx
    MulTable gx;
    BuildMulTable(GfPow2(x), &gx);
    kn.pqGen(in, k, c[x], c[qIdx], t.n);
    kn.finishDataAndQ(c[pIdx], c[x], c[qIdx], &gx, t.n);
    return;
  }
  if (static_cast<size_t>(y) == pIdx) {  // data x and P: Dx = g^-x (Q + Qx), P = Px + Dx
    MulTable inv;
    BuildMulTable(GfPow2(-x), &inv);
    kn.pqGen(in, k, c[pIdx], c[x], t.n);
    kn.finishDataAndP(c[qIdx], c[x], c[pIdx], &inv, t.n);
    return;
  }
  // Data x and y (Anvin): A = g^(y-x) / (g^(y-x) + 1), B = g^-x / (g^(y-x) + 1).
  in[y] = nullptr;
  uint8_t gyx = GfPow2(y - x);
  uint8_t denomInv = GfInv(static_cast<uint8_t>(gyx ^ 1));
  MulTable a, b;
  BuildMulTable(GfMul(gyx, denomInv), &a);
  BuildMulTable(GfMul(GfPow2(-x), denomInv), &b);
  kn.pqGen(in, k, c[x], c[y], t.n);
  kn.recover2(c[pIdx], c[qIdx], c[x], c[y], &a, &b, t.n);
}

void RunTask(const Task& t) {
  NVM_PARITY_ASSERT(t.k >= 1 && t.n > 0 && t.n % kAlignBytes == 0 && t.n <= kColumnBytesMax);
  NVM_PARITY_ASSERT(t.ncols == t.k + ((t.op == kOpPq || t.op == kOpReconstructPq) ? 2 : 1));
  NVM_PARITY_ASSERT(t.kernels != nullptr);
  const Kernels& kn = *t.kernels;
  uint8_t* const* c = t.cols;
  switch (t.op) {
    case kOpP:
      kn.xorGen(c, t.k, c[t.k], t.n);
      break;
    case kOpPq:
      kn.pqGen(c, t.k, c[t.k], c[t.k + 1], t.n);
      break;
    default:
      RunReconstruct(t, kn);
      break;
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks. On failure a JS exception is pending and false is returned.

bool Overlap(const uint8_t* a, const uint8_t* b, size_t n) { return a < b + n && b < a + n; }

// values (optional) receives the column values, for the references an async job holds.
// Columns are read with the C API: this runs on every call, next to microseconds of work.
bool ParseTask(const Napi::CallbackInfo& info, const char* fn, Task* t, napi_value* values) {
  Napi::Env env = info.Env();
  int64_t op, k, lost0, lost1;
  if (!GetInt(info, 0, fn, "op", kOpP, kOpReconstructPq, &op)) return false;
  if (info.Length() < 2 || !info[1].IsArray()) {
    ThrowType(env, std::string(fn) + ": columns must be an array of Buffers");
    return false;
  }
  const bool pq = op == kOpPq || op == kOpReconstructPq;
  const size_t parityCount = pq ? 2 : 1;
  const uint32_t kMax = pq ? kPqDataColumnsMax : kPDataColumnsMax;
  if (!GetInt(info, 2, fn, "k", 1, kMax, &k) || !GetInt(info, 3, fn, "lost0", -1, kColumnsMax, &lost0) ||
      !GetInt(info, 4, fn, "lost1", -1, kColumnsMax, &lost1))
    return false;
  Napi::Array arr = info[1].As<Napi::Array>();
  const size_t ncols = static_cast<size_t>(k) + parityCount;
  if (arr.Length() != ncols) {
    ThrowRange(env, std::string(fn) + ": " + std::to_string(ncols) + " columns expected for k = " +
                        std::to_string(k) + ", got " + std::to_string(arr.Length()));
    return false;
  }
  const bool reconstruct = op == kOpReconstructP || op == kOpReconstructPq;
  if (!reconstruct) {
    if (lost0 != -1 || lost1 != -1) {
      ThrowRange(env, std::string(fn) + ": lost0 and lost1 must be -1 when computing parity");
      return false;
    }
  } else {
    const int64_t last = static_cast<int64_t>(ncols) - 1;
    bool ok = lost0 >= 0 && lost0 <= last &&
              (lost1 == -1 || (parityCount == 2 && lost1 > lost0 && lost1 <= last));
    if (!ok) {
      ThrowRange(env, std::string(fn) + ": lost columns must be sorted, distinct, in 0.." + std::to_string(last) +
                          " and at most " + std::to_string(parityCount));
      return false;
    }
  }
  t->op = static_cast<int>(op);
  t->k = static_cast<size_t>(k);
  t->lost0 = static_cast<int>(lost0);
  t->lost1 = static_cast<int>(lost1);
  t->ncols = ncols;
  // First every element (an accessor on the array could run JS, even detach a Buffer),
  // then every buffer's memory: no JS runs between reading the pointers and using them.
  napi_value vals[kColumnsMax];
  for (uint32_t i = 0; i < ncols; i++) {
    if (napi_get_element(env, arr, i, &vals[i]) != napi_ok) {
      if (!env.IsExceptionPending()) ThrowType(env, std::string(fn) + ": columns[" + std::to_string(i) + "] unreadable");
      return false;
    }
  }
  size_t lens[kColumnsMax];
  for (uint32_t i = 0; i < ncols; i++) {
    void* data = nullptr;
    size_t len = 0;
    // napi_get_buffer_info fails on anything but a Buffer/ArrayBufferView (and then its
    // byte range is what is read or written): no separate napi_is_buffer call.
    if (napi_get_buffer_info(env, vals[i], &data, &len) != napi_ok) {
      ThrowType(env, std::string(fn) + ": columns[" + std::to_string(i) + "] must be a Buffer");
      return false;
    }
    t->cols[i] = static_cast<uint8_t*>(data);
    lens[i] = len;
    if (values != nullptr) values[i] = vals[i];
  }
  t->n = lens[0];
  if (t->n == 0 || t->n % kAlignBytes != 0 || t->n > kColumnBytesMax) {
    ThrowRange(env, std::string(fn) + ": column length must be a positive multiple of " + std::to_string(kAlignBytes) +
                        " up to " + std::to_string(kColumnBytesMax) + ", got " + std::to_string(t->n));
    return false;
  }
  for (size_t i = 1; i < ncols; i++) {
    if (lens[i] != t->n) {
      ThrowRange(env, std::string(fn) + ": all columns must have the same length");
      return false;
    }
  }
  // The written columns must not share memory with any other column.
  int outs[2] = {-1, -1};
  if (reconstruct) {
    outs[0] = t->lost0;
    outs[1] = t->lost1;
  } else {
    outs[0] = static_cast<int>(t->k);
    if (pq) outs[1] = static_cast<int>(t->k + 1);
  }
  for (int o : outs) {
    if (o < 0) continue;
    for (size_t i = 0; i < ncols; i++) {
      if (i != static_cast<size_t>(o) && Overlap(t->cols[o], t->cols[i], t->n)) {
        ThrowRange(env, std::string(fn) + ": written column " + std::to_string(o) + " overlaps column " +
                            std::to_string(i) + " in memory");
        return false;
      }
    }
  }
  return true;
}

const Kernels* BestKernels() { return g_avx512 ? &kAvx512 : g_avx2 ? &kAvx2 : &kPortable; }

// parity(op, columns, k, lost0, lost1[, path]): synchronous. path: 0 = the best kernels this
// CPU runs, 1 = portable, 2 = AVX2, 3 = AVX-512 (RangeError when the CPU lacks it), so tests
// can compare every kernel set the machine has.
Napi::Value Parity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Task t;
  if (!ParseTask(info, "parity", &t, nullptr)) return env.Undefined();
  t.kernels = BestKernels();
  if (info.Length() > 5 && !info[5].IsUndefined()) {
    int64_t path;
    if (!GetInt(info, 5, "parity", "path", kPathBest, kPathAvx512, &path)) return env.Undefined();
    if ((path == kPathAvx2 && !g_avx2) || (path == kPathAvx512 && !g_avx512)) {
      ThrowRange(env, "parity: this CPU does not run the " + std::string(path == kPathAvx2 ? "AVX2" : "AVX-512") + " kernels");
      return env.Undefined();
    }
    if (path == kPathPortable) t.kernels = &kPortable;
    if (path == kPathAvx2) t.kernels = &kAvx2;
    if (path == kPathAvx512) t.kernels = &kAvx512;
  }
  RunTask(t);
  return env.Undefined();
}

class ParityJob final : public Napi::AsyncWorker {
 public:
  ParityJob(const Napi::Function& cb, const Task& task, const napi_value* values)
      : Napi::AsyncWorker(cb, "parity"), task_(task) {
    refs_.reserve(task.ncols);
    for (size_t i = 0; i < task.ncols; i++) refs_.push_back(Napi::Persistent(Napi::Value(cb.Env(), values[i])));
  }

  void Execute() override { RunTask(task_); }

  void OnOK() override { Callback().Call({Env().Null()}); }

 private:
  Task task_;
  std::vector<Napi::Reference<Napi::Value>> refs_;
};

// parityAsync(op, columns, k, lost0, lost1, cb): the same work on the libuv thread pool.
Napi::Value ParityAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Task t;
  napi_value values[kColumnsMax];
  Napi::Function cb;
  if (!GetCallback(info, 5, "parityAsync", &cb) || !ParseTask(info, "parityAsync", &t, values)) return env.Undefined();
  t.kernels = BestKernels();
  auto* job = new ParityJob(cb, t, values);
  job->Queue();
  return env.Undefined();
}

}  // namespace

void InitParity(Napi::Env env, Napi::Object exports) {
  static std::once_flag once;
  std::call_once(once, [] {
    BuildGf();
#if NVM_PARITY_X86
    __builtin_cpu_init();
    g_avx2 = __builtin_cpu_supports("avx2");
    g_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
  });
  exports.Set("parity", Napi::Function::New(env, Parity, "parity"));
  exports.Set("parityAsync", Napi::Function::New(env, ParityAsync, "parityAsync"));
  exports.Set("parityAvx2", Napi::Boolean::New(env, g_avx2));
  exports.Set("parityAvx512", Napi::Boolean::New(env, g_avx512));
}

}  // namespace nvm
