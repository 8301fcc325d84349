// Block-level GEMM tiles for CUDA kernels (first written for masked_conv2d's implicit GEMMs;
// reusable by any kernel that stages two operand tiles in shared memory and multiplies them,
// e.g. PixelRNN's per-diagonal GEMMs): the 64 x 64 x 32 tiling constants, the scalar traits
// that move float16 / bfloat16 through their CUDA intrinsics, and two tiles with one interface
// (FmaTile for float32 / float64, TensorCoreTile with WMMA for float16 / bfloat16; TileFor picks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/acc_type.h"


// Tensor-core fragments for both float16 and bfloat16 need sm_80+; older
// device passes (and the host pass, which only parses device code) take a
// scalar fallback over the same shared-memory tiles.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FASTAR_MC_WMMA 1
#else
#define FASTAR_MC_WMMA 0
#endif

namespace fastar {
namespace gemm {

// ---------------------------------------------------------------------------
// Tiling constants shared by both GEMM kernels: a 64 x 64 output tile per
// block of 256 threads, reduction consumed in chunks of 32.
// ---------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
// Each thread stages this many elements of each operand per K-chunk.
constexpr int kLoadsA = kTileM * kTileK / kThreads;  // 8
constexpr int kLoadsB = kTileK * kTileN / kThreads;  // 8
static_assert(kLoadsA * kThreads == kTileM * kTileK, "A tile must split evenly over the threads");
static_assert(kLoadsB * kThreads == kTileK * kTileN, "B tile must split evenly over the threads");
static_assert(kThreads == 256 && kTileM == 64 && kTileN == 64 && kTileK == 32,
              "the thread <-> element maps below are written for 256 threads on 64x64x32 tiles");

// ---------------------------------------------------------------------------
// Scalar traits. float16 / bfloat16 are handled as the CUDA types (__half,
// __nv_bfloat16) and converted only through the explicit intrinsics, because
// torch builds with __CUDA_NO_HALF_OPERATORS__ / _CONVERSIONS__.
// ---------------------------------------------------------------------------
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc_t = ::fastar::acc_t<float>;  // common/acc_type.h
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
  static __device__ __forceinline__ float zero() { return 0.f; }
};

template <>
struct Num<double> {
  using acc_t = ::fastar::acc_t<double>;  // common/acc_type.h
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
  static __device__ __forceinline__ double zero() { return 0.0; }
};

template <>
struct Num<__half> {
  using acc_t = ::fastar::acc_t<__half>;  // common/acc_type.h
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(static_cast<unsigned short>(0)); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc_t = ::fastar::acc_t<__nv_bfloat16>;  // common/acc_type.h
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
};

// ATen's scalar_t -> the CUDA type the kernels compute with (same bits).
template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
constexpr bool kIsLowPrecision = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// ---------------------------------------------------------------------------
// Block-level GEMM tiles. Both kinds expose the same interface so the two
// GEMM kernels are written once:
//   Smem                 the shared-memory operand tiles
//   put_a(s, m, k, v)    stage A[m][k] of the current K-chunk
//   put_b(s, k, n, v)    stage B[k][n] of the current K-chunk
//   compute(s)           acc += A_chunk * B_chunk
//   epilogue(s, f)       calls f(m, n, acc[m][n]) for every element of the
//                        64 x 64 tile, consecutive threads on consecutive n
//                        (so the caller's global stores coalesce along n)
// ---------------------------------------------------------------------------

// float32 / float64: each thread owns a 4 x 4 micro-tile at rows ty + 16 i,
// cols tx + 16 j. Interleaving (rather than 4 consecutive rows / cols) makes
// the shared reads of a warp hit consecutive words (B) or one broadcast word
// per half-warp (A), and the epilogue stores of a half-warp coalesce.
template <typename T>
struct FmaTile {
  using Acc = T;
  // k-major with a +1 pad: the loaders store with consecutive threads along k
  // (stride 65 words -> 32 distinct banks), the compute loop reads along m / n.
  struct Smem {
    T a[kTileK][kTileM + 1];
    T b[kTileK][kTileN + 1];
  };

  Acc acc[4][4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
  }
  static __device__ __forceinline__ void put_a(Smem& s, int m, int k, T v) { s.a[k][m] = v; }
  static __device__ __forceinline__ void put_b(Smem& s, int k, int n, T v) { s.b[k][n] = v; }

  __device__ __forceinline__ void compute(const Smem& s) {
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      Acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = s.a[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = s.b[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  }

  template <typename F>
  __device__ __forceinline__ void epilogue(Smem&, F&& f) {
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(ty + 16 * i, tx + 16 * j, acc[i][j]);
  }
};

// float16 / bfloat16: 8 warps as a 4 x 2 grid, each warp owning a 16 x 32
// slab (two 16x16 wmma accumulators in float32). A is staged row-major
// (m, k); B row-major (k, n) when its loader walks n (the conv gathers) and
// column-major, i.e. stored as (n, k), when its loader walks k (the weight
// gradient), so that in both cases consecutive threads store consecutive
// halves. Row pitches are padded by 8 halves (16 bytes): wmma needs ldm % 8 ==
// 0 and 32-byte aligned fragment pointers, which every 16-row / 16-col offset
// below keeps (checked: 80-, 144- and 272-byte pitches times 16 are multiples
// of 32).
template <typename T, bool kBColMajor>
struct TensorCoreTile {
  using Acc = float;
  static constexpr int kLdA = kTileK + 8;
  static constexpr int kBRows = kBColMajor ? kTileN : kTileK;
  static constexpr int kLdB = (kBColMajor ? kTileK : kTileN) + 8;
  static constexpr int kLdC = kTileN + 4;  // float pitch; wmma needs a multiple of 4
  struct Smem {
    alignas(32) T a[kTileM][kLdA];
    alignas(32) T b[kBRows][kLdB];
    alignas(32) float c[kTileM][kLdC];  // epilogue staging (not aliased: 27 KB total is cheap)
  };

#if FASTAR_MC_WMMA
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
#else
  float acc[4][4];  // scalar fallback: FmaTile's interleaved 4 x 4 layout
#endif

  __device__ __forceinline__ void init() {
#if FASTAR_MC_WMMA
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
#else
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#endif
  }
  static __device__ __forceinline__ void put_a(Smem& s, int m, int k, T v) { s.a[m][k] = v; }
  static __device__ __forceinline__ void put_b(Smem& s, int k, int n, T v) {
    if constexpr (kBColMajor)
      s.b[n][k] = v;
    else
      s.b[k][n] = v;
  }

  __device__ __forceinline__ void compute(const Smem& s) {
#if FASTAR_MC_WMMA
    namespace wmma = nvcuda::wmma;
    using BLayout = std::conditional_t<kBColMajor, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;  // rows 16 * wm .. +16
    const int wn = warp % 2;  // cols 32 * wn .. +32
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &s.a[16 * wm][kk], kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = 32 * wn + 16 * j;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
        if constexpr (kBColMajor)
          wmma::load_matrix_sync(fb, &s.b[n][kk], kLdB);
        else
          wmma::load_matrix_sync(fb, &s.b[kk][n], kLdB);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
#else
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    for (int k = 0; k < kTileK; ++k) {
      for (int i = 0; i < 4; ++i) {
        const float av = Num<T>::to_acc(s.a[ty + 16 * i][k]);
        for (int j = 0; j < 4; ++j) {
          const int n = tx + 16 * j;
          const float bv = Num<T>::to_acc(kBColMajor ? s.b[n][k] : s.b[k][n]);
          acc[i][j] += av * bv;
        }
      }
    }
#endif
  }

  // The accumulator fragments have an opaque register layout, so they go
  // through shared memory; the read-back then walks n fastest for coalesced
  // global stores.
  template <typename F>
  __device__ __forceinline__ void epilogue(Smem& s, F&& f) {
#if FASTAR_MC_WMMA
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&s.c[16 * wm][32 * wn + 16 * j], acc[j], kLdC, nvcuda::wmma::mem_row_major);
#else
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) s.c[ty + 16 * i][tx + 16 * j] = acc[i][j];
#endif
    __syncthreads();
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
      const int mi = idx / kTileN;
      const int ni = idx % kTileN;
      f(mi, ni, s.c[mi][ni]);
    }
  }
};

template <typename T, bool kBColMajor>
using TileFor = std::conditional_t<kIsLowPrecision<T>, TensorCoreTile<T, kBColMajor>, FmaTile<T>>;

}  // namespace gemm
}  // namespace fastar
