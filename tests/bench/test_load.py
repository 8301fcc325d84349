"""fastar bench load's helpers: the busy-loop process is started and ended by the benchmark itself,
and the thread modes set and restore what they change."""
from __future__ import annotations

import os

import pytest
import torch

from fastar.bench import load


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_busy_core_runs_for_the_block_only():
    with load.busy_core(limit_s=60) as pid:
        assert _alive(pid)
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split()[2] in "RS"   # running (or between slices), not a zombie
    assert not _alive(pid)                     # killed and reaped on the way out


def test_busy_core_is_killed_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with load.busy_core(limit_s=60) as pid:
            raise RuntimeError("inside")
    assert not _alive(pid)


def test_thread_modes_set_and_restore(monkeypatch):
    monkeypatch.setenv("FASTAR_CPU_THREADS", "adaptive")
    before = torch.get_num_threads()
    with load.thread_mode("one", 2):
        assert torch.get_num_threads() == 1 and "FASTAR_CPU_THREADS" not in os.environ
    with load.thread_mode("all", 2):
        assert torch.get_num_threads() == 2 and os.environ["FASTAR_CPU_THREADS"] == "all"
    assert torch.get_num_threads() == before and os.environ["FASTAR_CPU_THREADS"] == "adaptive"


def test_load_family_is_cpu_only():
    assert load.run("cuda", quick=True) == []
