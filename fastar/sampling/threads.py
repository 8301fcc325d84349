"""One thread or all of torch's, per kind of step, chosen by measuring (CPU decode loops).

A cached decode loop runs hundreds of small steps. With all of torch's threads each op of a step
forks and joins (or meets at spin barriers inside a fused op); when another process holds a core,
a thread that lost its core stalls the others at every join, and the default thread count becomes
several times slower than one thread (measured on the 2-core box: PixelRNN sampling 3.5x, Gated
PixelCNN 2.5x). Which is faster depends on the load, so the engine measures: per kind of step
(the cache's plan key, its block length, the batch) it keeps a running mean of the seconds per
step with one thread and with all, runs the faster, and re-times the other now and then, so that
a change of load is noticed. The fused C++ ops have a choice of their own
(csrc/common/adaptive_threads.h) for when they are called directly; inside the loop they stand
aside (a nested measurement judges the outer "all" steps by stale timings and can lock into the
wrong choice) and this one covers the whole step, the per-op paths included.

Both choices compute the same values: fastar's fused CPU ops give the same bits on any thread
count (tested), and so do the per-op paths the caches run (torch's CPU GEMMs split the output,
not the reduction; ``tests/sampling/test_threads.py`` checks cached sampling bit for bit on one
thread and on two). ``FASTAR_CPU_THREADS=all`` or ``one`` fixes the choice (benchmarks, tests);
``adaptive`` (the default) lets it measure.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref

import torch

from fastar import _backend

__all__ = ["ThreadChoice", "StepThreads", "choice_for", "policy"]

_POLICIES = ("adaptive", "all", "one")


def policy() -> str:
    """FASTAR_CPU_THREADS: 'adaptive' (unset or empty), 'all' or 'one'."""
    p = os.environ.get("FASTAR_CPU_THREADS", "") or "adaptive"
    if p not in _POLICIES:
        raise ValueError(f"FASTAR_CPU_THREADS must be 'adaptive', 'all' or 'one', got {p!r}")
    return p


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
    on one thread. After ``EXPLORE`` calls
    the other choice is re-timed by a burst, whose figure replaces its old one (the load may have
    changed since). Each time a burst confirms the choice the wait doubles, up to ``EXPLORE_MAX``
    (a choice that loses by a wide margin costs little to keep checking); when the choice flips it
    drops back to ``EXPLORE``. If the choice in use gets slower than the other's last figure (a
    process took a core) it flips at once. (A margin that all threads must beat, tried as a
    hysteresis, kept one thread too often on a quiet machine: not used.)
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


class StepThreads:
    """Runs a decode loop's steps on the chosen thread count: ``before(key, k)`` / ``after(token)``
    (or ``with st.step(key, k):``) around each step (k steps in the block). Inert (no timing, torch's thread count untouched) off the CPU,
    with one torch thread, or when ``FASTAR_CPU_THREADS`` fixes the choice to 'all'."""

    def __init__(self, model, run):
        pol = policy()
        self.threads = torch.get_num_threads()
        self.active = run.device.type == "cpu" and self.threads > 1 and pol != "all"
        self.shape = (run.seq.n, run.dtype)
        self.fixed_one = pol == "one"
        self.choice = choice_for(model) if self.active and not self.fixed_one else None
        self.current = self.threads
        self.steps = {True: 0, False: 0}   # steps run on all threads / on one: what the choice did
        self._prev_override = None
        if self.choice is not None and _backend.has_ops("_thread_policy_override"):
            # this loop chooses per step; the fused ops' own choice (csrc/common/adaptive_threads.h)
            # would judge this loop's all-thread steps by stale timings, so it stands aside
            self._prev_override = torch.ops.fastar._thread_policy_override(1)

    def _set(self, n):
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def before(self, key, k: int = 1):
        """Sets the thread count for the next call (k steps of this kind); returns what
        :meth:`after` needs. Plain methods, not a context manager: this runs once a step."""
        if not self.active:
            return None
        if self.fixed_one:
            self._set(1)
            self.steps[False] += k
            return None
        key = (key, k, self.threads) + self.shape
        all_threads = self.choice.use_all(key)
        self._set(self.threads if all_threads else 1)
        return key, k, all_threads, time.perf_counter()

    def after(self, token) -> None:
        """Records what the call begun by :meth:`before` cost."""
        if token is None:
            return
        key, k, all_threads, t0 = token
        self.choice.record(key, all_threads, time.perf_counter() - t0)
        self.steps[all_threads] += k

    @contextlib.contextmanager
    def step(self, key, k: int = 1):
        """``with st.step(key, k):`` around a call: :meth:`before` and :meth:`after`."""
        token = self.before(key, k)
        yield
        self.after(token)

    def close(self):
        """Gives torch back its thread count (and the fused ops their own choice)."""
        self._set(self.threads)
        if self._prev_override is not None:
            torch.ops.fastar._thread_policy_override(self._prev_override)
            self._prev_override = None
