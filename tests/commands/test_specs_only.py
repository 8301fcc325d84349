"""The commands, the training loop and the registry name no model family: they read the specs.

Two checks: the source of those modules mentions no registered model name, class name or
shipped checkpoint name; and a family registered only in a test (its class and its spec, no
other edit) trains, samples and runs the demo through the real command line.
"""
from __future__ import annotations

import glob
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastar.models import SPECS, ModelSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERIC = ["fastar/cli.py", "fastar/train.py", "fastar/registry.py", "fastar/checkpoint.py", "fastar/codec.py",
           "fastar/checkpoints/__init__.py", "fastar/data/sets.py", *sorted(glob.glob("fastar/commands/*.py", root_dir=ROOT))]


def _family_names():
    for key, spec in SPECS.items():
        yield key
        yield spec.cls.__name__
        yield from spec.shipped


@pytest.mark.parametrize("path", GENERIC)
def test_generic_code_names_no_model_family(path):
    src = open(os.path.join(ROOT, path)).read()
    for name in _family_names():
        hits = [ln.strip() for ln in src.splitlines() if re.search(rf"\b{re.escape(name)}\b", ln, re.IGNORECASE)]
        assert not hits, f"{path} names the model family {name!r}: {hits[:3]}"


def test_the_old_door_is_gone():
    assert not os.path.exists(os.path.join(ROOT, "fastar", "_cli_door.py"))
    from fastar.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["info", "check", "bench", "demo", "train", "sample", "compress", "decompress",
                                 "score"]


# ---------------------------------------------------------------------------- a family added in a test

class IndependentPixels(nn.Module):
    """Every sub-pixel drawn on its own from a learnt categorical (plus a per-class bias): the
    smallest model that speaks the common vocabulary (nll per example, sample with prefix/mask)."""

    def __init__(self, in_channels=1, levels=2, height=8, width=8, num_classes=None):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(in_channels, height, width, levels))
        self.class_bias = nn.Embedding(num_classes, levels) if num_classes else None
        self.levels = levels

    def _logits(self, n, cond):
        z = self.logits.expand(n, *self.logits.shape)
        if self.class_bias is not None and cond is not None:
            z = z + self.class_bias(cond)[:, None, None, None, :]
        return z

    def nll(self, x, cond=None):
        z = self._logits(len(x), cond)
        return F.cross_entropy(z.permute(0, 4, 1, 2, 3), x, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n, shape=None, cond=None, generator=None, temperature=1.0, method="cached", prefix=None,
               mask=None, progress=True):
        assert method in ("cached", "naive") and tuple(shape) == tuple(self.logits.shape[1:3])
        cdf = torch.softmax(self._logits(n, cond) / max(temperature, 1e-6), -1).cumsum(-1)
        u = torch.rand(cdf.shape[:-1], generator=generator, device=cdf.device)
        x = (u.unsqueeze(-1) > cdf).sum(-1).clamp(max=self.levels - 1)
        return x if prefix is None else torch.where(mask, prefix.to(x), x)


SPEC = ModelSpec(
    name="independent_pixels", cls=IndependentPixels, kind="image", datasets=("digits",), writer="png",
    default_config=lambda d: dict(in_channels=d["shape"][0], levels=d["levels"], height=d["shape"][1],
                                  width=d["shape"][2]),
    conditional_config=lambda d: dict(num_classes=d["num_classes"]) if d.get("num_classes") else None,
    demo=dict(data="digits", batch_size=16, lr=0.1))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(SPECS, SPEC.name, SPEC)  # the one registration line of a new family
    torch.set_num_threads(1)


def _cli(capsys, *args):
    from fastar.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_a_new_family_trains_samples_and_demos_with_no_other_edit(registered, tmp_path, capsys):
    from PIL import Image

    from fastar import checkpoint

    run = tmp_path / "run"
    out = _cli(capsys, "train", "Independent-Pixels", "--data", "digits", "--epochs", 2, "--batch-size", 16,
               "--lr", 0.1, "--limit", 64, "--eval-limit", 16, "--conditional", "--out", run, "--no-progress")
    assert "epoch 2/2" in out and "held-out" in out
    ck = checkpoint.load_checkpoint(run)
    assert ck["model"] == "independent_pixels" and ck["config"]["num_classes"] == 10
    assert ck["history"][-1] < ck["history"][0]

    png = tmp_path / "s.png"
    out = _cli(capsys, "sample", run, "-n", 4, "--class", 3, "--out", png, "--no-progress")
    assert "4 images from independent_pixels" in out and Image.open(png).size == (2 + 2 * 34, 2 + 2 * 34)

    out = _cli(capsys, "demo", "--model", "independent_pixels", "--epochs", 1, "--limit", 32, "-n", 2,
               "--workdir", tmp_path / "w", "--out", tmp_path / "d.png", "--no-progress")
    assert "training independent_pixels on digits" in out and "bits/dim" in out
    assert "agree on 100.00% of pixels" in out and (tmp_path / "d.png").exists()


def test_a_new_family_is_refused_data_of_another_kind(registered, tmp_path):
    from fastar import registry

    audio = [k for k, s in SPECS.items() if s.kind == "audio"]
    with pytest.raises(ValueError, match=f"takes image data, but data set 'speech' is audio; use {audio[0]}"):
        registry.check_compatible("independent_pixels", dict(name="speech", kind="audio"))
    with pytest.raises(ValueError, match="trains on digits, not 'mnist'"):
        registry.check_compatible("independent_pixels", dict(name="mnist", kind="image"))
