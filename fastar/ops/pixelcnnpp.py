"""PixelCNN++'s per-pixel step, fused: ``pixelcnnpp_ul_step(maps, weights, program, i, j, out)``.

One call computes every ul-stream entry of a PixelCNN++ that becomes final at pixel (i, j), over the
three resolutions, and the output layer's mixture parameters there, running a *program* that
:class:`fastar.models.pixelcnnpp_cache.MultiResolutionCache` builds once per run. The maps are the
network's activation maps kept zero-padded, (N, C, H + 1, W + 2) with data (r, c) at (1 + r, 1 + c);
``program`` is a flat list of instructions of :data:`PROGRAM_WIDTH` ints each, ``[kind, level, dst,
src, mid, skip_a, skip_b, w1, b1, w2, b2, w3, b3, emb]`` (indices into ``maps`` / ``weights``, -1 =
none); an instruction of level L runs when i and j are multiples of 2**L, at (i >> L, j >> L):

* ``INIT`` (0): dst = the down-shifted (1, 3) convolution (w1, b1) of the input's row above (zero on
  row 0) + the down-right (2, 1) convolution (w2, b2) of the column to the left (zero on column 0);
* ``BLOCK`` (1): a gated resnet block on (2, 2) down-right convolutions: ``h = w1 . concat_elu(2x2
  window of src) + b1`` (+ ``w2 . concat_elu(cat(skip_a, skip_b)) + b2`` at the position); ``mid =
  concat_elu(h)`` at the position; ``o = w3 . 2x2 window of mid + b3`` (+ ``emb[n]``); ``dst = src +
  o[:F] * sigmoid(o[F:])``;
* ``DOWN`` (2): the stride-2 (2, 2) down-right convolution (w1, b1) of src;
* ``UP`` (3): the stride-2 (2, 2) transposed convolution of src at the position written ahead into
  the 2x2 block of dst it covers (cropped): w1 (in, out * 4), b1;
* ``OUT`` (4): ``out = w1 . elu(src at (i, j)) + b1``.

Weights are 2-D and input-major, (in * kh * kw, out): the transpose of a flattened ``nn.Conv2d``
weight, so the kernel's GEMV reads whole rows and vectorises over the outputs (emb: (N, 2F)). Mutates the
maps and ``out``; returns None. Not differentiable (sampling). CPU kernel float32 and float64 (no
CUDA kernel: on a GPU the reference runs); PyTorch equivalent :func:`pixelcnnpp_ul_step_ref` (the
same program with torch ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar import _backend

__all__ = ["pixelcnnpp_ul_step", "pixelcnnpp_ul_step_ref", "PROGRAM_WIDTH", "INIT", "BLOCK", "DOWN", "UP", "OUT"]

PROGRAM_WIDTH = 14
INIT, BLOCK, DOWN, UP, OUT = range(5)
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64)}


def _check(op, maps, weights, program, i, j, out):
    if not isinstance(maps, (list, tuple)) or not maps or not all(isinstance(m, torch.Tensor) for m in maps):
        raise ValueError(f"{op}: maps must be a non-empty list of tensors")
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise ValueError(f"{op}: weights must be a list of tensors")
    m0 = maps[0]
    if m0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: maps must be float32 or float64, got {m0.dtype}")
    for m in maps:
        if m.dim() != 4 or m.shape[0] != m0.shape[0] or m.dtype != m0.dtype or m.device != m0.device \
                or not m.is_contiguous():
            raise ValueError(f"{op}: every map must be a contiguous (N, C, H + 1, W + 2) tensor of one batch, dtype "
                             f"and device, got {list(m.shape)} {m.dtype} on {m.device}")
    for w in weights:
        if w.dtype != m0.dtype or w.device != m0.device or not w.is_contiguous():
            raise ValueError(f"{op}: every weight must be contiguous, {m0.dtype} on {m0.device}")
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != m0.shape[0] or out.dtype != m0.dtype \
            or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous (N, P) tensor of the maps' dtype")
    prog = list(program)
    if len(prog) % PROGRAM_WIDTH or not all(isinstance(v, int) and not isinstance(v, bool) for v in prog):
        raise ValueError(f"{op}: program must be a list of ints, {PROGRAM_WIDTH} per instruction")
    for q in range(0, len(prog), PROGRAM_WIDTH):
        ins = prog[q:q + PROGRAM_WIDTH]
        if ins[0] not in (INIT, BLOCK, DOWN, UP, OUT) or not 0 <= ins[1] <= 8:
            raise ValueError(f"{op}: instruction {q // PROGRAM_WIDTH} has an unknown kind {ins[0]} or level {ins[1]}")
        if any(not -1 <= v < len(maps) for v in ins[2:7]) or any(not -1 <= v < len(weights) for v in ins[7:14]):
            raise ValueError(f"{op}: instruction {q // PROGRAM_WIDTH} names a map or weight out of range")
    H, W = m0.shape[2] - 1, m0.shape[3] - 2
    if not (isinstance(i, int) and isinstance(j, int) and 0 <= i < H and 0 <= j < W):
        raise ValueError(f"{op}: position ({i}, {j}) is outside the {H}x{W} image")


def _ce(x, dim=1):
    return F.elu(torch.cat([x, -x], dim))


def pixelcnnpp_ul_step_ref(maps, weights, program, i, j, out, check=True):
    """The program run with torch ops (see the module docstring); mutates maps and out."""
    if check:
        _check("pixelcnnpp_ul_step_ref", maps, weights, program, i, j, out)
    prog = list(program)
    for q in range(0, len(prog), PROGRAM_WIDTH):
        kind, L, dst, src, mid, sa, sb, w1, b1, w2, b2, w3, b3, emb = prog[q:q + PROGRAM_WIDTH]
        if kind not in (INIT, OUT) and (i % (1 << L) or j % (1 << L)):
            continue
        a, b = i >> L, j >> L
        if kind == INIT:
            x, d = maps[src], maps[dst]
            y = torch.zeros(x.shape[0], d.shape[1], dtype=x.dtype, device=x.device)
            if i:
                y = y + torch.addmm(weights[b1], x[:, :, i, j:j + 3].reshape(x.shape[0], -1), weights[w1])
            if j:
                y = y + torch.addmm(weights[b2], x[:, :, i:i + 2, j].reshape(x.shape[0], -1), weights[w2])
            d[:, :, 1 + i, 1 + j] = y
        elif kind == BLOCK:
            s, d, m = maps[src], maps[dst], maps[mid]
            n, Fc = s.shape[:2]
            h = torch.addmm(weights[b1], _ce(s[:, :, a:a + 2, b:b + 2]).reshape(n, -1), weights[w1])
            if sa >= 0:
                skip = maps[sa][:, :, 1 + a, 1 + b]
                if sb >= 0:
                    skip = torch.cat([skip, maps[sb][:, :, 1 + a, 1 + b]], 1)
                h = h + torch.addmm(weights[b2], _ce(skip), weights[w2])
            m[:, :, 1 + a, 1 + b] = _ce(h)
            o = torch.addmm(weights[b3], m[:, :, a:a + 2, b:b + 2].reshape(n, -1), weights[w3])
            if emb >= 0:
                o = o + weights[emb]
            d[:, :, 1 + a, 1 + b] = s[:, :, 1 + a, 1 + b] + o[:, :Fc] * torch.sigmoid(o[:, Fc:])
        elif kind == DOWN:
            s, d = maps[src], maps[dst]
            d[:, :, 1 + a, 1 + b] = torch.addmm(weights[b1], s[:, :, 2 * a:2 * a + 2, 2 * b:2 * b + 2]
                                                .reshape(s.shape[0], -1), weights[w1])
        elif kind == UP:
            s, d = maps[src], maps[dst]
            n, Fo = d.shape[:2]
            y = (s[:, :, 1 + a, 1 + b] @ weights[w1]).view(n, Fo, 2, 2) + weights[b1][:, None, None]
            hh, ww = min(2, d.shape[2] - 1 - 2 * a), min(2, d.shape[3] - 2 - 2 * b)
            d[:, :, 1 + 2 * a:1 + 2 * a + hh, 1 + 2 * b:1 + 2 * b + ww] = y[:, :, :hh, :ww]
        else:
            out.copy_(torch.addmm(weights[b1], F.elu(maps[src][:, :, 1 + i, 1 + j]), weights[w1]))


def pixelcnnpp_ul_step(maps, weights, program, i, j, out, check=True):
    """The compiled step where it is built (CPU, float32/float64), else :func:`pixelcnnpp_ul_step_ref`.
    ``check=False`` skips the argument checks (a cache that checked its program once)."""
    if check:
        _check("pixelcnnpp_ul_step", maps, weights, program, i, j, out)
    if _backend.use_kernel("pixelcnnpp_ul_step", maps[0].device, maps[0].dtype, KERNEL_DTYPES):
        torch.ops.fastar.pixelcnnpp_ul_step(list(maps), list(weights), list(program), i, j, out)
    else:
        pixelcnnpp_ul_step_ref(maps, weights, program, i, j, out, check=False)


if _backend.has_ops("pixelcnnpp_ul_step"):

    @torch.library.register_fake("fastar::pixelcnnpp_ul_step")
    def _pixelcnnpp_ul_step_fake(maps, weights, program, i, j, out):
        return None
