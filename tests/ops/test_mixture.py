"""Mixture / categorical family: kernels vs references, numerics, gradients, sampling statistics, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import fastar
from fastar.ops import mixture as M
from tests.conftest import requires_kernel, tol

OPS = ["discretized_mix_logistic_nll", "sample_discretized_mix_logistic", "categorical_sample"]


def _p_channels(c, k):
    return 3 * k if c == 1 else 10 * k


def _data(b, c, h, w, k, dtype=torch.float64, ls_range=(-7.5, 1.0), seed=0, device="cpu"):
    """Quantised x (with both edges present) and params whose log-scales span ls_range (below the clamp too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g).double() / 255 * 2 - 1
    x.view(-1)[0] = -1.0
    x.view(-1)[-1] = 1.0
    p = torch.randn(b, _p_channels(c, k), h, w, generator=g, dtype=torch.float64)
    s = 3 * k if c == 3 else 2 * k
    for col in range(c):
        base = k + col * s
        p[:, base:base + k] = torch.rand(b, k, h, w, generator=g, dtype=torch.float64) * 2.2 - 1.1
        lo, hi = ls_range
        p[:, base + k:base + 2 * k] = torch.rand(b, k, h, w, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return x.to(device, dtype), p.to(device, dtype)


def _audio(b, t, k, dtype=torch.float64, seed=0, device="cpu"):
    x, p = _data(b, 1, 1, t, k, dtype, seed=seed, device=device)
    return x.reshape(b, t), p.reshape(b, 3 * k, t)


def _kernel(fn, *args, **kw):
    with fastar.backend("kernel"):
        return fn(*args, **kw)


SHAPES = [  # (B, C, H, W, K)
    (1, 1, 1, 1, 1),
    (3, 3, 5, 4, 10),
    (2, 3, 7, 3, 1),
    (64, 1, 2, 3, 2),
    (4, 3, 6, 6, 5),
    (2, 1, 5, 5, 7),
]


# ---------------------------------------------------------------------------------------------
# discretized_mix_logistic_nll
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nll_float64_matches_reference_with_gradients(device, shape):
    requires_kernel("discretized_mix_logistic_nll", device)
    b, c, h, w, k = shape
    x, p = _data(b, c, h, w, k, device=device)
    g = torch.randn(b, dtype=torch.float64, device=device)
    outs = []
    for use_kernel in (True, False):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        with fastar.backend("kernel" if use_kernel else "reference"):
            nll = M.discretized_mix_logistic_nll(xr, pr, k, reduction="none")
        (nll * g).sum().backward()
        outs.append((nll.detach(), xr.grad, pr.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    # Gradients of narrow logistics (inv-scale up to e^7) divide by bin masses near 1e-5: float64
    # cancellation leaves ~1e-9 relative differences between two correct evaluation orders.
    for a, r in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-7)
    assert outs[0][0].shape == (b,)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
def test_nll_float32_and_low_precision_against_float64(device, shape):
    """Each kernel dtype against float64 on the same (rounded) params: the value within the float32
    tolerance; the gradient's error at most twice the error of the reference run in the same dtype."""
    requires_kernel("discretized_mix_logistic_nll", device)
    b, c, h, w, k = shape
    x, p = _data(b, c, h, w, k, ls_range=(-3.0, 0.5), device=device)
    # float64 first: `p.to(float64)` is p itself, and a dtype after it must still get a leaf (on
    # CUDA, where float16/bfloat16 follow, pd was once a non-leaf copy of a p made to require grad).
    for dtype in sorted(M.DML_KERNEL_DTYPES[device.type], key=lambda d: d != torch.float64):
        pd = p.to(dtype).detach().requires_grad_()
        pr = pd.detach().clone().requires_grad_()
        exact_p = pd.detach().double().requires_grad_()
        xd = x.to(dtype)
        got = _kernel(M.discretized_mix_logistic_nll, xd, pd, k, reduction="none")
        same = M.discretized_mix_logistic_nll_ref(xd, pr, k, reduction="none")
        # float64 on the same rounded inputs: a float16/bfloat16 x is off the bin centres (bfloat16's
        # spacing near 1 is a whole bin), which changes the true NLL, not the kernel's error.
        want = M.discretized_mix_logistic_nll_ref(xd.double(), exact_p, k, reduction="none")
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if dtype in (torch.float32, torch.float64):
            t = tol(torch.float32) if dtype == torch.float32 else tol(torch.float64, 1e3)
            torch.testing.assert_close(got.double(), want, **t)
        else:   # low precision (DESIGN 4): at most twice the reference's own error in that dtype
            err_k = (got.double() - want).abs().max().item()
            err_r = (same.detach().double() - want).abs().max().item()
            assert err_k <= 2 * err_r + 1e-4 * want.abs().max().item(), (dtype, err_k, err_r)
        for out in (got, same, want):
            out.sum().backward()
        assert pd.grad.dtype == dtype
        err_kernel = (pd.grad.double() - exact_p.grad).abs().max().item()
        err_ref = (pr.grad.double() - exact_p.grad).abs().max().item()
        assert err_kernel <= 2 * err_ref + 1e-6, (dtype, err_kernel, err_ref)


def test_nll_non_contiguous_params_and_reductions(device):
    requires_kernel("discretized_mix_logistic_nll", device)
    x, p = _data(3, 3, 5, 6, 4, device=device)
    p_cl = p.to(memory_format=torch.channels_last)
    p_wide = torch.stack([p, p + 1], dim=-1)[..., 0]  # strided view with the same values
    assert not p_cl.is_contiguous() and not p_wide.is_contiguous()
    ref = M.discretized_mix_logistic_nll_ref(x, p, 4, reduction="none")
    for pp in (p_cl, p_wide, p):
        for red, want in (("none", ref), ("sum", ref.sum()), ("mean", ref.mean())):
            got = _kernel(M.discretized_mix_logistic_nll, x, pp, 4, reduction=red)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert _kernel(M.discretized_mix_logistic_nll, x, p, 4).shape == ()


@pytest.mark.parametrize("num_bits", [5, 8, 10])
def test_nll_audio_and_num_bits(device, num_bits):
    requires_kernel("discretized_mix_logistic_nll", device)
    x, p = _audio(3, 33, 6, device=device)
    bins = 2 ** num_bits - 1
    x = torch.round((x + 1) / 2 * bins) / bins * 2 - 1
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    got = _kernel(M.discretized_mix_logistic_nll, xr, pr, 6, num_bits=num_bits, reduction="none")
    got.sum().backward()
    xe, pe = x.clone().requires_grad_(), p.clone().requires_grad_()
    want = M.discretized_mix_logistic_nll_ref(xe, pe, 6, num_bits=num_bits, reduction="none")
    want.sum().backward()
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pr.grad, pe.grad, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-7, atol=1e-7)


def test_nll_equals_the_mixture_likelihood_by_hand():
    """One pixel, C = 3, K = 2, central bins: -log sum_k pi_k prod_c [sigmoid(up) - sigmoid(down)]."""
    k, h = 2, 1 / 255
    x = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64)
    p = torch.randn(10 * k, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.5
    logits = p[:k]
    total = 0.0
    for j in range(k):
        blk = [p[k + c * 3 * k: k + (c + 1) * 3 * k] for c in range(3)]
        t = [torch.tanh(blk[c][2 * k + j]) for c in range(3)]
        means = [blk[0][j], blk[1][j] + t[0] * x[0], blk[2][j] + t[1] * x[0] + t[2] * x[1]]
        prob = torch.softmax(logits, 0)[j]
        for c in range(3):
            s = torch.exp(blk[c][k + j])
            prob = prob * (torch.sigmoid((x[c] - means[c] + h) / s) - torch.sigmoid((x[c] - means[c] - h) / s))
        total = total + prob
    want = -torch.log(total)
    for backend in ("kernel", "reference"):
        with fastar.backend(backend):
            got = M.discretized_mix_logistic_nll(x.view(1, 3, 1, 1), p.view(1, -1, 1, 1), k)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nll_gradcheck_float64():
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    x, p = _data(2, 3, 2, 3, 2, ls_range=(-2.0, 0.0), seed=5)
    x.requires_grad_()
    p.requires_grad_()

    def f(x, p):
        with fastar.backend("kernel"):
            return M.discretized_mix_logistic_nll(x, p, 2, reduction="none")

    assert torch.autograd.gradcheck(f, (x, p), eps=1e-6, atol=1e-5, rtol=1e-4)
    xa, pa = _audio(2, 4, 3, seed=6)
    assert torch.autograd.gradcheck(lambda p: f_audio(xa, p), (pa.requires_grad_(),), eps=1e-6, atol=1e-5)


def f_audio(x, p):
    with fastar.backend("kernel"):
        return M.discretized_mix_logistic_nll(x, p, 3, reduction="sum")


def _edge_case_params(k, big):
    """x at -1/+1 and interior; log-scales at the clamp and far below; huge logits; one-component mass."""
    x = torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0, 0.5, -0.5, 1.0], dtype=torch.float64)
    n = x.numel()
    x3 = x.view(1, 1, n).expand(1, 3, n).clone()
    p = torch.zeros(1, 10 * k, n, dtype=torch.float64)
    p[0, 0, :] = big            # all the mass in component 0 ...
    p[0, 1:k, :] = -big         # ... the others have huge negative logits
    for c in range(3):
        base = k + c * 3 * k
        p[0, base:base + k, :] = torch.linspace(-3, 3, k).unsqueeze(1)          # means, far from x too
        p[0, base + k:base + 2 * k, 0::3] = -7.0                                  # at the clamp
        p[0, base + k:base + 2 * k, 1::3] = -200.0                                # far below it
        p[0, base + k:base + 2 * k, 2::3] = 3.0
        p[0, base + 2 * k:base + 3 * k, :] = 50.0                                 # saturated tanh
    return x3.view(1, 3, 1, n), p.view(1, 10 * k, 1, n)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_nll_no_nan_or_inf_at_the_edge_cases(device, backend):
    if backend == "kernel":
        requires_kernel("discretized_mix_logistic_nll", device)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        big = 6e4 if dtype == torch.float16 else (1e30 if dtype != torch.bfloat16 else 1e30)
        x, p = _edge_case_params(4, big)
        x, p = x.to(device, dtype), p.to(device, dtype).requires_grad_()
        xr = x.clone().requires_grad_()
        mode = backend if (backend == "reference" or dtype in M.DML_KERNEL_DTYPES[device.type]) else "auto"
        with fastar.backend(mode):
            nll = M.discretized_mix_logistic_nll(xr, p, 4, reduction="none")
        nll.sum().backward()
        assert torch.isfinite(nll).all(), (dtype, nll)
        assert torch.isfinite(p.grad.float()).all(), dtype
        assert torch.isfinite(xr.grad.float()).all(), dtype
        assert (nll > 0).all()


def test_nll_edge_cases_kernel_equals_reference():
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    x, p = _edge_case_params(3, 1e30)
    pk, pr = p.clone().requires_grad_(), p.clone().requires_grad_()
    a = _kernel(M.discretized_mix_logistic_nll, x, pk, 3)
    b = M.discretized_mix_logistic_nll_ref(x, pr, 3)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pk.grad, pr.grad, rtol=1e-9, atol=1e-9)
    # Clamped log-scales (at or below -7) get no gradient, exactly as torch.clamp's backward gives.
    assert (pk.grad[0, 3 + 3:3 + 6, 0, 0::3] == 0).all() and (pk.grad[0, 3 + 3:3 + 6, 0, 1::3] == 0).all()
    assert (pk.grad[0, 3 + 3:3 + 6, 0, 2::3] != 0).any()


# ---------------------------------------------------------------------------------------------
# sample_discretized_mix_logistic
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_sample_kernel_equals_reference_given_noise(device, shape, temperature):
    requires_kernel("sample_discretized_mix_logistic", device)
    b, c, h, w, k = shape
    _, p = _data(b, c, h, w, k, ls_range=(-5.0, 0.0), device=device)
    g = torch.Generator(device=device).manual_seed(1)
    u = torch.rand(b, 1 + c, h, w, generator=g, device=device, dtype=torch.float64)
    for dtype in M.DML_KERNEL_DTYPES[device.type]:
        pd = p.to(dtype)
        got = _kernel(M.sample_discretized_mix_logistic, pd, k, noise=u, temperature=temperature)
        want = M.sample_discretized_mix_logistic_ref(pd, k, noise=u, temperature=temperature)
        assert got.shape == (b, c, h, w) and got.dtype == want.dtype
        if dtype == torch.float64:
            assert torch.equal(got, want)
        else:  # float32 rounding may move a draw that lies on a bin/CDF boundary: "nearly always"
            assert (got != want).float().mean().item() <= 0.01
        assert got.min() >= -1 and got.max() <= 1
        bins = 255
        codes = (got.double() + 1) / 2 * bins
        assert torch.allclose(codes, codes.round(), atol=1e-4)


def _scalar_divisions(fn):
    """The aten.div calls of fn() whose divisor is a Python number (the dispatcher sees it as such)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_) and len(args) > 1 \
                    and isinstance(args[1], (int, float)):
                seen.append((str(func), args[1]))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_sampling_references_divide_by_tensors_not_python_scalars():
    """On CUDA torch computes ``tensor / python_number`` as a multiply by the reciprocal, which differs
    from the kernels' division in the last bit (the H200 run: float32 mixture samples differed from
    the reference in ~35% of places, float64 in ~1%, all in the same bins). The sampling references
    must divide by a tensor on the input's device; checked here on CPU by watching the dispatcher."""
    _, p = _data(2, 3, 3, 4, 5)
    u = torch.rand(2, 4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.7):
        assert _scalar_divisions(lambda: M.sample_discretized_mix_logistic_ref(p, 5, noise=u,
                                                                             temperature=temperature)) == []
        assert _scalar_divisions(lambda: M.categorical_sample_ref(p[:, :5], noise=u[:, 0],
                                                                  temperature=temperature)) == []
        _, pa = _audio(2, 7, 3)
        ua = torch.rand(2, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert _scalar_divisions(lambda: M.sample_discretized_mix_logistic_ref(pa, 3, noise=ua,
                                                                             temperature=temperature)) == []
    # The helper itself: the division is exact where a reciprocal multiply is not.
    codes = torch.arange(-255, 256, 2, dtype=torch.float32)
    assert torch.equal(M._div(codes, 255), torch.tensor((codes.numpy() / 255).astype("float32")))
    assert not torch.equal(codes * (1 / torch.tensor(255.0)), codes / 255)


def test_sample_audio_non_contiguous_and_generator(device):
    requires_kernel("sample_discretized_mix_logistic", device)
    _, p = _audio(4, 50, 5, device=device)
    p_nc = torch.stack([p, p + 1], dim=-1)[..., 0]
    u = torch.rand(4, 2, 50, dtype=torch.float64, device=device)
    got = _kernel(M.sample_discretized_mix_logistic, p_nc, 5, noise=u)
    assert got.shape == (4, 50)
    assert torch.equal(got, M.sample_discretized_mix_logistic_ref(p, 5, noise=u))
    g1 = torch.Generator(device=device).manual_seed(7)
    g2 = torch.Generator(device=device).manual_seed(7)
    a = _kernel(M.sample_discretized_mix_logistic, p, 5, generator=g1)
    b = M.sample_discretized_mix_logistic_ref(p, 5, generator=g2)
    assert torch.equal(a, b)


def test_sample_no_nan_at_the_edge_cases(device):
    x, p = _edge_case_params(4, 1e30)
    p = p.to(device)
    for mode in ("kernel", "reference"):
        if mode == "kernel":
            requires_kernel("sample_discretized_mix_logistic", device)
        for t in (0.0, 1.0, 3.0):
            u = torch.rand(1, 4, 1, p.shape[-1], device=device, dtype=torch.float64)
            u[..., 0] = 0.0
            u[..., 1] = 1.0 - 1e-12
            with fastar.backend(mode):
                s = M.sample_discretized_mix_logistic(p, 4, noise=u, temperature=t)
            assert torch.isfinite(s).all() and s.abs().max() <= 1


def _bin_mass(i, mean, scale, bins=255):
    """Exact mass of bin i under logistic(mean, scale), edge bins open-ended (float64, by hand)."""
    centre = i / bins * 2 - 1
    h = 1.0 / bins
    up = torch.where(i == bins, torch.ones_like(centre), torch.sigmoid((centre + h - mean) / scale))
    down = torch.where(i == 0, torch.zeros_like(centre), torch.sigmoid((centre - h - mean) / scale))
    return up - down


def _chi_square_pvalue(observed_codes, exact_prob_fn, n):
    """Chi-square over the observed cells with expected count >= 5, plus the pooled rest."""
    cells, counts = torch.unique(observed_codes, dim=0, return_counts=True)
    probs = exact_prob_fn(cells)
    keep = probs * n >= 5
    obs = counts[keep].double()
    exp = probs[keep] * n
    rest_obs = n - obs.sum()
    rest_exp = n - exp.sum()
    assert rest_exp >= 0
    obs = torch.cat([obs, rest_obs.view(1)])
    exp = torch.cat([exp, rest_exp.view(1)])
    assert keep.sum() >= 20, "the test distribution should spread over many cells"
    return stats.chisquare(obs.numpy(), exp.numpy()).pvalue


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_histogram_matches_exact_bin_probabilities(device, channels):
    requires_kernel("sample_discretized_mix_logistic", device)
    n, k = 100_000, 3
    logits = torch.tensor([0.3, -0.2, 0.6], dtype=torch.float64)
    means = torch.tensor([[-0.98, 0.1, 0.4], [0.2, -0.3, 0.0], [-0.5, 0.5, 0.97]], dtype=torch.float64)
    ls = torch.tensor([[-3.0, -3.5, -4.0], [-3.2, -3.0, -4.2], [-3.6, -4.0, -3.1]], dtype=torch.float64)
    coef = torch.tensor([0.5, -0.4, 0.3], dtype=torch.float64)  # raw; tanh is applied
    p = [logits]
    for c in range(channels):
        p += [means[c], ls[c]]
        if channels == 3:
            p.append(torch.full((k,), float(coef[c])))
    p = torch.cat(p).view(1, -1, 1, 1).expand(n, -1, 1, 1).to(device)
    g = torch.Generator(device=device).manual_seed(1234)
    x = M.sample_discretized_mix_logistic(p, k, generator=g).cpu()
    codes = torch.round((x.view(n, channels) + 1) / 2 * 255).long()
    pi = torch.softmax(logits, 0)
    t = torch.tanh(coef)
    scale = torch.exp(ls)

    def exact(cells):
        total = torch.zeros(cells.shape[0], dtype=torch.float64)
        xv = cells.double() / 255 * 2 - 1
        for j in range(k):
            pr = pi[j] * _bin_mass(cells[:, 0].double(), means[0, j], scale[0, j])
            if channels == 3:
                pr = pr * _bin_mass(cells[:, 1].double(), means[1, j] + t[0] * xv[:, 0], scale[1, j])
                pr = pr * _bin_mass(cells[:, 2].double(), means[2, j] + t[1] * xv[:, 0] + t[2] * xv[:, 1],
                                    scale[2, j])
            total += pr
        return total

    pvalue = _chi_square_pvalue(codes, exact, n)
    assert pvalue > 1e-4, pvalue
    # The test has power: the same draw scored against a wrong mixture weight fails.
    pi_true = pi.clone()
    pi.copy_(torch.softmax(logits + torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64), 0))
    assert _chi_square_pvalue(codes, exact, n) < 1e-4
    pi.copy_(pi_true)


# ---------------------------------------------------------------------------------------------
# categorical_sample
# ---------------------------------------------------------------------------------------------

CAT_CASES = [  # (shape, dim)
    ((7, 256), 1),
    ((3, 256, 5, 4), 1),
    ((2, 3, 10), -1),
    ((10, 6), 0),
    ((1, 1), 1),
]


@pytest.mark.parametrize("case", CAT_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-d{c[1]}")
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 3), (0.0, None), (0.0, 2), (2.0, 1)])
def test_categorical_kernel_equals_reference(device, case, temperature, top_k):
    requires_kernel("categorical_sample", device)
    shape, dim = case
    kk = shape[dim]
    top_k = None if top_k is None else min(top_k, kk)
    g = torch.Generator().manual_seed(0)
    logits64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device)
    out_shape = tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
    u = torch.rand(out_shape, generator=g, dtype=torch.float64).to(device)
    for dtype in M.CATEGORICAL_KERNEL_DTYPES[device.type]:
        logits = logits64.to(dtype)
        got = _kernel(M.categorical_sample, logits, dim, noise=u, temperature=temperature, top_k=top_k)
        want = M.categorical_sample_ref(logits, dim, noise=u, temperature=temperature, top_k=top_k)
        assert got.dtype == torch.int64 and got.shape == want.shape == out_shape
        if dtype == torch.float64 or temperature == 0:
            assert torch.equal(got, want)
        else:
            assert (got != want).float().mean().item() <= 0.01


def test_categorical_non_contiguous_ties_and_generator(device):
    requires_kernel("categorical_sample", device)
    logits = torch.randn(6, 20, 8, dtype=torch.float64, device=device).transpose(0, 2)  # (8, 20, 6), strided
    u = torch.rand(8, 6, dtype=torch.float64, device=device)
    assert torch.equal(_kernel(M.categorical_sample, logits, 1, noise=u),
                       M.categorical_sample_ref(logits, 1, noise=u))
    # Ties at the k-th value are kept; argmax takes the first maximum.
    tied = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]], dtype=torch.float64, device=device)
    for q in torch.linspace(0, 0.999, 25, dtype=torch.float64):
        uu = q.view(1).to(device)
        a = _kernel(M.categorical_sample, tied, 1, noise=uu, top_k=3)
        assert torch.equal(a, M.categorical_sample_ref(tied, 1, noise=uu, top_k=3))
        assert int(a) in (1, 2, 3, 4)
    assert int(_kernel(M.categorical_sample, tied, 1, temperature=0)) == 1
    g1, g2 = (torch.Generator(device=device).manual_seed(3) for _ in range(2))
    big = torch.randn(50, 256, dtype=torch.float64, device=device)
    assert torch.equal(_kernel(M.categorical_sample, big, generator=g1), M.categorical_sample_ref(big, generator=g2))


def test_categorical_histogram_matches_softmax(device):
    requires_kernel("categorical_sample", device)
    n = 100_000
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    g = torch.Generator(device=device).manual_seed(99)
    idx = M.categorical_sample(logits.float().view(1, -1).expand(n, -1).to(device), generator=g).cpu()
    p = torch.softmax(logits.float().double(), 0)
    assert _chi_square_pvalue(idx.view(n, 1), lambda cells: p[cells[:, 0]], n) > 1e-4


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(device):
    for op in OPS:
        requires_kernel(op, device)
    x, p = _data(2, 3, 3, 4, 2, dtype=torch.float32, ls_range=(-3, 0), device=device)
    x3, p3 = x.reshape(2, 3, 12), p.reshape(2, 20, 12)
    torch.library.opcheck(torch.ops.fastar.discretized_mix_logistic_nll.default,
                          (x3, p3.clone().requires_grad_(), 2, 8))
    torch.library.opcheck(torch.ops.fastar.discretized_mix_logistic_nll.default,
                          (x3.clone().requires_grad_(), p3.clone().requires_grad_(), 2, 8))
    nll = torch.ops.fastar.discretized_mix_logistic_nll(x3, p3, 2, 8)
    torch.library.opcheck(torch.ops.fastar.discretized_mix_logistic_nll_backward.default,
                          (torch.randn_like(nll), x3, p3, nll, 2, 8, [True, True]))
    torch.library.opcheck(torch.ops.fastar.discretized_mix_logistic_nll_backward.default,
                          (torch.randn_like(nll), x3, p3, nll, 2, 8, [False, True]))
    u = torch.rand(2, 4, 12, device=device)
    torch.library.opcheck(torch.ops.fastar.sample_discretized_mix_logistic.default, (p3, u, 2, 8, 1.0))
    lg = torch.randn(3, 16, 5, device=device)
    torch.library.opcheck(torch.ops.fastar.categorical_sample.default, (lg, torch.rand(3, 5, device=device), 1.0, 4))
    torch.library.opcheck(torch.ops.fastar.categorical_sample.default, (lg, None, 0.0, 0))


def test_torch_compile_fullgraph(device):
    for op in OPS:
        requires_kernel(op, device)
    torch._dynamo.reset()
    x, p = _data(2, 3, 4, 4, 3, dtype=torch.float32, ls_range=(-3, 0), device=device)
    lg = torch.randn(2, 256, 4, 4, device=device)
    u = torch.rand(2, 4, 4, 4, device=device)
    uc = torch.rand(2, 4, 4, device=device)

    def f(x, p, lg, u, uc):
        loss = M.discretized_mix_logistic_nll(x, p, 3)
        return loss, M.sample_discretized_mix_logistic(p, 3, noise=u), M.categorical_sample(lg, noise=uc, top_k=10)

    with fastar.backend("kernel"):
        cf = torch.compile(f, fullgraph=True)
        pc = p.clone().requires_grad_()
        loss, s, c = cf(x, pc, lg, u, uc)
        loss.backward()
        pe = p.clone().requires_grad_()
        loss_e, s_e, c_e = f(x, pe, lg, u, uc)
        loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(pc.grad, pe.grad)
    assert torch.equal(s, s_e) and torch.equal(c, c_e)


# ---------------------------------------------------------------------------------------------
# backend switch and heads
# ---------------------------------------------------------------------------------------------

def test_low_precision_on_cpu_falls_back_to_reference_under_auto():
    x, p = _data(2, 1, 3, 3, 2, dtype=torch.float32, ls_range=(-3, 0))
    got = M.discretized_mix_logistic_nll(x, p.to(torch.bfloat16), 2)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    if "discretized_mix_logistic_nll" in fastar._backend.CPU_KERNELS:
        with pytest.raises(RuntimeError, match="supports float32, float64"):
            _kernel(M.discretized_mix_logistic_nll, x, p.to(torch.bfloat16), 2)


def test_heads(device):
    head = fastar.nn.DiscretizedMixLogistic(3, channels=3)
    assert head.param_channels == 30 and fastar.nn.DiscretizedMixLogistic(5, channels=1).param_channels == 15
    x, p = _data(2, 3, 4, 5, 3, device=device)
    torch.testing.assert_close(head(x, p, reduction="none"), M.discretized_mix_logistic_nll(x, p, 3, reduction="none"))
    u = torch.rand(2, 4, 4, 5, dtype=torch.float64, device=device)
    assert torch.equal(head.sample(p, noise=u), M.sample_discretized_mix_logistic(p, 3, noise=u))

    cat = fastar.nn.Categorical256(channels=3)
    assert cat.param_channels == 768
    logits = torch.randn(2, 768, 4, 5, device=device)
    codes = torch.randint(0, 256, (2, 3, 4, 5), device=device)
    want = F.cross_entropy(logits.view(2, 3, 256, 4, 5).movedim(2, 1), codes, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(cat.nll(codes, logits, reduction="none"), want)
    torch.testing.assert_close(cat.nll(codes, logits, reduction="mean"), want.mean())
    uc = torch.rand(2, 3, 4, 5, device=device)
    assert torch.equal(cat.sample(logits, noise=uc),
                       M.categorical_sample(logits.view(2, 3, 256, 4, 5), dim=2, noise=uc))
    audio = fastar.nn.Categorical256()
    la = torch.randn(2, 256, 9, device=device)
    assert audio.sample(la).shape == (2, 9)
    ca = torch.randint(0, 256, (2, 9), device=device)
    torch.testing.assert_close(audio.nll(ca, la), F.cross_entropy(la, ca, reduction="sum"))
    with pytest.raises(ValueError, match="logits must be"):
        cat.nll(codes, logits[:, :100])
    with pytest.raises(TypeError, match="int64"):
        cat.nll(codes.float(), logits)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        fastar.nn.DiscretizedMixLogistic(3, channels=2)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [M.discretized_mix_logistic_nll, M.discretized_mix_logistic_nll_ref])
def test_nll_bad_input(fn):
    x, p = _data(2, 3, 4, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="params has 21 channels, but num_mixtures=2 needs 3K = 6"):
        fn(x, torch.randn(2, 21, 4, 4), 2)
    with pytest.raises(ValueError, match="describe 1-channel images, but x has 3 channels"):
        fn(x, torch.randn(2, 6, 4, 4), 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fn(x[0], p, 2)
    with pytest.raises(ValueError, match="params must be 4-D"):
        fn(x, p[0, 0], 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fn(x, p[:, :6, 0], 2)
    with pytest.raises(ValueError, match="does not match params"):
        fn(x[:, :, :3], p, 2)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fn(torch.zeros(2, 3, 4, 4, dtype=torch.int64), p, 2)
    with pytest.raises(TypeError, match="params must be a floating-point"):
        fn(x, p.to(torch.int32), 2)
    with pytest.raises(ValueError, match="scaled to \\[-1, 1\\]"):
        fn(x * 255, p, 2)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fn(x, p.to("meta"), 2)
    with pytest.raises(ValueError, match="reduction"):
        fn(x, p, 2, reduction="avg")
    with pytest.raises(ValueError, match="num_mixtures"):
        fn(x, p, 0)
    with pytest.raises(ValueError, match="num_bits"):
        fn(x, p, 2, num_bits=0)


@pytest.mark.parametrize("fn", [M.sample_discretized_mix_logistic, M.sample_discretized_mix_logistic_ref])
def test_sample_bad_input(fn):
    _, p = _data(2, 3, 4, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs 3K = 6"):
        fn(torch.randn(2, 7, 4, 4), 2)
    with pytest.raises(ValueError, match="noise must have shape \\[2, 4, 4, 4\\]"):
        fn(p, 2, noise=torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        fn(p, 2, noise=torch.zeros(2, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature"):
        fn(p, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="params must be 4-D"):
        fn(p[0, 0], 2)
    with pytest.raises(TypeError, match="params must be a floating-point"):
        fn(p.to(torch.int64), 2)
    with pytest.raises(ValueError, match="one device"):
        fn(p, 2, noise=torch.rand(2, 4, 4, 4, device="meta"))


@pytest.mark.parametrize("fn", [M.categorical_sample, M.categorical_sample_ref])
def test_categorical_bad_input(fn):
    lg = torch.randn(4, 10, 3)
    with pytest.raises(TypeError, match="floating-point"):
        fn(lg.long())
    with pytest.raises(ValueError, match="out of range"):
        fn(lg, dim=3)
    with pytest.raises(ValueError, match="top_k"):
        fn(lg, top_k=11)
    with pytest.raises(ValueError, match="temperature"):
        fn(lg, temperature=-0.5)
    with pytest.raises(ValueError, match="noise must have shape \\[4, 3\\]"):
        fn(lg, noise=torch.rand(4, 10))
    with pytest.raises(ValueError, match="scalar"):
        fn(torch.tensor(1.0))


def test_kernel_ops_reject_bad_input_directly():
    requires_kernel("discretized_mix_logistic_nll", "cpu")
    x = torch.zeros(2, 3, 5)
    with pytest.raises(RuntimeError, match="params has 7 channels, but num_mixtures=1"):
        torch.ops.fastar.discretized_mix_logistic_nll(x, torch.zeros(2, 7, 5), 1, 8)
    with pytest.raises(RuntimeError, match="x must be Double for Double params, got Float"):
        torch.ops.fastar.discretized_mix_logistic_nll(x, torch.zeros(2, 10, 5, dtype=torch.float64), 1, 8)
    with pytest.raises(RuntimeError, match="x must have shape \\[2, 3, 5\\]"):
        torch.ops.fastar.discretized_mix_logistic_nll(x[:, :, :4], torch.zeros(2, 10, 5), 1, 8)
    with pytest.raises(RuntimeError, match="num_bits must be in"):
        torch.ops.fastar.discretized_mix_logistic_nll(x, torch.zeros(2, 10, 5), 1, 0)
    with pytest.raises(RuntimeError, match="noise must have shape"):
        torch.ops.fastar.sample_discretized_mix_logistic(torch.zeros(2, 10, 5), torch.zeros(2, 3, 5), 1, 8, 1.0)
    with pytest.raises(RuntimeError, match="noise is required"):
        torch.ops.fastar.categorical_sample(torch.zeros(2, 4, 3), None, 1.0, 0)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        torch.ops.fastar.categorical_sample(torch.zeros(2, 4, 3), None, 0.0, 5)
    with pytest.raises(RuntimeError, match="supports float32 and float64"):
        torch.ops.fastar.categorical_sample(torch.zeros(2, 4, 3, dtype=torch.float16), None, 0.0, 0)


def boundary_uniforms(logits, temperature, generator):
    """Uniforms that put u * total right at, or one ulp either side of, a partial sum of the
    unnormalised CDF (the one rule's arithmetic, in float64): where a different accumulation
    order, exp or comparison would draw a neighbouring index. logits (N, K) -> u (N,) float64."""
    z = logits.double() / temperature
    c = torch.cumsum(M._exp_rn(z - z.amax(-1, keepdim=True)), -1)
    j = torch.randint(0, c.shape[-1], (c.shape[0],), generator=generator).to(c.device)
    u = c.gather(1, j[:, None])[:, 0] / c[:, -1]
    side = torch.randint(0, 3, u.shape, generator=generator).to(c.device)
    u = torch.where(side == 0, torch.nextafter(u, torch.zeros_like(u)),
                    torch.where(side == 2, torch.nextafter(u, torch.ones_like(u)), u))
    return u.clamp(0.0, 1.0 - 2.0 ** -53)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("k", [2, 7, 256, 1000])
def test_categorical_cpu_kernel_draws_the_ref_index_at_cdf_boundaries(temperature, k):
    requires_kernel("categorical_sample", torch.device("cpu"))
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(600, k, generator=g, dtype=torch.float64) * 4
    logits[:50, : k // 2] = float("-inf")  # masked categories weigh exactly 0
    u = boundary_uniforms(logits, temperature, g)
    got = _kernel(M.categorical_sample, logits, 1, noise=u, temperature=temperature)
    want = M.categorical_sample_ref(logits, 1, noise=u, temperature=temperature)
    assert torch.equal(got, want)
    # the same rule also through the component draw of the mixture sampler
    if k <= 256:
        kk = k
        p = torch.randn(600, 3 * kk, 1, generator=g, dtype=torch.float64)
        p[:, :kk, 0] = logits
        noise = torch.stack([u, torch.rand(600, generator=g, dtype=torch.float64)], 1)[..., None]
        got = _kernel(M.sample_discretized_mix_logistic, p, kk, noise=noise, temperature=temperature)
        want = M.sample_discretized_mix_logistic_ref(p, kk, noise=noise, temperature=temperature)
        assert torch.equal(got, want)


def test_categorical_nan_and_inf_logits_draw_index_zero():
    requires_kernel("categorical_sample", torch.device("cpu"))
    lg = torch.randn(3, 6, dtype=torch.float64)
    lg[0, 3] = float("nan")
    lg[1, 2] = float("inf")
    lg[2, 4] = float("nan")
    u = torch.full((3,), 0.6, dtype=torch.float64)
    got = _kernel(M.categorical_sample, lg, 1, noise=u)
    assert torch.equal(got, M.categorical_sample_ref(lg, 1, noise=u))
    assert got.tolist() == [0, 0, 0]


def test_exp_rn_is_close_to_exp():
    x = torch.cat([-torch.rand(10000, dtype=torch.float64) * 708, torch.tensor([0.0, -708.0, -709.0, -float("inf")],
                                                                              dtype=torch.float64)])
    e = M._exp_rn(x)
    torch.testing.assert_close(e[:-2], torch.exp(x[:-2]), rtol=1e-15, atol=0)
    assert e[-2] == 0 and e[-1] == 0 and torch.isnan(M._exp_rn(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("num_bits", [1, 2, 3])
def test_value_log_probs_are_the_chain_rule_of_the_joint(num_bits):
    """DiscretizedMixLogistic.value_log_probs (R, then G given R, then B given R and G, with the mixture
    weights' posterior): summed over the colours at every joint value they equal the joint log_prob (the
    loss's), and each conditional sums to one up to openai's leak (a bin of mass below MIN_BIN_MASS counts
    its density at the centre instead: at most L * MIN_BIN_MASS off)."""
    from fastar.nn.heads import DiscretizedMixLogistic

    torch.manual_seed(num_bits)
    h = DiscretizedMixLogistic(3, channels=3, num_bits=num_bits)
    p = torch.randn(4, 30, dtype=torch.float64)
    p[:, 3:12] *= 0.5                                             # means inside [-1, 1] mostly
    sup = h.support()                                              # (L**3, 3)
    L = 2 ** num_bits
    col = h.value_support(1)
    torch.testing.assert_close(col, sup[:L, 2])
    total = torch.zeros(4, sup.shape[0], dtype=torch.float64)
    for j in range(3):
        prev = sup[:, :j]                                          # every joint value's earlier colours
        lp = h.value_log_probs(p.repeat_interleave(sup.shape[0], 0), j, prev.repeat(4, 1)).view(4, sup.shape[0], L)
        torch.testing.assert_close(lp.exp().sum(2), torch.ones(4, sup.shape[0], dtype=torch.float64), rtol=0,
                                   atol=L * M.MIN_BIN_MASS)
        pick = ((sup[:, j:j + 1] - col[None, :]).abs().argmin(1))   # the bin of colour j at each joint value
        total += lp.gather(2, pick.view(1, -1, 1).expand(4, -1, 1)).squeeze(2)
    torch.testing.assert_close(total, h.support_log_probs(p), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="prev must be"):
        h.value_log_probs(p, 2, sup[:4, :1])
    with pytest.raises(ValueError, match="colour index"):
        h.value_log_probs(p, 3, sup[:4, :3])
    with pytest.raises(NotImplementedError, match="jointly"):
        super(DiscretizedMixLogistic, h).value_log_probs(p, 1, sup[:4, :1])
