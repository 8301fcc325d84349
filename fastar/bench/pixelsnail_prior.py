"""PixelSNAIL learns: held-out NLL of small models trained briefly on the bundled data.

``python -m fastar bench pixelsnail-prior`` (CPU; minutes). Rows:

- ``mixture``: the RGB mixture model (channels 32, 2 blocks of 1 gated residual block, 5 logistics)
  trained on 32x32 patches (``quick``: 8x8 crops) for ``steps`` Adam steps of batch 16: held-out
  bits/dim on the held-out patches (uniform = 8);
- ``code prior``: a ``levels=512`` model on ``patch_codes`` (k-means codes of the patches' 4x4 tiles,
  8x8 a patch): held-out nats per code beside the uniform code (log 512) and a unigram model of
  the codes (their training frequencies, add-one smoothed);
- ``conditioned code prior``: the same, conditioned on the coarse 4x4 code map (64 k-means codes
  of 8x8 tiles, one hot, scale 2): what knowing the coarse codes is worth.

The same helpers (:func:`train_patches`, :func:`train_code_prior`) drive the training tests in
``tests/models/test_pixelsnail_train.py`` at smaller sizes.
"""
from __future__ import annotations

import math
import time

import torch

__all__ = ["train_patches", "train_code_prior", "unigram_nats", "run"]

FAMILY = "pixelsnail-prior"
DEVICES = ("cpu",)

COLUMNS = ["case", "steps", "batch", "size", "held_out_nats", "held_out_bits_per_dim", "uniform", "unigram",
           "train_s"]

NOTES = ("held_out_nats: mean held-out NLL per value (mixture: per sub-pixel; codes: per code), in nats; "
         "held_out_bits_per_dim = the same in bits. uniform: the uniform code's nats per value (log 256, log 512); "
         "unigram: the held-out cross-entropy of the training codes' frequencies (add-one smoothed), nats per "
         "code. Untuned small models, a few hundred Adam steps, one thread, one seed.")


def _crops(x, size, g):
    if size == x.shape[-1]:
        return x
    i, j = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., i:i + size, j:j + size]


def train_patches(size=32, steps=300, batch=16, lr=2e-3, seed=0, log=None, **cfg):
    """Train a small mixture PixelSNAIL on (random crops of) the training patches; returns the held-out
    bits/dim over the held-out patches (cut into size x size tiles)."""
    from fastar.data import load_dataset
    from fastar.models import PixelSNAIL

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
            log(step + 1, float(loss.detach()))
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model.bits_per_dim(test[i:i + 64]) for i in range(0, len(test), 64)]).mean())


def unigram_nats(train, test, levels):
    """Held-out nats per code of the add-one-smoothed code frequencies of the training codes."""
    counts = torch.bincount(train.flatten(), minlength=levels).double() + 1.0
    return float(-(counts / counts.sum()).log()[test.flatten()].mean())


def train_code_prior(steps=200, batch=16, lr=3e-3, seed=0, cond=False, **cfg):
    """A small code prior on ``patch_codes`` (8x8 codes, 512 levels), optionally conditioned on the coarse
    4x4 codes (one hot, scale 2); returns (held-out nats per code, the unigram baseline's)."""
    from fastar.data import load_dataset
    from fastar.data.patch_codes import coarse_codes
    from fastar.models import PixelSNAIL

    d = load_dataset("patch_codes")
    top, _ = coarse_codes()
    top_k = int(top.max()) + 1
    n_train = len(d.train)
    onehot = torch.nn.functional.one_hot(top[:, 0], top_k).permute(0, 3, 1, 2).float()    # (N, K, 4, 4)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = dict(in_channels=1, levels=d.levels, channels=32, n_blocks=2, n_res_blocks=1, key_channels=16,
                  value_channels=32, kernel_size=2, cond_channels=top_k if cond else None)
    config.update(cfg)
    model = PixelSNAIL(**config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per = d.train[0].numel()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        loss = model.nll(d.train[idx], onehot[idx] if cond else None).mean() / per
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        nats = float(model.nll(d.test, onehot[n_train:] if cond else None).mean()) / per
    return nats, unigram_nats(d.train, d.test, d.levels)


def _row(case, steps, batch, size, nats, uniform, unigram, seconds):
    return dict(case=case, steps=steps, batch=batch, size=size, held_out_nats=nats,
                held_out_bits_per_dim=nats / math.log(2), uniform=uniform, unigram=unigram, train_s=seconds)


def run(device: str, quick: bool = False) -> list[dict]:
    rows = []
    size, steps = (8, 150) if quick else (32, 300)
    t0 = time.perf_counter()
    bpd = train_patches(size=size, steps=steps, batch=16)
    rows.append(_row("mixture (RGB patches)", steps, 16, f"{size}x{size}", bpd * math.log(2), math.log(256), None,
                     time.perf_counter() - t0))
    print(f"  mixture {size}x{size}: {bpd:.3f} bits/dim", flush=True)
    steps = 80 if quick else 400
    for cond in (False, True):
        t0 = time.perf_counter()
        nats, unigram = train_code_prior(steps=steps, cond=cond, channels=32 if quick else 64)
        rows.append(_row("conditioned code prior (coarse 4x4 codes)" if cond else "code prior", steps, 16, "8x8",
                         nats, math.log(512), unigram, time.perf_counter() - t0))
        print(f"  code prior{' (conditioned)' if cond else ''}: {nats:.3f} nats/code (unigram {unigram:.3f}, "
              f"uniform {math.log(512):.3f})", flush=True)
    return rows
