// wavenet_step, two-part strategy for small batches in float32 (B <= kSmallBatch, AVX-512): the weights are packed
// panel-major per part, and each part's share stays in one core's L2.
//
// At batch 1 a step streams ~3.5 MB of weights for ~0.9M multiply-adds: the speed is the
// bandwidth at which the weights reach the FMA units. Two things decide it (measured on the
// project's 2-core Xeon): the layout — a row-major (in, out) matrix read 64 columns at a time
// is a 1 KB-strided walk the prefetchers follow badly (15 GB/s from L3) while the same bytes
// as contiguous 64-wide panels stream at 28 GB/s — and where the bytes live: 3.5 MB is
// larger than one core's 2 MB L2, but half of it fits. So the network is cut in two parts,
// each packed once per call into panels in its own buffer, and each part runs on its own core:
//   - conv: part t owns the filter and the gate columns of the same dilation channels, so it
//     gates them alone and holds the matching half of z;
//   - res/skip: part t multiplies its half of z by its rows of the residual and skip matrices,
//     a partial sum over the full R + S outputs; h = h + partial_0 + partial_1 is then formed
//     by each part after ONE barrier per layer (each part keeps its own copy of h);
//   - skip partials stay per part until the head; the head's two matrices are split by
//     columns (a barrier each), and both parts draw the same sample from the full logits.
// L + 3 barriers per step. The arithmetic (and so every bit of the result) is the same
// whether one thread runs both parts or two threads run one each.
// Packing costs about as much as a few steps (measured on the 2-core Xeon: ~50 us for the
// shipped speech WaveNet's 0.66 MB, against ~10 us a step), so a call of few steps (the codec
// runs one step a call) reads the same matrices in place instead (gemv_rows: the very same
// arithmetic, so every bit is the same packed or not, at any number of steps a call).
#include <memory>

#include "cpu/wavenet_internal.h"

namespace fastar {
namespace wavenet_cpu {
namespace {

struct SmallPlan {
  int64_t parts;
  std::pair<int64_t, int64_t> dch[2], sch[2], ach[2], rch[2];  // dilation / skip / output / residual channels
  // per part, offsets (in floats) of each packed matrix in the part's buffer
  std::vector<int64_t> conv_off[2], rs_off[2];
  int64_t head1_off[2], head2_off[2], size[2];
  int64_t wconv[2], wrs, wh1[2], wh2[2];  // packed widths
  // the same matrices read in place (gemv_rows): each one's 16-column groups, per part
  std::vector<ColGroup> conv_groups[2], rs_groups, h1_groups[2], h2_groups[2];
};

SmallPlan plan_small(const StepShape& s) {
  SmallPlan pl;
  pl.parts = (s.D >= 32 && s.S >= 32 && s.A >= 32) ? 2 : 1;
  for (int64_t t = 0; t < pl.parts; ++t) {
    pl.dch[t] = Stepper<float>::part(s.D, t, pl.parts);
    pl.sch[t] = Stepper<float>::part(s.S, t, pl.parts);
    pl.ach[t] = Stepper<float>::part(s.A, t, pl.parts);
    pl.rch[t] = Stepper<float>::part(s.R, t, pl.parts);
  }
  pl.wrs = round16(s.R + s.S);
  pl.rs_groups = panel_groups({{0, s.R + s.S}});
  for (int64_t t = 0; t < pl.parts; ++t) {
    const auto [d0, d1] = pl.dch[t];
    pl.wconv[t] = 2 * round16(d1 - d0);
    pl.wh1[t] = round16(pl.sch[t].second - pl.sch[t].first);
    pl.wh2[t] = round16(pl.ach[t].second - pl.ach[t].first);
    pl.conv_groups[t] = panel_groups({{d0, d1}, {s.D + d0, s.D + d1}});
    pl.h1_groups[t] = panel_groups({pl.sch[t]});
    pl.h2_groups[t] = panel_groups({pl.ach[t]});
    int64_t off = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      pl.conv_off[t].push_back(off);
      off += s.k * s.R * pl.wconv[t];
      pl.rs_off[t].push_back(off);
      off += (d1 - d0) * pl.wrs;
    }
    pl.head1_off[t] = off;
    off += s.S * pl.wh1[t];
    pl.head2_off[t] = off;
    off += s.S * pl.wh2[t];
    pl.size[t] = off;
  }
  return pl;
}

void pack_part(const StepArgs<float>& g, const SmallPlan& pl, int64_t t, float* buf) {
  const StepShape& s = *g.s;
  const int64_t D2 = 2 * s.D, RS = s.R + s.S;
  const auto [d0, d1] = pl.dch[t];
  for (int64_t l = 0; l < s.L; ++l) {
    pack_panels(g.conv_w + l * s.k * s.R * D2, D2, 0, s.k * s.R, {{d0, d1}, {s.D + d0, s.D + d1}},
                buf + pl.conv_off[t][l]);
    pack_panels(g.rs_w + l * s.D * RS, RS, d0, d1 - d0, {{0, RS}}, buf + pl.rs_off[t][l]);
  }
  pack_panels(g.o1_w, s.S, 0, s.S, {pl.sch[t]}, buf + pl.head1_off[t]);
  pack_panels(g.o2_w, s.A, 0, s.S, {pl.ach[t]}, buf + pl.head2_off[t]);
}

// State shared by the parts of one call.
struct SmallShared {
  std::vector<float> hp[2];  // per layer parity: the parts' residual partials, (parts, nb, R)
  std::vector<float> skp;    // the parts' skip partials, (parts, nb, S)
  std::vector<float> y1;     // (nb, S) after the first head matrix
  SpinBarrier bar;
};

// One part's private state and stages.
struct SmallPart {
  const StepArgs<float>& g;
  const StepShape& s;
  const SmallPlan& pl;
  SmallShared& sh;
  int64_t t;
  const float* buf;
  std::vector<float> h, xcat, a, z, out, skip, sfull, y1, lg;
  std::vector<double> last;  // the previous value of each row (code or audio value)

  SmallPart(const StepArgs<float>& g_, const SmallPlan& pl_, SmallShared& sh_, int64_t t_, const float* buf_)
      : g(g_), s(*g_.s), pl(pl_), sh(sh_), t(t_), buf(buf_) {
    const int64_t nb = s.B;
    h.assign(nb * s.R, 0.f);
    xcat.assign(nb * s.k * s.R, 0.f);
    a.assign(nb * pl.wconv[t], 0.f);
    z.assign(nb * (pl.dch[t].second - pl.dch[t].first), 0.f);
    out.assign(nb * pl.wrs, 0.f);
    skip.assign(nb * s.S, 0.f);
    sfull.assign(nb * s.S, 0.f);
    y1.assign(nb * pl.wh1[t], 0.f);
    lg.assign(nb * pl.wh2[t], 0.f);
    last.assign(nb, 0.0);
  }

  // The value that enters step p: drawn by this call's previous step (kept in `last`), or read
  // from samples (the caller's, or a primed one: the kernel never writes primed positions).
  void input(int64_t p, int64_t p0) {
    for (int64_t b = 0; b < s.B; ++b) {
      float* hb = h.data() + b * s.R;
      const bool from_memory = p == p0 || p - 1 < g.num_prime;
      if (g.K > 0) {
        const float x = p == 0 ? 0.f : (from_memory ? g.xs[b * s.T + p - 1] : static_cast<float>(last[b]));
        for (int64_t i = 0; i < s.R; ++i) hb[i] = g.in_w[i] * x + g.in_b[i];
      } else {
        const int64_t c = p == 0 ? g.start : (from_memory ? g.samples[b * s.T + p - 1] : static_cast<int64_t>(last[b]));
        const float* e = g.in_w + c * s.R;
        for (int64_t i = 0; i < s.R; ++i) hb[i] = e[i] + g.in_b[i];
      }
      std::fill(skip.begin() + b * s.S, skip.begin() + (b + 1) * s.S, 0.f);
    }
  }

  // conv + gate + this part's residual/skip partial for layer l.
  void layer_compute(int64_t l, int64_t p, std::vector<float>& hp) {
    const int64_t d = g.dil[l], N = (s.k - 1) * d, D2 = 2 * s.D, KR = s.k * s.R;
    const auto [d0, d1] = pl.dch[t];
    const int64_t w = d1 - d0, w16 = round16(w), wc = pl.wconv[t];
    for (int64_t b = 0; b < s.B; ++b) {
      float* xc = xcat.data() + b * KR;
      const float* q = g.queues + b * s.Ntot * s.R;
      for (int64_t j = 0; j + 1 < s.k; ++j) {
        int64_t slot = (p - (s.k - 1 - j) * d) % N;
        if (slot < 0) slot += N;
        std::memcpy(xc + j * s.R, q + (s.offsets[l] + slot) * s.R, sizeof(float) * s.R);
      }
      std::memcpy(xc + (s.k - 1) * s.R, h.data() + b * s.R, sizeof(float) * s.R);
      float* ab = a.data() + b * wc;
      const float* bias = g.conv_b + l * D2;
      const float* cv = g.cond ? g.cond + ((b * s.Tc + (s.Tc == 1 ? 0 : p)) * s.L + l) * D2 : nullptr;
      for (int64_t c = 0; c < w16; ++c) {
        ab[c] = c < w ? bias[d0 + c] + (cv ? cv[d0 + c] : 0.f) : 0.f;
        ab[w16 + c] = c < w ? bias[s.D + d0 + c] + (cv ? cv[s.D + d0 + c] : 0.f) : 0.f;
      }
    }
    if (buf)
      gemv_panels(buf + pl.conv_off[t][l], KR, wc, xcat.data(), KR, a.data(), wc, s.B);
    else
      gemv_rows(g.conv_w + l * KR * D2, D2, pl.conv_groups[t].data(), KR, wc, xcat.data(), KR, a.data(), wc, s.B);
    const int64_t RS = s.R + s.S;
    const float* rb = g.rs_b + l * RS;
    for (int64_t b = 0; b < s.B; ++b) {
      g.prim.gate(a.data() + b * wc, a.data() + b * wc + w16, w, z.data() + b * w);
      float* ob = out.data() + b * pl.wrs;
      for (int64_t c = 0; c < pl.wrs; ++c) ob[c] = (t == 0 && c < RS) ? rb[c] : 0.f;
    }
    if (w > 0 && buf)
      gemv_panels(buf + pl.rs_off[t][l], w, pl.wrs, z.data(), w, out.data(), pl.wrs, s.B);
    else if (w > 0)
      gemv_rows(g.rs_w + (l * s.D + d0) * RS, RS, pl.rs_groups.data(), w, pl.wrs, z.data(), w, out.data(), pl.wrs,
                s.B);
    for (int64_t b = 0; b < s.B; ++b) {
      const float* ob = out.data() + b * pl.wrs;
      std::memcpy(hp.data() + (t * s.B + b) * s.R, ob, sizeof(float) * s.R);
      float* sk = skip.data() + b * s.S;
      for (int64_t c = 0; c < s.S; ++c) sk[c] += ob[s.R + c];
    }
  }

  // After every part's partial of layer l is in hp: write this part's channels of the layer's
  // input into its queue, then h += partial_0 + partial_1 (same order in every part).
  void layer_finish(int64_t l, int64_t p, const std::vector<float>& hp, bool write_queue) {
    const int64_t N = (s.k - 1) * g.dil[l];
    for (int64_t b = 0; b < s.B; ++b) {
      float* hb = h.data() + b * s.R;
      if (write_queue && N > 0) {
        const auto [r0, r1] = pl.rch[t];
        float* q = g.queues + b * s.Ntot * s.R + (s.offsets[l] + p % N) * s.R;
        std::memcpy(q + r0, hb + r0, sizeof(float) * (r1 - r0));
      }
      for (int64_t u = 0; u < pl.parts; ++u) {
        const float* pu = hp.data() + (u * s.B + b) * s.R;
        for (int64_t c = 0; c < s.R; ++c) hb[c] += pu[c];
      }
    }
  }

  void publish_skip() {
    std::memcpy(sh.skp.data() + t * s.B * s.S, skip.data(), sizeof(float) * s.B * s.S);
  }

  void head1() {
    for (int64_t i = 0; i < s.B * s.S; ++i) {
      float v = sh.skp[i];
      for (int64_t u = 1; u < pl.parts; ++u) v += sh.skp[u * s.B * s.S + i];
      sfull[i] = v > 0.f ? v : 0.f;
    }
    const auto [c0, c1] = pl.sch[t];
    const int64_t wh = pl.wh1[t];
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = 0; c < wh; ++c) y1[b * wh + c] = c0 + c < c1 ? g.o1_b[c0 + c] : 0.f;
    if (buf)
      gemv_panels(buf + pl.head1_off[t], s.S, wh, sfull.data(), s.S, y1.data(), wh, s.B);
    else
      gemv_rows(g.o1_w, s.S, pl.h1_groups[t].data(), s.S, wh, sfull.data(), s.S, y1.data(), wh, s.B);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = c0; c < c1; ++c) {
        const float v = y1[b * wh + c - c0];
        sh.y1[b * s.S + c] = v > 0.f ? v : 0.f;
      }
  }

  void head2() {
    const auto [c0, c1] = pl.ach[t];
    const int64_t wh = pl.wh2[t];
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = 0; c < wh; ++c) lg[b * wh + c] = c0 + c < c1 ? g.o2_b[c0 + c] : 0.f;
    if (buf)
      gemv_panels(buf + pl.head2_off[t], s.S, wh, sh.y1.data(), s.S, lg.data(), wh, s.B);
    else
      gemv_rows(g.o2_w, s.A, pl.h2_groups[t].data(), s.S, wh, sh.y1.data(), s.S, lg.data(), wh, s.B);
    for (int64_t b = 0; b < s.B; ++b)
      std::memcpy(g.logits + b * s.A + c0, lg.data() + b * wh, sizeof(float) * (c1 - c0));
  }

  // Every part draws the same value from the full logits; only part 0 writes it out.
  void sample(int64_t p) {
    if (p < g.num_prime) return;
    for (int64_t b = 0; b < s.B; ++b) {
      last[b] = draw_row(g, b, p);
      if (t == 0) store_draw(g, b, p, last[b]);
    }
  }
};

// The packed weights of part t, in a per-thread buffer kept between calls: a fresh 1.7 MB
// allocation per call would page-fault its way in every time. 64-byte aligned, so every AVX-512
// load of a panel is one cache line.
float* part_buffer(int64_t t, int64_t n) {
  thread_local std::vector<float> bufs[2];
  auto& v = bufs[t];
  if (static_cast<int64_t>(v.size()) < n + 16) v.resize(n + 16);
  const auto addr = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// One part per thread for the whole call (one fork/join per call, not per stage).
void run_part_threaded(StepArgs<float>& g, const SmallPlan& pl, SmallShared& sh, int64_t t, int64_t p0,
                       int64_t num_steps, bool pack) {
  const StepShape& s = *g.s;
  StageClock clk(t);
  clk.start();
  float* buf = nullptr;
  if (pack) {
    buf = part_buffer(t, pl.size[t]);  // packed by the thread that streams it: it starts in its L2
    pack_part(g, pl, t, buf);
  }
  SmallPart pt(g, pl, sh, t, buf);
  clk.mark(kProfPack);
  for (int64_t i = 0; i < num_steps; ++i) {
    const int64_t p = p0 + i;
    clk.start();
    pt.input(p, p0);
    clk.mark(kProfInput);
    for (int64_t l = 0; l < s.L; ++l) {
      auto& hp = sh.hp[l & 1];  // double-buffered: a part may write layer l+1's partial while
                                // the other still reads layer l's
      pt.layer_compute(l, p, hp);
      clk.mark(kProfLayer);
      sh.bar.wait(2);
      clk.mark(kProfLayerWait);
      pt.layer_finish(l, p, hp, true);
      clk.mark(kProfLayerFinish);
    }
    pt.publish_skip();
    clk.mark(kProfSkip);
    sh.bar.wait(2);
    clk.mark(kProfHeadWait);
    pt.head1();
    clk.mark(kProfHead1);
    sh.bar.wait(2);
    clk.mark(kProfHead1Wait);
    pt.head2();
    clk.mark(kProfHead2);
    sh.bar.wait(2);
    clk.mark(kProfHead2Wait);
    pt.sample(p);
    clk.mark(kProfDraw);
    clk.step();
  }
}

// One thread runs every part's stages in turn: the same arithmetic as the two-thread mode.
void run_parts_sequential(StepArgs<float>& g, const SmallPlan& pl, SmallShared& sh, int64_t p0,
                          int64_t num_steps, bool pack) {
  const StepShape& s = *g.s;
  StageClock clk(0);  // one thread: both parts' stages land in row 0
  clk.start();
  std::vector<std::unique_ptr<SmallPart>> parts;
  for (int64_t t = 0; t < pl.parts; ++t) {
    float* buf = nullptr;
    if (pack) {
      buf = part_buffer(t, pl.size[t]);
      pack_part(g, pl, t, buf);
    }
    parts.push_back(std::make_unique<SmallPart>(g, pl, sh, t, buf));
  }
  clk.mark(kProfPack);
  for (int64_t i = 0; i < num_steps; ++i) {
    const int64_t p = p0 + i;
    clk.start();
    for (auto& pt : parts) pt->input(p, p0);
    clk.mark(kProfInput);
    for (int64_t l = 0; l < s.L; ++l) {
      auto& hp = sh.hp[l & 1];
      for (auto& pt : parts) pt->layer_compute(l, p, hp);
      clk.mark(kProfLayer);
      for (auto& pt : parts) pt->layer_finish(l, p, hp, true);
      clk.mark(kProfLayerFinish);
    }
    for (auto& pt : parts) pt->publish_skip();
    clk.mark(kProfSkip);
    for (auto& pt : parts) pt->head1();
    clk.mark(kProfHead1);
    for (auto& pt : parts) pt->head2();
    clk.mark(kProfHead2);
    for (auto& pt : parts) pt->sample(p);
    clk.mark(kProfDraw);
    clk.step();
  }
}

}  // namespace

void run_small(StepArgs<float>& g, int64_t p0, int64_t num_steps, bool two_threads, bool pack) {
  const StepShape& s = *g.s;
  const SmallPlan pl = plan_small(s);
  SmallShared sh;
  sh.hp[0].assign(pl.parts * s.B * s.R, 0.f);
  sh.hp[1].assign(pl.parts * s.B * s.R, 0.f);
  sh.skp.assign(pl.parts * s.B * s.S, 0.f);
  sh.y1.assign(s.B * s.S, 0.f);
  if (!two_threads || pl.parts == 1) {
    run_parts_sequential(g, pl, sh, p0, num_steps, pack);
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t lo, int64_t hi) {
    if (hi - lo == 2)  // the runtime gave one thread both parts
      run_parts_sequential(g, pl, sh, p0, num_steps, pack);
    else
      run_part_threaded(g, pl, sh, lo, p0, num_steps, pack);
  });
}

}  // namespace wavenet_cpu
}  // namespace fastar
