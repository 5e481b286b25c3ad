// nvmirror native addon: module entry point and the helpers shared by every source file.
//
// Invariants:
// - Every helper that reads an argument either yields a valid value or leaves a pending
//   JS exception (TypeError/RangeError) and returns false; callers return immediately.
// - Errors from system calls carry code/errno/syscall like Node's fs errors, so the
//   TypeScript side maps them in one place (src/volume/errors.ts users).
#include "common.h"

#include <climits>
#include <cstring>

namespace nvm {

const char* ErrnoName(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case EPIPE: return "EPIPE";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
    case EOPNOTSUPP: return "ENOTSUP";  // == ENOTSUP on Linux; Node names it ENOTSUP
    case EDQUOT: return "EDQUOT";
    case ESHUTDOWN: return "ESHUTDOWN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECONNRESET: return "ECONNRESET";
    case ENOTCONN: return "ENOTCONN";
    default: break;
  }
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : "EUNKNOWN";
}

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall) {
  const char* code = ErrnoName(err);
  char desc[128];
  // GNU strerror_r returns a pointer that may or may not be desc.
  const char* text = strerror_r(err, desc, sizeof desc);
  std::string msg = std::string(code) + ": " + text + ", " + syscall;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  return e;
}

void ThrowType(Napi::Env env, const std::string& msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
}

void ThrowRange(Napi::Env env, const std::string& msg) {
  Napi::RangeError::New(env, msg).ThrowAsJavaScriptException();
}

bool GetInt(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name,
            int64_t min, int64_t max, int64_t* out) {
  Napi::Env env = info.Env();
  if (i >= info.Length() || !info[i].IsNumber()) {
    ThrowType(env, std::string(fn) + ": " + name + " must be a number");
    return false;
  }
  double d = info[i].As<Napi::Number>().DoubleValue();
  // NaN fails both comparisons; the range check also rejects +-Infinity.
  if (!(d >= static_cast<double>(min) && d <= static_cast<double>(max)) ||
      d != static_cast<double>(static_cast<int64_t>(d))) {
    ThrowRange(env, std::string(fn) + ": " + name + " must be an integer in [" + std::to_string(min) +
                        ", " + std::to_string(max) + "]");
    return false;
  }
  *out = static_cast<int64_t>(d);
  return true;
}

bool GetFd(const Napi::CallbackInfo& info, size_t i, const char* fn, int* out) {
  int64_t v = 0;
  if (!GetInt(info, i, fn, "fd", 0, INT_MAX, &v)) return false;
  *out = static_cast<int>(v);
  return true;
}

bool GetBuffer(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name,
               Napi::Buffer<uint8_t>* out) {
  if (i >= info.Length() || !info[i].IsBuffer()) {
    ThrowType(info.Env(), std::string(fn) + ": " + name + " must be a Buffer");
    return false;
  }
  *out = info[i].As<Napi::Buffer<uint8_t>>();
  return true;
}

bool GetBool(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, bool* out) {
  if (i >= info.Length() || !info[i].IsBoolean()) {
    ThrowType(info.Env(), std::string(fn) + ": " + name + " must be a boolean");
    return false;
  }
  *out = info[i].As<Napi::Boolean>().Value();
  return true;
}

bool GetCallback(const Napi::CallbackInfo& info, size_t i, const char* fn, Napi::Function* out) {
  if (i >= info.Length() || !info[i].IsFunction()) {
    ThrowType(info.Env(), std::string(fn) + ": callback must be a function");
    return false;
  }
  *out = info[i].As<Napi::Function>();
  return true;
}

}  // namespace nvm

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  nvm::InitPriority(env, exports);  // first: the launcher keeps the starting priority
  nvm::InitIo(env, exports);
  nvm::InitNvram(env, exports);
  nvm::InitChecksum(env, exports);
  nvm::InitParity(env, exports);
  InitNbdAttach(env, exports);
  nvm::InitNbdServe(env, exports);
  nvm::InitDelta(env, exports);
  nvm::InitMirrorRx(env, exports);
  nvm::InitLogWriter(env, exports);
  return exports;
}

NODE_API_MODULE(nvmirror_native, Init)
