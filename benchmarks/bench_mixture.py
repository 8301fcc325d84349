"""pytest-benchmark suite: the mixture family's kernels vs references at PixelCNN++ shapes.

Run: python -m pytest benchmarks/bench_mixture.py --benchmark-group-by=group
The table printer with compile and memory columns is `python -m fastar bench mixture`.
"""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.bench import kernel_built
from fastar.bench.mixture import K, loss_inputs
from fastar.ops import (categorical_sample, categorical_sample_ref, discretized_mix_logistic_nll,
                        discretized_mix_logistic_nll_ref, sample_discretized_mix_logistic,
                        sample_discretized_mix_logistic_ref)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _skip_without_kernel(op, impl, device):
    if impl == "kernel" and not kernel_built(op, device):
        pytest.skip(f"{op} kernel not built for {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("batch", [16])
def test_loss_forward_backward(benchmark, batch, impl, device):
    _skip_without_kernel("discretized_mix_logistic_nll", impl, device)
    x, p = loss_inputs(batch, torch.device(device))
    p.requires_grad_(True)
    fn = discretized_mix_logistic_nll_ref if impl == "reference" else discretized_mix_logistic_nll

    def step():
        with fastar.backend("reference" if impl == "reference" else "kernel"):
            fn(x, p, K).backward()
        p.grad = None
        _sync(device)

    benchmark.group = f"dml loss fwd+bwd b{batch} {device}"
    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_sample(benchmark, impl, device):
    _skip_without_kernel("sample_discretized_mix_logistic", impl, device)
    _, p = loss_inputs(16, torch.device(device))
    u = torch.rand(16, 4, 32, 32, device=device)
    fn = sample_discretized_mix_logistic_ref if impl == "reference" else sample_discretized_mix_logistic

    def step():
        with fastar.backend("reference" if impl == "reference" else "kernel"):
            fn(p, K, noise=u)
        _sync(device)

    benchmark.group = f"dml sample b16 {device}"
    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "kernel", "multinomial"])
def test_categorical(benchmark, impl, device):
    _skip_without_kernel("categorical_sample", impl, device)
    logits = torch.randn(16 * 1024, 256, device=device)

    def step():
        if impl == "multinomial":
            torch.multinomial(torch.softmax(logits, -1), 1)
        else:
            with fastar.backend("reference" if impl == "reference" else "kernel"):
                (categorical_sample_ref if impl == "reference" else categorical_sample)(logits)
        _sync(device)

    benchmark.group = f"categorical (16384, 256) {device}"
    benchmark(step)
