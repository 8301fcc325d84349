// gated_pixelcnn_step: one whole pixel step of a Gated PixelCNN's horizontal stack,
// head and categorical draw (cached sampling). Argument checks and the packed
// layouts, shared by the CPU and the CUDA kernels so both reject bad input with the
// same sentences. The Python side (fastar/ops/gated_pixelcnn.py) documents every tensor.
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
#include <ATen/core/List.h>
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

// gated_pixelcnn_step's `Tensor?[] pack`: the weights in this order, the last three optional
// (fastar/ops/gated_pixelcnn.py's GatedPixelStepPack.to_pack).
struct GatedPack {
  enum : int64_t { h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias, cond_map, map_w, size };
};
// gated_pixelcnn_step's `int[] config`: levels, the two tap counts, then one residual flag per
// block (length 3 + L; GatedPixelStepPack.config).
struct GatedConfig {
  enum : int64_t { levels, taps0, taps1, residual };
};

// Everything a gated_pixelcnn_step kernel needs besides the run state it was handed by name.
struct GatedStepArgs {
  at::Tensor h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b;
  c10::optional<at::Tensor> class_bias, cond_map, map_w;  // absent: nullopt
  double temperature;
  GatedStepShape s;
};

// Unpacks and checks gated_pixelcnn_step's arguments: the one place the CPU and the CUDA entry
// points (csrc/cpu/pixel_step.cpp, csrc/cuda/pixel_step.cu) read pack and config, so both reject
// bad input with the same sentences; each then adds only what its device cannot do.
inline GatedStepArgs parse_gated_pixelcnn_step(const char* op, const at::Tensor& image, const at::Tensor& row_cache,
                                               const at::Tensor& codes, const at::Tensor& step,
                                               const at::Tensor& logits, const at::Tensor& noise,
                                               const at::Tensor& links, const c10::optional<at::Tensor>& prefix,
                                               const c10::optional<at::Tensor>& given,
                                               const c10::List<c10::optional<at::Tensor>>& pack,
                                               at::IntArrayRef config, double temperature) {
  static const char* const names[] = {"h_w",     "h_b",     "so_w",       "so_b",     "head1_w", "head1_b",
                                      "head2_w", "head2_b", "class_bias", "cond_map", "map_w"};
  TORCH_CHECK(static_cast<int64_t>(pack.size()) == GatedPack::size, op, ": pack must hold ", GatedPack::size,
              " entries (h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias, cond_map, map_w), got ",
              pack.size());
  GatedStepArgs a;
  std::vector<c10::optional<at::Tensor>> got(GatedPack::size);
  for (int64_t i = 0; i < GatedPack::size; ++i) {
    c10::optional<at::Tensor> t = pack.get(i);
    if (t.has_value() && !t->defined()) t = c10::nullopt;
    TORCH_CHECK(i >= GatedPack::class_bias || t.has_value(), op, ": pack[", i, "] (", names[i],
                ") must be a tensor, got None");
    got[i] = std::move(t);
  }
  a.h_w = *got[GatedPack::h_w];
  a.h_b = *got[GatedPack::h_b];
  a.so_w = *got[GatedPack::so_w];
  a.so_b = *got[GatedPack::so_b];
  a.head1_w = *got[GatedPack::head1_w];
  a.head1_b = *got[GatedPack::head1_b];
  a.head2_w = *got[GatedPack::head2_w];
  a.head2_b = *got[GatedPack::head2_b];
  a.class_bias = got[GatedPack::class_bias];
  a.cond_map = got[GatedPack::cond_map];
  a.map_w = got[GatedPack::map_w];
  a.temperature = temperature;
  TORCH_CHECK(static_cast<int64_t>(config.size()) >= GatedConfig::residual, op,
              ": config must hold [levels, taps of block 0, taps of the later blocks, residual flags...], got ",
              config);
  const int64_t levels = config[GatedConfig::levels];
  const at::IntArrayRef taps = config.slice(GatedConfig::taps0, 2);
  const at::IntArrayRef residual = config.slice(GatedConfig::residual);
  const auto &h_w = a.h_w, &h_b = a.h_b;
  GatedStepShape& s = a.s;
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
  TORCH_CHECK(taps[0] >= 1 && taps[1] >= 1, op,
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
  check_packed(op, "so_w", a.so_w, {s.L, s.C, s.C2}, h_b);
  check_packed(op, "so_b", a.so_b, {s.L, s.C2}, h_b);
  check_packed(op, "head1_w", a.head1_w, {s.C, s.C}, h_b);
  check_packed(op, "head1_b", a.head1_b, {s.C}, h_b);
  check_packed(op, "head2_w", a.head2_w, {s.C, s.Ci * s.K}, h_b);
  check_packed(op, "head2_b", a.head2_b, {s.Ci * s.K}, h_b);
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
  s.has_class = a.class_bias.has_value();
  if (s.has_class) check_packed(op, "class_bias", *a.class_bias, {s.L, s.N, s.C2}, h_b);
  const bool has_cm = a.cond_map.has_value();
  const bool has_mw = a.map_w.has_value();
  TORCH_CHECK(has_cm == has_mw, op, ": cond_map and map_w come together (the map and its per-block 1x1 weights), got ",
              has_cm ? "cond_map without map_w" : "map_w without cond_map");
  s.has_map = has_cm;
  s.Cc = 0;
  if (s.has_map) {
    const auto& cond_map = *a.cond_map;
    TORCH_CHECK(cond_map.dim() == 3, op, ": cond_map must be 3-D (N, H*W, Cc), got shape ", cond_map.sizes());
    s.Cc = cond_map.size(2);
    check_packed(op, "cond_map", cond_map, {s.N, s.H * s.W, s.Cc}, h_b);
    check_packed(op, "map_w", *a.map_w, {s.L, s.Cc, s.C2}, h_b);
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
  return a;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
