// PixelCNN++'s per-pixel step on CPU: every ul-stream entry that becomes final at pixel (i, j), over
// the three resolutions, and the output layer, in one call (fastar.ops.pixelcnnpp_ul_step; the
// reference twin is fastar.ops.pixelcnnpp_ul_step_ref, the same program run with torch ops).
//
// The cache (fastar/models/pixelcnnpp_cache.py) keeps every map zero-padded, (N, C, H + 1, W + 2),
// data (r, c) at (1 + r, 1 + c), and hands over a program: a list of instructions of PROGRAM_WIDTH
// int64 each, [kind, level, dst, src, mid, skip_a, skip_b, w1, b1, w2, b2, w3, b3, emb], map and
// weight indices into the two tensor lists (-1: none). An instruction of level L runs when i and j
// are multiples of 2**L, at (i >> L, j >> L):
//   INIT  (0): dst = down-shifted (1, 3) conv of the input row above + down-right (2, 1) conv of the
//              column to the left (each zero at the image edge): w1/b1, w2/b2;
//   BLOCK (1): a gated resnet block with (2, 2) down-right convolutions: h = w1 . concat_elu(window of
//              src) + b1 [+ w2 . concat_elu(cat(skip_a, skip_b) at the position) + b2]; mid = concat_elu(h)
//              at the position; o = w3 . window of mid + b3 [+ emb[n]]; dst = src + o[:F] * sigmoid(o[F:]);
//   DOWN  (2): a stride-2 (2, 2) down-right convolution of src: w1/b1;
//   UP    (3): the stride-2 (2, 2) transposed convolution of src at the position, written ahead into
//              the 2x2 block of dst it covers (cropped to dst): w1 (in, out * 4), b1;
//   OUT   (4): out[n] = w1 . elu(src at (i, j)) + b1.
// Weights are input-major, (in * kh * kw, out): the transpose of a flattened nn.Conv2d weight (kernel
// taps fastest, then channels, along the rows). float32 and float64; each example's dot products in the tensor's own type.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/gemv_panels.h"

namespace fastar {
namespace {

constexpr int64_t PROGRAM_WIDTH = 14;

inline int64_t H_of(const at::Tensor& m) { return m.size(2) - 1; }
enum Kind : int64_t { INIT = 0, BLOCK = 1, DOWN = 2, UP = 3, OUT = 4 };

template <typename T>
inline T elu(T x) { return x > T(0) ? x : std::expm1(x); }

template <typename T>
struct Map {
  T* p;
  int64_t C, Hp, Wp;
  inline T* at(int64_t n, int64_t c, int64_t y, int64_t x) const { return p + ((n * C + c) * Hp + y) * Wp + x; }
};

template <typename T>
struct Lin {
  const T* w;     // input-major (in, out): a GEMV reads whole rows, and the inner loop over the
  const T* b;     // outputs vectorises (independent sums, no reassociation needed)
  int64_t in, out;
  // y[o] = b[o] + sum_k x[k] w[k, o]: float32 on AVX2 + FMA (the GEMV tiles of wavenet_step) where
  // the CPU has them, else (and for float64) the plain loop; either way each output sums over k in order.
  // nb rows at once (x (nb, in), y (nb, out)): the weights stream once for the rows of a tile.
  inline void apply(const T* __restrict x, T* __restrict y, int64_t nb = 1) const {
    for (int64_t k = 0; k < nb * out; ++k) y[k] = 0;
#ifdef FASTAR_X86
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx2_fma()) {
        gemv_avx2(w, out, in, 0, out, x, in, y, out, nb);
        add_bias(y, nb);
        return;
      }
    }
#endif
    gemv_generic<T>(w, out, in, 0, out, x, in, y, out, nb);
    add_bias(y, nb);
  }

  inline void add_bias(T* y, int64_t nb) const {
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t o = 0; o < out; ++o) y[r * out + o] += b[o];
  }

  static bool has_avx2_fma() {
#ifdef FASTAR_X86
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return ok;
#else
    return false;
#endif
  }
};

template <typename T>
void run_program(std::vector<Map<T>>& maps, const std::vector<at::Tensor>& weights, at::IntArrayRef program,
                 int64_t i, int64_t j, T* out, int64_t out_width, int64_t N) {
  auto lin = [&](int64_t wi, int64_t bi) {
    const auto& w = weights[wi];
    return Lin<T>{w.data_ptr<T>(), weights[bi].data_ptr<T>(), w.size(0), w.size(1)};
  };
  const int64_t count = static_cast<int64_t>(program.size()) / PROGRAM_WIDTH;
  for (int64_t q = 0; q < count; ++q) {
    const int64_t* ins = program.data() + q * PROGRAM_WIDTH;
    const int64_t kind = ins[0], L = ins[1];
    const int64_t step = int64_t(1) << L;
    if (kind != INIT && kind != OUT && (i % step || j % step)) continue;
    const int64_t a = i >> L, b = j >> L;
    if (kind == INIT) {
      Map<T>& dst = maps[ins[2]];
      const Map<T>& x = maps[ins[3]];
      Lin<T> down = lin(ins[7], ins[8]), right = lin(ins[9], ins[10]);
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<T> win(std::max(down.in, right.in)), y(down.out), z(right.out);
        for (int64_t n = n0; n < n1; ++n) {
          std::fill(y.begin(), y.end(), T(0));
          if (i > 0) {                                   // the (1, 3) conv at (i - 1, j): padded row i, cols j..j+2
            for (int64_t c = 0; c < x.C; ++c)
              for (int64_t dx = 0; dx < 3; ++dx) win[c * 3 + dx] = *x.at(n, c, i, j + dx);
            down.apply(win.data(), y.data());
          }
          if (j > 0) {                                   // the (2, 1) conv at (i, j - 1): padded rows i..i+1, col j
            for (int64_t c = 0; c < x.C; ++c)
              for (int64_t dy = 0; dy < 2; ++dy) win[c * 2 + dy] = *x.at(n, c, i + dy, j);
            right.apply(win.data(), z.data());
            for (int64_t o = 0; o < right.out; ++o) y[o] += z[o];
          }
          for (int64_t o = 0; o < dst.C; ++o) *dst.at(n, o, 1 + i, 1 + j) = y[o];
        }
      });
    } else if (kind == BLOCK) {
      Map<T>& dst = maps[ins[2]];
      const Map<T>& src = maps[ins[3]];
      Map<T>& mid = maps[ins[4]];
      const int64_t F = src.C;
      Lin<T> cin = lin(ins[7], ins[8]), cout = lin(ins[11], ins[12]);
      const bool has_skip = ins[5] >= 0;
      Lin<T> skip = has_skip ? lin(ins[9], ins[10]) : Lin<T>{nullptr, nullptr, 0, 0};
      const T* emb = ins[13] >= 0 ? weights[ins[13]].data_ptr<T>() : nullptr;
      // The examples of a thread's share as one batch: gather every window, one GEMV per layer.
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        const int64_t nb = n1 - n0;
        std::vector<T> win(nb * std::max<int64_t>(cin.in, cout.in)), h(nb * F), s(nb * F),
            sk(nb * std::max<int64_t>(skip.in, 1)), o(nb * 2 * F);
        // conv_in over concat_elu of the 2x2 window of src: padded rows a..a+1, cols b..b+1
        for (int64_t r = 0; r < nb; ++r) {
          T* wr = win.data() + r * cin.in;
          for (int64_t c = 0; c < F; ++c)
            for (int64_t dy = 0; dy < 2; ++dy)
              for (int64_t dx = 0; dx < 2; ++dx) {
                const T v = *src.at(n0 + r, c, a + dy, b + dx);
                wr[c * 4 + dy * 2 + dx] = elu(v);
                wr[(F + c) * 4 + dy * 2 + dx] = elu(-v);
              }
        }
        cin.apply(win.data(), h.data(), nb);
        if (has_skip) {
          const Map<T>& sa = maps[ins[5]];
          const int64_t ca = sa.C, half = skip.in / 2;          // concat_elu doubles the skip channels
          for (int64_t r = 0; r < nb; ++r) {
            T* kr = sk.data() + r * skip.in;
            for (int64_t c = 0; c < ca; ++c) {
              const T v = *sa.at(n0 + r, c, 1 + a, 1 + b);
              kr[c] = elu(v);
              kr[half + c] = elu(-v);
            }
            if (ins[6] >= 0) {
              const Map<T>& sb = maps[ins[6]];
              for (int64_t c = 0; c < sb.C; ++c) {
                const T v = *sb.at(n0 + r, c, 1 + a, 1 + b);
                kr[ca + c] = elu(v);
                kr[half + ca + c] = elu(-v);
              }
            }
          }
          skip.apply(sk.data(), s.data(), nb);
          for (int64_t k = 0; k < nb * F; ++k) h[k] += s[k];
        }
        for (int64_t r = 0; r < nb; ++r)
          for (int64_t c = 0; c < F; ++c) {
            *mid.at(n0 + r, c, 1 + a, 1 + b) = elu(h[r * F + c]);
            *mid.at(n0 + r, F + c, 1 + a, 1 + b) = elu(-h[r * F + c]);
          }
        for (int64_t r = 0; r < nb; ++r) {
          T* wr = win.data() + r * cout.in;
          for (int64_t c = 0; c < 2 * F; ++c)
            for (int64_t dy = 0; dy < 2; ++dy)
              for (int64_t dx = 0; dx < 2; ++dx) wr[c * 4 + dy * 2 + dx] = *mid.at(n0 + r, c, a + dy, b + dx);
        }
        cout.apply(win.data(), o.data(), nb);
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t n = n0 + r;
          T* orow = o.data() + r * 2 * F;
          if (emb)
            for (int64_t c = 0; c < 2 * F; ++c) orow[c] += emb[n * 2 * F + c];
          for (int64_t c = 0; c < F; ++c) {
            const T g = orow[c] * (T(1) / (T(1) + std::exp(-orow[F + c])));
            *dst.at(n, c, 1 + a, 1 + b) = *src.at(n, c, 1 + a, 1 + b) + g;
          }
        }
      });
    } else if (kind == DOWN) {
      Map<T>& dst = maps[ins[2]];
      const Map<T>& src = maps[ins[3]];
      Lin<T> w = lin(ins[7], ins[8]);
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<T> win(w.in), y(w.out);
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t c = 0; c < src.C; ++c)         // padded rows 2a..2a+1, cols 2b..2b+1
            for (int64_t dy = 0; dy < 2; ++dy)
              for (int64_t dx = 0; dx < 2; ++dx) win[c * 4 + dy * 2 + dx] = *src.at(n, c, 2 * a + dy, 2 * b + dx);
          w.apply(win.data(), y.data());
          for (int64_t o = 0; o < dst.C; ++o) *dst.at(n, o, 1 + a, 1 + b) = y[o];
        }
      });
    } else if (kind == UP) {
      Map<T>& dst = maps[ins[2]];
      const Map<T>& src = maps[ins[3]];
      const auto& wt = weights[ins[7]];
      const T* w = wt.data_ptr<T>();
      const T* bias = weights[ins[8]].data_ptr<T>();
      const int64_t Fin = src.C, Fout = dst.C, H = dst.Hp - 1, W = dst.Wp - 2;
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<T> acc(Fout * 4);
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t k = 0; k < Fout * 4; ++k) acc[k] = 0;
          for (int64_t c = 0; c < Fin; ++c) {
            const T v = *src.at(n, c, 1 + a, 1 + b);
            const T* wr = w + c * Fout * 4;
            for (int64_t k = 0; k < Fout * 4; ++k) acc[k] += wr[k] * v;
          }
          for (int64_t o = 0; o < Fout; ++o)
            for (int64_t dy = 0; dy < 2; ++dy)
              for (int64_t dx = 0; dx < 2; ++dx) {
                const int64_t r = 2 * a + dy, c = 2 * b + dx;
                if (r < H && c < W) *dst.at(n, o, 1 + r, 1 + c) = acc[o * 4 + dy * 2 + dx] + bias[o];
              }
        }
      });
    } else if (kind == OUT) {
      const Map<T>& src = maps[ins[3]];
      Lin<T> w = lin(ins[7], ins[8]);
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<T> x(src.C);
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t c = 0; c < src.C; ++c) x[c] = elu(*src.at(n, c, 1 + i, 1 + j));
          w.apply(x.data(), out + n * out_width);
        }
      });
    }
  }
}

// Every shape an instruction reads or writes, checked on every call (a few comparisons per
// instruction): a program that does not fit its tensors is an error, never a read out of bounds.
void check_shapes(at::TensorList maps, at::TensorList weights, at::IntArrayRef program, int64_t i, int64_t j,
                  const at::Tensor& out) {
  const int64_t N = maps[0].size(0);
  auto C = [&](int64_t m) { return maps[m].size(1); };
  auto need_map = [&](int64_t m, const char* what) {
    TORCH_CHECK(m >= 0, "pixelcnnpp_ul_step: an instruction lacks its ", what, " map");
  };
  auto mat = [&](int64_t w, int64_t rows, int64_t cols, const char* what) {
    TORCH_CHECK(w >= 0 && weights[w].dim() == 2 && weights[w].size(0) == rows && weights[w].size(1) == cols,
                "pixelcnnpp_ul_step: the ", what, " weight must be (", rows, ", ", cols, ")");
  };
  auto vec = [&](int64_t b, int64_t len, const char* what) {
    TORCH_CHECK(b >= 0 && weights[b].numel() == len, "pixelcnnpp_ul_step: the ", what, " bias must hold ", len,
                " values");
  };
  auto inside = [&](int64_t m, int64_t a, int64_t b) {       // data position (a, b) and its window above-left
    TORCH_CHECK(a + 1 < maps[m].size(2) && b + 1 < maps[m].size(3),
                "pixelcnnpp_ul_step: a position falls outside a map");
  };
  for (size_t q = 0; q < program.size(); q += PROGRAM_WIDTH) {
    const int64_t* ins = program.data() + q;
    const int64_t kind = ins[0], L = ins[1];
    TORCH_CHECK(kind >= INIT && kind <= OUT && L >= 0 && L < 16, "pixelcnnpp_ul_step: unknown instruction kind ",
                kind, " or level ", L);
    const int64_t a = i >> L, b = j >> L;
    if (kind == INIT) {
      need_map(ins[2], "dst");
      need_map(ins[3], "input");
      mat(ins[7], C(ins[3]) * 3, C(ins[2]), "INIT (1, 3)");
      vec(ins[8], C(ins[2]), "INIT (1, 3)");
      mat(ins[9], C(ins[3]) * 2, C(ins[2]), "INIT (2, 1)");
      vec(ins[10], C(ins[2]), "INIT (2, 1)");
      TORCH_CHECK(maps[ins[3]].size(2) == H_of(maps[ins[2]]) + 1 && maps[ins[3]].size(3) >= j + 3,
                  "pixelcnnpp_ul_step: the INIT input map does not match its output");
      inside(ins[2], i, j);
    } else if (kind == BLOCK) {
      for (int k = 2; k <= 4; ++k) need_map(ins[k], "BLOCK");
      const int64_t F = C(ins[3]);
      TORCH_CHECK(C(ins[2]) == F && C(ins[4]) == 2 * F, "pixelcnnpp_ul_step: a BLOCK's maps must hold F, F and 2F channels");
      for (int k = 2; k <= 4; ++k)
        TORCH_CHECK(maps[ins[k]].sizes().slice(2).equals(maps[ins[3]].sizes().slice(2)),
                    "pixelcnnpp_ul_step: a BLOCK's maps must be of one size");
      mat(ins[7], 2 * F * 4, F, "BLOCK conv_in");
      vec(ins[8], F, "BLOCK conv_in");
      mat(ins[11], 2 * F * 4, 2 * F, "BLOCK conv_out");
      vec(ins[12], 2 * F, "BLOCK conv_out");
      if (ins[5] >= 0) {
        const int64_t sk = C(ins[5]) + (ins[6] >= 0 ? C(ins[6]) : 0);
        mat(ins[9], 2 * sk, F, "BLOCK skip");
        vec(ins[10], F, "BLOCK skip");
        inside(ins[5], a, b);
        if (ins[6] >= 0) inside(ins[6], a, b);
      } else {
        TORCH_CHECK(ins[6] < 0, "pixelcnnpp_ul_step: a BLOCK's second skip map needs a first");
      }
      if (ins[13] >= 0) vec(ins[13], N * 2 * F, "BLOCK class embedding (N, 2F)");
      if ((i % (int64_t(1) << L)) == 0 && (j % (int64_t(1) << L)) == 0) inside(ins[3], a, b);
    } else if (kind == DOWN) {
      need_map(ins[2], "DOWN dst");
      need_map(ins[3], "DOWN src");
      mat(ins[7], C(ins[3]) * 4, C(ins[2]), "DOWN");
      vec(ins[8], C(ins[2]), "DOWN");
      if ((i % (int64_t(1) << L)) == 0 && (j % (int64_t(1) << L)) == 0) {
        inside(ins[2], a, b);
        TORCH_CHECK(2 * a + 1 < maps[ins[3]].size(2) && 2 * b + 1 < maps[ins[3]].size(3),
                    "pixelcnnpp_ul_step: a DOWN window falls outside its map");
      }
    } else if (kind == UP) {
      need_map(ins[2], "UP dst");
      need_map(ins[3], "UP src");
      mat(ins[7], C(ins[3]), C(ins[2]) * 4, "UP");
      vec(ins[8], C(ins[2]), "UP");
      if ((i % (int64_t(1) << L)) == 0 && (j % (int64_t(1) << L)) == 0) inside(ins[3], a, b);
    } else {
      need_map(ins[3], "OUT src");
      mat(ins[7], C(ins[3]), out.size(1), "OUT");
      vec(ins[8], out.size(1), "OUT");
      inside(ins[3], i, j);
    }
  }
}

void pixelcnnpp_ul_step_cpu(at::TensorList maps, at::TensorList weights, at::IntArrayRef program, int64_t i,
                            int64_t j, const at::Tensor& out) {
  // The Python door (fastar.ops.pixelcnnpp_ul_step) checks the program against the tensors once per
  // cache; here only what keeps memory safe on every call.
  TORCH_CHECK(program.size() % PROGRAM_WIDTH == 0, "pixelcnnpp_ul_step: the program's length must be a multiple of ",
              PROGRAM_WIDTH);
  TORCH_CHECK(!maps.empty(), "pixelcnnpp_ul_step: maps must not be empty");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "pixelcnnpp_ul_step: out must be a contiguous (N, P) tensor");
  const auto dtype = maps[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pixelcnnpp_ul_step: float32 or float64, got ", dtype);
  const int64_t N = maps[0].size(0);
  for (const auto& m : maps)
    TORCH_CHECK(m.dim() == 4 && m.is_contiguous() && m.scalar_type() == dtype && m.size(0) == N && m.is_cpu(),
                "pixelcnnpp_ul_step: every map must be a contiguous CPU (N, C, H + 1, W + 2) tensor of one dtype");
  for (const auto& w : weights)
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == dtype && w.is_cpu(),
                "pixelcnnpp_ul_step: every weight must be a contiguous CPU tensor of the maps' dtype");
  TORCH_CHECK(out.scalar_type() == dtype && out.size(0) == N, "pixelcnnpp_ul_step: out must be (N, P) of the maps' dtype");
  const auto nm = static_cast<int64_t>(maps.size()), nw = static_cast<int64_t>(weights.size());
  for (size_t q = 0; q < program.size(); q += PROGRAM_WIDTH) {
    for (int k = 2; k <= 6; ++k) TORCH_CHECK(program[q + k] < nm, "pixelcnnpp_ul_step: a map index is out of range");
    for (int k = 7; k <= 13; ++k)
      TORCH_CHECK(program[q + k] < nw, "pixelcnnpp_ul_step: a weight index is out of range");
  }
  const int64_t H = maps[0].size(2) - 1, W = maps[0].size(3) - 2;
  TORCH_CHECK(i >= 0 && j >= 0 && i < H && j < W, "pixelcnnpp_ul_step: position (", i, ", ", j,
              ") is outside the ", H, "x", W, " image");
  check_shapes(maps, weights, program, i, j, out);
  AT_DISPATCH_FLOATING_TYPES(dtype, "pixelcnnpp_ul_step", [&] {
    std::vector<Map<scalar_t>> ms;
    ms.reserve(maps.size());
    for (const auto& m : maps) ms.push_back(Map<scalar_t>{m.data_ptr<scalar_t>(), m.size(1), m.size(2), m.size(3)});
    std::vector<at::Tensor> ws(weights.begin(), weights.end());
    run_program<scalar_t>(ms, ws, program, i, j, out.data_ptr<scalar_t>(), out.size(1), N);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastar, CPU, m) { m.impl("pixelcnnpp_ul_step", &pixelcnnpp_ul_step_cpu); }

}  // namespace fastar
