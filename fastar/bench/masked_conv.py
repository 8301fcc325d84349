"""masked_conv2d: kernel vs reference (F.conv2d on weight * mask: oneDNN / cuDNN) vs torch.compile(reference)."""
from __future__ import annotations

import torch

from fastar import _backend, masks
from fastar.bench.timing import peak_memory_bytes, time_interleaved
from fastar.ops.masked_conv import cpu_prefers_onednn, masked_conv2d, masked_conv2d_ref

__all__ = ["FAMILY", "COLUMNS", "NOTES", "CASES", "QUICK", "case_inputs", "run"]

FAMILY = "masked_conv"

COLUMNS = ["case", "pass", "reference_ms", "compiled_ms", "kernel_ms", "auto_ms", "speedup_vs_ref",
           "speedup_vs_compiled", "auto_vs_ref", "auto_uses", "ref_peak_MB", "kernel_peak_MB", "active_taps"]

NOTES = ("reference = F.conv2d(x, weight * mask) (oneDNN on CPU, cuDNN on CUDA); compiled = "
         "torch.compile(reference); speedup = reference_ms / kernel_ms. auto = masked_conv2d under the default "
         "backend, which on CPU runs the kernel where it is faster and F.conv2d(weight * mask) (oneDNN) where that "
         "is (fastar.ops.masked_conv.cpu_prefers_onednn); auto_vs_ref = reference_ms / auto_ms (the target: "
         ">= 0.95 on every shape), auto_uses = which of the two it ran. fwd+bwd = forward plus backward to x, "
         "weight and bias. The 3->66 case has colour groups 3 (66, not 64, because the R/G/B channel blocks must "
         "be equal). Every timed variant of a case runs round-robin (one call each per round), medians kept, so "
         "the machine's drift reaches them alike.")

# (name, batch, c_in, c_out, kernel, mask_type, color_groups, size)
CASES = [
    ("b16 64->64 3x3 B 28x28", 16, 64, 64, 3, "B", 1, 28),
    ("b16 64->64 3x3 B 32x32", 16, 64, 64, 3, "B", 1, 32),
    ("b16 3->66 7x7 A rgb 32x32", 16, 3, 66, 7, "A", 3, 32),
    ("b1 64->64 3x3 B 32x32", 1, 64, 64, 3, "B", 1, 32),
    ("b1 3->66 7x7 A rgb 32x32", 1, 3, 66, 7, "A", 3, 32),
    ("b128 64->64 3x3 B 32x32", 128, 64, 64, 3, "B", 1, 32),
    ("b128 3->66 7x7 A rgb 32x32", 128, 3, 66, 7, "A", 3, 32),
]
QUICK = {"b16 64->64 3x3 B 28x28", "b16 3->66 7x7 A rgb 32x32"}


def case_inputs(case, device, dtype):
    """The inputs of one ``CASES`` entry: x (N, C_in, S, S), weight (C_out, C_in, k, k), bias (C_out,) and the
    causal mask (C_out, C_in, k, k) of its mask type and colour groups, from a fixed seed, on ``device`` in
    ``dtype``. The table here and ``benchmarks/bench_masked_conv.py`` time the same tensors."""
    _, b, cin, cout, k, mt, cg, size = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, size, size, generator=g).to(device, dtype)
    w = (torch.randn(cout, cin, k, k, generator=g) * (cin * k * k) ** -0.5).to(device, dtype)
    bias = torch.randn(cout, generator=g).to(device, dtype)
    mask = masks.causal_mask(mt, cout, cin, k, cg).to(device, dtype)
    return x, w, bias, mask


def _fwd(fn, x, w, b, m):
    return lambda: fn(x, w, b, m)


def _fwd_bwd(fn, x, w, b, m):
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))

    def step():
        out = fn(x, w, b, m)
        out.backward(torch.ones_like(out))
        x.grad = w.grad = b.grad = None
    return step


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    dtype = torch.float32
    rows = []
    for case in CASES:
        if quick and case[0] not in QUICK:
            continue
        if case[1] >= 128 and dev.type == "cpu" and quick:
            continue
        x, w, b, m = case_inputs(case, dev, dtype)
        active = int((m.flatten(0, 1) != 0).any(0).sum())
        big = case[1] >= 128 and dev.type == "cpu"
        repeat = 3 if quick else (5 if big else (100 if case[1] == 1 else 15))  # sub-ms calls: many rounds
        compiled_ref = None if quick else torch.compile(masked_conv2d_ref, dynamic=False)

        def kernel(x, w, b, m):
            with _backend.backend("kernel"):
                return masked_conv2d(x, w, b, m)

        def auto(x, w, b, m):
            with _backend.backend("auto"):
                return masked_conv2d(x, w, b, m)

        for pass_name, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                fns = {"ref": wrap(masked_conv2d_ref, x, w, b, m), "kernel": wrap(kernel, x, w, b, m),
                       "auto": wrap(auto, x, w, b, m)}
                comp_ms = None
                if compiled_ref is not None:
                    try:
                        comp = wrap(compiled_ref, x, w, b, m)
                        comp()                       # compile outside the timed rounds
                        fns["compiled"] = comp
                    except Exception as e:  # a compile failure is a result to report, not a crash
                        print(f"  torch.compile(reference) failed for {case[0]} {pass_name}: {e}")
                ts = time_interleaved(fns, dev, repeat=repeat)
                ref_t, ker_t, auto_t = ts["ref"], ts["kernel"], ts["auto"]
                if "compiled" in ts:
                    comp_ms = ts["compiled"]["median_ms"]
                onednn = dev.type == "cpu" and cpu_prefers_onednn(x, w, pass_name == "fwd+bwd")
                ref_mem = peak_memory_bytes(wrap(masked_conv2d_ref, x, w, b, m), dev)
                ker_mem = peak_memory_bytes(wrap(kernel, x, w, b, m), dev)
            rows.append({
                "case": case[0], "pass": pass_name,
                "reference_ms": ref_t["median_ms"], "compiled_ms": comp_ms, "kernel_ms": ker_t["median_ms"],
                "auto_ms": auto_t["median_ms"],
                "speedup_vs_ref": ref_t["median_ms"] / ker_t["median_ms"],
                "speedup_vs_compiled": (comp_ms / ker_t["median_ms"]) if comp_ms else None,
                "auto_vs_ref": ref_t["median_ms"] / auto_t["median_ms"],
                "auto_uses": "oneDNN" if onednn else "kernel",
                "ref_peak_MB": ref_mem / 2**20 if ref_mem is not None else None,
                "kernel_peak_MB": ker_mem / 2**20 if ker_mem is not None else None,
                "active_taps": f"{active}/{case[4] ** 2}",
            })
            print(f"  {case[0]:<28} {pass_name:<8} ref {ref_t['median_ms']:8.3f} ms  kernel "
                  f"{ker_t['median_ms']:8.3f} ms  x{ref_t['median_ms'] / ker_t['median_ms']:.2f}  auto "
                  f"x{ref_t['median_ms'] / auto_t['median_ms']:.2f} ({'oneDNN' if onednn else 'kernel'})", flush=True)
    return rows
