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


def reference_grads(fn, inputs, need, grad):
    """Gradients of ``fn(*inputs)`` against ``grad`` by autograd through a reference, keeping the graph.

    The compiled backward ops have no derivative of their own, so a backward asked for with
    ``create_graph=True`` (a gradient penalty, a Hessian-vector product) is computed here instead:
    slower, but its result can be differentiated again. Returns one gradient (or None) per input.
    """
    with torch.enable_grad():
        leaves = [t if n else (t.detach() if isinstance(t, torch.Tensor) else t) for t, n in zip(inputs, need)]
        out = fn(*leaves)
        wrt = [t for t, n in zip(leaves, need) if n]
        got = iter(torch.autograd.grad(out, wrt, grad, create_graph=True, allow_unused=True)) if wrt else iter(())
    res = []
    for t, n in zip(leaves, need):
        if not n:
            res.append(None)
            continue
        g = next(got)
        res.append(torch.zeros_like(t) if g is None else g)
    return res


def no_double_backward(op: str):
    """An autograd formula for a backward op: differentiating it again must be loud, never zeros."""

    def _backward(ctx, *grads):
        raise RuntimeError(f"fastar::{op} has no derivative of its own. Call the public function (its backward "
                           f"switches to the reference when create_graph=True), or run under "
                           f"`with fastar.backend('reference'):` for higher-order gradients.")

    return _backward


def host_checkable(t) -> bool:
    """Whether a data-dependent check of t is free of a host-device sync and of a graph break:
    CPU tensors outside torch.compile. On CUDA such a check would stall every call (and break
    CUDA-graph capture of a sampling step), so there the kernels' documented behaviour stands."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_uniforms(op: str, name: str, u) -> None:
    """Given noise must hold uniforms in [0, 1) (NaN is not one); see host_checkable for where it runs."""
    if u is None or not host_checkable(u) or u.numel() == 0:
        return
    ok = bool(((u >= 0) & (u < 1)).all())
    if not ok:
        bad = u[~((u >= 0) & (u < 1))].flatten()[0].item()
        raise ValueError(f"{op}: {name} must hold uniforms in [0, 1), got a value {bad!r}")


def check_temperature(op: str, temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ValueError(f"{op}: temperature must be a finite non-negative number, got {temperature!r}")


def check_dim_arg(op: str, dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim {dim} is out of range for a tensor with {ndim} dimensions")
    return dim % ndim
