// CUDA kernel of gated_pixelcnn_step (contract: fastar/ops/pixel_step.py; layouts: csrc/pixel_step.h).
//
// ONE launch per pixel step. A CTA owns ROWS batch rows (rows are independent within a
// step) and walks every block, then the head and the draw, with its activations in shared
// memory and __syncthreads between stages. Every matrix is stored input-major (K, O), so
// the threads of a GEMV take consecutive outputs and read consecutive addresses of a weight
// row (coalesced, from L2 after the first CTA); when a matrix has fewer outputs than the
// CTA has threads, the inputs are split into S slices whose partial sums meet in shared
// memory, so every thread keeps loads in flight. Each weight element loaded serves the
// CTA's ROWS rows.
//
// The step index t is read from step[0] on the device and the last CTA to finish (an
// arrival counter in step[1], reset by that CTA) advances it, so one call is one launch
// and a CUDA-graph replay advances on its own. float32 and float64 (sums in the same dtype).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/categorical.h"
#include "pixel_step.h"

namespace fastar {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float dtanh(float v) { return tanhf(v); }
__device__ __forceinline__ double dtanh(double v) { return tanh(v); }
__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
// Unfused multiply then subtract, as the PyTorch reference computes val * scale - 1
// (nvcc would otherwise contract it into an FMA and round differently).
__device__ __forceinline__ float scale_sub(float v, float s) { return __fsub_rn(__fmul_rn(v, s), 1.0f); }
__device__ __forceinline__ double scale_sub(double v, double s) { return __dsub_rn(__dmul_rn(v, s), 1.0); }

template <typename T>
struct Args {
  T* image;
  T* row_cache;
  int64_t* codes;
  int64_t* step;
  T* logits;
  const T *noise, *links, *class_bias, *cond_map, *map_w;
  const int64_t* prefix;
  const bool* given;
  const T *h_w, *h_b, *so_w, *so_b, *head1_w, *head1_b, *head2_w, *head2_b;
  int64_t N, Ci, H, W, L, C, K, T0, T1, Cc, levels;
  int64_t kmax, omax;  // shared-memory strides: the widest input vector, the widest GEMV output
  uint32_t residual;   // bit l set: block l is residual (L <= 32, checked; the engine falls back beyond)
  double temperature;
  T scale;
};

// part[(s * ROWS + r) * O + o] = sum over input slice s of x[r * xs + k] * w[k * ldw + o].
// Returns S, the number of slices (the caller sums them after a __syncthreads).
template <typename T, int ROWS>
__device__ __forceinline__ int gemv_part(const T* __restrict__ w, int64_t ldw, int K, int O, const T* x, int xs,
                                         T* part) {
  const int S = O >= kThreads ? 1 : kThreads / O;
  const int chunk = (K + S - 1) / S;
  for (int idx = threadIdx.x; idx < O * S; idx += kThreads) {
    const int o = idx % O, s = idx / O;
    const int k0 = s * chunk, k1 = min(K, k0 + chunk);
    T acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = T(0);
    for (int k = k0; k < k1; ++k) {
      const T wv = w[static_cast<int64_t>(k) * ldw + o];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] += x[r * xs + k] * wv;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) part[(s * ROWS + r) * O + o] = acc[r];
  }
  return S;
}

template <typename T, int ROWS>
__device__ __forceinline__ T part_sum(const T* part, int S, int O, int r, int o) {
  T v = T(0);
  for (int s = 0; s < S; ++s) v += part[(s * ROWS + r) * O + o];
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// One warp draws one row with the one categorical pick (common/categorical.h, warp form: the
// same roundings in the same order as the CPU kernel and the reference); temperature 0 = first
// argmax. A binary row is the two categories (0, logit).
template <typename T>
__device__ int64_t warp_pick(const T* lg, int K, bool binary, double temperature, T u) {
  const int Kc = binary ? 2 : K;
  auto at = [&](int k) -> T { return binary ? (k == 0 ? T(0) : lg[0]) : lg[k]; };
  if (temperature == 0.0) return cat::warp_argmax_first<T>(at, Kc);
  return cat::warp_categorical_pick<T>(at, Kc, static_cast<T>(temperature), u);
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads) gated_pixelcnn_step_kernel(Args<T> A) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  const int C = static_cast<int>(A.C), C2 = 2 * C, K = static_cast<int>(A.K);
  const int kmax = static_cast<int>(A.kmax);
  T* h = sm;                       // (ROWS, C) the current block's horizontal input
  T* skip = h + ROWS * C;          // (ROWS, C)
  T* g = skip + ROWS * C;          // (ROWS, C) gate output / head activations
  T* y = g + ROWS * C;             // (ROWS, C)
  T* hp = y + ROWS * C;            // (ROWS, C2) pre-activation
  T* lg = hp + ROWS * C2;          // (ROWS, K)
  T* xin = lg + ROWS * K;          // (ROWS, kmax) gathered taps / map vector
  T* part = xin + ROWS * kmax;     // (ROWS, max(threads, omax)) split-K partial sums

  const int64_t t = A.step[0];
  const int64_t N = A.N, W = A.W, HW = A.H * A.W;
  const int64_t c = t % A.Ci, p = t / A.Ci, i = p / W, j = p % W, flat = c * HW + p;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int tid = threadIdx.x;

  for (int idx = tid; idx < ROWS * C; idx += kThreads) h[idx] = skip[idx] = T(0);
  __syncthreads();
  int64_t off = 0;
  for (int64_t l = 0; l < A.L; ++l) {
    const int taps = static_cast<int>(l == 0 ? A.T0 : A.T1), cin = static_cast<int>(l == 0 ? A.Ci : A.C);
    const int Kl = taps * cin;
    for (int idx = tid; idx < ROWS * Kl; idx += kThreads) {
      const int r = idx / Kl, k = idx % Kl, a = k / cin, q = k % cin;
      const int64_t n = n0 + r, col = j + a - (taps - 1);
      T v = T(0);
      if (n < N && col >= 0) {
        if (l == 0)
          v = A.image[((n * A.Ci + q) * A.H + i) * W + col];
        else if (col == j)
          v = h[r * C + q];
        else
          v = A.row_cache[(((l - 1) * N + n) * W + col) * C + q];
      }
      xin[r * kmax + k] = v;
    }
    if (l > 0) {
      for (int idx = tid; idx < ROWS * C; idx += kThreads) {
        const int r = idx / C, q = idx % C;
        const int64_t n = n0 + r;
        if (n < N) A.row_cache[(((l - 1) * N + n) * W + j) * C + q] = h[idx];
      }
    }
    __syncthreads();
    int S = gemv_part<T, ROWS>(A.h_w + off, C2, Kl, C2, xin, kmax, part);
    off += static_cast<int64_t>(Kl) * C2;
    __syncthreads();
    for (int idx = tid; idx < ROWS * C2; idx += kThreads) {
      const int r = idx / C2, o = idx % C2;
      const int64_t n = n0 + r;
      T v = A.h_b[l * C2 + o] + part_sum<T, ROWS>(part, S, C2, r, o);
      if (n < N) {
        v += A.links[((l * W + j) * N + n) * C2 + o];
        if (A.class_bias) v += A.class_bias[(l * N + n) * C2 + o];
      }
      hp[idx] = v;
    }
    if (A.cond_map) {
      const int Cc = static_cast<int>(A.Cc);
      for (int idx = tid; idx < ROWS * Cc; idx += kThreads) {
        const int r = idx / Cc, k = idx % Cc;
        const int64_t n = n0 + r;
        xin[r * kmax + k] = n < N ? A.cond_map[(n * HW + p) * Cc + k] : T(0);
      }
      __syncthreads();
      S = gemv_part<T, ROWS>(A.map_w + l * Cc * C2, C2, Cc, C2, xin, kmax, part);
      __syncthreads();
      for (int idx = tid; idx < ROWS * C2; idx += kThreads)
        hp[idx] += part_sum<T, ROWS>(part, S, C2, idx / C2, idx % C2);
    }
    __syncthreads();
    for (int idx = tid; idx < ROWS * C; idx += kThreads) {
      const int r = idx / C, q = idx % C;
      const T b = hp[r * C2 + C + q];
      g[idx] = dtanh(hp[r * C2 + q]) * (T(1) / (T(1) + dexp(-b)));
    }
    __syncthreads();
    S = gemv_part<T, ROWS>(A.so_w + l * C * C2, C2, C, C2, g, C, part);
    __syncthreads();
    const bool res = (A.residual >> l) & 1u;
    for (int idx = tid; idx < ROWS * C2; idx += kThreads) {
      const int r = idx / C2, o = idx % C2;
      const T v = A.so_b[l * C2 + o] + part_sum<T, ROWS>(part, S, C2, r, o);
      if (o < C)
        skip[r * C + o] += v;
      else
        h[r * C + o - C] = res ? v + h[r * C + o - C] : v;
    }
    __syncthreads();
  }
  // Head: ReLU, 1x1, ReLU, 1x1, only colour c's K logits.
  for (int idx = tid; idx < ROWS * C; idx += kThreads) g[idx] = max(skip[idx], T(0));
  __syncthreads();
  int S = gemv_part<T, ROWS>(A.head1_w, C, C, C, g, C, part);
  __syncthreads();
  for (int idx = tid; idx < ROWS * C; idx += kThreads)
    y[idx] = max(A.head1_b[idx % C] + part_sum<T, ROWS>(part, S, C, idx / C, idx % C), T(0));
  __syncthreads();
  S = gemv_part<T, ROWS>(A.head2_w + c * K, A.Ci * K, C, K, y, C, part);
  __syncthreads();
  for (int idx = tid; idx < ROWS * K; idx += kThreads) {
    const int r = idx / K, o = idx % K;
    const int64_t n = n0 + r;
    const T v = A.head2_b[c * K + o] + part_sum<T, ROWS>(part, S, K, r, o);
    lg[idx] = v;
    if (n < N) A.logits[n * K + o] = v;
  }
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32;
  for (int r = warp; r < ROWS; r += kWarps) {
    const int64_t n = n0 + r;
    if (n >= N) continue;  // warp-uniform
    int64_t val = warp_pick<T>(lg + r * K, K, A.levels == 2, A.temperature, A.noise[t * N + n]);
    if (lane == 0) {
      if (A.given && A.given[n * HW * A.Ci + flat]) val = A.prefix[n * HW * A.Ci + flat];
      A.codes[n * HW * A.Ci + flat] = val;
      A.image[((n * A.Ci + c) * A.H + i) * W + j] = scale_sub(static_cast<T>(val), A.scale);
    }
  }
  // Every thread of this CTA read t above; the last CTA to arrive advances it.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    auto* arrivals = reinterpret_cast<unsigned long long*>(A.step + 1);
    const unsigned long long prev = atomicAdd(arrivals, 1ull);
    if (prev == static_cast<unsigned long long>(gridDim.x) - 1ull) {
      A.step[0] = t + 1;
      *arrivals = 0ull;
    }
  }
}

template <typename T, int ROWS>
void launch(const Args<T>& A, int64_t smem_per_row_elems, int64_t part_elems, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(ROWS * (smem_per_row_elems + part_elems)) * sizeof(T);
  const int dev_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= static_cast<size_t>(dev_max), "gated_pixelcnn_step: the CUDA kernel needs ", smem,
              " bytes of shared memory for ", ROWS, " rows per block, the device offers ", dev_max,
              "; use fewer channels/levels or the per-op path (cached_sample(..., fused=False))");
  auto kernel = gated_pixelcnn_step_kernel<T, ROWS>;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t grid = (A.N + ROWS - 1) / ROWS;
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gated_pixelcnn_step_cuda(at::Tensor& image, at::Tensor& row_cache, at::Tensor& codes, at::Tensor& step,
                              at::Tensor& logits, const at::Tensor& noise, const at::Tensor& links,
                              const c10::optional<at::Tensor>& prefix, const c10::optional<at::Tensor>& given,
                              const c10::List<c10::optional<at::Tensor>>& pack, at::IntArrayRef config,
                              double temperature) {
  const char* op = "gated_pixelcnn_step";
  const auto a = parse_gated_pixelcnn_step(op, image, row_cache, codes, step, logits, noise, links, prefix, given,
                                           pack, config, temperature);
  const GatedStepShape& s = a.s;
  const at::Tensor& h_b = a.h_b;
  TORCH_CHECK(h_b.is_cuda(), op, ": the CUDA kernel got tensors on ", h_b.device());
  TORCH_CHECK(s.L <= 32, op, ": the CUDA kernel supports at most 32 blocks, got ", s.L);
  const c10::cuda::CUDAGuard guard(h_b.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t kmax = std::max({s.T0 * s.Ci, s.T * s.C, s.Cc, s.C});
  const int64_t omax = std::max<int64_t>({kThreads, s.C2, s.K});
  const int64_t per_row = 4 * s.C + s.C2 + s.K + kmax;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES(h_b.scalar_type(), "gated_pixelcnn_step_cuda", [&] {
    Args<scalar_t> A{};
    A.image = image.data_ptr<scalar_t>();
    A.row_cache = row_cache.data_ptr<scalar_t>();
    A.codes = codes.data_ptr<int64_t>();
    A.step = step.data_ptr<int64_t>();
    A.logits = logits.data_ptr<scalar_t>();
    A.noise = noise.data_ptr<scalar_t>();
    A.links = links.data_ptr<scalar_t>();
    A.class_bias = opt_ptr<scalar_t>(a.class_bias);
    A.cond_map = opt_ptr<scalar_t>(a.cond_map);
    A.map_w = opt_ptr<scalar_t>(a.map_w);
    A.prefix = opt_ptr<int64_t>(prefix);
    A.given = opt_ptr<bool>(given);
    A.h_w = a.h_w.data_ptr<scalar_t>();
    A.h_b = h_b.data_ptr<scalar_t>();
    A.so_w = a.so_w.data_ptr<scalar_t>();
    A.so_b = a.so_b.data_ptr<scalar_t>();
    A.head1_w = a.head1_w.data_ptr<scalar_t>();
    A.head1_b = a.head1_b.data_ptr<scalar_t>();
    A.head2_w = a.head2_w.data_ptr<scalar_t>();
    A.head2_b = a.head2_b.data_ptr<scalar_t>();
    A.N = s.N, A.Ci = s.Ci, A.H = s.H, A.W = s.W, A.L = s.L, A.C = s.C, A.K = s.K;
    A.T0 = s.T0, A.T1 = s.T, A.Cc = s.Cc, A.levels = s.levels;
    A.kmax = kmax, A.omax = omax;
    A.residual = 0;
    for (int64_t l = 0; l < s.L; ++l)
      if (s.residual[l]) A.residual |= 1u << l;
    A.temperature = temperature;
    A.scale = static_cast<scalar_t>(2.0 / static_cast<double>(s.levels - 1));
    // Rows per CTA: one while the batch fits the SMs (latency), more once it does not (each
    // weight loaded from L2 then serves several rows).
    if (s.N <= sms)
      launch<scalar_t, 1>(A, per_row, omax, stream);
    else if (s.N <= 2 * sms)
      launch<scalar_t, 2>(A, per_row, omax, stream);
    else
      launch<scalar_t, 4>(A, per_row, omax, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) { m.impl("gated_pixelcnn_step", &gated_pixelcnn_step_cuda); }

}  // namespace fastar
