// MADE's degree-bucket sampler on CUDA (contract: fastar/ops/made.py; layouts: csrc/made.h).
//
// One launch for all the steps: a CTA per example loops over the steps (the examples are independent,
// so no grid barrier). Per step: thread 0 forms the step's parameters (the mixture conditional when
// K > 1) and draws with the shared categorical rule (csrc/common/categorical.h); the CTA's threads push
// the new input into the output suffix (direct) and into layer 1's units of degree >= t + 1; then,
// layer by layer, the units of degree t + 1 take their ReLU and the threads push them (each thread one
// column of the suffix above, summing over the new units in order) into the next layer or the outputs. The step index is read from `position` on the device; the host adds num_steps to it
// after the launch (an ATen add on the same stream), so the call captures in a CUDA graph.
//
// Compiled here; not yet run on a GPU (tests/ops/test_made.py holds it to the reference when one is
// present).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/acc_type.h"
#include "common/categorical.h"
#include "made.h"

namespace fastar {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLayers = 8;

struct MadeArgs {
  int64_t K, N, D, P, L, levels, steps, Hall;
  int64_t H[kMaxLayers], off[kMaxLayers + 2];
  const void* W[kMaxLayers];  // Wt_l (K, H_{l-1}, H_l)
  const void* wo;
  const void* dw;
};

template <typename T>
__device__ __forceinline__ T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - log1p(exp(-fabs(x)));
}

template <typename T>
__global__ void made_kernel(MadeArgs a, const int64_t* __restrict__ position, int64_t* __restrict__ codes,
                            T* __restrict__ hidden, T* __restrict__ acc, T* __restrict__ logw, T* __restrict__ params,
                            const T* __restrict__ noise, const int64_t* __restrict__ given,
                            const bool* __restrict__ gmask, const int64_t* __restrict__ counts, T temp) {
  const int64_t n = blockIdx.x;
  const int64_t K = a.K, N = a.N, D = a.D, P = a.P, L = a.L, DP = D * P, Hall = a.Hall;
  __shared__ T s_x;
  const int64_t t0 = position[0];
  for (int64_t t = t0; t < t0 + a.steps; ++t) {
    const int64_t c0 = (t + 1) * P;
    if (threadIdx.x == 0) {
      T* pr = params + n * P;
      if (K == 1) {
        for (int64_t v = 0; v < P; ++v) pr[v] = acc[n * DP + t * P + v];
      } else if (P == 1) {
        T m1 = -INFINITY, m0 = -INFINITY;
        for (int64_t k = 0; k < K; ++k) {
          const T l = acc[(k * N + n) * DP + t], w = logw[k * N + n];
          m1 = max(m1, w + log_sigmoid(l));
          m0 = max(m0, w + log_sigmoid(-l));
        }
        T s1 = 0, s0 = 0;
        for (int64_t k = 0; k < K; ++k) {
          const T l = acc[(k * N + n) * DP + t], w = logw[k * N + n];
          s1 += exp(w + log_sigmoid(l) - m1);
          s0 += exp(w + log_sigmoid(-l) - m0);
        }
        pr[0] = (m1 + log(s1)) - (m0 + log(s0));
      } else {
        for (int64_t v = 0; v < P; ++v) pr[v] = -INFINITY;
        for (int64_t k = 0; k < K; ++k) {
          const T* l = acc + (k * N + n) * DP + t * P;
          T m = l[0];
          for (int64_t v = 1; v < P; ++v) m = max(m, l[v]);
          T z = 0;
          for (int64_t v = 0; v < P; ++v) z += exp(l[v] - m);
          const T base = logw[k * N + n] - m - log(z);
          for (int64_t v = 0; v < P; ++v) {  // running log-sum-exp over the components
            const T y = l[v] + base, q = pr[v];
            const T hi = max(q, y), lo = min(q, y);
            pr[v] = hi == -INFINITY ? hi : hi + log1p(exp(lo - hi));
          }
        }
      }
      int64_t x;
      if (gmask && gmask[n * D + t]) {
        x = given[n * D + t];
      } else {
        const T u = noise[t * N + n];
        if (P == 1) {
          const T l = pr[0];
          x = cat::categorical_draw<T>([&](int64_t j) { return j == 0 ? T(0) : l; }, 2, temp, u);
        } else {
          x = cat::categorical_draw<T>([&](int64_t j) { return pr[j]; }, P, temp, u);
        }
      }
      codes[n * D + t] = x;
      for (int64_t k = 0; k < K; ++k) {
        if (K > 1) {
          const T* l = acc + (k * N + n) * DP + t * P;
          T lp;
          if (P == 1) {
            lp = log_sigmoid(x == 1 ? l[0] : -l[0]);
          } else {
            T m = l[0];
            for (int64_t v = 1; v < P; ++v) m = max(m, l[v]);
            T z = 0;
            for (int64_t v = 0; v < P; ++v) z += exp(l[v] - m);
            lp = l[x] - m - log(z);
          }
          logw[k * N + n] += lp;
        }
        const T xv = static_cast<T>(x) / static_cast<T>(a.levels - 1);
        hidden[(k * N + n) * Hall + t] = xv;
      }
      s_x = static_cast<T>(x) / static_cast<T>(a.levels - 1);
    }
    __syncthreads();
    const T xv = s_x;
    for (int64_t k = 0; k < K; ++k) {
      T* ac = acc + (k * N + n) * DP;
      T* h = hidden + (k * N + n) * Hall;
      if (xv != T(0)) {
        if (a.dw) {
          const T* dw = static_cast<const T*>(a.dw) + (k * D + t) * DP;
          for (int64_t c = c0 + threadIdx.x; c < DP; c += blockDim.x) ac[c] += xv * dw[c];
        }
        const int64_t a1 = counts[(k * L) * (D + 1) + t];
        const T* w1 = static_cast<const T*>(a.W[0]) + (k * D + t) * a.H[0];
        for (int64_t u = a1 + threadIdx.x; u < a.H[0]; u += blockDim.x) h[a.off[1] + u] += xv * w1[u];
      }
      __syncthreads();
      for (int64_t l = 0; l < L; ++l) {
        const int64_t* cnt = counts + (k * L + l) * (D + 1);
        const int64_t u0 = cnt[t], u1 = cnt[t + 1];
        if (u0 == u1) continue;
        T* hl = h + a.off[l + 1];
        for (int64_t u = u0 + threadIdx.x; u < u1; u += blockDim.x) hl[u] = hl[u] > T(0) ? hl[u] : T(0);
        __syncthreads();
        if (l < L - 1) {
          const int64_t a2 = counts[(k * L + l + 1) * (D + 1) + t], Hn = a.H[l + 1];
          const T* w = static_cast<const T*>(a.W[l + 1]) + k * a.H[l] * Hn;
          T* hn = h + a.off[l + 2];
          for (int64_t v = a2 + threadIdx.x; v < Hn; v += blockDim.x) {
            T sum = hn[v];
            for (int64_t u = u0; u < u1; ++u) sum += hl[u] * w[u * Hn + v];
            hn[v] = sum;
          }
        } else {
          const T* wo = static_cast<const T*>(a.wo) + k * a.H[l] * DP;
          for (int64_t c = c0 + threadIdx.x; c < DP; c += blockDim.x) {
            T sum = ac[c];
            for (int64_t u = u0; u < u1; ++u) sum += hl[u] * wo[u * DP + c];
            ac[c] = sum;
          }
        }
        __syncthreads();
      }
    }
    __syncthreads();
  }
}

void made_sample_steps_cuda(at::Tensor codes, at::Tensor hidden, at::Tensor acc, at::Tensor logw, at::Tensor position,
                            at::Tensor params, const at::Tensor& noise, const c10::optional<at::Tensor>& given,
                            const c10::optional<at::Tensor>& given_mask, const at::Tensor& counts, at::TensorList pack,
                            at::IntArrayRef config, double temperature) {
  const MadeShape s = parse_made(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config);
  TORCH_CHECK(codes.is_cuda(), "made_sample_steps: the CUDA kernel got tensors on ", codes.device());
  TORCH_CHECK(s.L <= kMaxLayers, "made_sample_steps: the CUDA kernel takes at most ", kMaxLayers, " hidden layers, got ",
              s.L);
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "made_sample_steps: temperature must be finite and >= 0");
  if (s.N == 0 || s.steps == 0) return;
  c10::cuda::CUDAGuard guard(codes.device());
  MadeArgs a{};
  a.K = s.K; a.N = s.N; a.D = s.D; a.P = s.P; a.L = s.L; a.levels = s.levels; a.steps = s.steps; a.Hall = s.Hall;
  for (int64_t l = 0; l < s.L; ++l) {
    a.H[l] = s.H[l];
    a.W[l] = pack[l].data_ptr();
  }
  for (size_t i = 0; i < s.off.size(); ++i) a.off[i] = s.off[i];
  a.wo = pack[s.L].data_ptr();
  a.dw = s.direct ? pack[s.L + 1].data_ptr() : nullptr;
  const int64_t* gv = s.given ? given->data_ptr<int64_t>() : nullptr;
  const bool* gm = s.given ? given_mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pack[0].scalar_type(), "made_sample_steps_cuda", [&] {
    made_kernel<scalar_t><<<static_cast<unsigned>(s.N), kThreads, 0, stream>>>(
        a, position.data_ptr<int64_t>(), codes.data_ptr<int64_t>(), hidden.data_ptr<scalar_t>(),
        acc.data_ptr<scalar_t>(), logw.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
        gv, gm, counts.data_ptr<int64_t>(), static_cast<scalar_t>(temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  position.add_(s.steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) { m.impl("made_sample_steps", &made_sample_steps_cuda); }

}  // namespace fastar
