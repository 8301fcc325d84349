// Shared argument checks and layouts of the PixelRNN scan family (fastar/ops/lstm_scan.py),
// used by the CPU and the CUDA kernels alike so both reject bad input with the same sentences.
//
// Layouts (all contiguous after the checks' callers take .contiguous()):
//   is_map (B, 4h, H, W)   input-to-state pre-activations, gate blocks [i | f | o | g]
//   w_ss   (4h, h, K)      state-to-state: diagonal K = 2 taps [above (i-1, j), left (i, j-1)];
//                          row K odd, tap t reads the previous row at column j + t - K/2
//   bias   (4h,) or none
//   h0, c0 (B, h, H)       diagonal only: the states left of column 0, per row (none = zeros)
//   h, c   (B, h, H, W)    outputs, in is_map's dtype
//   saved  (B, 5h, H, W)   accumulation dtype (float for bfloat16/half): activations
//                          [sigmoid(i) | sigmoid(f) | sigmoid(o) | tanh(g) | c], for the backward
// Cell: c = f * c_prev + i * g; h = o * tanh(c); c_prev is the left cell (diagonal; c0 at j = 0)
// or the cell above (row; zero in row 0). States outside the image are zero except h0/c0.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct ScanShape {
  int64_t B, G4, hid, H, W, K;
};

inline bool scan_has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// taps: 2 for the diagonal LSTM; -1 for the row LSTM (any odd width).
inline ScanShape check_lstm_scan(const char* op, const at::Tensor& is_map, const at::Tensor& w_ss,
                                 const c10::optional<at::Tensor>& bias, int64_t taps,
                                 const c10::optional<at::Tensor>& h0 = c10::nullopt,
                                 const c10::optional<at::Tensor>& c0 = c10::nullopt) {
  TORCH_CHECK(is_map.dim() == 4, op, ": is_map must be 4-D (B, 4 * hidden, H, W), got shape ", is_map.sizes());
  TORCH_CHECK(w_ss.dim() == 3, op, ": w_ss must be 3-D (4 * hidden, hidden, taps), got shape ", w_ss.sizes());
  TORCH_CHECK(at::isFloatingType(is_map.scalar_type()), op, ": is_map must be a floating-point tensor, got ",
              is_map.scalar_type());
  TORCH_CHECK(w_ss.scalar_type() == is_map.scalar_type(), op, ": w_ss dtype ", w_ss.scalar_type(),
              " must match is_map dtype ", is_map.scalar_type());
  TORCH_CHECK(w_ss.device() == is_map.device(), op, ": w_ss must be on ", is_map.device(), ", got ",
              w_ss.device());
  ScanShape s;
  s.B = is_map.size(0);
  s.G4 = is_map.size(1);
  s.H = is_map.size(2);
  s.W = is_map.size(3);
  s.hid = w_ss.size(1);
  s.K = w_ss.size(2);
  TORCH_CHECK(s.hid >= 1 && w_ss.size(0) == 4 * s.hid, op,
              ": w_ss must be (4 * hidden, hidden, taps), got shape ", w_ss.sizes());
  if (taps > 0) {
    TORCH_CHECK(s.K == taps, op, ": w_ss must have ", taps, " taps (above, left), got shape ", w_ss.sizes());
  } else {
    TORCH_CHECK(s.K % 2 == 1, op, ": w_ss's state-to-state width must be odd (centred on the column), got ", s.K);
  }
  TORCH_CHECK(s.G4 == 4 * s.hid, op, ": is_map has ", s.G4, " channels, w_ss needs 4 * hidden = ", 4 * s.hid,
              " (gates i | f | o | g)");
  if (scan_has(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.G4, op, ": bias must have length 4 * hidden = ", s.G4,
                ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == is_map.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " must match is_map dtype ", is_map.scalar_type());
    TORCH_CHECK(bias->device() == is_map.device(), op, ": bias must be on ", is_map.device(), ", got ",
                bias->device());
  }
  const char* names[2] = {"h0", "c0"};
  const c10::optional<at::Tensor>* states[2] = {&h0, &c0};
  for (int k = 0; k < 2; ++k) {
    if (!scan_has(*states[k])) continue;
    const at::Tensor& t = **states[k];
    TORCH_CHECK(t.dim() == 3 && t.size(0) == s.B && t.size(1) == s.hid && t.size(2) == s.H, op, ": ", names[k],
                " must be (B, hidden, H) = [", s.B, ", ", s.hid, ", ", s.H, "], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == is_map.scalar_type(), op, ": ", names[k], " dtype ", t.scalar_type(),
                " must match is_map dtype ", is_map.scalar_type());
    TORCH_CHECK(t.device() == is_map.device(), op, ": ", names[k], " must be on ", is_map.device(), ", got ",
                t.device());
  }
  return s;
}

inline void check_skew_input(const char* op, const at::Tensor& x, bool skewed) {
  TORCH_CHECK(x.dim() == 4, op, ": ", skewed ? "y must be 4-D (B, C, H, W + H - 1)" : "x must be 4-D (B, C, H, W)",
              ", got shape ", x.sizes());
  if (skewed)
    TORCH_CHECK(x.size(3) >= x.size(2), op, ": a skewed map of ", x.size(2), " rows is at least ", x.size(2),
                " wide (W + H - 1 with W >= 1), got shape ", x.sizes());
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
