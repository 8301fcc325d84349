"""Measures of what a trained model is worth, as a library: held-out NLL in nats and bits/dim, the
held-out bits of a unigram baseline, a fixed digit classifier's agreement with the class a sample was
drawn for, class grids of samples and completions of held-out digits.

Callers: ``fastar demo`` (``fastar/commands/demo.py`` and ``writers.py``), the benchmark family
``fastar bench quality`` (``fastar/bench/quality.py``, which only runs these over the shipped
checkpoints and tabulates them), ``scripts/make_figures.py`` and ``tests/test_quality.py``.

The classifier is an ordinary MLP (784 -> 256 -> 10, ReLU) trained on the *real* training digits of
the checkpoint's data set (the same split the generative model trained on), from a fixed seed, so
every caller (``fastar demo``, ``fastar bench quality``, the tests) judges the samples with the same
classifier and draws them from the same seed. Its accuracy on the real held-out digits is reported
beside the agreement: a classifier that only labelled real digits at chance could say nothing.

Units: ``nll_nats`` is the mean negative log-likelihood per image in nats; bits/dim is
nats / (D ln 2) with D the sub-pixels per image.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CLASSIFIER_SEED", "SAMPLE_SEED", "DigitClassifier", "classifier_for", "train_classifier",
           "class_grid", "agreement", "completions", "held_out_nll", "unigram_bits"]

CLASSIFIER_SEED = 0  # the classifier's initialisation and shuffling
SAMPLE_SEED = 0      # the generator of the class-grid samples the agreement is measured on


class DigitClassifier(nn.Module):
    """An MLP over the pixels scaled to [0, 1]; ``accuracy`` is its accuracy on the real held-out set."""

    def __init__(self, d_in: int, num_classes: int, levels: int, hidden: int = 256):
        super().__init__()
        self.levels, self.num_classes = levels, num_classes
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, num_classes)
        self.accuracy = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1).float() / (self.levels - 1)
        return self.fc2(F.relu(self.fc1(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class labels (N,) int64 of integer images (N, C, H, W) in [0, levels)."""
        if x.dim() != 4 or x.shape[1:].numel() != self.fc1.in_features:
            raise ValueError(f"DigitClassifier.predict: images must be (N, C, H, W) with C*H*W = "
                             f"{self.fc1.in_features}, got shape {list(x.shape)}")
        return self(x.cpu()).argmax(1)


def train_classifier(ds, seed: int = CLASSIFIER_SEED, epochs: int = 30, batch_size: int = 128,
                     hidden: int = 256) -> DigitClassifier:
    """Train the MLP on ``ds.train`` / ``ds.train_labels`` (CPU, deterministic for a seed); its
    ``accuracy`` is measured on ``ds.test`` / ``ds.test_labels``."""
    if ds.kind != "image" or ds.train_labels is None or not ds.num_classes:
        raise ValueError(f"a class-agreement classifier needs a labelled image data set; {ds.name!r} is "
                         f"{ds.kind}{'' if ds.train_labels is not None else ' without labels'}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(ds.train[0].numel(), ds.num_classes, ds.levels, hidden)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = ds.train, ds.train_labels
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    clf.accuracy = float((clf.predict(ds.test) == ds.test_labels).float().mean())
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


@functools.lru_cache(maxsize=4)
def _classifier(name: str, levels: int) -> DigitClassifier:
    from fastar.data import load_dataset

    return train_classifier(load_dataset(name, levels=levels))


def classifier_for(info: dict) -> DigitClassifier:
    """The fixed classifier of a checkpoint's data set (``ckpt["data"]``), trained once per process."""
    if not info.get("num_classes"):
        raise ValueError(f"data set {info.get('name')!r} has no class labels: no class agreement to measure")
    return _classifier(info["name"], info["levels"])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def class_grid(model, info: dict, per_class: int, seed: int = SAMPLE_SEED, method: str = "cached",
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class, class-major (row k of a grid with ``per_class`` columns
    is class k), from a generator seeded with ``seed``; returns (images on the CPU, labels)."""
    if per_class < 1:
        raise ValueError(f"class_grid: per_class must be a positive int, got {per_class!r}")
    k = info.get("num_classes")
    if not k:
        raise ValueError("class_grid: the model's data set has no classes")
    dev = _device(model)
    labels = torch.arange(k).repeat_interleave(per_class)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = model.sample(len(labels), tuple(info["shape"][1:]), cond=labels.to(dev), generator=g, method=method,
                     progress=progress)
    return x.cpu(), labels


def agreement(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The share of images the classifier labels as the class they were drawn for, overall and per class."""
    pred = classifier.predict(images)
    hit = (pred == labels).float()
    per = [float(hit[labels == c].mean()) if bool((labels == c).any()) else float("nan")
           for c in range(classifier.num_classes)]
    return dict(agreement=float(hit.mean()), per_class=per, n=len(labels))


def completions(model, ds, conditional: bool, n: int = 10, per: int = 4, seed: int = SAMPLE_SEED,
                progress: bool = False) -> torch.Tensor:
    """Completions of held-out images: the top half of each given, the bottom half drawn ``per`` times
    (the class given too when ``conditional``). Picks the first held-out image of each class (or the
    first n). Returns (n * (1 + per), C, H, W): each row the original, then its ``per`` completions."""
    dev = _device(model)
    if ds.test_labels is not None:
        idx = [int((ds.test_labels == c).nonzero()[0]) for c in range(ds.num_classes)
               if bool((ds.test_labels == c).any())][:n]
    else:
        idx = list(range(min(n, len(ds.test))))
    orig = ds.test[idx]
    C, H, W = orig.shape[1:]
    prefix = orig.repeat_interleave(per, 0)
    mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
    mask[:, :, : H // 2] = True
    cond = ds.test_labels[idx].repeat_interleave(per).to(dev) if conditional else None
    g = torch.Generator(device=dev).manual_seed(seed)
    done = model.sample(len(prefix), (H, W), cond=cond, generator=g, prefix=prefix.to(dev), mask=mask.to(dev),
                        progress=progress).cpu()
    rows = [torch.cat([orig[i:i + 1], done[i * per:(i + 1) * per]]) for i in range(len(idx))]
    return torch.cat(rows)


@torch.no_grad()
def held_out_nll(model, ds, conditional: bool, batch_size: int = 250) -> dict:
    """Mean held-out NLL per image in nats and the same as bits/dim (nats / (D ln 2))."""
    dev = _device(model)
    was = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, len(ds.test), batch_size):
            x = ds.test[i:i + batch_size].to(dev)
            cond = ds.test_labels[i:i + batch_size].to(dev) if conditional else None
            total += float(model.nll(x, cond).double().sum())
    finally:
        model.train(was)
    nats = total / len(ds.test)
    d = math.prod(ds.shape)
    return dict(nll_nats=nats, bits_per_dim=nats / (d * math.log(2.0)), dims=d, n=len(ds.test))


def unigram_bits(ds) -> float:
    """Held-out bits per value of a unigram model of the values: their training-set frequencies, add-one
    smoothed. What a model gains over it is what it learnt beyond which values are common."""
    counts = torch.bincount(ds.train.flatten(), minlength=ds.levels).double() + 1.0
    logp = (counts / counts.sum()).log2()
    return float(-logp[ds.test.flatten()].mean())
