"""FVSBN, the fully visible sigmoid belief network (Frey 1998): the smallest autoregressive model,
and the worked example of adding a family (``docs/architecture.md``).

Over binary images x (N, C, H, W) in the raster order of every image model here (step
``t = (i * W + j) * C + c``), with D = C * H * W::

    p(x_t = 1 | x_<t) = sigmoid(b_t + sum_{s < t} W[t, s] x_s)

i.e. one linear layer whose weight is strictly lower-triangular in step order (pytorch-generative's
FVSBN builds the same model from 784 separate ``nn.Linear`` layers). ``nll`` is exact and takes one
masked matrix product. Sampling: the cached sampler keeps the running pre-activations of every later
step and adds one weight column per drawn value (O(D) work per step instead of a full O(D^2) pass).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.image import DiscreteImageModel
from fastar.models.spec import ModelSpec, register
from fastar.sampling.protocol import InferenceCache

__all__ = ["FVSBN"]


class FVSBN(DiscreteImageModel):
    """``FVSBN(in_channels=1, height=28, width=28, levels=2)``: binary images of one fixed size.

    Parameters ``weight`` (D, D) (only its strictly lower triangle is used) and ``bias`` (D,), in
    step order. Devices: any; dtypes: any floating. Likelihood, sampling and the generation protocol
    come from :class:`fastar.models.image.DiscreteImageModel`; this class adds the logits and a
    running-sum cache.
    """

    def __init__(self, in_channels: int = 1, height: int = 28, width: int = 28, levels: int = 2):
        super().__init__()
        for k, v in (("in_channels", in_channels), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FVSBN: {k} must be a positive int, got {v!r}")
        if levels != 2:
            raise ValueError(f"FVSBN models binary images: levels must be 2, got {levels!r}")
        self.in_channels, self.height, self.width, self.levels = in_channels, height, width, 2
        self.fixed_shape = (height, width)
        d = in_channels * height * width
        bound = 1.0 / math.sqrt(d)
        self.weight = nn.Parameter(torch.empty(d, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("mask", torch.ones(d, d).tril(-1), persistent=False)

    @property
    def dim(self) -> int:
        return self.in_channels * self.height * self.width

    def check_image(self, x):
        name = "FVSBN"
        shape = (self.in_channels, self.height, self.width)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name}: x must be a batch of binary images (N, {', '.join(map(str, shape))}), got "
                             f"shape {list(getattr(x, 'shape', []))}")
        if x.numel() and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"{name}: x must hold binary values 0 and 1")

    def _steps(self, x):
        """(N, C, H, W) -> (N, D) in step order (colours inside each pixel)."""
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], math.prod(x.shape[1:]))

    def logits_flat(self, x, cond=None):
        """Logits (N, C, H, W) of p(x_t = 1 | x_<t) at every sub-pixel; x is the network input in [-1, 1]."""
        if cond is not None:
            raise ValueError("FVSBN is unconditional; cond must be None")
        bits = (x + 1.0) * 0.5                                   # exactly 0 or 1 again
        logits = F.linear(self._steps(bits), self.weight * self.mask, self.bias)
        n, c, h, w = x.shape
        return logits.view(n, h, w, c).permute(0, 3, 1, 2)

    def allocate_inference_cache(self, run, fused=None):
        if fused:
            raise ValueError("fused=True: FVSBN has no fused step (its cached step is one column update)")
        return _RunningSums(self, run)


class _RunningSums(InferenceCache):
    """Every step's pre-activation so far, (N, D): step t reads its column, then adds x_t W[:, t]."""

    def __init__(self, model, run):
        super().__init__(run)
        self.w = (model.weight * model.mask).detach().to(run.dtype)
        self.acc = model.bias.detach().to(run.dtype).expand(run.seq.n, -1).clone()

    def step(self, key, t):
        return self.acc.index_select(1, self.run.t).to(self.run.acc)          # (N, 1)

    def update(self, key, t, values):
        col = self.w.index_select(1, self.run.t).t()                         # (1, D)
        self.acc.addmm_(values.to(self.acc.dtype), col)


def _config(data: dict) -> dict:
    c, h, w = data["shape"]
    return dict(in_channels=c, height=h, width=w, levels=data["levels"])


register(ModelSpec(
    name="fvsbn", cls=FVSBN, kind="image", datasets=("mnist", "digits", "binarized_mnist"), default_config=_config,
    writer="png",
    demo=dict(data="mnist", batch_size=64, lr=1e-2),
    tiny=(dict(config=dict(in_channels=1, height=2, width=3), shape=(2, 3)),
          dict(config=dict(in_channels=3, height=1, width=2), shape=(1, 2))),
    description="FVSBN: one strictly lower-triangular masked linear layer, exact likelihood"))
