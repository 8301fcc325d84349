// CPU kernels of the masked convolution family.
//
// masked_conv2d(x, weight, bias, mask, padding, dilation):
//   x (N, C_in, H, W), weight and mask (C_out, C_in, kH, kW), bias (C_out,) or none;
//   out (N, C_out, H_out, W_out) contiguous = conv2d(x, weight * mask, bias, stride 1).
//   float32 and float64.
//
// Design: the mask of a causal convolution zeroes about half of the taps for
// every channel pair, so the kernel gathers only the active taps: an im2col
// over T_a active taps builds a (C_in * T_a, H_out * W_out) matrix per image
// (plain row copies with zero borders, which the compiler vectorises), and one
// BLAS GEMM per image multiplies it by the packed effective weight
// (C_out, C_in * T_a). Backward reuses the same gather: grad_weight is
// grad_out @ cols^T, grad_x is a col2im of W_eff^T @ grad_out. The batch is
// processed in chunks so the column buffer stays a few tens of MB.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "masked_conv.h"

namespace fastar {
namespace {

constexpr int64_t kColumnBudgetBytes = 32 << 20;

struct TapOffset {
  int64_t dy, dx;
};

std::vector<TapOffset> tap_offsets(const std::vector<int64_t>& taps, const MaskedConvShape& s) {
  std::vector<TapOffset> off;
  off.reserve(taps.size());
  for (int64_t t : taps) off.push_back({(t / s.kW) * s.dil_h - s.pad_h, (t % s.kW) * s.dil_w - s.pad_w});
  return off;
}

// cols[b][c * T + a][oh * W_out + ow] = x[b][c][oh + dy_a][ow + dx_a], zero outside the image.
template <typename scalar_t>
void im2col_taps(const scalar_t* x, scalar_t* cols, int64_t nb, const MaskedConvShape& s,
                 const std::vector<TapOffset>& off) {
  const int64_t T = static_cast<int64_t>(off.size());
  const int64_t HW = s.H * s.W, HWo = s.H_out * s.W_out;
  at::parallel_for(0, nb * s.C_in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const scalar_t* src = x + bc * HW;
      for (int64_t a = 0; a < T; ++a) {
        scalar_t* dst = cols + (bc * T + a) * HWo;
        const int64_t dy = off[a].dy, dx = off[a].dx;
        // Output columns whose source column ow + dx lies inside [0, W).
        const int64_t lo = std::min(std::max<int64_t>(-dx, 0), s.W_out);
        const int64_t hi = std::max(lo, std::min(s.W - dx, s.W_out));
        for (int64_t oh = 0; oh < s.H_out; ++oh) {
          scalar_t* row = dst + oh * s.W_out;
          const int64_t ih = oh + dy;
          if (ih < 0 || ih >= s.H) {
            std::fill(row, row + s.W_out, scalar_t(0));
            continue;
          }
          std::fill(row, row + lo, scalar_t(0));
          std::memcpy(row + lo, src + ih * s.W + lo + dx, sizeof(scalar_t) * (hi - lo));
          std::fill(row + hi, row + s.W_out, scalar_t(0));
        }
      }
    }
  });
}

// The adjoint of im2col_taps: gx[b][c][ih][iw] = sum_a gcols[b][c * T + a][ih - dy_a][iw - dx_a].
// One (image, channel) plane per task, so no two threads write the same element.
template <typename scalar_t>
void col2im_taps(const scalar_t* gcols, scalar_t* gx, int64_t nb, const MaskedConvShape& s,
                 const std::vector<TapOffset>& off) {
  const int64_t T = static_cast<int64_t>(off.size());
  const int64_t HW = s.H * s.W, HWo = s.H_out * s.W_out;
  at::parallel_for(0, nb * s.C_in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      scalar_t* dst = gx + bc * HW;
      std::fill(dst, dst + HW, scalar_t(0));
      for (int64_t a = 0; a < T; ++a) {
        const scalar_t* src = gcols + (bc * T + a) * HWo;
        const int64_t dy = off[a].dy, dx = off[a].dx;
        const int64_t lo = std::min(std::max<int64_t>(-dx, 0), s.W_out);
        const int64_t hi = std::max(lo, std::min(s.W - dx, s.W_out));
        const int64_t oh_lo = std::max<int64_t>(0, -dy), oh_hi = std::min(s.H_out, s.H - dy);
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          const scalar_t* srow = src + oh * s.W_out;
          scalar_t* drow = dst + (oh + dy) * s.W + dx;
          for (int64_t ow = lo; ow < hi; ++ow) drow[ow] += srow[ow];
        }
      }
    }
  });
}

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", st,
              "; cast the input, or use fastar.set_backend(\"reference\") for this dtype");
}

int64_t chunk_size(const MaskedConvShape& s, int64_t K, int64_t elsize) {
  const int64_t per_image = std::max<int64_t>(1, K * s.H_out * s.W_out * elsize);
  return std::max<int64_t>(1, std::min<int64_t>(s.N, kColumnBudgetBytes / per_image));
}

// W_eff packed as (C_out, C_in * T_a): column c * T_a + a holds weight * mask at tap a.
at::Tensor pack_effective_weight(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& taps_t,
                                 const MaskedConvShape& s) {
  const int64_t T = taps_t.size(0);
  return (weight * mask.to(weight.scalar_type()))
      .reshape({s.C_out, s.C_in, s.kH * s.kW})
      .index_select(2, taps_t)
      .reshape({s.C_out, s.C_in * T})
      .contiguous();
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& mask, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto s = check_masked_conv2d("masked_conv2d", x, weight, bias, mask, padding, dilation);
  check_cpu_dtype("masked_conv2d", x);
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, x.options());
  if (s.N == 0) return out;
  const auto taps = active_taps_host(mask);
  if (taps.empty()) {
    if (has_bias)
      out.copy_(bias->view({1, s.C_out, 1, 1}).expand_as(out));
    else
      out.zero_();
    return out;
  }
  const auto off = tap_offsets(taps, s);
  const int64_t T = static_cast<int64_t>(taps.size()), K = s.C_in * T, HWo = s.H_out * s.W_out;
  const auto taps_t = at::tensor(taps, at::kLong);
  const auto w_eff = pack_effective_weight(weight, mask, taps_t, s);
  const auto xc = x.contiguous();
  const int64_t nb = chunk_size(s, K, x.element_size());
  auto cols = at::empty({nb, K, HWo}, x.options());
  auto out3 = out.view({s.N, s.C_out, HWo});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_cpu", [&] {
    for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
      const int64_t b = std::min(nb, s.N - n0);
      im2col_taps<scalar_t>(xc.data_ptr<scalar_t>() + n0 * s.C_in * s.H * s.W, cols.data_ptr<scalar_t>(), b, s,
                            off);
      auto o = out3.narrow(0, n0, b);
      auto c = cols.narrow(0, 0, b);
      auto w = w_eff.unsqueeze(0).expand({b, s.C_out, K});
      if (has_bias)
        at::baddbmm_out(o, bias->view({1, s.C_out, 1}).expand({b, s.C_out, HWo}), w, c);
      else
        at::bmm_out(o, w, c);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const auto s = check_masked_conv2d("masked_conv2d_backward", x, weight, c10::nullopt, mask, padding, dilation);
  check_cpu_dtype("masked_conv2d_backward", x);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({s.N, s.C_out, s.H_out, s.W_out}),
              "masked_conv2d_backward: grad_out must have the output's shape [", s.N, ", ", s.C_out, ", ", s.H_out,
              ", ", s.W_out, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "masked_conv2d_backward: grad_out must match x's dtype and device, got ", grad_out.scalar_type(),
              " on ", grad_out.device());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  auto empty = at::empty({0}, x.options());
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options()) : empty;
  at::Tensor gw = need_w ? at::zeros(weight.sizes(), weight.options()) : empty;
  at::Tensor gb = need_b ? grad_out.sum({0, 2, 3}) : empty;
  if (!need_x && !need_w) return {gx, gw, gb};
  const auto taps = active_taps_host(mask);
  if (s.N == 0 || taps.empty()) {
    if (need_x) gx.zero_();
    return {gx, gw, gb};
  }
  const auto off = tap_offsets(taps, s);
  const int64_t T = static_cast<int64_t>(taps.size()), K = s.C_in * T, HWo = s.H_out * s.W_out;
  const auto taps_t = at::tensor(taps, at::kLong);
  const auto w_eff = pack_effective_weight(weight, mask, taps_t, s);
  const auto go3 = grad_out.contiguous().view({s.N, s.C_out, HWo});
  const auto xc = x.contiguous();
  const int64_t nb = chunk_size(s, K, x.element_size());
  auto cols = at::empty({nb, K, HWo}, x.options());
  auto gw_eff = need_w ? at::zeros({s.C_out, K}, x.options()) : empty;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_backward_cpu", [&] {
    for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
      const int64_t b = std::min(nb, s.N - n0);
      auto g = go3.narrow(0, n0, b);
      auto c = cols.narrow(0, 0, b);
      if (need_w) {
        im2col_taps<scalar_t>(xc.data_ptr<scalar_t>() + n0 * s.C_in * s.H * s.W, c.data_ptr<scalar_t>(), b, s, off);
        gw_eff.add_(at::bmm(g, c.transpose(1, 2)).sum(0));
      }
      if (need_x) {
        at::bmm_out(c, w_eff.t().unsqueeze(0).expand({b, K, s.C_out}), g);
        col2im_taps<scalar_t>(c.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>() + n0 * s.C_in * s.H * s.W, b, s, off);
      }
    }
  });
  if (need_w) {
    gw.view({s.C_out, s.C_in, s.kH * s.kW}).index_copy_(2, taps_t, gw_eff.view({s.C_out, s.C_in, T}));
    gw.mul_(mask.to(weight.scalar_type()));
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace fastar
