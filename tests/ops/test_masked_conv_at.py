"""masked_conv2d_at: kernel vs reference vs the full masked convolution, in-place cache writes, opcheck,
torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar import masks
from fastar.ops import masked_conv2d, masked_conv2d_at, masked_conv2d_at_ref
from tests.conftest import requires_kernel, tol

# (N, C_in, C_out, H, W, kernel (kH, kW), mask builder, padding, dilation)
CASES = [
    (2, 4, 6, 5, 7, (3, 3), lambda o, i: masks.mask_b(o, i, 3), None, 1),
    (1, 3, 6, 6, 5, (7, 7), lambda o, i: masks.mask_a(o, i, 7, color_groups=3), None, 1),
    (3, 5, 8, 4, 9, (3, 3), lambda o, i: masks.vertical_mask(o, i, 3), None, 1),
    (2, 6, 12, 5, 6, (1, 3), lambda o, i: masks.horizontal_mask(o, i, 3, "A", color_groups=3), (0, 1), 1),
    (2, 4, 5, 7, 7, (3, 3), lambda o, i: masks.mask_b(o, i, 3), (2, 2), 2),
]


def _inputs(case, device, dtype, seed=0):
    n, cin, cout, h, w, (kh, kw), mk, pad, dil = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).to(device, dtype)
    wt = torch.randn(cout, cin, kh, kw, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(device, dtype)
    m = mk(cout, cin).to(device)
    if m.shape[2:] != (kh, kw):
        m = m.expand(cout, cin, kh, kw).clone()
    return x, wt, b, m, pad, dil


def _positions(h, w, device, p=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, h, (p,), generator=g), torch.randint(0, w, (p,), generator=g)], 1).to(device)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_full_conv_and_reference(device, case, dtype):
    requires_kernel("masked_conv2d_at", device)
    x, wt, b, m, pad, dil = _inputs(CASES[case], device, dtype)
    n, cin, h, w = x.shape
    pos = _positions(h, w, device)
    pos[1] = pos[0]  # a repeated position must read the value written for it
    x_new = torch.randn(n, cin, pos.shape[0], dtype=dtype, device=device)
    x_new[:, :, 1] = x_new[:, :, 0]
    c_kernel, c_ref = x.clone(), x.clone()
    with fastar.backend("kernel"):
        out = masked_conv2d_at(c_kernel, x_new, wt, b, m, pos, pad, dil)
    ref = masked_conv2d_at_ref(c_ref, x_new, wt, b, m, pos, pad, dil)
    assert out.shape == (n, wt.shape[0], pos.shape[0]) and out.is_contiguous()
    torch.testing.assert_close(c_kernel, c_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, **tol(dtype))
    full = masked_conv2d(c_ref, wt, b, m, pad, dil)
    torch.testing.assert_close(out, full[:, :, pos[:, 0], pos[:, 1]], **tol(dtype))


def test_cache_written_in_place_and_only_at_pos(device):
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float64)
    pos = torch.tensor([[2, 3]], device=device)
    x_new = torch.full((x.shape[0], x.shape[1], 1), 7.0, dtype=x.dtype, device=device)
    cache = x.clone()
    masked_conv2d_at(cache, x_new, wt, b, m, pos)
    expect = x.clone()
    expect[:, :, 2, 3] = 7.0
    assert torch.equal(cache, expect)
    before = cache.clone()
    masked_conv2d_at(cache, None, wt, None, m, pos)   # no x_new: read only
    assert torch.equal(cache, before)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_cache(device, layout):
    requires_kernel("masked_conv2d_at", device)
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float64)
    if layout == "channels_last":
        cache = x.contiguous(memory_format=torch.channels_last)
    else:
        big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 3, dtype=x.dtype, device=device)
        cache = big[:, ::2, :, 1:1 + x.shape[3]]
        cache.copy_(x)
    pos = _positions(x.shape[2], x.shape[3], device)
    x_new = torch.randn(x.shape[0], x.shape[1], pos.shape[0], dtype=x.dtype, device=device)
    ref_cache = x.clone()
    with fastar.backend("kernel"):
        out = masked_conv2d_at(cache, x_new, wt, b, m, pos)
    ref = masked_conv2d_at_ref(ref_cache, x_new, wt, b, m, pos)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, **tol(torch.float64))


def test_bool_mask_no_bias_one_position_vector(device):
    x, wt, _, m, pad, dil = _inputs(CASES[2], device, torch.float32)
    pos = torch.tensor([3, 4], device=device)         # (2,) means one position
    a = masked_conv2d_at(x.clone(), None, wt, None, m.bool(), pos)
    r = masked_conv2d_at_ref(x.clone(), None, wt, None, m, pos)
    assert a.shape == (x.shape[0], wt.shape[0], 1)
    torch.testing.assert_close(a, r, **tol(torch.float32))


def test_empty_batch_and_fully_masked(device):
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float32)
    pos = torch.tensor([[1, 1]], device=device)
    out = masked_conv2d_at(x[:0].clone(), None, wt, b, m, pos)
    assert out.shape == (0, wt.shape[0], 1)
    out = masked_conv2d_at(x.clone(), None, wt, b, torch.zeros_like(m), pos)
    torch.testing.assert_close(out, b.view(1, -1, 1).expand_as(out))


def test_half_precision_on_reference(device):
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float64)
    pos = _positions(x.shape[2], x.shape[3], device)
    exact = masked_conv2d_at_ref(x.clone(), None, wt, b, m, pos)
    dt = torch.bfloat16
    got = masked_conv2d_at(x.to(dt), None, wt.to(dt), b.to(dt), m, pos)   # auto: kernel on CUDA, ref on CPU
    ref_lp = masked_conv2d_at_ref(x.to(dt), None, wt.to(dt), b.to(dt), m, pos)
    err_got = (got.double() - exact).abs().max()
    err_ref = (ref_lp.double() - exact).abs().max()
    assert err_got <= 2 * err_ref + 1e-3


def test_opcheck(device):
    requires_kernel("masked_conv2d_at", device)
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float32)
    pos = _positions(x.shape[2], x.shape[3], device)
    x_new = torch.randn(x.shape[0], x.shape[1], pos.shape[0], device=device)
    torch.library.opcheck(torch.ops.fastar.masked_conv2d_at, (x.clone(), x_new, wt, b, m, pos, [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.fastar.masked_conv2d_at, (x.clone(), None, wt, None, m, pos, [1, 1], [1, 1]))


def test_torch_compile_fullgraph(device):
    requires_kernel("masked_conv2d_at", device)
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float32)
    pos = _positions(x.shape[2], x.shape[3], device)
    x_new = torch.randn(x.shape[0], x.shape[1], pos.shape[0], device=device)

    def step(cache, x_new, pos):
        return masked_conv2d_at(cache, x_new, wt, b, m, pos).relu()

    c1, c2 = x.clone(), x.clone()
    got = torch.compile(step, fullgraph=True)(c1, x_new, pos)
    want = step(c2, x_new, pos)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(c1, c2)   # the in-place write survives functionalization


def test_bad_input(device):
    x, wt, b, m, pad, dil = _inputs(CASES[0], device, torch.float32)
    pos = torch.tensor([[1, 1]], device=device)
    n, cin = x.shape[:2]
    f = masked_conv2d_at
    with pytest.raises(ValueError, match="x_cache must be 4-D"):
        f(x[0], None, wt, b, m, pos)
    with pytest.raises(ValueError, match="pos must be"):
        f(x, None, wt, b, m, torch.tensor([1, 2, 3], device=device))
    with pytest.raises(TypeError, match="pos must be int64"):
        f(x, None, wt, b, m, pos.float())
    with pytest.raises(TypeError, match="pos must be an int64 tensor"):
        f(x, None, wt, b, m, (1, 1))
    with pytest.raises(ValueError, match="x_new must be"):
        f(x, torch.zeros(n, cin + 1, 1, device=device), wt, b, m, pos)
    with pytest.raises(TypeError, match="x_new dtype"):
        f(x, torch.zeros(n, cin, 1, device=device, dtype=torch.float64), wt, b, m, pos)
    with pytest.raises(ValueError, match="input channels"):
        f(x[:, :2].contiguous(), None, wt, b, m, pos)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        f(x, None, wt, b, m[:1], pos)
    with pytest.raises(TypeError, match="weight dtype"):
        f(x, None, wt.double(), b, m, pos)
    with pytest.raises(ValueError, match="bias must have length"):
        f(x, None, wt, b[:1], m, pos)
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="outside the"):
            with fastar.backend("kernel"):
                f(x, None, wt, b, m, torch.tensor([[x.shape[2], 0]]))
        with pytest.raises(RuntimeError, match="CPU kernel supports float32 and float64"):
            with fastar.backend("kernel"):
                torch.ops.fastar.masked_conv2d_at(x.half(), None, wt.half(), None, m, pos, [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match="pos must be 2-D"):
            torch.ops.fastar.masked_conv2d_at(x, None, wt, None, m, pos.view(2), [1, 1], [1, 1])


@pytest.mark.parametrize("case", [0, 1, 3])
def test_every_position_at_once(device, case):
    """Many (image, position) rows (> 64) take the CPU kernel's packed-taps path; few take the other."""
    requires_kernel("masked_conv2d_at", device)
    x, wt, b, m, pad, dil = _inputs(CASES[case], device, torch.float64)
    x = x.repeat(3, 1, 1, 1)
    h, w = x.shape[2:]
    pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2).to(device)
    assert x.shape[0] * pos.shape[0] > 64
    with fastar.backend("kernel"):
        out = masked_conv2d_at(x.clone(), None, wt, b, m, pos, pad, dil)
    full = masked_conv2d(x, wt, b, m, pad, dil)
    torch.testing.assert_close(out, full.flatten(2), **tol(torch.float64))
