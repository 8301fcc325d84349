"""Cached vs naive sampling: same images from the same seed, per-step logits = full forward, prefixes,
conditioning, the backends, bad input."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar import sampling
from fastar.models import GatedPixelCNN, PixelCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cls, device, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).to(device, dtype).eval()


def _layout(model, rec, x):
    """Per-step parameters (T, N, P) in step order -> the model's forward layout, (N, C, H, W) or (N, C, L, H, W)."""
    n, C, H, W = x.shape
    if model.levels == 2:
        return rec.view(H, W, C, n).permute(3, 2, 0, 1)
    return rec.view(H, W, C, n, model.levels).permute(3, 2, 4, 0, 1)


def _both(model, n, shape, cond=None, seed=1, prefix=None, mask=None, temperature=1.0):
    plans = [sampling.prepare(model, n, shape, cond, torch.Generator().manual_seed(seed), temperature, prefix, mask,
                              record=True) for _ in range(2)]
    xn, ln = sampling.naive_sample(model, plans[0])
    xc, lc = sampling.cached_sample(model, plans[1])
    return xn, _layout(model, ln, xn), xc, _layout(model, lc, xc)


CONFIGS = [
    # (cls, model kwargs, shape)
    (GatedPixelCNN, dict(in_channels=1, levels=2, layers=3, channels=8), (6, 5)),
    (GatedPixelCNN, dict(in_channels=3, levels=256, layers=3, channels=6), (4, 3)),
    (GatedPixelCNN, dict(in_channels=1, levels=256, layers=2, channels=4), (3, 4)),
    (GatedPixelCNN, dict(in_channels=3, levels=2, layers=2, channels=6), (4, 4)),
    (PixelCNN, dict(in_channels=1, levels=2, layers=3, channels=8), (6, 5)),
    (PixelCNN, dict(in_channels=3, levels=256, layers=2, channels=6), (4, 3)),
]


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_cached_equals_naive_float64(device, cfg):
    cls, kw, shape = CONFIGS[cfg]
    model = _model(cls, device, **kw)
    xn, ln, xc, lc = _both(model, 3, shape)
    assert xc.dtype == torch.int64 and xc.shape == (3, kw["in_channels"]) + shape
    assert int(xc.min()) >= 0 and int(xc.max()) < kw["levels"]
    assert torch.equal(xn, xc)
    # Per-step logits from the cache = the full forward pass on the final image.
    full = model(xc)
    torch.testing.assert_close(lc, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ln, full, rtol=1e-5, atol=1e-5)
    assert len(torch.unique(xc)) > 1   # a sampler stuck at one value would pass the equalities


def test_conditional_class_and_map(device):
    model = _model(GatedPixelCNN, device, in_channels=3, levels=4, layers=3, channels=6, num_classes=5,
                   cond_channels=2)
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 4, 2], device=device)
    cmap = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64).to(device)
    xn, ln, xc, lc = _both(model, 3, (4, 5), cond=(labels, cmap))
    assert torch.equal(xn, xc)
    torch.testing.assert_close(lc, model(xc, (labels, cmap)), rtol=1e-5, atol=1e-5)
    # The condition matters: other labels change the distribution.
    other = model(xc, (torch.tensor([1, 1, 1], device=device), cmap))
    assert not torch.allclose(other, lc)


def test_class_conditional_int_label(device):
    model = _model(GatedPixelCNN, device, in_channels=1, levels=2, layers=2, channels=4, num_classes=3)
    a = model.sample(2, (4, 4), cond=2, generator=torch.Generator().manual_seed(0), progress=False)
    b = model.sample(2, (4, 4), cond=torch.tensor([2, 2]), generator=torch.Generator().manual_seed(0),
                     progress=False, method="naive")
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [GatedPixelCNN, PixelCNN])
def test_prefix_completion(device, cls):
    model = _model(cls, device, in_channels=3, levels=5, layers=2, channels=6)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 5, (2, 3, 6, 4), generator=g).to(device)
    mask = torch.zeros(6, 4, dtype=torch.bool, device=device)
    mask[:3] = True                       # the top half given
    mask[3, 0] = True                     # and the first pixel of the next row
    xn, ln, xc, lc = _both(model, 2, None, prefix=prefix, mask=mask, seed=2)
    assert torch.equal(xn, xc)
    m = mask.expand_as(prefix)
    assert torch.equal(xc[m], prefix[m])
    assert not torch.equal(xc[~m], prefix[~m])   # the rest is sampled, not copied
    torch.testing.assert_close(lc, model(xc), rtol=1e-5, atol=1e-5)
    # Through the public API (the naive path skips sub-pixels the whole batch is given).
    a = model.sample(prefix=prefix, mask=mask, generator=torch.Generator().manual_seed(2), progress=False)
    b = model.sample(prefix=prefix, mask=mask, generator=torch.Generator().manual_seed(2), progress=False,
                     method="naive")
    assert torch.equal(a, b) and torch.equal(a, xc)


def test_per_sample_mask(device):
    model = _model(GatedPixelCNN, device, in_channels=1, levels=3, layers=2, channels=4)
    prefix = torch.full((2, 1, 3, 3), 2, device=device)
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool, device=device)
    mask[0, :, 1:] = True                  # image 0: given below row 0; image 1: nothing given
    xn, _, xc, _ = _both(model, 2, None, prefix=prefix, mask=mask)
    assert torch.equal(xn, xc) and bool((xc[0, :, 1:] == 2).all())


def test_float32_agrees_on_almost_every_pixel(device):
    model = _model(GatedPixelCNN, device, torch.float32, in_channels=1, levels=256, layers=3, channels=8)
    xn, _, xc, lc = _both(model, 4, (8, 8))
    assert (xn == xc).double().mean() >= 0.99
    torch.testing.assert_close(lc, model(xc), rtol=1e-4, atol=1e-5)


def test_reference_backend_same_images(device):
    model = _model(GatedPixelCNN, device, in_channels=1, levels=2, layers=2, channels=4)
    a = model.sample(3, (5, 4), generator=torch.Generator().manual_seed(7), progress=False)
    with fastar.backend("reference"):
        b = model.sample(3, (5, 4), generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.equal(a, b)


def test_seed_temperature_and_batch(device):
    model = _model(PixelCNN, device, in_channels=1, levels=4, layers=2, channels=4)
    s = lambda seed, **kw: model.sample(kw.pop("n", 4), (4, 4), generator=torch.Generator().manual_seed(seed),
                                        progress=False, **kw)
    assert torch.equal(s(0), s(0)) and not torch.equal(s(0), s(1))
    greedy = s(0, temperature=0.0)
    assert torch.equal(greedy, s(1, temperature=0.0))                # argmax ignores the noise
    assert torch.equal(greedy, s(0, temperature=0.0, method="naive"))
    assert torch.equal(greedy[0], greedy[1])                          # every image is the argmax image
    assert s(0, n=1).shape == (1, 1, 4, 4)
    assert model.training is False


def test_sample_restores_training_mode():
    model = GatedPixelCNN(1, 2, layers=1, channels=2).double()
    assert model.training
    model.sample(1, (2, 2), progress=False)
    assert model.training


def test_sample_bad_input():
    model = GatedPixelCNN(1, 2, layers=1, channels=2, num_classes=3)
    cond = torch.tensor([0])
    with pytest.raises(ValueError, match="method"):
        model.sample(1, (2, 2), cond=cond, method="fast")
    with pytest.raises(ValueError, match="shape"):
        model.sample(1, cond=cond)
    with pytest.raises(ValueError, match="how many"):
        GatedPixelCNN(1, 2, layers=1, channels=2).sample(shape=(2, 2))
    with pytest.raises(ValueError, match="needs a mask"):
        model.sample(prefix=torch.zeros(1, 1, 2, 2, dtype=torch.long), cond=cond)
    with pytest.raises(ValueError, match="mask given without a prefix"):
        model.sample(1, (2, 2), cond=cond, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        model.sample(prefix=torch.zeros(1, 1, 2, 2, dtype=torch.long), mask=torch.ones(3, dtype=torch.bool),
                     cond=cond)
    with pytest.raises(ValueError, match="mask must be bool"):
        model.sample(prefix=torch.zeros(1, 1, 2, 2, dtype=torch.long), mask=torch.ones(2, 2), cond=cond)
    with pytest.raises(ValueError, match=r"prefix values must lie"):
        model.sample(prefix=torch.full((1, 1, 2, 2), 5), mask=torch.ones(2, 2, dtype=torch.bool), cond=cond)
    with pytest.raises(ValueError, match="cond has batch 1"):
        model.sample(2, (2, 2), cond=cond)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, (2, 2), cond=cond, temperature=-1.0)
    with pytest.raises(ValueError, match="pass cond"):
        model.sample(1, (2, 2))
    with pytest.raises(ValueError, match="channels"):
        model.sample(1, (3, 2, 2), cond=cond)
    plan = sampling.prepare(model, 1, (2, 2), cond)   # the model is on the CPU
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        sampling.cached_sample(model, plan, cuda_graphs=True)


def test_cuda_graph_replay_matches_eager(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    model = _model(GatedPixelCNN, device, in_channels=3, levels=256, layers=3, channels=6)
    plans = [sampling.prepare(model, 4, (5, 4), None, torch.Generator(device).manual_seed(3)) for _ in range(2)]
    a = sampling.cached_sample(model, plans[0], cuda_graphs=True)
    b = sampling.cached_sample(model, plans[1], cuda_graphs=False)
    assert torch.equal(a, b)
