// Internal to the CPU wavenet_step: what its three execution strategies share (the step's
// arguments, the per-stage Stepper, the draw of a row) and their entry points. One strategy per
// file: wavenet_blocked.cpp (rows in chunks, one thread per chunk), wavenet_split.cpp (batch
// 1-2, two threads split the output columns), wavenet_two_part.cpp (float32 batch <= 4 on
// AVX-512: two parts of packed weights, one per core's L2); wavenet.cpp checks, dispatches and
// registers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "common/categorical.h"
#include "common/gemv_panels.h"
#include "common/spin_barrier.h"
#include "mixture.h"
#include "wavenet.h"

namespace fastar {
namespace wavenet_cpu {

// A profile of the two-part small-batch path (fastar::_wavenet_profile, used by `fastar bench
// floors`): while on, each part adds the seconds of each stage of each step to its row. Off by
// default; when off a stage mark is one predictable branch.
enum ProfileStage {
  kProfInput, kProfLayer, kProfLayerWait, kProfLayerFinish, kProfSkip, kProfHeadWait, kProfHead1,
  kProfHead1Wait, kProfHead2, kProfHead2Wait, kProfDraw, kProfPack, kProfSteps, kProfStages
};
inline std::atomic<bool>& profile_on() {
  static std::atomic<bool> on{false};
  return on;
}
inline double (&profile_acc())[2][kProfStages] {
  static double acc[2][kProfStages];
  return acc;
}
struct StageClock {
  bool on;
  double* row;
  std::chrono::steady_clock::time_point t;
  explicit StageClock(int64_t part)
      : on(profile_on().load(std::memory_order_relaxed)), row(profile_acc()[part]) {}
  void start() {
    if (on) t = std::chrono::steady_clock::now();
  }
  void mark(int stage) {
    if (!on) return;
    const auto n = std::chrono::steady_clock::now();
    row[stage] += std::chrono::duration<double>(n - t).count();
    t = n;
  }
  void step() {
    if (on) row[kProfSteps] += 1;
  }
};

#ifdef FASTAR_X86
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

inline bool cpu_has_avx512() {
#ifdef FASTAR_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && cpu_has_avx2_fma();
  return ok;
#else
  return false;
#endif
}

// Float32 batches up to this size take the two-part path on AVX-512 machines.
constexpr int64_t kSmallBatch = 4;

template <typename T>
struct Prims {
  void (*gemv)(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int64_t, T*, int64_t, int64_t);
  void (*gate)(const T*, const T*, int64_t, T*);
};


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
inline int64_t sample_row(const T* lg, int64_t A, double temperature, double u) {
  thread_local std::vector<T> e;  // the row's exps, so each is taken once
  e.resize(A);
  return cat::categorical_draw<T>([lg](int64_t i) { return lg[i]; }, A, static_cast<T>(temperature),
                                  static_cast<T>(u), e.data());
}

// The draw of row b at step p from its logits: a code (softmax head) or an audio value (mixture
// head), returned as a double so that both heads share one signature. Writes nothing.
template <typename T>
inline double draw_row(const StepArgs<T>& g, int64_t b, int64_t p) {
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
inline void store_draw(const StepArgs<T>& g, int64_t b, int64_t p, double v) {
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

template <typename T>
void run_blocked(StepArgs<T>& g, int64_t p0, int64_t num_steps);
template <typename T>
void run_split(StepArgs<T>& g, int64_t p0, int64_t num_steps);
// pack: pack the weights into panels first (worth it for a call of many steps), else read them in
// place; the bits are the same either way.
void run_small(StepArgs<float>& g, int64_t p0, int64_t num_steps, bool two_threads, bool pack);

}  // namespace wavenet_cpu
}  // namespace fastar
