"""Masked 2-D convolution: the op family behind PixelCNN-style layers.

``masked_conv2d(x, weight, bias, mask, padding, dilation)`` computes exactly::

    F.conv2d(x, weight * mask, bias, stride=1, padding=padding, dilation=dilation)

Shapes: x (N, C_in, H, W) in any memory layout (contiguous, channels-last, strided);
weight and mask (C_out, C_in, kH, kW); bias (C_out,) or None; the result is
(N, C_out, H + 2*pad_h - dil_h*(kH-1), W + 2*pad_w - dil_w*(kW-1)), contiguous.
``padding=None`` means "same" padding, ``dil*(k-1)//2`` per side.

The mask is a constant (bool or floating; it is not differentiated). A tap the mask zeroes
for every channel pair (about half of a causal mask) is dead: kernels and reference never read
it, so a NaN or inf that only dead taps would see does not reach the output (for finite x the
result is exactly the F.conv2d above). Inside a live tap arithmetic is IEEE's (0 * NaN = NaN).
Devices and dtypes: CPU kernel float32/float64; CUDA kernel float32, float64,
float16, bfloat16 (half precision accumulates in float32). Other dtypes run on the
reference under the "auto" backend, and so do the CPU shapes where oneDNN's convolution
is faster than the kernel (small maps, few input channels: :func:`cpu_prefers_onednn`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.ops._common import (check_same_device, check_tensor, host_checkable, no_double_backward, pair,
                                reference_grads)

__all__ = ["masked_conv2d", "masked_conv2d_ref"]

KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


_MAX_EXTENT = 2 ** 31 - 1


def _check_args(op, x, weight, bias, mask, padding, dilation):
    check_tensor(op, "x", x, dim=4, layout="(N, C_in, H, W)")
    check_tensor(op, "weight", weight, dim=4, layout="(out, in, kH, kW)")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"{op}: mask must have the weight's shape {list(weight.shape)}, got {list(mask.shape)}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"{op}: mask must be bool or floating-point, got {mask.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1, layout="(out,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have length {weight.shape[0]} (out channels), got {bias.shape[0]}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match x dtype {x.dtype}")
    check_same_device(op, x=x, weight=weight, bias=bias, mask=mask)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} input channels but weight expects {weight.shape[1]} "
                         f"(weight shape {list(weight.shape)})")
    dilation = pair(dilation, "dilation", op)
    if min(dilation) < 1:
        raise ValueError(f"{op}: dilation must be at least 1, got {dilation}")
    kh, kw = weight.shape[2], weight.shape[3]
    if padding is None:
        padding = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
    padding = pair(padding, "padding", op)
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding}")
    # Padded extents index int64 storage in the kernels and allocate in the reference: refuse
    # sizes no map can have rather than overflow (an absurd dilation with "same" padding).
    for name, v in (("dilation", dilation), ("padding", padding)):
        if max(v) > _MAX_EXTENT:
            raise ValueError(f"{op}: {name} {v} is beyond any map this op can hold (at most {_MAX_EXTENT})")
    h_out = x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1)
    w_out = x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"{op}: the {kh}x{kw} kernel with dilation {dilation} does not fit the padded "
                         f"{x.shape[2]}x{x.shape[3]} input (padding {padding})")
    return list(padding), list(dilation)


def _autocast(x, weight, bias):
    """Under torch.autocast, cast like a convolution: x, weight and bias to the autocast dtype."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.is_floating_point():
            x = x.to(dtype)
            weight = weight.to(dtype) if isinstance(weight, torch.Tensor) and weight.is_floating_point() else weight
            bias = bias.to(dtype) if isinstance(bias, torch.Tensor) and bias.is_floating_point() else bias
    return x, weight, bias


def live_taps(mask):
    """(kH, kW) bool: the taps the mask keeps for at least one (out, in) channel pair (NaN counts
    as kept, NaN != 0). The other taps are never read, by the kernels or by the references."""
    return (mask != 0).flatten(0, 1).any(0)


def _masked_conv2d_taps(x, weight, bias, mask, padding, dilation):
    """The op's definition, tap by tap: sum over live taps t of (weight * mask)[:, :, t] @ x shifted by t.

    For finite x this is ``F.conv2d(x, weight * mask, bias, 1, padding, dilation)``. It differs where x
    holds NaN or inf: a dead tap (masked for every channel pair) is not an edge of the network, so what
    it would read never reaches the output, exactly as in the kernels, which skip dead taps. (A causal
    mask's future pixels cannot poison the present through 0 * NaN.) Within a live tap the products are
    IEEE's, so a pair masked inside a live tap still gives 0 * NaN = NaN, as the kernels' GEMMs do.
    No host reads (the live-tap selection is a ``where``), so it traces under torch.compile.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ph, pw = padding
    dh, dw = dilation
    h_out, w_out = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    w_eff = weight * mask.to(weight.dtype)
    live = live_taps(mask)
    xp = F.pad(x, (pw, pw, ph, ph))
    zero = x.new_zeros(())
    out = None
    for i in range(kh):
        for j in range(kw):
            view = xp[:, :, i * dh:i * dh + h_out, j * dw:j * dw + w_out]
            term = F.conv2d(torch.where(live[i, j], view, zero), w_eff[:, :, i:i + 1, j:j + 1])
            out = term if out is None else out + term
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out.contiguous()


def _masked_conv2d_def(x, weight, bias, mask, padding, dilation):
    """:func:`_masked_conv2d_taps`, by F.conv2d whenever that gives the same values: for finite x
    (the common case: one pass over x, about 12x faster than tap by tap on a 5x5 kernel). Under
    torch.compile the test would break the graph, so the traced tap-by-tap form is used; on CUDA
    the test costs one host sync per call (the reference only, never a kernel path)."""
    if not torch.compiler.is_compiling() and bool(torch.isfinite(x).all()):
        return F.conv2d(x, weight * mask.to(weight.dtype), bias, 1, padding, dilation)
    return _masked_conv2d_taps(x, weight, bias, mask, padding, dilation)


def masked_conv2d_ref(x, weight, bias, mask, padding=None, dilation=1):
    """Reference: ``F.conv2d(x, weight * mask, bias, 1, padding, dilation)`` for finite x; taps the mask
    kills for every channel pair are never read (see :func:`_masked_conv2d_taps`). Any device and dtype."""
    x, weight, bias = _autocast(x, weight, bias)
    padding, dilation = _check_args("masked_conv2d_ref", x, weight, bias, mask, padding, dilation)
    return _masked_conv2d_def(x, weight, bias, mask, padding, dilation)


# Where the CPU kernel beats F.conv2d(weight * mask) (oneDNN), measured on the 2-core box over
# batch 1-128 x {64->64 3x3 B 32x32, 3->66 7x7 A 32x32, 128->128 3x3 B 16x16, 32->32 5x5 B 28x28},
# forward and forward + backward (benchmarks/results/masked_conv-cpu.md has the benchmarked ones):
# the kernel's edge is skipping the dead taps in one stacked GEMM; its cost is the padded grid copy,
# so below ~4096 output pixels oneDNN wins (b1 0.44-0.91x, b2 0.6-1.1x); with 3 input channels the
# stacked K is too small for the forward (0.69-0.96x below batch 128) and the backward wins only from
# ~16k pixels (1.1-1.4x); at 32 input channels the backward is a toss-up (0.88-1.13x).
_KERNEL_MIN_PIXELS = 4096
_KERNEL_MIN_PIXELS_FEW_CHANNELS_GRAD = 16384


def cpu_prefers_onednn(x, weight, grad: bool) -> bool:
    """Whether, on CPU under the "auto" backend, F.conv2d(weight * mask) (oneDNN) is expected to be
    faster than the kernel for this call (a fixed rule of the shapes, so results never depend on a
    timing; ``grad``: a backward will follow)."""
    n, c_in = x.shape[0], x.shape[1]
    pixels = n * x.shape[2] * x.shape[3]
    if pixels < _KERNEL_MIN_PIXELS:
        return True
    if c_in < 16:
        return not (grad and pixels >= _KERNEL_MIN_PIXELS_FEW_CHANNELS_GRAD)
    return grad and c_in < 64


def masked_conv2d(x, weight, bias, mask, padding=None, dilation=1):
    """Masked convolution ``conv2d(x, weight * mask, bias)`` that skips fully masked taps.

    x: (N, C_in, H, W); weight, mask: (C_out, C_in, kH, kW); bias: (C_out,) or None;
    padding: int, pair or None ("same"); dilation: int or pair. Returns
    (N, C_out, H_out, W_out), contiguous. Differentiable in x, weight and bias.
    Runs the compiled kernel or the reference according to :func:`fastar.set_backend`.
    """
    x, weight, bias = _autocast(x, weight, bias)
    padding, dilation = _check_args("masked_conv2d", x, weight, bias, mask, padding, dilation)
    if _backend.use_kernel("masked_conv2d", x.device, x.dtype, KERNEL_DTYPES):
        if (x.device.type == "cpu" and _backend.get_backend() == "auto" and not torch.compiler.is_compiling()
                and cpu_prefers_onednn(x, weight, torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, weight, bias)))):
            return _masked_conv2d_def(x, weight, bias, mask, padding, dilation)
        return torch.ops.fastar.masked_conv2d(x, weight, bias, mask, padding, dilation)
    return _masked_conv2d_def(x, weight, bias, mask, padding, dilation)


# Registrations only when this build of _C has the ops (a stale build falls back to the reference).
if _backend.has_ops("masked_conv2d", "masked_conv2d_backward"):

    def _out_shape(x, weight, padding, dilation):
        n, _, h, w = x.shape
        c_out, _, kh, kw = weight.shape
        return (n, c_out, h + 2 * padding[0] - dilation[0] * (kh - 1), w + 2 * padding[1] - dilation[1] * (kw - 1))

    @torch.library.register_fake("fastar::masked_conv2d")
    def _masked_conv2d_fake(x, weight, bias, mask, padding, dilation):
        return x.new_empty(_out_shape(x, weight, padding, dilation))

    @torch.library.register_fake("fastar::masked_conv2d_backward")
    def _masked_conv2d_backward_fake(grad_out, x, weight, mask, padding, dilation, output_mask):
        gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
        gw = weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
        gb = grad_out.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
        return gx, gw, gb

    def _setup_context(ctx, inputs, output):
        x, weight, bias, mask, padding, dilation = inputs
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        ctx.padding, ctx.dilation = padding, dilation

    def _eager_host(x):
        # a real CPU tensor, not one being traced (fake / functional under aot or opcheck)
        return host_checkable(x) and torch._guards.detect_fake_mode(x) is None and \
            not torch._C._functorch.is_functorch_wrapped_tensor(x) and not torch._is_functional_tensor(x)

    def _backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's backward has no derivative, so differentiate the
            # reference instead (same values; a graph a second backward can walk).
            bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device) if ctx.has_bias else None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                bias.requires_grad_(True)
            gx, gw, gb = reference_grads(
                lambda x_, w_, b_: _masked_conv2d_def(x_, w_, b_, mask, ctx.padding, ctx.dilation),
                (x, weight, bias), need, grad)
            return gx, gw, gb, None, None, None
        gx, gw, gb = torch.ops.fastar.masked_conv2d_backward(
            grad.contiguous(), x, weight, mask, ctx.padding, ctx.dilation, need)
        if need[1] and _eager_host(x) and not bool(torch.isfinite(x).all()):
            # The kernel's weight gradient multiplies every x on its padded grid by grad_out, zero at
            # positions no output reads: 0 * NaN there would poison taps that never saw the NaN. With a
            # non-finite x the weight gradient is the reference's (found by `fastar check`).
            gw = reference_grads(lambda w_: _masked_conv2d_def(x, w_, None, mask, ctx.padding, ctx.dilation),
                                 (weight,), [True], grad)[0].detach()
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None, None)

    torch.library.register_autograd("fastar::masked_conv2d", _backward, setup_context=_setup_context)

    def _no_setup(ctx, inputs, output):
        pass

    torch.library.register_autograd("fastar::masked_conv2d_backward", no_double_backward("masked_conv2d_backward"),
                                    setup_context=_no_setup)
