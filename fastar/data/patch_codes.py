"""Discrete codes of the RGB patches: a VQ-VAE-like code map for code priors (PixelSNAIL with ``levels``).

``patch_codes(centroids=512, block=4, holdout=0.1)`` cuts every 32x32 patch of
:func:`fastar.data.patches.load_patches` into block x block tiles (48 values each at block 4, 8-bit
RGB scaled to [0, 1]) and replaces each tile by the index of its nearest centroid: an 8x8 grid of
codes in [0, centroids) a patch. The centroids come from k-means (k-means++ seeding, then Lloyd
iterations, float64, a fixed seed) on the tiles of the *training* patches only (the split
:func:`fastar.data.load_dataset` uses: the last ``holdout`` share of each photo's tiles held out), at
most :data:`FIT_VECTORS` of them (a fixed random subset), so held-out codes are coded with a
codebook that never saw them. The centroids are kept under ``$FASTAR_CACHE`` (default
``~/.cache/fastar``), keyed by the patches' bytes and the arguments.

``coarse_codes(centroids=64, block=8, ...)``: the same with larger tiles, a 4x4 grid a patch: a
coarser code map to condition a code prior on (VQ-VAE-2's top codes for its bottom prior).

The data set ``patch_codes`` (:data:`fastar.data.DATASETS`) is the fine map: images (N, 1, 8, 8)
of int64 codes, levels = centroids (512 unless ``--levels`` says otherwise).
"""
from __future__ import annotations

import functools
import hashlib
import os

import torch

__all__ = ["kmeans", "patch_codes", "coarse_codes", "tiles"]


def tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/block, W/block, C * block * block) float64 in [0, 1]."""
    n, c, h, w = x.shape
    t = x.double().div(255.0).view(n, c, h // block, block, w // block, block)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(n, h // block, w // block, c * block * block)


def _nearest(v, centres):
    d = (v * v).sum(1, keepdim=True) - 2.0 * v @ centres.t() + (centres * centres).sum(1)[None]
    return d.argmin(1), d


def kmeans(v: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """(k, D) centroids of the rows of v (M, D) float64: k-means++ seeding, then Lloyd iterations
    (an empty cluster keeps its centroid)."""
    if not 1 <= k <= len(v):
        raise ValueError(f"kmeans: k must lie in [1, {len(v)}] (the number of vectors), got {k}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.empty(k, v.shape[1], dtype=v.dtype)
    u = torch.rand(k, generator=g, dtype=v.dtype)
    centres[0] = v[int(u[0] * len(v))]
    best = ((v - centres[0]) ** 2).sum(1)
    for i in range(1, k):                       # k-means++: the next seed with probability ~ squared distance
        cdf = best.cumsum(0)
        j = int(torch.searchsorted(cdf, u[i] * cdf[-1]).clamp(max=len(v) - 1))
        centres[i] = v[j]
        best = torch.minimum(best, ((v - centres[i]) ** 2).sum(1))
    for _ in range(iters):
        idx, _ = _nearest(v, centres)
        sums = torch.zeros_like(centres).index_add_(0, idx, v)
        counts = torch.bincount(idx, minlength=k).to(v.dtype)
        keep = counts > 0
        centres[keep] = sums[keep] / counts[keep, None]
    return centres


FIT_VECTORS = 32768    # k-means is fitted on at most this many training tiles (a fixed random subset)


def _cache_dir():
    return os.environ.get("FASTAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastar")


@functools.lru_cache(maxsize=4)
def _codes(centroids: int, block: int, holdout: float, seed: int):
    from fastar.data.patches import load_patches

    x, photo = load_patches(256, with_source=True)
    # The training split of the patches data set (the last tiles of every photo held out).
    from fastar.data.sets import _split

    train_idx = _split(torch.arange(len(x)), photo, holdout)[0]
    # The codebook depends on the patches and the arguments only: kept on disk, keyed by both.
    key = hashlib.sha256(x.numpy().tobytes() + repr((centroids, block, train_idx.tolist(), seed, FIT_VECTORS, 3)).encode()
                         ).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"patch_codes-{key}.pt")
    t = tiles(x, block)                                                           # (N, h, w, D)
    n, h, w, d = t.shape
    try:
        centres = torch.load(path, weights_only=True)
    except Exception:
        v = t[train_idx].reshape(-1, d)
        if len(v) > FIT_VECTORS:          # the fit on a fixed random subset: seconds, not minutes, for 180k tiles
            v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))[:FIT_VECTORS]]
        centres = kmeans(v, centroids, seed=seed)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(centres, path + f".{os.getpid()}.tmp")
            os.replace(path + f".{os.getpid()}.tmp", path)
        except OSError:
            pass                                                                  # a read-only home: recompute
    idx, _ = _nearest(t.reshape(-1, d), centres)
    return idx.view(n, 1, h, w), centres


def patch_codes(centroids: int = 512, block: int = 4, holdout: float = 0.1, seed: int = 0):
    """(codes (N, 1, 32/block, 32/block) int64, centroids (K, 3 * block**2) float64); see the module docstring."""
    if isinstance(centroids, bool) or not isinstance(centroids, int) or centroids < 2:
        raise ValueError(f"patch_codes: centroids must be an int >= 2, got {centroids!r}")
    if block not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"patch_codes: block must divide 32 (1, 2, 4, 8, 16 or 32), got {block!r}")
    codes, centres = _codes(centroids, block, float(holdout), seed)
    return codes.clone(), centres.clone()


def coarse_codes(centroids: int = 64, block: int = 8, holdout: float = 0.1, seed: int = 0):
    """The coarser code map (N, 1, 32/block, 32/block) and its centroids: see the module docstring."""
    return patch_codes(centroids, block, holdout, seed)
