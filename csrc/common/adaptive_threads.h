// One thread or all of them, chosen by measuring (CPU fused paths).
//
// The fused sampling steps split each step between threads that meet at a barrier many times a
// step (a parallel_for per pixel step, or spin barriers per layer). On a quiet machine that is
// faster; when another process holds a core, a partner that loses its core stalls the other at
// every barrier and the default thread count becomes slower than one thread (measured 1.8x on the
// 2-core box). Which is faster is not knowable in advance, so each call site measures: per work
// key (the shape of the call) it keeps a running mean of the seconds per call with one thread and
// with all threads, runs the faster one, and re-times the other every kExplore-th call so a
// change in the load is noticed. The arithmetic of both choices is the same, so the results do
// not depend on the choice (every caller guarantees that; tests check it).
//
// FASTAR_CPU_THREADS=all | one | adaptive (default adaptive) fixes or frees the choice, for
// benchmarks and tests.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>

#include <c10/util/Exception.h>

namespace fastar {

enum class ThreadPolicy { Adaptive, All, One };

// A choice made by the caller for this thread: the decode loop (fastar/sampling/threads.py) picks
// all threads or one per step itself, and an inner choice of its own would judge the "all" steps by
// stale timings (a nested measurement can lock into the wrong choice), so the loop sets All here
// for its duration (the op _thread_policy_override). -1 = none: the environment decides.
inline int& thread_policy_override() {
  thread_local int v = -1;
  return v;
}

inline ThreadPolicy thread_policy() {
  if (thread_policy_override() >= 0) return static_cast<ThreadPolicy>(thread_policy_override());
  const char* e = std::getenv("FASTAR_CPU_THREADS");  // read each call: tests and benches switch it
  if (e == nullptr || *e == 0 || std::strcmp(e, "adaptive") == 0) return ThreadPolicy::Adaptive;
  if (std::strcmp(e, "all") == 0) return ThreadPolicy::All;
  if (std::strcmp(e, "one") == 0) return ThreadPolicy::One;
  TORCH_CHECK(false, "FASTAR_CPU_THREADS must be 'adaptive', 'all' or 'one', got '", e, "'");
}

class AdaptiveThreads {
 public:
  // Whether the call with this key should use all threads (true) or one (false).
  bool use_all(uint64_t key) {
    switch (thread_policy()) {
      case ThreadPolicy::All: return true;
      case ThreadPolicy::One: return false;
      default: return decide(key);
    }
  }

  // The adaptive choice itself (no environment): what use_all returns under "adaptive".
  bool decide(uint64_t key) {
    std::lock_guard<std::mutex> g(mu_);
    Entry& e = entry(key);
    ++e.calls;
    if (e.mean[1] < 0) return true;   // time each choice once, all threads first
    if (e.mean[0] < 0) return false;
    const bool best = e.mean[1] <= e.mean[0];
    return (e.calls % kExplore == 0) ? !best : best;
  }

  void record(uint64_t key, bool all, double seconds) {
    std::lock_guard<std::mutex> g(mu_);
    Entry& e = entry(key);
    double& m = e.mean[all ? 1 : 0];
    const double other = e.mean[all ? 0 : 1];
    const bool current = (e.mean[1] <= e.mean[0]) == all;
    if (m < 0) {
      m = seconds;
    } else if (current) {
      m = 0.75 * m + 0.25 * seconds;  // timed every call: a slow mean of many
    } else {
      // a re-timing of the other choice: one figure after many calls, so it weighs half, and if it
      // beats the choice in use outright (the load went away) it is taken as it is
      m = seconds < other ? seconds : 0.5 * m + 0.5 * seconds;
    }
  }

  // RAII: times a call and records its seconds per unit of work (a call of `units` steps).
  struct Timer {
    AdaptiveThreads& at;
    uint64_t key;
    bool all;
    double units;
    std::chrono::steady_clock::time_point t0;
    Timer(AdaptiveThreads& a, uint64_t k, bool all_threads, double work_units = 1.0)
        : at(a), key(k), all(all_threads), units(work_units), t0(std::chrono::steady_clock::now()) {}
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;
    ~Timer() {
      if (thread_policy() != ThreadPolicy::Adaptive) return;
      at.record(key, all, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / units);
    }
  };

 private:
  static constexpr int kSlots = 16;
  static constexpr int64_t kExplore = 32;
  struct Entry {
    uint64_t key = 0;
    bool used = false;
    int64_t calls = 0;
    double mean[2] = {-1.0, -1.0};  // seconds per call: [one thread, all threads]; -1 = not timed yet
  };
  Entry slots_[kSlots];
  int next_ = 0;
  std::mutex mu_;

  Entry& entry(uint64_t key) {
    for (auto& e : slots_)
      if (e.used && e.key == key) return e;
    Entry& e = slots_[next_];  // a new key replaces the oldest
    next_ = (next_ + 1) % kSlots;
    e = Entry{};
    e.key = key;
    e.used = true;
    return e;
  }
};

// A key from a few shape numbers.
inline uint64_t work_key(std::initializer_list<int64_t> xs) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t x : xs) {
    h ^= static_cast<uint64_t>(x);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace fastar
