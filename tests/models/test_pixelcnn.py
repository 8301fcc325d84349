"""PixelCNN / Gated PixelCNN: layer, likelihoods, causality (gradients), the blind spot, training on real MNIST."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastar.models import GatedPixelCNN, PixelCNN
from fastar.nn import GatedMaskedConv2d
from fastar.nn.gated import shift_down


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).double().eval()


def _order(C, H, W):
    """Sub-pixel rank of every input element (c, i, j) in the generation order."""
    c = torch.arange(C)[:, None, None]
    i = torch.arange(H)[None, :, None]
    j = torch.arange(W)[None, None, :]
    return (i * W + j) * C + c


def _dependence(model, C, H, W, i, j, c, trials=3):
    """Which input sub-pixels the logits of sub-pixel (i, j, c) depend on (gradient != 0), (C, H, W) bool."""
    seen = torch.zeros(C, H, W, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    for _ in range(trials):
        x = (torch.rand(2, C, H, W, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        out = model.logits_flat(x)
        k = out.shape[1] // C
        out[:, c * k:(c + 1) * k, i, j].sum().backward()
        seen |= (x.grad.abs().sum(0) > 0)
    return seen


# ---------------------------------------------------------------------------------------------- layer


def test_gated_layer_matches_written_out_formula():
    torch.manual_seed(0)
    blk = GatedMaskedConv2d(6, 6, 3, "B", num_classes=5, cond_channels=2).double()
    v, h = torch.randn(2, 6, 5, 6, dtype=torch.float64), torch.randn(2, 6, 5, 6, dtype=torch.float64)
    labels, cmap = torch.tensor([1, 4]), torch.randn(2, 2, 5, 6, dtype=torch.float64)
    v_out, h_out, skip = blk(v, h, (labels, cmap))
    F = torch.nn.functional
    vp = F.conv2d(v, blk.v_conv.weight * blk.v_mask, blk.v_conv.bias, padding=1)
    va = vp + blk.class_v(labels)[:, :, None, None] + blk.map_v(cmap)
    hp = (F.conv2d(h, blk.h_conv.weight * blk.h_mask, blk.h_conv.bias, padding=(0, 1))
          + F.conv2d(F.pad(vp, (0, 0, 1, 0))[:, :, :-1], blk.link.weight, blk.link.bias)
          + blk.class_h(labels)[:, :, None, None] + blk.map_h(cmap))
    g = torch.tanh(hp[:, :6]) * torch.sigmoid(hp[:, 6:])
    torch.testing.assert_close(v_out, torch.tanh(va[:, :6]) * torch.sigmoid(va[:, 6:]))
    torch.testing.assert_close(skip, F.conv2d(g, blk.skip.weight, blk.skip.bias))
    torch.testing.assert_close(h_out, F.conv2d(g, blk.out.weight, blk.out.bias) + h)
    assert torch.equal(shift_down(vp)[:, :, 0], torch.zeros_like(vp[:, :, 0]))


def test_gated_layer_gradcheck():
    torch.manual_seed(0)
    blk = GatedMaskedConv2d(3, 3, 3, "A", color_groups=3, num_classes=2).double()
    v = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1])
    assert torch.autograd.gradcheck(lambda v, h: blk(v, h, labels), (v, h))


def test_gated_layer_torch_compile_fullgraph():
    torch.manual_seed(0)
    blk = GatedMaskedConv2d(4, 4, 3).eval()
    v, h = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    want = blk(v, h)
    got = torch.compile(blk, fullgraph=True)(v, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gated_layer_bad_input():
    with pytest.raises(ValueError, match="odd"):
        GatedMaskedConv2d(4, 4, 2)
    with pytest.raises(ValueError, match="residual needs"):
        GatedMaskedConv2d(3, 4, 3, residual=True)
    with pytest.raises(ValueError, match="divisible by 3"):
        GatedMaskedConv2d(3, 4, 3, color_groups=3)
    blk = GatedMaskedConv2d(2, 2, 3, num_classes=3)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="pass cond"):
        blk(x, x)
    with pytest.raises(ValueError, match="int64"):
        blk(x, x, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="neither num_classes"):
        GatedMaskedConv2d(2, 2, 3)(x, x, torch.tensor([1]))
    with pytest.raises(ValueError, match="conditioning map"):
        GatedMaskedConv2d(2, 2, 3, cond_channels=2)(x, x, torch.randn(1, 3, 4, 4))


# ------------------------------------------------------------------------------------------ likelihoods


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
@pytest.mark.parametrize("C,levels,H,W", [(1, 2, 2, 2), (3, 3, 1, 1), (1, 3, 1, 3)])
def test_probabilities_sum_to_one(cls, C, levels, H, W):
    """Summing exp(log_prob) over every possible image gives 1 only if the model is a proper
    autoregressive factorisation (causal masks, colour order included)."""
    model = _model(cls, in_channels=C, levels=levels, layers=2, channels=6)
    images = torch.tensor(list(itertools.product(range(levels), repeat=C * H * W))).view(-1, C, H, W)
    with torch.no_grad():
        total = model.log_prob(images).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("levels", [2, 256])
def test_nll_log_prob_bits_per_dim(levels):
    model = _model(GatedPixelCNN, in_channels=3, levels=levels, layers=2, channels=6)
    x = torch.randint(0, levels, (2, 3, 4, 5))
    logits = model(x)
    if levels == 2:
        assert logits.shape == (2, 3, 4, 5)
        want = torch.nn.functional.binary_cross_entropy_with_logits(logits, x.double(), reduction="none")
    else:
        assert logits.shape == (2, 3, levels, 4, 5)
        want = -torch.log_softmax(logits, 2).gather(2, x.unsqueeze(2)).squeeze(2)
    nll = model.nll(x)
    torch.testing.assert_close(nll, want.flatten(1).sum(1))
    torch.testing.assert_close(model.log_prob(x), -nll)
    torch.testing.assert_close(model.bits_per_dim(x), nll / (60 * math.log(2)))
    torch.testing.assert_close(model.loss(x), nll.mean())


def test_model_bad_input():
    with pytest.raises(ValueError, match="in_channels"):
        GatedPixelCNN(in_channels=2)
    with pytest.raises(ValueError, match="levels"):
        PixelCNN(levels=1)
    with pytest.raises(ValueError, match="divisible"):
        GatedPixelCNN(in_channels=3, channels=64)
    with pytest.raises(ValueError, match="divisible"):
        PixelCNN(in_channels=3, channels=63)
    m = GatedPixelCNN(1, 2, layers=1, channels=4)
    with pytest.raises(ValueError, match="values must lie"):
        m.nll(torch.full((1, 1, 3, 3), 2))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m.nll(torch.zeros(1, 3, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer values"):
        m.nll(torch.full((1, 1, 3, 3), 0.5))
    with pytest.raises(ValueError, match="unconditional"):
        PixelCNN(1, 2, layers=1, channels=4)(torch.zeros(1, 1, 3, 3, dtype=torch.long), torch.tensor([0]))


# ------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("C", [1, 3])
def test_gated_causal_and_no_blind_spot(C):
    """Output at sub-pixel t depends on every input sub-pixel before t and on none at or after it."""
    H, W = 5, 5
    # 4 channels per colour block, so no ReLU of the head zeroes a whole block by chance.
    model = _model(GatedPixelCNN, in_channels=C, levels=2, layers=3, channels=12)
    order = _order(C, H, W)
    for (i, j, c) in [(0, 0, 0), (2, 2, 0), (4, 4, C - 1), (3, 0, C - 1), (1, 4, 0)]:
        seen = _dependence(model, C, H, W, i, j, c)
        t = (i * W + j) * C + c
        assert not seen[order >= t].any(), f"output ({i}, {j}, {c}) sees the future"
        assert seen[order < t].all(), f"output ({i}, {j}, {c}) misses part of its past (blind spot)"


@pytest.mark.parametrize("C", [1, 3])
def test_pixelcnn_causal(C):
    H, W = 5, 6
    model = _model(PixelCNN, in_channels=C, levels=2, layers=3, channels=6)
    order = _order(C, H, W)
    for (i, j, c) in [(0, 0, 0), (2, 3, 0), (4, 5, C - 1), (3, 0, C - 1)]:
        seen = _dependence(model, C, H, W, i, j, c)
        t = (i * W + j) * C + c
        assert not seen[order >= t].any(), f"output ({i}, {j}, {c}) sees the future"
        if C == 3:  # the current pixel's earlier colours are seen, its later ones are not
            assert seen[:c, i, j].all() and not seen[c:, i, j].any()


def test_pixelcnn_blind_spot_and_gated_fixes_it():
    """PixelCNN's (i, j) never sees (i - 1, j + 4), however deep; Gated PixelCNN does."""
    H, W, (i, j) = 6, 9, (4, 2)
    deep = _model(PixelCNN, in_channels=1, levels=2, layers=6, channels=12)
    seen = _dependence(deep, 1, H, W, i, j, 0)
    assert not seen[0, i - 1, j + 4] and not seen[0, i - 1, j + 6]   # the blind spot, upper right
    assert seen[0, i - 1, j + 3] and seen[0, i - 4, j + 6]           # the model is not blind there
    gated = _model(GatedPixelCNN, in_channels=1, levels=2, layers=4, channels=12)   # vertical reach +-6
    seen = _dependence(gated, 1, H, W, i, j, 0)
    assert seen[0, i - 1, j + 4] and seen[0, i - 1, j + 6]


# ---------------------------------------------------------------------------------------- training


def test_training_on_real_mnist_lowers_nll():
    """A few hundred Adam steps of a small GatedPixelCNN on real binarized MNIST (28x28) beat both
    the uniform baseline (784 ln 2 nats) and the per-pixel independent Bernoulli baseline."""
    pytest.importorskip("numpy")
    try:
        from fastar.data import load_mnist_5k
        x, _ = load_mnist_5k(binarize=True)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    test, train = x[perm[:256]], x[perm[256:]]
    torch.manual_seed(0)
    model = GatedPixelCNN(1, 2, layers=3, channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=g)]
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll = model.nll(test).mean().item()
    uniform = 784 * math.log(2)
    p = train.double().mean(0).clamp(1e-3, 1 - 1e-3)
    independent = -(test * p.log() + (1 - test) * (1 - p).log()).sum((1, 2, 3)).mean().item()
    # Measured: ~76 nats after these 200 steps (uniform 543, independent pixels ~203).
    assert nll < 0.5 * uniform, (nll, uniform)
    assert nll < independent - 20, (nll, independent)
