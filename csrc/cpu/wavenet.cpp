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
// step, whatever the batch. Small float32 batches on AVX-512 machines take the two-part packed
// path below (run_small: each core keeps half of the weights in its L2); float64 and machines
// without AVX-512 at batch 1-2 split the output columns of every matrix between two threads
// (run_split).
// Gates use a vectorised exp (Cephes polynomial, ~2 ulp) in float32 and std::tanh/std::exp
// in float64. Sampling follows categorical_sample's contract: inverse CDF of softmax(logits /
// temperature) on the step's uniform, clamped to the last category of non-zero probability.
// The mixture head draws with mix::pixel_sample (csrc/mixture.h), the very per-position code of
// sample_discretized_mix_logistic's kernels, and feeds the float value back through in_w (1, R).
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <memory>
#include <type_traits>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTAR_X86 1
#endif

#include "mixture.h"
#include "wavenet.h"

namespace fastar {
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
// wavenet_step: GEMV / gate primitives

// y[b*ldy + o] += sum_i x[b*ldx + i] * W[i*ldw + o] for b < nb, o in [o0, o1).
template <typename T>
void gemv_generic(const T* W, int64_t ldw, int64_t K, int64_t o0, int64_t o1, const T* x, int64_t ldx, T* y,
                  int64_t ldy, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    T* yb = y + b * ldy;
    const T* xb = x + b * ldx;
    for (int64_t i = 0; i < K; ++i) {
      const T xi = xb[i];
      const T* wr = W + i * ldw;
      for (int64_t o = o0; o < o1; ++o) yb[o] += xi * wr[o];
    }
  }
}

template <typename T>
void gate_generic(const T* f, const T* g, int64_t n, T* z) {
  for (int64_t c = 0; c < n; ++c) z[c] = std::tanh(f[c]) * (T(1) / (T(1) + std::exp(-g[c])));
}

#ifdef FASTAR_X86
template <int NB, int OV>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                           int64_t ldx, float* y, int64_t ldy) {
  __m256 acc[NB][OV];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < OV; ++v) acc[b][v] = _mm256_loadu_ps(y + b * ldy + 8 * v);
  for (int64_t i = 0; i < K; ++i) {
    const float* wr = W + i * ldw;
    __m256 w[OV];
    for (int v = 0; v < OV; ++v) w[v] = _mm256_loadu_ps(wr + 8 * v);
    for (int b = 0; b < NB; ++b) {
      const __m256 xb = _mm256_broadcast_ss(x + b * ldx + i);
      for (int v = 0; v < OV; ++v) acc[b][v] = _mm256_fmadd_ps(xb, w[v], acc[b][v]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < OV; ++v) _mm256_storeu_ps(y + b * ldy + 8 * v, acc[b][v]);
}

// The 4-row x 16-column tile written out by hand: GCC spills the array form of it.
__attribute__((target("avx2,fma"))) inline void tile4x2_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                              int64_t ldx, float* y, int64_t ldy) {
  __m256 a00 = _mm256_loadu_ps(y), a01 = _mm256_loadu_ps(y + 8);
  __m256 a10 = _mm256_loadu_ps(y + ldy), a11 = _mm256_loadu_ps(y + ldy + 8);
  __m256 a20 = _mm256_loadu_ps(y + 2 * ldy), a21 = _mm256_loadu_ps(y + 2 * ldy + 8);
  __m256 a30 = _mm256_loadu_ps(y + 3 * ldy), a31 = _mm256_loadu_ps(y + 3 * ldy + 8);
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  for (int64_t i = 0; i < K; ++i) {
    const float* wr = W + i * ldw;
    const __m256 w0 = _mm256_loadu_ps(wr), w1 = _mm256_loadu_ps(wr + 8);
    __m256 xb = _mm256_broadcast_ss(x0 + i);
    a00 = _mm256_fmadd_ps(xb, w0, a00);
    a01 = _mm256_fmadd_ps(xb, w1, a01);
    xb = _mm256_broadcast_ss(x1 + i);
    a10 = _mm256_fmadd_ps(xb, w0, a10);
    a11 = _mm256_fmadd_ps(xb, w1, a11);
    xb = _mm256_broadcast_ss(x2 + i);
    a20 = _mm256_fmadd_ps(xb, w0, a20);
    a21 = _mm256_fmadd_ps(xb, w1, a21);
    xb = _mm256_broadcast_ss(x3 + i);
    a30 = _mm256_fmadd_ps(xb, w0, a30);
    a31 = _mm256_fmadd_ps(xb, w1, a31);
  }
  _mm256_storeu_ps(y, a00);
  _mm256_storeu_ps(y + 8, a01);
  _mm256_storeu_ps(y + ldy, a10);
  _mm256_storeu_ps(y + ldy + 8, a11);
  _mm256_storeu_ps(y + 2 * ldy, a20);
  _mm256_storeu_ps(y + 2 * ldy + 8, a21);
  _mm256_storeu_ps(y + 3 * ldy, a30);
  _mm256_storeu_ps(y + 3 * ldy + 8, a31);
}

// One row, 16 columns: four independent accumulator pairs over i (i unrolled by 4) hide the
// FMA latency that a single pair would expose at batch 1.
__attribute__((target("avx2,fma"))) inline void tile1x2_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                              float* y) {
  __m256 a0 = _mm256_loadu_ps(y), a1 = _mm256_loadu_ps(y + 8);
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
  __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {
    const float* w = W + i * ldw;
    __m256 xb = _mm256_broadcast_ss(x + i);
    a0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 8), a1);
    xb = _mm256_broadcast_ss(x + i + 1);
    b0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + ldw), b0);
    b1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + ldw + 8), b1);
    xb = _mm256_broadcast_ss(x + i + 2);
    c0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 2 * ldw), c0);
    c1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 2 * ldw + 8), c1);
    xb = _mm256_broadcast_ss(x + i + 3);
    d0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 3 * ldw), d0);
    d1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 3 * ldw + 8), d1);
  }
  for (; i < K; ++i) {
    const float* w = W + i * ldw;
    const __m256 xb = _mm256_broadcast_ss(x + i);
    a0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 8), a1);
  }
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(c0, d0)));
  _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(c1, d1)));
}

template <int OV>
__attribute__((target("avx2,fma"))) inline void rows_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                           int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    if constexpr (OV == 2)
      tile4x2_avx2(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy);
    else
      tile_avx2<4, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy);
  }
  for (; b < nb; ++b) {
    if constexpr (OV == 2)
      tile1x2_avx2(W, ldw, K, x + b * ldx, y + b * ldy);
    else
      tile_avx2<1, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy);
  }
}

__attribute__((target("avx2,fma"))) void gemv_avx2(const float* W, int64_t ldw, int64_t K, int64_t o0, int64_t o1,
                                                    const float* x, int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t o = o0;
  if (nb == 1) {
    for (; o + 64 <= o1; o += 64) tile_avx2<1, 8>(W + o, ldw, K, x, ldx, y + o, ldy);
  }
  for (; o + 16 <= o1; o += 16) rows_avx2<2>(W + o, ldw, K, x, ldx, y + o, ldy, nb);
  for (; o + 8 <= o1; o += 8) rows_avx2<1>(W + o, ldw, K, x, ldx, y + o, ldy, nb);
  if (o < o1) gemv_generic<float>(W, ldw, K, o, o1, x, ldx, y, ldy, nb);
}

// exp for float32 lanes: range reduction by ln 2 and Cephes' degree-6 polynomial.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) void gate_avx2(const float* a, const float* ga, int64_t D, float* z) {
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) {
    const __m256 f = _mm256_loadu_ps(a + c), g = _mm256_loadu_ps(ga + c);
    // tanh(f) = 2 / (1 + exp(-2f)) - 1; sigmoid(g) = 1 / (1 + exp(-g)).
    const __m256 th = _mm256_sub_ps(
        _mm256_div_ps(two, _mm256_add_ps(one, exp_avx2(_mm256_mul_ps(f, _mm256_set1_ps(-2.0f))))), one);
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(z + c, _mm256_mul_ps(th, sg));
  }
  for (; c < D; ++c) z[c] = std::tanh(a[c]) * (1.0f / (1.0f + std::exp(-ga[c])));
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <typename T>
struct Prims {
  void (*gemv)(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int64_t, T*, int64_t, int64_t);
  void (*gate)(const T*, const T*, int64_t, T*);
};

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
// wavenet_step: the fused step

template <typename T>
struct StepArgs {
  const StepShape* s;
  int64_t p;
  int64_t num_prime, start;
  double temperature;
  int64_t K, num_bits;  // K = num_mixtures: 0 for the softmax head
  int64_t* samples;     // softmax head: codes
  T* xs;                // mixture head: audio values
  T* queues;
  T* logits;
  const void* noise;
  bool noise_double;
  const T* cond;
  const T *in_w, *in_b, *conv_w, *conv_b, *rs_w, *rs_b, *o1_w, *o1_b, *o2_w, *o2_b;
  const int64_t* dil;
  Prims<T> prim;
};

// Per-row scratch, contiguous per row so every stage is a strided GEMV.
template <typename T>
struct Scratch {
  std::vector<T> h, a, z, skip, y1;
  void resize(const StepShape& s, int64_t nb) {
    h.assign(nb * s.R, T(0));
    a.assign(nb * 2 * s.D, T(0));
    z.assign(nb * s.D, T(0));
    skip.assign(nb * s.S, T(0));
    y1.assign(nb * s.S, T(0));
  }
};

// The categorical draw of one row of logits: the one pick (common/categorical.h) in the acc
// type (the uniform rounded to it, as the reference does), temperature 0 = first argmax.
template <typename T>
int64_t sample_row(const T* lg, int64_t A, double temperature, double u) {
  thread_local std::vector<T> e;  // the row's exps, so each is taken once
  e.resize(A);
  return cat::categorical_draw<T>([lg](int64_t i) { return lg[i]; }, A, static_cast<T>(temperature),
                                  static_cast<T>(u), e.data());
}

// The draw of row b at step p from its logits: a code (softmax head) or an audio value (mixture
// head), returned as a double so that both heads share one signature. Writes nothing.
template <typename T>
double draw_row(const StepArgs<T>& g, int64_t b, int64_t p) {
  const StepShape& s = *g.s;
  if (g.K > 0) {
    const double bins = std::ldexp(1.0, static_cast<int>(g.num_bits)) - 1.0;
    const mix::PixelParams<T> pp{g.logits + b * s.A, 1};
    // noise (B, 2, T): the component uniform at [b, 0, p], the logistic one T further
    const T* u = static_cast<const T*>(g.noise) + b * 2 * s.T + p;
    T v = T(0);
    mix::pixel_sample<T, T, 1>(pp, u, s.T, g.K, static_cast<T>(g.temperature), static_cast<T>(bins / 2.0),
                               static_cast<T>(bins), &v, 1);
    return static_cast<double>(v);
  }
  const double u = g.noise_double ? static_cast<const double*>(g.noise)[b * s.T + p]
                                  : static_cast<double>(static_cast<const float*>(g.noise)[b * s.T + p]);
  return static_cast<double>(sample_row<T>(g.logits + b * s.A, s.A, g.temperature, u));
}

// Stores a drawn value (draw_row's result) into samples (codes) or xs (audio values).
template <typename T>
void store_draw(const StepArgs<T>& g, int64_t b, int64_t p, double v) {
  if (g.K > 0)
    g.xs[b * g.s->T + p] = static_cast<T>(v);
  else
    g.samples[b * g.s->T + p] = static_cast<int64_t>(v);
}

// Stages over rows [b0, b0 + nb) and output columns [c0, c1) of each matrix (the column
// range is the whole matrix unless two threads split one row).
template <typename T>
struct Stepper {
  const StepArgs<T>& g;
  const StepShape& s;
  Stepper(const StepArgs<T>& args) : g(args), s(*args.s) {}

  static std::pair<int64_t, int64_t> part(int64_t n, int64_t part_id, int64_t parts) {
    // split on 16-column boundaries so each part keeps full AVX tiles
    const int64_t units = (n + 15) / 16;
    const int64_t lo = std::min(n, (units * part_id / parts) * 16);
    const int64_t hi = std::min(n, (units * (part_id + 1) / parts) * 16);
    return {lo, hi};
  }

  void input(int64_t b0, int64_t nb, Scratch<T>& sc) {
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t b = b0 + r;
      T* h = sc.h.data() + r * s.R;
      if (g.K > 0) {
        // the 1x1 input conv of the previous value (0 before the first sample)
        const T x = g.p > 0 ? g.xs[b * s.T + g.p - 1] : T(0);
        for (int64_t i = 0; i < s.R; ++i) h[i] = g.in_w[i] * x + g.in_b[i];
      } else {
        const int64_t c = g.p > 0 ? g.samples[b * s.T + g.p - 1] : g.start;  // checked by check_codes
        const T* e = g.in_w + c * s.R;
        for (int64_t i = 0; i < s.R; ++i) h[i] = e[i] + g.in_b[i];
      }
      std::fill(sc.skip.begin() + r * s.S, sc.skip.begin() + (r + 1) * s.S, T(0));
    }
  }

  // a = conv_b + cond + taps, columns [c0, c1) of 2D.
  void conv(int64_t l, int64_t b0, int64_t nb, Scratch<T>& sc, int64_t c0, int64_t c1) {
    const int64_t D2 = 2 * s.D, d = g.dil[l], N = (s.k - 1) * d;
    const T* W = g.conv_w + l * s.k * s.R * D2;
    for (int64_t r = 0; r < nb; ++r) {
      T* a = sc.a.data() + r * D2;
      const T* bias = g.conv_b + l * D2;
      for (int64_t c = c0; c < c1; ++c) a[c] = bias[c];
      if (g.cond) {
        const int64_t tc = s.Tc == 1 ? 0 : g.p;
        const T* cv = g.cond + (((b0 + r) * s.Tc + tc) * s.L + l) * D2;
        for (int64_t c = c0; c < c1; ++c) a[c] += cv[c];
      }
    }
    const int64_t qstride = s.Ntot * s.R;
    for (int64_t j = 0; j + 1 < s.k; ++j) {
      int64_t slot = (g.p - (s.k - 1 - j) * d) % N;
      if (slot < 0) slot += N;
      const T* q = g.queues + b0 * qstride + (s.offsets[l] + slot) * s.R;
      g.prim.gemv(W + j * s.R * D2, D2, s.R, c0, c1, q, qstride, sc.a.data(), D2, nb);
    }
    g.prim.gemv(W + (s.k - 1) * s.R * D2, D2, s.R, c0, c1, sc.h.data(), s.R, sc.a.data(), D2, nb);
  }

  void push_queue(int64_t l, int64_t b0, int64_t nb, Scratch<T>& sc) {
    if (s.k == 1) return;
    const int64_t N = (s.k - 1) * g.dil[l];
    const int64_t slot = g.p % N;
    for (int64_t r = 0; r < nb; ++r)
      std::memcpy(g.queues + (b0 + r) * s.Ntot * s.R + (s.offsets[l] + slot) * s.R, sc.h.data() + r * s.R,
                  sizeof(T) * s.R);
  }

  // z = tanh(a_f) * sigmoid(a_g) for gate channels [c0, c1).
  void gate(int64_t nb, Scratch<T>& sc, int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < nb; ++r) {
      const T* a = sc.a.data() + r * 2 * s.D;
      g.prim.gate(a + c0, a + s.D + c0, c1 - c0, sc.z.data() + r * s.D + c0);
    }
  }

  // h += z @ W[:, :R] + res_b; skip += z @ W[:, R:] + skip_b; columns [c0, c1) of R + S.
  void res_skip(int64_t l, int64_t nb, Scratch<T>& sc, int64_t c0, int64_t c1) {
    const int64_t RS = s.R + s.S;
    const T* W = g.rs_w + l * s.D * RS;
    const T* bias = g.rs_b + l * RS;
    const int64_t h0 = std::min(c0, s.R), h1 = std::min(c1, s.R);
    const int64_t k0 = std::max(c0, s.R), k1 = std::max(c1, s.R);
    if (h1 > h0) {
      for (int64_t r = 0; r < nb; ++r)
        for (int64_t c = h0; c < h1; ++c) sc.h[r * s.R + c] += bias[c];
      g.prim.gemv(W, RS, s.D, h0, h1, sc.z.data(), s.D, sc.h.data(), s.R, nb);
    }
    if (k1 > k0) {
      for (int64_t r = 0; r < nb; ++r)
        for (int64_t c = k0; c < k1; ++c) sc.skip[r * s.S + c - s.R] += bias[c];
      g.prim.gemv(W + s.R, RS, s.D, k0 - s.R, k1 - s.R, sc.z.data(), s.D, sc.skip.data(), s.S, nb);
    }
  }

  void relu(T* v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] > T(0) ? v[i] : T(0);
  }

  void head1(int64_t nb, Scratch<T>& sc, int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t c = c0; c < c1; ++c) sc.y1[r * s.S + c] = g.o1_b[c];
    g.prim.gemv(g.o1_w, s.S, s.S, c0, c1, sc.skip.data(), s.S, sc.y1.data(), s.S, nb);
  }

  void head2(int64_t b0, int64_t nb, Scratch<T>& sc, int64_t c0, int64_t c1) {
    T* lg = g.logits + b0 * s.A;
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t c = c0; c < c1; ++c) lg[r * s.A + c] = g.o2_b[c];
    g.prim.gemv(g.o2_w, s.A, s.S, c0, c1, sc.y1.data(), s.S, lg, s.A, nb);
  }

  void sample(int64_t b0, int64_t nb) {
    if (g.p < g.num_prime) return;
    for (int64_t b = b0; b < b0 + nb; ++b) store_draw(g, b, g.p, draw_row(g, b, g.p));
  }

  // Every stage for a chunk of rows on one thread.
  void rows(int64_t b0, int64_t nb) {
    thread_local Scratch<T> sc;
    sc.resize(s, nb);
    input(b0, nb, sc);
    for (int64_t l = 0; l < s.L; ++l) {
      conv(l, b0, nb, sc, 0, 2 * s.D);
      push_queue(l, b0, nb, sc);
      gate(nb, sc, 0, s.D);
      res_skip(l, nb, sc, 0, s.R + s.S);
    }
    relu(sc.skip.data(), nb * s.S);
    head1(nb, sc, 0, s.S);
    relu(sc.y1.data(), nb * s.S);
    head2(b0, nb, sc, 0, s.A);
    sample(b0, nb);
  }
};

// A spin barrier for the two threads of the split mode (they run for a whole multi-step
// call, so the OpenMP fork/join is paid once per call, not per stage).
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

// ------------------------------------------------------------------------------------------
// wavenet_step, small batches in float32 (B <= kSmallBatch, AVX-512): the weights are packed
// panel-major per part, and each part's share stays in one core's L2.
//
// At batch 1 a step streams ~3.5 MB of weights for ~0.9M multiply-adds: the speed is the
// bandwidth at which the weights reach the FMA units. Two things decide it (measured on the
// project's 2-core Xeon): the layout — a row-major (in, out) matrix read 64 columns at a time
// is a 1 KB-strided walk the prefetchers follow badly (15 GB/s from L3) while the same bytes
// as contiguous 64-wide panels stream at 28 GB/s — and where the bytes live: 3.5 MB is
// larger than one core's 2 MB L2, but half of it fits. So the network is cut in two parts,
// each packed once per call into panels in its own buffer, and each part runs on its own core:
//   - conv: part t owns the filter and the gate columns of the same dilation channels, so it
//     gates them alone and holds the matching half of z;
//   - res/skip: part t multiplies its half of z by its rows of the residual and skip matrices,
//     a partial sum over the full R + S outputs; h = h + partial_0 + partial_1 is then formed
//     by each part after ONE barrier per layer (each part keeps its own copy of h);
//   - skip partials stay per part until the head; the head's two matrices are split by
//     columns (a barrier each), and both parts draw the same sample from the full logits.
// L + 3 barriers per step. The arithmetic (and so every bit of the result) is the same
// whether one thread runs both parts or two threads run one each.
constexpr int64_t kSmallBatch = 4;

bool cpu_has_avx512() {
#ifdef FASTAR_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && cpu_has_avx2_fma();
  return ok;
#else
  return false;
#endif
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

#ifdef FASTAR_X86
// y[0:64) += x[0:K) @ P (K x 64, contiguous): two accumulator sets over alternate rows.
__attribute__((target("avx512f"))) inline void panel64(const float* P, int64_t K, const float* x, float* y) {
  __m512 a0 = _mm512_loadu_ps(y), a1 = _mm512_loadu_ps(y + 16), a2 = _mm512_loadu_ps(y + 32),
         a3 = _mm512_loadu_ps(y + 48);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= K; i += 2) {
    const float* w = P + i * 64;
    const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 16), a1);
    a2 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 32), a2);
    a3 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 48), a3);
    b0 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 64), b0);
    b1 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 80), b1);
    b2 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 96), b2);
    b3 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 112), b3);
  }
  if (i < K) {
    const float* w = P + i * 64;
    const __m512 x0 = _mm512_set1_ps(x[i]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 16), a1);
    a2 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 32), a2);
    a3 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 48), a3);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(a0, b0));
  _mm512_storeu_ps(y + 16, _mm512_add_ps(a1, b1));
  _mm512_storeu_ps(y + 32, _mm512_add_ps(a2, b2));
  _mm512_storeu_ps(y + 48, _mm512_add_ps(a3, b3));
}

// y[0:16) += x[0:K) @ P (K x 16): four accumulators over rows i mod 4.
__attribute__((target("avx512f"))) inline void panel16(const float* P, int64_t K, const float* x, float* y) {
  __m512 a = _mm512_loadu_ps(y), b = _mm512_setzero_ps(), c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {
    const float* w = P + i * 16;
    a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(w), a);
    b = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 1]), _mm512_loadu_ps(w + 16), b);
    c = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 2]), _mm512_loadu_ps(w + 32), c);
    d = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 3]), _mm512_loadu_ps(w + 48), d);
  }
  for (; i < K; ++i) a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(P + i * 16), a);
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// y[b, 0:width) += x[b, 0:K) @ (packed K x width matrix) for b < nb; width is a multiple of
// 16 (64-wide panels first, then 16-wide ones), each panel contiguous.
__attribute__((target("avx512f"))) void gemv_panels(const float* P, int64_t K, int64_t width, const float* x,
                                                      int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t o = 0;
  for (; o + 64 <= width; o += 64, P += K * 64)
    for (int64_t b = 0; b < nb; ++b) panel64(P, K, x + b * ldx, y + b * ldy + o);
  for (; o + 16 <= width; o += 16, P += K * 16)
    for (int64_t b = 0; b < nb; ++b) panel16(P, K, x + b * ldx, y + b * ldy + o);
}
#else
void gemv_panels(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t) {}
#endif

// Packs rows [r0, r0 + K) and the listed column ranges of a row-major matrix (leading dim ldw)
// into panels: logical column c of the result is the c-th listed column, each range starting
// at a multiple of 16 (zero columns pad every range up to one).
void pack_panels(const float* W, int64_t ldw, int64_t r0, int64_t K,
                 const std::vector<std::pair<int64_t, int64_t>>& ranges, float* dst) {
  std::vector<int64_t> src;  // source column of each logical column, -1 = padding
  for (auto [c0, c1] : ranges) {
    for (int64_t c = c0; c < c1; ++c) src.push_back(c);
    while (src.size() % 16) src.push_back(-1);
  }
  const int64_t width = static_cast<int64_t>(src.size());
  int64_t o = 0;
  auto panel = [&](int64_t pw) {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t c = 0; c < pw; ++c) {
        const int64_t sc = src[o + c];
        *dst++ = sc < 0 ? 0.0f : W[(r0 + i) * ldw + sc];
      }
    o += pw;
  };
  while (o + 64 <= width) panel(64);
  while (o + 16 <= width) panel(16);
}

struct SmallPlan {
  int64_t parts;
  std::pair<int64_t, int64_t> dch[2], sch[2], ach[2], rch[2];  // dilation / skip / output / residual channels
  // per part, offsets (in floats) of each packed matrix in the part's buffer
  std::vector<int64_t> conv_off[2], rs_off[2];
  int64_t head1_off[2], head2_off[2], size[2];
  int64_t wconv[2], wrs, wh1[2], wh2[2];  // packed widths
};

SmallPlan plan_small(const StepShape& s) {
  SmallPlan pl;
  pl.parts = (s.D >= 32 && s.S >= 32 && s.A >= 32) ? 2 : 1;
  for (int64_t t = 0; t < pl.parts; ++t) {
    pl.dch[t] = Stepper<float>::part(s.D, t, pl.parts);
    pl.sch[t] = Stepper<float>::part(s.S, t, pl.parts);
    pl.ach[t] = Stepper<float>::part(s.A, t, pl.parts);
    pl.rch[t] = Stepper<float>::part(s.R, t, pl.parts);
  }
  pl.wrs = round16(s.R + s.S);
  for (int64_t t = 0; t < pl.parts; ++t) {
    const auto [d0, d1] = pl.dch[t];
    pl.wconv[t] = 2 * round16(d1 - d0);
    pl.wh1[t] = round16(pl.sch[t].second - pl.sch[t].first);
    pl.wh2[t] = round16(pl.ach[t].second - pl.ach[t].first);
    int64_t off = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      pl.conv_off[t].push_back(off);
      off += s.k * s.R * pl.wconv[t];
      pl.rs_off[t].push_back(off);
      off += (d1 - d0) * pl.wrs;
    }
    pl.head1_off[t] = off;
    off += s.S * pl.wh1[t];
    pl.head2_off[t] = off;
    off += s.S * pl.wh2[t];
    pl.size[t] = off;
  }
  return pl;
}

void pack_part(const StepArgs<float>& g, const SmallPlan& pl, int64_t t, float* buf) {
  const StepShape& s = *g.s;
  const int64_t D2 = 2 * s.D, RS = s.R + s.S;
  const auto [d0, d1] = pl.dch[t];
  for (int64_t l = 0; l < s.L; ++l) {
    pack_panels(g.conv_w + l * s.k * s.R * D2, D2, 0, s.k * s.R, {{d0, d1}, {s.D + d0, s.D + d1}},
                buf + pl.conv_off[t][l]);
    pack_panels(g.rs_w + l * s.D * RS, RS, d0, d1 - d0, {{0, RS}}, buf + pl.rs_off[t][l]);
  }
  pack_panels(g.o1_w, s.S, 0, s.S, {pl.sch[t]}, buf + pl.head1_off[t]);
  pack_panels(g.o2_w, s.A, 0, s.S, {pl.ach[t]}, buf + pl.head2_off[t]);
}

// State shared by the parts of one call.
struct SmallShared {
  std::vector<float> hp[2];  // per layer parity: the parts' residual partials, (parts, nb, R)
  std::vector<float> skp;    // the parts' skip partials, (parts, nb, S)
  std::vector<float> y1;     // (nb, S) after the first head matrix
  SpinBarrier bar;
};

// One part's private state and stages.
struct SmallPart {
  const StepArgs<float>& g;
  const StepShape& s;
  const SmallPlan& pl;
  SmallShared& sh;
  int64_t t;
  const float* buf;
  std::vector<float> h, xcat, a, z, out, skip, sfull, y1, lg;
  std::vector<double> last;  // the previous value of each row (code or audio value)

  SmallPart(const StepArgs<float>& g_, const SmallPlan& pl_, SmallShared& sh_, int64_t t_, const float* buf_)
      : g(g_), s(*g_.s), pl(pl_), sh(sh_), t(t_), buf(buf_) {
    const int64_t nb = s.B;
    h.assign(nb * s.R, 0.f);
    xcat.assign(nb * s.k * s.R, 0.f);
    a.assign(nb * pl.wconv[t], 0.f);
    z.assign(nb * (pl.dch[t].second - pl.dch[t].first), 0.f);
    out.assign(nb * pl.wrs, 0.f);
    skip.assign(nb * s.S, 0.f);
    sfull.assign(nb * s.S, 0.f);
    y1.assign(nb * pl.wh1[t], 0.f);
    lg.assign(nb * pl.wh2[t], 0.f);
    last.assign(nb, 0.0);
  }

  // The value that enters step p: drawn by this call's previous step (kept in `last`), or read
  // from samples (the caller's, or a primed one: the kernel never writes primed positions).
  void input(int64_t p, int64_t p0) {
    for (int64_t b = 0; b < s.B; ++b) {
      float* hb = h.data() + b * s.R;
      const bool from_memory = p == p0 || p - 1 < g.num_prime;
      if (g.K > 0) {
        const float x = p == 0 ? 0.f : (from_memory ? g.xs[b * s.T + p - 1] : static_cast<float>(last[b]));
        for (int64_t i = 0; i < s.R; ++i) hb[i] = g.in_w[i] * x + g.in_b[i];
      } else {
        const int64_t c = p == 0 ? g.start : (from_memory ? g.samples[b * s.T + p - 1] : static_cast<int64_t>(last[b]));
        const float* e = g.in_w + c * s.R;
        for (int64_t i = 0; i < s.R; ++i) hb[i] = e[i] + g.in_b[i];
      }
      std::fill(skip.begin() + b * s.S, skip.begin() + (b + 1) * s.S, 0.f);
    }
  }

  // conv + gate + this part's residual/skip partial for layer l.
  void layer_compute(int64_t l, int64_t p, std::vector<float>& hp) {
    const int64_t d = g.dil[l], N = (s.k - 1) * d, D2 = 2 * s.D, KR = s.k * s.R;
    const auto [d0, d1] = pl.dch[t];
    const int64_t w = d1 - d0, w16 = round16(w), wc = pl.wconv[t];
    for (int64_t b = 0; b < s.B; ++b) {
      float* xc = xcat.data() + b * KR;
      const float* q = g.queues + b * s.Ntot * s.R;
      for (int64_t j = 0; j + 1 < s.k; ++j) {
        int64_t slot = (p - (s.k - 1 - j) * d) % N;
        if (slot < 0) slot += N;
        std::memcpy(xc + j * s.R, q + (s.offsets[l] + slot) * s.R, sizeof(float) * s.R);
      }
      std::memcpy(xc + (s.k - 1) * s.R, h.data() + b * s.R, sizeof(float) * s.R);
      float* ab = a.data() + b * wc;
      const float* bias = g.conv_b + l * D2;
      const float* cv = g.cond ? g.cond + ((b * s.Tc + (s.Tc == 1 ? 0 : p)) * s.L + l) * D2 : nullptr;
      for (int64_t c = 0; c < w16; ++c) {
        ab[c] = c < w ? bias[d0 + c] + (cv ? cv[d0 + c] : 0.f) : 0.f;
        ab[w16 + c] = c < w ? bias[s.D + d0 + c] + (cv ? cv[s.D + d0 + c] : 0.f) : 0.f;
      }
    }
    gemv_panels(buf + pl.conv_off[t][l], KR, wc, xcat.data(), KR, a.data(), wc, s.B);
    const int64_t RS = s.R + s.S;
    const float* rb = g.rs_b + l * RS;
    for (int64_t b = 0; b < s.B; ++b) {
      g.prim.gate(a.data() + b * wc, a.data() + b * wc + w16, w, z.data() + b * w);
      float* ob = out.data() + b * pl.wrs;
      for (int64_t c = 0; c < pl.wrs; ++c) ob[c] = (t == 0 && c < RS) ? rb[c] : 0.f;
    }
    if (w > 0) gemv_panels(buf + pl.rs_off[t][l], w, pl.wrs, z.data(), w, out.data(), pl.wrs, s.B);
    for (int64_t b = 0; b < s.B; ++b) {
      const float* ob = out.data() + b * pl.wrs;
      std::memcpy(hp.data() + (t * s.B + b) * s.R, ob, sizeof(float) * s.R);
      float* sk = skip.data() + b * s.S;
      for (int64_t c = 0; c < s.S; ++c) sk[c] += ob[s.R + c];
    }
  }

  // After every part's partial of layer l is in hp: write this part's channels of the layer's
  // input into its queue, then h += partial_0 + partial_1 (same order in every part).
  void layer_finish(int64_t l, int64_t p, const std::vector<float>& hp, bool write_queue) {
    const int64_t N = (s.k - 1) * g.dil[l];
    for (int64_t b = 0; b < s.B; ++b) {
      float* hb = h.data() + b * s.R;
      if (write_queue && N > 0) {
        const auto [r0, r1] = pl.rch[t];
        float* q = g.queues + b * s.Ntot * s.R + (s.offsets[l] + p % N) * s.R;
        std::memcpy(q + r0, hb + r0, sizeof(float) * (r1 - r0));
      }
      for (int64_t u = 0; u < pl.parts; ++u) {
        const float* pu = hp.data() + (u * s.B + b) * s.R;
        for (int64_t c = 0; c < s.R; ++c) hb[c] += pu[c];
      }
    }
  }

  void publish_skip() {
    std::memcpy(sh.skp.data() + t * s.B * s.S, skip.data(), sizeof(float) * s.B * s.S);
  }

  void head1() {
    for (int64_t i = 0; i < s.B * s.S; ++i) {
      float v = sh.skp[i];
      for (int64_t u = 1; u < pl.parts; ++u) v += sh.skp[u * s.B * s.S + i];
      sfull[i] = v > 0.f ? v : 0.f;
    }
    const auto [c0, c1] = pl.sch[t];
    const int64_t wh = pl.wh1[t];
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = 0; c < wh; ++c) y1[b * wh + c] = c0 + c < c1 ? g.o1_b[c0 + c] : 0.f;
    gemv_panels(buf + pl.head1_off[t], s.S, wh, sfull.data(), s.S, y1.data(), wh, s.B);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = c0; c < c1; ++c) {
        const float v = y1[b * wh + c - c0];
        sh.y1[b * s.S + c] = v > 0.f ? v : 0.f;
      }
  }

  void head2() {
    const auto [c0, c1] = pl.ach[t];
    const int64_t wh = pl.wh2[t];
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = 0; c < wh; ++c) lg[b * wh + c] = c0 + c < c1 ? g.o2_b[c0 + c] : 0.f;
    gemv_panels(buf + pl.head2_off[t], s.S, wh, sh.y1.data(), s.S, lg.data(), wh, s.B);
    for (int64_t b = 0; b < s.B; ++b)
      std::memcpy(g.logits + b * s.A + c0, lg.data() + b * wh, sizeof(float) * (c1 - c0));
  }

  // Every part draws the same value from the full logits; only part 0 writes it out.
  void sample(int64_t p) {
    if (p < g.num_prime) return;
    for (int64_t b = 0; b < s.B; ++b) {
      last[b] = draw_row(g, b, p);
      if (t == 0) store_draw(g, b, p, last[b]);
    }
  }
};

// The packed weights of part t, in a per-thread buffer kept between calls: a fresh 1.7 MB
// allocation per call would page-fault its way in every time. 64-byte aligned, so every AVX-512
// load of a panel is one cache line.
float* part_buffer(int64_t t, int64_t n) {
  thread_local std::vector<float> bufs[2];
  auto& v = bufs[t];
  if (static_cast<int64_t>(v.size()) < n + 16) v.resize(n + 16);
  const auto addr = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// One part per thread for the whole call (one fork/join per call, not per stage).
void run_part_threaded(StepArgs<float>& g, const SmallPlan& pl, SmallShared& sh, int64_t t, int64_t p0,
                       int64_t num_steps) {
  const StepShape& s = *g.s;
  float* buf = part_buffer(t, pl.size[t]);  // packed by the thread that streams it: it starts in its L2
  pack_part(g, pl, t, buf);
  SmallPart pt(g, pl, sh, t, buf);
  for (int64_t i = 0; i < num_steps; ++i) {
    const int64_t p = p0 + i;
    pt.input(p, p0);
    for (int64_t l = 0; l < s.L; ++l) {
      auto& hp = sh.hp[l & 1];  // double-buffered: a part may write layer l+1's partial while
                                // the other still reads layer l's
      pt.layer_compute(l, p, hp);
      sh.bar.wait(2);
      pt.layer_finish(l, p, hp, true);
    }
    pt.publish_skip();
    sh.bar.wait(2);
    pt.head1();
    sh.bar.wait(2);
    pt.head2();
    sh.bar.wait(2);
    pt.sample(p);
  }
}

// One thread runs every part's stages in turn: the same arithmetic as the two-thread mode.
void run_parts_sequential(StepArgs<float>& g, const SmallPlan& pl, SmallShared& sh, int64_t p0,
                          int64_t num_steps) {
  const StepShape& s = *g.s;
  std::vector<std::unique_ptr<SmallPart>> parts;
  for (int64_t t = 0; t < pl.parts; ++t) {
    float* buf = part_buffer(t, pl.size[t]);
    pack_part(g, pl, t, buf);
    parts.push_back(std::make_unique<SmallPart>(g, pl, sh, t, buf));
  }
  for (int64_t i = 0; i < num_steps; ++i) {
    const int64_t p = p0 + i;
    for (auto& pt : parts) pt->input(p, p0);
    for (int64_t l = 0; l < s.L; ++l) {
      auto& hp = sh.hp[l & 1];
      for (auto& pt : parts) pt->layer_compute(l, p, hp);
      for (auto& pt : parts) pt->layer_finish(l, p, hp, true);
    }
    for (auto& pt : parts) pt->publish_skip();
    for (auto& pt : parts) pt->head1();
    for (auto& pt : parts) pt->head2();
    for (auto& pt : parts) pt->sample(p);
  }
}

void run_small(StepArgs<float>& g, int64_t p0, int64_t num_steps, bool two_threads) {
  const StepShape& s = *g.s;
  const SmallPlan pl = plan_small(s);
  SmallShared sh;
  sh.hp[0].assign(pl.parts * s.B * s.R, 0.f);
  sh.hp[1].assign(pl.parts * s.B * s.R, 0.f);
  sh.skp.assign(pl.parts * s.B * s.S, 0.f);
  sh.y1.assign(s.B * s.S, 0.f);
  if (!two_threads || pl.parts == 1) {
    run_parts_sequential(g, pl, sh, p0, num_steps);
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t lo, int64_t hi) {
    if (hi - lo == 2)  // the runtime gave one thread both parts
      run_parts_sequential(g, pl, sh, p0, num_steps);
    else
      run_part_threaded(g, pl, sh, lo, p0, num_steps);
  });
}

template <typename T>
void run_steps(StepArgs<T>& g, int64_t p0, int64_t num_steps) {
  const StepShape& s = *g.s;
  const int64_t threads = at::get_num_threads();
  // Only with OpenMP: its team threads run concurrently, which the spin barriers rely on
  // (a task pool could run both parts one after the other on one thread).
  const bool two_threads = AT_PARALLEL_OPENMP && threads >= 2 && !at::in_parallel_region();
  if constexpr (std::is_same_v<T, float>) {
    if (s.B <= kSmallBatch && cpu_has_avx512()) {
      run_small(g, p0, num_steps, two_threads);
      return;
    }
  }
  if (two_threads && s.B <= 2 && s.D >= 32 && s.R + s.S >= 64) {
    run_split<T>(g, p0, num_steps);
    return;
  }
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
                      const at::Tensor& noise, const c10::optional<at::Tensor>& cond, const at::Tensor& in_w,
                      const at::Tensor& in_b, const at::Tensor& conv_w, const at::Tensor& conv_b,
                      const at::Tensor& res_skip_w, const at::Tensor& res_skip_b, const at::Tensor& out1_w,
                      const at::Tensor& out1_b, const at::Tensor& out2_w, const at::Tensor& out2_b,
                      at::IntArrayRef dilations, int64_t num_prime, double temperature, int64_t start,
                      int64_t num_steps, int64_t num_mixtures, int64_t num_bits) {
  const char* op = "wavenet_step";
  const auto s = check_wavenet_step(op, samples, queues, position, logits, noise, cond, in_w, in_b, conv_w, conv_b,
                                    res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations, start,
                                    num_mixtures, num_bits);
  TORCH_CHECK(conv_w.scalar_type() == at::kFloat || conv_w.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64 weights, got ", conv_w.scalar_type());
  TORCH_CHECK(temperature >= 0, op, ": temperature must be non-negative, got ", temperature);
  const int64_t p = position.data_ptr<int64_t>()[0];
  TORCH_CHECK(num_steps >= 1, op, ": num_steps must be at least 1, got ", num_steps);
  TORCH_CHECK(p >= 0 && p + num_steps <= s.T, op, ": steps ", p, " to ", p + num_steps - 1, " do not fit the ", s.T,
              " steps that samples and noise have room for");
  if (s.B == 0) {
    position.data_ptr<int64_t>()[0] = p + num_steps;
    return;
  }
  const bool mixture = num_mixtures > 0;
  if (!mixture) check_codes(samples, s, p, num_steps, num_prime);
  // the mixture head reads its uniforms in the acc dtype (checked), the softmax head in float or double
  const auto nz = (mixture || noise.scalar_type() == at::kDouble ? noise : noise.to(at::kFloat)).contiguous();
  const auto cc = (cond.has_value() && cond->defined()) ? cond->contiguous() : at::Tensor();
  const auto iw = in_w.contiguous(), ib = in_b.contiguous(), cw = conv_w.contiguous(), cb = conv_b.contiguous(),
             rw = res_skip_w.contiguous(), rb = res_skip_b.contiguous(), o1w = out1_w.contiguous(),
             o1b = out1_b.contiguous(), o2w = out2_w.contiguous(), o2b = out2_b.contiguous();
  std::vector<int64_t> dil(dilations.begin(), dilations.end());
  AT_DISPATCH_FLOATING_TYPES(conv_w.scalar_type(), "wavenet_step_cpu", [&] {
    StepArgs<scalar_t> g;
    g.s = &s;
    g.p = p;
    g.num_prime = num_prime;
    g.start = start;
    g.temperature = temperature;
    g.K = num_mixtures;
    g.num_bits = num_bits;
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
    g.dil = dil.data();
    g.prim = pick_prims<scalar_t>();
    run_steps<scalar_t>(g, p, num_steps);
  });
  position.data_ptr<int64_t>()[0] = p + num_steps;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("causal_conv1d_update", &causal_conv1d_update_cpu);
  m.impl("wavenet_step", &wavenet_step_cpu);
}

}  // namespace fastar
