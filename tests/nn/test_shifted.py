"""PixelCNN++'s drop-in layers: each one's causality by gradients, shapes, weight norm, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastar.nn import (NIN, DownRightShiftedConv2d, DownRightShiftedConvTranspose2d, DownShiftedConv2d,
                       DownShiftedConvTranspose2d, GatedResnet, concat_elu)


def _dependence(layer, shape, out_pos, **kw):
    """Which input positions (H, W) the output at out_pos = (i, j) depends on (any channel)."""
    torch.manual_seed(0)
    x = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    y = layer.double()(x, **kw)
    y[0, :, out_pos[0], out_pos[1]].sum().backward()
    return x.grad[0].abs().sum(0) > 0


def _grid(h, w):
    r = torch.arange(h)[:, None].expand(h, w)
    c = torch.arange(w)[None, :].expand(h, w)
    return r, c


@pytest.mark.parametrize("kernel", [(2, 3), (1, 3), (3, 5)])
@pytest.mark.parametrize("shift", [False, True])
def test_down_shifted_sees_rows_above_only(kernel, shift):
    layer = DownShiftedConv2d(2, 3, kernel, shift_output_down=shift)
    H, W = 7, 8
    r, c = _grid(H, W)
    kh, kw = kernel
    half = (kw - 1) // 2
    for i, j in [(0, 0), (3, 4), (6, 7), (5, 0)]:
        dep = _dependence(layer, (2, H, W), (i, j))
        last = i - 1 if shift else i
        want = (r <= last) & (r > last - kh) & ((c - j).abs() <= half)
        assert torch.equal(dep, want), (kernel, shift, (i, j))


@pytest.mark.parametrize("kernel", [(2, 2), (2, 1), (3, 3)])
@pytest.mark.parametrize("shift", [False, True])
def test_down_right_shifted_sees_above_and_left_only(kernel, shift):
    layer = DownRightShiftedConv2d(2, 3, kernel, shift_output_right=shift)
    H, W = 6, 7
    r, c = _grid(H, W)
    kh, kw = kernel
    for i, j in [(0, 0), (2, 3), (5, 6), (4, 0)]:
        dep = _dependence(layer, (2, H, W), (i, j))
        last = j - 1 if shift else j
        want = (r <= i) & (r > i - kh) & (c <= last) & (c > last - kw)
        assert torch.equal(dep, want), (kernel, shift, (i, j))


def test_strided_convs_halve_any_size_and_read_their_rows():
    for H, W in [(8, 8), (7, 5), (1, 1), (2, 3)]:
        x = torch.randn(2, 3, H, W)
        for layer in (DownShiftedConv2d(3, 4, (2, 3), stride=2), DownRightShiftedConv2d(3, 4, (2, 2), stride=2)):
            assert layer(x).shape == (2, 4, (H + 1) // 2, (W + 1) // 2)
    layer = DownShiftedConv2d(2, 2, (2, 3), stride=2)
    r, c = _grid(8, 8)
    dep = _dependence(layer, (2, 8, 8), (2, 1))
    assert torch.equal(dep, (r >= 3) & (r <= 4) & (c >= 1) & (c <= 3))


def test_transposed_read_the_half_position_only():
    H, W, h, w = 8, 10, 4, 5
    r, c = _grid(h, w)
    up = DownShiftedConvTranspose2d(2, 3)
    upr = DownRightShiftedConvTranspose2d(2, 3)
    for R, C in [(0, 0), (3, 4), (7, 9), (6, 1)]:
        dep = _dependence(up, (2, h, w), (R, C))
        assert bool(dep.any()) and not bool((dep & (r != R // 2)).any()), (R, C)
        assert torch.equal(_dependence(upr, (2, h, w), (R, C)), (r == R // 2) & (c == C // 2)), (R, C)
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    assert up(x).shape == (1, 3, H, W) and upr(x).shape == (1, 3, H, W)
    assert up(x, (7, 9)).shape == (1, 3, 7, 9) and upr(x, (7, 9)).shape == (1, 3, 7, 9)
    torch.testing.assert_close(up(x, (7, 9)), up(x)[:, :, :7, :9])
    with pytest.raises(ValueError, match="output_size"):
        upr(x, (9, 10))


def test_weight_norm_is_per_output_channel():
    torch.manual_seed(0)
    for layer, out_dim in ((DownShiftedConv2d(3, 4), 0), (DownRightShiftedConvTranspose2d(3, 4), 1), (NIN(3, 4), 0)):
        with torch.no_grad():
            layer.weight_g.uniform_(0.5, 2.0)
        w = layer.weight
        dims = [d for d in range(w.dim()) if d != out_dim]
        torch.testing.assert_close(w.pow(2).sum(dims).sqrt(), layer.weight_g.detach())
        assert layer.weight_g.shape == (4,)
        # gradients reach g and v
        layer.weight.sum().backward()
        assert layer.weight_g.grad is not None and layer.weight_v.grad is not None


def test_nin_is_a_1x1_linear_layer():
    layer = NIN(5, 3)
    x = torch.randn(2, 5, 4, 6)
    want = torch.einsum("oc,nchw->nohw", layer.weight, x) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), want)


def test_concat_elu():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(concat_elu(x), torch.cat([F.elu(x), F.elu(-x)], 1))
    assert torch.equal(concat_elu(torch.zeros(1, 2, 1, 1)), torch.zeros(1, 4, 1, 1))


@pytest.mark.parametrize("conv", ["down", "down_right"])
def test_gated_resnet_causality_and_skip(conv):
    torch.manual_seed(0)
    block = GatedResnet(3, conv, skip_channels=2, num_classes=4).double().eval()
    H, W = 6, 6
    r, c = _grid(H, W)
    a = torch.randn(1, 2, H, W, dtype=torch.float64, requires_grad=True)
    cond = torch.tensor([2])
    for i, j in [(3, 3), (5, 0), (0, 5)]:
        dep = _dependence(block, (3, H, W), (i, j), a=a.detach(), cond=cond)
        if conv == "down":
            want = (r <= i) & (r >= i - 2) & ((c - j).abs() <= 2)
        else:
            want = (r <= i) & (r >= i - 2) & (c <= j) & (c >= j - 2)
        assert torch.equal(dep, want), (conv, (i, j))
    # the skip input enters after the first convolution: read over the second one's window only
    x = torch.randn(1, 3, H, W, dtype=torch.float64)
    block(x, a=a, cond=cond)[0, :, 3, 4].sum().backward()
    lo, hi = (3, 5) if conv == "down" else (3, 4)
    assert torch.equal(a.grad[0].abs().sum(0) > 0, (r >= 2) & (r <= 3) & (c >= lo) & (c <= hi))
    # the class changes the output
    assert not torch.equal(block(x, a=a.detach(), cond=torch.tensor([0])), block(x, a=a.detach(), cond=cond))


def test_gated_resnet_dropout_kinds():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    el = GatedResnet(8, dropout=0.5).train()
    ch = GatedResnet(8, dropout=0.5, channel_dropout=True).train()
    assert isinstance(el.drop, torch.nn.Dropout) and isinstance(ch.drop, torch.nn.Dropout2d)
    assert el(x).shape == ch(x).shape == x.shape
    # eval mode: no dropout, deterministic
    el.eval()
    assert torch.equal(el(x), el(x))


def test_bad_input():
    with pytest.raises(ValueError, match="odd"):
        DownShiftedConv2d(2, 2, (2, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        DownRightShiftedConv2d(2, 2, (0, 2))
    with pytest.raises(ValueError, match="in_channels"):
        DownShiftedConv2d(0, 2)
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        DownShiftedConv2d(2, 2)(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        DownRightShiftedConvTranspose2d(2, 2)(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="conv"):
        GatedResnet(4, conv="up")
    with pytest.raises(ValueError, match="dropout"):
        GatedResnet(4, dropout=1.0)
    with pytest.raises(ValueError, match="skip input"):
        GatedResnet(4, skip_channels=2)(torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="no skip input"):
        GatedResnet(4)(torch.zeros(1, 4, 3, 3), a=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="class-conditional"):
        GatedResnet(4, num_classes=3)(torch.zeros(1, 4, 3, 3))
