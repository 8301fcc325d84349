// CUDA kernel of masked_conv2d_at (see csrc/cpu/masked_conv_at.cpp for the contract).
//
// Positions are read on the device (pos is a device tensor), so a sampling
// step that calls this op has no host-device sync and can be captured in a
// CUDA graph. Two launches: the scatter of x_new into the cache, then one
// thread per (n, out channel, position) summing over input channels and taps.
// The effective weight weight * mask is formed with ATen on the device (no
// host read of the mask, unlike the CPU kernel), as are the live-tap flags: a
// tap masked for every channel pair is skipped, every other product taken (the
// family's NaN rule, see fastar/ops/masked_conv.py). Half and bfloat16 accumulate in
// float32. A position outside the map cannot be checked without a sync: its
// scatter is skipped and its taps read as zero padding.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/acc_type.h"
#include "masked_conv_at.h"

namespace fastar {
namespace {

template <typename scalar_t>
__global__ void masked_conv2d_at_scatter_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_new,
                                                const int64_t* __restrict__ pos, int64_t N, int64_t C, int64_t P,
                                                int64_t H, int64_t W, int64_t sn, int64_t sc, int64_t sh,
                                                int64_t sw) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * C * P) return;
  const int64_t p = idx % P, c = (idx / P) % C, n = idx / (P * C);
  const int64_t i = pos[2 * p], j = pos[2 * p + 1];
  if (i < 0 || i >= H || j < 0 || j >= W) return;
  x[n * sn + c * sc + i * sh + j * sw] = x_new[idx];
}

template <typename scalar_t>
__global__ void masked_conv2d_at_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_eff,
                                        const scalar_t* __restrict__ bias, const bool* __restrict__ live,
                                        const int64_t* __restrict__ pos,
                                        scalar_t* __restrict__ out, int64_t N, int64_t C_in, int64_t C_out,
                                        int64_t P, int64_t H, int64_t W, int64_t kH, int64_t kW, int64_t pad_h,
                                        int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t sn, int64_t sc,
                                        int64_t sh, int64_t sw) {
  using A = acc_t<scalar_t>;  // common/acc_type.h: the one accumulator rule
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * C_out * P) return;
  // Consecutive threads share (n, p) and differ in the output channel, so the
  // input loads are broadcasts within a warp.
  const int64_t o = idx % C_out, p = (idx / C_out) % P, n = idx / (C_out * P);
  const int64_t i = pos[2 * p], j = pos[2 * p + 1];
  A acc = bias != nullptr ? static_cast<A>(bias[o]) : A(0);
  const scalar_t* xb = x + n * sn;
  const scalar_t* wo = w_eff + o * C_in * kH * kW;
  for (int64_t kh = 0; kh < kH; ++kh) {
    const int64_t ih = i + kh * dil_h - pad_h;
    if (ih < 0 || ih >= H) continue;
    for (int64_t kw = 0; kw < kW; ++kw) {
      const int64_t iw = j + kw * dil_w - pad_w;
      // Dead taps (masked for every channel pair) are never read; inside a live tap every product
      // is taken, so 0 * NaN = NaN exactly as in masked_conv2d and the reference.
      if (iw < 0 || iw >= W || !live[kh * kW + kw]) continue;
      const scalar_t* xs = xb + ih * sh + iw * sw;
      const scalar_t* ws = wo + kh * kW + kw;
      for (int64_t c = 0; c < C_in; ++c) acc += static_cast<A>(ws[c * kH * kW]) * static_cast<A>(xs[c * sc]);
    }
  }
  out[(n * C_out + o) * P + p] = static_cast<scalar_t>(acc);
}

at::Tensor masked_conv2d_at_cuda(const at::Tensor& x_cache, const c10::optional<at::Tensor>& x_new,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& mask, const at::Tensor& pos, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  const auto sa = check_masked_conv2d_at("masked_conv2d_at", x_cache, x_new, weight, bias, mask, pos, padding,
                                         dilation);
  const auto& s = sa.conv;
  const int64_t P = sa.P;
  c10::cuda::CUDAGuard guard(x_cache.device());
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty({s.N, s.C_out, P}, x_cache.options());
  if (s.N == 0 || P == 0) return out;
  const auto pos_c = pos.contiguous();
  const auto w_eff = (weight * mask.to(weight.scalar_type())).contiguous();
  // (kH * kW,) live-tap flags, on the device: two small launches, no host read (graph capture).
  const auto live = mask.ne(0).flatten(0, 1).any(0).contiguous();
  const auto b_c = has_bias ? bias->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_cache.scalar_type(), "masked_conv2d_at_cuda", [&] {
    scalar_t* xc = x_cache.data_ptr<scalar_t>();
    if (x_new.has_value() && x_new->defined()) {
      const auto xn = x_new->contiguous();
      const int64_t total = s.N * s.C_in * P;
      const int blocks = static_cast<int>((total + threads - 1) / threads);
      masked_conv2d_at_scatter_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          xc, xn.data_ptr<scalar_t>(), pos_c.data_ptr<int64_t>(), s.N, s.C_in, P, s.H, s.W, x_cache.stride(0),
          x_cache.stride(1), x_cache.stride(2), x_cache.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = s.N * s.C_out * P;
    const int blocks = static_cast<int>((total + threads - 1) / threads);
    masked_conv2d_at_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        xc, w_eff.data_ptr<scalar_t>(), has_bias ? b_c.data_ptr<scalar_t>() : nullptr, live.data_ptr<bool>(),
        pos_c.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), s.N, s.C_in, s.C_out, P, s.H, s.W, s.kH, s.kW, s.pad_h, s.pad_w, s.dil_h, s.dil_w,
        x_cache.stride(0), x_cache.stride(1), x_cache.stride(2), x_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) { m.impl("masked_conv2d_at", &masked_conv2d_at_cuda); }

}  // namespace fastar
