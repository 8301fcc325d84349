// CUDA kernels of the mixture / categorical family (layouts and the per-position
// math in mixture.h, shared with the CPU kernels).
//
// One thread per position. For the loss and the sampler, neighbouring threads
// handle neighbouring positions n of one image, so every read of a params
// channel (B, P, N) and every gradient write is coalesced. Half and bfloat16
// params are read as stored and all arithmetic runs in float32 (acc_t, common/acc_type.h); the
// loss, x, noise and samples are float32 for them (float64 for double params).
// No host-device synchronisation: every launch is asynchronous on the current
// stream and checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "mixture.h"

namespace fastar {
namespace {

using namespace mix;

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

template <typename scalar_t, typename T>
__global__ void dml_nll_kernel(const T* __restrict__ x, const scalar_t* __restrict__ params, T* __restrict__ out,
                               int64_t B, int64_t P, int64_t N, int64_t K, int C, DmlConst<T> k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i % N;
  const PixelParams<scalar_t> px{params + b * P * N + n, N};
  T xv[3];
  for (int c = 0; c < C; ++c) xv[c] = x[(b * C + c) * N + n];
  out[i] = C == 3 ? pixel_nll<T, scalar_t, 3>(px, xv, K, k) : pixel_nll<T, scalar_t, 1>(px, xv, K, k);
}

template <typename scalar_t, typename T>
__global__ void dml_nll_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                        const scalar_t* __restrict__ params, const T* __restrict__ nll,
                                        T* __restrict__ gx, scalar_t* __restrict__ gp, int64_t B, int64_t P,
                                        int64_t N, int64_t K, int C, DmlConst<T> k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i % N;
  const PixelParams<scalar_t> px{params + b * P * N + n, N};
  T xv[3], gxv[3] = {0, 0, 0};
  for (int c = 0; c < C; ++c) xv[c] = x[(b * C + c) * N + n];
  scalar_t* g0 = gp ? gp + b * P * N + n : nullptr;
  if (C == 3)
    pixel_nll_backward<T, scalar_t, 3>(px, xv, K, k, grad[i], nll[i], g0, gxv);
  else
    pixel_nll_backward<T, scalar_t, 1>(px, xv, K, k, grad[i], nll[i], g0, gxv);
  if (gx)
    for (int c = 0; c < C; ++c) gx[(b * C + c) * N + n] = gxv[c];
}

template <typename scalar_t, typename T>
__global__ void dml_sample_kernel(const scalar_t* __restrict__ params, const T* __restrict__ noise,
                                  T* __restrict__ out, int64_t B, int64_t P, int64_t N, int64_t K, int C, T temp,
                                  T half_bins, T bins) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i % N;
  const PixelParams<scalar_t> px{params + b * P * N + n, N};
  const T* u = noise + b * (1 + C) * N + n;
  T* dst = out + b * C * N + n;
  if (C == 3)
    pixel_sample<T, scalar_t, 3>(px, u, N, K, temp, half_bins, bins, dst, N);
  else
    pixel_sample<T, scalar_t, 1>(px, u, N, K, temp, half_bins, bins, dst, N);
}

// Order-preserving unsigned keys of floating values (for the top-k threshold).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ uint64_t order_key(double v) {
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(v));
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}
__device__ __forceinline__ double from_key(uint64_t k) {
  return __longlong_as_double(
      static_cast<long long>((k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k));
}

// The top_k-th largest of the K values (with multiplicity), by bisection on the
// bits of the ordered key: the largest key t with #{key >= t} >= top_k. Needs
// no per-thread array, so any K works; costs (bits of T) passes over K.
template <typename T, typename scalar_t>
__device__ T kth_largest(const scalar_t* src, int64_t stride, int64_t K, int64_t top_k) {
  using Key = decltype(order_key(T(0)));
  constexpr int kBits = sizeof(Key) * 8;
  Key prefix = 0;
  for (int bit = kBits - 1; bit >= 0; --bit) {
    const Key cand = prefix | (Key(1) << bit);
    int64_t cnt = 0;
    for (int64_t j = 0; j < K; ++j) cnt += order_key(static_cast<T>(src[j * stride])) >= cand;
    if (cnt >= top_k) prefix = cand;
  }
  return from_key(prefix);
}

template <typename scalar_t, typename T>
__global__ void categorical_sample_kernel(const scalar_t* __restrict__ logits, const T* __restrict__ noise,
                                          int64_t* __restrict__ out, int64_t O, int64_t K, int64_t I, T temp,
                                          int64_t top_k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= O * I) return;
  const int64_t oi = i / I, ii = i % I;
  const scalar_t* src = logits + oi * K * I + ii;
  const bool mask_top = top_k > 0 && top_k < K;
  const T kth = mask_top ? kth_largest<T>(src, I, K, top_k) : T(0);
  auto at = [&](int64_t j) {
    const T v = static_cast<T>(src[j * I]);
    return (mask_top && v < kth) ? T(-INFINITY) : v;
  };
  out[i] = temp == T(0) ? cat::argmax_first<T>(at, K) : cat::categorical_pick<T>(at, K, temp, noise[i]);
}

at::Tensor dml_nll_cuda(const at::Tensor& x, const at::Tensor& params, int64_t K, int64_t num_bits) {
  const int C = check_dml_nll("discretized_mix_logistic_nll", x, params, K, num_bits);
  const c10::cuda::CUDAGuard guard(params.device());
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  auto out = at::empty({B, N}, x.options());
  if (B * N == 0) return out;
  const auto xc = x.contiguous();
  const auto pc = params.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dml_nll_cuda", [&] {
    using T = acc_t<scalar_t>;
    dml_nll_kernel<scalar_t, T><<<num_blocks(B * N), kThreads, 0, stream>>>(
        xc.data_ptr<T>(), pc.data_ptr<scalar_t>(), out.data_ptr<T>(), B, P, N, K, C, dml_const<T>(num_bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dml_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& params, const at::Tensor& nll, int64_t K,
                                                         int64_t num_bits, std::array<bool, 2> output_mask) {
  const char* op = "discretized_mix_logistic_nll_backward";
  const int C = check_dml_nll(op, x, params, K, num_bits);
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  for (const auto* t : {&grad, &nll}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, N}) && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device(),
                op, ": grad and nll must be ", x.scalar_type(), " of shape [", B, ", ", N, "] on ", x.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  const c10::cuda::CUDAGuard guard(params.device());
  const bool need_x = output_mask[0], need_p = output_mask[1];
  auto gx = need_x ? at::empty({B, C, N}, x.options()) : at::empty({0}, x.options());
  auto gp = need_p ? at::empty({B, P, N}, params.options()) : at::empty({0}, params.options());
  if (B * N == 0 || (!need_x && !need_p)) return {gx, gp};
  const auto xc = x.contiguous();
  const auto pc = params.contiguous();
  const auto gc = grad.contiguous();
  const auto nc = nll.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dml_nll_backward_cuda", [&] {
    using T = acc_t<scalar_t>;
    dml_nll_backward_kernel<scalar_t, T><<<num_blocks(B * N), kThreads, 0, stream>>>(
        gc.data_ptr<T>(), xc.data_ptr<T>(), pc.data_ptr<scalar_t>(), nc.data_ptr<T>(),
        need_x ? gx.data_ptr<T>() : nullptr, need_p ? gp.data_ptr<scalar_t>() : nullptr, B, P, N, K, C,
        dml_const<T>(num_bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gp};
}

at::Tensor dml_sample_cuda(const at::Tensor& params, const at::Tensor& noise, int64_t K, int64_t num_bits,
                           double temperature) {
  const int C = check_dml_sample("sample_discretized_mix_logistic", params, noise, K, num_bits, temperature);
  const c10::cuda::CUDAGuard guard(params.device());
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  auto out = at::empty({B, C, N}, noise.options());
  if (B * N == 0) return out;
  const auto pc = params.contiguous();
  const auto uc = noise.contiguous();
  const double bins = std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "dml_sample_cuda", [&] {
    using T = acc_t<scalar_t>;
    dml_sample_kernel<scalar_t, T><<<num_blocks(B * N), kThreads, 0, stream>>>(
        pc.data_ptr<scalar_t>(), uc.data_ptr<T>(), out.data_ptr<T>(), B, P, N, K, C, static_cast<T>(temperature),
        static_cast<T>(bins / 2.0), static_cast<T>(bins));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor categorical_sample_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                   double temperature, int64_t top_k) {
  check_categorical("categorical_sample", logits, noise, temperature, top_k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t O = logits.size(0), K = logits.size(1), I = logits.size(2);
  auto out = at::empty({O, I}, logits.options().dtype(at::kLong));
  if (O * I == 0) return out;
  const auto lc = logits.contiguous();
  const bool has_noise = noise.has_value() && noise->defined();
  const auto uc = has_noise ? noise->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "categorical_sample_cuda", [&] {
    using T = acc_t<scalar_t>;
    categorical_sample_kernel<scalar_t, T><<<num_blocks(O * I), kThreads, 0, stream>>>(
        lc.data_ptr<scalar_t>(), has_noise ? uc.data_ptr<T>() : nullptr, out.data_ptr<int64_t>(), O, K, I,
        static_cast<T>(temperature), top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) {
  m.impl("discretized_mix_logistic_nll", &dml_nll_cuda);
  m.impl("discretized_mix_logistic_nll_backward", &dml_nll_backward_cuda);
  m.impl("sample_discretized_mix_logistic", &dml_sample_cuda);
  m.impl("categorical_sample", &categorical_sample_cuda);
}

}  // namespace fastar
