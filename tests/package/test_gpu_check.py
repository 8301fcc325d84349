"""scripts/gpu_check.sh, the prepared GPU check, on a machine without a GPU: it must end cleanly with
"no GPU", write its summary whatever a stage does (fails, hangs past its limit), keep to 8 files;
and every CUDA kernel must have a case in scripts/gpu_sanitizer_cases.py."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ("probe", "build", "check", "tests", "sanitizer", "bench")

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out, **env):
    e = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    for k in ("FASTAR_GPU_CHECK_HANG", "FASTAR_GPU_CHECK_FORCE"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=e, timeout=150, cwd=ROOT)


def _stage_rows(summary):
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STAGES:
            rows[cells[0]] = cells
    return rows


def _check_out(out):
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert 1 <= len(files) <= 8, files
    for f in files:  # what the device tool brings back: plain names, depth <= 2, < 16 MiB
        rel = os.path.relpath(f, out)
        assert rel.count(os.sep) <= 1 and all(c.isalnum() or c in "._-/" for c in rel), rel
        assert os.path.getsize(f) < 16 * 2 ** 20
    return open(os.path.join(out, "summary.md")).read()


@needs_no_gpu
def test_no_gpu_ends_cleanly_with_every_stage_listed(tmp_path):
    r = _run(tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no GPU" in r.stdout
    summary = _check_out(tmp_path / "out")
    assert "**no GPU**" in summary
    rows = _stage_rows(summary)
    assert set(rows) == set(STAGES), summary
    assert rows["probe"][1] == "ok"
    assert all(rows[s][1] == "skipped" and "no GPU" in rows[s][4] for s in STAGES[1:]), summary
    assert os.path.exists(tmp_path / "out" / "gpu_check.log")


@needs_no_gpu
def test_forced_dry_run_records_failures_and_cuts_off_a_hanging_stage(tmp_path):
    # Every stage runs without a GPU (so each fails its own way), the sanitizer stage hangs and
    # must be cut off at its 3 s limit, and the bench stage after it must still run.
    r = _run(tmp_path / "out", FASTAR_GPU_CHECK_FORCE="1", FASTAR_GPU_CHECK_SKIP_BUILD="1",
             FASTAR_GPU_CHECK_TEST_FILES="tests/package/test_backend.py",
             FASTAR_GPU_CHECK_BENCH_FAMILIES="mixture", FASTAR_GPU_CHECK_HANG="sanitizer",
             FASTAR_GPU_CHECK_LIMIT_SANITIZER="3")
    assert r.returncode == 1, r.stdout + r.stderr  # failures were found and reported, not hidden
    summary = _check_out(tmp_path / "out")
    rows = _stage_rows(summary)
    assert set(rows) == set(STAGES), summary
    assert rows["sanitizer"][1] == "timeout" and int(rows["sanitizer"][2]) <= 10, rows["sanitizer"]
    from fastar import _backend

    if _backend.CUDA_KERNELS:
        # CI's build compiles the CUDA kernels (they cannot run here): the build check and the
        # CUDA build test pass, and the count says so
        assert rows["build"][1] == "ok", rows["build"]
        assert rows["tests"][1] == "ok" and "1 passed, 0 failed" in summary, summary
    else:
        assert rows["build"][1] == "fail" and "no CUDA kernels" in rows["build"][4]
        assert rows["tests"][1] == "fail"
        # the CUDA build check of test_backend ran, under FASTAR_REQUIRE_KERNELS=1, and its failure is counted
        assert "0 passed, 1 failed" in summary and "test_info_reports_compiled_kernels" in summary
    # the self-check ran first (on the CPU here: no GPU) and left its table
    assert rows["check"][1] == "ok", rows["check"]
    assert "checks passed" in open(tmp_path / "out" / "check.md").read()
    assert rows["bench"][1] == "fail"  # it ran after the hang: --device cuda without a GPU
    assert "Families: mixture fail" in summary
    assert os.path.exists(tmp_path / "out" / "junit.xml")
    assert "the sanitizer stage was cut off" in summary


def test_every_cuda_kernel_has_a_sanitizer_case():
    cases = _load("gpu_sanitizer_cases")
    ops = cases.cuda_ops_in_sources()
    assert {"masked_conv2d", "wavenet_step", "gated_pixelcnn_step"} <= ops  # the source scan finds them
    assert cases.uncovered() == [], "add a case to scripts/gpu_sanitizer_cases.py for each new CUDA kernel"
    paths = [n for n, (_, covers) in cases.CASES.items() if "wavenet_step" in covers]
    assert {"wavenet_step_persistent", "wavenet_step_blocks"} <= set(paths)  # both CUDA paths


def test_scan_kernels_have_cases_and_their_tests_run():
    cases = _load("gpu_sanitizer_cases")
    covered = {op for _, covers in cases.CASES.values() for op in covers}
    scans = {"skew", "unskew", "diagonal_lstm_scan", "diagonal_lstm_scan_backward", "row_lstm_scan",
             "row_lstm_scan_backward"}
    assert scans <= cases.cuda_ops_in_sources() and scans <= covered
    with open(SCRIPT) as f:
        script = f.read()
    default_files = script.split('TEST_FILES=${FASTAR_GPU_CHECK_TEST_FILES:-"', 1)[1].split('"}', 1)[0].split()
    assert {"tests/ops/test_lstm_scan.py", "tests/ops/test_lstm_scan_cuda.py"} <= set(default_files)


@needs_no_gpu
def test_sanitizer_driver_without_gpu_says_so():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_sanitizer_cases.py")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "no GPU" in r.stdout, r.stdout + r.stderr
    assert "START" not in r.stdout


def test_summary_reads_cut_off_pytest_logs_and_sanitizer_outputs(tmp_path):
    s = _load("gpu_check_summary")
    log = ("tests/ops/test_a.py::test_x[cuda] PASSED   [ 10%]\n"
           "tests/ops/test_a.py::test_y[cuda] FAILED   [ 20%]\n"
           "tests/ops/test_a.py::test_z[cuda] \n")
    r = s._from_log(log)
    assert r["counts"] == dict(passed=1, failed=1, errors=0, skipped=0)
    assert r["hung"] == "tests/ops/test_a.py::test_z[cuda]"

    san = tmp_path / "sanitizer"
    san.mkdir()
    outputs = {
        "memcheck": ("START a\nPASS a (0.1 s)\n========= ERROR SUMMARY: 0 errors\n", "0"),
        "racecheck": ("========= Error: Device not supported\n", "1"),
        "synccheck": ("START a\nPASS a (0.1 s)\nSTART wavenet_step_persistent\n", "124"),
    }
    for tool, (text, rc) in outputs.items():
        (san / f"{tool}.log").write_text(text)
        (san / f"{tool}.rc").write_text(rc)
    v = {x["tool"]: x["verdict"] for x in s.sanitizer_verdicts(str(tmp_path))}
    assert v["memcheck"].startswith("clean: 0 errors")
    assert v["racecheck"].startswith("sanitizer unavailable")
    assert v["synccheck"].startswith("timed out in case wavenet_step_persistent")
    (san / "memcheck.log").write_text("START a\n========= Invalid __global__ write of size 4\n"
                                      "PASS a (0.1 s)\n========= ERROR SUMMARY: 3 errors\n")
    v = {x["tool"]: x["verdict"] for x in s.sanitizer_verdicts(str(tmp_path))}
    assert v["memcheck"].startswith("3 ERRORS")


def test_every_listed_test_file_has_cuda_tests():
    """The H200 run found tests/models/test_wavenet.py selecting nothing (pytest exit 5): none of its
    tests took the `device` fixture, so no id held "cuda". Each file the check lists must have a
    test the selection can pick on a GPU machine: one taking `device` (ids [cuda]) or one whose
    name says cuda, or a name the expression names."""
    import re
    with open(SCRIPT) as f:
        script = f.read()
    files = script.split('TEST_FILES=${FASTAR_GPU_CHECK_TEST_FILES:-"', 1)[1].split('"}', 1)[0].split()
    expr = script.split('TEST_EXPR=${FASTAR_GPU_CHECK_TEST_EXPR:-"', 1)[1].split('"}', 1)[0]
    named = set(re.findall(r"\btest_\w+", expr))
    assert files and "tests/models/test_wavenet.py" in files
    for path in files:
        with open(os.path.join(ROOT, path)) as f:
            src = f.read()
        tests = re.findall(r"^def (test_\w+)\(([^)]*)\)", src, flags=re.M)
        # -k also matches the module's name: a file named *cuda* has every test picked.
        picked = [n for n, args in tests
                  if re.search(r"\bdevice\b", args) or "cuda" in n or n in named or "cuda" in os.path.basename(path)]
        assert picked, f"{path}: no test the GPU check's selection ({expr!r}) can pick"
