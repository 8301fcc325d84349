"""CPU threads of the decode loops: the one thread policy of fastar, and a way to pin it.

Why a policy at all. A cached decode loop runs hundreds of small steps. With all of torch's threads
each step forks and joins (or meets at spin barriers inside a fused op); when another process holds
a core, a thread that lost its core stalls the others at every join, and all threads become several
times slower than one (measured on the 2-core box: Gated PixelCNN sampling 2.5x, PixelRNN 3.5x).
Which is faster depends on the load, so the engine measures (:class:`ThreadChoice`): per kind of
step it keeps the recent seconds per call on one thread and on all, runs the faster and re-times
the other now and then.

Why it never changes a bit. The codec decodes only if encode and decode see the very same
probabilities, so a thread count picked by a clock must not reach a result. The policy therefore
switches a kind of step only when everything that step runs computes the same bits on any thread
count, which is known only for code fastar owns:

- the fused ops in :data:`FUSED_NEUTRAL_OPS` split their work over batch rows, positions or
  16-column blocks of outputs, never over a sum, and every output is one accumulation in a fixed
  order whichever thread computes it (``tests/test_threads.py`` runs each at one thread and at
  ``max(2, os.cpu_count())`` and compares the bits, float32 and float64);
- the ATen ops in :data:`EXACT_ATEN_OPS` do no rounding that depends on a split (views, copies,
  indexing, comparisons, dtype casts).

Everything else runs on one thread, always: torch's GEMMs and convolutions (MKL, OpenBLAS, oneDNN) may pick another blocking or split
a reduction on another thread count and promise nothing (measured with torch 2.14's MKL 2024.2: a
16x4096 @ 4096x16 product gives other bits on two threads than on one; the small products of the
per-op caches happened to agree), and torch's vectorised elementwise maths
(tanh, sigmoid, exp) can round an element differently when a thread split moves it between the
vector body and the scalar tail. Which ops a kind of step runs is recorded once, on its first call
(a dispatch mode over that one call, on one thread); the protocol promises that equal plan keys do
identical work, so one call stands for all of them. Today that makes the fused Gated PixelCNN pixel
step, the fused PixelRNN sub-pixel step, PixelCNN++'s fused pixel step and the fused WaveNet chunk
adaptive; the row steps (torch GEMMs and convolutions, PixelRNN's row-start scans) and the per-op
caches run on one thread.

Why one thread for the rest, and not the caller's count: a fixed rule keeps the bits, and one
thread is the count that does not suffer when another process takes a core (measured on the 2-core
box with a core busy, batch 16: Gated PixelCNN 1.4 s against 6-7 s with its row steps on two
threads, PixelRNN 0.45 s against 8-20 s; quiet, it costs the Gated PixelCNN's row steps about 15%
and PixelRNN nothing). It also makes the default's bits independent of torch's thread count: a
sample drawn (or a code decoded) with 2 threads and with 64 is the same, on the same CPU and build.
Where the per-op steps are worth many threads (large batches on many cores), ``FASTAR_CPU_THREADS=all``
or :func:`pinned` runs every step on them.

Pinning. ``FASTAR_CPU_THREADS`` chooses the policy: ``adaptive`` (unset or empty, the default),
``all`` (every step on torch's thread count), ``one`` (every step on one thread) or a number N (every
step on N threads). :func:`pinned` does the same for a block of code, whatever the environment
says: ``with fastar.threads.pinned(4): ...`` runs every decode loop inside on 4 threads (None: the
current count) and gives torch its thread count back after. The adaptive default gives the bits of
``pinned(1)`` (tested for every registered family, switching at every step); pinning is for callers
that want a fixed cost, or every step on many threads.

The thread count is set with ``torch.set_num_threads`` (process-wide) only when it changes, and
given back when the loop ends, also on an error.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StepThreads", "ThreadChoice", "choice_for", "policy", "pinned", "step_is_neutral", "FUSED_NEUTRAL_OPS",
           "EXACT_ATEN_OPS"]

# fastar's CPU kernels whose results are the same bits on any thread count (each tested at one thread
# and at N in tests/test_threads.py; an op joins this set only with such a test).
FUSED_NEUTRAL_OPS = frozenset({
    "fastar::gated_pixelcnn_step",       # batch rows over threads; a row's arithmetic is the same in any tile
    "fastar::pixelrnn_step",             # batch rows over threads; a row's arithmetic is the same in any tile
    "fastar::pixelcnnpp_ul_step",        # batch rows over threads; a row's GEMV tiles sum in one order
    "fastar::wavenet_step",              # rows, or 16-column blocks of outputs; no sum is split
    "fastar::causal_conv1d_update",      # batch rows over threads
    "fastar::categorical_sample",        # positions over threads
    "fastar::sample_discretized_mix_logistic",   # tiles of positions, fixed by the shape
})

# ATen ops that round nothing, or round each element on its own the same way on every path.
EXACT_ATEN_OPS = frozenset({f"aten::{n}" for n in (
    # views and metadata
    "alias", "as_strided", "detach", "expand", "permute", "select", "slice", "squeeze", "t", "transpose",
    "unsqueeze", "view", "_unsafe_view", "unbind", "split", "narrow",
    # copies, fills, indexing, host reads
    "clone", "copy_", "empty", "empty_like", "zeros", "zeros_like", "zero_", "fill_", "index_select",
    "index_copy_", "gather", "stack", "cat", "flip", "_local_scalar_dense", "_to_copy", "lift_fresh",
    # comparisons and boolean logic (exact in any order)
    "eq", "ne", "lt", "le", "gt", "ge", "where", "all", "any", "bitwise_and", "bitwise_or", "bitwise_not",
    "logical_and", "logical_or", "logical_not",
)})

NEUTRAL_OPS = FUSED_NEUTRAL_OPS | EXACT_ATEN_OPS


def step_is_neutral(ops) -> bool:
    """Whether a step that runs these ops (schema names, e.g. ``"fastar::wavenet_step"``) gives the same
    bits on any thread count, so that the policy may switch it."""
    return set(ops) <= NEUTRAL_OPS


class _OpRecorder(TorchDispatchMode):
    """The names of the ops one call runs (a kernel's own inner calls are not seen: they are part of
    the kernel, and its entry in FUSED_NEUTRAL_OPS vouches for them)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


# torch wraps every dispatch mode's __torch_dispatch__ so that dynamo never traces it (torch._disable_dynamo),
# and that wrapper imports torch._dynamo on its first call: about 0.8 s on the 2-core box, paid by the first
# sampling call of every process. The recorder only ever runs eagerly inside one decode step, never under
# torch.compile, so it is marked as already disabled (the attribute the wrapper caches its result in). With
# another torch that stores it elsewhere this does nothing and the first call just pays the import.
_raw_dispatch = getattr(_OpRecorder.__dict__["__torch_dispatch__"], "__wrapped__", None)
if _raw_dispatch is not None:
    setattr(_raw_dispatch, "__dynamo_disable", _raw_dispatch)


# ------------------------------------------------------------------------------------------ policy

_ADAPTIVE, _ALL, _ONE = "adaptive", "all", "one"
_pins: list[int] = []       # the counts of the pinned() blocks in force, innermost last


def policy() -> str | int:
    """FASTAR_CPU_THREADS: 'adaptive' (unset or empty), 'all', 'one', or a number of threads (int)."""
    p = os.environ.get("FASTAR_CPU_THREADS", "").strip() or _ADAPTIVE
    if p in (_ADAPTIVE, _ALL, _ONE):
        return p
    if p.isdigit() and int(p) >= 1:
        return int(p)
    raise ValueError(f"FASTAR_CPU_THREADS must be 'adaptive', 'all', 'one' or a number of threads >= 1, got {p!r}")


@contextlib.contextmanager
def pinned(threads: int | None = None):
    """Every decode loop inside the block runs all its steps on ``threads`` CPU threads (None: torch's
    current count), whatever ``FASTAR_CPU_THREADS`` says; torch's thread count is set for the block and
    given back after it (also on an error). Yields the count. Nests."""
    prev = torch.get_num_threads()
    n = prev if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"pinned: threads must be a positive int or None, got {threads!r}")
    if n != prev:
        torch.set_num_threads(n)
    _pins.append(n)
    try:
        yield n
    finally:
        _pins.pop()
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


# -------------------------------------------------------------------------------- the measured choice

class ThreadChoice:
    """The measured choice for one model's decode loops.

    ``use_all(key)`` says whether the next call (a step, or a block of steps) of this kind should run
    on all threads; ``record(key, all, seconds)`` feeds back what the call cost. A choice's figure is
    the mean of its last ``WINDOW`` timings less the largest: single steps on a shared machine have
    outliers of several times their cost, and the first steps after a change of thread count are
    slow by themselves (measured on the 2-core box: after a stretch on one thread, about one
    all-thread step in two or three of 1.5 ms takes 3x its cost for the first few: the idle core's
    thread asleep, its cache cold), so one short timing would mislead; but with a core taken,
    all-thread steps alternate between fast and 2-4x slower, and a median saw only the fast ones.

    Each choice is timed by a burst of calls: enough calls for ``BURST_SECONDS`` of work, at least
    one and at most ``BURST`` (a WaveNet block of 256 steps is one call; a pixel step of 1.5 ms,
    seven). It starts, after one untimed call (a first call pays for allocation, packing and cold
    caches: timed, it made one thread look faster at batch 16), with a burst on all threads and one
    on one thread. After ``EXPLORE`` calls the other choice is re-timed by a burst, whose figure
    replaces its old one (the load may have changed since). Each time a burst confirms the choice the
    wait doubles, up to ``EXPLORE_MAX`` (a choice that loses by a wide margin costs little to keep
    checking); when the choice flips it drops back to ``EXPLORE``. If the choice in use gets slower
    than the other's last figure (a process took a core) it flips at once. (A margin that all threads
    must beat, tried as a hysteresis, kept one thread too often on a quiet machine: not used.)
    """

    EXPLORE = 32
    EXPLORE_MAX = 1024
    WINDOW = 6
    BURST = 8
    BURST_SECONDS = 0.01

    def __init__(self):
        self._e = {}   # key -> _Entry

    class _Entry:
        __slots__ = ("times", "using", "warm", "starting_all", "burst", "probe", "countdown", "wait")

        def __init__(self, explore):
            self.times = {True: [], False: []}    # the last timings of each choice, oldest first
            self.using = None                     # the choice in use; None while starting
            self.warm = False                     # the first call (allocation, packing, cold caches) is not timed
            self.starting_all = True              # starting: in the burst on all threads
            self.burst = None                     # calls per burst, set by the first timing
            self.probe = 0                        # calls left in the current burst
            self.countdown = explore
            self.wait = explore

        def figure(self, all_threads):
            # the mean of the last timings without the largest: one outlier does not count, but a
            # run of slow calls does (under load, all-thread steps alternate between fast and
            # several times slower: the median saw the fast ones and kept coming back)
            t = sorted(self.times[all_threads])
            if len(t) >= 3:
                t = t[:-1]
            return sum(t) / len(t)

        def faster(self):
            return self.figure(True) <= self.figure(False)

    def _entry(self, key):
        e = self._e.get(key)
        if e is None:
            e = self._e[key] = self._Entry(self.EXPLORE)
        return e

    def best(self, key) -> bool | None:
        """The choice in use for this kind of step (True = all threads), None while starting."""
        e = self._e.get(key)
        return None if e is None else e.using

    def warm_up(self, key) -> None:
        """Counts a call made outside the choice as this kind's untimed first call (if it has had none)."""
        self._entry(key).warm = True

    def use_all(self, key) -> bool:
        e = self._entry(key)
        if e.using is None:         # starting: a burst on all threads, then one on one thread
            return e.starting_all
        if e.probe == 0:
            e.countdown -= 1
            if e.countdown <= 0:
                e.probe = e.burst
                e.times[not e.using] = []
        return (not e.using) if e.probe else e.using

    def _flip(self, e, to):
        e.using = to
        e.wait = e.countdown = self.EXPLORE

    def record(self, key, all_threads: bool, seconds: float) -> None:
        e = self._entry(key)
        if not e.warm:
            e.warm = True           # a first call's cost is its set-up, not its thread count
            return
        t = e.times[all_threads]
        t.append(seconds)
        del t[:-self.WINDOW]
        if e.using is None:
            if e.burst is None:     # the first call sizes the bursts
                e.burst = max(1, min(self.BURST, int(self.BURST_SECONDS / max(seconds, 1e-9)) + 1))
                e.probe = e.burst
            e.probe -= 1
            if e.probe == 0:
                if all_threads:
                    e.starting_all = False
                    e.probe = e.burst          # now the burst on one thread
                else:
                    e.using = e.faster()
            return
        if e.probe and all_threads != e.using:           # a call of a re-timing burst
            e.probe -= 1
            if e.probe == 0:
                if e.faster() != e.using:
                    self._flip(e, not e.using)
                else:
                    e.wait = e.countdown = min(2 * e.wait, self.EXPLORE_MAX)
            return
        if all_threads == e.using and e.faster() != e.using:
            self._flip(e, not e.using)                   # the choice in use got slower than the other


_choices: "weakref.WeakKeyDictionary[torch.nn.Module, ThreadChoice]" = weakref.WeakKeyDictionary()


def choice_for(model) -> ThreadChoice:
    """The model's ThreadChoice, kept while the model lives (so a second sampling call starts
    from what the first measured)."""
    c = _choices.get(model)
    if c is None:
        c = _choices[model] = ThreadChoice()
    return c


# --------------------------------------------------------------------------------- the decode loop's

class StepThreads:
    """The thread count of one decode loop's steps: ``before(key, k)`` / ``after(token)`` around each
    call of k steps of the plan's kind ``key`` (or ``with st.step(key, k):``), ``close()`` at the end
    (also after an error: it gives torch its thread count back).

    Inert (torch's thread count untouched, nothing timed) off the CPU, with one torch thread, inside
    :func:`pinned` and under ``FASTAR_CPU_THREADS=all``. Under ``one`` or a number N every step runs on
    that many threads. Under ``adaptive`` a kind of step whose ops are all thread-count neutral (see
    the module docstring) runs on one thread or all by measuring; any other kind on one thread.
    ``steps`` counts the calls' steps run on all threads by the choice (True), on one by the choice
    (False), and at a count fixed by the policy ("pinned": another kind, a first call, a fixed count)."""

    def __init__(self, model, run):
        self.threads = torch.get_num_threads()
        self.current = self.threads
        pol = policy()
        if _pins:
            pol = _ALL                        # pinned() has set torch's count: keep it
        self.fixed = 1 if pol == _ONE else pol if isinstance(pol, int) else None
        self.active = run.device.type == "cpu" and (
            self.fixed is not None and self.fixed != self.threads or pol == _ADAPTIVE and self.threads > 1)
        self.shape = (run.seq.n, run.dtype)
        self.choice = choice_for(model) if self.active and pol == _ADAPTIVE else None
        # per kind of step: True = neutral (switched), False = pinned. Found anew by every loop: the
        # same plan key may be a fused step in one run and a per-op one in the next (fused=False).
        self.kinds = {}
        self.steps = {True: 0, False: 0, "pinned": 0}
        self._rec = None                      # the op recorder of a first call, while it runs

    def _set(self, n):
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def before(self, key, k: int = 1):
        """Sets the thread count for the next call (k steps of this kind); returns what
        :meth:`after` needs. Plain methods, not a context manager: this runs once a step."""
        if not self.active:
            return None
        if self.fixed is not None:
            self._set(self.fixed)
            self.steps["pinned"] += k
            return None
        key = (key, k, self.threads) + self.shape
        neutral = self.kinds.get(key)
        if neutral is None:                  # a first call: on one thread, its ops recorded
            self._set(1)
            self._rec = _OpRecorder()
            self._rec.__enter__()
            return key, k, None, time.perf_counter()
        if not neutral:
            self._set(1)
            self.steps["pinned"] += k
            return None
        all_threads = self.choice.use_all(key)
        self._set(self.threads if all_threads else 1)
        return key, k, all_threads, time.perf_counter()

    def after(self, token) -> None:
        """Records what the call begun by :meth:`before` cost (and, after a first call, whether its
        kind may be switched)."""
        if token is None:
            return
        key, k, all_threads, t0 = token
        seconds = time.perf_counter() - t0
        if all_threads is None:
            rec, self._rec = self._rec, None
            rec.__exit__(None, None, None)
            neutral = self.kinds[key] = step_is_neutral(rec.ops)
            self.steps["pinned"] += k
            if neutral:
                self.choice.warm_up(key)       # the untimed first call the choice would have made
            return
        self.choice.record(key, all_threads, seconds)
        self.steps[all_threads] += k

    @contextlib.contextmanager
    def step(self, key, k: int = 1):
        """``with st.step(key, k):`` around a call: :meth:`before` and :meth:`after`."""
        token = self.before(key, k)
        yield
        self.after(token)

    def close(self):
        """Gives torch back its thread count (and ends a first call's recording an error cut short)."""
        if self._rec is not None:
            rec, self._rec = self._rec, None
            rec.__exit__(None, None, None)
        self._set(self.threads)
