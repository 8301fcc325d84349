"""Argument helpers shared by the op families (Python side)."""
from __future__ import annotations

import torch


def pair(value, name: str, op: str) -> tuple[int, int]:
    """An int or a pair of ints as a 2-tuple of Python ints, with a clear error otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def check_tensor(op: str, name: str, t, *, dim: int | None = None, layout: str = "",
                 floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D{' ' + layout if layout else ''}, got shape {list(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(op: str, **tensors) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    devices = {v.device for _, v in named}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in named)
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
