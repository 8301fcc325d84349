"""PixelRNN scans (skew / unskew, diagonal_lstm_scan, row_lstm_scan): the references against a plain
per-cell loop, the kernels against the references (outputs and every gradient, layouts, with and
without bias / h0 / c0), gradcheck, opcheck, torch.compile, double backward, bad input."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.ops import lstm_scan as L
from fastar.ops import (diagonal_lstm_scan, diagonal_lstm_scan_ref, row_lstm_scan, row_lstm_scan_ref, skew, skew_ref,
                        unskew, unskew_ref)
from tests.conftest import requires_kernel, tol

pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, hidden, H, W): many small shapes (odd / even, 1-wide, non-square), a few big ones.
CASES = [(1, 8, 1, 1), (2, 8, 1, 7), (3, 8, 5, 1), (2, 16, 4, 6), (4, 8, 7, 7), (2, 8, 33, 5), (1, 8, 8, 33),
         (16, 16, 6, 5), (3, 64, 5, 4), (2, 128, 3, 3)]
IDS = [f"b{c[0]}-h{c[1]}-{c[2]}x{c[3]}" for c in CASES]
ROW_K = {0: 1, 1: 3, 2: 5, 3: 3, 4: 3, 5: 7, 6: 3, 7: 5, 8: 3, 9: 1}  # the row LSTM's width per case
# (is_map / w_ss layout, bias, h0 / c0): every input variant meets every shape class somewhere.
VARIANTS = [("contiguous", True, True), ("contiguous", False, False), ("channels_last", True, False),
            ("sliced", False, True), ("w_transposed", True, True)]
VIDS = [f"{v[0]}-{'bias' if v[1] else 'nobias'}-{'state' if v[2] else 'nostate'}" for v in VARIANTS]


def dtypes_for(device):
    return [torch.float32] if device.type == "cuda" else [torch.float32, torch.float64]


def _layout(t, how):
    if how == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif how == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
        wide[..., ::2] = t
        t = wide[..., ::2]
        assert t.shape[-1] == 1 or not t.is_contiguous()
    return t


def make(case, device, dtype, k=2, layout="contiguous", bias=True, states=True, seed=0):
    """is_map, w_ss, bias, h0, c0 for a scan of width k (2: the diagonal LSTM's taps)."""
    b, hid, H, W = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4 * hid, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(4 * hid, hid, k, generator=g, dtype=torch.float64) * (k * hid) ** -0.5
    bb = torch.randn(4 * hid, generator=g, dtype=torch.float64) if bias else None
    h0 = torch.randn(b, hid, H, generator=g, dtype=torch.float64) if states else None
    c0 = torch.randn(b, hid, H, generator=g, dtype=torch.float64) if states else None
    x, w, bb, h0, c0 = (t.to(device, dtype) if t is not None else None for t in (x, w, bb, h0, c0))
    if layout == "w_transposed":
        w = w.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # same values, non-contiguous
        assert not w.is_contiguous()
    else:
        x = _layout(x, layout)
    return x, w, bb, h0, c0


def _run(fn, inputs, gh, gc):
    """(h, c) and the gradients of <h, gh> + <c, gc> w.r.t. every tensor input (None stays None)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    h, c = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((h * gh).sum() + (c * gc).sum(), wrt))
    return [h.detach(), c.detach()] + [next(grads) if t is not None else None for t in leaves]


NAMES_DIAG = ("h", "c", "d_is", "d_w", "d_bias", "d_h0", "d_c0")


def _compare(got, want, dtype, names, what, scale=1.0):
    for name, a, e in zip(names, got, want):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a, e, **tol(dtype, scale), msg=lambda s: f"{name} ({what}): {s}")


# ------------------------------------------------------------------------- references vs a cell loop

def _cell_loop(is_map, w_ss, bias, h0, c0, mode):
    """The module docstring's equations, one cell at a time (float64)."""
    b, g4, H, W = is_map.shape
    hid, k = g4 // 4, w_ss.shape[2]
    h = is_map.new_zeros(b, hid, H, W)
    c = is_map.new_zeros(b, hid, H, W)
    zero = is_map.new_zeros(b, hid)
    for i in range(H):
        for j in range(W):
            z = is_map[:, :, i, j] + (bias if bias is not None else 0)
            if mode == "diag":
                up = h[:, :, i - 1, j] if i > 0 else zero
                left = h[:, :, i, j - 1] if j > 0 else (h0[:, :, i] if h0 is not None else zero)
                cp = c[:, :, i, j - 1] if j > 0 else (c0[:, :, i] if c0 is not None else zero)
                z = z + up @ w_ss[:, :, 0].T + left @ w_ss[:, :, 1].T
            else:
                for t in range(k):
                    jj = j + t - k // 2
                    if i > 0 and 0 <= jj < W:
                        z = z + h[:, :, i - 1, jj] @ w_ss[:, :, t].T
                cp = c[:, :, i - 1, j] if i > 0 else zero
            gi, gf, go, gg = z.split(hid, 1)
            c[:, :, i, j] = torch.sigmoid(gf) * cp + torch.sigmoid(gi) * torch.tanh(gg)
            h[:, :, i, j] = torch.sigmoid(go) * torch.tanh(c[:, :, i, j])
    return h, c


@pytest.mark.parametrize("case", [(2, 3, 1, 1), (2, 3, 4, 6), (1, 2, 5, 3), (3, 2, 3, 7)])
def test_references_match_the_cell_equations(case):
    x, w, b, h0, c0 = make(case, "cpu", torch.float64)
    for args in ((x, w, b, h0, c0), (x, w, None, None, None), (x, w, b, None, c0)):
        torch.testing.assert_close(diagonal_lstm_scan_ref(*args), _cell_loop(*args, "diag"), rtol=1e-12, atol=1e-12)
    for k in (1, 3, 5):
        x, w, b, _, _ = make(case, "cpu", torch.float64, k=k)
        torch.testing.assert_close(row_lstm_scan_ref(x, w, b), _cell_loop(x, w, b, None, None, "row"), rtol=1e-12,
                                   atol=1e-12)


def test_skew_reference_layout():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    y = skew_ref(x)
    assert y.shape == (1, 2, 3, 6)
    for i in range(3):
        assert torch.equal(y[0, :, i, i:i + 4], x[0, :, i])
        assert y[0, :, i, :i].abs().sum() == 0 and y[0, :, i, i + 4:].abs().sum() == 0
    assert torch.equal(unskew_ref(y), x)


def test_reference_half_precision_accumulates_in_float32():
    x, w, b, h0, c0 = make((2, 8, 4, 5), "cpu", torch.float32)
    h, c = diagonal_lstm_scan_ref(*(t.bfloat16() for t in (x, w, b, h0, c0)))
    assert h.dtype == c.dtype == torch.bfloat16
    want = diagonal_lstm_scan_ref(*(t.bfloat16().float() for t in (x, w, b, h0, c0)))
    torch.testing.assert_close(h, want[0].bfloat16(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- kernels vs references

@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_diagonal_kernel_matches_reference(device, case, variant):
    requires_kernel("diagonal_lstm_scan", device)
    requires_kernel("diagonal_lstm_scan_backward", device)
    layout, bias, states = variant
    for dtype in dtypes_for(device):
        inputs = make(case, device, dtype, 2, layout, bias, states)
        b, hid, H, W = case
        g = torch.Generator().manual_seed(1)
        gh, gc = (torch.randn(b, hid, H, W, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
        with fastar.backend("kernel"):
            got = _run(diagonal_lstm_scan, inputs, gh, gc)
        want = _run(diagonal_lstm_scan_ref, inputs, gh, gc)
        # float32: the weight gradient sums B * H * W products; allow for the accumulation order.
        _compare(got, want, dtype, NAMES_DIAG, f"{dtype}, {variant}", 1.0 if dtype == torch.float64 else 4.0)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("ci", range(len(CASES)), ids=IDS)
def test_row_kernel_matches_reference(device, ci, variant):
    requires_kernel("row_lstm_scan", device)
    requires_kernel("row_lstm_scan_backward", device)
    layout, bias, _ = variant
    case, k = CASES[ci], ROW_K[ci]
    for dtype in dtypes_for(device):
        x, w, bb, _, _ = make(case, device, dtype, k, layout, bias, False)
        b, hid, H, W = case
        g = torch.Generator().manual_seed(1)
        gh, gc = (torch.randn(b, hid, H, W, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
        with fastar.backend("kernel"):
            got = _run(row_lstm_scan, (x, w, bb), gh, gc)
        want = _run(row_lstm_scan_ref, (x, w, bb), gh, gc)
        _compare(got, want, dtype, NAMES_DIAG[:5], f"{dtype}, {variant}, k={k}",
                 1.0 if dtype == torch.float64 else 4.0)


@pytest.mark.parametrize("mode", ["diag", "row"])
def test_large_image_batch16(device, mode):
    """One PixelRNN-sized image (32 x 32, batch 16; hidden 16), float32, forward and backward."""
    op = "diagonal_lstm_scan" if mode == "diag" else "row_lstm_scan"
    requires_kernel(op, device)
    case = (16, 16, 32, 32)
    x, w, b, h0, c0 = make(case, device, torch.float32, 2 if mode == "diag" else 3)
    inputs = (x, w, b, h0, c0) if mode == "diag" else (x, w, b)
    fn, ref = (diagonal_lstm_scan, diagonal_lstm_scan_ref) if mode == "diag" else (row_lstm_scan, row_lstm_scan_ref)
    gh, gc = torch.randn(2, 16, 16, 32, 32, device=device)
    with fastar.backend("kernel"):
        got = _run(fn, inputs, gh, gc)
    want = _run(ref, inputs, gh, gc)
    _compare(got, want, torch.float32, NAMES_DIAG, mode, 10.0)


def test_saved_activations_and_output_mask(device):
    """The raw ops: saved = [sigmoid(i) | sigmoid(f) | sigmoid(o) | tanh(g) | c]; a false output_mask
    entry gives an empty tensor, the others match the full call."""
    requires_kernel("diagonal_lstm_scan_backward", device)
    requires_kernel("row_lstm_scan_backward", device)
    dtype = dtypes_for(device)[-1]
    x, w, b, h0, c0 = make((2, 8, 4, 5), device, dtype)
    h, c, saved = torch.ops.fastar.diagonal_lstm_scan(x, w, b, h0, c0)
    assert saved.shape == (2, 40, 4, 5)
    si, sf, so, sg, sc = saved.split(8, 1)
    torch.testing.assert_close(sc, c, **tol(dtype))
    torch.testing.assert_close(so * torch.tanh(sc), h, **tol(dtype))
    assert ((si > 0) & (si < 1) & (sf > 0) & (sf < 1)).all() and (sg.abs() <= 1).all()
    gh, gc = torch.randn_like(h), torch.randn_like(c)
    full = torch.ops.fastar.diagonal_lstm_scan_backward(gh, gc, x, w, h, c, saved, h0, c0, [True] * 5)
    for k in range(5):
        mask = [j == k for j in range(5)]
        part = torch.ops.fastar.diagonal_lstm_scan_backward(gh, gc, x, w, h, c, saved, h0, c0, mask)
        for j in range(5):
            if j == k:
                torch.testing.assert_close(part[j], full[j], rtol=0, atol=0)
            else:
                assert part[j].numel() == 0
    xr, wr, br, _, _ = make((2, 8, 4, 5), device, dtype, 3)
    h, c, saved = torch.ops.fastar.row_lstm_scan(xr, wr, br)
    full = torch.ops.fastar.row_lstm_scan_backward(gh, gc, xr, wr, h, c, saved, [True] * 3)
    part = torch.ops.fastar.row_lstm_scan_backward(gh, gc, xr, wr, h, c, saved, [False, True, False])
    assert part[0].numel() == 0 and part[2].numel() == 0
    torch.testing.assert_close(part[1], full[1], rtol=0, atol=0)


def test_only_grad_c_flows(device):
    """A loss on c alone (grad_h None inside autograd) still reaches every input."""
    requires_kernel("diagonal_lstm_scan", device)
    x, w, b, h0, c0 = make((2, 8, 3, 4), device, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, h0, c0)]
    with fastar.backend("kernel"):
        _, c = diagonal_lstm_scan(*leaves)
    got = torch.autograd.grad(c.sum(), leaves)
    leaves2 = [t.detach().requires_grad_(True) for t in (x, w, b, h0, c0)]
    want = torch.autograd.grad(diagonal_lstm_scan_ref(*leaves2)[1].sum(), leaves2)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol(torch.float32))


def test_empty_batch(device):
    requires_kernel("diagonal_lstm_scan", device)
    x, w, b, _, _ = make((1, 8, 3, 4), device, torch.float32)
    with fastar.backend("kernel"):
        h, c = diagonal_lstm_scan(x[:0], w, b)
        hr, cr = row_lstm_scan(x[:0], torch.randn(32, 8, 3, device=device), b)
    assert h.shape == c.shape == hr.shape == (0, 8, 3, 4)


# ------------------------------------------------------------------------------------ skew / unskew

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 7), (2, 3, 5, 1), (2, 4, 6, 4), (3, 2, 7, 9), (1, 2, 33, 5)])
def test_skew_kernel_matches_reference(device, shape):
    requires_kernel("skew", device)
    requires_kernel("unskew", device)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(shape, dtype=torch.float64).to(device, dtype)
        for view in (x, _layout(x, "channels_last"), _layout(x, "sliced")):
            with fastar.backend("kernel"):
                y = skew(view)
                back = unskew(y)
                back_sliced = unskew(_layout(y, "sliced"))
            assert y.is_contiguous() and torch.equal(y, skew_ref(view))
            assert torch.equal(back, view) and torch.equal(back_sliced, view)
    if x.numel() > 64:
        return
    xg = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    with fastar.backend("kernel"):
        assert torch.autograd.gradcheck(skew, (xg,))
        assert torch.autograd.gradcheck(unskew, (skew(xg).detach().requires_grad_(True),))


# ------------------------------------------------------------------ gradcheck, opcheck, compile, 2nd

def test_gradcheck(device):
    requires_kernel("diagonal_lstm_scan", device)
    requires_kernel("row_lstm_scan", device)
    if device.type == "cuda" and torch.float64 not in L.KERNEL_DTYPES["cuda"]:
        pytest.skip("the CUDA kernels have no float64 for gradcheck")
    for case in [(2, 2, 3, 4), (1, 3, 2, 1)]:
        x, w, b, h0, c0 = (t.requires_grad_(True) for t in make(case, device, torch.float64))
        with fastar.backend("kernel"):
            assert torch.autograd.gradcheck(diagonal_lstm_scan, (x, w, b, h0, c0))
            assert torch.autograd.gradcheck(lambda x, w: diagonal_lstm_scan(x, w), (x, w))
        xr, wr, br, _, _ = (t.requires_grad_(True) if t is not None else None
                            for t in make(case, device, torch.float64, 3))
        with fastar.backend("kernel"):
            assert torch.autograd.gradcheck(row_lstm_scan, (xr, wr, br))


def test_opcheck(device):
    requires_kernel("diagonal_lstm_scan", device)
    requires_kernel("row_lstm_scan", device)
    requires_kernel("skew", device)
    x, w, b, h0, c0 = make((2, 4, 3, 5), device, torch.float32)
    for args in ((x, w, b, h0, c0), (x, w, None, None, c0)):
        args = tuple(t.detach().requires_grad_(True) if t is not None else None for t in args)
        torch.library.opcheck(torch.ops.fastar.diagonal_lstm_scan.default, args)
    xr, wr, br, _, _ = make((2, 4, 3, 5), device, torch.float32, 3)
    torch.library.opcheck(torch.ops.fastar.row_lstm_scan.default,
                          (xr.requires_grad_(True), wr.requires_grad_(True), None))
    xs = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastar.skew.default, (xs,))
    torch.library.opcheck(torch.ops.fastar.unskew.default, (torch.randn(2, 3, 4, 8, device=device, requires_grad=True),))


def test_torch_compile_fullgraph(device):
    requires_kernel("diagonal_lstm_scan", device)
    requires_kernel("row_lstm_scan", device)
    requires_kernel("skew", device)
    torch._dynamo.reset()
    x, w, b, h0, c0 = make((2, 4, 3, 5), device, torch.float32)
    xr, wr, br, _, _ = make((2, 4, 3, 5), device, torch.float32, 3, seed=1)

    def f(x, w, b, h0, c0, xr, wr, br):
        h, c = diagonal_lstm_scan(x, w, b, h0, c0)
        hr, cr = row_lstm_scan(xr, wr, br)
        return unskew(skew(h + hr)) * c + cr

    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, h0, c0, xr, wr, br)]
    with fastar.backend("kernel"):
        eager = f(*leaves)
        ge = torch.autograd.grad(eager.square().sum(), leaves)
        cf = torch.compile(f, fullgraph=True)
        out = cf(*leaves)
        gc = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, eager, **tol(torch.float32))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, **tol(torch.float32, 10))


def test_double_backward_falls_back_to_the_reference(device):
    requires_kernel("diagonal_lstm_scan", device)
    requires_kernel("row_lstm_scan", device)
    dtype = dtypes_for(device)[-1]

    def second(fn, inputs):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        h, c = fn(*leaves)
        g = torch.autograd.grad((h.square().sum() + c.sum()), leaves, create_graph=True)
        pen = sum(t.square().sum() for t in g)
        return torch.autograd.grad(pen, leaves)

    x, w, b, h0, c0 = make((2, 4, 3, 4), device, dtype)
    xr, wr, br, _, _ = make((2, 4, 3, 4), device, dtype, 3)
    for fn, ref, inputs in ((diagonal_lstm_scan, diagonal_lstm_scan_ref, (x, w, b, h0, c0)),
                            (row_lstm_scan, row_lstm_scan_ref, (xr, wr, br))):
        with fastar.backend("kernel"):
            got = second(fn, inputs)
        want = second(ref, inputs)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **tol(dtype, 10))


def test_backward_op_has_no_derivative_of_its_own():
    requires_kernel("diagonal_lstm_scan_backward", "cpu")
    x, w, b, h0, c0 = make((1, 2, 2, 2), "cpu", torch.float64)
    h, c, saved = torch.ops.fastar.diagonal_lstm_scan(x, w, b, h0, c0)
    gh = torch.randn_like(h, requires_grad=True)
    d_is = torch.ops.fastar.diagonal_lstm_scan_backward(gh, torch.zeros_like(c), x, w, h, c, saved, h0, c0,
                                                        [True] * 5)[0]
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        d_is.sum().backward()


def test_unsupported_dtype_auto_falls_back_kernel_raises():
    x, w, b, h0, c0 = (t.bfloat16() for t in make((1, 4, 3, 3), "cpu", torch.float32))
    h, c = diagonal_lstm_scan(x, w, b, h0, c0)  # auto: no CPU bfloat16 kernel, the reference runs
    torch.testing.assert_close(h, diagonal_lstm_scan_ref(x, w, b, h0, c0)[0], rtol=0, atol=0)
    if "diagonal_lstm_scan" in fastar._backend.CPU_KERNELS:
        with fastar.backend("kernel"), pytest.raises(RuntimeError, match="supports float32, float64, got bfloat16"):
            diagonal_lstm_scan(x, w, b, h0, c0)


# --------------------------------------------------------------------------------------- bad input

def _ok(k=2):
    return torch.zeros(2, 8, 3, 4), torch.zeros(8, 2, k), torch.zeros(8), torch.zeros(2, 2, 3), torch.zeros(2, 2, 3)


BAD_DIAG = [
    ("is_map 3-D", lambda x, w, b, h0, c0: (x[0], w, b, h0, c0), r"is_map must be 4-D"),
    ("w_ss 2-D", lambda x, w, b, h0, c0: (x, w[:, :, 0], b, h0, c0), r"w_ss must be 3-D"),
    ("channels", lambda x, w, b, h0, c0: (x[:, :4], w, b, h0, c0), r"is_map has 4 channels, w_ss needs 4 \* hidden = 8"),
    ("w_ss not 4h", lambda x, w, b, h0, c0: (x, w[:6], b, h0, c0), r"w_ss must be \(4 \* hidden, hidden, taps\)"),
    ("three taps", lambda x, w, b, h0, c0: (x, torch.zeros(8, 2, 3), b, h0, c0), r"w_ss must have 2 taps"),
    ("dtype mix", lambda x, w, b, h0, c0: (x, w.double(), b, h0, c0), r"w_ss dtype .* must match is_map dtype"),
    ("bias length", lambda x, w, b, h0, c0: (x, w, b[:6], h0, c0), r"bias must have length 4 \* hidden = 8"),
    ("h0 shape", lambda x, w, b, h0, c0: (x, w, b, h0[:, :, :2], c0), r"h0 must be \(B, hidden, H\) = \[2, 2, 3\]"),
    ("c0 dtype", lambda x, w, b, h0, c0: (x, w, b, h0, c0.double()), r"c0 dtype .* must match is_map dtype"),
]
BAD_ROW = [
    ("even width", lambda x, w, b: (x, torch.zeros(8, 2, 2), b), r"width must be odd"),
    ("channels", lambda x, w, b: (torch.zeros(2, 12, 3, 4), w, b), r"is_map has 12 channels"),
    ("dtype mix", lambda x, w, b: (x.double(), w, b), r"w_ss dtype .* must match is_map dtype"),
    ("bias 2-D", lambda x, w, b: (x, w, b.view(2, 4)), r"bias must"),
]


@pytest.mark.parametrize("fn", [diagonal_lstm_scan, diagonal_lstm_scan_ref])
@pytest.mark.parametrize("what, bad, match", BAD_DIAG, ids=[r[0] for r in BAD_DIAG])
def test_bad_input_diagonal_python(fn, what, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*bad(*_ok()))


@pytest.mark.parametrize("fn", [row_lstm_scan, row_lstm_scan_ref])
@pytest.mark.parametrize("what, bad, match", BAD_ROW, ids=[r[0] for r in BAD_ROW])
def test_bad_input_row_python(fn, what, bad, match):
    x, w, b, _, _ = _ok(3)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*bad(x, w, b))


@pytest.mark.parametrize("what, bad, match", BAD_DIAG, ids=[r[0] for r in BAD_DIAG])
def test_bad_input_diagonal_raw_op_cpu(what, bad, match):
    """The C++ checks (shared with the CUDA kernels) say the same as the Python ones."""
    requires_kernel("diagonal_lstm_scan", "cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastar.diagonal_lstm_scan(*bad(*_ok()))


@pytest.mark.parametrize("what, bad, match", BAD_ROW, ids=[r[0] for r in BAD_ROW])
def test_bad_input_row_raw_op_cpu(what, bad, match):
    requires_kernel("row_lstm_scan", "cpu")
    x, w, b, _, _ = _ok(3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastar.row_lstm_scan(*bad(x, w, b))


def test_bad_input_raw_ops_cpu_misc():
    requires_kernel("diagonal_lstm_scan_backward", "cpu")
    x, w, b, h0, c0 = _ok()
    with pytest.raises(RuntimeError, match="CPU kernel supports float32 and float64, got BFloat16"):
        torch.ops.fastar.diagonal_lstm_scan(x.bfloat16(), w.bfloat16(), None, None, None)
    with pytest.raises(RuntimeError, match="is_map must be a floating-point tensor"):
        torch.ops.fastar.row_lstm_scan(x.long(), torch.zeros(8, 2, 3).long(), None)
    h, c, saved = torch.ops.fastar.diagonal_lstm_scan(x, w, b, h0, c0)
    with pytest.raises(RuntimeError, match=r"saved must be \[2, 10, 3, 4\]"):
        torch.ops.fastar.diagonal_lstm_scan_backward(h, c, x, w, h, c, saved[:, :8], h0, c0, [True] * 5)
    with pytest.raises(RuntimeError, match=r"grad_h must be \[2, 2, 3, 4\]"):
        torch.ops.fastar.diagonal_lstm_scan_backward(h[:1], c, x, w, h, c, saved, h0, c0, [True] * 5)
    with pytest.raises(RuntimeError, match=r"x must be 4-D"):
        torch.ops.fastar.skew(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"at least 5 wide"):
        torch.ops.fastar.unskew(torch.zeros(1, 1, 5, 4))
    for fn in (unskew, unskew_ref):
        with pytest.raises(ValueError, match=r"at least 5 wide"):
            fn(torch.zeros(1, 1, 5, 4))


def test_aten_gemm_fallback_gives_the_same_results():
    # The CPU kernels call the BLAS symbols libtorch_cpu exports, declared weak; where a torch build
    # lacks them the kernels fall back to at::mm_out on the same views. FASTAR_LSTM_SCAN_ATEN_GEMM=1
    # forces that path, in a fresh process (the switch is read once).
    import os
    import subprocess
    import sys

    requires_kernel("diagonal_lstm_scan", "cpu")
    requires_kernel("row_lstm_scan", "cpu")
    code = (
        "import torch, fastar\n"
        "from fastar.ops import diagonal_lstm_scan, row_lstm_scan\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "w2 = torch.randn(16, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "w3 = torch.randn(16, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "out = []\n"
        "with fastar.backend('kernel'):\n"
        "    for f, w in ((diagonal_lstm_scan, w2), (row_lstm_scan, w3)):\n"
        "        h, c = f(x, w)\n"
        "        gx, gw = torch.autograd.grad((h * 1.3 + c).sum(), (x, w))\n"
        "        out += [h, c, gx, gw]\n"
        "torch.save([t.detach() for t in out], __import__('sys').argv[1])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = {}
        for flag in ("0", "1"):
            path = os.path.join(d, f"out{flag}.pt")
            env = dict(os.environ, FASTAR_LSTM_SCAN_ATEN_GEMM=flag)
            subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=300)
            res[flag] = torch.load(path)
    for a, b in zip(res["0"], res["1"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_row_scan_keeps_no_activations_when_no_gradient_is_wanted():
    """Inference and sampling need no backward: the CPU kernel then writes no saved activations
    (5/7 of the forward's writes), with the same h and c; asking it for a backward then is loud."""
    requires_kernel("row_lstm_scan", "cpu")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 5, 6, generator=g), torch.randn(16, 4, 3, generator=g) * 0.3
    h1, c1, s1 = torch.ops.fastar.row_lstm_scan(x, w, None, True)
    h0, c0, s0 = torch.ops.fastar.row_lstm_scan(x, w, None, False)
    assert torch.equal(h0, h1) and torch.equal(c0, c1)
    assert s1.shape == (2, 20, 5, 6) and s0.numel() == 0
    with torch.no_grad():                                   # the public function picks save=False itself
        h2, _ = row_lstm_scan(x, w)
    assert torch.equal(h2, h1)
    xr = x.clone().requires_grad_()
    h, c, _ = torch.ops.fastar.row_lstm_scan(xr, w, None, False)
    with pytest.raises(RuntimeError, match="save=False"):
        h.sum().backward()
