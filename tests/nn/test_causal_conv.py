"""CausalConv1d: a drop-in nn.Conv1d (state_dicts move across), causal, its ring-buffer step equal to the
forward, torch.compile, bad arguments."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastar.nn import CausalConv1d




def test_causal_conv1d_state_dict_roundtrip_with_conv1d():
    ref = nn.Conv1d(4, 6, 3, dilation=2)
    layer = CausalConv1d(4, 6, 3, dilation=2)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 15)
    out = layer(x)
    assert out.shape == (2, 6, 15)
    # left padding only: the last 11 outputs equal the unpadded conv
    torch.testing.assert_close(out[:, :, 4:], ref(x))
    back = nn.Conv1d(4, 6, 3, dilation=2)
    back.load_state_dict(layer.state_dict())


def test_causal_conv1d_is_causal():
    layer = CausalConv1d(3, 3, 2, dilation=4).double()
    x = torch.randn(1, 3, 20, dtype=torch.float64, requires_grad=True)
    t = 9
    layer(x)[0, :, t].sum().backward()
    dep = x.grad[0].abs().sum(0) > 0
    assert not dep[t + 1:].any(), "output depends on the future"
    assert dep[t] and dep[t - 4], "output misses its own taps"


def test_causal_conv1d_step_matches_forward(device):
    layer = CausalConv1d(5, 7, 3, dilation=3).to(device).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, device=device)
    full = layer(x)
    state = layer.new_state(2)
    with torch.no_grad():
        for t in range(16):
            torch.testing.assert_close(layer.step(x[:, :, t], state, t), full[:, :, t])


def test_causal_conv1d_compiles():
    layer = CausalConv1d(4, 4, 2, dilation=2)
    x = torch.randn(2, 4, 10)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_causal_conv1d_bad_input():
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        CausalConv1d(2, 2, 2, dilation=0)
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        CausalConv1d(2, 2, (2,))
    with pytest.raises(ValueError, match="must be 3-D"):
        CausalConv1d(2, 2, 2)(torch.randn(2, 5))
