"""PixelCNN and Gated PixelCNN over discrete images, with naive and cached sampling.

Images are integer tensors (N, C, H, W) with values in [0, levels): C = 1 (grey or binary) or
3 (RGB, generated R, then G, then B inside each pixel; see :mod:`fastar.masks`). ``levels=2``
is a binary model (one logit per sub-pixel, a Bernoulli/sigmoid head); any other ``levels``
is a softmax over the levels per sub-pixel, the output channels laid out as
[R logits | G logits | B logits]. The network sees ``x / (levels - 1) * 2 - 1``.

``nll(x, cond)`` is the negative log-likelihood per image in nats, (N,);
``log_prob = -nll``; ``bits_per_dim`` divides by C * H * W * ln 2.
``sample(n, shape, cond, generator, temperature, method, prefix, mask, progress)`` draws
images with :mod:`fastar.sampling` (cached: one position per layer per step; naive: the
whole network per sub-pixel). Both draw the same uniforms from ``generator`` up front, so
they return the same images.

Blind spot: in PixelCNN a k x k mask-B layer reaches further right only by also reaching one
row further up, so the row just above is seen only as far right as the first (7x7) layer
reaches: pixel (i - 1, j + 4) never influences (i, j), however deep the stack. Gated
PixelCNN's vertical stack (shifted down one row) removes this: every earlier pixel inside the
receptive field is seen. ``tests/test_pixelcnn.py`` shows both with gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.base import batch_of
from fastar.models.image import DiscreteImageModel, check_image_config, class_config
from fastar.models.spec import ModelSpec, register
from fastar.nn.gated import GatedMaskedConv2d
from fastar.nn.masked_conv import MaskedConv2d

__all__ = ["PixelCNN", "GatedPixelCNN"]


def _default_channels(channels, in_channels):
    if channels is None:
        return 128 if in_channels == 1 else 126
    return channels


def _allocate(model, run, fused=None):
    """The 2-D caches of one run (:mod:`fastar.models.pixelcnn_cache`)."""
    from fastar.models.pixelcnn_cache import allocate

    return allocate(model, run, fused)


class _ResidualBlock(nn.Module):
    """PixelCNN residual block: ReLU, 1x1 B (C -> C/2), ReLU, 3x3 B (C/2 -> C/2), ReLU, 1x1 B (C/2 -> C), + x."""

    def __init__(self, channels, color_groups, kernel_size=3):
        super().__init__()
        half = channels // 2
        self.conv1 = MaskedConv2d(channels, half, 1, "B", color_groups)
        self.conv2 = MaskedConv2d(half, half, kernel_size, "B", color_groups)
        self.conv3 = MaskedConv2d(half, channels, 1, "B", color_groups)

    def forward(self, x):
        y = self.conv1(F.relu(x))
        y = self.conv2(F.relu(y))
        return x + self.conv3(F.relu(y))


class PixelCNN(DiscreteImageModel):
    """PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks").

    ``PixelCNN(in_channels=1, levels=256, layers=15, channels=None, color_groups=None,
    kernel_size=3, first_kernel_size=7)``: a 7x7 mask-A convolution to ``channels``, then
    ``layers - 1`` residual blocks of mask-B convolutions (1x1, 3x3, 1x1 at half width),
    ReLU + 1x1 mask-B + ReLU + 1x1 mask-B to the logits. channels defaults to 128 (1 channel)
    or 126 (RGB: R|G|B blocks of a halved width must stay divisible by 3). color_groups
    defaults to in_channels. Has the PixelCNN blind spot (see the module docstring).
    """

    def __init__(self, in_channels: int = 1, levels: int = 256, layers: int = 15, channels: int | None = None,
                 color_groups: int | None = None, kernel_size: int = 3, first_kernel_size: int = 7):
        super().__init__()
        channels = _default_channels(channels, in_channels)
        color_groups = in_channels if color_groups is None else color_groups
        if color_groups not in (1, in_channels):
            raise ValueError(f"PixelCNN: color_groups must be 1 or in_channels ({in_channels}), got {color_groups!r}")
        check_image_config("PixelCNN", in_channels, levels, layers, channels, 2 * color_groups)
        self.in_channels, self.levels, self.channels, self.color_groups = in_channels, levels, channels, color_groups
        self.input_conv = MaskedConv2d(in_channels, channels, first_kernel_size, "A", color_groups)
        self.blocks = nn.ModuleList(_ResidualBlock(channels, color_groups, kernel_size) for _ in range(layers - 1))
        self.head1 = MaskedConv2d(channels, channels, 1, "B", color_groups)
        self.head2 = MaskedConv2d(channels, self.out_channels, 1, "B", color_groups)

    allocate_inference_cache = _allocate

    def logits_flat(self, x, cond=None):
        if cond is not None:
            raise ValueError("PixelCNN is unconditional; use GatedPixelCNN(num_classes=..., cond_channels=...) "
                             "to condition")
        h = self.input_conv(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head2(F.relu(self.head1(F.relu(h))))


class GatedPixelCNN(DiscreteImageModel):
    """Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

    ``GatedPixelCNN(in_channels=1, levels=256, layers=15, channels=None, num_classes=None,
    cond_channels=None, kernel_size=3, first_kernel_size=7)``: ``layers``
    :class:`fastar.nn.GatedMaskedConv2d` blocks (the first with mask A and a
    ``first_kernel_size`` filter, no residual), the skip outputs summed, then ReLU + 1x1
    mask-B + ReLU + 1x1 mask-B to the logits. No blind spot. channels defaults to 128
    (1 channel) or 126 (RGB). Conditioning: ``num_classes`` (cond = labels (N,) int64),
    ``cond_channels`` (cond = map (N, cond_channels, H, W)), or both (cond = (labels, map)).
    """

    def __init__(self, in_channels: int = 1, levels: int = 256, layers: int = 15, channels: int | None = None,
                 num_classes: int | None = None, cond_channels: int | None = None, kernel_size: int = 3,
                 first_kernel_size: int = 7):
        super().__init__()
        self.gated = True
        for k, v in (("num_classes", num_classes), ("cond_channels", cond_channels)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"GatedPixelCNN: {k} must be None or a positive int, got {v!r}")
        channels = _default_channels(channels, in_channels)
        cg = in_channels
        check_image_config("GatedPixelCNN", in_channels, levels, layers, channels, cg)
        self.in_channels, self.levels, self.channels, self.color_groups = in_channels, levels, channels, cg
        self.num_classes, self.cond_channels = num_classes, cond_channels
        kw = dict(color_groups=cg, num_classes=num_classes, cond_channels=cond_channels)
        self.blocks = nn.ModuleList(
            [GatedMaskedConv2d(in_channels, channels, first_kernel_size, "A", residual=False, **kw)]
            + [GatedMaskedConv2d(channels, channels, kernel_size, "B", **kw) for _ in range(layers - 1)])
        self.head1 = MaskedConv2d(channels, channels, 1, "B", cg)
        self.head2 = MaskedConv2d(channels, self.out_channels, 1, "B", cg)

    def check_cond(self, cond, n, hw):
        """Class labels (an int for the whole batch, or (N,) int64) and/or a map (N, cond_channels, H, W),
        on the model's device; the batch must be n."""
        device = next(self.parameters()).device
        if isinstance(cond, int) and not isinstance(cond, bool):
            cond = torch.full((n,), cond, dtype=torch.int64, device=device)
        elif isinstance(cond, torch.Tensor):
            cond = cond.to(device)
        elif isinstance(cond, (tuple, list)):
            cond = tuple(torch.full((n,), c, dtype=torch.int64, device=device)
                         if isinstance(c, int) and not isinstance(c, bool) else
                         (c.to(device) if isinstance(c, torch.Tensor) else c) for c in cond)
        b = batch_of(cond)
        if b is not None and b != n:
            raise ValueError(f"GatedPixelCNN.sample: cond has batch {b}, but {n} images were asked for")
        labels, cmap = self.blocks[0].split_cond(cond)
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"GatedPixelCNN: class labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if cmap is not None and tuple(cmap.shape[2:]) != tuple(hw):
            raise ValueError(f"GatedPixelCNN: the conditioning map must be {hw[0]}x{hw[1]} like the image, got "
                             f"{list(cmap.shape[2:])}")
        return cond

    allocate_inference_cache = _allocate

    def logits_flat(self, x, cond=None):
        v = h = x
        skip = 0
        for blk in self.blocks:
            v, h, s = blk(v, h, cond)
            skip = skip + s
        return self.head2(F.relu(self.head1(F.relu(skip))))


# ---------------------------------------------------------------------------- registration

def _image_config(layers):
    def config(data: dict) -> dict:
        c = data["shape"][0]
        return dict(in_channels=c, levels=data["levels"], layers=layers, channels=32 if c == 1 else 48)
    return config


register(ModelSpec(
    name="pixelcnn", cls=PixelCNN, kind="image", datasets=("mnist", "digits", "patches"),
    default_config=_image_config(4), writer="png",
    demo=dict(data="mnist", batch_size=64, lr=3e-3, config=dict(layers=5, channels=16)),
    tiny=(dict(config=dict(in_channels=1, levels=2, layers=2, channels=16), shape=(2, 2)),
          dict(config=dict(in_channels=3, levels=3, layers=2, channels=24), shape=(1, 2))),
    description="PixelCNN: masked convolutions (mask A/B, RGB groups), residual blocks"))
register(ModelSpec(
    name="gated_pixelcnn", cls=GatedPixelCNN, kind="image", datasets=("mnist", "digits", "patches"),
    default_config=_image_config(6), conditional_config=class_config, writer="png",
    shipped=("gated_pixelcnn_mnist",),
    demo=dict(data="mnist", batch_size=64, lr=3e-3, conditional=True, config=dict(layers=5, channels=16)),
    tiny=(dict(config=dict(in_channels=1, levels=2, layers=2, channels=16), shape=(2, 2)),
          dict(config=dict(in_channels=1, levels=2, layers=2, channels=8, num_classes=3), shape=(2, 2), cond=1),
          dict(config=dict(in_channels=3, levels=3, layers=2, channels=24), shape=(1, 2))),
    description="Gated PixelCNN: vertical + horizontal stacks, gated units, class/map conditioning"))
