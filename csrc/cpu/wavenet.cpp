// CPU kernels of the dilated-causal-queue family (see fastar/ops/wavenet.py for the contract).
//
// causal_conv1d_update: one decoding step of a dilated conv1d on a ring-buffer state.
// wavenet_step: one generation step of a whole WaveNet in one fused loop (softmax head, or the
// discretized logistic mixture head when num_mixtures > 0).
//
// Design of wavenet_step. At batch 1 a step is ~0.9M multiply-adds against ~3.5 MB of
// float32 weights, so it is bound by how fast the weights stream from cache, not by
// arithmetic. The weights therefore come pre-packed as (in, out) matrices: y += x_i * W[i, :]
// streams each row once, contiguously, and the output tile stays in registers (8 AVX2
// vectors at batch 1, a 4-row x 2-vector tile for larger batches). The batch is cut into
// chunks that run on separate threads (at::parallel_for); inside a chunk every GEMV walks
// the output tiles outermost, so one tile's weight panel (K x 16 floats) stays in L1 while
// all rows of the chunk pass over it: the weights are read from L2/L3 once per chunk and
// step, whatever the batch (wavenet_blocked.cpp). Small float32 batches on AVX-512 machines take
// the two-part packed path (wavenet_two_part.cpp: each core keeps half of the weights in its L2);
// float64 and machines without AVX-512 at batch 1-2 split the output columns of every matrix
// between two threads (wavenet_split.cpp). This file: checks, primitives, dispatch, registration.
// Gates use the vectorised exp of common/vec_math.h in float32 and std::tanh/std::exp in
// float64. Codes are drawn by the one categorical pick of common/categorical.h.
// The mixture head draws with mix::pixel_sample (csrc/mixture.h), the very per-position code of
// sample_discretized_mix_logistic's kernels, and feeds the float value back through in_w (1, R).
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/vec_math.h"
#include "cpu/wavenet_internal.h"

namespace fastar {
namespace wavenet_cpu {
namespace {

// ------------------------------------------------------------------------------------------
// causal_conv1d_update

template <typename T>
void conv_update_rows(const T* x, T* state, const T* w, const T* bias, T* y, const ConvUpdateShape& s, int64_t pos,
                      int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * s.C_in;
    T* st = state + b * s.C_in * s.N;
    T* yb = y + b * s.C_out;
    for (int64_t o = 0; o < s.C_out; ++o) {
      const T* wo = w + o * s.C_in * s.k;
      T acc = bias ? bias[o] : T(0);
      for (int64_t c = 0; c < s.C_in; ++c) {
        const T* wc = wo + c * s.k;
        const T* sc = st + c * s.N;
        for (int64_t j = 0; j + 1 < s.k; ++j) {
          int64_t slot = (pos - (s.k - 1 - j) * s.dilation) % s.N;
          if (slot < 0) slot += s.N;
          acc += wc[j] * sc[slot];
        }
        acc += wc[s.k - 1] * xb[c];
      }
      yb[o] = acc;
    }
    if (s.N > 0) {
      const int64_t slot = pos % s.N;
      for (int64_t c = 0; c < s.C_in; ++c) st[c * s.N + slot] = xb[c];
    }
  }
}

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, at::Tensor& state, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, int64_t dilation,
                                    const at::Tensor& position) {
  const auto s = check_causal_conv1d_update("causal_conv1d_update", x, state, weight, bias, dilation, position);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_update: the CPU kernel supports float32 and float64, got ", x.scalar_type());
  const int64_t pos = position.item<int64_t>();
  TORCH_CHECK(pos >= 0, "causal_conv1d_update: position must be non-negative, got ", pos);
  auto y = at::empty({s.B, s.C_out}, x.options());
  if (s.B == 0) return y;
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto bc = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_update_cpu", [&] {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.C_in * s.C_out * s.k));
    at::parallel_for(0, s.B, grain, [&](int64_t b0, int64_t b1) {
      conv_update_rows<scalar_t>(xc.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                 has_bias ? bc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), s, pos, b0,
                                 b1);
    });
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// wavenet_step: the gate primitives and the choice of the GEMV / gate pair

template <typename T>
void gate_generic(const T* f, const T* g, int64_t n, T* z) {
  for (int64_t c = 0; c < n; ++c) z[c] = std::tanh(f[c]) * (T(1) / (T(1) + std::exp(-g[c])));
}

#ifdef FASTAR_X86
__attribute__((target("avx2,fma"))) void gate_avx2(const float* a, const float* ga, int64_t D, float* z) {
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) {
    const __m256 f = _mm256_loadu_ps(a + c), g = _mm256_loadu_ps(ga + c);
    // tanh(f) = 2 / (1 + exp(-2f)) - 1; sigmoid(g) = 1 / (1 + exp(-g)).
    const __m256 th = _mm256_sub_ps(
        _mm256_div_ps(two, _mm256_add_ps(one, vec::vexp8_avx2(_mm256_mul_ps(f, _mm256_set1_ps(-2.0f))))), one);
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, vec::vexp8_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(z + c, _mm256_mul_ps(th, sg));
  }
  for (; c < D; ++c) z[c] = std::tanh(a[c]) * (1.0f / (1.0f + std::exp(-ga[c])));
}
#endif

template <typename T>
Prims<T> pick_prims() {
  return {gemv_generic<T>, gate_generic<T>};
}

#ifdef FASTAR_X86
template <>
Prims<float> pick_prims<float>() {
  if (cpu_has_avx2_fma()) return {gemv_avx2, gate_avx2};
  return {gemv_generic<float>, gate_generic<float>};
}
#endif

// ------------------------------------------------------------------------------------------
// wavenet_step: checks and the choice of strategy

// Whether the two-part path packs its weights for a call of num_steps steps (both give the same bits,
// wavenet_two_part.cpp). Measured on the 2-core Xeon, the shipped speech WaveNet at batch 1, one
// thread, us a step packed / in place: 1 step a call 67 / 20, 16 steps 13.5 / 12.0, 64 steps
// 11.0 / 11.6, 256 steps 10.4 / 11.5: packing pays from a few tens of steps a call.
// FASTAR_WAVENET_CPU_PACK=always|never forces it (for benchmarks and the bit-equality tests);
// unset, empty or auto: by the step count.
constexpr int64_t kPackMinSteps = 32;

bool pack_weights(int64_t num_steps) {
  const char* env = std::getenv("FASTAR_WAVENET_CPU_PACK");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    if (std::strcmp(env, "always") == 0) return true;
    if (std::strcmp(env, "never") == 0) return false;
    TORCH_CHECK(false, "wavenet_step: FASTAR_WAVENET_CPU_PACK must be auto, always or never, got '", env, "'");
  }
  return num_steps >= kPackMinSteps;
}

template <typename T>
void run_steps(StepArgs<T>& g, int64_t p0, int64_t num_steps) {
  const StepShape& s = *g.s;
  const int64_t threads = at::get_num_threads();
  const bool pack = pack_weights(num_steps);  // read (and checked) on every path, used by the two-part one
  (void)pack;
  // Only with OpenMP: its team threads run concurrently, which the spin barriers rely on
  // (a task pool could run both parts one after the other on one thread).
  const bool can_two = AT_PARALLEL_OPENMP && threads >= 2 && !at::in_parallel_region();
  // Two threads whenever torch has them: the thread count is the caller's choice
  // (fastar/threads.py picks it per kind of step). Every thread count computes the same bits: a
  // column split falls on 16-column boundaries (whole AVX tiles, the same scalar tail), a row
  // split never touches a reduction, every output is summed in an order fixed by the shape
  // whichever thread and tile computes it (common/gemv_panels.h), and the two-part path's parts
  // are fixed by the shape (one thread runs both or two run one each).
  bool small = false;
  if constexpr (std::is_same_v<T, float>) small = s.B <= kSmallBatch && cpu_has_avx512();
  const bool split = !small && s.B <= 2 && s.D >= 32 && s.R + s.S >= 64;
  const bool two_threads = can_two && (small || split);
  if constexpr (std::is_same_v<T, float>) {
    if (small) {
      run_small(g, p0, num_steps, two_threads, pack);
      return;
    }
  }
  if (two_threads && split) {
    run_split<T>(g, p0, num_steps);
    return;
  }
  run_blocked<T>(g, p0, num_steps);
}

// The codes a call reads that it did not draw itself (the sample before the first step and
// the primed ones) must be valid indices of in_w: checked here, before any thread starts.
void check_codes(const at::Tensor& samples, const StepShape& s, int64_t p0, int64_t num_steps, int64_t num_prime) {
  const int64_t* sm = samples.data_ptr<int64_t>();
  const int64_t hi = std::min(p0 + num_steps - 1, std::max(num_prime, p0));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t q = std::max<int64_t>(0, p0 - 1); q < hi; ++q) {
      const int64_t c = sm[b * s.T + q];
      TORCH_CHECK(c >= 0 && c < s.A, "wavenet_step: samples[", b, ", ", q, "] = ", c, " is not a code in [0, ",
                  s.A, ")");
    }
}

void wavenet_step_cpu(at::Tensor& samples, at::Tensor& queues, at::Tensor& position, at::Tensor& logits,
                      const at::Tensor& noise, const c10::optional<at::Tensor>& cond, at::TensorList pack,
                      at::IntArrayRef config, double temperature) {
  const char* op = "wavenet_step";
  const auto a = parse_wavenet_step(op, samples, queues, position, logits, noise, cond, pack, config, temperature);
  const StepShape& s = a.s;
  TORCH_CHECK(a.conv_w.scalar_type() == at::kFloat || a.conv_w.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64 weights, got ", a.conv_w.scalar_type());
  const int64_t p = position.data_ptr<int64_t>()[0];
  const int64_t num_steps = a.num_steps;
  TORCH_CHECK(p >= 0 && p + num_steps <= s.T, op, ": steps ", p, " to ", p + num_steps - 1, " do not fit the ", s.T,
              " steps that samples and noise have room for");
  if (s.B == 0) {
    position.data_ptr<int64_t>()[0] = p + num_steps;
    return;
  }
  const bool mixture = a.num_mixtures > 0;
  if (!mixture) check_codes(samples, s, p, num_steps, a.num_prime);
  // the mixture head reads its uniforms in the acc dtype (checked), the softmax head in float or double
  const auto nz = (mixture || noise.scalar_type() == at::kDouble ? noise : noise.to(at::kFloat)).contiguous();
  const auto cc = (cond.has_value() && cond->defined()) ? cond->contiguous() : at::Tensor();
  const auto iw = a.in_w.contiguous(), ib = a.in_b.contiguous(), cw = a.conv_w.contiguous(),
             cb = a.conv_b.contiguous(), rw = a.res_skip_w.contiguous(), rb = a.res_skip_b.contiguous(),
             o1w = a.out1_w.contiguous(), o1b = a.out1_b.contiguous(), o2w = a.out2_w.contiguous(),
             o2b = a.out2_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.conv_w.scalar_type(), "wavenet_step_cpu", [&] {
    StepArgs<scalar_t> g;
    g.s = &s;
    g.p = p;
    g.num_prime = a.num_prime;
    g.start = a.start;
    g.temperature = a.temperature;
    g.K = a.num_mixtures;
    g.num_bits = a.num_bits;
    g.samples = mixture ? nullptr : samples.data_ptr<int64_t>();
    g.xs = mixture ? samples.data_ptr<scalar_t>() : nullptr;
    g.queues = queues.data_ptr<scalar_t>();
    g.logits = logits.data_ptr<scalar_t>();
    g.noise = nz.data_ptr();
    g.noise_double = nz.scalar_type() == at::kDouble;
    g.cond = cc.defined() ? cc.data_ptr<scalar_t>() : nullptr;
    g.in_w = iw.data_ptr<scalar_t>();
    g.in_b = ib.data_ptr<scalar_t>();
    g.conv_w = cw.data_ptr<scalar_t>();
    g.conv_b = cb.data_ptr<scalar_t>();
    g.rs_w = rw.data_ptr<scalar_t>();
    g.rs_b = rb.data_ptr<scalar_t>();
    g.o1_w = o1w.data_ptr<scalar_t>();
    g.o1_b = o1b.data_ptr<scalar_t>();
    g.o2_w = o2w.data_ptr<scalar_t>();
    g.o2_b = o2b.data_ptr<scalar_t>();
    g.dil = a.dilations.data();
    g.prim = pick_prims<scalar_t>();
    run_steps<scalar_t>(g, p, num_steps);
  });
  position.data_ptr<int64_t>()[0] = p + num_steps;
}

}  // namespace
}  // namespace wavenet_cpu

// fastar::_wavenet_profile(enable): true resets the two-part path's stage profile and turns it on;
// false turns it off and returns it: for part 0 then part 1, the seconds spent in each stage
// (input, layer GEMVs, layer barrier wait, layer finish, skip publish, head wait, head1, head1
// wait, head2, head2 wait, draw, packing the weights at the start of a call) and the number of
// steps, summed over every call since the start. A diagnostic, not a test hook: it is what
// `python -m fastar bench floors` reports (fastar/bench/floors.py; README "Floors and a profile"),
// and the leading underscore keeps it out of the op families' public surface.
std::vector<double> wavenet_profile(bool enable) {
  auto& acc = wavenet_cpu::profile_acc();
  std::vector<double> out;
  if (enable) {
    for (auto& row : acc)
      for (double& v : row) v = 0.0;
    wavenet_cpu::profile_on().store(true);
    return out;
  }
  wavenet_cpu::profile_on().store(false);
  for (auto& row : acc)
    for (double v : row) out.push_back(v);
  return out;
}

TORCH_LIBRARY_IMPL(fastar, CompositeImplicitAutograd, m) { m.impl("_wavenet_profile", &wavenet_profile); }

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("causal_conv1d_update", &wavenet_cpu::causal_conv1d_update_cpu);
  m.impl("wavenet_step", &wavenet_cpu::wavenet_step_cpu);
}

}  // namespace fastar
