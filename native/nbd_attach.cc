// Kernel nbd attach: hands connected stream sockets to the Linux nbd driver so that
// /dev/nbdN is served by this process. Primary interface: the generic-netlink "nbd"
// family (NBD_CMD_CONNECT / NBD_CMD_DISCONNECT) over a raw NETLINK_GENERIC socket (no
// libnl: the two messages we send are small, and one fewer build dependency). Fallback
// when the family is absent: the ioctls (NBD_SET_SOCK ... NBD_DO_IT in a dedicated thread).
//
// Exports (see src/attach/kernel.ts for the typed wrapper):
//   socketpair(): [fd, fd]                          AF_UNIX stream pair, both CLOEXEC
//   nbdAttach(device, fds, sizeBytes, blockSizeBytes, flags, timeoutS, [opts], cb)
//        opts: { method: 'auto'|'netlink'|'ioctl', deadConnTimeoutS: number }
//        cb(err, index, method)                       method: 'netlink' | 'ioctl'
//   nbdDetach(device, cb)                            cb(err)
//
// Invariants:
// - Every blocking step (netlink round trips, ioctls, waiting for the ioctl device to
//   start) runs in a Napi::AsyncWorker job, never on the event loop: while the kernel
//   sets the device up it may already send requests that the event loop must serve.
// - Arguments are re-checked here (device name /dev/nbdN, 1..kMaxConnections fds, size a
//   positive multiple of the block size, block size a power of two in 512..4096, flags
//   u16, timeouts bounded); bad input throws a TypeError/RangeError, never crashes.
// - Every netlink receive is bounded: SO_RCVTIMEO and at most kMaxNetlinkReads reads
//   per request; every attribute is bounds-checked against the received length.
// - The NBD_DO_IT thread blocks every signal, so a signal meant for Node never
//   interrupts the ioctl (an interrupted NBD_DO_IT tears the device down). The thread
//   owns the device fd and closes it when the device ends.
// - The caller keeps ownership of the fds it passes: the kernel takes its own reference
//   to each socket, so the caller may close its copies once the callback reported success.
// - Errors reach JS as Errors with code/errno/syscall (nvm::ErrnoError); "no nbd driver"
//   is code ENODEV with syscall "nbd-driver", so src/attach/ can word it in one place.
#include "common.h"

#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <linux/netlink.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kMaxConnections = 16;            // src/attach/ caps --connections the same
constexpr int64_t kMaxTimeoutS = 86400;        // one day
constexpr int64_t kMaxIndex = 65535;           // nbd index; the kernel's own limit is lower
constexpr int kNetlinkTimeoutS = 30;           // SO_RCVTIMEO per read
constexpr int kMaxNetlinkReads = 64;           // reads per request before giving up
constexpr size_t kNetlinkBufferBytes = 32768;  // one read; replies here are < 1 KiB
constexpr int kIoctlStartWaitMs = 10000;       // how long NBD_DO_IT may take to come up
constexpr int kIoctlPollMs = 5;

static_assert(kMaxConnections * 16 < 4096, "NBD_ATTR_SOCKETS must fit one small message");

enum class Method { kAuto, kNetlink, kIoctl };

const char* MethodName(Method m) {
  return m == Method::kIoctl ? "ioctl" : "netlink";
}

// Parses "/dev/nbdN" into N; false if the name has another shape.
bool ParseDevice(const std::string& device, int* index) {
  const std::string prefix = "/dev/nbd";
  if (device.size() <= prefix.size() || device.compare(0, prefix.size(), prefix) != 0) return false;
  int64_t n = 0;
  for (size_t i = prefix.size(); i < device.size(); i++) {
    char c = device[i];
    if (c < '0' || c > '9') return false;
    if (i > prefix.size() && n == 0) return false;  // no leading zeroes: nbd01 is not nbd1
    n = n * 10 + (c - '0');
    if (n > kMaxIndex) return false;
  }
  *index = static_cast<int>(n);
  return true;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// ---------------------------------------------------------------------------------------
// Generic netlink, raw.

// One outgoing netlink message: nlmsghdr + genlmsghdr + attributes, 4-byte aligned.
class NlMessage {
 public:
  NlMessage(uint16_t type, uint8_t cmd, uint8_t version, uint32_t seq) {
    buf_.resize(NLMSG_HDRLEN + GENL_HDRLEN, 0);
    auto* nh = reinterpret_cast<nlmsghdr*>(buf_.data());
    nh->nlmsg_type = type;
    nh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    nh->nlmsg_seq = seq;
    nh->nlmsg_pid = 0;
    auto* gh = reinterpret_cast<genlmsghdr*>(buf_.data() + NLMSG_HDRLEN);
    gh->cmd = cmd;
    gh->version = version;
  }

  void Put(uint16_t type, const void* data, size_t len) {
    size_t at = buf_.size();
    buf_.resize(at + NLA_ALIGN(NLA_HDRLEN + len), 0);
    auto* na = reinterpret_cast<nlattr*>(buf_.data() + at);
    na->nla_type = type;
    na->nla_len = static_cast<uint16_t>(NLA_HDRLEN + len);
    if (len > 0) std::memcpy(buf_.data() + at + NLA_HDRLEN, data, len);
  }
  void PutU16(uint16_t type, uint16_t v) { Put(type, &v, sizeof v); }
  void PutU32(uint16_t type, uint32_t v) { Put(type, &v, sizeof v); }
  void PutU64(uint16_t type, uint64_t v) { Put(type, &v, sizeof v); }
  void PutString(uint16_t type, const char* s) { Put(type, s, std::strlen(s) + 1); }

  // Opens a nested attribute; returns its offset for EndNest.
  size_t BeginNest(uint16_t type) {
    size_t at = buf_.size();
    buf_.resize(at + NLA_HDRLEN, 0);
    reinterpret_cast<nlattr*>(buf_.data() + at)->nla_type = type | NLA_F_NESTED;
    return at;
  }
  void EndNest(size_t at) {
    size_t len = buf_.size() - at;
    reinterpret_cast<nlattr*>(buf_.data() + at)->nla_len = static_cast<uint16_t>(len);
  }

  const std::vector<uint8_t>& Finish() {
    reinterpret_cast<nlmsghdr*>(buf_.data())->nlmsg_len = static_cast<uint32_t>(buf_.size());
    return buf_;
  }

 private:
  std::vector<uint8_t> buf_;
};

// Calls fn(type, payload, payloadLen) for each attribute in [data, data+len); stops at the
// first malformed one.
template <typename Fn>
void ForEachAttr(const uint8_t* data, size_t len, Fn fn) {
  size_t at = 0;
  while (at + NLA_HDRLEN <= len) {
    const auto* na = reinterpret_cast<const nlattr*>(data + at);
    if (na->nla_len < NLA_HDRLEN || at + na->nla_len > len) return;
    fn(static_cast<uint16_t>(na->nla_type & NLA_TYPE_MASK), data + at + NLA_HDRLEN,
       static_cast<size_t>(na->nla_len - NLA_HDRLEN));
    at += NLA_ALIGN(na->nla_len);
  }
}

class GenlSocket {
 public:
  ~GenlSocket() {
    if (fd_ >= 0) ::close(fd_);
  }

  // 0 or an errno.
  int Open() {
    fd_ = ::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd_ < 0) return errno;
    timeval tv{};
    tv.tv_sec = kNetlinkTimeoutS;
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) return errno;
    sockaddr_nl sa{};
    sa.nl_family = AF_NETLINK;
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) return errno;
    return 0;
  }

  uint32_t NextSeq() { return ++seq_; }

  // Sends msg and reads until the kernel's ACK or error for it. onReply(genl attrs) is
  // called for each reply message of type replyType. Returns 0 or an errno.
  template <typename Fn>
  int Request(const std::vector<uint8_t>& msg, uint16_t replyType, Fn onReply) {
    const auto* sent = reinterpret_cast<const nlmsghdr*>(msg.data());
    uint32_t seq = sent->nlmsg_seq;
    sockaddr_nl kernel{};
    kernel.nl_family = AF_NETLINK;
    ssize_t n;
    do {
      n = ::sendto(fd_, msg.data(), msg.size(), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return errno;
    if (static_cast<size_t>(n) != msg.size()) return EIO;

    std::vector<uint8_t> buf(kNetlinkBufferBytes);
    for (int reads = 0; reads < kMaxNetlinkReads; reads++) {
      n = ::recv(fd_, buf.data(), buf.size(), 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? ETIMEDOUT : errno;
      }
      size_t left = static_cast<size_t>(n);
      auto* nh = reinterpret_cast<nlmsghdr*>(buf.data());
      for (; NLMSG_OK(nh, left); nh = NLMSG_NEXT(nh, left)) {
        if (nh->nlmsg_seq != seq) continue;  // stale reply to an earlier request
        if (nh->nlmsg_type == NLMSG_ERROR) {
          if (nh->nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) return EIO;
          const auto* e = reinterpret_cast<const nlmsgerr*>(NLMSG_DATA(nh));
          return -e->error;  // 0 is the ACK
        }
        if (nh->nlmsg_type == NLMSG_DONE) return 0;
        if (nh->nlmsg_type == replyType && nh->nlmsg_len >= NLMSG_LENGTH(GENL_HDRLEN)) {
          const uint8_t* attrs = reinterpret_cast<const uint8_t*>(NLMSG_DATA(nh)) + GENL_HDRLEN;
          onReply(attrs, nh->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN));
        }
      }
    }
    return ETIMEDOUT;
  }

  // Resolves the "nbd" family id. ENOENT if the kernel has no such family (the lookup
  // itself asks the kernel to load the nbd module when the caller may do so).
  int ResolveNbdFamily(uint16_t* family) {
    NlMessage m(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, NextSeq());
    m.PutString(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
    uint16_t id = 0;
    int err = Request(m.Finish(), GENL_ID_CTRL, [&](const uint8_t* attrs, size_t len) {
      ForEachAttr(attrs, len, [&](uint16_t type, const uint8_t* p, size_t plen) {
        if (type == CTRL_ATTR_FAMILY_ID && plen >= sizeof(uint16_t)) std::memcpy(&id, p, sizeof id);
      });
    });
    if (err != 0) return err;
    if (id == 0) return ENOENT;
    *family = id;
    return 0;
  }

 private:
  int fd_ = -1;
  uint32_t seq_ = 0;
};

struct AttachParams {
  int index = 0;
  std::string device;
  std::vector<int> fds;
  uint64_t sizeBytes = 0;
  uint64_t blockSizeBytes = 0;
  uint64_t flags = 0;
  uint64_t timeoutS = 0;
  uint64_t deadConnTimeoutS = 0;
  Method method = Method::kAuto;
};

// Result of a step: 0 or an errno plus the name of the call that failed.
struct Status {
  int err = 0;
  const char* syscall = "";
  static Status Ok() { return {}; }
  static Status Fail(int e, const char* s) { return Status{e, s}; }
};

Status NetlinkConnect(GenlSocket& nl, uint16_t family, const AttachParams& p, int* indexOut) {
  NlMessage m(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, nl.NextSeq());
  m.PutU32(NBD_ATTR_INDEX, static_cast<uint32_t>(p.index));
  m.PutU64(NBD_ATTR_SIZE_BYTES, p.sizeBytes);
  m.PutU64(NBD_ATTR_BLOCK_SIZE_BYTES, p.blockSizeBytes);
  m.PutU64(NBD_ATTR_SERVER_FLAGS, p.flags);
  m.PutU64(NBD_ATTR_TIMEOUT, p.timeoutS);
  if (p.deadConnTimeoutS > 0) m.PutU64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.deadConnTimeoutS);
  size_t socks = m.BeginNest(NBD_ATTR_SOCKETS);
  for (int fd : p.fds) {
    size_t item = m.BeginNest(NBD_SOCK_ITEM);
    m.PutU32(NBD_SOCK_FD, static_cast<uint32_t>(fd));
    m.EndNest(item);
  }
  m.EndNest(socks);
  int index = -1;
  int err = nl.Request(m.Finish(), family, [&](const uint8_t* attrs, size_t len) {
    ForEachAttr(attrs, len, [&](uint16_t type, const uint8_t* q, size_t qlen) {
      if (type == NBD_ATTR_INDEX && qlen >= sizeof(uint32_t)) {
        uint32_t v;
        std::memcpy(&v, q, sizeof v);
        index = static_cast<int>(v);
      }
    });
  });
  if (err != 0) return Status::Fail(err, "netlink NBD_CMD_CONNECT");
  *indexOut = index >= 0 ? index : p.index;
  return Status::Ok();
}

Status NetlinkDisconnect(GenlSocket& nl, uint16_t family, int index) {
  NlMessage m(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, nl.NextSeq());
  m.PutU32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
  int err = nl.Request(m.Finish(), family, [](const uint8_t*, size_t) {});
  if (err != 0) return Status::Fail(err, "netlink NBD_CMD_DISCONNECT");
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// ioctl fallback.

int Ioctl(int fd, unsigned long req, unsigned long arg) {
  int r;
  do {
    r = ::ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

// Shared between the attach job and the NBD_DO_IT thread.
struct DoItState {
  std::atomic<bool> done{false};
  std::atomic<int> err{0};
};

void DoItThread(int fd, std::shared_ptr<DoItState> state) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  // Blocks until the device is disconnected or every socket died.
  int r = ::ioctl(fd, NBD_DO_IT);
  int err = r < 0 ? errno : 0;
  ::ioctl(fd, NBD_CLEAR_QUE);
  ::ioctl(fd, NBD_CLEAR_SOCK);
  ::close(fd);
  state->err.store(err);
  state->done.store(true);
}

Status OpenDevice(const std::string& device, int* fd) {
  int f;
  do {
    f = ::open(device.c_str(), O_RDWR | O_CLOEXEC);
  } while (f < 0 && errno == EINTR);
  if (f < 0) return Status::Fail(errno, "open");
  *fd = f;
  return Status::Ok();
}

Status IoctlAttach(const AttachParams& p) {
  int fd = -1;
  Status s = OpenDevice(p.device, &fd);
  if (s.err != 0) return s;
  auto fail = [&](int err, const char* call) {
    ::ioctl(fd, NBD_CLEAR_SOCK);
    ::close(fd);
    return Status::Fail(err, call);
  };
  int err;
  if ((err = Ioctl(fd, NBD_SET_BLKSIZE, p.blockSizeBytes)) != 0) return fail(err, "ioctl NBD_SET_BLKSIZE");
  if ((err = Ioctl(fd, NBD_SET_SIZE_BLOCKS, p.sizeBytes / p.blockSizeBytes)) != 0) {
    return fail(err, "ioctl NBD_SET_SIZE_BLOCKS");
  }
  if ((err = Ioctl(fd, NBD_SET_TIMEOUT, p.timeoutS)) != 0) return fail(err, "ioctl NBD_SET_TIMEOUT");
  if ((err = Ioctl(fd, NBD_SET_FLAGS, p.flags)) != 0) return fail(err, "ioctl NBD_SET_FLAGS");
  for (int sock : p.fds) {
    if ((err = Ioctl(fd, NBD_SET_SOCK, static_cast<unsigned long>(sock))) != 0) return fail(err, "ioctl NBD_SET_SOCK");
  }
  auto state = std::make_shared<DoItState>();
  std::thread(DoItThread, fd, state).detach();  // owns fd from here on
  // NBD_DO_IT either fails at once or blocks for the device's lifetime; the device's
  // sysfs "pid" file appears once it started.
  const std::string pidFile = "/sys/block/nbd" + std::to_string(p.index) + "/pid";
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kIoctlStartWaitMs);
  while (std::chrono::steady_clock::now() < deadline) {
    if (state->done.load()) {
      int e = state->err.load();
      return Status::Fail(e != 0 ? e : EIO, "ioctl NBD_DO_IT");
    }
    if (FileExists(pidFile)) return Status::Ok();
    std::this_thread::sleep_for(std::chrono::milliseconds(kIoctlPollMs));
  }
  return Status::Fail(ETIMEDOUT, "ioctl NBD_DO_IT");
}

Status IoctlDetach(const std::string& device) {
  int fd = -1;
  Status s = OpenDevice(device, &fd);
  if (s.err != 0) return s;
  int err = Ioctl(fd, NBD_DISCONNECT, 0);
  if (err == 0) err = Ioctl(fd, NBD_CLEAR_SOCK, 0);
  ::close(fd);
  if (err != 0) return Status::Fail(err, "ioctl NBD_DISCONNECT");
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Jobs.

// The nbd driver is missing when neither the genl family nor the device node exists.
const char* kNoDriver = "nbd-driver";

// The ioctl path failed to open /dev/nbdN and no nbd module is loaded: say "no driver"
// rather than a bare ENOENT, so the wrapper can tell the user to `modprobe nbd`.
Status NoDriverIfAbsent(Status st) {
  if (st.err == ENOENT && std::strcmp(st.syscall, "open") == 0 && !FileExists("/sys/module/nbd")) return Status::Fail(ENODEV, kNoDriver);
  return st;
}

class AttachJob final : public Napi::AsyncWorker {
 public:
  AttachJob(const Napi::Function& cb, AttachParams p) : Napi::AsyncWorker(cb, "nbdAttach"), p_(std::move(p)) {}

  void Execute() override {
    if (p_.method != Method::kIoctl) {
      GenlSocket nl;
      uint16_t family = 0;
      int err = nl.Open();
      if (err == 0) err = nl.ResolveNbdFamily(&family);
      if (err == 0) {
        used_ = Method::kNetlink;
        status_ = NetlinkConnect(nl, family, p_, &index_);
        return;
      }
      if (p_.method == Method::kNetlink) {
        status_ = err == ENOENT ? Status::Fail(ENODEV, kNoDriver) : Status::Fail(err, "netlink CTRL_CMD_GETFAMILY");
        return;
      }
    }
    used_ = Method::kIoctl;
    index_ = p_.index;
    status_ = IoctlAttach(p_);
    status_ = NoDriverIfAbsent(status_);
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (status_.err != 0) {
      Callback().Call({nvm::ErrnoError(env, status_.err, status_.syscall).Value()});
      return;
    }
    Callback().Call({env.Null(), Napi::Number::New(env, index_), Napi::String::New(env, MethodName(used_))});
  }

 private:
  AttachParams p_;
  Status status_;
  Method used_ = Method::kNetlink;
  int index_ = -1;
};

class DetachJob final : public Napi::AsyncWorker {
 public:
  DetachJob(const Napi::Function& cb, std::string device, int index)
      : Napi::AsyncWorker(cb, "nbdDetach"), device_(std::move(device)), index_(index) {}

  void Execute() override {
    GenlSocket nl;
    uint16_t family = 0;
    int err = nl.Open();
    if (err == 0) err = nl.ResolveNbdFamily(&family);
    if (err == 0) {
      status_ = NetlinkDisconnect(nl, family, index_);
      return;
    }
    status_ = IoctlDetach(device_);
    status_ = NoDriverIfAbsent(status_);
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (status_.err != 0) {
      Callback().Call({nvm::ErrnoError(env, status_.err, status_.syscall).Value()});
      return;
    }
    Callback().Call({env.Null()});
  }

 private:
  std::string device_;
  int index_;
  Status status_;
};

bool GetDevice(const Napi::CallbackInfo& info, size_t i, const char* fn, std::string* device, int* index) {
  if (i >= info.Length() || !info[i].IsString()) {
    nvm::ThrowType(info.Env(), std::string(fn) + ": device must be a string");
    return false;
  }
  *device = info[i].As<Napi::String>().Utf8Value();
  if (!ParseDevice(*device, index)) {
    nvm::ThrowRange(info.Env(), std::string(fn) + ": device must be /dev/nbdN, got " + *device);
    return false;
  }
  return true;
}

Napi::Value NbdAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "nbdAttach";
  AttachParams p;
  if (!GetDevice(info, 0, fn, &p.device, &p.index)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsArray()) {
    nvm::ThrowType(env, "nbdAttach: fds must be an array");
    return env.Undefined();
  }
  Napi::Array fds = info[1].As<Napi::Array>();
  if (fds.Length() < 1 || fds.Length() > static_cast<uint32_t>(kMaxConnections)) {
    nvm::ThrowRange(env, "nbdAttach: 1.." + std::to_string(kMaxConnections) + " fds, got " + std::to_string(fds.Length()));
    return env.Undefined();
  }
  for (uint32_t i = 0; i < fds.Length(); i++) {
    Napi::Value v = fds.Get(i);
    double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= INT32_MAX) || d != static_cast<double>(static_cast<int>(d))) {
      nvm::ThrowRange(env, "nbdAttach: fds must hold file descriptors");
      return env.Undefined();
    }
    p.fds.push_back(static_cast<int>(d));
  }
  int64_t size = 0, bs = 0, flags = 0, timeout = 0;
  if (!nvm::GetInt(info, 2, fn, "sizeBytes", 1, nvm::kMaxSafeInteger, &size)) return env.Undefined();
  if (!nvm::GetInt(info, 3, fn, "blockSizeBytes", 512, 4096, &bs)) return env.Undefined();
  if (!nvm::GetInt(info, 4, fn, "flags", 0, 0xffff, &flags)) return env.Undefined();
  if (!nvm::GetInt(info, 5, fn, "timeoutS", 0, kMaxTimeoutS, &timeout)) return env.Undefined();
  if ((bs & (bs - 1)) != 0) {
    nvm::ThrowRange(env, "nbdAttach: blockSizeBytes must be a power of two");
    return env.Undefined();
  }
  if (size % bs != 0) {
    nvm::ThrowRange(env, "nbdAttach: sizeBytes must be a multiple of blockSizeBytes");
    return env.Undefined();
  }
  p.sizeBytes = static_cast<uint64_t>(size);
  p.blockSizeBytes = static_cast<uint64_t>(bs);
  p.flags = static_cast<uint64_t>(flags);
  p.timeoutS = static_cast<uint64_t>(timeout);
  size_t cbAt = 6;
  if (info.Length() > 6 && info[6].IsObject() && !info[6].IsFunction()) {
    Napi::Object opts = info[6].As<Napi::Object>();
    Napi::Value method = opts.Get("method");
    if (!method.IsUndefined()) {
      std::string m = method.IsString() ? method.As<Napi::String>().Utf8Value() : "";
      if (m == "auto") p.method = Method::kAuto;
      else if (m == "netlink") p.method = Method::kNetlink;
      else if (m == "ioctl") p.method = Method::kIoctl;
      else {
        nvm::ThrowRange(env, "nbdAttach: opts.method must be 'auto', 'netlink' or 'ioctl'");
        return env.Undefined();
      }
    }
    Napi::Value dead = opts.Get("deadConnTimeoutS");
    if (!dead.IsUndefined()) {
      double d = dead.IsNumber() ? dead.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= static_cast<double>(kMaxTimeoutS)) || d != static_cast<double>(static_cast<int64_t>(d))) {
        nvm::ThrowRange(env, "nbdAttach: opts.deadConnTimeoutS must be an integer in [0, " + std::to_string(kMaxTimeoutS) + "]");
        return env.Undefined();
      }
      p.deadConnTimeoutS = static_cast<uint64_t>(d);
    }
    cbAt = 7;
  }
  Napi::Function cb;
  if (!nvm::GetCallback(info, cbAt, fn, &cb)) return env.Undefined();
  (new AttachJob(cb, std::move(p)))->Queue();
  return env.Undefined();
}

Napi::Value NbdDetach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string device;
  int index = 0;
  if (!GetDevice(info, 0, "nbdDetach", &device, &index)) return env.Undefined();
  Napi::Function cb;
  if (!nvm::GetCallback(info, 1, "nbdDetach", &cb)) return env.Undefined();
  (new DetachJob(cb, std::move(device), index))->Queue();
  return env.Undefined();
}

Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
    nvm::ErrnoError(env, errno, "socketpair").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, sv[0]));
  out.Set(1u, Napi::Number::New(env, sv[1]));
  return out;
}

}  // namespace

void InitNbdAttach(Napi::Env env, Napi::Object exports) {
  exports.Set("nbdAttach", Napi::Function::New(env, NbdAttach, "nbdAttach"));
  exports.Set("nbdDetach", Napi::Function::New(env, NbdDetach, "nbdDetach"));
  exports.Set("socketpair", Napi::Function::New(env, SocketPair, "socketpair"));
}
