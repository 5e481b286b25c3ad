// The NBD transmission phase's socket I/O on a native thread (one per connection), for
// plain TCP/Unix connections after the handshake. The thread reads request headers,
// receives each WRITE payload straight into a receive buffer TypeScript granted in
// advance (charged to the server's memory budget), and hands TypeScript batches of
// events through one thread-safe function call per batch. Replies are written with
// sendmsg (writev) by whichever thread queues them; what the kernel does not take at
// once is queued and written by the connection's thread when the socket is writable.
// Policy (validation, budget, limits, replies, errors) stays in TypeScript
// (src/nbd/native-transmission.ts, the only user).
//
// Exports:
//   nbdServeStart(fd, leftover, maxPayloadBytes, maxInflight, maxQueuedBytes, onEvents) -> handle
//       dups fd (the caller keeps its own); onEvents(Float64Array) gets events of
//       kEventWidth numbers each (kinds below).
//   nbdServeBusyPoll(us)                   the connection threads' busy-poll window (busy_poll.h; 0: off)
//   nbdServeBusyPollPause(paused)          while true no connection thread spins (a CP runs: busy_poll.h)
//   nbdServeBusyPollStats() -> [windows, hits, microseconds]  the process's busy-poll totals
//   nbdServeGrant(handle, ids, buffers)    receive buffers, each for one WRITE payload <= its length
//   nbdServeRevoke(handle) -> number[]     takes back the unclaimed buffers (their ids)
//   nbdServeSend(handle, buffers, seq, replies) -> 1 written, 0 queued (TAKEN later), 2 closed
//   nbdServeDirect(handle, fd, sizeBytes, modes)  dups fd; with kModeWrites plain WRITEs inside
//                                          sizeBytes are pwritten to it and answered by the thread (DONE
//                                          events say so), see FinishWrite; with kModeReads plain READs
//                                          inside it are read from it (page cache only), see TryDirectRead
//   nbdServeDirectMemory(handle, store, modes)  the same for a memory volume: WRITEs whose chunks all
//                                          hold data are copied into them, READs copied out of them
//                                          (chunks not registered read as zeroes)
//   nbdServeDirectEngine(handle, map|null, appender|null, modes)  an engine volume: plain READs of
//                                          whole blocks that the map (read_map.h) holds are read and
//                                          answered here; with the appender (nv_append.h) and kModeWrites,
//                                          plain WRITEs of whole blocks are appended to the NVRAM log and
//                                          answered here
//   nbdReadMapNew(fd, sizeBytes, deviceBlocks, slotsLog2) -> map; nbdReadMapPutLeaf(map, node,
//   baseLbn, skip, expectGen) -> put (-1: the map moved on); nbdReadMapGen(map) -> gen;
//   nbdReadMapDrop(map, lbn, count); nbdReadMapClear(map);
//   nbdReadMapClose(map); nbdReadMapStats(map) -> [hits, misses, waits]: src/volume/engine-read-map.ts
//   keeps it in step with the engine's log and tree
//   nbdAppenderNew(region, epoch, salt, payloadMaxBytes, volumeBytes, map|null) -> appender;
//   nbdAppenderResume(a, writeEnd, halfEnd, nextSeq, durableSeq) -> bool; nbdAppenderDrain(a,
//   pause) -> [records, their blocks' crc32c]; nbdAppenderAppend(a, offsetBytes, data) -> bool (what a thread
//   does; for tests); nbdAppenderSetDurable(a, seq); nbdAppenderClose(a); nbdAppenderStats(a) -> appends; nbdAppenderFileStores(a) -> appends stored with pwrite; nbdAppenderMarks(a) -> [released, failed]; nbdAppenderUnforward(a): no more records to a mirror link (mirrorRxForward links one);
//   nbdAppenderFlushFile(a, path|null) -> bool: the threads answer a plain FLUSH themselves
//   (fdatasync of the NVRAM file through their own descriptor); nbdAppenderFlush(a) -> 1|0|-errno
//   (what a thread does; for tests); nbdAppenderFlushes(a) -> count;
//   nbdAppenderGate(a, on), nbdAppenderRelease(a, seq), nbdAppenderFailHeld(a): held replies
//   (a sync mirror: the thread's reply to an appended WRITE waits for the replica):
//   src/nvlog/native-append.ts
//   modes: kModeWrites | kModeReads | kModeStructured (the connection negotiated structured
//   replies: a direct READ gets one OFFSET_DATA chunk with the DONE flag, as transmission.ts doRead)
//   nbdMemStoreNew(sizeBytes, chunkBytes) -> store; nbdMemStoreSet(store, index, chunk),
//   nbdMemStoreAdd(store, index, chunk) -> bool (registers only where nothing is: false if a
//   spare went there first), nbdMemStoreDelete(store, index, chunk) (if chunk is what is
//   there), nbdMemStoreZeroIn(store, index, from, to) -> unregistered,
//   nbdMemStoreAddSpares(store, firstId, chunks) (zeroed chunks the threads may take for
//   WRITEs of up to a chunk into holes), nbdMemStoreSync(store, withdraw) -> Float64Array
//   [n, index0, id0, ..., index(n-1), id(n-1), withdrawn ids...] (the spares taken since the
//   last call, where; with withdraw, every spare left comes back), nbdMemStoreCopyIn(store,
//   offset, data) -> bool (what a thread does; for tests), nbdMemStoreClose(store):
//   the memory volume keeps it in step
//   nbdServeSetReading(handle, bool)       TypeScript's flow control (may read or not)
//   nbdServeEnd(handle)                    after queued replies: shut our side, discard until EOF
//   nbdServeAbort(handle)                  shut the socket down now; the thread exits
//   nbdServeState(handle) -> object        for stall/idle checks and diagnostics
//
// Invariants:
// - The thread touches a granted buffer only after claiming it (under the mutex, for one
//   WRITE whose length fits it) and until it reported that WRITE; TypeScript keeps every
//   granted buffer referenced until it is reported or revoked. A claimed buffer is never
//   revoked. So a payload is only ever received into memory charged to the budget.
// - The only reply made here is to a plain WRITE (no flags) inside the volume written
//   completely with pwrite to the direct fd (a file volume's own fd, dup'd): exactly the
//   file volume's own non-FUA write; or copied completely into a memory volume's chunks
//   that all held data already or into zeroed spares the memory volume handed over (MemStore,
//   under its mutex, so no chunk is freed meanwhile; each spare taken is recorded, under the
//   same lock, for the volume to adopt before it looks at its chunks again);
//   or appended whole to an engine's NVRAM log by its appender (nv_append.h: whole blocks,
//   the record complete in the region, its blocks out of the ReadMap, before the reply:
//   exactly the log's own plain write; while the appender's gate is on, that reply is held
//   until TypeScript releases the record's seq, the replica having acknowledged it, or
//   fails it with EIO: exactly the engine's reply path under a replica gate);
//   and to a plain READ (no flags, 1..maxPayload bytes, inside the volume) for which a
//   granted buffer fits, read completely into that buffer with preadv2(RWF_NOWAIT) from the
//   direct fd, copied out of the MemStore under its mutex, or read by the engine's ReadMap
//   (whole blocks it maps, each matching its crc32c: read_map.h; blocks outside the page
//   cache are read by the read pool, which answers the READ or, on any failure, reports it
//   to TypeScript as the thread would have), the buffer sent as the reply's
//   data and granted again once the kernel took it; and to a plain FLUSH (no flags) to an
//   engine whose appender serves FLUSH (no replica): after this pass's earlier replies went
//   out, the appender's flusher makes the whole region durable with one fdatasync of the
//   NVRAM file for every FLUSH queued before it started (nv_append.h SubmitFlush; EIO if
//   it failed, and the volume fails its log on the DONE event), so every WRITE answered
//   before the FLUSH was read; and to a FUA WRITE (FUA the only flag) to such an engine:
//   appended as a plain WRITE (the same checks), its buffer free again, then answered only
//   by a flush round begun after the append returned (FlushIfIdle here, or the flusher:
//   the round covers its record, and under a sync mirror asks the destination's durable
//   ack for it too), EIO if the round's fdatasync failed (the volume fails its log), or,
//   if no round could be made, handed to TypeScript as a FLUSH with the WRITE's cookie
//   (its record is in the log: the FLUSH makes it durable; it is never appended twice).
//   A READ with no buffer that fits is
//   reported with buffer id kWantsBuffer (TypeScript may grant one for the next). Every
//   other request, a READ that would block or failed, and a WRITE whose pwrite failed,
//   is reported and answered by TypeScript once the volume settled it.
// - Ordering: the thread reads the volume when it parses the READ, after every reply sent
//   before the READ arrived (a reply is sent under mu_, the READ parsed after taking mu_):
//   every acknowledged WRITE, the thread's own or TypeScript's, is in the file (pwrite
//   returned) or the chunks before its reply, and an engine WRITE's blocks are out of the
//   ReadMap before its reply (the log drops them as it indexes the record). A WRITE still
//   in flight may or may not be seen (NBD does not order in-flight requests).
// - Reading stops while: TypeScript says so, kMaxInflight reported requests are unreplied,
//   queued reply bytes exceed maxQueuedBytes, or a WRITE waits for a buffer (one NEED
//   event says so). Unparsed input held here is at most kStageBytes.
// - A bad request magic stops all parsing (FRAMING event); after DISC or End every
//   further byte is discarded.
// - READs out on the read pool count in flight; while any is out a DISC is not parsed,
//   End does not shut the socket, and the thread does not end (each may still report its
//   READ to TypeScript or write into its granted buffer): CLOSED comes after the last.
// - The fd is closed by the thread, under the mutex, after which sends are refused (2),
//   so no thread writes to a closed (or reused) descriptor. The last event is CLOSED.
// - Arguments are re-checked here (types, ranges, buffer counts) and bad ones throw.
#include "busy_poll.h"
#include "common.h"
#include "nv_append.h"
#include "read_map.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace nvm {
namespace {

constexpr uint32_t kRequestMagic = 0x25609513;
constexpr size_t kHeaderBytes = 28;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdFlagFua = 1;  // NBD_CMD_FLAG_FUA
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr size_t kStageBytes = 64 * 1024;       // unparsed input held at most
constexpr size_t kDirectMinBytes = 16 * 1024;   // payload rest this large: recv straight into it
constexpr size_t kMaxGranted = 1024;            // receive buffers held per connection
constexpr uint32_t kMaxSendBuffers = 64;        // buffers in one reply
constexpr int64_t kMaxPayloadLimit = 64 * 1024 * 1024;  // protocol.ts MAX_PAYLOAD_BYTES
constexpr int64_t kMaxInflightLimit = 65536;
constexpr int64_t kMaxQueuedLimit = 1LL << 30;
constexpr int kEventWidth = 10;

// Event kinds (field 0); fields 1.. per kind.
constexpr double kEvRequest = 1;  // flags, type, cookieHi, cookieLo, offHi, offLo, length, bufferId (-1: none)
constexpr double kEvNeed = 2;     // length: a WRITE of this length waits for a buffer that fits
constexpr double kEvTaken = 3;    // seq: every send up to seq is taken by the kernel
constexpr double kEvFraming = 4;  // magic: bad request magic, parsing stopped
constexpr double kEvEof = 5;      // errno (0: the client closed its side)
constexpr double kEvClosed = 6;   // errno, bytes received: the thread ended, fd closed
constexpr double kEvDone = 7;     // length, microseconds, type, NBD errno[, system errno]: a WRITE, READ or FLUSH served and answered here
constexpr double kEvHeld = 8;     // seq: a WRITE appended here whose reply waits for the replica (nv_append.h)
constexpr int kLazyPostMs = 2;    // DONE-only events wait at most this long to be posted (PostLocked)
constexpr uint32_t kNbdEio = 5;   // NBD_EIO, the error a failed held reply carries
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr size_t kSimpleReplyBytes = 16;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
constexpr uint16_t kReplyFlagDone = 1;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr size_t kStructuredReadHeaderBytes = 20 + 8;  // header + the chunk's offset
constexpr uint16_t kCmdRead = 0;
constexpr double kWantsBuffer = -2;  // REQUEST's bufferId: a plain READ no granted buffer fitted
constexpr int64_t kModeWrites = 1, kModeReads = 2, kModeStructured = 4;

int64_t NowMs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

uint32_t Be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint16_t Be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
void PutBe32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

void PutBe16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}

int64_t NowUs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

// pwrite of all of [data, data+len) at pos; 0 or an errno.
int PwriteAll(int fd, const uint8_t* data, size_t len, uint64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, data + done, len - done, static_cast<off_t>(pos + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += static_cast<size_t>(n);
  }
  return 0;
}

struct Granted {
  double id;
  uint8_t* data;
  size_t cap;
};

struct Send {
  double seq;  // -1: replies of the thread's own (no TAKEN event)
  std::vector<iovec> iov;
  std::vector<uint8_t> own;   // the bytes of the thread's own replies (iov points here)
  std::vector<Granted> give;  // buffers of direct READs sent here: granted again once all is taken
  size_t first = 0;
  size_t left = 0;
};

// One piece of the thread's own replies gathered in a Process pass: bytes of ownReplies_
// (data == nullptr, at = offset there) or a direct READ's buffer.
struct Piece {
  const uint8_t* data;
  size_t at;
  size_t len;
};

enum class St { Header, Payload, Skip, Discard, Dead };

// A memory volume's data chunks as the thread may address them (src/volume/memory.ts keeps
// it in step: a chunk is registered once it holds data and unregistered before its memory
// is freed or reused). The mutex makes a chunk's removal wait for a copy into it.
class MemStore {
 public:
  MemStore(uint64_t sizeBytes, uint64_t chunkBytes) : sizeBytes_(sizeBytes), chunkBytes_(chunkBytes) {}
  const uint64_t sizeBytes_;
  const uint64_t chunkBytes_;
  // Zeroed chunks TypeScript handed over for WRITEs into holes (memory.ts SPARE_CHUNKS, 64):
  // a bound of our own too, so a confused caller cannot grow the lists.
  static constexpr size_t kSparesMax = 1024;
  struct Spare {
    uint8_t* data;
    uint32_t id;
  };
  std::mutex mu;
  std::unordered_map<uint64_t, uint8_t*> chunks;           // under mu
  std::vector<Spare> spares;                               // under mu; at most kSparesMax
  std::vector<std::pair<uint64_t, uint32_t>> adopted;      // under mu: (index, spare id), taken since the last Sync
  bool closed = false;                                     // under mu

  // Copies [data, data+len) to [off, off+len) if every chunk there holds data or (len at
  // most a chunk) a spare can go there (each spare taken is registered and recorded in
  // `adopted`); else false (nothing copied, nothing taken). The caller checked
  // off + len <= sizeBytes_.
  bool CopyIn(uint64_t off, const uint8_t* data, size_t len) {
    std::lock_guard<std::mutex> l(mu);
    if (closed) return false;
    uint64_t first = off / chunkBytes_, last = (off + len - 1) / chunkBytes_;
    // Spares only for WRITEs of up to a chunk: a larger one into holes goes to TypeScript,
    // which copies it into new memory (page faults at every 4 KiB) while this thread
    // receives the next (fio 1M seq write QD8 into a fresh volume: 322-990 MB/s with
    // spares for every size against 943-1391 without).
    size_t spareable = len <= chunkBytes_ ? spares.size() : 0;
    size_t missing = 0;
    for (uint64_t i = first; i <= last; i++) {
      if (chunks.find(i) == chunks.end() && ++missing > spareable) return false;
    }
    for (uint64_t i = first; missing > 0 && i <= last; i++) {
      if (chunks.find(i) != chunks.end()) continue;
      Spare sp = spares.back();
      spares.pop_back();
      chunks[i] = sp.data;
      adopted.emplace_back(i, sp.id);
      missing--;
    }
    size_t done = 0;
    while (done < len) {
      uint64_t pos = off + done;
      uint64_t in = pos % chunkBytes_;
      size_t k = static_cast<size_t>(std::min<uint64_t>(chunkBytes_ - in, len - done));
      memcpy(chunks[pos / chunkBytes_] + in, data + done, k);
      done += k;
    }
    return true;
  }

  // Copies [off, off+len) out to dst (chunks not registered read as zeroes); false only
  // when the store is closed. The caller checked off + len <= sizeBytes_.
  bool CopyOut(uint64_t off, uint8_t* dst, size_t len) {
    std::lock_guard<std::mutex> l(mu);
    if (closed) return false;
    size_t done = 0;
    while (done < len) {
      uint64_t pos = off + done;
      uint64_t in = pos % chunkBytes_;
      size_t k = static_cast<size_t>(std::min<uint64_t>(chunkBytes_ - in, len - done));
      auto it = chunks.find(pos / chunkBytes_);
      if (it == chunks.end()) memset(dst + done, 0, k);
      else memcpy(dst + done, it->second + in, k);
      done += k;
    }
    return true;
  }
};
using MemStorePtr = std::shared_ptr<MemStore>;

// Threads that may block on the disk for the connections' READs: a READ of an engine
// volume whose blocks the ReadMap holds but the page cache does not (ReadMap kWouldBlock)
// is read here, so a connection's cold READs run at its queue depth instead of one at a
// time on its thread (or through TypeScript). One pool for the process, started on first
// use and never torn down (its threads sleep when idle; the process's exit ends them).
// Bounded: at most kReadQueueMax jobs wait; a READ that finds it full goes to TypeScript.
class ReadPool {
 public:
  static constexpr size_t kThreads = 16;
  static constexpr size_t kReadQueueMax = 4096;

  static ReadPool& Get() {
    static ReadPool* pool = new ReadPool();  // leaked on purpose: no destructor races the threads at exit
    return *pool;
  }

  // Queues fn for a pool thread; false (fn not taken) when the queue is full.
  bool Submit(std::function<void()>&& fn) {
    std::lock_guard<std::mutex> l(mu_);
    if (q_.size() >= kReadQueueMax) return false;
    q_.push_back(std::move(fn));
    // Reads answer clients: the launcher makes the threads, at the starting priority.
    if (started_ < kThreads && idle_ == 0 && StartForegroundThread("nvm-nbd-read", [this] { Loop(); })) {
      started_++;
    } else if (started_ == 0) {
      q_.pop_back();  // no thread at all: not taken (the caller answers another way)
      return false;
    } else {
      cv_.notify_one();
    }
    return true;
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      idle_++;
      cv_.wait(l, [this] { return !q_.empty(); });
      idle_--;
      std::function<void()> fn = std::move(q_.front());
      q_.pop_front();
      l.unlock();
      fn();
      l.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  size_t started_ = 0, idle_ = 0;
};

// A WRITE appended by the thread whose reply waits for the replica (nv_append.h).
struct Held {
  uint64_t seq;
  uint8_t cookie[8];
  uint32_t len;
  int64_t hdrUs;
};

// A READ the read pool has done (ok: its data is in g), or a FLUSH the appender's flusher
// has (flushRc: 1 durable, 0 not served there, -errno failed), for the connection's thread
// to answer.
struct PoolDone {
  Granted g;
  std::array<uint8_t, kHeaderBytes> hdr;  // the request header
  uint32_t len;
  int64_t modes;
  int64_t t0;
  bool ok;
  bool flush = false;
  int flushRc = 0;
  uint32_t fuaLen = 0;  // a FUA WRITE (its record appended) that this flush round answers
};

class Conn : public HeldSink, public std::enable_shared_from_this<Conn> {
 public:
  Conn(int fd, int wake, uint32_t maxPayload, uint32_t maxInflight, size_t maxQueued)
      : fd_(fd), wake_(wake), maxPayload_(maxPayload), maxInflight_(maxInflight), maxQueued_(maxQueued) {
    lastRxMs_ = lastTxMs_ = NowMs();
  }

  Napi::ThreadSafeFunction tsfn;

  void Feed(const uint8_t* p, size_t n) {  // leftover from the handshake, before the thread runs
    if (n > kStageBytes) n = kStageBytes;  // the caller checked; handshake input is < 160 KiB
    memcpy(stage_, p, n);
    sLen_ = n;
  }

  void Run() {
    int err = 0;
    for (;;) {
      Process();
      bool wantRecv;
      short events;
      int timeoutMs;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (abort_) break;
        if (sendErr_ != 0) {
          err = sendErr_;
          break;
        }
        if (endReq_ && sendq_.empty() && held_.empty() && poolJobs_ == 0 && !shutWr_) {
          ::shutdown(fd_, SHUT_WR);
          shutWr_ = true;
          if (state_ != St::Dead) state_ = St::Discard;
        }
        wantRecv = CanRecvLocked();
        wakeWanted_ = !wantRecv;
        wantsInput_ = wantRecv && state_ != St::Discard;
        events = static_cast<short>((wantRecv ? POLLIN : 0) | (sendq_.empty() ? 0 : POLLOUT));
        PostLocked();
        timeoutMs = LazyTimeoutLocked();
        // A client at depth 1 sends one request per reply; more since the last wait is a
        // deeper queue, which keeps the thread busy without spinning.
        if (headers_ - headersAtWait_ > 1) busy_.Disarm();
        headersAtWait_ = headers_;
      }
      pollfd fds[2] = {{fd_, events, 0}, {wake_, POLLIN, 0}};
      // Waiting for input only: spin first while the client is at depth 1 (busy_poll.h).
      int r = events == POLLIN ? busy_.Poll(fds, 2) : 0;
      if (r == 0) {
        if (events == POLLIN) busy_.Sleeping();
        r = ::poll(fds, 2, timeoutMs);
        if (events == POLLIN) busy_.Woke(r > 0 && (fds[0].revents & POLLIN));
      }
      if (r < 0) {
        if (errno == EINTR) continue;
        err = errno;
        break;
      }
      if (fds[1].revents & POLLIN) {
        std::lock_guard<std::mutex> l(mu_);
        uint64_t v;
        (void)!::read(wake_, &v, sizeof v);
        wakeSignaled_ = false;
      }
      short re = fds[0].revents;
      if (re & POLLOUT) {
        std::lock_guard<std::mutex> l(mu_);
        FlushLocked();
      }
      if (re & POLLERR) {
        int se = 0;
        socklen_t sl = sizeof se;
        ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &se, &sl);
        err = se != 0 ? se : EIO;
        break;
      }
      if ((re & POLLIN) || ((re & POLLHUP) && wantRecv)) {
        int e = Recv();
        if (e < 0) break;  // EOF while discarding: done
        if (e > 0) {
          err = e;
          break;
        }
      } else if (re & POLLHUP) {
        break;  // both directions shut and nothing to read: nothing more can happen
      }
    }
    std::unique_lock<std::mutex> l(mu_);
    // Pool READs write into granted buffers and may report to TypeScript: they finish
    // before CLOSED (after which TypeScript takes every buffer back).
    poolDone_.wait(l, [this] { return poolFinished_.size() == poolJobs_; });
    poolFinished_.clear();  // nobody to answer; TypeScript takes the buffers back at CLOSED
    poolJobs_ = 0;
    closed_ = true;
    ::close(fd_);
    ::close(wake_);
    if (directFd_ >= 0) ::close(directFd_);
    directFd_ = -1;
    sendq_.clear();
    queued_ = 0;
    held_.clear();  // their clients are gone: nothing to answer
    Emit({kEvClosed, static_cast<double>(err), static_cast<double>(rxBytes_)});
    PostLocked();
    tsfn.Release();
  }

  // ---- called on the JS thread

  bool Grant(const std::vector<Granted>& gs, std::string* why) {
    std::lock_guard<std::mutex> l(mu_);
    if (granted_.size() + gs.size() > kMaxGranted) {
      *why = "too many receive buffers granted";
      return false;
    }
    for (const Granted& g : gs) {
      granted_.push_back(g);
      if (needPending_ && g.cap >= needBytes_) {
        needPending_ = false;
        WakeLocked();
      }
    }
    return true;
  }

  std::vector<double> Revoke() {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<double> ids;
    for (const Granted& g : granted_) ids.push_back(g.id);
    granted_.clear();
    return ids;
  }

  // 1: all written now; 0: queued (a TAKEN event follows); 2: connection closed.
  int SendNow(std::vector<iovec>&& iov, double seq, uint32_t replies) {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return 2;
    inflight_ = replies >= inflight_ ? 0 : inflight_ - replies;
    size_t total = 0;
    for (const iovec& v : iov) total += v.iov_len;
    Send s{seq, std::move(iov), {}, {}};
    s.left = total;
    return QueueLocked(std::move(s)) ? 1 : 0;
  }

  // Plain WRITEs inside [0, sizeBytes) are written to this fd (our own dup) and answered here.
  void SetDirect(int fd, uint64_t sizeBytes, int64_t modes) {
    std::lock_guard<std::mutex> l(mu_);
    if (directFd_ >= 0) ::close(directFd_);
    directFd_ = fd;
    directSize_ = sizeBytes;
    modes_ = modes;
  }

  void SetDirectMem(MemStorePtr m, int64_t modes) {
    std::lock_guard<std::mutex> l(mu_);
    mem_ = std::move(m);
    modes_ = modes;
  }

  // An engine volume: plain READs whose blocks the map holds are answered here; with an
  // appender (and kModeWrites) plain WRITEs of whole blocks are appended to the NVRAM log here.
  void SetDirectEngine(ReadMapPtr m, NvAppenderPtr a, int64_t modes) {
    if (a) a->AddSink(weak_from_this());
    std::lock_guard<std::mutex> l(mu_);
    rmap_ = std::move(m);
    app_ = std::move(a);
    modes_ = app_ ? modes : modes & ~kModeWrites;
  }

  // HeldSink, on the JS thread: the held replies the marks cover go to the connection's
  // thread, which sends them (the JS thread only queues them and wakes it).
  void Settle(uint64_t released, uint64_t failed) override {
    std::lock_guard<std::mutex> l(mu_);
    SettleLocked(released, failed, true);
  }

  void SetReading(bool on) {
    std::lock_guard<std::mutex> l(mu_);
    if (reading_ == on) return;
    reading_ = on;
    WakeLocked();
  }

  void End() {
    std::lock_guard<std::mutex> l(mu_);
    endReq_ = true;
    WakeLocked();
  }

  void Abort() {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return;
    abort_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    WakeLocked();
  }

  Napi::Object State(Napi::Env env) {
    std::lock_guard<std::mutex> l(mu_);
    Napi::Object o = Napi::Object::New(env);
    o.Set("queuedBytes", Napi::Number::New(env, static_cast<double>(queued_)));
    o.Set("midRequest", Napi::Boolean::New(env, midRequest_));
    o.Set("wantsInput", Napi::Boolean::New(env, !closed_ && wantsInput_));
    o.Set("needPending", Napi::Boolean::New(env, needPending_));
    o.Set("lastRxMs", Napi::Number::New(env, static_cast<double>(lastRxMs_)));
    o.Set("lastTxMs", Napi::Number::New(env, static_cast<double>(lastTxMs_)));
    o.Set("inflight", Napi::Number::New(env, inflight_));
    o.Set("granted", Napi::Number::New(env, static_cast<double>(granted_.size())));
    o.Set("bytesReceived", Napi::Number::New(env, static_cast<double>(rxBytes_)));
    o.Set("closed", Napi::Boolean::New(env, closed_));
    o.Set("directWrites", Napi::Number::New(env, static_cast<double>(directWrites_)));
    o.Set("directReads", Napi::Number::New(env, static_cast<double>(directReads_)));
    o.Set("directFlushes", Napi::Number::New(env, static_cast<double>(directFlushes_)));
    o.Set("fuaWrites", Napi::Number::New(env, static_cast<double>(fuaWrites_)));
    o.Set("fuaFallbacks", Napi::Number::New(env, static_cast<double>(fuaFallbacks_)));
    o.Set("heldReplies", Napi::Number::New(env, static_cast<double>(held_.size())));
    o.Set("heldWrites", Napi::Number::New(env, static_cast<double>(heldWrites_)));
    o.Set("poolJobs", Napi::Number::New(env, static_cast<double>(poolJobs_)));
    return o;
  }

  // Runs on the JS thread (thread-safe function): hands the pending events over.
  void Deliver(Napi::Env env, Napi::Function fn) {
    std::vector<double> ev;
    {
      std::lock_guard<std::mutex> l(mu_);
      posted_ = false;
      urgent_ = false;
      lazySinceUs_ = 0;
      ev.swap(events_);
    }
    if (ev.empty()) return;
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, ev.size() * sizeof(double));
    memcpy(ab.Data(), ev.data(), ev.size() * sizeof(double));
    fn.Call({Napi::Float64Array::New(env, ev.size(), ab, 0)});
  }

 private:
  // ---- thread side; fields marked (T) are touched by the thread only.

  bool CanRecvLocked() const {
    if (state_ == St::Dead || inputDone_) return false;
    if (state_ == St::Discard) return true;
    if (sPos_ < sLen_) return false;  // unparsed input waits (blocked)
    return reading_ && !needPending_ && queued_ < maxQueued_ &&
           !(state_ == St::Header && hdrFill_ == 0 && inflight_ >= maxInflight_);
  }

  // Returns 0 on progress, -1 on EOF, or an errno.
  int Recv() {
    uint8_t* into;
    size_t room;
    bool direct = false;
    if (state_ == St::Payload && sPos_ == sLen_ && payLen_ - payFill_ >= kDirectMinBytes) {
      into = cur_.data + payFill_;
      room = payLen_ - payFill_;
      direct = true;
    } else {
      into = stage_ + sLen_;
      room = kStageBytes - sLen_;
      if (room == 0) return 0;
    }
    ssize_t n = ::recv(fd_, into, room, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) return 0;
      return errno;
    }
    if (n > 0) {
      if (direct) payFill_ += static_cast<size_t>(n);
      else sLen_ += static_cast<size_t>(n);
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      if (n == 0) {
        inputDone_ = true;
        if (state_ == St::Discard || state_ == St::Dead) return -1;
        Emit({kEvEof, 0});
        return 0;
      }
      rxBytes_ += static_cast<uint64_t>(n);
      lastRxMs_ = NowMs();
    }
    if (direct && payFill_ == payLen_) FinishWrite();
    std::lock_guard<std::mutex> l(mu_);
    midRequest_ = MidRequest();
    return 0;
  }

  bool MidRequest() const {
    return sPos_ < sLen_ || hdrFill_ > 0 || state_ == St::Payload || state_ == St::Skip;
  }

  // Parses what the stage holds, as far as the limits allow. The parser's fields are the
  // thread's own; the mutex is taken only for what JS shares (claims, events, counters).
  void Process() {
    AnswerPoolJobs();
    while (true) {
      size_t avail = sLen_ - sPos_;
      if (state_ == St::Dead) {
        sPos_ = sLen_;
        break;
      }
      if (state_ == St::Discard) {
        sPos_ = sLen_;
        break;
      }
      if (state_ == St::Skip) {
        size_t k = static_cast<size_t>(std::min<uint64_t>(skipLeft_, avail));
        sPos_ += k;
        skipLeft_ -= k;
        if (skipLeft_ == 0) state_ = St::Header;
        if (avail == 0 || state_ == St::Skip) break;
        continue;
      }
      if (state_ == St::Payload) {
        size_t k = std::min(payLen_ - payFill_, avail);
        memcpy(cur_.data + payFill_, stage_ + sPos_, k);
        payFill_ += k;
        sPos_ += k;
        if (payFill_ < payLen_) break;
        FinishWrite();
        continue;
      }
      // Header
      if (hdrFill_ < kHeaderBytes) {
        if (hdrFill_ == 0) {
          if (avail == 0) break;
          std::lock_guard<std::mutex> l(mu_);
          if (inflight_ >= maxInflight_) break;
        }
        size_t k = std::min(kHeaderBytes - hdrFill_, avail);
        memcpy(hdr_ + hdrFill_, stage_ + sPos_, k);
        hdrFill_ += k;
        sPos_ += k;
        if (hdrFill_ < kHeaderBytes) break;
      }
      if (TryDirectRead() || TryDirectFlush()) {
        hdrFill_ = 0;
        continue;
      }
      std::lock_guard<std::mutex> l(mu_);
      // A DISC must come after every request before it reached TypeScript: a pool READ
      // may still be reported (FinishPoolJob), so DISC waits for them (they wake us), and for FLUSHes on the flusher.
      if (Be32(hdr_) == kRequestMagic && Be16(hdr_ + 6) == kCmdDisc && poolJobs_ > 0) break;
      if (!ParseHeaderLocked()) break;  // waits for a buffer
    }
    if (sPos_ == sLen_) sPos_ = sLen_ = 0;
    std::lock_guard<std::mutex> l(mu_);
    midRequest_ = MidRequest();
    QueuePiecesLocked();
  }

  // The direct WRITEs' and READs' replies of this pass so far, in one writev.
  void QueuePiecesLocked() {
    if (pieces_.empty()) return;
    Send out{-1, {}, std::move(ownReplies_), std::move(gives_)};
    ownReplies_.clear();
    gives_.clear();
    size_t total = 0;
    for (const Piece& p : pieces_) {
      const uint8_t* base = p.data != nullptr ? p.data : out.own.data() + p.at;
      out.iov.push_back(iovec{const_cast<uint8_t*>(base), p.len});
      total += p.len;
    }
    pieces_.clear();
    out.left = total;
    QueueLocked(std::move(out));
  }

  // The header in hdr_ is complete. A plain FLUSH (no flags) to an engine whose appender
  // serves FLUSH (nv_append.h: no replica to wait for) goes to the appender's flusher
  // (true): the replies this pass holds go out first; one fdatasync of the NVRAM file
  // then covers every record in the region, so every WRITE answered before this FLUSH
  // was read; the flusher hands it back (FinishPoolJob) and this thread answers it in a
  // later pass (AnswerPoolJobs): success, EIO (the DONE event carries the errno: the
  // volume fails its log), or, if the appender stopped flushing first, TypeScript's.
  // Counted in flight and in poolJobs_ meanwhile. False: TypeScript answers it.
  bool TryDirectFlush() {
    if (Be32(hdr_) != kRequestMagic || Be16(hdr_ + 4) != 0 || Be16(hdr_ + 6) != kCmdFlush) return false;
    NvAppenderPtr app;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!(modes_ & kModeWrites) || !app_) return false;
      app = app_;
      QueuePiecesLocked();  // answered writes need not wait for the disk
    }
    return FlushRound(app, NowUs(), 0);
  }

  // One flush round answers the request in hdr_: a FLUSH, or (fuaLen > 0) a FUA WRITE whose
  // record is appended. Nothing else from this client to read (queue depth 1, as fsync=1
  // runs): made here, unless a round runs already (then the next one on the flusher is
  // shared), which hands it back (FinishPoolJob) to be answered in a later pass. True:
  // answered or queued; false: no round can be made here (the caller hands it on).
  bool FlushRound(const NvAppenderPtr& app, int64_t t0, uint32_t fuaLen) {
    int unread = 0;
    if (sPos_ == sLen_ && ::ioctl(fd_, FIONREAD, &unread) == 0 && unread == 0) {
      int rc = app->FlushIfIdle();
      if (rc == 0) return false;
      if (rc != 2) {
        std::lock_guard<std::mutex> l(mu_);
        AnswerFlushLocked(hdr_, rc, t0, fuaLen);
        return true;
      }
    }
    return SubmitPoolJob([&app, t0, fuaLen](const std::shared_ptr<Conn>& self, const std::array<uint8_t, kHeaderBytes>& h) {
      return app->SubmitFlush([self, h, t0, fuaLen](int rc) {
        PoolDone d{Granted{-1, nullptr, 0}, h, 0, 0, t0, rc > 0};
        d.flush = true;
        d.flushRc = rc;
        d.fuaLen = fuaLen;
        self->FinishPoolJob(std::move(d));
      });
    });
  }

  // Hands this request (its header copied) to another thread: counted in flight (the
  // reading cap holds) and in poolJobs_ (the thread does not end, shut down or take a DISC
  // while any is out) before submit(self, header) runs; both undone if submit says false
  // (its queue is full). The job ends with FinishPoolJob.
  template <typename Submit>
  bool SubmitPoolJob(Submit&& submit) {
    std::array<uint8_t, kHeaderBytes> h;
    memcpy(h.data(), hdr_, kHeaderBytes);
    std::shared_ptr<Conn> self = shared_from_this();
    {
      std::lock_guard<std::mutex> l(mu_);
      inflight_++;
      poolJobs_++;
    }
    if (submit(self, h)) return true;
    std::lock_guard<std::mutex> l(mu_);
    inflight_--;
    poolJobs_--;
    return false;
  }

  // A FLUSH the appender made (rc 1) or failed (-errno): its reply in this pass's writev, its
  // DONE event (a failure is urgent: the volume must fail its log before it answers more).
  // fuaLen > 0: the round answers a FUA WRITE of that many bytes.
  void AnswerFlushLocked(const uint8_t* h, int rc, int64_t t0, uint32_t fuaLen = 0) {
    uint32_t err = rc > 0 ? 0 : kNbdEio;
    uint8_t* r = OwnBytes(kSimpleReplyBytes);
    PutBe32(r, kSimpleReplyMagic);
    PutBe32(r + 4, err);
    memcpy(r + 8, h + 8, 8);  // the cookie, verbatim
    if (fuaLen > 0) {
      if (err == 0) directWrites_++;
      fuaWrites_++;
    } else {
      directFlushes_++;
    }
    Emit({kEvDone, static_cast<double>(fuaLen), static_cast<double>(NowUs() - t0),
          static_cast<double>(fuaLen > 0 ? kCmdWrite : kCmdFlush), static_cast<double>(err),
          static_cast<double>(rc > 0 ? 0 : -rc)});
    if (err != 0) urgent_ = true;
  }

  // Appends n bytes to the thread's own replies of this pass; returns where they start.
  uint8_t* OwnBytes(size_t n) {
    size_t at = ownReplies_.size();
    ownReplies_.resize(at + n);
    if (!pieces_.empty() && pieces_.back().data == nullptr) pieces_.back().len += n;
    else pieces_.push_back(Piece{nullptr, at, n});
    return ownReplies_.data() + at;
  }

  // The header in hdr_ is complete. A plain READ inside the volume, when direct reads are
  // on and a granted buffer fits, is read here into that buffer and answered here (true).
  // False: ParseHeaderLocked reports it (wantBuf_ set if only a buffer was missing).
  bool TryDirectRead() {
    wantBuf_ = false;
    if (Be32(hdr_) != kRequestMagic || Be16(hdr_ + 4) != 0 || Be16(hdr_ + 6) != kCmdRead) return false;
    uint32_t len = Be32(hdr_ + 24);
    uint64_t off = (uint64_t{Be32(hdr_ + 16)} << 32) | Be32(hdr_ + 20);
    int dfd;
    uint64_t size;
    int64_t modes;
    MemStorePtr mem;
    ReadMapPtr rmap;
    Granted g{-1, nullptr, 0};
    {
      std::lock_guard<std::mutex> l(mu_);
      modes = modes_;
      dfd = directFd_;
      size = directSize_;
      mem = mem_;
      rmap = rmap_;
      if (mem) size = mem->sizeBytes_;
      if (rmap) size = rmap->SizeBytes();
      if (!(modes & kModeReads) || (dfd < 0 && !mem && !rmap)) return false;
      // The engine answers only whole blocks (a partial one is TypeScript's, without a buffer).
      if (rmap && (off % ReadMap::kBlock != 0 || len % ReadMap::kBlock != 0)) return false;
      if (len == 0 || len > maxPayload_ || off > size || len > size - off) return false;
      size_t best = granted_.size();
      for (size_t i = 0; i < granted_.size(); i++) {
        if (granted_[i].cap >= len && (best == granted_.size() || granted_[i].cap < granted_[best].cap)) best = i;
      }
      if (best == granted_.size()) {
        wantBuf_ = true;
        return false;
      }
      g = granted_[best];
      granted_.erase(granted_.begin() + static_cast<std::ptrdiff_t>(best));
    }
    int64_t t0 = NowUs();
    bool ok;
    if (rmap) {
      ReadMap::ReadResult r = rmap->Read(off, g.data, len, false);
      if (r == ReadMap::ReadResult::kWouldBlock && ReadLater(rmap, g, off, len, modes, t0)) return true;
      ok = r == ReadMap::ReadResult::kHit;
    } else {
      ok = mem ? mem->CopyOut(off, g.data, len) : PreadCached(dfd, g.data, len, off);
    }
    if (!ok) {
      std::lock_guard<std::mutex> l(mu_);
      granted_.push_back(g);  // unclaimed again; TypeScript reads it with the volume's code
      return false;
    }
    PutReadReplyHeader(OwnBytes(ReadReplyHeaderBytes(modes)), hdr_, len, modes);
    pieces_.push_back(Piece{g.data, 0, len});
    gives_.push_back(g);
    std::lock_guard<std::mutex> l(mu_);
    directReads_++;
    Emit({kEvDone, static_cast<double>(len), static_cast<double>(NowUs() - t0), static_cast<double>(kCmdRead)});
    return true;
  }

  static size_t ReadReplyHeaderBytes(int64_t modes) {
    return (modes & kModeStructured) ? kStructuredReadHeaderBytes : kSimpleReplyBytes;
  }

  // A successful READ's reply header (the data follows it) for request header h.
  static void PutReadReplyHeader(uint8_t* r, const uint8_t* h, uint32_t len, int64_t modes) {
    if (modes & kModeStructured) {
      PutBe32(r, kStructuredReplyMagic);
      PutBe16(r + 4, kReplyFlagDone);
      PutBe16(r + 6, kReplyTypeOffsetData);
      memcpy(r + 8, h + 8, 8);  // the cookie, verbatim
      PutBe32(r + 16, 8 + len);
      memcpy(r + 20, h + 16, 8);  // the offset, verbatim
    } else {
      PutBe32(r, kSimpleReplyMagic);
      PutBe32(r + 4, 0);
      memcpy(r + 8, h + 8, 8);
    }
  }

  // A READ the map holds but the page cache does not: the read pool reads it (waiting for
  // the disk) into the claimed buffer g and answers it (FinishPoolJob; SubmitPoolJob
  // counts it). False: the pool is full; the caller gives it to TypeScript.
  bool ReadLater(const ReadMapPtr& rmap, const Granted& g, uint64_t off, uint32_t len, int64_t modes, int64_t t0) {
    return SubmitPoolJob([&rmap, &g, off, len, modes, t0](const std::shared_ptr<Conn>& self, const std::array<uint8_t, kHeaderBytes>& h) {
      return ReadPool::Get().Submit([self, rmap, g, off, len, modes, t0, h] {
        bool ok = rmap->Read(off, g.data, len, true) == ReadMap::ReadResult::kHit;
        self->FinishPoolJob(PoolDone{g, h, len, modes, t0, ok});
      });
    });
  }

  // On a pool or the flusher thread: hands the READ or FLUSH back to the connection's thread (AnswerPoolJobs).
  void FinishPoolJob(PoolDone&& d) {
    std::lock_guard<std::mutex> l(mu_);
    poolFinished_.push_back(std::move(d));
    if (poolFinished_.size() == poolJobs_) poolDone_.notify_all();
    WakeLocked();
  }

  // On the connection's thread, at the start of a Process pass: the pool's finished READs
  // are answered in this pass's writev (ok), or reported to TypeScript as the thread would
  // have (their buffers unclaimed again), which reads them with the volume's own code.
  void AnswerPoolJobs() {
    std::vector<PoolDone> done;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (poolFinished_.empty()) return;
      done.swap(poolFinished_);
    }
    for (PoolDone& d : done) {
      if (d.flush || !d.ok) continue;
      PutReadReplyHeader(OwnBytes(ReadReplyHeaderBytes(d.modes)), d.hdr.data(), d.len, d.modes);
      pieces_.push_back(Piece{d.g.data, 0, d.len});
      gives_.push_back(d.g);
    }
    std::lock_guard<std::mutex> l(mu_);
    int64_t now = NowUs();
    for (PoolDone& d : done) {
      poolJobs_--;
      if (d.flush) {
        if (d.flushRc == 0) {
          // Stays in flight: TypeScript answers it (a FUA WRITE as a FLUSH of its cookie).
          if (d.fuaLen > 0) EmitFuaFallbackLocked(d.hdr.data());
          else EmitRequestLocked(d.hdr.data(), -1);
          continue;
        }
        inflight_--;
        AnswerFlushLocked(d.hdr.data(), d.flushRc, d.t0, d.fuaLen);
        continue;
      }
      if (d.ok) {
        inflight_--;
        directReads_++;
        Emit({kEvDone, static_cast<double>(d.len), static_cast<double>(now - d.t0), static_cast<double>(kCmdRead)});
      } else {
        granted_.push_back(d.g);
        EmitRequestLocked(d.hdr.data(), -1);  // stays in flight: TypeScript answers it
      }
    }
  }

  // The header in hdr_ is complete. False: it must wait (no buffer fits its payload).
  bool ParseHeaderLocked() {
    headers_++;
    uint32_t magic = Be32(hdr_);
    if (magic != kRequestMagic) {
      state_ = St::Dead;
      hdrFill_ = 0;
      Emit({kEvFraming, static_cast<double>(magic)});
      return true;
    }
    uint16_t type = Be16(hdr_ + 6);
    uint32_t len = Be32(hdr_ + 24);
    if (type == kCmdWrite && len > 0 && len <= maxPayload_) {
      size_t best = granted_.size();
      for (size_t i = 0; i < granted_.size(); i++) {
        if (granted_[i].cap >= len && (best == granted_.size() || granted_[i].cap < granted_[best].cap)) best = i;
      }
      if (best == granted_.size()) {
        if (!needPending_) {
          needPending_ = true;
          needBytes_ = len;
          Emit({kEvNeed, static_cast<double>(len)});
        }
        return false;
      }
      cur_ = granted_[best];
      granted_.erase(granted_.begin() + static_cast<std::ptrdiff_t>(best));
      hdrUs_ = NowUs();
      payLen_ = len;
      payFill_ = 0;
      state_ = St::Payload;
      hdrFill_ = 0;
      return true;
    }
    EmitRequestLocked(wantBuf_ ? kWantsBuffer : -1);
    wantBuf_ = false;
    hdrFill_ = 0;
    if (type == kCmdDisc) {
      state_ = St::Discard;
    } else {
      inflight_++;
      if (type == kCmdWrite && len > maxPayload_) {  // refused; its payload streams past
        skipLeft_ = len;
        state_ = St::Skip;
      }
    }
    return true;
  }

  // The payload is in cur_. A plain WRITE inside the volume, when a direct fd is set, is
  // written here (pwrite) and answered here; anything else, or a failed pwrite, goes to JS
  // (which writes it through the volume and answers with the volume's own error).
  void FinishWrite() {
    int dfd;
    uint64_t size;
    MemStorePtr mem;
    NvAppenderPtr app;
    {
      std::lock_guard<std::mutex> l(mu_);
      bool writes = (modes_ & kModeWrites) != 0;
      dfd = writes ? directFd_ : -1;
      size = directSize_;
      mem = writes ? mem_ : nullptr;
      app = writes ? app_ : nullptr;
    }
    if (mem) size = mem->sizeBytes_;
    uint64_t off = (uint64_t{Be32(hdr_ + 16)} << 32) | Be32(hdr_ + 20);
    bool plain = Be16(hdr_ + 4) == 0 && Be16(hdr_ + 6) == kCmdWrite;
    // A FUA WRITE to an engine whose appender makes flush rounds: appended as a plain one,
    // answered when a round made it durable (and, under a sync mirror, the destination).
    if (!plain && app && Be16(hdr_ + 4) == kCmdFlagFua && Be16(hdr_ + 6) == kCmdWrite && payLen_ > 0 && app->ServesFlush() &&
        FuaWrite(app, off)) {
      cur_ = Granted{-1, nullptr, 0};
      state_ = St::Header;
      return;
    }
    // The appender checks the range against the volume itself (and refuses partial blocks).
    bool inside = plain && payLen_ > 0 && (app || (off <= size && payLen_ <= size - off));
    AppendResult appended{0, false};
    bool written = inside && ((dfd >= 0 && PwriteAll(dfd, cur_.data, payLen_, off) == 0) ||
                              (mem && mem->CopyIn(off, cur_.data, payLen_)) ||
                              (app && (appended = app->Append(off, cur_.data, payLen_)).seq != 0));
    if (written && appended.held) {
      // In the region; the reply waits for the replica (SettleLocked sends it). The buffer
      // is free again: the record holds the data.
      std::lock_guard<std::mutex> l(mu_);
      granted_.push_back(cur_);
      Held h{appended.seq, {}, static_cast<uint32_t>(payLen_), hdrUs_};
      memcpy(h.cookie, hdr_ + 8, 8);
      held_.push_back(h);
      inflight_++;
      heldWrites_++;
      Emit({kEvHeld, static_cast<double>(appended.seq)});
      SettleLocked(app->Released(), app->Failed());  // a Release may have come before it was held
    } else if (written) {
      uint8_t* r = OwnBytes(kSimpleReplyBytes);
      PutBe32(r, kSimpleReplyMagic);
      PutBe32(r + 4, 0);
      memcpy(r + 8, hdr_ + 8, 8);  // the cookie, verbatim
      std::lock_guard<std::mutex> l(mu_);
      granted_.push_back(cur_);  // still granted (and charged): free for the next WRITE
      directWrites_++;
      Emit({kEvDone, static_cast<double>(payLen_), static_cast<double>(NowUs() - hdrUs_), static_cast<double>(kCmdWrite)});
    } else {
      std::lock_guard<std::mutex> l(mu_);
      EmitRequestLocked(cur_.id);
      inflight_++;
    }
    cur_ = Granted{-1, nullptr, 0};
    state_ = St::Header;
  }

  // A FUA WRITE: its record appended (false: refused, TypeScript writes it), then a flush
  // round answers it (made here when nothing else waits, else on the flusher), as a FLUSH
  // read right after a plain WRITE would be: the round covers every record in the region.
  // A round that cannot be made here (rc 0) hands TypeScript a FLUSH with this WRITE's
  // cookie (its record is in the log: a FLUSH makes it durable), never the WRITE again.
  bool FuaWrite(const NvAppenderPtr& app, uint64_t off) {
    if (app->Append(off, cur_.data, payLen_).seq == 0) return false;
    {
      std::lock_guard<std::mutex> l(mu_);
      granted_.push_back(cur_);  // the record holds the data
      QueuePiecesLocked();       // answered writes need not wait for the disk
    }
    if (!FlushRound(app, hdrUs_, payLen_)) {
      std::lock_guard<std::mutex> l(mu_);
      inflight_++;
      EmitFuaFallbackLocked(hdr_);
    }
    return true;
  }

  // TypeScript answers a FUA WRITE whose record is appended with a FLUSH of that cookie.
  void EmitFuaFallbackLocked(const uint8_t* h) {
    uint8_t f[kHeaderBytes];
    memcpy(f, h, kHeaderBytes);
    f[4] = f[5] = 0;  // no flags
    f[6] = 0;
    f[7] = static_cast<uint8_t>(kCmdFlush);
    memset(f + 16, 0, 12);  // offset 0, length 0
    fuaFallbacks_++;
    EmitRequestLocked(f, -1);
  }

  // Answers the held replies (oldest first: a connection's appends are in seq order) whose
  // seq is <= released (success) or <= failed (EIO), in one send: written at once on the
  // connection's thread, queued for it (and it woken) on any other.
  void SettleLocked(uint64_t released, uint64_t failed, bool queueOnly = false) {
    if (held_.empty() || closed_) return;
    Send s{-1, {}, {}, {}};
    int64_t now = NowUs();
    size_t n = 0;
    while (!held_.empty()) {
      const Held& h = held_.front();
      uint32_t err;
      if (h.seq <= released) err = 0;
      else if (h.seq <= failed) err = kNbdEio;
      else break;
      s.own.resize(s.own.size() + kSimpleReplyBytes);
      uint8_t* r = s.own.data() + s.own.size() - kSimpleReplyBytes;
      PutBe32(r, kSimpleReplyMagic);
      PutBe32(r + 4, err);
      memcpy(r + 8, h.cookie, 8);
      if (err == 0) directWrites_++;
      Emit({kEvDone, static_cast<double>(h.len), static_cast<double>(now - h.hdrUs), static_cast<double>(kCmdWrite),
            static_cast<double>(err)});
      held_.pop_front();
      n++;
    }
    if (n == 0) return;
    inflight_ = n >= inflight_ ? 0 : inflight_ - static_cast<uint32_t>(n);
    s.iov.push_back(iovec{s.own.data(), s.own.size()});
    s.left = s.own.size();
    if (queueOnly) {
      queued_ += s.left;
      sendq_.push_back(std::move(s));
      WakeLocked();  // it sends them, reads again below the in-flight cap, or shuts down after End
    } else {
      QueueLocked(std::move(s));
    }
    PostLocked();
  }

  void EmitRequestLocked(double bufferId) { EmitRequestLocked(hdr_, bufferId); }
  void EmitRequestLocked(const uint8_t* h, double bufferId) {
    Emit({kEvRequest, static_cast<double>(Be16(h + 4)), static_cast<double>(Be16(h + 6)),
          static_cast<double>(Be32(h + 8)), static_cast<double>(Be32(h + 12)), static_cast<double>(Be32(h + 16)),
          static_cast<double>(Be32(h + 20)), static_cast<double>(Be32(h + 24)), bufferId});
  }

  void Emit(std::initializer_list<double> f) {
    if (*f.begin() != kEvDone) urgent_ = true;
    size_t at = events_.size();
    events_.resize(at + kEventWidth, 0);
    size_t i = 0;
    for (double v : f) events_[at + i++] = v;
  }

  // Posts the pending events to the JS thread, unless they are only DONE events (counts for
  // statistics: nothing waits on them), which wait up to kLazyPostMs to go with others
  // (LazyTimeoutLocked): the JS thread wakes ~once a millisecond, not once per READ or WRITE.
  void PostLocked(bool force = false) {
    if (events_.empty() || posted_) return;
    if (!urgent_ && !force) {
      if (lazySinceUs_ == 0) lazySinceUs_ = NowUs();
      return;
    }
    posted_ = true;
    urgent_ = false;
    lazySinceUs_ = 0;
    tsfn.NonBlockingCall(this, [](Napi::Env env, Napi::Function fn, Conn* c) {
      if (env != nullptr) c->Deliver(env, fn);
    });
  }

  // The poll timeout for lazy events (-1: none wait); posts them if they waited long enough.
  int LazyTimeoutLocked() {
    if (events_.empty() || posted_ || lazySinceUs_ == 0) return -1;
    if (NowUs() - lazySinceUs_ >= kLazyPostMs * 1000) {
      PostLocked(true);
      return -1;
    }
    return kLazyPostMs;
  }

  // One eventfd write until the thread has read it (the thread wakes once for many).
  void WakeLocked() {
    if (closed_ || wakeSignaled_) return;
    uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof one);
    wakeSignaled_ = true;
  }

  // Writes s now if nothing is queued before it, else (or for what the socket did not take)
  // queues it for the thread. True when all of it was written.
  bool QueueLocked(Send&& s) {
    if (sendq_.empty() && sendErr_ == 0) {
      Advance(&s);
      if (s.left == 0) {
        GiveBackLocked(&s);
        if (wakeWanted_) WakeLocked();
        return true;
      }
    }
    queued_ += s.left;
    sendq_.push_back(std::move(s));
    WakeLocked();
    return false;
  }

  // Writes as much of s as the socket takes now.
  void Advance(Send* s) {
    while (s->left > 0) {
      msghdr m{};
      m.msg_iov = &s->iov[s->first];
      m.msg_iovlen = std::min<size_t>(s->iov.size() - s->first, IOV_MAX);
      ssize_t n = ::sendmsg(fd_, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) sendErr_ = errno;
        return;
      }
      lastTxMs_ = NowMs();
      size_t k = static_cast<size_t>(n);
      s->left -= k;
      while (k > 0) {
        iovec& v = s->iov[s->first];
        if (k >= v.iov_len) {
          k -= v.iov_len;
          v.iov_len = 0;
          s->first++;
        } else {
          v.iov_base = static_cast<uint8_t*>(v.iov_base) + k;
          v.iov_len -= k;
          k = 0;
        }
      }
      while (s->first < s->iov.size() && s->iov[s->first].iov_len == 0) s->first++;
    }
  }

  void FlushLocked() {
    while (!sendq_.empty() && sendErr_ == 0) {
      Send& s = sendq_.front();
      size_t before = s.left;
      Advance(&s);
      queued_ -= before - s.left;
      if (s.left > 0) return;
      if (s.seq >= 0) Emit({kEvTaken, s.seq});
      GiveBackLocked(&s);
      sendq_.pop_front();
    }
  }

  // The kernel took all of s: its direct READs' buffers are free (and still charged) for
  // the next READ or WRITE. A WRITE header waiting for one is parsed again: the thread is
  // woken (it may be the caller, past its parse loop and about to sleep on the wake fd
  // only: a grant TypeScript makes for the NEED it sent would then not wake it, since no
  // NEED is pending any more).
  void GiveBackLocked(Send* s) {
    for (const Granted& g : s->give) {
      granted_.push_back(g);
      if (needPending_ && g.cap >= needBytes_) {
        needPending_ = false;  // the thread parses on
        WakeLocked();
      }
    }
    s->give.clear();
  }

  const int fd_;
  const int wake_;
  const uint32_t maxPayload_;
  const uint32_t maxInflight_;
  const size_t maxQueued_;
  std::mutex mu_;
  // Shared, under mu_.
  bool reading_ = true, endReq_ = false, abort_ = false, closed_ = false, shutWr_ = false;
  bool needPending_ = false, inputDone_ = false, posted_ = false, wakeWanted_ = false;
  // Published by the thread for State(): whether input is mid-request, whether it would read.
  bool midRequest_ = false, wantsInput_ = false;
  int sendErr_ = 0;
  size_t needBytes_ = 0;
  int directFd_ = -1;
  uint64_t directSize_ = 0;
  MemStorePtr mem_;
  ReadMapPtr rmap_;
  NvAppenderPtr app_;
  int64_t modes_ = 0;
  uint64_t directWrites_ = 0, directReads_ = 0, directFlushes_ = 0;
  uint64_t fuaWrites_ = 0, fuaFallbacks_ = 0;  // FUA WRITEs answered by a flush round here / handed to TypeScript as a FLUSH
  std::vector<Granted> granted_;
  std::deque<Send> sendq_;
  size_t queued_ = 0;
  uint32_t inflight_ = 0;
  std::vector<double> events_;
  int64_t lastRxMs_, lastTxMs_;
  uint64_t rxBytes_ = 0;
  // Parser: the thread's own (JS reads only what is published above).
  St state_ = St::Header;
  uint8_t stage_[kStageBytes];
  size_t sPos_ = 0, sLen_ = 0;
  uint8_t hdr_[kHeaderBytes];
  size_t hdrFill_ = 0;
  Granted cur_{-1, nullptr, 0};
  size_t payLen_ = 0, payFill_ = 0;
  uint64_t skipLeft_ = 0;
  int64_t hdrUs_ = 0;
  std::vector<uint8_t> ownReplies_;
  std::vector<Piece> pieces_;   // this pass's own replies, in order (ownReplies_ bytes, READ buffers)
  std::vector<Granted> gives_;  // this pass's direct READs' buffers
  std::deque<Held> held_;       // under mu_: replies waiting for the replica, in seq order
  uint64_t heldWrites_ = 0;     // under mu_
  uint32_t poolJobs_ = 0;       // under mu_: READs out on the read pool (ReadLater) and FLUSHes on the flusher (TryDirectFlush) until answered here
  std::vector<PoolDone> poolFinished_;  // under mu_: of those, the ones the pool has done
  std::condition_variable poolDone_;    // with mu_: every READ out on the pool is done
  bool wakeSignaled_ = false;   // under mu_: the wake eventfd is written and not yet read
  bool urgent_ = false;         // under mu_: events_ holds more than DONE events
  BusyPoller busy_;             // the thread's own
  uint64_t headers_ = 0, headersAtWait_ = 0;  // the thread's own: request headers parsed, and at the last wait
  int64_t lazySinceUs_ = 0;     // under mu_: when the oldest unposted DONE-only batch began (0: none)
  bool wantBuf_ = false;        // the header being reported is a plain READ no buffer fitted
};

using ConnPtr = std::shared_ptr<Conn>;

// Type tags on the two kinds of handle, so one is never taken for the other.
constexpr napi_type_tag kConnTag = {0x6e626473657276ULL, 0x636f6e6e656374ULL};
constexpr napi_type_tag kStoreTag = {0x6e626473657276ULL, 0x6d656d73746f72ULL};
constexpr napi_type_tag kReadMapTag = {0x6e626473657276ULL, 0x726561646d6170ULL};
constexpr napi_type_tag kAppenderTag = {0x6e626473657276ULL, 0x6e76617070656eULL};

bool HasTag(const Napi::CallbackInfo& info, size_t i, const napi_type_tag& tag) {
  if (i >= info.Length() || !info[i].IsExternal()) return false;
  bool ok = false;
  return napi_check_object_type_tag(info.Env(), info[i], &tag, &ok) == napi_ok && ok;
}

// info[i] as the shared pointer inside a handle tagged `tag`; else throws "<fn>: <what>".
template <class P>
bool GetHandle(const Napi::CallbackInfo& info, size_t i, const char* fn, const napi_type_tag& tag, const char* what, P* out) {
  if (!HasTag(info, i, tag)) {
    ThrowType(info.Env(), std::string(fn) + ": " + what);
    return false;
  }
  *out = *info[i].As<Napi::External<P>>().Data();
  return true;
}

bool GetConn(const Napi::CallbackInfo& info, const char* fn, ConnPtr* out) {
  return GetHandle(info, 0, fn, kConnTag, "handle must be an nbdServeStart handle", out);
}

// A dup (close-on-exec) of fd that the caller owns; -1 with a JS error pending.
int DupOwn(Napi::Env env, int fd) {
  int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) ErrnoError(env, errno, "dup").ThrowAsJavaScriptException();
  return own;
}

// nbdServeBusyPoll(us): the busy-poll window of every connection thread (0: never spin).
Napi::Value BusyPollSet(const Napi::CallbackInfo& info) {
  int64_t us;
  if (!GetInt(info, 0, "nbdServeBusyPoll", "us", 0, kBusyPollMaxUs, &us)) return info.Env().Undefined();
  gBusyPollUs.store(us);
  return info.Env().Undefined();
}

// nbdServeBusyPollPause(paused): while true no connection thread spins; the window is kept.
Napi::Value BusyPollPause(const Napi::CallbackInfo& info) {
  bool paused;
  if (!GetBool(info, 0, "nbdServeBusyPollPause", "paused", &paused)) return info.Env().Undefined();
  gBusyPollPaused.store(paused);
  return info.Env().Undefined();
}

// nbdServeBusyPollStats() -> [windows spun, windows that ended in input, microseconds spun]
Napi::Value BusyPollStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array a = Napi::Array::New(env, 3);
  a.Set(0u, Napi::Number::New(env, static_cast<double>(gSpinWindows.load())));
  a.Set(1u, Napi::Number::New(env, static_cast<double>(gSpinHits.load())));
  a.Set(2u, Napi::Number::New(env, static_cast<double>(gSpinUs.load())));
  return a;
}

Napi::Value Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdServeStart";
  int fd;
  Napi::Buffer<uint8_t> leftover;
  int64_t maxPayload, maxInflight, maxQueued;
  Napi::Function cb;
  if (!GetFd(info, 0, fn, &fd) || !GetBuffer(info, 1, fn, "leftover", &leftover) ||
      !GetInt(info, 2, fn, "maxPayloadBytes", 1, kMaxPayloadLimit, &maxPayload) ||
      !GetInt(info, 3, fn, "maxInflight", 1, kMaxInflightLimit, &maxInflight) ||
      !GetInt(info, 4, fn, "maxQueuedBytes", 1, kMaxQueuedLimit, &maxQueued) || !GetCallback(info, 5, fn, &cb)) {
    return env.Undefined();
  }
  if (leftover.Length() > kStageBytes) {
    ThrowRange(env, std::string(fn) + ": leftover longer than " + std::to_string(kStageBytes) + " bytes");
    return env.Undefined();
  }
  int sockType = 0;
  socklen_t sl = sizeof sockType;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &sockType, &sl) != 0 || sockType != SOCK_STREAM) {
    ThrowType(env, std::string(fn) + ": fd must be a stream socket");
    return env.Undefined();
  }
  int own = DupOwn(env, fd);
  if (own < 0) return env.Undefined();
  int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    int e = errno;
    ::close(own);
    ErrnoError(env, e, "eventfd").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  ConnPtr c = std::make_shared<Conn>(own, wake, static_cast<uint32_t>(maxPayload), static_cast<uint32_t>(maxInflight),
                                     static_cast<size_t>(maxQueued));
  c->Feed(leftover.Data(), leftover.Length());
  auto* ctx = new ConnPtr(c);
  c->tsfn = Napi::ThreadSafeFunction::New(env, cb, "nbdServe", 0, 1, ctx,
                                          [](Napi::Env, ConnPtr* p) { delete p; });
  if (!StartForegroundThread("nvm-nbd-conn", [c]() { c->Run(); })) {  // the launcher: at the starting priority
    c->tsfn.Release();
    ::close(own);  // Run() would have closed both
    ::close(wake);
    ErrnoError(env, EAGAIN, "pthread_create").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto handle = Napi::External<ConnPtr>::New(env, new ConnPtr(c), [](Napi::Env, ConnPtr* p) { delete p; });
  napi_type_tag_object(env, handle, &kConnTag);
  return handle;
}

Napi::Value Grant(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdServeGrant";
  ConnPtr c;
  if (!GetConn(info, fn, &c)) return env.Undefined();
  if (info.Length() < 3 || !info[1].IsArray() || !info[2].IsArray()) {
    ThrowType(env, std::string(fn) + ": ids and buffers must be arrays");
    return env.Undefined();
  }
  Napi::Array ids = info[1].As<Napi::Array>();
  Napi::Array bufs = info[2].As<Napi::Array>();
  if (ids.Length() != bufs.Length() || ids.Length() == 0 || ids.Length() > kMaxGranted) {
    ThrowRange(env, std::string(fn) + ": 1.." + std::to_string(kMaxGranted) + " ids, one per buffer");
    return env.Undefined();
  }
  std::vector<Granted> gs;
  gs.reserve(ids.Length());
  for (uint32_t i = 0; i < ids.Length(); i++) {
    Napi::Value idv = ids.Get(i);
    Napi::Value bv = bufs.Get(i);
    double id = idv.IsNumber() ? idv.As<Napi::Number>().DoubleValue() : -1;
    if (!(id >= 0 && id <= static_cast<double>(kMaxSafeInteger)) || id != static_cast<double>(static_cast<int64_t>(id))) {
      ThrowRange(env, std::string(fn) + ": ids must be integers >= 0");
      return env.Undefined();
    }
    if (!bv.IsBuffer()) {
      ThrowType(env, std::string(fn) + ": buffers must be Buffers");
      return env.Undefined();
    }
    Napi::Buffer<uint8_t> b = bv.As<Napi::Buffer<uint8_t>>();
    if (b.Length() == 0 || b.Length() > static_cast<size_t>(kMaxPayloadLimit)) {
      ThrowRange(env, std::string(fn) + ": a buffer must hold 1.." + std::to_string(kMaxPayloadLimit) + " bytes");
      return env.Undefined();
    }
    gs.push_back(Granted{id, b.Data(), b.Length()});
  }
  std::string why;
  if (!c->Grant(gs, &why)) ThrowRange(env, std::string(fn) + ": " + why);
  return env.Undefined();
}

Napi::Value Revoke(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ConnPtr c;
  if (!GetConn(info, "nbdServeRevoke", &c)) return env.Undefined();
  std::vector<double> ids = c->Revoke();
  Napi::Array a = Napi::Array::New(env, ids.size());
  for (size_t i = 0; i < ids.size(); i++) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, ids[i]));
  return a;
}

Napi::Value SendReply(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdServeSend";
  ConnPtr c;
  int64_t seq, replies;
  if (!GetConn(info, fn, &c)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsArray()) {
    ThrowType(env, std::string(fn) + ": buffers must be an array of Buffers");
    return env.Undefined();
  }
  if (!GetInt(info, 2, fn, "seq", 0, kMaxSafeInteger, &seq) || !GetInt(info, 3, fn, "replies", 0, kMaxSendBuffers, &replies)) {
    return env.Undefined();
  }
  Napi::Array bufs = info[1].As<Napi::Array>();
  if (bufs.Length() == 0 || bufs.Length() > kMaxSendBuffers) {
    ThrowRange(env, std::string(fn) + ": 1.." + std::to_string(kMaxSendBuffers) + " buffers");
    return env.Undefined();
  }
  std::vector<iovec> iov;
  iov.reserve(bufs.Length());
  for (uint32_t i = 0; i < bufs.Length(); i++) {
    Napi::Value v = bufs.Get(i);
    if (!v.IsBuffer()) {
      ThrowType(env, std::string(fn) + ": buffers must be an array of Buffers");
      return env.Undefined();
    }
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    if (b.Length() > 0) iov.push_back(iovec{b.Data(), b.Length()});
  }
  return Napi::Number::New(env, c->SendNow(std::move(iov), static_cast<double>(seq), static_cast<uint32_t>(replies)));
}

Napi::Value SetDirect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdServeDirect";
  ConnPtr c;
  int fd;
  int64_t size, modes;
  if (!GetConn(info, fn, &c) || !GetFd(info, 1, fn, &fd) || !GetInt(info, 2, fn, "sizeBytes", 0, kMaxSafeInteger, &size) ||
      !GetInt(info, 3, fn, "modes", 1, kModeWrites | kModeReads | kModeStructured, &modes)) {
    return env.Undefined();
  }
  int own = DupOwn(env, fd);
  if (own < 0) return env.Undefined();
  c->SetDirect(own, static_cast<uint64_t>(size), modes);
  return env.Undefined();
}

bool GetMemStore(const Napi::CallbackInfo& info, size_t i, const char* fn, MemStorePtr* out) {
  return GetHandle(info, i, fn, kStoreTag, "store must be an nbdMemStoreNew handle", out);
}

Napi::Value MemStoreNew(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t size, chunk;
  if (!GetInt(info, 0, "nbdMemStoreNew", "sizeBytes", 0, kMaxSafeInteger, &size) ||
      !GetInt(info, 1, "nbdMemStoreNew", "chunkBytes", 4096, 64 * 1024 * 1024, &chunk)) {
    return env.Undefined();
  }
  auto handle = Napi::External<MemStorePtr>::New(env, new MemStorePtr(std::make_shared<MemStore>(size, chunk)),
                                                 [](Napi::Env, MemStorePtr* p) { delete p; });
  napi_type_tag_object(env, handle, &kStoreTag);
  return handle;
}

// The (store, index, chunk) arguments of nbdMemStoreSet and nbdMemStoreAdd, checked: a
// chunk is chunkBytes long and starts inside the volume.
bool GetChunkArgs(const Napi::CallbackInfo& info, const char* fn, MemStorePtr* m, int64_t* index, Napi::Buffer<uint8_t>* b) {
  if (!GetMemStore(info, 0, fn, m) || !GetInt(info, 1, fn, "index", 0, kMaxSafeInteger, index) || !GetBuffer(info, 2, fn, "chunk", b)) {
    return false;
  }
  if (b->Length() != (*m)->chunkBytes_ || static_cast<uint64_t>(*index) * (*m)->chunkBytes_ >= (*m)->sizeBytes_) {
    ThrowRange(info.Env(), std::string(fn) + ": a chunk is chunkBytes long and starts inside the volume");
    return false;
  }
  return true;
}

Napi::Value MemStoreSet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  MemStorePtr m;
  int64_t index;
  Napi::Buffer<uint8_t> b;
  if (!GetChunkArgs(info, "nbdMemStoreSet", &m, &index, &b)) return env.Undefined();
  std::lock_guard<std::mutex> l(m->mu);
  m->chunks[static_cast<uint64_t>(index)] = b.Data();
  return env.Undefined();
}

// nbdMemStoreAdd(store, index, chunk) -> bool: registers chunk at index only if nothing is
// registered there (a spare the thread took since the volume last synced may be).
Napi::Value MemStoreAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  MemStorePtr m;
  int64_t index;
  Napi::Buffer<uint8_t> b;
  if (!GetChunkArgs(info, "nbdMemStoreAdd", &m, &index, &b)) return env.Undefined();
  std::lock_guard<std::mutex> l(m->mu);
  return Napi::Boolean::New(env, m->chunks.emplace(static_cast<uint64_t>(index), b.Data()).second);
}

// nbdMemStoreAddSpares(store, firstId, chunks): zeroed chunks, ids firstId, firstId + 1, ...
// (mod 2^32); TypeScript keeps their memory until each comes back from nbdMemStoreSync,
// adopted or withdrawn. One lock for all of them (the threads copy under it).
Napi::Value MemStoreAddSpares(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdMemStoreAddSpares";
  MemStorePtr m;
  int64_t firstId;
  if (!GetMemStore(info, 0, fn, &m) || !GetInt(info, 1, fn, "firstId", 0, 0xffffffffLL, &firstId)) return env.Undefined();
  if (info.Length() < 3 || !info[2].IsArray()) {
    ThrowType(env, std::string(fn) + ": chunks must be an array of Buffers");
    return env.Undefined();
  }
  Napi::Array arr = info[2].As<Napi::Array>();
  uint32_t n = arr.Length();
  if (n > MemStore::kSparesMax) {
    ThrowRange(env, std::string(fn) + ": too many spares");
    return env.Undefined();
  }
  std::vector<MemStore::Spare> add;
  add.reserve(n);
  for (uint32_t k = 0; k < n; k++) {
    Napi::Value v = arr.Get(k);
    if (!v.IsBuffer() || v.As<Napi::Buffer<uint8_t>>().Length() != m->chunkBytes_) {
      ThrowRange(env, std::string(fn) + ": chunks[" + std::to_string(k) + "] is not a Buffer of chunkBytes");
      return env.Undefined();
    }
    add.push_back(MemStore::Spare{v.As<Napi::Buffer<uint8_t>>().Data(), static_cast<uint32_t>((static_cast<uint64_t>(firstId) + k) & 0xffffffffu)});
  }
  std::lock_guard<std::mutex> l(m->mu);
  if (m->closed || m->spares.size() + n > MemStore::kSparesMax) {
    ThrowRange(env, std::string(fn) + (m->closed ? ": the store is closed" : ": too many spares"));
    return env.Undefined();
  }
  m->spares.insert(m->spares.end(), add.begin(), add.end());
  return env.Undefined();
}

// nbdMemStoreCopyIn(store, offset, data) -> bool: what a thread does with a plain WRITE (tests).
Napi::Value MemStoreCopyIn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdMemStoreCopyIn";
  MemStorePtr m;
  int64_t off;
  Napi::Buffer<uint8_t> b;
  if (!GetMemStore(info, 0, fn, &m) || !GetInt(info, 1, fn, "offset", 0, kMaxSafeInteger, &off) || !GetBuffer(info, 2, fn, "data", &b)) {
    return env.Undefined();
  }
  if (b.Length() == 0 || static_cast<uint64_t>(off) > m->sizeBytes_ || b.Length() > m->sizeBytes_ - static_cast<uint64_t>(off)) {
    ThrowRange(env, std::string(fn) + ": data must be non-empty and inside the volume");
    return env.Undefined();
  }
  return Napi::Boolean::New(env, m->CopyIn(static_cast<uint64_t>(off), b.Data(), b.Length()));
}

// nbdMemStoreSync(store, withdraw) -> [n, (index, id) x n, withdrawn ids...]: the spares the
// threads took since the last call and where; with withdraw, also every spare left (the
// threads take none of them after this returns).
Napi::Value MemStoreSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdMemStoreSync";
  MemStorePtr m;
  bool withdraw;
  if (!GetMemStore(info, 0, fn, &m) || !GetBool(info, 1, fn, "withdraw", &withdraw)) return env.Undefined();
  std::lock_guard<std::mutex> l(m->mu);
  size_t n = m->adopted.size();
  size_t w = withdraw ? m->spares.size() : 0;
  Napi::Float64Array out = Napi::Float64Array::New(env, 1 + 2 * n + w);
  out[0] = static_cast<double>(n);
  for (size_t k = 0; k < n; k++) {
    out[1 + 2 * k] = static_cast<double>(m->adopted[k].first);
    out[2 + 2 * k] = static_cast<double>(m->adopted[k].second);
  }
  for (size_t k = 0; k < w; k++) out[1 + 2 * n + k] = static_cast<double>(m->spares[k].id);
  m->adopted.clear();
  if (withdraw) m->spares.clear();
  return out;
}

// nbdMemStoreDelete(store, index, chunk): unregisters index if chunk is what is registered
// there (a spare a thread put there since stays).
Napi::Value MemStoreDelete(const Napi::CallbackInfo& info) {
  const char* fn = "nbdMemStoreDelete";
  MemStorePtr m;
  int64_t index;
  Napi::Buffer<uint8_t> b;
  if (GetMemStore(info, 0, fn, &m) && GetInt(info, 1, fn, "index", 0, kMaxSafeInteger, &index) && GetBuffer(info, 2, fn, "chunk", &b)) {
    std::lock_guard<std::mutex> l(m->mu);
    auto it = m->chunks.find(static_cast<uint64_t>(index));
    if (it != m->chunks.end() && it->second == b.Data()) m->chunks.erase(it);
  }
  return info.Env().Undefined();
}

// Zeroes [from, to) of a registered chunk and, if the whole chunk is then zero, unregisters
// it, both under the store's lock: a copy by the thread lands before (and the chunk is not
// all zero) or never (it is gone). Returns whether it was unregistered.
Napi::Value MemStoreZeroIn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdMemStoreZeroIn";
  MemStorePtr m;
  int64_t index, from, to;
  if (!GetMemStore(info, 0, fn, &m) || !GetInt(info, 1, fn, "index", 0, kMaxSafeInteger, &index) ||
      !GetInt(info, 2, fn, "from", 0, kMaxSafeInteger, &from) || !GetInt(info, 3, fn, "to", 0, kMaxSafeInteger, &to)) {
    return env.Undefined();
  }
  if (from > to || static_cast<uint64_t>(to) > m->chunkBytes_) {
    ThrowRange(env, std::string(fn) + ": need 0 <= from <= to <= chunkBytes");
    return env.Undefined();
  }
  std::lock_guard<std::mutex> l(m->mu);
  auto it = m->chunks.find(static_cast<uint64_t>(index));
  if (it == m->chunks.end()) {
    ThrowRange(env, std::string(fn) + ": chunk " + std::to_string(index) + " is not registered");
    return env.Undefined();
  }
  uint8_t* c = it->second;
  memset(c + from, 0, static_cast<size_t>(to - from));
  for (uint64_t i = 0; i < m->chunkBytes_; i++) {
    if (c[i] != 0) return Napi::Boolean::New(env, false);
  }
  m->chunks.erase(it);
  return Napi::Boolean::New(env, true);
}

Napi::Value MemStoreClose(const Napi::CallbackInfo& info) {
  MemStorePtr m;
  if (GetMemStore(info, 0, "nbdMemStoreClose", &m)) {
    std::lock_guard<std::mutex> l(m->mu);
    m->closed = true;
    m->chunks.clear();
    m->spares.clear();
    m->adopted.clear();
  }
  return info.Env().Undefined();
}

Napi::Value SetDirectMem(const Napi::CallbackInfo& info) {
  const char* fn = "nbdServeDirectMemory";
  ConnPtr c;
  MemStorePtr m;
  int64_t modes;
  if (GetConn(info, fn, &c) && GetMemStore(info, 1, fn, &m) &&
      GetInt(info, 2, fn, "modes", 1, kModeWrites | kModeReads | kModeStructured, &modes)) {
    c->SetDirectMem(m, modes);
  }
  return info.Env().Undefined();
}

bool GetReadMap(const Napi::CallbackInfo& info, size_t i, const char* fn, ReadMapPtr* out) {
  return GetHandle(info, i, fn, kReadMapTag, "map must be an nbdReadMapNew handle", out);
}

constexpr uint64_t kRingSlots = 8;        // src/tree/layout.ts RING_SLOTS
constexpr size_t kNodeHeaderBytes = 64;   // NODE_HEADER_BYTES
constexpr size_t kPtrBytes = 24;          // PTR_BYTES
constexpr size_t kFanout = 168;           // FANOUT
constexpr uint16_t kPtrPresent = 1;       // PTR_FLAG_PRESENT

// nbdReadMapNew(fd, sizeBytes, deviceBlocks, slotsLog2) -> map (dups fd)
Napi::Value ReadMapNew(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdReadMapNew";
  int fd;
  int64_t size, devBlocks, log2;
  if (!GetFd(info, 0, fn, &fd) || !GetInt(info, 1, fn, "sizeBytes", 4096, kMaxSafeInteger, &size) ||
      !GetInt(info, 2, fn, "deviceBlocks", 1, kMaxSafeInteger, &devBlocks) ||
      !GetInt(info, 3, fn, "slotsLog2", 10, ReadMap::kMaxSlotsLog2, &log2)) {
    return env.Undefined();
  }
  if ((static_cast<uint64_t>(size) / ReadMap::kBlock) >> log2 >= 0xffffffffULL) {
    ThrowRange(env, std::string(fn) + ": too few slots for the volume's blocks");
    return env.Undefined();
  }
  int own = DupOwn(env, fd);
  if (own < 0) return env.Undefined();
  auto m = std::make_shared<ReadMap>(own, static_cast<uint64_t>(size), static_cast<uint64_t>(devBlocks), static_cast<uint32_t>(log2));
  if (!m->Ok()) {
    ErrnoError(env, ENOMEM, "calloc").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto handle = Napi::External<ReadMapPtr>::New(env, new ReadMapPtr(m), [](Napi::Env, ReadMapPtr* p) { delete p; });
  napi_type_tag_object(env, handle, &kReadMapTag);
  return handle;
}

// nbdReadMapPutLeaf(map, node, baseLbn, skip, expectGen) -> entries put: the pointers of one
// level-0 address block (4096 bytes, verified by the caller) for lbns baseLbn.. ; slot i is
// left out where skip[i] != 0 (the log holds that block) and where its pointer does not
// decode, and where a drop since the map's generation was expectGen named it (the log or a
// thread appended it meanwhile). -1 (nothing put): too old, or a clear came since.
Napi::Value ReadMapPutLeaf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdReadMapPutLeaf";
  ReadMapPtr m;
  Napi::Buffer<uint8_t> node, skip;
  int64_t base, gen;
  if (!GetReadMap(info, 0, fn, &m) || !GetBuffer(info, 1, fn, "node", &node) ||
      !GetInt(info, 2, fn, "baseLbn", 0, kMaxSafeInteger, &base) || !GetBuffer(info, 3, fn, "skip", &skip) ||
      !GetInt(info, 4, fn, "expectGen", 0, kMaxSafeInteger, &gen)) {
    return env.Undefined();
  }
  if (node.Length() != ReadMap::kBlock || skip.Length() != kFanout || base % kFanout != 0) {
    ThrowRange(env, std::string(fn) + ": node is one 4096-byte block, skip has 168 bytes, baseLbn a multiple of 168");
    return env.Undefined();
  }
  const uint64_t lbns = m->SizeBytes() / ReadMap::kBlock;
  const uint8_t* p = node.Data();
  uint32_t put = 0;
  std::lock_guard<std::mutex> l(m->mu);
  if (m->ClosedLocked()) return Napi::Number::New(env, 0);
  uint8_t dropped[kFanout] = {};
  if (!m->SkipDroppedLocked(static_cast<uint64_t>(gen), static_cast<uint64_t>(base), dropped, kFanout)) return Napi::Number::New(env, -1);
  for (size_t i = 0; i < kFanout; i++) {
    const uint64_t lbn = static_cast<uint64_t>(base) + i;
    if (lbn >= lbns) break;
    if (skip.Data()[i] != 0 || dropped[i] != 0) continue;
    const uint8_t* e = p + kNodeHeaderBytes + i * kPtrBytes;
    uint64_t pba, birth;
    uint32_t crc;
    uint16_t flags, pad;
    memcpy(&pba, e, 8);
    memcpy(&birth, e + 8, 8);
    memcpy(&crc, e + 16, 4);
    memcpy(&flags, e + 20, 2);
    memcpy(&pad, e + 22, 2);
    if (flags == 0) {
      if (pba != 0 || birth != 0 || crc != 0 || pad != 0) continue;
      m->PutLocked(lbn, 0, 0);
    } else {
      if (flags != kPtrPresent || pad != 0 || pba < kRingSlots || pba >= m->DeviceBlocks()) continue;
      m->PutLocked(lbn, pba, crc);
    }
    put++;
  }
  return Napi::Number::New(env, put);
}

Napi::Value ReadMapDrop(const Napi::CallbackInfo& info) {
  ReadMapPtr m;
  int64_t lbn, count;
  if (GetReadMap(info, 0, "nbdReadMapDrop", &m) && GetInt(info, 1, "nbdReadMapDrop", "lbn", 0, kMaxSafeInteger, &lbn) &&
      GetInt(info, 2, "nbdReadMapDrop", "count", 0, kMaxSafeInteger, &count)) {
    m->Drop(static_cast<uint64_t>(lbn), static_cast<uint64_t>(count));
  }
  return info.Env().Undefined();
}

// nbdReadMapGen(map) -> drops and clears so far (a read's fill passes it back to PutLeaf)
Napi::Value ReadMapGen(const Napi::CallbackInfo& info) {
  ReadMapPtr m;
  if (!GetReadMap(info, 0, "nbdReadMapGen", &m)) return info.Env().Undefined();
  std::lock_guard<std::mutex> l(m->mu);
  return Napi::Number::New(info.Env(), static_cast<double>(m->GenLocked()));
}

Napi::Value ReadMapClear(const Napi::CallbackInfo& info) {
  ReadMapPtr m;
  if (GetReadMap(info, 0, "nbdReadMapClear", &m)) m->Clear();
  return info.Env().Undefined();
}

Napi::Value ReadMapClose(const Napi::CallbackInfo& info) {
  ReadMapPtr m;
  if (GetReadMap(info, 0, "nbdReadMapClose", &m)) m->Close();
  return info.Env().Undefined();
}

// nbdReadMapStats(map) -> [hits, misses, waits] (waits: READs that found a block outside the page cache)
Napi::Value ReadMapStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ReadMapPtr m;
  if (!GetReadMap(info, 0, "nbdReadMapStats", &m)) return env.Undefined();
  uint64_t h, mi, w;
  m->Stats(&h, &mi, &w);
  Napi::Array a = Napi::Array::New(env, 3);
  a.Set(uint32_t{0}, Napi::Number::New(env, static_cast<double>(h)));
  a.Set(uint32_t{1}, Napi::Number::New(env, static_cast<double>(mi)));
  a.Set(uint32_t{2}, Napi::Number::New(env, static_cast<double>(w)));
  return a;
}

// The appender's handle: the region Buffer is referenced until the handle is collected,
// and the appender is closed first (no append runs into memory that is going away).
struct AppenderBox {
  NvAppenderPtr p;
  Napi::Reference<Napi::Buffer<uint8_t>> region;
};

bool GetAppender(const Napi::CallbackInfo& info, size_t i, const char* fn, NvAppenderPtr* out) {
  if (!HasTag(info, i, kAppenderTag)) {
    ThrowType(info.Env(), std::string(fn) + ": appender must be an nbdAppenderNew handle");
    return false;
  }
  *out = info[i].As<Napi::External<AppenderBox>>().Data()->p;
  return true;
}

// nbdAppenderNew(region, epoch, salt, payloadMaxBytes, volumeBytes, map|null) -> appender
Napi::Value AppenderNew(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdAppenderNew";
  Napi::Buffer<uint8_t> region;
  int64_t epoch, salt, payloadMax, volumeBytes;
  ReadMapPtr m;
  if (!GetBuffer(info, 0, fn, "region", &region) || !GetInt(info, 1, fn, "epoch", 0, 0xffffffffLL, &epoch) ||
      !GetInt(info, 2, fn, "salt", 0, 0xffffffffLL, &salt) ||
      !GetInt(info, 3, fn, "payloadMaxBytes", 4096, 64 * 1024 * 1024, &payloadMax) ||
      !GetInt(info, 4, fn, "volumeBytes", 4096, kMaxSafeInteger, &volumeBytes)) {
    return env.Undefined();
  }
  if (info.Length() > 5 && !info[5].IsNull() && !info[5].IsUndefined() && !GetReadMap(info, 5, fn, &m)) return env.Undefined();
  auto* box = new AppenderBox{std::make_shared<NvAppender>(region.Data(), region.Length(), static_cast<uint32_t>(epoch),
                                                          static_cast<uint32_t>(salt), static_cast<uint64_t>(payloadMax),
                                                          static_cast<uint64_t>(volumeBytes), m),
                              Napi::Persistent(region)};
  auto handle = Napi::External<AppenderBox>::New(env, box, [](Napi::Env, AppenderBox* b) {
    b->p->Close();
    delete b;
  });
  napi_type_tag_object(env, handle, &kAppenderTag);
  return handle;
}

// nbdAppenderResume(appender, writeEnd, halfEnd, nextSeq, durableSeq) -> bool
Napi::Value AppenderResume(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdAppenderResume";
  NvAppenderPtr a;
  int64_t writeEnd, halfEnd, nextSeq, durable;
  if (!GetAppender(info, 0, fn, &a) || !GetInt(info, 1, fn, "writeEnd", 0, kMaxSafeInteger, &writeEnd) ||
      !GetInt(info, 2, fn, "halfEnd", 0, kMaxSafeInteger, &halfEnd) || !GetInt(info, 3, fn, "nextSeq", 1, kMaxSafeInteger, &nextSeq) ||
      !GetInt(info, 4, fn, "durableSeq", 0, kMaxSafeInteger, &durable)) {
    return env.Undefined();
  }
  return Napi::Boolean::New(env, a->Resume(static_cast<uint64_t>(writeEnd), static_cast<uint64_t>(halfEnd),
                                           static_cast<uint64_t>(nextSeq), static_cast<uint64_t>(durable)));
}

// nbdAppenderDrain(appender, pause) -> [Float64Array: seq, regionOffset, offsetBytes, lengthBytes per
// record; Uint32Array: the crc32c of each of their 4 KiB blocks, in order]
Napi::Value AppenderDrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  NvAppenderPtr a;
  bool pause;
  if (!GetAppender(info, 0, "nbdAppenderDrain", &a) || !GetBool(info, 1, "nbdAppenderDrain", "pause", &pause)) return env.Undefined();
  std::vector<uint32_t> crcs;
  std::vector<double> recs = a->Drain(pause, &crcs);
  Napi::Float64Array out = Napi::Float64Array::New(env, recs.size());
  if (!recs.empty()) memcpy(out.Data(), recs.data(), recs.size() * sizeof(double));
  Napi::Uint32Array outCrcs = Napi::Uint32Array::New(env, crcs.size());
  if (!crcs.empty()) memcpy(outCrcs.Data(), crcs.data(), crcs.size() * sizeof(uint32_t));
  Napi::Array both = Napi::Array::New(env, 2);
  both.Set(uint32_t{0}, out);
  both.Set(uint32_t{1}, outCrcs);
  return both;
}

// nbdAppenderAppend(appender, offsetBytes, data) -> bool: the append the NBD threads make (tests)
Napi::Value AppenderAppend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdAppenderAppend";
  NvAppenderPtr a;
  int64_t off;
  Napi::Buffer<uint8_t> data;
  if (!GetAppender(info, 0, fn, &a) || !GetInt(info, 1, fn, "offsetBytes", 0, kMaxSafeInteger, &off) ||
      !GetBuffer(info, 2, fn, "data", &data)) {
    return env.Undefined();
  }
  return Napi::Boolean::New(env, a->Append(static_cast<uint64_t>(off), data.Data(), data.Length()).seq != 0);
}

// nbdAppenderSetDurable(appender, seq): records <= seq are durable (later records say so)
Napi::Value AppenderSetDurable(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  int64_t seq;
  if (GetAppender(info, 0, "nbdAppenderSetDurable", &a) && GetInt(info, 1, "nbdAppenderSetDurable", "seq", 0, kMaxSafeInteger, &seq)) {
    a->SetDurable(static_cast<uint64_t>(seq));
  }
  return info.Env().Undefined();
}

// nbdAppenderGate(appender, on): held replies on (a sync mirror) or off (releases all)
Napi::Value AppenderGate(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  bool on;
  if (GetAppender(info, 0, "nbdAppenderGate", &a) && GetBool(info, 1, "nbdAppenderGate", "on", &on)) a->SetGate(on);
  return info.Env().Undefined();
}

// nbdAppenderRelease(appender, seq): the replica holds every record <= seq
Napi::Value AppenderRelease(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  int64_t seq;
  if (GetAppender(info, 0, "nbdAppenderRelease", &a) && GetInt(info, 1, "nbdAppenderRelease", "seq", 0, kMaxSafeInteger, &seq)) {
    a->Release(static_cast<uint64_t>(seq));
  }
  return info.Env().Undefined();
}

// nbdAppenderFailHeld(appender): every held reply of a record appended so far gets EIO
Napi::Value AppenderFailHeld(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (GetAppender(info, 0, "nbdAppenderFailHeld", &a)) a->FailHeld();
  return info.Env().Undefined();
}

Napi::Value AppenderClose(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (GetAppender(info, 0, "nbdAppenderClose", &a)) a->Close();
  return info.Env().Undefined();
}

// nbdAppenderFlushFile(appender, path|null) -> bool: FLUSH on the NBD threads through a
// descriptor of their own to the NVRAM file (null: no more). False: refused or not opened.
Napi::Value AppenderFlushFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdAppenderFlushFile";
  NvAppenderPtr a;
  if (!GetAppender(info, 0, fn, &a)) return env.Undefined();
  if (info.Length() < 2 || (!info[1].IsNull() && !info[1].IsString())) {
    ThrowType(env, std::string(fn) + ": path must be a string or null");
    return env.Undefined();
  }
  if (info[1].IsNull()) return Napi::Boolean::New(env, a->SetFlushFile(nullptr));
  std::string path = info[1].As<Napi::String>().Utf8Value();
  if (path.empty() || path.find('\0') != std::string::npos) {
    ThrowType(env, std::string(fn) + ": path must be a non-empty file path");
    return env.Undefined();
  }
  return Napi::Boolean::New(env, a->SetFlushFile(path.c_str()));
}

// nbdAppenderFlush(appender) -> 1 | 0 | -errno: the FLUSH a connection thread makes (tests)
Napi::Value AppenderFlush(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (!GetAppender(info, 0, "nbdAppenderFlush", &a)) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), a->Flush());
}

// nbdAppenderFlushes(appender) -> FLUSHes made durable on the threads
Napi::Value AppenderFlushes(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (!GetAppender(info, 0, "nbdAppenderFlushes", &a)) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), static_cast<double>(a->Flushes()));
}

Napi::Value AppenderStats(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (!GetAppender(info, 0, "nbdAppenderStats", &a)) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), static_cast<double>(a->Appends()));
}

// nbdAppenderFileStores(appender) -> records the threads stored with pwrite (FLUSH-heavy periods)
Napi::Value AppenderFileStores(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (!GetAppender(info, 0, "nbdAppenderFileStores", &a)) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), static_cast<double>(a->FileStores()));
}

// nbdAppenderUnforward(appender): no record goes to a mirror link from now on
Napi::Value AppenderUnforward(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (GetAppender(info, 0, "nbdAppenderUnforward", &a)) a->SetForwarder(nullptr, 0);
  return info.Env().Undefined();
}

// nbdAppenderMarks(appender) -> [released, failed]: the held replies' high-water marks
Napi::Value AppenderMarks(const Napi::CallbackInfo& info) {
  NvAppenderPtr a;
  if (!GetAppender(info, 0, "nbdAppenderMarks", &a)) return info.Env().Undefined();
  Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 2);
  out[0] = static_cast<double>(a->Released());
  out[1] = static_cast<double>(a->Failed());
  return out;
}

// nbdServeDirectEngine(handle, map|null, appender|null, modes)
Napi::Value SetDirectEngine(const Napi::CallbackInfo& info) {
  const char* fn = "nbdServeDirectEngine";
  ConnPtr c;
  ReadMapPtr m;
  NvAppenderPtr a;
  int64_t modes;
  if (!GetConn(info, fn, &c)) return info.Env().Undefined();
  if (info.Length() > 1 && !info[1].IsNull() && !GetReadMap(info, 1, fn, &m)) return info.Env().Undefined();
  if (info.Length() > 2 && !info[2].IsNull() && !GetAppender(info, 2, fn, &a)) return info.Env().Undefined();
  if (GetInt(info, 3, fn, "modes", 0, kModeWrites | kModeReads | kModeStructured, &modes)) {
    c->SetDirectEngine(m, a, modes);
  }
  return info.Env().Undefined();
}

Napi::Value SetReading(const Napi::CallbackInfo& info) {
  ConnPtr c;
  bool on;
  if (GetConn(info, "nbdServeSetReading", &c) && GetBool(info, 1, "nbdServeSetReading", "on", &on)) c->SetReading(on);
  return info.Env().Undefined();
}

Napi::Value End(const Napi::CallbackInfo& info) {
  ConnPtr c;
  if (GetConn(info, "nbdServeEnd", &c)) c->End();
  return info.Env().Undefined();
}

Napi::Value Abort(const Napi::CallbackInfo& info) {
  ConnPtr c;
  if (GetConn(info, "nbdServeAbort", &c)) c->Abort();
  return info.Env().Undefined();
}

Napi::Value StateOf(const Napi::CallbackInfo& info) {
  ConnPtr c;
  if (!GetConn(info, "nbdServeState", &c)) return info.Env().Undefined();
  return c->State(info.Env());
}

}  // namespace

bool UnwrapAppender(const Napi::CallbackInfo& info, size_t i, const char* fn, NvAppenderPtr* out) {
  return GetAppender(info, i, fn, out);
}

void InitNbdServe(Napi::Env env, Napi::Object exports) {
  exports.Set("nbdServeStart", Napi::Function::New(env, Start, "nbdServeStart"));
  exports.Set("nbdServeBusyPoll", Napi::Function::New(env, BusyPollSet, "nbdServeBusyPoll"));
  exports.Set("nbdServeBusyPollPause", Napi::Function::New(env, BusyPollPause, "nbdServeBusyPollPause"));
  exports.Set("nbdServeBusyPollStats", Napi::Function::New(env, BusyPollStats, "nbdServeBusyPollStats"));
  exports.Set("nbdServeGrant", Napi::Function::New(env, Grant, "nbdServeGrant"));
  exports.Set("nbdServeRevoke", Napi::Function::New(env, Revoke, "nbdServeRevoke"));
  exports.Set("nbdServeSend", Napi::Function::New(env, SendReply, "nbdServeSend"));
  exports.Set("nbdServeDirect", Napi::Function::New(env, SetDirect, "nbdServeDirect"));
  exports.Set("nbdServeDirectMemory", Napi::Function::New(env, SetDirectMem, "nbdServeDirectMemory"));
  exports.Set("nbdMemStoreNew", Napi::Function::New(env, MemStoreNew, "nbdMemStoreNew"));
  exports.Set("nbdMemStoreSet", Napi::Function::New(env, MemStoreSet, "nbdMemStoreSet"));
  exports.Set("nbdMemStoreAdd", Napi::Function::New(env, MemStoreAdd, "nbdMemStoreAdd"));
  exports.Set("nbdMemStoreAddSpares", Napi::Function::New(env, MemStoreAddSpares, "nbdMemStoreAddSpares"));
  exports.Set("nbdMemStoreSync", Napi::Function::New(env, MemStoreSync, "nbdMemStoreSync"));
  exports.Set("nbdMemStoreCopyIn", Napi::Function::New(env, MemStoreCopyIn, "nbdMemStoreCopyIn"));
  exports.Set("nbdMemStoreDelete", Napi::Function::New(env, MemStoreDelete, "nbdMemStoreDelete"));
  exports.Set("nbdMemStoreZeroIn", Napi::Function::New(env, MemStoreZeroIn, "nbdMemStoreZeroIn"));
  exports.Set("nbdMemStoreClose", Napi::Function::New(env, MemStoreClose, "nbdMemStoreClose"));
  exports.Set("nbdServeDirectEngine", Napi::Function::New(env, SetDirectEngine, "nbdServeDirectEngine"));
  exports.Set("nbdReadMapNew", Napi::Function::New(env, ReadMapNew, "nbdReadMapNew"));
  exports.Set("nbdReadMapPutLeaf", Napi::Function::New(env, ReadMapPutLeaf, "nbdReadMapPutLeaf"));
  exports.Set("nbdReadMapDrop", Napi::Function::New(env, ReadMapDrop, "nbdReadMapDrop"));
  exports.Set("nbdReadMapClear", Napi::Function::New(env, ReadMapClear, "nbdReadMapClear"));
  exports.Set("nbdReadMapClose", Napi::Function::New(env, ReadMapClose, "nbdReadMapClose"));
  exports.Set("nbdReadMapStats", Napi::Function::New(env, ReadMapStats, "nbdReadMapStats"));
  exports.Set("nbdReadMapGen", Napi::Function::New(env, ReadMapGen, "nbdReadMapGen"));
  exports.Set("nbdAppenderNew", Napi::Function::New(env, AppenderNew, "nbdAppenderNew"));
  exports.Set("nbdAppenderResume", Napi::Function::New(env, AppenderResume, "nbdAppenderResume"));
  exports.Set("nbdAppenderFlushFile", Napi::Function::New(env, AppenderFlushFile, "nbdAppenderFlushFile"));
  exports.Set("nbdAppenderFlush", Napi::Function::New(env, AppenderFlush, "nbdAppenderFlush"));
  exports.Set("nbdAppenderFlushes", Napi::Function::New(env, AppenderFlushes, "nbdAppenderFlushes"));
  exports.Set("nbdAppenderDrain", Napi::Function::New(env, AppenderDrain, "nbdAppenderDrain"));
  exports.Set("nbdAppenderAppend", Napi::Function::New(env, AppenderAppend, "nbdAppenderAppend"));
  exports.Set("nbdAppenderSetDurable", Napi::Function::New(env, AppenderSetDurable, "nbdAppenderSetDurable"));
  exports.Set("nbdAppenderGate", Napi::Function::New(env, AppenderGate, "nbdAppenderGate"));
  exports.Set("nbdAppenderRelease", Napi::Function::New(env, AppenderRelease, "nbdAppenderRelease"));
  exports.Set("nbdAppenderFailHeld", Napi::Function::New(env, AppenderFailHeld, "nbdAppenderFailHeld"));
  exports.Set("nbdAppenderClose", Napi::Function::New(env, AppenderClose, "nbdAppenderClose"));
  exports.Set("nbdAppenderStats", Napi::Function::New(env, AppenderStats, "nbdAppenderStats"));
  exports.Set("nbdAppenderFileStores", Napi::Function::New(env, AppenderFileStores, "nbdAppenderFileStores"));
  exports.Set("nbdAppenderMarks", Napi::Function::New(env, AppenderMarks, "nbdAppenderMarks"));
  exports.Set("nbdAppenderUnforward", Napi::Function::New(env, AppenderUnforward, "nbdAppenderUnforward"));
  exports.Set("nbdServeSetReading", Napi::Function::New(env, SetReading, "nbdServeSetReading"));
  exports.Set("nbdServeEnd", Napi::Function::New(env, End, "nbdServeEnd"));
  exports.Set("nbdServeAbort", Napi::Function::New(env, Abort, "nbdServeAbort"));
  exports.Set("nbdServeState", Napi::Function::New(env, StateOf, "nbdServeState"));
  exports.Set("nbdServeEventWidth", Napi::Number::New(env, kEventWidth));
}

}  // namespace nvm
