// mmap/munmap/msync of the NVRAM region, and recachePages() to set up its page cache.
//
// Why recachePages() exists (measured on ext4, Linux 6.18, scripts/bench/persist-cost.c):
// the page cache may hold a file in large folios (up to 1 MiB here after the 1 MiB
// zero-fill writes or readahead), and a store through a MAP_SHARED mapping dirties the
// whole folio it falls in (page_mkwrite marks every block of the folio dirty), so an msync
// of a 4 KiB range wrote 1 MiB: ~400 us, against ~90 us once the file is cached in 4 KiB
// folios. recachePages() drops the file's cached pages and reads them back without
// readahead, which caches them in base pages, and mmap() marks the mapping MADV_RANDOM so
// a page that is evicted later faults back in alone (a base page too). Both are hints:
// they change no byte of the file and no durability guarantee (msync still makes at least
// the asked range durable), only how much more than the range each msync writes.
//
// Invariants:
// - Every live mapping made by mmap() has exactly one Mapping record in `g_mappings`,
//   keyed by its start address; the record is erased only by the Buffer's finalizer.
// - munmap() drops the file mapping at once but keeps the address range reserved with
//   private anonymous zero pages (MAP_FIXED), and detaches the Buffer when V8 allows:
//   any later use of the Buffer (or of a slice of it) touches harmless memory and never
//   faults, and the address range is never reused by another mapping while JS can still
//   reach it. A second munmap() of the same Buffer is a no-op. The finalizer releases
//   the reserved range.
// - msync() and populateWrite() run off the event loop over the page-aligned range
//   covering [offset, offset+length) and hold a reference to the Buffer until their
//   callback has run. They run on this file's own small thread pool (kPersistThreads
//   threads, started on first use, never exiting), not on libuv's: a FLUSH's msync must
//   not queue behind the consistency point's member I/O, which can fill libuv's pool.
// - Each job calls back exactly once, on the JS thread, through its own
//   ThreadSafeFunction (released right after the call).
#include "common.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace nvm {
namespace {

struct Mapping {
  uint8_t* addr;
  size_t len;
  bool fileMapped;  // false after munmap(): the range then holds anonymous zero pages
};

std::mutex g_mutex;
std::unordered_map<uintptr_t, Mapping*> g_mappings;

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

// Finds the record of the mapping that starts at data, or nullptr.
Mapping* Find(const uint8_t* data) {
  auto it = g_mappings.find(reinterpret_cast<uintptr_t>(data));
  return it == g_mappings.end() ? nullptr : it->second;
}

void FinalizeMapping(Napi::Env /*env*/, uint8_t* data, Mapping* m) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_mappings.find(reinterpret_cast<uintptr_t>(data));
    if (it != g_mappings.end() && it->second == m) g_mappings.erase(it);
  }
  ::munmap(m->addr, m->len);  // file pages or the reserved anonymous range
  delete m;
}

// mmap(fd, length) -> Buffer over a MAP_SHARED read/write mapping of [0, length), marked
// MADV_RANDOM (a hint: a fault reads in just its page, cached as a base page).
Napi::Value Mmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t len;
  if (!GetFd(info, 0, "mmap", &fd) || !GetInt(info, 1, "mmap", "length", 1, kMaxSafeInteger, &len))
    return env.Undefined();
  void* p = ::mmap(nullptr, static_cast<size_t>(len), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    ErrnoError(env, errno, "mmap").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  (void)::madvise(p, static_cast<size_t>(len), MADV_RANDOM);  // a hint; cannot fail on a fresh mapping
  Mapping* m = new Mapping{static_cast<uint8_t*>(p), static_cast<size_t>(len), true};
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_mappings[reinterpret_cast<uintptr_t>(p)] = m;
  }
  return Napi::Buffer<uint8_t>::New(env, m->addr, m->len, FinalizeMapping, m);
}

// munmap(buf): releases the file mapping; a second call (or a detached Buffer) is a no-op.
Napi::Value Munmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> buf;
  if (!GetBuffer(info, 0, "munmap", "buf", &buf)) return env.Undefined();
  if (buf.Data() == nullptr || buf.Length() == 0) return env.Undefined();  // already detached
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    Mapping* m = Find(buf.Data());
    if (m == nullptr || m->len != buf.Length()) {
      ThrowType(env, "munmap: buf is not a Buffer returned by mmap()");
      return env.Undefined();
    }
    if (!m->fileMapped) return env.Undefined();  // second munmap
    // Replace the file pages by anonymous ones in one step (no window where the range is free).
    void* p = ::mmap(m->addr, m->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                     -1, 0);
    if (p == MAP_FAILED) {
      ErrnoError(env, errno, "munmap").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    m->fileMapped = false;
  }
  // Detach outside the lock: the finalizer may run from inside Detach().
  napi_value ab = nullptr;
  if (napi_get_typedarray_info(env, buf, nullptr, nullptr, nullptr, &ab, nullptr) == napi_ok && ab != nullptr &&
      napi_detach_arraybuffer(env, ab) != napi_ok) {
    // Not detachable here: the anonymous pages already make later use safe. Clear the
    // pending exception, if any, that the failed detach left.
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
  }
  return env.Undefined();
}

// ---- the persist pool ----

constexpr int kPersistThreads = 4;

enum class JobKind { kMsync, kPopulateWrite };

struct PersistJob {
  JobKind kind = JobKind::kMsync;
  uint8_t* start = nullptr;
  size_t len = 0;
  int err = 0;
  Napi::ThreadSafeFunction tsfn;
  Napi::Reference<Napi::Buffer<uint8_t>> buf;  // created and reset on the JS thread only
};

// Heap-allocated and never destroyed: the pool threads wait on the condition variable
// forever, and destroying a condition variable with waiters at exit() blocks in glibc.
struct Pool {
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<PersistJob*> queue;
  int threads = 0;
};
Pool* const g_pool = new Pool();

// Hands the job's result to its callback on the event loop, from a pool thread (blocking:
// waits for room in the queue) or from the event loop itself (no thread could be made).
void FinishJob(PersistJob* job, bool blocking) {
  const char* name = job->kind == JobKind::kMsync ? "msync" : "madvise";
  Napi::ThreadSafeFunction tsfn = job->tsfn;
  auto call = [name](Napi::Env env, Napi::Function cb, PersistJob* j) {
    if (env == nullptr) return;  // shutting down: leak the job (see below)
    int err = j->err;
    j->buf.Reset();
    delete j;
    if (cb.IsEmpty()) return;
    if (err != 0) {
      cb.Call({ErrnoError(env, err, name).Value()});
    } else {
      cb.Call({env.Null()});
    }
  };
  napi_status st = blocking ? tsfn.BlockingCall(job, call) : tsfn.NonBlockingCall(job, call);
  // On failure (the environment is shutting down) the job is not deleted: its Reference
  // may only be released on the JS thread, which no longer runs; leaking it is harmless.
  (void)st;
  tsfn.Release();
}

void RunJob(PersistJob* job) {
  if (job->len != 0) {
    if (job->kind == JobKind::kMsync) {
      if (::msync(job->start, job->len, MS_SYNC) != 0) job->err = errno;
    } else {
      if (::madvise(job->start, job->len, MADV_POPULATE_WRITE) != 0) job->err = errno;
    }
  }
  FinishJob(job, true);
}

void PoolThread() {
  for (;;) {
    PersistJob* job;
    {
      std::unique_lock<std::mutex> lock(g_pool->mutex);
      g_pool->cv.wait(lock, [] { return !g_pool->queue.empty(); });
      job = g_pool->queue.front();
      g_pool->queue.pop_front();
    }
    RunJob(job);
  }
}

void Submit(PersistJob* job) {
  std::lock_guard<std::mutex> lock(g_pool->mutex);
  // Client-facing (a FLUSH waits on msync): made by the launcher, at the starting priority.
  while (g_pool->threads < kPersistThreads && StartForegroundThread("nvm-persist", PoolThread)) g_pool->threads++;
  if (g_pool->threads == 0) {  // no thread could be made: the job fails, it does not hang
    job->err = EAGAIN;
    FinishJob(job, false);
    return;
  }
  g_pool->queue.push_back(job);
  g_pool->cv.notify_one();
}

// Shared argument handling of msync() and populateWrite(): (buf, offset, length, cb).
Napi::Value QueueRangeJob(const Napi::CallbackInfo& info, const char* fn, JobKind kind) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> buf;
  int64_t off, len;
  Napi::Function cb;
  if (!GetBuffer(info, 0, fn, "buf", &buf) || !GetInt(info, 1, fn, "offset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 2, fn, "length", 0, kMaxSafeInteger, &len) || !GetCallback(info, 3, fn, &cb))
    return env.Undefined();
  size_t mapLen = 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    Mapping* m = buf.Data() == nullptr ? nullptr : Find(buf.Data());
    if (m == nullptr || m->len != buf.Length() || !m->fileMapped) {
      ThrowType(env, std::string(fn) + ": buf is not a live mapping from mmap()");
      return env.Undefined();
    }
    mapLen = m->len;
  }
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > mapLen) {
    ThrowRange(env, std::string(fn) + ": offset+length exceeds the mapping");
    return env.Undefined();
  }
  // msync/madvise need a page-aligned start; the mapping itself starts on a page boundary.
  size_t page = PageSize();
  size_t alignedOff = static_cast<size_t>(off) & ~(page - 1);
  size_t syncLen = len == 0 ? 0 : static_cast<size_t>(off + len) - alignedOff;
  PersistJob* job = new PersistJob();
  job->kind = kind;
  job->start = buf.Data() + alignedOff;
  job->len = syncLen;
  job->tsfn = Napi::ThreadSafeFunction::New(env, cb, fn, 0, 1);
  job->buf = Napi::Persistent(buf);
  Submit(job);
  return env.Undefined();
}

// msync(buf, offset, length, cb): msync(MS_SYNC) of the pages covering the range.
Napi::Value Msync(const Napi::CallbackInfo& info) {
  return QueueRangeJob(info, "msync", JobKind::kMsync);
}

// populateWrite(buf, offset, length, cb): madvise(MADV_POPULATE_WRITE) of the pages
// covering the range, so later stores into them do not fault. Contents are unchanged.
Napi::Value PopulateWrite(const Napi::CallbackInfo& info) {
  return QueueRangeJob(info, "populateWrite", JobKind::kPopulateWrite);
}

// ---- recachePages ----

constexpr size_t kRecacheChunkBytes = 1024 * 1024;

// Off the event loop (libuv pool; runs once per open, before the mapping exists):
// fdatasync (so every cached page is clean and can be dropped: this also makes durable
// what a crashed process stored and never persisted, which is allowed), then
// fadvise(DONTNEED) of the whole file, fadvise(RANDOM) on the open file, and a pread of
// [0, length) in 1 MiB pieces, which without readahead caches the file in base pages.
// The fadvise calls are hints (their errors are ignored); a failed fdatasync or pread
// fails the job. Reading stops early only at end of file (reported as EIO: the caller
// checked the size).
class RecacheJob final : public Napi::AsyncWorker {
 public:
  RecacheJob(const Napi::Function& cb, int fd, int64_t len) : Napi::AsyncWorker(cb, "recachePages"), fd_(fd), len_(len) {}
  void Execute() override {
    if (::fdatasync(fd_) != 0) return Fail(errno, "fdatasync");
    (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
    (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
    std::unique_ptr<uint8_t[]> chunk(new (std::nothrow) uint8_t[kRecacheChunkBytes]);
    if (!chunk) return Fail(ENOMEM, "recachePages");
    int64_t at = 0;
    while (at < len_) {
      size_t want = static_cast<size_t>(std::min<int64_t>(len_ - at, static_cast<int64_t>(kRecacheChunkBytes)));
      ssize_t n = ::pread(fd_, chunk.get(), want, static_cast<off_t>(at));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Fail(errno, "pread");
      }
      if (n == 0) return Fail(EIO, "pread");  // shorter than length: the file shrank
      at += n;
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_ != 0) {
      Callback().Call({ErrnoError(env, err_, syscall_).Value()});
    } else {
      Callback().Call({env.Null()});
    }
  }

 private:
  void Fail(int err, const char* syscall) {
    err_ = err;
    syscall_ = syscall;
  }
  int fd_;
  int64_t len_;
  int err_ = 0;
  const char* syscall_ = "recachePages";
};

// recachePages(fd, length, cb): see RecacheJob.
Napi::Value RecachePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t len;
  Napi::Function cb;
  if (!GetFd(info, 0, "recachePages", &fd) || !GetInt(info, 1, "recachePages", "length", 0, kMaxSafeInteger, &len) ||
      !GetCallback(info, 2, "recachePages", &cb))
    return env.Undefined();
  (new RecacheJob(cb, fd, len))->Queue();
  return env.Undefined();
}

}  // namespace

void InitNvram(Napi::Env env, Napi::Object exports) {
  exports.Set("recachePages", Napi::Function::New(env, RecachePages, "recachePages"));
  exports.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  exports.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
  exports.Set("msync", Napi::Function::New(env, Msync, "msync"));
  exports.Set("populateWrite", Napi::Function::New(env, PopulateWrite, "populateWrite"));
}

}  // namespace nvm
