"""Two model families defined only here, to prove the protocol's seams are closed: each registers a
spec, a data set (and a writer or kind where it needs one) from this file alone, and is then held to
the contract suite and run through ``fastar train`` / ``fastar sample`` with no edit elsewhere.

- ``toy_joint_rgb`` (:class:`JointRGB`): RGB images whose steps each draw a whole pixel, R, G and B
  jointly from one discretized logistic mixture component (PixelCNN++'s head: three values and four
  uniforms a step), params of step t a masked linear function of the earlier pixels; its cache is a
  *fused multi-step* cache (``draws = True``, two steps per call, drawing from the engine's
  uniforms and honouring given values itself).
- ``toy_gauss_ar`` (:class:`GaussAR`): real-valued vectors (the ``vector`` kind), each value from a
  mixture of Gaussians whose parameters are a masked linear function of the earlier values (a small
  RNADE-like model); a per-op running-sum cache; written as ``.npy``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastar.data.sets import DATASETS, DataSource, Dataset
from fastar.models import ModelSpec, register
from fastar.models.base import AutoregressiveModel
from fastar.nn.heads import DiscretizedMixLogistic, GaussianMixture
from fastar.sampling import InferenceCache, Sequence

__all__ = ["JointRGB", "GaussAR"]


def _split(x):
    n = len(x) * 9 // 10
    return x[:n], x[n:]


# ---------------------------------------------------------------------------------------------
# Three values a step, a fused multi-step cache.

class JointRGB(AutoregressiveModel):
    """RGB images (N, 3, H, W) of integer codes in [0, 2**num_bits); a step is one pixel (raster order)."""

    def __init__(self, height: int = 1, width: int = 2, num_mixtures: int = 1, num_bits: int = 1):
        super().__init__()
        self.height, self.width, self.num_bits = height, width, num_bits
        self.levels = 2 ** num_bits
        self.dist = DiscretizedMixLogistic(num_mixtures, channels=3, num_bits=num_bits)
        D, P = height * width, self.dist.params
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(D, D, P, 3, generator=g) * 0.3)   # step t's params from pixel s
        self.bias = nn.Parameter(torch.randn(D, P, generator=g) * 0.3)
        self.register_buffer("mask", torch.ones(D, D).tril(-1)[:, :, None, None], persistent=False)

    def centres(self, codes):
        return codes.to(self.bias.dtype) * (2.0 / (self.levels - 1)) - 1.0

    def codes(self, v):
        return torch.round((v + 1.0) * (self.levels - 1) / 2.0).to(torch.int64)

    def params_of(self, v):
        """v (N, 3, H, W) bin centres -> (N, P, H, W): every pixel's mixture parameters."""
        n = v.shape[0]
        vs = v.flatten(2).transpose(1, 2)                                          # (N, D, 3)
        w = self.weight * self.mask
        # Pixel by pixel in step order, the very sums the cache accumulates: cached == naive bit for bit.
        p = self.bias.expand(n, -1, -1)                                            # (N, D, P)
        for s in range(vs.shape[1]):
            p = p + torch.einsum("tpc,nc->ntp", w[:, s], vs[:, s])
        return p.transpose(1, 2).reshape(n, self.dist.params, self.height, self.width)

    def nll(self, x, cond=None):
        if cond is not None:
            raise ValueError("JointRGB is unconditional; cond must be None")
        want = (3, self.height, self.width)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"JointRGB: x must be an image batch (N, {', '.join(map(str, want))}), got shape "
                             f"{list(getattr(x, 'shape', []))}")
        if x.is_floating_point():
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError("JointRGB: x must hold integer codes, got NaN or inf")
            if not torch.equal(x, x.round()):
                raise ValueError("JointRGB: x must hold integer codes")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.levels):
            raise ValueError(f"JointRGB: x values must lie in [0, {self.levels})")
        v = self.centres(x)
        return self.dist.nll(v, self.params_of(v), reduction="none")

    def sequence(self, n=None, shape=None, cond=None):
        H, W = self.height, self.width
        if cond is not None:
            raise ValueError("JointRGB is unconditional; cond must be None")
        if shape is not None and (not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                                  or tuple(shape) not in ((H, W), (3, H, W))):
            raise ValueError(f"JointRGB.sample: shape must be ({H}, {W}), got {shape!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"JointRGB.sample: n must be a positive int, got {n!r}")
        D = H * W
        slots = torch.arange(D)[:, None] + D * torch.arange(3)[None, :]           # (T, 3): pixel p's R, G, B

        def forward(values, t=None):
            p = self.params_of(values.view(-1, 3, H, W).to(self.bias.dtype))     # (N, P, H, W)
            per = p.flatten(2).permute(2, 0, 1)                                   # (T, N, P)
            return per if t is None else per[t]

        return Sequence(n=n, steps=D, head=self.dist, forward=forward, slots=slots, shape=(3, H, W),
                        finish=lambda values: self.codes(values).view(-1, 3, H, W), encode=self.centres)

    def allocate_inference_cache(self, run, fused=None):
        return _JointFused(self, run) if fused in (None, True) else _JointPerOp(self, run)


class _JointPerOp(InferenceCache):
    """Running sums of every later step's parameters: step t reads its row, then adds pixel t's part."""

    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        self.w = (model.weight * model.mask).detach().to(run.dtype)              # (D, D, P, 3)
        self.acc = model.bias.detach().to(run.dtype).expand(run.seq.n, -1, -1).clone()   # (N, D, P)

    def step(self, key, t):
        return self.acc[:, t].to(self.run.acc)

    def update(self, key, t, values):
        self.acc = self.acc + torch.einsum("tpc,nc->ntp", self.w[:, t], values.to(self.acc.dtype))


class _JointFused(_JointPerOp):
    """The same sums, two steps a call, drawing inside from the engine's uniforms (what a fused kernel
    does): the head's own draw, the given values kept, ``run.values`` written, ``run.t`` advanced."""

    draws = True

    def plan(self, t):
        return "chunk", 2

    def advance(self, key, t, k):
        run = self.run
        for s in range(t, t + k):
            p = self.acc[:, s].to(run.acc)
            v = run.seq.head.draw(p, run.noise[s], run.temperature).to(run.values.dtype)
            cols = run.slot_table[s]
            if run.given_mask is not None:
                v = torch.where(run.given_mask[:, cols], run.given_values[:, cols], v)
            run.values[:, cols] = v
            self.update(key, s, v)
            self.params = p
        run.t.add_(k)


def _toy_rgb(levels, holdout, **_):
    levels = 2 if levels is None else levels
    if levels not in (2, 4):
        raise ValueError(f"--levels must be 2 or 4 for toy_rgb, got {levels}")
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, levels, (400, 3, 1, 1), generator=g)
    flip = torch.rand(400, 3, 1, 1, generator=g) < 0.1
    second = torch.where(flip, torch.randint(0, levels, (400, 3, 1, 1), generator=g), first)
    x = torch.cat([first, second], 3)                                            # the second pixel copies the first
    return Dataset("toy_rgb", "image", levels, (3, 1, 2), *_split(x))


# ---------------------------------------------------------------------------------------------
# A real-valued head.

class GaussAR(AutoregressiveModel):
    """Real vectors (N, D): value d from a mixture of Gaussians with parameters linear in values < d."""

    def __init__(self, features: int = 3, num_mixtures: int = 2):
        super().__init__()
        self.features = features
        self.dist = GaussianMixture(num_mixtures)
        P = self.dist.params
        g = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(features, features, P, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(features, P, generator=g) * 0.3)
        self.register_buffer("mask", torch.ones(features, features).tril(-1)[:, :, None], persistent=False)

    def params_of(self, x):
        """x (N, D) -> (N, P, D)."""
        x = x.to(self.bias.dtype)
        w = self.weight * self.mask
        # Value by value in step order, the very sums the cache accumulates: cached == naive bit for bit
        # (real values show any difference in the last bits, unlike a categorical draw).
        p = self.bias.expand(x.shape[0], -1, -1)                                   # (N, D, P)
        for s in range(self.features):
            p = p + x[:, s, None, None] * w[:, s][None]
        return p.transpose(1, 2)

    def nll(self, x, cond=None):
        if cond is not None:
            raise ValueError("GaussAR is unconditional; cond must be None")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"GaussAR: x must be a batch of vectors (N, {self.features}), got shape "
                             f"{list(getattr(x, 'shape', []))}")
        if not x.is_floating_point():
            raise ValueError(f"GaussAR: x must hold real values (floats), got {x.dtype}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("GaussAR: x must be finite, got NaN or inf")
        return self.dist.nll(x, self.params_of(x), reduction="none")

    def sequence(self, n=None, shape=None, cond=None):
        D = self.features
        if cond is not None:
            raise ValueError("GaussAR is unconditional; cond must be None")
        if shape is not None and (not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                                  or tuple(shape) != (D,)):
            raise ValueError(f"GaussAR.sample: shape must be ({D},), got {shape!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"GaussAR.sample: n must be a positive int, got {n!r}")

        def forward(values, t=None):
            per = self.params_of(values).permute(2, 0, 1)                          # (T, N, P)
            return per if t is None else per[t]

        return Sequence(n=n, steps=D, head=self.dist, forward=forward, shape=(D,))

    def allocate_inference_cache(self, run, fused=None):
        if fused:
            raise ValueError("fused=True: GaussAR has no fused step")
        return _GaussSums(self, run)


class _GaussSums(InferenceCache):
    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        self.w = (model.weight * model.mask).detach().to(run.dtype)              # (D, D, P)
        self.acc = model.bias.detach().to(run.dtype).expand(run.seq.n, -1, -1).clone()   # (N, D, P)

    def step(self, key, t):
        return self.acc[:, t].to(self.run.acc)

    def update(self, key, t, values):
        self.acc = self.acc + values.to(self.acc.dtype)[:, :, None] * self.w[:, t][None]


def _toy_gauss(levels, holdout, **_):
    if levels is not None:
        raise ValueError("toy_gauss holds real values; drop --levels")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(600, generator=g)
    x1 = 0.8 * x0 + 0.3 * torch.randn(600, generator=g)
    x2 = x1 - x0 + 0.2 * torch.randn(600, generator=g)
    x = torch.stack([x0, x1, x2], 1)
    return Dataset("toy_gauss", "vector", None, (3,), *_split(x))


# ---------------------------------------------------------------------------------------------
# Registration: the only place these families are named.

DATASETS.setdefault("toy_rgb", DataSource("image", _toy_rgb, "test-only: 1x2 RGB images, pixel 2 copies pixel 1"))
DATASETS.setdefault("toy_gauss", DataSource("vector", _toy_gauss, "test-only: correlated 3-D Gaussian vectors"))

register(ModelSpec(
    name="toy_joint_rgb", cls=JointRGB, kind="image", datasets=("toy_rgb",), writer="png",
    default_config=lambda data: dict(height=data["shape"][1], width=data["shape"][2],
                                     num_bits=int(math.log2(data["levels"]))),
    tiny=(dict(config=dict(height=1, width=2), shape=(1, 2)),),
    description="test-only: a pixel's R, G, B drawn jointly, a fused multi-step cache"))
register(ModelSpec(
    name="toy_gauss_ar", cls=GaussAR, kind="vector", datasets=("toy_gauss",), writer="npy",
    default_config=lambda data: dict(features=data["shape"][0]),
    tiny=(dict(config=dict(features=2, num_mixtures=2), shape=(2,)),),
    description="test-only: real-valued vectors, a Gaussian-mixture head"))
