"""Gated PixelCNN block: :class:`GatedMaskedConv2d` (vertical + horizontal stacks) and ``shift_down``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastar import masks
from fastar.ops.masked_conv import masked_conv2d

__all__ = ["GatedMaskedConv2d", "shift_down"]


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W) moved down one row, zeros in row 0: ``F.pad(x, (0, 0, 1, 0))[:, :, :-1]``."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _two_halves(m: torch.Tensor) -> torch.Tensor:
    # The pre-activation has 2C channels split as [tanh half | sigmoid half];
    # each half carries the R|G|B blocks on its own, so the mask is stacked
    # twice rather than built for 2C channels (which would put R, G, B blocks
    # across the split).
    return torch.cat([m, m], 0)


class GatedMaskedConv2d(nn.Module):
    """Gated PixelCNN block (van den Oord et al. 2016): vertical + horizontal stacks, no blind spot.

    ``GatedMaskedConv2d(in_channels, channels, kernel_size=3, mask_type="B", color_groups=1,
    num_classes=None, cond_channels=None, residual=None)``; ``forward(v, h, cond=None)`` takes the
    vertical and horizontal stack inputs v, h of shape (N, in_channels, H, W) (the image for the
    first block) and returns ``(v_out, h_out, skip)``, each (N, channels, H, W)::

        vp    = conv_kxk(v, vertical_mask)                      # rows above *and* the current row
        v_out = tanh(vp[:C] + cv) * sigmoid(vp[C:] + cv')        # cv: conditioning (class bias, map)
        hp    = conv_1xk(h, horizontal_mask A|B) + link_1x1(shift_down(vp)) + ch
        g     = tanh(hp[:C]) * sigmoid(hp[C:])
        skip  = skip_1x1(g);   h_out = out_1x1(g) + h (residual, when in_channels == channels)

    ``shift_down`` moves the vertical pre-activation one row down, so the horizontal stack sees
    only rows strictly above plus the current row's left part: the receptive field is the whole
    causal past (no blind spot). With ``color_groups=3`` the channels are R|G|B blocks (see
    :mod:`fastar.masks`); the horizontal conv (mask A in the first block, B after) and the 1x1
    convs carry the colour masks, the vertical stack needs none (after the shift it only sees
    whole rows above). Conditioning: ``cond`` is class labels (N,) int64 when ``num_classes`` is
    set (an embedding gives a per-block bias), a spatial map (N, cond_channels, H, W) when
    ``cond_channels`` is set (a 1x1 conv gives a per-location bias), or a tuple (labels, map)
    with both. Devices/dtypes: those of :func:`fastar.ops.masked_conv2d`.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, mask_type: str = "B",
                 color_groups: int = 1, num_classes: int | None = None, cond_channels: int | None = None,
                 residual: bool | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GatedMaskedConv2d: kernel_size must be an odd positive int, got {kernel_size!r}")
        if residual is None:
            residual = in_channels == channels
        if residual and in_channels != channels:
            raise ValueError(f"GatedMaskedConv2d: residual needs in_channels == channels, got {in_channels} and "
                             f"{channels}")
        fk = dict(device=device, dtype=dtype)
        k = kernel_size
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, k
        self.mask_type, self.color_groups, self.residual = mask_type, color_groups, residual
        self.num_classes, self.cond_channels = num_classes, cond_channels
        c2 = 2 * channels
        self.v_conv = nn.Conv2d(in_channels, c2, k, padding=k // 2, **fk)
        self.h_conv = nn.Conv2d(in_channels, c2, (1, k), padding=(0, k // 2), **fk)
        self.link = nn.Conv2d(c2, c2, 1, **fk)
        self.skip = nn.Conv2d(channels, channels, 1, **fk)
        self.out = nn.Conv2d(channels, channels, 1, **fk)
        self.register_buffer("v_mask", masks.vertical_mask(c2, in_channels, k), persistent=False)
        self.register_buffer("h_mask", _two_halves(masks.horizontal_mask(channels, in_channels, k, mask_type,
                                                                         color_groups)), persistent=False)
        self.register_buffer("skip_mask", masks.mask_b(channels, channels, 1, color_groups), persistent=False)
        self.register_buffer("out_mask", masks.mask_b(channels, channels, 1, color_groups), persistent=False)
        self.class_v = nn.Embedding(num_classes, c2, **fk) if num_classes else None
        self.class_h = nn.Embedding(num_classes, c2, **fk) if num_classes else None
        self.map_v = nn.Conv2d(cond_channels, c2, 1, bias=False, **fk) if cond_channels else None
        self.map_h = nn.Conv2d(cond_channels, c2, 1, bias=False, **fk) if cond_channels else None
        if num_classes:
            nn.init.normal_(self.class_v.weight, std=0.02)
            nn.init.normal_(self.class_h.weight, std=0.02)
        for buf in ("v_mask", "h_mask", "skip_mask", "out_mask"):
            setattr(self, buf, getattr(self, buf).to(self.v_conv.weight))

    # -- conditioning -------------------------------------------------------------------------
    def split_cond(self, cond):
        """(labels or None, map or None) from ``cond``, checked against this block's conditioning."""
        labels = cmap = None
        if cond is None:
            if self.num_classes or self.cond_channels:
                raise ValueError("GatedMaskedConv2d: this block is conditional (num_classes="
                                 f"{self.num_classes}, cond_channels={self.cond_channels}); pass cond")
            return None, None
        if self.num_classes and self.cond_channels:
            if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
                raise ValueError("GatedMaskedConv2d: with both num_classes and cond_channels, cond must be a "
                                 "tuple (labels (N,), map (N, cond_channels, H, W))")
            labels, cmap = cond
        elif self.num_classes:
            labels = cond
        elif self.cond_channels:
            cmap = cond
        else:
            raise ValueError("GatedMaskedConv2d: cond given, but this block was built with neither num_classes "
                             "nor cond_channels")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() != 1
                                   or labels.dtype != torch.int64):
            raise ValueError(f"GatedMaskedConv2d: class labels must be an int64 tensor (N,), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} of shape "
                             f"{list(getattr(labels, 'shape', []))}")
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"GatedMaskedConv2d: class labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if cmap is not None and (not isinstance(cmap, torch.Tensor) or cmap.dim() != 4
                                 or cmap.shape[1] != self.cond_channels or not cmap.is_floating_point()):
            raise ValueError(f"GatedMaskedConv2d: the conditioning map must be a float tensor (N, {self.cond_channels}, "
                             f"H, W), got {getattr(cmap, 'dtype', type(cmap).__name__)} of shape "
                             f"{list(getattr(cmap, 'shape', []))}")
        return labels, cmap

    def cond_terms(self, cond):
        """Per-block conditioning biases: (class_v, class_h) each (N, 2C) or None, (map_v, map_h) each
        (N, 2C, H, W) or None. They do not depend on the image, so a sampler computes them once."""
        labels, cmap = self.split_cond(cond)
        cv = ch = mv = mh = None
        if labels is not None:
            cv, ch = self.class_v(labels), self.class_h(labels)
        if cmap is not None:
            mv, mh = self.map_v(cmap), self.map_h(cmap)
        return cv, ch, mv, mh

    @staticmethod
    def gate(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        a, b = x.chunk(2, dim)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond=None):
        cv, ch, mv, mh = self.cond_terms(cond)
        if cv is not None and cv.shape[0] != v.shape[0]:
            raise ValueError(f"GatedMaskedConv2d: {cv.shape[0]} class labels for a batch of {v.shape[0]} images")
        if mv is not None and (mv.shape[0] != v.shape[0] or mv.shape[2:] != v.shape[2:]):
            raise ValueError(f"GatedMaskedConv2d: the conditioning map must be ({v.shape[0]}, {self.cond_channels}, "
                             f"{v.shape[2]}, {v.shape[3]}) like the images, got {list(mv.shape[:1]) + [self.cond_channels] + list(mv.shape[2:])}")
        vp = masked_conv2d(v, self.v_conv.weight, self.v_conv.bias, self.v_mask, self.v_conv.padding)
        va = vp
        hp = masked_conv2d(h, self.h_conv.weight, self.h_conv.bias, self.h_mask, self.h_conv.padding)
        hp = hp + self.link(shift_down(vp))
        if cv is not None:
            va = va + cv[:, :, None, None]
            hp = hp + ch[:, :, None, None]
        if mv is not None:
            va = va + mv
            hp = hp + mh
        v_out = self.gate(va)
        g = self.gate(hp)
        skip = F.conv2d(g, self.skip.weight * self.skip_mask, self.skip.bias)
        h_out = F.conv2d(g, self.out.weight * self.out_mask, self.out.bias)
        if self.residual:
            h_out = h_out + h
        return v_out, h_out, skip

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.channels}, kernel_size={self.kernel_size}, mask_type={self.mask_type!r}, "
                f"color_groups={self.color_groups}, residual={self.residual}, num_classes={self.num_classes}, "
                f"cond_channels={self.cond_channels}")
