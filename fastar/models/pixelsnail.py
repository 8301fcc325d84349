"""PixelSNAIL (Chen, Mishra, Rohaninejad, Abbeel 2017): gated residual causal convolutions and causal
self-attention over every earlier pixel, with a key/value-cached sampler.

``PixelSNAIL(in_channels=3, channels=256, n_blocks=12, n_res_blocks=5, kernel_size=2, key_channels=16,
value_channels=128, heads=1, nr_logistic_mix=10, levels=None, dropout=0.0, cond_channels=None,
num_bits=8)``. One step is one pixel, in raster order (p = i * W + j):

- the pixel features r: the pixel's values in [-1, 1] (mixture models) or a learnt embedding of its
  code (``levels`` models); the network input is ``[r; 1]`` shifted by one position in raster order
  (position p holds pixel p - 1's, position 0 zeros), then a 1x1 convolution to ``channels``;
- ``n_blocks`` blocks, each: ``n_res_blocks`` gated residual blocks (concat-ELU, a k x k causal
  convolution over the window up and to the left, concat-ELU, dropout, another, a sigmoid gate; the
  conditioning map added before the gate), then the attention: queries from a 1x1 gated residual of
  ``[h; position]``, keys and values also from one of ``[r; h; position]``, the raw pixel features
  included (as in the original; it is what makes the context full), through
  :class:`fastar.nn.CausalSelfAttention2d` (strictly earlier positions, ``heads`` heads, on
  ``torch.nn.functional.scaled_dot_product_attention``), and a 1x1 gated residual of h with the
  attention output as its auxiliary input;
- ELU and a 1x1 convolution to the head's parameters: a :class:`fastar.nn.heads.DiscretizedMixLogistic`
  of ``nr_logistic_mix`` components over the ``in_channels`` (1 or 3) values of a pixel, drawn jointly
  (``levels=None``; values in [0, 2**num_bits)), or a :class:`fastar.nn.heads.Categorical` over
  ``levels`` codes (one channel: a VQ-VAE code map).

Full context: pixel s reaches every later pixel p through the first attention layer (p's query
meets s's key and value, which read pixel s itself), for any kernel size, odd or even, and the
causal convolutions add the local path. ``tests/models/test_pixelsnail.py`` checks by gradients
that every earlier pixel, and no later one, reaches each pixel. The first pixel attends to nothing
and its attention output is zero.

Conditioning (``cond_channels``): cond is a map (N, cond_channels, h, w) with H = a h and W = b w
for positive integers a, b (a coarser code map, e.g. VQ-VAE-2's top codes for its bottom prior, one
hot or embedded); a 3x3 and a 1x1 convolution on the coarse map, repeated to H x W, enter every
causal gated residual block.

The cached sampler (:mod:`fastar.models.pixelsnail_cache`): per step one position per layer; each
causal convolution reads its k x k window from a padded channels-last input cache, each attention
layer one query against its key/value cache, and after the draw the pixel's key and value are
appended. Preallocated fixed shapes, positions read from ``run.t`` (capturable on CUDA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.image import DiscreteImageModel, checked_codes
from fastar.models.spec import ModelSpec, register
from fastar.nn.attention import CausalSelfAttention2d
from fastar.nn.heads import Categorical, DiscretizedMixLogistic

__all__ = ["PixelSNAIL"]

NAME = "PixelSNAIL"


def concat_elu(x, dim=1):
    return F.elu(torch.cat([x, -x], dim))


def raster_shift(x):
    """(N, C, H, W) -> the same map moved one position on in raster order (position 0 zeros)."""
    n, c, h, w = x.shape
    return F.pad(x.flatten(2), (1, 0))[:, :, :h * w].view(n, c, h, w)


def background(h, w, device=None, dtype=None):
    """(1, 2, H, W): each position's row and column, centred and scaled to about [-0.5, 0.5)."""
    rows = (torch.arange(h, device=device, dtype=dtype) - h / 2) / h
    cols = (torch.arange(w, device=device, dtype=dtype) - w / 2) / w
    return torch.stack([rows[:, None].expand(h, w), cols[None, :].expand(h, w)])[None]


class CausalConv2d(nn.Conv2d):
    """k x k convolution over the window up and to the left of a position, the position included:
    out(i, j) reads in(i - a, j - b) for 0 <= a, b < k (zeros outside). Any k >= 1."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__(in_channels, out_channels, kernel_size)
        self.k = kernel_size

    def forward(self, x):
        k = self.k
        return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), self.weight, self.bias)


class GatedResidual(nn.Module):
    """x + a * sigmoid(b), [a; b] = conv2(dropout(concat_elu(conv1(concat_elu(x)) + aux_proj(concat_elu(aux)))))
    + cond_proj(cond); conv1 and conv2 are k x k causal convolutions (``kernel_size`` > 0) or 1x1."""

    def __init__(self, channels, kernel_size=1, aux_channels=0, cond_channels=0, dropout=0.0):
        super().__init__()
        conv = (lambda i, o: CausalConv2d(i, o, kernel_size)) if kernel_size > 1 else (lambda i, o: nn.Conv2d(i, o, 1))
        self.channels, self.kernel_size = channels, kernel_size
        self.conv1 = conv(2 * channels, channels)
        self.conv2 = conv(2 * channels, 2 * channels)
        self.aux = nn.Conv2d(2 * aux_channels, channels, 1) if aux_channels else None
        self.cond = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x, aux=None, cond=None):
        c = self.conv1(concat_elu(x))
        if self.aux is not None:
            c = c + self.aux(concat_elu(aux))
        c = self.conv2(self.drop(concat_elu(c)))
        if self.cond is not None and cond is not None:
            c = c + self.cond(cond)
        a, b = c.chunk(2, 1)
        return x + a * torch.sigmoid(b)


class _Block(nn.Module):
    def __init__(self, raw, channels, n_res, kernel_size, key, value, heads, dropout, cond):
        super().__init__()
        self.res = nn.ModuleList(GatedResidual(channels, kernel_size, cond_channels=cond, dropout=dropout)
                                 for _ in range(n_res))
        self.q_in = GatedResidual(channels + 2, 1, dropout=dropout)
        self.kv_in = GatedResidual(raw + channels + 2, 1, dropout=dropout)
        self.attn = CausalSelfAttention2d(channels + 2, key, value, heads, dropout, raw_channels=raw + channels + 2)
        self.out = GatedResidual(channels, 1, aux_channels=value, dropout=dropout)

    def forward(self, h, r, bg, cond):
        for blk in self.res:
            h = blk(h, cond=cond)
        hb = torch.cat([h, bg], 1)
        q = self.q_in(hb)
        kv = self.kv_in(torch.cat([r, hb], 1))
        return self.out(h, aux=self.attn(q, kv))


def _check_int(what, v, lo=1, allow_none=False):
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{NAME}: {what} must be {'None or ' if allow_none else ''}an int >= {lo}, got {v!r}")
    return v


class PixelSNAIL(DiscreteImageModel):
    """PixelSNAIL over discrete images or code maps (see the module docstring).

    Mixture models (``levels=None``): x (N, in_channels, H, W) int in [0, 2**num_bits), one pixel's
    values drawn jointly from a discretized logistic mixture. Code models (``levels=L``, in_channels
    must be 1): x (N, 1, H, W) int codes in [0, L), a softmax over L per position. ``nll`` (N,) nats,
    ``bits_per_dim`` per value, ``sample(..., method="cached"|"naive", prefix, mask, cond)``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 256, n_blocks: int = 12, n_res_blocks: int = 5,
                 kernel_size: int = 2, key_channels: int = 16, value_channels: int = 128, heads: int = 1,
                 nr_logistic_mix: int = 10, levels: int | None = None, dropout: float = 0.0,
                 cond_channels: int | None = None, num_bits: int = 8):
        super().__init__()
        if in_channels not in (1, 3) or isinstance(in_channels, bool):
            raise ValueError(f"{NAME}: in_channels must be 1 or 3, got {in_channels!r}")
        for what, v in (("channels", channels), ("n_blocks", n_blocks), ("kernel_size", kernel_size),
                        ("key_channels", key_channels), ("value_channels", value_channels), ("heads", heads),
                        ("nr_logistic_mix", nr_logistic_mix)):
            _check_int(what, v)
        _check_int("n_res_blocks", n_res_blocks, lo=0)
        _check_int("cond_channels", cond_channels, allow_none=True)
        _check_int("levels", levels, lo=2, allow_none=True)
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"{NAME}: num_bits must be an int in [1, 16], got {num_bits!r}")
        if key_channels % heads or value_channels % heads:
            raise ValueError(f"{NAME}: key_channels ({key_channels}) and value_channels ({value_channels}) must be "
                             f"divisible by heads ({heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{NAME}: dropout must be a float in [0, 1), got {dropout!r}")
        if levels is not None and in_channels != 1:
            raise ValueError(f"{NAME}: levels={levels} is a categorical head over codes, one channel: in_channels "
                             f"must be 1, got {in_channels} (images of 3 channels use the mixture: levels=None)")
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.n_blocks, self.n_res_blocks, self.heads = n_blocks, n_res_blocks, heads
        self.key_channels, self.value_channels, self.nr_logistic_mix = key_channels, value_channels, nr_logistic_mix
        self.cond_channels, self.dropout, self.num_bits = cond_channels, float(dropout), num_bits
        self.codes = levels is not None
        self.levels = levels if self.codes else 2 ** num_bits
        if self.codes:
            self.dist = Categorical(levels)
            self.raw_channels = min(channels, 64)
            self.embed = nn.Embedding(levels, self.raw_channels)
        else:
            self.dist = DiscretizedMixLogistic(nr_logistic_mix, in_channels, num_bits)
            self.raw_channels = in_channels
            self.embed = None
        R = self.raw_channels
        self.in_proj = nn.Conv2d(R + 1, channels, 1)
        cc = channels if cond_channels else 0
        if cond_channels:
            self.cond_net = nn.Sequential(nn.Conv2d(cond_channels, channels, 3, padding=1), nn.ELU(),
                                          nn.Conv2d(channels, channels, 1))
        self.blocks = nn.ModuleList(_Block(R, channels, n_res_blocks, kernel_size, key_channels, value_channels,
                                           heads, dropout, cc) for _ in range(n_blocks))
        self.out = nn.Conv2d(channels, self.dist.params, 1)

    @property
    def head(self):
        return self.dist

    @property
    def out_channels(self):
        return self.dist.params

    # ---- inputs
    def raw(self, x):
        """x (N, C, H, W) integer codes -> the pixel features r (N, R, H, W)."""
        if self.codes:
            return self.embed(x[:, 0].long()).permute(0, 3, 1, 2)
        return self.centres(x)

    def centres(self, x):
        dtype = self.out.weight.dtype
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def to_codes(self, v):
        return torch.round((v + 1.0) * ((self.levels - 1) / 2.0)).to(torch.int64)

    def check_cond(self, cond, n, hw):
        """The conditioning map (N, cond_channels, h, w) with H, W integer multiples of h, w; None for an
        unconditional model. Returns it on the model's device and dtype."""
        if self.cond_channels is None:
            if cond is not None:
                raise ValueError(f"{NAME} is unconditional (cond_channels=None); cond must be None")
            return None
        H, W = hw
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4 or cond.shape[1] != self.cond_channels:
            raise ValueError(f"{NAME}: cond must be a conditioning map (N, {self.cond_channels}, h, w), got "
                             f"{type(cond).__name__} {list(getattr(cond, 'shape', []))}")
        if not cond.is_floating_point() or (cond.numel() and not bool(torch.isfinite(cond).all())):
            raise ValueError(f"{NAME}: cond must be a finite floating-point map (one-hot codes or features)")
        if cond.shape[0] != n:
            raise ValueError(f"{NAME}: cond has batch {cond.shape[0]}, but the batch is {n}")
        h, w = cond.shape[2:]
        if h < 1 or w < 1 or H % h or W % w:
            raise ValueError(f"{NAME}: the conditioning map must be the image's size divided by an integer scale, "
                             f"got {h}x{w} for a {H}x{W} image (not an integer scale)")
        return cond.to(self.out.weight)

    def cond_features(self, cond, hw):
        """(N, channels, H, W): the conditioning map's features repeated to the image size, or None."""
        if cond is None:
            return None
        H, W = hw
        c = self.cond_net(cond)
        return c.repeat_interleave(H // cond.shape[2], 2).repeat_interleave(W // cond.shape[3], 3)

    # ---- the network
    def net(self, r, cond=None):
        """Pixel features r (N, R, H, W) -> every pixel's head parameters (N, P, H, W); cond checked."""
        n, _, H, W = r.shape
        bg = background(H, W, r.device, r.dtype).expand(n, -1, -1, -1)
        ones = torch.ones(n, 1, H, W, device=r.device, dtype=r.dtype)
        h = self.in_proj(raster_shift(torch.cat([r, ones], 1)))
        cf = self.cond_features(cond, (H, W))
        for blk in self.blocks:
            h = blk(h, r, bg, cf)
        return self.out(F.elu(h))

    def params(self, x, cond=None):
        """(N, P, H, W) head parameters of integer images x, after the image and cond checks."""
        self.check_image(x)
        cond = self.check_cond(cond, x.shape[0], tuple(x.shape[2:]))
        return self.net(self.raw(x), cond)

    def forward(self, x, cond=None):
        """Every pixel's head parameters (N, P, H, W) (mixture: P = 10K for RGB, 3K for one channel;
        codes: P = levels logits) of integer images x (N, C, H, W)."""
        return self.params(x, cond)

    def nll(self, x, cond=None):
        """Negative log-likelihood per image in nats, (N,)."""
        p = self.params(x, cond)
        if self.codes:
            return self.dist.nll(x.long(), p, reduction="none")
        return self.dist.nll(self.centres(x), p, reduction="none")

    # ---- the generation protocol
    def sequence(self, n=None, shape=None, cond=None):
        from fastar.sampling import Sequence

        n, (C, H, W) = self.sample_shape(n, shape, cond)
        cond = self.check_cond(cond, n, (H, W))
        L = H * W
        slots = torch.arange(L)[:, None] + L * torch.arange(C)[None, :]            # (T, C): pixel p's channels

        def forward(values, t=None):
            v = values.view(n, C, H, W)
            r = self.raw(v) if self.codes else v.to(self.out.weight.dtype)
            per = self.net(r, cond).flatten(2).permute(2, 0, 1)                    # (T, N, P)
            return per if t is None else per[t]

        if self.codes:
            return Sequence(n=n, steps=L, head=self.dist, forward=forward, slots=slots, shape=(C, H, W), cond=cond)
        return Sequence(n=n, steps=L, head=self.dist, forward=forward, slots=slots, shape=(C, H, W), cond=cond,
                        finish=lambda values: self.to_codes(values).view(values.shape[0], C, H, W),
                        encode=lambda x: self.centres(checked_codes(type(self).__name__, x, self.levels)))

    def allocate_inference_cache(self, run, fused=None):
        from fastar.models.pixelsnail_cache import PixelSNAILCache

        if fused:
            raise ValueError(f"fused=True: {NAME} has no fused step (its cached step is per-op)")
        return PixelSNAILCache(self, run)


# ---------------------------------------------------------------------------- registration

def _config(data: dict) -> dict:
    c, levels = data["shape"][0], data["levels"]
    small = dict(channels=32, n_blocks=2, n_res_blocks=1, key_channels=16, value_channels=32)
    if levels > 256 or c == 1 and (levels & (levels - 1)):
        if c != 1:
            raise ValueError(f"{NAME}: {levels} levels of {c} channels: the categorical head models one channel "
                             "of codes, the mixture 2**b levels")
        return dict(in_channels=1, levels=levels, **small)
    if levels & (levels - 1):
        raise ValueError(f"{NAME}: the mixture head models 2**b levels a value; the data has {levels} "
                         "(choose --levels 2, 4, ..., 256)")
    return dict(in_channels=c, num_bits=int(math.log2(levels)), nr_logistic_mix=5, **small)


register(ModelSpec(
    name="pixelsnail", cls=PixelSNAIL, kind="image", datasets=("patches", "patch_codes", "mnist", "digits"),
    default_config=_config, writer="png",
    demo=dict(data="patch_codes", batch_size=16, lr=3e-3),
    tiny=(dict(config=dict(in_channels=3, channels=8, n_blocks=1, n_res_blocks=1, kernel_size=2, key_channels=4,
                           value_channels=4, nr_logistic_mix=2, num_bits=1), shape=(1, 2)),
          dict(config=dict(in_channels=1, levels=3, channels=8, n_blocks=2, n_res_blocks=1, kernel_size=3,
                           key_channels=4, value_channels=6, heads=2), shape=(2, 2)),
          dict(config=dict(in_channels=1, channels=8, n_blocks=1, n_res_blocks=2, kernel_size=1, key_channels=4,
                           value_channels=4, nr_logistic_mix=2, num_bits=2), shape=(2, 3))),
    description="PixelSNAIL: gated causal convolutions + causal self-attention over every earlier pixel, "
                "a key/value-cached sampler; a code prior with levels="))
