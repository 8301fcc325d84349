// fastar::_adaptive_threads_trace: the thread choice of csrc/common/adaptive_threads.h driven by
// given timings, so its decisions can be tested without a loaded machine. Call i is charged
// seconds_all[i] if the rule picks all threads and seconds_one[i] if it picks one; returns the
// picks (1 = all threads, 0 = one thread), in order. And _thread_policy_override (below).
#include <torch/library.h>

#include <vector>

#include "common/adaptive_threads.h"

namespace fastar {

std::vector<int64_t> adaptive_threads_trace(at::ArrayRef<double> seconds_all, at::ArrayRef<double> seconds_one) {
  TORCH_CHECK(seconds_all.size() == seconds_one.size(), "_adaptive_threads_trace: seconds_all has ",
              seconds_all.size(), " calls but seconds_one has ", seconds_one.size());
  AdaptiveThreads choice;
  std::vector<int64_t> picks;
  picks.reserve(seconds_all.size());
  for (size_t i = 0; i < seconds_all.size(); ++i) {
    const bool all = choice.decide(0);
    choice.record(0, all, all ? seconds_all[i] : seconds_one[i]);
    picks.push_back(all ? 1 : 0);
  }
  return picks;
}

// Sets this thread's override of FASTAR_CPU_THREADS (-1 none, 0 adaptive, 1 all, 2 one); returns
// the one it replaces, so a caller can put it back.
int64_t thread_policy_override_op(int64_t policy) {
  TORCH_CHECK(policy >= -1 && policy <= 2, "_thread_policy_override: policy must be -1 (none), 0 (adaptive), "
              "1 (all) or 2 (one), got ", policy);
  const int64_t prev = thread_policy_override();
  thread_policy_override() = static_cast<int>(policy);
  return prev;
}

TORCH_LIBRARY_FRAGMENT(fastar, m) {
  m.def("_thread_policy_override(int policy) -> int", &thread_policy_override_op);
  m.def("_adaptive_threads_trace(float[] seconds_all, float[] seconds_one) -> int[]", &adaptive_threads_trace);
}

}  // namespace fastar
