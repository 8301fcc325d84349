// The one categorical inverse-CDF pick behind "same seed, same sample": every draw site (the
// categorical_sample kernels, the mixture component draw, wavenet_step and
// gated_pixelcnn_step on CPU and CUDA) calls categorical_pick (or, in a warp,
// warp_categorical_pick, which performs the very same operations), and categorical_sample_ref
// (fastar/ops/mixture.py) performs them too, as tensor ops, so that in float64 on CPU the
// kernels and the reference draw the same index bit for bit.
//
// The rule, for logits l_0..l_{K-1} (masked ones already -inf), temperature t > 0 and one
// uniform u in [0, 1), everything in the accumulator type A (acc_type.h):
//   z_j = l_j / t                       (a division, as torch's `work / temperature`)
//   m   = max_j z_j                     (NaN-propagating, like torch.amax)
//   e_j = exp_rn(z_j - m)               (exp_rn below: the same roundings as the reference)
//   c_j = c_{j-1} + e_j, c_{-1} = 0     (sequential, left to right: torch.cumsum on CPU)
//   pick = #{j : c_j <= u * c_{K-1}}, capped at the last j with e_j > 0
// which, as c is non-decreasing, is the first j with c_j > u * c_{K-1}, else that last j.
// Comparing c_j with u * total instead of c_j / total with u saves K divisions and one rounding
// per category. Temperature 0 is the first argmax (argmax_first), not this rule.
//
// NaN: a NaN (or +inf) logit makes m or every z_j - m NaN, so no c_j compares and no e_j is
// positive: the pick is 0, as the reference's all-NaN row gives. argmax_first skips NaNs after
// index 0.
//
// Bitwise agreement with the reference needs every rounding to happen where torch's separate
// tensor ops round: products go through mul_rn, which the compiler may not fuse with the
// following addition into an FMA (GCC does for FMA targets by default, nvcc always).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h
namespace cat {

FASTAR_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));  // an opaque copy: the product is rounded before any use
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile double v = p;
  p = v;
#endif
  return p;
#endif
}

// The float twin: a float product rounded once, never fused into a following addition.
FASTAR_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile float v = p;
  p = v;
#endif
  return p;
#endif
}

FASTAR_HOST_DEVICE double pow2_rn(int64_t n) {  // 2^n for n in [-1022, 1023], built from its bits
  const long long bits = static_cast<long long>(n + 1023) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(bits);
#else
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
#endif
}

// exp(x) for x <= 0 (the pick only takes exp of z - max): Cody-Waite reduction by ln 2 and
// Cephes' rational approximation, about 1 ulp. Below -708 (where 2^n would leave the normal
// range) the result is 0: such a category weighs nothing next to the maximum's 1. NaN stays NaN.
// Only +, *, / and floor, each rounded once, so any IEEE machine (and torch) gets the same bits.
FASTAR_HOST_DEVICE double exp_rn(double x) {
  if (!(x >= -708.0)) return x != x ? x : 0.0;
  if (x > 709.0) return INFINITY;
  const double n = floor(mul_rn(x, 1.4426950408889634073599) + 0.5);
  double r = x - mul_rn(n, 6.93145751953125e-1);  // ln 2 high part: n * it is exact
  r = r - mul_rn(n, 1.42860682030941723212e-6);
  const double rr = mul_rn(r, r);
  const double px =
      mul_rn(r, mul_rn(mul_rn(1.26177193074810590878e-4, rr) + 3.02994407707441961300e-2, rr) +
                    9.99999999999999999910e-1);
  const double qx =
      mul_rn(mul_rn(mul_rn(3.00198505138664455042e-6, rr) + 2.52448340349684104192e-3, rr) +
                 2.27265548208155028766e-1,
             rr) +
      2.00000000000000000009e0;
  const double e = 1.0 + mul_rn(2.0, px / (qx - px));
  return mul_rn(e, pow2_rn(static_cast<int64_t>(n)));
}

#if !defined(__CUDACC__)
// exp_rn over a block on the CPU, 8 lanes at a time: the very operations of exp_rn (each product,
// sum and quotient rounded once: fp-contract=off keeps the compiler from fusing a product and a
// sum into an FMA, the one thing that would change a bit), floor done exactly with the 1.5 * 2^52
// trick plus a correction, 2^n built from its bits. Scalar exp_rn finishes the tail. The pick
// calls it wherever it has scratch for the exps: a scalar exp_rn costs ~30 ns behind its rounding
// barriers, which at 256 categories was most of a WaveNet step.
namespace detail {
typedef double v8d __attribute__((vector_size(64)));
typedef long long v8l __attribute__((vector_size(64)));
}  // namespace detail

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAR_CAT_BLOCK_ATTRS \
  __attribute__((optimize("fp-contract=off"), target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#elif defined(__clang__)
#define FASTAR_CAT_BLOCK_ATTRS
#pragma clang fp contract(off)
#else
#define FASTAR_CAT_BLOCK_ATTRS __attribute__((optimize("fp-contract=off")))
#endif

FASTAR_CAT_BLOCK_ATTRS static void exp_rn_block(double* x, int64_t n) {
  using detail::v8d;
  using detail::v8l;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8d v;
    std::memcpy(&v, x + i, sizeof v);
    const v8d y = v * 1.4426950408889634073599 + 0.5;
    const v8d magic = v8d{} + 6755399441055744.0;  // 1.5 * 2^52: y + magic rounds y to an integer
    v8d nr = (y + magic) - magic;
    const v8l above = nr > y;                       // rounded up: floor is one less
    v8d n = nr - (v8d)((v8l)(v8d{} + 1.0) & above);
    v8d r = v - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    const v8d rr = r * r;
    const v8d px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
    const v8d qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) *
                       rr + 2.00000000000000000009e0;
    const v8d e = 1.0 + 2.0 * (px / (qx - px));
    const v8l ok = v >= -708.0;                     // false for NaN too
    n = (v8d)((v8l)n & ok);                         // a safe exponent in the lanes replaced below
    // n is an integer-valued double in [-1022, 1023]: n + magic holds it in the low mantissa bits.
    const v8l ni = (v8l)(n + magic) - (v8l)magic;
    const v8d p2 = (v8d)((ni + 1023) << 52);
    const v8d res = e * p2;
    const v8l isnan = v != v;
    const v8d out = (v8d)(((v8l)res & ok) | ((v8l)v & isnan));  // below -708: 0; NaN stays NaN
    std::memcpy(x + i, &out, sizeof out);
  }
  for (; i < n; ++i) x[i] = exp_rn(x[i]);
}
#endif

// exp in the accumulator type: float rounds the double result once.
FASTAR_HOST_DEVICE double cat_exp(double x) { return exp_rn(x); }
FASTAR_HOST_DEVICE float cat_exp(float x) { return static_cast<float>(exp_rn(static_cast<double>(x))); }

// The running maximum's step: NaN in, NaN out, whatever the order (so a warp's tree and the
// serial loop agree).
template <typename A>
FASTAR_HOST_DEVICE A nan_max(A m, A z) {
  return (z > m || z != z) ? z : m;
}

// The pick (see the top of the file). `at(j)` yields logit j in A; temp > 0. `e`, if given,
// is scratch for K values so each exp is taken once; without it the exps are recomputed
// (identical values), which suits registers-only device code.
#if !defined(__CUDACC__)
// e[j] = cat_exp(e[j]) for j < K, through exp_rn_block (the same bits as cat_exp).
inline void cat_exp_inplace(double* e, int64_t K) { exp_rn_block(e, K); }
inline void cat_exp_inplace(float* e, int64_t K) {
  double buf[64];
  for (int64_t j0 = 0; j0 < K; j0 += 64) {
    const int64_t n = K - j0 < 64 ? K - j0 : 64;
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<double>(e[j0 + j]);
    exp_rn_block(buf, n);
    for (int64_t j = 0; j < n; ++j) e[j0 + j] = static_cast<float>(buf[j]);
  }
}
#endif

template <typename A, typename F>
FASTAR_HOST_DEVICE int64_t categorical_pick(F at, int64_t K, A temp, A u, A* e = nullptr) {
  A m = at(0) / temp;
  for (int64_t j = 1; j < K; ++j) m = nan_max(m, at(j) / temp);
  A total = 0;
#if !defined(__CUDACC__)
  if (e) {  // host with scratch: the exps a block at a time, then the same sequential sum
    for (int64_t j = 0; j < K; ++j) e[j] = at(j) / temp - m;
    cat_exp_inplace(e, K);
    for (int64_t j = 0; j < K; ++j) total += e[j];
  } else
#endif
  for (int64_t j = 0; j < K; ++j) {
    const A ej = cat_exp(at(j) / temp - m);
    if (e) e[j] = ej;
    total += ej;
  }
  const A ut = u * total;
  A c = 0;
  int64_t last = 0;
  for (int64_t j = 0; j < K; ++j) {
    const A ej = e ? e[j] : cat_exp(at(j) / temp - m);
    c += ej;
    if (c > ut) return j;
    if (ej > A(0)) last = j;
  }
  return last;
}

// First index of the largest value (torch.argmax's tie rule): the temperature-0 draw.
template <typename A, typename F>
FASTAR_HOST_DEVICE int64_t argmax_first(F at, int64_t K) {
  int64_t best = 0;
  A bv = at(0);
  for (int64_t j = 1; j < K; ++j) {
    const A v = at(j);
    if (v > bv) {
      bv = v;
      best = j;
    }
  }
  return best;
}

// temperature 0: argmax, else the pick.
template <typename A, typename F>
FASTAR_HOST_DEVICE int64_t categorical_draw(F at, int64_t K, A temp, A u, A* e = nullptr) {
  return temp == A(0) ? argmax_first<A>(at, K) : categorical_pick<A>(at, K, temp, u, e);
}

#if defined(__CUDACC__)
// categorical_pick by the 32 lanes of a warp (all lanes call it and get the same index): lanes
// take the max and the exps of their categories in parallel, and the two sums stay sequential,
// left to right, every lane adding the same values in the same order (broadcast by shuffles),
// so every rounding is the serial rule's. The max is exact whatever the order (nan_max keeps a
// NaN), and only +-0 ties could differ, which z - m and exp do not see.
template <typename A, typename F>
__device__ __forceinline__ int64_t warp_categorical_pick(F at, int K, A temp, A u) {
  const int lane = threadIdx.x & 31;
  A m = at(0) / temp;
  for (int j = lane; j < K; j += 32) m = nan_max(m, at(j) / temp);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, d));
  A total = 0;
  for (int base = 0; base < K; base += 32) {
    const int j = base + lane;
    const A ej = j < K ? cat_exp(at(j) / temp - m) : A(0);
    const int n = K - base < 32 ? K - base : 32;
    for (int i = 0; i < n; ++i) total += __shfl_sync(0xffffffffu, ej, i);
  }
  const A ut = u * total;
  A c = 0;
  int last = 0;
  for (int base = 0; base < K; base += 32) {
    const int j = base + lane;
    const A ej = j < K ? cat_exp(at(j) / temp - m) : A(0);
    const int n = K - base < 32 ? K - base : 32;
    for (int i = 0; i < n; ++i) {
      c += __shfl_sync(0xffffffffu, ej, i);
      if (c > ut) return base + i;  // c is the same in every lane: the warp leaves together
    }
    const unsigned pos = __ballot_sync(0xffffffffu, ej > A(0));
    if (pos) last = base + 31 - __clz(pos);
  }
  return last;
}

// argmax_first by a warp: the first index of the largest value.
template <typename A, typename F>
__device__ __forceinline__ int64_t warp_argmax_first(F at, int K) {
  const int lane = threadIdx.x & 31;
  A best = at(0);
  int bi = 0;
  for (int j = lane; j < K; j += 32) {
    const A v = at(j);
    if (v > best || (v == best && j < bi)) best = v, bi = j;
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, best, d);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
    if (ov > best || (ov == best && oi < bi)) best = ov, bi = oi;
  }
  return bi;
}
#endif

}  // namespace cat
}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
