"""dml_value_log_probs: one pixel's colour j given its earlier colours (what the codec codes R, G, B with).
The CPU kernel against its twin over shapes, dtypes, layouts and extreme parameters; the chain rule
against the loss's joint; bits that do not depend on the thread count; opcheck, torch.compile; bad input."""
from __future__ import annotations

import itertools

import pytest
import torch

import fastar
from fastar.ops import mixture as M
from tests.conftest import requires_kernel, tol

OP = "dml_value_log_probs"


def _case(n, c, k, j, num_bits, dtype=torch.float64, seed=0, spread=1.0):
    """params (N, P) with means mostly in [-1.1, 1.1], log-scales from below the clamp to 1 (times spread:
    spread > 1 reaches far tails and bins of tiny mass), and prev at bin centres."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, (3 if c == 1 else 10) * k, generator=g, dtype=torch.float64)
    s = 3 * k if c == 3 else 2 * k
    for col in range(c):
        base = k + col * s
        p[:, base:base + k] = (torch.rand(n, k, generator=g, dtype=torch.float64) * 2.2 - 1.1) * spread
        p[:, base + k:base + 2 * k] = torch.rand(n, k, generator=g, dtype=torch.float64) * 8.5 - 7.5
    bins = 2 ** num_bits - 1
    prev = (torch.randint(0, bins + 1, (n, j), generator=g).double() * 2 - bins) / bins
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return p.to(dtype), prev.to(acc)


CASES = [  # (N, C, K, j, num_bits)
    (1, 3, 1, 0, 8), (5, 3, 10, 1, 8), (7, 3, 5, 2, 8), (64, 3, 3, 2, 5), (3, 1, 4, 0, 8), (2, 3, 2, 2, 1),
    (4, 3, 3, 1, 12),       # 12 bits: several bins past the +-0.999 edges on each side (openai's edge rule)
    (3, 3, 2, 2, 16), (0, 3, 2, 1, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_equals_reference(case, dtype):
    requires_kernel(OP, "cpu")
    n, c, k, j, bits = case
    for spread in (1.0, 6.0):
        p, prev = _case(n, c, k, j, bits, dtype, seed=n + bits, spread=spread)
        with fastar.backend("kernel"):
            got = M.dml_value_log_probs(p, prev, k, j, bits)
        want = M.dml_value_log_probs_ref(p, prev, k, j, bits)
        assert got.shape == (n, 2 ** bits) and got.dtype == prev.dtype
        # far tails underflow to -inf in both or to tiny numbers in one: compare the probabilities, and the
        # log-probabilities where they carry mass
        torch.testing.assert_close(got.exp(), want.exp(), **tol(dtype, 10))
        live = want > -30
        torch.testing.assert_close(got[live], want[live], **tol(dtype, 100))


def test_non_contiguous_params_and_prev():
    requires_kernel(OP, "cpu")
    p, prev = _case(6, 3, 4, 2, 8)
    pt = p.t().contiguous().t()                                       # same values, column-major
    pv = torch.stack([prev, prev], 2).reshape(6, 4)[:, ::2]            # the same values, stride 2
    with fastar.backend("kernel"):
        a = M.dml_value_log_probs(p, prev, 4, 2, 8)
        b = M.dml_value_log_probs(pt, pv, 4, 2, 8)
    assert not pt.is_contiguous() and not pv.is_contiguous()
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("num_bits", [1, 2, 3])
def test_chain_rule_of_the_joint(backend, num_bits):
    """Summed over the colours at every joint value the conditionals equal the loss's joint log-probability,
    and each conditional sums to one up to openai's small-mass fallback (at most L * MIN_BIN_MASS)."""
    if backend == "kernel":
        requires_kernel(OP, "cpu")
    from fastar.nn.heads import DiscretizedMixLogistic

    h = DiscretizedMixLogistic(3, channels=3, num_bits=num_bits)
    p, _ = _case(4, 3, 3, 0, num_bits, seed=num_bits)
    sup = h.support()                                                 # (L**3, 3)
    L, J = 2 ** num_bits, sup.shape[0]
    col = h.value_support(0)
    total = torch.zeros(4, J, dtype=torch.float64)
    with fastar.backend(backend):
        for j in range(3):
            lp = h.value_log_probs(p.repeat_interleave(J, 0), j, sup[:, :j].repeat(4, 1)).view(4, J, L)
            torch.testing.assert_close(lp.exp().sum(2), torch.ones(4, J, dtype=torch.float64), rtol=0,
                                       atol=L * M.MIN_BIN_MASS)
            pick = (sup[:, j:j + 1] - col[None, :]).abs().argmin(1)
            total += lp.gather(2, pick.view(1, -1, 1).expand(4, -1, 1)).squeeze(2)
        joint = h.support_log_probs(p)
    torch.testing.assert_close(total, joint, rtol=1e-10, atol=1e-9)          # edges vs centres +- 1/bins: rounding


def test_bits_do_not_depend_on_the_thread_count():
    requires_kernel(OP, "cpu")
    p, prev = _case(256, 3, 5, 2, 8, torch.float32)
    prev_threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            with fastar.backend("kernel"):
                outs.append(M.dml_value_log_probs(p, prev, 5, 2, 8))
    finally:
        torch.set_num_threads(prev_threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_non_finite_parameters_give_nan_rows_only(backend):
    if backend == "kernel":
        requires_kernel(OP, "cpu")
    p, prev = _case(4, 3, 2, 1, 8)
    p[1, 2] = float("nan")                                            # a mean of row 1
    p[2, 0] = float("inf")                                            # a logit of row 2: weight NaN
    with fastar.backend(backend):
        out = M.dml_value_log_probs(p, prev, 2, 1, 8)
    assert bool(out[1].isnan().all()) and bool(out[2].isnan().all())
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(out[3]).all())


def test_opcheck_and_compile():
    requires_kernel(OP, "cpu")
    p, prev = _case(3, 3, 2, 2, 8, torch.float32)
    torch.library.opcheck(torch.ops.fastar.dml_value_log_probs.default, (p, prev, 2, 2, 8))
    p1, prev1 = _case(2, 1, 3, 0, 5, torch.float64)
    torch.library.opcheck(torch.ops.fastar.dml_value_log_probs.default, (p1, prev1, 3, 0, 5))
    torch._dynamo.reset()

    def f(p, prev):
        return M.dml_value_log_probs(p, prev, 2, 2, 8).softmax(1)

    with fastar.backend("kernel"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(p, prev)
        assert torch.equal(got, f(p, prev))


@pytest.mark.parametrize("fn", [M.dml_value_log_probs, M.dml_value_log_probs_ref])
def test_bad_input(fn):
    p, prev = _case(3, 3, 2, 1, 8)
    bad = [
        ((p[0], prev, 2, 1, 8), ValueError, "params must be 2-D"),
        ((p.long(), prev, 2, 1, 8), TypeError, "floating-point"),
        ((p, prev, 3, 1, 8), ValueError, "needs 3K"),
        ((p, prev, 2, 3, 8), ValueError, r"colour index in \[0, 3\)"),
        ((p, prev, 2, True, 8), ValueError, "colour index"),
        ((p, prev, 2, 1, 0), ValueError, "num_bits"),
        ((p, prev, 2, 1, 17), ValueError, "num_bits"),
        ((p, prev[:, :0], 2, 1, 8), ValueError, r"prev must have shape \[3, 1\]"),
        ((p, prev[:2], 2, 1, 8), ValueError, "prev must have shape"),
        ((p, prev.float(), 2, 1, 8), TypeError, "prev must be torch.float64"),
        ((p, [0.0], 2, 1, 8), (TypeError, ValueError), "prev"),
    ]
    for args, err, msg in bad:
        with pytest.raises(err, match=msg):
            fn(*args)


def test_kernel_rejects_bad_input_directly():
    """The C++ checks, called without the Python wrapper: one clear RuntimeError, never a crash."""
    requires_kernel(OP, "cpu")
    p, prev = _case(3, 3, 2, 1, 8)
    op = torch.ops.fastar.dml_value_log_probs
    for args, msg in [((p[0], prev, 2, 1, 8), "params must be 2-D"), ((p, prev, 3, 1, 8), "needs 3K"),
                      ((p, prev, 2, 3, 8), "colour index"), ((p, prev, 2, -1, 8), "colour index"),
                      ((p, prev, 2, 1, 40), "num_bits"), ((p, prev[:, :0], 2, 1, 8), "prev must have shape"),
                      ((p, prev.float(), 2, 1, 8), "prev must be"), ((p.half(), prev.float(), 2, 1, 8), "CPU kernel")]:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_every_bin_and_channel_count_is_covered():
    """A 1-channel mixture (j = 0 only) is the scalar discretized logistic: its conditional is the loss's
    per-value distribution."""
    from fastar.nn.heads import DiscretizedMixLogistic

    h = DiscretizedMixLogistic(4, channels=1, num_bits=5)
    p, _ = _case(6, 1, 4, 0, 5)
    want = h.support_log_probs(p)
    for backend in ("kernel", "reference"):
        if backend == "kernel" and not fastar._backend.C_LOADED:
            continue
        with fastar.backend(backend):
            got = M.dml_value_log_probs(p, p.new_zeros(6, 0), 4, 0, 5)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert list(itertools.product([0], repeat=0)) == [()]


def test_reference_gradcheck_and_the_kernel_has_no_gradient():
    """The twin is differentiable (gradcheck in float64, params and prev); the public op is a coding
    distribution with no derivative: its output does not require grad, whatever the inputs."""
    p, prev = _case(3, 3, 2, 2, 3)
    p.requires_grad_()
    prev = prev.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: M.dml_value_log_probs_ref(a, b, 2, 2, 3), (p, prev))
    if fastar._backend.C_LOADED:
        with fastar.backend("kernel"):
            assert not M.dml_value_log_probs(p, prev, 2, 2, 3).requires_grad
