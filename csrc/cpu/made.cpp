// MADE's degree-bucket sampler on the CPU (contract: fastar/ops/made.py; layouts: csrc/made.h).
//
// Each thread takes a block of examples and runs every step for them, steps outer and examples inner,
// so the weight rows a step pushes (the new values' rows into the suffix of the layer above, or of the
// outputs) are read once per step per block and stay in cache across the block's examples. A zero value
// (a 0 input, a ReLU that is off) pushes nothing. No barrier between steps: the examples are independent.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/acc_type.h"
#include "common/categorical.h"
#include "made.h"

namespace fastar {
namespace {

constexpr int64_t kRows = 64;

template <typename T>
inline T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::fabs(x)));
}

// The pushes (a row of weights times a value into a suffix of pre-activations, for each example of a
// block), cloned for AVX-512 / AVX2 / the baseline at load time (the build has no -march).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAR_MADE_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTAR_MADE_CLONES
#endif

// y_r[:n] += a_r * x[:n] for each row r with a_r != 0 (rows of y at stride ys).
template <typename T>
__attribute__((always_inline)) inline void axpy_rows_impl(T* y, int64_t ys, const T* a, int64_t as, int64_t rows, const T* x, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const T av = a[r * as];
    if (av == T(0)) continue;
    T* yr = y + r * ys;
    for (int64_t i = 0; i < n; ++i) yr[i] += av * x[i];
  }
}

FASTAR_MADE_CLONES void axpy_rows(float* y, int64_t ys, const float* a, int64_t as, int64_t rows, const float* x,
                                  int64_t n) {
  axpy_rows_impl(y, ys, a, as, rows, x, n);
}
FASTAR_MADE_CLONES void axpy_rows(double* y, int64_t ys, const double* a, int64_t as, int64_t rows, const double* x,
                                  int64_t n) {
  axpy_rows_impl(y, ys, a, as, rows, x, n);
}

template <typename T>
void run_block(const MadeShape& s, int64_t n0, int64_t n1, int64_t t0, T temp, int64_t* codes, T* hidden, T* acc,
               T* logw, T* params, const T* noise, const int64_t* given, const bool* gmask, const int64_t* counts,
               const std::vector<const T*>& W, const T* wo, const T* dw) {
  const int64_t K = s.K, N = s.N, D = s.D, P = s.P, L = s.L, DP = D * P, Hall = s.Hall;
  std::vector<T> e(P + 2), lk(K * P);
  auto cnt = [&](int64_t k, int64_t l, int64_t m) { return counts[(k * L + l) * (D + 1) + m]; };
  for (int64_t t = t0; t < t0 + s.steps; ++t) {
    const int64_t c0 = (t + 1) * P;
    for (int64_t n = n0; n < n1; ++n) {
      // 1. the step's parameters (the components' mixture conditional when K > 1)
      T* pr = params + n * P;
      if (K == 1) {
        for (int64_t v = 0; v < P; ++v) pr[v] = acc[n * DP + t * P + v];
      } else {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t v = 0; v < P; ++v) lk[k * P + v] = acc[(k * N + n) * DP + t * P + v];
        if (P == 1) {
          T m1 = -INFINITY, m0 = -INFINITY;
          for (int64_t k = 0; k < K; ++k) {
            const T w = logw[k * N + n];
            m1 = std::max(m1, w + log_sigmoid(lk[k]));
            m0 = std::max(m0, w + log_sigmoid(-lk[k]));
          }
          T s1 = 0, s0 = 0;
          for (int64_t k = 0; k < K; ++k) {
            const T w = logw[k * N + n];
            s1 += std::exp(w + log_sigmoid(lk[k]) - m1);
            s0 += std::exp(w + log_sigmoid(-lk[k]) - m0);
          }
          pr[0] = (m1 + std::log(s1)) - (m0 + std::log(s0));
        } else {
          for (int64_t k = 0; k < K; ++k) {  // log_softmax of each component in place
            T* l = lk.data() + k * P;
            T m = l[0];
            for (int64_t v = 1; v < P; ++v) m = std::max(m, l[v]);
            T z = 0;
            for (int64_t v = 0; v < P; ++v) z += std::exp(l[v] - m);
            const T lz = m + std::log(z);
            for (int64_t v = 0; v < P; ++v) l[v] = l[v] - lz + logw[k * N + n];
          }
          for (int64_t v = 0; v < P; ++v) {
            T m = -INFINITY;
            for (int64_t k = 0; k < K; ++k) m = std::max(m, lk[k * P + v]);
            T z = 0;
            for (int64_t k = 0; k < K; ++k) z += std::exp(lk[k * P + v] - m);
            pr[v] = m + std::log(z);
          }
        }
      }
      // 2. the draw
      int64_t x;
      if (gmask && gmask[n * D + t]) {
        x = given[n * D + t];
      } else {
        const T u = noise[t * N + n];
        if (P == 1) {
          const T l = pr[0];
          x = cat::categorical_draw<T>([&](int64_t j) { return j == 0 ? T(0) : l; }, 2, temp, u, e.data());
        } else {
          x = cat::categorical_draw<T>([&](int64_t j) { return pr[j]; }, P, temp, u, e.data());
        }
      }
      codes[n * D + t] = x;
      if (K > 1) {
        for (int64_t k = 0; k < K; ++k) {
          const T* a = acc + (k * N + n) * DP + t * P;
          T lp;
          if (P == 1) {
            lp = log_sigmoid(x == 1 ? a[0] : -a[0]);
          } else {
            T m = a[0];
            for (int64_t v = 1; v < P; ++v) m = std::max(m, a[v]);
            T z = 0;
            for (int64_t v = 0; v < P; ++v) z += std::exp(a[v] - m);
            lp = a[x] - m - std::log(z);
          }
          logw[k * N + n] += lp;
        }
      }
      // 3. the input value, pushed into the later outputs (direct) and layer 1's units of degree >= t + 1
      const T xv = static_cast<T>(x) / static_cast<T>(s.levels - 1);
      for (int64_t k = 0; k < K; ++k) {
        T* h = hidden + (k * N + n) * Hall;
        h[t] = xv;
        if (xv == T(0)) continue;
        if (dw) axpy_rows(acc + (k * N + n) * DP + c0, 0, &xv, 0, 1, dw + (k * D + t) * DP + c0, DP - c0);
        const int64_t a1 = cnt(k, 0, t);
        axpy_rows(h + s.off[1] + a1, 0, &xv, 0, 1, W[0] + (k * D + t) * s.H[0] + a1, s.H[0] - a1);
      }
    }
    // 4. layer by layer, the units of degree t + 1 are complete: ReLU, then pushed into the layer above
    //    (its units of degree >= t + 1) or, from the last layer, into the outputs of the later steps.
    const int64_t rows = n1 - n0;
    for (int64_t k = 0; k < K; ++k) {
      T* h0 = hidden + (k * N + n0) * Hall;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t a = cnt(k, l, t), b = cnt(k, l, t + 1);
        if (a == b) continue;
        const int64_t off = s.off[l + 1];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t u = a; u < b; ++u) {
            T& v = h0[r * Hall + off + u];
            v = v > T(0) ? v : T(0);
          }
        for (int64_t u = a; u < b; ++u) {
          if (l < L - 1) {
            const int64_t a2 = cnt(k, l + 1, t), Hn = s.H[l + 1];
            axpy_rows(h0 + s.off[l + 2] + a2, Hall, h0 + off + u, Hall, rows, W[l + 1] + (k * s.H[l] + u) * Hn + a2,
                      Hn - a2);
          } else {
            axpy_rows(acc + (k * N + n0) * DP + c0, DP, h0 + off + u, Hall, rows, wo + (k * s.H[l] + u) * DP + c0,
                      DP - c0);
          }
        }
      }
    }
  }
}

void made_sample_steps_cpu(at::Tensor codes, at::Tensor hidden, at::Tensor acc, at::Tensor logw, at::Tensor position,
                           at::Tensor params, const at::Tensor& noise, const c10::optional<at::Tensor>& given,
                           const c10::optional<at::Tensor>& given_mask, const at::Tensor& counts, at::TensorList pack,
                           at::IntArrayRef config, double temperature) {
  const MadeShape s = parse_made(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config);
  TORCH_CHECK(codes.device().is_cpu(), "made_sample_steps: the CPU kernel got tensors on ", codes.device());
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "made_sample_steps: temperature must be finite and >= 0");
  const int64_t t0 = position.data_ptr<int64_t>()[0];
  TORCH_CHECK(t0 >= 0 && t0 + s.steps <= s.D && t0 + s.steps <= s.T, "made_sample_steps: steps [", t0, ", ",
              t0 + s.steps, ") run past the ", s.D, " steps (or the noise's ", s.T, ")");
  AT_DISPATCH_FLOATING_TYPES(pack[0].scalar_type(), "made_sample_steps_cpu", [&] {
    using T = scalar_t;
    std::vector<const T*> W;
    for (int64_t l = 0; l < s.L; ++l) W.push_back(pack[l].data_ptr<T>());
    const T* wo = pack[s.L].data_ptr<T>();
    const T* dw = s.direct ? pack[s.L + 1].data_ptr<T>() : nullptr;
    const int64_t* gv = s.given ? given->data_ptr<int64_t>() : nullptr;
    const bool* gm = s.given ? given_mask->data_ptr<bool>() : nullptr;
    int64_t* cd = codes.data_ptr<int64_t>();
    T* hd = hidden.data_ptr<T>();
    T* ac = acc.data_ptr<T>();
    T* lw = logw.data_ptr<T>();
    T* pr = params.data_ptr<T>();
    const T* nz = noise.data_ptr<T>();
    const int64_t* cn = counts.data_ptr<int64_t>();
    // Examples are independent: one block per thread, no barrier between steps. One step at a time
    // (recording) is too little work to share.
    const int64_t grain = s.steps <= 1 ? s.N : 8;
    // Within a thread, sub-blocks of kRows examples run all their steps in turn: their state (hidden, acc)
    // stays in L2 while every step's weight rows are reused across the sub-block's examples.
    at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t b0 = n0; b0 < n1; b0 += kRows)
        run_block<T>(s, b0, std::min(n1, b0 + kRows), t0, static_cast<T>(temperature), cd, hd, ac, lw, pr, nz, gv,
                     gm, cn, W, wo, dw);
    });
  });
  position.add_(s.steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("made_sample_steps", &made_sample_steps_cpu); }

}  // namespace fastar
