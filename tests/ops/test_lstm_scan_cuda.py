"""CUDA-only checks of the PixelRNN scan kernels (csrc/cuda/lstm_scan.cu) against the references:
bfloat16 against the float32 reference, a large shape, shapes whose tiling and diagonal counts
stress the persistent launch (one cell, one column, one row, more rows than a tile), and that the
result does not depend on the launch (twice, and the per-step fallback path: bitwise equal).

Every test takes the `device` fixture and skips its cpu case (the CPU kernels are covered by
tests/ops/test_lstm_scan.py), so the ids carry [cuda] for scripts/gpu_check.sh's selection."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.ops import (diagonal_lstm_scan, diagonal_lstm_scan_ref, row_lstm_scan, row_lstm_scan_ref, skew, skew_ref,
                        unskew, unskew_ref)
from tests.conftest import requires_kernel, tol

SCANS = {"diagonal": (diagonal_lstm_scan, diagonal_lstm_scan_ref), "row": (row_lstm_scan, row_lstm_scan_ref)}


@pytest.fixture
def cuda(device):
    if device.type != "cuda":
        pytest.skip("CUDA-only test (the CPU kernels are tested in test_lstm_scan.py)")
    return device


def _args(kind, B, hid, H, W, k=3, bias=True, states=True, seed=0, device="cuda", scale=None):
    """(is_map, w_ss, bias, [h0, c0]) in float32 on `device`, and upstream grads (gh, gc)."""
    g = torch.Generator().manual_seed(seed)
    taps = 2 if kind == "diagonal" else k
    scale = scale if scale is not None else 1.0 / (taps * hid) ** 0.5
    a = [torch.randn(B, 4 * hid, H, W, generator=g), torch.randn(4 * hid, hid, taps, generator=g) * scale,
         torch.randn(4 * hid, generator=g) if bias else None]
    if kind == "diagonal" and states:
        a += [torch.randn(B, hid, H, generator=g), torch.randn(B, hid, H, generator=g)]
    gh, gc = torch.randn(B, hid, H, W, generator=g), torch.randn(B, hid, H, W, generator=g)
    a = [t.to(device) if t is not None else None for t in a]
    return a, gh.to(device), gc.to(device)


def _run(fn, args, gh, gc, dtype=None, backend="kernel"):
    """h, c and the grads of (h, c) . (gh, gc) w.r.t. every tensor argument (None for a None one)."""
    xs = [t.to(dtype).requires_grad_(True) if t is not None else None for t in args]
    with fastar.backend(backend):
        h, c = fn(*xs)
        live = [t for t in xs if t is not None]
        grads = iter(torch.autograd.grad((h, c), live, (gh.to(h.dtype), gc.to(c.dtype))))
    return h, c, [next(grads) if t is not None else None for t in xs]


def _ref(kind, args, gh, gc):
    """The reference in float64 (exact enough to judge float32, and never TF32: cuDNN may run the
    row reference's float32 conv1d in TF32, a 1e-3 error)."""
    d = [t.detach().double() if t is not None else None for t in args]
    return _run(SCANS[kind][1], d, gh.double(), gc.double(), torch.float64, backend="reference")


def _compare(got, want, fwd_tol, bwd_tol, what=""):
    h, c, gs = got
    hr, cr, grs = want

    def close(a, r, name):
        t = bwd_tol if name.startswith("grad") else fwd_tol
        torch.testing.assert_close(a.detach().double().cpu(), r.detach().cpu(), **t, msg=lambda m: f"{what} {name}: {m}")

    close(h, hr, "h")
    close(c, cr, "c")
    for name, a, r in zip(("is_map", "w_ss", "bias", "h0", "c0"), gs, grs):
        if r is None:
            assert a is None
            continue
        close(a, r, f"grad {name}")


def _need(kind, device):
    requires_kernel(f"{kind}_lstm_scan", device)
    requires_kernel(f"{kind}_lstm_scan_backward", device)


@pytest.mark.parametrize("kind", list(SCANS))
def test_bfloat16_matches_float32_reference(cuda, kind):
    _need(kind, cuda)
    fn = SCANS[kind][0]
    args, gh, gc = _args(kind, 3, 24, 7, 9, k=3, device=cuda, seed=1)
    args = [t.to(torch.bfloat16).float() if t is not None else None for t in args]  # representable in bf16
    gh, gc = gh.to(torch.bfloat16).float(), gc.to(torch.bfloat16).float()
    got = _run(fn, args, gh, gc, torch.bfloat16)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in got[2] if g is not None)
    want = _ref(kind, args, gh, gc)
    _compare(got, want, tol(torch.bfloat16), tol(torch.bfloat16, 2), f"{kind} bfloat16")


@pytest.mark.parametrize("kind", list(SCANS))
def test_large_shape_forward_backward(cuda, kind):
    _need(kind, cuda)
    fn = SCANS[kind][0]
    args, gh, gc = _args(kind, 16, 128, 32, 32, k=3, device=cuda, seed=2)
    got = _run(fn, args, gh, gc, torch.float32)
    want = _ref(kind, args, gh, gc)
    _compare(got, want, tol(torch.float32, 10), tol(torch.float32, 30), f"{kind} large")


# (B, hid, H, W): one cell; one column (each diagonal a single cell, H steps); one row; more
# GEMM rows per step than a 64-row tile; hidden sizes off the 32-unit tile; long thin maps.
EDGE_SHAPES = [(1, 1, 1, 1), (1, 3, 33, 1), (1, 3, 1, 33), (70, 2, 2, 2), (2, 33, 5, 4), (3, 1, 3, 65), (2, 5, 70, 3),
               (5, 40, 1, 1)]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(SCANS))
def test_edge_shapes(cuda, kind, shape):
    _need(kind, cuda)
    fn = SCANS[kind][0]
    B, hid, H, W = shape
    args, gh, gc = _args(kind, B, hid, H, W, k=5, device=cuda, seed=3)  # k = 5 > 2 W + 1 for the narrow maps
    got = _run(fn, args, gh, gc, torch.float32)
    want = _ref(kind, args, gh, gc)
    _compare(got, want, tol(torch.float32), tol(torch.float32, 10), f"{kind} {shape}")


@pytest.mark.parametrize("k", [1, 3, 7])
def test_row_widths(cuda, k):
    _need("row", cuda)
    args, gh, gc = _args("row", 2, 6, 4, 5, k=k, device=cuda, seed=4)
    got = _run(row_lstm_scan, args, gh, gc, torch.float32)
    want = _ref("row", args, gh, gc)
    _compare(got, want, tol(torch.float32), tol(torch.float32, 10), f"row k={k}")


@pytest.mark.parametrize("bias, states", [(False, False), (True, False), (False, True)])
def test_diagonal_optional_arguments(cuda, bias, states):
    _need("diagonal", cuda)
    args, gh, gc = _args("diagonal", 2, 6, 4, 5, bias=bias, states=states, device=cuda, seed=5)
    got = _run(diagonal_lstm_scan, args, gh, gc, torch.float32)
    want = _ref("diagonal", args, gh, gc)
    _compare(got, want, tol(torch.float32), tol(torch.float32, 10), f"bias={bias} states={states}")


def test_non_contiguous_inputs(cuda):
    _need("diagonal", cuda)
    args, gh, gc = _args("diagonal", 2, 6, 4, 5, device=cuda, seed=6)
    nc = [args[0].contiguous(memory_format=torch.channels_last), args[1].transpose(0, 1).contiguous().transpose(0, 1)]
    nc += args[2:]
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    got = _run(diagonal_lstm_scan, nc, gh, gc, torch.float32)
    want = _ref("diagonal", args, gh, gc)
    _compare(got, want, tol(torch.float32), tol(torch.float32, 10), "non-contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(SCANS))
def test_launch_independent_bitwise(cuda, kind, dtype, monkeypatch):
    """Each output element is one thread's fixed-order sum: twice the same launch, and the per-step
    fallback (other grids, no barrier), give bitwise the same results."""
    _need(kind, cuda)
    fn, _ = SCANS[kind]
    args, gh, gc = _args(kind, 9, 40, 11, 13, k=3, device=cuda, seed=7)
    a = _run(fn, args, gh, gc, dtype)
    b = _run(fn, args, gh, gc, dtype)
    monkeypatch.setenv("FASTAR_LSTM_SCAN_CUDA_PATH", "steps")
    s = _run(fn, args, gh, gc, dtype)
    for other, how in ((b, "second run"), (s, "per-step path")):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1]), how
        for x, y in zip(a[2], other[2]):
            assert (x is None and y is None) or torch.equal(x, y), how


def test_persistent_path_forced(cuda, monkeypatch):
    _need("diagonal", cuda)
    monkeypatch.setenv("FASTAR_LSTM_SCAN_CUDA_PATH", "persistent")  # an error if it would fall back
    args, gh, gc = _args("diagonal", 2, 6, 4, 5, device=cuda, seed=8)
    got = _run(diagonal_lstm_scan, args, gh, gc, torch.float32)
    want = _ref("diagonal", args, gh, gc)
    _compare(got, want, tol(torch.float32), tol(torch.float32, 10), "persistent")
    monkeypatch.setenv("FASTAR_LSTM_SCAN_CUDA_PATH", "sideways")
    with pytest.raises(RuntimeError, match="FASTAR_LSTM_SCAN_CUDA_PATH"):
        torch.ops.fastar.diagonal_lstm_scan(args[0], args[1], None, None, None)


@pytest.mark.parametrize("kind", list(SCANS))
def test_saved_layout(cuda, kind):
    """saved (B, 5h, H, W) float32: [sigmoid(i) | sigmoid(f) | sigmoid(o) | tanh(g) | c]; h = o tanh(c)."""
    _need(kind, cuda)
    args, _, _ = _args(kind, 2, 6, 4, 5, device=cuda, seed=9)
    x = [a.to(torch.bfloat16) if a is not None else None for a in args]
    op = torch.ops.fastar.diagonal_lstm_scan if kind == "diagonal" else torch.ops.fastar.row_lstm_scan
    h, c, saved = op(*x)
    hid = h.shape[1]
    assert saved.dtype == torch.float32 and list(saved.shape) == [2, 5 * hid, 4, 5]
    i, f, o, g, cs = saved.split(hid, 1)
    assert torch.equal(c, cs.to(torch.bfloat16))
    torch.testing.assert_close(h.float(), o * torch.tanh(cs), **tol(torch.bfloat16))
    assert (i >= 0).all() and (i <= 1).all() and (f >= 0).all() and (f <= 1).all() and (g.abs() <= 1).all()


@pytest.mark.parametrize("kind", list(SCANS))
def test_empty_batch(cuda, kind):
    _need(kind, cuda)
    fn, _ = SCANS[kind]
    args, gh, gc = _args(kind, 0, 4, 3, 5, device=cuda)
    h, c, grads = _run(fn, args, gh, gc, torch.float32)
    assert h.shape == c.shape == (0, 4, 3, 5)
    assert grads[1].shape == args[1].shape and not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 6, 1), (1, 1, 1, 7), (3, 2, 2, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_skew_unskew(cuda, dtype, shape):
    requires_kernel("skew", cuda)
    requires_kernel("unskew", cuda)
    x = torch.randn(*shape, device=cuda).to(dtype).requires_grad_(True)
    with fastar.backend("kernel"):
        y = skew(x)
        back = unskew(y)
        go = torch.randn_like(back)
        (gx,) = torch.autograd.grad(back, x, go)
    assert torch.equal(y, skew_ref(x.detach()))
    assert torch.equal(back, x.detach()) and torch.equal(gx, go)
    with fastar.backend("kernel"):
        assert torch.equal(unskew(y.detach()), unskew_ref(y.detach()))


def test_skew_unskew_no_rows(cuda):
    requires_kernel("skew", cuda)
    x = torch.randn(2, 1, 0, 3, device=cuda)
    with fastar.backend("kernel"):
        y = skew(x)
        assert y.shape == skew_ref(x).shape == (2, 1, 0, 2)
        assert unskew(y).shape == unskew_ref(y).shape == x.shape
