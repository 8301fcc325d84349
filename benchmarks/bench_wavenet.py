"""pytest-benchmark suite: WaveNet generation steps, the PyTorch queue paths (wavenet_step_ref, and a plain
PyTorch loop as a new user would write it) vs the fused wavenet_step.

Run: python -m pytest benchmarks/bench_wavenet.py --benchmark-group-by=param:batch
The full table (with naive generation) is `python -m fastar bench wavenet`.
"""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.bench import kernel_built
from fastar.bench.wavenet import bench_model, plain_queue_maker, queue_ref_maker

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 16


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["queue_ref", "plain_queue", "fused"])
@pytest.mark.parametrize("batch", [1, 16, 64, 256])
def test_generate_steps(benchmark, device, impl, batch):
    if impl == "fused" and not kernel_built("wavenet_step", device):
        pytest.skip("wavenet_step kernel not built for this device")
    dev = torch.device(device)
    m = bench_model(dev)
    if impl == "fused":
        def make():
            def run():
                with fastar.backend("kernel"):
                    m.generate(STEPS, batch_size=batch, progress=False)
            return run
    else:
        make = (queue_ref_maker if impl == "queue_ref" else plain_queue_maker)(m, batch, STEPS, dev)

    def setup():  # fresh queues and step counter per round, outside the timed call
        run = make()
        return (run,), {}

    def call(run):
        run()
        _sync(device)

    benchmark.group = f"wavenet {STEPS} steps batch {batch} {device}"
    benchmark.extra_info["samples_per_call"] = batch * STEPS
    benchmark.pedantic(call, setup=setup, rounds=10, warmup_rounds=1)
