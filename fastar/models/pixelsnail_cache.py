"""PixelSNAIL's inference cache: causal-convolution input caches and a key/value cache per attention layer.

One step = one pixel p (= ``run.t``). ``step`` runs every layer at position p only: the shifted input
(pixel p - 1's features, kept from the last update), each causal convolution writes its input at p
into a channels-last ring of its last k padded input rows and reads its k x k window (a fixed index table row, chosen on
the device by ``run.t``), each attention layer puts one query against its key/value cache (positions
< p), and the head gives p's parameters. ``update`` takes the drawn pixel: every attention layer's
key and value at p (which read the pixel's own features) are written, and the pixel's features are
kept as the next step's shifted input. All buffers are preallocated with fixed shapes and every
index is read from ``run.t``, so a step can be captured in a CUDA graph; on the CPU the attention
reads only the first t cached positions (the host step index), the rest being masked anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar.models.pixelsnail import background, concat_elu
from fastar.sampling.protocol import InferenceCache

__all__ = ["PixelSNAILCache"]


def _flat(conv):
    """A conv's weight as a matrix over its (a, b, c) window, window rows top to bottom: (out, k*k*in)."""
    w = conv.weight.detach()
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), conv.bias.detach()


def _tables(H, W, k, device):
    """Where position p's input goes in a ring of k padded rows of W + k - 1 (k - 1 zero columns on the left),
    (L,), and its k x k window there, (L, k*k). The padded map's row P (image row P - k + 1) lives in
    ring row P % k: a window reads padded rows i .. i + k - 1, k consecutive ones, so all k ring rows;
    the k - 1 rows above the image are ring rows no image row <= i has written yet, so still zero,
    and in the current row a window reads only columns already written."""
    Wp = W + k - 1
    i = torch.arange(H * W, device=device) // W
    j = torch.arange(H * W, device=device) % W
    a = torch.arange(k, device=device)
    write = ((i + k - 1) % k) * Wp + j + k - 1
    window = (((i[:, None, None] + a[None, :, None]) % k) * Wp + j[:, None, None] + a[None, None, :]).reshape(
        H * W, k * k)
    return write, window


class _Conv:
    """One causal convolution at one position: a channels-last input cache of k padded rows (N, k (W+k-1), Cin).
    ``idx`` = (write (1,), window (k*k,)): the step's rows of :func:`_tables`, picked once a step."""

    def __init__(self, conv, n, H, W, device, dtype):
        k = conv.kernel_size[0]
        self.w, self.b = _flat(conv)
        self.w, self.b = self.w.to(dtype), self.b.to(dtype)
        self.k = k
        if k > 1:
            self.buf = torch.zeros(n, k * (W + k - 1), conv.in_channels, device=device, dtype=dtype)

    def __call__(self, x, idx):
        if self.k == 1:
            return F.linear(x, self.w, self.b)
        write, window = idx
        self.buf.index_copy_(1, write, x.unsqueeze(1))
        win = self.buf.index_select(1, window)                                          # (N, k*k, Cin)
        return F.linear(win.view(x.shape[0], -1), self.w, self.b)


class _Lin:
    """A 1x1 convolution on one position's features."""

    def __init__(self, conv, dtype):
        w, b = _flat(conv)
        self.w, self.b = w.to(dtype), b.to(dtype)

    def __call__(self, x):
        return F.linear(x, self.w, self.b)


class _Gated:
    """:class:`fastar.models.pixelsnail.GatedResidual` at one position."""

    def __init__(self, g, n, H, W, device, dtype):
        self.conv1 = _Conv(g.conv1, n, H, W, device, dtype)
        self.conv2 = _Conv(g.conv2, n, H, W, device, dtype)
        self.aux = _Lin(g.aux, dtype) if g.aux is not None else None
        self.cond = _Lin(g.cond, dtype) if g.cond is not None else None

    def __call__(self, x, idx, aux=None, cond=None):
        c = self.conv1(concat_elu(x), idx)
        if self.aux is not None:
            c = c + self.aux(concat_elu(aux))
        c = self.conv2(concat_elu(c), idx)
        if self.cond is not None and cond is not None:
            c = c + self.cond(cond)
        a, b = c.chunk(2, 1)
        return x + a * torch.sigmoid(b)


class PixelSNAILCache(InferenceCache):
    """See the module docstring."""

    def __init__(self, model, run):
        super().__init__(run)
        n = run.seq.n
        C, H, W = run.seq.shape
        L = H * W
        dev, dt = run.device, run.dtype
        self.model, self.n, self.L = model, n, L
        self.prefix_only = dev.type == "cpu"                 # eager CPU steps: attend over the filled prefix only
        self.in_proj = _Lin(model.in_proj, dt)
        self.out = _Lin(model.out, dt)
        self.bg = background(H, W, dev, dt).flatten(2)[0].t().contiguous()             # (L, 2)
        self.prev = torch.zeros(n, model.raw_channels + 1, device=dev, dtype=dt)       # pixel p-1's [r; 1]
        self.tables = _tables(H, W, model.kernel_size, dev) if model.kernel_size > 1 else None
        with torch.no_grad():
            cf = model.cond_features(run.seq.cond, (H, W))
        self.cond = None if cf is None else cf.to(dt).flatten(2).transpose(1, 2).contiguous()   # (N, L, F)
        self.blocks = []
        for blk in model.blocks:
            self.blocks.append(dict(
                res=[_Gated(g, n, H, W, dev, dt) for g in blk.res],
                q_in=_Gated(blk.q_in, n, H, W, dev, dt), kv_in=_Gated(blk.kv_in, n, H, W, dev, dt),
                out=_Gated(blk.out, n, H, W, dev, dt), attn=blk.attn,
                cache=blk.attn.new_cache(n, L, dev, dt), q=None, hb=None))

    def _raw(self, values):
        m = self.model
        if m.codes:
            return m.embed.weight.detach().to(self.run.dtype).index_select(0, values[:, 0].long())
        return values.to(self.run.dtype)

    def step(self, key, t):
        run = self.run
        pos = run.t
        bg = self.bg.index_select(0, pos).expand(self.n, -1)                            # (N, 2)
        cond = None if self.cond is None else self.cond.index_select(1, pos).squeeze(1)
        length = t if self.prefix_only else None                                    # host t: eager CPU only
        idx = None if self.tables is None else (self.tables[0].index_select(0, pos),
                                                self.tables[1].index_select(0, pos).view(-1))
        h = self.in_proj(self.prev)
        for b in self.blocks:
            for g in b["res"]:
                h = g(h, idx, cond=cond)
            hb = torch.cat([h, bg], 1)
            q = b["q_in"](hb, None)
            a = b["attn"].step_query(q, b["cache"], pos, length)
            b["q"], b["hb"] = q, hb
            h = b["out"](h, None, aux=a)
        return self.out(F.elu(h)).to(run.acc)

    def update(self, key, t, values):
        pos = self.run.t
        r = self._raw(values)                                                          # (N, R)
        for b in self.blocks:
            kv = b["kv_in"](torch.cat([r, b["hb"]], 1), None)
            b["attn"].step_append(b["q"], kv, b["cache"], pos)
        self.prev[:, :-1].copy_(r)
        self.prev[:, -1] = 1.0
