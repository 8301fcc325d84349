// The vectorised exp of the CPU kernels, one algorithm in two spellings: vexp, one lane in
// plain C++ that GCC vectorises inside the kernels' loops (libm's expf would block that), and
// vexp8_avx2, the same operations on eight AVX2 lanes for code written in intrinsics. Range
// reduction by ln 2 (rounded by the 1.5 * 2^23 trick, no floorf), Cephes' degree-6 polynomial,
// about 1-2 ulp on [-87.3, 88]; inputs beyond are clamped (exp(-87.3) ~ 1e-38 stands in for 0).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastar {
namespace vec {

__attribute__((always_inline)) inline float lane_pow2(int32_t n) {
  const int32_t b = (n + 127) << 23;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// exp for x in about [-87, 88]; inputs beyond are clamped (exp(-87.3) ~ 1e-38 stands in for 0).
// Without no-trapping-math GCC keeps the clamps' selects as branches and the loops around vexp
// do not vectorise. fastar never traps on floating-point exceptions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
__attribute__((always_inline)) inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no floorf: it would not vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * lane_pow2(static_cast<int32_t>(n));
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) inline __m256 vexp8_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

}  // namespace vec
}  // namespace fastar
