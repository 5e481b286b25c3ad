/*
 * ISA-L as an independent oracle and yardstick for nvmirror's RAID parity
 * (src/raid/parity.ts). Built at test/bench time by test/unit/raid-parity-isal.ts with
 * `cc -O2 ... -lisal` (Debian: libisal-dev).
 *
 *   gen K LEN              stdin: K data columns of LEN bytes; stdout: P (xor_gen), P and Q (pq_gen)
 *   decode K LEN X Y       stdin: K data columns, P, Q (any contents in columns X, Y);
 *                          stdout: columns X and Y rebuilt by ISA-L's matrix inversion and
 *                          ec_encode_data (no use of the closed RAID-6 formulas)
 *   bench OP K LEN ROUNDS  OP = p | pq | dd; prints one line per round: MB/s of data
 *                          (K * LEN bytes per call) per second of this thread's CPU time
 *
 * Invariants: LEN is a positive multiple of 64, 1 <= K <= 253, every buffer is 64-byte
 * aligned (pq_gen requires 32); input that does not fit is refused with exit code 2.
 */
#include <isa-l/erasure_code.h>
#include <isa-l/raid.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define K_MAX 253
#define LEN_MAX (16 * 1024 * 1024)
#define ROUNDS_MAX 50
#define ROUND_SECONDS 0.2
#define WARMUP_SECONDS 0.05
#define ROUND_WALL_SECONDS_MAX 3.0

static void die(const char *msg) {
  fprintf(stderr, "parity-isal: %s\n", msg);
  exit(2);
}

static unsigned char *alloc_col(size_t len) {
  unsigned char *p = aligned_alloc(64, len);
  if (p == NULL) die("out of memory");
  return p;
}

static void read_all(unsigned char *p, size_t len) {
  size_t done = 0;
  while (done < len) {
    size_t n = fread(p + done, 1, len - done, stdin);
    if (n == 0) die("short input");
    done += n;
  }
}

static void write_all(const unsigned char *p, size_t len) {
  if (fwrite(p, 1, len, stdout) != len) die("write failed");
}

static unsigned char gf_pow2(int e) {
  unsigned char r = 1;
  for (int i = 0; i < e; i++) r = gf_mul(r, 2);
  return r;
}

/*
 * Decode table for losing data columns x < y, from the (K+2) x K generator matrix
 * [I; 1...1; g^0...g^(K-1)]: keep the K rows of surviving columns, invert (gf_invert_matrix),
 * and take rows x and y of the inverse: coefficients over the survivors in column order.
 */
static void decode_tables(int k, int x, int y, unsigned char *gftbls, int *survivors) {
  unsigned char gen[(K_MAX + 2) * K_MAX];
  unsigned char sub[K_MAX * K_MAX], inv[K_MAX * K_MAX], coef[2 * K_MAX];
  memset(gen, 0, sizeof gen);
  for (int i = 0; i < k; i++) gen[i * k + i] = 1;
  for (int j = 0; j < k; j++) {
    gen[k * k + j] = 1;
    gen[(k + 1) * k + j] = gf_pow2(j);
  }
  int m = 0;
  for (int r = 0; r < k + 2; r++) {
    if (r == x || r == y) continue;
    survivors[m] = r;
    memcpy(sub + m * k, gen + r * k, (size_t)k);
    m++;
  }
  if (gf_invert_matrix(sub, inv, k) != 0) die("singular decode matrix");
  memcpy(coef, inv + x * k, (size_t)k);
  memcpy(coef + k, inv + y * k, (size_t)k);
  ec_init_tables(k, 2, coef, gftbls);
}

static double clock_s(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }
/* CPU time of this thread: MB/s per core even when the machine is shared (the run is
   descheduled, not slowed, by other processes). */
static double cpu_s(void) { return clock_s(CLOCK_THREAD_CPUTIME_ID); }

int main(int argc, char **argv) {
  if (argc < 4) die("usage: gen K LEN | decode K LEN X Y | bench OP K LEN ROUNDS");
  const char *mode = argv[1];
  int argBase = strcmp(mode, "bench") == 0 ? 3 : 2;
  if (argc < argBase + 2) die("missing arguments");
  int k = atoi(argv[argBase]);
  long len = atol(argv[argBase + 1]);
  if (k < 1 || k > K_MAX || len <= 0 || len % 64 != 0 || len > LEN_MAX) die("K or LEN out of range");
  unsigned char *cols[K_MAX + 2];
  for (int i = 0; i < k + 2; i++) cols[i] = alloc_col((size_t)len);

  if (strcmp(mode, "gen") == 0) {
    for (int i = 0; i < k; i++) read_all(cols[i], (size_t)len);
    unsigned char *xp = alloc_col((size_t)len);
    void *xarr[K_MAX + 1];
    for (int i = 0; i < k; i++) xarr[i] = cols[i];
    xarr[k] = xp;
    if (xor_gen(k + 1, (int)len, xarr) != 0) die("xor_gen failed");
    if (k < 2) die("gen needs K >= 2 (pq_gen takes two sources at least)");
    if (pq_gen(k + 2, (int)len, (void **)cols) != 0) die("pq_gen failed");
    write_all(xp, (size_t)len);
    write_all(cols[k], (size_t)len);
    write_all(cols[k + 1], (size_t)len);
    return 0;
  }

  if (strcmp(mode, "decode") == 0) {
    if (argc < 6) die("decode K LEN X Y");
    int x = atoi(argv[4]), y = atoi(argv[5]);
    if (x < 0 || y <= x || y >= k) die("need 0 <= X < Y < K (two data columns)");
    for (int i = 0; i < k + 2; i++) read_all(cols[i], (size_t)len);
    unsigned char *gftbls = malloc((size_t)32 * k * 2);
    int survivors[K_MAX];
    if (gftbls == NULL) die("out of memory");
    decode_tables(k, x, y, gftbls, survivors);
    unsigned char *src[K_MAX], *dst[2] = {alloc_col((size_t)len), alloc_col((size_t)len)};
    for (int i = 0; i < k; i++) src[i] = cols[survivors[i]];
    ec_encode_data((int)len, k, 2, gftbls, src, dst);
    write_all(dst[0], (size_t)len);
    write_all(dst[1], (size_t)len);
    return 0;
  }

  if (strcmp(mode, "bench") == 0) {
    const char *op = argv[2];
    int rounds = argc > 5 ? atoi(argv[5]) : 5;
    if (rounds < 1 || rounds > ROUNDS_MAX) die("ROUNDS out of range");
    if (k < 2 && strcmp(op, "p") != 0) die("pq and dd need K >= 2");
    uint32_t s = 0x9e3779b9u;
    for (int i = 0; i < k + 2; i++)
      for (long j = 0; j < len; j++) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        cols[i][j] = (unsigned char)s;
      }
    unsigned char *gftbls = malloc((size_t)32 * k * 2);
    int survivors[K_MAX];
    unsigned char *src[K_MAX], *dst[2] = {alloc_col((size_t)len), alloc_col((size_t)len)};
    if (gftbls == NULL) die("out of memory");
    if (strcmp(op, "dd") == 0) {
      if (k < 3) die("dd needs K >= 3");
      if (pq_gen(k + 2, (int)len, (void **)cols) != 0) die("pq_gen failed");
      decode_tables(k, 0, 1, gftbls, survivors);
      for (int i = 0; i < k; i++) src[i] = cols[survivors[i]];
    } else if (strcmp(op, "p") != 0 && strcmp(op, "pq") != 0) {
      die("OP must be p, pq or dd");
    }
    void *xarr[K_MAX + 1];
    for (int i = 0; i < k; i++) xarr[i] = cols[i];
    xarr[k] = cols[k];
    /* Untimed warm-up (caches, clocks), as the caller does for its own side. */
    for (double w0 = now_s(); now_s() - w0 < WARMUP_SECONDS;) {
      if (op[0] == 'p' && op[1] == 0) xor_gen(k + 1, (int)len, xarr);
      else if (op[0] == 'p') pq_gen(k + 2, (int)len, (void **)cols);
      else ec_encode_data((int)len, k, 2, gftbls, src, dst);
    }
    for (int r = 0; r < rounds; r++) {
      long calls = 0;
      double t0 = cpu_s(), t1, w0 = now_s();
      do {
        for (int rep = 0; rep < 16; rep++) {
          if (op[0] == 'p' && op[1] == 0) xor_gen(k + 1, (int)len, xarr);
          else if (op[0] == 'p') pq_gen(k + 2, (int)len, (void **)cols);
          else ec_encode_data((int)len, k, 2, gftbls, src, dst);
        }
        calls += 16;
        t1 = cpu_s();
      } while (t1 - t0 < ROUND_SECONDS && now_s() - w0 < ROUND_WALL_SECONDS_MAX);
      printf("%.1f\n", (double)calls * k * len / (t1 - t0) / 1e6);
    }
    return 0;
  }
  die("unknown mode");
  return 2;
}
