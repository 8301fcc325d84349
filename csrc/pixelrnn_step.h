// pixelrnn_step: one whole PixelRNN sub-pixel step (every layer's LSTM cell, the residuals, the
// head and the categorical draw) for cached sampling. The argument checks, shared by the CPU and
// the CUDA kernels so both reject bad input with the same sentences. fastar/ops/pixelrnn.py
// documents every tensor; in short (dt = float32 or float64, L layers of h units, every matrix
// input-major (K, O)):
//   image (N, Ci, H, W)   codes / prefix (N, Ci*H*W) int64, given bool   step (2,) int64 [t, 0]
//   logits (N, K)         noise (Ci*H*W, N)
//   hs, cs (L, H, W, N, h)     xrow (L, W, N, 2h)
//   aux: kind 0 (Diagonal BiLSTM) (L, H, W, N, h) right-to-left states; kind 1 (Row LSTM) (L, W, N, 4h)
//   pack: in_w (F*F, Ci, 2h), in_b (2h), class_bias (N, 2h)?, is_w (L, 2h, 4h) | (L, P+1, 2h, 4h),
//         is_b (L, 4h), ss_w (L, 2h, 4h) (kind 0 only), out_w (L, h, 2h), out_b (L, 2h),
//         head1_w (2h, 2h), head1_b (2h), head2_w (2h, Ci*K), head2_b (Ci*K)
//   config: [kind, levels, F, residual]
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

#include <vector>

#include "common/macros.h"
#include "common/tensor_ptr.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct RnnPack {
  enum : int64_t { in_w, in_b, class_bias, is_w, is_b, ss_w, out_w, out_b, head1_w, head1_b, head2_w, head2_b, size };
};

struct RnnStepShape {
  int64_t N, Ci, H, W, L, hid, F, P, K, levels, Ttot, kind;
  bool residual, has_class, has_prefix;
};

struct RnnStepArgs {
  std::vector<at::Tensor> w;  // RnnPack order; undefined where absent
  RnnStepShape s;
};

inline void rnn_check(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                      at::ScalarType st, const at::Device& dev) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is missing");
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline RnnStepArgs parse_pixelrnn_step(const char* op, const at::Tensor& image, const at::Tensor& codes,
                                       const at::Tensor& step, const at::Tensor& logits, const at::Tensor& hs,
                                       const at::Tensor& cs, const at::Tensor& xrow, const at::Tensor& aux,
                                       const at::Tensor& noise, const c10::optional<at::Tensor>& prefix,
                                       const c10::optional<at::Tensor>& given,
                                       const c10::List<c10::optional<at::Tensor>>& pack, at::IntArrayRef config,
                                       double temperature) {
  static const char* const names[] = {"in_w",  "in_b",  "class_bias", "is_w",    "is_b",    "ss_w",
                                      "out_w", "out_b", "head1_w",    "head1_b", "head2_w", "head2_b"};
  TORCH_CHECK(static_cast<int64_t>(pack.size()) == RnnPack::size, op, ": pack must hold ", RnnPack::size,
              " entries (in_w, in_b, class_bias, is_w, is_b, ss_w, out_w, out_b, head1_w, head1_b, head2_w, "
              "head2_b), got ", pack.size());
  TORCH_CHECK(config.size() == 4, op, ": config must be [kind, levels, first kernel size, residual], got ", config);
  RnnStepArgs a;
  a.w.resize(RnnPack::size);
  for (int64_t i = 0; i < RnnPack::size; ++i) {
    c10::optional<at::Tensor> t = pack.get(i);
    if (t.has_value() && t->defined()) a.w[i] = *t;
  }
  RnnStepShape& s = a.s;
  s.kind = config[0];
  s.levels = config[1];
  s.F = config[2];
  TORCH_CHECK(s.kind == 0 || s.kind == 1, op, ": config kind must be 0 (Diagonal BiLSTM) or 1 (Row LSTM), got ",
              s.kind);
  TORCH_CHECK(s.levels >= 2, op, ": levels must be at least 2, got ", s.levels);
  TORCH_CHECK(s.F >= 1 && s.F % 2 == 1, op, ": the first kernel size must be odd and positive, got ", s.F);
  TORCH_CHECK(config[3] == 0 || config[3] == 1, op, ": residual must be 0 or 1, got ", config[3]);
  s.residual = config[3] == 1;
  TORCH_CHECK(temperature >= 0.0, op, ": temperature must be non-negative, got ", temperature);
  TORCH_CHECK(image.dim() == 4 && image.numel() > 0, op, ": image must be a non-empty (N, C_img, H, W) map, got ",
              image.sizes());
  const auto st = image.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": image must be float32 or float64, got ", st);
  const auto dev = image.device();
  s.N = image.size(0);
  s.Ci = image.size(1);
  s.H = image.size(2);
  s.W = image.size(3);
  const at::Tensor& is_b = a.w[RnnPack::is_b];
  TORCH_CHECK(is_b.defined() && is_b.dim() == 2 && is_b.size(0) >= 1 && is_b.size(1) >= 4 && is_b.size(1) % 4 == 0,
              op, ": is_b must be (L, 4h), got ", is_b.defined() ? is_b.sizes() : at::IntArrayRef{});
  s.L = is_b.size(0);
  s.hid = is_b.size(1) / 4;
  s.K = s.levels == 2 ? 1 : s.levels;
  s.Ttot = s.Ci * s.H * s.W;
  const int64_t h = s.hid, L = s.L, N = s.N, H = s.H, W = s.W;
  for (int64_t i = 0; i < RnnPack::size; ++i) {
    const bool optional = i == RnnPack::class_bias || (i == RnnPack::ss_w && s.kind == 1);
    TORCH_CHECK(optional || a.w[i].defined(), op, ": pack[", i, "] (", names[i], ") must be a tensor, got None");
  }
  TORCH_CHECK(s.kind == 0 || !a.w[RnnPack::ss_w].defined(), op,
              ": a Row LSTM step takes no ss_w (its state term is aux)");
  rnn_check(op, "image", image, {N, s.Ci, H, W}, st, dev);
  rnn_check(op, "in_w", a.w[RnnPack::in_w], {s.F * s.F, s.Ci, 2 * h}, st, dev);
  rnn_check(op, "in_b", a.w[RnnPack::in_b], {2 * h}, st, dev);
  s.has_class = a.w[RnnPack::class_bias].defined();
  if (s.has_class) rnn_check(op, "class_bias", a.w[RnnPack::class_bias], {N, 2 * h}, st, dev);
  if (s.kind == 0) {
    s.P = 0;
    rnn_check(op, "is_w", a.w[RnnPack::is_w], {L, 2 * h, 4 * h}, st, dev);
    rnn_check(op, "ss_w", a.w[RnnPack::ss_w], {L, 2 * h, 4 * h}, st, dev);
    rnn_check(op, "aux", aux, {L, H, W, N, h}, st, dev);
  } else {
    const at::Tensor& w = a.w[RnnPack::is_w];
    TORCH_CHECK(w.dim() == 4 && w.size(1) >= 1, op, ": is_w must be (L, P + 1, 2h, 4h) for a Row LSTM, got ",
                w.sizes());
    s.P = w.size(1) - 1;
    rnn_check(op, "is_w", w, {L, s.P + 1, 2 * h, 4 * h}, st, dev);
    rnn_check(op, "aux", aux, {L, W, N, 4 * h}, st, dev);
  }
  rnn_check(op, "is_b", is_b, {L, 4 * h}, st, dev);
  rnn_check(op, "out_w", a.w[RnnPack::out_w], {L, h, 2 * h}, st, dev);
  rnn_check(op, "out_b", a.w[RnnPack::out_b], {L, 2 * h}, st, dev);
  rnn_check(op, "head1_w", a.w[RnnPack::head1_w], {2 * h, 2 * h}, st, dev);
  rnn_check(op, "head1_b", a.w[RnnPack::head1_b], {2 * h}, st, dev);
  rnn_check(op, "head2_w", a.w[RnnPack::head2_w], {2 * h, s.Ci * s.K}, st, dev);
  rnn_check(op, "head2_b", a.w[RnnPack::head2_b], {s.Ci * s.K}, st, dev);
  rnn_check(op, "hs", hs, {L, H, W, N, h}, st, dev);
  rnn_check(op, "cs", cs, {L, H, W, N, h}, st, dev);
  rnn_check(op, "xrow", xrow, {L, W, N, 2 * h}, st, dev);
  rnn_check(op, "logits", logits, {N, s.K}, st, dev);
  rnn_check(op, "noise", noise, {s.Ttot, N}, st, dev);
  rnn_check(op, "codes", codes, {N, s.Ttot}, at::kLong, dev);
  rnn_check(op, "step", step, {2}, at::kLong, dev);
  const bool has_p = prefix.has_value() && prefix->defined();
  const bool has_g = given.has_value() && given->defined();
  TORCH_CHECK(has_p == has_g, op, ": prefix and given come together, got ",
              has_p ? "prefix without given" : "given without prefix");
  s.has_prefix = has_p;
  if (has_p) {
    rnn_check(op, "prefix", *prefix, {N, s.Ttot}, at::kLong, dev);
    rnn_check(op, "given", *given, {N, s.Ttot}, at::kBool, dev);
  }
  return a;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
