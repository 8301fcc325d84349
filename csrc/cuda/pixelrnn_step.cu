// CUDA kernel of pixelrnn_step (contract: fastar/ops/pixelrnn.py; layouts and checks:
// csrc/pixelrnn_step.h). ONE launch per sub-pixel: a CTA per batch row walks the first layer,
// every LSTM layer, the head and the draw, its vectors in shared memory and __syncthreads
// between stages; in each GEMV the threads take consecutive outputs of an input-major matrix
// (coalesced weight reads). The step index t is read from step[0] on the device and the last
// CTA to finish (an arrival counter in step[1], reset by that CTA) advances it, so a CUDA-graph
// replay advances on its own. float32 and float64 (sums in the same dtype).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/categorical.h"
#include "pixelrnn_step.h"

namespace fastar {
namespace {

constexpr int kRnnThreads = 256;

__device__ __forceinline__ float rtanh(float v) { return tanhf(v); }
__device__ __forceinline__ double rtanh(double v) { return tanh(v); }
__device__ __forceinline__ float rsig(float v) { return 1.0f / (1.0f + expf(-v)); }
__device__ __forceinline__ double rsig(double v) { return 1.0 / (1.0 + exp(-v)); }
__device__ __forceinline__ float rscale(float v, float s) { return __fsub_rn(__fmul_rn(v, s), 1.0f); }
__device__ __forceinline__ double rscale(double v, double s) { return __dsub_rn(__dmul_rn(v, s), 1.0); }

template <typename T>
struct RnnArgs {
  T *image, *logits, *hs, *cs, *xrow;
  int64_t *codes, *step;
  const T *aux, *noise, *in_w, *in_b, *class_bias, *is_w, *is_b, *ss_w, *out_w, *out_b, *head1_w, *head1_b,
      *head2_w, *head2_b;
  const int64_t* prefix;
  const bool* given;
  int64_t N, Ci, H, W, L, h, F, P, K, levels, kind;
  bool residual;
  double temperature;
  T scale;
};

// out[o] += sum_k x[k] * w[k * ldw + o] for o < O (each thread its outputs; the caller syncs).
template <typename T>
__device__ __forceinline__ void gemv_acc(const T* __restrict__ w, int64_t ldw, int K, int O, const T* x, T* out) {
  for (int o = threadIdx.x; o < O; o += kRnnThreads) {
    T acc = out[o];
    for (int k = 0; k < K; ++k) acc += x[k] * w[static_cast<int64_t>(k) * ldw + o];
    out[o] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRnnThreads) pixelrnn_step_kernel(RnnArgs<T> A) {
  extern __shared__ unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  const int64_t h = A.h, h2 = 2 * h, h4 = 4 * h, N = A.N, H = A.H, W = A.W, Ci = A.Ci, K = A.K, F = A.F;
  T* x = sm;              // 2h: the residual stream
  T* z = x + h2;          // 4h: pre-activations
  T* hv = z + h4;         // h: the layer's output before the 1x1
  T* y = hv + h;          // 2h
  T* xin = y + h2;        // Ci: one tap's pixel
  T* lg = xin + Ci;       // K
  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x;
  const int64_t t = A.step[0];
  const int64_t c = t % Ci, p = t / Ci, i = p / W, j = p % W, flat = c * H * W + p, R = F / 2;
  auto st = [&](int64_t l, int64_t ii, int64_t jj) { return (((l * H + ii) * W + jj) * N + n) * h; };
  // 1. the first layer's mask-A convolution at (i, j) (+ the class bias)
  for (int64_t q = tid; q < h2; q += kRnnThreads) x[q] = A.in_b[q] + (A.class_bias ? A.class_bias[n * h2 + q] : T(0));
  __syncthreads();
  for (int64_t ty = 0; ty <= R; ++ty) {
    const int64_t row = i - R + ty;
    if (row < 0) continue;
    for (int64_t tx = 0; tx < (ty == R ? R + 1 : F); ++tx) {
      const int64_t col = j - R + tx;
      if (col < 0 || col >= W) continue;
      for (int64_t q = tid; q < Ci; q += kRnnThreads) xin[q] = A.image[((n * Ci + q) * H + row) * W + col];
      __syncthreads();
      gemv_acc<T>(A.in_w + (ty * F + tx) * Ci * h2, h2, static_cast<int>(Ci), static_cast<int>(h2), xin, x);
      __syncthreads();
    }
  }
  // 2. the LSTM layers
  for (int64_t l = 0; l < A.L; ++l) {
    for (int64_t q = tid; q < h2; q += kRnnThreads) A.xrow[((l * W + j) * N + n) * h2 + q] = x[q];
    for (int64_t q = tid; q < h4; q += kRnnThreads)
      z[q] = A.is_b[l * h4 + q] + (A.kind == 1 ? A.aux[((l * W + j) * N + n) * h4 + q] : T(0));
    __syncthreads();  // xrow's column j is read back below (kind 1)
    if (A.kind == 0) {
      gemv_acc<T>(A.is_w + l * h2 * h4, h4, static_cast<int>(h2), static_cast<int>(h4), x, z);
      if (i > 0) gemv_acc<T>(A.ss_w + l * h2 * h4, h4, static_cast<int>(h), static_cast<int>(h4), A.hs + st(l, i - 1, j), z);
      if (j > 0)
        gemv_acc<T>(A.ss_w + l * h2 * h4 + h * h4, h4, static_cast<int>(h), static_cast<int>(h4), A.hs + st(l, i, j - 1), z);
    } else {
      for (int64_t a = 0; a <= A.P; ++a) {
        const int64_t col = j - A.P + a;
        if (col < 0) continue;
        gemv_acc<T>(A.is_w + (l * (A.P + 1) + a) * h2 * h4, h4, static_cast<int>(h2), static_cast<int>(h4),
                    A.xrow + ((l * W + col) * N + n) * h2, z);
      }
    }
    __syncthreads();
    const bool has_prev = A.kind == 0 ? j > 0 : i > 0;
    const T* cp = has_prev ? A.cs + (A.kind == 0 ? st(l, i, j - 1) : st(l, i - 1, j)) : nullptr;
    for (int64_t q = tid; q < h; q += kRnnThreads) {
      const T ig = rsig(z[q]), fg = rsig(z[h + q]), og = rsig(z[2 * h + q]), gg = rtanh(z[3 * h + q]);
      const T cn = fg * (cp ? cp[q] : T(0)) + ig * gg;
      const T hn = og * rtanh(cn);
      A.cs[st(l, i, j) + q] = cn;
      A.hs[st(l, i, j) + q] = hn;
      hv[q] = A.kind == 0 && i > 0 ? hn + A.aux[st(l, i - 1, j) + q] : hn;
    }
    for (int64_t q = tid; q < h2; q += kRnnThreads) y[q] = A.out_b[l * h2 + q];
    __syncthreads();
    gemv_acc<T>(A.out_w + l * h * h2, h2, static_cast<int>(h), static_cast<int>(h2), hv, y);
    __syncthreads();
    for (int64_t q = tid; q < h2; q += kRnnThreads) x[q] = A.residual ? y[q] + x[q] : y[q];
    __syncthreads();
  }
  // 3. the head: ReLU, 1x1, ReLU, 1x1 (colour c's K logits)
  for (int64_t q = tid; q < h2; q += kRnnThreads) {
    x[q] = x[q] > T(0) ? x[q] : T(0);
    y[q] = A.head1_b[q];
  }
  __syncthreads();
  gemv_acc<T>(A.head1_w, h2, static_cast<int>(h2), static_cast<int>(h2), x, y);
  __syncthreads();
  for (int64_t q = tid; q < h2; q += kRnnThreads) y[q] = y[q] > T(0) ? y[q] : T(0);
  for (int64_t q = tid; q < K; q += kRnnThreads) lg[q] = A.head2_b[c * K + q];
  __syncthreads();
  gemv_acc<T>(A.head2_w + c * K, Ci * K, static_cast<int>(h2), static_cast<int>(K), y, lg);
  __syncthreads();
  for (int64_t q = tid; q < K; q += kRnnThreads) A.logits[n * K + q] = lg[q];
  // 4. the draw (warp 0, the one categorical pick) and its writes
  if (tid < 32) {
    const bool binary = A.levels == 2;
    const int Kc = binary ? 2 : static_cast<int>(K);
    auto at = [&](int k) -> T { return binary ? (k == 0 ? T(0) : lg[0]) : lg[k]; };
    const T u = A.noise[t * N + n];
    int64_t val = A.temperature == 0.0 ? cat::warp_argmax_first<T>(at, Kc)
                                       : cat::warp_categorical_pick<T>(at, Kc, static_cast<T>(A.temperature), u);
    if (tid == 0) {
      const int64_t T_ = Ci * H * W;
      if (A.given && A.given[n * T_ + flat]) val = A.prefix[n * T_ + flat];
      A.codes[n * T_ + flat] = val;
      A.image[((n * Ci + c) * H + i) * W + j] = rscale(static_cast<T>(val), A.scale);
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

void pixelrnn_step_cuda(at::Tensor& image, at::Tensor& codes, at::Tensor& step, at::Tensor& logits, at::Tensor& hs,
                        at::Tensor& cs, at::Tensor& xrow, const at::Tensor& aux, const at::Tensor& noise,
                        const c10::optional<at::Tensor>& prefix, const c10::optional<at::Tensor>& given,
                        const c10::List<c10::optional<at::Tensor>>& pack, at::IntArrayRef config, double temperature) {
  const char* op = "pixelrnn_step";
  const auto a = parse_pixelrnn_step(op, image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack,
                                     config, temperature);
  const RnnStepShape& s = a.s;
  TORCH_CHECK(image.is_cuda(), op, ": the CUDA kernel got tensors on ", image.device());
  const c10::cuda::CUDAGuard guard(image.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "pixelrnn_step_cuda", [&] {
    using T = scalar_t;
    auto cp = [&](int64_t k) { return opt_ptr<T>(a.w[k]); };
    RnnArgs<T> A{};
    A.image = image.data_ptr<T>();
    A.logits = logits.data_ptr<T>();
    A.hs = hs.data_ptr<T>();
    A.cs = cs.data_ptr<T>();
    A.xrow = xrow.data_ptr<T>();
    A.codes = codes.data_ptr<int64_t>();
    A.step = step.data_ptr<int64_t>();
    A.aux = aux.data_ptr<T>();
    A.noise = noise.data_ptr<T>();
    A.in_w = cp(RnnPack::in_w);
    A.in_b = cp(RnnPack::in_b);
    A.class_bias = cp(RnnPack::class_bias);
    A.is_w = cp(RnnPack::is_w);
    A.is_b = cp(RnnPack::is_b);
    A.ss_w = cp(RnnPack::ss_w);
    A.out_w = cp(RnnPack::out_w);
    A.out_b = cp(RnnPack::out_b);
    A.head1_w = cp(RnnPack::head1_w);
    A.head1_b = cp(RnnPack::head1_b);
    A.head2_w = cp(RnnPack::head2_w);
    A.head2_b = cp(RnnPack::head2_b);
    A.prefix = opt_ptr<int64_t>(prefix);
    A.given = opt_ptr<bool>(given);
    A.N = s.N;
    A.Ci = s.Ci;
    A.H = s.H;
    A.W = s.W;
    A.L = s.L;
    A.h = s.hid;
    A.F = s.F;
    A.P = s.P;
    A.K = s.K;
    A.levels = s.levels;
    A.kind = s.kind;
    A.residual = s.residual;
    A.temperature = temperature;
    A.scale = static_cast<T>(2.0 / static_cast<double>(s.levels - 1));
    const size_t smem = static_cast<size_t>(10 * s.hid + s.Ci + s.K) * sizeof(T);
    const int dev_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= static_cast<size_t>(dev_max), op, ": the CUDA kernel needs ", smem,
                " bytes of shared memory, the device offers ", dev_max,
                "; use the per-op path (cached_sample(..., fused=False))");
    auto kernel = pixelrnn_step_kernel<T>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(s.N), kRnnThreads, smem, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) { m.impl("pixelrnn_step", &pixelrnn_step_cuda); }

}  // namespace fastar
