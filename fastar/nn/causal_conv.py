from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastar.ops.wavenet import causal_conv1d_update

__all__ = ["CausalConv1d"]


class CausalConv1d(nn.Conv1d):
    """Left-padded (causal) dilated 1-D convolution, a drop-in ``nn.Conv1d``.

    ``CausalConv1d(in_channels, out_channels, kernel_size, dilation=1, bias=True)`` maps
    x (B, in_channels, T) to (B, out_channels, T) with output t depending on inputs
    ``t - (k-1)*dilation .. t`` only: ``F.conv1d(F.pad(x, ((k-1)*dilation, 0)), weight, bias,
    dilation=dilation)``. It *is* an ``nn.Conv1d`` (padding 0, same ``weight`` (out, in, k)
    and ``bias`` parameters), so state_dicts move across. ``step(x_t, state, position)``
    runs one decoding step on a ring-buffer ``state`` of shape (B, in_channels,
    (k-1)*dilation) (see :func:`fastar.ops.causal_conv1d_update`); ``new_state(batch)``
    allocates it. Any device and floating dtype (the step kernel: float32/float64).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, bias: bool = True,
                 device=None, dtype=None):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"CausalConv1d: kernel_size must be a positive int, got {kernel_size!r}")
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"CausalConv1d: dilation must be a positive int, got {dilation!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=dilation, bias=bias,
                         device=device, dtype=dtype)

    @property
    def context(self) -> int:
        """How many past inputs the layer sees: (kernel_size - 1) * dilation."""
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"CausalConv1d: x must be 3-D (B, C, T), got shape {list(x.shape)}")
        return F.conv1d(F.pad(x, (self.context, 0)), self.weight, self.bias, dilation=self.dilation)

    def new_state(self, batch_size: int) -> torch.Tensor:
        return self.weight.new_zeros(batch_size, self.in_channels, self.context)

    def step(self, x_t: torch.Tensor, state: torch.Tensor, position) -> torch.Tensor:
        """x_t (B, in_channels) at time `position` -> (B, out_channels); updates `state` in place."""
        return causal_conv1d_update(x_t, state, self.weight, self.bias, self.dilation[0], position)
