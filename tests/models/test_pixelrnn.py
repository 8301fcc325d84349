"""PixelRNN: exact cached sampling (with and without a prefix), per-step == forward, causality and
context of the whole model by gradients, construction errors. (The contract suite holds it too.)"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastar.models import PixelRNN

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [
    dict(kind="diagonal", in_channels=1, levels=2, layers=2, hidden=6),
    dict(kind="row", in_channels=1, levels=2, layers=2, hidden=6),
    dict(kind="diagonal", in_channels=3, levels=4, layers=2, hidden=6),
    dict(kind="row", in_channels=3, levels=4, layers=2, hidden=6, kernel_size=5),
    dict(kind="diagonal", in_channels=1, levels=2, layers=1, hidden=4, num_classes=3),
    dict(kind="row", in_channels=1, levels=5, layers=3, hidden=4, residual=False),
]
IDS = [f"{c['kind']}-c{c['in_channels']}-l{c['levels']}" + ("-cond" if c.get("num_classes") else "")
       + ("-nores" if c.get("residual") is False else "") for c in CONFIGS]


def _model(cfg, scale=0.5):
    torch.manual_seed(0)
    m = PixelRNN(**cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)
    return m


def _cond(cfg, n):
    return torch.arange(n) % cfg["num_classes"] if cfg.get("num_classes") else None


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cached_equals_naive_and_forward(cfg):
    m = _model(cfg)
    n, shape = 3, (4, 5)
    cond = _cond(cfg, n)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, pa = m.sample(n, shape, cond, generator=g(), progress=False, return_params=True)
    b, pb = m.sample(n, shape, cond, generator=g(), method="naive", progress=False, return_params=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)
    # the per-step parameters are the teacher-forced forward pass on the drawn images
    logits = m(a, cond)
    C = cfg["in_channels"]
    per = (logits.permute(2, 3, 1, 0).reshape(-1, n, 1) if cfg["levels"] == 2
           else logits.permute(3, 4, 1, 0, 2).reshape(-1, n, cfg["levels"]))
    torch.testing.assert_close(pa, per, rtol=1e-5, atol=1e-5)
    assert a.shape == (n, C, *shape) and int(a.min()) >= 0 and int(a.max()) < cfg["levels"]


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=IDS[:4])
def test_completion_with_a_prefix(cfg):
    m = _model(cfg)
    n, (h, w) = 2, (5, 4)
    C = cfg["in_channels"]
    prefix = torch.randint(0, cfg["levels"], (n, C, h, w), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
    mask[:, :, :2] = True                          # the top two rows given, as in the paper's Figure 1
    mask[:, :, 3, 1] = True                        # and one pixel further down (any mask is allowed)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = m.sample(n, (h, w), generator=g(), prefix=prefix, mask=mask, progress=False)
    b = m.sample(n, (h, w), generator=g(), prefix=prefix, mask=mask, method="naive", progress=False)
    assert torch.equal(a, b)
    full = mask.expand(n, C, h, w)
    assert torch.equal(a[full], prefix[full])
    # temperature 0: argmax, the same both ways
    a0 = m.sample(n, (h, w), generator=g(), prefix=prefix, mask=mask, temperature=0, progress=False)
    b0 = m.sample(n, (h, w), generator=g(), prefix=prefix, mask=mask, temperature=0, method="naive",
                  progress=False)
    assert torch.equal(a0, b0)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=[IDS[0], IDS[2]])
def test_float32_cached_matches_naive(cfg):
    m = _model(cfg).float()
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    _, pa = m.sample(2, (6, 6), generator=g(), progress=False, return_params=True)
    _, pb = m.sample(2, (6, 6), generator=g(), method="naive", progress=False, return_params=True)
    # float32 draws may part at a CDF boundary; compare the first steps' parameters, which share inputs
    torch.testing.assert_close(pa[:8], pb[:8], rtol=1e-4, atol=1e-4)


def _model_dependence(m, C, h, w, levels):
    """dep[t, s]: whether sub-pixel t's logits (step order) have a gradient w.r.t. sub-pixel s's input."""
    T = C * h * w
    dep = torch.zeros(T, T, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):          # a few random inputs, so that a unit a ReLU happens to kill hides nothing
        x = torch.randn(1, C, h, w, generator=g, dtype=torch.float64, requires_grad=True)
        out = m.logits_flat(x)
        per = out.view(1, C, -1, h, w) if levels > 2 else out.view(1, C, 1, h, w)
        proj = torch.randn(per.shape[2], generator=g, dtype=torch.float64)
        for t in range(T):
            p, c = divmod(t, C)
            i, j = divmod(p, w)
            gx, = torch.autograd.grad((per[0, c, :, i, j] * proj).sum(), x, retain_graph=True)
            dep[t] |= (gx[0].permute(1, 2, 0).reshape(-1) != 0)      # input in step order (i, j, c)
    return dep


@pytest.mark.parametrize("C", [1, 3])
def test_diagonal_model_sees_every_earlier_sub_pixel_and_no_later_one(C):
    m = _model(dict(kind="diagonal", in_channels=C, levels=4, layers=2, hidden=12), scale=0.6)
    h, w = 4, 5
    dep = _model_dependence(m, C, h, w, 4)
    T = C * h * w
    want = torch.arange(T).view(1, T) < torch.arange(T).view(T, 1)
    assert not (dep & ~want).any(), "a sub-pixel's logits depend on itself or a later sub-pixel"
    assert not (want & ~dep).any(), f"missing context: {(want & ~dep).nonzero()[:3].tolist()}"


def test_without_the_row_input_the_paper_network_misses_the_last_pixel_of_each_row():
    # The paper's network (no image term into the first right-to-left direction): (i, j) misses
    # (i - 1, W - 1) exactly for j < W - 1 - 3 (the 7x7 first conv reaches 3 columns), nothing else.
    m = _model(dict(kind="diagonal", in_channels=1, levels=4, layers=2, hidden=12), scale=0.6)
    m.row_input = None
    h, w = 3, 6
    dep = _model_dependence(m, 1, h, w, 4)
    T = h * w
    want = torch.arange(T).view(1, T) < torch.arange(T).view(T, 1)
    missing = {tuple(p) for p in (want & ~dep).nonzero().tolist()}
    expect = {(i * w + j, (i - 1) * w + w - 1) for i in range(1, h) for j in range(w - 4)}
    assert missing == expect
    assert not (dep & ~want).any()


@pytest.mark.parametrize("C", [1, 3])
def test_row_model_is_causal_with_the_triangular_context(C):
    m = _model(dict(kind="row", in_channels=C, levels=4, layers=1, hidden=12, first_kernel_size=3), scale=0.6)
    h, w = 4, 6
    dep = _model_dependence(m, C, h, w, 4)
    T = C * h * w
    t = torch.arange(T)
    pi, pj, pc = (t // C) // w, (t // C) % w, t % C
    causal = t.view(1, T) < t.view(T, 1)
    assert not (dep & ~causal).any(), "a sub-pixel's logits depend on itself or a later sub-pixel"
    # One Row LSTM layer (1x3 mask-B input conv, width-3 state conv) after a 3x3 mask-A conv: the state at
    # (i, j) reads the first conv's output at (i - d, j - 1 - d .. j + d), which carries the pixels of row
    # i - D over columns j - D - 2 .. j + D (D >= 1), and of its own row j - 2 .. j - 1 (plus, in RGB,
    # the pixel's own earlier colours): a triangle, not the whole past.
    d = pi.view(T, 1) - pi.view(1, T)
    dj = pj.view(1, T) - pj.view(T, 1)
    tri = causal & (((d >= 1) & (dj >= -d - 2) & (dj <= d)) | ((d == 0) & (dj >= -2)))
    assert not (tri & ~dep).any(), f"inside the Row LSTM's triangle, not seen: {(tri & ~dep).nonzero()[:3].tolist()}"
    assert not (dep & ~tri).any(), f"outside the Row LSTM's triangle, seen: {(dep & ~tri).nonzero()[:3].tolist()}"


def test_nll_is_nats_and_matches_the_per_sub_pixel_losses():
    cfg = dict(kind="diagonal", in_channels=1, levels=2, layers=1, hidden=4)
    m = _model(cfg)
    x = torch.randint(0, 2, (3, 1, 4, 4))
    logits = m(x)
    per = F.binary_cross_entropy_with_logits(logits, x.double(), reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(m.nll(x), per)
    torch.testing.assert_close(m.bits_per_dim(x), per / (16 * math.log(2)))


def test_bad_construction():
    with pytest.raises(ValueError, match="kind must be 'diagonal'"):
        PixelRNN("column")
    with pytest.raises(ValueError, match="divisible by 6"):
        PixelRNN("row", in_channels=3, hidden=8)
    with pytest.raises(ValueError, match="layers must be a positive int"):
        PixelRNN(layers=0)
    with pytest.raises(ValueError, match="num_classes must be None or a positive int"):
        PixelRNN(num_classes=0)
    with pytest.raises(ValueError, match="odd positive int"):
        PixelRNN(kernel_size=4)
    # bounded in the constructor itself, before anything is built (it used to keep building)
    with pytest.raises(ValueError, match="too large to build"):
        PixelRNN(layers=10**6, hidden=4)
    with pytest.raises(ValueError, match="too large to build"):
        PixelRNN("row", hidden=100_000, layers=1)
    m = PixelRNN(hidden=4, layers=1, levels=2)
    with pytest.raises(ValueError, match="unconditional"):
        m.nll(torch.zeros(1, 1, 2, 2, dtype=torch.int64), torch.tensor([0]))
    mc = PixelRNN(hidden=4, layers=1, levels=2, num_classes=2)
    with pytest.raises(ValueError, match="class labels must lie in"):
        mc.nll(torch.zeros(1, 1, 2, 2, dtype=torch.int64), torch.tensor([2]))
