"""One whole PixelRNN sub-pixel step (cached sampling), fused: ``pixelrnn_step``.

``pixelrnn_step(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
temperature)`` generates sub-pixel ``t = step[0]`` (raster order, colours inside a pixel:
``t = (i * W + j) * C_img + c``) of a :class:`fastar.models.PixelRNN` for the whole batch:

1. the first layer: the 7x7 mask-A convolution of ``image`` at (i, j) (``in_w``, ``in_b``) plus the
   class bias (``class_bias[n]``, when conditional): x (N, 2h);
2. every LSTM layer l, with its input x written into ``xrow[l, j]`` first:

   - Diagonal BiLSTM (kind 0): ``z = is_b[l] + x @ is_w[l] + [hs[l, i-1, j] | hs[l, i, j-1]] @ ss_w[l]``
     (absent neighbours are not added), the LSTM cell (gates i | f | o | g, the memory from the
     left, ``cs[l, i, j-1]``), h and c written to ``hs[l, i, j]`` / ``cs[l, i, j]``; the layer's output
     adds the right-to-left state of the row above, ``aux[l, i-1, j]`` (computed at the row's start
     by :func:`fastar.ops.diagonal_lstm_scan` on the completed row);
   - Row LSTM (kind 1): ``z = is_b[l] + sum_a xrow[l, j - P + a] @ is_w[l, a] + aux[l, j]`` over the
     live taps a = 0 .. P of the 1 x k mask-B input-to-state (columns left of the image are zero;
     ``aux[l]`` is the row's state-to-state term, a width-k convolution of the row above computed at
     the row's start), the cell with the memory from above, ``cs[l, i-1, j]``;

   then ``y = out_b[l] + h' @ out_w[l]`` (h' = the layer's output) and x = y + x (``residual``) or y;
3. the head: ``relu(relu(x) @ head1_w + head1_b) @ head2_w + head2_b``, only the K logits of colour c
   (K = 1 for ``levels == 2``: a Bernoulli logit drawn as categories (0, logit); else K = levels), into
   ``logits``;
4. the draw, :func:`fastar.ops.categorical_sample`'s contract on the uniform ``noise[t]`` (the one
   categorical pick of ``csrc/common/categorical.h``); where ``given[:, f]`` (f = c * H * W + i * W + j)
   the value is ``prefix[:, f]``; then ``codes[:, f] = val``, ``image[:, c, i, j] = val * 2 / (levels - 1) - 1``
   and ``step[0] += 1``.

Layouts (dt = float32 or float64, all contiguous; L layers of h units; matrices input-major
(K_in, K_out)): image (N, C_img, H, W); codes, prefix (N, C_img H W) int64, given bool; step (2,)
int64 [t, 0]; logits (N, K); hs, cs (L, H, W, N, h); xrow (L, W, N, 2h); aux (L, H, W, N, h) (kind 0)
or (L, W, N, 4h) (kind 1); noise (C_img H W, N). pack = [in_w (F * F, C_img, 2h) (tap = row * F +
column of the F x F first kernel, mask applied), in_b (2h,), class_bias (N, 2h) or None, is_w (L, 2h,
4h) (kind 0) or (L, P + 1, 2h, 4h) (kind 1, mask applied), is_b (L, 4h), ss_w (L, 2h, 4h) (kind 0;
rows [above | left]) or None, out_w (L, h, 2h) (mask applied), out_b (L, 2h), head1_w (2h, 2h),
head1_b (2h,), head2_w (2h, C_img K), head2_b (C_img K,)]; config = [kind, levels, F, residual].
:func:`fastar.models.pixelrnn_cache.pack_pixelrnn_step` builds the pack from a model.

Mutates image, codes, step, logits, hs, cs and xrow; returns None. One C++ call on CPU (threads over
batch rows), one kernel launch on CUDA (a CTA per batch row); capturable (t read on the device).
Not differentiable (sampling). PyTorch equivalent: :func:`pixelrnn_step_ref`. Devices and dtypes:
CPU and CUDA kernels, float32 and float64.
"""
from __future__ import annotations

import torch

from fastar import _backend
from fastar.ops._common import check_same_device, check_temperature, check_tensor, check_uniforms
from fastar.ops.mixture import categorical_sample_ref

__all__ = ["pixelrnn_step", "pixelrnn_step_ref", "bind_pixelrnn_step", "PACK_FIELDS"]

KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64),
}

PACK_FIELDS = ("in_w", "in_b", "class_bias", "is_w", "is_b", "ss_w", "out_w", "out_b", "head1_w", "head1_b",
               "head2_w", "head2_b")


def _want(op, name, t, shape, dt, dev):
    check_tensor(op, name, t, floating=dt.is_floating_point)
    if list(t.shape) != list(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dt:
        raise TypeError(f"{op}: {name} must be {dt}, got {t.dtype}")
    if t.device != dev:
        raise ValueError(f"{op}: {name} is on {t.device}, the image on {dev}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check(op, image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config, temperature):
    check_tensor(op, "image", image, dim=4, layout="(N, C_img, H, W)")
    N, Ci, H, W = image.shape
    dt, dev = image.dtype, image.device
    if dt not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: image must be float32 or float64, got {dt}")
    if not isinstance(config, (list, tuple)) or len(config) != 4 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in config):
        raise ValueError(f"{op}: config must be [kind, levels, first kernel size, residual] ints, got {config!r}")
    kind, levels, F, residual = config
    if kind not in (0, 1) or levels < 2 or F < 1 or F % 2 == 0 or residual not in (0, 1):
        raise ValueError(f"{op}: config [kind 0|1, levels >= 2, odd first kernel size, residual 0|1], got {config}")
    if not isinstance(pack, (list, tuple)) or len(pack) != len(PACK_FIELDS):
        raise ValueError(f"{op}: pack must be the {len(PACK_FIELDS)} tensors {PACK_FIELDS}")
    w = dict(zip(PACK_FIELDS, pack))
    check_tensor(op, "is_b", w["is_b"], dim=2, layout="(L, 4h)")
    L, g4 = w["is_b"].shape
    hid = g4 // 4
    if hid < 1 or g4 != 4 * hid:
        raise ValueError(f"{op}: is_b must be (L, 4h), got {list(w['is_b'].shape)}")
    K = 1 if levels == 2 else levels
    T = Ci * H * W
    _want(op, "hs", hs, (L, H, W, N, hid), dt, dev)
    _want(op, "cs", cs, (L, H, W, N, hid), dt, dev)
    _want(op, "xrow", xrow, (L, W, N, 2 * hid), dt, dev)
    _want(op, "aux", aux, (L, H, W, N, hid) if kind == 0 else (L, W, N, 4 * hid), dt, dev)
    _want(op, "codes", codes, (N, T), torch.int64, dev)
    _want(op, "step", step, (2,), torch.int64, dev)
    _want(op, "logits", logits, (N, K), dt, dev)
    _want(op, "noise", noise, (T, N), dt, dev)
    _want(op, "in_w", w["in_w"], (F * F, Ci, 2 * hid), dt, dev)
    _want(op, "in_b", w["in_b"], (2 * hid,), dt, dev)
    if w["class_bias"] is not None:
        _want(op, "class_bias", w["class_bias"], (N, 2 * hid), dt, dev)
    if kind == 0:
        _want(op, "is_w", w["is_w"], (L, 2 * hid, 4 * hid), dt, dev)
        _want(op, "ss_w", w["ss_w"], (L, 2 * hid, 4 * hid), dt, dev)
    else:
        check_tensor(op, "is_w", w["is_w"], dim=4, layout="(L, P + 1, 2h, 4h)")
        _want(op, "is_w", w["is_w"], (L, w["is_w"].shape[1], 2 * hid, 4 * hid), dt, dev)
        if w["ss_w"] is not None:
            raise ValueError(f"{op}: a Row LSTM step takes no ss_w (its state term is aux)")
    _want(op, "is_b", w["is_b"], (L, 4 * hid), dt, dev)
    _want(op, "out_w", w["out_w"], (L, hid, 2 * hid), dt, dev)
    _want(op, "out_b", w["out_b"], (L, 2 * hid), dt, dev)
    _want(op, "head1_w", w["head1_w"], (2 * hid, 2 * hid), dt, dev)
    _want(op, "head1_b", w["head1_b"], (2 * hid,), dt, dev)
    _want(op, "head2_w", w["head2_w"], (2 * hid, Ci * K), dt, dev)
    _want(op, "head2_b", w["head2_b"], (Ci * K,), dt, dev)
    if (prefix is None) != (given is None):
        raise ValueError(f"{op}: prefix and given come together (or neither)")
    if prefix is not None:
        _want(op, "prefix", prefix, (N, T), torch.int64, dev)
        _want(op, "given", given, (N, T), torch.bool, dev)
    check_temperature(op, temperature)
    check_uniforms(op, "noise", noise)
    check_same_device(op, image=image, step=step)


def _ref_impl(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config, temperature):
    """The twin of ``torch.ops.fastar.pixelrnn_step`` in the op's own form (checked by _check)."""
    (in_w, in_b, class_bias, is_w, is_b, ss_w, out_w, out_b, head1_w, head1_b, head2_w, head2_b) = pack
    kind, levels, F, residual = config
    N, Ci, H, W = image.shape
    L, _, _, _, hid = hs.shape
    K = 1 if levels == 2 else levels
    dev = image.device
    t = step[:1]                                             # stays on the device: no host sync
    c, p = t % Ci, t // Ci
    i, j = p // W, p % W
    flat = c * (H * W) + p
    R = F // 2
    # The first layer: every tap of the F x F kernel (the mask zeroes the future ones), zero outside.
    dy = torch.arange(-R, R + 1, device=dev)
    rows, cols = (i + dy).view(F, 1).expand(F, F), (j + dy).view(1, F).expand(F, F)
    inside = ((rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)).reshape(-1)
    patch = image[:, :, rows.clamp(0, H - 1).reshape(-1), cols.clamp(0, W - 1).reshape(-1)]     # (N, Ci, F*F)
    patch = patch * inside.to(image.dtype)
    x = torch.einsum("nca,aco->no", patch, in_w) + in_b
    if class_bias is not None:
        x = x + class_bias
    zero = torch.zeros(N, hid, dtype=image.dtype, device=dev)
    up_ok = (i > 0).to(image.dtype)
    left_ok = (j > 0).to(image.dtype)
    im1, jm1 = (i - 1).clamp(min=0), (j - 1).clamp(min=0)
    for l in range(L):
        xrow[l].index_copy_(0, j, x.unsqueeze(0))
        if kind == 0:
            up = hs[l].index_select(0, im1).squeeze(0).index_select(0, j).squeeze(0) * up_ok
            left = hs[l].index_select(0, i).squeeze(0).index_select(0, jm1).squeeze(0) * left_ok
            z = is_b[l] + x @ is_w[l] + torch.cat([up, left], 1) @ ss_w[l]
            c_prev = cs[l].index_select(0, i).squeeze(0).index_select(0, jm1).squeeze(0) * left_ok
        else:
            P = is_w.shape[1] - 1
            tap_cols = j + torch.arange(-P, 1, device=dev)
            ok = (tap_cols >= 0).to(image.dtype).view(P + 1, 1, 1)
            xs = xrow[l].index_select(0, tap_cols.clamp(min=0)) * ok                    # (P + 1, N, 2h)
            z = is_b[l] + torch.einsum("ank,ako->no", xs, is_w[l]) + aux[l].index_select(0, j).squeeze(0)
            c_prev = cs[l].index_select(0, im1).squeeze(0).index_select(0, j).squeeze(0) * up_ok
        sig = torch.sigmoid(z[:, :3 * hid])
        g = torch.tanh(z[:, 3 * hid:])
        cn = sig[:, hid:2 * hid] * c_prev + sig[:, :hid] * g
        h = sig[:, 2 * hid:] * torch.tanh(cn)
        hs[l, :, :].view(H * W, N, hid).index_copy_(0, p, h.unsqueeze(0))
        cs[l, :, :].view(H * W, N, hid).index_copy_(0, p, cn.unsqueeze(0))
        if kind == 0:
            h = h + aux[l].index_select(0, im1).squeeze(0).index_select(0, j).squeeze(0) * up_ok
        y = out_b[l] + h @ out_w[l]
        x = y + x if residual else y
    yh = torch.relu(torch.relu(x) @ head1_w + head1_b)
    lg = (yh @ head2_w + head2_b).view(N, Ci, K).index_select(1, c).squeeze(1)           # (N, K)
    logits.copy_(lg)
    u = noise.index_select(0, t).squeeze(0)
    if levels == 2:
        val = categorical_sample_ref(torch.cat([torch.zeros_like(lg), lg], 1), dim=1, noise=u,
                                     temperature=float(temperature))
    else:
        val = categorical_sample_ref(lg, dim=1, noise=u, temperature=float(temperature))
    if prefix is not None:
        val = torch.where(given.index_select(1, flat).squeeze(1), prefix.index_select(1, flat).squeeze(1), val)
    codes.index_copy_(1, flat, val.unsqueeze(1))
    image.view(N, -1).index_copy_(1, flat, (val.to(image.dtype) * (2.0 / (levels - 1)) - 1.0).unsqueeze(1))
    step[:1].add_(1)


def pixelrnn_step_ref(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
                      temperature=1.0):
    """Reference of :func:`pixelrnn_step` in plain PyTorch (any device, float32/float64). Mutates like the op."""
    _check("pixelrnn_step_ref", image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
           temperature)
    _ref_impl(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, list(pack), list(config),
              float(temperature))


def pixelrnn_step(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
                  temperature=1.0):
    """Generate sub-pixel ``step[0]`` of a PixelRNN for the whole batch, fused (see the module docstring).
    Runs the compiled kernel or :func:`pixelrnn_step_ref` according to :func:`fastar.set_backend`."""
    _check("pixelrnn_step", image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
           temperature)
    args = (image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, list(pack), list(config),
            float(temperature))
    if _backend.use_kernel("pixelrnn_step", image.device, image.dtype, KERNEL_DTYPES):
        torch.ops.fastar.pixelrnn_step(*args)
        return
    _ref_impl(*args)


def bind_pixelrnn_step(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
                       temperature=1.0):
    """:func:`pixelrnn_step` with every argument fixed and checked once: returns ``fn()`` that advances one
    sub-pixel (the op reads its position from ``step``); the kernel when the backend picks it, else the twin.
    ``fn.args`` is the op's argument tuple, ``fn.op`` what it calls."""
    _check("pixelrnn_step", image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
           temperature)
    args = (image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, list(pack), list(config),
            float(temperature))
    use = _backend.use_kernel("pixelrnn_step", image.device, image.dtype, KERNEL_DTYPES)
    op = torch.ops.fastar.pixelrnn_step if use else _ref_impl

    def fn():
        op(*args)

    fn.args, fn.op = args, op
    return fn


if _backend.has_ops("pixelrnn_step"):

    @torch.library.register_fake("fastar::pixelrnn_step")
    def _pixelrnn_step_fake(image, codes, step, logits, hs, cs, xrow, aux, noise, prefix, given, pack, config,
                            temperature):
        return None
