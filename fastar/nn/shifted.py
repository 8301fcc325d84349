"""PixelCNN++'s building blocks (Salimans et al. 2017): shifted convolutions, their transposed forms,
the network-in-network 1x1 layer and the gated resnet block with concat_elu. Drop-in layers for
people who assemble their own PixelCNN++-like networks.

Causality (image rows top to bottom, columns left to right):

- :class:`DownShiftedConv2d` ``(kh, kw)`` (default (2, 3)): output (i, j) reads input rows
  ``i - kh + 1 .. i`` and columns ``j - (kw - 1) // 2 .. j + (kw - 1) // 2`` (zero-padded), so it
  depends on rows <= i only; with ``shift_output_down=True`` on rows < i (the "u" stream: the pixels
  strictly above). Stride 2 halves the map (output (i, j) reads rows ``2i - kh + 1 .. 2i``).
- :class:`DownRightShiftedConv2d` ``(kh, kw)`` (default (2, 2)): output (i, j) reads rows
  ``i - kh + 1 .. i`` and columns ``j - kw + 1 .. j``; with ``shift_output_right=True`` columns < j
  (the "ul" stream: the pixels above and to the left).
- The transposed forms (stride 2) up-sample: output row R of :class:`DownShiftedConvTranspose2d`
  reads input row ``R // 2`` only, output (R, C) of :class:`DownRightShiftedConvTranspose2d` reads
  input (R // 2, C // 2) only; their output is cropped to ``output_size`` (default twice the input),
  so maps of any size, odd ones included, go down and back up.

Every weight is weight-normalised as in the paper (``weight = g * v / ||v||``, parameters
``weight_v``, ``weight_g`` (out,) and ``bias``), with the norm taken per *output* channel for every
layer, the transposed ones included (openai/pixel-cnn's rule; pclucas14/pixel-cnn-pp normalises its
transposed convolutions per input channel: :meth:`fastar.models.PixelCNNpp.from_pclucas14` converts).
``weight`` is the effective weight. Any device and floating dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["concat_elu", "WeightNormConv2d", "DownShiftedConv2d", "DownRightShiftedConv2d",
           "DownShiftedConvTranspose2d", "DownRightShiftedConvTranspose2d", "NIN", "GatedResnet"]


def concat_elu(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``elu(cat(x, -x))`` along ``dim``: twice the channels, and 0 maps to 0 (so zero padding commutes)."""
    return F.elu(torch.cat([x, -x], dim))


def _pair(v, name, what):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in v)):
        raise ValueError(f"{name}: {what} must be a positive int or a pair of them, got {v!r}")
    return tuple(v)


def _positive(name, what, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
    return v


class _WeightNormed(nn.Module):
    """A weight ``g * v / ||v||`` normalised per output channel (dimension ``out_dim`` of the weight)."""

    out_dim = 0

    def _init_weight(self, shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        v = torch.empty(shape).uniform_(-bound, bound)        # nn.Conv2d's default range
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(self._norm(v))
        self.bias = nn.Parameter(torch.empty(shape[self.out_dim]).uniform_(-bound, bound))

    def _norm(self, v):
        dims = [d for d in range(v.dim()) if d != self.out_dim]
        return v.detach().pow(2).sum(dims).sqrt()

    @property
    def weight(self) -> torch.Tensor:
        """The effective (normalised) weight."""
        v = self.weight_v
        dims = [d for d in range(v.dim()) if d != self.out_dim]
        shape = [1] * v.dim()
        shape[self.out_dim] = -1
        return v * (self.weight_g / v.pow(2).sum(dims).sqrt()).view(shape)

    def _conv_args(self, in_channels, out_channels, kernel_size, stride):
        """Check and keep the constructor's sizes (every layer here takes the same four)."""
        name = type(self).__name__
        self.in_channels = _positive(name, "in_channels", in_channels)
        self.out_channels = _positive(name, "out_channels", out_channels)
        self.kernel_size = _pair(kernel_size, name, "kernel_size")
        self.stride = _pair(stride, name, "stride")
        return self.kernel_size

    def _check_input(self, x, channels):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__}: x must be a map (N, {channels}, H, W), got shape "
                             f"{list(getattr(x, 'shape', []))}")


class WeightNormConv2d(_WeightNormed):
    """A plain weight-normalised 2-D convolution (no padding): the parent of the shifted ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 3), stride=1):
        super().__init__()
        kh, kw = self._conv_args(in_channels, out_channels, kernel_size, stride)
        self._init_weight((out_channels, in_channels, kh, kw), in_channels * kh * kw)

    def padding(self):
        """(left, right, top, bottom) zero padding before the convolution."""
        return (0, 0, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.in_channels)
        return F.conv2d(F.pad(x, self.padding()), self.weight, self.bias, self.stride)


class DownShiftedConv2d(WeightNormConv2d):
    """``DownShiftedConv2d(in_channels, out_channels, kernel_size=(2, 3), stride=1,
    shift_output_down=False)``: output (i, j) sees input rows <= i (< i when shifted down), columns
    ``j - (kw-1)//2 .. j + (kw-1)//2``; kw must be odd."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 3), stride=1,
                 shift_output_down: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        if self.kernel_size[1] % 2 == 0:
            raise ValueError(f"DownShiftedConv2d: the kernel width must be odd (centred on the column), got "
                             f"{self.kernel_size}")
        self.shift_output_down = bool(shift_output_down)

    @property
    def left(self) -> int:
        """Columns to the left of the output column that the kernel reads."""
        return (self.kernel_size[1] - 1) // 2

    def padding(self):
        kh, kw = self.kernel_size
        return (self.left, self.left, kh - 1, 0)

    def forward(self, x):
        out = super().forward(x)
        return F.pad(out[:, :, :-1], (0, 0, 1, 0)) if self.shift_output_down else out


class DownRightShiftedConv2d(WeightNormConv2d):
    """``DownRightShiftedConv2d(in_channels, out_channels, kernel_size=(2, 2), stride=1,
    shift_output_right=False)``: output (i, j) sees rows <= i and columns <= j (< j when shifted right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 2), stride=1,
                 shift_output_right: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.shift_output_right = bool(shift_output_right)

    @property
    def left(self) -> int:
        return self.kernel_size[1] - 1

    def padding(self):
        kh, kw = self.kernel_size
        return (kw - 1, 0, kh - 1, 0)

    def forward(self, x):
        out = super().forward(x)
        return F.pad(out[..., :-1], (1, 0)) if self.shift_output_right else out


class _ShiftedConvTranspose2d(_WeightNormed):
    out_dim = 1          # a transposed convolution's weight is (in, out, kh, kw)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=2):
        super().__init__()
        kh, kw = self._conv_args(in_channels, out_channels, kernel_size, stride)
        self._init_weight((in_channels, out_channels, kh, kw), out_channels * kh * kw)

    crop_left = 0

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        """x (N, in, h, w) -> (N, out, H, W), (H, W) = ``output_size`` (default (stride h, stride w)),
        at most what the transposed convolution covers."""
        self._check_input(x, self.in_channels)
        y = F.conv_transpose2d(x, self.weight, self.bias, self.stride)
        H, W = (x.shape[2] * self.stride[0], x.shape[3] * self.stride[1]) if output_size is None else \
            tuple(output_size)[-2:]
        if H > y.shape[2] or W > y.shape[3] - self.crop_left:
            raise ValueError(f"{type(self).__name__}: output_size {(H, W)} exceeds what a {tuple(x.shape[2:])} "
                             f"input covers")
        return y[:, :, :H, self.crop_left:self.crop_left + W]


class DownShiftedConvTranspose2d(_ShiftedConvTranspose2d):
    """``DownShiftedConvTranspose2d(in_channels, out_channels, kernel_size=(2, 3), stride=2)``: the
    up-sampling of the u stream; output row R reads input row R // 2 only (columns centred)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 3), stride=2):
        k = _pair(kernel_size, type(self).__name__, "kernel_size")
        self.crop_left = (k[1] - 1) // 2
        super().__init__(in_channels, out_channels, k, stride)


class DownRightShiftedConvTranspose2d(_ShiftedConvTranspose2d):
    """``DownRightShiftedConvTranspose2d(in_channels, out_channels, kernel_size=(2, 2), stride=2)``:
    the up-sampling of the ul stream; output (R, C) reads input (R // 2, C // 2) only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 2), stride=2):
        super().__init__(in_channels, out_channels, kernel_size, stride)


class NIN(_WeightNormed):
    """Network in network: a weight-normalised 1x1 convolution over channels, weight (out, in)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = _positive("NIN", "in_channels", in_channels)
        self.out_channels = _positive("NIN", "out_channels", out_channels)
        self._init_weight((out_channels, in_channels), in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.in_channels)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class GatedResnet(nn.Module):
    """PixelCNN++'s gated resnet block.

    ``GatedResnet(channels, conv="down"|"down_right", skip_channels=0, dropout=0.0, num_classes=None,
    channel_dropout=False)``; ``forward(x, a=None, cond=None)``::

        h = conv_in(concat_elu(x)) [+ skip(concat_elu(a))]
        h = conv_out(dropout(concat_elu(h))) [+ embedding(cond)]
        return x + h[:C] * sigmoid(h[C:])

    with ``conv_in``/``conv_out`` the (2, 3) down-shifted or (2, 2) down-right-shifted convolutions,
    ``skip`` a :class:`NIN` from ``2 * skip_channels`` (a: the other stream or the U-Net shortcut,
    ``skip_channels`` channels), and an optional class embedding added before the gate. Dropout drops
    elements (the paper's code); ``channel_dropout=True`` drops whole channels (pclucas14's port).
    Its causality is its two convolutions' (``a`` enters after the first, so the output at (i, j)
    reads ``a`` over the second one's window).
    """

    def __init__(self, channels: int, conv: str = "down", skip_channels: int = 0, dropout: float = 0.0,
                 num_classes: int | None = None, channel_dropout: bool = False):
        super().__init__()
        name = "GatedResnet"
        _positive(name, "channels", channels)
        if conv not in ("down", "down_right"):
            raise ValueError(f"{name}: conv must be 'down' or 'down_right', got {conv!r}")
        if isinstance(skip_channels, bool) or not isinstance(skip_channels, int) or skip_channels < 0:
            raise ValueError(f"{name}: skip_channels must be an int >= 0, got {skip_channels!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a probability in [0, 1), got {dropout!r}")
        if num_classes is not None:
            _positive(name, "num_classes", num_classes)
        self.channels, self.conv, self.skip_channels, self.num_classes = channels, conv, skip_channels, num_classes
        Conv = DownShiftedConv2d if conv == "down" else DownRightShiftedConv2d
        self.conv_in = Conv(2 * channels, channels)
        self.skip = NIN(2 * skip_channels, channels) if skip_channels else None
        self.drop = (nn.Dropout2d if channel_dropout else nn.Dropout)(float(dropout))
        self.conv_out = Conv(2 * channels, 2 * channels)
        self.embed = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None, cond: torch.Tensor | None = None):
        h = self.conv_in(concat_elu(x))
        if self.skip is not None:
            if a is None:
                raise ValueError(f"GatedResnet: this block takes a skip input a (N, {self.skip_channels}, H, W)")
            h = h + self.skip(concat_elu(a))
        elif a is not None:
            raise ValueError("GatedResnet: this block has no skip input (skip_channels=0); a must be None")
        h = self.conv_out(self.drop(concat_elu(h)))
        if self.embed is not None:
            if cond is None:
                raise ValueError("GatedResnet: this block is class-conditional; cond must be (N,) class labels")
            h = h + self.embed(cond)[:, :, None, None].to(h.dtype)
        g, b = h.chunk(2, 1)
        return x + g * torch.sigmoid(b)
