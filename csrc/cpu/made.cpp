// MADE's degree-bucket sampler on the CPU (contract: fastar/ops/made.py; layouts: csrc/made.h).
//
// Each thread takes a block of examples and runs every step for them, steps outer and examples inner,
// so a bucket's weight rows (a unit's prefix of the layer below, its row of output weights) are read
// once per step per block and stay in cache across the block's examples. No barrier between steps:
// the examples are independent.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/acc_type.h"
#include "common/categorical.h"
#include "made.h"

namespace fastar {
namespace {

template <typename T>
inline T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::fabs(x)));
}

// The inner products and updates, cloned for AVX-512 / AVX2 / the baseline at load time (the build has no
// -march). 16 lanes per accumulator, four rows at once: the weight row is loaded once for four examples
// and the four sums are independent chains.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAR_MADE_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTAR_MADE_CLONES
#endif

template <typename T>
__attribute__((always_inline)) inline void dot_rows_impl(const T* w, const T* h, int64_t hs, int64_t rows, int64_t n, T* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t nr = rows - r0 < 4 ? rows - r0 : 4;
    const T* h0 = h + r0 * hs;
    const T* h1 = nr > 1 ? h0 + hs : h0;
    const T* h2 = nr > 2 ? h0 + 2 * hs : h0;
    const T* h3 = nr > 3 ? h0 + 3 * hs : h0;
    T s0[16] = {}, s1[16] = {}, s2[16] = {}, s3[16] = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      for (int j = 0; j < 16; ++j) {
        const T wv = w[i + j];
        s0[j] += wv * h0[i + j];
        s1[j] += wv * h1[i + j];
        s2[j] += wv * h2[i + j];
        s3[j] += wv * h3[i + j];
      }
    }
    T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (; i < n; ++i) {
      t0 += w[i] * h0[i];
      t1 += w[i] * h1[i];
      t2 += w[i] * h2[i];
      t3 += w[i] * h3[i];
    }
    for (int j = 0; j < 16; ++j) {
      t0 += s0[j];
      t1 += s1[j];
      t2 += s2[j];
      t3 += s3[j];
    }
    out[r0] = t0;
    if (nr > 1) out[r0 + 1] = t1;
    if (nr > 2) out[r0 + 2] = t2;
    if (nr > 3) out[r0 + 3] = t3;
  }
}

FASTAR_MADE_CLONES void dot_rows(const float* w, const float* h, int64_t hs, int64_t rows, int64_t n, float* out) {
  dot_rows_impl(w, h, hs, rows, n, out);
}
FASTAR_MADE_CLONES void dot_rows(const double* w, const double* h, int64_t hs, int64_t rows, int64_t n,
                                 double* out) {
  dot_rows_impl(w, h, hs, rows, n, out);
}

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
               const std::vector<const T*>& W, const std::vector<const T*>& B, const T* wo, const T* dw) {
  const int64_t K = s.K, N = s.N, D = s.D, P = s.P, L = s.L, DP = D * P, Hall = s.Hall;
  std::vector<T> e(P + 2), lk(K * P), dots(n1 - n0);
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
      // 3. the input value and the direct connections
      const T xv = static_cast<T>(x) / static_cast<T>(s.levels - 1);
      for (int64_t k = 0; k < K; ++k) {
        hidden[(k * N + n) * Hall + t] = xv;
        if (dw) axpy_rows(acc + (k * N + n) * DP + c0, 0, &xv, 0, 1, dw + (k * D + t) * DP + c0, DP - c0);
      }
    }
    // 4. the units of degree t + 1, layer by layer, for the block's examples
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t a = cnt(k, l, t), b = cnt(k, l, t + 1);
        if (a == b) continue;
        const int64_t seen = l == 0 ? t + 1 : cnt(k, l - 1, t + 1);
        const int64_t Hin = l == 0 ? D : s.H[l - 1];
        const int64_t in_off = s.off[l], out_off = s.off[l + 1];
        const int64_t rows = n1 - n0;
        for (int64_t u = a; u < b; ++u) {
          const T* w = W[l] + (k * s.H[l] + u) * Hin;
          const T bias = B[l][k * s.H[l] + u];
          T* h0 = hidden + (k * N + n0) * Hall;
          dot_rows(w, h0 + in_off, Hall, rows, seen, dots.data());
          for (int64_t r = 0; r < rows; ++r) {
            const T v = bias + dots[r];
            h0[r * Hall + out_off + u] = v > T(0) ? v : T(0);
          }
          if (l == L - 1)
            axpy_rows(acc + (k * N + n0) * DP + c0, DP, h0 + out_off + u, Hall, rows,
                      wo + (k * s.H[l] + u) * DP + c0, DP - c0);
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
    std::vector<const T*> W, B;
    for (int64_t l = 0; l < s.L; ++l) {
      W.push_back(pack[2 * l].data_ptr<T>());
      B.push_back(pack[2 * l + 1].data_ptr<T>());
    }
    const T* wo = pack[2 * s.L].data_ptr<T>();
    const T* dw = s.direct ? pack[2 * s.L + 1].data_ptr<T>() : nullptr;
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
    at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) {
      run_block<T>(s, n0, n1, t0, static_cast<T>(temperature), cd, hd, ac, lw, pr, nz, gv, gm, cn, W, B, wo, dw);
    });
  });
  position.add_(s.steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("made_sample_steps", &made_sample_steps_cpu); }

}  // namespace fastar
