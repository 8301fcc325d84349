"""pixelrnn_step, the fused PixelRNN sub-pixel step: kernel == its twin on random mid-image states (every
buffer it writes, both layer kinds, binary / RGB, conditional, float32 / float64), the fused cache
draws what the per-op cache and the naive sampler draw, and bad arguments are clear errors."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar import sampling
from fastar.models import PixelRNN
from fastar.models.pixelrnn_cache import PixelRNNCache
from fastar.ops import pixelrnn as op_mod
from tests.conftest import requires_kernel, tol

CONFIGS = [dict(kind="diagonal", in_channels=1, levels=2, layers=3, hidden=8),
           dict(kind="row", in_channels=1, levels=2, layers=2, hidden=8),
           dict(kind="diagonal", in_channels=3, levels=5, layers=2, hidden=6, num_classes=3),
           dict(kind="row", in_channels=3, levels=4, layers=2, hidden=12, kernel_size=5, residual=False)]
IDS = ["diag-binary", "row-binary", "diag-rgb-cond", "row-rgb-k5-nores"]

pytestmark = pytest.mark.usefixtures("one_thread")   # hundreds of tiny steps


def _cache(cfg, device, dtype, n=2, shape=(3, 4), seed=0, prefix=False):
    torch.manual_seed(seed)
    model = PixelRNN(**cfg).to(device, dtype).eval()
    cond = torch.arange(n, device=device) % cfg["num_classes"] if cfg.get("num_classes") else None
    kw = {}
    if prefix:
        C = cfg["in_channels"]
        kw = dict(prefix=torch.randint(0, cfg["levels"], (n, C) + shape, device=device),
                  mask=torch.rand((n, C) + shape, device=device) < 0.4)
    run = sampling.prepare(model, n, shape, cond, torch.Generator().manual_seed(seed + 1), **kw)
    with fastar.backend("reference"):
        cache = PixelRNNCache(model, run, fused=True)          # its op arguments, whatever runs them
    return model, run, cache


def _randomise(cache, run, t, seed):
    g = torch.Generator().manual_seed(seed)
    args = list(cache._fused_fn.args)
    for k in (0, 4, 5, 6, 7):   # image, hs, cs, xrow, aux: a mid-image state
        buf = args[k]
        buf.copy_(torch.randn(buf.shape, generator=g, dtype=torch.float64).to(buf))
    args[2][0] = t
    return args


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else ([x for x in a] if isinstance(a, list) else a)
            for a in args]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kernel_matches_twin_on_random_states(device, cfg):
    requires_kernel("pixelrnn_step", device)
    for dtype in (torch.float32, torch.float64):
        _, run, cache = _cache(cfg, device, dtype)
        T = run.seq.steps
        for t in (0, 1, cache.C * cache.W - 1, cache.C * cache.W + 2, T - 1):   # edges: first row / column, last
            args = _randomise(cache, run, t, seed=t)
            a, b = _clone(args), _clone(args)
            torch.ops.fastar.pixelrnn_step(*a)
            op_mod._ref_impl(*b)
            for k, name in ((0, "image"), (1, "codes"), (2, "step"), (3, "logits"), (4, "hs"), (5, "cs"), (6, "xrow")):
                if a[k].is_floating_point():
                    torch.testing.assert_close(a[k], b[k], **tol(dtype, 10), msg=f"{name} at t={t}, {dtype}")
                else:
                    assert torch.equal(a[k], b[k]), (name, t, dtype)
            assert int(a[2][0]) == t + 1


@pytest.mark.parametrize("cfg,prefix", [(c, p) for c, p in zip(CONFIGS, (False, True, True, False))],
                         ids=[f"{i}-{'prefix' if p else 'free'}" for i, p in zip(IDS, (False, True, True, False))])
def test_fused_equals_per_op_and_naive_float64(device, cfg, prefix):
    _, run, _ = _cache(cfg, device, torch.float64, prefix=prefix)
    model = run.model

    def again():
        return _cache(cfg, device, torch.float64, prefix=prefix)[1]

    naive = sampling.naive_sample(model, again())
    fused = sampling.cached_sample(model, again(), fused=True)
    per_op = sampling.cached_sample(model, again(), fused=False)
    assert torch.equal(fused, naive) and torch.equal(per_op, naive)
    if _has_kernel(device):   # the default picks the kernel
        assert PixelRNNCache(model, again()).draws


def _has_kernel(device):
    from fastar import _backend

    return "pixelrnn_step" in (_backend.CPU_KERNELS if device.type == "cpu" else _backend.CUDA_KERNELS)


def test_temperature_zero_is_argmax_and_same_as_twin():
    cfg = CONFIGS[2]
    torch.manual_seed(0)
    model = PixelRNN(**cfg).double().eval()
    cond = torch.tensor([0, 1])
    outs = []
    for backend in ("auto", "reference"):
        with fastar.backend(backend):
            outs.append(model.sample(2, (2, 3), cond=cond, temperature=0.0, generator=torch.Generator().manual_seed(3),
                                     progress=False, fused=True))
    assert torch.equal(outs[0], outs[1])
    naive = model.sample(2, (2, 3), cond=cond, temperature=0.0, method="naive", progress=False)
    assert torch.equal(outs[0], naive)


def _bad(what, change):
    def call(fn):
        _, _, cache = _cache(CONFIGS[2], torch.device("cpu"), torch.float64)
        args = _clone(cache._fused_fn.args)
        change(args)
        fn(*args)
    return what, call


BAD = [
    _bad("hs of the wrong shape", lambda a: a.__setitem__(4, a[4][:, :, :, :1])),
    _bad("xrow float32", lambda a: a.__setitem__(6, a[6].float())),
    _bad("codes float", lambda a: a.__setitem__(1, a[1].double())),
    _bad("noise outside [0, 1)", lambda a: a[8].fill_(1.5)),
    _bad("config kind 2", lambda a: a.__setitem__(12, [2] + a[12][1:])),
    _bad("pack too short", lambda a: a.__setitem__(11, a[11][:-1])),
    _bad("in_w missing", lambda a: a[11].__setitem__(0, None)),
    _bad("negative temperature", lambda a: a.__setitem__(13, -1.0)),
    _bad("prefix without given", lambda a: (a.__setitem__(9, a[1].clone()), a.__setitem__(10, None))),
]


@pytest.mark.parametrize("what,call", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("twin", [False, True], ids=["public", "ref"])
def test_bad_input_is_a_clear_error(what, call, twin):
    fn = op_mod.pixelrnn_step_ref if twin else op_mod.pixelrnn_step
    with pytest.raises((ValueError, TypeError, RuntimeError), match="pixelrnn_step"):
        call(fn)


def test_kernel_refuses_a_step_counter_past_the_image():
    requires_kernel("pixelrnn_step", "cpu")
    _, run, cache = _cache(CONFIGS[0], torch.device("cpu"), torch.float32)
    args = _clone(cache._fused_fn.args)
    args[2][0] = run.seq.steps
    with pytest.raises(RuntimeError, match="step counter"):
        torch.ops.fastar.pixelrnn_step(*args)
