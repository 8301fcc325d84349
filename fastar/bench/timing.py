"""Timing and memory measurement shared by every benchmark family.

CPU: wall clock (perf_counter) around each call, median of many, fixed thread count.
CUDA: CUDA events after warm-up, median of many. Peak memory: the CUDA caching
allocator's high-water mark on GPU; on CPU the profiler's allocation trace (with the
profiler's own C++ log lines kept off stderr).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    """(seconds, fn()) of one call, the device synchronised before and after: the long single runs of
    the sampling benches (a whole naive or cached sample), where a repeat loop would take minutes."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def sampling_batches(device: torch.device) -> tuple[int, ...]:
    """The batch sizes of the naive-vs-cached sampling rows: 1 and 16, and 256 on a GPU."""
    return (1, 16, 256) if device.type == "cuda" else (1, 16)


def _call_ms(fn, device) -> float:
    """Milliseconds of one call of fn (CUDA: between events around it)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn, device, *, warmup: int = 3, repeat: int = 20, min_seconds: float = 0.0) -> dict:
    """Median / min / p90 milliseconds of ``fn()`` over `repeat` timed calls after `warmup` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_seconds:
        times.append(_call_ms(fn, device))
        if len(times) >= 10 * repeat:
            break
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "n": len(times)}


def time_interleaved(fns: dict, device, *, warmup: int = 3, repeat: int = 20) -> dict:
    """Like :func:`time_fn` for several functions at once, called round-robin (one call of each per
    round, `repeat` rounds after `warmup`, the order rotated each round), so that a shared machine's drift in load reaches all of
    them alike and their ratios stay fair. Returns name -> the stats of time_fn."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeat):
        # each round starts one function later: what runs right after what (a thread pool just woken,
        # a cache just filled) is spread over all of them
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(_call_ms(fns[k], device))
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {"median_ms": statistics.median(ts), "min_ms": ts[0],
                  "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))], "n": len(ts)}
    return out


def peak_memory_bytes(fn, device) -> int | None:
    """Peak bytes allocated by ``fn()`` above what was live before it (None if not measurable)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        # The profiler's C++ side logs to file descriptor 2 as it starts and stops ("USDT ... profiler_start",
        # and on a machine without a GPU "ERROR ... gpuGetDeviceCount failed"), lines a reader takes for
        # failures; only those two calls are silenced, so fn() keeps its own stderr.
        with _quiet_fd2():
            prof.start()
        try:
            fn()
        finally:
            with _quiet_fd2():
                prof.stop()
        # Each op event carries the bytes it allocated net of what it freed ("self"); frees made outside
        # any op come as "[memory]" events. Replaying them in time order gives the live-bytes curve.
        events = [e for e in prof.events() if e.self_cpu_memory_usage]
        events.sort(key=lambda e: e.time_range.start)
        live = peak = 0
        for e in events:
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        return peak
    except Exception:  # profiler unavailable in this build: report nothing rather than a wrong number
        return None


@contextlib.contextmanager
def _quiet_fd2():
    """Point file descriptor 2 at /dev/null for the block (C++ code writes there, not to sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
