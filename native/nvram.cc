// mmap/munmap/msync of the NVRAM region.
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
// - msync() runs off the event loop over the page-aligned range covering
//   [offset, offset+length) and holds a reference to the Buffer while it runs.
#include "common.h"

#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <unordered_map>

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

// mmap(fd, length) -> Buffer over a MAP_SHARED read/write mapping of [0, length)
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

class MsyncJob final : public Napi::AsyncWorker {
 public:
  MsyncJob(const Napi::Function& cb, const Napi::Buffer<uint8_t>& buf, uint8_t* start, size_t len)
      : Napi::AsyncWorker(cb, "msync", buf), buf_(Napi::Persistent(buf)), start_(start), len_(len) {}

  void Execute() override {
    if (len_ == 0) return;
    if (::msync(start_, len_, MS_SYNC) != 0) err_ = errno;
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ != 0) {
      Callback().Call({ErrnoError(env, err_, "msync").Value()});
    } else {
      Callback().Call({env.Null()});
    }
  }

 private:
  Napi::Reference<Napi::Buffer<uint8_t>> buf_;
  uint8_t* start_;
  size_t len_;
  int err_ = 0;
};

// msync(buf, offset, length, cb)
Napi::Value Msync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> buf;
  int64_t off, len;
  Napi::Function cb;
  if (!GetBuffer(info, 0, "msync", "buf", &buf) || !GetInt(info, 1, "msync", "offset", 0, kMaxSafeInteger, &off) ||
      !GetInt(info, 2, "msync", "length", 0, kMaxSafeInteger, &len) || !GetCallback(info, 3, "msync", &cb))
    return env.Undefined();
  size_t mapLen = 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    Mapping* m = buf.Data() == nullptr ? nullptr : Find(buf.Data());
    if (m == nullptr || m->len != buf.Length() || !m->fileMapped) {
      ThrowType(env, "msync: buf is not a live mapping from mmap()");
      return env.Undefined();
    }
    mapLen = m->len;
  }
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > mapLen) {
    ThrowRange(env, "msync: offset+length exceeds the mapping");
    return env.Undefined();
  }
  // msync needs a page-aligned start; the mapping itself starts on a page boundary.
  size_t page = PageSize();
  size_t alignedOff = static_cast<size_t>(off) & ~(page - 1);
  size_t syncLen = len == 0 ? 0 : static_cast<size_t>(off + len) - alignedOff;
  (new MsyncJob(cb, buf, buf.Data() + alignedOff, syncLen))->Queue();
  return env.Undefined();
}

}  // namespace

void InitNvram(Napi::Env env, Napi::Object exports) {
  exports.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  exports.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
  exports.Set("msync", Napi::Function::New(env, Msync, "msync"));
}

}  // namespace nvm
