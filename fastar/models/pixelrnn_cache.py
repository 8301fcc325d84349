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

The steps index with the host step index the engine passes them, so they are not
captured in CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar.models.image import ConvAt, apply_head, head_weights, new_cache
from fastar.ops.lstm_scan import diagonal_lstm_scan
from fastar.sampling.protocol import InferenceCache

__all__ = ["PixelRNNCache"]


def _cell(z, c_prev, hid):
    sig = torch.sigmoid(z[:, :3 * hid])
    g = torch.tanh(z[:, 3 * hid:])
    c = sig[:, hid:2 * hid] * c_prev + sig[:, :hid] * g if c_prev is not None else sig[:, :hid] * g
    return sig[:, 2 * hid:] * torch.tanh(c), c


def _is_eff(lstm):
    """(4h, C_in) effective 1x1 input-to-state weight of a Diagonal LSTM (mask applied)."""
    return (lstm.is_weight * lstm.is_mask.to(lstm.is_weight.dtype)).flatten(1)


class _DiagonalLayer:
    def __init__(self, layer, n, H, W, like):
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
        self.hf = like.new_zeros(H, W, n, hid)
        self.cf = like.new_zeros(H, W, n, hid)
        self.hr = like.new_zeros(H, W, n, hid)          # right-to-left states, row by row
        self.xrow = like.new_zeros(W, n, 2 * hid)        # this row's layer inputs
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
    def __init__(self, layer, n, H, W, like):
        lstm = layer.lstm
        hid = self.hid = lstm.hidden
        self.xmap = new_cache(like.new_zeros(n, 1, H, W), 2 * hid)
        self.conv = ConvAt(self.xmap, lstm.is_weight, lstm.is_bias, lstm.is_mask, lstm.padding)
        self.ss = lstm.ss_weight.detach()
        self.out_wt, self.out_b = (layer.out.weight * layer.out.mask).flatten(1).t().contiguous(), layer.out.bias
        self.residual = layer.residual
        self.h = like.new_zeros(H, W, n, hid)
        self.c = like.new_zeros(H, W, n, hid)
        self.ssrow = like.new_zeros(W, n, 4 * hid)       # the state-to-state term of the current row

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


class PixelRNNCache(InferenceCache):
    """One run's image, per-layer LSTM states and layer inputs (see the module docstring)."""

    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        C, H, W = run.seq.shape
        n, dt = run.seq.n, run.dtype
        self.C, self.H, self.W, self.levels, self.n = C, H, W, model.levels, n
        self.x_img = torch.zeros(n, C, H, W, dtype=dt, device=run.device)
        c = model.input_conv
        self.inp = ConvAt(self.x_img, c.weight, c.bias, c.mask, c.padding, c.dilation)
        self.class_bias = None
        if model.class_bias is not None:
            self.class_bias = model.class_bias(run.cond).to(dt)
        mk = _DiagonalLayer if model.kind == "diagonal" else _RowLayer
        self.diagonal = model.kind == "diagonal"
        self.layers = [mk(layer, n, H, W, self.x_img) for layer in model.layers]
        self.row_input = model.row_input is not None
        if self.row_input:
            self.layers[0].img_wt = model.row_input.weight.flatten(1).t().to(dt).contiguous()     # (C, 4h)
        self.head = head_weights(model)
        rows = torch.arange(H, device=run.device).repeat_interleave(W)
        cols = torch.arange(W, device=run.device).repeat(H)
        self.pos = torch.stack([rows, cols], 1).view(H * W, 1, 2)
        self.scale = 2.0 / (model.levels - 1)

    def plan(self, t):
        if t and t % (self.C * self.W) == 0:
            return "row", 1
        return "pixel", 1

    def step(self, key, t):
        p, c = divmod(t, self.C)
        i, j = divmod(p, self.W)
        if key == "row":
            for k, layer in enumerate(self.layers):
                if k == 0 and self.row_input:
                    layer.row(i - 1, self.x_img[:, :, i - 1].permute(2, 0, 1).reshape(self.W * self.n, self.C))
                else:
                    layer.row(i - 1)
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
