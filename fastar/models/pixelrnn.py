"""PixelRNN (van den Oord et al. 2016): Row LSTM and Diagonal BiLSTM image models.

``PixelRNN(kind="diagonal"|"row", in_channels=1|3, levels=256, layers=12, hidden=None,
residual=True, num_classes=None, kernel_size=3)``:

- a 7x7 mask-A convolution from the image to 2h channels;
- ``layers`` residual LSTM layers (section 3.4): the input-to-state convolution takes the 2h
  channels to h per gate, the LSTM (:class:`fastar.nn.DiagonalBiLSTM` or :class:`fastar.nn.RowLSTM`)
  gives h channels, a 1x1 mask-B convolution takes them back to 2h, and the layer's input is added
  (``residual=False``: no addition);
- ReLU, 1x1 mask-B (2h -> 2h), ReLU, 1x1 mask-B to the logits: one per sub-pixel for a binary
  model (``levels=2``, sigmoid), else a softmax over ``levels`` per colour, [R | G | B] blocks.

hidden defaults to 128 (grey) or 126 (RGB; the colour groups need h divisible by 3). With
``num_classes`` the model is class-conditional (cond = labels (N,) int64, or one int): a learnt
per-class bias is added after the first convolution and reaches every layer through the residual
stream.

One addition to the paper's network, for the Diagonal BiLSTM: its first layer's right-to-left
direction also reads the image through a 1x1 convolution (``row_input``, unmasked: that direction's
output is only used one row further down, where the whole row is in the past). Without it the
last pixel of each row, (i - 1, W - 1), never reaches (i, j) for j < W - 1 - first_kernel_size // 2:
no feature at a position includes that position's own pixel (mask A first, mask B after), the
right-to-left scan of row i - 1 sees only features of row i - 1, and the 7x7 first convolution
carries the pixel only to columns >= W - 4 of row i. (The paper's Figure 2 claims the complete
dependency field; this edge is where it is not.) ``tests/models/test_pixelrnn.py`` checks the full
context by gradients.

Likelihood and sampling are those of every fastar image model (:class:`fastar.models.PixelCNN`):
``nll`` (N,) nats, ``bits_per_dim``, ``sample(n, shape, cond, generator, temperature, method=
"cached"|"naive", prefix, mask)``. The cached sampler (:mod:`fastar.models.pixelrnn_cache`)
computes one LSTM cell per layer per sub-pixel (all of them, the head and the draw in one fused
``pixelrnn_step`` call where the kernel is built), and for the Diagonal BiLSTM one right-to-left
scan per layer per completed row: a whole image costs about one training forward pass, against
C x H x W passes for the naive sampler, and both return the same images from one seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.image import DiscreteImageModel, check_image_config, class_config
from fastar.models.spec import ModelSpec, register
from fastar.nn.lstm import DiagonalBiLSTM, RowLSTM
from fastar.nn.masked_conv import MaskedConv2d

__all__ = ["PixelRNN"]

MAX_LAYERS = 1024            # the paper's deepest network has 12
MAX_WEIGHTS = 10 ** 9        # 4 GB of float32 weights


class _ResidualLSTM(nn.Module):
    """One residual LSTM layer: x (N, 2h, H, W) -> x + out_1x1(lstm(x))."""

    def __init__(self, kind, hidden, color_groups, residual, kernel_size):
        super().__init__()
        c2 = 2 * hidden
        if kind == "diagonal":
            self.lstm = DiagonalBiLSTM(c2, hidden, color_groups)
        else:
            self.lstm = RowLSTM(c2, hidden, kernel_size, color_groups)
        self.out = MaskedConv2d(hidden, c2, 1, "B", color_groups)
        self.residual = residual

    def forward(self, x, r2l_extra=None):
        y = self.out(self.lstm(x) if r2l_extra is None else self.lstm(x, r2l_extra))
        return x + y if self.residual else y


class PixelRNN(DiscreteImageModel):
    """PixelRNN with Diagonal BiLSTM or Row LSTM layers; see the module docstring."""

    def __init__(self, kind: str = "diagonal", in_channels: int = 1, levels: int = 256, layers: int = 12,
                 hidden: int | None = None, residual: bool = True, num_classes: int | None = None,
                 kernel_size: int = 3, first_kernel_size: int = 7):
        super().__init__()
        if kind not in ("diagonal", "row"):
            raise ValueError(f"PixelRNN: kind must be 'diagonal' (Diagonal BiLSTM) or 'row' (Row LSTM), got {kind!r}")
        if hidden is None:
            hidden = 128 if in_channels == 1 else 126
        cg = in_channels if in_channels in (1, 3) else 1
        check_image_config("PixelRNN", in_channels, levels, layers, 2 * hidden if isinstance(hidden, int) else hidden,
                      2 * cg)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"PixelRNN: num_classes must be None or a positive int, got {num_classes!r}")
        if not isinstance(residual, bool):
            raise ValueError(f"PixelRNN: residual must be a bool, got {residual!r}")
        for k, v in (("kernel_size", kernel_size), ("first_kernel_size", first_kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise ValueError(f"PixelRNN: {k} must be an odd positive int, got {v!r}")
        # Bounded before anything is built (the CLI's registry bounds it too, but the API is a door as well):
        # the weights, counted from the config, and the number of layers.
        k = kernel_size if kind == "row" else 2
        per_layer = (2 * hidden) * (4 * hidden) * (k if kind == "row" else 2) + 4 * hidden * hidden * k * (
            1 if kind == "row" else 2) + 2 * hidden * hidden
        if layers * per_layer > MAX_WEIGHTS:
            raise ValueError(f"PixelRNN: layers={layers}, hidden={hidden} is too large to build: more than "
                             f"{MAX_WEIGHTS:,} parameters (about {layers * per_layer:,})")
        if layers > MAX_LAYERS:
            raise ValueError(f"PixelRNN: layers={layers} is too large to build: more than {MAX_LAYERS} layers")
        self.kind, self.in_channels, self.levels, self.hidden = kind, in_channels, levels, hidden
        self.color_groups, self.num_classes, self.residual = cg, num_classes, residual
        c2 = 2 * hidden
        self.input_conv = MaskedConv2d(in_channels, c2, first_kernel_size, "A", cg)
        self.class_bias = nn.Embedding(num_classes, c2) if num_classes else None
        if self.class_bias is not None:
            nn.init.zeros_(self.class_bias.weight)
        self.layers = nn.ModuleList([_ResidualLSTM(kind, hidden, cg, residual, kernel_size) for _ in range(layers)])
        # Diagonal BiLSTM: the image itself, 1x1, into the first layer's right-to-left direction (see
        # the module docstring: without it the last pixel of a row never reaches the next row's left part).
        self.row_input = nn.Conv2d(in_channels, 4 * hidden, 1, bias=False) if kind == "diagonal" else None
        self.head1 = MaskedConv2d(c2, c2, 1, "B", cg)
        self.head2 = MaskedConv2d(c2, self.out_channels, 1, "B", cg)

    def check_cond(self, cond, n, hw):
        """Class labels: an int for the whole batch or (N,) int64 in [0, num_classes), on the model's device."""
        return self.check_class_cond(cond, n, self.num_classes)

    def embed(self, x0, cond):
        """The first convolution's output plus the class bias (when conditional)."""
        if self.class_bias is None:
            return x0
        return x0 + self.class_bias(cond).to(x0.dtype)[:, :, None, None]

    def logits_flat(self, x, cond=None):
        if self.num_classes is not None or cond is not None:
            cond = self.check_cond(cond, x.shape[0], tuple(x.shape[2:]))
        h = self.embed(self.input_conv(x), cond)
        for k, layer in enumerate(self.layers):
            h = layer(h, self.row_input(x)) if k == 0 and self.row_input is not None else layer(h)
        return self.head2(F.relu(self.head1(F.relu(h))))

    def allocate_inference_cache(self, run, fused=None):
        """The cached sampler's state for one run (:mod:`fastar.models.pixelrnn_cache`)."""
        from fastar.models.pixelrnn_cache import PixelRNNCache

        return PixelRNNCache(self, run, fused)


def _config(kind, layers, hidden):
    def config(data: dict) -> dict:
        c = data["shape"][0]
        return dict(kind=kind, in_channels=c, levels=data["levels"], layers=layers,
                    hidden=hidden if c == 1 else 3 * (hidden // 3))
    return config


register(ModelSpec(
    name="pixelrnn", cls=PixelRNN, kind="image", datasets=("mnist", "digits", "patches"),
    default_config=_config("diagonal", 4, 16), conditional_config=class_config, writer="png",
    shipped=("pixelrnn_mnist",), demo_priority=1,  # the demo's model: its samples are the digits they claim
    demo=dict(data="mnist", batch_size=64, lr=3e-3, config=dict(layers=3, hidden=16)),
    tiny=(dict(config=dict(kind="diagonal", in_channels=1, levels=2, layers=2, hidden=4), shape=(2, 2)),
          dict(config=dict(kind="row", in_channels=1, levels=2, layers=2, hidden=4), shape=(2, 3)),
          dict(config=dict(kind="diagonal", in_channels=1, levels=2, layers=1, hidden=4, num_classes=3),
               shape=(2, 2), cond=1),
          dict(config=dict(kind="diagonal", in_channels=3, levels=3, layers=2, hidden=12), shape=(1, 2)),
          dict(config=dict(kind="row", in_channels=3, levels=3, layers=1, hidden=12), shape=(2, 1))),
    description="PixelRNN: Diagonal BiLSTM / Row LSTM layers (fused scans), residual, exact cached sampler"))
