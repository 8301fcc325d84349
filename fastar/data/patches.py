"""32x32 RGB patches of the real colour photos bundled with scikit-learn and scikit-image.

``load_patches(levels=256, size=32, with_source=False) -> images [, photo index]``: (N, 3, size,
size) int64 in [0, levels), the non-overlapping size x size tiles of each photo below, row-major
within a photo, the ragged border dropped. Each 8-bit value v becomes v * levels // 256 (levels=256
keeps it). ``with_source=True`` also returns each tile's photo index (N,) (the data set holds out the
last tiles of every photo, so the held-out part is not one photo).

The photos and their tiles at size 32 (2,816 in all):

=========================================  ==========  =====
photo                                      size        tiles
=========================================  ==========  =====
scikit-learn ``china.jpg``                 427 x 640   260
scikit-learn ``flower.jpg``                427 x 640   260
scikit-image ``astronaut``                 512 x 512   256
scikit-image ``coffee``                    400 x 600   216
scikit-image ``chelsea`` (a cat)           300 x 451   126
scikit-image ``rocket``                    427 x 640   260
scikit-image ``hubble_deep_field``         872 x 1000  837
scikit-image ``immunohistochemistry``      512 x 512   256
scikit-image ``stereo_motorcycle`` (left)   500 x 741   345
=========================================  ==========  =====

scikit-image ships these files inside its wheel (no download). Without scikit-image only the two
scikit-learn photos are used (520 tiles); :data:`PHOTOS` lists the names.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_patches", "PHOTOS", "SKIMAGE_PHOTOS"]

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "stereo_motorcycle")
PHOTOS = ("china", "flower") + SKIMAGE_PHOTOS


def _photos():
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise FileNotFoundError("the photos ship with scikit-learn, which is not installed: "
                                "run `pip install scikit-learn`") from None
    out = list(load_sample_images().images)
    try:
        import skimage.data as skd
    except ImportError:
        return out
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(skd, name)()
        except Exception:          # an older scikit-image without the photo, or a file missing: skip it
            continue
        img = img[0] if isinstance(img, tuple) else img      # the stereo pair: its left view
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(np.asarray(img)[:, :, :3])
    return out


def load_patches(levels: int = 256, size: int = 32, with_source: bool = False):
    """(N, 3, size, size) int64 patches in [0, levels) (and their photo index); see the module docstring."""
    out, src = [], []
    for k, img in enumerate(_photos()):
        a = np.asarray(img, dtype=np.int64)
        h, w = a.shape[0] // size, a.shape[1] // size
        t = a[:h * size, :w * size].reshape(h, size, w, size, 3).transpose(0, 2, 4, 1, 3)
        out.append(t.reshape(h * w, 3, size, size))
        src.append(np.full(h * w, k, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(out)) * levels // 256
    return (x, torch.from_numpy(np.concatenate(src))) if with_source else x
