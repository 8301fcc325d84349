"""The shared base of the fully-visible density estimators (MADE, NADE, RNADE): models of one fixed
example shape whose D values are flattened in C order (``x.reshape(N, D)``), discrete codes or
real values. A family built here writes ``forward`` / ``nll`` / ``sequence``; this gives the checks
every one of them shares (the example's shape, codes in [0, levels), finite reals, the sample's n and
shape) so their errors read alike.
"""
from __future__ import annotations

import math

import torch

from fastar.models.base import AutoregressiveModel, check_positive_int

__all__ = ["FlatModel", "check_shape_arg"]


def check_shape_arg(name: str, in_features: int, shape) -> tuple:
    """The example shape of a model of ``in_features`` values: (in_features,) by default, or any tuple of
    positive ints whose product is in_features (e.g. (1, 28, 28) for an image model)."""
    if shape is None:
        return (in_features,)
    if isinstance(shape, int) or not isinstance(shape, (tuple, list)) or not shape \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{name}: shape must be a tuple of positive ints, got {shape!r}")
    if math.prod(shape) != in_features:
        raise ValueError(f"{name}: shape {tuple(shape)} holds {math.prod(shape)} values, but in_features is "
                         f"{in_features}")
    return tuple(shape)


class FlatModel(AutoregressiveModel):
    """Base: ``self.shape`` (one example), ``self.in_features`` (D), ``self.levels`` (None = real values)."""

    shape: tuple
    in_features: int
    levels: int | None

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """Check x and return it as (N, D): int64 codes for a discrete model, real values otherwise."""
        name = type(self).__name__
        want = ", ".join(map(str, self.shape))
        what = f"integer codes in [0, {self.levels})" if self.levels else "real values"
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.shape or x.dim() != len(self.shape) + 1:
            raise ValueError(f"{name}: x must be a batch (N, {want}) of {what}, got shape "
                             f"{list(getattr(x, 'shape', []))}")
        if self.levels is None:
            if not x.is_floating_point():
                raise ValueError(f"{name}: x must hold real values (floats), got {x.dtype}")
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: x must be finite, got NaN or inf")
            return x.reshape(x.shape[0], self.in_features)
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{name}: x must hold integer codes in [0, {self.levels}), got {x.dtype}")
        if x.is_floating_point():
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: x must hold integer codes in [0, {self.levels}), got NaN or inf")
            if not torch.equal(x, x.round()):
                raise ValueError(f"{name}: x must hold integer codes in [0, {self.levels}), got non-integer values")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"{name}: x values must lie in [0, {self.levels}), got range "
                             f"[{int(x.min())}, {int(x.max())}]")
        return x.reshape(x.shape[0], self.in_features).to(torch.int64)

    @staticmethod
    def no_cond(name, cond):
        if cond is not None:
            raise ValueError(f"{name} is unconditional; cond must be None")

    def sample_args(self, n, shape, cond):
        """(n, shape) of a sampling call, checked. shape: None, the model's example shape, or (an image
        model) its last two sizes (H, W)."""
        name = type(self).__name__
        self.no_cond(name, cond)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
        if shape is not None:
            ok = isinstance(shape, (tuple, list, torch.Size)) and all(
                isinstance(s, int) and not isinstance(s, bool) for s in shape)
            shape = tuple(shape) if ok else shape
            if not ok or not (shape == self.shape or (len(self.shape) == 3 and shape == self.shape[1:])):
                raise ValueError(f"{name}.sample: this model draws examples of shape {self.shape}, got shape "
                                 f"{shape!r}")
        return n, self.shape


def positive(name, what, v):
    return check_positive_int(name, what, v)
