// The mixture / categorical family: argument checks shared by the CPU and CUDA
// kernels (so both reject bad input with the same sentences) and the
// per-position math, written once as host/device functions so the two
// backends compute the very same expressions in the same order.
//
// Layouts (the Python side reshapes to these):
//   x      (B, C, N)      C = 1 or 3 colours, N = H * W (or T for audio), acc dtype
//   params (B, P, N)      P = 3K (C = 1) or 10K (C = 3): K logits, then per colour
//                         c a block at K + c * S (S = 3K for C = 3, 2K for C = 1)
//                         of K means, K log-scales [, K raw coefficients]
//   noise  (B, 1 + C, N)  uniforms: channel 0 picks the component, 1 + c colour c
//   logits (O, K, I)      categorical: K categories between an outer and an inner extent
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "common/acc_type.h"
#include "common/categorical.h"
#include "common/macros.h"

#define FASTAR_HD FASTAR_HOST_DEVICE

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h
namespace mix {

// ---- scalar helpers: C names so the same call resolves on host and device ----
FASTAR_HD float mexp(float v) { return expf(v); }
FASTAR_HD double mexp(double v) { return exp(v); }
FASTAR_HD float mlog(float v) { return logf(v); }
FASTAR_HD double mlog(double v) { return log(v); }
FASTAR_HD float mlog1p(float v) { return log1pf(v); }
FASTAR_HD double mlog1p(double v) { return log1p(v); }
FASTAR_HD float mtanh(float v) { return tanhf(v); }
FASTAR_HD double mtanh(double v) { return tanh(v); }
FASTAR_HD float mfloor(float v) { return floorf(v); }
FASTAR_HD double mfloor(double v) { return floor(v); }

// softplus as torch computes it (beta 1, threshold 20), so values match the reference.
template <typename T>
FASTAR_HD T softplus(T v) {
  return v > T(20) ? v : mlog1p(mexp(v));
}
// Never evaluates exp of a large positive number: no inf/inf.
template <typename T>
FASTAR_HD T sigmoid(T v) {
  if (v >= T(0)) return T(1) / (T(1) + mexp(-v));
  const T e = mexp(v);
  return e / (T(1) + e);
}
template <typename T>
FASTAR_HD T tmax(T a, T b) { return a > b ? a : b; }
// max(v, lo) that keeps a NaN v (torch.clamp's rule): the log-scale clamp must not turn NaN into -7.
template <typename T>
FASTAR_HD T clamp_below(T v, T lo) { return v < lo ? lo : v; }

template <typename T>
struct DmlConst {
  T h;              // bin half-width 1 / (2^bits - 1)
  T log_half_bins;  // log((2^bits - 1) / 2)
  T edge;           // 0.999
  T min_mass;       // 1e-5
  T ls_min;         // -7
};

template <typename T>
DmlConst<T> dml_const(int64_t num_bits) {
  const double bins = std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0;
  return {static_cast<T>(1.0 / bins), static_cast<T>(std::log(bins / 2.0)), static_cast<T>(0.999),
          static_cast<T>(1e-5), static_cast<T>(-7.0)};
}

// Log-probability of one sub-pixel value xv under one logistic (mean m, clamped
// log-scale ls), with the paper's edge and small-mass cases; optionally its
// derivatives with respect to the centred value (x - m) and to ls.
template <typename T, bool kGrad>
FASTAR_HD T logistic_bin_logp(T xv, T m, T ls, const DmlConst<T>& k, T* d_c, T* d_ls) {
  // A mean that is not finite describes no distribution: NaN in every bin (the reference's
  // guard), never a limit taken in some cases (an edge bin) and not in others.
  if (!(m - m == T(0))) {
    if (kGrad) *d_c = *d_ls = m - m;
    return m - m;
  }
  const T c = xv - m;
  const T inv_s = mexp(-ls);
  if (xv < -k.edge) {
    const T plus = inv_s * (c + k.h);
    if (kGrad) {
      const T s = sigmoid(-plus);  // d/dplus log sigmoid(plus)
      *d_c = inv_s * s;
      *d_ls = -plus * s;
    }
    return plus - softplus(plus);
  }
  if (xv > k.edge) {
    const T mn = inv_s * (c - k.h);
    if (kGrad) {
      const T s = sigmoid(mn);  // d/dmn of -softplus(mn) is -s
      *d_c = -inv_s * s;
      *d_ls = mn * s;
    }
    return -softplus(mn);
  }
  const T plus = inv_s * (c + k.h);
  const T mn = inv_s * (c - k.h);
  const T cp = sigmoid(plus), cm = sigmoid(mn);
  // In the right tail both CDFs are near 1: difference the complements instead (no cancellation).
  const T delta = mn > T(0) ? sigmoid(-mn) - sigmoid(-plus) : cp - cm;
  if (delta > k.min_mass) {
    if (kGrad) {
      const T gp = cp * sigmoid(-plus) / delta, gm = -cm * sigmoid(-mn) / delta;
      *d_c = inv_s * (gp + gm);
      *d_ls = -(plus * gp + mn * gm);
    }
    return mlog(tmax(delta, T(1e-12)));
  }
  // Bin mass underflows: density at the bin centre times the bin width.
  const T mid = inv_s * c;
  if (kGrad) {
    const T g = T(1) - T(2) * sigmoid(mid);
    *d_c = inv_s * g;
    *d_ls = -mid * g - T(1);
  }
  return mid - ls - T(2) * softplus(mid) - k.log_half_bins;
}

// Pointers into params for one position: element j of channel p is p0[p * ps].
template <typename scalar_t>
struct PixelParams {
  const scalar_t* p0;
  int64_t ps;
  template <typename T>
  FASTAR_HD T at(int64_t ch) const { return static_cast<T>(p0[ch * ps]); }
};

// log-sum-exp of the K logits of a position.
template <typename T, typename scalar_t>
FASTAR_HD T logits_lse(const PixelParams<scalar_t>& pp, int64_t K) {
  T mx = pp.template at<T>(0);
  for (int64_t j = 1; j < K; ++j) mx = tmax(mx, pp.template at<T>(j));
  T s = 0;
  for (int64_t j = 0; j < K; ++j) s += mexp(pp.template at<T>(j) - mx);
  return mx + mlog(s);
}

// Sum over colours of the log-probabilities under component j (no gradient).
template <typename T, typename scalar_t, int C>
FASTAR_HD T component_logp(const PixelParams<scalar_t>& pp, const T* xv, int64_t K, int64_t j, const DmlConst<T>& k) {
  constexpr int S = C == 3 ? 3 : 2;
  T acc = 0;
  T m[C];
FASTAR_UNROLL
  for (int c = 0; c < C; ++c) m[c] = pp.template at<T>(K + c * S * K + j);
  if (C == 3) {
    const T t0 = mtanh(pp.template at<T>(K + 2 * K + j));
    const T t1 = mtanh(pp.template at<T>(K + 3 * K + 2 * K + j));
    const T t2 = mtanh(pp.template at<T>(K + 6 * K + 2 * K + j));
    m[1 % C] = m[1 % C] + t0 * xv[0];
    m[2 % C] = m[2 % C] + t1 * xv[0] + t2 * xv[1 % C];
  }
FASTAR_UNROLL
  for (int c = 0; c < C; ++c) {
    const T ls = clamp_below(pp.template at<T>(K + c * S * K + K + j), k.ls_min);
    acc += logistic_bin_logp<T, false>(xv[c], m[c], ls, k, nullptr, nullptr);
  }
  return acc;
}

// NLL of one position: -log sum_j softmax(logits)_j prod_c P(x_c | j), by an
// online log-sum-exp over j so nothing K-sized is stored.
template <typename T, typename scalar_t, int C>
FASTAR_HD T pixel_nll(const PixelParams<scalar_t>& pp, const T* xv, int64_t K, const DmlConst<T>& k) {
  const T lse_l = logits_lse<T>(pp, K);
  T run_max = -INFINITY, run_sum = 0;
  for (int64_t j = 0; j < K; ++j) {
    const T s = pp.template at<T>(j) - lse_l + component_logp<T, scalar_t, C>(pp, xv, K, j, k);
    if (s > run_max) {
      run_sum = run_sum * mexp(run_max - s) + T(1);
      run_max = s;
    } else if (s != -INFINITY) {  // a switched-off component (logit -inf) weighs 0, not exp(-inf + inf)
      run_sum += mexp(s - run_max);
    }
  }
  return -(run_max + mlog(run_sum));
}

// Backward of one position given g = dL/dnll and the forward's nll (log-scales
// at or below the clamp get no gradient, as torch.clamp's backward gives): the
// posterior w_j = exp(s_j + nll) is recomputed per component, so again no
// K-sized storage. Writes dL/dparams (through gp0, stride ps) and adds dL/dx
// into gx (C values) when asked.
template <typename T, typename scalar_t, int C>
FASTAR_HD void pixel_nll_backward(const PixelParams<scalar_t>& pp, const T* xv, int64_t K, const DmlConst<T>& k,
                                  T g, T nll, scalar_t* gp0, T* gx) {
  constexpr int S = C == 3 ? 3 : 2;
  const int64_t ps = pp.ps;
  const T lse_l = logits_lse<T>(pp, K);
  for (int64_t j = 0; j < K; ++j) {
    const T lj = pp.template at<T>(j);
    T m[C], ls_raw[C], a[C], dc[C], dls[C], t[3] = {0, 0, 0};
FASTAR_UNROLL
    for (int c = 0; c < C; ++c) {
      m[c] = pp.template at<T>(K + c * S * K + j);
      ls_raw[c] = pp.template at<T>(K + c * S * K + K + j);
    }
    if (C == 3) {
      t[0] = mtanh(pp.template at<T>(K + 2 * K + j));
      t[1] = mtanh(pp.template at<T>(K + 3 * K + 2 * K + j));
      t[2] = mtanh(pp.template at<T>(K + 6 * K + 2 * K + j));
      m[1 % C] = m[1 % C] + t[0] * xv[0];
      m[2 % C] = m[2 % C] + t[1] * xv[0] + t[2] * xv[1 % C];
    }
    T s = lj - lse_l;
FASTAR_UNROLL
    for (int c = 0; c < C; ++c) {
      a[c] = logistic_bin_logp<T, true>(xv[c], m[c], clamp_below(ls_raw[c], k.ls_min), k, &dc[c], &dls[c]);
      s += a[c];
    }
    const T w = mexp(s + nll);  // posterior responsibility of component j
    const T pi = mexp(lj - lse_l);
    if (gp0) {
      gp0[j * ps] = static_cast<scalar_t>(g * (pi - w));
    }
    const T ga = -g * w;  // dL/d(log P(x_c | j)) for every colour
    T gm[C];
FASTAR_UNROLL
    for (int c = 0; c < C; ++c) {
      gm[c] = -ga * dc[c];  // the mean enters as -(x - m)
      if (gp0) {
        gp0[(K + c * S * K + j) * ps] = static_cast<scalar_t>(gm[c]);
        gp0[(K + c * S * K + K + j) * ps] =
            static_cast<scalar_t>(ls_raw[c] > k.ls_min ? ga * dls[c] : T(0));
      }
      if (gx) gx[c] += ga * dc[c];
    }
    if (C == 3) {
      if (gp0) {
        gp0[(K + 2 * K + j) * ps] = static_cast<scalar_t>(gm[1 % C] * xv[0] * (T(1) - t[0] * t[0]));
        gp0[(K + 3 * K + 2 * K + j) * ps] = static_cast<scalar_t>(gm[2 % C] * xv[0] * (T(1) - t[1] * t[1]));
        gp0[(K + 6 * K + 2 * K + j) * ps] = static_cast<scalar_t>(gm[2 % C] * xv[1 % C] * (T(1) - t[2] * t[2]));
      }
      if (gx) {
        gx[0] += gm[1 % C] * t[0] + gm[2 % C] * t[1];
        gx[1 % C] += gm[2 % C] * t[2];
      }
    }
  }
}

using cat::argmax_first;

// Bin centre nearest v: (2 i - bins) / bins, i = floor((v + 1) * bins / 2 + 0.5). The centre is one
// correctly rounded division of exact integers, so a fused multiply-add (which compilers may
// contract `i * step - 1` into) cannot make kernel and reference disagree in the last bit. The
// product (v + 1) * bins / 2 is rounded on its own (cat::mul_rn) before the + 0.5, as the
// reference's separate tensor ops round it: nvcc contracts a * b + c into an FMA by default.
template <typename T>
FASTAR_HD T quantize(T v, T half_bins, T bins) {
  return (mfloor(cat::mul_rn(v + T(1), half_bins) + T(0.5)) * T(2) - bins) / bins;
}
template <typename T>
FASTAR_HD T clamp1(T v) { return v < T(-1) ? T(-1) : (v > T(1) ? T(1) : v); }

// One draw of one position: component by the one categorical pick (common/categorical.h) on u[0], then colour by
// colour a logistic sample by inverse CDF on u[1 + c], clamped and quantised
// before it feeds the next colour's mean. Every product goes through cat::mul_rn: the reference
// (sample_discretized_mix_logistic_ref) rounds each product and each sum separately, and nvcc would
// otherwise fuse `mean + scale * d` and `y + coeff * x` into FMAs (one rounding fewer), so a float64
// draw at a bin edge could land one bin over on CUDA.
template <typename T, typename scalar_t, int C>
FASTAR_HD void pixel_sample(const PixelParams<scalar_t>& pp, const T* u, int64_t us, int64_t K, T temp, T half_bins,
                            T bins, T* out, int64_t os) {
  constexpr int S = C == 3 ? 3 : 2;
  auto logit = [&](int64_t j) { return pp.template at<T>(j); };
  const int64_t j = cat::categorical_draw<T>(logit, K, temp, u[0]);
  T xs[C];
FASTAR_UNROLL
  for (int c = 0; c < C; ++c) {
    const T mean = pp.template at<T>(K + c * S * K + j);
    const T ls = clamp_below(pp.template at<T>(K + c * S * K + K + j), T(-7));
    const T scale = cat::mul_rn(mexp(ls), temp);
    T v = u[(1 + c) * us];
    v = v < T(1e-5) ? T(1e-5) : (v > T(1.0 - 1e-5) ? T(1.0 - 1e-5) : v);
    T y = mean + cat::mul_rn(scale, mlog(v) - mlog1p(-v));
    if (C == 3 && c == 1) y = y + cat::mul_rn(mtanh(pp.template at<T>(K + 2 * K + j)), xs[0]);
    if (C == 3 && c == 2)
      y = y + cat::mul_rn(mtanh(pp.template at<T>(K + 3 * K + 2 * K + j)), xs[0]) +
          cat::mul_rn(mtanh(pp.template at<T>(K + 6 * K + 2 * K + j)), xs[1 % C]);
    xs[c] = quantize(clamp1(y), half_bins, bins);
    out[c * os] = xs[c];
  }
}

// One pixel's colour j given its earlier colours prev[0..j) (dml_value_log_probs), part 1: the
// components' posterior given prev, w[q] = softmax_q(logit_q + sum_{c<j} log P(prev_c | q)) (openai's
// per-bin rule), and colour j's mean m[q] (moved by the earlier colours) and inverse scale inv[q].
// Returns false for a non-finite mean of colour j or non-finite weights (no distribution).
template <typename T, typename scalar_t>
FASTAR_HD bool pixel_value_prep(const PixelParams<scalar_t>& pp, const T* prev, int64_t K, int C, int j,
                                const DmlConst<T>& k, T* w, T* m, T* inv) {
  const int S = C == 3 ? 3 : 2;
  auto mean = [&](int c, int64_t q) {
    T mc = pp.template at<T>(K + c * S * K + q);
    if (c == 1) mc = mc + mtanh(pp.template at<T>(K + 2 * K + q)) * prev[0];
    if (c == 2)
      mc = mc + mtanh(pp.template at<T>(K + 3 * K + 2 * K + q)) * prev[0] +
           mtanh(pp.template at<T>(K + 6 * K + 2 * K + q)) * prev[1];
    return mc;
  };
  const T lse = logits_lse<T>(pp, K);
  T mx = -INFINITY;
  bool ok = true;
  for (int64_t q = 0; q < K; ++q) {
    T s = pp.template at<T>(q) - lse;
    for (int c = 0; c < j; ++c)
      s += logistic_bin_logp<T, false>(prev[c], mean(c, q), clamp_below(pp.template at<T>(K + c * S * K + K + q),
                                                                         k.ls_min), k, nullptr, nullptr);
    w[q] = s;
    mx = s > mx ? s : mx;
    m[q] = mean(j, q);
    inv[q] = mexp(-clamp_below(pp.template at<T>(K + j * S * K + K + q), k.ls_min));
    ok = ok && (m[q] - m[q] == T(0));
  }
  T tot = 0;
  for (int64_t q = 0; q < K; ++q) {
    w[q] = mx == -INFINITY ? T(0) : mexp(w[q] - mx);
    tot += w[q];
  }
  for (int64_t q = 0; q < K; ++q) w[q] = w[q] / tot;
  return ok && tot > T(0) && tot - tot == T(0);
}

// Part 2, one component: acc[b] += wq * P(bin b | mean m, inverse scale inv) for the L bins, from the
// logistic CDF at the bin edges (edge[e], e = 0..L; one exp an edge): the left edge bin (centre below
// -edge) is the CDF at its upper edge, the right one the complement at its lower edge, an inner bin the
// CDF difference (of the complements in the right tail), and a bin whose mass is not above min_mass
// the density at its centre times the bin width (openai's fallback). cdf and ccdf: L + 1 scratch values.
template <typename T>
FASTAR_HD void component_bins(T wq, T m, T inv, int64_t L, const T* edge, const T* centre, const DmlConst<T>& k,
                              T inv_half_bins, T* cdf, T* ccdf, T* acc) {
  for (int64_t e = 0; e <= L; ++e) {
    const T z = inv * (edge[e] - m);
    const T a = mexp(-(z < T(0) ? -z : z)), r = T(1) / (T(1) + a);
    cdf[e] = z >= T(0) ? r : a * r;
    ccdf[e] = z >= T(0) ? a * r : r;
  }
  for (int64_t b = 0; b < L; ++b) {
    const T z_lo = inv * (edge[b] - m);
    T mass = z_lo > T(0) ? ccdf[b] - ccdf[b + 1] : cdf[b + 1] - cdf[b];
    const T mid = inv * (centre[b] - m);
    const T a = mexp(-(mid < T(0) ? -mid : mid)), d = T(1) + a;
    const T pdf = inv * a / (d * d) * inv_half_bins;
    mass = mass > k.min_mass ? mass : pdf;
    mass = centre[b] < -k.edge ? cdf[b + 1] : mass;
    mass = centre[b] > k.edge ? ccdf[b] : mass;
    acc[b] += wq * mass;
  }
}

// ---- argument checks (the same sentences on every backend) ----
inline int dml_channels(const char* op, int64_t P, int64_t K) {
  TORCH_CHECK(K >= 1, op, ": num_mixtures must be at least 1, got ", K);
  if (P == 3 * K) return 1;
  if (P == 10 * K) return 3;
  TORCH_CHECK(false, op, ": params has ", P, " channels, but num_mixtures=", K, " needs 3K = ", 3 * K,
              " (1 channel) or 10K = ", 10 * K, " (3 channels)");
  return 0;
}

inline void check_num_bits(const char* op, int64_t num_bits) {
  TORCH_CHECK(num_bits >= 1 && num_bits <= 16, op, ": num_bits must be in [1, 16], got ", num_bits);
}

using fastar::acc_type_of;

// x (B, C, N) in the acc dtype of params (B, P, N); returns C.
inline int check_dml_nll(const char* op, const at::Tensor& x, const at::Tensor& params, int64_t K, int64_t num_bits) {
  TORCH_CHECK(params.dim() == 3, op, ": params must be 3-D (B, P, N), got shape ", params.sizes());
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, C, N), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(params.scalar_type()), op, ": params must be a floating-point tensor, got ",
              params.scalar_type());
  TORCH_CHECK(x.scalar_type() == acc_type_of(params.scalar_type()), op, ": x must be ",
              acc_type_of(params.scalar_type()), " for ", params.scalar_type(), " params, got ", x.scalar_type());
  TORCH_CHECK(x.device() == params.device(), op, ": x and params must be on one device, got x on ", x.device(),
              " and params on ", params.device());
  check_num_bits(op, num_bits);
  const int C = dml_channels(op, params.size(1), K);
  TORCH_CHECK(x.size(0) == params.size(0) && x.size(1) == C && x.size(2) == params.size(2), op,
              ": x must have shape [", params.size(0), ", ", C, ", ", params.size(2), "] to match params of shape ",
              params.sizes(), ", got ", x.sizes());
  return C;
}

inline int check_dml_sample(const char* op, const at::Tensor& params, const at::Tensor& noise, int64_t K,
                            int64_t num_bits, double temperature) {
  TORCH_CHECK(params.dim() == 3, op, ": params must be 3-D (B, P, N), got shape ", params.sizes());
  TORCH_CHECK(at::isFloatingType(params.scalar_type()), op, ": params must be a floating-point tensor, got ",
              params.scalar_type());
  check_num_bits(op, num_bits);
  TORCH_CHECK(temperature >= 0, op, ": temperature must be non-negative, got ", temperature);
  const int C = dml_channels(op, params.size(1), K);
  TORCH_CHECK(noise.dim() == 3 && noise.size(0) == params.size(0) && noise.size(1) == 1 + C &&
                  noise.size(2) == params.size(2),
              op, ": noise must have shape [", params.size(0), ", ", 1 + C, ", ", params.size(2), "], got ",
              noise.sizes());
  TORCH_CHECK(noise.scalar_type() == acc_type_of(params.scalar_type()), op, ": noise must be ",
              acc_type_of(params.scalar_type()), " for ", params.scalar_type(), " params, got ", noise.scalar_type());
  TORCH_CHECK(noise.device() == params.device(), op, ": noise and params must be on one device, got noise on ",
              noise.device(), " and params on ", params.device());
  return C;
}

// params (N, P) and prev (N, j) (acc dtype of params) of dml_value_log_probs; returns C.
inline int check_dml_value(const char* op, const at::Tensor& params, const at::Tensor& prev, int64_t K, int64_t j,
                           int64_t num_bits) {
  TORCH_CHECK(params.dim() == 2, op, ": params must be 2-D (N, P), got shape ", params.sizes());
  TORCH_CHECK(at::isFloatingType(params.scalar_type()), op, ": params must be a floating-point tensor, got ",
              params.scalar_type());
  check_num_bits(op, num_bits);
  const int C = dml_channels(op, params.size(1), K);
  TORCH_CHECK(j >= 0 && j < C, op, ": j must be a colour index in [0, ", C, "), got ", j);
  TORCH_CHECK(prev.dim() == 2 && prev.size(0) == params.size(0) && prev.size(1) == j, op,
              ": prev must have shape [", params.size(0), ", ", j, "] (the pixel's earlier colours), got ",
              prev.sizes());
  TORCH_CHECK(prev.scalar_type() == acc_type_of(params.scalar_type()), op, ": prev must be ",
              acc_type_of(params.scalar_type()), " for ", params.scalar_type(), " params, got ", prev.scalar_type());
  TORCH_CHECK(prev.device() == params.device(), op, ": prev and params must be on one device, got prev on ",
              prev.device(), " and params on ", params.device());
  return C;
}

inline void check_categorical(const char* op, const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                              double temperature, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (outer, K, inner), got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be a floating-point tensor, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one category, got shape ", logits.sizes());
  TORCH_CHECK(temperature >= 0, op, ": temperature must be non-negative, got ", temperature);
  TORCH_CHECK(top_k >= 0 && top_k <= logits.size(1), op, ": top_k must be in [0, ", logits.size(1),
              "] (0 = all), got ", top_k);
  if (temperature > 0) {
    TORCH_CHECK(noise.has_value() && noise->defined(), op, ": noise is required when temperature > 0");
  }
  if (noise.has_value() && noise->defined()) {
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == logits.size(0) && noise->size(1) == logits.size(2), op,
                ": noise must have shape [", logits.size(0), ", ", logits.size(2), "], got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == acc_type_of(logits.scalar_type()), op, ": noise must be ",
                acc_type_of(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ",
                noise->scalar_type());
    TORCH_CHECK(noise->device() == logits.device(), op, ": noise and logits must be on one device, got noise on ",
                noise->device(), " and logits on ", logits.device());
  }
}

}  // namespace mix
}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
