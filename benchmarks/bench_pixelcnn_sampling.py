"""pytest-benchmark suite: cached vs naive PixelCNN sampling.

Run: python -m pytest benchmarks/bench_pixelcnn_sampling.py --benchmark-group-by=param:case
The full table (15 layers x 64 channels, 28x28 binary and 32x32x3 256-level, naive
extrapolated where a full naive run is too long) is `python -m fastar bench sampling`.
Here the naive sampler runs in full, so the images are small (12x12) enough to finish.
"""
from __future__ import annotations

import pytest
import torch

from fastar import sampling
from fastar.models import GatedPixelCNN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (name, in_channels, levels, channels, size, batch)
CASES = [
    ("binary 12x12 b1", 1, 2, 64, 12, 1),
    ("binary 12x12 b16", 1, 2, 64, 12, 16),
    ("256-level 8x8x3 b16", 3, 256, 66, 8, 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["naive", "cached", "cached_unfused"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sample(benchmark, case, method, device):
    name, cin, levels, ch, size, n = case
    torch.manual_seed(0)
    model = GatedPixelCNN(cin, levels, layers=15, channels=ch).to(device).eval()
    fn = {"naive": sampling.naive_sample, "cached": sampling.cached_sample,
          "cached_unfused": lambda m, p: sampling.cached_sample(m, p, fused=False)}[method]

    def step():
        plan = sampling.prepare(model, n, (size, size), generator=torch.Generator(device).manual_seed(1))
        out = fn(model, plan)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{name} {device}"
    benchmark.pedantic(step, rounds=1 if method == "naive" else 3,
                       warmup_rounds=0 if method == "naive" else 1)
