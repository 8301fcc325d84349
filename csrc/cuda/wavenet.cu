// CUDA kernels of the dilated-causal-queue family (see fastar/ops/wavenet.py for the contract).
//
// causal_conv1d_update: one thread per (batch row, output channel).
//
// wavenet_step has two paths (chosen per call, see path_choice / launch_persistent below):
// - persistent (B <= 8, float32/float16/bfloat16 weights, slices that fit shared memory): one
//   launch runs all num_steps steps; one CTA per SM holds its slice of every matrix in shared
//   memory for the whole launch and the CTAs meet at L + 3 grid barriers per step (details at
//   wavenet_persistent_kernel). Tested on an H200 by scripts/gpu_check.sh (tests and compute-sanitizer).
// - blocks (everything else), below: one launch per step covers the whole network and the sampling. A block owns
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

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/acc_type.h"
#include "common/cuda_grid.cuh"
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

// The categorical draw of one row by one thread: the one pick (common/categorical.h) in the
// acc type, temperature 0 = first argmax. Shared by both wavenet_step kernels so that they draw
// the same codes.
template <typename A>
__device__ int64_t sample_code_row(const A* row, int64_t AA, double temperature, A u) {
  auto at = [row](int64_t i) { return row[i]; };
  if (temperature == 0.0) return cat::argmax_first<A>(at, AA);
  return cat::categorical_pick<A>(at, AA, static_cast<A>(temperature), u);
}

// sample_code_row's draw by one warp (the persistent kernel has a warp per row and is latency
// bound): warp_categorical_pick takes the exps in parallel and keeps the sums in the serial
// order, so it draws exactly what sample_code_row draws.
__device__ int64_t warp_sample_code(const float* row, int64_t AA, double temperature, float u, int lane) {
  (void)lane;
  auto at = [row](int i) { return row[i]; };
  if (temperature == 0.0) return cat::warp_argmax_first<float>(at, static_cast<int>(AA));
  return cat::warp_categorical_pick<float>(at, static_cast<int>(AA), static_cast<float>(temperature), u);
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
    P.samples[(b0 + r) * P.T + p] = sample_code_row<A>(lg + r * AA, AA, P.temperature, P.noise[(b0 + r) * P.T + p]);
  }
}

__global__ void advance_position_kernel(int64_t* position, int64_t n) { *position += n; }

// ------------------------------------------------------------------------------------------
// wavenet_step, persistent path (small batches): one launch runs all num_steps steps.
//
// G co-resident CTAs (one per SM) split the output columns of every matrix and keep their
// slice of the weights in shared memory for the whole launch: conv channel j = l*D + c (filter
// and gate columns of all k taps, so the owner gates locally) belongs to CTA j % G; skip
// column o (of every layer, so its running sum stays in the owner's shared memory) and head
// columns o belong to CTA o % G. The residual 1x1 (R x D per layer) is recomputed by every CTA
// from the gathered z, reading its weights from L2: that costs far less than the grid barrier
// that sharing h would need. Per step: one grid barrier per layer (z_l exchanged through
// global memory), one after the skip sums, one after out1, one after out2 (L + 3 barriers);
// every CTA then draws the same sample from the same logits (warp_sample_code or
// mix::pixel_sample, deterministic) and CTA 0 stores it, so no barrier is spent on the draw.
// Exchanged values are read with __ldcg (L2, never a stale L1 line).
constexpr int kPersistThreads = 256;  // the persistent kernel's block size (its launch bounds)

struct PersistLayout {
  int64_t nch, nsk, no1, no2;  // per-CTA maxima: conv channels, skip/out1/out2 columns
  size_t w_off, bytes;         // offset of the weight slices, total dynamic shared memory
};

template <typename W>
PersistLayout persist_layout(int64_t G, int64_t B, int64_t L, int64_t k, int64_t R, int64_t D, int64_t S,
                             int64_t A) {
  PersistLayout pl;
  pl.nch = (L * D + G - 1) / G;
  pl.nsk = (S + G - 1) / G;
  pl.no1 = pl.nsk;
  pl.no2 = (A + G - 1) / G;
  const int64_t head = S > A ? S : A;
  // h, z, skip sums, head input, prev value; residual partial sums
  const int64_t nf = B * (R + D + pl.nsk + head + 1) + kPersistThreads;
  // int64 codes first (8-byte aligned), then the floats, then the weights at a 16-byte boundary
  pl.w_off = ((static_cast<size_t>(B) * sizeof(int64_t) + static_cast<size_t>(nf) * sizeof(float)) + 15) / 16 * 16;
  const int64_t nw = pl.nch * 2 * k * R + pl.nsk * L * D + pl.no1 * S + pl.no2 * S;
  pl.bytes = pl.w_off + static_cast<size_t>(nw) * sizeof(W);
  return pl;
}

template <typename W>
struct PersistParams {
  StepParams<W, float> P;
  float* zbuf;     // (L, B, D) gated activations of each layer
  float* skipbuf;  // (B, S) relu(skip)
  float* y1buf;    // (B, S) relu(out1)
  unsigned long long* barrier;  // zeroed before the launch
  int64_t num_steps;
  PersistLayout pl;
};

// grid_barrier: common/cuda_grid.cuh.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename W>
__global__ void __launch_bounds__(kPersistThreads, 1) wavenet_persistent_kernel(PersistParams<W> Q) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const StepParams<W, float>& P = Q.P;
  const int64_t B = P.B, R = P.R, D = P.D, S = P.S, AA = P.A_, L = P.L, k = P.k, D2 = 2 * D, RS = R + S;
  const int64_t G = gridDim.x, g = blockIdx.x;
  const int64_t nsk = Q.pl.nsk, head = S > AA ? S : AA;
  int64_t* prevc = reinterpret_cast<int64_t*>(smem_raw);  // B: previous code (softmax head), 8-aligned first
  float* h = reinterpret_cast<float*>(prevc + B);         // B x R
  float* zf = h + B * R;                                   // B x D
  float* skl = zf + B * D;                                 // B x nsk: this CTA's running skip sums
  float* hin = skl + B * nsk;                              // B x max(S, A): gathered head input
  float* prevf = hin + B * head;                           // B: previous audio value (mixture head)
  float* red = prevf + B;                                  // kPersistThreads: residual partial sums
  W* cw = reinterpret_cast<W*>(smem_raw + Q.pl.w_off);     // nch x 2 x (k R): filter, gate
  W* sw = cw + Q.pl.nch * 2 * k * R;                       // nsk x L x D
  W* o1 = sw + nsk * L * D;                                // no1 x S
  W* o2 = o1 + Q.pl.no1 * S;                               // no2 x S
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;

  // This CTA's weight slices, once per launch.
  const int64_t kR = k * R;
  for (int64_t e = tid; e < Q.pl.nch * 2 * kR; e += nt) {
    const int64_t m = e / (2 * kR), f = (e / kR) % 2, ji = e % kR, j = g + m * G;
    if (j >= L * D) continue;
    const int64_t l = j / D, c = j % D;
    cw[e] = P.conv_w[(l * kR + ji) * D2 + f * D + c];
  }
  for (int64_t e = tid; e < nsk * L * D; e += nt) {
    const int64_t n = e / (L * D), li = e % (L * D), o = g + n * G;
    if (o < S) sw[e] = P.rs_w[li * RS + R + o];
  }
  for (int64_t e = tid; e < Q.pl.no1 * S; e += nt) {
    const int64_t n = e / S, i = e % S, o = g + n * G;
    if (o < S) o1[e] = P.o1_w[i * S + o];
  }
  for (int64_t e = tid; e < Q.pl.no2 * S; e += nt) {
    const int64_t n = e / S, i = e % S, o = g + n * G;
    if (o < AA) o2[e] = P.o2_w[i * AA + o];
  }
  const int64_t p0 = *P.position;
  if (tid < B && p0 > 0) {
    if (P.K > 0)
      prevf[tid] = P.xs[tid * P.T + p0 - 1];
    else
      prevc[tid] = P.samples[tid * P.T + p0 - 1];
  } else if (tid < B) {
    prevf[tid] = 0.f;
    prevc[tid] = P.start;
  }
  __syncthreads();

  unsigned long long nbar = 0;
  for (int64_t s = 0; s < Q.num_steps; ++s) {
    const int64_t p = p0 + s;
    if (p >= P.T) break;  // uniform over the grid: every CTA read the same position
    for (int64_t e = tid; e < B * R; e += nt) {
      const int64_t b = e / R, i = e % R;
      float v;
      if (P.K > 0) {
        v = static_cast<float>(P.in_w[i]) * prevf[b];
      } else {
        int64_t c = prevc[b];
        c = c < 0 ? 0 : (c >= AA ? AA - 1 : c);
        v = static_cast<float>(P.in_w[c * R + i]);
      }
      h[e] = v + static_cast<float>(P.in_b[i]);
    }
    for (int64_t e = tid; e < B * nsk; e += nt) skl[e] = 0.f;
    __syncthreads();

    for (int64_t l = 0; l <= L; ++l) {
      if (l > 0) {
        // Residual and skip 1x1 of layer l-1 from its gathered z.
        const int64_t lp = l - 1, Np = (k - 1) * P.dil[lp], off_prev = P.offsets[lp];
        for (int64_t e = tid; e < B * D; e += nt) zf[e] = __ldcg(Q.zbuf + lp * B * D + e);
        __syncthreads();
        if (Np > 0 && lp % G == g) {  // every reader of this slot passed the barrier
          const int64_t slot = p % Np;
          for (int64_t e = tid; e < B * R; e += nt) {
            const int64_t b = e / R, i = e % R;
            P.queues[(b * P.Ntot + off_prev + slot) * R + i] = h[e];
          }
        }
        for (int64_t e = tid; e < B * nsk; e += nt) {
          const int64_t b = e / nsk, n = e % nsk, o = g + n * G;
          if (o >= S) continue;
          const W* wv = sw + (n * L + lp) * D;
          float acc = static_cast<float>(P.rs_b[lp * RS + R + o]);
          for (int64_t i = 0; i < D; ++i) acc += static_cast<float>(wv[i]) * zf[b * D + i];
          skl[e] += acc;
        }
        __syncthreads();  // the queue write read h before the update below
        if (l < L) {
          // These weights come from L2: with split threads per output each thread issues its
          // D / split independent loads at once, so the layer pays about one L2 round trip.
          const int64_t BR = B * R, split = BR >= nt ? 1 : nt / BR, chunk = (D + split - 1) / split;
          for (int64_t e = tid; e < BR * split; e += nt) {
            const int64_t q = e / BR, be = e % BR, b = be / R, o = be % R;
            const int64_t i0 = q * chunk, i1 = i0 + chunk < D ? i0 + chunk : D;
            const W* wr = P.rs_w + lp * D * RS + o;
            float acc = 0.f;
#pragma unroll 16
            for (int64_t i = i0; i < i1; ++i) acc += static_cast<float>(wr[i * RS]) * zf[b * D + i];
            if (split == 1)
              h[be] += acc + static_cast<float>(P.rs_b[lp * RS + o]);
            else
              red[e] = acc;  // e < BR * split <= nt
          }
          if (split > 1) {
            __syncthreads();
            for (int64_t e = tid; e < BR; e += nt) {
              float acc = static_cast<float>(P.rs_b[lp * RS + e % R]);
              for (int64_t q = 0; q < split; ++q) acc += red[q * BR + e];
              h[e] += acc;
            }
          }
          __syncthreads();
        }
      }
      if (l == L) break;
      // Conv + gate of this CTA's channels of layer l: one warp per (channel, row).
      const int64_t d = P.dil[l], N = (k - 1) * d, off = P.offsets[l], lD = l * D;
      const int64_t m_lo = lD > g ? (lD - g + G - 1) / G : 0;
      const int64_t m_hi = lD + D > g ? (lD + D - g + G - 1) / G : 0;
      const int64_t items = (m_hi - m_lo) * B;
      for (int64_t it = warp; it < items; it += nw) {
        const int64_t m = m_lo + it / B, b = it % B, c = g + m * G - lD;
        const W* wf = cw + m * 2 * kR;
        const W* wg = wf + kR;
        float af = 0.f, ag = 0.f;
        for (int64_t j = 0; j + 1 < k; ++j) {
          int64_t slot = (p - (k - 1 - j) * d) % N;
          if (slot < 0) slot += N;
          const float* q = P.queues + (b * P.Ntot + off + slot) * R;
          for (int64_t i = lane; i < R; i += 32) {
            const float x = __ldcg(q + i);
            af += static_cast<float>(wf[j * R + i]) * x;
            ag += static_cast<float>(wg[j * R + i]) * x;
          }
        }
        for (int64_t i = lane; i < R; i += 32) {
          const float x = h[b * R + i];
          af += static_cast<float>(wf[(k - 1) * R + i]) * x;
          ag += static_cast<float>(wg[(k - 1) * R + i]) * x;
        }
        af = warp_sum(af);
        ag = warp_sum(ag);
        if (lane == 0) {
          af += static_cast<float>(P.conv_b[l * D2 + c]);
          ag += static_cast<float>(P.conv_b[l * D2 + D + c]);
          if (P.cond) {
            const W* cv = P.cond + ((b * P.Tc + (P.Tc == 1 ? 0 : p)) * L + l) * D2;
            af += static_cast<float>(cv[c]);
            ag += static_cast<float>(cv[D + c]);
          }
          Q.zbuf[(l * B + b) * D + c] = tanhf(af) * (1.f / (1.f + expf(-ag)));
        }
      }
      grid_barrier(Q.barrier, ++nbar * G);
    }

    // Head: relu(skip) -> out1 -> relu -> out2, columns split over the CTAs.
    for (int64_t e = tid; e < B * nsk; e += nt) {
      const int64_t b = e / nsk, o = g + (e % nsk) * G;
      if (o < S) Q.skipbuf[b * S + o] = fmaxf(skl[e], 0.f);
    }
    grid_barrier(Q.barrier, ++nbar * G);
    for (int64_t e = tid; e < B * S; e += nt) hin[e] = __ldcg(Q.skipbuf + e);
    __syncthreads();
    for (int64_t it = warp; it < Q.pl.no1 * B; it += nw) {
      const int64_t n = it / B, b = it % B, o = g + n * G;
      if (o >= S) continue;
      float acc = 0.f;
      for (int64_t i = lane; i < S; i += 32) acc += static_cast<float>(o1[n * S + i]) * hin[b * S + i];
      acc = warp_sum(acc);
      if (lane == 0) Q.y1buf[b * S + o] = fmaxf(acc + static_cast<float>(P.o1_b[o]), 0.f);
    }
    grid_barrier(Q.barrier, ++nbar * G);
    for (int64_t e = tid; e < B * S; e += nt) hin[e] = __ldcg(Q.y1buf + e);
    __syncthreads();
    for (int64_t it = warp; it < Q.pl.no2 * B; it += nw) {
      const int64_t n = it / B, b = it % B, o = g + n * G;
      if (o >= AA) continue;
      float acc = 0.f;
      for (int64_t i = lane; i < S; i += 32) acc += static_cast<float>(o2[n * S + i]) * hin[b * S + i];
      acc = warp_sum(acc);
      if (lane == 0) P.logits[b * AA + o] = acc + static_cast<float>(P.o2_b[o]);
    }
    grid_barrier(Q.barrier, ++nbar * G);
    for (int64_t e = tid; e < B * AA; e += nt) hin[e] = __ldcg(P.logits + e);
    __syncthreads();
    // Every CTA draws the same values from the same logits; CTA 0 stores them.
    if (P.K == 0 && warp < B) {  // softmax head: a warp per row
      const int64_t b = warp;
      int64_t c;
      if (p < P.num_prime)
        c = P.samples[b * P.T + p];
      else
        c = warp_sample_code(hin + b * AA, AA, P.temperature, P.noise[b * P.T + p], lane);
      if (lane == 0) {
        if (g == 0 && p >= P.num_prime) P.samples[b * P.T + p] = c;
        prevc[b] = c;
      }
    } else if (P.K > 0 && tid < B) {
      const int64_t b = tid;
      {
        float x;
        if (p < P.num_prime) {
          x = P.xs[b * P.T + p];
        } else {
          const mix::PixelParams<float> pp{hin + b * AA, 1};
          mix::pixel_sample<float, float, 1>(pp, P.noise + b * 2 * P.T + p, P.T, P.K,
                                             static_cast<float>(P.temperature), P.half_bins, P.bins, &x, 1);
          if (g == 0) P.xs[b * P.T + p] = x;
        }
        prevf[b] = x;
      }
    }
    __syncthreads();
  }
}

// Path choice: FASTAR_WAVENET_CUDA_PATH=auto (default) | persistent | blocks, read per call.
// auto takes the persistent kernel for float32/float16/bfloat16 weights at B <= 8 when the
// per-CTA weight slices fit the shared memory of one SM; everything else (float64, larger
// batches, configs too big) runs the per-step block kernel. "persistent" fails with a sentence
// when the persistent kernel cannot run this call (a test can then tell which path ran).
constexpr int64_t kPersistMaxBatch = 8;

enum class PathChoice { Auto, Persistent, Blocks };

PathChoice path_choice() {
  const char* v = std::getenv("FASTAR_WAVENET_CUDA_PATH");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || v[0] == '\0') return PathChoice::Auto;
  if (std::strcmp(v, "persistent") == 0) return PathChoice::Persistent;
  if (std::strcmp(v, "blocks") == 0) return PathChoice::Blocks;
  TORCH_CHECK(false, "wavenet_step: FASTAR_WAVENET_CUDA_PATH must be auto, persistent or blocks, got '", v, "'");
  return PathChoice::Auto;
}

// Returns false (with the reason in why) when the persistent kernel cannot take this call.
template <typename W>
bool launch_persistent(const StepParams<W, float>& P, int64_t num_steps, cudaStream_t stream, std::string& why) {
  if (P.B > kPersistMaxBatch) {
    why = "batch " + std::to_string(P.B) + " > " + std::to_string(kPersistMaxBatch);
    return false;
  }
  const int dev = at::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev);
  if (!prop->cooperativeLaunch) {
    why = "the device does not support cooperative launches";
    return false;
  }
  const int64_t sms = prop->multiProcessorCount;
  const auto pl = persist_layout<W>(sms, P.B, P.L, P.k, P.R, P.D, P.S, P.A_);
  const size_t limit = prop->sharedMemPerBlockOptin;
  if (pl.bytes > limit) {
    why = "the weight slices need " + std::to_string(pl.bytes) + " bytes of shared memory per CTA, the device " +
          "allows " + std::to_string(limit);
    return false;
  }
  // Raised once to the device maximum (not a stream operation, so legal during graph capture;
  // later calls never touch it again).
  static std::atomic<uint64_t> attr_set{0};  // one bit per device (the attribute is per device)
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit == 0 || !(attr_set.load() & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(wavenet_persistent_kernel<W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(limit)));
    attr_set.fetch_or(bit);
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wavenet_persistent_kernel<W>,
                                                               kPersistThreads, pl.bytes));
  if (per_sm < 1) {
    why = "the occupancy calculator fits no CTA on an SM";
    return false;
  }
  // One CTA per SM: G = SMs <= per_sm x SMs, so every CTA is resident at once and the spinning
  // barrier cannot deadlock; the cooperative launch makes the runtime refuse rather than hang.
  const int64_t G = sms;
  auto opts = at::TensorOptions().device(at::kCUDA, dev);
  auto ws = at::empty({P.L * P.B * P.D + 2 * P.B * P.S}, opts.dtype(at::kFloat));
  auto bar = at::zeros({1}, opts.dtype(at::kLong));
  PersistParams<W> Q;
  Q.P = P;
  Q.zbuf = ws.template data_ptr<float>();
  Q.skipbuf = Q.zbuf + P.L * P.B * P.D;
  Q.y1buf = Q.skipbuf + P.B * P.S;
  Q.barrier = reinterpret_cast<unsigned long long*>(bar.template data_ptr<int64_t>());
  Q.num_steps = num_steps;
  Q.pl = pl;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(G));
  cfg.blockDim = dim3(kPersistThreads);
  cfg.dynamicSmemBytes = pl.bytes;
  cfg.stream = stream;
  // The cooperative attribute is "valid for graph nodes, launches" (driver_types.h of CUDA 13),
  // so the launch captures into a CUDA graph. FASTAR_WAVENET_CUDA_COOP=0 drops it (a plain
  // launch of G <= occupancy x SMs CTAs) in case a driver refuses it under capture.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  const char* coop = std::getenv("FASTAR_WAVENET_CUDA_COOP");
  const bool use_coop = !(coop != nullptr && std::strcmp(coop, "0") == 0);
  cfg.attrs = attr;
  cfg.numAttrs = use_coop ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, wavenet_persistent_kernel<W>, Q));
  return true;
}

template <typename W, typename A>
void launch_steps(const StepParams<W, A>& P, int64_t num_steps, cudaStream_t stream) {
  const int threads = 256;
  const size_t per_row = static_cast<size_t>(P.R + 3 * P.D + 2 * P.S + P.A_) * sizeof(A);
  // Several rows per block share each weight load once the batch fills the GPU anyway
  // (2 rows from B = 128: 64+ blocks still cover most SMs, 4 rows from B = 512).
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
  } else if (P.B >= 128) {
    constexpr int ROWS = 2;
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
                       const at::Tensor& noise, const c10::optional<at::Tensor>& cond, at::TensorList pack,
                       at::IntArrayRef config, double temperature) {
  const char* op = "wavenet_step";
  const auto a = parse_wavenet_step(op, samples, queues, position, logits, noise, cond, pack, config, temperature);
  const StepShape& s = a.s;
  const at::Tensor& conv_w = a.conv_w;
  const int64_t num_steps = a.num_steps, num_mixtures = a.num_mixtures;
  const c10::cuda::CUDAGuard guard(conv_w.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = acc_type_of(conv_w.scalar_type());
  TORCH_CHECK(noise.scalar_type() == acc_type && noise.is_contiguous(), op, ": the CUDA kernel needs noise as a "
              "contiguous ", acc_type, " tensor (what the weights accumulate in), got ", noise.scalar_type());
  if (s.B > 0) {
    TORCH_CHECK(s.L <= kMaxLayers, op, ": the CUDA kernel supports at most ", kMaxLayers, " layers, got ", s.L);
    const auto cc = (cond.has_value() && cond->defined()) ? cond->contiguous() : at::Tensor();
    const auto iw = a.in_w.contiguous(), ib = a.in_b.contiguous(), cw = conv_w.contiguous(),
               cb = a.conv_b.contiguous(), rw = a.res_skip_w.contiguous(), rb = a.res_skip_b.contiguous(),
               o1w = a.out1_w.contiguous(), o1b = a.out1_b.contiguous(), o2w = a.out2_w.contiguous(),
               o2b = a.out2_b.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_w.scalar_type(), "wavenet_step_cuda", [&] {
      using W = scalar_t;
      // A generic lambda, so that `if constexpr` below discards the persistent path for float64.
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
          P.dil[l] = a.dilations[l];
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
        P.num_prime = a.num_prime;
        P.start = a.start;
        P.temperature = a.temperature;
        P.K = num_mixtures;
        const double bins = std::ldexp(1.0, static_cast<int>(a.num_bits)) - 1.0;
        P.half_bins = static_cast<A>(bins / 2.0);
        P.bins = static_cast<A>(bins);
        if constexpr (std::is_same_v<A, float> && !std::is_same_v<W, double>) {
          const auto choice = path_choice();
          std::string why;
          if (choice != PathChoice::Blocks && launch_persistent<W>(P, num_steps, stream, why)) return;
          TORCH_CHECK(choice != PathChoice::Persistent, op, ": FASTAR_WAVENET_CUDA_PATH=persistent, but the "
                      "persistent kernel cannot run this call: ", why);
        } else {
          TORCH_CHECK(path_choice() != PathChoice::Persistent, op, ": FASTAR_WAVENET_CUDA_PATH=persistent, but "
                      "the persistent kernel does not take float64 weights");
        }
        launch_steps<W, A>(P, num_steps, stream);
      };
      run(acc_t<W>());  // common/acc_type.h: the dtype noise, queues, logits and samples come in
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
