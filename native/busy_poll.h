// Adaptive busy-poll for the NBD connection threads (nbd_serve.cc). Tried on the mirror
// link threads too (mirror_rx.cc): no gain on sync 4k QD32, which is CPU-bound here
// (docs/benchmarks.md, "Busy-poll at low queue depth"), so they sleep as before.
//
// A peer at low depth sends its next message a few microseconds after it reads ours; a
// thread asleep in poll() then costs a cross-CPU wakeup (in a VM, an IPI and an exit to
// the host: measured 25-30 us a request here, more than the request's own work). So a
// thread that waits for input first polls without sleeping for up to the window, but only
// while that pays:
// - it arms after input came within kArmFactor x the window of a sleep beginning;
// - it disarms at the first window that ends with nothing, or when its owner says the
//   peer is deep (an NBD client that sent more than one request since the last wait keeps
//   the thread busy anyway: spinning would only take CPU from it and from the CPs);
// - no thread spins while the process is paused (nbdServeBusyPollPause: the CLI pauses it
//   while a CP runs). A spinner yields to a runnable CP thread and, itself still runnable,
//   is not preempted back in when its request arrives: it waits out that thread's slice
//   (docs/benchmarks.md, "Busy-poll paused during CPs");
// - at most kSpinnersMax threads of the process spin at once (half the CPUs, at least
//   one), and a spinning thread yields between polls, so spinning never takes every core
//   from the work it waits on.
// The window is process-wide (nbdServeBusyPoll; `--busy-poll` of serve, and of receive
// for its exports); 0 never spins.
//
// Invariants: a BusyPoller belongs to one thread; Poll returns what poll() would (>0 with
// revents set, 0 for nothing, <0 with errno), never blocks longer than the window, and
// leaves the spinner count as it found it.
#pragma once

#include <poll.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <thread>

namespace nvm {

constexpr int64_t kBusyPollDefaultUs = 30;
constexpr int64_t kBusyPollMaxUs = 1000;

inline std::atomic<int64_t> gBusyPollUs{kBusyPollDefaultUs};
inline std::atomic<int> gSpinners{0};
// Set while the process's background work (a CP) runs: no thread spins then (see below).
inline std::atomic<bool> gBusyPollPaused{false};
// Process totals (nbdServeBusyPollStats): windows spun, windows that ended in input, microseconds spun.
inline std::atomic<uint64_t> gSpinWindows{0}, gSpinHits{0}, gSpinUs{0};

class BusyPoller {
 public:
  static constexpr int64_t kArmFactor = 4;

  // Before sleeping in poll(fds, n, ...): spins when armed and a slot is free.
  int Poll(pollfd* fds, nfds_t n) {
    const int64_t window = gBusyPollUs.load(std::memory_order_relaxed);
    if (!armed_ || window <= 0 || gBusyPollPaused.load(std::memory_order_relaxed)) return 0;
    static const int kSpinnersMax = std::max(1, static_cast<int>(std::thread::hardware_concurrency() / 2));
    if (gSpinners.fetch_add(1) >= kSpinnersMax) {
      gSpinners.fetch_sub(1);
      return 0;
    }
    const int64_t t0 = NowUs();
    int64_t now = t0;
    int r;
    do {
      r = ::poll(fds, n, 0);
      now = NowUs();
      if (r == 0) sched_yield();  // a thread waiting for this CPU (the event loop, a pool job) goes first
    } while (r == 0 && now - t0 < window);
    const int err = errno;
    gSpinners.fetch_sub(1);
    gSpinWindows.fetch_add(1, std::memory_order_relaxed);
    gSpinUs.fetch_add(static_cast<uint64_t>(now - t0), std::memory_order_relaxed);
    if (r > 0) gSpinHits.fetch_add(1, std::memory_order_relaxed);
    if (r == 0) armed_ = false;
    errno = err;
    return r < 0 && err == EINTR ? 0 : r;
  }

  // Call as the sleeping poll begins; then Woke with whether input came.
  void Sleeping() { sleepUs_ = NowUs(); }
  void Woke(bool input) {
    if (!input) return;
    const int64_t window = gBusyPollUs.load(std::memory_order_relaxed);
    armed_ = window > 0 && NowUs() - sleepUs_ <= kArmFactor * window;
  }

  // The peer keeps this thread busy without spinning.
  void Disarm() { armed_ = false; }

  static int64_t NowUs() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
  }

 private:
  bool armed_ = false;
  int64_t sleepUs_ = 0;
};

}  // namespace nvm
