"""PixelSNAIL learns: the RGB mixture model on the bundled patches, the code prior on their k-means
codes (against the uniform and unigram baselines), and the prior conditioned on a coarser code map.

The full-size run (32x32 patches, a few hundred steps) takes minutes on a 2-core CPU: it runs only
with FASTAR_SLOW_TESTS=1 (marked slow). The default run trains on 8x8 crops of the same patches."""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from fastar.data import load_dataset
from fastar.models import PixelSNAIL

pytestmark = pytest.mark.usefixtures("one_thread")

slow_only = pytest.mark.skipif(not os.environ.get("FASTAR_SLOW_TESTS"),
                               reason="minutes on a CPU: set FASTAR_SLOW_TESTS=1")


def _crops(x, size, g):
    if size == x.shape[-1]:
        return x
    i, j = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., i:i + size, j:j + size]


def train_patches(size=32, steps=300, batch=16, lr=2e-3, seed=0, log=None, **cfg):
    """Train a small mixture PixelSNAIL on (crops of) the patches; returns the held-out bits/dim (on the
    held-out patches' crops at fixed positions, all of them at size 32)."""
    d = load_dataset("patches")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = dict(in_channels=3, channels=32, n_blocks=2, n_res_blocks=1, key_channels=16, value_channels=32,
                  nr_logistic_mix=5)
    config.update(cfg)
    model = PixelSNAIL(**config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    test = torch.cat([d.test[..., i:i + size, j:j + size] for i in range(0, 32 - size + 1, size)
                      for j in range(0, 32 - size + 1, size)])
    for step in range(steps):
        idx = torch.randint(0, len(d.train), (batch,), generator=g)
        loss = model.bits_per_dim(_crops(d.train[idx], size, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % 50 == 0:
            log(step + 1, float(loss))
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model.bits_per_dim(test[i:i + 64]) for i in range(0, len(test), 64)]).mean())


def test_mixture_learns_patches_on_crops():
    bpd = train_patches(size=8, steps=150, batch=16)
    assert bpd < 6.0, f"held-out {bpd:.3f} bits/dim after 150 steps on 8x8 crops"


@pytest.mark.slow
@slow_only
def test_mixture_learns_32x32_patches():
    bpd = train_patches(size=32, steps=300, batch=16)
    assert bpd < 6.0, f"held-out {bpd:.3f} bits/dim after 300 steps on 32x32 patches"


def unigram_nats(train, test, levels):
    """Held-out nats per code of the add-one-smoothed code frequencies of the training codes."""
    counts = torch.bincount(train.flatten(), minlength=levels).double() + 1.0
    return float(-(counts / counts.sum()).log()[test.flatten()].mean())


@functools.lru_cache(maxsize=None)
def code_prior(cond):
    return train_code_prior(steps=80, batch=16, channels=32, cond=cond)


def train_code_prior(steps=200, batch=32, lr=3e-3, seed=0, cond=False, **cfg):
    """A small code prior on patch_codes (8x8 codes, 512 levels), optionally conditioned on the coarse
    4x4 codes (one hot, scale 2); returns (held-out nats per code, the unigram baseline's)."""
    from fastar.data.patch_codes import coarse_codes

    d = load_dataset("patch_codes")
    levels = d.levels
    top, _ = coarse_codes()
    top_k = int(top.max()) + 1
    n_train = len(d.train)
    onehot = torch.nn.functional.one_hot(top[:, 0], top_k).permute(0, 3, 1, 2).float()    # (N, K, 4, 4)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = dict(in_channels=1, levels=levels, channels=64, n_blocks=2, n_res_blocks=1, key_channels=16,
                  value_channels=32, kernel_size=2, dropout=0.0, cond_channels=top_k if cond else None)
    config.update(cfg)
    model = PixelSNAIL(**config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        c = onehot[idx] if cond else None
        loss = model.nll(d.train[idx], c).mean() / d.train[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        c = onehot[n_train:] if cond else None
        nats = float(model.nll(d.test, c).mean()) / d.test[0].numel()
    return nats, unigram_nats(d.train, d.test, levels)


def test_code_prior_beats_uniform_and_unigram():
    nats, unigram = code_prior(False)
    assert unigram < math.log(512)
    assert nats < unigram, f"code prior {nats:.3f} nats/code vs unigram {unigram:.3f} (uniform {math.log(512):.3f})"


def test_conditioned_code_prior_beats_the_unconditional():
    free, _ = code_prior(False)
    cond, _ = code_prior(True)
    assert cond < free, f"conditioned on the coarse codes {cond:.3f} nats/code vs {free:.3f} unconditioned"
