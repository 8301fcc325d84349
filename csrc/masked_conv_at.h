// Shared argument checks for masked_conv2d_at (the one-position masked
// convolution of cached sampling), used by the CPU and the CUDA kernels alike
// so both reject bad input with the same sentences.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "masked_conv.h"
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct MaskedConvAtShape {
  MaskedConvShape conv;
  int64_t P;  // number of output positions
};

inline MaskedConvAtShape check_masked_conv2d_at(const char* op, const at::Tensor& x_cache,
                                                const c10::optional<at::Tensor>& x_new, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                                                const at::Tensor& pos, at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  MaskedConvAtShape s;
  s.conv = check_masked_conv2d(op, x_cache, weight, bias, mask, padding, dilation);
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) == 2, op, ": pos must be 2-D (P, 2) holding (row, column) pairs, got shape ",
              pos.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": pos must be int64, got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == x_cache.device(), op, ": pos must be on the cache's device ", x_cache.device(),
              ", got ", pos.device());
  s.P = pos.size(0);
  if (x_new.has_value() && x_new->defined()) {
    const auto& xn = *x_new;
    TORCH_CHECK(xn.dim() == 3 && xn.size(0) == s.conv.N && xn.size(1) == s.conv.C_in && xn.size(2) == s.P, op,
                ": x_new must be (N, C_in, P) = [", s.conv.N, ", ", s.conv.C_in, ", ", s.P, "], got shape ",
                xn.sizes());
    TORCH_CHECK(xn.scalar_type() == x_cache.scalar_type(), op, ": x_new dtype ", xn.scalar_type(),
                " must match x_cache dtype ", x_cache.scalar_type());
    TORCH_CHECK(xn.device() == x_cache.device(), op, ": x_new must be on the cache's device ", x_cache.device(),
                ", got ", xn.device());
  }
  return s;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
