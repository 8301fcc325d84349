"""The cached sampler of :class:`fastar.models.PixelRNN`: LSTM states instead of full passes.

Step t draws sub-pixel c of pixel (i, j) (raster order, colours inside a pixel). Per step, for
every layer, the cache computes the one LSTM cell at (i, j):

- Diagonal BiLSTM: the left-to-right cell reads its states above, (i - 1, j), and to the left,
  (i, j - 1), both already final; the layer's output adds the right-to-left state at (i - 1, j)
  (the shift down), which is known once row i - 1 is complete. So at the start of each row
  (``plan`` key "row") every layer runs its right-to-left direction over the completed row once,
  right to left (:func:`fastar.ops.diagonal_lstm_scan` on the one flipped row, the states of the
  row above folded into its input term), from the layer inputs the pixel steps stored.
- Row LSTM: the state-to-state term of row i (a width-3 convolution of row i - 1's states) is
  computed once at the row's start; a pixel step adds the 1 x k input-to-state convolution at
  (i, j) (:func:`fastar.ops.masked_conv2d_at` on the layer's input map) and runs the cell.

The 7x7 mask-A first layer is :func:`fastar.ops.masked_conv2d_at` on the image. Why it is exact:
no feature at (i, j) depends on the pixel's own last colour group (mask A first, mask B after:
group g sees only groups < g of its own pixel), so what a pixel's last sub-step computes (before
its draw) is what the full forward pass computes there once the pixel is complete, and every
later step reads only those final values. Recomputing the cell for each colour of a pixel
(R, G, B) is what the full pass would give for that sub-pixel. A whole image costs about one
forward pass of cell work (plus the per-step Python overhead), against C x H x W passes naive.

Two ways to run a sub-pixel: the fused cache (``draws = True``, the default where the kernel is
built, on the CPU up to a batch of :data:`FUSED_CPU_MAX_BATCH`) calls :func:`fastar.ops.pixelrnn_step` once per sub-pixel, which runs every layer's cell,
the residuals, the head and the draw in one C++ call (one CUDA launch); the per-op cache (``fused=
False``, and the fallback) runs the same arithmetic as a few torch ops per layer and lets the
engine draw. The row-start work (the right-to-left scans, the Row LSTM's state term) is the same
Python for both, reading and writing the same per-layer buffers.

The row steps index with the host step index the engine passes them, so they are not
captured in CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.models.image import ConvAt, apply_head, head_weights, new_cache
from fastar.ops import pixelrnn as _step_op
from fastar.ops.lstm_scan import diagonal_lstm_scan
from fastar.sampling.protocol import InferenceCache

__all__ = ["PixelRNNCache", "pack_pixelrnn_step"]


def _cell(z, c_prev, hid):
    sig = torch.sigmoid(z[:, :3 * hid])
    g = torch.tanh(z[:, 3 * hid:])
    c = sig[:, hid:2 * hid] * c_prev + sig[:, :hid] * g if c_prev is not None else sig[:, :hid] * g
    return sig[:, 2 * hid:] * torch.tanh(c), c


def _is_eff(lstm):
    """(4h, C_in) effective 1x1 input-to-state weight of a Diagonal LSTM (mask applied)."""
    return (lstm.is_weight * lstm.is_mask.to(lstm.is_weight.dtype)).flatten(1)


class _DiagonalLayer:
    def __init__(self, layer, n, H, W, like, bufs=None):
        bi = layer.lstm
        f, r = bi.forward_lstm, bi.backward_lstm
        hid = self.hid = bi.hidden
        self.is_wt, self.is_b = _is_eff(f).t().contiguous(), f.is_bias
        self.ss_wt = torch.cat([f.ss_weight[:, :, 0], f.ss_weight[:, :, 1]], 1).t().contiguous()   # (2h, 4h)
        self.r_is_wt, self.r_is_b = _is_eff(r).t().contiguous(), r.is_bias
        self.r_up_wt = r.ss_weight[:, :, 0].t().contiguous()                                        # (h, 4h)
        self.r_ss = r.ss_weight.detach()
        self.out_wt, self.out_b = (layer.out.weight * layer.out.mask).flatten(1).t().contiguous(), layer.out.bias
        self.residual = layer.residual
        if bufs is None:
            bufs = (like.new_zeros(H, W, n, hid), like.new_zeros(H, W, n, hid), like.new_zeros(H, W, n, hid),
                    like.new_zeros(W, n, 2 * hid))
        # left-to-right h and c; right-to-left states, row by row; this row's layer inputs
        self.hf, self.cf, self.hr, self.xrow = bufs
        self.zero = like.new_zeros(n, hid)
        self.W = W

    def pixel(self, x, i, j):
        self.xrow[j].copy_(x)
        z = torch.addmm(self.is_b, x, self.is_wt)
        up = self.hf[i - 1, j] if i else self.zero
        left = self.hf[i, j - 1] if j else self.zero
        z.addmm_(torch.cat([up, left], 1), self.ss_wt)
        h, c = _cell(z, self.cf[i, j - 1] if j else None, self.hid)
        self.hf[i, j].copy_(h)
        self.cf[i, j].copy_(c)
        out = h + self.hr[i - 1, j] if i else h
        y = torch.addmm(self.out_b, out, self.out_wt)
        return y.add_(x) if self.residual else y

    def row(self, r, image_row=None):
        """After row r is complete: the right-to-left states of row r. image_row (W * n, C_img, with the
        model's ``row_input`` weight as ``self.img_wt``): the image's own term, first layer only."""
        W, n, hid = self.W, self.xrow.shape[1], self.hid
        z = torch.addmm(self.r_is_b, self.xrow.view(W * n, -1), self.r_is_wt).view(W, n, 4 * hid)
        if image_row is not None:
            z.view(W * n, -1).addmm_(image_row, self.img_wt)
        if r:
            z.view(W * n, -1).addmm_(self.hr[r - 1].view(W * n, hid), self.r_up_wt)
        # The row, flipped (right to left becomes left to right), as a one-row image: the scan's left
        # tap then reads the state to the right; its row above is zero (folded into z already).
        is_map = z.flip(0).permute(1, 2, 0).unsqueeze(2)                       # (n, 4h, 1, W)
        h, _ = diagonal_lstm_scan(is_map.contiguous(), self.r_ss, None)
        self.hr[r].copy_(h.squeeze(2).flip(2).permute(2, 0, 1))


class _RowLayer:
    def __init__(self, layer, n, H, W, like, bufs=None):
        lstm = layer.lstm
        hid = self.hid = lstm.hidden
        if bufs is None:                                 # the per-op step: the input map and its convolution
            self.xmap = new_cache(like.new_zeros(n, 1, H, W), 2 * hid)
            self.conv = ConvAt(self.xmap, lstm.is_weight, lstm.is_bias, lstm.is_mask, lstm.padding)
            bufs = (like.new_zeros(H, W, n, hid), like.new_zeros(H, W, n, hid), like.new_zeros(W, n, 4 * hid))
        self.ss = lstm.ss_weight.detach()
        self.out_wt, self.out_b = (layer.out.weight * layer.out.mask).flatten(1).t().contiguous(), layer.out.bias
        self.residual = layer.residual
        self.h, self.c, self.ssrow = bufs[:3]            # ssrow: the state-to-state term of the current row

    def pixel(self, x, i, j, pos):
        z = self.conv(x.unsqueeze(-1), pos).squeeze(-1)                       # (n, 4h), a fresh tensor
        z += self.ssrow[j]
        h, c = _cell(z, self.c[i - 1, j] if i else None, self.hid)
        self.h[i, j].copy_(h)
        self.c[i, j].copy_(c)
        y = torch.addmm(self.out_b, h, self.out_wt)
        return y.add_(x) if self.residual else y

    def row(self, r):
        """After row r is complete: row r + 1's state-to-state term from row r's states."""
        prev = self.h[r].permute(1, 2, 0)                                      # (n, h, W)
        ss = F.conv1d(prev, self.ss, padding=self.ss.shape[2] // 2)            # (n, 4h, W)
        self.ssrow.copy_(ss.permute(2, 0, 1))


# The CPU fused step streams every layer's weights once per example and sub-pixel; the per-op cache's
# batched GEMMs reuse them across the batch. Measured with the shipped pixelrnn_mnist on one thread of the
# 2-core Xeon (seconds for a batch, fused / per-op): 16: 0.28 / 0.42, 24: 0.37 / 0.43, 32: 0.48 / 0.46,
# 48: 0.71 / 0.55, 64: 0.94 / 0.63, 500: 8.4 / 4.5. So the default (fused=None) fuses up to this batch.
FUSED_CPU_MAX_BATCH = 32


class PixelRNNCache(InferenceCache):
    """One run's image, per-layer LSTM states and layer inputs (see the module docstring)."""

    capturable = False

    def __init__(self, model, run, fused=None):
        super().__init__(run)
        C, H, W = run.seq.shape
        n, dt = run.seq.n, run.dtype
        self.C, self.H, self.W, self.levels, self.n = C, H, W, model.levels, n
        if fused is None:
            fused = _backend.use_kernel("pixelrnn_step", run.device, dt, _step_op.KERNEL_DTYPES) and (
                run.device.type != "cpu" or n <= FUSED_CPU_MAX_BATCH)
        self.draws = bool(fused)
        self.x_img = torch.zeros(n, C, H, W, dtype=dt, device=run.device)
        c = model.input_conv
        self.class_bias = None
        if model.class_bias is not None:
            self.class_bias = model.class_bias(run.cond).to(dt)
        mk = _DiagonalLayer if model.kind == "diagonal" else _RowLayer
        self.diagonal = model.kind == "diagonal"
        L, hid = len(model.layers), model.hidden
        if self.draws:
            # Stacked per-layer buffers: the fused op reads and writes them all; the row-start work
            # (the layers' row()) sees its own layer's slices.
            z = self.x_img.new_zeros
            self.hs, self.cs, self.xrow = z(L, H, W, n, hid), z(L, H, W, n, hid), z(L, W, n, 2 * hid)
            self.aux = z(L, H, W, n, hid) if self.diagonal else z(L, W, n, 4 * hid)
            bufs = [(self.hs[k], self.cs[k], self.aux[k], self.xrow[k]) for k in range(L)]
        else:
            self.inp = ConvAt(self.x_img, c.weight, c.bias, c.mask, c.padding, c.dilation)
            bufs = [None] * L
        self.layers = [mk(layer, n, H, W, self.x_img, b) for layer, b in zip(model.layers, bufs)]
        self.row_input = model.row_input is not None
        if self.row_input:
            self.layers[0].img_wt = model.row_input.weight.flatten(1).t().to(dt).contiguous()     # (C, 4h)
        self.head = head_weights(model)
        rows = torch.arange(H, device=run.device).repeat_interleave(W)
        cols = torch.arange(W, device=run.device).repeat(H)
        self.pos = torch.stack([rows, cols], 1).view(H * W, 1, 2)
        self.scale = 2.0 / (model.levels - 1)
        if self.draws:
            k = 1 if self.levels == 2 else self.levels
            self.params = torch.zeros(n, k, dtype=dt, device=run.device)
            pack, config = pack_pixelrnn_step(model, self.class_bias)
            self._fused_fn = _step_op.bind_pixelrnn_step(
                self.x_img, run.values, run.counter, self.params, self.hs, self.cs, self.xrow, self.aux,
                run.noise.view(run.noise.shape[0], run.noise.shape[1]), run.given_values, run.given_mask, pack,
                config, run.temperature)

    def plan(self, t):
        if t and t % (self.C * self.W) == 0:
            return "row", 1
        return "pixel", 1

    def _row(self, i):
        """At the start of row i: each layer's work on the completed row i - 1."""
        for k, layer in enumerate(self.layers):
            if k == 0 and self.row_input:
                layer.row(i - 1, self.x_img[:, :, i - 1].permute(2, 0, 1).reshape(self.W * self.n, self.C))
            else:
                layer.row(i - 1)

    def advance(self, key, t, k):
        if key == "row":
            self._row(t // (self.C * self.W))
        self._fused_fn()

    def step(self, key, t):
        p, c = divmod(t, self.C)
        i, j = divmod(p, self.W)
        if key == "row":
            self._row(i)
        pos = self.pos[p]
        x = self.inp(None, pos).squeeze(-1)
        if self.class_bias is not None:
            x = x + self.class_bias
        if self.diagonal:
            for layer in self.layers:
                x = layer.pixel(x, i, j)
        else:
            for layer in self.layers:
                x = layer.pixel(x, i, j, pos)
        logits = apply_head(self.head, x)
        self._where = (c, i, j)
        if self.levels == 2:
            return logits[:, c:c + 1]
        return logits.view(self.n, self.C, self.levels)[:, c]

    def update(self, key, t, values):
        c, i, j = self._where
        self.x_img[:, c, i, j] = values[:, 0].to(self.x_img.dtype) * self.scale - 1.0


def pack_pixelrnn_step(model, class_bias=None):
    """(pack, config) of :func:`fastar.ops.pixelrnn_step` for ``model`` (masks applied, input-major
    matrices; see the op's docstring), in the model's dtype; class_bias (N, 2h) or None."""
    with torch.no_grad():
        c = model.input_conv
        F_ = c.weight.shape[-1]
        in_w = (c.weight * c.mask.to(c.weight.dtype)).permute(2, 3, 1, 0).reshape(F_ * F_, c.weight.shape[1], -1)
        in_b = c.bias if c.bias is not None else torch.zeros(c.weight.shape[0], dtype=c.weight.dtype,
                                                              device=c.weight.device)
        is_w, is_b, ss_w, out_w, out_b = [], [], [], [], []
        for layer in model.layers:
            if model.kind == "diagonal":
                f = layer.lstm.forward_lstm
                is_w.append(_is_eff(f).t())                                                   # (2h, 4h)
                is_b.append(f.is_bias)
                ss_w.append(torch.cat([f.ss_weight[:, :, 0], f.ss_weight[:, :, 1]], 1).t())   # (2h, 4h)
            else:
                lstm = layer.lstm
                P = lstm.is_weight.shape[-1] // 2
                w = (lstm.is_weight * lstm.is_mask.to(lstm.is_weight.dtype))[:, :, 0, :P + 1]  # (4h, 2h, P + 1)
                is_w.append(w.permute(2, 1, 0))                                               # (P + 1, 2h, 4h)
                is_b.append(lstm.is_bias)
            out_w.append((layer.out.weight * layer.out.mask).flatten(1).t())                   # (h, 2h)
            out_b.append(layer.out.bias)
        w1, b1, w2, b2 = head_weights(model)
        pack = [in_w, in_b, class_bias, torch.stack(is_w), torch.stack(is_b),
                torch.stack(ss_w) if ss_w else None, torch.stack(out_w), torch.stack(out_b),
                w1.t(), b1, w2.t(), b2]
        pack = [None if t is None else t.detach().contiguous() for t in pack]
    config = [0 if model.kind == "diagonal" else 1, model.levels, F_, int(model.residual)]
    return pack, config
