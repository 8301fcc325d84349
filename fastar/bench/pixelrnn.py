"""PixelRNN: the scan kernels vs plain PyTorch, and cached vs naive sampling.

Layers: :class:`fastar.nn.DiagonalBiLSTM` and :class:`fastar.nn.RowLSTM` at batch 16, hidden 64
and 128 (input 2h channels, as inside a PixelRNN), 28x28 and 32x32, forward and forward +
backward (to the input and every parameter). reference = the layer under the "reference"
backend: F.conv2d for the input-to-state and the scan as a plain PyTorch loop over the diagonals
(one batched matmul per skewed column, every row at once) or rows (one conv1d per row), autograd
for the backward; compiled = torch.compile of that; kernel = the compiled scan ops
(:func:`fastar.ops.diagonal_lstm_scan`, :func:`fastar.ops.row_lstm_scan`) and masked_conv2d.

Sampling: a 4-layer PixelRNN (hidden 32, binary 28x28), both kinds, batch 1 and 16: naive (one
full forward pass per pixel, on the faster of the two backends) vs the cached sampler. A naive
run longer than ``NAIVE_BUDGET_S`` is extrapolated (784 x the median of 3 full passes) and says so.
"""
from __future__ import annotations

import statistics
import time

import torch

from fastar import _backend
from fastar.bench.timing import sync, time_fn
from fastar.models import PixelRNN
from fastar.nn import DiagonalBiLSTM, RowLSTM

FAMILY = "pixelrnn"

COLUMNS = ["case", "pass", "reference_ms", "compiled_ms", "kernel_ms", "speedup_vs_ref", "speedup_vs_compiled",
           "naive_s", "naive_how", "cached_s", "same_images"]

NOTES = ("Layer rows: milliseconds per call, float32, batch 16, input 2h channels; reference = the layer under "
         "fastar.backend('reference') (F.conv2d input-to-state, the scan as a PyTorch loop over skewed columns "
         "/ rows with one batched matmul / conv1d each, autograd backward); compiled = torch.compile(reference) "
         "(forward, h64 28x28 only: compiling a 55-step loop takes minutes per shape here); kernel = the fastar "
         "scan ops; speedup = reference_ms / kernel_ms. Sampling rows: seconds for one batch of 28x28 binary "
         "images from a 4-layer PixelRNN (hidden 32, untrained weights); naive = one full forward pass per "
         "pixel with the faster backend, 'extrapolated' = 784 x median of 3 passes when the full run would pass "
         "the budget; cached = the PixelRNN cache (one LSTM cell per layer per pixel, one right-to-left row "
         "scan per layer per row); speedup_vs_ref = naive_s / cached_s; same_images where the naive run was "
         "complete. The CPU is shared: figures move by tens of percent between runs.")

NAIVE_BUDGET_S = 90.0

LAYER_CASES = [(kind, hid, size) for kind in ("diagonal", "row") for hid in (64, 128) for size in (28, 32)]
QUICK_LAYERS = {("diagonal", 64, 28), ("row", 64, 28)}
COMPILED_AT = (64, 28)      # torch.compile of the reference loop takes minutes per shape on the 2-core box


def _layer(kind, hid, dev):
    torch.manual_seed(0)
    cls = DiagonalBiLSTM if kind == "diagonal" else RowLSTM
    return cls(2 * hid, hid).to(dev)


def _fwd(layer, x):
    return lambda: layer(x)


def _fwd_bwd(layer, x):
    x = x.detach().requires_grad_(True)

    def step():
        out = layer(x)
        out.backward(torch.ones_like(out))
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def _with_backend(name, fn):
    def call():
        with _backend.backend(name):
            return fn()
    return call


def _kernels_built(dev):
    have = _backend.CUDA_KERNELS if dev.type == "cuda" else _backend.CPU_KERNELS
    return {"diagonal_lstm_scan", "row_lstm_scan"} <= set(have)


def _layer_rows(dev, quick):
    rows = []
    kernels = _kernels_built(dev)
    for case in LAYER_CASES:
        if quick and case not in QUICK_LAYERS:
            continue
        kind, hid, size = case
        layer = _layer(kind, hid, dev)
        x = torch.randn(16, 2 * hid, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
        name = f"{'DiagonalBiLSTM' if kind == 'diagonal' else 'RowLSTM'} b16 h{hid} {size}x{size}"
        repeat = 3 if quick else 7
        for pass_name, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            ctx = torch.no_grad() if pass_name == "fwd" else torch.enable_grad()
            with ctx:
                ref = time_fn(_with_backend("reference", wrap(layer, x)), dev, warmup=1, repeat=repeat)["median_ms"]
                ker = (time_fn(_with_backend("kernel", wrap(layer, x)), dev, warmup=2, repeat=repeat)["median_ms"]
                       if kernels else None)
                comp = None
                if not quick and pass_name == "fwd" and (hid, size) == COMPILED_AT:
                    try:
                        with _backend.backend("reference"):
                            cl = torch.compile(layer, dynamic=False)
                            comp = time_fn(wrap(cl, x), dev, warmup=1, repeat=repeat)["median_ms"]
                    except Exception as e:  # a compile failure is a result to report, not a crash
                        print(f"  torch.compile(reference) failed for {name}: {type(e).__name__}: {e}")
            rows.append({"case": name, "pass": pass_name, "reference_ms": ref, "compiled_ms": comp,
                         "kernel_ms": ker, "speedup_vs_ref": ref / ker if ker else None,
                         "speedup_vs_compiled": comp / ker if (comp and ker) else None})
            print(f"  {name:<32} {pass_name:<8} ref {ref:9.2f} ms  compiled "
                  f"{'-' if comp is None else f'{comp:9.2f}'} ms  kernel {'-' if ker is None else f'{ker:9.2f}'} ms"
                  + (f"  x{ref / ker:.1f}" if ker else ""), flush=True)
    return rows


def _sample_s(model, n, method, seed=0, backend="auto"):
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    sync(dev)
    t0 = time.perf_counter()
    with _backend.backend(backend):
        out = model.sample(n, (28, 28), generator=g, method=method, progress=False)
    sync(dev)
    return time.perf_counter() - t0, out


def _naive(model, n, dev):
    """Naive sampling time on the faster backend; a full run when it fits the budget."""
    x = torch.zeros(n, 1, 28, 28, dtype=torch.int64, device=dev)
    per = {}
    with torch.no_grad():
        for b in ("reference", "auto"):
            with _backend.backend(b):
                model(x)
                ts = []
                for _ in range(3):
                    sync(dev)
                    t0 = time.perf_counter()
                    model(x)
                    sync(dev)
                    ts.append(time.perf_counter() - t0)
            per[b] = statistics.median(ts)
    best = min(per, key=per.get)
    est = 784 * per[best]
    if est > NAIVE_BUDGET_S:
        return est, "extrapolated", best, None
    s, out = _sample_s(model, n, "naive", backend=best)
    return s, "full run", best, out


def _sampling_rows(dev, quick):
    rows = []
    for kind in ("diagonal", "row"):
        torch.manual_seed(0)
        model = PixelRNN(kind, in_channels=1, levels=2, layers=4, hidden=32).to(dev).eval()
        for n in ((16,) if quick else (1, 16)):
            cached = []
            out_c = None
            for r in range(1 if quick else 3):
                s, out_c = _sample_s(model, n, "cached")
                cached.append(s)
            cs = statistics.median(cached)
            if quick:
                ns, how, best, out_n = 784 * _naive_pass(model, n, dev), "extrapolated", "auto", None
            else:
                ns, how, best, out_n = _naive(model, n, dev)
            same = None if out_n is None else bool(torch.equal(out_c, out_n))
            name = f"sample {kind} 4x32 b{n} binary 28x28"
            rows.append({"case": name, "pass": "sample", "naive_s": ns, "naive_how": f"{how} ({best})",
                         "cached_s": cs, "speedup_vs_ref": ns / cs, "same_images": same})
            print(f"  {name:<32} naive {ns:8.2f} s ({how}, {best})  cached {cs:7.3f} s  x{ns / cs:.0f}"
                  + ("" if same is None else f"  same images: {same}"), flush=True)
    return rows


def _naive_pass(model, n, dev):
    x = torch.zeros(n, 1, 28, 28, dtype=torch.int64, device=dev)
    with torch.no_grad():
        model(x)
        sync(dev)
        t0 = time.perf_counter()
        model(x)
        sync(dev)
    return time.perf_counter() - t0


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    return _layer_rows(dev, quick) + _sampling_rows(dev, quick)
