// gated_pixelcnn_step: one whole pixel step of a Gated PixelCNN's horizontal stack,
// head and categorical draw (cached sampling). Argument checks and the packed
// layouts, shared by the CPU and the CUDA kernels so both reject bad input with the
// same sentences. The Python side (fastar/ops/pixel_step.py) documents every tensor.
//
// Packed layouts (dt = the weights' dtype, float32 or float64; L blocks, C channels,
// C2 = 2C, Ci image channels, every matrix stored input-major (K, O) so that
// consecutive outputs are consecutive addresses: a GEMV then reads whole rows):
//   h_w      flat: block 0 (T0, Ci, C2), then blocks 1.. (T, C, C2) each; tap a is the
//            column offset a - (taps - 1), i.e. the live taps left of and at the centre
//   h_b      (L, C2)          so_w (L, C, C2): [skip | out] of the gate
//   so_b     (L, C2)          head1_w (C, C), head1_b (C), head2_w (C, Ci*K), head2_b (Ci*K)
//   links    (L, W, N, C2)    the vertical-to-horizontal link term of the current row
//   class_bias (L, N, C2)     cond_map (N, H*W, Cc), map_w (L, Cc, C2)
//   row_cache (L-1, N, W, C)  the current row of every block's horizontal-stack input
//   image (N, Ci, H, W), codes / prefix / given (N, Ci*H*W), noise (T_total, N),
//   logits (N, K), step (2,) int64: [t, 0] (element 1 is the CUDA kernel's arrival counter)
// K is 1 for a binary model (levels 2: one Bernoulli logit per sub-pixel), else levels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "common/tensor_ptr.h"
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct GatedStepShape {
  int64_t N, Ci, H, W, L, C, C2, T0, T, K, levels, Cc, Ttot;
  bool has_class, has_map, has_prefix;
  std::vector<int64_t> h_off;  // offset of each block's h_w slice
  std::vector<uint8_t> residual;
};

inline void check_packed(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                         const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must match the weights' dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the weights' device ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (pack it with fastar.ops.pixel_step)");
}

inline GatedStepShape check_gated_pixelcnn_step(
    const char* op, const at::Tensor& image, const at::Tensor& row_cache, const at::Tensor& codes,
    const at::Tensor& step, const at::Tensor& logits, const at::Tensor& noise, const at::Tensor& links,
    const c10::optional<at::Tensor>& class_bias, const c10::optional<at::Tensor>& cond_map,
    const c10::optional<at::Tensor>& map_w, const c10::optional<at::Tensor>& prefix,
    const c10::optional<at::Tensor>& given, const at::Tensor& h_w, const at::Tensor& h_b, const at::Tensor& so_w,
    const at::Tensor& so_b, const at::Tensor& head1_w, const at::Tensor& head1_b, const at::Tensor& head2_w,
    const at::Tensor& head2_b, at::IntArrayRef taps, at::IntArrayRef residual, int64_t levels,
    double temperature) {
  GatedStepShape s;
  TORCH_CHECK(h_b.dim() == 2 && h_b.size(1) % 2 == 0 && h_b.size(0) >= 1 && h_b.size(1) >= 2, op,
              ": h_b must be 2-D (L, 2C) with at least one block and an even positive width, got shape ",
              h_b.sizes());
  const auto st = h_b.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": the weights must be float32 or float64, got ", st);
  s.L = h_b.size(0);
  s.C2 = h_b.size(1);
  s.C = s.C2 / 2;
  TORCH_CHECK(image.dim() == 4, op, ": image must be 4-D (N, C_img, H, W), got shape ", image.sizes());
  s.N = image.size(0);
  s.Ci = image.size(1);
  s.H = image.size(2);
  s.W = image.size(3);
  TORCH_CHECK(s.N >= 1 && s.Ci >= 1 && s.H >= 1 && s.W >= 1, op, ": image must be non-empty, got shape ",
              image.sizes());
  TORCH_CHECK(levels >= 2, op, ": levels must be at least 2 (2 = binary), got ", levels);
  TORCH_CHECK(temperature >= 0.0, op, ": temperature must be non-negative, got ", temperature);
  s.levels = levels;
  s.K = levels == 2 ? 1 : levels;
  s.Ttot = s.Ci * s.H * s.W;
  TORCH_CHECK(taps.size() == 2 && taps[0] >= 1 && taps[1] >= 1, op,
              ": taps must be two positive ints (live taps of block 0, of the later blocks), got ", taps);
  s.T0 = taps[0];
  s.T = taps[1];
  TORCH_CHECK(static_cast<int64_t>(residual.size()) == s.L, op, ": residual must list ", s.L,
              " flags (one per block), got ", residual.size());
  s.residual.assign(residual.begin(), residual.end());
  TORCH_CHECK(!s.residual[0] || s.Ci == s.C, op, ": block 0 can only be residual when the image has as many "
              "channels as the blocks (", s.C, "), got ", s.Ci);
  s.h_off.resize(s.L);
  int64_t off = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    s.h_off[l] = off;
    off += (l == 0 ? s.T0 * s.Ci : s.T * s.C) * s.C2;
  }
  TORCH_CHECK(h_w.dim() == 1 && h_w.numel() == off, op, ": h_w must be 1-D holding ", off,
              " packed values (block 0: ", s.T0, " taps x ", s.Ci, " x ", s.C2, ", then ", s.L - 1, " blocks of ",
              s.T, " taps x ", s.C, " x ", s.C2, "), got shape ", h_w.sizes());
  check_packed(op, "h_w", h_w, {off}, h_b);
  check_packed(op, "h_b", h_b, {s.L, s.C2}, h_b);
  check_packed(op, "so_w", so_w, {s.L, s.C, s.C2}, h_b);
  check_packed(op, "so_b", so_b, {s.L, s.C2}, h_b);
  check_packed(op, "head1_w", head1_w, {s.C, s.C}, h_b);
  check_packed(op, "head1_b", head1_b, {s.C}, h_b);
  check_packed(op, "head2_w", head2_w, {s.C, s.Ci * s.K}, h_b);
  check_packed(op, "head2_b", head2_b, {s.Ci * s.K}, h_b);
  check_packed(op, "image", image, {s.N, s.Ci, s.H, s.W}, h_b);
  check_packed(op, "row_cache", row_cache, {s.L - 1, s.N, s.W, s.C}, h_b);
  check_packed(op, "links", links, {s.L, s.W, s.N, s.C2}, h_b);
  check_packed(op, "logits", logits, {s.N, s.K}, h_b);
  check_packed(op, "noise", noise, {s.Ttot, s.N}, h_b);
  TORCH_CHECK(codes.scalar_type() == at::kLong && codes.sizes() == at::IntArrayRef({s.N, s.Ttot}) &&
                  codes.is_contiguous() && codes.device() == h_b.device(),
              op, ": codes must be a contiguous (", s.N, ", ", s.Ttot, ") int64 tensor on ", h_b.device(), ", got ",
              codes.scalar_type(), " of shape ", codes.sizes(), " on ", codes.device());
  TORCH_CHECK(step.scalar_type() == at::kLong && step.dim() == 1 && step.size(0) == 2 && step.is_contiguous() &&
                  step.device() == h_b.device(),
              op, ": step must be a contiguous (2,) int64 tensor [t, 0] on ", h_b.device(), ", got ",
              step.scalar_type(), " of shape ", step.sizes(), " on ", step.device());
  s.has_class = class_bias.has_value() && class_bias->defined();
  if (s.has_class) check_packed(op, "class_bias", *class_bias, {s.L, s.N, s.C2}, h_b);
  const bool has_cm = cond_map.has_value() && cond_map->defined();
  const bool has_mw = map_w.has_value() && map_w->defined();
  TORCH_CHECK(has_cm == has_mw, op, ": cond_map and map_w come together (the map and its per-block 1x1 weights), got ",
              has_cm ? "cond_map without map_w" : "map_w without cond_map");
  s.has_map = has_cm;
  s.Cc = 0;
  if (s.has_map) {
    TORCH_CHECK(cond_map->dim() == 3, op, ": cond_map must be 3-D (N, H*W, Cc), got shape ", cond_map->sizes());
    s.Cc = cond_map->size(2);
    check_packed(op, "cond_map", *cond_map, {s.N, s.H * s.W, s.Cc}, h_b);
    check_packed(op, "map_w", *map_w, {s.L, s.Cc, s.C2}, h_b);
  }
  const bool has_p = prefix.has_value() && prefix->defined();
  const bool has_g = given.has_value() && given->defined();
  TORCH_CHECK(has_p == has_g, op, ": prefix and given come together, got ",
              has_p ? "prefix without given" : "given without prefix");
  s.has_prefix = has_p;
  if (has_p) {
    TORCH_CHECK(prefix->scalar_type() == at::kLong && prefix->sizes() == at::IntArrayRef({s.N, s.Ttot}) &&
                    prefix->is_contiguous() && prefix->device() == h_b.device(),
                op, ": prefix must be a contiguous (", s.N, ", ", s.Ttot, ") int64 tensor on ", h_b.device(),
                ", got ", prefix->scalar_type(), " of shape ", prefix->sizes(), " on ", prefix->device());
    TORCH_CHECK(given->scalar_type() == at::kBool && given->sizes() == at::IntArrayRef({s.N, s.Ttot}) &&
                    given->is_contiguous() && given->device() == h_b.device(),
                op, ": given must be a contiguous (", s.N, ", ", s.Ttot, ") bool tensor on ", h_b.device(),
                ", got ", given->scalar_type(), " of shape ", given->sizes(), " on ", given->device());
  }
  return s;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
