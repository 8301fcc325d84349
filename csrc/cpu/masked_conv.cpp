// CPU kernels of the masked convolution family.
//
// masked_conv2d(x, weight, bias, mask, padding, dilation):
//   x (N, C_in, H, W), any layout; weight and mask (C_out, C_in, kH, kW); bias (C_out,) or none;
//   out (N, C_out, H_out, W_out) contiguous = conv2d(x, weight * mask, bias, stride 1). float32, float64.
//
// Design: "shifted GEMMs on a padded, channel-major grid", no im2col buffer.
// The input is copied once into a zero-padded grid laid out (C_in, N, Hp, Wp)
// and seen as a (C_in, P) matrix, P = N * Hp * Wp. If the output is computed on
// the same grid (column q = n*Hp*Wp + oh*Wp + ow), then for tap (kh, kw) the
// input each output column needs sits at a fixed column offset
// off = kh*dil_h*Wp + kw*dil_w, so the tap's operand is just the strided view
// grid[:, off : off + Q] (leading dimension P), which BLAS takes as is. The
// output is therefore sum over ACTIVE taps of W_tap (C_out, C_in) @ view_tap:
// one large GEMM per live tap over the whole batch, and the taps the mask
// zeroes for every channel pair are never touched (about half of a causal
// mask). The grid's junk columns (padding positions) cost (Hp*Wp)/(H_out*W_out)
// extra work, ~15% at 28x28 with a 3x3 kernel. Backward reuses the same trick:
// grad_x is the same sum with W_tap^T over a padded grad_out grid and the
// flipped offsets, grad_W_tap = grad_out_grid @ view_tap^T.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "masked_conv.h"

namespace fastar {
namespace {

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": the CPU kernel supports float32 and float64, got ", st,
              "; cast the input, or use fastar.set_backend(\"reference\") for this dtype");
}

// The live taps' effective weights, (T_a, C_out, C_in) contiguous: w_taps[a] = (weight * mask)[:, :, tap_a].
at::Tensor pack_tap_weights(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& taps_t,
                            const MaskedConvShape& s) {
  return (weight * mask.to(weight.scalar_type()))
      .reshape({s.C_out, s.C_in, s.kH * s.kW})
      .index_select(2, taps_t)
      .permute({2, 0, 1})
      .contiguous();
}

// Copies src (N, C, h, w) into a zeroed channel-major grid (C, N, gh, gw) at row/column offset (top, left);
// rows/columns that fall outside the grid are dropped (negative offsets crop).
at::Tensor to_grid(const at::Tensor& src, int64_t gh, int64_t gw, int64_t top, int64_t left) {
  const int64_t N = src.size(0), C = src.size(1), h = src.size(2), w = src.size(3);
  auto grid = at::zeros({C, N, gh, gw}, src.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t r0 = std::max<int64_t>(0, -top), r1 = std::min(h, gh - top);
  const int64_t c0 = std::max<int64_t>(0, -left), c1 = std::min(w, gw - left);
  if (r1 > r0 && c1 > c0 && N > 0) {
    grid.narrow(2, top + r0, r1 - r0)
        .narrow(3, left + c0, c1 - c0)
        .copy_(src.narrow(2, r0, r1 - r0).narrow(3, c0, c1 - c0).permute({1, 0, 2, 3}));
  }
  return grid;
}

// Column blocks: the stacked operand of one block, (T * K) rows x qb columns, should sit in
// L2 next to its output block, so the gather is a cache-resident memcpy and the GEMM's K
// dimension is every live tap at once (T GEMMs with K = C_in each would re-read and re-write
// the whole output T times, which is memory-bound for small C_in or large batches).
int64_t block_columns(int64_t rows, int64_t elsize) {
  const int64_t budget = 768 * 1024;
  int64_t qb = budget / std::max<int64_t>(1, rows * elsize);
  qb = std::max<int64_t>(256, std::min<int64_t>(qb, 8192));
  return (qb + 63) / 64 * 64;
}

// Work split into a fixed number of chunks (one per thread), so a reduction over chunks adds
// its partial sums in the same order for a given thread count.
int64_t num_chunks(int64_t nblocks) {
  return std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
}

// cols (T*K, qb) = stack over taps a of grid2d[:, off_a + q0 : off_a + q0 + qb].
template <typename scalar_t>
void gather_block(const scalar_t* grid, int64_t K, int64_t P, const std::vector<int64_t>& off, int64_t q0,
                  int64_t qb, scalar_t* cols) {
  const int64_t T = static_cast<int64_t>(off.size());
  for (int64_t a = 0; a < T; ++a)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(cols + (a * K + k) * qb, grid + k * P + off[a] + q0, sizeof(scalar_t) * qb);
}

// out (M, P), columns [0, Q): init + A_cat (M, T*K) @ stack_a(grid2d (K, P)[:, off_a : off_a + Q]).
// Column a*K + k of A_cat multiplies grid row k shifted by off[a]. Columns >= Q are left unset.
template <typename scalar_t>
at::Tensor shifted_gemm(const at::Tensor& A_cat, const at::Tensor& grid2d, const std::vector<int64_t>& off, int64_t Q,
                        const c10::optional<at::Tensor>& init) {
  const int64_t M = A_cat.size(0), K = grid2d.size(0), P = grid2d.size(1), KT = A_cat.size(1);
  auto out = at::empty({M, P}, grid2d.options());
  const int64_t QB = block_columns(KT, grid2d.element_size());
  const int64_t nblocks = (Q + QB - 1) / QB, nch = num_chunks(nblocks);
  const scalar_t* g = grid2d.const_data_ptr<scalar_t>();
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    // OpenMP workers do not inherit the caller's dispatch state: without this the ATen
    // GEMMs below would run the autograd layer (and refuse out= with weights that require grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto cols = at::empty({KT * QB}, grid2d.options());
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t blk = c * nblocks / nch; blk < (c + 1) * nblocks / nch; ++blk) {
        const int64_t q0 = blk * QB, qb = std::min(QB, Q - q0);
        gather_block<scalar_t>(g, K, P, off, q0, qb, cols.data_ptr<scalar_t>());
        auto cb = cols.narrow(0, 0, KT * qb).view({KT, qb});
        auto o = out.narrow(1, q0, qb);
        if (init.has_value())
          at::addmm_out(o, init->view({M, 1}).expand({M, qb}), A_cat, cb);
        else
          at::mm_out(o, A_cat, cb);
      }
    }
  });
  return out;
}

// G (M, T*K) = sum over columns q < Q of gg2d[:, q] (x) stack_a(grid2d[:, off_a + q]): the weight gradient,
// reduced over per-chunk partial sums in a fixed order.
template <typename scalar_t>
at::Tensor shifted_gemm_wgrad(const at::Tensor& gg2d, const at::Tensor& grid2d, const std::vector<int64_t>& off,
                              int64_t Q) {
  const int64_t M = gg2d.size(0), K = grid2d.size(0), P = grid2d.size(1);
  const int64_t KT = K * static_cast<int64_t>(off.size());
  const int64_t QB = block_columns(KT, grid2d.element_size());
  const int64_t nblocks = (Q + QB - 1) / QB, nch = num_chunks(nblocks);
  auto partial = at::zeros({nch, M, KT}, grid2d.options());
  const scalar_t* g = grid2d.const_data_ptr<scalar_t>();
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    // OpenMP workers do not inherit the caller's dispatch state: without this the ATen
    // GEMMs below would run the autograd layer (and refuse out= with weights that require grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto cols = at::empty({KT * QB}, grid2d.options());
    for (int64_t c = c0; c < c1; ++c) {
      auto acc = partial[c];
      for (int64_t blk = c * nblocks / nch; blk < (c + 1) * nblocks / nch; ++blk) {
        const int64_t q0 = blk * QB, qb = std::min(QB, Q - q0);
        gather_block<scalar_t>(g, K, P, off, q0, qb, cols.data_ptr<scalar_t>());
        auto cb = cols.narrow(0, 0, KT * qb).view({KT, qb});
        at::addmm_out(acc, acc, gg2d.narrow(1, q0, qb), cb.t());
      }
    }
  });
  return partial.sum(0);
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& mask, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto s = check_masked_conv2d("masked_conv2d", x, weight, bias, mask, padding, dilation);
  check_cpu_dtype("masked_conv2d", x);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto taps = active_taps_host(mask);
  if (s.N == 0 || taps.empty()) {
    auto out = at::empty({s.N, s.C_out, s.H_out, s.W_out}, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (has_bias)
      out.copy_(bias->view({1, s.C_out, 1, 1}).expand_as(out));
    else
      out.zero_();
    return out;
  }
  const int64_t Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w;
  auto grid = to_grid(x, Hp, Wp, s.pad_h, s.pad_w).view({s.C_in, s.N * Hp * Wp});
  // (C_out, T_a * C_in): column a * C_in + c is tap a's weight for input channel c.
  const auto w_cat = pack_tap_weights(weight, mask, at::tensor(taps, at::kLong), s)
                         .permute({1, 0, 2})
                         .reshape({s.C_out, static_cast<int64_t>(taps.size()) * s.C_in});
  std::vector<int64_t> off;
  for (int64_t t : taps) off.push_back((t / s.kW) * s.dil_h * Wp + (t % s.kW) * s.dil_w);
  // Last column any valid output needs, +1: the final image's last valid pixel.
  const int64_t Q = (s.N - 1) * Hp * Wp + (s.H_out - 1) * Wp + s.W_out;
  at::Tensor out_grid;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_cpu", [&] {
    out_grid = shifted_gemm<scalar_t>(w_cat, grid, off, Q, has_bias ? c10::optional<at::Tensor>(*bias) : c10::nullopt);
  });
  return out_grid.view({s.C_out, s.N, Hp, Wp})
      .narrow(2, 0, s.H_out)
      .narrow(3, 0, s.W_out)
      .permute({1, 0, 2, 3})
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const auto s = check_masked_conv2d("masked_conv2d_backward", x, weight, c10::nullopt, mask, padding, dilation);
  check_cpu_dtype("masked_conv2d_backward", x);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C_out &&
                  grad_out.size(2) == s.H_out && grad_out.size(3) == s.W_out,
              "masked_conv2d_backward: grad_out must have the output's shape [", s.N, ", ", s.C_out, ", ", s.H_out,
              ", ", s.W_out, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "masked_conv2d_backward: grad_out must match x's dtype and device, got ", grad_out.scalar_type(),
              " on ", grad_out.device());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const auto contig = x.options().memory_format(at::MemoryFormat::Contiguous);
  // Slots not asked for hold distinct empty tensors (outputs must not alias).
  at::Tensor gb = need_b ? grad_out.sum({0, 2, 3}) : at::empty({0}, x.options());
  at::Tensor gx = need_x ? at::zeros(x.sizes(), contig) : at::empty({0}, x.options());
  at::Tensor gw = need_w ? at::zeros(weight.sizes(), contig) : at::empty({0}, x.options());
  const auto taps = active_taps_host(mask);
  if ((!need_x && !need_w) || s.N == 0 || taps.empty()) return {gx, gw, gb};
  const int64_t T = static_cast<int64_t>(taps.size());
  const auto taps_t = at::tensor(taps, at::kLong);

  if (need_w) {
    // grad_W_tap = grad_out_grid (C_out, Q) @ x_grid[:, off : off + Q]^T, junk grid columns of grad_out are zero.
    const int64_t Hp = s.H + 2 * s.pad_h, Wp = s.W + 2 * s.pad_w;
    const int64_t Q = (s.N - 1) * Hp * Wp + (s.H_out - 1) * Wp + s.W_out;
    auto xg = to_grid(x, Hp, Wp, s.pad_h, s.pad_w).view({s.C_in, s.N * Hp * Wp});
    auto gg = to_grid(grad_out, Hp, Wp, 0, 0).view({s.C_out, s.N * Hp * Wp}).narrow(1, 0, Q);
    std::vector<int64_t> off;
    for (int64_t t : taps) off.push_back((t / s.kW) * s.dil_h * Wp + (t % s.kW) * s.dil_w);
    at::Tensor gw_cat;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_backward_cpu", [&] {
      gw_cat = shifted_gemm_wgrad<scalar_t>(gg, xg, off, Q);
    });
    // (C_out, T_a * C_in) -> (T_a, C_out, C_in), the layout the scatter below reads.
    auto gw_taps = gw_cat.view({s.C_out, T, s.C_in}).permute({1, 0, 2});
    gw.view({s.C_out, s.C_in, s.kH * s.kW}).index_copy_(2, taps_t, gw_taps.permute({1, 2, 0}));
    gw.mul_(mask.to(weight.scalar_type()));
  }
  if (need_x) {
    // grad_x[c, i, j] = sum_tap W_tap[:, c] . grad_out[:, i - dy, j - dx]: the same shifted GEMM over a grad_out grid
    // padded by the kernel's reach minus the forward padding, with flipped tap offsets.
    const int64_t Hq = s.H + (s.kH - 1) * s.dil_h, Wq = s.W + (s.kW - 1) * s.dil_w;
    const int64_t top = (s.kH - 1) * s.dil_h - s.pad_h, left = (s.kW - 1) * s.dil_w - s.pad_w;
    auto gg = to_grid(grad_out, Hq, Wq, top, left).view({s.C_out, s.N * Hq * Wq});
    // (C_in, T_a * C_out): column a * C_out + o is tap a's weight from output channel o, transposed.
    const auto wt_cat = pack_tap_weights(weight, mask, taps_t, s).permute({2, 0, 1}).reshape({s.C_in, T * s.C_out});
    std::vector<int64_t> off;
    for (int64_t t : taps) off.push_back((s.kH - 1 - t / s.kW) * s.dil_h * Wq + (s.kW - 1 - t % s.kW) * s.dil_w);
    const int64_t Q = (s.N - 1) * Hq * Wq + (s.H - 1) * Wq + s.W;
    at::Tensor gx_grid;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_backward_cpu", [&] {
      gx_grid = shifted_gemm<scalar_t>(wt_cat, gg, off, Q, c10::nullopt);
    });
    gx.copy_(gx_grid.view({s.C_in, s.N, Hq, Wq}).narrow(2, 0, s.H).narrow(3, 0, s.W).permute({1, 0, 2, 3}));
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace fastar
