"""``fastar check`` / ``fastar.check()``: every compiled op against its twin, a tiny model of every
registered family cached vs naive; a failure is found, reported and exits non-zero; a CUDA kernel
recorded as failed is refused, or runs its reference only under FASTAR_CUDA_FALLBACK=ref."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastar
from fastar import _backend, selfcheck
from fastar.cli import main
from fastar.models import SPECS


def test_check_passes_on_cpu_and_covers_every_op_and_family():
    report = fastar.check("cpu")
    assert report.ok, report.table()
    assert report.uncovered == [], f"ops with no check case: {report.uncovered} (add one to fastar.selfcheck)"
    ops = {r.name for r in report.rows if r.kind == "op"}
    kernels = {op for op in _backend.CPU_KERNELS if not op.endswith("_backward")} - {"unskew"}
    assert kernels <= ops, kernels - ops
    # every op row in each dtype its CPU kernel takes, on random and on special values
    for r in report.rows:
        assert r.dtype in ("float32", "float64", "float16", "bfloat16", "-"), r
    assert {(r.inputs) for r in report.rows if r.kind == "op" and r.name == "row_lstm_scan"} == {"random", "special"}
    assert {r.name for r in report.rows if r.kind == "model"} == set(SPECS)   # the toy families too
    assert report.seconds < 60


def test_cli_check_prints_the_table_and_info_mentions_it(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "max error" in out and "tolerance" in out and "checks passed" in out
    assert main(["info"]) == 0
    assert "fastar check" in capsys.readouterr().out


def test_a_wrong_kernel_is_a_failed_row_and_a_nonzero_exit(monkeypatch, capsys):
    from fastar.ops import lstm_scan

    good = lstm_scan._row_def
    # The twin is what the kernel is held to: make them disagree by a little in one element.
    def off_by_a_bit(is_map, w_ss, bias):
        h, c = good(is_map, w_ss, bias)
        h = h.clone()
        h.view(-1)[3] += 1e-3
        return h, c

    monkeypatch.setattr(lstm_scan, "_row_def", off_by_a_bit)
    report = fastar.check("cpu", ops=["row_lstm_scan"], families=[])
    assert not report.ok
    assert {r.name for r in report.failures} == {"row_lstm_scan"}
    assert main(["check", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: row_lstm_scan" in err and "report" in err


def test_a_cached_sampler_that_drifts_from_naive_fails_its_family(monkeypatch):
    from fastar.models import fvsbn

    step = fvsbn._RunningSums.step
    monkeypatch.setattr(fvsbn._RunningSums, "step", lambda self, key, t: step(self, key, t) + 3.0)
    report = fastar.check("cpu", ops=[], families=["fvsbn", "pixelrnn"])
    assert [r.name for r in report.failures] == ["fvsbn"]
    assert "naive" in report.failures[0].note


def test_a_crashing_kernel_is_a_failed_row_not_a_crash(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("illegal memory access")

    monkeypatch.setitem(selfcheck.OP_CASES, "skew", (lambda *a: (boom, ()),) + selfcheck.OP_CASES["skew"][1:])
    report = fastar.check("cpu", ops=["skew"], families=[])
    assert not report.ok and "illegal memory access" in report.failures[0].note


def test_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        fastar.check("tpu")
    with pytest.raises(ValueError, match="no check for op"):
        fastar.check("cpu", ops=["nope"])
    with pytest.raises(ValueError, match="unknown family"):
        fastar.check("cpu", families=["nope"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            fastar.check("cuda")


@pytest.mark.skipif("row_lstm_scan" not in _backend.CUDA_KERNELS, reason="built without CUDA kernels")
def test_failed_cuda_kernel_refused_or_falls_back_only_when_asked(tmp_path, monkeypatch):
    # A GPU is faked by name only: use_kernel decides from the record before any CUDA work.
    monkeypatch.setenv("FASTAR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTAR_CUDA_FALLBACK", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(_backend, "_cuda_failed", None)
    monkeypatch.setattr(_backend, "_warned", set())
    from fastar.ops.lstm_scan import KERNEL_DTYPES

    cuda = torch.device("cuda")

    def use():
        return _backend.use_kernel("row_lstm_scan", cuda, torch.float32, KERNEL_DTYPES)

    assert use() is True                                   # nothing recorded
    _backend.record_cuda_failures(cuda, ["row_lstm_scan"])
    assert (tmp_path / "check.json").exists()
    monkeypatch.setattr(_backend, "_cuda_failed", None)    # a new process reads the record back
    with pytest.raises(RuntimeError, match="failed `fastar check`.*FASTAR_CUDA_FALLBACK=ref"):
        use()
    assert _backend.use_kernel("skew", cuda, torch.float32, {"cuda": (torch.float32,)}) is True  # only that op
    with _backend.checking():
        assert use() is True                               # the check itself still runs the kernel
    monkeypatch.setenv("FASTAR_CUDA_FALLBACK", "ref")
    with pytest.warns(RuntimeWarning, match="running its reference"):
        assert use() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert use() is False                              # said once, not at every call
    with fastar.backend("reference"):
        assert use() is False
    _backend.record_cuda_failures(cuda, [])                # a passing check clears it
    monkeypatch.setattr(_backend, "_cuda_failed", None)
    assert use() is True
