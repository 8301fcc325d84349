"""32x32 RGB patches of the two real photos bundled with scikit-learn (``load_sample_images``).

``load_patches(levels=256, size=32) -> images``: (N, 3, size, size) int64 in [0, levels),
the non-overlapping size x size tiles of "china.jpg" then "flower.jpg" (427x640 each,
so 13 x 20 = 260 tiles per photo at size 32, 520 in all), row-major, with the ragged
border dropped. Each 8-bit value v becomes v * levels // 256 (levels=256 keeps it).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_patches"]


def load_patches(levels: int = 256, size: int = 32) -> torch.Tensor:
    """(N, 3, size, size) int64 patches in [0, levels); see the module docstring."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise FileNotFoundError("the photos ship with scikit-learn, which is not installed: "
                                "run `pip install scikit-learn`") from None
    out = []
    for img in load_sample_images().images:
        a = np.asarray(img, dtype=np.int64)
        h, w = a.shape[0] // size, a.shape[1] // size
        t = a[:h * size, :w * size].reshape(h, size, w, size, 3).transpose(0, 2, 4, 1, 3)
        out.append(t.reshape(h * w, 3, size, size))
    x = torch.from_numpy(np.concatenate(out))
    return x * levels // 256
