"""The fused CPU sampling paths on a shared machine: quiet, and with one core kept busy by another process.

``python -m fastar bench load`` (CPU only). Cases: Gated PixelCNN cached sampling (15 layers x 64,
binary 28x28, batch 16: the fused pixel step, one parallel_for per sub-pixel) and WaveNet fast
generation (R=64, D=64, S=256, A=256, 20 layers, kernel 2, batch 1 and 16: the fused step, whose
small-batch path meets at spin barriers several times a layer) and PixelRNN cached sampling (Diagonal
BiLSTM, 4 layers, hidden 32, batch 16: per-op, torch's own threading, no fused step). Each case runs in three thread
modes: ``adaptive`` (the default: torch's thread count, with :mod:`fastar.threads` choosing per kind of
step between all threads and one by measuring where the step is thread-count neutral, i.e. the fused
steps, and running the rest on one thread; ``FASTAR_CPU_THREADS`` unset), ``all`` (every step on all
threads, ``FASTAR_CPU_THREADS=all``) and ``one`` (``torch.set_num_threads(1)``), each quiet and with a
busy-loop process that this benchmark starts and ends itself (by its pid; it stops itself after
``BUSY_LIMIT_S`` whatever happens).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch

from fastar.bench.timing import sync

FAMILY = "load"

COLUMNS = ["case", "mode", "threads", "quiet_s", "busy_s", "busy_vs_quiet", "busy_vs_one_busy",
           "busy_vs_adaptive_quiet", "rate_quiet", "rate_busy", "unit"]

NOTES = ("Seconds per run, median of REPEATS runs, the modes and the quiet/busy conditions interleaved per "
         "case. adaptive = the default (torch's threads; the sampling engine measures per kind of step whether "
         "all threads or one is faster and uses that, re-timing the other in short bursts, for the kinds of "
         "step whose results are the same bits on any thread count (the fused ones); the rest run on one "
         "thread: fastar/threads.py); all = FASTAR_CPU_THREADS=all (every step on all threads); "
         "one = torch.set_num_threads(1). busy = while one "
         "`python -c 'while True: pass'`-style process (bounded, started and killed by the benchmark) holds a "
         "core. busy_vs_one_busy = busy_s / the one-thread busy_s (<= 1: at least as fast as one thread); "
         "busy_vs_adaptive_quiet = busy_s / the adaptive quiet_s (the target: <= 1.3 where one core is still "
         "free). rate = images/s or samples/s.")

REPEATS = 3
BUSY_LIMIT_S = 600
MODES = ("adaptive", "all", "one")

_BUSY = ("import time\nend = time.monotonic() + {limit}\nx = 0\n"
         "while time.monotonic() < end:\n    for _ in range(100000):\n        x += 1\n")


@contextlib.contextmanager
def busy_core(limit_s: float = BUSY_LIMIT_S):
    """A process spinning on one core for the duration of the block (it exits by itself after
    ``limit_s`` seconds in any case); yields its pid and kills it on the way out."""
    p = subprocess.Popen([sys.executable, "-c", _BUSY.format(limit=float(limit_s))],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # let it reach the loop
        if p.poll() is not None:
            raise RuntimeError(f"the busy-loop process {p.pid} exited at once (code {p.returncode})")
        yield p.pid
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def thread_mode(mode: str, threads: int):
    prev_t, prev_env = torch.get_num_threads(), os.environ.get("FASTAR_CPU_THREADS")
    torch.set_num_threads(1 if mode == "one" else threads)
    if mode == "all":
        os.environ["FASTAR_CPU_THREADS"] = "all"
    else:
        os.environ.pop("FASTAR_CPU_THREADS", None)
    try:
        yield
    finally:
        torch.set_num_threads(prev_t)
        if prev_env is None:
            os.environ.pop("FASTAR_CPU_THREADS", None)
        else:
            os.environ["FASTAR_CPU_THREADS"] = prev_env


def _cases(quick: bool):
    from fastar import sampling
    from fastar.models import GatedPixelCNN, PixelRNN, WaveNet

    torch.manual_seed(0)
    gated = GatedPixelCNN(1, 2, layers=15, channels=64).eval()
    torch.manual_seed(0)
    wave = WaveNet(layers=20, stacks=2, residual_channels=64, dilation_channels=64, skip_channels=256,
                   quantization=256, kernel_size=2).eval()

    def gated_run(n):
        def run():
            plan = sampling.prepare(gated, n, (28, 28), generator=torch.Generator().manual_seed(1))
            return sampling.cached_sample(gated, plan)
        return run

    def wave_run(b, steps):
        return lambda: wave.generate(steps, batch_size=b, progress=False,
                                     generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    prnn = PixelRNN("diagonal", 1, 2, layers=4, hidden=32).eval()

    def prnn_run(n):
        return lambda: prnn.sample(n, (28, 28), generator=torch.Generator().manual_seed(1), progress=False)

    steps = 2048 if quick else 8192
    cases = [("gated 15x64 binary 28x28 b16", gated_run(16), 16, "images/s"),
             ("wavenet 20L R64 S256 b1", wave_run(1, steps), steps, "samples/s")]
    if not quick:
        cases.append(("wavenet 20L R64 S256 b16", wave_run(16, steps // 4), 16 * steps // 4, "samples/s"))
        cases.append(("pixelrnn diagonal 4x32 binary 28x28 b16", prnn_run(16), 16, "images/s"))
    return cases


def _measure(fn, repeats):
    fn()  # warm-up, and the adaptive choice's first timings
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# CPU only: the runner skips this family on cuda (no empty table; fastar/bench/__init__.py).
DEVICES = ("cpu",)

def run(device: str, quick: bool = False) -> list[dict]:
    if torch.device(device).type != "cpu":
        return []
    threads = torch.get_num_threads()
    repeats = 1 if quick else REPEATS
    rows = []
    for name, fn, units, unit in _cases(quick):
        t = {}
        for cond in ("quiet", "busy"):
            ctx = busy_core() if cond == "busy" else contextlib.nullcontext()
            with ctx:
                for mode in MODES:
                    with thread_mode(mode, threads):
                        t[mode, cond] = _measure(fn, repeats)
        for mode in MODES:
            q, b = t[mode, "quiet"], t[mode, "busy"]
            rows.append(dict(case=name, mode=mode, threads=1 if mode == "one" else threads, quiet_s=q, busy_s=b,
                             busy_vs_quiet=b / q, busy_vs_one_busy=b / t["one", "busy"],
                             busy_vs_adaptive_quiet=b / t["adaptive", "quiet"], rate_quiet=units / q,
                             rate_busy=units / b, unit=unit))
            print(f"  {name:<30} {mode:<8} quiet {q:7.3f} s  busy {b:7.3f} s  "
                  f"(busy / one-thread busy {b / t['one', 'busy']:.2f})", flush=True)
    sync(torch.device(device))
    return rows
