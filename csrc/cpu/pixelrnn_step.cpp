// CPU kernel of pixelrnn_step: a whole PixelRNN sub-pixel step (the first layer's mask-A
// convolution at the position, every layer's LSTM cell and residual, the head, the categorical
// draw and the writes of the drawn value) in one call, float32 / float64. Contract:
// fastar/ops/pixelrnn.py; layouts and checks: csrc/pixelrnn_step.h.
//
// Batch rows are independent within a step, so the batch is split over threads (at::parallel_for)
// and each thread walks its rows in tiles of kTile: every matrix is input-major, so one weight row
// (in L1 once) serves every row of the tile and the innermost loop runs over contiguous outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/categorical.h"
#include "pixelrnn_step.h"

namespace fastar {
namespace {

constexpr int64_t kTile = 8;

// out[r * os + q] += sum_k x[r * xs + k] * w[k * ldw + q], r < R, k < K, q < O.
template <typename T>
inline void rnn_gemm_body(const T* x, int64_t xs, int64_t R, const T* w, int64_t ldw, int64_t K, int64_t O, T* out,
                          int64_t os) {
  for (int64_t k = 0; k < K; ++k) {
    const T* wr = w + k * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const T xv = x[r * xs + k];
      if (xv == T(0)) continue;  // adding 0 * w changes nothing (the weights are finite)
      T* o = out + r * os;
      for (int64_t q = 0; q < O; ++q) o[q] += xv * wr[q];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTAR_RNN_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTAR_RNN_CLONES
#endif
FASTAR_RNN_CLONES void rnn_gemm(const float* x, int64_t xs, int64_t R, const float* w, int64_t ldw, int64_t K,
                                int64_t O, float* out, int64_t os) {
  rnn_gemm_body(x, xs, R, w, ldw, K, O, out, os);
}
FASTAR_RNN_CLONES void rnn_gemm(const double* x, int64_t xs, int64_t R, const double* w, int64_t ldw, int64_t K,
                                int64_t O, double* out, int64_t os) {
  rnn_gemm_body(x, xs, R, w, ldw, K, O, out, os);
}

template <typename T>
inline T sigm(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

template <typename T>
struct RnnPtrs {
  T *image, *logits, *hs, *cs, *xrow;
  int64_t* codes;
  const T *aux, *noise, *in_w, *in_b, *class_bias, *is_w, *is_b, *ss_w, *out_w, *out_b, *head1_w, *head1_b,
      *head2_w, *head2_b;
  const int64_t* prefix;
  const bool* given;
};

template <typename T>
void rnn_rows(const RnnStepShape& s, const RnnPtrs<T>& P, int64_t t, double temperature, int64_t b0, int64_t b1) {
  const int64_t N = s.N, Ci = s.Ci, H = s.H, W = s.W, h = s.hid, h2 = 2 * h, h4 = 4 * h, K = s.K, F = s.F;
  const int64_t c = t % Ci, p = t / Ci, i = p / W, j = p % W, flat = c * H * W + p, R_ = F / 2;
  std::vector<T> x(kTile * h2), xin(kTile * Ci), z(kTile * h4), hv(kTile * h), y(kTile * h2), lg(kTile * K),
      e(std::max<int64_t>(K, 2));
  const T scale = static_cast<T>(2.0 / static_cast<double>(s.levels - 1));
  // (l, i, j, n) -> offset of a state row in hs / cs / aux (kind 0).
  auto st = [&](int64_t l, int64_t ii, int64_t jj, int64_t n) { return (((l * H + ii) * W + jj) * N + n) * h; };
  for (int64_t n0 = b0; n0 < b1; n0 += kTile) {
    const int64_t R = std::min(kTile, b1 - n0);
    // 1. the first layer's F x F mask-A convolution at (i, j): the taps on rows i - F/2 .. i (the
    //    mask zeroes every later one), inside the image.
    for (int64_t r = 0; r < R; ++r) {
      T* xr = x.data() + r * h2;
      std::copy(P.in_b, P.in_b + h2, xr);
      if (P.class_bias) {
        const T* cb = P.class_bias + (n0 + r) * h2;
        for (int64_t q = 0; q < h2; ++q) xr[q] += cb[q];
      }
    }
    for (int64_t ty = 0; ty <= R_; ++ty) {
      const int64_t row = i - R_ + ty;
      if (row < 0) continue;
      for (int64_t tx = 0; tx < (ty == R_ ? R_ + 1 : F); ++tx) {
        const int64_t col = j - R_ + tx;
        if (col < 0 || col >= W) continue;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t q = 0; q < Ci; ++q) xin[r * Ci + q] = P.image[(((n0 + r) * Ci + q) * H + row) * W + col];
        rnn_gemm(xin.data(), Ci, R, P.in_w + (ty * F + tx) * Ci * h2, h2, Ci, h2, x.data(), h2);
      }
    }
    // 2. the LSTM layers.
    for (int64_t l = 0; l < s.L; ++l) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        std::copy(x.data() + r * h2, x.data() + (r + 1) * h2, P.xrow + ((l * W + j) * N + n) * h2);
        T* zr = z.data() + r * h4;
        std::copy(P.is_b + l * h4, P.is_b + (l + 1) * h4, zr);
        if (s.kind == 1) {
          const T* ss = P.aux + ((l * W + j) * N + n) * h4;
          for (int64_t q = 0; q < h4; ++q) zr[q] += ss[q];
        }
      }
      if (s.kind == 0) {
        rnn_gemm(x.data(), h2, R, P.is_w + l * h2 * h4, h4, h2, h4, z.data(), h4);
        const T* ssw = P.ss_w + l * h2 * h4;
        if (i > 0) rnn_gemm(P.hs + st(l, i - 1, j, n0), h, R, ssw, h4, h, h4, z.data(), h4);
        if (j > 0) rnn_gemm(P.hs + st(l, i, j - 1, n0), h, R, ssw + h * h4, h4, h, h4, z.data(), h4);
      } else {
        for (int64_t a = 0; a <= s.P; ++a) {
          const int64_t col = j - s.P + a;
          if (col < 0) continue;
          // column j's input is x itself (just written to xrow); the others are earlier columns of xrow
          rnn_gemm(P.xrow + ((l * W + col) * N + n0) * h2, h2, R, P.is_w + (l * (s.P + 1) + a) * h2 * h4, h4, h2, h4,
                   z.data(), h4);
        }
      }
      // the cell: gates [i | f | o | g], memory from the left (kind 0) or from above (kind 1)
      const bool has_prev = s.kind == 0 ? j > 0 : i > 0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        const T* zr = z.data() + r * h4;
        const T* cp = has_prev ? P.cs + (s.kind == 0 ? st(l, i, j - 1, n) : st(l, i - 1, j, n)) : nullptr;
        T* hw = P.hs + st(l, i, j, n);
        T* cw = P.cs + st(l, i, j, n);
        T* hr = hv.data() + r * h;
        for (int64_t q = 0; q < h; ++q) {
          const T ig = sigm(zr[q]), fg = sigm(zr[h + q]), og = sigm(zr[2 * h + q]), gg = std::tanh(zr[3 * h + q]);
          const T cn = fg * (cp ? cp[q] : T(0)) + ig * gg;
          const T hn = og * std::tanh(cn);
          cw[q] = cn;
          hw[q] = hn;
          hr[q] = hn;
        }
        if (s.kind == 0 && i > 0) {  // the right-to-left state of the row above
          const T* up = P.aux + st(l, i - 1, j, n);
          for (int64_t q = 0; q < h; ++q) hr[q] += up[q];
        }
        std::copy(P.out_b + l * h2, P.out_b + (l + 1) * h2, y.data() + r * h2);
      }
      rnn_gemm(hv.data(), h, R, P.out_w + l * h * h2, h2, h, h2, y.data(), h2);
      for (int64_t r = 0; r < R; ++r) {
        T* xr = x.data() + r * h2;
        const T* yr = y.data() + r * h2;
        for (int64_t q = 0; q < h2; ++q) xr[q] = s.residual ? yr[q] + xr[q] : yr[q];
      }
    }
    // 3. the head: ReLU, 1x1, ReLU, 1x1 -- only colour c's K logits of the last one.
    for (int64_t r = 0; r < R; ++r) {
      T* xr = x.data() + r * h2;
      for (int64_t q = 0; q < h2; ++q) xr[q] = std::max(xr[q], T(0));
      std::copy(P.head1_b, P.head1_b + h2, y.data() + r * h2);
    }
    rnn_gemm(x.data(), h2, R, P.head1_w, h2, h2, h2, y.data(), h2);
    for (int64_t r = 0; r < R; ++r) {
      T* yr = y.data() + r * h2;
      for (int64_t q = 0; q < h2; ++q) yr[q] = std::max(yr[q], T(0));
      std::copy(P.head2_b + c * K, P.head2_b + (c + 1) * K, lg.data() + r * K);
    }
    rnn_gemm(y.data(), h2, R, P.head2_w + c * K, Ci * K, h2, K, lg.data(), K);
    // 4. the draw and its writes.
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      const T* lr = lg.data() + r * K;
      std::copy(lr, lr + K, P.logits + n * K);
      const T u = P.noise[t * N + n];
      const T temp = static_cast<T>(temperature);
      int64_t val;
      if (s.levels == 2) {
        const T two[2] = {T(0), lr[0]};  // the engine's Bernoulli: categories (0, logit)
        val = cat::categorical_draw<T>([&two](int64_t k) { return two[k]; }, 2, temp, u, e.data());
      } else {
        val = cat::categorical_draw<T>([lr](int64_t k) { return lr[k]; }, K, temp, u, e.data());
      }
      if (P.given && P.given[n * s.Ttot + flat]) val = P.prefix[n * s.Ttot + flat];
      P.codes[n * s.Ttot + flat] = val;
      P.image[((n * Ci + c) * H + i) * W + j] = static_cast<T>(val) * scale - T(1);
    }
  }
}

void pixelrnn_step_cpu(at::Tensor& image, at::Tensor& codes, at::Tensor& step, at::Tensor& logits, at::Tensor& hs,
                       at::Tensor& cs, at::Tensor& xrow, const at::Tensor& aux, const at::Tensor& noise,
                       const c10::optional<at::Tensor>& prefix, const c10::optional<at::Tensor>& given,
                       const c10::List<c10::optional<at::Tensor>>& pack, at::IntArrayRef config, double temperature) {
  const char* op = "pixelrnn_step";
  const auto a = parse_pixelrnn_step(op, image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack,
                                     config, temperature);
  const RnnStepShape& s = a.s;
  TORCH_CHECK(image.device().is_cpu(), op, ": the CPU kernel got tensors on ", image.device());
  int64_t* sp = step.data_ptr<int64_t>();
  const int64_t t = sp[0];
  TORCH_CHECK(t >= 0 && t < s.Ttot, op, ": the step counter is ", t, ", outside the image's ", s.Ttot,
              " sub-pixels [0, ", s.Ttot, "); reset step[0] to 0 before sampling again");
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "pixelrnn_step_cpu", [&] {
    using T = scalar_t;
    auto cp = [&](int64_t k) { return opt_ptr<T>(a.w[k]); };
    RnnPtrs<T> P{image.data_ptr<T>(), logits.data_ptr<T>(), hs.data_ptr<T>(), cs.data_ptr<T>(), xrow.data_ptr<T>(),
                 codes.data_ptr<int64_t>(), aux.data_ptr<T>(), noise.data_ptr<T>(), cp(RnnPack::in_w),
                 cp(RnnPack::in_b), cp(RnnPack::class_bias), cp(RnnPack::is_w), cp(RnnPack::is_b), cp(RnnPack::ss_w),
                 cp(RnnPack::out_w), cp(RnnPack::out_b), cp(RnnPack::head1_w), cp(RnnPack::head1_b),
                 cp(RnnPack::head2_w), cp(RnnPack::head2_b), opt_ptr<int64_t>(prefix), opt_ptr<bool>(given)};
    // Rows are independent and a row's arithmetic is the same on any thread, so any thread count
    // computes the same bits. The thread count is the caller's (fastar/threads.py).
    at::parallel_for(0, s.N, 4, [&](int64_t b0, int64_t b1) { rnn_rows<T>(s, P, t, temperature, b0, b1); });
  });
  sp[0] = t + 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("pixelrnn_step", &pixelrnn_step_cpu); }

}  // namespace fastar
