// CUDA kernels of the dilated-causal-queue family (see fastar/ops/wavenet.py for the contract).
//
// causal_conv1d_update: one thread per (batch row, output channel).
//
// wavenet_step: one launch per step covers the whole network and the sampling. A block owns
// ROWS batch rows and keeps their activations (h, gate input, z, skip, head) in shared memory;
// its threads split the output columns of every matrix, so each weight element loaded from
// L2 (the packed (in, out) layout makes consecutive threads read consecutive columns:
// coalesced) serves ROWS rows. The step index is read from the device tensor `position`
// (plus the launch's offset inside a multi-step call) and a one-thread kernel advances it
// after the last step, so a call is capturable in a CUDA graph and replays without the host.
// Weights may be float32, float64, float16 or bfloat16; activations, queues and sums are
// float32 (float64 for float64 weights). With num_mixtures > 0 the head is the discretized
// logistic mixture: the previous float value enters through in_w (1, R) and one thread per row
// draws with mix::pixel_sample (csrc/mixture.h), the per-position code of the mixture sampler.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixture.h"
#include "wavenet.h"

namespace fastar {
namespace {

template <typename T>
__global__ void causal_conv1d_update_kernel(const T* __restrict__ x, T* __restrict__ state,
                                            const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y,
                                            const int64_t* __restrict__ position, int64_t B, int64_t C_in,
                                            int64_t C_out, int64_t k, int64_t dil, int64_t N) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * C_out) return;
  const int64_t b = idx / C_out, o = idx % C_out;
  const int64_t pos = *position;
  T acc = bias ? bias[o] : T(0);
  const T* st = state + b * C_in * N;
  for (int64_t c = 0; c < C_in; ++c) {
    const T* wc = w + (o * C_in + c) * k;
    for (int64_t j = 0; j + 1 < k; ++j) {
      int64_t slot = (pos - (k - 1 - j) * dil) % N;
      if (slot < 0) slot += N;
      acc += wc[j] * st[c * N + slot];
    }
    acc += wc[k - 1] * x[b * C_in + c];
  }
  y[idx] = acc;
}

// The state write runs after every read of the step (a separate launch on the same stream).
template <typename T>
__global__ void causal_conv1d_push_kernel(const T* __restrict__ x, T* __restrict__ state,
                                          const int64_t* __restrict__ position, int64_t B, int64_t C_in, int64_t N) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * C_in) return;
  const int64_t slot = *position % N;
  state[idx * N + slot] = x[idx];
}

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, at::Tensor& state, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t dilation,
                                     const at::Tensor& position) {
  const auto s = check_causal_conv1d_update("causal_conv1d_update", x, state, weight, bias, dilation, position);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_update: the CUDA kernel supports float32 and float64, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({s.B, s.C_out}, x.options());
  if (s.B == 0) return y;
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto bc = has_bias ? bias->contiguous() : at::Tensor();
  const auto pc = position.reshape({1});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_update_cuda", [&] {
    const int threads = 256;
    const int64_t n = s.B * s.C_out;
    causal_conv1d_update_kernel<scalar_t><<<(n + threads - 1) / threads, threads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        has_bias ? bc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), s.B, s.C_in,
        s.C_out, s.k, s.dilation, s.N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.N > 0) {
      const int64_t m = s.B * s.C_in;
      causal_conv1d_push_kernel<scalar_t><<<(m + threads - 1) / threads, threads, 0, stream>>>(
          xc.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), s.B, s.C_in, s.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// wavenet_step

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ double to_acc(T v, double) {
  return static_cast<double>(v);
}

constexpr int kMaxLayers = 128;

template <typename W, typename A>
struct StepParams {
  int64_t* samples;  // softmax head: codes
  A* xs;             // mixture head: audio values
  A* queues;
  const int64_t* position;
  A* logits;
  const A* noise;
  const W* cond;
  const W *in_w, *in_b, *conv_w, *conv_b, *rs_w, *rs_b, *o1_w, *o1_b, *o2_w, *o2_b;
  // by value in the kernel parameters: no host-to-device copy, so a call graph-captures
  int64_t dil[kMaxLayers];
  int64_t offsets[kMaxLayers];
  int64_t B, T, L, k, R, D, S, A_, Tc, Ntot;
  int64_t num_prime, start;
  double temperature;
  int64_t K;  // num_mixtures; 0 = softmax head
  A half_bins, bins;
};

template <typename A>
__device__ __forceinline__ A dev_exp(A v) {
  return exp(v);
}
template <>
__device__ __forceinline__ float dev_exp<float>(float v) {
  return expf(v);
}

template <typename W, typename A, int ROWS>
__global__ void wavenet_step_kernel(StepParams<W, A> P, int64_t step_offset) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int64_t R = P.R, D = P.D, S = P.S, AA = P.A_, D2 = 2 * P.D, RS = P.R + P.S;
  A* h = sm;                   // ROWS x R
  A* a = h + ROWS * R;         // ROWS x 2D
  A* z = a + ROWS * D2;        // ROWS x D
  A* skip = z + ROWS * D;      // ROWS x S
  A* y1 = skip + ROWS * S;     // ROWS x S
  A* lg = y1 + ROWS * S;       // ROWS x A
  const int64_t p = *P.position + step_offset;
  if (p >= P.T) return;  // a replay past the end of the buffers does nothing
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int nr = static_cast<int>(P.B - b0 < ROWS ? P.B - b0 : ROWS);
  const int tid = threadIdx.x, nt = blockDim.x;
  const A zero = A(0);

  for (int r = 0; r < nr; ++r) {
    if (P.K > 0) {
      const A x = p > 0 ? P.xs[(b0 + r) * P.T + p - 1] : zero;
      for (int64_t i = tid; i < R; i += nt) h[r * R + i] = to_acc(P.in_w[i], zero) * x + to_acc(P.in_b[i], zero);
    } else {
      int64_t c = p > 0 ? P.samples[(b0 + r) * P.T + p - 1] : P.start;
      c = c < 0 ? 0 : (c >= AA ? AA - 1 : c);
      for (int64_t i = tid; i < R; i += nt)
        h[r * R + i] = to_acc(P.in_w[c * R + i], zero) + to_acc(P.in_b[i], zero);
    }
    for (int64_t i = tid; i < S; i += nt) skip[r * S + i] = zero;
  }
  __syncthreads();

  for (int64_t l = 0; l < P.L; ++l) {
    const int64_t d = P.dil[l], N = (P.k - 1) * d, off = P.offsets[l];
    const W* Wl = P.conv_w + l * P.k * R * D2;
    for (int64_t o = tid; o < D2; o += nt) {
      A acc[ROWS];
      const A bias = to_acc(P.conv_b[l * D2 + o], zero);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = bias;
      if (P.cond) {
        const int64_t tc = P.Tc == 1 ? 0 : p;
        for (int r = 0; r < nr; ++r) acc[r] += to_acc(P.cond[(((b0 + r) * P.Tc + tc) * P.L + l) * D2 + o], zero);
      }
      for (int64_t j = 0; j + 1 < P.k; ++j) {
        int64_t slot = (p - (P.k - 1 - j) * d) % N;
        if (slot < 0) slot += N;
        const W* Wj = Wl + j * R * D2;
        for (int64_t i = 0; i < R; ++i) {
          const A w = to_acc(Wj[i * D2 + o], zero);
#pragma unroll
          for (int r = 0; r < ROWS; ++r)
            if (r < nr) acc[r] += w * P.queues[((b0 + r) * P.Ntot + off + slot) * R + i];
        }
      }
      const W* Wc = Wl + (P.k - 1) * R * D2;
      for (int64_t i = 0; i < R; ++i) {
        const A w = to_acc(Wc[i * D2 + o], zero);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          if (r < nr) acc[r] += w * h[r * R + i];
      }
      for (int r = 0; r < nr; ++r) a[r * D2 + o] = acc[r];
    }
    __syncthreads();  // every tap of the queue is read before this step's entry overwrites one
    if (N > 0) {
      const int64_t slot = p % N;
      for (int r = 0; r < nr; ++r)
        for (int64_t i = tid; i < R; i += nt) P.queues[((b0 + r) * P.Ntot + off + slot) * R + i] = h[r * R + i];
    }
    for (int r = 0; r < nr; ++r)
      for (int64_t c = tid; c < D; c += nt) {
        const A f = a[r * D2 + c], g = a[r * D2 + D + c];
        z[r * D + c] = tanh(f) * (A(1) / (A(1) + dev_exp<A>(-g)));
      }
    __syncthreads();
    const W* Wr = P.rs_w + l * D * RS;
    for (int64_t o = tid; o < RS; o += nt) {
      A acc[ROWS];
      const A bias = to_acc(P.rs_b[l * RS + o], zero);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = bias;
      for (int64_t i = 0; i < D; ++i) {
        const A w = to_acc(Wr[i * RS + o], zero);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          if (r < nr) acc[r] += w * z[r * D + i];
      }
      for (int r = 0; r < nr; ++r) {
        if (o < R)
          h[r * R + o] += acc[r];
        else
          skip[r * S + o - R] += acc[r];
      }
    }
    __syncthreads();
  }

  for (int64_t o = tid; o < S; o += nt) {
    A acc[ROWS];
    const A bias = to_acc(P.o1_b[o], zero);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = bias;
    for (int64_t i = 0; i < S; ++i) {
      const A w = to_acc(P.o1_w[i * S + o], zero);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < nr) acc[r] += w * max(skip[r * S + i], zero);
    }
    for (int r = 0; r < nr; ++r) y1[r * S + o] = max(acc[r], zero);
  }
  __syncthreads();
  for (int64_t o = tid; o < AA; o += nt) {
    A acc[ROWS];
    const A bias = to_acc(P.o2_b[o], zero);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = bias;
    for (int64_t i = 0; i < S; ++i) {
      const A w = to_acc(P.o2_w[i * AA + o], zero);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < nr) acc[r] += w * y1[r * S + i];
    }
    for (int r = 0; r < nr; ++r) {
      lg[r * AA + o] = acc[r];
      P.logits[(b0 + r) * AA + o] = acc[r];
    }
  }
  __syncthreads();

  // Inverse-CDF draw (categorical_sample's contract), one thread per row: A is small and the
  // sequential cumulative sum keeps the kernel's rounding close to the reference's.
  if (P.K > 0) {
    if (tid < nr && p >= P.num_prime) {
      const int r = tid;
      const mix::PixelParams<A> pp{lg + r * AA, 1};
      mix::pixel_sample<A, A, 1>(pp, P.noise + (b0 + r) * 2 * P.T + p, P.T, P.K, static_cast<A>(P.temperature),
                                 P.half_bins, P.bins, P.xs + (b0 + r) * P.T + p, 1);
    }
    return;
  }
  if (tid < nr && p >= P.num_prime) {
    const int r = tid;
    const A* row = lg + r * AA;
    int64_t idx = 0;
    if (P.temperature == 0.0) {
      A m = row[0];
      for (int64_t i = 1; i < AA; ++i)
        if (row[i] > m) {
          m = row[i];
          idx = i;
        }
    } else {
      const A inv_t = A(1.0 / P.temperature);
      A m = row[0] * inv_t;
      for (int64_t i = 1; i < AA; ++i) m = max(m, row[i] * inv_t);
      double sum = 0;
      for (int64_t i = 0; i < AA; ++i) sum += dev_exp<A>(row[i] * inv_t - m);
      const A inv_sum = A(1.0 / sum);
      const A u = P.noise[(b0 + r) * P.T + p];
      double cdf = 0;
      int64_t last = 0;
      for (int64_t i = 0; i < AA; ++i) {
        const A pi = dev_exp<A>(row[i] * inv_t - m) * inv_sum;
        cdf += pi;
        if (static_cast<A>(cdf) <= u) idx = i + 1;
        if (pi > A(0)) last = i;
      }
      idx = idx < last ? idx : last;
    }
    P.samples[(b0 + r) * P.T + p] = idx;
  }
}

__global__ void advance_position_kernel(int64_t* position, int64_t n) { *position += n; }

template <typename W, typename A>
void launch_steps(const StepParams<W, A>& P, int64_t num_steps, cudaStream_t stream) {
  const int threads = 256;
  const size_t per_row = static_cast<size_t>(P.R + 3 * P.D + 2 * P.S + P.A_) * sizeof(A);
  // Several rows per block share each weight load once the batch fills the GPU anyway.
  if (P.B >= 512) {
    constexpr int ROWS = 4;
    const int blocks = static_cast<int>((P.B + ROWS - 1) / ROWS);
    const size_t smem = per_row * ROWS;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(wavenet_step_kernel<W, A, ROWS>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    for (int64_t i = 0; i < num_steps; ++i) {
      wavenet_step_kernel<W, A, ROWS><<<blocks, threads, smem, stream>>>(P, i);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    const int blocks = static_cast<int>(P.B);
    for (int64_t i = 0; i < num_steps; ++i) {
      wavenet_step_kernel<W, A, 1><<<blocks, threads, per_row, stream>>>(P, i);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void wavenet_step_cuda(at::Tensor& samples, at::Tensor& queues, at::Tensor& position, at::Tensor& logits,
                       const at::Tensor& noise, const c10::optional<at::Tensor>& cond, const at::Tensor& in_w,
                       const at::Tensor& in_b, const at::Tensor& conv_w, const at::Tensor& conv_b,
                       const at::Tensor& res_skip_w, const at::Tensor& res_skip_b, const at::Tensor& out1_w,
                       const at::Tensor& out1_b, const at::Tensor& out2_w, const at::Tensor& out2_b,
                       at::IntArrayRef dilations, int64_t num_prime, double temperature, int64_t start,
                       int64_t num_steps, int64_t num_mixtures, int64_t num_bits) {
  const char* op = "wavenet_step";
  const auto s = check_wavenet_step(op, samples, queues, position, logits, noise, cond, in_w, in_b, conv_w, conv_b,
                                    res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations, start,
                                    num_mixtures, num_bits);
  TORCH_CHECK(num_steps >= 1, op, ": num_steps must be at least 1, got ", num_steps);
  TORCH_CHECK(temperature >= 0, op, ": temperature must be non-negative, got ", temperature);
  const c10::cuda::CUDAGuard guard(conv_w.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = conv_w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(noise.scalar_type() == acc_type && noise.is_contiguous(), op, ": the CUDA kernel needs noise as a "
              "contiguous ", acc_type, " tensor (what the weights accumulate in), got ", noise.scalar_type());
  if (s.B > 0) {
    TORCH_CHECK(s.L <= kMaxLayers, op, ": the CUDA kernel supports at most ", kMaxLayers, " layers, got ", s.L);
    const auto cc = (cond.has_value() && cond->defined()) ? cond->contiguous() : at::Tensor();
    const auto iw = in_w.contiguous(), ib = in_b.contiguous(), cw = conv_w.contiguous(), cb = conv_b.contiguous(),
               rw = res_skip_w.contiguous(), rb = res_skip_b.contiguous(), o1w = out1_w.contiguous(),
               o1b = out1_b.contiguous(), o2w = out2_w.contiguous(), o2b = out2_b.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_w.scalar_type(), "wavenet_step_cuda", [&] {
      using W = scalar_t;
      auto run = [&](auto acc_tag) {
        using A = decltype(acc_tag);
        StepParams<W, A> P;
        P.samples = num_mixtures > 0 ? nullptr : samples.data_ptr<int64_t>();
        P.xs = num_mixtures > 0 ? samples.data_ptr<A>() : nullptr;
        P.queues = queues.data_ptr<A>();
        P.position = position.data_ptr<int64_t>();
        P.logits = logits.data_ptr<A>();
        P.noise = noise.data_ptr<A>();
        P.cond = cc.defined() ? cc.data_ptr<W>() : nullptr;
        P.in_w = iw.data_ptr<W>();
        P.in_b = ib.data_ptr<W>();
        P.conv_w = cw.data_ptr<W>();
        P.conv_b = cb.data_ptr<W>();
        P.rs_w = rw.data_ptr<W>();
        P.rs_b = rb.data_ptr<W>();
        P.o1_w = o1w.data_ptr<W>();
        P.o1_b = o1b.data_ptr<W>();
        P.o2_w = o2w.data_ptr<W>();
        P.o2_b = o2b.data_ptr<W>();
        for (int64_t l = 0; l < s.L; ++l) {
          P.dil[l] = dilations[l];
          P.offsets[l] = s.offsets[l];
        }
        P.B = s.B;
        P.T = s.T;
        P.L = s.L;
        P.k = s.k;
        P.R = s.R;
        P.D = s.D;
        P.S = s.S;
        P.A_ = s.A;
        P.Tc = s.Tc;
        P.Ntot = s.Ntot;
        P.num_prime = num_prime;
        P.start = start;
        P.temperature = temperature;
        P.K = num_mixtures;
        const double bins = std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0;
        P.half_bins = static_cast<A>(bins / 2.0);
        P.bins = static_cast<A>(bins);
        launch_steps<W, A>(P, num_steps, stream);
      };
      if (acc_type == at::kDouble)
        run(double(0));
      else
        run(float(0));
    });
  }
  advance_position_kernel<<<1, 1, 0, stream>>>(position.data_ptr<int64_t>(), num_steps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) {
  m.impl("causal_conv1d_update", &causal_conv1d_update_cuda);
  m.impl("wavenet_step", &wavenet_step_cuda);
}

}  // namespace fastar
