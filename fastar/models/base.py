"""The public base of every fastar model: the one vocabulary, the sampling door, shared checks.

:class:`AutoregressiveModel` gives a family ``log_prob``, ``bits_per_dim``, ``loss`` and ``sample``
from the two methods it writes itself:

- ``nll(x, cond=None) -> (N,)``: the exact negative log-likelihood per example in nats (a density
  in nats for real-valued data);
- ``sequence(n, shape, cond, ...) -> fastar.sampling.Sequence``: how many steps, their head, where
  their values live, the naive full-forward baseline (the generation protocol, ``docs/architecture.md``);

and, optionally, ``allocate_inference_cache(run, fused=None)`` for a cached sampler. A family
imports from here, from :mod:`fastar.models.image` (discrete images) and from the lower layers
(``fastar.nn``, ``fastar.ops``, ``fastar.sampling``), never another family's private names.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AutoregressiveModel", "batch_of", "check_positive_int", "check_class_labels"]


def batch_of(cond):
    """The batch size a conditioning value implies: a tensor's first dimension, a tuple's first
    tensor's, else None."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.dim() >= 1 else None
    if isinstance(cond, (tuple, list)) and cond and isinstance(cond[0], torch.Tensor):
        return cond[0].shape[0]
    return None


def check_positive_int(name: str, what: str, v, allow_none: bool = False):
    """``v`` if it is a positive int (or None when allowed), else ValueError naming ``name`` and ``what``."""
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: {what} must be {'None or ' if allow_none else ''}a positive int, got {v!r}")
    return v


def check_class_labels(name: str, cond, n: int, num_classes: int | None, device) -> torch.Tensor | None:
    """Class conditioning: an int for the whole batch or (N,) int64 in [0, num_classes), returned on
    ``device``; None for an unconditional model (which refuses a cond)."""
    if num_classes is None:
        if cond is not None:
            raise ValueError(f"{name} is unconditional (num_classes=None); cond must be None")
        return None
    if cond is None:
        raise ValueError(f"{name} is class-conditional: cond must be class labels, (N,) int64 or an int")
    if isinstance(cond, int) and not isinstance(cond, bool):
        cond = torch.full((n,), cond, dtype=torch.int64, device=device)
    if not isinstance(cond, torch.Tensor) or cond.dim() != 1 or cond.dtype != torch.int64:
        raise ValueError(f"{name}: cond must be class labels, (N,) int64 or an int, got "
                         f"{type(cond).__name__} {list(getattr(cond, 'shape', []))}")
    if cond.shape[0] != n:
        raise ValueError(f"{name}.sample: cond has batch {cond.shape[0]}, but {n} were asked for")
    if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= num_classes):
        raise ValueError(f"{name}: class labels must lie in [0, {num_classes}), got range "
                         f"[{int(cond.min())}, {int(cond.max())}]")
    return cond.to(device)


class AutoregressiveModel(nn.Module):
    """Base of every model on the generation protocol (see the module docstring)."""

    def nll(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def sequence(self, n=None, shape=None, cond=None):
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Log-likelihood per example in nats, (N,)."""
        return -self.nll(x, cond)

    def bits_per_dim(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Negative log2-likelihood per dimension, per example, (N,): nll / (D ln 2), D = values an example holds."""
        return self.nll(x, cond) / (math.prod(x.shape[1:]) * math.log(2.0))

    def loss(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Mean NLL per example in nats (a scalar to minimise)."""
        nll = self.nll(x, cond)
        if not nll.numel():
            raise ValueError(f"{type(self).__name__}.loss: the batch is empty (a mean over no examples is undefined)")
        return nll.mean()

    @torch.no_grad()
    def sample(self, n: int | None = None, shape=None, cond=None, generator: torch.Generator | None = None,
               temperature: float = 1.0, method: str = "cached", prefix: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, progress: bool = True, **engine):
        """Draw n examples through :func:`fastar.sampling.sample`, on the model's device.

        shape: one example's shape (images (H, W) or (C, H, W); audio (T,)), taken from ``prefix``
        when omitted. cond: the conditioning the model was built for. prefix (in the layout this
        returns) with mask (bool, broadcastable to it, True = given): the given values are kept,
        the others drawn conditioned on every earlier one (e.g. mask[..., :H // 2, :] = True
        completes the bottom half of images). method: "cached" (the model's cache) or "naive" (a
        full forward pass per step); both consume the same uniforms from ``generator`` up front, so
        they return the same values. temperature 0 is the mode of every step. ``engine``: the
        engine's options (``prime`` for sequence models, ``fused``, ``cuda_graphs``,
        ``return_params``).
        """
        from fastar import sampling

        return sampling.sample(self, n=n, shape=shape, cond=cond, generator=generator, temperature=temperature,
                               method=method, prefix=prefix, mask=mask, progress=progress, **engine)
