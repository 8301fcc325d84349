"""Mixture family: discretized logistic mixture loss and sampler, categorical sampling.

Reference vs torch.compile(reference) vs kernel; for categorical_sample also
``torch.multinomial(torch.softmax(logits, -1), 1)``. Loss rows time forward + backward to params
and measure peak memory; sampling rows time one draw.
"""
from __future__ import annotations

import torch

from fastar import _backend
from fastar.bench.timing import peak_memory_bytes, time_fn
from fastar.ops.mixture import (categorical_sample, categorical_sample_ref, discretized_mix_logistic_nll,
                                discretized_mix_logistic_nll_ref, dml_value_log_probs, dml_value_log_probs_ref,
                                sample_discretized_mix_logistic, sample_discretized_mix_logistic_ref)

__all__ = ["FAMILY", "COLUMNS", "NOTES", "K", "LOSS_BATCHES", "CAT_ROWS", "loss_inputs", "run"]

FAMILY = "mixture"

COLUMNS = ["case", "pass", "reference_ms", "compiled_ms", "kernel_ms", "multinomial_ms", "plain_cdf_ms",
           "speedup_vs_ref", "speedup_vs_compiled", "speedup_vs_best_pytorch", "ref_peak_MB", "kernel_peak_MB",
           "mem_ratio"]

NOTES = ("Images 32x32x3, K=10 mixtures (params (B, 100, 32, 32), float32). reference = the pure-PyTorch "
         "openai/pixel-cnn formulation; compiled = torch.compile(reference); speedup = reference_ms / kernel_ms; "
         "mem_ratio = kernel_peak / ref_peak (peak bytes allocated during one call above what was live before). "
         "loss fwd+bwd = discretized_mix_logistic_nll(reduction='sum') plus backward to params. categorical rows: "
         "(B*H*W, 256) logits; multinomial = torch.multinomial(torch.softmax(logits, -1), 1); plain_cdf = the "
         "inverse CDF a user writes (softmax, cumsum, searchsorted on the same uniforms). The categorical reference "
         "reproduces the kernels' one pick (csrc/common/categorical.h) op for op, with an emulated exp, so it is "
         "slow: speedup_vs_best_pytorch divides by the fastest of reference, compiled, multinomial and plain_cdf. "
         "dml_value_log_probs rows (CPU only): colour B given R and G of N pixels, K=10, 256 bins, float32, one "
         "thread (what the codec runs per step).")
VALUE_ROWS = (1, 16, 256)

K = 10
LOSS_BATCHES = (16, 64)
CAT_ROWS = (16 * 1024, 64 * 1024)


def loss_inputs(b, device):
    """Targets x (b, 3, 32, 32) in [-1, 1] on the 256-level grid and mixture parameters (b, 10 * K, 32, 32),
    float32, from a fixed seed, on ``device``: the loss and sampler rows here and ``benchmarks/bench_mixture.py``
    time the same tensors."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (b, 3, 32, 32), generator=g).float() / 255 * 2 - 1).to(device)
    p = torch.randn(b, 10 * K, 32, 32, generator=g)
    p[:, K:] *= 0.5
    return x, p.to(device)


def _kernel(fn):
    def run(*args, **kw):
        with _backend.backend("kernel"):
            return fn(*args, **kw)
    return run


def _fwd_bwd(fn, x, p):
    p = p.detach().requires_grad_(True)

    def step():
        loss = fn(x, p, K)
        loss.backward()
        p.grad = None
    return step


def _try_compile(fn, label):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # a compile failure is a result to report, not a crash
        print(f"  torch.compile failed for {label}: {e}")
        return None


def _time_or_none(make_step, dev, repeat, label):
    try:
        return time_fn(make_step(), dev, repeat=repeat)["median_ms"]
    except Exception as e:
        print(f"  {label} failed: {type(e).__name__}: {e}")
        return None


def _row(case, pass_name, ref_ms, comp_ms, ker_ms, mult_ms=None, ref_mem=None, ker_mem=None, plain_ms=None):
    best = min((t for t in (ref_ms, comp_ms, mult_ms, plain_ms) if t), default=None)
    return {
        "case": case, "pass": pass_name, "reference_ms": ref_ms, "compiled_ms": comp_ms, "kernel_ms": ker_ms,
        "multinomial_ms": mult_ms, "plain_cdf_ms": plain_ms,
        "speedup_vs_best_pytorch": best / ker_ms if best and ker_ms else None,
        "speedup_vs_ref": ref_ms / ker_ms if ref_ms and ker_ms else None,
        "speedup_vs_compiled": comp_ms / ker_ms if comp_ms and ker_ms else None,
        "ref_peak_MB": ref_mem / 2**20 if ref_mem is not None else None,
        "kernel_peak_MB": ker_mem / 2**20 if ker_mem is not None else None,
        "mem_ratio": ker_mem / ref_mem if ref_mem and ker_mem is not None else None,
    }


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    repeat = 3 if quick else (7 if cpu else 50)
    rows = []
    batches = LOSS_BATCHES[:1] if quick else LOSS_BATCHES
    kernel_nll = _kernel(discretized_mix_logistic_nll)
    kernel_sample = _kernel(sample_discretized_mix_logistic)
    compiled_nll = None if quick else _try_compile(discretized_mix_logistic_nll_ref, "the loss reference")
    compiled_sample = None if quick else _try_compile(sample_discretized_mix_logistic_ref, "the sampler reference")
    for b in batches:
        x, p = loss_inputs(b, dev)
        case = f"b{b} 32x32x3 K={K}"
        ref_ms = _time_or_none(lambda: _fwd_bwd(discretized_mix_logistic_nll_ref, x, p), dev, repeat, "reference")
        ker_ms = _time_or_none(lambda: _fwd_bwd(kernel_nll, x, p), dev, repeat, "kernel")
        comp_ms = None
        if compiled_nll is not None:
            comp_ms = _time_or_none(lambda: _fwd_bwd(compiled_nll, x, p), dev, repeat, "compiled reference")
        ref_mem = peak_memory_bytes(_fwd_bwd(discretized_mix_logistic_nll_ref, x, p), dev)
        ker_mem = peak_memory_bytes(_fwd_bwd(kernel_nll, x, p), dev)
        rows.append(_row(case, "loss fwd+bwd", ref_ms, comp_ms, ker_ms, None, ref_mem, ker_mem))
        print(f"  {case} loss fwd+bwd: ref {ref_ms:.2f} ms, compiled {comp_ms}, kernel {ker_ms:.2f} ms; "
              f"peak {ref_mem} vs {ker_mem} bytes", flush=True)

        u = torch.rand(b, 4, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            ref_ms = _time_or_none(lambda: (lambda: sample_discretized_mix_logistic_ref(p, K, noise=u)), dev,
                                   repeat, "sampler reference")
            ker_ms = _time_or_none(lambda: (lambda: kernel_sample(p, K, noise=u)), dev, repeat, "sampler kernel")
            comp_ms = None
            if compiled_sample is not None:
                comp_ms = _time_or_none(lambda: (lambda: compiled_sample(p, K, noise=u)), dev, repeat,
                                        "compiled sampler reference")
        rows.append(_row(case, "sample", ref_ms, comp_ms, ker_ms))
        print(f"  {case} sample: ref {ref_ms:.2f} ms, compiled {comp_ms}, kernel {ker_ms:.2f} ms", flush=True)

    kernel_cat = _kernel(categorical_sample)
    compiled_cat = None if quick else _try_compile(categorical_sample_ref, "the categorical reference")
    for n in (CAT_ROWS[:1] if quick else CAT_ROWS):
        logits = torch.randn(n, 256, generator=torch.Generator().manual_seed(2)).to(dev)
        u = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(dev)
        case = f"({n}, 256) logits"
        with torch.no_grad():
            ref_ms = _time_or_none(lambda: (lambda: categorical_sample_ref(logits, noise=u)), dev, repeat,
                                   "categorical reference")
            ker_ms = _time_or_none(lambda: (lambda: kernel_cat(logits, noise=u)), dev, repeat, "categorical kernel")
            mult_ms = _time_or_none(lambda: (lambda: torch.multinomial(torch.softmax(logits, -1), 1)), dev,
                                    repeat, "multinomial")
            plain_ms = _time_or_none(lambda: (lambda: torch.searchsorted(
                torch.softmax(logits, -1).cumsum(-1), u[:, None]).clamp_max_(255)), dev, repeat, "plain inverse CDF")
            comp_ms = None
            if compiled_cat is not None:
                comp_ms = _time_or_none(lambda: (lambda: compiled_cat(logits, noise=u)), dev, repeat,
                                        "compiled categorical reference")
        rows.append(_row(case, "categorical_sample", ref_ms, comp_ms, ker_ms, mult_ms, plain_ms=plain_ms))
        print(f"  {case} categorical: ref {ref_ms:.2f} ms, multinomial {mult_ms:.2f} ms, plain cdf {plain_ms:.2f} ms, "
              f"kernel {ker_ms:.2f} ms", flush=True)
    if cpu:
        rows += _value_rows(repeat, quick)
    return rows


def _value_rows(repeat, quick):
    kernel_val = _kernel(dml_value_log_probs)
    compiled_val = None if quick else _try_compile(dml_value_log_probs_ref, "the dml_value_log_probs reference")
    rows = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (VALUE_ROWS[:2] if quick else VALUE_ROWS):
            g = torch.Generator().manual_seed(4)
            p = torch.randn(n, 10 * K, generator=g)
            p[:, K:] *= 0.5
            prev = ((torch.randint(0, 256, (n, 2), generator=g).float() * 2 - 255) / 255)
            case = f"({n}, {10 * K}) params, colour 2"
            with torch.no_grad():
                ref_ms = _time_or_none(lambda: (lambda: dml_value_log_probs_ref(p, prev, K, 2, 8)), torch.device("cpu"),
                                       repeat * 3, "value reference")
                ker_ms = _time_or_none(lambda: (lambda: kernel_val(p, prev, K, 2, 8)), torch.device("cpu"), repeat * 3,
                                       "value kernel")
                comp_ms = None
                if compiled_val is not None:
                    comp_ms = _time_or_none(lambda: (lambda: compiled_val(p, prev, K, 2, 8)), torch.device("cpu"),
                                            repeat * 3, "compiled value reference")
            rows.append(_row(case, "dml_value_log_probs", ref_ms, comp_ms, ker_ms))
            print(f"  {case} dml_value_log_probs: ref {ref_ms:.3f} ms, compiled {comp_ms}, kernel {ker_ms:.3f} ms",
                  flush=True)
    finally:
        torch.set_num_threads(prev_threads)
    return rows
