// GEMV building blocks of the CPU step kernels (wavenet_step's three strategies; meant for any
// recurrent step that multiplies a few rows by (in, out) matrices, e.g. PixelRNN's scans):
//   gemv_generic / gemv_avx2: y += x @ W on a row-major (in, out) matrix, the output tile in
//     registers (AVX2: 8 vectors at batch 1, 4 rows x 2 vectors for larger batches);
//   pack_panels / gemv_panels: the same product on a matrix packed once into contiguous 64- and
//     16-column panels, streamed by AVX-512 (a panel walk is contiguous: the prefetchers follow
//     it at twice the bandwidth of a 1 KB-strided row-major walk).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#ifndef FASTAR_X86
#define FASTAR_X86 1
#endif
#endif

namespace fastar {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// A 16-column group of a packed matrix read in place: source columns [col, col + n) (see gemv_rows).
struct ColGroup {
  int64_t col;
  int64_t n;
};


// y[b*ldy + o] += sum_i x[b*ldx + i] * W[i*ldw + o] for b < nb, o in [o0, o1).
template <typename T>
void gemv_generic(const T* W, int64_t ldw, int64_t K, int64_t o0, int64_t o1, const T* x, int64_t ldx, T* y,
                  int64_t ldy, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    T* yb = y + b * ldy;
    const T* xb = x + b * ldx;
    for (int64_t i = 0; i < K; ++i) {
      const T xi = xb[i];
      const T* wr = W + i * ldw;
      for (int64_t o = o0; o < o1; ++o) yb[o] += xi * wr[o];
    }
  }
}

#ifdef FASTAR_X86
template <int NB, int OV>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                           int64_t ldx, float* y, int64_t ldy) {
  __m256 acc[NB][OV];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < OV; ++v) acc[b][v] = _mm256_loadu_ps(y + b * ldy + 8 * v);
  for (int64_t i = 0; i < K; ++i) {
    const float* wr = W + i * ldw;
    __m256 w[OV];
    for (int v = 0; v < OV; ++v) w[v] = _mm256_loadu_ps(wr + 8 * v);
    for (int b = 0; b < NB; ++b) {
      const __m256 xb = _mm256_broadcast_ss(x + b * ldx + i);
      for (int v = 0; v < OV; ++v) acc[b][v] = _mm256_fmadd_ps(xb, w[v], acc[b][v]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < OV; ++v) _mm256_storeu_ps(y + b * ldy + 8 * v, acc[b][v]);
}

// The 4-row x 16-column tile written out by hand: GCC spills the array form of it.
__attribute__((target("avx2,fma"))) inline void tile4x2_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                              int64_t ldx, float* y, int64_t ldy) {
  __m256 a00 = _mm256_loadu_ps(y), a01 = _mm256_loadu_ps(y + 8);
  __m256 a10 = _mm256_loadu_ps(y + ldy), a11 = _mm256_loadu_ps(y + ldy + 8);
  __m256 a20 = _mm256_loadu_ps(y + 2 * ldy), a21 = _mm256_loadu_ps(y + 2 * ldy + 8);
  __m256 a30 = _mm256_loadu_ps(y + 3 * ldy), a31 = _mm256_loadu_ps(y + 3 * ldy + 8);
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  for (int64_t i = 0; i < K; ++i) {
    const float* wr = W + i * ldw;
    const __m256 w0 = _mm256_loadu_ps(wr), w1 = _mm256_loadu_ps(wr + 8);
    __m256 xb = _mm256_broadcast_ss(x0 + i);
    a00 = _mm256_fmadd_ps(xb, w0, a00);
    a01 = _mm256_fmadd_ps(xb, w1, a01);
    xb = _mm256_broadcast_ss(x1 + i);
    a10 = _mm256_fmadd_ps(xb, w0, a10);
    a11 = _mm256_fmadd_ps(xb, w1, a11);
    xb = _mm256_broadcast_ss(x2 + i);
    a20 = _mm256_fmadd_ps(xb, w0, a20);
    a21 = _mm256_fmadd_ps(xb, w1, a21);
    xb = _mm256_broadcast_ss(x3 + i);
    a30 = _mm256_fmadd_ps(xb, w0, a30);
    a31 = _mm256_fmadd_ps(xb, w1, a31);
  }
  _mm256_storeu_ps(y, a00);
  _mm256_storeu_ps(y + 8, a01);
  _mm256_storeu_ps(y + ldy, a10);
  _mm256_storeu_ps(y + ldy + 8, a11);
  _mm256_storeu_ps(y + 2 * ldy, a20);
  _mm256_storeu_ps(y + 2 * ldy + 8, a21);
  _mm256_storeu_ps(y + 3 * ldy, a30);
  _mm256_storeu_ps(y + 3 * ldy + 8, a31);
}

template <int OV>
__attribute__((target("avx2,fma"))) inline void rows_avx2(const float* W, int64_t ldw, int64_t K, const float* x,
                                                           int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    if constexpr (OV == 2)
      tile4x2_avx2(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy);
    else
      tile_avx2<4, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy);
  }
  // The last 1-3 rows as one tile, one accumulator per output as above: an output's bits must not
  // depend on which rows share its tile, since the rows a thread gets depend on the thread count
  // (a 1-row tile with several partial sums over i, faster at batch 1, gave other bits).
  switch (nb - b) {
    case 3: tile_avx2<3, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy); break;
    case 2: tile_avx2<2, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy); break;
    case 1: tile_avx2<1, OV>(W, ldw, K, x + b * ldx, ldx, y + b * ldy, ldy); break;
    default: break;
  }
}

__attribute__((target("avx2,fma"))) inline void gemv_avx2(const float* W, int64_t ldw, int64_t K, int64_t o0, int64_t o1,
                                                    const float* x, int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t o = o0;
  if (nb == 1) {
    for (; o + 64 <= o1; o += 64) tile_avx2<1, 8>(W + o, ldw, K, x, ldx, y + o, ldy);
  }
  for (; o + 16 <= o1; o += 16) rows_avx2<2>(W + o, ldw, K, x, ldx, y + o, ldy, nb);
  for (; o + 8 <= o1; o += 8) rows_avx2<1>(W + o, ldw, K, x, ldx, y + o, ldy, nb);
  if (o < o1) gemv_generic<float>(W, ldw, K, o, o1, x, ldx, y, ldy, nb);
}
#endif

#ifdef FASTAR_X86
// y[0:64) += x[0:K) @ P (K x 64, contiguous): two accumulator sets over alternate rows.
__attribute__((target("avx512f"))) inline void panel64(const float* P, int64_t K, const float* x, float* y) {
  __m512 a0 = _mm512_loadu_ps(y), a1 = _mm512_loadu_ps(y + 16), a2 = _mm512_loadu_ps(y + 32),
         a3 = _mm512_loadu_ps(y + 48);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= K; i += 2) {
    const float* w = P + i * 64;
    const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 16), a1);
    a2 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 32), a2);
    a3 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 48), a3);
    b0 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 64), b0);
    b1 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 80), b1);
    b2 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 96), b2);
    b3 = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w + 112), b3);
  }
  if (i < K) {
    const float* w = P + i * 64;
    const __m512 x0 = _mm512_set1_ps(x[i]);
    a0 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w), a0);
    a1 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 16), a1);
    a2 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 32), a2);
    a3 = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w + 48), a3);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(a0, b0));
  _mm512_storeu_ps(y + 16, _mm512_add_ps(a1, b1));
  _mm512_storeu_ps(y + 32, _mm512_add_ps(a2, b2));
  _mm512_storeu_ps(y + 48, _mm512_add_ps(a3, b3));
}

// y[0:16) += x[0:K) @ P (K x 16): four accumulators over rows i mod 4.
__attribute__((target("avx512f"))) inline void panel16(const float* P, int64_t K, const float* x, float* y) {
  __m512 a = _mm512_loadu_ps(y), b = _mm512_setzero_ps(), c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {
    const float* w = P + i * 16;
    a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(w), a);
    b = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 1]), _mm512_loadu_ps(w + 16), b);
    c = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 2]), _mm512_loadu_ps(w + 32), c);
    d = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 3]), _mm512_loadu_ps(w + 48), d);
  }
  for (; i < K; ++i) a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(P + i * 16), a);
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// y[b, 0:width) += x[b, 0:K) @ (packed K x width matrix) for b < nb; width is a multiple of
// 16 (64-wide panels first, then 16-wide ones), each panel contiguous.
__attribute__((target("avx512f"))) inline void gemv_panels(const float* P, int64_t K, int64_t width, const float* x,
                                                      int64_t ldx, float* y, int64_t ldy, int64_t nb) {
  int64_t o = 0;
  for (; o + 64 <= width; o += 64, P += K * 64)
    for (int64_t b = 0; b < nb; ++b) panel64(P, K, x + b * ldx, y + b * ldy + o);
  for (; o + 16 <= width; o += 16, P += K * 16)
    for (int64_t b = 0; b < nb; ++b) panel16(P, K, x + b * ldx, y + b * ldy + o);
}

// The same products read straight from the row-major matrix, with no packing: logical 16-column
// group j of the packed form is source columns [col, col + n) of rows [r0, r0 + K) (n < 16 is a
// range's last group: its missing columns read as the zeros the packing pads with). Every output
// is the very arithmetic of panel64 / panel16 (the same accumulators, the same rows in the same
// order, the same final adds), so a product gives the same bits packed or not: a caller may pack
// when a matrix is reused enough to repay it and read it in place otherwise.
__attribute__((target("avx512f"))) inline __m512 load_group(const float* row, const ColGroup& g) {
  if (g.n >= 16) return _mm512_loadu_ps(row + g.col);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << g.n) - 1u), row + g.col);
}

__attribute__((target("avx512f"))) inline void panel64_rows(const float* W, int64_t ldw, const ColGroup* gr, int64_t K,
                                                          const float* x, float* y) {
  __m512 a0 = _mm512_loadu_ps(y), a1 = _mm512_loadu_ps(y + 16), a2 = _mm512_loadu_ps(y + 32),
         a3 = _mm512_loadu_ps(y + 48);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= K; i += 2) {
    const float* w = W + i * ldw;
    const float* v = w + ldw;
    const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
    a0 = _mm512_fmadd_ps(x0, load_group(w, gr[0]), a0);
    a1 = _mm512_fmadd_ps(x0, load_group(w, gr[1]), a1);
    a2 = _mm512_fmadd_ps(x0, load_group(w, gr[2]), a2);
    a3 = _mm512_fmadd_ps(x0, load_group(w, gr[3]), a3);
    b0 = _mm512_fmadd_ps(x1, load_group(v, gr[0]), b0);
    b1 = _mm512_fmadd_ps(x1, load_group(v, gr[1]), b1);
    b2 = _mm512_fmadd_ps(x1, load_group(v, gr[2]), b2);
    b3 = _mm512_fmadd_ps(x1, load_group(v, gr[3]), b3);
  }
  if (i < K) {
    const float* w = W + i * ldw;
    const __m512 x0 = _mm512_set1_ps(x[i]);
    a0 = _mm512_fmadd_ps(x0, load_group(w, gr[0]), a0);
    a1 = _mm512_fmadd_ps(x0, load_group(w, gr[1]), a1);
    a2 = _mm512_fmadd_ps(x0, load_group(w, gr[2]), a2);
    a3 = _mm512_fmadd_ps(x0, load_group(w, gr[3]), a3);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(a0, b0));
  _mm512_storeu_ps(y + 16, _mm512_add_ps(a1, b1));
  _mm512_storeu_ps(y + 32, _mm512_add_ps(a2, b2));
  _mm512_storeu_ps(y + 48, _mm512_add_ps(a3, b3));
}

__attribute__((target("avx512f"))) inline void panel16_rows(const float* W, int64_t ldw, const ColGroup& gr, int64_t K,
                                                          const float* x, float* y) {
  __m512 a = _mm512_loadu_ps(y), b = _mm512_setzero_ps(), c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {
    const float* w = W + i * ldw;
    a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), load_group(w, gr), a);
    b = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 1]), load_group(w + ldw, gr), b);
    c = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 2]), load_group(w + 2 * ldw, gr), c);
    d = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 3]), load_group(w + 3 * ldw, gr), d);
  }
  for (; i < K; ++i) a = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), load_group(W + i * ldw, gr), a);
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// gemv_panels on the unpacked matrix: W points at row r0 of the source (leading dim ldw), groups
// are the logical width / 16 column groups (panel_groups).
__attribute__((target("avx512f"))) inline void gemv_rows(const float* W, int64_t ldw, const ColGroup* groups, int64_t K,
                                                       int64_t width, const float* x, int64_t ldx, float* y,
                                                       int64_t ldy, int64_t nb) {
  int64_t o = 0;
  for (; o + 64 <= width; o += 64)
    for (int64_t b = 0; b < nb; ++b) panel64_rows(W, ldw, groups + o / 16, K, x + b * ldx, y + b * ldy + o);
  for (; o + 16 <= width; o += 16)
    for (int64_t b = 0; b < nb; ++b) panel16_rows(W, ldw, groups[o / 16], K, x + b * ldx, y + b * ldy + o);
}
#else
inline void gemv_panels(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t) {}
inline void gemv_rows(const float*, int64_t, const ColGroup*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                      int64_t) {}
#endif

// The 16-column groups of the packed form of the listed column ranges (pack_panels' layout).
inline std::vector<ColGroup> panel_groups(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  std::vector<ColGroup> out;
  for (auto [c0, c1] : ranges)
    for (int64_t c = c0; c < c1; c += 16) out.push_back({c, std::min<int64_t>(16, c1 - c)});
  return out;
}

// Packs rows [r0, r0 + K) and the listed column ranges of a row-major matrix (leading dim ldw)
// into panels: logical column c of the result is the c-th listed column, each range starting
// at a multiple of 16 (zero columns pad every range up to one).
inline void pack_panels(const float* W, int64_t ldw, int64_t r0, int64_t K,
                 const std::vector<std::pair<int64_t, int64_t>>& ranges, float* dst) {
  std::vector<int64_t> src;  // source column of each logical column, -1 = padding
  for (auto [c0, c1] : ranges) {
    for (int64_t c = c0; c < c1; ++c) src.push_back(c);
    while (src.size() % 16) src.push_back(-1);
  }
  const int64_t width = static_cast<int64_t>(src.size());
  int64_t o = 0;
  auto panel = [&](int64_t pw) {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t c = 0; c < pw; ++c) {
        const int64_t sc = src[o + c];
        *dst++ = sc < 0 ? 0.0f : W[(r0 + i) * ldw + sc];
      }
    o += pw;
  };
  while (o + 64 <= width) panel(64);
  while (o + 16 <= width) panel(16);
}

}  // namespace fastar
