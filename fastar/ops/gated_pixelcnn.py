"""One whole pixel step of a Gated PixelCNN (cached sampling), fused: ``gated_pixelcnn_step``.

``gated_pixelcnn_step(image, row_cache, codes, step, logits, noise, links, class_bias, cond_map, map_w,
prefix, given, h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, taps, residual, levels,
temperature)`` generates sub-pixel ``t = step[0]`` (raster order, colours inside a pixel:
``t = (i * W + j) * C_img + c``) for the whole batch:

1. for every block l: the horizontal-stack convolution at (i, j) over its live taps (the 1 x k
   filter's columns j - taps + 1 .. j, masked weights packed in ``h_w``; block 0 reads ``image``,
   a later block reads ``row_cache[l - 1]``, into whose column j it first writes its input, the
   previous block's output), + ``h_b`` + the link term ``links[l, j]`` + ``class_bias[l]`` +
   ``map_w[l]^T cond_map[:, i * W + j]``; gate ``tanh(a[:C]) * sigmoid(a[C:])``; one GEMM to
   [skip | out]; skip summed over blocks, out (+ the input when ``residual[l]``) feeds block l+1;
2. the head: ``relu(skip) @ head1_w + head1_b``, ReLU, ``@ head2_w + head2_b``, only the K
   logits of colour c (K = 1 for ``levels == 2``, a Bernoulli logit drawn as categories (0, logit),
   else K = levels), written to ``logits``;
3. the draw: :func:`fastar.ops.categorical_sample`'s contract (inverse CDF of
   softmax(logits / temperature) on the uniform ``noise[t]``; temperature 0 = argmax); where
   ``given[:, f]`` (f = c * H * W + i * W + j) the value is ``prefix[:, f]`` instead;
4. the writes: ``codes[:, f] = val``, ``image[:, c, i, j] = val * 2 / (levels - 1) - 1`` and
   ``step[0] += 1``.

Layouts (dt = float32 or float64 everywhere; all contiguous; L blocks of C channels, C2 = 2C;
matrices are input-major (K_in, K_out), the transpose of nn.Linear's, so that a GEMV reads whole
rows): image (N, C_img, H, W); row_cache (L - 1, N, W, C) (only the current row of a horizontal
input is ever read); codes, prefix (N, C_img * H * W) int64, given the same shape bool; step (2,)
int64 [t, 0] (element 1 is the CUDA kernel's arrival counter and stays 0 between calls); logits
(N, K); noise (C_img * H * W, N); links (L, W, N, C2); class_bias (L, N, C2) or None; cond_map
(N, H * W, Cc) and map_w (L, Cc, C2), or both None; h_w flat: block 0 (taps[0], C_img, C2) then
each later block (taps[1], C, C2); h_b, so_b (L, C2); so_w (L, C, C2); head1_w (C, C); head1_b (C,);
head2_w (C, C_img * K); head2_b (C_img * K,); taps [block 0's live taps, the later blocks']; residual
L ints (0/1). :func:`fastar.models.pixelcnn_cache.pack_gated_pixel_step` builds all of them from a model.

The compiled op ``torch.ops.fastar.gated_pixelcnn_step(image, row_cache, codes, step, logits, noise, links,
prefix, given, pack, config, temperature)`` takes the weights as one ``Tensor?[] pack`` (:data:`PACK_FIELDS`
order, class_bias / cond_map / map_w None when absent: :meth:`GatedPixelStepPack.to_pack`) and every integer
as one ``int[] config`` ([levels, taps[0], taps[1], residual flag of each block...]:
:meth:`GatedPixelStepPack.config`); :func:`gated_op_args` builds its argument tuple.

Mutates image, row_cache, codes, step and logits; returns None. One C++ call on CPU (OpenMP over
batch rows), ONE kernel launch on CUDA (a CTA per few batch rows, every block in shared memory),
capturable in a CUDA graph: t is read on the device and advanced by the op itself. Not
differentiable (sampling). PyTorch equivalent: :func:`gated_pixelcnn_step_ref` (a few torch ops
per block; ``GatedCache.pixel`` + the engine's draw on the unpacked model compute the same).
Devices and dtypes: CPU and CUDA kernels, float32 and float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastar import _backend
from fastar.ops._common import check_same_device, check_temperature, check_tensor, check_uniforms, host_checkable
from fastar.ops.mixture import categorical_sample_ref

__all__ = ["gated_pixelcnn_step", "gated_pixelcnn_step_ref", "GatedPixelStepPack", "gated_pixelcnn_step_packed",
           "bind_gated_pixelcnn_step"]


class _Unpacked(NamedTuple):
    """The op's pack (these fields up to map_w, in this order) and config by name (no checks: _check does
    those)."""

    h_w: torch.Tensor
    h_b: torch.Tensor
    so_w: torch.Tensor
    so_b: torch.Tensor
    head1_w: torch.Tensor
    head1_b: torch.Tensor
    head2_w: torch.Tensor
    head2_b: torch.Tensor
    class_bias: torch.Tensor | None
    cond_map: torch.Tensor | None
    map_w: torch.Tensor | None
    levels: int
    taps: list
    residual: list


# The op's `Tensor?[] pack` (GatedPixelStepPack's weights, in this order; the last three may be None) and
# `int[] config` (these three, then one residual flag per block): csrc/pixel_step.h's GatedPack / GatedConfig
# read the same layouts.
PACK_FIELDS = _Unpacked._fields[:11]
CONFIG_FIELDS = ("levels", "taps[0]", "taps[1]")


class GatedPixelStepPack(NamedTuple):
    """A Gated PixelCNN's packed weights (and per-run conditioning and scratch) for
    :func:`gated_pixelcnn_step`, in the layouts of the module docstring; built once per run by
    :func:`fastar.models.pixelcnn_cache.pack_gated_pixel_step`."""

    row_cache: torch.Tensor
    links: torch.Tensor
    class_bias: torch.Tensor | None
    cond_map: torch.Tensor | None
    map_w: torch.Tensor | None
    h_w: torch.Tensor
    h_b: torch.Tensor
    so_w: torch.Tensor
    so_b: torch.Tensor
    head1_w: torch.Tensor
    head1_b: torch.Tensor
    head2_w: torch.Tensor
    head2_b: torch.Tensor
    taps: list
    residual: list

    def to_pack(self) -> list:
        """The op's ``pack``: the weights in PACK_FIELDS order."""
        return [getattr(self, f) for f in PACK_FIELDS]

    def config(self, levels, op="gated_pixelcnn_step") -> list:
        """The op's ``config``: [levels, taps[0], taps[1], *residual]. levels goes in as given, so that
        _check can refuse a non-int with its own sentence; taps must be a pair for the layout to hold."""
        taps = list(self.taps)
        if len(taps) != 2:
            raise ValueError(f"{op}: taps must be two positive ints (live taps of block 0, of the later blocks), "
                             f"got {taps}")
        return [levels, int(taps[0]), int(taps[1])] + [int(v) for v in self.residual]


def _unpack(pack, config) -> _Unpacked:
    return _Unpacked(*pack, config[0], list(config[1:3]), list(config[3:]))


KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64),
}


def _shape(op, name, t, want, dt):
    check_tensor(op, name, t)
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{op}: {name} must have shape {list(want)}, got {list(t.shape)}")
    if t.dtype != dt:
        raise TypeError(f"{op}: {name} dtype {t.dtype} must match the weights' dtype {dt}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (pack it with fastar.models.pixelcnn_cache."
                         "pack_gated_pixel_step)")


def _check(op, image, row_cache, codes, step, logits, noise, links, prefix, given, pack, config, temperature):
    """The Python side's one check of gated_pixelcnn_step's arguments, in the op's (pack, config) form: run by
    the public function and bind_gated_pixelcnn_step before the kernel or the twin (csrc/pixel_step.h's
    parse_gated_pixelcnn_step is the kernel's own)."""
    if not isinstance(pack, (list, tuple)) or len(pack) != len(PACK_FIELDS):
        raise TypeError(f"{op}: pack must list the {len(PACK_FIELDS)} entries ({', '.join(PACK_FIELDS)}), got "
                        f"{len(pack) if isinstance(pack, (list, tuple)) else type(pack).__name__}")
    if not isinstance(config, (list, tuple)) or len(config) < len(CONFIG_FIELDS):
        raise TypeError(f"{op}: config must be [{', '.join(CONFIG_FIELDS)}, residual flags...], got {config!r}")
    (h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias, cond_map, map_w, levels, taps,
     residual) = _unpack(pack, config)
    check_tensor(op, "h_b", h_b, dim=2, layout="(L, 2C)")
    L, C2 = h_b.shape
    if L < 1 or C2 < 2 or C2 % 2:
        raise ValueError(f"{op}: h_b must be (L, 2C) with at least one block and an even width, got "
                         f"{list(h_b.shape)}")
    dt = h_b.dtype
    if dt not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: the weights must be float32 or float64, got {dt}")
    C = C2 // 2
    check_tensor(op, "image", image, dim=4, layout="(N, C_img, H, W)")
    N, Ci, H, W = image.shape
    if min(N, Ci, H, W) < 1:
        raise ValueError(f"{op}: image must be non-empty, got shape {list(image.shape)}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"{op}: levels must be an int >= 2 (2 = binary), got {levels!r}")
    check_temperature(op, temperature)
    K = 1 if levels == 2 else levels
    Tt = Ci * H * W
    if min(taps) < 1:
        raise ValueError(f"{op}: taps must be two positive ints (live taps of block 0, of the later blocks), "
                         f"got {list(taps)}")
    if len(residual) != L:
        raise ValueError(f"{op}: residual must list {L} flags (one per block), got {len(residual)}")
    if residual[0] and Ci != C:
        raise ValueError(f"{op}: block 0 can only be residual when the image has as many channels as the blocks "
                         f"({C}), got {Ci}")
    n_hw = (taps[0] * Ci + (L - 1) * taps[1] * C) * C2
    _shape(op, "h_w", h_w, (n_hw,), dt)
    for name, t, want in (("h_b", h_b, (L, C2)), ("so_w", so_w, (L, C, C2)), ("so_b", so_b, (L, C2)),
                          ("head1_w", head1_w, (C, C)), ("head1_b", head1_b, (C,)),
                          ("head2_w", head2_w, (C, Ci * K)), ("head2_b", head2_b, (Ci * K,)),
                          ("image", image, (N, Ci, H, W)), ("row_cache", row_cache, (L - 1, N, W, C)),
                          ("links", links, (L, W, N, C2)), ("logits", logits, (N, K)), ("noise", noise, (Tt, N))):
        _shape(op, name, t, want, dt)
    for name, t, dtype in (("codes", codes, torch.int64), ("prefix", prefix, torch.int64),
                           ("given", given, torch.bool)):
        if name != "codes" and t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (N, Tt) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous ({N}, {Tt}) {dtype} tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {list(getattr(t, 'shape', []))}")
    if (prefix is None) != (given is None):
        raise ValueError(f"{op}: prefix and given come together, got only {'prefix' if given is None else 'given'}")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or tuple(step.shape) != (2,):
        raise TypeError(f"{op}: step must be a (2,) int64 tensor [t, 0] (the step counter), got "
                        f"{getattr(step, 'dtype', type(step).__name__)} of shape "
                        f"{list(getattr(step, 'shape', []))}")
    if class_bias is not None:
        _shape(op, "class_bias", class_bias, (L, N, C2), dt)
    if (cond_map is None) != (map_w is None):
        raise ValueError(f"{op}: cond_map and map_w come together, got only "
                         f"{'cond_map' if map_w is None else 'map_w'}")
    if cond_map is not None:
        check_tensor(op, "cond_map", cond_map, dim=3, layout="(N, H*W, Cc)")
        Cc = cond_map.shape[2]
        _shape(op, "cond_map", cond_map, (N, H * W, Cc), dt)
        _shape(op, "map_w", map_w, (L, Cc, C2), dt)
    check_same_device(op, image=image, row_cache=row_cache, codes=codes, step=step, logits=logits, noise=noise,
                      links=links, class_bias=class_bias, cond_map=cond_map, map_w=map_w, prefix=prefix,
                      given=given, h_w=h_w, so_w=so_w, head2_w=head2_w)
    # Only the step's own row of noise: checking all of it every step would cost O(T) per step.
    if host_checkable(noise) and isinstance(step, torch.Tensor) and step.numel() >= 1:
        t = int(step.reshape(-1)[0])
        if 0 <= t < noise.shape[0]:
            check_uniforms(op, f"noise[{t}]", noise[t])


def _ref_impl(image, row_cache, codes, step, logits, noise, links, prefix, given, pack, config, temperature):
    """The twin of ``torch.ops.fastar.gated_pixelcnn_step``, in the op's own (pack, config) form (checked by
    _check)."""
    (h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias, cond_map, map_w, levels, taps,
     residual) = _unpack(pack, config)
    N, Ci, H, W = image.shape
    L, C2 = h_b.shape
    C = C2 // 2
    K = 1 if levels == 2 else levels
    t = step[:1]                                             # stays on the device: no host sync
    c, p = t % Ci, t // Ci
    i, j = p // W, p % W
    flat = c * (H * W) + p
    h = skip = None
    off = 0
    for l in range(L):
        nt, cin = (taps[0], Ci) if l == 0 else (taps[1], C)
        w = h_w[off:off + nt * cin * C2].view(nt, cin, C2)
        off += nt * cin * C2
        cols = j + torch.arange(-(nt - 1), 1, device=image.device)                  # (nt,)
        inside = (cols >= 0).to(image.dtype)
        colc = cols.clamp(min=0)
        if l == 0:
            x = image.index_select(2, i).squeeze(2).index_select(2, colc).transpose(1, 2)   # (N, nt, Ci)
        else:
            rc = row_cache[l - 1]
            rc.index_copy_(1, j, h.unsqueeze(1))
            x = rc.index_select(1, colc)                                              # (N, nt, C)
        x = x * inside.view(1, nt, 1)
        a = torch.einsum("nak,ako->no", x, w) + h_b[l] + links[l].index_select(0, j).squeeze(0)
        if class_bias is not None:
            a = a + class_bias[l]
        if cond_map is not None:
            a = a + cond_map.index_select(1, p).squeeze(1) @ map_w[l]
        g = torch.tanh(a[:, :C]) * torch.sigmoid(a[:, C:])
        so = g @ so_w[l] + so_b[l]
        skip = so[:, :C] if skip is None else skip + so[:, :C]
        h = so[:, C:] + h if residual[l] else so[:, C:]
    y = torch.relu(torch.relu(skip) @ head1_w + head1_b)
    lg = (y @ head2_w + head2_b).view(N, Ci, K).index_select(1, c).squeeze(1)      # (N, K)
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


def gated_pixelcnn_step_ref(image, row_cache, codes, step, logits, noise, links, class_bias, cond_map, map_w, prefix,
                            given, h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, taps, residual, levels,
                            temperature=1.0):
    """Reference of :func:`gated_pixelcnn_step` in plain PyTorch (any device, float32/float64): a few torch ops
    per block. Mutates image, row_cache, codes, step and logits like the op."""
    pack = GatedPixelStepPack(row_cache, links, class_bias, cond_map, map_w, h_w, h_b, so_w, so_b, head1_w, head1_b,
                              head2_w, head2_b, taps, residual)
    gated_pixelcnn_step_packed(image, codes, step, logits, noise, prefix, given, pack, levels, temperature,
                               reference=True)


def gated_pixelcnn_step(image, row_cache, codes, step, logits, noise, links, class_bias, cond_map, map_w, prefix,
                        given, h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, taps, residual, levels,
                        temperature=1.0):
    """Generate sub-pixel ``step[0]`` of a Gated PixelCNN for the whole batch, fused (see the module docstring).

    Mutates image, row_cache, codes, step (+1) and logits; returns None. Runs the compiled kernel
    (one call on CPU, one launch on CUDA) or :func:`gated_pixelcnn_step_ref` according to
    :func:`fastar.set_backend`.
    """
    pack = GatedPixelStepPack(row_cache, links, class_bias, cond_map, map_w, h_w, h_b, so_w, so_b, head1_w, head1_b,
                              head2_w, head2_b, taps, residual)
    gated_pixelcnn_step_packed(image, codes, step, logits, noise, prefix, given, pack, levels, temperature)


# Registrations only when this build of _C has the op (a stale build falls back to the reference).
if _backend.has_ops("gated_pixelcnn_step"):

    @torch.library.register_fake("fastar::gated_pixelcnn_step")
    def _gated_pixelcnn_step_fake(image, row_cache, codes, step, logits, noise, links, prefix, given, pack, config,
                                  temperature):
        return None


def gated_op_args(image, codes, step, logits, noise, prefix, given, pack: GatedPixelStepPack, levels,
                  temperature=1.0, op="gated_pixelcnn_step") -> tuple:
    """``torch.ops.fastar.gated_pixelcnn_step``'s full argument tuple (image, row_cache, codes, step, logits,
    noise, links, prefix, given, pack, config, temperature) from the run state and a
    :class:`GatedPixelStepPack`."""
    return (image, pack.row_cache, codes, step, logits, noise, pack.links, prefix, given, pack.to_pack(),
            pack.config(levels, op), float(temperature))


def gated_pixelcnn_step_packed(image, codes, step, logits, noise, prefix, given, pack: GatedPixelStepPack, levels,
                               temperature=1.0, reference=False):
    """:func:`gated_pixelcnn_step` (or, with ``reference=True``, :func:`gated_pixelcnn_step_ref`) with the weights
    as one :class:`GatedPixelStepPack`."""
    op = "gated_pixelcnn_step_ref" if reference else "gated_pixelcnn_step"
    args = gated_op_args(image, codes, step, logits, noise, prefix, given, pack, levels, temperature, op)
    _check(op, *args)
    if not reference and _backend.use_kernel("gated_pixelcnn_step", pack.h_b.device, pack.h_b.dtype,
                                             KERNEL_DTYPES):
        torch.ops.fastar.gated_pixelcnn_step(*args)
        return
    _ref_impl(*args)


def bind_gated_pixelcnn_step(image, codes, step, logits, noise, prefix, given, pack: GatedPixelStepPack, levels,
                             temperature=1.0, kernel: bool | None = None):
    """:func:`gated_pixelcnn_step_packed` with every argument fixed and checked once: returns ``fn()``
    that advances one sub-pixel (the op reads its position from ``step``). For decode loops, where
    re-checking every argument in Python would cost more than the step. ``kernel``: None = the
    backend's choice, False = the reference twin (e.g. under the reference backend). ``fn.args`` is
    the op's full argument tuple (:func:`gated_op_args`), for callers that run it another way (tests)."""
    args = gated_op_args(image, codes, step, logits, noise, prefix, given, pack, levels, temperature)
    _check("gated_pixelcnn_step", *args)
    use = _backend.use_kernel("gated_pixelcnn_step", pack.h_b.device, pack.h_b.dtype, KERNEL_DTYPES)
    op = torch.ops.fastar.gated_pixelcnn_step if (use if kernel is None else kernel and use) else _ref_impl

    def fn():
        op(*args)

    fn.args = args          # the op's full argument list and the op itself, for callers that run it
    fn.op = op              # another way (tests, the thread-neutrality check)
    return fn
