"""PixelRNN layers: context by gradients (and the two public bugs the check must catch), colour
groups, shapes, torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar.nn import DiagonalBiLSTM, DiagonalLSTM, RowLSTM
from fastar.ops import diagonal_lstm_scan_ref, skew_ref, unskew_ref

H, W = 5, 6


def _dependence(fn, c_in, h=H, w=W, seed=0):
    """dep[i, j, a, b, cin]: whether output position (i, j) (any channel) has a non-zero gradient
    w.r.t. input (cin, a, b), float64, for a few random inputs (so a dead unit cannot hide one)."""
    g = torch.Generator().manual_seed(seed)
    dep = torch.zeros(h, w, h, w, c_in, dtype=torch.bool)
    for trial in range(2):
        x = torch.randn(1, c_in, h, w, generator=g, dtype=torch.float64, requires_grad=True)
        out = fn(x)
        proj = torch.randn(out.shape[1], generator=g, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                gx, = torch.autograd.grad((out[0, :, i, j] * proj).sum(), x, retain_graph=True)
                dep[i, j] |= (gx[0].permute(1, 2, 0) != 0)
    return dep


def _full_past(h, w):
    """want[i, j, a, b]: (a, b) is at or before (i, j) in raster order."""
    i = torch.arange(h).view(h, 1, 1, 1)
    j = torch.arange(w).view(1, w, 1, 1)
    a = torch.arange(h).view(1, 1, h, 1)
    b = torch.arange(w).view(1, 1, 1, w)
    return (a < i) | ((a == i) & (b <= j))


def _assert_context(dep, want, what):
    """dep over any input channel must equal the wanted positions exactly."""
    got = dep.any(-1)
    leak = got & ~want
    gap = want & ~got
    assert not leak.any(), f"{what}: output {tuple(leak.nonzero()[0][:2].tolist())} sees input " \
                           f"{tuple(leak.nonzero()[0][2:].tolist())} outside its context (a leak)"
    assert not gap.any(), f"{what}: output {tuple(gap.nonzero()[0][:2].tolist())} misses input " \
                          f"{tuple(gap.nonzero()[0][2:].tolist())} of its context (a gap)"


def _layer(cls, *a, **k):
    torch.manual_seed(0)
    m = cls(*a, **k).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.7)
    return m


# ---- the public skewed-space implementations, for the check to catch -------------------------

def _skewed_scan(is_skew, w_ss, rows_read):
    """A Diagonal LSTM run column by column over a skewed map, as public code does (no validity
    mask, zero initial state); the 2-tap state conv reads the previous column at rows
    ``i + rows_read[0]`` and ``i + rows_read[1]`` (zero outside)."""
    b, g4, h, s_len = is_skew.shape
    hid = g4 // 4
    hp = is_skew.new_zeros(b, hid, h)
    cp = is_skew.new_zeros(b, hid, h)
    outs = []
    for s in range(s_len):
        z = is_skew[:, :, :, s]
        for tap, off in enumerate(rows_read):
            sh = hp.roll(-off, 2)
            if off < 0:
                sh[:, :, :-off] = 0
            elif off > 0:
                sh[:, :, -off:] = 0
            z = z + torch.einsum("gk,bkr->bgr", w_ss[:, :, tap], sh)
        gi, gf, go, gg = z.split(hid, 1)
        cp = torch.sigmoid(gf) * cp + torch.sigmoid(gi) * torch.tanh(gg)
        hp = torch.sigmoid(go) * torch.tanh(cp)
        outs.append(hp)
    return torch.stack(outs, 3)


def _public_bilstm(layer, bug):
    """The Diagonal BiLSTM as the public implementations build it, right or with their bug:
    "ok" (flip the image, shift the right-to-left output down), "tf" (2-tap state conv with SAME
    padding, i.e. rows i and i + 1, and no shift down), "jax" (flip the skewed map, not the image)."""
    f, r = layer.forward_lstm, layer.backward_lstm
    rows = (0, 1) if bug == "tf" else (-1, 0)

    def run(lstm, x):
        return unskew_ref(_skewed_scan(skew_ref(lstm.input_to_state(x)), lstm.ss_weight, rows))

    def fn(x):
        left = run(f, x)
        if bug == "jax":
            right = unskew_ref(_skewed_scan(skew_ref(r.input_to_state(x)).flip(3), r.ss_weight, rows).flip(3))
        else:
            right = run(r, x.flip(3)).flip(3)
        if bug == "tf":
            return left + right
        return left + F.pad(right, (0, 0, 1, 0))[:, :, :-1]

    return fn


def test_public_skewed_scan_matches_the_op_where_it_is_right():
    # The skewed-space loop with the right taps (rows i - 1, i) is the op's recurrence except at a row's
    # first cell (public code's left-of-row state comes from the padding); the first column agrees.
    lstm = _layer(DiagonalLSTM, 2, 3)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    a = unskew_ref(_skewed_scan(skew_ref(lstm.input_to_state(x)), lstm.ss_weight, (-1, 0)))
    b, _ = diagonal_lstm_scan_ref(lstm.input_to_state(x), lstm.ss_weight)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0])


def test_diagonal_bilstm_sees_the_whole_past_and_nothing_else():
    layer = _layer(DiagonalBiLSTM, 2, 4)
    _assert_context(_dependence(layer, 2), _full_past(H, W), "DiagonalBiLSTM")


@pytest.mark.parametrize("bug,kind", [("tf", "leak"), ("jax", "gap")])
def test_context_check_catches_the_public_bugs(bug, kind):
    layer = _layer(DiagonalBiLSTM, 2, 4)
    with pytest.raises(AssertionError, match=kind):
        _assert_context(_dependence(_public_bilstm(layer, bug), 2), _full_past(H, W), bug)
    # and the public construction done right passes the same check
    _assert_context(_dependence(_public_bilstm(layer, "ok"), 2), _full_past(H, W), "public, done right")


def test_diagonal_lstm_one_direction_sees_above_left():
    layer = _layer(DiagonalLSTM, 2, 3)
    i = torch.arange(H).view(H, 1, 1, 1)
    j = torch.arange(W).view(1, W, 1, 1)
    a = torch.arange(H).view(1, 1, H, 1)
    b = torch.arange(W).view(1, 1, 1, W)
    _assert_context(_dependence(layer, 2), (a <= i) & (b <= j), "DiagonalLSTM")


@pytest.mark.parametrize("k,s", [(3, 3), (5, 3), (3, 5)])
def test_row_lstm_has_the_documented_triangle(k, s):
    layer = _layer(RowLSTM, 2, 3, kernel_size=k, state_kernel_size=s)
    i = torch.arange(H).view(H, 1, 1, 1)
    j = torch.arange(W).view(1, W, 1, 1)
    a = torch.arange(H).view(1, 1, H, 1)
    b = torch.arange(W).view(1, 1, 1, W)
    d = i - a
    want = (a <= i) & (b >= j - d * (s // 2) - k // 2) & (b <= j + d * (s // 2))
    want &= ~((a == i) & (b > j))
    _assert_context(_dependence(layer, 2), want, "RowLSTM")


@pytest.mark.parametrize("cls", [DiagonalBiLSTM, RowLSTM])
def test_colour_groups_at_the_current_position(cls):
    # Hidden group g at (i, j) sees input groups <= g at (i, j) (mask B), every group at earlier positions.
    layer = _layer(cls, 6, 6, color_groups=3)
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    for g_out in range(3):
        gx, = torch.autograd.grad(out[0, 2 * g_out:2 * g_out + 2, 1, 2].sum(), x, retain_graph=True)
        here = gx[0, :, 1, 2].view(3, 2).abs().sum(1)
        assert (here[:g_out + 1] > 0).all() and (here[g_out + 1:] == 0).all(), (g_out, here)
        assert (gx[0, :, 1, 1].view(3, 2).abs().sum(1) > 0).all()       # the pixel to the left: all groups


@pytest.mark.parametrize("cls", [DiagonalLSTM, DiagonalBiLSTM, RowLSTM])
def test_shapes_and_backends_agree(cls):
    layer = _layer(cls, 4, 5).float()
    x = torch.randn(3, 4, 7, 6)
    y = layer(x)
    assert y.shape == (3, 5, 7, 6)
    with fastar.backend("reference"):
        ref = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [DiagonalLSTM, DiagonalBiLSTM, RowLSTM])
def test_torch_compile_fullgraph(cls):
    layer = _layer(cls, 4, 4).float()
    x = torch.randn(2, 4, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        DiagonalBiLSTM(4, 0)
    with pytest.raises(ValueError, match="divisible by 3"):
        RowLSTM(6, 4, color_groups=3)
    with pytest.raises(ValueError, match="odd positive int"):
        RowLSTM(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        DiagonalBiLSTM(4, 4)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        RowLSTM(4, 4)(torch.randn(4, 4, 4))
