// persist-cost: what it costs to make a range of a memory-mapped file durable, by
// several mechanisms, on the disk under DIR (default: $TMPDIR or /tmp).
//
//   cc -O2 -o /tmp/persist-cost scripts/bench/persist-cost.c
//   /tmp/persist-cost [DIR] [ROUNDS] [SIZES_KIB...]      e.g. /tmp/persist-cost /work 400 4 64 1024
//
// Methods (each on its own preallocated, zeroed, fdatasync'd 64 MiB file, ranges advancing
// through it like a log; the methods alternate round by round so load drifts hit them alike):
//   msync       stores into the MAP_SHARED mapping, then msync(MS_SYNC) of the range
//   pwrite      stores into a private buffer, pwrite of it to the file, fdatasync (no mmap)
//   fdatasync   stores into the mapping, then fdatasync(fd) (the mapping's dirty pages are
//               the file's page cache: this writes back every dirty page of the file)
//   sfr         stores into the mapping, sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) of
//               the range, then fdatasync(fd)
//   rwfdsync    stores into a private buffer, pwritev2(RWF_DSYNC) (no mmap)
// PERSIST_COST_PREP=WORDS changes how each file's page cache is set up: "fill4k" zero-fills
// with 4 KiB pwrites (default 1 MiB), "drop" drops the file's cached pages after the fill
// (fadvise DONTNEED), "random" madvise(MADV_RANDOM)s the mapping, "warm" re-reads the file with
// POSIX_FADV_RANDOM set (no readahead, so order-0 folios), "populate" pre-faults it
// for writing (MADV_POPULATE_WRITE), e.g. PERSIST_COST_PREP=drop,random,populate.
// PERSIST_COST_ONLY=N runs only method N (in the order above, from 0), e.g. under perf trace.
// For each: median and p99 of the store time (page faults included) and of the sync time.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define FILE_BYTES (64u << 20)
enum { M_MSYNC, M_PWRITE, M_FDATASYNC, M_SFR, M_RWFDSYNC, M_COUNT };
static const char* kNames[M_COUNT] = {"msync", "pwrite+fdatasync", "fdatasync(mmap)", "sfr+fdatasync", "pwritev2 RWF_DSYNC"};

static uint64_t NowNs(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void Die(const char* what) {
  perror(what);
  exit(1);
}

static int CmpU64(const void* a, const void* b) {
  uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
  return x < y ? -1 : x > y;
}

static double Pct(uint64_t* v, int n, double p) {
  qsort(v, (size_t)n, sizeof *v, CmpU64);
  int i = (int)(p * (n - 1) + 0.5);
  return (double)v[i] / 1000.0;
}

struct Target {
  int fd;
  uint8_t* map;
  uint8_t* priv;
  size_t next;
  char path[4096];
};

// PERSIST_COST_PREP: how the file's page cache is set up before mmap (see the file comment).
static const char* g_prep = "";

static void Setup(struct Target* t, const char* dir, int m) {
  size_t fillBytes = strcmp(g_prep, "fill4k") == 0 ? 4096 : 1 << 20;
  snprintf(t->path, sizeof t->path, "%s/persist-cost-%d-%d.img", dir, (int)getpid(), m);
  t->fd = open(t->path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (t->fd < 0) Die("open");
  void* z = calloc(1, 1 << 20);
  for (size_t at = 0; at < FILE_BYTES; at += fillBytes)
    if (pwrite(t->fd, z, fillBytes, (off_t)at) != (ssize_t)fillBytes) Die("pwrite zero");
  free(z);
  if (fdatasync(t->fd) != 0) Die("fdatasync");
  if (strncmp(g_prep, "drop", 4) == 0 && posix_fadvise(t->fd, 0, 0, POSIX_FADV_DONTNEED) != 0) Die("fadvise");
  if (strstr(g_prep, "warm") != NULL) {  // re-read it into the page cache without readahead: order-0 folios
    if (posix_fadvise(t->fd, 0, 0, POSIX_FADV_RANDOM) != 0) Die("fadvise random");
    uint8_t* b = malloc(1 << 20);
    for (size_t at = 0; at < FILE_BYTES; at += 1 << 20)
      if (pread(t->fd, b, 1 << 20, (off_t)at) != 1 << 20) Die("pread warm");
    free(b);
  }
  t->map = mmap(NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
  if (t->map == MAP_FAILED) Die("mmap");
  if (strstr(g_prep, "random") != NULL && madvise(t->map, FILE_BYTES, MADV_RANDOM) != 0) Die("madvise random");
  if (strstr(g_prep, "populate") != NULL && madvise(t->map, FILE_BYTES, MADV_POPULATE_WRITE) != 0) Die("madvise populate");
  t->priv = aligned_alloc(4096, 1 << 20);
  t->next = 0;
}

// One round: returns store and sync times in ns.
static void Round(struct Target* t, int m, size_t len, uint32_t stamp, uint64_t* storeNs, uint64_t* syncNs) {
  if (t->next + len > FILE_BYTES) t->next = 0;
  size_t off = t->next;
  t->next += len;
  int viaMap = m == M_MSYNC || m == M_FDATASYNC || m == M_SFR;
  uint8_t* dst = viaMap ? t->map + off : t->priv;
  uint64_t t0 = NowNs();
  for (size_t i = 0; i < len; i += 64) memcpy(dst + i, &stamp, sizeof stamp);  // a store per cache line
  uint64_t t1 = NowNs();
  switch (m) {
    case M_MSYNC:
      if (msync(t->map + off, len, MS_SYNC) != 0) Die("msync");
      break;
    case M_PWRITE:
      if (pwrite(t->fd, t->priv, len, (off_t)off) != (ssize_t)len) Die("pwrite");
      if (fdatasync(t->fd) != 0) Die("fdatasync");
      break;
    case M_FDATASYNC:
      if (fdatasync(t->fd) != 0) Die("fdatasync");
      break;
    case M_SFR:
      if (sync_file_range(t->fd, (off_t)off, (off_t)len,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0)
        Die("sync_file_range");
      if (fdatasync(t->fd) != 0) Die("fdatasync");
      break;
    case M_RWFDSYNC: {
      struct iovec iov = {t->priv, len};
      if (pwritev2(t->fd, &iov, 1, (off_t)off, RWF_DSYNC) != (ssize_t)len) Die("pwritev2");
      break;
    }
  }
  uint64_t t2 = NowNs();
  *storeNs = t1 - t0;
  *syncNs = t2 - t1;
}

int main(int argc, char** argv) {
  const char* dir = argc > 1 ? argv[1] : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  int rounds = argc > 2 ? atoi(argv[2]) : 400;
  size_t sizes[8] = {4096, 65536, 1 << 20};
  int nsizes = 3;
  if (argc > 3) {
    nsizes = 0;
    for (int i = 3; i < argc && nsizes < 8; i++) sizes[nsizes++] = (size_t)atoi(argv[i]) * 1024;
  }
  if (rounds < 10) rounds = 10;
  if (getenv("PERSIST_COST_PREP")) g_prep = getenv("PERSIST_COST_PREP");
  // PERSIST_COST_PREP=WORDS changes how each file's page cache is set up: "fill4k" zero-fills
// with 4 KiB pwrites (default 1 MiB), "drop" drops the file's cached pages after the fill
// (fadvise DONTNEED), "random" madvise(MADV_RANDOM)s the mapping, "warm" re-reads the file with
// POSIX_FADV_RANDOM set (no readahead, so order-0 folios), "populate" pre-faults it
// for writing (MADV_POPULATE_WRITE), e.g. PERSIST_COST_PREP=drop,random,populate.
// PERSIST_COST_ONLY=N runs method N alone (0 msync, 1 pwrite, 2 fdatasync, 3 sfr, 4 rwfdsync): for tracing.
  int only = getenv("PERSIST_COST_ONLY") ? atoi(getenv("PERSIST_COST_ONLY")) : -1;
  struct Target tg[M_COUNT];
  for (int m = 0; m < M_COUNT; m++) Setup(&tg[m], dir, m);
  uint64_t* st = malloc(sizeof(uint64_t) * (size_t)rounds * M_COUNT);
  uint64_t* sy = malloc(sizeof(uint64_t) * (size_t)rounds * M_COUNT);
  printf("dir %s, %d rounds per method and size, methods alternating, prep '%s'\n", dir, rounds, g_prep);
  printf("%-8s %-20s %10s %10s %10s %10s %10s\n", "KiB", "method", "store p50", "store p99", "sync p50", "sync p99", "total p50");
  for (int s = 0; s < nsizes; s++) {
    size_t len = sizes[s];
    uint64_t* tot = malloc(sizeof(uint64_t) * (size_t)rounds);
    for (int r = 0; r < rounds; r++)
      for (int k = 0; k < M_COUNT; k++) {
        int m = (r + k) % M_COUNT;  // rotate the order too
        if (only >= 0 && m != only) continue;
        Round(&tg[m], m, len, (uint32_t)(r * 7919 + m + 1), &st[m * rounds + r], &sy[m * rounds + r]);
      }
    for (int m = 0; m < M_COUNT; m++) {
      if (only >= 0 && m != only) continue;
      for (int r = 0; r < rounds; r++) tot[r] = st[m * rounds + r] + sy[m * rounds + r];
      double tp50 = Pct(tot, rounds, 0.5);
      double s50 = Pct(&st[m * rounds], rounds, 0.5), s99 = Pct(&st[m * rounds], rounds, 0.99);
      double y50 = Pct(&sy[m * rounds], rounds, 0.5), y99 = Pct(&sy[m * rounds], rounds, 0.99);
      printf("%-8zu %-20s %8.1fus %8.1fus %8.1fus %8.1fus %8.1fus\n", len / 1024, kNames[m], s50, s99, y50, y99, tp50);
    }
    free(tot);
  }
  for (int m = 0; m < M_COUNT; m++) unlink(tg[m].path);
  return 0;
}
