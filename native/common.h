// Shared helpers for the nvmirror addon.
//
// Invariants kept by every exported function:
// - Arguments are re-checked here (types, integer ranges, buffer bounds) even though the
//   TypeScript wrapper (src/io/native.ts) validated them already; a bad argument throws a
//   JS TypeError/RangeError and the function returns at once. Native code never crashes
//   on input from JS.
// - Blocking system calls run only in an async job (libuv thread pool), never on the
//   event loop. A job holds a reference to every Buffer it touches until its callback ran.
// - A failed system call reaches JS as an Error with `code` (e.g. 'EIO'), `errno` (negative,
//   as in Node's fs errors), `syscall`, and a message naming the call.
#pragma once

#include <napi.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <string>

namespace nvm {

// Largest integer a JS number holds exactly (Number.MAX_SAFE_INTEGER).
constexpr int64_t kMaxSafeInteger = 9007199254740991LL;

// Name of an errno value the way Node spells it ('EIO', 'ENOSPC', 'ENOTSUP', ...).
const char* ErrnoName(int err);

// Builds an Error for a failed system call: message "EIO: Input/output error, pwrite".
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall);

// Throws a TypeError / RangeError as a pending JS exception (no C++ exceptions).
void ThrowType(Napi::Env env, const std::string& msg);
void ThrowRange(Napi::Env env, const std::string& msg);

// Reads info[i] as an integer in [min, max]. On failure throws (pending) and returns false.
bool GetInt(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name,
            int64_t min, int64_t max, int64_t* out);
// Reads info[i] as a file descriptor (int in [0, INT32_MAX]).
bool GetFd(const Napi::CallbackInfo& info, size_t i, const char* fn, int* out);
// Reads info[i] as a Buffer (any Uint8Array). On failure throws and returns false.
bool GetBuffer(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name,
               Napi::Buffer<uint8_t>* out);
// Reads info[i] as a boolean.
bool GetBool(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, bool* out);
// Reads info[i] as a function (the completion callback).
bool GetCallback(const Napi::CallbackInfo& info, size_t i, const char* fn, Napi::Function* out);

// crc32c (seed 0) of [p, p+n), for native callers (checksum.cc; hardware when present).
// Valid only after InitChecksum ran (the addon's load).
uint32_t Crc32cOf(const uint8_t* p, size_t n);
// crc32c of [p, p+n) seeded with `seed`, exactly as the JS crc32c(buf, off, len, seed) (the
// NVRAM record checksum, for the NBD threads' appends: nv_append.h).
uint32_t Crc32cSeeded(uint32_t seed, const uint8_t* p, size_t n);
// The same value as Crc32cSeeded, in three chains (~2.5x faster per byte on long spans).
uint32_t Crc32cSeededWide(uint32_t seed, const uint8_t* p, size_t n);
// crc32c(A || B) (A with any seed) from crc = crc32c(A) and blockCrc = crc32c(B) of a 4 KiB
// block B, without reading B: four table lookups.
uint32_t Crc32cExtendBlock(uint32_t crc, uint32_t blockCrc);

// preadv2(RWF_NOWAIT) of all of [data, data+len) at pos: true only if all of it came from
// the page cache (a short read, would-block, EOF or error: false; the caller leaves the
// read to TypeScript, which reads with the volume's own code and reports its errors).
// For the NBD threads (nbd_serve.cc, read_map.h): they must never block on the disk.
inline bool PreadCached(int fd, uint8_t* data, size_t len, uint64_t pos) {
  size_t done = 0;
  while (done < len) {
    iovec v{data + done, len - done};
    ssize_t n = ::preadv2(fd, &v, 1, static_cast<off_t>(pos + done), RWF_NOWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// pread of all of [data, data+len) at pos, waiting for the disk: true only if all of it was
// read (a short read, EOF or error: false). For the NBD threads' read pool (nbd_serve.cc),
// never for a connection's own thread.
inline bool PreadAll(int fd, uint8_t* data, size_t len, uint64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, data + done, len - done, static_cast<off_t>(pos + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// pwritev of all of iov[0..n) at off, resuming after short writes (iov is consumed);
// false on an error. For the threads that store log records through a file descriptor
// (nv_append.h, mirror_rx.cc).
inline bool PwritevAll(int fd, iovec* iov, int n, uint64_t off) {
  while (n > 0) {
    ssize_t w = ::pwritev(fd, iov, n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    off += static_cast<uint64_t>(w);
    size_t left = static_cast<size_t>(w);
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

// CLOCK_MONOTONIC in ns.
inline uint64_t MonoNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// Registration of each source file's functions on the exports object.
void InitIo(Napi::Env env, Napi::Object exports);
void InitNvram(Napi::Env env, Napi::Object exports);
void InitChecksum(Napi::Env env, Napi::Object exports);
void InitParity(Napi::Env env, Napi::Object exports);
void InitNbdServe(Napi::Env env, Napi::Object exports);
void InitDelta(Napi::Env env, Napi::Object exports);
void InitMirrorRx(Napi::Env env, Napi::Object exports);
void InitLogWriter(Napi::Env env, Napi::Object exports);
void InitPriority(Napi::Env env, Napi::Object exports);

// Makes the launcher thread (priority.cc) if it does not exist yet: before anything lowers
// the event loop's priority, so it keeps the priority the process started with.
void EnsureLauncher();
// Starts fn on a detached thread made by the launcher: at the process's starting priority,
// whatever the caller's, named `name` (at most 15 characters are kept). For every thread
// that answers clients. False if no thread could be made (fn is dropped).
bool StartForegroundThread(const char* name, std::function<void()> fn);
// Puts the calling thread under SCHED_BATCH (same nice value): when it wakes it does not
// preempt the thread running on that CPU, it runs at the next scheduling point. For a
// thread woken far more often than it has work worth a preemption (a sync mirror's link:
// priority.cc). False if the kernel refused (the thread keeps SCHED_OTHER).
bool SetBatchPolicy();

}  // namespace nvm

// Owned by native/nbd_attach.cc (global namespace).
void InitNbdAttach(Napi::Env env, Napi::Object exports);
