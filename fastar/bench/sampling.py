"""Sampling: naive (the whole network per sub-pixel) vs cached (one position per layer per step).

GatedPixelCNN, 15 layers, (a) binary 28x28 with 64 channels, (b) 256-level 32x32x3 with 66
channels (R|G|B blocks must be equal, so 66 rather than 64). Batch 1 and 16; batch 256 on GPU
only. Time to sample one batch, untrained float32 weights (speed does not depend on training).
PixelCNN++ rows follow (:func:`fastar.bench.pixelcnnpp.sampling_rows`: the paper's network and a
reduced one, 32x32 RGB, one step per pixel, the multi-resolution cache).

Naive runs that would take longer than ``NAIVE_BUDGET_S`` are not run to the end: their time is
the sub-pixel count times the median of 5 full forward passes on the same batch, and the row
says so in ``naive_how`` ("extrapolated"). Where the naive run is complete, ``same_images`` says
whether both samplers returned identical images from the same seed. ``unfused_s`` times the cached
engine without the fused pixel step (``fused=False``), so the fused op's own gain is visible.
"""
from __future__ import annotations

import statistics

import torch

from fastar import _backend, sampling
from fastar.bench.timing import sampling_batches, sync, timed
from fastar.models import GatedPixelCNN

FAMILY = "sampling"

COLUMNS = ["case", "batch", "steps", "naive_s", "naive_how", "naive_backend", "cached_s", "speedup",
           "cached_ms_per_step", "unfused_s", "fused_gain", "same_images"]

NOTES = ("GatedPixelCNN, 15 layers; time to sample one batch (seconds). naive = one full forward pass per "
         "sub-pixel; cached = fastar.sampling cached engine (masked_conv2d_at per layer per step, the vertical "
         "stack once per row; CUDA graphs on GPU). naive_how 'extrapolated' = steps x median of 5 full "
         "passes (the full naive run would exceed the time budget); 'full run' = the whole naive sampler "
         "timed. The naive forward runs with the faster of the pure-PyTorch layers (F.conv2d on weight * mask, "
         "naive_backend 'reference') and the model's default (masked_conv2d kernel, 'auto'), timed interleaved. "
         "speedup = naive_s / cached_s. cached_s is the median of 3 runs. cached = the fused pixel step "
         "(fastar.ops.gated_pixelcnn_step: one C++ call / one CUDA launch per sub-pixel for every block, the "
         "head and the draw); unfused_s = the same engine with fused=False (a few torch ops per block per "
         "step), one run (median of 3 on GPU); fused_gain = unfused_s / cached_s. Run with a fixed thread "
         "count (--threads); the CPU is shared, so figures move by tens of percent between runs. PixelSNAIL rows "
         "(one step per pixel; no fused step, no reference backend): see fastar.bench.pixelsnail.")

NAIVE_BUDGET_S = 120.0

# (name, in_channels, levels, channels, size)
CASES = [
    ("binary 28x28", 1, 2, 64, 28),
    ("256-level 32x32x3", 3, 256, 66, 32),
]


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    rows = []
    for name, cin, levels, ch, size in CASES:
        if quick and cin == 3:
            continue
        torch.manual_seed(0)
        model = GatedPixelCNN(cin, levels, layers=15, channels=ch).to(dev).eval()
        for n in sampling_batches(dev):
            if quick and n > 16:
                continue
            steps = cin * size * size

            def cached(fused=None):
                plan = sampling.prepare(model, n, (size, size), generator=torch.Generator(dev).manual_seed(1))
                return sampling.cached_sample(model, plan, fused=fused)

            cached()  # warm-up (allocator, BLAS handles, graph capture paths)
            reps = 1 if quick else 3
            times, x_cached = [], None
            for _ in range(reps):
                t, x_cached = timed(cached, dev)
                times.append(t)
            cached_s = statistics.median(times)
            cached(False)  # warm-up of the per-op path
            reps_u = 3 if dev.type == "cuda" and not quick else 1
            unfused_s = statistics.median(timed(lambda: cached(False), dev)[0] for _ in range(reps_u))

            # A naive user's forward pass is plain PyTorch (F.conv2d on weight * mask); the model's default runs
            # the masked_conv2d kernel, slower than that at small batch. The faster of the two, timed
            # interleaved, is the naive path.
            x0 = torch.zeros(n, cin, size, size, dtype=torch.int64, device=dev)
            passes = {"reference": [], "auto": []}
            with torch.no_grad():
                for r in range(1 + (1 if quick else 5)):
                    for be in passes:
                        with _backend.backend(be):
                            t = timed(lambda: model(x0), dev)[0]
                        if r:  # round 0 warms up
                            passes[be].append(t)
            pass_s, naive_backend = min((statistics.median(t), be) for be, t in passes.items())
            estimate = steps * pass_s
            same = None
            if estimate <= NAIVE_BUDGET_S and not quick:
                plan = sampling.prepare(model, n, (size, size), generator=torch.Generator(dev).manual_seed(1))
                with _backend.backend(naive_backend):
                    naive_s, x_naive = timed(lambda: sampling.naive_sample(model, plan), dev)
                how = "full run"
                same = bool(torch.equal(x_naive, x_cached))
            else:
                naive_s, how = estimate, "extrapolated"
            rows.append({"case": name, "batch": n, "steps": steps, "naive_s": naive_s, "naive_how": how,
                         "naive_backend": naive_backend,
                         "cached_s": cached_s, "speedup": naive_s / cached_s,
                         "cached_ms_per_step": cached_s / steps * 1e3, "unfused_s": unfused_s,
                         "fused_gain": unfused_s / cached_s, "same_images": same})
            print(f"  {name:<20} b{n:<4} naive {naive_s:9.2f} s ({how})  cached {cached_s:7.3f} s  "
                  f"x{naive_s / cached_s:.0f}  (unfused {unfused_s:7.3f} s)", flush=True)
    from fastar.bench.pixelcnnpp import sampling_rows as pixelcnnpp_rows
    from fastar.bench.pixelsnail import sampling_rows as pixelsnail_rows

    return rows + pixelcnnpp_rows(device, quick) + pixelsnail_rows(device, quick)
