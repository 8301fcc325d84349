"""The generation protocol: what a model states (:class:`Sequence`), what the engine holds for
one run (:class:`GenerationRun`) and what a model's cache offers (:class:`InferenceCache`).

Step order and value slots: step t draws one value (a sub-pixel, an audio sample, ...). Values
live in ``run.values`` (N, T), step t's in column ``slots[t]`` (a model picks the layout its
kernels want: an image uses its (C, H, W) memory order, so ``values.view(N, C, H, W)`` is the
image; audio uses time order). Given values (prefix + mask, prime) use the same layout.

A cache fits any family: its ``plan(t)`` says what work step t starts, as a hashable ``key``
(equal keys = identical device work, which reads the position from ``run.t`` on the device,
so the engine captures one CUDA graph per key) and how many steps that work covers. Examples:

- 2-D conv caches (PixelCNN): key "pixel" on most steps, "row" at the start of a row (the
  vertical stack runs once per row, then the pixel);
- 1-D ring queues (WaveNet): key "step"; a fused multi-step op: ("chunk", k) covering k steps;
- LSTM state along a row or diagonal (PixelRNN): key "row" / "diag" at a row / diagonal start;
- key/value caches (PixelSNAIL): "step", the cache appends K/V at ``run.t``;
- multi-resolution caches updated every ``stride`` steps (PixelCNN++): key ``t % period``;
- no cache (MADE/NADE with no incremental path): :class:`ForwardCache`, one full pass per step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from fastar.sampling.heads import Head

__all__ = ["Sequence", "GenerationRun", "InferenceCache", "ForwardCache"]


@dataclasses.dataclass
class Sequence:
    """What a model states for one sampling run (returned by ``model.sequence(...)``).

    n: batch; steps: T; head: the :class:`fastar.sampling.heads.Head` of every step; slots: (T,)
    int64, the column of ``values`` that step t fills (None = t); forward(values, t): the naive
    baseline, one full teacher-forced forward pass on ``values`` (N, T) giving step t's
    parameters (N, P), or every step's (T, N, P) when t is None; finish(values): what ``sample``
    returns; given_values / given_mask: (N, T) in the slot layout, or None; cond: the checked
    conditioning, passed on to the cache; info: anything else the model's cache needs (shape...).
    """

    n: int
    steps: int
    head: Head
    forward: Callable
    finish: Callable
    slots: torch.Tensor | None = None
    given_values: torch.Tensor | None = None
    given_mask: torch.Tensor | None = None
    cond: object = None
    info: dict = dataclasses.field(default_factory=dict)


class GenerationRun:
    """The engine's state for one run: the uniforms (T, N, U), the values buffer (N, T), the slot
    table, the given values and the step counter.

    ``counter`` is a (2,) int64 device tensor: ``counter[0]`` (``t``, a (1,) view) is the step the
    next work starts at, read on the device by captured steps and advanced by the engine (or by a
    fused op that draws inside); ``counter[1]`` is scratch a fused kernel may use (it stays 0
    between calls).
    """

    def __init__(self, model, seq: Sequence, noise, temperature, device, dtype, acc, record=False):
        self.model, self.seq, self.noise, self.temperature = model, seq, noise, temperature
        self.device, self.dtype, self.acc, self.record = device, dtype, acc, record
        n, T = seq.n, seq.steps
        self.slots = (seq.slots.to(device) if seq.slots is not None
                      else torch.arange(T, device=device))
        vdt = seq.head.value_dtype(acc)
        self.values = torch.zeros(n, T, dtype=vdt, device=device)
        self.given_values = self.given_mask = None
        if seq.given_mask is not None:
            self.given_mask = seq.given_mask.to(device=device, dtype=torch.bool).contiguous()
            self.given_values = seq.given_values.to(device=device, dtype=vdt).contiguous()
            self.values.copy_(torch.where(self.given_mask, self.given_values, torch.zeros_like(self.values)))
        self.counter = torch.zeros(2, dtype=torch.int64, device=device)
        self.t = self.counter[:1]

    @property
    def cond(self):
        return self.seq.cond


class InferenceCache:
    """Base of a model's inference cache (see the module docstring).

    Per-op caches (``draws = False``) implement ``step(key) -> params (N, P)`` for the step at
    ``run.t`` and ``update(key, values (N,))`` to take the drawn value back; the engine draws in
    between. A fused cache (``draws = True``) implements ``advance(key, k)``: k steps from
    ``run.t``, drawing from ``run.noise`` exactly as the head's ``draw`` would, honouring the
    given values, writing ``run.values`` and advancing ``run.t`` by k; ``params`` is then its
    buffer of the last step's parameters (N, P).
    """

    draws = False
    capturable = True       # every step reads its position from device tensors (CUDA graphs allowed)
    params: torch.Tensor | None = None

    def __init__(self, run: GenerationRun):
        self.run = run

    def plan(self, t: int):
        return "step", 1

    def step(self, key) -> torch.Tensor:
        raise NotImplementedError

    def update(self, key, values: torch.Tensor) -> None:
        pass

    def advance(self, key, k: int) -> None:
        raise NotImplementedError


class ForwardCache(InferenceCache):
    """No cache at all: each step is one full forward pass (``Sequence.forward``). Not capturable
    in a CUDA graph (the forward reads the host step index); the engine's default for a model
    without ``allocate_inference_cache``."""

    capturable = False

    def __init__(self, run):
        super().__init__(run)
        self._t = 0

    def plan(self, t):
        self._t = t
        return "forward", 1

    def step(self, key):
        return self.run.seq.forward(self.run.values, self._t)
