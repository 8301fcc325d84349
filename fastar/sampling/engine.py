"""Sampling engines for discrete-image autoregressive models (PixelCNN, Gated PixelCNN).

Sub-pixels are generated in raster order, colours R, G, B inside each pixel: step
``t = (i * W + j) * C + c``. Every engine draws the uniforms of the whole image up
front, ``noise = torch.rand(T, N, generator=generator)``, and step t samples with
``categorical_sample(logits, noise=noise[t])`` (inverse CDF), so the naive and the
cached engines given the same generator state return the same images (up to a
rounding difference landing exactly on a CDF boundary, which float64 makes vanishingly
rare).

- :func:`naive_sample`: the whole network on the whole image for every sub-pixel
  (T full forward passes).
- :func:`cached_sample`: per step only the new position through every layer, reading
  the per-layer caches (:mod:`fastar.sampling.caches`); Gated PixelCNN's vertical
  stack runs once per row. A Gated PixelCNN's pixel step is one fused op,
  :func:`fastar.ops.gated_pixelcnn_step` (one C++ call / one CUDA launch for every block,
  the head and the draw), wherever its kernel is built; else a few torch ops per block. The position counter lives on the device and every index is
  a device gather, so a step has no host sync; on CUDA the first pixel step and the
  first row step run eagerly (warm-up), the second ones are captured in CUDA graphs,
  and every later step is a graph replay.

Prefix completion: ``prefix`` (N, C, H, W) integer image and ``mask`` (broadcastable
to it, bool, True = given). Given sub-pixels are copied (their uniform is drawn and
unused), the others sampled conditioned on everything before them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastar import _backend
from fastar.ops import pixel_step as _ps
from fastar.ops.mixture import categorical_sample
from fastar.sampling.caches import fused_pixel_step_supported, make_cache, pack_gated_pixel_step

__all__ = ["SamplePlan", "prepare", "sample", "naive_sample", "cached_sample"]


@dataclass
class SamplePlan:
    """Everything both engines need, resolved and checked once."""
    n: int
    C: int
    H: int
    W: int
    levels: int
    device: torch.device
    dtype: torch.dtype
    noise: torch.Tensor                 # (T, N) uniforms
    cond: object
    prefix: torch.Tensor | None         # (N, C * H * W) int64
    given: torch.Tensor | None          # (N, C * H * W) bool
    temperature: float

    @property
    def T(self) -> int:
        return self.C * self.H * self.W

    def step_index(self, t: int) -> tuple[int, int, int]:
        p, c = divmod(t, self.C)
        i, j = divmod(p, self.W)
        return i, j, c


def _batch_of(cond):
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.dim() >= 1 else None
    if isinstance(cond, (tuple, list)) and cond and isinstance(cond[0], torch.Tensor):
        return cond[0].shape[0]
    return None


def prepare(model, n=None, shape=None, cond=None, generator=None, temperature=1.0, prefix=None,
            mask=None) -> SamplePlan:
    """Check the arguments of :meth:`sample` and draw the uniforms of the whole image."""
    name = type(model).__name__
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    C, levels = model.in_channels, model.levels
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"{name}.sample: temperature must be a non-negative number, got {temperature!r}")
    if prefix is not None:
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 4 or prefix.shape[1] != C:
            raise ValueError(f"{name}.sample: prefix must be an image batch (N, {C}, H, W), got shape "
                             f"{list(getattr(prefix, 'shape', []))}")
        if mask is None:
            raise ValueError(f"{name}.sample: prefix needs a mask (bool, broadcastable to {list(prefix.shape)}, "
                             "True where the prefix is given)")
        if shape is None:
            shape = tuple(prefix.shape[2:])
        if n is None:
            n = prefix.shape[0]
    elif mask is not None:
        raise ValueError(f"{name}.sample: mask given without a prefix")
    if n is None:
        n = _batch_of(cond)
    if n is None:
        raise ValueError(f"{name}.sample: say how many images to draw (n), or pass a prefix or batched cond")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
    if shape is None:
        raise ValueError(f"{name}.sample: shape (H, W) is needed when no prefix is given")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        if shape[0] != C:
            raise ValueError(f"{name}.sample: shape {shape} has {shape[0]} channels, the model has {C}")
        shape = shape[1:]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name}.sample: shape must be (H, W) or (C, H, W) with positive sizes, got {shape}")
    H, W = shape
    pflat = gflat = None
    if prefix is not None:
        if prefix.shape[0] != n or tuple(prefix.shape[2:]) != (H, W):
            raise ValueError(f"{name}.sample: prefix must be ({n}, {C}, {H}, {W}), got {list(prefix.shape)}")
        if prefix.is_floating_point() and not torch.equal(prefix, prefix.round()):
            raise ValueError(f"{name}.sample: prefix must hold integer values")
        m = torch.as_tensor(mask, device=device)
        if m.dtype != torch.bool:
            raise ValueError(f"{name}.sample: mask must be bool (True = given), got {m.dtype}")
        try:
            m = m.expand(n, C, H, W)
        except RuntimeError:
            raise ValueError(f"{name}.sample: mask of shape {list(m.shape)} does not broadcast to "
                             f"{[n, C, H, W]}") from None
        pflat = prefix.to(device=device, dtype=torch.int64)
        if pflat.numel() and bool(((pflat < 0) | (pflat >= levels))[m].any()):
            raise ValueError(f"{name}.sample: given prefix values must lie in [0, {levels})")
        # Step t's flat index is c * H * W + i * W + j, the (C, H, W) memory order.
        pflat = pflat.clamp(0, levels - 1).reshape(n, C * H * W).contiguous()
        gflat = m.reshape(n, C * H * W).contiguous()
    if isinstance(cond, int) and not isinstance(cond, bool):
        cond = torch.full((n,), cond, dtype=torch.int64, device=device)
    elif isinstance(cond, torch.Tensor):
        cond = cond.to(device)
    elif isinstance(cond, (tuple, list)):
        cond = tuple(c.to(device) if isinstance(c, torch.Tensor) else c for c in cond)
    b = _batch_of(cond)
    if b is not None and b != n:
        raise ValueError(f"{name}.sample: cond has batch {b}, but {n} images were asked for")
    T = C * H * W
    ndtype = torch.float64 if dtype == torch.float64 else torch.float32
    gdev = generator.device if generator is not None else device
    noise = torch.rand((T, n), generator=generator, device=gdev, dtype=ndtype).to(device)
    return SamplePlan(n, C, H, W, levels, device, dtype, noise, cond, pflat, gflat, float(temperature))


def _draw(logits_c, u, levels, temperature):
    """Sample from one sub-pixel's logits: (N,) for binary (a Bernoulli logit) or (N, levels)."""
    if levels == 2:
        two = torch.stack([torch.zeros_like(logits_c), logits_c], 1)
        return categorical_sample(two, dim=1, noise=u, temperature=temperature)
    return categorical_sample(logits_c, dim=1, noise=u, temperature=temperature)


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is not worth failing for
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _logits_layout(plan, rec):
    """Per-step logits (T, N[, L]) -> the model's forward layout (N, C, H, W) or (N, C, L, H, W)."""
    n, C, H, W = plan.n, plan.C, plan.H, plan.W
    if plan.levels == 2:
        return rec.view(H, W, C, n).permute(3, 2, 0, 1).contiguous()
    return rec.view(H, W, C, n, plan.levels).permute(3, 2, 4, 0, 1).contiguous()


@torch.no_grad()
def naive_sample(model, plan: SamplePlan, progress: bool = False, return_logits: bool = False):
    """T full forward passes; returns (N, C, H, W) int64 (and the per-step logits if asked)."""
    n, C, H, W = plan.n, plan.C, plan.H, plan.W
    x = torch.zeros(n, C, H, W, dtype=torch.int64, device=plan.device)
    if plan.prefix is not None:
        x.view(n, -1).copy_(torch.where(plan.given, plan.prefix, 0))
        all_given = plan.given.all(0).tolist()
    rec = [] if return_logits else None
    bar = _progress(plan.T, progress, "naive sampling")
    for t in range(plan.T):
        i, j, c = plan.step_index(t)
        flat = (c * H + i) * W + j
        if plan.prefix is not None and all_given[flat] and not return_logits:
            if bar is not None:
                bar.update()
            continue  # the whole batch has this sub-pixel given: no need to run the network
        out = model(x, plan.cond)
        lg = out[:, c, i, j] if plan.levels == 2 else out[:, c, :, i, j]
        val = _draw(lg, plan.noise[t], plan.levels, plan.temperature)
        if plan.prefix is not None:
            val = torch.where(plan.given[:, flat], plan.prefix[:, flat], val)
        x[:, c, i, j] = val
        if rec is not None:
            rec.append(lg)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if return_logits:
        return x, _logits_layout(plan, torch.stack(rec))
    return x


class _CachedRun:
    """The state of one cached sampling run: caches, device counters, index tables and the two steps."""

    def __init__(self, model, plan: SamplePlan, fused: bool | None = None):
        self.plan, self.model = plan, model
        n, C, H, W, dev = plan.n, plan.C, plan.H, plan.W, plan.device
        self.x_img = torch.zeros(n, C, H, W, dtype=plan.dtype, device=dev)
        self.out = torch.zeros(n, C * H * W, dtype=torch.int64, device=dev)
        # The CUDA kernel keeps the per-block residual flags in one 32-bit word.
        can_fuse = fused_pixel_step_supported(model) and (dev.type != "cuda" or len(model.blocks) <= 32)
        if fused and not can_fuse:
            raise ValueError(f"fused=True: {type(model).__name__}'s pixel step does not fit the fused op "
                             "(a Gated PixelCNN with equal block widths is needed)")
        if fused is None:
            fused = can_fuse and _backend.use_kernel("gated_pixelcnn_step", dev, plan.dtype, _ps.KERNEL_DTYPES)
        self.fused = bool(fused)
        self.cache = make_cache(model, self.x_img, plan.cond, pixel=not self.fused)
        if self.fused:
            self._set_up_fused()
        # Step t -> [i, j, c, i * W + j, c * H * W + i * W + j], gathered on the device
        # with the step counter so that a captured step needs no host input.
        t = torch.arange(plan.T, device=dev)
        c = t % C
        p = t // C
        i, j = p // W, p % W
        self.table = torch.stack([i, j, c, p, c * H * W + p], 1).contiguous()
        r = torch.arange(H, device=dev)
        cols = torch.arange(W, device=dev)
        self.row_pos = torch.stack([r[:, None].expand(H, W), cols[None, :].expand(H, W)], 2).contiguous()
        self.row_hw = (r[:, None] * W + cols[None, :]).contiguous()
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.r = torch.zeros(1, dtype=torch.int64, device=dev)
        self.scale = 2.0 / (plan.levels - 1)

    def _set_up_fused(self):
        plan = self.plan
        k = 1 if plan.levels == 2 else plan.levels
        pk = pack_gated_pixel_step(self.model, self.cache, plan.cond)
        self.step = torch.zeros(2, dtype=torch.int64, device=plan.device)   # [t, the CUDA arrival counter]
        self.logits = torch.zeros(plan.n, k, dtype=plan.dtype, device=plan.device)
        args = (self.x_img, pk["row_cache"], self.out, self.step, self.logits, plan.noise, pk["links"],
                pk["class_bias"], pk["cond_map"], pk["map_w"], plan.prefix, plan.given, pk["h_w"], pk["h_b"],
                pk["so_w"], pk["so_b"], pk["head1_w"], pk["head1_b"], pk["head2_w"], pk["head2_b"], pk["taps"],
                pk["residual"], plan.levels, plan.temperature)
        # Checked once here; a step then calls the op directly (the checks would cost more than it).
        _ps._check("gated_pixelcnn_step", *args)
        if _backend.use_kernel("gated_pixelcnn_step", plan.device, plan.dtype, _ps.KERNEL_DTYPES):
            self._fused_fn = torch.ops.fastar.gated_pixelcnn_step
        else:  # fused=True under the reference backend: the op's PyTorch twin
            self._fused_fn = _ps._ref_impl
        self._fused_args = args

    def pixel_step(self):
        if self.fused:
            self._fused_fn(*self._fused_args)
            return self.logits[:, 0] if self.plan.levels == 2 else self.logits
        plan = self.plan
        cur = self.table.index_select(0, self.t)                    # (1, 5)
        pos, c, hw, flat = cur[:, 0:2], cur[0, 2:3], cur[0, 3:4], cur[0, 4:5]
        jcol = cur[0, 1:2]
        logits = self.cache.pixel(pos, hw, jcol)                    # (N, out_channels)
        if plan.levels == 2:
            lg = logits.index_select(1, c).squeeze(1)               # (N,)
        else:
            lg = logits.view(plan.n, plan.C, plan.levels).index_select(1, c).squeeze(1)  # (N, L)
        u = self.plan.noise.index_select(0, self.t).squeeze(0)
        val = _draw(lg, u, plan.levels, plan.temperature)
        if plan.prefix is not None:
            val = torch.where(plan.given.index_select(1, flat).squeeze(1),
                              plan.prefix.index_select(1, flat).squeeze(1), val)
        self.out.index_copy_(1, flat, val.unsqueeze(1))
        x_new = (val.to(plan.dtype) * self.scale - 1.0).unsqueeze(1)
        self.x_img.view(plan.n, -1).index_copy_(1, flat, x_new)
        self.t.add_(1)
        return lg

    def row_step(self):
        # Called at the start of row r + 1: the vertical stack over the completed row r.
        self.cache.row(self.row_pos.index_select(0, self.r).squeeze(0), self.row_hw.index_select(0, self.r).squeeze(0))
        self.r.add_(1)


class _GraphRunner:
    """Runs a step eagerly once (warm-up), captures it in a CUDA graph the second time, replays after."""

    def __init__(self, fn):
        self.fn, self.calls, self.graph = fn, 0, None

    def __call__(self):
        if self.calls == 0:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.fn()
            torch.cuda.current_stream().wait_stream(s)
        elif self.calls == 1:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.fn()
            self.graph.replay()
        else:
            self.graph.replay()
        self.calls += 1


@torch.no_grad()
def cached_sample(model, plan: SamplePlan, progress: bool = False, return_logits: bool = False,
                  cuda_graphs: bool | None = None, fused: bool | None = None):
    """Cached sampling; returns (N, C, H, W) int64 (and the per-step logits if asked).

    cuda_graphs: None = on for CUDA tensors (unless return_logits), False = eager steps.
    fused: None = a Gated PixelCNN's pixel step runs as one :func:`fastar.ops.gated_pixelcnn_step`
    call when its kernel is available for the device and dtype (else the per-op path: a few torch
    ops per block); False = always the per-op path; True = the fused op (its PyTorch twin under the
    reference backend).
    """
    run = _CachedRun(model, plan, fused)
    use_graphs = plan.device.type == "cuda" and not return_logits if cuda_graphs is None else cuda_graphs
    if use_graphs and plan.device.type != "cuda":
        raise ValueError("cuda_graphs=True needs the model on a CUDA device")
    pixel = _GraphRunner(run.pixel_step) if use_graphs else run.pixel_step
    row = _GraphRunner(run.row_step) if use_graphs else run.row_step
    has_rows = run.cache.has_rows
    per_row = plan.C * plan.W
    rec = [] if return_logits else None
    bar = _progress(plan.T, progress, "cached sampling")
    for t in range(plan.T):
        if has_rows and t and t % per_row == 0:
            row()
        lg = pixel()
        if rec is not None:
            rec.append(lg.clone())   # the fused step reuses its logits buffer
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    x = run.out.view(plan.n, plan.C, plan.H, plan.W)
    if return_logits:
        return x, _logits_layout(plan, torch.stack(rec))
    return x


def sample(model, n=None, shape=None, cond=None, generator=None, temperature=1.0, method="cached", prefix=None,
           mask=None, progress=True):
    """Draw images from `model` (see :meth:`fastar.models.PixelCNN.sample`)."""
    if method not in ("cached", "naive"):
        raise ValueError(f"{type(model).__name__}.sample: method must be 'cached' or 'naive', got {method!r}")
    was_training = model.training
    model.eval()
    try:
        plan = prepare(model, n, shape, cond, generator, temperature, prefix, mask)
        fn = cached_sample if method == "cached" else naive_sample
        return fn(model, plan, progress=progress)
    finally:
        model.train(was_training)
