// CUDA kernels of the PixelRNN scan family (fastar/ops/lstm_scan.py defines what they compute;
// the layouts and the shared argument checks are in csrc/lstm_scan.h).
//
// skew / unskew: plain copies, one thread per output element (any of the four float dtypes,
// moved as raw 2/4/8-byte words).
//
// diagonal_lstm_scan / row_lstm_scan and their backwards: one persistent launch per call. The
// kernel loops over the scan's steps (the diagonals d = 0 .. H + W - 2 of the Diagonal LSTM, the
// rows of the Row LSTM; in reverse for the backward) and the CTAs meet at a grid-wide barrier
// between two steps. The grid is at most what the occupancy calculator says is co-resident
// (blocks per SM x SMs) and the launch is cooperative, so the spinning barrier cannot deadlock
// (the runtime refuses a grid that would not fit rather than hang). Without cooperative-launch
// support, or with FASTAR_LSTM_SCAN_CUDA_PATH=steps, the same kernel runs one launch per step
// (no barrier); FASTAR_LSTM_SCAN_CUDA_PATH=persistent makes a fallback an error instead.
//
// One step is a GEMM over the rows (batch x cells of the step): forward z(4h) = is + bias +
// x(K h) @ Wc^T with x the K neighbouring states [above | left] (diagonal, K = 2) or the K
// states of the previous row (row LSTM), Wc (4h, K h) = w_ss permuted to [gate row][tap][unit].
// A CTA of 256 threads computes a tile of 64 rows x 32 hidden units; thread (tx, ty) owns hidden
// unit tx's four gate columns (k, h + k, 2h + k, 3h + k) for 8 rows, so the LSTM cell update runs
// in registers right after the reduction (no second barrier). The reduction is consumed in chunks
// of 32 staged in shared memory (float32, the weights pre-converted once per call). The backward
// step is the transposed GEMM dh(h) = dz_neighbours(K 4h) @ WT^T with WT (h, K 4h), the same tile
// shape (one column per thread), then the cell's backward in registers.
//
// The recurrent state crosses CTAs through float32 workspaces in a channels-last layout
// (B, H, W, h) / (B, H, W, 4h), so a tile's loads along the reduction are coalesced. Those reads
// use __ldcg (L2, never a possibly stale L1 line). Every output element is computed by one
// thread in a fixed order, so the results do not depend on the grid size (bitwise repeatable).
// bfloat16 inputs are converted on load; the state, the activations `saved` and every sum are
// float32; h and c are rounded to bfloat16 on store.
//
// The backward's weight and bias gradients (and d_h0) are products of the stored dz with the
// states, computed after the scan with ATen (matmul / sum) on the current stream.
//
// Tested on an H200 by scripts/gpu_check.sh (the tests and the compute-sanitizer cases of these ops).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cuda_grid.cuh"
#include "common/tensor_ptr.h"
#include "lstm_scan.h"

namespace fastar {
namespace {

// ------------------------------------------------------------------------------------- skew

constexpr int kCopyThreads = 256;

template <typename U>
__global__ void skew_kernel(const U* __restrict__ x, U* __restrict__ y, int64_t planes, int64_t H, int64_t W,
                            int64_t Ws) {
  const int64_t n = planes * H * Ws;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = e % Ws;
    const int64_t i = (e / Ws) % H;
    const int64_t p = e / (Ws * H);
    const int64_t j = s - i;
    y[e] = (j >= 0 && j < W) ? x[(p * H + i) * W + j] : U(0);
  }
}

template <typename U>
__global__ void unskew_kernel(const U* __restrict__ y, U* __restrict__ x, int64_t planes, int64_t H, int64_t W,
                              int64_t Ws) {
  const int64_t n = planes * H * W;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % W;
    const int64_t i = (e / W) % H;
    const int64_t p = e / (W * H);
    x[e] = y[(p * H + i) * Ws + i + j];
  }
}

void check_skew_dtype(const char* op, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": the CUDA kernel takes float32, float64, float16 or bfloat16, got ", st);
}

int copy_blocks(int64_t n) {
  const int64_t b = (n + kCopyThreads - 1) / kCopyThreads;
  return static_cast<int>(b < 65536 ? (b < 1 ? 1 : b) : 65536);  // grid-stride loop beyond
}

// out (planes, H, Wout) from in (planes, H, Win): skew when `forward`, else unskew.
void launch_skew_copy(bool forward, const at::Tensor& in, at::Tensor& out, int64_t planes, int64_t H, int64_t W,
                      int64_t Ws) {
  const int64_t n = out.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = copy_blocks(n);
  auto go = [&](auto tag) {
    using U = decltype(tag);
    const U* src = static_cast<const U*>(in.data_ptr());
    U* dst = static_cast<U*>(out.data_ptr());
    if (forward)
      skew_kernel<U><<<blocks, kCopyThreads, 0, stream>>>(src, dst, planes, H, W, Ws);
    else
      unskew_kernel<U><<<blocks, kCopyThreads, 0, stream>>>(src, dst, planes, H, W, Ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (in.element_size()) {
    case 2: go(uint16_t(0)); break;
    case 4: go(uint32_t(0)); break;
    case 8: go(uint64_t(0)); break;
    default: TORCH_CHECK(false, "skew/unskew: unexpected element size ", in.element_size());
  }
}

at::Tensor skew_cuda(const at::Tensor& x_) {
  const char* op = "skew";
  check_skew_input(op, x_, false);
  check_skew_dtype(op, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ws = W + H - 1 > 0 ? W + H - 1 : 0;
  auto y = at::empty({B, C, H, Ws}, x.options());
  launch_skew_copy(true, x, y, B * C, H, W, Ws);
  return y;
}

at::Tensor unskew_cuda(const at::Tensor& y_) {
  const char* op = "unskew";
  check_skew_input(op, y_, true);
  check_skew_dtype(op, y_);
  const c10::cuda::CUDAGuard guard(y_.device());
  const auto y = y_.contiguous();
  const int64_t B = y.size(0), C = y.size(1), H = y.size(2), Ws = y.size(3);
  const int64_t W = Ws - H + 1;
  auto x = at::empty({B, C, H, W}, y.options());
  launch_skew_copy(false, y, x, B * C, H, W, Ws);
  return x;
}

// ------------------------------------------------------------------------------------- scans

constexpr int kThreads = 256;
constexpr int kTH = 32;               // hidden units per tile (threadIdx.x % 32: one warp spans them)
constexpr int kTR = kThreads / kTH;   // 8 row groups
constexpr int kRPT = 8;               // rows per thread
constexpr int kTM = kTR * kRPT;       // 64 rows per tile
constexpr int kKC = 32;               // reduction chunk
static_assert(kTM * kKC % kThreads == 0 && 4 * kTH * kKC % kThreads == 0 && kTH * kKC % kThreads == 0,
              "tile loads must split evenly over the threads");

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ __forceinline__ float ldf(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// The cells of step s. Diagonal: d = s, rows i in [lo, lo + n), j = d - i. Row LSTM: row i = s,
// every column (lo = 0, n = W). A GEMM row r in [0, B n) is batch r / n, cell r % n.
struct StepCells {
  int64_t lo, n;
};

template <bool kRow>
__host__ __device__ __forceinline__ StepCells step_cells(int64_t s, int64_t H, int64_t W) {
  if (kRow) return {0, W};
  const int64_t lo = s - W + 1 > 0 ? s - W + 1 : 0;
  const int64_t hi = s < H - 1 ? s : H - 1;
  return {lo, hi - lo + 1};
}

template <bool kRow>
__device__ __forceinline__ void decode_row(int64_t r, int64_t s, const StepCells& sc, int& b, int& i, int& j) {
  b = static_cast<int>(r / sc.n);
  const int64_t q = r % sc.n;
  if (kRow) {
    i = static_cast<int>(s);
    j = static_cast<int>(q);
  } else {
    i = static_cast<int>(sc.lo + q);
    j = static_cast<int>(s - sc.lo - q);
  }
}

template <typename T>
struct FwdParams {
  const T* is_map;   // (B, 4h, H, W)
  const float* wc;   // (4h, K h): wc[g4][t h + kk] = w_ss[g4][kk][t]
  const float* bias; // (4h,) or null
  const T* h0;       // (B, h, H) or null (diagonal only)
  const T* c0;       // (B, h, H) or null
  T* h_out;          // (B, h, H, W)
  T* c_out;          // (B, h, H, W)
  float* saved;      // (B, 5h, H, W)
  float* hs;         // (B, H, W, h) workspace: h
  float* cs;         // (B, H, W, h) workspace: c
  unsigned long long* barrier;
  int64_t B, hid, H, W, K, nsteps;
};

template <typename T>
struct BwdParams {
  const T* grad_h;    // (B, h, H, W)
  const T* grad_c;    // (B, h, H, W)
  const float* wt;    // (h, K 4h): wt[k][t 4h + g4] = w_ss[g4][k][t]
  const float* saved; // (B, 5h, H, W)
  const T* c0;        // (B, h, H) or null (diagonal only)
  float* dz;          // (B, H, W, 4h) workspace: dL/dz
  float* dcl;         // (B, H, W, h) workspace: f * dL/dc, what flows to the cell's successor-in-reverse
  unsigned long long* barrier;
  int64_t B, hid, H, W, K, nsteps;
};

// Forward: steps [s_begin, s_end) of the scan (all of them in the persistent launch, one in the
// per-step fallback), a grid barrier between two steps.
template <typename T, bool kRow>
__global__ void __launch_bounds__(kThreads) lstm_scan_forward_kernel(FwdParams<T> p, int64_t s_begin, int64_t s_end) {
  __shared__ float xs[kTM][kKC + 1];
  __shared__ float ws[4][kTH][kKC + 1];
  __shared__ int rb[kTM], ri[kTM], rj[kTM];
  const int tid = threadIdx.x, tx = tid % kTH, ty = tid / kTH;
  const int64_t hid = p.hid, H = p.H, W = p.W, K = p.K, G4 = 4 * hid, KH = K * hid;
  const int64_t utiles = (hid + kTH - 1) / kTH;
  unsigned long long nbar = 0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (s > s_begin) grid_barrier(p.barrier, ++nbar * gridDim.x);
    const StepCells sc = step_cells<kRow>(s, H, W);
    const int64_t rows = p.B * sc.n;
    const int64_t tiles = (rows + kTM - 1) / kTM * utiles;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const int64_t r0 = t / utiles * kTM, u0 = t % utiles * kTH;
      __syncthreads();  // the previous tile's epilogue is done with rb/ri/rj
      if (tid < kTM) {
        int b = -1, i = 0, j = 0;
        if (r0 + tid < rows) decode_row<kRow>(r0 + tid, s, sc, b, i, j);
        rb[tid] = b;
        ri[tid] = i;
        rj[tid] = j;
      }
      __syncthreads();  // rb/ri/rj visible to the loads and the epilogue
      float acc[kRPT][4];
#pragma unroll
      for (int m = 0; m < kRPT; ++m)
#pragma unroll
        for (int g = 0; g < 4; ++g) acc[m][g] = 0.f;
      for (int64_t q0 = 0; q0 < KH; q0 += kKC) {
#pragma unroll 1
        for (int l = 0; l < kTM * kKC / kThreads; ++l) {
          const int e = tid + kThreads * l, row = e / kKC, kc = e % kKC;
          const int64_t q = q0 + kc;
          float v = 0.f;
          const int b = rb[row];
          if (b >= 0 && q < KH) {
            const int64_t tap = q / hid, kk = q % hid, i = ri[row], j = rj[row];
            int64_t ii, jj;
            if (kRow) {
              ii = i - 1;
              jj = j + tap - K / 2;
            } else {
              ii = tap == 0 ? i - 1 : i;
              jj = tap == 0 ? j : j - 1;
            }
            if (ii >= 0 && jj >= 0 && jj < W) {
              v = __ldcg(p.hs + ((b * H + ii) * W + jj) * hid + kk);
            } else if (!kRow && tap == 1 && jj < 0 && p.h0 != nullptr) {
              v = ldf(p.h0, (b * hid + kk) * H + i);  // the state left of column 0
            }
          }
          xs[row][kc] = v;
        }
#pragma unroll 1
        for (int l = 0; l < 4 * kTH * kKC / kThreads; ++l) {
          const int e = tid + kThreads * l, kc = e % kKC, u = (e / kKC) % kTH, g = e / (kKC * kTH);
          const int64_t q = q0 + kc, unit = u0 + u;
          ws[g][u][kc] = (unit < hid && q < KH) ? p.wc[(g * hid + unit) * KH + q] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kc = 0; kc < kKC; ++kc) {
          const float w0 = ws[0][tx][kc], w1 = ws[1][tx][kc], w2 = ws[2][tx][kc], w3 = ws[3][tx][kc];
#pragma unroll
          for (int m = 0; m < kRPT; ++m) {
            const float x = xs[ty + kTR * m][kc];
            acc[m][0] += x * w0;
            acc[m][1] += x * w1;
            acc[m][2] += x * w2;
            acc[m][3] += x * w3;
          }
        }
        __syncthreads();  // this chunk's reads of xs/ws done before the next chunk's loads
      }
      const int64_t unit = u0 + tx;
#pragma unroll
      for (int m = 0; m < kRPT; ++m) {
        const int row = ty + kTR * m;
        const int64_t b = rb[row];
        if (b < 0 || unit >= hid) continue;
        const int64_t i = ri[row], j = rj[row];
        const int64_t HW = H * W, pix = i * W + j, cl = (b * H + i) * W + j;
        float z[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          const int64_t ch = g * hid + unit;
          z[g] = acc[m][g] + ldf(p.is_map, (b * G4 + ch) * HW + pix) + (p.bias != nullptr ? p.bias[ch] : 0.f);
        }
        float cp = 0.f;
        if (kRow) {
          if (i > 0) cp = __ldcg(p.cs + ((b * H + i - 1) * W + j) * hid + unit);
        } else {
          if (j > 0)
            cp = __ldcg(p.cs + ((b * H + i) * W + j - 1) * hid + unit);
          else if (p.c0 != nullptr)
            cp = ldf(p.c0, (b * hid + unit) * H + i);
        }
        const float ig = sigmoid_f(z[0]), fg = sigmoid_f(z[1]), og = sigmoid_f(z[2]), gg = tanhf(z[3]);
        const float c = fg * cp + ig * gg;
        const float hv = og * tanhf(c);
        p.hs[cl * hid + unit] = hv;
        p.cs[cl * hid + unit] = c;
        float* sv = p.saved + b * 5 * hid * HW + pix;
        sv[(0 * hid + unit) * HW] = ig;
        sv[(1 * hid + unit) * HW] = fg;
        sv[(2 * hid + unit) * HW] = og;
        sv[(3 * hid + unit) * HW] = gg;
        sv[(4 * hid + unit) * HW] = c;
        p.h_out[(b * hid + unit) * HW + pix] = static_cast<T>(hv);
        p.c_out[(b * hid + unit) * HW + pix] = static_cast<T>(c);
      }
    }
  }
}

// Backward: reverse steps; step index r in [s_begin, s_end) is the scan's step nsteps - 1 - r.
// For the cell (i, j) of step s: dh = grad_h + sum_t WT_t dz(neighbour_t) over the cells that
// read (i, j)'s h (diagonal: (i + 1, j) through tap 0, (i, j + 1) through tap 1; row LSTM:
// (i + 1, j - t + K/2) through tap t), dc = grad_c + dcl(successor) with the successor the cell
// that takes (i, j)'s c (diagonal (i, j + 1), row (i + 1, j)), and dcl(i, j) = f(i, j) dc_total.
template <typename T, bool kRow>
__global__ void __launch_bounds__(kThreads) lstm_scan_backward_kernel(BwdParams<T> p, int64_t s_begin, int64_t s_end) {
  __shared__ float xs[kTM][kKC + 1];
  __shared__ float ws[kTH][kKC + 1];
  __shared__ int rb[kTM], ri[kTM], rj[kTM];
  const int tid = threadIdx.x, tx = tid % kTH, ty = tid / kTH;
  const int64_t hid = p.hid, H = p.H, W = p.W, K = p.K, G4 = 4 * hid, KG = K * G4;
  const int64_t utiles = (hid + kTH - 1) / kTH;
  unsigned long long nbar = 0;
  for (int64_t r = s_begin; r < s_end; ++r) {
    if (r > s_begin) grid_barrier(p.barrier, ++nbar * gridDim.x);
    const int64_t s = p.nsteps - 1 - r;
    const StepCells sc = step_cells<kRow>(s, H, W);
    const int64_t rows = p.B * sc.n;
    const int64_t tiles = (rows + kTM - 1) / kTM * utiles;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const int64_t r0 = t / utiles * kTM, u0 = t % utiles * kTH;
      __syncthreads();
      if (tid < kTM) {
        int b = -1, i = 0, j = 0;
        if (r0 + tid < rows) decode_row<kRow>(r0 + tid, s, sc, b, i, j);
        rb[tid] = b;
        ri[tid] = i;
        rj[tid] = j;
      }
      __syncthreads();
      float acc[kRPT];
#pragma unroll
      for (int m = 0; m < kRPT; ++m) acc[m] = 0.f;
      for (int64_t q0 = 0; q0 < KG; q0 += kKC) {
#pragma unroll 1
        for (int l = 0; l < kTM * kKC / kThreads; ++l) {
          const int e = tid + kThreads * l, row = e / kKC, kc = e % kKC;
          const int64_t q = q0 + kc;
          float v = 0.f;
          const int b = rb[row];
          if (b >= 0 && q < KG) {
            const int64_t tap = q / G4, g4 = q % G4, i = ri[row], j = rj[row];
            int64_t ii, jj;
            if (kRow) {
              ii = i + 1;
              jj = j - tap + K / 2;
            } else {
              ii = tap == 0 ? i + 1 : i;
              jj = tap == 0 ? j : j + 1;
            }
            if (ii < H && jj >= 0 && jj < W) v = __ldcg(p.dz + ((b * H + ii) * W + jj) * G4 + g4);
          }
          xs[row][kc] = v;
        }
#pragma unroll 1
        for (int l = 0; l < kTH * kKC / kThreads; ++l) {
          const int e = tid + kThreads * l, kc = e % kKC, u = e / kKC;
          const int64_t q = q0 + kc, unit = u0 + u;
          ws[u][kc] = (unit < hid && q < KG) ? p.wt[unit * KG + q] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kc = 0; kc < kKC; ++kc) {
          const float w = ws[tx][kc];
#pragma unroll
          for (int m = 0; m < kRPT; ++m) acc[m] += xs[ty + kTR * m][kc] * w;
        }
        __syncthreads();
      }
      const int64_t unit = u0 + tx;
#pragma unroll
      for (int m = 0; m < kRPT; ++m) {
        const int row = ty + kTR * m;
        const int64_t b = rb[row];
        if (b < 0 || unit >= hid) continue;
        const int64_t i = ri[row], j = rj[row];
        const int64_t HW = H * W, pix = i * W + j, cl = (b * H + i) * W + j;
        const float* sv = p.saved + b * 5 * hid * HW + pix;
        const float ig = sv[(0 * hid + unit) * HW], fg = sv[(1 * hid + unit) * HW], og = sv[(2 * hid + unit) * HW],
                    gg = sv[(3 * hid + unit) * HW], c = sv[(4 * hid + unit) * HW];
        float cp = 0.f;
        if (kRow) {
          if (i > 0) cp = sv[(4 * hid + unit) * HW - W];  // c at (i - 1, j)
        } else {
          if (j > 0)
            cp = sv[(4 * hid + unit) * HW - 1];  // c at (i, j - 1)
          else if (p.c0 != nullptr)
            cp = ldf(p.c0, (b * hid + unit) * H + i);
        }
        const float dh = acc[m] + ldf(p.grad_h, (b * hid + unit) * HW + pix);
        float dc = ldf(p.grad_c, (b * hid + unit) * HW + pix);
        if (kRow) {
          if (i + 1 < H) dc += __ldcg(p.dcl + ((b * H + i + 1) * W + j) * hid + unit);
        } else {
          if (j + 1 < W) dc += __ldcg(p.dcl + ((b * H + i) * W + j + 1) * hid + unit);
        }
        const float tc = tanhf(c);
        const float d_o = dh * tc;
        dc += dh * og * (1.f - tc * tc);
        float* dzc = p.dz + cl * G4 + unit;
        dzc[0 * hid] = dc * gg * ig * (1.f - ig);
        dzc[1 * hid] = dc * cp * fg * (1.f - fg);
        dzc[2 * hid] = d_o * og * (1.f - og);
        dzc[3 * hid] = dc * ig * (1.f - gg * gg);
        p.dcl[cl * hid + unit] = dc * fg;
      }
    }
  }
}

// How the scan kernels are launched: FASTAR_LSTM_SCAN_CUDA_PATH=auto (default: persistent when
// the device can, else per step), persistent (a fallback is an error), steps (one launch per step).
enum class ScanPath { Auto, Persistent, Steps };

ScanPath scan_path(const char* op) {
  const char* v = std::getenv("FASTAR_LSTM_SCAN_CUDA_PATH");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return ScanPath::Auto;
  if (std::strcmp(v, "persistent") == 0) return ScanPath::Persistent;
  if (std::strcmp(v, "steps") == 0) return ScanPath::Steps;
  TORCH_CHECK(false, op, ": FASTAR_LSTM_SCAN_CUDA_PATH must be auto, persistent or steps, got '", v, "'");
  return ScanPath::Auto;
}

int64_t step_tiles(bool row, int64_t s, int64_t B, int64_t hid, int64_t H, int64_t W) {
  const StepCells sc = row ? step_cells<true>(s, H, W) : step_cells<false>(s, H, W);
  return (B * sc.n + kTM - 1) / kTM * ((hid + kTH - 1) / kTH);
}

// Launches kernel(p, s_begin, s_end) over all nsteps steps. Params has a `barrier` member.
template <typename Params>
void launch_scan(const char* op, void (*kernel)(Params, int64_t, int64_t), Params p, int64_t nsteps, bool row,
                 bool reverse, const at::TensorOptions& opts, cudaStream_t stream) {
  const ScanPath path = scan_path(op);
  int64_t max_tiles = 1;
  {
    // The widest step: the longest diagonal (min(H, W) cells) or any row (W cells).
    const int64_t s = row ? 0 : (p.H < p.W ? p.H : p.W) - 1;
    max_tiles = step_tiles(row, s, p.B, p.hid, p.H, p.W);
  }
  if (path != ScanPath::Steps) {
    const int dev = at::cuda::current_device();
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    const bool can = prop->cooperativeLaunch && per_sm >= 1;
    TORCH_CHECK(can || path != ScanPath::Persistent, op, ": FASTAR_LSTM_SCAN_CUDA_PATH=persistent, but ",
                prop->cooperativeLaunch ? "the occupancy calculator fits no CTA on an SM"
                                        : "the device does not support cooperative launches");
    if (can) {
      // Every CTA resident at once (grid <= blocks per SM x SMs): the spin barrier cannot
      // deadlock, and the cooperative launch makes the runtime refuse a grid that would not fit.
      const int64_t resident = static_cast<int64_t>(per_sm) * prop->multiProcessorCount;
      const int64_t G = max_tiles < resident ? (max_tiles < 1 ? 1 : max_tiles) : resident;
      auto bar = at::zeros({1}, opts.dtype(at::kLong));
      p.barrier = reinterpret_cast<unsigned long long*>(bar.data_ptr<int64_t>());
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(G));
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = 0;
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      const int64_t s0 = 0, s1 = nsteps;
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p, s0, s1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;  // `bar` is freed to the caching allocator with a use on this stream: safe
    }
  }
  p.barrier = nullptr;  // never touched: one step per launch, no barrier
  for (int64_t r = 0; r < nsteps; ++r) {
    const int64_t s = reverse ? nsteps - 1 - r : r;
    const int64_t tiles = step_tiles(row, s, p.B, p.hid, p.H, p.W);
    const unsigned blocks = static_cast<unsigned>(tiles < (int64_t{1} << 30) ? tiles : (int64_t{1} << 30));
    kernel<<<blocks, kThreads, 0, stream>>>(p, r, r + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_scan_dtype(const char* op, const at::Tensor& is_map) {
  const auto st = is_map.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, op, ": the CUDA kernel takes float32 or bfloat16, got ", st,
              " (other dtypes run on the reference)");
}

void check_index_range(const char* op, const ScanShape& s) {
  constexpr int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK(s.B < lim && s.H < lim && s.W < lim, op, ": B, H and W must each be below 2^31");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward(const char* op, bool row, const ScanShape& s,
                                                            const at::Tensor& is_map_,
                                                            const at::Tensor& w_ss_,
                                                            const c10::optional<at::Tensor>& bias,
                                                            const c10::optional<at::Tensor>& h0,
                                                            const c10::optional<at::Tensor>& c0) {
  check_scan_dtype(op, is_map_);
  check_index_range(op, s);
  const c10::cuda::CUDAGuard guard(is_map_.device());
  const auto is_map = is_map_.contiguous();
  const auto opts = is_map.options();
  const auto fopts = opts.dtype(at::kFloat);
  const int64_t B = s.B, hid = s.hid, H = s.H, W = s.W, K = s.K;
  auto h = at::empty({B, hid, H, W}, opts);
  auto c = at::empty({B, hid, H, W}, opts);
  auto saved = at::empty({B, 5 * hid, H, W}, fopts);
  if (B == 0 || H == 0 || W == 0) return {h, c, saved};
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto wc = w_ss_.to(at::kFloat).permute({0, 2, 1}).reshape({4 * hid, K * hid}).contiguous();
  const auto bf = scan_has(bias) ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto h0c = scan_has(h0) ? h0->contiguous() : at::Tensor();
  const auto c0c = scan_has(c0) ? c0->contiguous() : at::Tensor();
  auto hs = at::empty({B, H, W, hid}, fopts);
  auto cs = at::empty({B, H, W, hid}, fopts);
  const int64_t nsteps = row ? H : H + W - 1;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    FwdParams<T> p;
    p.is_map = is_map.data_ptr<T>();
    p.wc = wc.data_ptr<float>();
    p.bias = opt_ptr<float>(bf);
    p.h0 = opt_ptr<T>(h0c);
    p.c0 = opt_ptr<T>(c0c);
    p.h_out = h.data_ptr<T>();
    p.c_out = c.data_ptr<T>();
    p.saved = saved.data_ptr<float>();
    p.hs = hs.data_ptr<float>();
    p.cs = cs.data_ptr<float>();
    p.barrier = nullptr;
    p.B = B;
    p.hid = hid;
    p.H = H;
    p.W = W;
    p.K = K;
    p.nsteps = nsteps;
    if (row)
      launch_scan<FwdParams<T>>(op, lstm_scan_forward_kernel<T, true>, p, nsteps, true, false, opts, stream);
    else
      launch_scan<FwdParams<T>>(op, lstm_scan_forward_kernel<T, false>, p, nsteps, false, false, opts, stream);
  };
  if (is_map.scalar_type() == at::kFloat)
    run(float(0));
  else
    run(c10::BFloat16(0.f));
  return {h, c, saved};
}

void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                const at::Tensor& is_map) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == is_map.device(), op, ": ", name, " must be on ", is_map.device(), ", got ", t.device());
}

// Returns (d_is_map, d_w_ss, d_bias, d_h0, d_c0); the last two only for the diagonal scan.
std::vector<at::Tensor> scan_backward(const char* op, bool row, const ScanShape& s, const at::Tensor& grad_h_,
                                      const at::Tensor& grad_c_, const at::Tensor& is_map, const at::Tensor& w_ss,
                                      const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved_,
                                      const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                                      const bool* mask) {
  check_scan_dtype(op, is_map);
  check_index_range(op, s);
  const int64_t B = s.B, hid = s.hid, H = s.H, W = s.W, K = s.K, G4 = 4 * hid;
  const std::vector<int64_t> out_shape{B, hid, H, W}, saved_shape{B, 5 * hid, H, W};
  check_like(op, "grad_h", grad_h_, out_shape, is_map);
  check_like(op, "grad_c", grad_c_, out_shape, is_map);
  check_like(op, "h", h, out_shape, is_map);
  check_like(op, "c", c, out_shape, is_map);
  check_like(op, "saved", saved_, saved_shape, is_map);
  TORCH_CHECK(saved_.scalar_type() == at::kFloat, op, ": saved must be float32 (the accumulation dtype), got ",
              saved_.scalar_type());
  TORCH_CHECK(h.scalar_type() == is_map.scalar_type(), op, ": h dtype ", h.scalar_type(), " must match is_map dtype ",
              is_map.scalar_type());
  const c10::cuda::CUDAGuard guard(is_map.device());
  const auto opts = is_map.options();
  const auto fopts = opts.dtype(at::kFloat);
  const auto empty = at::empty({0}, opts);
  const int nstate = row ? 0 : 2;
  std::vector<at::Tensor> out(3 + nstate);
  if (B == 0 || H == 0 || W == 0) {
    out[0] = mask[0] ? at::zeros(is_map.sizes(), opts) : empty;
    out[1] = mask[1] ? at::zeros(w_ss.sizes(), w_ss.options()) : empty;
    out[2] = mask[2] ? at::zeros({G4}, w_ss.options()) : empty;
    for (int k = 0; k < nstate; ++k) out[3 + k] = mask[3 + k] ? at::zeros({B, hid, H}, opts) : empty;
    return out;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto grad_h = grad_h_.to(is_map.scalar_type()).contiguous();
  const auto grad_c = grad_c_.to(is_map.scalar_type()).contiguous();
  const auto saved = saved_.contiguous();
  const auto wf = w_ss.to(at::kFloat);  // (4h, h, K)
  const auto wt = wf.permute({1, 2, 0}).reshape({hid, K * G4}).contiguous();
  const auto c0c = (!row && scan_has(c0)) ? c0->contiguous() : at::Tensor();
  auto dz = at::empty({B, H, W, G4}, fopts);
  auto dcl = at::empty({B, H, W, hid}, fopts);
  const int64_t nsteps = row ? H : H + W - 1;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    BwdParams<T> p;
    p.grad_h = grad_h.data_ptr<T>();
    p.grad_c = grad_c.data_ptr<T>();
    p.wt = wt.data_ptr<float>();
    p.saved = saved.data_ptr<float>();
    p.c0 = opt_ptr<T>(c0c);
    p.dz = dz.data_ptr<float>();
    p.dcl = dcl.data_ptr<float>();
    p.barrier = nullptr;
    p.B = B;
    p.hid = hid;
    p.H = H;
    p.W = W;
    p.K = K;
    p.nsteps = nsteps;
    if (row)
      launch_scan<BwdParams<T>>(op, lstm_scan_backward_kernel<T, true>, p, nsteps, true, true, opts, stream);
    else
      launch_scan<BwdParams<T>>(op, lstm_scan_backward_kernel<T, false>, p, nsteps, false, true, opts, stream);
  };
  if (is_map.scalar_type() == at::kFloat)
    run(float(0));
  else
    run(c10::BFloat16(0.f));

  const auto dzm = dz.view({B * H * W, G4});
  out[0] = empty;
  if (mask[0]) {
    out[0] = at::empty({B, G4, H, W}, opts);
    out[0].copy_(dz.permute({0, 3, 1, 2}));
  }
  out[1] = empty;
  if (mask[1]) {
    // The states each tap multiplied, in float32: h itself for float32; for bfloat16 the
    // forward's float h = o * tanh(c) from `saved` (h is rounded to bfloat16).
    const at::Tensor hf = is_map.scalar_type() == at::kFloat
                              ? h.contiguous()
                              : saved.narrow(1, 2 * hid, hid) * at::tanh(saved.narrow(1, 4 * hid, hid));
    const auto h_up = at::constant_pad_nd(hf, {0, 0, 1, 0}).narrow(2, 0, H);  // h(i - 1, j), zero row 0
    std::vector<at::Tensor> taps;
    if (row) {
      const auto padded = at::constant_pad_nd(h_up, {K / 2, K / 2});
      for (int64_t t = 0; t < K; ++t) taps.push_back(padded.narrow(3, t, W));  // h(i - 1, j + t - K/2)
    } else {
      const auto left0 = scan_has(h0) ? h0->to(at::kFloat).unsqueeze(3) : at::zeros({B, hid, H, 1}, fopts);
      taps.push_back(h_up);
      taps.push_back(at::cat({left0, hf.narrow(3, 0, W - 1)}, 3));  // h(i, j - 1), h0 at j = 0
    }
    std::vector<at::Tensor> dws;
    for (const auto& x : taps) dws.push_back(at::matmul(dzm.t(), x.permute({0, 2, 3, 1}).reshape({B * H * W, hid})));
    out[1] = at::stack(dws, 2).to(w_ss.scalar_type());
  }
  out[2] = mask[2] ? dzm.sum(0).to(w_ss.scalar_type()) : empty;
  if (!row) {
    out[3] = empty;
    if (mask[3]) {  // h0 is the left state of column 0: Wl^T dz(i, 0)
      out[3] = at::empty({B, hid, H}, opts);
      out[3].copy_(at::matmul(dz.select(2, 0), wf.select(2, 1)).permute({0, 2, 1}));
    }
    out[4] = empty;
    if (mask[4]) {  // c0 is the left cell of column 0: f(i, 0) dc(i, 0)
      out[4] = at::empty({B, hid, H}, opts);
      out[4].copy_(dcl.select(2, 0).permute({0, 2, 1}));
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diagonal_lstm_scan_cuda(const at::Tensor& is_map,
                                                                       const at::Tensor& w_ss,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       const c10::optional<at::Tensor>& h0,
                                                                       const c10::optional<at::Tensor>& c0) {
  const char* op = "diagonal_lstm_scan";
  const auto s = check_lstm_scan(op, is_map, w_ss, bias, 2, h0, c0);
  return scan_forward(op, false, s, is_map, w_ss, bias, h0, c0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diagonal_lstm_scan_backward_cuda(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& is_map, const at::Tensor& w_ss,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, std::array<bool, 5> output_mask) {
  const char* op = "diagonal_lstm_scan_backward";
  const auto s = check_lstm_scan(op, is_map, w_ss, c10::nullopt, 2, h0, c0);
  auto r = scan_backward(op, false, s, grad_h, grad_c, is_map, w_ss, h, c, saved, h0, c0, output_mask.data());
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_lstm_scan_cuda(const at::Tensor& is_map, const at::Tensor& w_ss,
                                                                  const c10::optional<at::Tensor>& bias, bool /*save*/) {
  const char* op = "row_lstm_scan";
  const auto s = check_lstm_scan(op, is_map, w_ss, bias, -1);
  return scan_forward(op, true, s, is_map, w_ss, bias, c10::nullopt, c10::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_lstm_scan_backward_cuda(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& is_map, const at::Tensor& w_ss,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved, std::array<bool, 3> output_mask) {
  const char* op = "row_lstm_scan_backward";
  const auto s = check_lstm_scan(op, is_map, w_ss, c10::nullopt, -1);
  auto r = scan_backward(op, true, s, grad_h, grad_c, is_map, w_ss, h, c, saved, c10::nullopt, c10::nullopt,
                         output_mask.data());
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CUDA, m) {
  m.impl("skew", &skew_cuda);
  m.impl("unskew", &unskew_cuda);
  m.impl("diagonal_lstm_scan", &diagonal_lstm_scan_cuda);
  m.impl("diagonal_lstm_scan_backward", &diagonal_lstm_scan_backward_cuda);
  m.impl("row_lstm_scan", &row_lstm_scan_cuda);
  m.impl("row_lstm_scan_backward", &row_lstm_scan_backward_cuda);
}

}  // namespace fastar
