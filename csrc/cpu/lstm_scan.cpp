// CPU kernels of the PixelRNN scan family (fastar/ops/lstm_scan.py; layouts in lstm_scan.h).
//
// skew / unskew: index copies, any dtype (copied by element size), one task per (b, c) plane.
//
// diagonal_lstm_scan, row_lstm_scan and their backwards, float32 / float64.
//
// Design: "step-major padded grids, one GEMM per tap per step, no gathering in the loop".
// Every per-cell vector (the pre-activations, h, c, the gradients) is kept as one contiguous row
// of a matrix whose rows are ordered step by step (a step = one diagonal i + j = d, or one image
// row), cell by cell within the step, batch innermost: row (cell, b). The image is embedded in a
// grid with a border of padding cells (zeros, or h0 / c0 in the column left of the image), so
// every neighbour a step reads -- the cells above and to the left for the diagonal LSTM, the
// previous row's columns j - k/2 .. j + k/2 for the row LSTM -- lies in ONE contiguous block of
// rows of the previous step, in the same (cell, b) order as the step's own rows:
//
//   diagonal: grid (H + 2) x (W + 2) stored diagonal by diagonal. For the cells of diagonal e at
//     grid rows gi = a .. z, the states above are the rows of (gi - 1, e - gi) on diagonal e - 1,
//     those to the left (gi, e - 1 - gi), also on diagonal e - 1: two row ranges of n*B rows.
//   row: grid (H + 1) x (W + k - 1) stored row-major (a zero row on top, k/2 zero columns each
//     side); tap t of row i reads grid row i, columns t .. t + W - 1: one range of W*B rows.
//
// So the state-to-state product of a step is, per tap, one (n*B, hid) @ (hid, 4 hid) GEMM on
// views (the Fortran BLAS torch ships, MKL), accumulated in place onto the step's input-to-state
// rows, and the gates are a contiguous pointwise pass over the same rows (vectorised: vexp-based
// sigmoid / tanh in float32, compiled for AVX-512 / AVX2 as well; libm in float64). A step is split
// into row chunks over at::parallel_for; each chunk runs its GEMM slice (single-threaded BLAS
// inside the parallel region) then its gates, so one barrier per step.
//
// The backward runs the steps in reverse with the geometry mirrored (the cells below / to the
// right, on the next step; a zero border at the bottom / right), carrying dL/dc along the cell's
// direction in a per-row (diagonal) or per-column (row) buffer updated in place. d_w is one GEMM
// per tap per step (dz^T against the state rows the step read, rebuilt from h).
//
// Memory: the diagonal kernels convert NCHW <-> cell rows once per tensor (blocked transposing
// copies): a diagonal's cells sit in different image rows, so reading NCHW inside the step would
// touch one cache line per value. The row kernels are fused instead: an image row's cells are W
// contiguous columns of every plane, so each chunk reads / writes NCHW directly and the per-row
// buffers stay in cache. On this 2-core VM the NCHW stores of h, c and saved (7 hid values per
// cell) cost about as much as the GEMMs at hid 128; they are the bound the reference, which keeps
// its saved activations per step, does not pay in its forward.
#include <ATen/ATen.h>
#include <cstdlib>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/vec_math.h"
#include "lstm_scan.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastar {
namespace {

void check_cpu_dtype(const char* op, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": the CPU kernel supports float32 and float64, got ", st,
              "; cast the input, or use fastar.set_backend(\"reference\") for this dtype");
}

// ------------------------------------------------------------------------------------- skew / unskew

template <typename E>
void skew_copy(const at::Tensor& x, at::Tensor& out, bool inverse) {
  // forward: out (B, C, H, W + H - 1) contiguous, out[b, c, i, i + j] = x[b, c, i, j], zeros elsewhere.
  // inverse: out (B, C, H, W) contiguous, out[b, c, i, j] = x[b, c, i, i + j].
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), Wo = out.size(3);
  const int64_t sb = x.stride(0), sc = x.stride(1), si = x.stride(2), sj = x.stride(3);
  const int64_t W = inverse ? Wo : x.size(3);
  const E* src = static_cast<const E*>(x.const_data_ptr());
  E* dst = static_cast<E*>(out.data_ptr());
  const int64_t plane = H * std::max<int64_t>(Wo, 1);
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / C, c = p % C;
      const E* s = src + b * sb + c * sc;
      E* d = dst + p * H * Wo;
      for (int64_t i = 0; i < H; ++i) {
        E* drow = d + i * Wo;
        if (inverse) {
          const E* srow = s + i * si + i * sj;
          for (int64_t j = 0; j < W; ++j) drow[j] = srow[j * sj];
        } else {
          const E* srow = s + i * si;
          std::memset(static_cast<void*>(drow), 0, sizeof(E) * Wo);
          for (int64_t j = 0; j < W; ++j) drow[i + j] = srow[j * sj];
        }
      }
    }
  });
}

template <typename F>
void by_element_size(const at::Tensor& t, const F& f) {
  switch (t.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: {
      struct E16 {
        uint64_t a, b;
      };
      TORCH_CHECK(t.element_size() == 16, "skew: unsupported element size ", t.element_size());
      f(E16{});
    }
  }
}

at::Tensor skew_cpu(const at::Tensor& x) {
  check_skew_input("skew", x, false);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(W + H - 1 >= 0, "skew: x must have W >= 1 when H >= 1, got shape ", x.sizes());
  auto out = at::empty({x.size(0), x.size(1), H, W + H - 1}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  by_element_size(x, [&](auto e) { skew_copy<decltype(e)>(x, out, false); });
  return out;
}

at::Tensor unskew_cpu(const at::Tensor& y) {
  check_skew_input("unskew", y, true);
  const int64_t H = y.size(2), W = y.size(3) - H + 1;
  auto out = at::empty({y.size(0), y.size(1), H, W}, y.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  by_element_size(y, [&](auto e) { skew_copy<decltype(e)>(y, out, true); });
  return out;
}

// -------------------------------------------------------------------------- math of one cell row

inline float sigm(float x) { return 1.0f / (1.0f + vec::vexp(-x)); }
inline double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// (1 - e^-2x) / (1 + e^-2x): vexp's clamp keeps e^-2x finite (<= e^88), so large |x| give +-1.
inline float tanh_(float x) {
  const float t = vec::vexp(-2.0f * x);
  return (1.0f - t) / (1.0f + t);
}
inline double tanh_(double x) { return std::tanh(x); }

// z (4 hid): the pre-activations without bias, in; the activations [i | f | o | g], out.
// c = f * cl + i * g, h = o * tanh(c).
template <typename T>
inline void cell_forward(T* __restrict z, const T* __restrict bias, const T* __restrict cl, T* __restrict c,
                         T* __restrict h, int64_t hid) {
  const int64_t g4 = 4 * hid, g3 = 3 * hid;
  for (int64_t k = 0; k < g4; ++k) z[k] += bias[k];
  for (int64_t k = 0; k < g3; ++k) z[k] = sigm(z[k]);
  T* __restrict zg = z + g3;
  for (int64_t k = 0; k < hid; ++k) zg[k] = tanh_(zg[k]);
  const T* __restrict zi = z;
  const T* __restrict zf = z + hid;
  const T* __restrict zo = z + 2 * hid;
  for (int64_t k = 0; k < hid; ++k) {
    const T cv = zf[k] * cl[k] + zi[k] * zg[k];
    c[k] = cv;
    h[k] = zo[k] * tanh_(cv);
  }
}

// s (5 hid): [i | f | o | g | c] of the cell; dh: dL/dh of the cell (its own and from the cells
// it feeds); gc: dL/dc from the output; carry: in dL/dc from the next cell along the cell path,
// times that cell's f (so, added as is), out this cell's dL/dc times its own f; cl: the previous
// cell's c. dz (4 hid): dL/dz, out.
template <typename T>
inline void cell_backward(const T* __restrict s, const T* __restrict dh, const T* __restrict gc,
                          T* __restrict carry, const T* __restrict cl, T* __restrict dz, int64_t hid) {
  const T* __restrict si = s;
  const T* __restrict sf = s + hid;
  const T* __restrict so = s + 2 * hid;
  const T* __restrict sg = s + 3 * hid;
  const T* __restrict sc = s + 4 * hid;
  T* __restrict di = dz;
  T* __restrict df = dz + hid;
  T* __restrict dout = dz + 2 * hid;
  T* __restrict dg = dz + 3 * hid;
  for (int64_t k = 0; k < hid; ++k) {
    const T tc = tanh_(sc[k]);
    const T dC = gc[k] + dh[k] * so[k] * (T(1) - tc * tc) + carry[k];
    di[k] = dC * sg[k] * si[k] * (T(1) - si[k]);
    df[k] = dC * cl[k] * sf[k] * (T(1) - sf[k]);
    dout[k] = dh[k] * tc * so[k] * (T(1) - so[k]);
    dg[k] = dC * si[k] * (T(1) - sg[k] * sg[k]);
    carry[k] = dC * sf[k];
  }
}

// A run of n cell rows (row r of each operand at base + r * its ld; ld 0 repeats one row).
template <typename T>
__attribute__((always_inline)) inline void rows_forward_impl(int64_t n, T* z, int64_t ldz, const T* bias, const T* cl,
                                                             int64_t ldcl, T* c, int64_t ldc, T* h, int64_t ldh,
                                                             int64_t hid) {
  for (int64_t r = 0; r < n; ++r) cell_forward<T>(z + r * ldz, bias, cl + r * ldcl, c + r * ldc, h + r * ldh, hid);
}
template <typename T>
__attribute__((always_inline)) inline void rows_backward_impl(int64_t n, const T* s, int64_t lds, const T* dh,
                                                              int64_t lddh, const T* gc, int64_t ldgc, T* carry,
                                                              int64_t ldcy, const T* cl, int64_t ldcl, T* dz,
                                                              int64_t lddz, int64_t hid) {
  for (int64_t r = 0; r < n; ++r)
    cell_backward<T>(s + r * lds, dh + r * lddh, gc + r * ldgc, carry + r * ldcy, cl + r * ldcl, dz + r * lddz, hid);
}

// float32 is compiled for AVX-512 / AVX2 too and picked at load time (the extension's baseline is
// SSE2; the gates are most of the work that is not GEMM).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAR_SCAN_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FASTAR_SCAN_CLONES
#endif
FASTAR_SCAN_CLONES void rows_forward_f32(int64_t n, float* z, int64_t ldz, const float* bias, const float* cl,
                                         int64_t ldcl, float* c, int64_t ldc, float* h, int64_t ldh, int64_t hid) {
  rows_forward_impl<float>(n, z, ldz, bias, cl, ldcl, c, ldc, h, ldh, hid);
}
FASTAR_SCAN_CLONES void rows_backward_f32(int64_t n, const float* s, int64_t lds, const float* dh, int64_t lddh,
                                          const float* gc, int64_t ldgc, float* carry, int64_t ldcy, const float* cl,
                                          int64_t ldcl, float* dz, int64_t lddz, int64_t hid) {
  rows_backward_impl<float>(n, s, lds, dh, lddh, gc, ldgc, carry, ldcy, cl, ldcl, dz, lddz, hid);
}
inline void rows_forward(int64_t n, float* z, int64_t ldz, const float* bias, const float* cl, int64_t ldcl, float* c,
                         int64_t ldc, float* h, int64_t ldh, int64_t hid) {
  rows_forward_f32(n, z, ldz, bias, cl, ldcl, c, ldc, h, ldh, hid);
}
inline void rows_forward(int64_t n, double* z, int64_t ldz, const double* bias, const double* cl, int64_t ldcl,
                         double* c, int64_t ldc, double* h, int64_t ldh, int64_t hid) {
  rows_forward_impl<double>(n, z, ldz, bias, cl, ldcl, c, ldc, h, ldh, hid);
}
inline void rows_backward(int64_t n, const float* s, int64_t lds, const float* dh, int64_t lddh, const float* gc,
                          int64_t ldgc, float* carry, int64_t ldcy, const float* cl, int64_t ldcl, float* dz,
                          int64_t lddz, int64_t hid) {
  rows_backward_f32(n, s, lds, dh, lddh, gc, ldgc, carry, ldcy, cl, ldcl, dz, lddz, hid);
}
inline void rows_backward(int64_t n, const double* s, int64_t lds, const double* dh, int64_t lddh, const double* gc,
                          int64_t ldgc, double* carry, int64_t ldcy, const double* cl, int64_t ldcl, double* dz,
                          int64_t lddz, int64_t hid) {
  rows_backward_impl<double>(n, s, lds, dh, lddh, gc, ldgc, carry, ldcy, cl, ldcl, dz, lddz, hid);
}

// ------------------------------------------------------------------------------------ BLAS on rows

// The Fortran BLAS that libtorch_cpu exports (MKL, LP64); at::native::cpublas is not exported to
// extensions. Called from inside at::parallel_for chunks it runs single-threaded there. Declared
// weak: a torch whose libtorch_cpu does not export them still loads this library, and mm_rows then
// goes through at::mm_out / at::addmm_out on views of the same memory (same results, a little
// dispatch overhead per call).
extern "C" {
__attribute__((weak)) void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
__attribute__((weak)) void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// FASTAR_LSTM_SCAN_ATEN_GEMM=1 forces the ATen path (tests run it, so the fallback is known to work).
inline bool aten_gemm_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("FASTAR_LSTM_SCAN_ATEN_GEMM");
    return v != nullptr && v[0] == '1';
  }();
  return forced;
}
inline bool have_blas(float*) { return sgemm_ != nullptr && !aten_gemm_forced(); }
inline bool have_blas(double*) { return dgemm_ != nullptr && !aten_gemm_forced(); }

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                      int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C (M, N; ldc) = beta * C + op(A) @ op(Bm); op(A) (M, K): A stored (M, K; lda), or
// (K, M; lda) when ta; op(Bm) (K, N): Bm stored (K, N; ldb), or (N, K; ldb) when tb.
template <typename T>
inline void mm_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, bool ta, const T* Bm, int64_t ldb,
                    bool tb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (beta == T(0))
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  if (!have_blas(static_cast<T*>(nullptr))) {
    const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opt).t()
                      : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
    at::Tensor b = tb ? at::from_blob(const_cast<T*>(Bm), {N, K}, {ldb, 1}, opt).t()
                      : at::from_blob(const_cast<T*>(Bm), {K, N}, {ldb, 1}, opt);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
    if (beta == T(0)) {
      at::mm_out(c, a, b);
    } else {
      at::Tensor prod = at::mm(a, b);
      c.mul_(beta).add_(prod);
    }
    return;
  }
  TORCH_CHECK(std::max({M, N, K, lda, ldb, ldc}) < (int64_t{1} << 31), "lstm_scan: a GEMM dimension exceeds the 32-bit BLAS interface");
  // Column-major view: C^T (N, M) = op(Bm)^T @ op(A)^T.
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), T(1), Bm,
            static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(ldc));
}

// --------------------------------------------------------------------- NCHW <-> row-layout copies

constexpr int64_t kTile = 16;

// NCHW <-> cell rows, in tasks of (b, 16 channels, image row): the gather reads 16 planes' row
// segments (in L1 over the j loop) and writes whole 16-channel pieces of cell rows; the scatter
// goes through a 16 x 16 tile (full-line reads of cell rows, full-line writes of plane rows).
// (Measured on the 2-core box: this pairing beat the tile gather by 2x, and the plain scatter.)

// dst[(rb[i * W + j] + b) * ldd + c] = src[b, c, i, j] for c < nch (src: any strides).
template <typename T>
void gather_cells(const T* src, int64_t sb, int64_t sc, int64_t si, int64_t sj, int64_t nch, const int64_t* rb,
                  int64_t B, int64_t H, int64_t W, T* dst, int64_t ldd) {
  const int64_t ncb = (nch + kTile - 1) / kTile;
  at::parallel_for(0, B * ncb * H, std::max<int64_t>(1, 32768 / (kTile * W)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t % H, cb = (t / H) % ncb, b = t / (H * ncb);
      const int64_t c0 = cb * kTile, c1 = std::min(nch, c0 + kTile);
      const T* s = src + b * sb + i * si;
      for (int64_t j = 0; j < W; ++j) {
        T* d = dst + (rb[i * W + j] + b) * ldd;
        const T* sj_ = s + j * sj;
        for (int64_t c = c0; c < c1; ++c) d[c] = sj_[c * sc];
      }
    }
  });
}

// dst[b, dc0 + c, i, j] (contiguous, dstC channels) = src[(rb[i * W + j] + b) * lds + c] for c < nch.
template <typename T>
void scatter_cells(const T* src, int64_t lds, int64_t nch, const int64_t* rb, int64_t B, int64_t H, int64_t W, T* dst,
                   int64_t dstC, int64_t dc0) {
  const int64_t ncb = (nch + kTile - 1) / kTile;
  const int64_t HW = H * W;
  at::parallel_for(0, B * ncb * H, std::max<int64_t>(1, 32768 / (kTile * W)), [&](int64_t t0, int64_t t1) {
    T tile[kTile][kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t % H, cb = (t / H) % ncb, b = t / (H * ncb);
      const int64_t c0 = cb * kTile, nc = std::min(nch - c0, kTile);
      T* d = dst + (b * dstC + dc0 + c0) * HW + i * W;
      for (int64_t j0 = 0; j0 < W; j0 += kTile) {
        const int64_t nj = std::min(W - j0, kTile);
        for (int64_t jj = 0; jj < nj; ++jj) {
          const T* sr = src + (rb[i * W + j0 + jj] + b) * lds + c0;
          for (int64_t cc = 0; cc < nc; ++cc) tile[cc][jj] = sr[cc];
        }
        for (int64_t cc = 0; cc < nc; ++cc) {
          T* dr = d + cc * HW + j0;
          for (int64_t jj = 0; jj < nj; ++jj) dr[jj] = tile[cc][jj];
        }
      }
    }
  });
}

// A step's rows split into chunks for at::parallel_for: single-threaded when the step is too small
// for the barrier to pay (~0.25 M multiply-adds), else about one chunk per thread.
inline int64_t step_grain(int64_t M, int64_t macs_per_row) {
  const int64_t min_rows = std::max<int64_t>(4, (int64_t{1} << 18) / std::max<int64_t>(macs_per_row, 1));
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  return std::max(min_rows, (M + nt - 1) / nt);
}

// ------------------------------------------------------------------------------- diagonal geometry

// The (H + 2) x (W + 2) grid (image cell (i, j) at grid (i + 1, j + 1)) stored diagonal by diagonal:
// grid cell (gi, gj), batch b, is row off[e] + (gi - lo[e]) * B + b with e = gi + gj.
struct DiagGrid {
  int64_t H, W, B, rows = 0;
  std::vector<int64_t> off, lo;
  DiagGrid(int64_t H_, int64_t W_, int64_t B_) : H(H_), W(W_), B(B_) {
    const int64_t GH = H + 2, GW = W + 2, ne = GH + GW - 1;
    off.resize(ne);
    lo.resize(ne);
    for (int64_t e = 0; e < ne; ++e) {
      lo[e] = std::max<int64_t>(0, e - (GW - 1));
      const int64_t hi = std::min<int64_t>(GH - 1, e);
      off[e] = rows;
      rows += (hi - lo[e] + 1) * B;
    }
  }
  int64_t row(int64_t gi, int64_t gj) const { return off[gi + gj] + (gi - lo[gi + gj]) * B; }
  // The image cells of diagonal e (2 <= e <= H + W) are grid rows gi = first(e) .. last(e).
  int64_t first(int64_t e) const { return std::max<int64_t>(1, e - W); }
  int64_t last(int64_t e) const { return std::min<int64_t>(H, e - 1); }
  std::vector<int64_t> image_rows() const {
    std::vector<int64_t> rb(H * W);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) rb[i * W + j] = row(i + 1, j + 1);
    return rb;
  }
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// w_ss (4h, h, K) -> (K, h, 4h) contiguous: wt[t] = w_ss[:, :, t]^T, the (hid, 4 hid) right operand
// of the forward GEMMs; its (4 hid, hid) transpose view is the backward's.
at::Tensor pack_taps(const at::Tensor& w_ss) { return w_ss.permute({2, 1, 0}).contiguous(); }

template <typename T>
void diag_forward_impl(const ScanShape& s, const at::Tensor& is_map, const at::Tensor& w_ss, const at::Tensor& bias,
                       const at::Tensor& h0, const at::Tensor& c0, at::Tensor& h, at::Tensor& c, at::Tensor& saved) {
  const int64_t B = s.B, H = s.H, W = s.W, hid = s.hid, G4 = 4 * hid;
  const DiagGrid g(H, W, B);
  const auto rb = g.image_rows();
  auto opts = is_map.options().memory_format(at::MemoryFormat::Contiguous);
  auto Z = at::empty({g.rows, G4}, opts);  // input-to-state, then pre-activations, then activations
  auto Hs = at::empty({g.rows, hid}, opts);
  auto Cs = at::empty({g.rows, hid}, opts);
  T* z = Z.data_ptr<T>();
  T* hs = Hs.data_ptr<T>();
  T* cs = Cs.data_ptr<T>();
  gather_cells<T>(is_map.data_ptr<T>(), is_map.stride(0), is_map.stride(1), is_map.stride(2), is_map.stride(3), G4,
                  rb.data(), B, H, W, z, G4);
  // Border: the row above the image is zero; the column left of it holds h0 / c0.
  const T* h0p = ptr_or_null<T>(h0);
  const T* c0p = ptr_or_null<T>(c0);
  for (int64_t gj = 1; gj <= W; ++gj) std::fill(hs + g.row(0, gj) * hid, hs + (g.row(0, gj) + B) * hid, T(0));
  for (int64_t gi = 1; gi <= H; ++gi)
    for (int64_t b = 0; b < B; ++b) {
      T* hr = hs + (g.row(gi, 0) + b) * hid;
      T* cr = cs + (g.row(gi, 0) + b) * hid;
      for (int64_t k = 0; k < hid; ++k) {
        hr[k] = h0p ? h0p[(b * hid + k) * H + gi - 1] : T(0);
        cr[k] = c0p ? c0p[(b * hid + k) * H + gi - 1] : T(0);
      }
    }
  const auto wt = pack_taps(w_ss);
  const T* w_up = wt.data_ptr<T>();
  const T* w_left = w_up + hid * G4;
  std::vector<T> zero_bias;
  const T* bp = ptr_or_null<T>(bias);
  if (!bp) {
    zero_bias.assign(G4, T(0));
    bp = zero_bias.data();
  }
  for (int64_t e = 2; e <= H + W; ++e) {
    const int64_t a = g.first(e), n = g.last(e) - a + 1, M = n * B;
    const int64_t zr = g.row(a, e - a), ur = g.row(a - 1, e - a), lr = g.row(a, e - 1 - a);
    at::parallel_for(0, M, step_grain(M, 2 * hid * G4), [&](int64_t r0, int64_t r1) {
      const int64_t m = r1 - r0;
      mm_rows<T>(m, G4, hid, hs + (ur + r0) * hid, hid, false, w_up, G4, false, T(1), z + (zr + r0) * G4, G4);
      mm_rows<T>(m, G4, hid, hs + (lr + r0) * hid, hid, false, w_left, G4, false, T(1), z + (zr + r0) * G4, G4);
      rows_forward(m, z + (zr + r0) * G4, G4, bp, cs + (lr + r0) * hid, hid, cs + (zr + r0) * hid, hid,
                   hs + (zr + r0) * hid, hid, hid);
    });
  }
  scatter_cells<T>(hs, hid, hid, rb.data(), B, H, W, h.data_ptr<T>(), hid, 0);
  scatter_cells<T>(cs, hid, hid, rb.data(), B, H, W, c.data_ptr<T>(), hid, 0);
  scatter_cells<T>(z, G4, G4, rb.data(), B, H, W, saved.data_ptr<T>(), 5 * hid, 0);
  scatter_cells<T>(cs, hid, hid, rb.data(), B, H, W, saved.data_ptr<T>(), 5 * hid, G4);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diagonal_lstm_scan_cpu(const at::Tensor& is_map,
                                                                      const at::Tensor& w_ss,
                                                                      const c10::optional<at::Tensor>& bias,
                                                                      const c10::optional<at::Tensor>& h0,
                                                                      const c10::optional<at::Tensor>& c0) {
  const char* op = "diagonal_lstm_scan";
  const auto s = check_lstm_scan(op, is_map, w_ss, bias, 2, h0, c0);
  check_cpu_dtype(op, is_map);
  auto opts = is_map.options().memory_format(at::MemoryFormat::Contiguous);
  auto h = at::empty({s.B, s.hid, s.H, s.W}, opts);
  auto c = at::empty({s.B, s.hid, s.H, s.W}, opts);
  auto saved = at::empty({s.B, 5 * s.hid, s.H, s.W}, opts);
  if (h.numel() == 0) return {h, c, saved};
  const auto bc = scan_has(bias) ? bias->contiguous() : at::Tensor();
  const auto h0c = scan_has(h0) ? h0->contiguous() : at::Tensor();
  const auto c0c = scan_has(c0) ? c0->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(is_map.scalar_type(), "diagonal_lstm_scan_cpu", [&] {
    diag_forward_impl<scalar_t>(s, is_map, w_ss, bc, h0c, c0c, h, c, saved);
  });
  return {h, c, saved};
}

// Checks of the backward's extra inputs: grad_h, grad_c, h, c (B, h, H, W) and saved (B, 5h, H, W).
void check_scan_backward(const char* op, const ScanShape& s, const at::Tensor& is_map, const at::Tensor& grad_h,
                         const at::Tensor& grad_c, const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved) {
  const char* names[5] = {"grad_h", "grad_c", "h", "c", "saved"};
  const at::Tensor* ts[5] = {&grad_h, &grad_c, &h, &c, &saved};
  for (int k = 0; k < 5; ++k) {
    const int64_t ch = k == 4 ? 5 * s.hid : s.hid;
    const at::Tensor& t = *ts[k];
    TORCH_CHECK(t.dim() == 4 && t.size(0) == s.B && t.size(1) == ch && t.size(2) == s.H && t.size(3) == s.W, op, ": ",
                names[k], " must be [", s.B, ", ", ch, ", ", s.H, ", ", s.W, "], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == is_map.scalar_type(), op, ": ", names[k], " dtype ", t.scalar_type(),
                " must match is_map dtype ", is_map.scalar_type());
    TORCH_CHECK(t.device() == is_map.device(), op, ": ", names[k], " must be on ", is_map.device(), ", got ",
                t.device());
  }
}

template <typename T>
void gather_nchw(const at::Tensor& t, int64_t nch, const std::vector<int64_t>& rb, int64_t B, int64_t H, int64_t W,
                 T* dst, int64_t ldd) {
  gather_cells<T>(t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), nch, rb.data(), B, H, W, dst,
                  ldd);
}

struct ScanGrads {
  at::Tensor d_is, d_w, d_bias, d_h0, d_c0;
};

template <typename T>
void diag_backward_impl(const ScanShape& s, const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& w_ss,
                        const at::Tensor& h, const at::Tensor& saved, const at::Tensor& h0, const at::Tensor& c0,
                        const std::array<bool, 5>& mask, ScanGrads& out) {
  const int64_t B = s.B, H = s.H, W = s.W, hid = s.hid, G4 = 4 * hid, G5 = 5 * hid;
  const DiagGrid g(H, W, B);
  const auto rb = g.image_rows();
  auto opts = saved.options().memory_format(at::MemoryFormat::Contiguous);
  auto S = at::empty({g.rows, G5}, opts);
  auto GH = at::empty({g.rows, hid}, opts);  // grad_h, then + the gradient from the cells fed
  auto GC = at::empty({g.rows, hid}, opts);
  auto DZ = at::empty({g.rows, G4}, opts);
  auto carry = at::zeros({H, B, hid}, opts);  // per image row: f * dL/dc of the cell to the right
  T* sp = S.data_ptr<T>();
  T* ghp = GH.data_ptr<T>();
  T* gcp = GC.data_ptr<T>();
  T* dz = DZ.data_ptr<T>();
  T* cy = carry.data_ptr<T>();
  gather_nchw<T>(saved, G5, rb, B, H, W, sp, G5);
  gather_nchw<T>(grad_h, hid, rb, B, H, W, ghp, hid);
  gather_nchw<T>(grad_c, hid, rb, B, H, W, gcp, hid);
  const T* h0p = ptr_or_null<T>(h0);
  const T* c0p = ptr_or_null<T>(c0);
  for (int64_t gi = 1; gi <= H; ++gi)
    for (int64_t b = 0; b < B; ++b) {
      T* cr = sp + (g.row(gi, 0) + b) * G5 + G4;  // the left border's c: c0
      for (int64_t k = 0; k < hid; ++k) cr[k] = c0p ? c0p[(b * hid + k) * H + gi - 1] : T(0);
    }
  // The cells below the image and right of it feed nothing back: their dz rows are zero.
  for (int64_t gj = 1; gj <= W; ++gj)
    std::fill(dz + g.row(H + 1, gj) * G4, dz + (g.row(H + 1, gj) + B) * G4, T(0));
  for (int64_t gi = 1; gi <= H; ++gi)
    std::fill(dz + g.row(gi, W + 1) * G4, dz + (g.row(gi, W + 1) + B) * G4, T(0));
  const auto wt = pack_taps(w_ss);  // (2, h, 4h); the backward uses each tap's transpose
  const T* w_up = wt.data_ptr<T>();
  const T* w_left = w_up + hid * G4;
  for (int64_t e = H + W; e >= 2; --e) {
    const int64_t a = g.first(e), n = g.last(e) - a + 1, M = n * B;
    const int64_t zr = g.row(a, e - a), dr = g.row(a + 1, e - a), rr = g.row(a, e + 1 - a);
    const int64_t lr = g.row(a, e - 1 - a);
    at::parallel_for(0, M, step_grain(M, 2 * hid * G4), [&](int64_t r0, int64_t r1) {
      const int64_t m = r1 - r0;
      // dL/dh += W_up^T dz(below) + W_left^T dz(right): (m, 4h) @ (4h, h), the (h, 4h) taps transposed.
      mm_rows<T>(m, hid, G4, dz + (dr + r0) * G4, G4, false, w_up, G4, true, T(1), ghp + (zr + r0) * hid, hid);
      mm_rows<T>(m, hid, G4, dz + (rr + r0) * G4, G4, false, w_left, G4, true, T(1), ghp + (zr + r0) * hid, hid);
      // The carry of image row gi - 1, batch b is row (gi - 1) * B + b = (a - 1) * B + r.
      rows_backward(m, sp + (zr + r0) * G5, G5, ghp + (zr + r0) * hid, hid, gcp + (zr + r0) * hid, hid,
                    cy + ((a - 1) * B + r0) * hid, hid, sp + (lr + r0) * G5 + G4, G5, dz + (zr + r0) * G4, G4, hid);
    });
  }
  if (mask[0]) {
    out.d_is = at::empty({B, G4, H, W}, opts);
    scatter_cells<T>(dz, G4, G4, rb.data(), B, H, W, out.d_is.data_ptr<T>(), G4, 0);
  }
  if (mask[1]) {
    // d_w[:, :, 0] = sum dz(i, j) h(i - 1, j)^T, d_w[:, :, 1] = sum dz(i, j) h(i, j - 1)^T: per diagonal,
    // the rows above / to the left on diagonal e - 1 of the state grid rebuilt from h (zero row on
    // top, h0 on the left).
    auto Hs = at::empty({g.rows, hid}, opts);
    T* hs = Hs.data_ptr<T>();
    gather_nchw<T>(h, hid, rb, B, H, W, hs, hid);
    for (int64_t gj = 1; gj <= W; ++gj) std::fill(hs + g.row(0, gj) * hid, hs + (g.row(0, gj) + B) * hid, T(0));
    for (int64_t gi = 1; gi <= H; ++gi)
      for (int64_t b = 0; b < B; ++b) {
        T* hr = hs + (g.row(gi, 0) + b) * hid;
        for (int64_t k = 0; k < hid; ++k) hr[k] = h0p ? h0p[(b * hid + k) * H + gi - 1] : T(0);
      }
    auto dw = at::zeros({2, G4, hid}, opts);
    T* dwp = dw.data_ptr<T>();
    for (int64_t e = 2; e <= H + W; ++e) {
      const int64_t a = g.first(e), n = g.last(e) - a + 1, M = n * B;
      const int64_t zr = g.row(a, e - a), ur = g.row(a - 1, e - a), lr = g.row(a, e - 1 - a);
      mm_rows<T>(G4, hid, M, dz + zr * G4, G4, true, hs + ur * hid, hid, false, T(1), dwp, hid);
      mm_rows<T>(G4, hid, M, dz + zr * G4, G4, true, hs + lr * hid, hid, false, T(1), dwp + G4 * hid, hid);
    }
    out.d_w = dw.permute({1, 2, 0}).contiguous();
  }
  if (mask[2]) {
    // Column sums of the image cells' dz rows (each diagonal's rows are one contiguous block).
    auto db = at::zeros({G4}, opts);
    T* dbp = db.data_ptr<T>();
    for (int64_t e = 2; e <= H + W; ++e) {
      const int64_t a = g.first(e), M = (g.last(e) - a + 1) * B, zr = g.row(a, e - a);
      for (int64_t r = 0; r < M; ++r) {
        const T* d = dz + (zr + r) * G4;
        for (int64_t k = 0; k < G4; ++k) dbp[k] += d[k];
      }
    }
    out.d_bias = db;
  }
  if (mask[3]) {
    // d_h0[b, :, i] = W_left^T dz(i, 0): the cells (gi, 1) are B contiguous rows each.
    auto t = at::empty({H, B, hid}, opts);
    T* tp = t.data_ptr<T>();
    for (int64_t gi = 1; gi <= H; ++gi)
      mm_rows<T>(B, hid, G4, dz + g.row(gi, 1) * G4, G4, false, w_left, G4, true, T(0), tp + (gi - 1) * B * hid, hid);
    out.d_h0 = t.permute({1, 2, 0}).contiguous();
  }
  if (mask[4]) out.d_c0 = carry.permute({1, 2, 0}).contiguous();  // dL/dc(i, 0) * f(i, 0)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diagonal_lstm_scan_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& is_map, const at::Tensor& w_ss,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, std::array<bool, 5> output_mask) {
  const char* op = "diagonal_lstm_scan_backward";
  const auto s = check_lstm_scan(op, is_map, w_ss, c10::nullopt, 2, h0, c0);
  check_cpu_dtype(op, is_map);
  check_scan_backward(op, s, is_map, grad_h, grad_c, h, c, saved);
  ScanGrads out;
  const bool any = output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];
  if (any && s.B * s.H * s.W > 0) {
    const auto h0c = scan_has(h0) ? h0->contiguous() : at::Tensor();
    const auto c0c = scan_has(c0) ? c0->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(is_map.scalar_type(), "diagonal_lstm_scan_backward_cpu", [&] {
      diag_backward_impl<scalar_t>(s, grad_h, grad_c, w_ss, h, saved, h0c, c0c, output_mask, out);
    });
  }
  auto e = is_map.new_empty({0});
  auto pick = [&](bool need, at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like) {
    if (!need) return e;
    return t.defined() ? t : at::zeros(shape, like.options());
  };
  return {pick(output_mask[0], out.d_is, is_map.sizes(), is_map), pick(output_mask[1], out.d_w, w_ss.sizes(), w_ss),
          pick(output_mask[2], out.d_bias, {w_ss.size(0)}, w_ss), pick(output_mask[3], out.d_h0, {s.B, s.hid, s.H}, is_map),
          pick(output_mask[4], out.d_c0, {s.B, s.hid, s.H}, is_map)};
}

// ------------------------------------------------------------------------------------ Row LSTM
//
// Fused per image row: a row's cells are W contiguous columns of every NCHW plane, so each chunk of
// columns reads its input-to-state / gradients straight from NCHW and writes its outputs back there
// (a small transpose through cache), and the per-row buffers stay cache-resident: no full-size
// intermediate is ever written. Rows of a step are (j, b), batch innermost; the state of the
// previous row is kept on a zero-bordered strip of W + K - 1 columns (column j at j + P, P = K / 2),
// so tap t of the cells j0 .. j1 reads strip rows (j0 + t) * B .. (j1 + t) * B.

// dst[((j - j0) * B + b) * ldd + c] = src[b, c, i, j] for j in [j0, j1), c < nch (src: any strides).
template <typename T>
inline void load_cols(const T* src, int64_t sb, int64_t sc, int64_t si, int64_t sj, int64_t i, int64_t j0,
                      int64_t j1, int64_t nch, int64_t B, T* dst, int64_t ldd) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c0 = 0; c0 < nch; c0 += kTile) {
      const int64_t c1 = std::min(nch, c0 + kTile);
      const T* s = src + b * sb + i * si;
      for (int64_t j = j0; j < j1; ++j) {
        T* d = dst + ((j - j0) * B + b) * ldd;
        const T* sj_ = s + j * sj;
        for (int64_t c = c0; c < c1; ++c) d[c] = sj_[c * sc];
      }
    }
}

// dst[b, dc0 + c, i, j] (contiguous, dstC channels, H x W) = src[((j - j0) * B + b) * lds + c].
// (Measured: a per-plane walk like this beats a 16 x 32 tile through a local buffer here.)
template <typename T>
inline void store_cols(const T* src, int64_t lds, int64_t nch, int64_t i, int64_t j0, int64_t j1, int64_t B,
                       int64_t H, int64_t W, T* dst, int64_t dstC, int64_t dc0) {
  const int64_t HW = H * W;
  for (int64_t b = 0; b < B; ++b) {
    T* d = dst + (b * dstC + dc0) * HW + i * W;
    for (int64_t c = 0; c < nch; ++c) {
      T* dr = d + c * HW;
      const T* sr = src + b * lds + c;
      for (int64_t j = j0; j < j1; ++j) dr[j] = sr[(j - j0) * B * lds];
    }
  }
}

// Column chunks of a row: about one per thread, single-threaded when a row is too small to split.
inline int64_t col_grain(int64_t W, int64_t B, int64_t macs_per_row) {
  const int64_t min_cols = std::max<int64_t>(1, ((int64_t{1} << 18) / std::max<int64_t>(macs_per_row, 1) + B - 1) / B);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  return std::max(min_cols, (W + nt - 1) / nt);
}

template <typename T>
void row_forward_impl(const ScanShape& s, const at::Tensor& is_map, const at::Tensor& w_ss, const at::Tensor& bias,
                      at::Tensor& h, at::Tensor& c, at::Tensor& saved) {
  const int64_t B = s.B, H = s.H, W = s.W, hid = s.hid, G4 = 4 * hid, G5 = 5 * hid, K = s.K, P = K / 2;
  const int64_t Wp = W + K - 1, M = W * B;
  auto opts = is_map.options().memory_format(at::MemoryFormat::Contiguous);
  auto Z = at::empty({M, G4}, opts);                // the row's pre-activations, then activations
  auto Cs = at::empty({2, M, hid}, opts);           // c of the previous / this row
  auto Hs = at::zeros({2, Wp * B, hid}, opts);      // h of the previous / this row, zero border
  T* z = Z.data_ptr<T>();
  T* cs = Cs.data_ptr<T>();
  T* hs = Hs.data_ptr<T>();
  const T* xp = is_map.data_ptr<T>();
  const int64_t sb = is_map.stride(0), sc = is_map.stride(1), si = is_map.stride(2), sj = is_map.stride(3);
  T* hp = h.data_ptr<T>();
  T* cp = c.data_ptr<T>();
  T* svp = saved.numel() ? saved.data_ptr<T>() : nullptr;
  const auto wt = pack_taps(w_ss);  // (K, h, 4h)
  const T* wp = wt.data_ptr<T>();
  std::vector<T> zeros(G4, T(0));
  const T* bp = bias.defined() ? bias.data_ptr<T>() : zeros.data();
  const int64_t grain = col_grain(W, B, K * hid * G4);
  for (int64_t i = 0; i < H; ++i) {
    const T* hprev = hs + (i % 2) * Wp * B * hid;
    T* hcur = hs + ((i + 1) % 2) * Wp * B * hid;
    const T* cprev = cs + (i % 2) * M * hid;
    T* ccur = cs + ((i + 1) % 2) * M * hid;
    at::parallel_for(0, W, grain, [&](int64_t j0, int64_t j1) {
      const int64_t r0 = j0 * B, m = (j1 - j0) * B;
      T* zc = z + r0 * G4;
      load_cols<T>(xp, sb, sc, si, sj, i, j0, j1, G4, B, zc, G4);
      if (i > 0)
        for (int64_t t = 0; t < K; ++t)
          mm_rows<T>(m, G4, hid, hprev + (r0 + t * B) * hid, hid, false, wp + t * hid * G4, G4, false, T(1), zc, G4);
      rows_forward(m, zc, G4, bp, i > 0 ? cprev + r0 * hid : zeros.data(), i > 0 ? hid : 0, ccur + r0 * hid, hid,
                   hcur + (r0 + P * B) * hid, hid, hid);
      store_cols<T>(hcur + (r0 + P * B) * hid, hid, hid, i, j0, j1, B, H, W, hp, hid, 0);
      store_cols<T>(ccur + r0 * hid, hid, hid, i, j0, j1, B, H, W, cp, hid, 0);
      if (svp) {
        store_cols<T>(zc, G4, G4, i, j0, j1, B, H, W, svp, G5, 0);
        store_cols<T>(ccur + r0 * hid, hid, hid, i, j0, j1, B, H, W, svp, G5, G4);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_lstm_scan_cpu(const at::Tensor& is_map, const at::Tensor& w_ss,
                                                                 const c10::optional<at::Tensor>& bias, bool save) {
  const char* op = "row_lstm_scan";
  const auto s = check_lstm_scan(op, is_map, w_ss, bias, -1);
  check_cpu_dtype(op, is_map);
  auto opts = is_map.options().memory_format(at::MemoryFormat::Contiguous);
  auto h = at::empty({s.B, s.hid, s.H, s.W}, opts);
  auto c = at::empty({s.B, s.hid, s.H, s.W}, opts);
  // save=False (no gradient wanted): the 5h activations per cell, 5/7 of what the forward writes,
  // are not written at all.
  auto saved = save ? at::empty({s.B, 5 * s.hid, s.H, s.W}, opts) : at::empty({0}, opts);
  if (h.numel() == 0) return {h, c, saved};
  const auto bc = scan_has(bias) ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(is_map.scalar_type(), "row_lstm_scan_cpu",
                             [&] { row_forward_impl<scalar_t>(s, is_map, w_ss, bc, h, c, saved); });
  return {h, c, saved};
}

template <typename T>
void row_backward_impl(const ScanShape& s, const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& w_ss,
                       const at::Tensor& h, const at::Tensor& saved, const std::array<bool, 3>& mask, ScanGrads& out) {
  const int64_t B = s.B, H = s.H, W = s.W, hid = s.hid, G4 = 4 * hid, G5 = 5 * hid, K = s.K, P = K / 2;
  const int64_t Wp = W + K - 1, M = W * B;
  auto opts = saved.options().memory_format(at::MemoryFormat::Contiguous);
  auto S = at::empty({M, G5}, opts);                // saved of this row
  auto CL = at::empty({M, hid}, opts);              // c of the row above
  auto GH = at::empty({M, hid}, opts);              // grad_h, + the gradient from the row below
  auto GC = at::empty({M, hid}, opts);
  auto DZ = at::zeros({2, Wp * B, G4}, opts);       // dz of the row below / this row, zero border
  auto carry = at::zeros({M, hid}, opts);           // per column: f * dL/dc of the cell below
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const bool need_w = mask[1], need_b = mask[2];
  auto DW = need_w ? at::zeros({nt, K, G4, hid}, opts) : at::Tensor();  // per-thread partial sums
  auto DB = need_b ? at::zeros({nt, G4}, opts) : at::Tensor();
  const int64_t grain = col_grain(W, B, K * hid * G4);
  // Each thread's window of the row above (for d_w): its columns and P more on each side.
  auto HL = need_w ? at::empty({nt, (W + K - 1) * B, hid}, opts) : at::Tensor();
  if (mask[0]) out.d_is = at::empty({B, G4, H, W}, opts);
  T* sp = S.data_ptr<T>();
  T* clp = CL.data_ptr<T>();
  T* ghp = GH.data_ptr<T>();
  T* gcp = GC.data_ptr<T>();
  T* dzp = DZ.data_ptr<T>();
  T* cy = carry.data_ptr<T>();
  const auto wt = pack_taps(w_ss);  // (K, h, 4h)
  const T* wp = wt.data_ptr<T>();
  std::vector<T> zeros(hid, T(0));
  for (int64_t i = H - 1; i >= 0; --i) {
    const T* dnext = dzp + ((i + 1) % 2) * Wp * B * G4;
    T* dcur = dzp + (i % 2) * Wp * B * G4;
    at::parallel_for(0, W, grain, [&](int64_t j0, int64_t j1) {
      const int64_t r0 = j0 * B, m = (j1 - j0) * B;
      const int64_t tid = at::get_thread_num() % nt;
      load_cols<T>(saved.data_ptr<T>(), saved.stride(0), saved.stride(1), saved.stride(2), saved.stride(3), i, j0, j1,
                   G5, B, sp + r0 * G5, G5);
      if (i > 0)
        load_cols<T>(saved.data_ptr<T>() + G4 * saved.stride(1), saved.stride(0), saved.stride(1), saved.stride(2),
                     saved.stride(3), i - 1, j0, j1, hid, B, clp + r0 * hid, hid);
      load_cols<T>(grad_h.data_ptr<T>(), grad_h.stride(0), grad_h.stride(1), grad_h.stride(2), grad_h.stride(3), i, j0,
                   j1, hid, B, ghp + r0 * hid, hid);
      load_cols<T>(grad_c.data_ptr<T>(), grad_c.stride(0), grad_c.stride(1), grad_c.stride(2), grad_c.stride(3), i, j0,
                   j1, hid, B, gcp + r0 * hid, hid);
      // dL/dh(i, j) += sum_t W_t^T dz(i + 1, j - t + P): strip rows (j - t + 2P) * B. Only the columns
      // whose cell j - t + P lies in the image: the zero border times an inf or NaN weight would be
      // NaN where no cell reads it (the reference's convolution gradient has no such term).
      if (i + 1 < H)
        for (int64_t t = 0; t < K; ++t) {
          const int64_t ja = std::max(j0, t - P), jb = std::min(j1, W + t - P);
          if (jb <= ja) continue;
          mm_rows<T>((jb - ja) * B, hid, G4, dnext + (ja * B + (2 * P - t) * B) * G4, G4, false, wp + t * hid * G4, G4,
                     true, T(1), ghp + ja * B * hid, hid);
        }
      T* dzc = dcur + (r0 + P * B) * G4;
      rows_backward(m, sp + r0 * G5, G5, ghp + r0 * hid, hid, gcp + r0 * hid, hid, cy + r0 * hid, hid,
                    i > 0 ? clp + r0 * hid : zeros.data(), i > 0 ? hid : 0, dzc, G4, hid);
      if (mask[0]) store_cols<T>(dzc, G4, G4, i, j0, j1, B, H, W, out.d_is.data_ptr<T>(), G4, 0);
      if (need_b) {
        T* db = DB.data_ptr<T>() + tid * G4;
        for (int64_t r = 0; r < m; ++r) {
          const T* dr = dzc + r * G4;
          for (int64_t k = 0; k < G4; ++k) db[k] += dr[k];
        }
      }
      if (need_w && i > 0) {
        // d_w[:, :, t] += dz(i, j)^T h(i - 1, j + t - P): the window of the row above, columns
        // j0 - P .. j1 + P - 1 (zero outside the image), as strip rows from (j0 - P + P) * B.
        T* hl = HL.data_ptr<T>() + tid * (W + K - 1) * B * hid;
        const int64_t q1 = j1 - j0 + K - 1;
        for (int64_t q = 0; q < q1; ++q) {
          const int64_t j = j0 + q - P;
          if (j < 0 || j >= W) std::fill(hl + q * B * hid, hl + (q + 1) * B * hid, T(0));
        }
        const int64_t lo = std::max<int64_t>(0, j0 - P), hi = std::min<int64_t>(W, j1 + P);
        load_cols<T>(h.data_ptr<T>(), h.stride(0), h.stride(1), h.stride(2), h.stride(3), i - 1, lo, hi, hid, B,
                     hl + (lo - (j0 - P)) * B * hid, hid);
        T* dw = DW.data_ptr<T>() + tid * K * G4 * hid;
        for (int64_t t = 0; t < K; ++t)
          mm_rows<T>(G4, hid, m, dzc, G4, true, hl + t * B * hid, hid, false, T(1), dw + t * G4 * hid, hid);
      }
    });
  }
  if (need_w) out.d_w = DW.sum(0).permute({1, 2, 0}).contiguous();
  if (need_b) out.d_bias = DB.sum(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_lstm_scan_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& is_map, const at::Tensor& w_ss,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& saved, std::array<bool, 3> output_mask) {
  const char* op = "row_lstm_scan_backward";
  const auto s = check_lstm_scan(op, is_map, w_ss, c10::nullopt, -1);
  check_cpu_dtype(op, is_map);
  check_scan_backward(op, s, is_map, grad_h, grad_c, h, c, saved);
  ScanGrads out;
  if ((output_mask[0] || output_mask[1] || output_mask[2]) && s.B * s.H * s.W > 0) {
    AT_DISPATCH_FLOATING_TYPES(is_map.scalar_type(), "row_lstm_scan_backward_cpu", [&] {
      row_backward_impl<scalar_t>(s, grad_h, grad_c, w_ss, h, saved, output_mask, out);
    });
  }
  auto e = is_map.new_empty({0});
  auto pick = [&](bool need, at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like) {
    if (!need) return e;
    return t.defined() ? t : at::zeros(shape, like.options());
  };
  return {pick(output_mask[0], out.d_is, is_map.sizes(), is_map), pick(output_mask[1], out.d_w, w_ss.sizes(), w_ss),
          pick(output_mask[2], out.d_bias, {w_ss.size(0)}, w_ss)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) {
  m.impl("skew", &skew_cpu);
  m.impl("unskew", &unskew_cpu);
  m.impl("diagonal_lstm_scan", &diagonal_lstm_scan_cpu);
  m.impl("diagonal_lstm_scan_backward", &diagonal_lstm_scan_backward_cpu);
  m.impl("row_lstm_scan", &row_lstm_scan_cpu);
  m.impl("row_lstm_scan_backward", &row_lstm_scan_backward_cpu);
}

}  // namespace fastar

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
