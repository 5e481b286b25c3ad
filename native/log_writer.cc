// The log writer: log lines leave the event loop through a bounded queue and one thread.
//
// pino wrote each line to stderr with a blocking write(2) on the event loop. When nobody
// read stderr (a full pipe: a stuck log shipper, a parent that stopped reading), the
// event loop blocked in that write, CPs stopped, the NVRAM filled and every client
// write waited, for as long as the reader stayed away. Now the event loop only copies a
// line into a queue of at most `capacity` bytes; one thread writes the queue to the
// descriptor with plain blocking writes (any kind of descriptor: pipe, socket, file,
// terminal). When the queue is full a line is dropped and counted, and a note with the
// count is queued in its place, before the next line that fits: the log shows where
// lines went missing and how many. Nothing here can block the event loop, except
// logWriterFlush (at exit, bounded by its timeout).
//
// Invariants:
// - queued bytes <= capacity + kNoteBytesMax (a drop note may exceed the capacity by its
//   own size, so the count is never lost to the same full queue).
// - Lines are written whole and in the order queued; a note stands where its lines were.
// - One writer per process: started once, its descriptor fixed; never stopped (the thread
//   and its state are leaked on purpose, so exit never waits on it or frees under it).
// - A failed write (EPIPE, EBADF, ...) drops that batch and counts its lines; EAGAIN (a
//   descriptor someone made non-blocking) waits in poll(2) for room, on this thread.
#include <poll.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include "common.h"

namespace nvm {

namespace {

constexpr size_t kNoteBytesMax = 256;
constexpr size_t kBatchBytesMax = 64 * 1024;  // one write(2) at most
constexpr int64_t kCapacityMin = 4096;
constexpr int64_t kCapacityMax = 64LL * 1024 * 1024;

struct LogWriter {
  std::mutex mu;
  std::condition_variable work;     // lines queued
  std::condition_variable drained;  // the queue emptied and no batch is being written
  std::deque<std::string> lines;
  size_t queuedBytes = 0;
  size_t capacity = 0;
  int fd = -1;
  bool writing = false;
  // Drops not yet reported by a note, and totals since the start.
  uint64_t pendingLines = 0;
  uint64_t pendingBytes = 0;
  uint64_t droppedLines = 0;
  uint64_t writtenLines = 0;
  uint64_t writeErrors = 0;
};

LogWriter* gWriter = nullptr;  // set once under gStartMu; leaked on purpose
std::mutex gStartMu;

// A pino-shaped JSON line (level 40 = warn) saying how many lines were dropped.
std::string DropNote(uint64_t lines, uint64_t bytes, size_t capacity) {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  long long ms = static_cast<long long>(tv.tv_sec) * 1000 + tv.tv_usec / 1000;
  char buf[kNoteBytesMax];
  snprintf(buf, sizeof buf,
           "{\"level\":40,\"time\":%lld,\"pid\":%d,\"droppedLines\":%llu,\"droppedBytes\":%llu,"
           "\"msg\":\"log lines dropped: stderr was not read fast enough (queue full at %zu bytes)\"}\n",
           ms, static_cast<int>(getpid()), static_cast<unsigned long long>(lines),
           static_cast<unsigned long long>(bytes), capacity);
  return std::string(buf);
}

// Queues the note for drops not yet reported. Caller holds mu.
void QueuePendingNoteLocked(LogWriter* w) {
  if (w->pendingLines == 0) return;
  std::string note = DropNote(w->pendingLines, w->pendingBytes, w->capacity);
  w->queuedBytes += note.size();
  w->lines.push_back(std::move(note));
  w->pendingLines = 0;
  w->pendingBytes = 0;
}

// Writes all of [p, p+n) or fails; returns 0 or an errno.
int WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t k = write(fd, p, n);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      struct pollfd pfd = {fd, POLLOUT, 0};
      if (poll(&pfd, 1, -1) < 0 && errno != EINTR) return errno;
      continue;
    }
    return k < 0 ? errno : EIO;
  }
  return 0;
}

void Run(LogWriter* w) {
  std::string batch;
  for (;;) {
    uint64_t count = 0;
    {
      std::unique_lock<std::mutex> lk(w->mu);
      w->writing = false;
      if (w->lines.empty()) w->drained.notify_all();
      w->work.wait(lk, [w] { return !w->lines.empty(); });
      batch.clear();
      while (!w->lines.empty() && (batch.empty() || batch.size() + w->lines.front().size() <= kBatchBytesMax)) {
        std::string& line = w->lines.front();
        w->queuedBytes -= line.size();
        batch += line;
        w->lines.pop_front();
        count++;
      }
      w->writing = true;
    }
    int err = WriteAll(w->fd, batch.data(), batch.size());
    std::lock_guard<std::mutex> lk(w->mu);
    if (err == 0) {
      w->writtenLines += count;
    } else {
      w->writeErrors++;
      w->droppedLines += count;
    }
  }
}

// logWriterStart(fd, capacityBytes): starts the process's writer; a second call with the
// same fd is a no-op, with another fd a RangeError.
Napi::Value Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = 0;
  int64_t capacity = 0;
  if (!GetFd(info, 0, "logWriterStart", &fd)) return env.Undefined();
  if (!GetInt(info, 1, "logWriterStart", "capacityBytes", kCapacityMin, kCapacityMax, &capacity)) return env.Undefined();
  std::lock_guard<std::mutex> lk(gStartMu);
  if (gWriter != nullptr) {
    if (gWriter->fd != fd) ThrowRange(env, "logWriterStart: already started on fd " + std::to_string(gWriter->fd));
    return env.Undefined();
  }
  LogWriter* w = new LogWriter();
  w->fd = fd;
  w->capacity = static_cast<size_t>(capacity);
  std::thread t(Run, w);
  t.detach();
  gWriter = w;
  return env.Undefined();
}

LogWriter* Started(Napi::Env env, const char* fn) {
  std::lock_guard<std::mutex> lk(gStartMu);
  if (gWriter == nullptr) ThrowRange(env, std::string(fn) + ": the log writer is not started");
  return gWriter;
}

// logWriterWrite(line: string | Buffer): true if queued, false if dropped (queue full).
Napi::Value Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LogWriter* w = Started(env, "logWriterWrite");
  if (w == nullptr) return env.Undefined();
  std::string line;
  if (info.Length() >= 1 && info[0].IsString()) {
    line = info[0].As<Napi::String>().Utf8Value();
  } else if (info.Length() >= 1 && info[0].IsBuffer()) {
    Napi::Buffer<uint8_t> b = info[0].As<Napi::Buffer<uint8_t>>();
    line.assign(reinterpret_cast<const char*>(b.Data()), b.Length());
  } else {
    ThrowType(env, "logWriterWrite: line must be a string or a Buffer");
    return env.Undefined();
  }
  if (line.empty()) return Napi::Boolean::New(env, true);
  std::lock_guard<std::mutex> lk(w->mu);
  if (w->queuedBytes + line.size() > w->capacity) {
    w->pendingLines++;
    w->pendingBytes += line.size();
    w->droppedLines++;
    return Napi::Boolean::New(env, false);
  }
  QueuePendingNoteLocked(w);
  w->queuedBytes += line.size();
  w->lines.push_back(std::move(line));
  w->work.notify_one();
  return Napi::Boolean::New(env, true);
}

// logWriterFlush(timeoutMs): waits (blocking the caller: for exit) until every queued
// line is written, the note for any unreported drops included; true if it got there.
Napi::Value Flush(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t timeoutMs = 0;
  if (!GetInt(info, 0, "logWriterFlush", "timeoutMs", 0, 600000, &timeoutMs)) return env.Undefined();
  LogWriter* w = Started(env, "logWriterFlush");
  if (w == nullptr) return env.Undefined();
  std::unique_lock<std::mutex> lk(w->mu);
  if (w->pendingLines > 0) {
    QueuePendingNoteLocked(w);
    w->work.notify_one();
  }
  bool done = w->drained.wait_for(lk, std::chrono::milliseconds(timeoutMs),
                                  [w] { return w->lines.empty() && !w->writing; });
  return Napi::Boolean::New(env, done);
}

// logWriterStats(): { started, queuedBytes, capacityBytes, droppedLines, writtenLines, writeErrors }.
Napi::Value Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  LogWriter* w;
  {
    std::lock_guard<std::mutex> lk(gStartMu);
    w = gWriter;
  }
  o.Set("started", Napi::Boolean::New(env, w != nullptr));
  if (w == nullptr) return o;
  std::lock_guard<std::mutex> lk(w->mu);
  o.Set("queuedBytes", Napi::Number::New(env, static_cast<double>(w->queuedBytes)));
  o.Set("capacityBytes", Napi::Number::New(env, static_cast<double>(w->capacity)));
  o.Set("droppedLines", Napi::Number::New(env, static_cast<double>(w->droppedLines)));
  o.Set("writtenLines", Napi::Number::New(env, static_cast<double>(w->writtenLines)));
  o.Set("writeErrors", Napi::Number::New(env, static_cast<double>(w->writeErrors)));
  return o;
}

}  // namespace

void InitLogWriter(Napi::Env env, Napi::Object exports) {
  exports.Set("logWriterStart", Napi::Function::New(env, Start, "logWriterStart"));
  exports.Set("logWriterWrite", Napi::Function::New(env, Write, "logWriterWrite"));
  exports.Set("logWriterFlush", Napi::Function::New(env, Flush, "logWriterFlush"));
  exports.Set("logWriterStats", Napi::Function::New(env, Stats, "logWriterStats"));
}

}  // namespace nvm
