// CPU kernel of masked_conv2d_at: the masked convolution's output at P
// positions for a whole batch, reading a cached input map (cached sampling).
//
// masked_conv2d_at(x_cache!, x_new, weight, bias, mask, pos, padding, dilation):
//   x_cache (N, C_in, H, W), any strides, written in place: x_cache[:, :, pos[p]] = x_new[:, :, p] first;
//   x_new (N, C_in, P) or none; weight, mask (C_out, C_in, kH, kW); bias (C_out,) or none; pos (P, 2) int64;
//   returns (N, C_out, P) contiguous: out[:, :, p] = conv2d(x_cache, weight * mask, bias, padding, dilation)
//   evaluated at output position pos[p] only. float32 and float64.
//
// Design: one sampling step asks for one position (or one row), so the work
// is a gather of the active taps around each position into a small
// (N * P, C_in * T_a) matrix, then one GEMM with the packed effective weight.
// The cost is independent of H * W, which is the whole point of the cache.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "masked_conv_at.h"

namespace fastar {
namespace {

// Up to this many (image, position) rows the step GEMM is small enough that
// multiplying by masked zeros is cheaper than packing the active taps.
constexpr int64_t kSmallRows = 64;

at::Tensor masked_conv2d_at_cpu(const at::Tensor& x_cache, const c10::optional<at::Tensor>& x_new,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& mask, const at::Tensor& pos, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  const char* op = "masked_conv2d_at";
  const auto sa = check_masked_conv2d_at(op, x_cache, x_new, weight, bias, mask, pos, padding, dilation);
  const auto& s = sa.conv;
  const auto st = x_cache.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": the CPU kernel supports float32 and float64, got ", st,
              "; cast the cache, or use fastar.set_backend(\"reference\") for this dtype");
  const int64_t P = sa.P;
  const auto pos_c = pos.contiguous();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t i = pp[2 * p], j = pp[2 * p + 1];
    TORCH_CHECK(i >= 0 && i < s.H && j >= 0 && j < s.W && i < s.H_out && j < s.W_out, op, ": position ", p, " (", i,
                ", ", j, ") lies outside the ", s.H, "x", s.W, " map (output ", s.H_out, "x", s.W_out, ")");
  }
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty({s.N, s.C_out, P}, x_cache.options());
  if (s.N == 0 || P == 0) return out;
  const int64_t KK = s.kH * s.kW;
  // The mask in the weight's dtype; bool masks (and other float dtypes) are converted once.
  const auto mask_c = (mask.scalar_type() == st ? mask : mask.to(st)).contiguous();
  const auto w_c = weight.contiguous();
  const int64_t sn = x_cache.stride(0), sc = x_cache.stride(1), sh = x_cache.stride(2), sw = x_cache.stride(3);
  // out[n, :, p] = bias + w_eff @ cols[n * P + p]: one GEMM for the batch and positions.
  auto finish = [&](const at::Tensor& cols, const at::Tensor& w_eff) {
    if (P == 1) {
      auto o2 = out.view({s.N, s.C_out});
      if (has_bias)
        at::addmm_out(o2, bias->view({1, s.C_out}).expand({s.N, s.C_out}), cols, w_eff.t());
      else
        at::mm_out(o2, cols, w_eff.t());
    } else {
      at::Tensor res = has_bias ? at::addmm(*bias, cols, w_eff.t()) : at::mm(cols, w_eff.t());  // (N * P, C_out)
      out.copy_(res.view({s.N, P, s.C_out}).permute({0, 2, 1}));
    }
  };
  AT_DISPATCH_FLOATING_TYPES(st, "masked_conv2d_at_cpu", [&] {
    scalar_t* xc = x_cache.data_ptr<scalar_t>();
    if (x_new.has_value() && x_new->defined()) {
      // The new values land in the cache before any read: a mask-B tap reads
      // the current position itself.
      const auto xn = x_new->contiguous();
      const scalar_t* src = xn.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t c = 0; c < s.C_in; ++c)
          for (int64_t p = 0; p < P; ++p)
            xc[n * sn + c * sc + pp[2 * p] * sh + pp[2 * p + 1] * sw] = src[(n * s.C_in + c) * P + p];
    }
    const scalar_t* mp = mask_c.data_ptr<scalar_t>();
    const scalar_t* wp = w_c.data_ptr<scalar_t>();
    // Active taps, scanned in place: an ATen reduction over the mask (an
    // allocation and a full pass) would cost more than a step's convolution.
    // An active tap is found at its first non-zero entry. A dead tap is never
    // read (the family's rule, as in masked_conv2d): a NaN only it would see
    // must not reach the output through 0 * NaN.
    std::vector<int64_t> taps;
    std::vector<char> live(KK, 0);
    for (int64_t t = 0; t < KK; ++t) {
      for (int64_t oc = 0; oc < s.C_out * s.C_in; ++oc) {
        if (mp[oc * KK + t] != scalar_t(0)) {
          taps.push_back(t);
          live[t] = 1;
          break;
        }
      }
    }
    if (s.N * P <= kSmallRows) {
      // A sampling step (one position, a small batch): the GEMM is tiny, so
      // packing the active taps would cost more than multiplying by the masked
      // taps' zeros. Gather every tap (zeros outside the map) and multiply by
      // weight * mask, formed elementwise in the weight's own layout.
      const int64_t K = s.C_in * KK;
      auto w_eff = at::empty({s.C_out, K}, x_cache.options());
      scalar_t* we = w_eff.data_ptr<scalar_t>();
      for (int64_t e = 0; e < s.C_out * K; ++e) we[e] = wp[e] * mp[e];
      auto cols = at::empty({s.N * P, K}, x_cache.options());
      scalar_t* cp = cols.data_ptr<scalar_t>();
      for (int64_t np = 0; np < s.N * P; ++np) {
        const int64_t n = np / P, p = np % P;
        const int64_t i = pp[2 * p], j = pp[2 * p + 1];
        scalar_t* row = cp + np * K;
        const scalar_t* xb = xc + n * sn;
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t ih = i + (t / s.kW) * s.dil_h - s.pad_h, iw = j + (t % s.kW) * s.dil_w - s.pad_w;
          const bool inside = live[t] && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
          const scalar_t* src = xb + ih * sh + iw * sw;
          for (int64_t c = 0; c < s.C_in; ++c) row[c * KK + t] = inside ? src[c * sc] : scalar_t(0);
        }
      }
      finish(cols, w_eff);
      return;
    }
    const int64_t T = static_cast<int64_t>(taps.size());
    if (T == 0) {
      if (has_bias)
        out.copy_(bias->view({1, s.C_out, 1}).expand_as(out));
      else
        out.zero_();
      return;
    }
    std::vector<int64_t> dy(T), dx(T);
    for (int64_t a = 0; a < T; ++a) {
      dy[a] = (taps[a] / s.kW) * s.dil_h - s.pad_h;
      dx[a] = (taps[a] % s.kW) * s.dil_w - s.pad_w;
    }
    const int64_t K = s.C_in * T;
    // Effective weight packed (C_out, C_in * T): column c * T + a = weight * mask at active tap a.
    auto w_eff = at::empty({s.C_out, K}, x_cache.options());
    scalar_t* we = w_eff.data_ptr<scalar_t>();
    for (int64_t oc = 0; oc < s.C_out * s.C_in; ++oc)
      for (int64_t a = 0; a < T; ++a) we[oc * T + a] = wp[oc * KK + taps[a]] * mp[oc * KK + taps[a]];
    auto cols = at::empty({s.N * P, K}, x_cache.options());
    scalar_t* cp = cols.data_ptr<scalar_t>();
    at::parallel_for(0, s.N * P, 16, [&](int64_t begin, int64_t end) {
      // OpenMP workers do not inherit the caller's dispatch state: without this the ATen
      // GEMMs below would run the autograd layer (and refuse out= with weights that require grad).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t np = begin; np < end; ++np) {
        const int64_t n = np / P, p = np % P;
        const int64_t i = pp[2 * p], j = pp[2 * p + 1];
        scalar_t* row = cp + np * K;
        const scalar_t* xb = xc + n * sn;
        for (int64_t a = 0; a < T; ++a) {
          const int64_t ih = i + dy[a], iw = j + dx[a];
          const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
          const scalar_t* src = xb + ih * sh + iw * sw;
          for (int64_t c = 0; c < s.C_in; ++c) row[c * T + a] = inside ? src[c * sc] : scalar_t(0);
        }
      }
    });
    finish(cols, w_eff);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("masked_conv2d_at", &masked_conv2d_at_cpu); }

}  // namespace fastar
