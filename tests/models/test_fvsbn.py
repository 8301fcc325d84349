"""FVSBN: the likelihood against the product of its conditionals written out, the cache's O(D) step,
training and sampling through the common door (the contract suite covers the rest)."""
from __future__ import annotations

import pytest
import torch

from fastar.models import FVSBN


def test_nll_is_the_product_of_conditionals():
    torch.manual_seed(0)
    m = FVSBN(3, 2, 2).double()
    x = torch.randint(0, 2, (4, 3, 2, 2))
    xs = x.permute(0, 2, 3, 1).reshape(4, -1).double()       # step order: colours inside pixels
    want = torch.zeros(4, dtype=torch.float64)
    for t in range(12):
        logit = m.bias[t] + (m.weight[t, :t] * xs[:, :t]).sum(1)
        p = torch.sigmoid(logit)
        want -= torch.where(xs[:, t] == 1, p.log(), (1 - p).log())
    torch.testing.assert_close(m.nll(x), want)


def test_the_upper_triangle_is_unused():
    torch.manual_seed(0)
    m = FVSBN(1, 3, 3).double()
    x = torch.randint(0, 2, (5, 1, 3, 3))
    before = m.nll(x)
    with torch.no_grad():
        m.weight.add_(torch.randn(9, 9, dtype=torch.float64).triu())
    torch.testing.assert_close(m.nll(x), before)


def test_trains_and_samples_through_the_common_door(tmp_path):
    from fastar.train import train

    r = train("fvsbn", "digits", epochs=2, batch_size=64, lr=1e-2, out=str(tmp_path), progress=False,
              log=lambda *a: None)
    assert r["evals"][-1]["test_bpd"] < r["evals"][0]["test_bpd"] < 1.0
    x = r["model"].sample(4, (8, 8), generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.int64
    # completions: the engine keeps the given top half (FVSBN writes no code for it), also from the CLI
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :] = True
    done = r["model"].sample(prefix=x, mask=mask, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(done[..., :4, :], x[..., :4, :])
    from PIL import Image

    from tests.commands.test_cli import fastar

    Image.fromarray((x[0, 0].numpy() * 255).astype("uint8")).save(tmp_path / "p.png")
    fastar("sample", tmp_path / "last.pt", "-n", "2", "--prefix", tmp_path / "p.png", "--out", tmp_path / "c.png")
    assert (tmp_path / "c.png").exists()


def test_bad_input():
    m = FVSBN(1, 2, 2)
    with pytest.raises(ValueError, match="binary values"):
        m.nll(torch.full((1, 1, 2, 2), 2))
    with pytest.raises(ValueError, match=r"\(N, 1, 2, 2\)"):
        m.nll(torch.zeros(1, 1, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="levels must be 2"):
        FVSBN(1, 2, 2, levels=256)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(1, cond=torch.tensor([0]))
    with pytest.raises(ValueError, match="draws images of shape"):
        m.sample(1, (3, 3))
