"""masked_conv2d: kernel vs reference, gradients, opcheck, torch.compile, causality, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastar
from fastar import masks
from fastar.nn import MaskedConv2d
from fastar.ops import masked_conv2d, masked_conv2d_ref
from tests.conftest import requires_kernel, tol

# (batch, c_in, c_out, H, W, kernel, mask_type, color_groups, dilation)
CASES = [
    (1, 1, 1, 5, 5, 1, "B", 1, 1),
    (1, 1, 16, 7, 9, 7, "A", 1, 1),
    (16, 3, 12, 9, 7, 7, "A", 3, 1),
    (2, 3, 3, 5, 6, 3, "B", 3, 2),
    (3, 24, 24, 11, 13, 3, "B", 3, 1),
    (2, 8, 5, 6, 8, 5, "B", 1, 2),
    (16, 32, 32, 7, 7, 5, "A", 1, 1),
    (1, 128, 128, 5, 7, 3, "B", 1, 1),
    (2, 2, 130, 3, 3, 3, "A", 1, 2),
]
CASE_IDS = [f"b{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5]}{c[6]}-g{c[7]}-d{c[8]}" for c in CASES]


def dtypes_for(device):
    d = [torch.float32, torch.float64]
    if device.type == "cuda":
        d += [torch.float16, torch.bfloat16]
    return d


def make(case, device, dtype, layout="contiguous", seed=0):
    b, cin, cout, h, w, k, mt, cg, dil = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) * (cin * k * k) ** -0.5
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    mask = masks.causal_mask(mt, cout, cin, k, cg, dtype=torch.float64)
    x, wt, bias, mask = (t.to(device, dtype) for t in (x, wt, bias, mask))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # A non-contiguous view: every other column of a wider tensor.
        wide = torch.zeros(b, cin, h, 2 * w, device=device, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous()
    return x, wt, bias, mask, dil


def _grads(fn, x, w, b, m, dil, go):
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b, m, None, dil)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), go)
    return out.detach(), gx, gw, gb


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_kernel_matches_reference(device, case, layout):
    requires_kernel("masked_conv2d", device)
    for dtype in dtypes_for(device):
        x, w, b, m, dil = make(case, device, dtype, layout)
        go = torch.randn(masked_conv2d_ref(x, w, b, m, None, dil).shape, device=device, dtype=dtype)
        with fastar.backend("kernel"):
            got = _grads(masked_conv2d, x, w, b, m, dil, go)
        if dtype in (torch.float32, torch.float64):
            want = _grads(masked_conv2d_ref, x, w, b, m, dil, go)
            for name, a, e in zip(("out", "grad_x", "grad_w", "grad_b"), got, want):
                torch.testing.assert_close(a, e, **tol(dtype), msg=lambda s: f"{name} ({dtype}, {layout}): {s}")
        else:
            # Low precision: the kernel's error against float64 at most twice the reference's in the same dtype.
            exact = _grads(masked_conv2d_ref, *(t.double() for t in (x, w, b, m)), dil, go.double())
            ref = _grads(masked_conv2d_ref, x, w, b, m, dil, go)
            for name, a, r, e in zip(("out", "grad_x", "grad_w", "grad_b"), got, ref, exact):
                err_k = (a.double() - e).abs().max().item()
                err_r = (r.double() - e).abs().max().item()
                assert err_k <= 2 * err_r + 1e-3 * e.abs().max().item(), f"{name} {dtype}: {err_k} vs ref {err_r}"


def test_explicit_padding_and_output_shape(device):
    requires_kernel("masked_conv2d", device)
    x, w, b, m, _ = make((2, 4, 6, 9, 8, 3, "B", 1, 1), device, torch.float64)
    for padding, dilation in [((0, 0), 1), ((3, 1), (1, 2)), ((2, 0), 2), (0, (2, 1))]:
        want = masked_conv2d_ref(x, w, b, m, padding, dilation)
        with fastar.backend("kernel"):
            got = masked_conv2d(x, w, b, m, padding, dilation)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_no_bias_and_all_zero_mask(device):
    requires_kernel("masked_conv2d", device)
    x, w, b, m, dil = make(CASES[2], device, torch.float64)
    with fastar.backend("kernel"):
        torch.testing.assert_close(masked_conv2d(x, w, None, m, None, dil), masked_conv2d_ref(x, w, None, m, None, dil))
        zero = torch.zeros_like(m)
        out = masked_conv2d(x, w, b, zero, None, dil)
        torch.testing.assert_close(out, b.view(1, -1, 1, 1).expand_as(out))
        xg = x.detach().requires_grad_(True)
        masked_conv2d(xg, w, b, zero, None, dil).sum().backward()
        assert torch.count_nonzero(xg.grad) == 0


def test_empty_batch(device):
    requires_kernel("masked_conv2d", device)
    x, w, b, m, dil = make(CASES[3], device, torch.float32)
    x = x[:0].detach().requires_grad_(True)
    with fastar.backend("kernel"):
        out = masked_conv2d(x, w, b, m, None, dil)
        assert out.shape == (0, w.shape[0], x.shape[2], x.shape[3])
        out.sum().backward()
    assert x.grad.shape == x.shape


def test_bool_mask_equals_float_mask(device):
    requires_kernel("masked_conv2d", device)
    x, w, b, m, dil = make(CASES[4], device, torch.float32)
    with fastar.backend("kernel"):
        torch.testing.assert_close(masked_conv2d(x, w, b, m.bool(), None, dil), masked_conv2d(x, w, b, m, None, dil))


def test_gradcheck(device):
    requires_kernel("masked_conv2d", device)
    for case in [(2, 3, 6, 4, 5, 3, "A", 3, 1), (1, 2, 3, 5, 4, 5, "B", 1, 2)]:
        x, w, b, m, dil = make(case, device, torch.float64)
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        with fastar.backend("kernel"):
            assert torch.autograd.gradcheck(lambda x, w, b: masked_conv2d(x, w, b, m, None, dil), (x, w, b))


def test_opcheck(device):
    requires_kernel("masked_conv2d", device)
    x, w, b, m, _ = make((2, 3, 6, 5, 4, 3, "A", 3, 1), device, torch.float32)
    for bias in (b, None):
        args = (x.requires_grad_(True), w.requires_grad_(True), bias, m, [1, 1], [1, 1])
        torch.library.opcheck(torch.ops.fastar.masked_conv2d.default, args)
    go = torch.randn(2, 6, 5, 4, device=device)
    for om in ([True, True, True], [True, False, False], [False, True, False]):
        torch.library.opcheck(torch.ops.fastar.masked_conv2d_backward.default,
                              (go, x.detach(), w.detach(), m, [1, 1], [1, 1], om))


class TinyPixelCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MaskedConv2d(3, 12, 5, "A", color_groups=3)
        self.b = MaskedConv2d(12, 12, 3, "B", color_groups=3)
        self.out = MaskedConv2d(12, 3, 1, "B", color_groups=3)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_torch_compile_fullgraph(device):
    requires_kernel("masked_conv2d", device)
    torch.manual_seed(0)
    model = TinyPixelCNN().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with fastar.backend("kernel"):
        eager = model(x)
        eager.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, eager, **tol(torch.float32))
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, **tol(torch.float32, 10))


def _order(c, i, j, W, groups):
    return (i * W + j) * groups + c


@pytest.mark.parametrize("groups", [1, 3])
def test_causality_stack(device, groups):
    """d out[k] / d in[l] is zero for every l at or after k in raster/sub-pixel order, nonzero for some l before."""
    requires_kernel("masked_conv2d", device)
    torch.manual_seed(0)
    H = W = 5
    c = groups
    net = nn.Sequential(MaskedConv2d(c, 6, 3, "A", color_groups=groups), nn.Tanh(),
                        MaskedConv2d(6, 6, 3, "B", color_groups=groups), nn.Tanh(),
                        MaskedConv2d(6, c, 1, "B", color_groups=groups)).to(device, torch.float64)
    x = torch.randn(1, c, H, W, device=device, dtype=torch.float64)
    with fastar.backend("kernel"):
        jac = torch.autograd.functional.jacobian(lambda t: net(t), x).reshape(c, H, W, c, H, W)
    n = c * H * W
    # Re-index the Jacobian into generation order.
    idx = torch.tensor([_order(cc, i, j, W, c) for cc in range(c) for i in range(H) for j in range(W)])
    flat = jac.reshape(n, n).cpu()
    J = torch.zeros(n, n, dtype=torch.float64)
    J[idx.unsqueeze(1), idx.unsqueeze(0)] = flat
    upper = torch.triu(J, diagonal=0)
    assert torch.count_nonzero(upper) == 0, "an output depends on an input at or after it"
    depends = (J.abs() > 0).any(1)
    assert not depends[0], "the first sub-pixel must depend on nothing"
    assert depends[1:].all(), "every later sub-pixel must depend on some earlier input"


def test_masked_conv2d_layer_is_a_conv2d_drop_in():
    conv = nn.Conv2d(6, 9, 5, padding=2)
    layer = MaskedConv2d(6, 9, 5, "A", color_groups=3)
    assert isinstance(layer, nn.Conv2d)
    assert set(layer.state_dict()) == {"weight", "bias"}
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(layer(x), F.conv2d(x, conv.weight * layer.mask, conv.bias, padding=2))


def test_state_dict_with_mask_buffer_loads():
    class PlainMaskedConv(nn.Conv2d):  # the common hand-written pattern: a conv plus a persistent mask buffer
        def __init__(self):
            super().__init__(3, 6, 3, padding=1)
            self.register_buffer("mask", masks.mask_b(6, 3, 3, color_groups=3))

        def forward(self, x):
            return F.conv2d(x, self.weight * self.mask, self.bias, padding=1)

    plain = PlainMaskedConv()
    layer = MaskedConv2d(3, 6, 3, "A", color_groups=3)
    layer.load_state_dict(plain.state_dict())  # strict: weight, bias and mask all consumed
    torch.testing.assert_close(layer.mask, plain.mask)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(layer(x), plain(x))
    bad = {**plain.state_dict(), "mask": torch.ones(6, 3, 5, 5)}
    with pytest.raises(RuntimeError, match="mask"):
        layer.load_state_dict(bad)


# ---------------------------------------------------------------- bad input


def _ok(device="cpu", dtype=torch.float32):
    x = torch.randn(1, 3, 5, 5, device=device, dtype=dtype)
    w = torch.randn(6, 3, 3, 3, device=device, dtype=dtype)
    return x, w, torch.zeros(6, device=device, dtype=dtype), masks.mask_b(6, 3, 3, 3).to(device, dtype)


@pytest.mark.parametrize("fn", [masked_conv2d, masked_conv2d_ref])
def test_bad_input_python(fn):
    x, w, b, m = _ok()
    with pytest.raises(ValueError, match=r"weight must be 4-D \(out, in, kH, kW\), got shape \[3, 3\]"):
        fn(x, torch.randn(3, 3), b, m)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fn(x[0], w, b, m)
    with pytest.raises(ValueError, match=r"mask must have the weight's shape \[6, 3, 3, 3\], got \[6, 3, 5, 5\]"):
        fn(x, w, b, torch.ones(6, 3, 5, 5))
    with pytest.raises(ValueError, match="x has 4 input channels but weight expects 3"):
        fn(torch.randn(1, 4, 5, 5), w, b, m)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        fn(x.long(), w, b, m)
    with pytest.raises(TypeError, match="weight dtype torch.float64 must match x dtype torch.float32"):
        fn(x, w.double(), b, m)
    with pytest.raises(TypeError, match="mask must be bool or floating-point"):
        fn(x, w, b, m.long())
    with pytest.raises(ValueError, match="bias must have length 6"):
        fn(x, w, torch.zeros(5), m)
    with pytest.raises(ValueError, match="one device"):
        fn(x, w.to("meta"), b, m)
    with pytest.raises(ValueError, match="does not fit"):
        fn(torch.randn(1, 3, 2, 2), w, b, m, 0)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        fn(x, w, b, m, "same")


def test_bad_input_raw_op_cpu():
    """The C++ checks speak for themselves when the op is called directly."""
    requires_kernel("masked_conv2d", "cpu")
    x, w, b, m = _ok()
    op = torch.ops.fastar.masked_conv2d
    with pytest.raises(RuntimeError, match=r"weight must be 4-D \(out, in, kH, kW\), got shape \[3, 3\]"):
        op(x, torch.randn(3, 3), b, torch.randn(3, 3), [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="mask must have the weight's shape"):
        op(x, w, b, torch.ones(6, 3, 5, 5), [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        op(x.int(), w.int(), None, m, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="CPU kernel supports float32 and float64, got BFloat16"):
        op(x.bfloat16(), w.bfloat16(), None, m, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="does not fit"):
        op(x, w, b, m, [0, 0], [4, 4])


def test_unsupported_dtype_auto_falls_back_kernel_raises():
    x, w, b, m = (t.bfloat16() for t in _ok())
    out = masked_conv2d(x, w, b, m)  # auto: the CPU kernel has no bfloat16, so the reference runs
    torch.testing.assert_close(out, masked_conv2d_ref(x, w, b, m))
    if "masked_conv2d" in fastar._backend.CPU_KERNELS:
        with fastar.backend("kernel"), pytest.raises(RuntimeError, match="supports float32, float64, got bfloat16"):
            masked_conv2d(x, w, b, m)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="odd kernel size"):
        MaskedConv2d(3, 6, 4, "A")
    with pytest.raises(ValueError, match="out_channels must be divisible by 3"):
        MaskedConv2d(3, 64, 3, "A", color_groups=3)
    with pytest.raises(ValueError, match="in_channels must be divisible by 3"):
        MaskedConv2d(4, 6, 3, "B", color_groups=3)
    with pytest.raises(ValueError, match="mask_type must be 'A' or 'B'"):
        MaskedConv2d(3, 6, 3, "C")
    with pytest.raises(ValueError, match="color_groups must be 1 or 3"):
        MaskedConv2d(4, 4, 3, "A", color_groups=2)
    with pytest.raises(TypeError, match="kernel_size must be an odd int"):
        MaskedConv2d(3, 6, (3, 3), "A")


def test_autocast_casts_like_a_convolution(device):
    """Under torch.autocast the op runs in the autocast dtype, as F.conv2d would, and trains float32 weights."""
    layer = MaskedConv2d(3, 6, 3, "A", color_groups=3).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = layer(x)
        with fastar.backend("reference"):
            ref = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **tol(torch.bfloat16))
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_in_no_grad_with_parameters_on_worker_threads(threads):
    # Regression: fastar's CPU kernels run ATen GEMMs inside at::parallel_for; OpenMP workers do
    # not inherit the caller's dispatch state, so under no_grad with weights that require grad
    # the out= GEMMs on a worker raised "functions with out=... don't support automatic
    # differentiation". Large enough (64 channels, 28x28) to be split over threads.
    requires_kernel("masked_conv2d", "cpu")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 64, 28, 28, generator=g)
        w = torch.nn.Parameter(torch.randn(64, 64, 3, 3, generator=g) * 0.05)
        b = torch.nn.Parameter(torch.zeros(64))
        mask = masks.mask_b(64, 64, 3)
        with torch.no_grad():
            out = masked_conv2d(x, w, b, mask, (1, 1))
            ref = masked_conv2d_ref(x, w, b, mask, (1, 1))
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(out, ref, **tol(torch.float32, 64 * 9))


def test_auto_on_cpu_runs_onednn_where_it_is_faster_and_the_kernel_elsewhere(monkeypatch):
    requires_kernel("masked_conv2d", torch.device("cpu"))
    from fastar.ops import masked_conv as mc
    calls = []
    real = mc._masked_conv2d_def
    monkeypatch.setattr(mc, "_masked_conv2d_def", lambda *a: calls.append(a[0].shape) or real(*a))
    cases = [  # (shape of x, c_out, grad) -> oneDNN?
        ((1, 64, 32, 32), 64, False, True),      # 1024 pixels: oneDNN
        ((16, 64, 32, 32), 64, False, False),    # the kernel's home ground
        ((16, 64, 32, 32), 64, True, False),
        ((16, 3, 32, 32), 66, False, True),      # 3 input channels, forward: oneDNN
        ((16, 3, 32, 32), 66, True, False),      # ... with a backward from 16k pixels: the kernel
        ((4, 3, 32, 32), 66, True, True),
        ((16, 32, 28, 28), 32, False, False),
        ((16, 32, 28, 28), 32, True, True),      # 32 channels with a backward: a toss-up, oneDNN
    ]
    for shape, c_out, grad, onednn in cases:
        calls.clear()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g)
        w = torch.randn(c_out, shape[1], 3, 3, generator=g) * 0.1
        b = torch.randn(c_out, generator=g)
        m = masks.causal_mask("B", c_out, shape[1], 3, 3 if shape[1] == 3 else 1)
        assert mc.cpu_prefers_onednn(x, w, grad) is onednn, (shape, grad)
        if grad:
            x.requires_grad_(True)
        out = masked_conv2d(x, w, b, m)
        assert bool(calls) is onednn, (shape, grad)
        torch.testing.assert_close(out, masked_conv2d_ref(x, w, b, m), **tol(torch.float32))
        if grad:
            out.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
        calls.clear()
        with fastar.backend("kernel"):
            masked_conv2d(x, w, b, m)
        assert not calls                          # "kernel" always means the kernel


def test_auto_keeps_the_ops_semantics_for_non_finite_input_on_the_onednn_path():
    # a dead tap's NaN must not reach the output, whichever path auto takes
    x = torch.zeros(1, 4, 6, 6)
    x[0, :, 5, 5] = float("nan")                 # the last pixel: only future taps of other pixels see it
    w = torch.ones(4, 4, 3, 3)
    m = masks.causal_mask("A", 4, 4, 3, 1)
    out = masked_conv2d(x, w, None, m)
    assert torch.isfinite(out).all()
    with fastar.backend("kernel"):
        assert torch.equal(torch.isfinite(masked_conv2d(x, w, None, m)), torch.isfinite(out))
