"""``MaskedLinear``: an ``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask (MADE's layers).

Same parameters (``weight`` (out, in), ``bias``) and state_dict as ``nn.Linear`` (the mask is a
non-persistent buffer, so an ``nn.Linear`` state_dict loads as it is and a MaskedLinear's loads into
an ``nn.Linear``); ``set_mask(mask)`` replaces the mask. The forward is one plain matmul on
``weight * mask``: the mask multiply costs one elementwise pass over the weight per call (its cost
beside folding the mask into the weight once per mask change is measured by ``fastar bench made``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskedLinear"]


class MaskedLinear(nn.Linear):
    """``MaskedLinear(in_features, out_features, bias=True)``: ``y = x @ (weight * mask).T + bias``.

    The mask starts all ones (a plain linear layer). Devices and dtypes: any (the mask follows the
    module's ``.to``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, device=device,
                                                dtype=self.weight.dtype), persistent=False)

    def set_mask(self, mask) -> None:
        """Use ``mask`` (out_features, in_features), any values that are 0 or 1 (bool, int or float)."""
        m = torch.as_tensor(mask)
        if tuple(m.shape) != tuple(self.weight.shape):
            raise ValueError(f"MaskedLinear.set_mask: mask must have shape {list(self.weight.shape)} "
                             f"(out_features, in_features), got {list(m.shape)}")
        if m.numel() and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("MaskedLinear.set_mask: mask must hold only 0 and 1")
        self.mask.copy_(m.to(self.mask.dtype))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)
