"""PixelSNAIL beyond the contract suite: full context by gradients (odd and even kernels), a finite
first pixel, the conditioned sampler (cached == naive, per-step == forward, with a prefix), the
drop-in attention layer's step against its forward pass, and bad input."""
from __future__ import annotations

import pytest
import torch

from fastar import sampling
from fastar.models import PixelSNAIL
from fastar.nn import CausalSelfAttention2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    cfg = dict(in_channels=3, channels=8, n_blocks=1, n_res_blocks=1, kernel_size=2, key_channels=4,
               value_channels=4, nr_logistic_mix=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return PixelSNAIL(**cfg).double().eval()


def _reach(model, H, W, C=3):
    """(L, L) bool: reach[p, s] = some output at pixel p has a nonzero gradient w.r.t. pixel s's input."""
    L = H * W
    r = torch.rand(1, model.raw_channels, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = (r * 2 - 1).requires_grad_(True)
    out = model.net(r)                                                           # (1, P, H, W)
    reach = torch.zeros(L, L, dtype=torch.bool)
    for p in range(L):
        g, = torch.autograd.grad(out[0, :, p // W, p % W].sum(), r, retain_graph=True)
        reach[p] = g[0].abs().sum(0).flatten() > 0
    return reach


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_every_earlier_pixel_reaches_every_pixel(kernel_size):
    # 5x6: wider than every kernel, so the convolutions alone would leave the upper-right region unseen.
    H, W = 5, 6
    model = _model(kernel_size=kernel_size, n_blocks=2)
    reach = _reach(model, H, W)
    want = torch.ones(H * W, H * W, dtype=torch.bool).tril(-1)                 # strictly earlier, all of them
    missing = (want & ~reach).nonzero().tolist()
    leaks = (reach & ~want).nonzero().tolist()
    assert not leaks, f"pixels see themselves or later pixels: {leaks[:5]}"
    assert not missing, f"{len(missing)} earlier pixel pairs never reach (p, s): {missing[:5]}"


def test_reach_check_catches_a_blind_spot():
    # With the attention's output cut off, only the up-and-left convolution windows remain: pixels up and to
    # the right are never seen, and the check must say so.
    model = _model(kernel_size=2)
    with torch.no_grad():
        blk = model.blocks[0]
        blk.out.aux.weight.zero_()                                               # the attention output unused
    reach = _reach(model, 4, 4)
    want = torch.ones(16, 16, dtype=torch.bool).tril(-1)
    assert bool((want & ~reach).any())


def test_first_pixel_finite_and_attention_zero_there():
    model = _model()
    x = torch.randint(0, 256, (2, 3, 3, 4))
    p = model(x)
    assert bool(torch.isfinite(p).all())
    layer = model.blocks[0].attn
    q = torch.randn(2, layer.in_channels, 3, 4, dtype=torch.float64)
    raw = torch.randn(2, layer.raw_channels, 3, 4, dtype=torch.float64)
    out = layer(q, raw)
    assert bool(torch.isfinite(out).all()) and bool((out[:, :, 0, 0] == 0).all())
    # one position only: nothing to attend to at all
    assert bool((layer(q[:, :, :1, :1], raw[:, :, :1, :1]) == 0).all())


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_step_equals_forward(heads):
    torch.manual_seed(0)
    layer = CausalSelfAttention2d(5, 4, 6, heads=heads, raw_channels=3).double()
    n, H, W = 2, 3, 4
    x = torch.randn(n, 5, H, W, dtype=torch.float64)
    raw = torch.randn(n, 3, H, W, dtype=torch.float64)
    full = layer(x, raw).flatten(2)                                              # (N, V, L)
    for prefix in (False, True):
        cache = layer.new_cache(n, H * W)
        for p in range(H * W):
            t = torch.tensor([p])
            xp, rp = x.flatten(2)[:, :, p], raw.flatten(2)[:, :, p]
            out = layer.step_query(xp, cache, t, length=p if prefix else None)
            torch.testing.assert_close(out, full[:, :, p], rtol=1e-12, atol=1e-12)
            layer.step_append(xp, rp, cache, t)


def test_attention_layer_bad_input():
    with pytest.raises(ValueError, match="divisible by heads"):
        CausalSelfAttention2d(4, 6, 8, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        CausalSelfAttention2d(4, 4, 4, dropout=1.0)
    layer = CausalSelfAttention2d(4, 4, 4, raw_channels=2)
    with pytest.raises(ValueError, match="raw must be"):
        layer(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        layer(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, 2))


def _cond_model():
    return _model(in_channels=1, levels=5, channels=8, n_blocks=2, kernel_size=2, cond_channels=3, heads=2,
                  key_channels=4, value_channels=4)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_conditioned_code_prior_cached_equals_naive(device, with_prefix):
    model = _cond_model().to(device)
    g = torch.Generator().manual_seed(0)
    n, H, W = 3, 4, 6
    cond = torch.randn(n, 3, 2, 2, dtype=torch.float64, generator=g).to(device)   # scale (2, 3)
    kw = {}
    if with_prefix:
        x0 = torch.randint(0, 5, (n, 1, H, W), generator=g)
        mask = torch.zeros(n, 1, H, W, dtype=torch.bool)
        mask[:, :, :2] = True
        mask[1, :, 3, 2] = True
        kw = dict(prefix=x0.to(device), mask=mask.to(device))
    runs = {}
    for method in ("naive", "cached"):
        runs[method] = model.sample(n, (H, W), cond=cond, generator=torch.Generator().manual_seed(1), method=method,
                                    progress=False, return_params=True, **kw)
    (a, pa), (b, pb) = runs["naive"], runs["cached"]
    assert torch.equal(a, b)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    # without recording (on CUDA: the steps replayed from captured graphs)
    plain = model.sample(n, (H, W), cond=cond, generator=torch.Generator().manual_seed(1), progress=False, **kw)
    assert torch.equal(plain, a)
    if with_prefix:
        assert torch.equal(a[kw["mask"]], kw["prefix"][kw["mask"]])
    # per-step parameters == one teacher-forced pass on the drawn codes; the cond is used
    forced = model(b, cond).flatten(2).permute(2, 0, 1)
    torch.testing.assert_close(pb, forced, rtol=1e-5, atol=1e-5)
    other = model(b, cond.flip(0)).flatten(2).permute(2, 0, 1)
    assert not torch.allclose(other, forced)


@pytest.mark.parametrize("kernel_size", [2, 3, 4])
def test_cpu_prefix_attention_equals_the_full_length_path(kernel_size):
    # The CPU path reads only the filled prefix of the key/value caches; the capturable path (CUDA) masks the
    # full length. Both give the steps of the full forward pass, on an image taller than the ring of k input
    # rows each causal convolution keeps.
    from fastar.models.pixelsnail_cache import PixelSNAILCache

    model = _model(n_blocks=2, kernel_size=kernel_size)
    outs = []
    for prefix_only in (True, False):
        run = sampling.prepare(model, 2, (7, 5), generator=torch.Generator().manual_seed(3), record=True)
        orig = PixelSNAILCache.__init__

        def init(self, m, r, orig=orig, flag=prefix_only):
            orig(self, m, r)
            self.prefix_only = flag
        PixelSNAILCache.__init__ = init
        try:
            outs.append(sampling.cached_sample(model, run))
        finally:
            PixelSNAILCache.__init__ = orig
        torch.testing.assert_close(outs[-1][1], run.seq.forward(run.values, None), rtol=1e-10, atol=1e-10)
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)


def test_float32_steps_match_forward():
    model = _model(n_blocks=2).float()
    run = sampling.prepare(model, 2, (4, 4), generator=torch.Generator().manual_seed(0), record=True)
    _, params = sampling.cached_sample(model, run)
    torch.testing.assert_close(params, run.seq.forward(run.values, None), rtol=1e-4, atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="in_channels must be 1"):
        PixelSNAIL(in_channels=3, levels=512, channels=8)
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        PixelSNAIL(in_channels=2)
    with pytest.raises(ValueError, match="divisible by heads"):
        PixelSNAIL(channels=8, key_channels=6, heads=4)
    with pytest.raises(ValueError, match="kernel_size"):
        PixelSNAIL(channels=8, kernel_size=0)
    codes = _cond_model()
    x = torch.randint(0, 5, (2, 1, 4, 6))
    cond = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    assert codes.nll(x, cond).shape == (2,)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        codes.nll(x + 5, cond)                                                   # codes outside levels
    with pytest.raises(ValueError, match="integer scale"):
        codes.nll(x, torch.randn(2, 3, 3, 3, dtype=torch.float64))              # 4 / 3 is not an integer
    with pytest.raises(ValueError, match="integer scale"):
        codes.sample(2, (4, 6), cond=torch.randn(2, 3, 8, 6, dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match="conditioning map"):
        codes.nll(x, None)
    with pytest.raises(ValueError, match="unconditional"):
        _model().nll(torch.zeros(1, 3, 2, 2, dtype=torch.int64), cond)
    mix = _model()                                                               # 8-bit mixture
    with pytest.raises(ValueError, match=r"lie in \[0, 256\)"):
        mix.nll(torch.full((1, 3, 2, 2), 300))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        mix.nll(torch.zeros(1, 1, 2, 2, dtype=torch.int64))                     # a code map to an RGB mixture


def test_default_config_picks_the_head():
    from fastar.models.pixelsnail import _config

    assert _config(dict(shape=[3, 32, 32], levels=256))["num_bits"] == 8
    assert _config(dict(shape=[1, 8, 8], levels=512))["levels"] == 512
    assert _config(dict(shape=[1, 8, 8], levels=17))["levels"] == 17
    with pytest.raises(ValueError, match="2\\*\\*b levels"):
        _config(dict(shape=[3, 32, 32], levels=17))
