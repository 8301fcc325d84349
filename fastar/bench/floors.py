"""How far each CPU kernel is from its floor, and where WaveNet's per-sample time goes.

``python -m fastar bench floors`` (CPU only). First the machine's own rates, measured in the same
run with plain PyTorch: GEMM GFLOP/s (a 512^3 ``torch.mm``, one thread and all), the read bandwidth
of a buffer that sits in one core's L2 (a 1 MB float32 ``torch.mv`` and ``sum``, the faster) and
of one in L3 (32 MB ``sum``), and the elementwise ``exp`` rate. Then each kernel case with its work
(flops, bytes it must read), a floor = the work at the rate that bounds it (GEMM-bound: flops /
GEMM rate; weight-streaming: bytes / bandwidth of the cache they sit in, one slice per thread;
logits-streaming: max(bytes / L3 bandwidth, exps / exp rate)), the measured time and the ratio.

WaveNet at batch 1 (R=D=64, S=A=256, 20 layers, kernel 2) is profiled by the fused step's own
stage clocks (``fastar::_wavenet_profile``: steady_clock marks around each stage of the two-part
path, off by default): the layers' GEMVs and gates, the h update, the head's two 256x256 GEMVs,
the draw, the barrier waits (two threads: time a part spends waiting for the other), and the rest
of the wall time (packing the weights once per 256-step call, the Python loop). The floors assume
the weights stream from L2 at the measured rate, one slice per thread (3.3 MB: one core's 2 MB
cannot hold them, two can, which is what the two-part path arranges).
"""
from __future__ import annotations

import time

import torch

from fastar import _backend
from fastar.bench.load import thread_mode
from fastar.bench.timing import time_fn

FAMILY = "floors"

COLUMNS = ["case", "threads", "measured_us", "floor_us", "measured_vs_floor", "bound", "work"]

NOTES = ("us = microseconds per call (WaveNet: per sample). floor = the case's work at the machine rate that "
         "bounds it, the rates measured in this run with plain PyTorch (rows 'machine:'; a kernel can beat a "
         "floor set by torch's own GEMM or GEMV, so a ratio below 1 means the estimate is conservative, not "
         "wrong). measured_vs_floor = measured / floor. WaveNet rows: microseconds per sample in each stage "
         "of the fused step (its own clocks, part 0's; the clocks add about 1 us a sample); two-thread rows run "
         "with FASTAR_CPU_THREADS=all (no adaptive fallback to one thread).")


def _threads(n):
    """n torch threads, every fused call on all of them (no adaptive fallback to one thread)."""
    return thread_mode("all", n)


def _us(fn, repeat):
    return time_fn(fn, torch.device("cpu"), warmup=2, repeat=repeat)["median_ms"] * 1e3


def machine_rates(threads: int, quick: bool) -> dict:
    """Rates measured here with plain PyTorch: GEMM flop/s per thread count, read bytes/s from one
    core's L2 and from L3 (one thread), exps/s per thread count."""
    rep = 5 if quick else 15
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    m1 = torch.randn(512, 512, generator=g)               # 1 MB: one core's L2 (2 MB here)
    v = torch.randn(512, generator=g)
    l3 = torch.randn(8 * 2 ** 20, generator=g)            # 32 MB: L3, not L2
    e = torch.randn(2 ** 18, generator=g)                 # 1 MB: the exp rate, not a memory rate
    out = torch.empty_like(e)
    r = {}
    for t in sorted({1, threads}):
        with _threads(t):
            r["gemm", t] = 2 * 512 ** 3 / (_us(lambda: torch.mm(a, b), rep) * 1e-6)
            r["exp", t] = e.numel() / (_us(lambda: torch.exp(e, out=out), rep * 4) * 1e-6)
    with _threads(1):
        mv = m1.numel() * 4 / (_us(lambda: torch.mv(m1, v), rep * 4) * 1e-6)
        sm = m1.numel() * 4 / (_us(lambda: m1.sum(), rep * 4) * 1e-6)
        r["l2"] = max(mv, sm)
        r["l3"] = l3.numel() * 4 / (_us(lambda: l3.sum(), rep) * 1e-6)
    return r


def _row(case, threads, measured, floor, bound, work):
    return dict(case=case, threads=threads, measured_us=measured, floor_us=floor,
                measured_vs_floor=(measured / floor) if (floor and measured) else None, bound=bound, work=work)


def _wavenet(layers):
    from fastar.models import WaveNet
    torch.manual_seed(0)
    return WaveNet(layers=layers, stacks=max(1, layers // 10), residual_channels=64, dilation_channels=64,
                   skip_channels=256, quantization=256, kernel_size=2).eval()


def _weight_bytes(model, head: bool):
    """The weight matrices a step reads: the layers' (dilated, residual, skip) or the head's (out1, out2);
    not the input embedding (one column a step) nor the biases."""
    names = ("out1", "out2") if head else ("dilated_convs", "res_convs", "skip_convs")
    return 4 * sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in names and p.dim() > 1)


_STAGES = ["input", "layer", "layer_wait", "layer_finish", "skip", "head_wait", "head1", "head1_wait", "head2",
           "head2_wait", "draw", "pack", "steps"]


def wavenet_profile(model, steps, threads):
    """Per-sample seconds by stage of the fused step at batch 1 (the two-part path's own clocks,
    fastar::_wavenet_profile), for each part, and the wall time per sample."""
    op = torch.ops.fastar._wavenet_profile

    def gen():
        model.generate(steps, batch_size=1, progress=False, generator=torch.Generator().manual_seed(1))
    with _threads(threads):
        gen()                                   # warm-up
        op(True)
        try:
            t0 = time.perf_counter()
            gen()
            wall = time.perf_counter() - t0
        finally:
            raw = op(False)
    n = len(_STAGES)
    parts = []
    for t in range(2):
        row = dict(zip(_STAGES, raw[t * n:(t + 1) * n]))
        if row["steps"]:
            parts.append({k: v / row["steps"] for k, v in row.items() if k != "steps"})
    return parts, wall / steps


def wavenet_rows(rates, threads, quick):
    if not _backend.has_ops("_wavenet_profile"):
        return []
    steps = 2048 if quick else 8192
    m = _wavenet(20)
    layer_bytes = _weight_bytes(m, head=False)
    head_bytes = _weight_bytes(m, head=True)
    rows = []
    for t in sorted({1, threads}):
        parts, wall = wavenet_profile(m, steps, t)
        p0 = {k: v * 1e6 for k, v in parts[0].items()}                    # microseconds per sample
        bw = rates["l2"] * t                                              # bytes/us, one L2 slice per thread
        waits = [sum(1e6 * p[k] for k in ("layer_wait", "head_wait", "head1_wait", "head2_wait")) for p in parts]
        staged = sum(p0.values())
        floor_total = (layer_bytes + head_bytes) / bw
        tag = f"wavenet b1 20L ({t} thread{'s' if t > 1 else ''})"
        rows.append(_row(f"{tag}: whole step", t, wall * 1e6, floor_total, "weights from L2",
                         f"{(layer_bytes + head_bytes) / 2 ** 20:.2f} MB weights; {1 / wall:,.0f} samples/s "
                         f"(profiling on)"))
        rows.append(_row(f"{tag}: layers' GEMVs + gates", t, p0["layer"], layer_bytes / bw, "weights from L2",
                         f"20 x {layer_bytes / 20 / 2 ** 10:.0f} KB; {100 * p0['layer'] / staged:.0f}% of the step"))
        rows.append(_row(f"{tag}: layers' h update", t, p0["layer_finish"], None, "-",
                         f"{100 * p0['layer_finish'] / staged:.0f}%"))
        rows.append(_row(f"{tag}: head GEMVs (out1, out2)", t, p0["skip"] + p0["head1"] + p0["head2"],
                         head_bytes / bw, "weights from L2",
                         f"{head_bytes / 2 ** 10:.0f} KB; {100 * (p0['skip'] + p0['head1'] + p0['head2']) / staged:.0f}%"))
        rows.append(_row(f"{tag}: draw (inverse CDF over 256)", t, p0["draw"], 256 / rates["exp", t], "exp",
                         f"{100 * p0['draw'] / staged:.0f}%"))
        rows.append(_row(f"{tag}: packing the weights (once a call)", t, p0["pack"], None, "-",
                         f"{100 * p0['pack'] / (wall * 1e6):.0f}% of wall"))
        rest = p0["input"] + max(0.0, wall * 1e6 - staged)
        rows.append(_row(f"{tag}: input + the rest (Python loop, set-up)", t, rest, None, "-",
                         f"{100 * rest / (wall * 1e6):.0f}% of wall"))
        if t > 1:
            rows.append(_row(f"{tag}: barrier waits", t, waits[0], 0.0, "-",
                             "part 0 / part 1: " + " / ".join(f"{w:.1f} us" for w in waits) +
                             f" ({100 * waits[0] / staged:.0f}% of part 0's step): the partner's lag"))
    return rows


def lstm_rows(rates, threads, quick):
    from fastar.nn import DiagonalBiLSTM, RowLSTM
    rows = []
    n, hid, size = 16, 64, 28
    pixels = n * size * size
    x = torch.randn(n, 2 * hid, size, size, generator=torch.Generator().manual_seed(0))
    rep = 3 if quick else 7
    for name, cls, macs in (("RowLSTM", RowLSTM, 4 * hid * (2 * hid * 3 + hid * 3)),
                            ("DiagonalBiLSTM", DiagonalBiLSTM, 2 * 4 * hid * (2 * hid + hid * 2))):
        torch.manual_seed(0)
        layer = cls(2 * hid, hid).eval()
        flops = 2 * macs * pixels
        with torch.no_grad(), _backend.backend("kernel"), _threads(threads):
            us = _us(lambda: layer(x), rep)
        rows.append(_row(f"{name} b{n} h{hid} {size}x{size} fwd", threads, us, flops / rates["gemm", threads],
                         "GEMM", f"{flops / 1e9:.2f} GFLOP (input-to-state + state-to-state; the scan's "
                         f"{size if name == 'RowLSTM' else 2 * size - 1} dependent steps are small GEMMs)"))
    return rows


def masked_conv_rows(rates, threads, quick):
    from fastar import masks
    from fastar.ops.masked_conv import masked_conv2d
    g = torch.Generator().manual_seed(0)
    n, c, size = 16, 64, 28
    x = torch.randn(n, c, size, size, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g) * (9 * c) ** -0.5
    b = torch.randn(c, generator=g)
    m = masks.causal_mask("B", c, c, 3, 1)
    flops = 2 * n * size * size * c * c * 5
    # the kernel's parts, each by plain PyTorch at the same sizes: its stacked GEMM over the padded
    # grid (C_out x 5*C_in times 5*C_in x N*Hp*Wp), the copy of x into that grid, and the gather of
    # the five shifted views into the GEMM's operand (the kernel does these a column block at a time)
    hp = size + 2
    cols = n * hp * hp
    a = torch.randn(c, 5 * c, generator=g)
    bm = torch.randn(5 * c, cols, generator=g)
    grid = torch.zeros(c, n, hp, hp)
    flat = grid.view(c, -1)
    offs = [0, 1, 2, hp, hp + 1]                       # mask B 3x3: the taps above and the centre row's left + centre
    rep = 5 if quick else 15
    with torch.no_grad(), _backend.backend("kernel"), _threads(threads):
        us = _us(lambda: masked_conv2d(x, w, b, m), rep)
        gemm = _us(lambda: torch.mm(a, bm), rep)
        copy = _us(lambda: grid[:, :, 1:-1, 1:-1].copy_(x.permute(1, 0, 2, 3)), rep)
        gather = _us(lambda: torch.cat([flat[:, o:o + cols - 2 * hp - 2] for o in offs]), rep)
    name = f"masked_conv2d b{n} {c}->{c} 3x3 B {size}x{size} fwd"
    return [_row(name, threads, us, flops / rates["gemm", threads], "GEMM", f"{flops / 1e9:.2f} GFLOP (5 live taps of 9)"),
            _row(f"{name}: its GEMM alone (torch.mm, {c}x{5 * c} @ {5 * c}x{cols})", threads, gemm,
                 flops * cols / (n * size * size) / rates["gemm", threads], "GEMM",
                 f"{100 * gemm / us:.0f}% of the kernel's time; the padded grid adds {100 * (cols / (n * size * size) - 1):.0f}% columns"),
            _row(f"{name}: copying x into the padded grid (torch copy_)", threads, copy, None, "-",
                 f"{100 * copy / us:.0f}% of the kernel's time"),
            _row(f"{name}: gathering the 5 shifted views (torch.cat)", threads, gather, None, "-",
                 f"{100 * gather / us:.0f}% (the kernel gathers a cache-sized column block at a time)")]


def categorical_rows(rates, threads, quick):
    from fastar.ops.mixture import categorical_sample
    g = torch.Generator().manual_seed(0)
    rows_, k = 16384, 256
    logits = torch.randn(rows_, k, generator=g)
    noise = torch.rand(rows_, generator=g)
    with _backend.backend("kernel"), _threads(threads):
        us = _us(lambda: categorical_sample(logits, noise=noise), 5 if quick else 15)
    read = logits.numel() * 4
    floor_bw = read / (rates["l3"] * threads)
    floor_exp = logits.numel() / rates["exp", threads]
    bound = "exp" if floor_exp > floor_bw else "reading the logits (L3)"
    return [_row(f"categorical_sample ({rows_}, {k}) float32", threads, us, 1e6 * max(floor_bw, floor_exp), bound,
                 f"{read / 2 ** 20:.0f} MB logits, {logits.numel() / 1e6:.1f} M exps")]


# CPU only: the runner skips this family on cuda (no empty table; fastar/bench/__init__.py).
DEVICES = ("cpu",)

def run(device: str, quick: bool = False) -> list[dict]:
    if torch.device(device).type != "cpu":
        return []
    threads = torch.get_num_threads()
    rates = machine_rates(threads, quick)
    rows = []
    for t in sorted({1, threads}):
        rows.append(_row("machine: GEMM 512^3 torch.mm", t, 2 * 512 ** 3 / rates["gemm", t] * 1e6, None, "-",
                         f"{rates['gemm', t] / 1e9:.1f} GFLOP/s"))
        rows.append(_row("machine: exp over 256K floats (in L2)", t, 2 ** 18 / rates["exp", t] * 1e6, None, "-",
                         f"{rates['exp', t] / 1e9:.2f} G exps/s"))
    rows.append(_row("machine: read 1 MB from L2 (mv or sum)", 1, 2 ** 20 / rates["l2"] * 1e6, None, "-",
                     f"{rates['l2'] / 1e9:.1f} GB/s"))
    rows.append(_row("machine: read 32 MB from L3 (sum)", 1, 2 ** 25 / rates["l3"] * 1e6, None, "-",
                     f"{rates['l3'] / 1e9:.1f} GB/s"))
    # the rates are per second; the floors below are in microseconds
    us_rates = {k: v * 1e-6 for k, v in rates.items()}
    rows += wavenet_rows(us_rates, threads, quick)
    rows += lstm_rows(us_rates, threads, quick)
    rows += masked_conv_rows(us_rates, threads, quick)
    rows += categorical_rows(rates, threads, quick)
    for r in rows:
        nan = float("nan")
        print(f"  {r['case']:<48} t{r['threads']}  {r['measured_us'] if r['measured_us'] is not None else nan:10.2f} us"
              f"  floor {r['floor_us'] if r['floor_us'] is not None else nan:10.2f} us  {r['work']}", flush=True)
    return rows
