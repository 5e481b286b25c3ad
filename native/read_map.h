// An engine volume's block map as the NBD threads may use it to answer plain READs
// without TypeScript: lbn -> (pba, crc32c) for blocks of the live tree that the NVRAM log
// does not hold, on a volume whose tree sits on one member file (pba * 4096 is the file
// offset). A direct-mapped table: a slot per (lbn mod slots), the newest put wins; a miss
// is only a trip to TypeScript. src/volume/engine-read-map.ts keeps it in step.
//
// Invariants:
// - An entry is put only for a block the log does not hold, from an address block of the
//   live root read while nothing was appended and no CP committed (engine-read-map.ts);
//   every append drops its blocks (Drop) before the request that made it is answered.
//   So an entry never maps a block to older data than an answered WRITE left there.
//   Appends also come from the NBD threads (nv_append.h), at any moment: every Drop and
//   Clear counts in a generation and is remembered in a ring of the last kDropRing, and a
//   fill puts a leaf's slots only for lbns no drop since its read began (expectGen) named,
//   under the mutex (SkipDroppedLocked; a fill older than the ring, or across a Clear,
//   puts nothing). So a drop never comes before a put it should have removed.
// - A read (Read) copies its entries under the mutex, reads and checks the blocks
//   without it (threads read in parallel; Drop never waits for I/O), then takes the mutex
//   again and answers only if every entry is still the one it read. A data block is freed
//   (and later reused) only by a CP after its lbn was rewritten or trimmed, i.e. after the
//   append that dropped it: a read that could have seen a reused block finds its entry
//   gone (or put again with that block's new crc32c, which its bytes must then match).
// - Every block read is checked against the entry's crc32c; a mismatch, a short read or an
//   error is a miss: TypeScript reads it with the tree's own code, which repairs, refuses
//   or reports it (nothing is decided here). A connection's thread reads the page cache
//   only (RWF_NOWAIT); a block outside it makes the read kWouldBlock, and the same read is
//   done again from scratch by a thread that may wait for the disk (nbd_serve.cc's read
//   pool), with the same checks.
// - Close: no read starts after it; the member fd is closed by the last read still
//   running (or at once), never while a pread may use it.
// - Memory: slots * 16 bytes, fixed at creation (calloc'd: untouched slots cost nothing),
//   plus one entry copy per block of the largest READ per connection thread.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "common.h"

namespace nvm {

class ReadMap {
 public:
  static constexpr uint64_t kBlock = 4096;
  static constexpr uint32_t kMaxSlotsLog2 = 24;

  ReadMap(int fd, uint64_t sizeBytes, uint64_t deviceBlocks, uint32_t slotsLog2)
      : fd_(fd), sizeBytes_(sizeBytes), deviceBlocks_(deviceBlocks), log2_(slotsLog2),
        mask_((uint64_t{1} << slotsLog2) - 1),
        slots_(static_cast<Slot*>(calloc(size_t{1} << slotsLog2, sizeof(Slot)))) {}
  ~ReadMap() {
    free(slots_);
    if (fd_ >= 0) ::close(fd_);
  }
  ReadMap(const ReadMap&) = delete;
  ReadMap& operator=(const ReadMap&) = delete;

  bool Ok() const { return slots_ != nullptr; }
  uint64_t SizeBytes() const { return sizeBytes_; }

  // Puts lbn -> pba (0: a hole, reads as zeroes) with its crc32c. pba must be a data
  // block of the device (the caller decoded it from a verified address block).
  void PutLocked(uint64_t lbn, uint64_t pba, uint32_t crc) {
    Slot& s = slots_[lbn & mask_];
    s.tag = static_cast<uint32_t>(lbn >> log2_) + 1;
    s.crc = crc;
    s.pba = pba;
  }

  void Drop(uint64_t lbn, uint64_t count) {
    std::lock_guard<std::mutex> l(mu);
    gen_++;
    ring_[gen_ % kDropRing] = Dropped{lbn, count};
    if (closed_) return;
    if (count > mask_) {
      for (uint64_t i = 0; i <= mask_; i++) {
        Slot& s = slots_[i];
        if (s.tag == 0) continue;
        uint64_t at = ((uint64_t{s.tag} - 1) << log2_) | i;
        if (at >= lbn && at - lbn < count) s.tag = 0;
      }
      return;
    }
    for (uint64_t k = 0; k < count; k++) {
      Slot& s = slots_[(lbn + k) & mask_];
      if (s.tag == static_cast<uint32_t>((lbn + k) >> log2_) + 1) s.tag = 0;
    }
  }

  void Clear() {
    std::lock_guard<std::mutex> l(mu);
    gen_++;
    ring_[gen_ % kDropRing] = Dropped{0, UINT64_MAX};
    if (!closed_) memset(slots_, 0, (mask_ + 1) * sizeof(Slot));
  }

  void Close() {
    std::lock_guard<std::mutex> l(mu);
    closed_ = true;
    CloseFdLocked();
  }

  // What Read did: kHit (dst holds the blocks), kMiss (TypeScript must read them: not
  // mapped, a crc32c mismatch, an entry that changed, an error, closed) or kWouldBlock
  // (mapped, but a block is not in the page cache and the caller may not block: the same
  // Read with mayBlock may serve it from a thread that can wait for the disk).
  enum class ReadResult { kHit, kMiss, kWouldBlock };

  // Reads [off, off+len) into dst if it is whole blocks, every block is mapped, every data
  // block comes from the page cache (or, with mayBlock, from the disk) and matches its
  // crc32c (dst is scratch unless kHit).
  ReadResult Read(uint64_t off, uint8_t* dst, size_t len, bool mayBlock) {
    if (off % kBlock != 0 || len % kBlock != 0 || len == 0 || off > sizeBytes_ || len > sizeBytes_ - off) return ReadResult::kMiss;
    const uint64_t first = off / kBlock, n = len / kBlock;
    std::vector<Slot>& snap = Snap();
    snap.resize(n);
    int fd;
    {
      std::lock_guard<std::mutex> l(mu);
      if (closed_) return ReadResult::kMiss;
      for (uint64_t k = 0; k < n; k++) {
        const Slot& s = slots_[(first + k) & mask_];
        if (s.tag != static_cast<uint32_t>((first + k) >> log2_) + 1) {
          misses_++;
          return ReadResult::kMiss;
        }
        snap[k] = s;
      }
      readers_++;
      fd = fd_;
    }
    bool ok = true, uncached = false;
    uint64_t k = 0;
    while (ok && k < n) {
      const Slot& s = snap[k];
      uint8_t* at = dst + k * kBlock;
      if (s.pba == 0) {
        memset(at, 0, kBlock);
        k++;
        continue;
      }
      uint64_t run = 1;
      while (k + run < n && snap[k + run].pba == s.pba + run) run++;
      if (mayBlock) {
        ok = PreadAll(fd, at, run * kBlock, s.pba * kBlock);
      } else {
        ok = PreadCached(fd, at, run * kBlock, s.pba * kBlock);
        uncached = !ok;
      }
      for (uint64_t j = 0; ok && j < run; j++) ok = Crc32cOf(at + j * kBlock, kBlock) == snap[k + j].crc;
      k += run;
    }
    std::lock_guard<std::mutex> l(mu);
    readers_--;
    if (closed_) CloseFdLocked();
    // An uncached block is worth a blocking read only if nothing else failed: every block
    // before it matched, and the entries are still the ones read.
    const bool same = !closed_ && EntriesUnchangedLocked(first, n);
    if (ok && same) {
      hits_++;
      return ReadResult::kHit;
    }
    if (uncached && same) {
      waits_++;
      return ReadResult::kWouldBlock;
    }
    misses_++;
    return ReadResult::kMiss;
  }

  void Stats(uint64_t* hits, uint64_t* misses, uint64_t* waits) {
    std::lock_guard<std::mutex> l(mu);
    *hits = hits_;
    *misses = misses_;
    *waits = waits_;
  }

  std::mutex mu;  // PutLocked's callers hold it

  bool ClosedLocked() const { return closed_; }
  // Drops and clears so far (a read takes it when it begins, its fill passes it back).
  uint64_t GenLocked() const { return gen_; }

  // Marks in skip[0..n) the lbns base.. that a drop since generation `since` named. False:
  // the fill must put nothing (older than the ring remembers, a Clear, or from the future).
  bool SkipDroppedLocked(uint64_t since, uint64_t base, uint8_t* skip, uint64_t n) const {
    if (since > gen_ || gen_ - since >= kDropRing) return false;
    for (uint64_t g = since + 1; g <= gen_; g++) {
      const Dropped& d = ring_[g % kDropRing];
      if (d.count == UINT64_MAX) return false;
      if (d.lbn >= base + n || d.lbn + d.count <= base) continue;
      const uint64_t from = std::max(d.lbn, base) - base, to = std::min(d.lbn + d.count, base + n) - base;
      for (uint64_t i = from; i < to; i++) skip[i] = 1;
    }
    return true;
  }
  uint64_t DeviceBlocks() const { return deviceBlocks_; }

 private:
  struct Slot {
    uint32_t tag;  // (lbn >> log2_) + 1; 0: empty
    uint32_t crc;
    uint64_t pba;  // 0: a hole
  };

  // The n entries from lbn `first` are the ones this thread's Read copied (snap).
  bool EntriesUnchangedLocked(uint64_t first, uint64_t n) const {
    const std::vector<Slot>& snap = Snap();
    for (uint64_t j = 0; j < n; j++) {
      const Slot& s = slots_[(first + j) & mask_];
      if (s.tag != snap[j].tag || s.pba != snap[j].pba || s.crc != snap[j].crc) return false;
    }
    return true;
  }

  static std::vector<Slot>& Snap() {
    thread_local std::vector<Slot> snap;
    return snap;
  }

  void CloseFdLocked() {
    if (readers_ == 0 && fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }

  int fd_;  // under mu; -1 once closed
  const uint64_t sizeBytes_;
  const uint64_t deviceBlocks_;
  const uint32_t log2_;
  const uint64_t mask_;
  Slot* const slots_;
  bool closed_ = false;  // under mu
  uint32_t readers_ = 0;  // Reads between their two lock sections, under mu
  uint64_t hits_ = 0, misses_ = 0, waits_ = 0;  // under mu (waits: kWouldBlock answers, sent to the pool)
  uint64_t gen_ = 0;  // Drop and Clear calls, under mu
  static constexpr uint64_t kDropRing = 4096;
  struct Dropped {
    uint64_t lbn, count;  // count UINT64_MAX: a Clear
  };
  std::vector<Dropped> ring_ = std::vector<Dropped>(kDropRing, Dropped{0, 0});  // under mu: drop gen_ at [gen_ % kDropRing]
};

using ReadMapPtr = std::shared_ptr<ReadMap>;

}  // namespace nvm
