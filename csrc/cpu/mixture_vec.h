// float32 CPU fast path of the discretized logistic mixture loss (included by
// csrc/cpu/mixture.cpp only: it defines the multi-versioned tile functions): the same
// math as mixture.h, rewritten branch-free over tiles of kTile neighbouring
// positions so the compiler vectorises every inner loop (params rows are
// contiguous along positions). libm's expf/logf would block vectorisation, so
// exp and log are Cephes-style polynomials (about 1 ulp on the ranges used
// here); each of the four cases of the paper's likelihood is reduced to
// `pre + log(arg)` with the case picked by selects, so one log serves all
// four. Selected-away lanes may hold inf/nan; selects discard them.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <cstring>

#include "common/vec_math.h"
#include "mixture.h"

// Without this GCC keeps every select whose comparison could raise a
// floating-point exception as a branch, and a loop with branches does not
// vectorise. fastar never traps on floating-point exceptions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastar {
namespace mixvec {

using vec::vexp;

constexpr int kTile = 64;

#define FASTAR_AI __attribute__((always_inline)) inline

FASTAR_AI float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FASTAR_AI int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
FASTAR_AI float vmax(float a, float b) { return a > b ? a : b; }
FASTAR_AI float vmin(float a, float b) { return a < b ? a : b; }
// max(v, lo) keeping a NaN v, as mix::clamp_below (the log-scale clamp must not eat a NaN).
FASTAR_AI float vclamp_below(float v, float lo) { return v < lo ? lo : v; }

// log for positive normal x.
FASTAR_AI float vlog(float x) {
  const int32_t b = float_to_bits(x);
  int32_t e = ((b >> 23) & 0xff) - 127;
  float m = bits_to_float((b & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  const float mh = m * 0.5f;  // computed unconditionally: GCC only if-converts selects of ready values
  m = big ? mh : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  const float r = f + y + fe * 0.693359375f;
  // The bit trick above reads NaN as a finite number: keep NaN NaN (one select), so a NaN
  // parameter cannot come out of the loss as a finite value.
  return x == x ? r : x;
}

FASTAR_AI float vtanh(float v) {
  // tanh(v) = sign(v) (1 - e) / (1 + e), e = exp(-2|v|): no overflow, no cancellation near 0 beyond 1e-7 abs.
  const float nv = -v;
  const float a = v < 0 ? nv : v;
  const float e = vexp(-2.0f * a);
  const float t = (1.0f - e) / (1.0f + e);
  const float nt = -t;
  return v < 0 ? nt : t;
}

struct VConst {
  float h, log_half_bins, edge, min_mass, ls_min;
};

// log P(bin of xv | logistic(m, exp(ls))) and, when kGrad, its derivatives by
// (x - m) and by ls; the case analysis of mixture.h's logistic_bin_logp.
template <bool kGrad>
FASTAR_AI float vlogp(float xv, float m, float ls, const VConst& k, float& dc, float& dls) {
  const float c = xv - m;
  const float inv_s = vexp(-ls);
  const float plus = inv_s * (c + k.h), mn = inv_s * (c - k.h), mid = inv_s * c;
  const float np = -plus, nm = -mn, nmid = -mid;
  const float ap = plus < 0 ? np : plus, am = mn < 0 ? nm : mn, amid = mid < 0 ? nmid : mid;
  const float ep = vexp(-ap), em = vexp(-am), emid = vexp(-amid);
  // Three reciprocals from one division (divisions dominate the vector pipe here); the
  // denominators lie in [1, 2], so the product neither overflows nor loses range.
  const float dp = 1.0f + ep, dm = 1.0f + em, dmid = 1.0f + emid;
  const float dpm = dp * dm;
  const float r3 = 1.0f / (dpm * dmid);
  const float rmid = r3 * dpm, rpm = r3 * dmid;
  const float rp = rpm * dm, rm = rpm * dp;
  const float epr = ep * rp, emr = em * rm;
  const float cp = plus >= 0 ? rp : epr;   // sigmoid(plus)
  const float cm = mn >= 0 ? rm : emr;     // sigmoid(mn)
  const float ncp = plus >= 0 ? epr : rp;  // 1 - sigmoid(plus)
  const float ncm = mn >= 0 ? emr : rm;    // 1 - sigmoid(mn)
  // In the right tail both CDFs are near 1: difference the complements instead (no cancellation).
  const float d_tail = ncm - ncp, d_body = cp - cm;
  const float delta = mn > 0 ? d_tail : d_body;
  const bool lo = xv < -k.edge, hi = xv > k.edge, mass = delta > k.min_mass;
  // Every arm is computed before the selects: with trapping math on, GCC will not if-convert (and so
  // not vectorise) a select whose arms still contain floating-point operations.
  const float pre_lo = vmin(plus, 0.0f), pre_hi = -vmax(mn, 0.0f);
  const float pre_pdf = mid - ls - 2.0f * vmax(mid, 0.0f) - k.log_half_bins;
  const float arg_mass = vmax(delta, 1e-12f), arg_pdf = rmid * rmid;
  const float pre = lo ? pre_lo : (hi ? pre_hi : (mass ? 0.0f : pre_pdf));
  const float arg = lo ? rp : (hi ? rm : (mass ? arg_mass : arg_pdf));
  if (kGrad) {
    const float emidr = emid * rmid;
    const float smid = mid >= 0 ? rmid : emidr;
    const float inv_d = 1.0f / (mass ? delta : 1.0f);
    const float gp = cp * ncp * inv_d, gm = -cm * ncm * inv_d;
    const float gq = 1.0f - 2.0f * smid;
    const float dc_lo = inv_s * ncp, dc_hi = -inv_s * cm, dc_mass = inv_s * (gp + gm), dc_pdf = inv_s * gq;
    const float dls_lo = -plus * ncp, dls_hi = mn * cm, dls_mass = -(plus * gp + mn * gm), dls_pdf = -mid * gq - 1.0f;
    dc = lo ? dc_lo : (hi ? dc_hi : (mass ? dc_mass : dc_pdf));
    dls = lo ? dls_lo : (hi ? dls_hi : (mass ? dls_mass : dls_pdf));
  }
  // A non-finite mean: NaN, as mix::logistic_bin_logp (one select per lane, no branch).
  const bool finite_m = (m - m) == 0.0f;
  const float nan = m - m;
  if (kGrad) {
    dc = finite_m ? dc : nan;
    dls = finite_m ? dls : nan;
  }
  const float lp = pre + vlog(arg);
  return finite_m ? lp : nan;
}

// Log-sum-exp over the K logits of each position of the tile.
FASTAR_AI void tile_logits_lse(const float* __restrict p0, int64_t N, int64_t K, int L, float* __restrict lse) {
  alignas(64) float mx[kTile], acc[kTile];
  for (int i = 0; i < L; ++i) mx[i] = p0[i];
  for (int64_t j = 1; j < K; ++j) {
    const float* row = p0 + j * N;
    for (int i = 0; i < L; ++i) mx[i] = vmax(mx[i], row[i]);
  }
  for (int i = 0; i < L; ++i) acc[i] = 0.0f;
  for (int64_t j = 0; j < K; ++j) {
    const float* row = p0 + j * N;
    for (int i = 0; i < L; ++i) acc[i] += vexp(row[i] - mx[i]);
  }
  for (int i = 0; i < L; ++i) lse[i] = mx[i] + vlog(acc[i]);
}

// Effective mean of colour c under component j (the coefficient terms use the known sub-pixels).
template <int C>
FASTAR_AI void tile_means(const float* __restrict p0, int64_t N, int64_t K, int64_t j, int L,
                          const float (*xv)[kTile], float (*m)[kTile], float (*t)[kTile]) {
  constexpr int S = C == 3 ? 3 : 2;
  for (int c = 0; c < C; ++c) {
    const float* row = p0 + (K + c * S * K + j) * N;
    for (int i = 0; i < L; ++i) m[c][i] = row[i];
  }
  if constexpr (C == 3) {
    for (int c = 0; c < 3; ++c) {
      const float* row = p0 + (K + c * S * K + 2 * K + j) * N;
      for (int i = 0; i < L; ++i) t[c][i] = vtanh(row[i]);
    }
    for (int i = 0; i < L; ++i) {
      m[1][i] = m[1][i] + t[0][i] * xv[0][i];
      m[2][i] = m[2][i] + t[1][i] * xv[0][i] + t[2][i] * xv[1][i];
    }
  }
}

// Forward of one tile: out[i] = NLL of position i. sbuf holds K * kTile floats.
template <int C>
FASTAR_AI void tile_forward(const float* __restrict p0, const float* __restrict x0, int64_t N, int64_t K, int L,
                            const VConst& k, float* __restrict out, float* __restrict sbuf) {
  constexpr int S = C == 3 ? 3 : 2;
  alignas(64) float xv[C][kTile], m[C][kTile], t[3][kTile], lse[kTile], mx[kTile], acc[kTile];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < L; ++i) xv[c][i] = x0[c * N + i];
  tile_logits_lse(p0, N, K, L, lse);
  for (int64_t j = 0; j < K; ++j) {
    float* s = sbuf + j * kTile;
    const float* lrow = p0 + j * N;
    for (int i = 0; i < L; ++i) s[i] = lrow[i] - lse[i];
    tile_means<C>(p0, N, K, j, L, xv, m, t);
    for (int c = 0; c < C; ++c) {
      const float* lsrow = p0 + (K + c * S * K + K + j) * N;
      for (int i = 0; i < L; ++i) {
        float d0, d1;
        s[i] += vlogp<false>(xv[c][i], m[c][i], vclamp_below(lsrow[i], k.ls_min), k, d0, d1);
      }
    }
  }
  for (int i = 0; i < L; ++i) mx[i] = sbuf[i];
  for (int64_t j = 1; j < K; ++j)
    for (int i = 0; i < L; ++i) mx[i] = vmax(mx[i], sbuf[j * kTile + i]);
  for (int i = 0; i < L; ++i) acc[i] = 0.0f;
  for (int64_t j = 0; j < K; ++j)
    for (int i = 0; i < L; ++i) acc[i] += vexp(sbuf[j * kTile + i] - mx[i]);
  // Every component at log-probability -inf (zero mass): the NLL is +inf, as in the reference,
  // not -(-inf - inf + ...) = NaN.
  const float inf = __builtin_inff();
  for (int i = 0; i < L; ++i) {
    const float v = -(mx[i] + vlog(acc[i]));
    out[i] = mx[i] == -inf ? inf : v;
  }
}

// Backward of one tile given g (dL/dnll) and the forward's nll; writes the
// params gradient rows (gp0, may be null) and the x gradient (gx0, may be null).
template <int C>
FASTAR_AI void tile_backward(const float* __restrict p0, const float* __restrict x0, int64_t N, int64_t K, int L,
                             const VConst& k, const float* __restrict g, const float* __restrict nll,
                             float* __restrict gp0, float* __restrict gx0) {
  constexpr int S = C == 3 ? 3 : 2;
  alignas(64) float xv[C][kTile], m[C][kTile], t[3][kTile], lse[kTile], s[kTile], gxa[C][kTile];
  alignas(64) float dc[C][kTile], dls[C][kTile], ga[kTile];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < L; ++i) {
      xv[c][i] = x0[c * N + i];
      gxa[c][i] = 0.0f;
    }
  tile_logits_lse(p0, N, K, L, lse);
  for (int64_t j = 0; j < K; ++j) {
    const float* lrow = p0 + j * N;
    for (int i = 0; i < L; ++i) s[i] = lrow[i] - lse[i];
    tile_means<C>(p0, N, K, j, L, xv, m, t);
    for (int c = 0; c < C; ++c) {
      const float* lsrow = p0 + (K + c * S * K + K + j) * N;
      for (int i = 0; i < L; ++i)
        s[i] += vlogp<true>(xv[c][i], m[c][i], vclamp_below(lsrow[i], k.ls_min), k, dc[c][i], dls[c][i]);
    }
    alignas(64) float gl[kTile];
    for (int i = 0; i < L; ++i) {
      const float w = vexp(s[i] + nll[i]);  // posterior of component j
      const float pi = vexp(lrow[i] - lse[i]);
      gl[i] = g[i] * (pi - w);
      ga[i] = -g[i] * w;
    }
    if (gp0)
      for (int i = 0; i < L; ++i) gp0[j * N + i] = gl[i];
    for (int c = 0; c < C; ++c) {
      const float* lsrow = p0 + (K + c * S * K + K + j) * N;
      float* gm_row = gp0 ? gp0 + (K + c * S * K + j) * N : nullptr;
      float* gls_row = gp0 ? gp0 + (K + c * S * K + K + j) * N : nullptr;
      for (int i = 0; i < L; ++i) {
        const float gmean = -ga[i] * dc[c][i];
        if (gp0) {
          gm_row[i] = gmean;
          const float gls = ga[i] * dls[c][i];
          gls_row[i] = lsrow[i] > k.ls_min ? gls : 0.0f;
        }
        gxa[c][i] += ga[i] * dc[c][i];
        dc[c][i] = gmean;  // reuse: dL/d(effective mean of colour c)
      }
    }
    if constexpr (C == 3) {
      if (gp0) {
        float* r0 = gp0 + (K + 2 * K + j) * N;
        float* r1 = gp0 + (K + S * K + 2 * K + j) * N;
        float* r2 = gp0 + (K + 2 * S * K + 2 * K + j) * N;
        for (int i = 0; i < L; ++i) {
          r0[i] = dc[1][i] * xv[0][i] * (1.0f - t[0][i] * t[0][i]);
          r1[i] = dc[2][i] * xv[0][i] * (1.0f - t[1][i] * t[1][i]);
          r2[i] = dc[2][i] * xv[1][i] * (1.0f - t[2][i] * t[2][i]);
        }
      }
      for (int i = 0; i < L; ++i) {
        gxa[0][i] += dc[1][i] * t[0][i] + dc[2][i] * t[1][i];
        gxa[1][i] += dc[2][i] * t[2][i];
      }
    }
  }
  if (gx0)
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < L; ++i) gx0[c * N + i] = gxa[c][i];
}

// One draw for each position of a tile: the component by inverse CDF (or argmax
// at temperature 0) with lane-wise selects, then per colour the logistic draw,
// clamp and quantisation, R -> G -> B; mixture.h's pixel_sample, lane-parallel.
template <int C, bool kUnitTemp>
FASTAR_AI void tile_sample(const float* __restrict p0, const float* __restrict u0, int64_t N, int64_t K, int L,
                           float temp, float half_bins, float bins, float* __restrict out0,
                           float* __restrict ebuf) {
  constexpr int S = C == 3 ? 3 : 2;
  alignas(64) float mx[kTile], sum[kTile], cdf[kTile];
  alignas(64) int32_t pick[kTile], last[kTile];
  if (temp == 0.0f) {
    for (int i = 0; i < L; ++i) {
      mx[i] = p0[i];
      pick[i] = 0;
    }
    for (int64_t j = 1; j < K; ++j) {
      const float* row = p0 + j * N;
      const int32_t jj = static_cast<int32_t>(j);
      for (int i = 0; i < L; ++i) {
        const bool gt = row[i] > mx[i];
        mx[i] = gt ? row[i] : mx[i];
        pick[i] = gt ? jj : pick[i];
      }
    }
  } else {
    for (int i = 0; i < L; ++i) mx[i] = (kUnitTemp ? p0[i] : p0[i] / temp);
    for (int64_t j = 1; j < K; ++j) {
      const float* row = p0 + j * N;
      for (int i = 0; i < L; ++i) mx[i] = vmax(mx[i], (kUnitTemp ? row[i] : row[i] / temp));
    }
    for (int i = 0; i < L; ++i) sum[i] = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      const float* row = p0 + j * N;
      float* e = ebuf + j * kTile;
      for (int i = 0; i < L; ++i) {
        e[i] = vexp((kUnitTemp ? row[i] : row[i] / temp) - mx[i]);
        sum[i] += e[i];
      }
    }
    for (int i = 0; i < L; ++i) {
      cdf[i] = 0.0f;
      pick[i] = -1;
      last[i] = -1;
      sum[i] = 1.0f / sum[i];  // from here on the reciprocal: one division per position, not per category
    }
    for (int64_t j = 0; j < K; ++j) {
      const float* e = ebuf + j * kTile;
      const int32_t jj = static_cast<int32_t>(j);
      for (int i = 0; i < L; ++i) {
        const float pj = e[i] * sum[i];
        last[i] = pj > 0.0f ? jj : last[i];
        cdf[i] += pj;
        const bool hit = (pick[i] < 0) & (cdf[i] > u0[i]);
        pick[i] = hit ? jj : pick[i];
      }
    }
    for (int i = 0; i < L; ++i) {
      const int32_t fallback = last[i] < 0 ? 0 : last[i];
      pick[i] = pick[i] >= 0 ? pick[i] : fallback;
    }
  }
  alignas(64) float mean[C][kTile], ls[C][kTile], t[3][kTile], xs[C][kTile];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < L; ++i) {
      mean[c][i] = p0[(K + c * S * K + pick[i]) * N + i];
      ls[c][i] = p0[(K + c * S * K + K + pick[i]) * N + i];
    }
  if constexpr (C == 3) {
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < L; ++i) t[c][i] = p0[(K + c * S * K + 2 * K + pick[i]) * N + i];
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < L; ++i) t[c][i] = vtanh(t[c][i]);
  }
  const float lo_u = 1e-5f, hi_u = static_cast<float>(1.0 - 1e-5);
  for (int c = 0; c < C; ++c) {
    const float* urow = u0 + (1 + c) * N;
    for (int i = 0; i < L; ++i) {
      float v = urow[i];
      v = v < lo_u ? lo_u : v;
      v = v > hi_u ? hi_u : v;
      // vexp saturates at e^88; a log-scale of +inf must give an infinite scale (and inf * 0 = NaN at
      // temperature 0) as the scalar kernels' and the reference's exp do. One select per lane.
      const float ls_c = vclamp_below(ls[c][i], -7.0f);
      const float e_ls = vexp(ls_c);
      const float scale = (ls_c > 88.0f ? __builtin_inff() : e_ls) * temp;
      float y = mean[c][i] + scale * (vlog(v) - vlog(1.0f - v));
      if constexpr (C == 3) {
        if (c == 1) y = y + t[0][i] * xs[0][i];
        if (c == 2) y = y + t[1][i] * xs[0][i] + t[2][i] * xs[1][i];
      }
      y = y < -1.0f ? -1.0f : y;
      y = y > 1.0f ? 1.0f : y;
      const float q = (__builtin_floorf((y + 1.0f) * half_bins + 0.5f) * 2.0f - bins) / bins;  // see mix::quantize
      xs[c][i] = q;
      out0[c * N + i] = q;
    }
  }
}

// float32 tiles of the loss, compiled three times (AVX-512F, AVX2, baseline) and
// picked at load time by the CPU (GCC function multi-versioning), so one
// binary runs everywhere and vectorises where it can.

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTAR_CLONES
#endif

struct TileJob {
  const float* p;
  const float* x;
  int64_t P, N, K, tiles_per_item;
  int C;
  VConst k;
};

FASTAR_CLONES void forward_tiles(const TileJob& J, int64_t t0, int64_t t1, float* out, float* sbuf) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / J.tiles_per_item, n0 = (t % J.tiles_per_item) * kTile;
    const int L = static_cast<int>(std::min<int64_t>(kTile, J.N - n0));
    const float* p0 = J.p + b * J.P * J.N + n0;
    const float* x0 = J.x + b * J.C * J.N + n0;
    if (J.C == 3)
      tile_forward<3>(p0, x0, J.N, J.K, L, J.k, out + b * J.N + n0, sbuf);
    else
      tile_forward<1>(p0, x0, J.N, J.K, L, J.k, out + b * J.N + n0, sbuf);
  }
}

FASTAR_CLONES void backward_tiles(const TileJob& J, int64_t t0, int64_t t1, const float* g, const float* nll,
                                  float* gp, float* gx) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / J.tiles_per_item, n0 = (t % J.tiles_per_item) * kTile;
    const int L = static_cast<int>(std::min<int64_t>(kTile, J.N - n0));
    const float* p0 = J.p + b * J.P * J.N + n0;
    const float* x0 = J.x + b * J.C * J.N + n0;
    float* gp0 = gp ? gp + b * J.P * J.N + n0 : nullptr;
    float* gx0 = gx ? gx + b * J.C * J.N + n0 : nullptr;
    if (J.C == 3)
      tile_backward<3>(p0, x0, J.N, J.K, L, J.k, g + b * J.N + n0, nll + b * J.N + n0, gp0, gx0);
    else
      tile_backward<1>(p0, x0, J.N, J.K, L, J.k, g + b * J.N + n0, nll + b * J.N + n0, gp0, gx0);
  }
}

FASTAR_CLONES void sample_tiles(const TileJob& J, int64_t t0, int64_t t1, const float* noise, float temp,
                                float half_bins, float bins, float* out, float* ebuf) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / J.tiles_per_item, n0 = (t % J.tiles_per_item) * kTile;
    const int L = static_cast<int>(std::min<int64_t>(kTile, J.N - n0));
    const float* p0 = J.p + b * J.P * J.N + n0;
    const float* u0 = noise + b * (1 + J.C) * J.N + n0;
    float* o0 = out + b * J.C * J.N + n0;
    // x / 1 == x: at the usual temperature 1 the divisions are skipped without changing a bit.
    if (J.C == 3)
      temp == 1.0f ? tile_sample<3, true>(p0, u0, J.N, J.K, L, temp, half_bins, bins, o0, ebuf)
                   : tile_sample<3, false>(p0, u0, J.N, J.K, L, temp, half_bins, bins, o0, ebuf);
    else
      temp == 1.0f ? tile_sample<1, true>(p0, u0, J.N, J.K, L, temp, half_bins, bins, o0, ebuf)
                   : tile_sample<1, false>(p0, u0, J.N, J.K, L, temp, half_bins, bins, o0, ebuf);
  }
}

// categorical_sample for float32 positions [i0, i1) of logits (O, K, I): each
// position's logits are gathered into buf, the exps taken in one vectorised
// pass, then the CDF is walked until it passes the uniform (same contract as
// mixture.h's inverse_cdf_pick). tmp (K floats) serves the top-k selection.
// The float32 pick of one row (temperature > 0), the rule of common/categorical.h in float with
// vexp: z = l / t (a division, like the reference), e = exp(z - max z) (0 below expf's range),
// then the first j whose running sum exceeds u * total, else the last e > 0. Written for the
// vectoriser: the max and the total are kept per lane of 16-wide blocks (lane-wise selects and
// adds, no loop-carried scalar chain), and the search adds whole blocks (a 4-deep tree each)
// until the block holding the crossing, then walks that block: about K/16 + 16 dependent additions
// instead of K. The sums are grouped by lane and block, so their roundings differ from a
// left-to-right cumsum: the float path is checked against the reference to within a share of
// boundary cases (float64 is bit-exact). NaN or +inf logits make the total NaN: index 0, as the
// rule says. buf: the row (K), overwritten with e.
constexpr int kLanes = 16;
FASTAR_AI float block_sum(const float* e) {
  float t[8];
  for (int l = 0; l < 8; ++l) t[l] = e[l] + e[l + 8];
  for (int l = 0; l < 4; ++l) t[l] += t[l + 4];
  return (t[0] + t[2]) + (t[1] + t[3]);
}

typedef float v16f __attribute__((vector_size(64)));

FASTAR_AI int64_t pick_row(const float* src, float* buf, int64_t K, float temp, float u) {
  const int64_t KB = K / kLanes * kLanes;
  v16f mv = v16f{} - __builtin_inff();
  const v16f tv = v16f{} + temp;
  for (int64_t j = 0; j < KB; j += kLanes) {
    v16f x;
    std::memcpy(&x, src + j, sizeof x);
    const v16f z = x / tv;
    std::memcpy(buf + j, &z, sizeof z);
    mv = z > mv ? z : mv;
  }
  float mx = -__builtin_inff();
  for (int64_t j = KB; j < K; ++j) {
    const float z = src[j] / temp;
    buf[j] = z;
    mx = z > mx ? z : mx;
  }
  for (int l = 0; l < kLanes; ++l) mx = mv[l] > mx ? mv[l] : mx;
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t j = 0; j < KB; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float a = buf[j + l] - mx;
      const float v = vexp(a);
      const float e = a < -87.3f ? 0.0f : v;  // -inf (masked) and below expf's range weigh exactly 0
      buf[j + l] = e;
      acc[l] += e;
    }
  float tail = 0.0f;
  for (int64_t j = KB; j < K; ++j) {
    const float a = buf[j] - mx;
    const float v = vexp(a);
    buf[j] = a < -87.3f ? 0.0f : v;
    tail += buf[j];
  }
  const float total = block_sum(acc) + tail;
  if (!(total == total) || total == __builtin_inff()) return 0;  // NaN / +inf logits, or none finite
  const float ut = u * total;
  float c = 0.0f;
  int64_t j = 0;
  for (; j < KB; j += kLanes) {  // whole blocks while the crossing lies beyond them
    const float sb = block_sum(buf + j);
    if (c + sb > ut) break;
    c += sb;
  }
  for (; j < K; ++j) {
    c += buf[j];
    if (c > ut) return j;
  }
  for (j = K - 1; j > 0; --j)  // u * total not reached (u ~ 1 and rounding): the last e > 0
    if (buf[j] > 0.0f) return j;
  return 0;
}

FASTAR_CLONES void categorical_rows(const float* lp, const float* up, int64_t* out, int64_t i0, int64_t i1, int64_t K,
                                    int64_t I, float temp, int64_t top_k, float* buf, float* tmp) {
  const bool mask_top = top_k > 0 && top_k < K;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t oi = i / I, ii = i % I;
    const float* src = lp + oi * K * I + ii;
    const bool gather = I != 1 || mask_top || temp == 0.0f;
    if (gather) {
      if (I == 1)
        for (int64_t j = 0; j < K; ++j) buf[j] = src[j];
      else
        for (int64_t j = 0; j < K; ++j) buf[j] = src[j * I];
    }
    if (mask_top) {
      // The k-th largest value; everything strictly below it is dropped (ties kept).
      std::copy(buf, buf + K, tmp);
      std::nth_element(tmp, tmp + (top_k - 1), tmp + K, std::greater<float>());
      const float kth = tmp[top_k - 1];
      const float ninf = -__builtin_inff();
      for (int64_t j = 0; j < K; ++j) buf[j] = buf[j] < kth ? ninf : buf[j];
    }
    if (temp == 0.0f) {
      int64_t best = 0;
      float bv = buf[0];
      for (int64_t j = 1; j < K; ++j)
        if (buf[j] > bv) {
          bv = buf[j];
          best = j;
        }
      out[i] = best;
      continue;
    }
    out[i] = pick_row(gather ? buf : src, buf, K, temp, up[i]);
  }
}

TileJob make_job(const at::Tensor& pc, const at::Tensor& xc, int64_t K, int C, int64_t num_bits) {
  const auto dk = mix::dml_const<float>(num_bits);
  const int64_t N = pc.size(2);
  return {pc.data_ptr<float>(), xc.data_ptr<float>(), pc.size(1), N, K, (N + kTile - 1) / kTile, C,
          {dk.h, dk.log_half_bins, dk.edge, dk.min_mass, dk.ls_min}};
}


// dml_value_log_probs in float32: mix::component_bins with the vectorised exp, compiled three times
// like the tiles above (the loops vectorise over edges and bins); the posterior is scalar (K values).
FASTAR_CLONES void value_bins_f32(float wq, float m, float inv, int64_t L, const float* edge, const float* centre,
                                  float edge_lim, float min_mass, float inv_half_bins, float* cdf, float* ccdf,
                                  float* acc) {
  for (int64_t e = 0; e <= L; ++e) {
    const float z = inv * (edge[e] - m);
    const float a = vexp(-(z < 0.f ? -z : z)), r = 1.f / (1.f + a);
    cdf[e] = z >= 0.f ? r : a * r;
    ccdf[e] = z >= 0.f ? a * r : r;
  }
  for (int64_t b = 0; b < L; ++b) {
    const float z_lo = inv * (edge[b] - m);
    float mass = z_lo > 0.f ? ccdf[b] - ccdf[b + 1] : cdf[b + 1] - cdf[b];
    const float mid = inv * (centre[b] - m);
    const float a = vexp(-(mid < 0.f ? -mid : mid)), d = 1.f + a;
    const float pdf = inv * a / (d * d) * inv_half_bins;
    mass = mass > min_mass ? mass : pdf;
    mass = centre[b] < -edge_lim ? cdf[b + 1] : mass;
    mass = centre[b] > edge_lim ? ccdf[b] : mass;
    acc[b] += wq * mass;
  }
}

}  // namespace mixvec
}  // namespace fastar

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
