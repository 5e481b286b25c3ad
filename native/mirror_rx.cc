// The mirror receiver's socket on a native thread (src/mirror/native-rx.ts): after HELLO
// and WELCOME, a plain connection's frames are read, framed and checksummed here, and each
// RECORD that fits the range of the source's log file granted by TypeScript is stored
// into that file's mapping and acknowledged (RECORD_ACK) from this thread, without a trip
// through the event loop. Every other frame (and a record that does not fit, or whose
// fields are not the plain case) goes to TypeScript in stream order, with the records
// stored before it reported first, so a reference to a record always finds it.
//
// Wire format (src/mirror/wire.ts): a 24-byte header (u32 magic "NVMW", u8 type, u8
// version, u16 zero, u32 body length, u64 frame number, u32 crc32c of bytes 0..20 and the
// body), then the body. Log record format (src/mirror/dest-log.ts): a 64-byte header
// (u32 magic "NVDR", u32 crc32c seeded with the salt over bytes 8..64 and the payload, u64
// seq, u8 type, u8 flags, 2 zero, u32 stream, u64 offset, u64 length, u64 payload bytes,
// 16 zero), then the payload.
//
// Invariants:
// - A frame is taken only if magic, version, type, the type's body cap, the frame number
//   (exactly the next) and its checksum verify; otherwise the thread reports the error
//   (worded as wire.ts's FrameParser words it) and handles nothing after it.
// - A record is written into the log only inside the current grant (at + 64 + payload <=
//   limit, seq == the grant's next seq), under mu_; Close() detaches the log under mu_, so
//   once it returns the mapping and the checksum table are never touched again.
// - A RECORD_ACK from here never says more than TypeScript's held/durable state and the
//   records this thread stored: heldSeq = max(TS heldSeq, last record stored here),
//   durableSeq = max(TS durableSeq, what this thread made durable itself).
// - DURABLE_REQ (receiver, once TypeScript set the log's file: mirrorRxDurableFile) is
//   answered here only while the grant holds, i.e. every record before the request in
//   the stream is in the log file (stored here, or by TypeScript before it granted);
//   one fdatasync of a descriptor of our own to that file per parse pass (group commit:
//   every record stored then, and the log's header, are durable after it), then the ack
//   with durableSeq = the grant's last seq, and an EV_DURABLE event so the log knows.
//   Otherwise (no grant, no file, an fdatasync that failed once) it goes to TypeScript as
//   before. The descriptor is opened once and closed only with the Rx (after its thread
//   ended), so fdatasync never runs on a reused descriptor number.
// - Outgoing frames (this thread's acks, TypeScript's Send) are numbered under mu_ in the
//   order they are queued, and written in that order.
// - Memory: the input buffer (kInBytes), frame bodies waiting for TypeScript to take them
//   (reading stops while they exceed kPendingMax; at most one more parse pass of input),
//   TypeScript's slabs granted for CP_BLOCKS bodies (at most kSlabGrantsMax; a body is
//   copied into one, under mu_, instead of a buffer of ours that TypeScript then copies
//   out; Close() forgets them under mu_, so once it returns none is written again). Once
//   TypeScript granted one, a CP_BLOCKS frame with no slab free waits (reading and parsing
//   stop) until it grants another (it does after each delivery),
//   and the send queue (frames TypeScript asked to send, and at most one ack per parse
//   pass while the peer does not read: reading stops while it holds more than kSendMax).
//
// Source mode (mirrorRxStart's `source`; src/mirror/source.ts, a sync mirror's plain link):
// the same thread carries the source's side of the stream. The NVRAM appender queues
// each record the NBD threads append (RecordForwarder: in seq order, the frame built on
// the appending thread), TypeScript's frames go through Send as above, and a RECORD_ACK
// from the destination releases the threads' held replies here (NvAppender::Release)
// before TypeScript sees it.
// - A release never covers a record not queued on this link: it is min(heldSeq, the
//   highest seq queued here), from a frame whose number and checksum verified.
// - RECORD_ACKs not yet taken by TypeScript are merged (the newest replaces the one
//   queued before it: its marks only move forward), so they hold at most one body.
// - Reading never waits for the send queue (the peer's acks must be read while records
//   wait to go out); the queue is bounded instead: a record that does not fit
//   kForwardQueueMax is refused at the append (TypeScript takes the WRITE), and
//   TypeScript waits for EV_ROOM before it queues beyond its own bound.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "nv_append.h"

namespace nvm {
namespace {

constexpr uint32_t kFrameMagic = 0x574d564e;  // "NVMW"
constexpr uint8_t kWireVersion = 1;
constexpr size_t kHeaderBytes = 24;
constexpr uint8_t kTypeRecord = 4;
constexpr uint8_t kTypeRecordAck = 5;
constexpr uint8_t kTypeDurableReq = 6;
constexpr uint8_t kTypeCpBlocks = 8;
constexpr size_t kSlabGrantsMax = 16;
constexpr size_t kRecordHeadBytes = 40;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kRecordPayloadMax = 1024 * 1024;
constexpr size_t kBodyMax = kRecordPayloadMax + 64;
constexpr size_t kReadChunk = 64 * 1024;
// Room for one whole frame after compaction, plus a read.
constexpr size_t kInBytes = kHeaderBytes + kBodyMax + 2 * kReadChunk;
constexpr size_t kTypes = 32;
constexpr size_t kLogHeaderBytes = 64;
constexpr uint32_t kLogMagic = 0x5244564e;  // "NVDR"
constexpr size_t kPendingMax = 2 * 1024 * 1024;
constexpr size_t kSendMax = 1024 * 1024;
constexpr int kEventWidth = 6;
// The appender builds record frames with these (nv_append.h RecordForwarder).
static_assert(RecordForwarder::kFrameHead == kHeaderBytes + kRecordHeadBytes, "a record frame's head");
static_assert(RecordForwarder::kPayloadMax == kRecordPayloadMax, "a forwarded record's payload cap");
// Source mode: frames queued to send beyond which the appender's records are refused.
constexpr size_t kForwardQueueMax = 48 * 1024 * 1024;
enum Ev { kEvStored = 1, kEvFrame = 2, kEvError = 3, kEvEof = 4, kEvEnded = 5, kEvRoom = 6, kEvDurable = 7, kEvSent = 8 };

inline uint32_t Get32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
inline uint64_t Get64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}
inline void Put32(uint8_t* p, uint32_t v) { memcpy(p, &v, 4); }
inline void Put64(uint8_t* p, uint64_t v) { memcpy(p, &v, 8); }

// Parts of a frame at least this long are borrowed rather than copied (Rx::Send).
constexpr size_t kBorrowMinBytes = 4096;

// A queued frame: its bytes, or (a borrowed frame) segments of which some point into
// `bytes` (the header, small parts) and some into memory the caller lent (see Send).
struct OutFrame {
  RawBytes bytes;
  std::vector<iovec> segs;  // empty: the frame is `bytes`
  size_t total = 0;         // the frame's length
  size_t sent = 0;
  uint64_t token = 0;       // a borrowed frame's token (kEvSent), else 0

  size_t Size() const { return segs.empty() ? bytes.size() : total; }
  uint8_t* Head() { return bytes.data(); }
  // Adds iovecs for the bytes not sent yet, up to max; returns how many it added.
  size_t Remaining(iovec* iov, size_t max) {
    if (segs.empty()) {
      if (max == 0) return 0;
      iov[0] = {bytes.data() + sent, bytes.size() - sent};
      return 1;
    }
    size_t n = 0, at = 0;
    for (const iovec& s : segs) {
      if (n == max) break;
      if (at + s.iov_len > sent) {
        size_t skip = sent > at ? sent - at : 0;
        iov[n++] = {static_cast<uint8_t*>(s.iov_base) + skip, s.iov_len - skip};
      }
      at += s.iov_len;
    }
    return n;
  }
  // Copies the lent segments into `bytes`: the frame no longer needs the lender's memory.
  void Own() {
    if (segs.empty()) return;
    RawBytes all;
    all.resize(total);
    size_t at = 0;
    for (const iovec& s : segs) {
      memcpy(all.data() + at, s.iov_base, s.iov_len);
      at += s.iov_len;
    }
    bytes.swap(all);
    segs.clear();
  }
};

class Rx : public RecordForwarder {
 public:
  Rx(int fd, int wake, uint64_t inFrameNo, uint64_t outFrameNo, const uint32_t* caps, bool source)
      : fd_(fd), wake_(wake), source_(source), expectIn_(inFrameNo), in_(new uint8_t[kInBytes]) {
    memcpy(caps_, caps, sizeof caps_);
    outFrameNo_ = outFrameNo;
  }
  ~Rx() {
    ::close(wake_);
    if (fd_ >= 0) ::close(fd_);
    if (durFd_ >= 0) ::close(durFd_);
  }

  // The log's file, for DURABLE_REQs answered here (see the invariants). Once per Rx:
  // false if it was set already or does not open.
  bool SetDurableFile(const std::string& path) {
    std::lock_guard<std::mutex> l(mu_);
    if (durFd_ >= 0 || source_ || stop_) return false;
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return false;
    durFd_ = fd;
    return true;
  }

  Napi::ThreadSafeFunction tsfn;

  void Feed(const uint8_t* p, size_t n) {
    memcpy(in_.get(), p, n);
    inEnd_ = n;  // counted by the reader it came from
  }

  void Run() {
    // The source's link is woken per record and per ack: as a batch thread it does not
    // preempt the NBD thread that appends them (priority.cc). A receiver's stays as it is.
    if (source_) (void)SetBatchPolicy();
    ParsePass();
    for (;;) {
      bool wantRead, wantWrite, stopping, resume = false, draining = false;
      {
        std::lock_guard<std::mutex> l(mu_);
        stopping = stop_;
        if (stop_) {
          // Closing with a flush: send what is queued (a REFUSE with its reason), then
          // half-close and read and drop what the peer still sends until it closes too (or
          // the linger deadline): closing with its data unread would reset the connection,
          // and a peer busy writing would see the reset, not the reason.
          bool sent = sendq_.empty();
          if (!flushOnStop_ || sendErr_ != 0 || (sent && eof_)) break;
          if (NowMs() >= stopDeadlineMs_) {
            // Said in the EV_ENDED event: the peer's next segment meets a reset.
            lingerNote_ = "the linger of " + std::to_string(lingerMs_) + " ms ran out: " + std::to_string(sendBytes_) + " bytes still queued to send, write side " +
                          (shutWr_ ? "shut down" : "open") + ", the peer's end " + (eof_ ? "seen" : "not seen") + ", " + std::to_string(drained_) +
                          " bytes read and dropped";
            break;
          }
          draining = sent;
        }
        if (parked_ && !waitSlab_ && !stop_) {
          parked_ = false;
          resume = true;
        }
        wantRead = draining || (!stop_ && !failed_ && !eof_ && !paused_ && !parked_ && pending_ <= kPendingMax && (source_ || sendBytes_ <= kSendMax));
        wantWrite = !sendq_.empty() && sendErr_ == 0;
      }
      if (resume) {  // a slab came for the CP_BLOCKS frame the last pass stopped at
        ParsePass();
        continue;
      }
      if (draining && !shutWr_) {
        ::shutdown(fd_, SHUT_WR);
        shutWr_ = true;
      }
      pollfd p[2] = {{fd_, static_cast<short>((wantRead ? POLLIN : 0) | (wantWrite ? POLLOUT : 0)), 0}, {wake_, POLLIN, 0}};
      int r = ::poll(p, 2, stopping ? 50 : -1);
      if (r < 0 && errno != EINTR) break;
      if (p[1].revents & POLLIN) {
        uint64_t v;
        (void)!::read(wake_, &v, sizeof v);
        std::lock_guard<std::mutex> l(mu_);
        wakeSignaled_ = false;
      }
      if (r < 0) continue;
      if (wantWrite && (p[0].revents & (POLLOUT | POLLERR | POLLHUP))) {
        std::lock_guard<std::mutex> l(mu_);
        FlushLocked();
        if (sendErr_ != 0 && !stop_) ErrorLocked(std::string("socket error: ") + strerror(sendErr_), false);
        RoomLocked();
        PostLocked();
      }
      if (draining && (p[0].revents & (POLLIN | POLLERR | POLLHUP))) {
        ssize_t n = ::read(fd_, in_.get(), kInBytes);  // dropped: the stream is over
        std::lock_guard<std::mutex> l(mu_);
        if (n > 0) drained_ += static_cast<uint64_t>(n);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) eof_ = true;
        continue;
      }
      if (wantRead && (p[0].revents & (POLLIN | POLLERR | POLLHUP))) {
        if (inEnd_ == kInBytes || (kInBytes - inEnd_ < kReadChunk && inStart_ > 0)) {
          memmove(in_.get(), in_.get() + inStart_, inEnd_ - inStart_);
          inEnd_ -= inStart_;
          inStart_ = 0;
        }
        ssize_t n = ::read(fd_, in_.get() + inEnd_, kInBytes - inEnd_);
        if (n == 0) {
          std::lock_guard<std::mutex> l(mu_);
          eof_ = true;
          linkDown_ = true;  // no more acks: a FLUSH waiting for one goes to TypeScript
          durCv_.notify_all();
          if (!stop_) Emit({kEvEof});
          PostLocked();
        } else if (n < 0) {
          if (errno != EAGAIN && errno != EINTR) {
            std::lock_guard<std::mutex> l(mu_);
            ErrorLocked(std::string("socket error: ") + strerror(errno), false);
            PostLocked();
          }
        } else {
          inEnd_ += static_cast<size_t>(n);
          {
            std::lock_guard<std::mutex> l(mu_);
            rxBytes_ += static_cast<uint64_t>(n);
          }
          ParsePass();
        }
      }
    }
    std::lock_guard<std::mutex> l(mu_);
    ended_ = true;
    durCv_.notify_all();
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    fd_ = -1;
    double note = 0;  // 1 + the text's index when the linger ran out
    if (!lingerNote_.empty()) {
      texts_.push_back(lingerNote_);
      note = static_cast<double>(texts_.size());
    }
    Emit({kEvEnded, note});
    PostLocked();
  }

  // ---- JS side (event loop thread)

  void Deliver(Napi::Env env, Napi::Function fn) {
    std::vector<double> ev;
    std::vector<std::string> texts;
    bool release = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      posted_ = false;
      ev.swap(events_);
      texts.swap(texts_);
      if (ended_ && !released_) release = released_ = true;
    }
    if (!ev.empty()) {
      Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, ev.size() * sizeof(double));
      memcpy(ab.Data(), ev.data(), ev.size() * sizeof(double));
      Napi::Array t = Napi::Array::New(env, texts.size());
      for (uint32_t i = 0; i < texts.size(); i++) t.Set(i, Napi::String::New(env, texts[i]));
      fn.Call({Napi::Float64Array::New(env, ev.size(), ab, 0), t});
    }
    if (release) tsfn.Release();
  }

  // Copies the oldest body waiting into dst (which must be its length); returns the length.
  int64_t Take(uint8_t* dst, size_t cap) {
    std::lock_guard<std::mutex> l(mu_);
    if (bodies_.empty() || bodies_.front().size() != cap) return -1;
    memcpy(dst, bodies_.front().data(), cap);
    pending_ -= cap;
    bodies_.pop_front();
    if (pending_ <= kPendingMax) WakeLocked();
    return static_cast<int64_t>(cap);
  }

  void AttachLog(uint8_t* ring, size_t ringLen, uint32_t* crcs, size_t crcsLen) {
    std::lock_guard<std::mutex> l(mu_);
    ring_ = ring;
    ringLen_ = ringLen;
    crcs_ = crcs;
    crcsLen_ = crcsLen;
  }

  // Grants [at, limit) of the ring for records from nextSeq on. Refused (false) when the
  // thread has parsed records TypeScript has not seen yet (their seqs differ).
  bool Grant(uint64_t nextSeq, uint64_t at, uint64_t limit, uint32_t salt, uint32_t stream) {
    std::lock_guard<std::mutex> l(mu_);
    if (ring_ == nullptr || (nextRecSeq_ != 0 && nextRecSeq_ != nextSeq) || limit > ringLen_ || at > limit || at < 4096) return false;
    grant_ = true;
    gAt_ = at;
    gLimit_ = limit;
    gSeq_ = nextSeq;
    salt_ = salt;
    stream_ = stream;
    return true;
  }

  void SetAckState(uint64_t held, uint64_t durable, uint64_t storedFrom, bool send) {
    std::lock_guard<std::mutex> l(mu_);
    tsHeld_ = held;
    tsDurable_ = durable;
    tsStoredFrom_ = storedFrom;
    if (send) AckLocked();
  }

  // Frames and queues (or sends at once) a frame of `type` with the body parts.
  //
  // token 0: the parts are copied. Otherwise the frame borrows every part of at least
  // kBorrowMinBytes (smaller ones are copied): the caller keeps that memory alive and
  // unchanged until a kEvSent event carries a token >= this one (tokens increase with
  // every borrowed frame) or Close() returned; Close() copies what is still queued.
  //
  // blockCrcs (n values, may be null): the body ends in n 4 KiB blocks whose crc32c the
  // caller knows (checked when it read them): the frame's checksum is extended by them
  // instead of reading those bytes again.
  int64_t Send(uint8_t type, const std::vector<std::pair<const uint8_t*, size_t>>& parts, uint64_t token, const uint32_t* blockCrcs, size_t nCrcs) {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_ || ended_) return -1;
    size_t len = 0, owned = 0;
    for (auto& p : parts) {
      len += p.second;
      if (token == 0 || p.second < kBorrowMinBytes) owned += p.second;
    }
    OutFrame f;
    f.bytes.resize(kHeaderBytes + owned);
    uint8_t* b = f.bytes.data();
    size_t at = kHeaderBytes;
    if (token != 0) f.segs.push_back({b, kHeaderBytes});
    for (auto& p : parts) {
      if (token == 0 || p.second < kBorrowMinBytes) {
        memcpy(b + at, p.first, p.second);
        if (token != 0) f.segs.push_back({b + at, p.second});
        at += p.second;
      } else {
        f.segs.push_back({const_cast<uint8_t*>(p.first), p.second});
      }
    }
    f.total = kHeaderBytes + len;
    f.token = token;
    if (type == kTypeRecord && len >= 8 && token == 0) fwdTop_ = std::max(fwdTop_, Get64(b + kHeaderBytes));
    WriteHeader(type, &f);
    // The checksum: header, then the body (its trailing blocks by their crcs when given).
    size_t head = len - nCrcs * kBlock;  // the caller checked nCrcs * kBlock <= len
    uint32_t c = Crc32cSeeded(0, b, 20);
    size_t done = 0;
    for (auto& p : parts) {
      if (done >= head) break;
      size_t n = std::min(p.second, head - done);
      c = Crc32cSeededWide(c, p.first, n);
      done += n;
    }
    for (size_t i = 0; i < nCrcs; i++) c = Crc32cExtendBlock(c, blockCrcs[i]);
    Put32(b + 20, c);
    SendNowLocked(type, std::move(f));
    PostLocked();  // a kEvSent from the flush in SendNowLocked
    return static_cast<int64_t>(kHeaderBytes + len);
  }

  // ---- source mode: the appender's records (RecordForwarder), under the appender's mutex

  bool Room(uint64_t payloadBytes) override {
    std::lock_guard<std::mutex> l(mu_);
    return !stop_ && !ended_ && sendErr_ == 0 && sendBytes_ + kFrameHead + payloadBytes <= kForwardQueueMax;
  }

  void Forward(uint64_t seq, uint64_t off, uint64_t len, RawBytes&& frame, const uint32_t* blockCrcs) override {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_ || ended_ || frame.size() != kFrameHead + len || len % kBlock != 0) return;
    uint8_t* b = frame.data();
    const uint32_t bodyLen = static_cast<uint32_t>(kRecordHeadBytes + len);
    Put32(b, kFrameMagic);
    b[4] = kTypeRecord;
    b[5] = kWireVersion;
    b[6] = b[7] = 0;
    Put32(b + 8, bodyLen);
    Put64(b + 12, outFrameNo_++);
    uint8_t* h = b + kHeaderBytes;
    Put64(h, seq);
    h[8] = 1;  // a write
    h[9] = 0;
    memset(h + 10, 0, 6);
    Put64(h + 16, off);
    Put64(h + 24, len);
    Put64(h + 32, len);
    uint32_t c = Crc32cSeeded(Crc32cSeeded(0, b, 20), h, kRecordHeadBytes);
    for (uint64_t i = 0; i < len / kBlock; i++) c = Crc32cExtendBlock(c, blockCrcs[i]);
    Put32(b + 20, c);
    fwdTop_ = std::max(fwdTop_, seq);
    forwarded_++;
    OutFrame f;
    f.bytes = std::move(frame);
    EnqueueLocked(kTypeRecord, std::move(f));
  }

  // The thread sends (it wakes once for what the appending threads queued meanwhile, and
  // sends it in one sendmsg): measured faster than a send per record from the appending
  // thread (docs/benchmarks.md, "The source's records on the link's thread").
  void Kick() override {
    std::lock_guard<std::mutex> l(mu_);
    if (!sendq_.empty() && !stop_ && !ended_) WakeLocked();
  }

  // A flush round of the NBD threads (nv_append.h): the DURABLE_REQ goes behind every
  // record queued here so far, so the destination has them all when it answers.
  uint64_t RequestDurable(uint64_t seq) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!source_ || stop_ || ended_ || linkDown_ || sendErr_ != 0) return 0;
    uint64_t target = std::max(seq, ackHeld_);
    if (target == 0) target = 1;  // 0 means "cannot": seq 0 is never a record
    if (target <= ackDurable_ || target <= durReqSent_) return target;
    durReqSent_ = target;
    durables_++;
    OutFrame f;
    f.bytes.resize(kHeaderBytes + 8);
    Put64(f.bytes.data() + kHeaderBytes, target);
    QueueLocked(kTypeDurableReq, std::move(f));
    return target;
  }

  bool WaitDurable(uint64_t target, int timeoutMs) override {
    std::unique_lock<std::mutex> l(mu_);
    durCv_.wait_for(l, std::chrono::milliseconds(timeoutMs),
                    [&] { return ackDurable_ >= target || stop_ || ended_ || linkDown_ || sendErr_ != 0; });
    return ackDurable_ >= target;
  }

  bool SourceMode() const { return source_; }

  // Stops the appender forwarding here and releasing from here (not under mu_: the
  // appender's mutex comes first, as in Forward).
  void Detach() {
    NvAppenderPtr a;
    {
      std::lock_guard<std::mutex> l(mu_);
      a = app_.lock();
      app_.reset();
    }
    if (a) a->ClearForwarder(this);
  }

  // The appender whose held replies a RECORD_ACK releases (null: none).
  void SetAppender(const NvAppenderPtr& a) {
    std::lock_guard<std::mutex> l(mu_);
    app_ = a;
  }

  // An EV_ROOM once the send queue holds at most `bytes` (at once if it does now).
  void WantRoom(size_t bytes) {
    std::lock_guard<std::mutex> l(mu_);
    wantRoom_ = true;
    roomBytes_ = bytes;
    RoomLocked();
    PostLocked();
  }

  // A TypeScript slab (id >= 1, [p, p+len)) for a CP_BLOCKS body: the next one that fits is
  // copied into it and its EV_FRAME names the id. False when closing or at the cap.
  bool GrantSlab(double id, uint8_t* p, size_t len) {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_ || ended_ || slabs_.size() >= kSlabGrantsMax) return false;
    slabs_.push_back({id, p, len});
    slabMode_ = true;
    if (waitSlab_) {
      waitSlab_ = false;
      WakeLocked();
    }
    return true;
  }

  void Pause(bool paused) {
    std::lock_guard<std::mutex> l(mu_);
    paused_ = paused;
    if (!paused) WakeLocked();
  }

  // Detaches the log (no record is written after this returns) and ends the thread: at
  // once, or after flushing what is queued and reading (and dropping) what the peer still
  // sends until it closes, for up to lingerMs in all. Returns the STORED events not
  // delivered yet (they leave the queue: the caller takes those records into the log).
  std::vector<double> Close(bool flush, int64_t lingerMs) {
    Detach();
    std::lock_guard<std::mutex> l(mu_);
    std::vector<double> stored;
    std::vector<double> rest;
    for (size_t i = 0; i + kEventWidth <= events_.size(); i += kEventWidth) {
      std::vector<double>& to = events_[i] == kEvStored ? stored : rest;
      to.insert(to.end(), events_.begin() + i, events_.begin() + i + kEventWidth);
    }
    events_.swap(rest);
    // Nothing queued may point into memory TypeScript lent once this returns.
    for (OutFrame& f : sendq_) f.Own();
    ring_ = nullptr;
    crcs_ = nullptr;
    grant_ = false;
    slabs_.clear();
    app_.reset();
    if (stop_) return stored;
    stop_ = true;
    durCv_.notify_all();
    flushOnStop_ = flush;
    stopDeadlineMs_ = NowMs() + lingerMs;
    lingerMs_ = lingerMs;
    bodies_.clear();
    pending_ = 0;
    WakeLocked();
    return stored;
  }

  static constexpr int kStats = 8 + kTypes;
  // bytes in, bytes out, records stored, bytes queued to send, records forwarded, the
  // highest record seq queued, fdatasyncs for DURABLE_REQs answered here (a source's link:
  // DURABLE_REQs the NBD threads' FLUSHes sent), records stored with pwritev, then the
  // frame bytes queued per type.
  void Stats(double* out) {
    std::lock_guard<std::mutex> l(mu_);
    out[0] = static_cast<double>(rxBytes_);
    out[1] = static_cast<double>(txBytes_);
    out[2] = static_cast<double>(stored_);
    out[3] = static_cast<double>(sendBytes_);
    out[4] = static_cast<double>(forwarded_);
    out[5] = static_cast<double>(fwdTop_);
    out[6] = static_cast<double>(durables_);
    out[7] = static_cast<double>(fileStores_);
    for (size_t t = 0; t < kTypes; t++) out[8 + t] = static_cast<double>(txByType_[t]);
  }

 private:
  static int64_t NowMs() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
  }

  // ---- thread side

  // Parses every whole frame in the input; then acknowledges the records it stored.
  void ParsePass() {
    bool stored = false;
    while (!failed_) {
      size_t avail = inEnd_ - inStart_;
      if (avail < kHeaderBytes) break;
      const uint8_t* h = in_.get() + inStart_;
      uint8_t type = h[4];
      uint32_t len = Get32(h + 8);
      uint64_t frameNo = Get64(h + 12);
      if (Get32(h) != kFrameMagic) {
        Fail("bad frame magic (not an nvmirror mirror stream)");
        break;
      }
      if (h[5] != kWireVersion) {
        Fail("unsupported wire version " + std::to_string(h[5]));
        break;
      }
      if (type >= kTypes || caps_[type] == 0) {
        Fail("unknown frame type " + std::to_string(type));
        break;
      }
      if (len > caps_[type]) {
        Fail("frame type " + std::to_string(type) + ": body of " + std::to_string(len) + " bytes exceeds its cap of " + std::to_string(caps_[type]));
        break;
      }
      if (frameNo != expectIn_) {
        Fail("frame number " + std::to_string(frameNo) + " where " + std::to_string(expectIn_) + " was due (replayed, lost or reordered frame)");
        break;
      }
      if (avail < kHeaderBytes + len) break;
      if (type == kTypeCpBlocks && ParkForSlab()) break;
      const uint8_t* body = h + kHeaderBytes;
      uint32_t crc = Get32(h + 20);
      bool ok;
      if (type == kTypeRecord) {
        ok = Record(h, body, len, crc, &stored);
      } else if (source_ && type == kTypeRecordAck && len == 24) {
        ok = CheckCrc(h, body, len, crc);
        if (ok) SourceAck(body);
      } else if (!source_ && type == kTypeDurableReq && len == 8 && DurableHere()) {
        ok = CheckCrc(h, body, len, crc);
        if (ok) durWanted_ = true;  // made durable and acknowledged at the end of this pass
      } else {
        ok = CheckCrc(h, body, len, crc);  // three chains: a CP_BLOCKS body is ~257 KiB
        if (ok) {
          std::lock_guard<std::mutex> l(mu_);
          HandOverLocked(type, body, len);
        }
      }
      if (!ok) {
        Fail("frame " + std::to_string(frameNo) + " (type " + std::to_string(type) + "): checksum mismatch");
        break;
      }
      inStart_ += kHeaderBytes + len;
      expectIn_++;
    }
    if (inStart_ == inEnd_) inStart_ = inEnd_ = 0;
    if (source_) ReleaseAcked();
    if (durWanted_) {
      durWanted_ = false;
      if (MakeDurable()) stored = true;
    }
    std::lock_guard<std::mutex> l(mu_);
    if (stored) AckLocked();
    PostLocked();
  }

  // A DURABLE_REQ is answered here only while every record before it is in the log file
  // (the grant holds) and the file is set and has not failed.
  // Taken: the records it covers are the grant's so far (durUpTo_).
  bool DurableHere() {
    std::lock_guard<std::mutex> l(mu_);
    if (!(durFd_ >= 0 && !durFailed_ && grant_ && ring_ != nullptr && !stop_)) return false;
    durUpTo_ = std::max(durUpTo_, gSeq_ - 1);
    lastDurNs_ = MonoNs();
    return true;
  }

  // One fdatasync for the DURABLE_REQs of this pass: the records before the last of them
  // (durUpTo_; more that came after it in the pass are durable too, but not claimed) are
  // in the file, so durable after it. True: durable_ moved (the caller acks). A failure is
  // sticky and goes to TypeScript (its persist fails the same way and ends the connection
  // with the reason).
  bool MakeDurable() {
    uint64_t upTo;
    int fd;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_) return false;  // closing: the mirror is being released (no ack matters)
      upTo = durUpTo_;
      fd = durFd_;
    }
    int rc;
    do rc = ::fdatasync(fd);
    while (rc != 0 && errno == EINTR);
    std::lock_guard<std::mutex> l(mu_);
    durables_++;
    if (rc != 0) {
      durFailed_ = true;
      uint8_t body[8];
      Put64(body, upTo);
      HandOverLocked(kTypeDurableReq, body, 8);
      return false;
    }
    if (upTo <= durable_) return false;
    durable_ = upTo;
    Emit({kEvDurable, static_cast<double>(upTo)});
    return true;
  }

  // Source mode: a verified RECORD_ACK releases the held replies it covers, then goes to
  // TypeScript (merged with one not taken yet).
  void SourceAck(const uint8_t* body) {
    {
      std::lock_guard<std::mutex> l(mu_);
      releaseTo_ = std::max(releaseTo_, std::min(Get64(body), fwdTop_));
      ackHeld_ = std::max(ackHeld_, Get64(body));
      if (Get64(body + 8) > ackDurable_) {
        ackDurable_ = Get64(body + 8);
        durCv_.notify_all();
      }
      size_t n = events_.size();
      if (n >= kEventWidth && events_[n - kEventWidth] == kEvFrame && events_[n - kEventWidth + 1] == kTypeRecordAck &&
          events_[n - kEventWidth + 3] == 0 && !bodies_.empty() && bodies_.back().size() == 24) {
        memcpy(bodies_.back().data(), body, 24);  // the newer marks replace the older
      } else {
        HandOverLocked(kTypeRecordAck, body, 24);
      }
    }
  }

  // Source mode, at the end of a parse pass: one release for the acks it read.
  void ReleaseAcked() {
    NvAppenderPtr app;
    uint64_t to;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (releaseTo_ <= releasedTo_) return;
      to = releasedTo_ = releaseTo_;
      app = app_.lock();
    }
    if (app) app->Release(to);
  }

  // True (and parked: the pass stops before this frame) when TypeScript grants slabs and
  // none is free; GrantSlab wakes the thread and the next loop resumes the pass.
  bool ParkForSlab() {
    std::lock_guard<std::mutex> l(mu_);
    if (!slabMode_ || !slabs_.empty() || stop_) return false;
    waitSlab_ = true;
    parked_ = true;
    return true;
  }

  bool CheckCrc(const uint8_t* h, const uint8_t* body, uint32_t len, uint32_t crc) {
    uint32_t c = Crc32cSeeded(0, h, 20);
    return Crc32cSeededWide(c, body, len) == crc;
  }

  // A RECORD frame: verified; stored here when it is the plain case and fits the grant,
  // else handed over. False: checksum mismatch.
  bool Record(const uint8_t* h, const uint8_t* body, uint32_t len, uint32_t crc, bool* stored) {
    bool plain = len >= kRecordHeadBytes;
    uint64_t seq = 0, offset = 0, length = 0, payload = 0;
    uint8_t rtype = 0, flags = 0;
    if (plain) {
      seq = Get64(body);
      rtype = body[8];
      flags = body[9];
      offset = Get64(body + 16);
      length = Get64(body + 24);
      payload = Get64(body + 32);
      uint64_t max = static_cast<uint64_t>(kMaxSafeInteger);
      plain = seq >= 1 && seq <= max && rtype >= 1 && rtype <= 3 && offset <= max && length <= max && offset % kBlock == 0 &&
              length % kBlock == 0 && length > 0 && payload == (rtype == 1 ? length : 0) && payload <= kRecordPayloadMax &&
              len == kRecordHeadBytes + payload;
    }
    if (!plain) {
      if (!CheckCrc(h, body, len, crc)) return false;
      std::lock_guard<std::mutex> l(mu_);
      grant_ = false;
      HandOverLocked(kTypeRecord, body, len);
      return true;
    }
    size_t blocks = payload / kBlock;
    uint32_t c = Crc32cSeeded(Crc32cSeeded(0, h, 20), body, kRecordHeadBytes);
    const uint8_t* data = body + kRecordHeadBytes;
    for (size_t i = 0; i < blocks; i++) {
      blockCrcs_[i] = Crc32cOf(data + i * kBlock, kBlock);
      c = Crc32cExtendBlock(c, blockCrcs_[i]);
    }
    if (c != crc) return false;
    std::lock_guard<std::mutex> l(mu_);
    nextRecSeq_ = seq + 1;
    size_t size = kLogHeaderBytes + payload;
    size_t slot = (gAt_ + kLogHeaderBytes) / kBlock;
    if (!grant_ || ring_ == nullptr || seq != gSeq_ || gAt_ + size > gLimit_ || slot + blocks > crcsLen_) {
      grant_ = false;
      HandOverLocked(kTypeRecord, body, len);
      return true;
    }
    // While DURABLE_REQs come often (one answered here within kFileStoreWindowNs), the
    // record goes to the file with pwritev (header from the stack, payload from the
    // frame): pages dirtied through the mapping cost ~3x as much to make durable
    // (writeback write-protects them, and the next store faults again; nv_append.h does
    // the same for the source's FLUSHes). The mapping sees the same page cache.
    const bool viaFile = durFd_ >= 0 && !durFailed_ && lastDurNs_ > 0 && MonoNs() - lastDurNs_ < kFileStoreWindowNs;
    uint8_t hdrBuf[kLogHeaderBytes];
    uint8_t* r = viaFile ? hdrBuf : ring_ + gAt_;
    memset(r, 0, kLogHeaderBytes);
    Put64(r + 8, seq);
    r[16] = rtype;
    r[17] = flags;
    Put32(r + 20, stream_);
    Put64(r + 24, offset);
    Put64(r + 32, length);
    Put64(r + 40, payload);
    if (!viaFile) memcpy(r + kLogHeaderBytes, data, payload);
    uint32_t rc = Crc32cSeeded(salt_, r + 8, kLogHeaderBytes - 8);
    for (size_t i = 0; i < blocks; i++) {
      crcs_[slot + i] = blockCrcs_[i];
      rc = Crc32cExtendBlock(rc, blockCrcs_[i]);
    }
    Put32(r + 4, rc);
    bool inFile = false;
    if (viaFile) {
      // The record with a zero magic (over any stale one), then the magic: magic last.
      iovec iov[2] = {{r, kLogHeaderBytes}, {const_cast<uint8_t*>(data), payload}};
      iovec magic = {r, 4};
      if (PwritevAll(durFd_, iov, payload > 0 ? 2 : 1, gAt_)) {
        Put32(r, kLogMagic);
        inFile = PwritevAll(durFd_, &magic, 1, gAt_);
      }
      if (inFile) {
        fileStores_++;
      } else {
        durFailed_ = true;  // no more through the file; this one goes through the mapping
        uint8_t* m = ring_ + gAt_;
        memcpy(m + 8, r + 8, kLogHeaderBytes - 8);
        memcpy(m + kLogHeaderBytes, data, payload);
        Put32(m + 4, rc);
        r = m;
      }
    }
    if (!inFile) Put32(r, kLogMagic);
    Emit({kEvStored, static_cast<double>(seq), static_cast<double>(gAt_), static_cast<double>(size), static_cast<double>(rtype),
          static_cast<double>(length)});
    gAt_ += size;
    gSeq_ = seq + 1;
    top_ = seq;
    stored_++;
    *stored = true;
    return true;
  }

  void HandOverLocked(uint8_t type, const uint8_t* body, uint32_t len) {
    if (stop_) return;
    if (type == kTypeCpBlocks && len > 0 && !slabs_.empty() && slabs_.front().len >= len) {
      Slab s = slabs_.front();
      slabs_.pop_front();
      // The body (u64 cp, u32 n, n u64 pbas, n blocks) goes `at` bytes into the slab, so that
      // its blocks start on a 4096 boundary of the (aligned) slab: the receiver's O_DIRECT
      // writes take them without a bounce copy. Unaligned (at 0) if the padding does not fit.
      size_t at = 0;
      if (len >= 12) {
        size_t head = 12 + 8 * static_cast<size_t>(Get32(body + 8));
        size_t pad = (kBlock - head % kBlock) % kBlock;
        if (s.len >= pad + len) at = pad;
      }
      memcpy(s.p + at, body, len);
      Emit({kEvFrame, static_cast<double>(type), static_cast<double>(len), s.id, static_cast<double>(at)});
      return;
    }
    bodies_.emplace_back(body, body + len);
    pending_ += len;
    Emit({kEvFrame, static_cast<double>(type), static_cast<double>(len)});
  }

  void Fail(const std::string& why) {
    std::lock_guard<std::mutex> l(mu_);
    ErrorLocked(why, true);
  }

  void ErrorLocked(const std::string& why, bool protocol) {
    linkDown_ = true;
    durCv_.notify_all();
    if (failed_) return;
    failed_ = true;
    grant_ = false;
    texts_.push_back(why);
    Emit({kEvError, static_cast<double>(texts_.size() - 1), protocol ? 1.0 : 0.0});
  }

  void AckLocked() {
    if (stop_ || ended_) return;
    OutFrame f;
    f.bytes.resize(kHeaderBytes + 24);
    uint8_t* b = f.bytes.data() + kHeaderBytes;
    Put64(b, std::max(tsHeld_, top_));
    Put64(b + 8, std::max(tsDurable_, durable_));
    Put64(b + 16, tsStoredFrom_);
    QueueLocked(kTypeRecordAck, std::move(f));
  }

  // Header bytes 0..20 of f (all but the checksum): the next frame number.
  void WriteHeader(uint8_t type, OutFrame* f) {
    uint8_t* b = f->Head();
    Put32(b, kFrameMagic);
    b[4] = type;
    b[5] = kWireVersion;
    b[6] = b[7] = 0;
    Put32(b + 8, static_cast<uint32_t>(f->Size() - kHeaderBytes));
    Put64(b + 12, outFrameNo_++);
  }

  // Fills in f's header (the next frame number, the checksum) and sends or queues it.
  void QueueLocked(uint8_t type, OutFrame&& f) {
    WriteHeader(type, &f);
    uint8_t* b = f.Head();
    Put32(b + 20, Crc32cSeededWide(Crc32cSeeded(0, b, 20), b + kHeaderBytes, f.Size() - kHeaderBytes));
    SendNowLocked(type, std::move(f));
  }

  // Queues a complete frame and sends what the socket takes now; the thread sends the rest.
  void SendNowLocked(uint8_t type, OutFrame&& f) {
    EnqueueLocked(type, std::move(f));
    FlushLocked();
    if (!sendq_.empty()) WakeLocked();
  }

  // Queues a frame whose header is complete (sent by the caller's FlushLocked or the thread).
  void EnqueueLocked(uint8_t type, OutFrame&& f) {
    sendBytes_ += f.Size();
    txByType_[type < kTypes ? type : 0] += f.Size();
    sendq_.push_back(std::move(f));
  }

  // EV_ROOM when TypeScript waits for the queue to shrink to roomBytes_ and it has.
  void RoomLocked() {
    if (!wantRoom_ || (sendBytes_ > roomBytes_ && !stop_ && !ended_ && sendErr_ == 0)) return;
    wantRoom_ = false;
    Emit({kEvRoom});
  }

  // Sends queued frames, up to kIov of them per sendmsg.
  void FlushLocked() {
    constexpr size_t kIov = 64;
    while (!sendq_.empty() && sendErr_ == 0) {
      iovec iov[kIov];
      size_t n = 0;
      for (auto it = sendq_.begin(); it != sendq_.end() && n < kIov; ++it) n += it->Remaining(iov + n, kIov - n);
      size_t offered = 0;
      for (size_t i = 0; i < n; i++) offered += iov[i].iov_len;
      msghdr mh{};
      mh.msg_iov = iov;
      mh.msg_iovlen = n;
      ssize_t w = ::sendmsg(fd_, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) sendErr_ = errno;
        return;
      }
      size_t left = static_cast<size_t>(w);
      txBytes_ += left;
      while (left > 0) {
        OutFrame& f = sendq_.front();
        size_t take = std::min(left, f.Size() - f.sent);
        f.sent += take;
        left -= take;
        if (f.sent < f.Size()) break;
        sendBytes_ -= f.Size();
        if (f.token != 0) SentLocked(f.token);
        sendq_.pop_front();
      }
      if (static_cast<size_t>(w) < offered) return;  // the socket is full
    }
  }

  // A borrowed frame is sent: its lender may reuse the memory of every frame up to token
  // (one event for consecutive ones).
  void SentLocked(uint64_t token) {
    size_t n = events_.size();
    if (n >= kEventWidth && events_[n - kEventWidth] == kEvSent) {
      events_[n - kEventWidth + 1] = static_cast<double>(token);
      return;
    }
    Emit({kEvSent, static_cast<double>(token)});
  }

  void Emit(std::initializer_list<double> f) {
    size_t at = events_.size();
    events_.resize(at + kEventWidth, 0);
    size_t i = 0;
    for (double v : f) events_[at + i++] = v;
  }

  void PostLocked() {
    if (events_.empty() || posted_ || released_) return;
    posted_ = true;
    tsfn.NonBlockingCall(this, [](Napi::Env env, Napi::Function fn, Rx* rx) {
      if (env != nullptr) rx->Deliver(env, fn);
    });
  }

  void WakeLocked() {
    if (wakeSignaled_) return;
    uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof one);
    wakeSignaled_ = true;
  }

  int fd_;  // closed (-1) when the thread ends, under mu_
  const int wake_;
  const bool source_;  // the source's side of the stream (see "Source mode" above)
  uint32_t caps_[kTypes];
  // The thread's own.
  uint64_t expectIn_;
  std::unique_ptr<uint8_t[]> in_;
  size_t inStart_ = 0, inEnd_ = 0;
  uint32_t blockCrcs_[kRecordPayloadMax / kBlock];
  bool failed_ = false, eof_ = false, shutWr_ = false;
  // Under mu_.
  bool slabMode_ = false, waitSlab_ = false, parked_ = false;
  std::mutex mu_;
  uint64_t outFrameNo_;
  bool stop_ = false, flushOnStop_ = false, ended_ = false, paused_ = false, posted_ = false, wakeSignaled_ = false;
  bool released_ = false;  // the thread-safe function was released (after the thread ended)
  int64_t stopDeadlineMs_ = 0;
  int64_t lingerMs_ = 0;
  uint64_t drained_ = 0;     // bytes read and dropped while closing
  std::string lingerNote_;   // why the close ended at its deadline (thread only)
  int sendErr_ = 0;
  std::deque<OutFrame> sendq_;
  size_t sendBytes_ = 0;
  std::deque<std::vector<uint8_t>> bodies_;
  struct Slab {
    double id;
    uint8_t* p;
    size_t len;
  };
  std::deque<Slab> slabs_;
  size_t pending_ = 0;
  std::vector<double> events_;
  std::vector<std::string> texts_;
  uint8_t* ring_ = nullptr;
  size_t ringLen_ = 0;
  uint32_t* crcs_ = nullptr;
  size_t crcsLen_ = 0;
  bool grant_ = false;
  uint64_t gAt_ = 0, gLimit_ = 0, gSeq_ = 0;
  uint32_t salt_ = 0, stream_ = 0;
  uint64_t nextRecSeq_ = 0, top_ = 0;
  uint64_t tsHeld_ = 0, tsDurable_ = 0, tsStoredFrom_ = 0;
  // Source mode, under mu_: the destination's newest acknowledged held and durable marks,
  // the last DURABLE_REQ the threads' FLUSHes sent, and their waits (durCv_). linkDown_:
  // an error ended the stream (set under mu_, unlike the thread's own failed_).
  uint64_t ackHeld_ = 0, ackDurable_ = 0, durReqSent_ = 0;
  std::condition_variable durCv_;
  bool linkDown_ = false;
  // DURABLE_REQs answered here: the log file's descriptor, the seq made durable through,
  // fdatasyncs done; durWanted_ belongs to the thread (set and cleared in one parse pass).
  int durFd_ = -1;
  bool durFailed_ = false, durWanted_ = false;
  uint64_t durable_ = 0, durUpTo_ = 0, durables_ = 0;
  // When the last DURABLE_REQ was taken here (MonoNs; 0: none); records within
  // kFileStoreWindowNs of it are stored with pwritev (Record); how many were.
  uint64_t lastDurNs_ = 0, fileStores_ = 0;
  static constexpr uint64_t kFileStoreWindowNs = 5'000'000;
  uint64_t rxBytes_ = 0, txBytes_ = 0, stored_ = 0;
  // Source mode, under mu_.
  std::weak_ptr<NvAppender> app_;
  uint64_t fwdTop_ = 0, forwarded_ = 0;
  uint64_t releaseTo_ = 0, releasedTo_ = 0;  // what the acks read allow; what was released
  bool wantRoom_ = false;
  size_t roomBytes_ = 0;
  uint64_t txByType_[kTypes] = {};
};

using RxPtr = std::shared_ptr<Rx>;
constexpr napi_type_tag kRxTag = {0x6d697272727872ULL, 0x72785f68616e64ULL};

bool GetRx(const Napi::CallbackInfo& info, const char* fn, RxPtr* out) {
  bool ok = false;
  if (info.Length() < 1 || !info[0].IsExternal() || napi_check_object_type_tag(info.Env(), info[0], &kRxTag, &ok) != napi_ok || !ok) {
    ThrowType(info.Env(), std::string(fn) + ": handle must be a mirrorRxStart handle");
    return false;
  }
  *out = *info[0].As<Napi::External<RxPtr>>().Data();
  return true;
}

bool GetU64(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, uint64_t* out) {
  int64_t v;
  if (!GetInt(info, i, fn, name, 0, kMaxSafeInteger, &v)) return false;
  *out = static_cast<uint64_t>(v);
  return true;
}

// mirrorRxStart(fd, leftover, inFrameNo, outFrameNo, caps (32 u32 as a Buffer), onEvents[, source])
Napi::Value Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxStart";
  int fd;
  Napi::Buffer<uint8_t> leftover, caps;
  uint64_t inNo, outNo;
  Napi::Function cb;
  if (!GetFd(info, 0, fn, &fd) || !GetBuffer(info, 1, fn, "leftover", &leftover) || !GetU64(info, 2, fn, "inFrameNo", &inNo) ||
      !GetU64(info, 3, fn, "outFrameNo", &outNo) || !GetBuffer(info, 4, fn, "caps", &caps) || !GetCallback(info, 5, fn, &cb)) {
    return env.Undefined();
  }
  bool source = false;
  if (info.Length() > 6 && !GetBool(info, 6, fn, "source", &source)) return env.Undefined();
  if (leftover.Length() > kHeaderBytes + kBodyMax + kReadChunk) {
    ThrowRange(env, std::string(fn) + ": leftover too long");
    return env.Undefined();
  }
  if (caps.Length() != kTypes * 4) {
    ThrowRange(env, std::string(fn) + ": caps must be 32 u32s");
    return env.Undefined();
  }
  uint32_t capv[kTypes];
  memcpy(capv, caps.Data(), sizeof capv);
  for (uint32_t c : capv) {
    if (c > kBodyMax) {
      ThrowRange(env, std::string(fn) + ": a cap exceeds the largest body");
      return env.Undefined();
    }
  }
  int sockType = 0;
  socklen_t sl = sizeof sockType;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &sockType, &sl) != 0 || sockType != SOCK_STREAM) {
    ThrowType(env, std::string(fn) + ": fd must be a stream socket");
    return env.Undefined();
  }
  int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) {
    ErrnoError(env, errno, "dup").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fl = ::fcntl(own, F_GETFL);
  if (fl >= 0) (void)::fcntl(own, F_SETFL, fl | O_NONBLOCK);
  int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    int e = errno;
    ::close(own);
    ErrnoError(env, e, "eventfd").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  RxPtr rx = std::make_shared<Rx>(own, wake, inNo, outNo, capv, source);
  rx->Feed(leftover.Data(), leftover.Length());
  auto* ctx = new RxPtr(rx);
  rx->tsfn = Napi::ThreadSafeFunction::New(env, cb, "mirrorRx", 0, 1, ctx, [](Napi::Env, RxPtr* p) { delete p; });
  if (!StartForegroundThread("nvm-mirror-rx", [rx]() { rx->Run(); })) {  // it acks records: at the starting priority
    rx->tsfn.Release();
    ErrnoError(env, EAGAIN, "pthread_create").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto handle = Napi::External<RxPtr>::New(env, new RxPtr(rx), [](Napi::Env, RxPtr* p) { delete p; });
  napi_type_tag_object(env, handle, &kRxTag);
  return handle;
}

// mirrorRxAttachLog(h, ring, crcs): the log's mapping and its block-checksum table (u32s).
Napi::Value AttachLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxAttachLog";
  RxPtr rx;
  Napi::Buffer<uint8_t> ring, crcs;
  if (!GetRx(info, fn, &rx) || !GetBuffer(info, 1, fn, "ring", &ring) || !GetBuffer(info, 2, fn, "crcs", &crcs)) return env.Undefined();
  if (ring.Length() < 4096 || crcs.Length() % 4 != 0 || reinterpret_cast<uintptr_t>(crcs.Data()) % 4 != 0 ||
      crcs.Length() / 4 < (ring.Length() + kBlock - 1) / kBlock) {
    ThrowRange(env, std::string(fn) + ": a ring of at least 4096 bytes and a u32 per 4 KiB of it");
    return env.Undefined();
  }
  rx->AttachLog(ring.Data(), ring.Length(), reinterpret_cast<uint32_t*>(crcs.Data()), crcs.Length() / 4);
  return env.Undefined();
}

// mirrorRxDurableFile(h, path) -> bool: DURABLE_REQs answered on the thread (receiver).
Napi::Value DurableFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxDurableFile";
  RxPtr rx;
  if (!GetRx(info, fn, &rx)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsString()) {
    ThrowType(env, std::string(fn) + ": path must be a string");
    return env.Undefined();
  }
  return Napi::Boolean::New(env, rx->SetDurableFile(info[1].As<Napi::String>().Utf8Value()));
}

// mirrorRxGrant(h, nextSeq, at, limit, salt, stream) -> accepted
Napi::Value Grant(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxGrant";
  RxPtr rx;
  uint64_t seq, at, limit, salt, stream;
  if (!GetRx(info, fn, &rx) || !GetU64(info, 1, fn, "nextSeq", &seq) || !GetU64(info, 2, fn, "at", &at) ||
      !GetU64(info, 3, fn, "limit", &limit) || !GetU64(info, 4, fn, "salt", &salt) || !GetU64(info, 5, fn, "stream", &stream)) {
    return env.Undefined();
  }
  if (salt > 0xffffffffu || stream > 0xffffffffu || seq < 1) {
    ThrowRange(env, std::string(fn) + ": salt and stream are u32s, seqs start at 1");
    return env.Undefined();
  }
  return Napi::Boolean::New(env, rx->Grant(seq, at, limit, static_cast<uint32_t>(salt), static_cast<uint32_t>(stream)));
}

// mirrorRxAck(h, heldSeq, durableSeq, storedFromSeq, sendNow)
Napi::Value Ack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxAck";
  RxPtr rx;
  uint64_t held, durable, from;
  bool send;
  if (!GetRx(info, fn, &rx) || !GetU64(info, 1, fn, "heldSeq", &held) || !GetU64(info, 2, fn, "durableSeq", &durable) ||
      !GetU64(info, 3, fn, "storedFromSeq", &from) || !GetBool(info, 4, fn, "sendNow", &send)) {
    return env.Undefined();
  }
  rx->SetAckState(held, durable, from, send);
  return env.Undefined();
}

// mirrorRxSend(h, type, parts, token = 0, blockCrcs = null) -> frame bytes (-1: the
// connection is closing). token > 0: the parts of at least kBorrowMinBytes are borrowed,
// not copied, until a kEvSent event reaches the token or mirrorRxClose returned (Rx::Send).
Napi::Value Send(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxSend";
  RxPtr rx;
  int64_t type;
  if (!GetRx(info, fn, &rx) || !GetInt(info, 1, fn, "type", 1, kTypes - 1, &type)) return env.Undefined();
  if (info.Length() < 3 || !info[2].IsArray()) {
    ThrowType(env, std::string(fn) + ": parts must be an array of Buffers");
    return env.Undefined();
  }
  Napi::Array a = info[2].As<Napi::Array>();
  std::vector<std::pair<const uint8_t*, size_t>> parts;
  size_t len = 0;
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value v = a.Get(i);
    if (!v.IsBuffer()) {
      ThrowType(env, std::string(fn) + ": parts must be an array of Buffers");
      return env.Undefined();
    }
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    parts.emplace_back(b.Data(), b.Length());
    len += b.Length();
  }
  if (len > kBodyMax) {
    ThrowRange(env, std::string(fn) + ": body longer than the largest frame body");
    return env.Undefined();
  }
  int64_t token = 0;
  if (info.Length() > 3 && !info[3].IsUndefined() && !GetInt(info, 3, fn, "token", 0, kMaxSafeInteger, &token)) return env.Undefined();
  const uint32_t* crcs = nullptr;
  size_t nCrcs = 0;
  if (info.Length() > 4 && !info[4].IsUndefined() && !info[4].IsNull()) {
    if (!info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array) {
      ThrowType(env, std::string(fn) + ": blockCrcs must be a Uint32Array");
      return env.Undefined();
    }
    Napi::Uint32Array a4 = info[4].As<Napi::Uint32Array>();
    crcs = a4.Data();
    nCrcs = a4.ElementLength();
    if (nCrcs * kBlock > len) {
      ThrowRange(env, std::string(fn) + ": more block checksums than 4 KiB blocks in the body");
      return env.Undefined();
    }
  }
  return Napi::Number::New(env, static_cast<double>(rx->Send(static_cast<uint8_t>(type), parts, static_cast<uint64_t>(token), crcs, nCrcs)));
}

// mirrorRxTake(h, dst) -> bytes copied (-1: no body of that length is next)
Napi::Value Take(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxTake";
  RxPtr rx;
  Napi::Buffer<uint8_t> dst;
  if (!GetRx(info, fn, &rx) || !GetBuffer(info, 1, fn, "dst", &dst)) return env.Undefined();
  return Napi::Number::New(env, static_cast<double>(rx->Take(dst.Data(), dst.Length())));
}

// mirrorRxSlab(h, id, buf) -> granted (false: closing, or kSlabGrantsMax granted). TypeScript
// keeps buf alive and untouched until an EV_FRAME names id, or until mirrorRxClose returned.
Napi::Value GrantSlab(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxSlab";
  RxPtr rx;
  int64_t id;
  Napi::Buffer<uint8_t> buf;
  if (!GetRx(info, fn, &rx) || !GetInt(info, 1, fn, "id", 1, kMaxSafeInteger, &id) || !GetBuffer(info, 2, fn, "buf", &buf)) {
    return env.Undefined();
  }
  return Napi::Boolean::New(env, rx->GrantSlab(static_cast<double>(id), buf.Data(), buf.Length()));
}

Napi::Value Pause(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RxPtr rx;
  bool paused;
  if (!GetRx(info, "mirrorRxPause", &rx) || !GetBool(info, 1, "mirrorRxPause", "paused", &paused)) return env.Undefined();
  rx->Pause(paused);
  return env.Undefined();
}

// mirrorRxClose(h, flush, lingerMs) -> Float64Array: the STORED events not delivered yet
Napi::Value Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxClose";
  RxPtr rx;
  bool flush;
  int64_t linger;
  if (!GetRx(info, fn, &rx) || !GetBool(info, 1, fn, "flush", &flush) || !GetInt(info, 2, fn, "lingerMs", 0, 60000, &linger)) {
    return env.Undefined();
  }
  std::vector<double> stored = rx->Close(flush, linger);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, stored.size() * sizeof(double));
  if (!stored.empty()) memcpy(ab.Data(), stored.data(), stored.size() * sizeof(double));
  return Napi::Float64Array::New(env, stored.size(), ab, 0);
}

// mirrorRxStats(h) -> [bytesIn, bytesOut, recordsStored, queuedBytes, recordsForwarded,
// highest record seq queued, DURABLE_REQ fdatasyncs done here, records stored with pwritev,
// frame bytes queued per type (32)]
Napi::Value Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RxPtr rx;
  if (!GetRx(info, "mirrorRxStats", &rx)) return env.Undefined();
  double s[Rx::kStats];
  rx->Stats(s);
  Napi::Float64Array a = Napi::Float64Array::New(env, Rx::kStats);
  for (int i = 0; i < Rx::kStats; i++) a[i] = s[i];
  return a;
}

// mirrorRxForward(h, appender|null, fromSeq): source mode; the appender's records from seq
// fromSeq on are queued on this link as they are appended, and RECORD_ACKs release its held
// replies (null: neither, from now on).
Napi::Value Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "mirrorRxForward";
  RxPtr rx;
  uint64_t from;
  if (!GetRx(info, fn, &rx) || !GetU64(info, 2, fn, "fromSeq", &from)) return env.Undefined();
  if (!rx->SourceMode()) {
    ThrowType(env, std::string(fn) + ": the link was not started in source mode");
    return env.Undefined();
  }
  NvAppenderPtr app;
  if (info.Length() > 1 && !info[1].IsNull() && !UnwrapAppender(info, 1, fn, &app)) return env.Undefined();
  rx->Detach();
  if (!app) return env.Undefined();
  rx->SetAppender(app);
  app->SetForwarder(rx, from);
  return env.Undefined();
}

// mirrorRxWantRoom(h, bytes): an EV_ROOM event once at most `bytes` are queued to send.
Napi::Value WantRoom(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RxPtr rx;
  uint64_t bytes;
  if (!GetRx(info, "mirrorRxWantRoom", &rx) || !GetU64(info, 1, "mirrorRxWantRoom", "bytes", &bytes)) return env.Undefined();
  rx->WantRoom(static_cast<size_t>(bytes));
  return env.Undefined();
}

}  // namespace

void InitMirrorRx(Napi::Env env, Napi::Object exports) {
  exports.Set("mirrorRxStart", Napi::Function::New(env, Start, "mirrorRxStart"));
  exports.Set("mirrorRxAttachLog", Napi::Function::New(env, AttachLog, "mirrorRxAttachLog"));
  exports.Set("mirrorRxGrant", Napi::Function::New(env, Grant, "mirrorRxGrant"));
  exports.Set("mirrorRxDurableFile", Napi::Function::New(env, DurableFile, "mirrorRxDurableFile"));
  exports.Set("mirrorRxAck", Napi::Function::New(env, Ack, "mirrorRxAck"));
  exports.Set("mirrorRxSend", Napi::Function::New(env, Send, "mirrorRxSend"));
  exports.Set("mirrorRxTake", Napi::Function::New(env, Take, "mirrorRxTake"));
  exports.Set("mirrorRxSlab", Napi::Function::New(env, GrantSlab, "mirrorRxSlab"));
  exports.Set("mirrorRxPause", Napi::Function::New(env, Pause, "mirrorRxPause"));
  exports.Set("mirrorRxClose", Napi::Function::New(env, Close, "mirrorRxClose"));
  exports.Set("mirrorRxStats", Napi::Function::New(env, Stats, "mirrorRxStats"));
  exports.Set("mirrorRxForward", Napi::Function::New(env, Forward, "mirrorRxForward"));
  exports.Set("mirrorRxWantRoom", Napi::Function::New(env, WantRoom, "mirrorRxWantRoom"));
  exports.Set("mirrorRxEventWidth", Napi::Number::New(env, kEventWidth));
}

}  // namespace nvm
