// A spin barrier for threads that live for a whole multi-step call (the OpenMP fork/join is
// then paid once per call, not once per stage). Only correct when the parties really run
// concurrently (OpenMP team threads, not a task pool that may run them one after the other).
#pragma once
#include <atomic>
#include <thread>

namespace fastar {

struct SpinBarrier {
  std::atomic<int> count{0};
  std::atomic<int> phase{0};
  void wait(int parties) {
    const int ph = phase.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == parties - 1) {
      count.store(0, std::memory_order_relaxed);
      phase.store(ph + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase.load(std::memory_order_acquire) == ph; ++spins) {
      if (spins > 2000) std::this_thread::yield();  // the machine may be oversubscribed
    }
  }
};

}  // namespace fastar
