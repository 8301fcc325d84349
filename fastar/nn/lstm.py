"""PixelRNN's recurrent layers: :class:`RowLSTM`, :class:`DiagonalLSTM`, :class:`DiagonalBiLSTM`.

Each takes an image-shaped map x (N, in_channels, H, W) and returns the hidden map
(N, hidden, H, W). The input-to-state part is a masked convolution of x to 4 * hidden gate
pre-activations (gates [i | f | o | g], :func:`fastar.ops.masked_conv2d`); the state-to-state
recurrence is a scan op (:mod:`fastar.ops.lstm_scan`).

Colour groups. With ``color_groups=3`` the hidden units are R | G | B blocks (hidden divisible
by 3) and every gate block carries that split, so the mask-B input-to-state convolution lets a
hidden unit of group g see, at the current position, only input groups <= g. The state-to-state
convolutions need no mask: they read states at earlier positions only, whose pixels are complete.

Context (which input positions reach the output at (i, j); ``tests/nn/test_lstm.py`` checks each
by gradients):

- :class:`DiagonalLSTM`: every (i', j') with i' <= i and j' <= j (the states above and to the left).
- :class:`DiagonalBiLSTM`: a second Diagonal LSTM runs right to left on the horizontally flipped
  *image* (not on the flipped skewed map, which would see a different, partly missing context),
  and its output is shifted down one row before the two are added: (i, j) sees every position of
  the rows above and the current row up to j, the whole causal past.
- :class:`RowLSTM`: the 1 x k input-to-state conv covers (i, j - k//2 .. j); the width-s state
  convolution over the previous row widens the context by s//2 columns on each side per row up, a
  triangle: exactly the (i', j') with i' <= i and j - (i - i') * (s//2) - k//2 <= j' <= j + (i - i') * (s//2).
  Pixels above outside the triangle are not seen (PixelRNN's Row LSTM has this triangular context).

The mask-B input-to-state convolution includes the current position (its own colour group and
earlier ones); a network puts a mask-A layer first (see :class:`fastar.models.PixelRNN`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar import masks
from fastar.ops.lstm_scan import diagonal_lstm_scan, row_lstm_scan
from fastar.ops.masked_conv import masked_conv2d

__all__ = ["RowLSTM", "DiagonalLSTM", "DiagonalBiLSTM", "gate_mask"]


def gate_mask(hidden: int, in_channels: int, kernel_size, color_groups: int = 1, mask_type: str = "B"):
    """The causal mask of an input-to-state convolution to 4 * hidden gates, (4 hidden, in, kH, kW):
    the colour-group mask of ``hidden`` outputs stacked once per gate, so each gate block has its
    own R | G | B split (one built for 4 * hidden channels would put the groups across the gates)."""
    m = masks.causal_mask(mask_type, hidden, in_channels, kernel_size, color_groups)
    return torch.cat([m] * 4, 0)


def _check(name, in_channels, hidden, color_groups):
    for k, v in (("in_channels", in_channels), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")
    if color_groups not in (1, 3):
        raise ValueError(f"{name}: color_groups must be 1 or 3, got {color_groups!r}")
    if color_groups == 3 and (hidden % 3 or in_channels % 3):
        raise ValueError(f"{name}: with color_groups=3, in_channels and hidden must be divisible by 3 "
                         f"(R, G, B blocks), got {in_channels} and {hidden}")


class _LSTMBase(nn.Module):
    def __init__(self, name, in_channels, hidden, kernel, ss_taps, color_groups, device, dtype):
        super().__init__()
        _check(name, in_channels, hidden, color_groups)
        self.in_channels, self.hidden, self.color_groups = in_channels, hidden, color_groups
        kh, kw = kernel
        self.is_weight = nn.Parameter(torch.empty(4 * hidden, in_channels, kh, kw, device=device, dtype=dtype))
        self.is_bias = nn.Parameter(torch.zeros(4 * hidden, device=device, dtype=dtype))
        self.ss_weight = nn.Parameter(torch.empty(4 * hidden, hidden, ss_taps, device=device, dtype=dtype))
        self.register_buffer("is_mask", gate_mask(hidden, in_channels, kernel, color_groups).to(
            device=self.is_weight.device, dtype=self.is_weight.dtype), persistent=False)
        self.padding = (kh // 2, kw // 2)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.is_weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.hidden * self.ss_weight.shape[2])
        nn.init.uniform_(self.ss_weight, -bound, bound)
        with torch.no_grad():
            self.is_bias.zero_()
            self.is_bias[self.hidden:2 * self.hidden] = 1.0     # forget gates start open

    def input_to_state(self, x):
        """(N, 4 hidden, H, W): the masked input-to-state convolution of x."""
        return masked_conv2d(x, self.is_weight, self.is_bias, self.is_mask, self.padding)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must be (N, {self.in_channels}, H, W), got shape "
                             f"{list(getattr(x, 'shape', []))}")

    def extra_repr(self):
        return f"{self.in_channels}, hidden={self.hidden}, color_groups={self.color_groups}"


class RowLSTM(_LSTMBase):
    """Row LSTM (PixelRNN section 3.1): ``RowLSTM(in_channels, hidden, kernel_size=3, color_groups=1)``.

    Input-to-state: a 1 x kernel_size mask-B convolution (the current row's left part and the
    current position); state-to-state: a width-3 convolution over the previous row's states
    (:func:`fastar.ops.row_lstm_scan`). forward(x (N, in, H, W)) -> h (N, hidden, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3, color_groups: int = 1,
                 state_kernel_size: int = 3, device=None, dtype=None):
        for k, v in (("kernel_size", kernel_size), ("state_kernel_size", state_kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise ValueError(f"RowLSTM: {k} must be an odd positive int, got {v!r}")
        super().__init__("RowLSTM", in_channels, hidden, (1, kernel_size), state_kernel_size, color_groups,
                         device, dtype)

    def forward(self, x):
        self._check_input(x)
        h, _ = row_lstm_scan(self.input_to_state(x), self.ss_weight, None)
        return h


class DiagonalLSTM(_LSTMBase):
    """Diagonal LSTM (PixelRNN section 3.2), one direction: ``DiagonalLSTM(in_channels, hidden,
    color_groups=1)``. Input-to-state: a 1x1 mask-B convolution; state-to-state: the 2x1 column
    convolution of the skewed map, i.e. the states above and to the left
    (:func:`fastar.ops.diagonal_lstm_scan`). forward(x) -> h (N, hidden, H, W): position (i, j)
    sees the inputs above and to the left of it, itself included (mask B).
    """

    def __init__(self, in_channels: int, hidden: int, color_groups: int = 1, device=None, dtype=None):
        super().__init__("DiagonalLSTM", in_channels, hidden, (1, 1), 2, color_groups, device, dtype)

    def forward(self, x):
        self._check_input(x)
        h, _ = diagonal_lstm_scan(self.input_to_state(x), self.ss_weight, None)
        return h


class DiagonalBiLSTM(nn.Module):
    """Diagonal BiLSTM (PixelRNN section 3.2): ``DiagonalBiLSTM(in_channels, hidden, color_groups=1)``.

    ``forward(x) = l2r(x) + shift_down(flip(r2l(flip(x))))``: a left-to-right
    :class:`DiagonalLSTM`, and a second one run on the horizontally flipped image, flipped back
    and shifted down one row (so no position sees the right part of its own row). Output
    (N, hidden, H, W); (i, j) sees every earlier position of the raster order, itself included
    through the mask-B input-to-state convolution.

    ``forward(x, r2l_extra)``: ``r2l_extra`` (N, 4 hidden, H, W), or None, is added to the
    right-to-left direction's input-to-state map. Its output reaches row i + 1 only, so it may
    depend on anything in rows <= i; :class:`fastar.models.PixelRNN` passes the image itself there,
    the only way the last pixel of a row reaches the left part of the next row (see its docstring).
    """

    def __init__(self, in_channels: int, hidden: int, color_groups: int = 1, device=None, dtype=None):
        super().__init__()
        self.forward_lstm = DiagonalLSTM(in_channels, hidden, color_groups, device=device, dtype=dtype)
        self.backward_lstm = DiagonalLSTM(in_channels, hidden, color_groups, device=device, dtype=dtype)
        self.in_channels, self.hidden, self.color_groups = in_channels, hidden, color_groups

    def forward(self, x, r2l_extra=None):
        self.forward_lstm._check_input(x)
        left = self.forward_lstm(x)
        r = self.backward_lstm
        is_r = r.input_to_state(x)
        if r2l_extra is not None:
            if r2l_extra.shape != is_r.shape:
                raise ValueError(f"DiagonalBiLSTM: r2l_extra must be (N, 4 * hidden, H, W) = {list(is_r.shape)}, "
                                 f"got {list(r2l_extra.shape)}")
            is_r = is_r + r2l_extra
        right, _ = diagonal_lstm_scan(is_r.flip(3), r.ss_weight, None)
        return left + F.pad(right.flip(3), (0, 0, 1, 0))[:, :, :-1]
