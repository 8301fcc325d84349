"""Masked convolution at chosen positions, reading a cached input map: the op of cached sampling.

``masked_conv2d_at(x_cache, x_new, weight, bias, mask, pos, padding=None, dilation=1)``:

1. writes ``x_new[:, :, p]`` into ``x_cache[:, :, pos[p, 0], pos[p, 1]]`` **in place** (skipped when
   ``x_new`` is None): the new value of the layer's input at the position being generated;
2. returns the masked convolution's output at those positions only::

       masked_conv2d(x_cache, weight, bias, mask, padding, dilation)[:, :, pos[:, 0], pos[:, 1]]

Shapes: x_cache (N, C_in, H, W), any strides (it must be writable); x_new (N, C_in, P) or None;
weight, mask (C_out, C_in, kH, kW); bias (C_out,) or None; pos (P, 2) int64 (row, column) pairs
on the cache's device, or a (2,) tensor for one position; the result is (N, C_out, P), contiguous.
``padding=None`` means "same" padding. Positions must lie inside the map: on CPU kernel and
reference raise; on CUDA neither can check without a host sync, so both skip an outside
position's write and read its out-of-map taps as zero padding. Taps the mask kills for every
channel pair are never read (the family's NaN rule, see :mod:`fastar.ops.masked_conv`).

Because ``pos`` is a device tensor, a sampling step built on this op has no host-device
synchronisation and can be captured in a CUDA graph. The op mutates its cache, so it is not
differentiable (sampling runs under ``torch.no_grad``). Devices and dtypes: CPU kernel
float32/float64; CUDA kernel float32, float64, float16, bfloat16 (accumulating in float32).
Other dtypes run on the reference under the "auto" backend.
"""
from __future__ import annotations

import torch

from fastar import _backend
from fastar.ops._common import check_same_device, check_tensor, host_checkable
from fastar.ops.masked_conv import _check_args as _check_conv_args
from fastar.ops.masked_conv import live_taps

__all__ = ["masked_conv2d_at", "masked_conv2d_at_ref", "bind_masked_conv2d_at"]

KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _check_args(op, x_cache, x_new, weight, bias, mask, pos, padding, dilation):
    check_tensor(op, "x_cache", x_cache, dim=4, layout="(N, C_in, H, W)")
    padding, dilation = _check_conv_args(op, x_cache, weight, bias, mask, padding, dilation)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{op}: pos must be an int64 tensor of (row, column) pairs, got {type(pos).__name__}")
    if pos.dtype != torch.int64:
        raise TypeError(f"{op}: pos must be int64, got {pos.dtype}")
    if pos.dim() == 1 and pos.shape[0] == 2:
        pos = pos.view(1, 2)
    if pos.dim() != 2 or pos.shape[1] != 2:
        raise ValueError(f"{op}: pos must be (P, 2) or (2,) holding (row, column) pairs, got shape {list(pos.shape)}")
    check_same_device(op, x_cache=x_cache, pos=pos)
    if x_new is not None:
        check_tensor(op, "x_new", x_new, dim=3, layout="(N, C_in, P)")
        want = [x_cache.shape[0], x_cache.shape[1], pos.shape[0]]
        if list(x_new.shape) != want:
            raise ValueError(f"{op}: x_new must be (N, C_in, P) = {want}, got {list(x_new.shape)}")
        if x_new.dtype != x_cache.dtype:
            raise TypeError(f"{op}: x_new dtype {x_new.dtype} must match x_cache dtype {x_cache.dtype}")
        check_same_device(op, x_cache=x_cache, x_new=x_new)
    return pos, padding, dilation


def _ref_impl(x_cache, x_new, weight, bias, mask, pos, padding, dilation):
    rows, cols = pos[:, 0], pos[:, 1]
    n, c_in, h, w = x_cache.shape
    c_out, _, kh, kw = weight.shape
    h_out = h + 2 * padding[0] - dilation[0] * (kh - 1)
    w_out = w + 2 * padding[1] - dilation[1] * (kw - 1)
    if host_checkable(pos):
        # The CPU kernel's check, sentence for sentence (a negative index would wrap to row H - 1).
        bad = (rows < 0) | (rows >= min(h, h_out)) | (cols < 0) | (cols >= min(w, w_out))
        if pos.numel() and bool(bad.any()):
            p = int(bad.nonzero()[0, 0])
            raise ValueError(f"masked_conv2d_at: position {p} ({int(rows[p])}, {int(cols[p])}) lies outside the "
                             f"{h}x{w} map (output {h_out}x{w_out})")
        if x_new is not None:
            x_cache[:, :, rows, cols] = x_new
    elif x_new is not None:
        # On CUDA nothing can be checked without a sync: as the CUDA kernel does, an outside
        # position's write is skipped and its taps read zero padding.
        valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        rc, cc = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        x_cache[:, :, rc, cc] = torch.where(valid, x_new, x_cache[:, :, rc, cc])
    # Taps around each position; those outside the map read zero padding.
    dy = torch.arange(kh, device=pos.device) * dilation[0] - padding[0]
    dx = torch.arange(kw, device=pos.device) * dilation[1] - padding[1]
    ii = rows[:, None, None] + dy[None, :, None]                     # (P, kH, 1)
    jj = cols[:, None, None] + dx[None, None, :]                     # (P, 1, kW)
    inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)             # (P, kH, kW)
    read = inside & live_taps(mask)                                  # dead taps are never read
    patches = x_cache[:, :, ii.clamp(0, h - 1), jj.clamp(0, w - 1)]  # (N, C_in, P, kH, kW)
    # A select, not a product: the clamped read of a padding tap (or a dead tap) may hold NaN.
    patches = torch.where(read, patches, x_cache.new_zeros(()))
    out = torch.einsum("ncpyx,ocyx->nop", patches, weight * mask.to(weight.dtype))
    if bias is not None:
        out = out + bias[None, :, None]
    return out.contiguous()


def masked_conv2d_at_ref(x_cache, x_new, weight, bias, mask, pos, padding=None, dilation=1):
    """Reference of :func:`masked_conv2d_at` in plain PyTorch (any device and dtype); writes x_cache in place."""
    pos, padding, dilation = _check_args("masked_conv2d_at_ref", x_cache, x_new, weight, bias, mask, pos, padding,
                                         dilation)
    return _ref_impl(x_cache, x_new, weight, bias, mask, pos, padding, dilation)


def masked_conv2d_at(x_cache, x_new, weight, bias, mask, pos, padding=None, dilation=1):
    """Write ``x_new`` into ``x_cache`` at ``pos`` (in place), return the masked conv output there: (N, C_out, P).

    The one-line PyTorch equivalent (after the write) is
    ``F.conv2d(x_cache, weight * mask, bias, 1, padding, dilation)[:, :, pos[:, 0], pos[:, 1]]``.
    See the module docstring for shapes, devices and dtypes.
    """
    pos, padding, dilation = _check_args("masked_conv2d_at", x_cache, x_new, weight, bias, mask, pos, padding,
                                         dilation)
    if _backend.use_kernel("masked_conv2d_at", x_cache.device, x_cache.dtype, KERNEL_DTYPES):
        return torch.ops.fastar.masked_conv2d_at(x_cache, x_new, weight, bias, mask, pos, padding, dilation)
    return _ref_impl(x_cache, x_new, weight, bias, mask, pos, padding, dilation)


def bind_masked_conv2d_at(x_cache, weight, bias, mask, padding=None, dilation=1):
    """:func:`masked_conv2d_at` with everything but ``x_new`` and ``pos`` fixed and checked once:
    returns ``fn(x_new, pos) -> (N, C_out, P)``. For decode loops, where a step's few microseconds of
    arithmetic are less than re-checking every argument in Python would cost. The backend
    (kernel or reference) is chosen at binding time."""
    pos0 = torch.zeros(1, 2, dtype=torch.int64, device=x_cache.device)
    _, padding, dilation = _check_args("masked_conv2d_at", x_cache, None, weight, bias, mask, pos0, padding, dilation)
    if _backend.use_kernel("masked_conv2d_at", x_cache.device, x_cache.dtype, KERNEL_DTYPES):
        op = torch.ops.fastar.masked_conv2d_at
    else:
        op = _ref_impl

    def fn(x_new, pos):
        return op(x_cache, x_new, weight, bias, mask, pos, padding, dilation)

    return fn


# Registrations only when this build of _C has the ops (a stale build falls back to the reference).
if _backend.has_ops("masked_conv2d_at"):

    @torch.library.register_fake("fastar::masked_conv2d_at")
    def _masked_conv2d_at_fake(x_cache, x_new, weight, bias, mask, pos, padding, dilation):
        return x_cache.new_empty((x_cache.shape[0], weight.shape[0], pos.shape[0]))
