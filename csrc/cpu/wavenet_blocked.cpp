// wavenet_step, blocked strategy: the batch cut into chunks of rows, one thread per chunk, every
// stage of a chunk on its thread (Stepper::rows). Inside a chunk each GEMV walks the output
// tiles outermost, so one tile's weight panel stays in L1 while all rows pass over it.
#include "cpu/wavenet_internal.h"

namespace fastar {
namespace wavenet_cpu {

template <typename T>
void run_blocked(StepArgs<T>& g, int64_t p0, int64_t num_steps) {
  const StepShape& s = *g.s;
  const int64_t threads = at::get_num_threads();
  Stepper<T> st(g);
  // Chunks of rows large enough that a weight panel is reused many times before it leaves L1.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, (s.B + threads - 1) / threads));
  const int64_t nchunks = (s.B + chunk - 1) / chunk;
  for (int64_t i = 0; i < num_steps; ++i) {
    g.p = p0 + i;
    if (nchunks == 1) {
      st.rows(0, s.B);
      continue;
    }
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b0 = c * chunk;
        st.rows(b0, std::min(chunk, s.B - b0));
      }
    });
  }
}

template void run_blocked<float>(StepArgs<float>&, int64_t, int64_t);
template void run_blocked<double>(StepArgs<double>&, int64_t, int64_t);

}  // namespace wavenet_cpu
}  // namespace fastar
