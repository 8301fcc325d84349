// wavenet_step, column-split strategy (batch 1-2 on two OpenMP threads: float64, or float32
// without AVX-512).
#include "cpu/wavenet_internal.h"

namespace fastar {
namespace wavenet_cpu {

// Small batches on two threads: both hold the same rows, and each computes its own part of
// the output columns of every matrix, so each thread streams (and keeps in its own L2) only
// its part of the weights. A thread computes the filter and the gate columns of the same
// channels, so it gates them without waiting: two barriers per layer.
template <typename T>
void run_split(StepArgs<T>& g, int64_t p0, int64_t num_steps) {
  const StepShape& s = *g.s;
  Scratch<T> sc;
  sc.resize(s, s.B);
  SpinBarrier bar;
  at::parallel_for(0, 2, 1, [&](int64_t lo, int64_t hi) {
    const int parties = (hi - lo == 2) ? 1 : 2;  // the runtime gave us one thread: it does both parts
    for (int64_t id = lo; id < hi; ++id) {
      if (parties == 1 && id == 1) break;
      StepArgs<T> gl = g;
      Stepper<T> st(gl);
      const int64_t part_id = parties == 1 ? 0 : id;
      auto cols = [&](int64_t n) { return Stepper<T>::part(n, part_id, parties); };
      const auto gd = cols(s.D), rs = cols(s.R + s.S), sk = cols(s.S), ao = cols(s.A);
      for (int64_t i = 0; i < num_steps; ++i) {
        gl.p = p0 + i;
        if (part_id == 0) st.input(0, s.B, sc);
        if (parties == 2) bar.wait(2);
        for (int64_t l = 0; l < s.L; ++l) {
          st.conv(l, 0, s.B, sc, gd.first, gd.second);
          st.conv(l, 0, s.B, sc, s.D + gd.first, s.D + gd.second);
          st.gate(s.B, sc, gd.first, gd.second);
          if (parties == 2) bar.wait(2);  // all of z, and every read of the queues, done
          if (part_id == 0) st.push_queue(l, 0, s.B, sc);
          st.res_skip(l, s.B, sc, rs.first, rs.second);
          if (parties == 2) bar.wait(2);  // h complete for the next layer
        }
        for (int64_t r = 0; r < s.B; ++r) st.relu(sc.skip.data() + r * s.S + sk.first, sk.second - sk.first);
        if (parties == 2) bar.wait(2);
        st.head1(s.B, sc, sk.first, sk.second);
        for (int64_t r = 0; r < s.B; ++r) st.relu(sc.y1.data() + r * s.S + sk.first, sk.second - sk.first);
        if (parties == 2) bar.wait(2);
        st.head2(0, s.B, sc, ao.first, ao.second);
        if (parties == 2) bar.wait(2);
        if (part_id == 0) st.sample(0, s.B);
        if (parties == 2) bar.wait(2);  // the drawn sample is the next step's input
      }
    }
  });
}

template void run_split<float>(StepArgs<float>&, int64_t, int64_t);
template void run_split<double>(StepArgs<double>&, int64_t, int64_t);

}  // namespace wavenet_cpu
}  // namespace fastar
