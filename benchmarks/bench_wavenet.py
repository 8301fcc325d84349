"""pytest-benchmark suite: WaveNet generation steps, the PyTorch queue path vs the fused wavenet_step.

Run: python -m pytest benchmarks/bench_wavenet.py --benchmark-group-by=param:batch
The full table (with naive generation) is `python -m fastar bench wavenet`.
"""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.bench.wavenet import _model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 16


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["queue_ref", "fused"])
@pytest.mark.parametrize("batch", [1, 16, 64, 256])
def test_generate_steps(benchmark, device, impl, batch):
    kernels = fastar._backend.CUDA_KERNELS if device == "cuda" else fastar._backend.CPU_KERNELS
    if impl == "fused" and "wavenet_step" not in kernels:
        pytest.skip("wavenet_step kernel not built for this device")
    m = _model(torch.device(device))
    samples = torch.zeros(batch, STEPS, dtype=torch.int64, device=device)
    noise = torch.rand(batch, STEPS, device=device)

    def run():
        if impl == "queue_ref":
            m.generate_reference_queue(samples, noise)
        else:
            with fastar.backend("kernel"):
                m.generate(STEPS, batch_size=batch, progress=False)
        _sync(device)

    benchmark.group = f"wavenet {STEPS} steps batch {batch} {device}"
    benchmark.extra_info["samples_per_call"] = batch * STEPS
    benchmark(run)
