"""Model and data-set registries for the command line, training and checkpoints.

A model is named by a short key (``pixelcnn``, ``gated_pixelcnn``, ``wavenet``; case,
``-`` and ``_`` are ignored, so ``GatedPixelCNN`` works) and built from a plain dict of
constructor keyword arguments, its *config*, which checkpoints store so a model can be
rebuilt without the code that trained it. Classes are looked up on ``fastar.models`` at
use time, so a model family that lands later (WaveNet) is wired in without touching this
file, and a build without it says so in one line.

A data set is named ``mnist``, ``digits``, ``patches`` or ``speech``; :func:`load_dataset`
returns a :class:`Dataset` with a fixed train / held-out split (the last ``holdout``
fraction, in file order, so every run and every rank holds the same split).
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

__all__ = ["MODELS", "DATASETS", "canonical_model", "model_class", "build_model", "default_config",
           "load_dataset", "Dataset"]

# key -> (module, class, kind); kind "image" models take (N, C, H, W) integer images,
# "audio" models (B, T) mu-law codes.
MODELS = {
    "pixelcnn": ("fastar.models", "PixelCNN", "image"),
    "gated_pixelcnn": ("fastar.models", "GatedPixelCNN", "image"),
    "wavenet": ("fastar.models", "WaveNet", "audio"),
}
DATASETS = {"mnist": "image", "digits": "image", "patches": "image", "speech": "audio"}


def canonical_model(name: str) -> str:
    """'GatedPixelCNN' / 'gated-pixelcnn' -> 'gated_pixelcnn'; ValueError for an unknown model."""
    key = str(name).lower().replace("-", "").replace("_", "")
    for k in MODELS:
        if k.replace("_", "") == key:
            return k
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def model_class(name: str):
    """The class of a registered model; ValueError when this build of fastar lacks it."""
    key = canonical_model(name)
    mod, cls, _ = MODELS[key]
    c = getattr(importlib.import_module(mod), cls, None)
    if c is None:
        raise ValueError(f"model {key!r} ({mod}.{cls}) is not part of this build of fastar")
    return c


def model_kind(name: str) -> str:
    return MODELS[canonical_model(name)][2]


def build_model(name: str, config: dict) -> torch.nn.Module:
    """Instantiate a registered model from its config dict (constructor keyword arguments)."""
    try:
        return model_class(name)(**config)
    except TypeError as e:
        raise ValueError(f"cannot build {canonical_model(name)} from config {config}: {e}") from None


def default_config(name: str, data: "Dataset") -> dict:
    """A small default config of model `name` for data set `data` (CPU-friendly sizes)."""
    key = canonical_model(name)
    if MODELS[key][2] != data.kind:
        raise ValueError(f"model {key!r} takes {MODELS[key][2]} data, but data set {data.name!r} is {data.kind}; "
                         f"use " + ("pixelcnn or gated_pixelcnn" if data.kind == "image" else "wavenet")
                         + f" with --data {data.name}")
    if data.kind == "audio":
        return dict(layers=10, stacks=1, residual_channels=32, dilation_channels=32, skip_channels=64,
                    quantization=256)
    c = data.shape[0]
    cfg = dict(in_channels=c, levels=data.levels, layers=6, channels=32 if c == 1 else 48)
    if key == "pixelcnn":
        cfg["layers"] = 4
    return cfg


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

    def info(self) -> dict:
        """What a checkpoint records about the data (enough to sample without loading it)."""
        return dict(name=self.name, kind=self.kind, levels=self.levels, shape=list(self.shape),
                    num_classes=self.num_classes, sample_rate=self.sample_rate)


def _split(x, labels, holdout):
    n_test = max(1, int(round(len(x) * holdout)))
    n = len(x) - n_test
    return x[:n], x[n:], (None if labels is None else labels[:n]), (None if labels is None else labels[n:])


def load_dataset(name: str, levels: int | None = None, holdout: float = 0.1, segment: int = 4096,
                 sample_rate: int = 16000) -> Dataset:
    """Load a bundled real data set by name; see the module docstring and each loader's docstring.

    levels: 2 (binary) by default for mnist and digits, 256 for patches; speech is always 256
    mu-law levels. segment: the length of the audio training segments (samples).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    if name == "mnist":
        from fastar.data.mnist import load_mnist_5k

        levels = levels or 2
        x, y = load_mnist_5k(binarize=(levels == 2))
        x = x.to(torch.int64)
        if levels not in (2, 256):
            x = x * levels // 256
        return Dataset("mnist", "image", levels, (1, 28, 28), *_split(x, y, holdout), num_classes=10)
    if name == "digits":
        from fastar.data.digits import load_digits_8x8

        levels = levels or 2
        x, y = load_digits_8x8(levels)
        return Dataset("digits", "image", levels, (1, 8, 8), *_split(x, y, holdout), num_classes=10)
    if name == "patches":
        from fastar.data.patches import load_patches

        levels = levels or 256
        x = load_patches(levels)
        return Dataset("patches", "image", levels, tuple(x.shape[1:]), *_split(x, None, holdout))
    # speech: lazily, from the WaveNet issue's loader
    if levels not in (None, 256):
        raise ValueError("--data speech is mu-law coded to 256 levels; drop --levels")
    try:
        speech = importlib.import_module("fastar.data.speech")
    except ImportError:
        raise ValueError("data set 'speech' needs fastar.data.speech, which is not part of this build of fastar") \
            from None
    clips = speech.speech_codes(sample_rate=sample_rate)
    codes = torch.cat([c.to(torch.int64) for c in clips])
    n = codes.numel() // segment
    if n < 2:
        raise ValueError(f"speech: only {codes.numel()} samples, too few for two segments of {segment}")
    x = codes[:n * segment].view(n, segment)
    return Dataset("speech", "audio", 256, (segment,), *_split(x, None, holdout), sample_rate=sample_rate)
