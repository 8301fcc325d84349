// CPU kernels of the mixture / categorical family (layouts in mixture.h).
//
// discretized_mix_logistic_nll(x (B,C,N), params (B,P,N), K, num_bits) -> (B, N) per-position NLL
// discretized_mix_logistic_nll_backward(grad (B,N), x, params, nll (B,N), K, num_bits, [need_x, need_params])
//     -> (grad_x (B,C,N) or empty, grad_params (B,P,N) or empty)
// sample_discretized_mix_logistic(params (B,P,N), noise (B,1+C,N), K, num_bits, temperature) -> (B,C,N)
// categorical_sample(logits (O,K,I), noise (O,I) or none, temperature, top_k) -> int64 (O,I)
//
// Design: one task per position, everything for that position computed in
// registers (mixture.h): the loss never allocates the (B, C, K, N) tensors the
// reference builds, so forward+backward memory is the output plus the
// gradient. Positions are independent, so at::parallel_for splits them with
// no synchronisation; consecutive positions of one image read neighbouring
// addresses of every params channel, which keeps the strided reads cached.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/mixture_vec.h"
#include "mixture.h"

namespace fastar {


namespace {

using namespace mix;

constexpr int64_t kGrain = 256;

void check_cpu_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": the CPU kernel supports float32 and float64 ", name,
              ", got ", st, "; cast the input, or use fastar.set_backend(\"reference\") for this dtype");
}

at::Tensor dml_nll_cpu(const at::Tensor& x, const at::Tensor& params, int64_t K, int64_t num_bits) {
  const char* op = "discretized_mix_logistic_nll";
  const int C = check_dml_nll(op, x, params, K, num_bits);
  check_cpu_dtype(op, params, "params");
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  auto out = at::empty({B, N}, x.options());
  if (B * N == 0) return out;
  const auto xc = x.contiguous();
  const auto pc = params.contiguous();
  if (params.scalar_type() == at::kFloat) {
    const auto job = mixvec::make_job(pc, xc, K, C, num_bits);
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B * job.tiles_per_item, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> sbuf(K * mixvec::kTile);
      mixvec::forward_tiles(job, t0, t1, o, sbuf.data());
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "dml_nll_cpu", [&] {
    using T = scalar_t;
    const auto k = dml_const<T>(num_bits);
    const T* xp = xc.data_ptr<T>();
    const T* pp = pc.data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / N, n = i % N;
        const PixelParams<T> px{pp + b * P * N + n, N};
        T xv[3];
        for (int c = 0; c < C; ++c) xv[c] = xp[(b * C + c) * N + n];
        op_[i] = C == 3 ? pixel_nll<T, T, 3>(px, xv, K, k) : pixel_nll<T, T, 1>(px, xv, K, k);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dml_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& params, const at::Tensor& nll, int64_t K,
                                                        int64_t num_bits, std::array<bool, 2> output_mask) {
  const char* op = "discretized_mix_logistic_nll_backward";
  const int C = check_dml_nll(op, x, params, K, num_bits);
  check_cpu_dtype(op, params, "params");
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  for (const auto* t : {&grad, &nll}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, N}) && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device(),
                op, ": grad and nll must be ", x.scalar_type(), " of shape [", B, ", ", N, "] on ", x.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  const bool need_x = output_mask[0], need_p = output_mask[1];
  auto gx = need_x ? at::zeros({B, C, N}, x.options()) : at::empty({0}, x.options());
  auto gp = need_p ? at::empty({B, P, N}, params.options()) : at::empty({0}, params.options());
  if (B * N == 0 || (!need_x && !need_p)) return {gx, gp};
  const auto xc = x.contiguous();
  const auto pc = params.contiguous();
  const auto gc = grad.contiguous();
  const auto nc = nll.contiguous();
  if (params.scalar_type() == at::kFloat) {
    const auto job = mixvec::make_job(pc, xc, K, C, num_bits);
    float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
    float* gpp = need_p ? gp.data_ptr<float>() : nullptr;
    at::parallel_for(0, B * job.tiles_per_item, 1, [&](int64_t t0, int64_t t1) {
      mixvec::backward_tiles(job, t0, t1, gc.data_ptr<float>(), nc.data_ptr<float>(), gpp, gxp);
    });
    return {gx, gp};
  }
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "dml_nll_backward_cpu", [&] {
    using T = scalar_t;
    const auto k = dml_const<T>(num_bits);
    const T* xp = xc.data_ptr<T>();
    const T* pp = pc.data_ptr<T>();
    const T* gptr = gc.data_ptr<T>();
    const T* nptr = nc.data_ptr<T>();
    T* gxp = need_x ? gx.data_ptr<T>() : nullptr;
    T* gpp = need_p ? gp.data_ptr<T>() : nullptr;
    at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / N, n = i % N;
        const PixelParams<T> px{pp + b * P * N + n, N};
        T xv[3], gxv[3] = {0, 0, 0};
        for (int c = 0; c < C; ++c) xv[c] = xp[(b * C + c) * N + n];
        T* g0 = gpp ? gpp + b * P * N + n : nullptr;
        if (C == 3)
          pixel_nll_backward<T, T, 3>(px, xv, K, k, gptr[i], nptr[i], g0, gxv);
        else
          pixel_nll_backward<T, T, 1>(px, xv, K, k, gptr[i], nptr[i], g0, gxv);
        if (gxp)
          for (int c = 0; c < C; ++c) gxp[(b * C + c) * N + n] = gxv[c];
      }
    });
  });
  return {gx, gp};
}

at::Tensor dml_sample_cpu(const at::Tensor& params, const at::Tensor& noise, int64_t K, int64_t num_bits,
                          double temperature) {
  const char* op = "sample_discretized_mix_logistic";
  const int C = check_dml_sample(op, params, noise, K, num_bits, temperature);
  check_cpu_dtype(op, params, "params");
  const int64_t B = params.size(0), P = params.size(1), N = params.size(2);
  auto out = at::empty({B, C, N}, noise.options());
  if (B * N == 0) return out;
  const auto pc = params.contiguous();
  const auto uc = noise.contiguous();
  if (params.scalar_type() == at::kFloat) {
    const double bins = std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0;
    const auto job = mixvec::make_job(pc, pc, K, C, num_bits);  // x unused by sampling
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B * job.tiles_per_item, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> ebuf(K * mixvec::kTile);
      mixvec::sample_tiles(job, t0, t1, uc.data_ptr<float>(), static_cast<float>(temperature),
                           static_cast<float>(bins / 2.0), static_cast<float>(bins), o, ebuf.data());
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "dml_sample_cpu", [&] {
    using T = scalar_t;
    const double bins = std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0;
    const T half_bins = static_cast<T>(bins / 2.0), tbins = static_cast<T>(bins);
    const T temp = static_cast<T>(temperature);
    const T* pp = pc.data_ptr<T>();
    const T* up = uc.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / N, n = i % N;
        const PixelParams<T> px{pp + b * P * N + n, N};
        const T* u = up + b * (1 + C) * N + n;
        T* dst = o + b * C * N + n;
        if (C == 3)
          pixel_sample<T, T, 3>(px, u, N, K, temp, half_bins, tbins, dst, N);
        else
          pixel_sample<T, T, 1>(px, u, N, K, temp, half_bins, tbins, dst, N);
      }
    });
  });
  return out;
}

at::Tensor categorical_sample_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                  double temperature, int64_t top_k) {
  const char* op = "categorical_sample";
  check_categorical(op, logits, noise, temperature, top_k);
  check_cpu_dtype(op, logits, "logits");
  const int64_t O = logits.size(0), K = logits.size(1), I = logits.size(2);
  auto out = at::empty({O, I}, logits.options().dtype(at::kLong));
  if (O * I == 0) return out;
  const auto lc = logits.contiguous();
  const bool has_noise = noise.has_value() && noise->defined();
  const auto uc = has_noise ? noise->contiguous() : at::Tensor();
  const bool mask_top = top_k > 0 && top_k < K;
  if (logits.scalar_type() == at::kFloat) {
    const float* lp = lc.data_ptr<float>();
    const float* up = has_noise ? uc.data_ptr<float>() : nullptr;
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, O * I, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(K), tmp(K);
      mixvec::categorical_rows(lp, up, o, begin, end, K, I, static_cast<float>(temperature), top_k, buf.data(),
                               tmp.data());
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "categorical_sample_cpu", [&] {
    using T = scalar_t;
    const T temp = static_cast<T>(temperature);
    const T* lp = lc.data_ptr<T>();
    const T* up = has_noise ? uc.data_ptr<T>() : nullptr;
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, O * I, 64, [&](int64_t begin, int64_t end) {
      // Per-thread scratch: the position's logits gathered contiguously (they
      // are I apart in memory), and its exp values, so each exp is taken once.
      std::vector<T> buf(K), tmp(mask_top ? K : 0), tmp2(K);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t oi = i / I, ii = i % I;
        const T* src = lp + oi * K * I + ii;
        for (int64_t j = 0; j < K; ++j) buf[j] = src[j * I];
        if (mask_top) {
          // The k-th largest value; everything strictly below it is dropped (ties kept).
          std::copy(buf.begin(), buf.end(), tmp.begin());
          std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<T>());
          const T kth = tmp[top_k - 1];
          for (int64_t j = 0; j < K; ++j)
            if (buf[j] < kth) buf[j] = -std::numeric_limits<T>::infinity();
        }
        o[i] = cat::categorical_draw<T>([&](int64_t j) { return buf[j]; }, K, temp, up ? up[i] : T(0), tmp2.data());
      }
    });
  });
  return out;
}

// A component's bins: float32 on the vectorised loops of mixture_vec.h, float64 on mixture.h's.
void value_bins(float wq, float m, float inv, int64_t L, const float* edge, const float* centre,
                const DmlConst<float>& k, float inv_half_bins, float* cdf, float* ccdf, float* row) {
  mixvec::value_bins_f32(wq, m, inv, L, edge, centre, k.edge, k.min_mass, inv_half_bins, cdf, ccdf, row);
}
void value_bins(double wq, double m, double inv, int64_t L, const double* edge, const double* centre,
                const DmlConst<double>& k, double inv_half_bins, double* cdf, double* ccdf, double* row) {
  component_bins<double>(wq, m, inv, L, edge, centre, k, inv_half_bins, cdf, ccdf, row);
}

// One row a task (rows are independent, and a row's sums run in a fixed order: the same bits on any
// thread count, which the codec's encoder and decoder rely on). Per row: the posterior (scalar), then
// each component's bin masses added into the row's output (float32: the vectorised loops of
// mixture_vec.h), then the log.
at::Tensor dml_value_log_probs_cpu(const at::Tensor& params, const at::Tensor& prev, int64_t K, int64_t j,
                                   int64_t num_bits) {
  const char* op = "dml_value_log_probs";
  const int C = check_dml_value(op, params, prev, K, j, num_bits);
  check_cpu_dtype(op, params, "params");
  const int64_t N = params.size(0), P = params.size(1);
  const int64_t L = int64_t(1) << num_bits;
  auto out = at::empty({N, L}, prev.options());
  if (N == 0) return out;
  const auto pc = params.contiguous();
  const auto vc = prev.contiguous();
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "dml_value_log_probs_cpu", [&] {
    using T = scalar_t;
    const auto k = dml_const<T>(num_bits);
    const T bins = static_cast<T>(L - 1), inv_half_bins = T(2) / bins;
    std::vector<T> edge(L + 1), centre(L);
    for (int64_t e = 0; e <= L; ++e) edge[e] = (T(2) * static_cast<T>(e) - bins - T(1)) / bins;
    for (int64_t b = 0; b < L; ++b) centre[b] = (T(2) * static_cast<T>(b) - bins) / bins;
    const T* pp = pc.data_ptr<T>();
    const T* vp = vc.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> w(K), m(K), inv(K), cdf(L + 1), ccdf(L + 1);
      for (int64_t n = n0; n < n1; ++n) {
        const PixelParams<T> px{pp + n * P, 1};
        T* row = o + n * L;
        const bool ok = pixel_value_prep<T, T>(px, vp + n * j, K, C, static_cast<int>(j), k, w.data(), m.data(),
                                               inv.data());
        std::fill(row, row + L, T(0));
        for (int64_t q = 0; ok && q < K; ++q) {
          if (w[q] == T(0)) continue;
          value_bins(w[q], m[q], inv[q], L, edge.data(), centre.data(), k, inv_half_bins, cdf.data(), ccdf.data(),
                     row);
        }
        for (int64_t b = 0; b < L; ++b) row[b] = ok ? mlog(row[b]) : std::numeric_limits<T>::quiet_NaN();
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("discretized_mix_logistic_nll", &dml_nll_cpu);
  m.impl("discretized_mix_logistic_nll_backward", &dml_nll_backward_cpu);
  m.impl("sample_discretized_mix_logistic", &dml_sample_cpu);
  m.impl("categorical_sample", &categorical_sample_cpu);
  m.impl("dml_value_log_probs", &dml_value_log_probs_cpu);
}

}  // namespace fastar
