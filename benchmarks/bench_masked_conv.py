"""pytest-benchmark suite: masked_conv2d kernel vs reference at PixelCNN shapes.

Run: .venv/bin/python -m pytest benchmarks/bench_masked_conv.py --benchmark-group-by=param:case
The table printer with compile and memory columns is `python -m fastar bench masked_conv`.
"""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.bench import kernel_built
from fastar.bench.masked_conv import CASES, case_inputs
from fastar.ops import masked_conv2d, masked_conv2d_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = [c for c in CASES if c[1] <= 16]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("case", SMALL, ids=[c[0] for c in SMALL])
def test_forward_backward(benchmark, case, impl, device):
    if impl == "kernel" and not kernel_built("masked_conv2d", device):
        pytest.skip("kernel not built for this device")
    x, w, b, m = case_inputs(case, torch.device(device), torch.float32)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    fn = masked_conv2d_ref if impl == "reference" else masked_conv2d

    def step():
        with fastar.backend("reference" if impl == "reference" else "kernel"):
            out = fn(x, w, b, m)
            out.backward(torch.ones_like(out))
        _sync(device)

    benchmark.group = f"{case[0]} fwd+bwd {device}"
    benchmark(step)
