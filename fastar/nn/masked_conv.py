from __future__ import annotations

import torch
from torch import nn

from fastar import masks
from fastar.ops.masked_conv import masked_conv2d

__all__ = ["MaskedConv2d"]


class MaskedConv2d(nn.Conv2d):
    """PixelCNN masked convolution, a drop-in for ``nn.Conv2d`` with a causal mask.

    ``MaskedConv2d(in_channels, out_channels, kernel_size, mask_type="A"|"B",
    color_groups=1, bias=True, dilation=1)`` computes
    ``F.conv2d(x, weight * mask, bias, padding=dilation*(k-1)//2, dilation=dilation)``
    on x of shape (N, in_channels, H, W), returning (N, out_channels, H, W); the
    fully masked taps cost nothing on the kernel backend.

    It *is* an ``nn.Conv2d`` (same ``weight``/``bias`` parameters and initialisation),
    so state_dicts move across. The mask (see :mod:`fastar.masks` for the colour
    channel order) is a non-persistent buffer; a state_dict that carries a ``mask``
    entry of the right shape, as plain conv-with-mask implementations save, loads
    into it. Kernel size must be odd; with ``color_groups=3`` both channel counts
    must be divisible by 3. Devices/dtypes: those of :func:`fastar.ops.masked_conv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str = "B",
                 color_groups: int = 1, bias: bool = True, dilation: int = 1, device=None, dtype=None):
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
            raise TypeError(f"MaskedConv2d: kernel_size must be an odd int, got {kernel_size!r}")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"MaskedConv2d: dilation must be a positive int, got {dilation!r}")
        mask = masks.causal_mask(mask_type, out_channels, in_channels, kernel_size, color_groups)
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        self.mask_type = mask_type
        self.color_groups = color_groups
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=self.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_conv2d(x, self.weight, self.bias, self.mask, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask_type={self.mask_type!r}, color_groups={self.color_groups}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "mask"
        if key in state_dict:
            loaded = state_dict.pop(key)
            if loaded.shape != self.mask.shape:
                error_msgs.append(f"size mismatch for {key}: copying a mask of shape {list(loaded.shape)}, "
                                  f"the mask in this MaskedConv2d has shape {list(self.mask.shape)}")
            else:
                with torch.no_grad():
                    self.mask.copy_(loaded)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
