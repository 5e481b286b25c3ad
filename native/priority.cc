// Thread priorities: the threads that answer clients outrank the process's background work.
//
// A CP (the event loop building the tree, libuv's pool writing it) competes for the CPU
// with the NBD connection threads that answer WRITEs from the NVRAM. On a 2-core machine
// that lifted the p99 of QD1 writes during CPs to 3-4.7x the p99 outside them; with the
// background at nice +10 it was 0.9-1.1x (docs/benchmarks.md, "CPs and the scheduler").
// Linux keeps a nice value per thread and a new thread inherits its creator's, and an
// unprivileged thread cannot lower its own nice value again (RLIMIT_NICE is 0 by default).
// So:
//   - the launcher thread is made before anything lowers a priority (the addon's load, on
//     the event loop), and stays at the priority the process started with;
//   - every thread that answers clients (NBD connections, their read pool, the NVRAM
//     persist pool, the mirror receive thread) is made by the launcher
//     (StartForegroundThread), so it has that priority whatever its caller's is;
//   - lowerPriority(delta) raises the calling thread's nice value (the event loop's, at
//     startup, before libuv's pool exists: its threads inherit it).
//   - setNice(value) sets it (the event loop's, while a CP is urgent: src/cli/priority.ts).
//   - SetBatchPolicy() puts a thread under SCHED_BATCH: a sync mirror's link thread on the
//     source (mirror_rx.cc), woken by every record the NBD threads append and every ack.
//     Under SCHED_OTHER each wake-up preempted the NBD thread on a busy CPU (~15K wake-ups
//     and ~12K involuntary switches of the NBD thread a second at 14K IOPS, 2 CPUs); as a
//     batch thread it waits for the next scheduling point and finds several records and
//     acks at once: ~4.5K wake-ups a second, sync 4k QD32 +13% (docs/benchmarks.md,
//     "The link thread under SCHED_BATCH").
//
// Invariants:
// - StartForegroundThread returns only after the thread exists (true) or could not be
//   made (false): callers keep today's synchronous error handling.
// - The launcher never runs caller code: it only makes threads.
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "common.h"

namespace nvm {

namespace {

struct Spawn {
  std::string name;
  std::function<void()> fn;
  bool done = false;
  bool ok = false;
};

struct Launcher {
  std::mutex mu;
  std::condition_variable cv;      // a request is queued
  std::condition_variable doneCv;  // a request was handled
  std::deque<Spawn*> queue;
};

Launcher* g_launcher = nullptr;
std::once_flag g_launcherOnce;

void LauncherLoop(Launcher* l) {
  std::unique_lock<std::mutex> lock(l->mu);
  for (;;) {
    l->cv.wait(lock, [l] { return !l->queue.empty(); });
    Spawn* s = l->queue.front();
    l->queue.pop_front();
    try {
      std::thread([name = std::move(s->name), fn = std::move(s->fn)]() {
        ::prctl(PR_SET_NAME, name.c_str(), 0, 0, 0);  // top -H and /proc/PID/task/*/comm show it
        fn();
      }).detach();
      s->ok = true;
    } catch (...) {
      s->ok = false;  // std::system_error: no thread could be made (EAGAIN)
    }
    s->done = true;
    l->doneCv.notify_all();
  }
}

pid_t Tid() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// lowerPriority(delta) -> the calling thread's nice value after (delta in [0, 19]; capped at 19).
Napi::Value LowerPriority(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t delta;
  if (!GetInt(info, 0, "lowerPriority", "delta", 0, 19, &delta)) return env.Undefined();
  EnsureLauncher();
  errno = 0;
  int now = ::getpriority(PRIO_PROCESS, static_cast<id_t>(Tid()));
  if (now == -1 && errno != 0) {
    ErrnoError(env, errno, "getpriority").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int want = now + static_cast<int>(delta);
  if (want > 19) want = 19;
  if (want != now && ::setpriority(PRIO_PROCESS, static_cast<id_t>(Tid()), want) != 0) {
    ErrnoError(env, errno, "setpriority").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, want);
}

// setNice(value) -> true, or false when the kernel refuses it (EACCES/EPERM: a lower nice
// value than the thread has needs CAP_SYS_NICE or RLIMIT_NICE). Sets the calling thread's
// nice value (value in [-20, 19]).
Napi::Value SetNice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t value;
  if (!GetInt(info, 0, "setNice", "value", -20, 19, &value)) return env.Undefined();
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(Tid()), static_cast<int>(value)) != 0) {
    if (errno == EACCES || errno == EPERM) return Napi::Boolean::New(env, false);
    ErrnoError(env, errno, "setpriority").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Boolean::New(env, true);
}

}  // namespace

void EnsureLauncher() {
  std::call_once(g_launcherOnce, [] {
    g_launcher = new Launcher();  // leaked on purpose: no destructor races its thread at exit
    std::thread([] {
      ::prctl(PR_SET_NAME, "nvm-launcher", 0, 0, 0);
      LauncherLoop(g_launcher);
    }).detach();
  });
}

bool StartForegroundThread(const char* name, std::function<void()> fn) {
  EnsureLauncher();
  Spawn s;
  s.name = std::string(name).substr(0, 15);
  s.fn = std::move(fn);
  std::unique_lock<std::mutex> lock(g_launcher->mu);
  g_launcher->queue.push_back(&s);
  g_launcher->cv.notify_one();
  g_launcher->doneCv.wait(lock, [&s] { return s.done; });
  return s.ok;
}

bool SetBatchPolicy() {
  sched_param sp{};
  sp.sched_priority = 0;  // the only one SCHED_BATCH takes; the nice value stays
  return ::sched_setscheduler(0, SCHED_BATCH, &sp) == 0;  // 0: the calling thread
}

void InitPriority(Napi::Env env, Napi::Object exports) {
  EnsureLauncher();
  exports.Set("lowerPriority", Napi::Function::New(env, LowerPriority, "lowerPriority"));
  exports.Set("setNice", Napi::Function::New(env, SetNice, "setNice"));
}

}  // namespace nvm
