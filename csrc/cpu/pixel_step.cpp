// CPU kernel of gated_pixelcnn_step: a whole Gated PixelCNN pixel step (every block's
// horizontal stack at the current position, the head, the categorical draw and the
// writes of the drawn value) in one call, for float32 and float64. Layouts: csrc/pixel_step.h.
//
// Design: batch rows are independent within a step, so the batch is split over threads
// (at::parallel_for) and each thread walks its rows in tiles of kTile. Per block a tile
// does two small GEMMs (taps x inputs -> 2C, then C -> [skip | out]); the weights are
// stored input-major, so the innermost loop runs over contiguous outputs (vectorised)
// and one weight row, once in L1, serves every row of the tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/categorical.h"
#include "pixel_step.h"

namespace fastar {
namespace {

constexpr int64_t kTile = 8;

template <typename T>
struct Ptrs {
  T* image;
  T* row_cache;
  int64_t* codes;
  T* logits;
  const T *noise, *links, *class_bias, *cond_map, *map_w;
  const int64_t* prefix;
  const bool* given;
  const T *h_w, *h_b, *so_w, *so_b, *head1_w, *head1_b, *head2_w, *head2_b;
};

// out[r, o] += sum_k x[r * xs + k] * w[k * ldw + o] for R rows, K inputs, O outputs.
template <typename T>
inline void gemm_acc_body(const T* x, int64_t xs, int64_t R, const T* w, int64_t ldw, int64_t K, int64_t O, T* out,
                          int64_t os) {
  for (int64_t k = 0; k < K; ++k) {
    const T* wr = w + k * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const T xv = x[r * xs + k];
      if (xv == T(0)) continue;  // after a ReLU half the inputs are zero; adding 0 * w changes nothing
      T* o = out + r * os;
      for (int64_t q = 0; q < O; ++q) o[q] += xv * wr[q];
    }
  }
}

// The build targets baseline x86-64 (SSE2); the step's GEMMs are its whole cost, so they are
// cloned for AVX2+FMA and AVX-512 and the loader picks the best the CPU has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTAR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTAR_CLONES
#endif
FASTAR_CLONES void gemm_acc(const float* x, int64_t xs, int64_t R, const float* w, int64_t ldw, int64_t K, int64_t O,
                            float* out, int64_t os) {
  gemm_acc_body(x, xs, R, w, ldw, K, O, out, os);
}
FASTAR_CLONES void gemm_acc(const double* x, int64_t xs, int64_t R, const double* w, int64_t ldw, int64_t K,
                            int64_t O, double* out, int64_t os) {
  gemm_acc_body(x, xs, R, w, ldw, K, O, out, os);
}

// The draw: the one categorical pick (common/categorical.h), temperature 0 = first argmax.
// `e` is scratch of K entries.
template <typename T>
int64_t pick(const T* lg, int64_t K, double temperature, T u, T* e) {
  return cat::categorical_draw<T>([lg](int64_t k) { return lg[k]; }, K, static_cast<T>(temperature), u, e);
}

template <typename T>
void step_rows(const GatedStepShape& s, const Ptrs<T>& P, int64_t t, double temperature, int64_t b0, int64_t b1) {
  const int64_t C = s.C, C2 = s.C2, K = s.K, N = s.N, W = s.W, HW = s.H * s.W;
  const int64_t c = t % s.Ci, p = t / s.Ci, i = p / W, j = p % W, flat = c * HW + p;
  const int64_t kmax = std::max(s.T0 * s.Ci, s.T * C);
  std::vector<T> xin(kTile * kmax), hp(kTile * C2), g(kTile * C), so(kTile * C2), h(kTile * C), skip(kTile * C),
      y(kTile * C), lg(kTile * K), e(std::max<int64_t>(K, 2));
  const T scale = static_cast<T>(2.0 / static_cast<double>(s.levels - 1));
  for (int64_t t0 = b0; t0 < b1; t0 += kTile) {
    const int64_t R = std::min(kTile, b1 - t0);
    std::fill(skip.begin(), skip.end(), T(0));
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t taps = l == 0 ? s.T0 : s.T, cin = l == 0 ? s.Ci : C, Kl = taps * cin;
      // The block's input at the live taps (zero left of the image); the current
      // position's input of a later block is the previous block's output, also stored
      // into the row cache for the next positions.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = t0 + r;
        T* x = xin.data() + r * Kl;
        for (int64_t a = 0; a < taps; ++a) {
          const int64_t col = j + a - (taps - 1);
          T* xa = x + a * cin;
          if (col < 0) {
            std::fill(xa, xa + cin, T(0));
          } else if (l == 0) {
            for (int64_t q = 0; q < cin; ++q) xa[q] = P.image[((n * s.Ci + q) * s.H + i) * W + col];
          } else if (col == j) {
            std::copy(h.data() + r * C, h.data() + (r + 1) * C, xa);
          } else {
            const T* src = P.row_cache + (((l - 1) * N + n) * W + col) * C;
            std::copy(src, src + cin, xa);
          }
        }
        if (l > 0) std::copy(h.data() + r * C, h.data() + (r + 1) * C, P.row_cache + (((l - 1) * N + n) * W + j) * C);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = t0 + r;
        T* o = hp.data() + r * C2;
        const T* hb = P.h_b + l * C2;
        const T* lk = P.links + ((l * W + j) * N + n) * C2;
        for (int64_t q = 0; q < C2; ++q) o[q] = hb[q] + lk[q];
        if (P.class_bias) {
          const T* cb = P.class_bias + (l * N + n) * C2;
          for (int64_t q = 0; q < C2; ++q) o[q] += cb[q];
        }
      }
      gemm_acc(xin.data(), Kl, R, P.h_w + s.h_off[l], C2, Kl, C2, hp.data(), C2);
      if (P.cond_map)
        gemm_acc(P.cond_map + (t0 * HW + p) * s.Cc, HW * s.Cc, R, P.map_w + l * s.Cc * C2, C2, s.Cc, C2, hp.data(),
                 C2);
      for (int64_t r = 0; r < R; ++r) {
        const T* a = hp.data() + r * C2;
        T* gr = g.data() + r * C;
        for (int64_t q = 0; q < C; ++q) gr[q] = std::tanh(a[q]) * (T(1) / (T(1) + std::exp(-a[C + q])));
        std::copy(P.so_b + l * C2, P.so_b + (l + 1) * C2, so.data() + r * C2);
      }
      gemm_acc(g.data(), C, R, P.so_w + l * C * C2, C2, C, C2, so.data(), C2);
      const bool res = s.residual[l] != 0;
      for (int64_t r = 0; r < R; ++r) {
        const T* a = so.data() + r * C2;
        T* sk = skip.data() + r * C;
        T* hr = h.data() + r * C;
        for (int64_t q = 0; q < C; ++q) {
          sk[q] += a[q];
          hr[q] = res ? a[C + q] + hr[q] : a[C + q];
        }
      }
    }
    // Head: ReLU, 1x1, ReLU, 1x1 -- only the current sub-pixel's K outputs of the last one.
    for (int64_t r = 0; r < R; ++r) {
      T* sk = skip.data() + r * C;
      for (int64_t q = 0; q < C; ++q) sk[q] = std::max(sk[q], T(0));
      std::copy(P.head1_b, P.head1_b + C, y.data() + r * C);
    }
    gemm_acc(skip.data(), C, R, P.head1_w, C, C, C, y.data(), C);
    for (int64_t r = 0; r < R; ++r) {
      T* yr = y.data() + r * C;
      for (int64_t q = 0; q < C; ++q) yr[q] = std::max(yr[q], T(0));
      std::copy(P.head2_b + c * K, P.head2_b + (c + 1) * K, lg.data() + r * K);
    }
    gemm_acc(y.data(), C, R, P.head2_w + c * K, s.Ci * K, C, K, lg.data(), K);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = t0 + r;
      const T* lr = lg.data() + r * K;
      std::copy(lr, lr + K, P.logits + n * K);
      const T u = P.noise[t * N + n];
      int64_t val;
      if (s.levels == 2) {
        const T two[2] = {T(0), lr[0]};  // the engine's Bernoulli: categories (0, logit)
        val = pick(two, 2, temperature, u, e.data());
      } else {
        val = pick(lr, K, temperature, u, e.data());
      }
      if (P.given && P.given[n * s.Ttot + flat]) val = P.prefix[n * s.Ttot + flat];
      P.codes[n * s.Ttot + flat] = val;
      P.image[((n * s.Ci + c) * s.H + i) * W + j] = static_cast<T>(val) * scale - T(1);
    }
  }
}

void gated_pixelcnn_step_cpu(at::Tensor& image, at::Tensor& row_cache, at::Tensor& codes, at::Tensor& step,
                             at::Tensor& logits, const at::Tensor& noise, const at::Tensor& links,
                             const c10::optional<at::Tensor>& prefix, const c10::optional<at::Tensor>& given,
                             const c10::List<c10::optional<at::Tensor>>& pack, at::IntArrayRef config,
                             double temperature) {
  const char* op = "gated_pixelcnn_step";
  const auto a = parse_gated_pixelcnn_step(op, image, row_cache, codes, step, logits, noise, links, prefix, given,
                                           pack, config, temperature);
  const GatedStepShape& s = a.s;
  const at::Tensor& h_b = a.h_b;
  TORCH_CHECK(h_b.device().is_cpu(), op, ": the CPU kernel got tensors on ", h_b.device());
  int64_t* sp = step.data_ptr<int64_t>();
  const int64_t t = sp[0];
  TORCH_CHECK(t >= 0 && t < s.Ttot, op, ": the step counter is ", t, ", outside the image's ", s.Ttot,
              " sub-pixels [0, ", s.Ttot, "); reset step[0] to 0 before sampling again");
  AT_DISPATCH_FLOATING_TYPES(h_b.scalar_type(), "gated_pixelcnn_step_cpu", [&] {
    Ptrs<scalar_t> P{image.data_ptr<scalar_t>(),
                     row_cache.data_ptr<scalar_t>(),
                     codes.data_ptr<int64_t>(),
                     logits.data_ptr<scalar_t>(),
                     noise.data_ptr<scalar_t>(),
                     links.data_ptr<scalar_t>(),
                     opt_ptr<scalar_t>(a.class_bias),
                     opt_ptr<scalar_t>(a.cond_map),
                     opt_ptr<scalar_t>(a.map_w),
                     opt_ptr<int64_t>(prefix),
                     opt_ptr<bool>(given),
                     a.h_w.data_ptr<scalar_t>(),
                     h_b.data_ptr<scalar_t>(),
                     a.so_w.data_ptr<scalar_t>(),
                     a.so_b.data_ptr<scalar_t>(),
                     a.head1_w.data_ptr<scalar_t>(),
                     a.head1_b.data_ptr<scalar_t>(),
                     a.head2_w.data_ptr<scalar_t>(),
                     a.head2_b.data_ptr<scalar_t>()};
    // Rows are independent and each row's arithmetic is the same on any thread (a tile of rows
    // shares weight reads, not sums), so any thread count computes the same bits. A row costs
    // ~C^2 * L * 6 flops: below a few rows per thread the fork/join costs more (grain 4). The
    // thread count is torch's, i.e. the caller's (fastar/threads.py picks it per kind of step).
    at::parallel_for(0, s.N, 4, [&](int64_t b0, int64_t b1) { step_rows<scalar_t>(s, P, t, temperature, b0, b1); });
  });
  sp[0] = t + 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("gated_pixelcnn_step", &gated_pixelcnn_step_cpu); }

}  // namespace fastar
