"""The public base for models of discrete images, and the helpers their caches share.

:class:`DiscreteImageModel` is what PixelCNN, Gated PixelCNN, PixelRNN and FVSBN build on. Images
are integer tensors (N, C, H, W) with values in [0, levels): C = 1 (grey or binary) or 3 (RGB,
generated R, then G, then B inside each pixel; see :mod:`fastar.masks`). ``levels=2`` is a binary
model (one logit per sub-pixel, a :class:`~fastar.nn.heads.Bernoulli` head); any other ``levels``
is a softmax over the levels per sub-pixel (:class:`~fastar.nn.heads.Categorical`), the output
channels laid out as [R logits | G logits | B logits]. The network sees ``x / (levels - 1) * 2 - 1``.

A subclass writes ``logits_flat(x_float, cond) -> (N, out_channels, H, W)`` and, when it is
conditional, ``check_cond(cond, n, hw)``; it gets ``forward``, ``nll`` (N,) nats, ``log_prob``,
``bits_per_dim``, ``loss``, ``sample`` and the generation protocol's ``sequence``: C * H * W steps
in raster order, colours R, G, B inside each pixel (step ``t = (i * W + j) * C + c``), each value
stored at its (C, H, W) memory offset ``c * H * W + i * W + j``. A model of one fixed image size
sets ``fixed_shape``.

Cache helpers (for a family's inference cache): :func:`new_cache` (a channels-last input map),
:class:`ConvAt` (one layer's :func:`fastar.ops.masked_conv2d_at`, checked once), :func:`head_weights`
and :func:`apply_head` (the two 1x1 output convolutions on one position).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar.models.base import AutoregressiveModel, batch_of, check_class_labels
from fastar.nn.heads import Bernoulli, Categorical
from fastar.ops.masked_conv_at import bind_masked_conv2d_at

__all__ = ["DiscreteImageModel", "check_image_config", "class_config", "new_cache", "ConvAt", "head_weights",
           "apply_head", "effective_1x1"]


def check_image_config(name, in_channels, levels, layers, channels, divisor):
    """The constructor checks every image family shares: in_channels 1 or 3, levels >= 2, layers >= 1,
    channels a positive multiple of ``divisor`` (the R|G|B blocks)."""
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise ValueError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"{name}: levels must be an int >= 2 (2 = binary), got {levels!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{name}: layers must be a positive int, got {layers!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1 or channels % divisor:
        raise ValueError(f"{name}: channels must be a positive int divisible by {divisor} (R|G|B blocks"
                         f"{' of a halved residual width' if divisor == 6 else ''}), got {channels!r}")


def class_config(data: dict) -> dict | None:
    """A spec's ``conditional_config`` for families conditioned by ``num_classes``."""
    return dict(num_classes=data["num_classes"]) if data.get("num_classes") else None


class DiscreteImageModel(AutoregressiveModel):
    """Base of the discrete image families (see the module docstring)."""

    in_channels: int
    levels: int
    fixed_shape: tuple | None = None    # (H, W) for a model of one image size (FVSBN)

    @property
    def out_channels(self) -> int:
        return self.in_channels if self.levels == 2 else self.in_channels * self.levels

    @property
    def head(self):
        """The per-sub-pixel distribution: Bernoulli for binary models, else Categorical(levels)."""
        return Bernoulli(self.in_channels) if self.levels == 2 else Categorical(self.levels, self.in_channels)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Integer image values -> network input in [-1, 1], in the model's dtype."""
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def check_image(self, x):
        """ValueError unless x is an (N, C, H, W) batch of integer values in [0, levels)."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: x must be an image batch (N, {self.in_channels}, H, W) of "
                             f"integer values in [0, {self.levels}), got shape {list(getattr(x, 'shape', []))}")
        if self.fixed_shape is not None and tuple(x.shape[2:]) != tuple(self.fixed_shape):
            raise ValueError(f"{name}: x must be a batch of {self.fixed_shape[0]}x{self.fixed_shape[1]} images "
                             f"(N, {self.in_channels}, {self.fixed_shape[0]}, {self.fixed_shape[1]}), got shape "
                             f"{list(x.shape)}")
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: x must hold integer values in [0, {self.levels}), got NaN or inf")
        if x.is_floating_point() and not torch.equal(x, x.round()):
            raise ValueError(f"{name}: x must hold integer values in [0, {self.levels})")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"{name}: x values must lie in [0, {self.levels}), got range "
                             f"[{int(x.min())}, {int(x.max())}]")


    def logits_flat(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Logits: (N, C, H, W) for binary models, (N, C, levels, H, W) otherwise (x: integer image)."""
        self.check_image(x)
        out = self.logits_flat(self.preprocess(x), cond)
        n, _, h, w = out.shape
        return out if self.levels == 2 else out.view(n, self.in_channels, self.levels, h, w)

    def nll(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Negative log-likelihood per image in nats, (N,)."""
        logits = self.forward(x, cond)
        if self.levels == 2:
            return self.head.nll(x, logits, reduction="none")
        n, c, lv, h, w = logits.shape
        return self.head.nll(x.long(), logits.reshape(n, c * lv, h, w), reduction="none")

    def check_cond(self, cond, n, hw):
        """Conditioning for a batch of n images of size hw, on the model's device (unconditional here)."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional; cond must be None")
        return None

    def check_class_cond(self, cond, n, num_classes):
        """Class labels (an int for the whole batch or (N,) int64) for a model with ``num_classes``."""
        return check_class_labels(type(self).__name__, cond, n, num_classes, next(self.parameters()).device)

    # ---- the generation protocol (fastar.sampling) ------------------------------------------

    def sample_shape(self, n, shape, cond):
        """(n, (C, H, W)) of a sampling call, checked; n may come from a batched cond."""
        name = type(self).__name__
        C = self.in_channels
        if n is None:
            n = batch_of(cond)
        if n is None:
            raise ValueError(f"{name}.sample: say how many images to draw (n), or pass a prefix or batched cond")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
        if shape is None:
            if self.fixed_shape is None:
                raise ValueError(f"{name}.sample: shape (H, W) is needed when no prefix is given")
            shape = tuple(self.fixed_shape)
        if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ValueError(f"{name}.sample: shape must be (H, W) or (C, H, W) of ints, got {shape!r}")
        shape = tuple(shape)
        if len(shape) == 3:
            if shape[0] != C:
                raise ValueError(f"{name}.sample: shape {shape} has {shape[0]} channels, the model has {C}")
            shape = shape[1:]
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{name}.sample: shape must be (H, W) or (C, H, W) with positive sizes, got {shape}")
        if self.fixed_shape is not None and shape != tuple(self.fixed_shape):
            raise ValueError(f"{name}.sample: this model draws images of shape {(C, *self.fixed_shape)}, got shape "
                             f"{(C, *shape)}")
        return n, (C, *shape)

    def sequence(self, n=None, shape=None, cond=None):
        """The :class:`fastar.sampling.Sequence` of one sampling run (see the module docstring)."""
        from fastar.sampling import Sequence

        n, (C, H, W) = self.sample_shape(n, shape, cond)
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

        return Sequence(n=n, steps=C * H * W, head=head, forward=forward, slots=slots, shape=(C, H, W), cond=cond)


# ---------------------------------------------------------------------------------------------
# Helpers for image caches.

def checked_codes(name: str, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Given values (a prefix, the codec's data) of a model whose head draws bin centres, in the integer
    codes ``sample`` returns: ValueError naming the codes' range unless they are integers in [0, levels)
    (the centres' own check would speak of values in [-1, 1] the caller never wrote)."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}.sample: prefix must hold integer codes in [0, {levels}), got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.is_floating_point() and x.numel() and not (bool(torch.isfinite(x).all()) and torch.equal(x, x.round())):
        raise ValueError(f"{name}.sample: prefix must hold integer codes in [0, {levels}), got non-integer values")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= levels):
        raise ValueError(f"{name}.sample: prefix codes must lie in [0, {levels}), got range [{int(x.min())}, "
                         f"{int(x.max())}]")
    return x


def new_cache(x_img: torch.Tensor, channels: int) -> torch.Tensor:
    """A zeroed (N, channels, H, W) input map like ``x_img``, stored channels-last: a step gathers every
    channel of a few positions, which is then one contiguous run per tap instead of one cache line
    per channel."""
    n, _, h, w = x_img.shape
    return x_img.new_zeros(n, h, w, channels).permute(0, 3, 1, 2)


class ConvAt:
    """One masked convolution layer on a cache, as :func:`fastar.ops.bind_masked_conv2d_at`: checked
    once at set-up, then ``conv_at(x_new, pos)`` writes ``x_new`` at ``pos`` and returns the output there."""

    def __init__(self, cache, weight, bias, mask, padding, dilation=1):
        self.cache, self.weight, self.bias, self.mask = cache, weight, bias, mask
        self.fn = bind_masked_conv2d_at(cache, weight, bias, mask, tuple(padding), dilation)

    def __call__(self, x_new, pos):
        return self.fn(x_new, pos)


def effective_1x1(conv, mask) -> torch.Tensor:
    """A 1x1 masked conv on one position is a matrix-vector product with weight * mask: (out, in)."""
    return (conv.weight * mask.to(conv.weight.dtype)).flatten(1)


def head_weights(model):
    """(w1, b1, w2, b2) of a model's two 1x1 output convolutions ``head1``, ``head2`` (masks applied)."""
    return (effective_1x1(model.head1, model.head1.mask), model.head1.bias,
            effective_1x1(model.head2, model.head2.mask), model.head2.bias)


def apply_head(head, x):
    """ReLU, 1x1, ReLU, 1x1 on one position's features (N, C) -> (N, out_channels)."""
    w1, b1, w2, b2 = head
    return F.linear(F.relu(F.linear(F.relu(x), w1, b1)), w2, b2)
