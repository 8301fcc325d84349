"""Output distributions: categorical sampling (and, to come, the discretized logistic mixture).

``categorical_sample(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None)``
draws one index per position by inverse CDF on one uniform per position:
``index = min(#{k : cdf[k] <= u}, last k with p[k] > 0)`` where
``cdf = cumsum(softmax(logits / temperature, dim))``. Temperature 0 means argmax.
``top_k`` keeps the k largest logits per position (ties at the k-th value kept).
``noise`` (the uniforms, shape = logits.shape without ``dim``, values in [0, 1)) makes
the draw deterministic, so a kernel and the reference draw the same sample; without
it the uniforms come from ``torch.rand(..., generator=generator)``.
Returns int64 indices of shape logits.shape without ``dim``.
"""
from __future__ import annotations

import torch

__all__ = ["categorical_sample", "categorical_sample_ref"]


def _check_categorical(op, logits, dim, noise, temperature, top_k):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be a floating-point tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() == 0:
        raise ValueError(f"{op}: logits must have at least 1 dimension (the categories), got a scalar")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for logits of shape {list(logits.shape)}")
    dim = dim % logits.dim()
    k = logits.shape[dim]
    if k < 1:
        raise ValueError(f"{op}: logits must have at least one category along dim {dim}, got shape "
                         f"{list(logits.shape)}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"{op}: temperature must be a non-negative number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= k):
        raise ValueError(f"{op}: top_k must be None or an int in [1, {k}], got {top_k!r}")
    out_shape = logits.shape[:dim] + logits.shape[dim + 1:]
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"{op}: noise must be a floating-point tensor of uniforms in [0, 1)")
        if noise.shape != out_shape:
            raise ValueError(f"{op}: noise must have shape {list(out_shape)} (logits without dim {dim}), got "
                             f"{list(noise.shape)}")
        if noise.device != logits.device:
            raise ValueError(f"{op}: noise is on {noise.device} but logits on {logits.device}")
    return dim, out_shape


def _uniforms(logits, out_shape, generator):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.rand(out_shape, generator=generator, device=logits.device, dtype=dtype)


def categorical_sample_ref(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None):
    """Reference: inverse-CDF categorical sampling (see the module docstring). Any device/dtype."""
    dim, out_shape = _check_categorical("categorical_sample_ref", logits, dim, noise, temperature, top_k)
    work = logits.movedim(dim, -1)
    work = work.double() if logits.dtype == torch.float64 else work.float()
    if top_k is not None:
        kth = work.topk(top_k, dim=-1).values[..., -1:]
        work = work.masked_fill(work < kth, float("-inf"))
    if temperature == 0:
        return work.argmax(-1)
    if noise is None:
        noise = _uniforms(logits, out_shape, generator)
    p = torch.softmax(work / temperature, dim=-1)
    cdf = torch.cumsum(p, dim=-1)
    idx = (cdf <= noise.to(cdf.dtype).unsqueeze(-1)).sum(-1)
    k = p.shape[-1]
    last_nonzero = k - 1 - (p > 0).flip(-1).to(torch.int64).argmax(-1)
    return torch.minimum(idx, last_nonzero)


def categorical_sample(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None):
    """Draw int64 indices from softmax(logits / temperature) along `dim` (see the module docstring)."""
    return categorical_sample_ref(logits, dim, generator, noise, temperature, top_k)
