"""The generation protocol: what a model states (:class:`Sequence`), what the engine holds for
one run (:class:`GenerationRun`) and what a model's cache offers (:class:`InferenceCache`).

Steps, values and slots. Step t draws ``head.values`` values jointly (V: one sub-pixel, one audio
sample, or a whole RGB pixel from one mixture component). Values live in ``run.values`` (N, S)
with S = T * V slots; step t's values go to the columns ``slots[t]`` (V,). A model picks the
layout its kernels want: an image uses its (C, H, W) memory order, so ``values.view(N, C, H, W)``
is the image; audio uses time order. The engine checks that the slots are a permutation of the S
columns, so every value is drawn exactly once.

Given values belong to the engine: ``sample(..., prefix=x, mask=m)`` gives some of the values
(``x`` in the layout ``sample`` returns, ``m`` True where given), ``sample(..., prime=p)`` gives
the first P steps of a sequence model (the model lengthens its sequence by ``num_prime``). The
engine maps them into the slot layout (``Sequence.out_slots``), checks them against the head
(:meth:`fastar.nn.heads.Head.check_values`) and keeps them: a per-op cache never sees them, a
fused cache that draws inside must honour ``run.given_mask`` / ``run.given_values`` (the
contract suite checks it).

A cache fits any family: its ``plan(t)`` says what work step t starts, as a hashable ``key``
(equal keys = identical device work, which reads the position from ``run.t`` on the device,
so the engine captures one CUDA graph per key) and how many steps that work covers. The engine
then calls ``step(key, t)`` / ``update(key, t, values)`` (per-op caches) or ``advance(key, t, k)``
(fused caches), always giving the host step index ``t`` as well. When the run records every
step's parameters the engine asks for one step at a time. Examples:

- 2-D conv caches (PixelCNN): key "pixel" on most steps, "row" at the start of a row (the
  vertical stack runs once per row, then the pixel);
- 1-D ring queues (WaveNet): key "step"; a fused multi-step op: ("chunk", k) covering k steps;
- LSTM state along a row or diagonal (PixelRNN): key "row" / "diag" at a row / diagonal start;
- key/value caches (PixelSNAIL): "step", the cache appends K/V at ``run.t``;
- multi-resolution caches updated every ``stride`` steps (PixelCNN++): key ``t % period``;
- no cache (a model with no incremental path): :class:`ForwardCache`, one full pass per step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from fastar.nn.heads import Head

__all__ = ["Sequence", "GenerationRun", "InferenceCache", "ForwardCache"]


@dataclasses.dataclass
class Sequence:
    """What a model states for one sampling run (returned by ``model.sequence(n, shape, cond, ...)``).

    n: batch; steps: T; head: the :class:`fastar.nn.heads.Head` of every step (V = ``head.values``
    values a step); forward(values, t): the naive baseline, one full teacher-forced forward pass on
    ``values`` (N, S) giving step t's parameters (N, P), or every step's (T, N, P) when t is None;
    shape: one example's shape as ``sample`` returns it (e.g. (C, H, W), (T,), (D,));
    slots: (T, V) (or (T,) when V = 1) int64, the columns of ``values`` that step t fills (None =
    step order, ``arange(T * V).view(T, V)``); out_slots: the columns ``sample`` returns, in the
    order of its flattened output (None = all S columns in order); finish(values): what ``sample``
    returns (None = ``values[:, out_slots].view(N, *shape)``); cond: the checked conditioning,
    passed on to the cache; num_prime: how many leading steps a prime gives (set by the model when
    it was asked for ``num_prime``); step_cond: per-step conditioning a cache reads (WaveNet's
    global + local terms), or None; encode(x): given values in the layout and units ``sample``
    returns -> the head's values (the inverse of ``finish``'s conversion, e.g. integer codes -> bin
    centres in [-1, 1]; None = the identity).

    A family that needs more for its cache subclasses this dataclass (typed fields, not a dict).
    """

    n: int
    steps: int
    head: Head
    forward: Callable
    shape: tuple = ()
    slots: torch.Tensor | None = None
    out_slots: torch.Tensor | None = None
    finish: Callable | None = None
    cond: object = None
    num_prime: int = 0
    step_cond: torch.Tensor | None = None
    encode: Callable | None = None

    def slot_table(self) -> torch.Tensor:
        """(T, V) int64 slot table (CPU), checked to be a permutation of the T * V value columns."""
        T, V = self.steps, self.head.values
        if self.slots is None:
            return torch.arange(T * V).view(T, V)
        s = torch.as_tensor(self.slots).to(torch.int64).cpu()
        s = s.unsqueeze(1) if s.dim() == 1 and V == 1 else s
        if tuple(s.shape) != (T, V):
            raise ValueError(f"Sequence.slots must be ({T}, {V}) (steps x values a step), got {list(s.shape)}")
        if not torch.equal(s.flatten().sort().values, torch.arange(T * V)):
            raise ValueError(f"Sequence.slots must be a permutation of the {T * V} value columns "
                             "(every value drawn exactly once)")
        return s

    def output_slots(self) -> torch.Tensor:
        S = self.steps * self.head.values
        return torch.arange(S) if self.out_slots is None else torch.as_tensor(self.out_slots).to(torch.int64).cpu()

    def finish_values(self, values: torch.Tensor):
        if self.finish is not None:
            return self.finish(values)
        out = self.output_slots()
        v = values if out.numel() == values.shape[1] and bool((out == torch.arange(out.numel())).all()) else \
            values.index_select(1, out.to(values.device))
        return v.reshape(values.shape[0], *self.shape)


class GenerationRun:
    """The engine's state for one run: the uniforms (T, N, U), the values buffer (N, S), the slot
    table (T, V), the given values and the step counter.

    ``counter`` is a (2,) int64 device tensor: ``counter[0]`` (``t``, a (1,) view) is the step the
    next work starts at, read on the device by captured steps and advanced by the engine (or by a
    fused op that draws inside); ``counter[1]`` is scratch a fused kernel may use (it stays 0
    between calls). ``given_values`` / ``given_mask`` (N, S) or None: set by the engine from the
    call's prefix / prime (see the module docstring).
    """

    def __init__(self, model, seq: Sequence, noise, temperature, device, dtype, acc, record=False,
                 given_values=None, given_mask=None):
        self.model, self.seq, self.noise, self.temperature = model, seq, noise, temperature
        self.device, self.dtype, self.acc, self.record = device, dtype, acc, record
        n, T = seq.n, seq.steps
        table = seq.slot_table()
        self.slot_table = table.to(device)                                    # (T, V)
        self.slots = self.slot_table[:, 0].contiguous() if table.shape[1] == 1 else self.slot_table
        vdt = seq.head.value_dtype(acc)
        self.values = torch.zeros(n, table.numel(), dtype=vdt, device=device)
        self.given_values = self.given_mask = None
        if given_mask is not None:
            self.given_mask = given_mask.to(device=device, dtype=torch.bool).contiguous()
            self.given_values = given_values.to(device=device, dtype=vdt).contiguous()
            self.values.copy_(torch.where(self.given_mask, self.given_values, torch.zeros_like(self.values)))
        self.counter = torch.zeros(2, dtype=torch.int64, device=device)
        self.t = self.counter[:1]

    @property
    def cond(self):
        return self.seq.cond

    @property
    def step_values(self) -> torch.Tensor:
        """The drawn values in step order, (N, T, V)."""
        return self.values[:, self.slot_table.flatten()].view(self.seq.n, self.seq.steps, -1)


class InferenceCache:
    """Base of a model's inference cache (see the module docstring).

    Per-op caches (``draws = False``) implement ``step(key, t) -> params (N, P)`` for step t (also
    at ``run.t`` on the device) and ``update(key, t, values (N, V))`` to take the drawn values
    back; the engine draws in between and applies the given values. A fused cache (``draws =
    True``) implements ``advance(key, t, k)``: k steps from t, drawing from ``run.noise`` exactly
    as the head's ``draw`` would, honouring the given values, writing ``run.values`` and advancing
    ``run.t`` by k; ``params`` is then its buffer of the last step's parameters (N, P).
    """

    draws = False
    capturable = True       # every step reads its position from device tensors (CUDA graphs allowed)
    # A fused cache whose ``advance(key, t, 1)`` reads every earlier value from ``run.values`` when the
    # step starts (nothing it drew is kept elsewhere), so a value written into ``run.values`` after the
    # call replaces the drawn one for every later step: what lets :func:`fastar.sampling.drive` run it
    # with supplied values. Checked for every family that sets it (tests/test_codec.py).
    reads_values = False
    params: torch.Tensor | None = None

    def __init__(self, run: GenerationRun):
        self.run = run

    def plan(self, t: int):
        return "step", 1

    def step(self, key, t: int) -> torch.Tensor:
        raise NotImplementedError

    def update(self, key, t: int, values: torch.Tensor) -> None:
        pass

    def advance(self, key, t: int, k: int) -> None:
        raise NotImplementedError


class ForwardCache(InferenceCache):
    """No cache at all: each step is one full forward pass (``Sequence.forward``). Not capturable
    in a CUDA graph (the forward reads the host step index); the engine's default for a model
    without ``allocate_inference_cache``."""

    capturable = False

    def step(self, key, t):
        return self.run.seq.forward(self.run.values, t)
