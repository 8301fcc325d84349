"""Causal masks for masked convolutions (PixelCNN, Gated PixelCNN).

Every builder returns a float tensor of shape (out_channels, in_channels, kH, kW)
to multiply into a convolution weight of the same shape.

Ordering. Pixels are generated in raster order (row by row, left to right); with
``color_groups=3`` each pixel is generated as R, then G, then B. Channels are split
into three *contiguous blocks*: channel ``c`` of a layer with ``C`` channels belongs
to group ``c // (C // 3)`` (0 = R, 1 = G, 2 = B), so an RGB input is simply
``[R, G, B]`` and a 3*256-way output layer is ``[R logits | G logits | B logits]``.

At the centre tap, an output group sees the input groups *before* it for mask A
(used by the first layer, so a sub-pixel never sees itself) and the groups *up to
and including* it for mask B (every later layer). Taps above the centre row and
left of the centre in the centre row are fully connected; all others are zero.
"""
from __future__ import annotations

import torch

__all__ = ["causal_mask", "mask_a", "mask_b", "vertical_mask", "horizontal_mask", "channel_groups"]


def _check_kernel_size(kernel_size) -> tuple[int, int]:
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) for k in ks):
        raise ValueError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}")
    if any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"causal masks need an odd kernel size (the centre tap is the current pixel), "
                         f"got {kernel_size!r}")
    return ks


def _check_channels(out_channels: int, in_channels: int, color_groups: int) -> None:
    if color_groups not in (1, 3):
        raise ValueError(f"color_groups must be 1 or 3, got {color_groups!r}")
    for name, c in (("out_channels", out_channels), ("in_channels", in_channels)):
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"{name} must be a positive int, got {c!r}")
        if c % color_groups:
            raise ValueError(f"with color_groups={color_groups}, {name} must be divisible by {color_groups} "
                             f"(R, G, B blocks of equal size), got {c}")


def channel_groups(channels: int, color_groups: int = 1) -> torch.Tensor:
    """The colour group (0, 1, 2) of each of `channels` channels: contiguous equal blocks."""
    _check_channels(channels, channels, color_groups)
    return torch.arange(channels) // (channels // color_groups)


def causal_mask(mask_type: str, out_channels: int, in_channels: int, kernel_size=3, color_groups: int = 1,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PixelCNN raster-order mask of type "A" (excludes the current sub-pixel) or "B" (includes it).

    Returns (out_channels, in_channels, kH, kW). See the module docstring for the channel order.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = _check_kernel_size(kernel_size)
    _check_channels(out_channels, in_channels, color_groups)
    m = torch.zeros(out_channels, in_channels, kh, kw, dtype=dtype)
    ch, cw = kh // 2, kw // 2
    m[:, :, :ch, :] = 1
    m[:, :, ch, :cw] = 1
    g_out = channel_groups(out_channels, color_groups)[:, None]
    g_in = channel_groups(in_channels, color_groups)[None, :]
    centre = (g_in < g_out) if mask_type == "A" else (g_in <= g_out)
    m[:, :, ch, cw] = centre.to(dtype)
    return m


def mask_a(out_channels: int, in_channels: int, kernel_size=7, color_groups: int = 1,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PixelCNN mask A (first layer): the current sub-pixel is hidden. (C_out, C_in, kH, kW)."""
    return causal_mask("A", out_channels, in_channels, kernel_size, color_groups, dtype)


def mask_b(out_channels: int, in_channels: int, kernel_size=3, color_groups: int = 1,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PixelCNN mask B (later layers): the current sub-pixel's own group is visible. (C_out, C_in, kH, kW)."""
    return causal_mask("B", out_channels, in_channels, kernel_size, color_groups, dtype)


def vertical_mask(out_channels: int, in_channels: int, kernel_size=3,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gated PixelCNN vertical stack: a k x k kernel that sees the rows above *and the current row*.

    Returns (C_out, C_in, k, k) with rows 0..k//2 set. Because the current row is
    included (so stacked vertical layers lose no row), the vertical stack's output
    must be shifted down by one row before it feeds the horizontal stack; that
    shift is what makes the combination causal and free of the PixelCNN blind spot.
    """
    kh, kw = _check_kernel_size(kernel_size)
    _check_channels(out_channels, in_channels, 1)
    m = torch.zeros(out_channels, in_channels, kh, kw, dtype=dtype)
    m[:, :, : kh // 2 + 1, :] = 1
    return m


def horizontal_mask(out_channels: int, in_channels: int, kernel_size=3, mask_type: str = "B",
                    color_groups: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gated PixelCNN horizontal stack: a 1 x k kernel over the current row's left part.

    Returns (C_out, C_in, 1, k): taps left of the centre set, the centre tap by the
    mask A/B colour-group rule (A in the first layer, B after), taps to the right zero.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    if not isinstance(kernel_size, int):
        raise ValueError(f"horizontal_mask takes an int kernel_size (the 1 x k width), got {kernel_size!r}")
    _, kw = _check_kernel_size(kernel_size)
    return causal_mask(mask_type, out_channels, in_channels, (1, kw), color_groups, dtype)
