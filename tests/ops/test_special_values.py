"""Issue 12 (ops): no silent garbage. Higher-order gradients, infinite mixture parameters, the one
NaN rule of the masked convolutions and of every categorical draw, kernels held to their twins."""
from __future__ import annotations

import math

import pytest
import torch

import fastar
from fastar.ops import mixture as M
from fastar.ops.masked_conv import masked_conv2d, masked_conv2d_ref
from fastar.ops.masked_conv_at import masked_conv2d_at, masked_conv2d_at_ref
from tests.conftest import requires_kernel, tol

INF, NAN = float("inf"), float("nan")


def _causal_mask(c_out, c_in, k, kind="A"):
    m = torch.ones(c_out, c_in, k, k)
    m[:, :, k // 2, k // 2 + (kind == "B"):] = 0
    m[:, :, k // 2 + 1:] = 0
    return m


def _same_nan(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.isinf(a) & (a > 0), torch.isinf(b) & (b > 0))
    assert torch.equal(torch.isinf(a) & (a < 0), torch.isinf(b) & (b < 0))


# ---- second-order gradients: never zeros -------------------------------------------------------

def _penalty_grads(backend, x, w, b, mask):
    with fastar.backend(backend):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        y = masked_conv2d(x, w, b, mask)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w, b), allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_conv2d_gradient_penalty_matches_reference(dtype):
    requires_kernel("masked_conv2d", "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=dtype)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(4, generator=g, dtype=dtype)
    mask = _causal_mask(4, 3, 3, "B")
    got = _penalty_grads("kernel", x, w, b, mask)
    want = _penalty_grads("reference", x, w, b, mask)
    for a, r in zip(got, want):
        ra = torch.zeros_like(x[:0].sum()) if r is None else r
        aa = torch.zeros_like(ra) if a is None else a
        torch.testing.assert_close(aa, ra, **tol(dtype, 10))
    assert got[1].abs().max() > 0  # d/dweight of the penalty is not the silent zero of the issue


def test_masked_conv2d_gradgradcheck():
    requires_kernel("masked_conv2d", "cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _causal_mask(3, 2, 3)
    with fastar.backend("kernel"):
        assert torch.autograd.gradgradcheck(lambda x_, w_, b_: masked_conv2d(x_, w_, b_, mask), (x, w, b))


def test_dml_nll_gradgradcheck_and_penalty():
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    g = torch.Generator().manual_seed(2)
    x = (torch.randint(0, 256, (1, 3, 2, 2), generator=g).double() / 255 * 2 - 1)
    p = torch.randn(1, 20, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    with fastar.backend("kernel"):
        assert torch.autograd.gradgradcheck(lambda p_: M.discretized_mix_logistic_nll(x, p_, 2), (p,))

    def second(backend):
        with fastar.backend(backend):
            pp = p.detach().requires_grad_()
            (gp,) = torch.autograd.grad(M.discretized_mix_logistic_nll(x, pp, 2), pp, create_graph=True)
            return torch.autograd.grad(gp.square().sum(), pp)[0]

    torch.testing.assert_close(second("kernel"), second("reference"), **tol(torch.float64))


def test_backward_ops_refuse_to_be_differentiated():
    requires_kernel("masked_conv2d", "cpu")
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    go = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    gx, _, _ = torch.ops.fastar.masked_conv2d_backward(go, x, w, torch.ones_like(w), [1, 1], [1, 1],
                                                       [True, False, False])
    with pytest.raises(RuntimeError, match="fastar.backend\\('reference'\\)"):
        torch.autograd.grad(gx.sum(), x)


# ---- infinite and NaN mixture parameters -------------------------------------------------------

def _mix(c=3, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, c, 2, 3), generator=g).double() / 255 * 2 - 1
    x[0, :, 0, 0] = -1.0
    x[0, :, 0, 1] = 1.0
    p = torch.randn(2, (10 if c == 3 else 3) * k, 2, 3, generator=g, dtype=torch.float64)
    return x.to(dtype), p.to(dtype)


# (name, function setting the special value into params (B, P, H, W) for k components and c colours)
SPECIAL = {
    "logit -inf": lambda p, k, c: p[:, 1].fill_(-INF),
    "all logits -inf": lambda p, k, c: p[:, :k].fill_(-INF),
    "logit +inf": lambda p, k, c: p[:, 0].fill_(INF),
    "logit nan": lambda p, k, c: p[:, 2].fill_(NAN),
    "mean -inf": lambda p, k, c: p[:, k + 1].fill_(-INF),
    "mean +inf": lambda p, k, c: p[:, k].fill_(INF),
    "log-scale -inf": lambda p, k, c: p[:, 2 * k].fill_(-INF),
    "log-scale +inf": lambda p, k, c: p[:, 2 * k + 1].fill_(INF),
    "log-scale nan": lambda p, k, c: p[:, 2 * k].fill_(NAN),
    "coeff +inf": lambda p, k, c: p[:, 3 * k].fill_(INF) if c == 3 else None,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_dml_nll_special_values_kernel_equals_twin(case, c, dtype):
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    k = 3
    x, p = _mix(c, k, dtype=dtype)
    SPECIAL[case](p, k, c)
    want = M.discretized_mix_logistic_nll_ref(x, p, k, reduction="none")
    with fastar.backend("kernel"):
        got = M.discretized_mix_logistic_nll(x, p, k, reduction="none")
    _same_nan(got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], **tol(dtype, 10))
    expect_nan = case in ("all logits -inf", "logit +inf", "logit nan", "mean -inf", "mean +inf", "log-scale nan")
    assert bool(torch.isnan(want).all()) == expect_nan, want
    if case in ("logit -inf", "log-scale -inf"):
        assert bool(torch.isfinite(want).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dml_nll_switched_off_component_gradients(dtype):
    """A logit of -inf: finite gradients equal to the twin's, zero for the switched-off logit."""
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    k = 3
    x, p = _mix(3, k, dtype=dtype)
    p[:, 1] = -INF

    def grads(backend):
        with fastar.backend(backend):
            pp = p.clone().requires_grad_()
            M.discretized_mix_logistic_nll(x, pp, k).backward()
            return pp.grad

    got, want = grads("kernel"), grads("reference")
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want, **tol(dtype, 10))
    assert float(got[:, 1].abs().max()) < 1e-30


def test_dml_sample_special_values_kernel_equals_twin():
    requires_kernel("sample_discretized_mix_logistic", "cpu")
    for dtype in (torch.float64, torch.float32):
        _, p = _mix(3, 3, dtype=dtype)
        p[0, :, 0, 0] = NAN  # a NaN position: component 0, NaN values
        p[1, 0, 0, 0] = INF  # +inf logit: component 0
        p[1, 3, 0, 1] = -INF  # mean -inf: clamps to -1
        u = torch.rand(2, 4, 2, 3, generator=torch.Generator().manual_seed(3), dtype=dtype)
        want = M.sample_discretized_mix_logistic_ref(p, 3, noise=u)
        with fastar.backend("kernel"):
            got = M.sample_discretized_mix_logistic(p, 3, noise=u)
        _same_nan(got, want)
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=0, rtol=0)


# ---- categorical: the one NaN rule at every draw site ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["inner", "last"])
def test_categorical_nan_and_inf_logits_draw_zero(dtype, layout):
    requires_kernel("categorical_sample", "cpu")
    logits = torch.randn(6, 7, dtype=dtype)
    logits[0, 3] = NAN
    logits[1, 6] = NAN
    logits[2, 5] = INF
    logits[3] = NAN
    logits[4, :] = -INF
    logits[4, 2] = 0.0  # one live category
    noise = torch.rand(6, dtype=dtype)
    dim = 1
    if layout == "inner":
        logits, dim = logits.t().contiguous(), 0
    want = M.categorical_sample_ref(logits, dim=dim, noise=noise)
    with fastar.backend("kernel"):
        got = M.categorical_sample(logits, dim=dim, noise=noise)
    assert got[:4].tolist() == [0, 0, 0, 0] == want[:4].tolist()
    assert got[4].item() == 2 == want[4].item()
    assert torch.equal(got, want)


def test_categorical_out_of_range_noise_twin_follows_the_kernel_rule():
    """Noise the CPU check would refuse (reachable on CUDA): the twin's rule is the kernels'."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    logits[:, 4] = -INF  # the last positive category is 3
    u = torch.tensor([NAN, 1.0, 1.5, -0.5], dtype=torch.float64)
    work = logits
    e = M._exp_rn(work - work.amax(-1, keepdim=True))
    c = torch.cumsum(e, -1)
    idx = 5 - (c > u.unsqueeze(-1) * c[..., -1:]).sum(-1)
    last = torch.full((4,), 3)
    assert torch.minimum(idx, last).tolist() == [3, 3, 3, 0]
    with pytest.raises(ValueError, match=r"uniforms in \[0, 1\)"):
        M.categorical_sample_ref(logits, noise=u)


# ---- masked convolutions: dead taps are never read ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_conv_dead_taps_do_not_propagate_nan(dtype):
    requires_kernel("masked_conv2d", "cpu")
    requires_kernel("masked_conv2d_at", "cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=dtype)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype)
    mask = _causal_mask(4, 3, 3, "A")
    x[0, 1, 3, 3] = NAN  # read by live taps of outputs below/right of it, by dead taps of the others
    x[1, 0, 2, 2] = INF
    want = masked_conv2d_ref(x, w, None, mask)
    with fastar.backend("kernel"):
        got = masked_conv2d(x, w, None, mask)
    _same_nan(got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], **tol(dtype))
    assert not bool(torch.isnan(want[0, :, 3, 3]).any())  # mask A: the pixel itself is a dead tap
    assert bool(torch.isnan(want[0, :, 4, 4]).all())
    # The cached op, every position, both of its paths (one position; many), agrees.
    for pos in (torch.tensor([[3, 3]]), torch.tensor([[i, j] for i in range(5) for j in range(5)])):
        want_at = masked_conv2d_at_ref(x.clone(), None, w, None, mask, pos)
        with fastar.backend("kernel"):
            got_at = masked_conv2d_at(x.clone(), None, w, None, mask, pos)
        _same_nan(got_at, want_at)
        _same_nan(want_at, want[:, :, pos[:, 0], pos[:, 1]])


def test_masked_conv_padding_taps_read_zero_even_next_to_nan():
    """A padding tap of the twin gathers a clamped in-map value: it must count as zero, NaN or not."""
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 1] = NAN  # no real tap of (1, 1) at dilation 2 reads row 0; its padding row -1 clamps there
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    out = masked_conv2d_at_ref(x.clone(), None, w, None, torch.ones_like(w), torch.tensor([[1, 1]]), 2, 2)
    assert float(out) == 0.0
    assert float(masked_conv2d_ref(x, w, None, torch.ones_like(w), 2, 2)[0, 0, 1, 1]) == 0.0


# ---- twins check what kernels check ------------------------------------------------------------

def test_twins_refuse_negative_positions():
    x = torch.zeros(1, 2, 4, 4)
    w = torch.zeros(3, 2, 3, 3)
    with pytest.raises((ValueError, RuntimeError), match="lies outside"):
        masked_conv2d_at_ref(x, None, w, None, torch.ones_like(w), torch.tensor([[-1, 0]]))
    from fastar.ops.wavenet import causal_conv1d_update_ref
    with pytest.raises(ValueError, match="non-negative"):
        causal_conv1d_update_ref(torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(3, 2, 3), None, 1,
                                 torch.tensor([-1]))


def test_empty_batch_sampler_gives_empty_result():
    for fn in (M.sample_discretized_mix_logistic, M.sample_discretized_mix_logistic_ref):
        assert fn(torch.zeros(0, 30, 4, 4), 3).shape == (0, 3, 4, 4)
        assert fn(torch.zeros(0, 9, 5), 3).shape == (0, 5)
        assert fn(torch.zeros(0, 30, 4, 4), 3, noise=torch.rand(0, 4, 4, 4)).shape == (0, 3, 4, 4)


def test_absurd_dilation_is_a_clear_error():
    x = torch.zeros(1, 1, 4, 4)
    w = torch.zeros(1, 1, 3, 3)
    for fn in (masked_conv2d, masked_conv2d_ref):
        with pytest.raises(ValueError, match="dilation"):
            fn(x, w, None, torch.ones_like(w), None, 2 ** 40)
    assert math.isfinite(float(masked_conv2d_ref(x, w, None, torch.ones_like(w), None, 1000).sum()))


def test_tap_by_tap_definition_is_conv2d_for_finite_x():
    """The reference takes F.conv2d for finite x: the tap-by-tap definition must give the same there."""
    from fastar.ops.masked_conv import _masked_conv2d_taps
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    m = (torch.rand(4, 3, 5, 3, generator=g) > 0.5).double()
    m[:, :, 0] = 0  # a dead row of taps
    for pad, dil in (((2, 1), (1, 1)), ((4, 2), (2, 2)), ((0, 0), (1, 1))):
        want = torch.nn.functional.conv2d(x, w * m, b, 1, pad, dil)
        torch.testing.assert_close(_masked_conv2d_taps(x, w, b, m, pad, dil), want, rtol=1e-12, atol=1e-12)
