"""PixelCNN++ (Salimans, Karpathy, Chen and Kingma 2017): the paper's network on fastar's generation
protocol, a drop-in for pclucas14/pixel-cnn-pp checkpoints, sampled from multi-resolution caches.

The network (``PixelCNNpp``): the input image scaled to [-1, 1] plus a channel of ones (it marks
the zero padding) starts two streams, ``u`` (a down-shifted (2, 3) convolution shifted down: the
pixels strictly above) and ``ul`` (a down-shifted (1, 3) shifted down plus a down-right-shifted
(2, 1) shifted right: the pixels above and to the left). The up pass runs ``nr_resnet`` gated resnet
blocks per stream at each of three resolutions (full, 1/2, 1/4), with stride-2 shifted convolutions
between them; the ``ul`` blocks take the ``u`` map at the same position as their skip input. The
down pass runs ``nr_resnet``, ``nr_resnet + 1`` and ``nr_resnet + 1`` blocks at 1/4, 1/2 and full
resolution, each taking the matching up-pass output as its U-Net shortcut (``u``: the ``u`` map;
``ul``: the new ``u`` and the old ``ul``), with stride-2 shifted transposed convolutions going back
up. Then ``NIN(elu(ul))`` gives the discretized logistic mixture's parameters at every pixel
(:class:`fastar.nn.DiscretizedMixLogistic`: one component per pixel shared by R, G and B, the
channel coefficients). Every layer is weight-normalised; dropout (element-wise as the paper, or
whole channels with ``channel_dropout=True`` as pclucas14's port) sits inside each block; with
``num_classes`` each block adds a learned class embedding before its gate.

Maps of any size work (a stride-2 layer gives ceil(H / 2); the transposed layers crop back to the
shortcut's size); 32x32 is the paper's. Likelihoods are exact (nats); a generation step is one
pixel, its C sub-pixels drawn jointly (R, then G given R, then B given R and G, from one component).
"""
from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.image import DiscreteImageModel, checked_codes, class_config
from fastar.models.spec import ModelSpec, register
from fastar.nn.heads import DiscretizedMixLogistic
from fastar.nn.shifted import (NIN, DownRightShiftedConv2d, DownRightShiftedConvTranspose2d, DownShiftedConv2d,
                               DownShiftedConvTranspose2d, GatedResnet)

__all__ = ["PixelCNNpp"]


class _Level(nn.Module):
    """The gated resnet blocks of one resolution of one pass: ``u[k]`` and ``ul[k]``."""

    def __init__(self, blocks, filters, u_skip, ul_skip, dropout, num_classes, channel_dropout):
        super().__init__()
        kw = dict(dropout=dropout, num_classes=num_classes, channel_dropout=channel_dropout)
        self.u = nn.ModuleList([GatedResnet(filters, "down", u_skip, **kw) for _ in range(blocks)])
        self.ul = nn.ModuleList([GatedResnet(filters, "down_right", ul_skip, **kw) for _ in range(blocks)])


class PixelCNNpp(DiscreteImageModel):
    """``PixelCNNpp(in_channels=3, nr_resnet=5, nr_filters=160, nr_logistic_mix=10, dropout=0.5,
    num_classes=None, num_bits=8, channel_dropout=False)`` (see the module docstring).

    Images (N, C, H, W) of integers in [0, 2**num_bits), C = 1 or 3. ``nll`` (N,) nats,
    ``bits_per_dim``, ``loss``, ``sample(..., method="cached"|"naive", prefix, mask, cond)``;
    ``params(x, cond)`` the mixture parameters (N, 3K or 10K, H, W) in openai/pixel-cnn's layout.
    ``from_pclucas14(state_dict_or_path)`` loads that port's checkpoints.
    """

    def __init__(self, in_channels: int = 3, nr_resnet: int = 5, nr_filters: int = 160, nr_logistic_mix: int = 10,
                 dropout: float = 0.5, num_classes: int | None = None, num_bits: int = 8,
                 channel_dropout: bool = False):
        super().__init__()
        name = "PixelCNNpp"
        if in_channels not in (1, 3) or isinstance(in_channels, bool):
            raise ValueError(f"{name}: in_channels must be 1 or 3, got {in_channels!r}")
        for what, v in (("nr_resnet", nr_resnet), ("nr_filters", nr_filters), ("nr_logistic_mix", nr_logistic_mix)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a probability in [0, 1), got {dropout!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"{name}: num_classes must be None or a positive int, got {num_classes!r}")
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"{name}: num_bits must be an int in [1, 16], got {num_bits!r}")
        C, Fn = in_channels, nr_filters
        self.in_channels, self.nr_resnet, self.nr_filters = C, nr_resnet, Fn
        self.nr_logistic_mix, self.num_classes, self.num_bits = nr_logistic_mix, num_classes, num_bits
        self.levels = 2 ** num_bits
        self.dist = DiscretizedMixLogistic(nr_logistic_mix, channels=C, num_bits=num_bits)
        lv = dict(dropout=float(dropout), num_classes=num_classes, channel_dropout=bool(channel_dropout))
        self.u_init = DownShiftedConv2d(C + 1, Fn, (2, 3), shift_output_down=True)
        self.ul_init_down = DownShiftedConv2d(C + 1, Fn, (1, 3), shift_output_down=True)
        self.ul_init_right = DownRightShiftedConv2d(C + 1, Fn, (2, 1), shift_output_right=True)
        self.up = nn.ModuleList([_Level(nr_resnet, Fn, 0, Fn, **lv) for _ in range(3)])
        self.down = nn.ModuleList([_Level(n, Fn, Fn, 2 * Fn, **lv) for n in (nr_resnet, nr_resnet + 1, nr_resnet + 1)])
        self.downsample_u = nn.ModuleList([DownShiftedConv2d(Fn, Fn, (2, 3), stride=2) for _ in range(2)])
        self.downsample_ul = nn.ModuleList([DownRightShiftedConv2d(Fn, Fn, (2, 2), stride=2) for _ in range(2)])
        self.upsample_u = nn.ModuleList([DownShiftedConvTranspose2d(Fn, Fn, (2, 3), stride=2) for _ in range(2)])
        self.upsample_ul = nn.ModuleList([DownRightShiftedConvTranspose2d(Fn, Fn, (2, 2), stride=2)
                                          for _ in range(2)])
        self.out = NIN(Fn, self.dist.param_channels)

    # ---- the network ---------------------------------------------------------------------------

    @property
    def head(self):
        return self.dist

    @property
    def out_channels(self) -> int:
        return self.dist.param_channels

    def check_cond(self, cond, n, hw):
        return self.check_class_cond(cond, n, self.num_classes)

    def logits_flat(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """The mixture parameters (N, P, H, W) of an image already scaled to [-1, 1] (bin centres)."""
        c = self.check_cond(cond, x.shape[0], x.shape[2:])
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        us = [self.u_init(x)]
        uls = [self.ul_init_down(x) + self.ul_init_right(x)]
        for i, level in enumerate(self.up):
            for bu, bul in zip(level.u, level.ul):
                us.append(bu(us[-1], cond=c))
                uls.append(bul(uls[-1], a=us[-1], cond=c))
            if i < 2:
                us.append(self.downsample_u[i](us[-1]))
                uls.append(self.downsample_ul[i](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for i, level in enumerate(self.down):
            for bu, bul in zip(level.u, level.ul):
                u = bu(u, a=us.pop(), cond=c)
                ul = bul(ul, a=torch.cat([u, uls.pop()], 1), cond=c)
            if i < 2:
                size = us[-1].shape[2:]
                u, ul = self.upsample_u[i](u, size), self.upsample_ul[i](ul, size)
        assert not us and not uls
        return self.out(F.elu(ul))

    def params(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Mixture parameters (N, 3K or 10K, H, W) of an integer image batch (openai/pixel-cnn layout)."""
        self.check_image(x)
        return self.logits_flat(self.preprocess(x), cond)

    forward = params

    def nll(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Negative log-likelihood per image in nats, (N,)."""
        params = self.params(x, cond)
        return self.dist.nll(self.preprocess(x).to(params.dtype), params, reduction="none")

    # ---- the generation protocol -------------------------------------------------------------

    def centres(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes -> the bin centres in [-1, 1] the head draws."""
        return self.preprocess(codes)

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        return torch.round((v + 1.0) * ((self.levels - 1) / 2.0)).to(torch.int64)

    def sequence(self, n=None, shape=None, cond=None):
        """One step per pixel in raster order, its C sub-pixels drawn jointly (V = C, U = C + 1)."""
        from fastar.sampling import Sequence

        n, (C, H, W) = self.sample_shape(n, shape, cond)
        cond = self.check_cond(cond, n, (H, W))
        D = H * W
        slots = torch.arange(D)[:, None] + D * torch.arange(C)[None, :]           # (T, C): pixel p's R, G, B

        def forward(values, t=None):
            dtype = next(self.parameters()).dtype
            p = self.logits_flat(values.view(-1, C, H, W).to(dtype), cond)      # (N, P, H, W)
            per = p.flatten(2).permute(2, 0, 1)                                   # (T, N, P)
            return per if t is None else per[t]

        return Sequence(n=n, steps=D, head=self.dist, forward=forward, slots=slots, shape=(C, H, W), cond=cond,
                        finish=lambda values: self.codes(values).view(-1, C, H, W), encode=lambda x: self.centres(checked_codes(type(self).__name__, x, self.levels)))

    def allocate_inference_cache(self, run, fused=None):
        from fastar.models.pixelcnnpp_cache import MultiResolutionCache

        return MultiResolutionCache(self, run, fused)

    # ---- pclucas14/pixel-cnn-pp checkpoints ----------------------------------------------------

    @classmethod
    def from_pclucas14(cls, state_dict_or_path, dropout: float = 0.5, num_classes=None, dtype=torch.float32, **load):
        """A PixelCNNpp holding the weights of a pclucas14/pixel-cnn-pp ``PixelCNN`` state_dict (or a
        path to one saved with ``torch.save``), with or without DataParallel's ``module.`` prefix, its
        weight norm in either form (``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``).

        The config is read from the shapes (``nr_filters``, ``nr_resnet``, ``nr_logistic_mix``,
        ``in_channels``). Every key must be used and every shape must fit, else ValueError naming the
        key. That port normalises its transposed convolutions per *input* channel (PyTorch's
        ``weight_norm`` on a ``ConvTranspose2d`` weight (in, out, kh, kw) with dim 0); fastar's are per
        output channel as in the paper, so those layers are loaded as their effective weights (same
        function, reparametrised). The model comes back with ``channel_dropout=True`` (that port drops
        whole channels) and the given ``dropout`` (its default 0.5); log-likelihoods equal the port's
        forward + ``discretized_mix_logistic_loss`` on the same images. ``dtype``: the model's
        (float32, as the port's; the weights are converted once, in float64).
        """
        sd = _read_state_dict(state_dict_or_path, **load)
        sd = _normalise_keys(sd)
        config = _infer_pclucas14_config(sd)
        model = cls(**config, dropout=dropout, num_classes=num_classes, channel_dropout=True).to(dtype)
        _load_pclucas14(model, sd)
        return model


# ---------------------------------------------------------------------------------------------
# The pclucas14 loader.

def _read_state_dict(src, **load):
    if isinstance(src, (str, os.PathLike)):
        if not os.path.isfile(src):
            raise ValueError(f"PixelCNNpp.from_pclucas14: {os.fspath(src)!r} is not a file")
        try:
            src = torch.load(src, map_location="cpu", weights_only=True, **load)
        except Exception as e:
            raise ValueError(f"PixelCNNpp.from_pclucas14: cannot read {os.fspath(src)!r} as a torch state_dict: "
                             f"{' '.join(str(e).split())[:300]}") from None
    if isinstance(src, nn.Module):
        src = src.state_dict()
    if not isinstance(src, dict) or not src or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in src.items()):
        raise ValueError("PixelCNNpp.from_pclucas14: expected a state_dict (a non-empty dict of names to tensors) "
                         f"of pclucas14/pixel-cnn-pp's PixelCNN, got {type(src).__name__}")
    return src


def _normalise_keys(sd):
    """Drop DataParallel's ``module.`` prefix; the parametrize form of weight norm -> weight_g / weight_v."""
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.parametrizations\.weight\.original0$", ".weight_g", k)
        k = re.sub(r"\.parametrizations\.weight\.original1$", ".weight_v", k)
        out[k] = v
    return out


def _need(sd, key, what="pclucas14/pixel-cnn-pp PixelCNN"):
    if key not in sd:
        raise ValueError(f"PixelCNNpp.from_pclucas14: the state_dict lacks {key!r}; is it a {what} state_dict?")
    return sd[key]


def _infer_pclucas14_config(sd):
    v = _need(sd, "u_init.conv.weight_v")
    if v.dim() != 4 or tuple(v.shape[2:]) != (2, 3) or v.shape[1] not in (2, 4):
        raise ValueError(f"PixelCNNpp.from_pclucas14: u_init.conv.weight_v has shape {list(v.shape)}, expected "
                         "(nr_filters, in_channels + 1, 2, 3) with in_channels 1 or 3")
    filters, in_channels = v.shape[0], v.shape[1] - 1
    nr_resnet = 0
    while f"up_layers.0.u_stream.{nr_resnet}.conv_input.conv.weight_v" in sd:
        nr_resnet += 1
    if nr_resnet == 0:
        raise ValueError("PixelCNNpp.from_pclucas14: the state_dict has no up_layers.0.u_stream blocks; is it a "
                         "pclucas14/pixel-cnn-pp PixelCNN state_dict?")
    out = _need(sd, "nin_out.lin_a.weight_v")
    per = 3 if in_channels == 1 else 10
    if out.dim() != 2 or out.shape[0] % per:
        raise ValueError(f"PixelCNNpp.from_pclucas14: nin_out.lin_a.weight_v has shape {list(out.shape)}, expected "
                         f"({per} * nr_logistic_mix, {filters})")
    return dict(in_channels=int(in_channels), nr_resnet=nr_resnet, nr_filters=int(filters),
                nr_logistic_mix=int(out.shape[0] // per))


def _key_map(model):
    """fastar parameter name -> (pclucas14 module prefix, kind): kind 'conv' (its .conv), 'deconv'
    (its .deconv, per-input-channel weight norm) or 'nin' (its .lin_a, a Linear)."""
    m = {"u_init": ("u_init.conv", "conv"), "ul_init_down": ("ul_init.0.conv", "conv"),
         "ul_init_right": ("ul_init.1.conv", "conv"), "out": ("nin_out.lin_a", "nin")}
    for p, (ours, theirs) in enumerate((("up", "up_layers"), ("down", "down_layers"))):
        for i, level in enumerate(getattr(model, ours)):
            for stream, their_stream in (("u", "u_stream"), ("ul", "ul_stream")):
                for k, block in enumerate(getattr(level, stream)):
                    base, tb = f"{ours}.{i}.{stream}.{k}", f"{theirs}.{i}.{their_stream}.{k}"
                    m[f"{base}.conv_in"] = (f"{tb}.conv_input.conv", "conv")
                    m[f"{base}.conv_out"] = (f"{tb}.conv_out.conv", "conv")
                    if block.skip is not None:
                        m[f"{base}.skip"] = (f"{tb}.nin_skip.lin_a", "nin")
    for i in range(2):
        m[f"downsample_u.{i}"] = (f"downsize_u_stream.{i}.conv", "conv")
        m[f"downsample_ul.{i}"] = (f"downsize_ul_stream.{i}.conv", "conv")
        m[f"upsample_u.{i}"] = (f"upsize_u_stream.{i}.deconv", "deconv")
        m[f"upsample_ul.{i}"] = (f"upsize_ul_stream.{i}.deconv", "deconv")
    return m


def _load_pclucas14(model, sd):
    used, new = set(), {}
    mods = dict(model.named_modules())
    for ours, (theirs, kind) in _key_map(model).items():
        mod = mods[ours]
        g = _need(sd, f"{theirs}.weight_g")
        v = _need(sd, f"{theirs}.weight_v")
        b = _need(sd, f"{theirs}.bias")
        used.update((f"{theirs}.weight_g", f"{theirs}.weight_v", f"{theirs}.bias"))
        want_v = tuple(mod.weight_v.shape)
        if tuple(v.shape) != want_v or tuple(b.shape) != tuple(mod.bias.shape):
            raise ValueError(f"PixelCNNpp.from_pclucas14: {theirs}.weight_v {list(v.shape)} / bias {list(b.shape)} "
                             f"do not fit {ours} (weight {list(want_v)}, bias {list(mod.bias.shape)})")
        in_dim = 0                                        # torch weight_norm's default dim: the weight's first
        g_shape = [v.shape[0]] + [1] * (v.dim() - 1)
        if g.numel() != v.shape[0] or (g.dim() != 1 and list(g.shape) != g_shape):
            raise ValueError(f"PixelCNNpp.from_pclucas14: {theirs}.weight_g has shape {list(g.shape)}, expected "
                             f"{g_shape} (weight norm over dim {in_dim})")
        v64, g64 = v.double(), g.double().reshape(g_shape)
        w = g64 * v64 / v64.pow(2).sum(list(range(1, v.dim())), keepdim=True).sqrt()   # the port's effective weight
        if kind == "deconv":
            # Re-normalise per output channel (dim 1 of (in, out, kh, kw)): v = w, g = ||w|| over the rest.
            new_v, new_g = w, w.pow(2).sum((0, 2, 3)).sqrt()
        else:
            new_v, new_g = v64, g64.reshape(-1)
        dt = mod.weight_v.dtype
        new[f"{ours}.weight_v"] = new_v.to(dt)
        new[f"{ours}.weight_g"] = new_g.to(dt)
        new[f"{ours}.bias"] = b.to(dt)
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"PixelCNNpp.from_pclucas14: {len(unused)} key(s) of the state_dict fit no layer of a "
                         f"{model.nr_resnet}-block, {model.nr_filters}-filter PixelCNN++ (first: "
                         f"{', '.join(unused[:5])}); refusing to drop weights silently")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(new))
    if missing:
        raise ValueError(f"PixelCNNpp.from_pclucas14: no weights for {', '.join(missing[:5])}")
    model.load_state_dict(new, strict=True)


def _config(data: dict) -> dict:
    c, h, w = data["shape"]
    levels = data["levels"]
    bits = int(round(math.log2(levels)))
    if 2 ** bits != levels:
        raise ValueError(f"PixelCNNpp models 2**num_bits levels; data set {data['name']!r} has {levels}")
    return dict(in_channels=c, nr_resnet=1, nr_filters=32, nr_logistic_mix=5, dropout=0.0, num_bits=bits)


register(ModelSpec(
    name="pixelcnnpp", cls=PixelCNNpp, kind="image", datasets=("patches", "mnist", "digits"), default_config=_config,
    writer="png", conditional_config=class_config,
    demo=dict(data="patches", batch_size=16, lr=2e-3),
    tiny=(dict(config=dict(in_channels=3, nr_resnet=1, nr_filters=4, nr_logistic_mix=2, dropout=0.0, num_bits=1),
               shape=(2, 2)),
          dict(config=dict(in_channels=1, nr_resnet=1, nr_filters=4, nr_logistic_mix=2, dropout=0.0, num_bits=1),
               shape=(3, 4)),
          dict(config=dict(in_channels=1, nr_resnet=1, nr_filters=4, nr_logistic_mix=1, dropout=0.0, num_bits=1,
                           num_classes=3), shape=(3, 4), cond=1)),
    description="PixelCNN++: down/down-right shifted streams over three resolutions, discretized logistic mixture"))
