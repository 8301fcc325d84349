"""Image grids and image files for discrete image models (Pillow).

``save_image_grid(images, path, levels, nrow=None, pad=2, scale=1)``: images (N, C, H, W)
integer values in [0, levels) (C = 1 grey/binary or 3 RGB, any device) -> one PNG, the
images tiled row-major ``nrow`` per row (default ceil(sqrt(N))) on a grey background,
each pixel value v shown as round(v * 255 / (levels - 1)). ``scale`` enlarges each pixel
(nearest neighbour) so 8x8 digits stay visible.

``load_image(path, channels, levels, size)``: a PNG/JPEG -> (1, C, H, W) int64 in
[0, levels), grey ("L") or RGB, each 8-bit value v quantised to v * levels // 256 (so a
binary model reads v >= 128 as 1). ``size`` (H, W) must match the image exactly: a
mismatch is a ValueError naming both sizes (fastar never resizes a prefix silently).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["save_image_grid", "load_image", "to_uint8"]


def to_uint8(images: torch.Tensor, levels: int) -> np.ndarray:
    """(N, C, H, W) integers in [0, levels) -> (N, H, W, C) uint8 in [0, 255]."""
    x = images.detach().to("cpu", torch.float64).clamp(0, levels - 1) * (255.0 / (levels - 1))
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(images: torch.Tensor, path, levels: int, nrow: int | None = None, pad: int = 2,
                    scale: int = 1) -> str:
    """Write images (N, C, H, W) in [0, levels) as one PNG grid; returns the path."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid: images must be (N, 1 or 3, H, W), got shape "
                         f"{list(getattr(images, 'shape', []))}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("save_image_grid: no images to write (N = 0)")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pix = to_uint8(images, levels)
    if scale > 1:
        pix = pix.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = pix[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, "L" if c == 1 else "RGB")
    d = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(d, exist_ok=True)
    img.save(str(path))
    return str(path)


def load_image(path, channels: int, levels: int, size: tuple[int, int]) -> torch.Tensor:
    """Read one image file as (1, channels, H, W) int64 in [0, levels); see the module docstring."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    if (img.height, img.width) != tuple(size):
        raise ValueError(f"{path} is {img.height}x{img.width} (HxW), but the model draws {size[0]}x{size[1]} "
                         f"images; give an image of exactly that size")
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.int64)
    if channels == 1:
        a = a[..., None]
    return torch.from_numpy(a * levels // 256).permute(2, 0, 1).unsqueeze(0).contiguous()
