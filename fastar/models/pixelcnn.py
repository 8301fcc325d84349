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

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.nn.gated import GatedMaskedConv2d
from fastar.nn.masked_conv import MaskedConv2d
from fastar.models.spec import ModelSpec, register

__all__ = ["PixelCNN", "GatedPixelCNN"]


def _default_channels(channels, in_channels):
    if channels is None:
        return 128 if in_channels == 1 else 126
    return channels


def _check_common(name, in_channels, levels, layers, channels, divisor):
    if in_channels not in (1, 3):
        raise ValueError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"{name}: levels must be an int >= 2 (2 = binary), got {levels!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{name}: layers must be a positive int, got {layers!r}")
    if not isinstance(channels, int) or channels < 1 or channels % divisor:
        raise ValueError(f"{name}: channels must be a positive int divisible by {divisor} (R|G|B blocks"
                         f"{' of a halved residual width' if divisor == 6 else ''}), got {channels!r}")


class _DiscreteImageModel(nn.Module):
    """Shared likelihood and sampling front end; subclasses define ``logits_flat(x_float, cond)``."""

    in_channels: int
    levels: int
    gated = False       # a stack of GatedMaskedConv2d blocks (its cache runs a vertical stack per row)

    @property
    def out_channels(self) -> int:
        return self.in_channels if self.levels == 2 else self.in_channels * self.levels

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Integer image values -> network input in [-1, 1], in the model's dtype."""
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def _check_image(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must be an image batch (N, {self.in_channels}, H, W) of "
                             f"integer values in [0, {self.levels}), got shape {list(getattr(x, 'shape', []))}")
        if x.is_floating_point():
            if not torch.equal(x, x.round()):
                raise ValueError(f"{type(self).__name__}: x must hold integer values in [0, {self.levels})")
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__}: x must hold integer values in [0, {self.levels}), got NaN or inf")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"{type(self).__name__}: x values must lie in [0, {self.levels}), got range "
                             f"[{int(x.min())}, {int(x.max())}]")

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Logits: (N, C, H, W) for binary models, (N, C, levels, H, W) otherwise (x: integer image)."""
        self._check_image(x)
        out = self.logits_flat(self.preprocess(x), cond)
        n, _, h, w = out.shape
        return out if self.levels == 2 else out.view(n, self.in_channels, self.levels, h, w)

    def nll(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Negative log-likelihood per image in nats, (N,)."""
        logits = self.forward(x, cond)
        if self.levels == 2:
            per = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
        else:
            # cross_entropy wants the classes at dim 1: (N, levels, C, H, W).
            per = F.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none")
        return per.flatten(1).sum(1)

    def log_prob(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Log-likelihood per image in nats, (N,)."""
        return -self.nll(x, cond)

    def bits_per_dim(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Mean negative log2-likelihood per sub-pixel, per image, (N,)."""
        nll = self.nll(x, cond)
        return nll / (math.prod(x.shape[1:]) * math.log(2.0))

    def loss(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Mean NLL per image in nats (a scalar to minimise)."""
        nll = self.nll(x, cond)
        if not nll.numel():
            raise ValueError(f"{type(self).__name__}.loss: the batch is empty (a mean over no images is undefined)")
        return nll.mean()

    @torch.no_grad()
    def sample(self, n: int | None = None, shape=None, cond=None, generator: torch.Generator | None = None,
               temperature: float = 1.0, method: str = "cached", prefix: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, progress: bool = True, **engine) -> torch.Tensor:
        """Draw images, (n, C, H, W) int64 in [0, levels), on the model's device.

        shape: (H, W) (or (C, H, W)); taken from ``prefix`` when omitted. cond: class labels (N,)
        int64 (or one int for the whole batch) and/or a map, as the model was built (see
        :class:`fastar.nn.GatedMaskedConv2d`). prefix (N, C, H, W) integer image with mask
        (broadcastable to (N, C, H, W), bool, True = given): the given sub-pixels are copied, the
        others sampled conditioned on every earlier one (e.g. mask[:H // 2] = True completes the
        bottom half). method: "cached" (fast) or "naive" (the whole network per sub-pixel).
        temperature 0 is argmax. Both methods consume the same uniforms from ``generator``, so they
        return the same images. ``engine``: :func:`fastar.sampling.sample`'s options (``fused``,
        ``cuda_graphs``, ``return_params``).
        """
        from fastar import sampling

        return sampling.sample(self, n=n, shape=shape, cond=cond, generator=generator, temperature=temperature,
                               method=method, prefix=prefix, mask=mask, progress=progress, **engine)

    # ---- the generation protocol (fastar.sampling) ------------------------------------------

    def sequence(self, n=None, shape=None, cond=None, prefix=None, mask=None):
        """The :class:`fastar.sampling.Sequence` of one sampling run: C * H * W steps in raster
        order, colours R, G, B inside each pixel (step ``t = (i * W + j) * C + c``), each value
        stored at its (C, H, W) memory offset ``c * H * W + i * W + j``."""
        from fastar.sampling import Bernoulli, Categorical, Sequence

        n, (C, H, W), pflat, gflat = _check_sample_args(self, n, shape, cond, prefix, mask)
        cond = self.check_cond(cond, n, (H, W))
        t = torch.arange(C * H * W)
        p, c = t // C, t % C
        slots = c * H * W + p
        head = Bernoulli() if self.levels == 2 else Categorical(self.levels)

        def forward(values, t=None):
            out = self(values.view(n, C, H, W), cond)
            if self.levels == 2:
                per = out.permute(2, 3, 1, 0).reshape(C * H * W, n, 1)       # step order (i, j, c)
            else:
                per = out.permute(3, 4, 1, 0, 2).reshape(C * H * W, n, self.levels)
            return per if t is None else per[t]

        return Sequence(n=n, steps=C * H * W, head=head, forward=forward, slots=slots,
                        finish=lambda values: values.view(values.shape[0], C, H, W), given_values=pflat, given_mask=gflat,
                        cond=cond, info=dict(shape=(C, H, W)))

    def allocate_inference_cache(self, run, fused=None):
        """The 2-D caches of one run (:mod:`fastar.models.pixelcnn_cache`)."""
        from fastar.models.pixelcnn_cache import allocate

        return allocate(self, run, fused)

    def check_cond(self, cond, n, hw):
        """Conditioning for a batch of n images of size hw, on the model's device."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional; cond must be None")
        return None


def _check_sample_args(model, n, shape, cond, prefix, mask):
    """Check ``sample``'s shape / prefix / mask; returns n, (C, H, W), prefix and mask flattened to
    (N, C * H * W) in memory order (or None)."""
    name = type(model).__name__
    device = next(model.parameters()).device
    C, levels = model.in_channels, model.levels
    if prefix is not None:
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 4 or prefix.shape[1] != C:
            raise ValueError(f"{name}.sample: prefix must be an image batch (N, {C}, H, W), got shape "
                             f"{list(getattr(prefix, 'shape', []))}")
        if mask is None:
            raise ValueError(f"{name}.sample: prefix needs a mask (bool, broadcastable to {list(prefix.shape)}, "
                             "True where the prefix is given)")
        if shape is None:
            shape = tuple(prefix.shape[2:])
        if n is None:
            n = prefix.shape[0]
    elif mask is not None:
        raise ValueError(f"{name}.sample: mask given without a prefix")
    if n is None:
        n = _batch_of(cond)
    if n is None:
        raise ValueError(f"{name}.sample: say how many images to draw (n), or pass a prefix or batched cond")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
    if shape is None:
        raise ValueError(f"{name}.sample: shape (H, W) is needed when no prefix is given")
    if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"{name}.sample: shape must be (H, W) or (C, H, W) of ints, got {shape!r}")
    shape = tuple(shape)
    if len(shape) == 3:
        if shape[0] != C:
            raise ValueError(f"{name}.sample: shape {shape} has {shape[0]} channels, the model has {C}")
        shape = shape[1:]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name}.sample: shape must be (H, W) or (C, H, W) with positive sizes, got {shape}")
    H, W = shape
    pflat = gflat = None
    if prefix is not None:
        if prefix.shape[0] != n or tuple(prefix.shape[2:]) != (H, W):
            raise ValueError(f"{name}.sample: prefix must be ({n}, {C}, {H}, {W}), got {list(prefix.shape)}")
        if prefix.is_floating_point() and not torch.equal(prefix, prefix.round()):
            raise ValueError(f"{name}.sample: prefix must hold integer values")
        m = torch.as_tensor(mask, device=device)
        if m.dtype != torch.bool:
            raise ValueError(f"{name}.sample: mask must be bool (True = given), got {m.dtype}")
        try:
            m = m.expand(n, C, H, W)
        except RuntimeError:
            raise ValueError(f"{name}.sample: mask of shape {list(m.shape)} does not broadcast to "
                             f"{[n, C, H, W]}") from None
        pflat = prefix.to(device=device, dtype=torch.int64)
        if pflat.numel() and bool(((pflat < 0) | (pflat >= levels))[m].any()):
            raise ValueError(f"{name}.sample: given prefix values must lie in [0, {levels})")
        pflat = pflat.clamp(0, levels - 1).reshape(n, C * H * W).contiguous()
        gflat = m.reshape(n, C * H * W).contiguous()
    return n, (C, H, W), pflat, gflat


def _batch_of(cond):
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.dim() >= 1 else None
    if isinstance(cond, (tuple, list)) and cond and isinstance(cond[0], torch.Tensor):
        return cond[0].shape[0]
    return None


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


class PixelCNN(_DiscreteImageModel):
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
        _check_common("PixelCNN", in_channels, levels, layers, channels, 2 * color_groups)
        self.in_channels, self.levels, self.channels, self.color_groups = in_channels, levels, channels, color_groups
        self.input_conv = MaskedConv2d(in_channels, channels, first_kernel_size, "A", color_groups)
        self.blocks = nn.ModuleList(_ResidualBlock(channels, color_groups, kernel_size) for _ in range(layers - 1))
        self.head1 = MaskedConv2d(channels, channels, 1, "B", color_groups)
        self.head2 = MaskedConv2d(channels, self.out_channels, 1, "B", color_groups)

    def logits_flat(self, x, cond=None):
        if cond is not None:
            raise ValueError("PixelCNN is unconditional; use GatedPixelCNN(num_classes=..., cond_channels=...) "
                             "to condition")
        h = self.input_conv(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head2(F.relu(self.head1(F.relu(h))))


class GatedPixelCNN(_DiscreteImageModel):
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
        _check_common("GatedPixelCNN", in_channels, levels, layers, channels, cg)
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
        b = _batch_of(cond)
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


def _class_config(data: dict) -> dict | None:
    return dict(num_classes=data["num_classes"]) if data.get("num_classes") else None


register(ModelSpec(
    name="pixelcnn", cls=PixelCNN, kind="image", datasets=("mnist", "digits", "patches"),
    default_config=_image_config(4), writer="png",
    demo=dict(data="mnist", batch_size=64, lr=3e-3, config=dict(layers=5, channels=16)),
    tiny=(dict(config=dict(in_channels=1, levels=2, layers=2, channels=16), shape=(2, 2)),
          dict(config=dict(in_channels=3, levels=3, layers=2, channels=24), shape=(1, 2))),
    description="PixelCNN: masked convolutions (mask A/B, RGB groups), residual blocks"))
register(ModelSpec(
    name="gated_pixelcnn", cls=GatedPixelCNN, kind="image", datasets=("mnist", "digits", "patches"),
    default_config=_image_config(6), conditional_config=_class_config, writer="png",
    shipped=("gated_pixelcnn_mnist",),
    demo=dict(data="mnist", batch_size=64, lr=3e-3, conditional=True, config=dict(layers=5, channels=16)),
    tiny=(dict(config=dict(in_channels=1, levels=2, layers=2, channels=16), shape=(2, 2)),
          dict(config=dict(in_channels=1, levels=2, layers=2, channels=8, num_classes=3), shape=(2, 2), cond=1),
          dict(config=dict(in_channels=3, levels=3, layers=2, channels=24), shape=(1, 2))),
    description="Gated PixelCNN: vertical + horizontal stacks, gated units, class/map conditioning"))
