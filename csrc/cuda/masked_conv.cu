// CUDA kernels of fastar's masked convolution family.
//
//   masked_conv2d(x, weight, bias?, mask, padding, dilation) -> out
//     out = conv2d(x, weight * mask, bias, stride=1, padding, dilation)
//   masked_conv2d_backward(grad_out, x, weight, mask, padding, dilation, output_mask)
//     -> (grad_x, grad_weight, grad_bias); a slot whose output_mask entry is
//        false holds an empty tensor instead.
//
// Shapes: x (N, C_in, H, W); weight and mask (C_out, C_in, kH, kW);
// bias (C_out,); out and grad_out (N, C_out, H_out, W_out) with
// H_out = H + 2 * pad_h - dil_h * (kH - 1) (likewise W_out). Every input is
// made contiguous NCHW first; every output is contiguous NCHW.
// Dtypes: x, weight and bias share one of float32, float64, float16 or
// bfloat16. float16 / bfloat16 run on tensor cores (nvcuda::wmma 16x16x16)
// with float32 accumulation; float32 accumulates in float32 and float64 in
// float64 on a plain FMA path. The mask may be bool or any floating dtype;
// its values multiply the weight (non-0/1 values scale).
//
// A tap t = kh * kW + kw is "active" when mask[co, ci, kh, kw] != 0 for at
// least one (co, ci) pair. A causal mask kills about half the taps, and no
// kernel below spends work on a dead tap: the reduction dimension of every
// GEMM runs over C * T_a (T_a = number of active taps) only. T_a is computed
// on the device and read by the kernels from device memory, so nothing is
// ever copied back to the host (the ops are CUDA-graph capturable).
//
// Kernels, in launch order:
//   tap_activity_kernel     flags[t] = 1 iff tap t is active (grid-stride scan
//                           of the mask; an order-independent integer OR).
//   compact_taps_kernel     one warp: count T_a, the ascending list of active
//                           taps, tap -> slot map, and per slot the (row, col)
//                           offsets that the gathers below add to a pixel.
//   pack_weight_kernel      W_eff = weight * mask over the active taps only,
//                           packed as dense GEMM operands (layout below).
//   masked_conv_igemm_kernel
//                           implicit GEMM Y[n, m, p] = bias[m] +
//                           sum_{a, c} A[m, a * C + c] * Z[n, c, p + off[a]]
//                           (zero outside Z's image). Forward: Z = x, Y = out,
//                           A = W_eff. Backward input: Z = grad_out, Y =
//                           grad_x, A = W_eff transposed over channels, with
//                           the offsets negated (a correlation run backwards).
//   masked_conv_wgrad_kernel
//                           gW_eff[co, a * C_in + ci] = sum_{n, p}
//                           grad_out[n, co, p] * x[n, ci, p + off[a]]: a GEMM
//                           whose reduction (N * H_out * W_out) is split over
//                           blockIdx.z into a float32/float64 partial buffer.
//   wgrad_scatter_kernel    sums the splits in a fixed order, multiplies by
//                           the mask and scatters into grad_weight (zeros at
//                           dead taps).
//   grad_bias is at::sum over (N, H_out, W_out) accumulated in float32
//   (float64 for float64) and cast back.
//
// Determinism: no floating-point atomics anywhere. Each output element is
// produced by exactly one thread in a fixed accumulation order; the weight
// gradient's split reduction is summed in split order. (The split count
// depends on the device's SM count, so results are bitwise reproducible on a
// given GPU model.)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "masked_conv.h"
#include "common/cuda_gemm_tiles.cuh"


namespace fastar {
namespace {

using namespace gemm;  // the tiles and traits of common/cuda_gemm_tiles.cuh

// Taps up to this index are OR-ed in shared memory by tap_activity_kernel;
// larger kernels (kH * kW > 1024) OR the rest straight into global memory.
constexpr int kMaxSharedTaps = 1024;


// ---------------------------------------------------------------------------
// The mask is read in its own dtype (selected at run time: these kernels are
// tiny, and a runtime switch avoids instantiating every weight x mask dtype
// pair). Other floating mask dtypes (float8) are converted to float32 on the
// host first.
// ---------------------------------------------------------------------------
enum MaskKind : int { kMaskBool = 0, kMaskHalf = 1, kMaskBFloat16 = 2, kMaskFloat = 3, kMaskDouble = 4 };

template <typename Acc>
__device__ __forceinline__ Acc mask_value(const void* __restrict__ mask, int kind, int64_t i) {
  switch (kind) {
    case kMaskBool:  // torch stores bool as one byte; compare the byte, not a bool load
      return static_cast<const uint8_t*>(mask)[i] != 0 ? Acc(1) : Acc(0);
    case kMaskHalf:
      return static_cast<Acc>(__half2float(static_cast<const __half*>(mask)[i]));
    case kMaskBFloat16:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(mask)[i]));
    case kMaskFloat:
      return static_cast<Acc>(static_cast<const float*>(mask)[i]);
    default:
      return static_cast<Acc>(static_cast<const double*>(mask)[i]);
  }
}

// The mask value as the reference sees it, `mask.to(weight.dtype)`: rounded
// to T first (a no-op for bool / 0-1 masks), then widened to T's accumulator.
template <typename T>
__device__ __forceinline__ typename Num<T>::acc_t mask_as(const void* __restrict__ mask, int kind, int64_t i) {
  using Acc = typename Num<T>::acc_t;
  return Num<T>::to_acc(Num<T>::from_acc(mask_value<Acc>(mask, kind, i)));
}

// Activity is decided in double so that no mask value (float64 included)
// rounds to zero; NaN counts as active (NaN != 0), as in the reference.
__device__ __forceinline__ bool mask_nonzero(const void* __restrict__ mask, int kind, int64_t i) {
  return mask_value<double>(mask, kind, i) != 0.0;
}


// ---------------------------------------------------------------------------
// Tap planning.
// ---------------------------------------------------------------------------

// flags[t] |= (mask[e] != 0) for every element e, t = e % KK. Coalesced
// grid-stride scan of the contiguous (C_out * C_in, KK) mask; per-block ORs
// are collected in shared memory so only blocks * KK global (integer, hence
// order-independent) atomics are issued. flags must be zeroed beforehand.
__global__ void __launch_bounds__(kThreads)
    tap_activity_kernel(const void* __restrict__ mask, int mask_kind, int64_t total, int KK, int* __restrict__ flags) {
  __shared__ int s_flags[kMaxSharedTaps];
  const int n_shared = KK < kMaxSharedTaps ? KK : kMaxSharedTaps;
  for (int t = threadIdx.x; t < n_shared; t += blockDim.x) s_flags[t] = 0;
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Track e % KK incrementally: (e + stride) % KK == (t + stride % KK) mod KK,
  // and t + stride % KK < 2 KK, so one conditional subtraction suffices.
  int t = static_cast<int>(e % KK);
  const int t_step = static_cast<int>(stride % KK);
  for (; e < total; e += stride) {
    if (mask_nonzero(mask, mask_kind, e)) {
      if (t < kMaxSharedTaps)
        s_flags[t] = 1;  // every writer stores the same value
      else if (flags[t] == 0)
        atomicOr(flags + t, 1);
    }
    t += t_step;
    if (t >= KK) t -= KK;
  }
  __syncthreads();
  for (int u = threadIdx.x; u < n_shared; u += blockDim.x)
    if (s_flags[u] != 0) atomicOr(flags + u, 1);
}

// One warp. Ballot + popcount turns the flags into the ascending list of
// active taps 32 at a time. Per active slot a it records the tap, and the
// offsets that turn a Y pixel into the Z pixel it reads:
//   forward / weight grad:  in  = out + (k * dil - pad)
//   input grad:             out = in  + (pad - k * dil)
__global__ void compact_taps_kernel(const int* __restrict__ flags, int* __restrict__ count, int* __restrict__ slot_of,
                                    int* __restrict__ tap_of, int* __restrict__ fwd_h, int* __restrict__ fwd_w,
                                    int* __restrict__ bwd_h, int* __restrict__ bwd_w, int KK, int kW, int pad_h,
                                    int pad_w, int dil_h, int dil_w) {
  const int lane = threadIdx.x;  // launched with exactly 32 threads
  int base = 0;
  for (int t0 = 0; t0 < KK; t0 += 32) {
    const int t = t0 + lane;
    const bool active = t < KK && flags[t] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    const int a = base + __popc(ballot & ((1u << lane) - 1u));
    if (t < KK) slot_of[t] = active ? a : -1;
    if (active) {
      const int kh = t / kW;
      const int kw = t - kh * kW;
      tap_of[a] = t;
      fwd_h[a] = kh * dil_h - pad_h;
      fwd_w[a] = kw * dil_w - pad_w;
      bwd_h[a] = pad_h - kh * dil_h;
      bwd_w[a] = pad_w - kw * dil_w;
    }
    base += __popc(ballot);
  }
  if (lane == 0) *count = base;
}

// W_eff = weight * mask over active taps only, in the GEMM operand layouts:
//   wf (C_out, C_in * KK): column a * C_in + ci   (forward A operand)
//   wb (C_in, C_out * KK): column a * C_out + co  (input-grad A operand)
// Tap-major columns make the live part of every row the prefix [0, C * T_a)
// whatever T_a is, so the row pitch stays the host-known C * KK. Columns past
// C * T_a are never written and never read (the GEMM loaders bound k by K).
// The loop bound uses the device-side T_a, so dead taps cost no threads.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pack_weight_kernel(const T* __restrict__ weight, const void* __restrict__ mask, int mask_kind,
                       const int* __restrict__ tap_count, const int* __restrict__ tap_of, T* __restrict__ wf,
                       T* __restrict__ wb, int C_out, int C_in, int KK) {
  const int T_a = *tap_count;
  const int64_t total = static_cast<int64_t>(C_out) * T_a * C_in;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    // idx = (co * T_a + a) * C_in + ci: consecutive threads write consecutive wf columns.
    const int ci = static_cast<int>(idx % C_in);
    const int64_t q = idx / C_in;
    const int a = static_cast<int>(q % T_a);
    const int co = static_cast<int>(q / T_a);
    const int64_t src = (static_cast<int64_t>(co) * C_in + ci) * KK + tap_of[a];
    const T v = Num<T>::from_acc(Num<T>::to_acc(weight[src]) * mask_as<T>(mask, mask_kind, src));
    if (wf != nullptr) wf[static_cast<int64_t>(co) * C_in * KK + static_cast<int64_t>(a) * C_in + ci] = v;
    if (wb != nullptr) wb[static_cast<int64_t>(ci) * C_out * KK + static_cast<int64_t>(a) * C_out + co] = v;
  }
}

// ---------------------------------------------------------------------------
// Implicit GEMM (forward and input gradient):
//   Y[n, m, p] = bias[m] + sum_{k < C * T_a} A[m, k] * Z[n, c_k, py + off_h[a_k], px + off_w[a_k]]
// with k = a_k * C + c_k, p = py * Wy + px, and Z read as 0 outside [0, Hz) x [0, Wz).
// Grid: x = pixel tile (64 pixels of one image) + image * tiles_p; y = 64-row
// tile of M. Tiles never straddle images, so each thread's gather pixel is
// fixed for the whole kernel and decoded once.
// ---------------------------------------------------------------------------
template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads)
    masked_conv_igemm_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ Z, const T* __restrict__ bias,
                             T* __restrict__ Y, const int* __restrict__ tap_count, const int* __restrict__ off_h,
                             const int* __restrict__ off_w, int M, int C, int Hz, int Wz, int Hy, int Wy,
                             int tiles_p) {
  using Acc = typename Tile::Acc;
  __shared__ typename Tile::Smem smem;

  const int tid = threadIdx.x;
  const int n = static_cast<int>(blockIdx.x) / tiles_p;
  const int p0 = (static_cast<int>(blockIdx.x) - n * tiles_p) * kTileN;
  const int m0 = static_cast<int>(blockIdx.y) * kTileM;
  const int P = Hy * Wy;
  const int64_t HWz = static_cast<int64_t>(Hz) * Wz;
  const int K = C * __ldg(tap_count);  // live reduction length: dead taps are simply not in it
  const T* __restrict__ Zn = Z + static_cast<int64_t>(n) * C * HWz;

  // A loader: a warp reads 32 consecutive k of one row (coalesced along the
  // packed row). Rows a_row0 + 8 i.
  const int a_col = tid % kTileK;
  const int a_row0 = tid / kTileK;
  // B loader: a warp reads 32 consecutive pixels of one reduction row
  // (coalesced along the image row). Rows b_row0 + 4 i, one fixed pixel.
  const int b_col = tid % kTileN;
  const int b_row0 = tid / kTileN;
  const int p = p0 + b_col;
  const bool p_ok = p < P;
  const int py = p_ok ? p / Wy : 0;
  const int px = p_ok ? p - py * Wy : 0;

  T ra[kLoadsA];
  T rb[kLoadsB];
  auto load = [&](int k0) {
    const int ka = k0 + a_col;
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      const int m = m0 + a_row0 + i * (kThreads / kTileK);
      ra[i] = (m < M && ka < K) ? A[static_cast<int64_t>(m) * lda + ka] : Num<T>::zero();
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      const int k = k0 + b_row0 + i * (kThreads / kTileN);
      T v = Num<T>::zero();
      if (p_ok && k < K) {
        const int a = k / C;
        const int c = k - a * C;
        const int ih = py + __ldg(off_h + a);
        const int iw = px + __ldg(off_w + a);
        // unsigned compare folds the < 0 test into the < size test
        if (static_cast<unsigned>(ih) < static_cast<unsigned>(Hz) && static_cast<unsigned>(iw) < static_cast<unsigned>(Wz))
          v = Zn[static_cast<int64_t>(c) * HWz + static_cast<int64_t>(ih) * Wz + iw];
      }
      rb[i] = v;
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) Tile::put_a(smem, a_row0 + i * (kThreads / kTileK), a_col, ra[i]);
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) Tile::put_b(smem, b_row0 + i * (kThreads / kTileN), b_col, rb[i]);
  };

  Tile tile;
  tile.init();
  if (K > 0) {
    load(0);
    // Register double-buffering: the global loads of chunk k0 + BK are in
    // flight while the tile computes on chunk k0 from shared memory.
    for (int k0 = 0; k0 < K; k0 += kTileK) {
      stage();
      __syncthreads();
      if (k0 + kTileK < K) load(k0 + kTileK);
      tile.compute(smem);
      __syncthreads();
    }
  }

  tile.epilogue(smem, [&](int mi, int ni, Acc v) {
    const int m = m0 + mi;
    const int q = p0 + ni;
    if (m < M && q < P) {
      if (bias != nullptr) v += Num<T>::to_acc(bias[m]);
      Y[(static_cast<int64_t>(n) * M + m) * P + q] = Num<T>::from_acc(v);
    }
  });
}

// ---------------------------------------------------------------------------
// Weight gradient, split-K GEMM:
//   partial[s, co, j] = sum_{r in split s} G[n_r, co, p_r] * X[n_r, c_j, oh_r + off_h[a_j], ow_r + off_w[a_j]]
// with r = n * P + p running over all output pixels of the batch and
// j = a_j * C_in + c_j (the wf column order). Grid: x = 64-column tile of j
// over the host-known bound C_in * KK (tiles past C_in * T_a exit at once);
// y = 64-row tile of C_out; z = split of the r range.
// ---------------------------------------------------------------------------
template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads)
    masked_conv_wgrad_kernel(const T* __restrict__ G, const T* __restrict__ X, typename Tile::Acc* __restrict__ partial,
                             int ldp, const int* __restrict__ tap_count, const int* __restrict__ off_h,
                             const int* __restrict__ off_w, int M, int C, int H, int W, int Ho, int Wo, int64_t R,
                             int64_t r_chunk) {
  using Acc = typename Tile::Acc;
  __shared__ typename Tile::Smem smem;
  // Per-column gather descriptors, fixed for the block: channel plane offset
  // (-1 marks a column past the live range) and the tap's pixel offset.
  __shared__ int64_t s_coff[kTileN];
  __shared__ int s_dh[kTileN];
  __shared__ int s_dw[kTileN];

  const int tid = threadIdx.x;
  const int K = C * __ldg(tap_count);
  const int j0 = static_cast<int>(blockIdx.x) * kTileN;
  if (j0 >= K) return;  // whole column tile on dead taps: uniform per block, before any barrier
  const int m0 = static_cast<int>(blockIdx.y) * kTileM;
  const int split = static_cast<int>(blockIdx.z);
  const int64_t r_begin = static_cast<int64_t>(split) * r_chunk;
  const int64_t r_end = r_begin + r_chunk < R ? r_begin + r_chunk : R;
  const int P = Ho * Wo;
  const int64_t HW = static_cast<int64_t>(H) * W;

  if (tid < kTileN) {
    const int j = j0 + tid;
    if (j < K) {
      const int a = j / C;
      const int c = j - a * C;
      s_coff[tid] = static_cast<int64_t>(c) * HW;
      s_dh[tid] = __ldg(off_h + a);
      s_dw[tid] = __ldg(off_w + a);
    } else {
      s_coff[tid] = -1;
      s_dh[tid] = 0;
      s_dw[tid] = 0;
    }
  }
  __syncthreads();

  // Both loaders put a warp on 32 consecutive r (consecutive pixels of one
  // image, hence coalesced); rows (A: co, B: j) are row0 + 8 i. The pixel r
  // is decoded once per chunk and shared by all 16 loads of the thread.
  const int r_lane = tid % kTileK;
  const int row0 = tid / kTileK;

  T ra[kLoadsA];
  T rb[kLoadsB];
  auto load = [&](int64_t r0) {
    const int64_t r = r0 + r_lane;
    const bool ok = r < r_end;
    int n = 0, p = 0, oh = 0, ow = 0;
    if (ok) {
      n = static_cast<int>(r / P);
      p = static_cast<int>(r - static_cast<int64_t>(n) * P);
      oh = p / Wo;
      ow = p - oh * Wo;
    }
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      const int m = m0 + row0 + i * (kThreads / kTileK);
      ra[i] = (ok && m < M) ? G[(static_cast<int64_t>(n) * M + m) * P + p] : Num<T>::zero();
    }
    const T* __restrict__ Xn = X + static_cast<int64_t>(n) * C * HW;
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      const int jj = row0 + i * (kThreads / kTileK);
      const int64_t coff = s_coff[jj];
      T v = Num<T>::zero();
      if (ok && coff >= 0) {
        const int ih = oh + s_dh[jj];
        const int iw = ow + s_dw[jj];
        if (static_cast<unsigned>(ih) < static_cast<unsigned>(H) && static_cast<unsigned>(iw) < static_cast<unsigned>(W))
          v = Xn[coff + static_cast<int64_t>(ih) * W + iw];
      }
      rb[i] = v;
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) Tile::put_a(smem, row0 + i * (kThreads / kTileK), r_lane, ra[i]);
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) Tile::put_b(smem, r_lane, row0 + i * (kThreads / kTileK), rb[i]);
  };

  Tile tile;
  tile.init();
  if (r_begin < r_end) {
    load(r_begin);
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileK) {
      stage();
      __syncthreads();
      if (r0 + kTileK < r_end) load(r0 + kTileK);
      tile.compute(smem);
      __syncthreads();
    }
  }

  tile.epilogue(smem, [&](int mi, int ni, Acc v) {
    const int m = m0 + mi;
    const int j = j0 + ni;
    if (m < M && j < K) partial[(static_cast<int64_t>(split) * M + m) * ldp + j] = v;
  });
}

// grad_weight[co, ci, t] = mask[co, ci, t] * sum_s partial[s, co, slot(t) * C_in + ci]
// (summed in split order: deterministic), 0 where tap t is dead. Walks
// grad_weight contiguously, so its stores coalesce; the partial reads are
// strided but the buffer is small and L2-resident.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    wgrad_scatter_kernel(const Acc* __restrict__ partial, int splits, int64_t split_stride, int ldp,
                         const int* __restrict__ slot_of, const void* __restrict__ mask, int mask_kind,
                         T* __restrict__ grad_weight, int C_out, int C_in, int KK) {
  const int64_t total = static_cast<int64_t>(C_out) * C_in * KK;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int t = static_cast<int>(idx % KK);
    const int64_t q = idx / KK;
    const int ci = static_cast<int>(q % C_in);
    const int co = static_cast<int>(q / C_in);
    const int a = slot_of[t];
    Acc v = Acc(0);
    if (a >= 0) {
      const Acc* src = partial + static_cast<int64_t>(co) * ldp + static_cast<int64_t>(a) * C_in + ci;
      Acc sum = Acc(0);
      for (int s = 0; s < splits; ++s) sum += src[s * split_stride];
      v = sum * static_cast<Acc>(mask_as<T>(mask, mask_kind, idx));
    }
    grad_weight[idx] = Num<T>::from_acc(v);
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cuda_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": CUDA kernel supports float32, float64, float16 and bfloat16, got ", t);
}

// The kernels index within one image plane, one channel count times the tap
// count, and pixel + tap offset in 32-bit ints (whole-tensor offsets are
// 64-bit). Reject the (absurd) shapes where those could overflow.
void check_index_range(const char* op, const MaskedConvShape& s) {
  constexpr int64_t kLim = int64_t{1} << 30;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const int64_t KK = s.kH * s.kW;
  const bool ok = s.H < kLim && s.W < kLim && s.H_out < kLim && s.W_out < kLim && s.pad_h < kLim &&
                  s.pad_w < kLim && s.dil_h * (s.kH - 1) < kLim && s.dil_w * (s.kW - 1) < kLim &&
                  s.H * s.W <= kIntMax && s.H_out * s.W_out <= kIntMax && s.C_in * KK <= kIntMax &&
                  s.C_out * KK <= kIntMax && s.N <= kIntMax;
  TORCH_CHECK(ok, op, ": the CUDA kernel uses 32-bit indices within an image and a weight row; x of shape (", s.N,
              ", ", s.C_in, ", ", s.H, ", ", s.W, ") with a ", s.C_out, "x", s.C_in, "x", s.kH, "x", s.kW,
              " weight, padding (", s.pad_h, ", ", s.pad_w, ") and dilation (", s.dil_h, ", ", s.dil_w,
              ") is too large for them");
}

int mask_kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBool:
      return kMaskBool;
    case at::kHalf:
      return kMaskHalf;
    case at::kBFloat16:
      return kMaskBFloat16;
    case at::kFloat:
      return kMaskFloat;
    case at::kDouble:
      return kMaskDouble;
    default:
      return -1;
  }
}

// Contiguous mask in a dtype the kernels read directly.
at::Tensor prepare_mask(const at::Tensor& mask, int* kind) {
  at::Tensor m = mask.contiguous();
  *kind = mask_kind_of(m.scalar_type());
  if (*kind < 0) {
    m = m.to(at::kFloat);
    *kind = kMaskFloat;
  }
  return m;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int grid_stride_blocks(int64_t total) {
  const int64_t cap = int64_t{4} * sm_count();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), cap)));
}

// Device-resident active-tap plan; see compact_taps_kernel for the fields.
// Layout of `buf` (int32): [count | flags | slot_of | tap_of | fwd_h | fwd_w | bwd_h | bwd_w],
// each table KK long.
struct TapPlan {
  at::Tensor buf;
  const int* count;
  const int* slot_of;
  const int* tap_of;
  const int* fwd_h;
  const int* fwd_w;
  const int* bwd_h;
  const int* bwd_w;
};

TapPlan plan_active_taps(const at::Tensor& mask, int mask_kind, const MaskedConvShape& s, cudaStream_t stream) {
  const int KK = static_cast<int>(s.kH * s.kW);
  TapPlan plan;
  plan.buf = at::zeros({1 + 7 * static_cast<int64_t>(KK)}, mask.options().dtype(at::kInt));
  int* base = plan.buf.mutable_data_ptr<int>();
  int* count = base;
  int* flags = base + 1;
  int* slot_of = flags + KK;
  int* tap_of = slot_of + KK;
  int* fwd_h = tap_of + KK;
  int* fwd_w = fwd_h + KK;
  int* bwd_h = fwd_w + KK;
  int* bwd_w = bwd_h + KK;

  const int64_t total = s.C_out * s.C_in * KK;
  tap_activity_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(mask.const_data_ptr(), mask_kind, total,
                                                                          KK, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact_taps_kernel<<<1, 32, 0, stream>>>(flags, count, slot_of, tap_of, fwd_h, fwd_w, bwd_h, bwd_w, KK,
                                            static_cast<int>(s.kW), static_cast<int>(s.pad_h),
                                            static_cast<int>(s.pad_w), static_cast<int>(s.dil_h),
                                            static_cast<int>(s.dil_w));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  plan.count = count;
  plan.slot_of = slot_of;
  plan.tap_of = tap_of;
  plan.fwd_h = fwd_h;
  plan.fwd_w = fwd_w;
  plan.bwd_h = bwd_h;
  plan.bwd_w = bwd_w;
  return plan;
}

template <typename T>
void launch_pack_weight(const at::Tensor& weight, const at::Tensor& mask, int mask_kind, const TapPlan& plan, T* wf,
                        T* wb, const MaskedConvShape& s, cudaStream_t stream) {
  const int KK = static_cast<int>(s.kH * s.kW);
  // Sized for every tap; threads past C_out * T_a * C_in find no work.
  const int64_t bound = s.C_out * s.C_in * KK;
  pack_weight_kernel<T><<<grid_stride_blocks(bound), kThreads, 0, stream>>>(
      static_cast<const T*>(weight.const_data_ptr()), mask.const_data_ptr(), mask_kind, plan.count, plan.tap_of, wf,
      wb, static_cast<int>(s.C_out), static_cast<int>(s.C_in), KK);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_igemm(const char* op, const T* A, int64_t lda, const T* Z, const T* bias, T* Y, const int* tap_count,
                  const int* off_h, const int* off_w, int64_t N, int64_t M, int64_t C, int64_t Hz, int64_t Wz,
                  int64_t Hy, int64_t Wy, cudaStream_t stream) {
  const int64_t P = Hy * Wy;
  if (N == 0 || M == 0 || P == 0) return;
  const int64_t tiles_p = ceil_div(P, kTileN);
  const int64_t grid_x = tiles_p * N;
  const int64_t grid_y = ceil_div(M, kTileM);
  TORCH_CHECK(grid_x <= std::numeric_limits<int>::max() && grid_y <= 65535, op,
              ": the problem needs a launch grid of ", grid_x, " x ", grid_y,
              " blocks, more than CUDA allows (2^31 - 1 x 65535)");
  using Tile = TileFor<T, /*kBColMajor=*/false>;
  masked_conv_igemm_kernel<T, Tile>
      <<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), kThreads, 0, stream>>>(
          A, lda, Z, bias, Y, tap_count, off_h, off_w, static_cast<int>(M), static_cast<int>(C),
          static_cast<int>(Hz), static_cast<int>(Wz), static_cast<int>(Hy), static_cast<int>(Wy),
          static_cast<int>(tiles_p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Splits of the weight-gradient reduction: enough blocks for about four
// waves counting every column tile (those on dead taps exit immediately, so
// a causal mask still leaves about two), but no split shorter than
// kMinSplitRows pixels so the partial buffer stays small relative to the work.
template <typename T>
void launch_wgrad(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                  int mask_kind, const TapPlan& plan, at::Tensor& grad_weight, const MaskedConvShape& s,
                  cudaStream_t stream) {
  using Tile = TileFor<T, /*kBColMajor=*/true>;
  using Acc = typename Tile::Acc;
  constexpr int64_t kMinSplitRows = 512;
  const int KK = static_cast<int>(s.kH * s.kW);
  const int64_t ldp = s.C_in * KK;
  const int64_t tiles_j = ceil_div(ldp, kTileN);
  const int64_t tiles_m = ceil_div(s.C_out, kTileM);
  TORCH_CHECK(tiles_j <= std::numeric_limits<int>::max() && tiles_m <= 65535, op,
              ": the weight gradient needs a launch grid of ", tiles_j, " x ", tiles_m,
              " blocks, more than CUDA allows (2^31 - 1 x 65535)");
  const int64_t R = s.N * s.H_out * s.W_out;
  const int64_t want_splits = ceil_div(int64_t{4} * sm_count(), tiles_j * tiles_m);
  int64_t r_chunk = std::max(ceil_div(R, want_splits), kMinSplitRows);
  r_chunk = std::max(r_chunk, ceil_div(R, 65535));  // grid.z limit
  r_chunk = ceil_div(r_chunk, kTileK) * kTileK;
  const int64_t splits = ceil_div(R, r_chunk);

  const auto acc_dtype = std::is_same_v<Acc, double> ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({splits, s.C_out, ldp}, x.options().dtype(acc_dtype));

  masked_conv_wgrad_kernel<T, Tile><<<dim3(static_cast<unsigned>(tiles_j), static_cast<unsigned>(tiles_m),
                                           static_cast<unsigned>(splits)),
                                      kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out.const_data_ptr()), static_cast<const T*>(x.const_data_ptr()),
      partial.mutable_data_ptr<Acc>(), static_cast<int>(ldp), plan.count, plan.fwd_h, plan.fwd_w,
      static_cast<int>(s.C_out), static_cast<int>(s.C_in), static_cast<int>(s.H), static_cast<int>(s.W),
      static_cast<int>(s.H_out), static_cast<int>(s.W_out), R, r_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total = s.C_out * s.C_in * KK;
  wgrad_scatter_kernel<T, Acc><<<grid_stride_blocks(total), kThreads, 0, stream>>>(
      partial.const_data_ptr<Acc>(), static_cast<int>(splits), s.C_out * ldp, static_cast<int>(ldp), plan.slot_of,
      mask.const_data_ptr(), mask_kind, static_cast<T*>(grad_weight.mutable_data_ptr()), static_cast<int>(s.C_out),
      static_cast<int>(s.C_in), KK);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& mask, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "masked_conv2d";
  const MaskedConvShape s = check_masked_conv2d(op, x, weight, bias, mask, padding, dilation);
  check_cuda_dtype(op, x.scalar_type());
  check_index_range(op, s);
  const bool has_bias = bias.has_value() && bias->defined();

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, x.options());
  if (s.N == 0) return out;

  const at::Tensor x_c = x.contiguous();
  const at::Tensor w_c = weight.contiguous();
  const at::Tensor b_c = has_bias ? bias->contiguous() : at::Tensor();
  int mask_kind = 0;
  const at::Tensor m_c = prepare_mask(mask, &mask_kind);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const TapPlan plan = plan_active_taps(m_c, mask_kind, s, stream);
  const int64_t KK = s.kH * s.kW;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    at::Tensor wf = at::empty({s.C_out, s.C_in * KK}, w_c.options());
    T* wf_ptr = static_cast<T*>(wf.mutable_data_ptr());
    launch_pack_weight<T>(w_c, m_c, mask_kind, plan, wf_ptr, nullptr, s, stream);
    launch_igemm<T>(op, wf_ptr, s.C_in * KK, static_cast<const T*>(x_c.const_data_ptr()),
                    has_bias ? static_cast<const T*>(b_c.const_data_ptr()) : nullptr,
                    static_cast<T*>(out.mutable_data_ptr()), plan.count, plan.fwd_h, plan.fwd_w, s.N, s.C_out,
                    s.C_in, s.H, s.W, s.H_out, s.W_out, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "masked_conv2d_backward";
  const MaskedConvShape s = check_masked_conv2d(op, x, weight, std::nullopt, mask, padding, dilation);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C_out &&
                  grad_out.size(2) == s.H_out && grad_out.size(3) == s.W_out,
              op, ": grad_out must have the output's shape (", s.N, ", ", s.C_out, ", ", s.H_out, ", ", s.W_out,
              "), got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out must be on ", x.device(), ", got ",
              grad_out.device());
  check_cuda_dtype(op, x.scalar_type());
  check_index_range(op, s);

  c10::cuda::CUDAGuard guard(x.device());
  // A fresh placeholder per slot: outputs of one op must not alias each other.
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = output_mask[1] ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());

  if (s.N == 0) {
    // grad_x has no elements; the other gradients are sums over nothing.
    if (output_mask[1]) grad_w.zero_();
    if (output_mask[2]) grad_b = at::zeros({s.C_out}, x.options());
    return std::make_tuple(grad_x, grad_w, grad_b);
  }

  const at::Tensor go_c = grad_out.contiguous();
  if (output_mask[2]) {
    const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const std::vector<int64_t> dims{0, 2, 3};
    grad_b = at::sum(go_c, at::IntArrayRef(dims), /*keepdim=*/false, acc_dtype).to(x.scalar_type());
  }
  if (!output_mask[0] && !output_mask[1]) return std::make_tuple(grad_x, grad_w, grad_b);

  const at::Tensor x_c = x.contiguous();
  const at::Tensor w_c = weight.contiguous();
  int mask_kind = 0;
  const at::Tensor m_c = prepare_mask(mask, &mask_kind);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const TapPlan plan = plan_active_taps(m_c, mask_kind, s, stream);
  const int64_t KK = s.kH * s.kW;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (output_mask[0]) {
      // grad_x = correlation of grad_out with W_eff transposed over channels
      // and with negated tap offsets: the same implicit GEMM, M = C_in, C = C_out.
      at::Tensor wb = at::empty({s.C_in, s.C_out * KK}, w_c.options());
      T* wb_ptr = static_cast<T*>(wb.mutable_data_ptr());
      launch_pack_weight<T>(w_c, m_c, mask_kind, plan, nullptr, wb_ptr, s, stream);
      launch_igemm<T>(op, wb_ptr, s.C_out * KK, static_cast<const T*>(go_c.const_data_ptr()), nullptr,
                      static_cast<T*>(grad_x.mutable_data_ptr()), plan.count, plan.bwd_h, plan.bwd_w, s.N, s.C_in,
                      s.C_out, s.H_out, s.W_out, s.H, s.W, stream);
    }
    if (output_mask[1]) launch_wgrad<T>(op, go_c, x_c, m_c, mask_kind, plan, grad_w, s, stream);
  });
  return std::make_tuple(grad_x, grad_w, grad_b);
}

}  // namespace fastar

TORCH_LIBRARY_IMPL(fastar, CUDA, m) {
  m.impl("masked_conv2d", &fastar::masked_conv2d_cuda);
  m.impl("masked_conv2d_backward", &fastar::masked_conv2d_backward_cuda);
}
