"""PixelRNN: the scan kernels vs plain PyTorch, and cached vs naive sampling.

Layers: :class:`fastar.nn.DiagonalBiLSTM` and :class:`fastar.nn.RowLSTM` at batch 16, hidden 64
and 128 (input 2h channels, as inside a PixelRNN), 28x28 and 32x32, forward and forward +
backward (to the input and every parameter). reference = the layer under the "reference"
backend: F.conv2d for the input-to-state and the scan as a plain PyTorch loop over the diagonals
(one batched matmul per skewed column, every row at once) or rows (one conv1d per row), autograd
for the backward; compiled = torch.compile of that; kernel = the compiled scan ops
(:func:`fastar.ops.diagonal_lstm_scan`, :func:`fastar.ops.row_lstm_scan`) and masked_conv2d.

Sampling: a 4-layer PixelRNN (hidden 32, binary 28x28), both kinds, and the shipped pixelrnn_mnist,
batch 1 and 16: naive (one full forward pass per pixel, on the faster of the two backends) vs the
cached sampler, fused (one ``pixelrnn_step`` call per sub-pixel, the default) and per-op (a few torch
ops per layer, the fallback) side by side; at batch 16 the fused sampler with every step pinned to one
thread and to two (``fastar.threads.pinned``; the default policy runs the row-start scans on one thread
and times one against all for the fused sub-pixel step).
Profile rows: where a sub-pixel's time goes, and the fused op beside its floor. A naive
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
           "naive_s", "naive_how", "cached_s", "per_op_s", "per_op_speedup", "fused_1thread_s", "fused_2threads_s",
           "same_images", "total_us", "op_us", "row_start_us", "engine_us", "op_floor_us", "op_vs_floor"]

NOTES = ("Layer rows: milliseconds per call, float32, batch 16, input 2h channels; reference = the layer under "
         "fastar.backend('reference') (F.conv2d input-to-state, the scan as a PyTorch loop over skewed columns "
         "/ rows with one batched matmul / conv1d each, autograd backward); compiled = torch.compile(reference) "
         "(forward, h64 28x28 only: compiling a 55-step loop takes minutes per shape here); kernel = the fastar "
         "scan ops; speedup = reference_ms / kernel_ms. Sampling rows: seconds for one batch of 28x28 binary "
         "images from a 4-layer PixelRNN (hidden 32, untrained weights); naive = one full forward pass per "
         "pixel with the faster backend, 'extrapolated' = 784 x median of 3 passes when the full run would pass "
         "the budget; cached = the fused PixelRNN cache (one pixelrnn_step call per sub-pixel: every layer's cell, "
         "the head and the draw; one right-to-left row scan per layer per row), per_op = the per-op cache (the "
         "same arithmetic as torch ops, the engine drawing), both medians of 3 interleaved runs; speedup_vs_ref "
         "= naive_s / cached_s, per_op_speedup = naive_s / per_op_s; same_images where the naive run was "
         "complete. Profile rows: microseconds per sub-pixel: total = the cached sample / 784, op = the fused "
         "op alone, row_start = the row-start work / 28, engine = the rest; op_floor = the op's flops at the "
         "one-thread GEMM rate measured in the run. The CPU is shared: figures move by tens of percent between "
         "runs.")

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


def _sample_s(model, n, method, seed=0, backend="auto", fused=None, threads=None):
    """(seconds, images) of one sample call; threads: every step pinned to that many CPU threads
    (fastar.threads.pinned), else the default policy."""
    import contextlib

    from fastar.threads import pinned

    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    with pinned(threads) if threads else contextlib.nullcontext():
        sync(dev)
        t0 = time.perf_counter()
        with _backend.backend(backend):
            kw = {} if method == "naive" else dict(fused=fused)
            out = model.sample(n, (28, 28), cond=_cond(model, n, dev), generator=g, method=method, progress=False,
                               **kw)
        sync(dev)
    return time.perf_counter() - t0, out


def _cond(model, n, dev):
    """Class labels 0, 1, 2, ... for a class-conditional model (the shipped pixelrnn_mnist), else None."""
    k = getattr(model, "num_classes", None)
    return torch.arange(n, device=dev) % k if k else None


def _naive(model, n, dev):
    """Naive sampling time on the faster backend; a full run when it fits the budget."""
    x = torch.zeros(n, 1, 28, 28, dtype=torch.int64, device=dev)
    c = _cond(model, n, dev)
    per = {}
    with torch.no_grad():
        for b in ("reference", "auto"):
            with _backend.backend(b):
                model(x, c)
                ts = []
                for _ in range(3):
                    sync(dev)
                    t0 = time.perf_counter()
                    model(x, c)
                    sync(dev)
                    ts.append(time.perf_counter() - t0)
            per[b] = statistics.median(ts)
    best = min(per, key=per.get)
    est = 784 * per[best]
    if est > NAIVE_BUDGET_S:
        return est, "extrapolated", best, None
    s, out = _sample_s(model, n, "naive", backend=best)
    return s, "full run", best, out


def _models(dev, quick):
    """(name, model): the 4-layer h32 binary model of each kind, and the shipped pixelrnn_mnist."""
    out = []
    for kind in ("diagonal", "row"):
        torch.manual_seed(0)
        out.append((f"{kind} 4x32", PixelRNN(kind, in_channels=1, levels=2, layers=4, hidden=32).to(dev).eval()))
    if not quick:
        from fastar.checkpoint import load_model
        from fastar.checkpoints import shipped_path

        path = shipped_path("pixelrnn_mnist")
        if path:
            m, ck = load_model(path, dev)
            c = ck["config"]
            out.append((f"pixelrnn_mnist ({c['kind']} {c['layers']}x{c['hidden']})", m))
    return out


def _sampling_rows(dev, quick, naive_full=None):
    """Naive vs cached, the fused cache (the default) and the per-op cache (the fallback) side by side
    in one run, medians of 3; at batch 16 the fused cache with one thread and with two as well.
    naive_full=False: the naive time is always extrapolated from single passes (default: not quick)."""
    rows = []
    fused_ok = "pixelrnn_step" in (_backend.CUDA_KERNELS if dev.type == "cuda" else _backend.CPU_KERNELS)
    for mname, model in _models(dev, quick):
        for n in ((16,) if quick else (1, 16)):
            reps = 1 if quick else 3
            per_op, fused, one, two = [], [], [], []
            out_c = None
            for _ in range(reps):       # interleaved, so the box's load hits both alike
                s, out_p = _sample_s(model, n, "cached", fused=False)
                per_op.append(s)
                if fused_ok:
                    s, out_c = _sample_s(model, n, "cached", fused=True)
                    fused.append(s)
                    if n == 16 and dev.type == "cpu" and not quick:
                        one.append(_sample_s(model, n, "cached", fused=True, threads=1)[0])
                        two.append(_sample_s(model, n, "cached", fused=True, threads=2)[0])
            ps = statistics.median(per_op)
            cs = statistics.median(fused) if fused else ps
            if quick or naive_full is False:
                ns, how, best, out_n = (784 * statistics.median(_naive_pass(model, n, dev) for _ in range(3)),
                                        "extrapolated", "auto", None)
            else:
                ns, how, best, out_n = _naive(model, n, dev)
            same = None if out_n is None else bool(torch.equal(out_c if fused else out_p, out_n))
            name = f"sample {mname} b{n} binary 28x28"
            t1 = statistics.median(one) if one else None
            t2 = statistics.median(two) if two else None
            rows.append({"case": name, "pass": "sample", "naive_s": ns, "naive_how": f"{how} ({best})",
                         "cached_s": cs, "per_op_s": ps, "speedup_vs_ref": ns / cs, "per_op_speedup": ns / ps,
                         "fused_1thread_s": t1, "fused_2threads_s": t2, "same_images": same})
            print(f"  {name:<44} naive {ns:8.2f} s ({how}, {best})  fused {cs:7.3f} s  x{ns / cs:.0f}  per-op "
                  f"{ps:7.3f} s  x{ns / ps:.0f}" + ("" if t1 is None else f"  1 thread {t1:.3f} s, 2 threads {t2:.3f} s")
                  + ("" if same is None else f"  same images: {same}"), flush=True)
    return rows


def _profile_rows(dev, quick):
    """Where one sub-pixel's time goes at batch 1 and 16 (CPU): the whole cached sample per sub-pixel,
    the fused op alone (called repeatedly on one state), the row-start work (per sub-pixel, amortised),
    the rest (the engine's loop); and the op's floor: its flops at the GEMM rate measured here."""
    from fastar import sampling
    from fastar.bench.floors import _threads, machine_rates
    from fastar.models.pixelrnn_cache import PixelRNNCache

    if dev.type != "cpu" or "pixelrnn_step" not in _backend.CPU_KERNELS:
        return []
    rates = machine_rates(torch.get_num_threads(), quick)
    rows = []
    for mname, model in _models(dev, True):
        for n in ((16,) if quick else (1, 16)):
            run = sampling.prepare(model, n, (28, 28), _cond(model, n, dev), torch.Generator().manual_seed(0))
            cache = PixelRNNCache(model, run, fused=True)
            fn = cache._fused_fn
            T = run.seq.steps

            def op_call():
                run.counter[0] = 300
                fn()
            # as the engine runs them: the row-start scans on one thread, the op adaptive (one here)
            with _threads(1):
                op_us = time_fn(op_call, dev, warmup=20, repeat=200)["median_ms"] * 1e3
                row_us = time_fn(lambda: cache._row(5), dev, warmup=3, repeat=20)["median_ms"] * 1e3
            total = statistics.median(_sample_s(model, n, "cached", fused=True)[0] for _ in range(3 if not quick else 1))
            per_sub = total / T * 1e6
            h, L = model.hidden, len(model.layers)
            taps = 2 if model.kind == "diagonal" else model.layers[0].lstm.is_weight.shape[-1] // 2 + 1
            # per layer: input-to-state (taps x 2h x 4h; the Diagonal's second "tap" is its state term),
            # the 1x1 out (h x 2h); the head (2h x 2h, 2h x 1); the first layer (25 live taps x 2h)
            macs = n * (L * (taps * 8 * h * h + 2 * h * h) + 4 * h * h + 2 * h + 25 * 2 * h)
            floor = 2 * macs / rates["gemm", 1] * 1e6
            rows.append({"case": f"profile {mname} b{n}", "pass": "sub-pixel us", "total_us": per_sub,
                         "op_us": op_us, "row_start_us": row_us / 28, "engine_us": per_sub - op_us - row_us / 28,
                         "op_floor_us": floor, "op_vs_floor": op_us / floor})
            print(f"  profile {mname} b{n}: {per_sub:.1f} us/sub-pixel = op {op_us:.1f} + row start {row_us / 28:.1f} "
                  f"+ engine {per_sub - op_us - row_us / 28:.1f}; op floor {floor:.2f} us (x{op_us / floor:.1f})",
                  flush=True)
    return rows


def _naive_pass(model, n, dev):
    x = torch.zeros(n, 1, 28, 28, dtype=torch.int64, device=dev)
    c = _cond(model, n, dev)
    with torch.no_grad():
        model(x, c)
        sync(dev)
        t0 = time.perf_counter()
        model(x, c)
        sync(dev)
    return time.perf_counter() - t0


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    return _layer_rows(dev, quick) + _sampling_rows(dev, quick) + _profile_rows(dev, quick)
