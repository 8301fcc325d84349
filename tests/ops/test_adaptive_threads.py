"""The CPU fused steps' choice between all threads and one (csrc/common/adaptive_threads.h): the rule,
driven by given timings, and that the choice never changes a result."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastar  # noqa: F401  (loads the ops)

trace = torch.ops.fastar._adaptive_threads_trace
EXPLORE = 32


def test_rule_picks_the_faster_and_keeps_checking():
    n = 320
    picks = trace([2.0] * n, [1.0] * n)           # all threads twice as slow (a core taken)
    assert picks[:2] == [1, 0]                       # each timed once, all threads first
    later = picks[2:]
    assert sum(later) == sum(1 for i in range(3, n + 1) if i % EXPLORE == 0)  # only the re-timings
    picks = trace([1.0] * n, [1.3] * n)           # a quiet machine: all threads faster
    assert picks[:2] == [1, 0] and sum(picks[2:]) == (n - 2) - sum(1 for i in range(3, n + 1) if i % EXPLORE == 0)


def test_rule_follows_a_change_of_load():
    quiet, busy = 200, 200
    all_t = [1.0] * quiet + [2.5] * busy             # a process takes a core at call 200 ...
    one_t = [1.3] * (quiet + busy)
    picks = trace(all_t, one_t)
    assert all(picks[i] == 1 for i in range(quiet - 40, quiet) if (i + 1) % EXPLORE)  # all threads, bar re-timings
    first_one = next(i for i in range(quiet, quiet + busy) if picks[i] == 0)
    assert first_one - quiet <= 3                    # ... and one thread is in use within a few calls
    back = trace([2.5] * busy + [1.0] * quiet, [1.3] * (busy + quiet))  # ... and when the process leaves,
    first_all = next(i for i in range(busy, busy + quiet) if back[i:i + 5] == [1] * 5)
    assert first_all - busy <= EXPLORE + 1           # all threads are back from the next re-timing on


def test_rule_checks_its_arguments():
    with pytest.raises(RuntimeError, match="seconds_all has 2 calls but seconds_one has 1"):
        trace([1.0, 1.0], [1.0])


_SAME = r"""
import os, sys, torch
from fastar import sampling
from fastar.models import GatedPixelCNN, WaveNet
torch.set_num_threads(2)
torch.manual_seed(0)
g = GatedPixelCNN(1, 2, layers=3, channels=16, num_classes=10).eval()
w = WaveNet(layers=6, stacks=2, residual_channels=32, dilation_channels=32, skip_channels=64,
            quantization=256, kernel_size=2).eval()
out = []
for b in (8, 16):
    out.append(g.sample(b, (8, 8), cond=torch.arange(b) % 10, generator=torch.Generator().manual_seed(3),
                        progress=False))
for b in (1, 2, 16):
    out.append(w.generate(700, batch_size=b, generator=torch.Generator().manual_seed(4), progress=False))
torch.save(out, sys.argv[1])
"""


def test_the_choice_never_changes_a_result(tmp_path):
    # the same draws with every call on all threads, on one, and chosen adaptively
    res = {}
    for mode in ("all", "one", "adaptive"):
        env = dict(os.environ, FASTAR_CPU_THREADS=mode)
        p = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, "-c", _SAME, str(p)], check=True, env=env, timeout=600)
        res[mode] = torch.load(p)
    for a, b, c in zip(res["all"], res["one"], res["adaptive"]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_bad_policy_is_one_clear_error(tmp_path):
    code = ("import torch\nfrom fastar.models import WaveNet\ntorch.set_num_threads(2)\n"
            "w = WaveNet(layers=2, stacks=1, residual_channels=32, dilation_channels=32, skip_channels=64).eval()\n"
            "w.generate(8, progress=False)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTAR_CPU_THREADS="two"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "FASTAR_CPU_THREADS must be 'adaptive', 'all' or 'one', got 'two'" in r.stderr
