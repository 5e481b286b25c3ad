// Positional file I/O off the event loop: pread, pwrite(+fdatasync), pwritev(+fdatasync),
// batches of scattered single writes (pwriteBatch) and of scattered reads with their
// crc32c (preadBatchCrc),
// fdatasync, fallocate (allocate / punch hole / zero range), lseek SEEK_DATA/SEEK_HOLE,
// a non-blocking exclusive flock, and page-cache-only reads/writes (RWF_NOWAIT) that may
// run on the event loop because they never wait for the disk.
//
// Invariants:
// - Each blocking call is one Napi::AsyncWorker job; Execute() touches no JS value, only
//   the raw pointers captured on the main thread, and the job holds a reference to every
//   Buffer whose memory it reads or writes until the callback has run.
// - pread/pwrite/pwritev retry EINTR and short transfers, so a write job either writes
//   every byte or reports an error; a read job stops early only at end of file.
// - A write job with sync=true runs fdatasync in the same job, after the write succeeded.
// - Callbacks are called exactly once: (err) or (null, result).
#include "common.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace nvm {
namespace {

constexpr int kFallocAllocate = 0;
constexpr int kFallocPunchHole = 1;
constexpr int kFallocZeroRange = 2;
constexpr int kMaxIovecs = 1024;  // == IOV_MAX on Linux; src/io/native.ts caps the same
// Largest synchronous (event-loop) copy the *Nowait calls accept: about 100 us of memcpy.
constexpr int64_t kNowaitMaxBytes = 1024 * 1024;

// Base job: runs Execute() in the thread pool, then calls back (err) or (null, results...).
class Job : public Napi::AsyncWorker {
 protected:
  Job(const Napi::Function& cb, const char* name) : Napi::AsyncWorker(cb, name), syscall_(name) {}
  Job(const Napi::Function& cb, const char* name, const Napi::Object& resource)
      : Napi::AsyncWorker(cb, name, resource), syscall_(name) {}

  // Result values after a success (besides the leading null).
  virtual void Results(Napi::Env env, std::vector<napi_value>* out) { (void)env; (void)out; }

  void Fail(int err, const char* syscall) {
    err_ = err;
    syscall_ = syscall;
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ != 0) {
      Callback().Call({ErrnoError(env, err_, syscall_).Value()});
      return;
    }
    std::vector<napi_value> args;
    args.reserve(2);
    args.push_back(env.Null());
    Results(env, &args);
    Callback().Call(args);
  }

  int err_ = 0;
  const char* syscall_;
};

// Writes all of [data, data+len) at pos; returns 0 or an errno.
int WriteAll(int fd, const uint8_t* data, size_t len, int64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, data + done, len - done, static_cast<off_t>(pos + static_cast<int64_t>(done)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;  // no progress on a regular file: treat as an I/O error
    done += static_cast<size_t>(n);
  }
  return 0;
}

class PreadJob final : public Job {
 public:
  PreadJob(const Napi::Function& cb, const Napi::Buffer<uint8_t>& buf, int fd, uint8_t* data, size_t len,
           int64_t pos)
      : Job(cb, "pread", buf), buf_(Napi::Persistent(buf)), fd_(fd), data_(data), len_(len), pos_(pos) {}
  // With a checksum table: after the read, the crc32c (seed 0) of each whole 4 KiB block
  // read goes to crcs (little-endian uint32s; the caller checked it holds len / 4096).
  PreadJob(const Napi::Function& cb, const Napi::Buffer<uint8_t>& buf, int fd, uint8_t* data, size_t len,
           int64_t pos, const Napi::Buffer<uint8_t>& crcs)
      : Job(cb, "pread", buf), buf_(Napi::Persistent(buf)), fd_(fd), data_(data), len_(len), pos_(pos),
        crcsRef_(Napi::Persistent(crcs)), crcs_(crcs.Data()) {}

  void Execute() override {
    size_t done = 0;
    while (done < len_) {
      ssize_t n = ::pread(fd_, data_ + done, len_ - done, static_cast<off_t>(pos_ + static_cast<int64_t>(done)));
      if (n < 0) {
        if (errno == EINTR) continue;
        Fail(errno, "pread");
        return;
      }
      if (n == 0) break;  // end of file
      done += static_cast<size_t>(n);
    }
    done_ = done;
    if (crcs_ != nullptr) {
      for (size_t b = 0; (b + 1) * 4096 <= done; b++) {
        uint32_t c = Crc32cOf(data_ + b * 4096, 4096);
        uint8_t le[4] = {static_cast<uint8_t>(c), static_cast<uint8_t>(c >> 8), static_cast<uint8_t>(c >> 16), static_cast<uint8_t>(c >> 24)};
        std::memcpy(crcs_ + 4 * b, le, 4);
      }
    }
  }

  void Results(Napi::Env env, std::vector<napi_value>* out) override {
    out->push_back(Napi::Number::New(env, static_cast<double>(done_)));
  }

 private:
  Napi::Reference<Napi::Buffer<uint8_t>> buf_;
  int fd_;
  uint8_t* data_;
  size_t len_;
  int64_t pos_;
  Napi::Reference<Napi::Buffer<uint8_t>> crcsRef_;
  uint8_t* crcs_ = nullptr;
  size_t done_ = 0;
};

class PwriteJob final : public Job {
 public:
  PwriteJob(const Napi::Function& cb, const Napi::Buffer<uint8_t>& buf, int fd, const uint8_t* data,
            size_t len, int64_t pos, bool sync, bool writeback)
      : Job(cb, "pwrite", buf), buf_(Napi::Persistent(buf)), fd_(fd), data_(data), len_(len), pos_(pos),
        sync_(sync), writeback_(writeback) {}

  void Execute() override {
    int err = WriteAll(fd_, data_, len_, pos_);
    if (err != 0) {
      Fail(err, "pwrite");
      return;
    }
    if (sync_ && ::fdatasync(fd_) != 0) {
      Fail(errno, "fdatasync");
      return;
    }
    // A hint (the caller syncs this range soon): start its writeback now, so the disk
    // works while the caller goes on and the later fdatasync waits only for the rest.
    // It makes nothing durable and its errors are left to that fdatasync.
    if (writeback_ && !sync_) (void)::sync_file_range(fd_, pos_, static_cast<off_t>(len_), SYNC_FILE_RANGE_WRITE);
  }

 private:
  Napi::Reference<Napi::Buffer<uint8_t>> buf_;
  int fd_;
  const uint8_t* data_;
  size_t len_;
  int64_t pos_;
  bool sync_;
  bool writeback_;
};

// O_DIRECT wants the memory, the length and the position aligned; a write whose buffers
// are not (Node's Buffers rarely are) is copied through this thread's bounce buffer, which
// stays mapped across jobs (a fresh mapping costs a page fault per 4 KiB, which on a VM can
// cost more than the copy).
constexpr size_t kDirectAlign = 4096;
constexpr size_t kBounceBytes = 1024 * 1024;

uint8_t* BounceBuffer() {
  struct Holder {
    uint8_t* p = nullptr;
    ~Holder() { free(p); }
  };
  thread_local Holder h;
  if (h.p == nullptr) {
    void* p = nullptr;
    if (posix_memalign(&p, kDirectAlign, kBounceBytes) != 0) return nullptr;
    h.p = static_cast<uint8_t*>(p);
  }
  return h.p;
}

bool IovAligned(const std::vector<iovec>& iov) {
  for (const iovec& v : iov) {
    if (reinterpret_cast<uintptr_t>(v.iov_base) % kDirectAlign != 0 || v.iov_len % kDirectAlign != 0) return false;
  }
  return true;
}

class PwritevJob final : public Job {
 public:
  // `keep` is an array this job alone holds (PwritevImpl makes it) with every buffer of
  // `iov`: one reference keeps them all alive until the callback, instead of one each.
  PwritevJob(const Napi::Function& cb, std::vector<iovec>&& iov, const Napi::Array& keep, int fd, int64_t pos, bool sync, bool writeback, bool direct = false)
      : Job(cb, direct ? "pwritevDirect" : "pwritev"), iov_(std::move(iov)), keep_(Napi::Persistent(keep)), fd_(fd), pos_(pos), sync_(sync),
        writeback_(writeback), direct_(direct) {}

  void Execute() override {
    if (direct_ && !IovAligned(iov_)) {
      ExecuteBounced();
      return;
    }
    size_t first = 0;
    int64_t pos = pos_;
    while (first < iov_.size()) {
      if (iov_[first].iov_len == 0) {
        first++;
        continue;
      }
      int cnt = static_cast<int>(iov_.size() - first);
      ssize_t n = ::pwritev(fd_, &iov_[first], cnt, static_cast<off_t>(pos));
      if (n < 0) {
        if (errno == EINTR) continue;
        Fail(errno, "pwritev");
        return;
      }
      if (n == 0) {
        Fail(EIO, "pwritev");
        return;
      }
      pos += n;
      size_t left = static_cast<size_t>(n);
      while (left > 0) {  // advance over what was written (partial writes)
        iovec& v = iov_[first];
        if (left >= v.iov_len) {
          left -= v.iov_len;
          v.iov_len = 0;
          first++;
        } else {
          v.iov_base = static_cast<uint8_t*>(v.iov_base) + left;
          v.iov_len -= left;
          left = 0;
        }
      }
    }
    if (sync_ && ::fdatasync(fd_) != 0) {
      Fail(errno, "fdatasync");
      return;
    }
    // As PwriteJob: a hint that starts the range's writeback; its errors are left to the caller's fdatasync.
    if (writeback_ && !sync_) (void)::sync_file_range(fd_, pos_, static_cast<off_t>(pos - pos_), SYNC_FILE_RANGE_WRITE);
  }

 private:
  // Copies the buffers through the bounce buffer, kBounceBytes per pwrite.
  void ExecuteBounced() {
    uint8_t* bounce = BounceBuffer();
    if (bounce == nullptr) {
      Fail(ENOMEM, "posix_memalign");
      return;
    }
    int64_t pos = pos_;
    size_t fill = 0;
    for (const iovec& v : iov_) {
      const uint8_t* src = static_cast<const uint8_t*>(v.iov_base);
      size_t left = v.iov_len;
      while (left > 0) {
        size_t k = std::min(left, kBounceBytes - fill);
        memcpy(bounce + fill, src, k);
        fill += k;
        src += k;
        left -= k;
        if (fill == kBounceBytes) {
          int err = WriteAll(fd_, bounce, fill, pos);
          if (err != 0) {
            Fail(err, "pwrite");
            return;
          }
          pos += static_cast<int64_t>(fill);
          fill = 0;
        }
      }
    }
    if (fill > 0) {
      int err = WriteAll(fd_, bounce, fill, pos);
      if (err != 0) Fail(err, "pwrite");
    }
    if (err_ == 0 && sync_ && ::fdatasync(fd_) != 0) Fail(errno, "fdatasync");
  }

  std::vector<iovec> iov_;
  Napi::Reference<Napi::Array> keep_;
  int fd_;
  int64_t pos_;
  bool sync_;
  bool writeback_;
  bool direct_;
};

// Independent writes (each its own buffer and position) in one thread-pool job, so a burst
// of small writes pays one hop to the pool instead of one each. Each write's outcome is
// reported separately: results[i] is 0 or the errno of write i.
class PwriteBatchJob final : public Job {
 public:
  PwriteBatchJob(const Napi::Function& cb, int fd, std::vector<Napi::Buffer<uint8_t>>& bufs, std::vector<int64_t>& positions)
      : Job(cb, "pwrite"), fd_(fd), positions_(std::move(positions)) {
    refs_.reserve(bufs.size());
    data_.reserve(bufs.size());
    for (auto& b : bufs) {
      refs_.push_back(Napi::Persistent(b));
      data_.push_back(std::make_pair(b.Data(), b.Length()));
    }
    results_.assign(bufs.size(), 0);
  }

  void Execute() override {
    for (size_t i = 0; i < data_.size(); i++) results_[i] = WriteAll(fd_, data_[i].first, data_[i].second, positions_[i]);
  }

  void Results(Napi::Env env, std::vector<napi_value>* out) override {
    Napi::Array r = Napi::Array::New(env, results_.size());
    for (size_t i = 0; i < results_.size(); i++) {
      int e = results_[i];
      r.Set(static_cast<uint32_t>(i), e == 0 ? env.Null() : ErrnoError(env, e, "pwrite").Value());
    }
    out->push_back(r);
  }

 private:
  int fd_;
  std::vector<int64_t> positions_;
  std::vector<Napi::Reference<Napi::Buffer<uint8_t>>> refs_;
  std::vector<std::pair<const uint8_t*, size_t>> data_;
  std::vector<int> results_;
};

class FdatasyncJob final : public Job {
 public:
  FdatasyncJob(const Napi::Function& cb, int fd) : Job(cb, "fdatasync"), fd_(fd) {}
  void Execute() override {
    if (::fdatasync(fd_) != 0) Fail(errno, "fdatasync");
  }

 private:
  int fd_;
};

// Reads each buffer whole at its own position (one pread each, in order), then the crc32c
// (seed 0) of each buffer's first 4 KiB into crcs[i] (little-endian uint32). A read error
// or a short read (end of file) fails the whole job, naming the position.
class PreadBatchCrcJob final : public Job {
 public:
  PreadBatchCrcJob(const Napi::Function& cb, int fd, std::vector<Napi::Buffer<uint8_t>>& bufs, std::vector<int64_t>& positions,
                   const Napi::Buffer<uint8_t>& crcs)
      : Job(cb, "pread"), fd_(fd), positions_(std::move(positions)), crcsRef_(Napi::Persistent(crcs)), crcs_(crcs.Data()) {
    refs_.reserve(bufs.size());
    data_.reserve(bufs.size());
    for (auto& b : bufs) {
      refs_.push_back(Napi::Persistent(b));
      data_.push_back(std::make_pair(b.Data(), b.Length()));
    }
  }

  void Execute() override {
    for (size_t i = 0; i < data_.size(); i++) {
      uint8_t* p = data_[i].first;
      size_t len = data_[i].second;
      size_t done = 0;
      while (done < len) {
        ssize_t n = ::pread(fd_, p + done, len - done, static_cast<off_t>(positions_[i] + static_cast<int64_t>(done)));
        if (n < 0) {
          if (errno == EINTR) continue;
          Fail(errno, "pread");
          return;
        }
        if (n == 0) {
          Fail(EIO, "pread (short read: end of file)");
          return;
        }
        done += static_cast<size_t>(n);
      }
      uint32_t c = Crc32cOf(p, 4096);
      uint8_t le[4] = {static_cast<uint8_t>(c), static_cast<uint8_t>(c >> 8), static_cast<uint8_t>(c >> 16), static_cast<uint8_t>(c >> 24)};
      std::memcpy(crcs_ + 4 * i, le, 4);
    }
  }

 private:
  int fd_;
  std::vector<int64_t> positions_;
  std::vector<Napi::Reference<Napi::Buffer<uint8_t>>> refs_;
  std::vector<std::pair<uint8_t*, size_t>> data_;
  Napi::Reference<Napi::Buffer<uint8_t>> crcsRef_;
  uint8_t* crcs_;
};

class FallocateJob final : public Job {
 public:
  FallocateJob(const Napi::Function& cb, int fd, int mode, int64_t pos, int64_t len)
      : Job(cb, "fallocate"), fd_(fd), mode_(mode), pos_(pos), len_(len) {}
  void Execute() override {
    int flags = FALLOC_FL_KEEP_SIZE;
    if (mode_ == kFallocPunchHole) flags |= FALLOC_FL_PUNCH_HOLE;
    if (mode_ == kFallocZeroRange) flags |= FALLOC_FL_ZERO_RANGE;
    for (;;) {
      if (::fallocate(fd_, flags, static_cast<off_t>(pos_), static_cast<off_t>(len_)) == 0) return;
      if (errno == EINTR) continue;
      Fail(errno, "fallocate");
      return;
    }
  }

 private:
  int fd_;
  int mode_;
  int64_t pos_;
  int64_t len_;
};

class SeekJob final : public Job {
 public:
  SeekJob(const Napi::Function& cb, int fd, int64_t pos, int whence)
      : Job(cb, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)"), fd_(fd), pos_(pos),
        whence_(whence) {}
  void Execute() override {
    off_t r = ::lseek(fd_, static_cast<off_t>(pos_), whence_);
    if (r < 0) {
      if (errno == ENXIO) {
        result_ = -1;  // no data (or hole) at or after pos: past end of file
        return;
      }
      Fail(errno, syscall_);
      return;
    }
    result_ = static_cast<int64_t>(r);
  }
  void Results(Napi::Env env, std::vector<napi_value>* out) override {
    out->push_back(Napi::Number::New(env, static_cast<double>(result_)));
  }

 private:
  int fd_;
  int64_t pos_;
  int whence_;
  int64_t result_ = -1;
};

// pread(fd, buf, bufOffset, length, position, cb)
Napi::Value Pread(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Buffer<uint8_t> buf;
  int64_t off, len, pos;
  Napi::Function cb;
  if (!GetFd(info, 0, "pread", &fd) || !GetBuffer(info, 1, "pread", "buf", &buf) ||
      !GetInt(info, 2, "pread", "bufOffset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 3, "pread", "length", 0, SSIZE_MAX, &len) ||
      !GetInt(info, 4, "pread", "position", 0, kMaxSafeInteger, &pos) || !GetCallback(info, 5, "pread", &cb))
    return env.Undefined();
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > buf.Length()) {
    ThrowRange(env, "pread: bufOffset+length exceeds the buffer");
    return env.Undefined();
  }
  (new PreadJob(cb, buf, fd, buf.Data() + off, static_cast<size_t>(len), pos))->Queue();
  return env.Undefined();
}

// preadCrc(fd, buf, bufOffset, length, position, crcs, cb): pread, then the crc32c of each
// whole 4 KiB block read into crcs, in the same pool job (bulk reads that are verified, e.g.
// a mirror baseline's walk: neither the copy nor the checksums run on the event loop).
// length is whole blocks; crcs holds length / 4096 uint32s.
Napi::Value PreadCrc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Buffer<uint8_t> buf, crcs;
  int64_t off, len, pos;
  Napi::Function cb;
  if (!GetFd(info, 0, "preadCrc", &fd) || !GetBuffer(info, 1, "preadCrc", "buf", &buf) ||
      !GetInt(info, 2, "preadCrc", "bufOffset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 3, "preadCrc", "length", 0, SSIZE_MAX, &len) ||
      !GetInt(info, 4, "preadCrc", "position", 0, kMaxSafeInteger, &pos) || !GetBuffer(info, 5, "preadCrc", "crcs", &crcs) ||
      !GetCallback(info, 6, "preadCrc", &cb))
    return env.Undefined();
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > buf.Length()) {
    ThrowRange(env, "preadCrc: bufOffset+length exceeds the buffer");
    return env.Undefined();
  }
  if (len % 4096 != 0) {
    ThrowRange(env, "preadCrc: length must be whole 4096-byte blocks");
    return env.Undefined();
  }
  if (static_cast<uint64_t>(len / 4096) * 4 > crcs.Length()) {
    ThrowRange(env, "preadCrc: crcs holds fewer than length/4096 uint32s");
    return env.Undefined();
  }
  (new PreadJob(cb, buf, fd, buf.Data() + off, static_cast<size_t>(len), pos, crcs))->Queue();
  return env.Undefined();
}

// pwrite(fd, buf, bufOffset, length, position, sync, writeback, cb): writeback (ignored with sync)
// starts the range's writeback after the write (sync_file_range WRITE), a hint.
Napi::Value Pwrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Buffer<uint8_t> buf;
  int64_t off, len, pos;
  bool sync, writeback;
  Napi::Function cb;
  if (!GetFd(info, 0, "pwrite", &fd) || !GetBuffer(info, 1, "pwrite", "buf", &buf) ||
      !GetInt(info, 2, "pwrite", "bufOffset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 3, "pwrite", "length", 0, SSIZE_MAX, &len) ||
      !GetInt(info, 4, "pwrite", "position", 0, kMaxSafeInteger, &pos) ||
      !GetBool(info, 5, "pwrite", "sync", &sync) || !GetBool(info, 6, "pwrite", "writeback", &writeback) ||
      !GetCallback(info, 7, "pwrite", &cb))
    return env.Undefined();
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > buf.Length()) {
    ThrowRange(env, "pwrite: bufOffset+length exceeds the buffer");
    return env.Undefined();
  }
  (new PwriteJob(cb, buf, fd, buf.Data() + off, static_cast<size_t>(len), pos, sync, writeback))->Queue();
  return env.Undefined();
}

// pwritev(fd, bufs, position, sync, writeback, cb) (writeback as pwrite's); pwritevDirect(fd, bufs, position, cb) for an
// O_DIRECT descriptor (copied through an aligned bounce buffer unless already aligned).
Napi::Value PwritevImpl(const Napi::CallbackInfo& info, bool direct) {
  Napi::Env env = info.Env();
  int fd;
  int64_t pos;
  bool sync;
  bool writeback = false;
  Napi::Function cb;
  if (!GetFd(info, 0, "pwritev", &fd)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsArray()) {
    ThrowType(env, "pwritev: bufs must be an array of Buffers");
    return env.Undefined();
  }
  if (!GetInt(info, 2, "pwritev", "position", 0, kMaxSafeInteger, &pos)) return env.Undefined();
  if (direct) {
    sync = false;
    if (!GetCallback(info, 3, "pwritevDirect", &cb)) return env.Undefined();
  } else if (!GetBool(info, 3, "pwritev", "sync", &sync) || !GetBool(info, 4, "pwritev", "writeback", &writeback) ||
             !GetCallback(info, 5, "pwritev", &cb)) {
    return env.Undefined();
  }
  Napi::Array bufs = info[1].As<Napi::Array>();
  uint32_t n = bufs.Length();
  if (n < 1 || n > static_cast<uint32_t>(kMaxIovecs)) {
    ThrowRange(env, "pwritev: 1.." + std::to_string(kMaxIovecs) + " buffers, got " + std::to_string(n));
    return env.Undefined();
  }
  // Each element read once: its pointer and length go to the job, the Buffer itself into
  // a fresh array the job keeps (the caller's array may change after this call returns).
  uint64_t total = 0;
  std::vector<iovec> iov;
  iov.reserve(n);
  Napi::Array keep = Napi::Array::New(env, n);
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = bufs.Get(i);
    if (!v.IsBuffer()) {
      ThrowType(env, "pwritev: bufs[" + std::to_string(i) + "] must be a Buffer");
      return env.Undefined();
    }
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    iov.push_back(iovec{b.Data(), b.Length()});
    total += b.Length();
    keep.Set(i, v);
  }
  if (total > static_cast<uint64_t>(SSIZE_MAX) || static_cast<uint64_t>(pos) + total > static_cast<uint64_t>(kMaxSafeInteger)) {
    ThrowRange(env, "pwritev: total length too large");
    return env.Undefined();
  }
  if (direct && static_cast<uint64_t>(pos) % kDirectAlign != 0) {
    ThrowRange(env, "pwritevDirect: position must be a multiple of 4096");
    return env.Undefined();
  }
  if (direct && total % kDirectAlign != 0) {
    ThrowRange(env, "pwritevDirect: total length must be a multiple of 4096");
    return env.Undefined();
  }
  (new PwritevJob(cb, std::move(iov), keep, fd, pos, sync, writeback, direct))->Queue();
  return env.Undefined();
}

Napi::Value Pwritev(const Napi::CallbackInfo& info) { return PwritevImpl(info, false); }
Napi::Value PwritevDirect(const Napi::CallbackInfo& info) { return PwritevImpl(info, true); }

// The (bufs, positions) arrays pwriteBatch and preadBatchCrc take: 1..kMaxIovecs Buffers
// (each at least minBytes long) with as many safe non-negative positions. False (a JS
// error thrown) if anything is off.
bool GetBufsAndPositions(const Napi::CallbackInfo& info, const char* fn, size_t minBytes,
                         std::vector<Napi::Buffer<uint8_t>>* bv, std::vector<int64_t>* pv) {
  Napi::Env env = info.Env();
  const std::string f(fn);
  if (info.Length() < 3 || !info[1].IsArray() || !info[2].IsArray()) {
    ThrowType(env, f + ": bufs and positions must be arrays");
    return false;
  }
  Napi::Array bufs = info[1].As<Napi::Array>();
  Napi::Array positions = info[2].As<Napi::Array>();
  uint32_t n = bufs.Length();
  if (n < 1 || n > static_cast<uint32_t>(kMaxIovecs) || positions.Length() != n) {
    ThrowRange(env, f + ": 1.." + std::to_string(kMaxIovecs) + " buffers with as many positions");
    return false;
  }
  bv->reserve(n);
  pv->reserve(n);
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value b = bufs.Get(i);
    Napi::Value p = positions.Get(i);
    if (!b.IsBuffer()) {
      ThrowType(env, f + ": bufs[" + std::to_string(i) + "] must be a Buffer");
      return false;
    }
    if (!p.IsNumber()) {
      ThrowType(env, f + ": positions[" + std::to_string(i) + "] must be a number");
      return false;
    }
    double d = p.As<Napi::Number>().DoubleValue();
    Napi::Buffer<uint8_t> buf = b.As<Napi::Buffer<uint8_t>>();
    if (buf.Length() < minBytes || buf.Length() > static_cast<size_t>(SSIZE_MAX)) {
      ThrowRange(env, f + ": bufs[" + std::to_string(i) + "] must hold at least " + std::to_string(minBytes) + " bytes");
      return false;
    }
    if (!(d >= 0) || d > static_cast<double>(kMaxSafeInteger) || d != static_cast<double>(static_cast<int64_t>(d)) ||
        static_cast<uint64_t>(d) + buf.Length() > static_cast<uint64_t>(kMaxSafeInteger)) {
      ThrowRange(env, f + ": positions[" + std::to_string(i) + "] must be a safe non-negative integer");
      return false;
    }
    bv->push_back(buf);
    pv->push_back(static_cast<int64_t>(d));
  }
  return true;
}

// preadBatchCrc(fd, bufs, positions, crcs, cb): bufs[i] (each >= 4096 bytes) read whole from
// positions[i]; crcs (>= 4 x bufs.length bytes) gets each buffer's first-4-KiB crc32c.
Napi::Value PreadBatchCrc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Buffer<uint8_t> crcs;
  Napi::Function cb;
  std::vector<Napi::Buffer<uint8_t>> bv;
  std::vector<int64_t> pv;
  if (!GetFd(info, 0, "preadBatchCrc", &fd) || !GetBufsAndPositions(info, "preadBatchCrc", 4096, &bv, &pv) ||
      !GetBuffer(info, 3, "preadBatchCrc", "crcs", &crcs) || !GetCallback(info, 4, "preadBatchCrc", &cb))
    return env.Undefined();
  if (crcs.Length() < 4 * bv.size()) {
    ThrowRange(env, "preadBatchCrc: crcs must hold 4 bytes per buffer");
    return env.Undefined();
  }
  (new PreadBatchCrcJob(cb, fd, bv, pv, crcs))->Queue();
  return env.Undefined();
}

// pwriteBatch(fd, bufs, positions, cb): cb(null, errors[]) with errors[i] null or an Error.
Napi::Value PwriteBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Function cb;
  std::vector<Napi::Buffer<uint8_t>> bv;
  std::vector<int64_t> pv;
  if (!GetFd(info, 0, "pwriteBatch", &fd) || !GetBufsAndPositions(info, "pwriteBatch", 0, &bv, &pv) ||
      !GetCallback(info, 3, "pwriteBatch", &cb))
    return env.Undefined();
  (new PwriteBatchJob(cb, fd, bv, pv))->Queue();
  return env.Undefined();
}

// fdatasync(fd, cb)
Napi::Value Fdatasync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  Napi::Function cb;
  if (!GetFd(info, 0, "fdatasync", &fd) || !GetCallback(info, 1, "fdatasync", &cb)) return env.Undefined();
  (new FdatasyncJob(cb, fd))->Queue();
  return env.Undefined();
}

// fallocate(fd, mode, position, length, cb)
Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t mode, pos, len;
  Napi::Function cb;
  if (!GetFd(info, 0, "fallocate", &fd) || !GetInt(info, 1, "fallocate", "mode", 0, 2, &mode) ||
      !GetInt(info, 2, "fallocate", "position", 0, kMaxSafeInteger, &pos) ||
      !GetInt(info, 3, "fallocate", "length", 1, kMaxSafeInteger, &len) || !GetCallback(info, 4, "fallocate", &cb))
    return env.Undefined();
  if (pos + len > kMaxSafeInteger) {
    ThrowRange(env, "fallocate: position+length too large");
    return env.Undefined();
  }
  static_assert(kFallocAllocate == 0, "mode numbering is part of the JS contract");
  (new FallocateJob(cb, fd, static_cast<int>(mode), pos, len))->Queue();
  return env.Undefined();
}

// seek(fd, position, whence, cb): whence 3 = SEEK_DATA, 4 = SEEK_HOLE
Napi::Value Seek(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t pos, whence;
  Napi::Function cb;
  if (!GetFd(info, 0, "seek", &fd) || !GetInt(info, 1, "seek", "position", 0, kMaxSafeInteger, &pos) ||
      !GetInt(info, 2, "seek", "whence", SEEK_DATA, SEEK_HOLE, &whence) || !GetCallback(info, 3, "seek", &cb))
    return env.Undefined();
  static_assert(SEEK_DATA == 3 && SEEK_HOLE == 4, "whence numbering is part of the JS contract");
  (new SeekJob(cb, fd, pos, static_cast<int>(whence)))->Queue();
  return env.Undefined();
}

// Result codes of the non-blocking attempts below (besides a byte count >= 0).
constexpr int kNowaitWouldBlock = -1;   // EAGAIN, or any error: the async path reports real errors
constexpr int kNowaitUnsupported = -2;  // the file system (or kernel) cannot do RWF_NOWAIT here

// Shared by preadNowait/pwriteNowait: (fd, buf, bufOffset, length, position) with length <= 1 MiB.
bool NowaitArgs(const Napi::CallbackInfo& info, const char* fn, int* fd, iovec* iov, int64_t* pos) {
  Napi::Buffer<uint8_t> buf;
  int64_t off, len;
  if (!GetFd(info, 0, fn, fd) || !GetBuffer(info, 1, fn, "buf", &buf) ||
      !GetInt(info, 2, fn, "bufOffset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 3, fn, "length", 0, kNowaitMaxBytes, &len) ||
      !GetInt(info, 4, fn, "position", 0, kMaxSafeInteger, pos))
    return false;
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > buf.Length()) {
    ThrowRange(info.Env(), std::string(fn) + ": bufOffset+length exceeds the buffer");
    return false;
  }
  iov->iov_base = buf.Data() + off;
  iov->iov_len = static_cast<size_t>(len);
  return true;
}

int64_t NowaitResult(ssize_t n) {
  if (n >= 0) return n;
  if (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS) return kNowaitUnsupported;
  return kNowaitWouldBlock;
}

// preadNowait(fd, buf, bufOffset, length, position) -> bytes read (may be short), -1 would block,
// -2 unsupported. Runs on the calling thread: preadv2(RWF_NOWAIT) only copies from the page
// cache and never waits for the disk, so it is safe on the event loop for small lengths.
Napi::Value PreadNowait(const Napi::CallbackInfo& info) {
  int fd;
  iovec iov;
  int64_t pos;
  if (!NowaitArgs(info, "preadNowait", &fd, &iov, &pos)) return info.Env().Undefined();
  ssize_t n;
  do {
    n = ::preadv2(fd, &iov, 1, static_cast<off_t>(pos), RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  return Napi::Number::New(info.Env(), static_cast<double>(NowaitResult(n)));
}

// pwriteNowait(fd, buf, bufOffset, length, position) -> bytes written (may be short), -1 would
// block, -2 unsupported (e.g. ext4 buffered writes). Same contract as preadNowait.
Napi::Value PwriteNowait(const Napi::CallbackInfo& info) {
  int fd;
  iovec iov;
  int64_t pos;
  if (!NowaitArgs(info, "pwriteNowait", &fd, &iov, &pos)) return info.Env().Undefined();
  ssize_t n;
  do {
    n = ::pwritev2(fd, &iov, 1, static_cast<off_t>(pos), RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  return Napi::Number::New(info.Env(), static_cast<double>(NowaitResult(n)));
}

// flockExclusive(fd) -> boolean (false when another open file description holds the lock)
Napi::Value FlockExclusive(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!GetFd(info, 0, "flockExclusive", &fd)) return env.Undefined();
  for (;;) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return Napi::Boolean::New(env, true);
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) return Napi::Boolean::New(env, false);
    ErrnoError(env, errno, "flock").ThrowAsJavaScriptException();
    return env.Undefined();
  }
}

// addressMod(buf, m) -> the address of buf's first byte modulo m (a power of two, 2..4096):
// lets JavaScript carve a buffer whose data starts at an aligned address (io/aligned.ts).
Napi::Value AddressMod(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> buf;
  if (!GetBuffer(info, 0, "addressMod", "buf", &buf)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "addressMod: m must be a number").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  double m = info[1].As<Napi::Number>().DoubleValue();
  if (!(m >= 2 && m <= 4096) || m != static_cast<double>(static_cast<uint32_t>(m)) || (static_cast<uint32_t>(m) & (static_cast<uint32_t>(m) - 1)) != 0) {
    Napi::RangeError::New(env, "addressMod: m must be a power of two in [2, 4096]").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  uintptr_t a = reinterpret_cast<uintptr_t>(buf.Data());
  return Napi::Number::New(env, static_cast<double>(a & (static_cast<uintptr_t>(m) - 1)));
}

}  // namespace

void InitIo(Napi::Env env, Napi::Object exports) {
  exports.Set("addressMod", Napi::Function::New(env, AddressMod, "addressMod"));
  exports.Set("pread", Napi::Function::New(env, Pread, "pread"));
  exports.Set("preadCrc", Napi::Function::New(env, PreadCrc, "preadCrc"));
  exports.Set("pwrite", Napi::Function::New(env, Pwrite, "pwrite"));
  exports.Set("pwritev", Napi::Function::New(env, Pwritev, "pwritev"));
  exports.Set("pwritevDirect", Napi::Function::New(env, PwritevDirect, "pwritevDirect"));
  exports.Set("pwriteBatch", Napi::Function::New(env, PwriteBatch, "pwriteBatch"));
  exports.Set("preadBatchCrc", Napi::Function::New(env, PreadBatchCrc, "preadBatchCrc"));
  exports.Set("fdatasync", Napi::Function::New(env, Fdatasync, "fdatasync"));
  exports.Set("fallocate", Napi::Function::New(env, Fallocate, "fallocate"));
  exports.Set("seek", Napi::Function::New(env, Seek, "seek"));
  exports.Set("preadNowait", Napi::Function::New(env, PreadNowait, "preadNowait"));
  exports.Set("pwriteNowait", Napi::Function::New(env, PwriteNowait, "pwriteNowait"));
  exports.Set("flockExclusive", Napi::Function::New(env, FlockExclusive, "flockExclusive"));
}

}  // namespace nvm
