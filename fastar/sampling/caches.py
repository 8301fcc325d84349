"""Per-layer 2-D caches of PixelCNN and Gated PixelCNN for cached sampling.

Each cache object holds, for one batch, every layer's input map (N, C, H, W) and the
image-independent conditioning terms, and offers two steps that read positions from
device tensors only (so both can be captured in a CUDA graph):

- ``pixel(pos, hw, jcol) -> logits (N, out_channels)``: run the one new position
  ``pos`` (1, 2) through every layer, writing each layer's input there in place
  (:func:`fastar.ops.masked_conv2d_at`), and return the head's logits at it;
- ``row(rowpos, row_hw)`` (Gated PixelCNN only): after row r is complete, run the
  vertical stack over the whole row r (``rowpos`` (W, 2)) and store each block's
  vertical-to-horizontal link term for row r + 1 (the shift-down of the full forward).

Why full-image caches rather than the paper's filter-tall ring buffers: positions
index them directly (no rolling at row ends, no host-side bookkeeping), and at the
sizes of this library (<= 64x64) the memory is small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar.nn.gated import GatedMaskedConv2d
from fastar.ops.masked_conv_at import masked_conv2d_at

__all__ = ["make_cache", "GatedCache", "PixelCNNCache"]


def _eff(conv, mask) -> torch.Tensor:
    # A 1x1 masked conv on one position is a matrix-vector product with weight * mask.
    return (conv.weight * mask.to(conv.weight.dtype)).flatten(1)


def _head(model):
    return (_eff(model.head1, model.head1.mask), model.head1.bias, _eff(model.head2, model.head2.mask),
            model.head2.bias)


def _apply_head(head, x):
    w1, b1, w2, b2 = head
    return F.linear(F.relu(F.linear(F.relu(x), w1, b1)), w2, b2)


class PixelCNNCache:
    """Caches of :class:`fastar.models.PixelCNN`: the image and each residual block's 3x3 input map."""

    has_rows = False

    def __init__(self, model, x_img: torch.Tensor, cond=None):
        if cond is not None:
            raise ValueError("PixelCNN is unconditional; cond must be None")
        n, _, h, w = x_img.shape
        self.x_img = x_img
        self.inp = model.input_conv
        self.blocks = []
        for blk in model.blocks:
            c2 = blk.conv2
            self.blocks.append(dict(
                w1=_eff(blk.conv1, blk.conv1.mask), b1=blk.conv1.bias, conv2=c2,
                cache=x_img.new_zeros(n, c2.in_channels, h, w),
                w3=_eff(blk.conv3, blk.conv3.mask), b3=blk.conv3.bias))
        self.head = _head(model)

    def pixel(self, pos, hw, jcol):
        c = self.inp
        h = masked_conv2d_at(self.x_img, None, c.weight, c.bias, c.mask, pos, c.padding, c.dilation).squeeze(-1)
        for b in self.blocks:
            a = F.relu(F.linear(F.relu(h), b["w1"], b["b1"]))
            c2 = b["conv2"]
            y = masked_conv2d_at(b["cache"], a.unsqueeze(-1), c2.weight, c2.bias, c2.mask, pos, c2.padding,
                                 c2.dilation).squeeze(-1)
            h = h + F.linear(F.relu(y), b["w3"], b["b3"])
        return _apply_head(self.head, h)


class GatedCache:
    """Caches of :class:`fastar.models.GatedPixelCNN`: per block, the vertical and horizontal input maps,
    the link term of the current row, and the conditioning biases."""

    has_rows = True

    def __init__(self, model, x_img: torch.Tensor, cond=None):
        n, _, h, w = x_img.shape
        self.x_img = x_img
        self.blocks = []
        for li, blk in enumerate(model.blocks):
            c2 = 2 * blk.channels
            cv, ch, mv, mh = blk.cond_terms(cond)
            if mv is not None and tuple(mv.shape[2:]) != (h, w):
                raise ValueError(f"the conditioning map must be {h}x{w} like the image, got "
                                 f"{list(mv.shape[2:])}")
            link_b = blk.link.bias if blk.link.bias is not None else x_img.new_zeros(c2)
            self.blocks.append(dict(
                blk=blk,
                v_in=x_img if li == 0 else x_img.new_zeros(n, blk.in_channels, h, w),
                h_in=x_img if li == 0 else x_img.new_zeros(n, blk.in_channels, h, w),
                # Row 0 has nothing above it: its link term is the link's bias alone.
                link_row=link_b.view(1, c2, 1).expand(n, c2, w).clone(),
                link_w=blk.link.weight.view(c2, c2, 1), link_b=link_b,
                cv=None if cv is None else cv.unsqueeze(-1), ch=ch,
                mv=None if mv is None else mv.flatten(2).contiguous(),
                mh=None if mh is None else mh.flatten(2).contiguous(),
                skip_w=_eff(blk.skip, blk.skip_mask), skip_b=blk.skip.bias,
                out_w=_eff(blk.out, blk.out_mask), out_b=blk.out.bias))
        self.head = _head(model)

    def row(self, rowpos, row_hw):
        v = None
        for li, b in enumerate(self.blocks):
            blk = b["blk"]
            vp = masked_conv2d_at(b["v_in"], v, blk.v_conv.weight, blk.v_conv.bias, blk.v_mask, rowpos,
                                  blk.v_conv.padding)                                   # (N, 2C, W)
            b["link_row"].copy_(F.conv1d(vp, b["link_w"], b["link_b"]))
            if b["cv"] is not None:
                vp = vp + b["cv"]
            if b["mv"] is not None:
                vp = vp + b["mv"].index_select(2, row_hw)
            v = GatedMaskedConv2d.gate(vp)                                              # (N, C, W)

    def pixel(self, pos, hw, jcol):
        h = skip = None
        for li, b in enumerate(self.blocks):
            blk = b["blk"]
            hp = masked_conv2d_at(b["h_in"], None if li == 0 else h.unsqueeze(-1), blk.h_conv.weight,
                                  blk.h_conv.bias, blk.h_mask, pos, blk.h_conv.padding).squeeze(-1)  # (N, 2C)
            hp = hp + b["link_row"].index_select(2, jcol).squeeze(-1)
            if b["ch"] is not None:
                hp = hp + b["ch"]
            if b["mh"] is not None:
                hp = hp + b["mh"].index_select(2, hw).squeeze(-1)
            g = GatedMaskedConv2d.gate(hp)
            s = F.linear(g, b["skip_w"], b["skip_b"])
            skip = s if skip is None else skip + s
            hn = F.linear(g, b["out_w"], b["out_b"])
            h = hn + h if blk.residual else hn
        return _apply_head(self.head, skip)


def make_cache(model, x_img, cond=None):
    """The cache object for `model` (a PixelCNN or GatedPixelCNN, recognised by its layers)."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and isinstance(blocks[0], GatedMaskedConv2d):
        return GatedCache(model, x_img, cond)
    if hasattr(model, "input_conv"):
        return PixelCNNCache(model, x_img, cond)
    raise TypeError(f"cached sampling supports fastar.models.PixelCNN and GatedPixelCNN, got {type(model).__name__}")
