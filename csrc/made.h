// MADE's degree-bucket sampler (fastar/ops/made.py has the full contract): argument checks and the
// layouts shared by the CPU kernel (csrc/cpu/made.cpp) and the CUDA kernel (csrc/cuda/made.cu).
//
// Everything is in step order, each layer's units sorted by degree: a value known after step t (the
// input of step t, a unit of degree t + 1) feeds a suffix of the layer above, its units of degree
// >= t + 1 (from counts[k, l, t] on), or the outputs of the steps after t. hidden holds a unit's
// pre-activation until its degree's step, its ReLU output after.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct MadeShape {
  int64_t K = 0, N = 0, D = 0, P = 1, L = 0, levels = 2, steps = 0, T = 0, Hall = 0;
  bool direct = false, given = false;
  std::vector<int64_t> H, off;  // widths; hidden offsets [inputs | layer 1 | ...] (off[0] = 0, off[1] = D)
};

inline MadeShape parse_made(const at::Tensor& codes, const at::Tensor& hidden, const at::Tensor& acc,
                            const at::Tensor& logw, const at::Tensor& position, const at::Tensor& params,
                            const at::Tensor& noise, const c10::optional<at::Tensor>& given,
                            const c10::optional<at::Tensor>& given_mask, const at::Tensor& counts,
                            at::TensorList pack, at::IntArrayRef config) {
  const char* op = "made_sample_steps";
  MadeShape s;
  TORCH_CHECK(config.size() >= 4, op, ": config must be [levels, num_steps, direct, H_1, ..., H_L]");
  s.levels = config[0];
  s.steps = config[1];
  TORCH_CHECK(s.levels >= 2 && s.steps >= 0 && (config[2] == 0 || config[2] == 1), op, ": bad config");
  s.direct = config[2] == 1;
  s.L = static_cast<int64_t>(config.size()) - 3;
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(config[3 + l] >= 1, op, ": hidden widths must be positive");
    s.H.push_back(config[3 + l]);
  }
  s.P = s.levels == 2 ? 1 : s.levels;
  TORCH_CHECK(counts.dim() == 3 && counts.scalar_type() == at::kLong && counts.size(1) == s.L && counts.is_contiguous(),
              op, ": counts must be contiguous (K, L, D + 1) int64");
  s.K = counts.size(0);
  s.D = counts.size(2) - 1;
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kLong && codes.size(1) == s.D && codes.is_contiguous(), op,
              ": codes must be contiguous (N, D) int64");
  s.N = codes.size(0);
  TORCH_CHECK(static_cast<int64_t>(pack.size()) == s.L + 1 + (s.direct ? 1 : 0), op, ": pack has ", pack.size(),
              " tensors, want Wt per layer, out_wt", s.direct ? ", direct_t" : "");
  const auto dt = pack[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": weights must be float32 or float64");
  s.off.push_back(0);
  s.off.push_back(s.D);
  for (int64_t l = 0; l < s.L; ++l) s.off.push_back(s.off.back() + s.H[l]);
  s.Hall = s.off.back();
  auto want = [&](const at::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dt && t.is_contiguous() &&
                    t.device() == codes.device(),
                op, ": ", name, " must be a contiguous tensor of shape ", at::IntArrayRef(shape), " and dtype ", dt,
                " on ", codes.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  int64_t prev = s.D;
  for (int64_t l = 0; l < s.L; ++l) {
    want(pack[l], {s.K, prev, s.H[l]}, "Wt_l");
    prev = s.H[l];
  }
  want(pack[s.L], {s.K, prev, s.D * s.P}, "out_wt");
  if (s.direct) want(pack[s.L + 1], {s.K, s.D, s.D * s.P}, "direct_t");
  want(hidden, {s.K, s.N, s.Hall}, "hidden");
  want(acc, {s.K, s.N, s.D * s.P}, "acc");
  want(logw, {s.K, s.N}, "logw");
  want(params, {s.N, s.P}, "params");
  TORCH_CHECK(noise.dim() == 2 && noise.size(1) == s.N && noise.scalar_type() == dt && noise.is_contiguous() &&
                  noise.device() == codes.device(),
              op, ": noise must be contiguous (T, N) uniforms of the weights' dtype");
  s.T = noise.size(0);
  TORCH_CHECK(position.numel() == 1 && position.scalar_type() == at::kLong && position.device() == codes.device(), op,
              ": position must be a one-element int64 tensor");
  TORCH_CHECK(counts.device() == codes.device(), op, ": counts must be on the codes' device");
  s.given = given.has_value() && given->defined();
  TORCH_CHECK(s.given == (given_mask.has_value() && given_mask->defined()), op, ": given and given_mask come together");
  if (s.given) {
    TORCH_CHECK(given->sizes() == codes.sizes() && given->scalar_type() == at::kLong && given->is_contiguous() &&
                    given_mask->sizes() == codes.sizes() && given_mask->scalar_type() == at::kBool &&
                    given_mask->is_contiguous() && given->device() == codes.device() &&
                    given_mask->device() == codes.device(),
                op, ": given (N, D) int64 and given_mask (N, D) bool, contiguous, on the codes' device");
  }
  return s;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
