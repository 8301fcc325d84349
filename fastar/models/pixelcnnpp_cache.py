"""PixelCNN++'s inference cache: every activation of the network computed exactly once, at the step
it becomes final, over three resolutions.

Every map of the network is kept whole (zero-padded: one row above, one column either side), and
each of its entries is computed once, at the first step at which all of its inputs are known:

- the ``u`` stream (the pixels strictly above: ``u_init``, the ``u`` blocks, their down- and
  up-sampling) is computed a row at a time. At the start of image row i, row ``i >> L`` of every
  ``u`` map of resolution L (L = 0, 1, 2: full, 1/2, 1/4) with ``i % 2**L == 0`` is computed; a
  transposed convolution writes its two output rows ahead into the next resolution's map when its
  input row arrives (rows 2r and 2r + 1 both read input row r only);
- the ``ul`` stream (the pixels above and to the left) is computed a position at a time: at pixel
  (i, j), position ``(i >> L, j >> L)`` of every ``ul`` map of resolution L with ``i`` and ``j``
  divisible by 2**L; a transposed convolution writes its 2x2 output block ahead.

So the down-sampled streams update every 2 or 4 steps (and rows), in the network's own order (up
pass, then down pass), and the step's parameters are the output layer at (i, j). The whole image
costs about one forward pass in total, spread over H x W steps, instead of one forward pass per
step (Ramachandran et al. 2017's caching of strided layers, here with the step's position read on
the host: the cache is not CUDA-graph capturable).

Each convolution runs as the same arithmetic as the full pass on a window: a row of a ``u`` map is
``F.conv2d`` over the two input rows it reads (a few torch ops per layer, once per row); the ``ul``
work of a pixel and the output layer are one :func:`fastar.ops.pixelcnnpp_ul_step` call (a program
over the padded maps, built once per run; the compiled CPU step, or its torch-op twin elsewhere), or,
with ``fused=False``, the window (C, kh, kw) flattened times the flattened weight as torch ops
(:meth:`MultiResolutionCache._position`). Eval mode (no dropout) is the model's own concern.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar.nn.shifted import concat_elu
from fastar.sampling.protocol import InferenceCache

__all__ = ["MultiResolutionCache"]


class _Map:
    """One (N, C, H, W) activation map stored zero-padded: data at ``p[:, :, 1 + i, 1 + j]``."""

    def __init__(self, like, n, c, h, w):
        self.h, self.w = h, w
        self.p = like.new_zeros(n, c, h + 1, w + 2)

    def row(self, r):                       # (N, C, W)
        return self.p[:, :, 1 + r, 1:1 + self.w]

    def at(self, i, j):                     # (N, C)
        return self.p[:, :, 1 + i, 1 + j]


class _Conv:
    """The effective weight of one shifted convolution, as it is used on rows and on windows."""

    def __init__(self, mod, dtype):
        with torch.no_grad():
            self.w = mod.weight.detach().to(dtype)
            self.b = mod.bias.detach().to(dtype)
        self.kh, self.kw = mod.kernel_size if hasattr(mod, "kernel_size") else (1, 1)
        self.left = getattr(mod, "left", 0)
        self.stride = mod.stride[0] if hasattr(mod, "stride") else 1
        self.flat_t = (self.w.flatten(1) if self.w.dim() == 4 else self.w).t().contiguous()    # (in*kh*kw, out)

    def row(self, m: _Map, r: int, width: int, f=None) -> torch.Tensor:
        """Output row r (N, out, width) of the convolution over map m (stride 1 or 2 in both directions)."""
        s = self.stride
        top = s * r - self.kh + 2                                       # padded row of the first tap
        x = m.p.narrow(2, top, self.kh).narrow(3, 1 - self.left, m.p.shape[3] - 1 + self.left)
        if f is not None:
            x = f(x)
        return F.conv2d(x, self.w, self.b, stride=(1, s))[:, :, 0, :width]

    def at(self, m: _Map, i: int, j: int, f=None) -> torch.Tensor:
        """Output (N, out) at (i, j) of the convolution over map m."""
        s = self.stride
        top, lft = s * i - self.kh + 2, s * j - self.left + 1
        x = m.p.narrow(2, top, self.kh).narrow(3, lft, self.kw)
        if f is not None:
            x = f(x)
        return torch.addmm(self.b, x.reshape(x.shape[0], -1), self.flat_t)


class _Block:
    """One gated resnet block's weights and its middle map (``concat_elu`` of the first convolution)."""

    def __init__(self, block, like, n, h, w, cond, dtype):
        self.conv_in = _Conv(block.conv_in, dtype)
        self.conv_out = _Conv(block.conv_out, dtype)
        self.skip = None
        if block.skip is not None:
            with torch.no_grad():
                sw = block.skip.weight.detach().to(dtype)
                self.skip = (sw, block.skip.bias.detach().to(dtype), sw.t().contiguous())
        self.emb = None
        if block.embed is not None:
            with torch.no_grad():
                self.emb = block.embed(cond).detach().to(dtype)         # (N, 2F)
        self.mid = _Map(like, n, 2 * block.channels, h, w)
        self.channels = block.channels

    def _gate(self, x, h):
        c = self.channels
        return x + h[:, :c] * torch.sigmoid(h[:, c:])

    def row(self, x: _Map, out: _Map, r: int, a=None):
        w = out.w
        h = self.conv_in.row(x, r, w, concat_elu)                       # (N, F, W)
        if self.skip is not None:
            h = h + torch.einsum("oc,ncw->now", self.skip[0], concat_elu(a)) + self.skip[1][:, None]
        self.mid.p[:, :, 1 + r, 1:1 + w] = concat_elu(h)
        h = self.conv_out.row(self.mid, r, w)                           # (N, 2F, W)
        if self.emb is not None:
            h = h + self.emb[:, :, None]
        out.p[:, :, 1 + r, 1:1 + w] = self._gate(x.row(r), h)

    def at(self, x: _Map, out: _Map, i: int, j: int, a=None):
        h = self.conv_in.at(x, i, j, concat_elu)                        # (N, F)
        if self.skip is not None:
            h = h + torch.addmm(self.skip[1], concat_elu(a), self.skip[2])
        self.mid.p[:, :, 1 + i, 1 + j] = concat_elu(h)
        h = self.conv_out.at(self.mid, i, j)                            # (N, 2F)
        if self.emb is not None:
            h = h + self.emb
        out.p[:, :, 1 + i, 1 + j] = self._gate(x.at(i, j), h)


class MultiResolutionCache(InferenceCache):
    """PixelCNN++'s cache (see the module docstring). ``fused=False``: the position work as torch ops
    (:meth:`_position`); otherwise one :func:`fastar.ops.pixelcnnpp_ul_step` call per pixel (the
    compiled step where it is built, else its reference twin), the row work as torch ops either way."""

    capturable = False

    def __init__(self, model, run, fused=None):
        super().__init__(run)
        self.fused = fused is not False
        seq = run.seq
        n, (C, H, W) = seq.n, seq.shape
        dt = run.dtype
        like = torch.empty(0, dtype=dt, device=run.device)
        self.H, self.W, self.C = H, W, C
        sizes = [(H, W)]
        for _ in range(2):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self.sizes = sizes
        cond = run.cond

        def new(level, c=model.nr_filters):
            return _Map(like, n, c, *sizes[level])

        # The input: the image in [-1, 1] (written as pixels are drawn) and a channel of ones.
        self.x = new(0, C + 1)
        self.x.p[:, C, 1:, 1:W + 1] = 1.0
        self.u_init = _Conv(model.u_init, dt)
        self.ul_init_down = _Conv(model.ul_init_down, dt)
        self.ul_init_right = _Conv(model.ul_init_right, dt)
        self.out_wt = model.out.weight.detach().to(dt).t().contiguous()
        self.out_b = model.out.bias.detach().to(dt)

        # The up pass: maps in the order the full pass appends them (us, uls), each with its level.
        self.us, self.uls, self.levels = [new(0)], [new(0)], [0]
        self.up_ops = []            # ("block", level, k_in, k_out, u_block, ul_block) / ("down", level, ...)
        for i, level in enumerate(model.up):
            for bu, bul in zip(level.u, level.ul):
                self.us.append(new(i))
                self.uls.append(new(i))
                self.levels.append(i)
                self.up_ops.append(("block", i, len(self.us) - 1, _Block(bu, like, n, *sizes[i], cond, dt),
                                    _Block(bul, like, n, *sizes[i], cond, dt)))
            if i < 2:
                self.us.append(new(i + 1))
                self.uls.append(new(i + 1))
                self.levels.append(i + 1)
                self.up_ops.append(("down", i + 1, len(self.us) - 1, _Conv(model.downsample_u[i], dt),
                                    _Conv(model.downsample_ul[i], dt)))
        # The down pass: which up-pass maps each block takes as its shortcut (the full pass pops them).
        stack = list(range(len(self.us)))
        top = stack.pop()
        self.down_ops = []
        u_prev, ul_prev = self.us[top], self.uls[top]
        for i, level in enumerate(model.down):
            lv = 2 - i
            for bu, bul in zip(level.u, level.ul):
                k = stack.pop()
                assert self.levels[k] == lv
                u_new, ul_new = new(lv), new(lv)
                self.down_ops.append(("block", lv, (u_prev, ul_prev, u_new, ul_new, k),
                                      _Block(bu, like, n, *sizes[lv], cond, dt),
                                      _Block(bul, like, n, *sizes[lv], cond, dt)))
                u_prev, ul_prev = u_new, ul_new
            if i < 2:
                u_new, ul_new = new(lv - 1), new(lv - 1)
                self.down_ops.append(("up", lv, (u_prev, ul_prev, u_new, ul_new, None),
                                      _Conv(model.upsample_u[i], dt), _Conv(model.upsample_ul[i], dt)))
                u_prev, ul_prev = u_new, ul_new
        assert not stack
        self.final = ul_prev
        self.out_buf = like.new_zeros(n, model.dist.param_channels)
        self._build_program()

    def _build_program(self):
        """The position work as a program for :func:`fastar.ops.pixelcnnpp_ul_step` (checked once here)."""
        from fastar.ops import pixelcnnpp as op

        maps, weights, index = [], [], {}

        def mi(m):
            if m is None:
                return -1
            if id(m) not in index:
                index[id(m)] = len(maps)
                maps.append(m.p)
            return index[id(m)]

        def wi(t):
            if t is None:
                return -1
            weights.append(t.contiguous())
            return len(weights) - 1

        prog = []

        def emit(kind, level, dst=None, src=None, mid=None, sa=None, sb=None, w1=None, b1=None, w2=None, b2=None,
                 w3=None, b3=None, emb=None):
            prog.extend([kind, level, mi(dst), mi(src), mi(mid), mi(sa), mi(sb), wi(w1), wi(b1), wi(w2), wi(b2),
                         wi(w3), wi(b3), wi(emb)])

        def block(lv, blk, src, dst, sa, sb=None):
            skip_w, skip_b = (blk.skip[2], blk.skip[1]) if blk.skip is not None else (None, None)
            emit(op.BLOCK, lv, dst, src, blk.mid, sa, sb, blk.conv_in.flat_t, blk.conv_in.b, skip_w, skip_b,
                 blk.conv_out.flat_t, blk.conv_out.b, blk.emb)

        mi(self.x)
        emit(op.INIT, 0, self.uls[0], self.x, w1=self.ul_init_down.flat_t, b1=self.ul_init_down.b,
             w2=self.ul_init_right.flat_t, b2=self.ul_init_right.b)
        for o in self.up_ops:
            kind, lv, k = o[:3]
            if kind == "block":
                block(lv, o[4], self.uls[k - 1], self.uls[k], self.us[k])
            else:
                emit(op.DOWN, lv, self.uls[k], self.uls[k - 1], w1=o[4].flat_t, b1=o[4].b)
        for kind, lv, (u_prev, ul_prev, u_new, ul_new, k), bu, bul in self.down_ops:
            if kind == "block":
                block(lv, bul, ul_prev, ul_new, u_new, self.uls[k])
            else:
                emit(op.UP, lv, ul_new, ul_prev, w1=bul.w.reshape(bul.w.shape[0], -1), b1=bul.b)
        emit(op.OUT, 0, src=self.final, w1=self.out_wt, b1=self.out_b)
        self.maps, self.weights, self.program = maps, weights, prog
        op._check("pixelcnnpp_ul_step", maps, weights, prog, 0, 0, self.out_buf)
        self._op = op.pixelcnnpp_ul_step

    # ---- the row work: every u map's row that becomes final at image row i ----------------------

    def _rows(self, i):
        W = self.W
        # u_init (shifted down): row i is the convolution's row i - 1 over the pixels; row 0 stays 0.
        if i:
            self.us[0].p[:, :, 1 + i, 1:1 + W] = self.u_init.row(self.x, i - 1, W)
        for op in self.up_ops:
            kind, lv, k = op[:3]
            if i % (1 << lv):
                continue
            r = i >> lv
            if kind == "block":
                op[3].row(self.us[k - 1], self.us[k], r)
            else:
                dst = self.us[k]
                dst.p[:, :, 1 + r, 1:1 + dst.w] = op[3].row(self.us[k - 1], r, dst.w)
        for kind, lv, maps, bu, bul in self.down_ops:
            if i % (1 << lv):
                continue
            r = i >> lv
            u_prev, ul_prev, u_new, ul_new, k = maps
            if kind == "block":
                bu.row(u_prev, u_new, r, a=self.us[k].row(r))
            else:                       # transposed: input row r -> output rows 2r, 2r + 1 (cropped)
                y = F.conv_transpose2d(u_prev.row(r).unsqueeze(2), bu.w, bu.b, stride=2)     # (N, F, 2, 2w + 1)
                for d in range(2):
                    rr = 2 * r + d
                    if rr < u_new.h:
                        u_new.p[:, :, 1 + rr, 1:1 + u_new.w] = y[:, :, d, 1:1 + u_new.w]

    # ---- the position work: every ul map's entry that becomes final at pixel (i, j) -------------

    def _position(self, i, j):
        first = self.uls[0]
        v = 0.0
        if i:
            v = self.ul_init_down.at(self.x, i - 1, j)
        if j:
            v = v + self.ul_init_right.at(self.x, i, j - 1)
        if not torch.is_tensor(v):
            v = first.p.new_zeros(first.p.shape[:2])
        first.p[:, :, 1 + i, 1 + j] = v
        for op in self.up_ops:
            kind, lv, k = op[:3]
            if i % (1 << lv) or j % (1 << lv):
                continue
            a, b = i >> lv, j >> lv
            if kind == "block":
                op[4].at(self.uls[k - 1], self.uls[k], a, b, a=self.us[k].at(a, b))
            else:
                self.uls[k].p[:, :, 1 + a, 1 + b] = op[4].at(self.uls[k - 1], a, b)
        for kind, lv, maps, bu, bul in self.down_ops:
            if i % (1 << lv) or j % (1 << lv):
                continue
            a, b = i >> lv, j >> lv
            u_prev, ul_prev, u_new, ul_new, k = maps
            if kind == "block":
                bul.at(ul_prev, ul_new, a, b, a=torch.cat([u_new.at(a, b), self.uls[k].at(a, b)], 1))
            else:                       # transposed: input (a, b) -> the 2x2 output block (2a.., 2b..)
                y = torch.einsum("nc,cokl->nokl", ul_prev.at(a, b), bul.w) + bul.b[:, None, None]
                hh, ww = min(2, ul_new.h - 2 * a), min(2, ul_new.w - 2 * b)
                ul_new.p[:, :, 1 + 2 * a:1 + 2 * a + hh, 1 + 2 * b:1 + 2 * b + ww] = y[:, :, :hh, :ww]

    # ---- the protocol ---------------------------------------------------------------------------

    def plan(self, t):
        return ("row" if t % self.W == 0 else "pixel"), 1

    def step(self, key, t):
        i, j = divmod(t, self.W)
        if j == 0:
            self._rows(i)
        if self.fused:
            self._op(self.maps, self.weights, self.program, i, j, self.out_buf, check=False)
            return self.out_buf.to(self.run.acc, copy=True)
        self._position(i, j)
        h = F.elu(self.final.at(i, j))
        return torch.addmm(self.out_b, h, self.out_wt).to(self.run.acc)

    def update(self, key, t, values):
        i, j = divmod(t, self.W)
        self.x.p[:, :self.C, 1 + i, 1 + j] = values.to(self.x.p.dtype)
