"""The 1,797 real 8x8 handwritten digits of ``sklearn.datasets.load_digits`` (bundled with scikit-learn).

``load_digits_8x8(levels=2) -> (images, labels)``: images (1797, 1, 8, 8) int64 in
[0, levels), labels (1797,) int64 in [0, 10). The raw pixels are 17 grey levels (0..16).
levels=2 binarises: a pixel is 1 when its value is >= 8 (half ink), the same half-way
rule as binary MNIST. levels=17 keeps the raw values. Any other levels scales
v -> round(v * (levels - 1) / 16) (levels=256 gives 0, 16, ..., 255 spaced evenly).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_digits_8x8"]


def load_digits_8x8(levels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) int64 in [0, levels), labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FileNotFoundError("the 8x8 digits ship with scikit-learn, which is not installed: "
                                "run `pip install scikit-learn`") from None
    d = load_digits()
    raw = torch.from_numpy(np.asarray(d.images, dtype=np.float64)).view(-1, 1, 8, 8)
    if levels == 2:
        x = (raw >= 8).to(torch.int64)
    elif levels == 17:
        x = raw.to(torch.int64)
    else:
        x = torch.round(raw * (levels - 1) / 16.0).to(torch.int64)
    return x, torch.from_numpy(np.asarray(d.target, dtype=np.int64))
