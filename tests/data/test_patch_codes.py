"""The patch_codes data set: k-means codes of the patches' tiles, the codebook fitted on the training split."""
from __future__ import annotations

import pytest
import torch

from fastar.data import load_dataset
from fastar.data.patch_codes import kmeans, patch_codes, tiles


def test_patch_codes_data_set():
    d = load_dataset("patch_codes")
    assert d.kind == "image" and d.levels == 512 and d.shape == (1, 8, 8)
    assert d.train.dtype == torch.int64 and int(d.train.min()) >= 0 and int(d.train.max()) < 512
    codes, centres = patch_codes()
    from fastar.data.patches import load_patches as _lp
    from fastar.data.sets import _split

    train, test, _, _ = _split(codes, _lp(2, with_source=True)[1], 0.1)      # held out per photo, as patches
    assert torch.equal(d.train, train) and torch.equal(d.test, test) and centres.shape == (512, 48)
    # every centroid is the mean of training tiles (Lloyd's fixed point is near): each code is used in training
    assert len(torch.unique(d.train)) > 500
    # each code is its tile's nearest centroid
    from fastar.data.patches import load_patches

    t = tiles(load_patches(256)[:3], 4).reshape(-1, 48)
    d2 = torch.cdist(t, centres)
    assert torch.equal(d2.argmin(1), codes[:3].flatten())


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    v = (centres[torch.arange(300) % 3] + 0.1 * torch.randn(300, 2, generator=g, dtype=torch.float64))
    found = kmeans(v, 3)
    assert torch.cdist(found, centres).min(1).values.max() < 0.1


def test_bad_levels():
    with pytest.raises(ValueError, match="number of k-means centroids"):
        load_dataset("patch_codes", levels=1)
    with pytest.raises(ValueError, match="block must divide 32"):
        patch_codes(16, block=3)
