"""Per-layer 2-D caches of PixelCNN and Gated PixelCNN: their inference caches for
:mod:`fastar.sampling` (the generation protocol), and the fused pixel step's weight packing.

:func:`allocate` builds a run's :class:`ImageInferenceCache`. Its ``plan(t)`` is "pixel" on most
steps and "row" at the start of a row (a Gated PixelCNN's vertical stack runs once per completed
row, then the pixel). The pixel step is, where its kernel is built, one fused
:func:`fastar.ops.gated_pixelcnn_step` call (every block, the head and the draw, from the engine's
uniforms); else the per-op path below (a few torch ops per block) returns the logits and the
engine draws.

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

from fastar import _backend
from fastar.models.image import ConvAt, apply_head, effective_1x1, head_weights, new_cache
from fastar.nn.gated import GatedMaskedConv2d
from fastar.ops import gated_pixelcnn as _ps
from fastar.sampling.protocol import InferenceCache

__all__ = ["allocate", "ImageInferenceCache", "make_cache", "GatedCache", "PixelCNNCache",
           "fused_pixel_step_supported", "pack_gated_pixel_step"]


class PixelCNNCache:
    """Caches of :class:`fastar.models.PixelCNN`: the image and each residual block's 3x3 input map."""

    has_rows = False

    def __init__(self, model, x_img: torch.Tensor, cond=None):
        if cond is not None:
            raise ValueError("PixelCNN is unconditional; cond must be None")
        n, _, h, w = x_img.shape
        self.x_img = x_img
        c = model.input_conv
        self.inp = ConvAt(x_img, c.weight, c.bias, c.mask, c.padding, c.dilation)
        self.blocks = []
        for blk in model.blocks:
            c2 = blk.conv2
            cache = new_cache(x_img, c2.in_channels)
            self.blocks.append(dict(
                w1=effective_1x1(blk.conv1, blk.conv1.mask), b1=blk.conv1.bias,
                conv2=ConvAt(cache, c2.weight, c2.bias, c2.mask, c2.padding, c2.dilation),
                w3=effective_1x1(blk.conv3, blk.conv3.mask), b3=blk.conv3.bias))
        self.head = head_weights(model)

    def pixel(self, pos, hw, jcol):
        h = self.inp(None, pos).squeeze(-1)
        for b in self.blocks:
            a = F.relu(F.linear(F.relu(h), b["w1"], b["b1"]))
            y = b["conv2"](a.unsqueeze(-1), pos).squeeze(-1)
            h = h + F.linear(F.relu(y), b["w3"], b["b3"])
        return apply_head(self.head, h)


class GatedCache:
    """Caches of :class:`fastar.models.GatedPixelCNN`: per block, the vertical and horizontal input maps,
    the link term of the current row, and the conditioning biases."""

    has_rows = True

    def __init__(self, model, x_img: torch.Tensor, cond=None, pixel: bool = True):
        # pixel=False: only the row step is wanted (the fused pixel step keeps its own
        # horizontal caches), so the per-block horizontal caches and map terms are skipped.
        n, _, h, w = x_img.shape
        self.x_img = x_img
        self.blocks = []
        c2s = {2 * blk.channels for blk in model.blocks}
        # Every block's link term for the current row, (L, W, N, 2C): a step gathers
        # its column for all blocks with one index_select.
        self.links = x_img.new_zeros(len(model.blocks), w, n, c2s.pop()) if len(c2s) == 1 else None
        for li, blk in enumerate(model.blocks):
            c2 = 2 * blk.channels
            cv, ch, mv, mh = blk.cond_terms(cond)
            if mv is not None and tuple(mv.shape[2:]) != (h, w):
                raise ValueError(f"the conditioning map must be {h}x{w} like the image, got "
                                 f"{list(mv.shape[2:])}")
            link_b = blk.link.bias if blk.link.bias is not None else x_img.new_zeros(c2)
            v_in = x_img if li == 0 else new_cache(x_img, blk.in_channels)
            h_in = x_img if li == 0 or not pixel else new_cache(x_img, blk.in_channels)
            self.blocks.append(dict(
                blk=blk,
                v_conv=ConvAt(v_in, blk.v_conv.weight, blk.v_conv.bias, blk.v_mask, blk.v_conv.padding),
                h_conv=(ConvAt(h_in, blk.h_conv.weight, blk.h_conv.bias, blk.h_mask, blk.h_conv.padding)
                        if pixel else None),
                # (W, N, 2C): a step's column is one contiguous slice. Row 0 has
                # nothing above it: its link term is the link's bias alone.
                link_row=(self.links[li] if self.links is not None else x_img.new_zeros(w, n, c2)),
                link_wt=blk.link.weight.view(c2, c2).t(), link_b=link_b,
                cv=None if cv is None else cv.unsqueeze(-1), ch=ch,
                mv=None if mv is None else mv.flatten(2).contiguous(),
                mh=None if mh is None or not pixel else mh.flatten(2).contiguous(),
                so_wt=torch.cat([effective_1x1(blk.skip, blk.skip_mask), effective_1x1(blk.out, blk.out_mask)], 0).t(),
                so_b=torch.cat([blk.skip.bias, blk.out.bias], 0)))
            self.blocks[-1]["link_row"].copy_(link_b.view(1, 1, c2).expand(w, n, c2))
        self.head = head_weights(model)

    def row(self, rowpos, row_hw):
        v = None
        for li, b in enumerate(self.blocks):
            blk = b["blk"]
            vp = b["v_conv"](v, rowpos)                                                 # (N, 2C, W)
            torch.addmm(b["link_b"], vp.permute(2, 0, 1).reshape(-1, vp.shape[1]), b["link_wt"],
                        out=b["link_row"].view(-1, vp.shape[1]))
            if b["cv"] is not None:
                vp = vp + b["cv"]
            if b["mv"] is not None:
                vp = vp + b["mv"].index_select(2, row_hw)
            v = GatedMaskedConv2d.gate(vp)                                              # (N, C, W)

    def pixel(self, pos, hw, jcol):
        h = skip = None
        links = self.links.index_select(1, jcol) if self.links is not None else None   # (L, 1, N, 2C)
        for li, b in enumerate(self.blocks):
            blk = b["blk"]
            hp = b["h_conv"](None if li == 0 else h.unsqueeze(-1), pos).squeeze(-1)   # (N, 2C), a fresh tensor
            hp += links[li, 0] if links is not None else b["link_row"].index_select(0, jcol).squeeze(0)
            if b["ch"] is not None:
                hp += b["ch"]
            if b["mh"] is not None:
                hp += b["mh"].index_select(2, hw).squeeze(-1)
            c = blk.channels
            g = torch.tanh(hp[:, :c]).mul_(torch.sigmoid(hp[:, c:]))
            # skip and out are both 1x1 convs of g: one GEMM for the two.
            so = torch.addmm(b["so_b"], g, b["so_wt"])                                   # (N, 2C): [skip | out]
            skip = so[:, :c].clone() if skip is None else skip.add_(so[:, :c])
            h = so[:, c:].add_(h) if blk.residual else so[:, c:]   # so is this step's own tensor
        return apply_head(self.head, skip)


def make_cache(model, x_img, cond=None, pixel: bool = True):
    """The layer caches of `model`: :class:`GatedCache` for a stack of gated blocks, else
    :class:`PixelCNNCache`. pixel=False (gated only): the row step's caches alone, for the fused
    pixel step."""
    if getattr(model, "gated", False):
        return GatedCache(model, x_img, cond, pixel)
    return PixelCNNCache(model, x_img, cond)


# On the CPU the fused pixel step wins at small batches and the per-op cache's batched GEMMs at large
# ones. Measured with the shipped gated_pixelcnn_mnist on one thread of the 2-core Xeon (seconds for a
# batch, fused / per-op): 16: 0.07 / 0.30, 100: 0.33 / 0.48, 200: 0.64 / 0.75, 300: 0.98 / 1.00,
# 500: 1.7 / 1.5, 1000: 3.7 / 3.1. So the default (fused=None) fuses up to this batch.
FUSED_CPU_MAX_BATCH = 256


class ImageInferenceCache(InferenceCache):
    """One run's caches, device counters and index tables (see the module docstring)."""

    def __init__(self, model, run, fused: bool | None = None):
        super().__init__(run)
        self.model = model
        C, H, W = run.seq.shape
        n, dev, levels = run.seq.n, run.device, model.levels
        self.C, self.H, self.W, self.levels = C, H, W, levels
        self.x_img = torch.zeros(n, C, H, W, dtype=run.dtype, device=dev)
        # The CUDA kernel keeps the per-block residual flags in one 32-bit word.
        can_fuse = fused_pixel_step_supported(model) and (dev.type != "cuda" or len(model.blocks) <= 32)
        if fused and not can_fuse:
            raise ValueError(f"fused=True: {type(model).__name__}'s pixel step does not fit the fused op "
                             "(a Gated PixelCNN with equal block widths is needed)")
        if fused is None:
            fused = can_fuse and _backend.use_kernel("gated_pixelcnn_step", dev, run.dtype, _ps.KERNEL_DTYPES) and (
                dev.type != "cpu" or n <= FUSED_CPU_MAX_BATCH)
        self.draws = bool(fused)
        self.layers = make_cache(model, self.x_img, run.cond, pixel=not self.draws)
        self.has_rows = self.layers.has_rows
        # Step t -> [i, j, c, i * W + j, c * H * W + i * W + j], gathered on the device with the
        # step counter so that a captured step needs no host input.
        t = torch.arange(C * H * W, device=dev)
        c, p = t % C, t // C
        self.table = torch.stack([p // W, p % W, c, p, c * H * W + p], 1).contiguous()
        r = torch.arange(H, device=dev)
        cols = torch.arange(W, device=dev)
        self.row_pos = torch.stack([r[:, None].expand(H, W), cols[None, :].expand(H, W)], 2).contiguous()
        self.row_hw = (r[:, None] * W + cols[None, :]).contiguous()
        self.r = torch.zeros(1, dtype=torch.int64, device=dev)
        self.scale = 2.0 / (levels - 1)
        if self.draws:
            self._set_up_fused()

    def _set_up_fused(self):
        run = self.run
        k = 1 if self.levels == 2 else self.levels
        w = pack_gated_pixel_step(self.model, self.layers, run.cond)
        self.params = torch.zeros(run.seq.n, k, dtype=run.dtype, device=run.device)
        # Checked once here; a step then calls the op directly (the checks would cost more than it).
        # fused=True under the reference backend runs the op's PyTorch twin.
        self._fused_fn = _ps.bind_gated_pixelcnn_step(
            self.x_img, run.values, run.counter, self.params, run.noise.view(run.noise.shape[0], run.noise.shape[1]),
            run.given_values, run.given_mask, w, self.levels, run.temperature)
        self._fused_args = self._fused_fn.args

    def plan(self, t):
        if self.has_rows and t and t % (self.C * self.W) == 0:
            return "row", 1
        return "pixel", 1

    def _row(self):
        # At the start of row r + 1: the vertical stack over the completed row r.
        self.layers.row(self.row_pos.index_select(0, self.r).squeeze(0),
                        self.row_hw.index_select(0, self.r).squeeze(0))
        self.r.add_(1)

    def advance(self, key, t, k):
        if key == "row":
            self._row()
        self._fused_fn()

    def step(self, key, t):
        if key == "row":
            self._row()
        cur = self.table.index_select(0, self.run.t)                  # (1, 5)
        pos, c, hw, jcol = cur[:, 0:2], cur[0, 2:3], cur[0, 3:4], cur[0, 1:2]
        self._flat = cur[0, 4:5]                                      # where update writes the drawn value
        logits = self.layers.pixel(pos, hw, jcol)                     # (N, out_channels)
        n = self.run.seq.n
        if self.levels == 2:
            return logits.index_select(1, c)                          # (N, 1)
        return logits.view(n, self.C, self.levels).index_select(1, c).squeeze(1)   # (N, levels)

    def update(self, key, t, values):
        x_new = values.to(self.run.dtype) * self.scale - 1.0                        # (N, 1)
        self.x_img.view(self.run.seq.n, -1).index_copy_(1, self._flat, x_new)


def allocate(model, run, fused=None) -> ImageInferenceCache:
    """The inference cache of a PixelCNN-family model for one run of :mod:`fastar.sampling`."""
    return ImageInferenceCache(model, run, fused)


# ---------------------------------------------------------------------------------------------
# The fused pixel step (fastar.ops.gated_pixelcnn_step): structure check and weight packing.


def _live_taps(blk):
    # The horizontal filter is 1 x k: taps right of the centre are masked off, so the live
    # ones are the k // 2 + 1 columns left of and at the centre.
    k = blk.h_conv.weight.shape[-1]
    m = blk.h_mask
    if m.shape[-2] != 1 or bool(m[..., k // 2 + 1:].any()):
        return None
    return k // 2 + 1


def fused_pixel_step_supported(model) -> bool:
    """Whether `model`'s pixel step fits :func:`fastar.ops.gated_pixelcnn_step`: a Gated PixelCNN whose blocks
    all have the same width, whose later blocks share one horizontal filter width, and whose head is
    two 1x1 convs (GatedPixelCNN always qualifies). Otherwise the engine keeps the per-op path."""
    blocks = getattr(model, "blocks", None)
    if not blocks or not all(isinstance(b, GatedMaskedConv2d) for b in blocks):
        return False
    if not all(hasattr(model, a) for a in ("head1", "head2", "in_channels", "levels")):
        return False
    c = blocks[0].channels
    if any(b.channels != c for b in blocks) or blocks[0].in_channels != model.in_channels:
        return False
    if any(b.in_channels != c for b in blocks[1:]):
        return False
    taps = [_live_taps(b) for b in blocks]
    if any(t is None for t in taps) or len({*taps[1:]}) > 1:
        return False
    if model.head1.weight.shape[-2:] != (1, 1) or model.head2.weight.shape[-2:] != (1, 1):
        return False
    return True


def pack_gated_pixel_step(model, cache: GatedCache, cond=None) -> dict:
    """Pack `model`'s weights (and the run's conditioning) once per sampling run into the layouts of
    :func:`fastar.ops.gated_pixelcnn_step` (see its module docstring). `cache` is the run's
    :class:`GatedCache` (its ``links`` table and class biases are shared, not copied). Returns a dict
    of the op's tensor and int arguments, except the run state (image, codes, step, logits, noise,
    prefix, given) as a :class:`fastar.ops.GatedPixelStepPack`. The model must pass
    :func:`fused_pixel_step_supported`."""
    blocks = list(model.blocks)
    x_img = cache.x_img
    n, ci, h, w = x_img.shape
    dt = x_img.dtype
    c = blocks[0].channels
    c2 = 2 * c
    taps = [_live_taps(b) for b in blocks]
    h_w, h_b, so_w, so_b = [], [], [], []
    for blk in blocks:
        nt = _live_taps(blk)
        eff = (blk.h_conv.weight * blk.h_mask.to(blk.h_conv.weight.dtype))[:, :, 0, :nt]     # (2C, C_in, nt)
        h_w.append(eff.permute(2, 1, 0).reshape(-1))
        h_b.append(blk.h_conv.bias if blk.h_conv.bias is not None else x_img.new_zeros(c2))
        so_w.append(torch.cat([effective_1x1(blk.skip, blk.skip_mask), effective_1x1(blk.out, blk.out_mask)], 0).t())
        so_b.append(torch.cat([blk.skip.bias, blk.out.bias], 0))
    w1, b1, w2, b2 = head_weights(model)
    b1 = b1 if b1 is not None else x_img.new_zeros(w1.shape[0])
    b2 = b2 if b2 is not None else x_img.new_zeros(w2.shape[0])
    class_bias = cond_map = map_w = None
    if cache.blocks[0]["ch"] is not None:
        class_bias = torch.stack([b["ch"] for b in cache.blocks]).contiguous()                # (L, N, 2C)
    _, cmap = blocks[0].split_cond(cond)
    if cmap is not None:
        cond_map = cmap.permute(0, 2, 3, 1).reshape(n, h * w, -1).to(dt).contiguous()        # (N, HW, Cc)
        map_w = torch.stack([b.map_h.weight.flatten(1).t() for b in blocks]).contiguous()    # (L, Cc, 2C)
    f = lambda t: t.detach().to(dt).contiguous()  # noqa: E731
    return _ps.GatedPixelStepPack(
        row_cache=x_img.new_zeros(len(blocks) - 1, n, w, c), links=cache.links,
        class_bias=class_bias, cond_map=cond_map, map_w=map_w,
        h_w=f(torch.cat(h_w)), h_b=f(torch.stack(h_b)), so_w=f(torch.stack(so_w)), so_b=f(torch.stack(so_b)),
        head1_w=f(w1.t()), head1_b=f(b1), head2_w=f(w2.t()), head2_b=f(b2),
        taps=[taps[0], taps[1] if len(taps) > 1 else 1], residual=[int(b.residual) for b in blocks])
