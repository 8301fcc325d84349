// Shared argument checks and shape logic for the masked convolution family,
// used by the CPU and the CUDA kernels alike so both reject bad input with the
// same sentences.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct MaskedConvShape {
  int64_t N, C_in, H, W;
  int64_t C_out, kH, kW;
  int64_t pad_h, pad_w, dil_h, dil_w;
  int64_t H_out, W_out;
};

inline MaskedConvShape check_masked_conv2d(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (out, in, kH, kW), got shape ", weight.sizes());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": mask must have the weight's shape ", weight.sizes(),
              ", got shape ", mask.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()), op,
              ": mask must be bool or floating-point, got ", mask.scalar_type());
  TORCH_CHECK(weight.device() == x.device() && mask.device() == x.device(), op,
              ": x, weight and mask must be on one device, got x on ", x.device(), ", weight on ",
              weight.device(), ", mask on ", mask.device());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1), " input channels but weight expects ",
              weight.size(1), " (weight shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be 1-D of length ",
                weight.size(0), " (out channels), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " must match x dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), ", got ", bias->device());
  }
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2, op, ": padding and dilation must have 2 entries");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be at least 1, got ", dilation);
  MaskedConvShape s;
  s.N = x.size(0);
  s.C_in = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.C_out = weight.size(0);
  s.kH = weight.size(2);
  s.kW = weight.size(3);
  TORCH_CHECK(s.kH >= 1 && s.kW >= 1 && s.C_out >= 1 && s.C_in >= 1, op,
              ": weight must have non-zero sizes, got shape ", weight.sizes());
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.H_out = s.H + 2 * s.pad_h - s.dil_h * (s.kH - 1);
  s.W_out = s.W + 2 * s.pad_w - s.dil_w * (s.kW - 1);
  TORCH_CHECK(s.H_out >= 1 && s.W_out >= 1, op, ": the ", s.kH, "x", s.kW, " kernel with dilation ", dilation,
              " does not fit the padded ", s.H, "x", s.W, " input (padding ", padding, ")");
  return s;
}

// Indices (kh * kW + kw) of the taps where the mask is non-zero for at least
// one (out, in) channel pair: the only taps the kernels spend work on.
inline std::vector<int64_t> active_taps_host(const at::Tensor& mask) {
  auto any = mask.ne(0).reshape({mask.size(0) * mask.size(1), mask.size(2) * mask.size(3)}).any(0).cpu();
  auto acc = any.accessor<bool, 1>();
  std::vector<int64_t> taps;
  for (int64_t t = 0; t < any.size(0); ++t)
    if (acc[t]) taps.push_back(t);
  return taps;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
