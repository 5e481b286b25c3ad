// The NVRAM log's append, as the NBD threads may use it for an engine volume's plain
// WRITEs: the record (the format of src/nvlog/format.ts) is written into the active half
// of the region under one mutex, and the thread answers the WRITE itself, as the log
// would answer a plain (non-FUA) write once its record is in the region. The log
// (src/nvlog/log.ts, through src/nvlog/native-append.ts) owns everything else: it leases
// the rest of the active half to this appender (Resume), takes the records written here
// back (Drain/Pause: seq, region offset, volume offset and length of each) and indexes
// them before it answers anything that could depend on them.
//
// Invariants:
// - Records are appended only while resumed: between Resume and the next Pause/Close, at
//   writeEnd_ of [writeEnd_, halfEnd_) with seq nextSeq_, back to back, each completely
//   written (payload, header, crc, magic last) before the mutex is released. So the
//   region holds no gap for a crash to tear: a record after this one is written only
//   after it is whole, by this appender or (after Pause) by the log. Stored through the
//   mapping, or (within kFileStoreWindowNs of a FLUSH round) with two pwritevs to the same
//   file, the record with a zero magic and then the magic: the same page cache, the same
//   order.
// - A record's checksum is derived (Crc32cExtendBlock) from the crc32c of each of its 4 KiB
//   blocks, computed once from the client's buffer before the mutex; a drain hands those
//   block checksums to the log with the records (its CP uses them for the tree's pointers
//   instead of reading the blocks again), and a sync mirror's frame carries them.
// - Pause returns every record not yet drained and stops appends until the next Resume,
//   which hands back the log's writeEnd and nextSeq (the log appends itself in between).
// - A record's durableSeq is the newest durable seq the log told (Resume, SetDurable as
//   each persist round completes): a lower bound, as the format asks (it proves records
//   <= it were durable); kept current so replay tells mid-log damage from a torn tail.
// - The blocks of every record are dropped from the read map (if any) before Append
//   returns, so before the WRITE is answered (as the log's own appends do).
// - Bounded: at most kPendingMax records wait for a drain (then Append refuses and the
//   WRITE goes to TypeScript, which drains). A payload is whole 4 KiB blocks at a
//   block-aligned offset inside the volume, at most payloadMax_ bytes; anything else is
//   refused (TypeScript writes it). Close: no append starts after it, none is running.
// - Held replies (a sync mirror, which must hold each record before its WRITE is
//   answered): while the gate is on, Append says the record is held, and the connection
//   thread keeps the WRITE's reply (HeldSink) until TypeScript releases its seq (the
//   replica acknowledged every record up to it) or fails it (strict policy, link lost:
//   EIO). Released and failed are high-water marks that only move forward, set under
//   the mutex before any sink is told, so a thread that holds a reply after a Release it
//   did not see still finds its seq released when it checks (Released/Failed) after
//   holding it. Gate off releases every record appended so far. Close fails what is held
//   (the volume is going away; the replica's state of those writes is unknown). Nothing
//   here can answer a WRITE before its record is whole in the region.
// - Forwarding (SetForwarder: a sync mirror's native link): every record with seq >=
//   fwdFrom_ is queued on the link under mu_, after it is whole in the region and before
//   the next record is appended, so the link sends records in seq order; an append whose
//   frame does not fit the link's queue is refused (TypeScript takes the WRITE). The frame
//   and its block checksums are made before mu_ is taken (from the client's buffer).
// - FLUSH (SetFlushFile, Flush): only while TypeScript has set a file (the log is running;
//   with a replica that must hold the records too, a sync mirror, only while its native
//   link forwards here: the round then also asks the link for the destination's durable
//   ack, RecordForwarder::RequestDurable/WaitDurable, and answers only with both; without
//   the link, or if the link cannot tell within kReplicaDurableWaitMs, the FLUSH goes to
//   TypeScript, which waits for that ack itself). The thread makes the whole region durable with
//   fdatasync on a descriptor of its own to the NVRAM file: every record in the region
//   when it starts, so every WRITE answered before the FLUSH was read, whoever appended it
//   (the log appends into the same mapping). Its own open file, not the mapping's: the
//   kernel reports a writeback error once per open file, so the log's next msync sees an
//   error this one saw. A failed fdatasync is sticky: no later FLUSH is answered here, the
//   caller answers EIO and tells TypeScript, which fails the log (as its own msync would).
//   The descriptor is closed only when no Flush is using it (a retired one waits for the
//   last user), so fdatasync never runs on a reused descriptor number. The threads queue
//   their FLUSHes (SubmitFlush, at most kFlushQueueMax) for one flusher thread, which
//   answers all those queued before a round with that round (group commit: a round starts
//   after each of them was read, so it covers every WRITE answered before any of them);
//   Close makes it hand back what waits (TypeScript answers those) and end.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <thread>
#include <cstdint>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "read_map.h"
#include "raw_bytes.h"

namespace nvm {

// A sync mirror's link (native/mirror_rx.cc in source mode), which sends each record the
// threads append as they append it, without a trip through the event loop. Forward runs
// under the appender's mutex, so records are queued in seq order; Kick (which wakes the
// link's sender) runs after the mutex is released.
class RecordForwarder {
 public:
  virtual ~RecordForwarder() = default;
  // Payload bytes a forwarded record may carry (larger appends are refused while forwarding).
  static constexpr uint64_t kPayloadMax = 1024 * 1024;
  // Bytes of a record frame before its payload: the wire header and the record head.
  static constexpr uint64_t kFrameHead = 24 + 40;
  // Whether a record frame of this payload fits the link's queue now (else the append is
  // refused: TypeScript writes it and forwards it itself).
  virtual bool Room(uint64_t payloadBytes) = 0;
  // Queues record seq: a plain write of len bytes at volume offset off. frame holds
  // kFrameHead + len bytes, the payload already at kFrameHead; blockCrcs: crc32c of each of
  // its 4 KiB blocks.
  virtual void Forward(uint64_t seq, uint64_t off, uint64_t len, RawBytes&& frame, const uint32_t* blockCrcs) = 0;
  // Has the link send what is queued (called after the appender's mutex is released).
  virtual void Kick() = 0;
  // A FLUSH on the NBD threads (the appender's flush round): asks the destination to make
  // durable every record <= max(seq, the newest held mark it acknowledged), with a
  // DURABLE_REQ queued behind every record queued on the link so far. Returns that target
  // (what WaitDurable waits for), or 0 if the link is closing or failed (TypeScript answers
  // the FLUSH). Not under the appender's mutex.
  virtual uint64_t RequestDurable(uint64_t seq) = 0;
  // Waits until the destination acknowledged records <= target durable (true), or the link
  // ends or fails, or timeoutMs passes (false: TypeScript answers the FLUSH).
  virtual bool WaitDurable(uint64_t target, int timeoutMs) = 0;
};

// A connection thread's held WRITE replies: Settle answers those with seq <= released
// (success) or, failing that, seq <= failed (EIO). Called on the JS thread, without the
// appender's mutex held.
class HeldSink {
 public:
  virtual ~HeldSink() = default;
  virtual void Settle(uint64_t released, uint64_t failed) = 0;
};

// What Append did: seq 0 = refused; held = the reply waits for Release/Fail of seq.
struct AppendResult {
  uint64_t seq;
  bool held;
};

class NvAppender : public std::enable_shared_from_this<NvAppender> {
 public:
  static constexpr uint64_t kBlock = 4096;
  static constexpr uint64_t kRecordHeaderBytes = 64;  // format.ts RECORD_HEADER_BYTES
  static constexpr uint64_t kRecordAlign = 64;        // RECORD_ALIGN_BYTES
  static constexpr uint32_t kRecordMagic = 0x4e565231;  // RECORD_MAGIC "NVR1"
  static constexpr uint16_t kTypeWrite = 1;           // RecordType.Write
  static constexpr size_t kPendingMax = 65536;        // records between drains
  static constexpr int kFields = 4;                   // per drained record: seq, at, offsetBytes, lengthBytes
  static constexpr size_t kFlushQueueMax = 4096;      // FLUSHes waiting for the flusher (then TypeScript's)

  NvAppender(uint8_t* base, uint64_t regionBytes, uint32_t epoch, uint32_t salt, uint64_t payloadMax,
             uint64_t volumeBytes, ReadMapPtr map)
      : base_(base), regionBytes_(regionBytes), epoch_(epoch), salt_(salt), payloadMax_(payloadMax),
        volumeBytes_(volumeBytes), map_(std::move(map)) {}

  ~NvAppender() {
    if (flushFd_ >= 0) ::close(flushFd_);
    for (int r : retiredFds_) ::close(r);  // no Flush can be running: it holds a reference
  }

  static uint64_t RecordBytes(uint64_t payload) {
    return (kRecordHeaderBytes + payload + kRecordAlign - 1) / kRecordAlign * kRecordAlign;
  }

  // Leases [writeEnd, halfEnd) of the active half from seq nextSeq on. False (and still
  // paused) if the range is not inside the region or misaligned.
  bool Resume(uint64_t writeEnd, uint64_t halfEnd, uint64_t nextSeq, uint64_t durableSeq) {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_ || writeEnd % kRecordAlign != 0 || writeEnd > halfEnd || halfEnd > regionBytes_ ||
        durableSeq >= nextSeq || !pending_.empty()) {
      return false;
    }
    writeEnd_ = writeEnd;
    halfEnd_ = halfEnd;
    // A FLUSH answered here may have made more durable than the log knows: keep the higher.
    durable_ = durable_ < nextSeq && durable_ > durableSeq ? durable_ : durableSeq;
    nextSeq_ = nextSeq;
    resumed_ = true;
    return true;
  }

  // The records appended since the last drain (kFields numbers each) and, in the same
  // order, the crc32c of each of their 4 KiB blocks; pause: and no more.
  std::vector<double> Drain(bool pause, std::vector<uint32_t>* blockCrcs) {
    std::lock_guard<std::mutex> l(mu_);
    if (pause) resumed_ = false;
    std::vector<double> out;
    out.swap(pending_);
    blockCrcs->clear();
    blockCrcs->swap(pendingCrcs_);
    return out;
  }

  // Records <= seq are durable (a persist round completed); ignored unless it moves forward.
  void SetDurable(uint64_t seq) {
    std::lock_guard<std::mutex> l(mu_);
    if (seq > durable_ && seq < nextSeq_) durable_ = seq;
  }

  void Close() {
    {
      std::lock_guard<std::mutex> l(mu_);
      closed_ = true;
      resumed_ = false;
      gate_ = false;
      fwd_ = nullptr;
      fwdOn_.store(false);
      if (nextSeq_ > 0) Raise(&failed_, nextSeq_ - 1);
      RetireFlushFdLocked();
    }
    flushCv_.notify_all();  // the flusher hands back what waits (TypeScript answers it) and ends
    Notify();
  }

  // FLUSH here from now on, through a descriptor of its own to the NVRAM file at path (null:
  // no more; TypeScript answers them). False: refused (closed, an earlier fdatasync failed)
  // or the open failed (errno set).
  bool SetFlushFile(const char* path) {
    int fd = -1;
    if (path != nullptr) {
      do fd = ::open(path, O_RDWR | O_CLOEXEC);
      while (fd < 0 && errno == EINTR);
      if (fd < 0) return false;
    }
    std::lock_guard<std::mutex> l(mu_);
    RetireFlushFdLocked();
    if (fd >= 0 && (closed_ || flushFailed_)) {
      ::close(fd);
      return false;
    }
    flushFd_ = fd;
    return true;
  }

  // One FLUSH, made here and now (tests; the threads use SubmitFlush): 1 = every record in
  // the region is durable; 0 = not served here (TypeScript answers it); -errno = fdatasync
  // failed (answer EIO, tell TypeScript).
  int Flush() {
    std::unique_lock<std::mutex> l(mu_);
    int rc = RoundLocked(l);
    if (rc > 0) flushes_++;
    return rc;
  }

  // One FLUSH made here and now if no other is being made or waits (a client at queue depth
  // 1 pays no hand-off): as Flush, or 2 = busy (SubmitFlush it, to share the next round).
  int FlushIfIdle() {
    std::unique_lock<std::mutex> l(mu_);
    // Under a replica the round waits for a round trip: not on the connection's thread,
    // whose held WRITE replies would wait behind it.
    if (flushUsers_ > 0 || !flushQ_.empty() || gate_) return 2;
    int rc = RoundLocked(l);
    if (rc > 0) flushes_++;
    return rc;
  }

  // Queues a connection thread's FLUSH for the flusher thread (group commit: one fdatasync
  // answers every FLUSH queued before it started). done(rc) runs on the flusher thread, rc
  // as Flush's (0: the appender closed or flushing stopped first: TypeScript answers it).
  // False: not served here at all (done never runs).
  bool SubmitFlush(std::function<void(int)>&& done) {
    std::lock_guard<std::mutex> l(mu_);
    if (!RoundPossibleLocked() || flushQ_.size() >= kFlushQueueMax) return false;
    flushQ_.push_back(std::move(done));
    if (!flusherRunning_) {
      flusherRunning_ = true;
      std::thread([self = shared_from_this()] { self->FlushLoop(); }).detach();
    } else {
      flushCv_.notify_one();
    }
    return true;
  }

  // Whether a flush round can be made here now (SubmitFlush would take it): a FUA WRITE is
  // appended here only then, and answered by that round.
  bool ServesFlush() {
    std::lock_guard<std::mutex> l(mu_);
    return RoundPossibleLocked();
  }

  // FLUSHes made durable here.
  uint64_t Flushes() {
    std::lock_guard<std::mutex> l(mu_);
    return flushes_;
  }

  // A connection that may hold replies (weakly referenced: it may end first).
  void AddSink(const std::weak_ptr<HeldSink>& s) {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<std::weak_ptr<HeldSink>> kept;
    for (auto& w : sinks_) {
      if (!w.expired()) kept.push_back(w);
    }
    kept.push_back(s);
    sinks_.swap(kept);
  }

  // Gate on: replies of later appends are held until released. Off: they are not, and every
  // record appended so far is released.
  void SetGate(bool on) {
    {
      std::lock_guard<std::mutex> l(mu_);
      gate_ = on && !closed_;
      if (!on && nextSeq_ > 0) Raise(&released_, nextSeq_ - 1);
    }
    Notify();
  }

  // The replica holds every record <= seq: their held replies go out.
  void Release(uint64_t seq) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (seq <= released_.load()) return;
      Raise(&released_, seq);
    }
    Notify();
  }

  // Forwards every record appended from seq fromSeq on to f (null: no more).
  void SetForwarder(std::shared_ptr<RecordForwarder> f, uint64_t fromSeq) {
    std::lock_guard<std::mutex> l(mu_);
    fwd_ = closed_ ? nullptr : std::move(f);
    fwdFrom_ = fromSeq;
    fwdOn_.store(fwd_ != nullptr);
  }

  // Stops forwarding to f (if it is the forwarder).
  void ClearForwarder(const RecordForwarder* f) {
    std::lock_guard<std::mutex> l(mu_);
    if (fwd_.get() != f) return;
    fwd_ = nullptr;
    fwdOn_.store(false);
  }

  // Every record appended so far that is not released gets EIO (strict policy, replica lost).
  void FailHeld() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (nextSeq_ > 0) Raise(&failed_, nextSeq_ - 1);
    }
    Notify();
  }

  uint64_t Released() const { return released_.load(); }
  uint64_t Failed() const { return failed_.load(); }

  // Appends one write record of [data, data+len) for volume offset off. seq 0: refused
  // (paused, full, not whole blocks, too large): the caller leaves the WRITE to TypeScript.
  AppendResult Append(uint64_t off, const uint8_t* data, uint64_t len) {
    if (len == 0 || len % kBlock != 0 || off % kBlock != 0 || len > payloadMax_ || off > volumeBytes_ ||
        len > volumeBytes_ - off) {
      return AppendResult{0, false};
    }
    const uint64_t size = RecordBytes(len);
    const uint64_t blocks = len / kBlock;
    // Each block's crc32c, made outside the mutex from the client's buffer (which this
    // thread owns for the call): the record's checksum is derived from them under the
    // mutex, and the log's CP and a sync mirror's frame use them as they are. At most
    // payloadMax_ / 1024 bytes per thread.
    thread_local std::vector<uint32_t> crcs;
    crcs.resize(blocks);
    for (uint64_t i = 0; i < blocks; i++) crcs[i] = Crc32cOf(data + i * kBlock, kBlock);
    // A sync mirror's frame, made outside the mutex (the copy is most of it).
    RawBytes frame;
    bool framed = false;
    if (fwdOn_.load(std::memory_order_relaxed)) {
      if (len > RecordForwarder::kPayloadMax) return AppendResult{0, false};
      MakeFrame(data, len, &frame);
      framed = true;
    }
    std::unique_lock<std::mutex> l(mu_);
    if (!resumed_ || closed_ || pending_.size() >= kPendingMax * kFields || size > halfEnd_ - writeEnd_) {
      return AppendResult{0, false};
    }
    const uint64_t at = writeEnd_;
    const uint64_t seq = nextSeq_;
    std::shared_ptr<RecordForwarder> fwd = fwd_ && seq >= fwdFrom_ ? fwd_ : nullptr;
    if (fwd) {
      if (len > RecordForwarder::kPayloadMax || !fwd->Room(len)) return AppendResult{0, false};
      if (!framed) MakeFrame(data, len, &frame);  // forwarding began since the check above
    }
    // While FLUSHes come often (a round began within kFileStoreWindowNs), the record goes
    // to the file with pwritev (its header from the stack, its payload from the client's
    // buffer): pages dirtied through the mapping cost ~3x as much to make durable
    // (writeback write-protects them, and the next store faults again; 4 KiB + fdatasync
    // ~0.1 ms by pwrite against ~0.3 ms through the mapping, scripts/bench/persist-cost.c).
    // Without FLUSHes the mapping is faster (no syscall; its halves are pre-faulted). The
    // mapping sees the same page cache, so readers of the region find the record once this
    // returns.
    const bool viaFile = flushFd_ >= 0 && lastRoundNs_ > 0 && MonoNs() - lastRoundNs_ < kFileStoreWindowNs;
    const uint64_t pad = size - kRecordHeaderBytes - len;  // < kRecordAlign
    uint8_t hdrBuf[kRecordHeaderBytes];
    uint8_t* r = viaFile ? hdrBuf : base_ + at;
    Put32(r, 0);  // no stale magic while the record is written
    if (!viaFile) {
      memcpy(r + kRecordHeaderBytes, data, len);
      if (pad > 0) memset(r + kRecordHeaderBytes + len, 0, pad);
    }
    Put32(r + 8, epoch_);
    Put16(r + 12, kTypeWrite);
    Put16(r + 14, 0);
    Put64(r + 16, seq);
    Put64(r + 24, off);
    Put64(r + 32, len);
    Put64(r + 40, seq);  // transferId
    Put32(r + 48, static_cast<uint32_t>(len));
    Put32(r + 52, 0);
    Put64(r + 56, durable_);
    // The record's checksum (header from byte 8, payload, pad) from its blocks' checksums:
    // the payload is not read again under the mutex.
    static const uint8_t kZeros[kRecordAlign] = {};
    uint32_t c = Crc32cSeeded(salt_, r + 8, kRecordHeaderBytes - 8);
    for (uint64_t i = 0; i < blocks; i++) c = Crc32cExtendBlock(c, crcs[i]);
    if (pad > 0) c = Crc32cSeeded(c, kZeros, pad);
    Put32(r + 4, c);
    if (viaFile) {
      // The record with a zero magic (over any stale one), then the magic: magic last, as
      // in the mapping.
      iovec iov[3] = {{r, kRecordHeaderBytes}, {const_cast<uint8_t*>(data), len}, {const_cast<uint8_t*>(kZeros), pad}};
      if (!PwritevAll(flushFd_, iov, pad > 0 ? 3 : 2, at)) return AppendResult{0, false};
      Put32(r, kRecordMagic);
      iovec magic = {r, 4};
      if (!PwritevAll(flushFd_, &magic, 1, at)) return AppendResult{0, false};
      fileStores_++;
    } else {
      Put32(r, kRecordMagic);
    }
    writeEnd_ = at + size;
    nextSeq_ = seq + 1;
    appends_++;
    pending_.push_back(static_cast<double>(seq));
    pending_.push_back(static_cast<double>(at));
    pending_.push_back(static_cast<double>(off));
    pending_.push_back(static_cast<double>(len));
    pendingCrcs_.insert(pendingCrcs_.end(), crcs.begin(), crcs.end());
    if (map_) map_->Drop(off / kBlock, len / kBlock);
    const bool held = gate_;
    if (fwd) fwd->Forward(seq, off, len, std::move(frame), crcs.data());
    l.unlock();
    if (fwd) fwd->Kick();
    return AppendResult{seq, held};
  }

  uint64_t Appends() {
    std::lock_guard<std::mutex> l(mu_);
    return appends_;
  }

  // Records stored through the file (pwrite) rather than the mapping.
  uint64_t FileStores() {
    std::lock_guard<std::mutex> l(mu_);
    return fileStores_;
  }

 private:
  // One fdatasync of the flush file, mu_ held on entry and exit (released meanwhile): 1, 0
  // (not served: closed, failed before, no file) or -errno (and flushing stops for good).
  // A flush round can be made: a file to flush, no failed fdatasync, and, when a replica
  // must hold the records too (the gate), its link here to ask for the durable ack.
  bool RoundPossibleLocked() const { return !closed_ && !flushFailed_ && flushFd_ >= 0 && !(gate_ && !fwd_); }

  int RoundLocked(std::unique_lock<std::mutex>& l) {
    if (!RoundPossibleLocked()) return 0;
    std::shared_ptr<RecordForwarder> replica = gate_ ? fwd_ : nullptr;
    lastRoundNs_ = MonoNs();
    int fd = flushFd_;
    flushUsers_++;
    // Every record below nextSeq_ is whole in the region (this appender's, or the log's
    // before it leased the half); later ones may be the log's, being written.
    uint64_t covered = nextSeq_ > 0 ? nextSeq_ - 1 : 0;
    l.unlock();
    // The destination's part first (its request travels while this side syncs). Every
    // WRITE answered before this FLUSH was read is <= covered (appended here) or was
    // acknowledged by the destination before its reply (the link's held mark): the target
    // covers both.
    uint64_t target = replica ? replica->RequestDurable(covered) : 0;
    int rc;
    do rc = ::fdatasync(fd);
    while (rc != 0 && errno == EINTR);
    int err = rc == 0 ? 0 : errno;
    bool replicaOk = !replica || (target > 0 && replica->WaitDurable(target, kReplicaDurableWaitMs));
    l.lock();
    if (--flushUsers_ == 0) {
      for (int r : retiredFds_) ::close(r);
      retiredFds_.clear();
    }
    if (err != 0) {
      flushFailed_ = true;
      RetireFlushFdLocked();
      return -err;
    }
    if (covered > durable_ && covered < nextSeq_) durable_ = covered;
    return replicaOk ? 1 : 0;
  }

  // The flusher thread: takes every queued FLUSH, makes one round for them all, answers them.
  void FlushLoop() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      flushCv_.wait(l, [this] { return !flushQ_.empty() || closed_; });
      if (flushQ_.empty()) {
        flusherRunning_ = false;
        return;
      }
      std::vector<std::function<void(int)>> batch;
      batch.swap(flushQ_);
      int rc = RoundLocked(l);
      if (rc > 0) flushes_ += batch.size();
      l.unlock();
      for (auto& done : batch) done(rc);
      l.lock();
    }
  }

  // The flush descriptor is closed now, or by the last Flush still using it.
  void RetireFlushFdLocked() {
    if (flushFd_ < 0) return;
    if (flushUsers_ == 0) ::close(flushFd_);
    else retiredFds_.push_back(flushFd_);
    flushFd_ = -1;
  }

  static void MakeFrame(const uint8_t* data, uint64_t len, RawBytes* frame) {
    frame->resize(RecordForwarder::kFrameHead + len);
    memcpy(frame->data() + RecordForwarder::kFrameHead, data, len);
  }

  static void Raise(std::atomic<uint64_t>* v, uint64_t to) {
    if (to > v->load()) v->store(to);
  }

  // Tells every live sink the current marks (outside the mutex: a sink takes its own).
  void Notify() {
    std::vector<std::shared_ptr<HeldSink>> live;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto& w : sinks_) {
        if (auto s = w.lock()) live.push_back(std::move(s));
      }
    }
    for (auto& s : live) s->Settle(released_.load(), failed_.load());
  }

  static void Put16(uint8_t* p, uint16_t v) { memcpy(p, &v, 2); }  // little-endian hosts (x86-64, arm64)
  static void Put32(uint8_t* p, uint32_t v) { memcpy(p, &v, 4); }
  static void Put64(uint8_t* p, uint64_t v) { memcpy(p, &v, 8); }

  uint8_t* const base_;
  const uint64_t regionBytes_;
  const uint32_t epoch_, salt_;
  const uint64_t payloadMax_, volumeBytes_;
  const ReadMapPtr map_;
  std::mutex mu_;
  bool resumed_ = false, closed_ = false, gate_ = false;
  std::atomic<uint64_t> released_{0}, failed_{0};  // written under mu_; read anywhere
  std::vector<std::weak_ptr<HeldSink>> sinks_;
  uint64_t writeEnd_ = 0, halfEnd_ = 0, nextSeq_ = 0, durable_ = 0, appends_ = 0;
  std::vector<double> pending_;
  // Per block of the pending records, in order: its crc32c (at most a half's blocks).
  std::vector<uint32_t> pendingCrcs_;
  std::shared_ptr<RecordForwarder> fwd_;  // a sync mirror's link (SetForwarder)
  uint64_t fwdFrom_ = 0;
  std::atomic<bool> fwdOn_{false};  // fwd_ is set (read without mu_ to frame before taking it)
  int flushFd_ = -1;
  // When the newest flush round began (MonoNs, under mu_; 0: none yet). Appends within
  // kFileStoreWindowNs of it store through the file (Append).
  uint64_t lastRoundNs_ = 0;
  uint64_t fileStores_ = 0;  // under mu_
  static constexpr uint64_t kFileStoreWindowNs = 5'000'000;
  // How long a flush round waits for the destination's durable ack before it hands the
  // FLUSH to TypeScript (which waits on, under its stall timeout and the mirror's policy).
  static constexpr int kReplicaDurableWaitMs = 1000;
  bool flushFailed_ = false;
  uint32_t flushUsers_ = 0;
  uint64_t flushes_ = 0;
  std::vector<int> retiredFds_;
  std::vector<std::function<void(int)>> flushQ_;  // FLUSHes for the flusher thread (at most kFlushQueueMax)
  bool flusherRunning_ = false;
  std::condition_variable flushCv_;
};

using NvAppenderPtr = std::shared_ptr<NvAppender>;

// The appender behind an nbdAppenderNew handle (argument i), as native/nbd_serve.cc checks
// it; false (a TypeError thrown) if it is not one.
bool UnwrapAppender(const Napi::CallbackInfo& info, size_t i, const char* fn, NvAppenderPtr* out);

}  // namespace nvm
