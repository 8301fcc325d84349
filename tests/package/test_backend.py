"""The backend switch, info(), the CLI's info command, and life without the compiled extension."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_py(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_set_backend_and_context_manager():
    assert fastar.get_backend() == "auto"
    fastar.set_backend("reference")
    assert fastar.get_backend() == "reference"
    with fastar.backend("kernel"):
        assert fastar.get_backend() == "kernel"
        with fastar.backend("auto"):
            assert fastar.get_backend() == "auto"
        assert fastar.get_backend() == "kernel"
    assert fastar.get_backend() == "reference"
    with pytest.raises(ValueError, match="must be one of"):
        fastar.set_backend("fast")
    with pytest.raises(ValueError, match="must be one of"):
        with fastar.backend("cuda"):
            pass


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError):
        with fastar.backend("reference"):
            raise KeyError("boom")
    assert fastar.get_backend() == "auto"


def test_info_reports_compiled_kernels():
    d = fastar.info()
    for key in ("version", "torch", "compiled", "cpu_kernels", "cuda_kernels", "cuda_archs", "gpu_available"):
        assert key in d
    assert d["version"] == fastar.__version__
    assert d["gpu_available"] == torch.cuda.is_available()
    if os.environ.get("FASTAR_REQUIRE_KERNELS") == "1":
        # CI builds the extension with CUDA compiled in: both kernel sets must be there.
        assert d["compiled"], d["load_error"]
        assert "masked_conv2d" in d["cpu_kernels"] and "masked_conv2d_backward" in d["cpu_kernels"]
        assert "masked_conv2d" in d["cuda_kernels"] and "masked_conv2d_backward" in d["cuda_kernels"]
        assert any("9.0" in a for a in d["cuda_archs"]), d["cuda_archs"]


def test_cli_info_prints_the_dict():
    r = subprocess.run([sys.executable, "-m", "fastar", "info", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d == json.loads(json.dumps(fastar.info()))
    r = subprocess.run([sys.executable, "-m", "fastar", "info"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "cpu_kernels" in r.stdout


def test_cli_rejects_unknown_bench_family():
    r = subprocess.run([sys.executable, "-m", "fastar", "bench", "nosuchfamily"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2
    assert "unknown benchmark family 'nosuchfamily'" in r.stderr and "Traceback" not in r.stderr


def test_without_compiled_extension_reference_still_works():
    """Blocking fastar._C at import: fastar imports, ops run on the reference, 'kernel' explains how to rebuild."""
    code = r"""
import sys, torch
sys.modules["fastar._C"] = None  # makes `from fastar import _C` raise ImportError
import fastar
d = fastar.info()
assert d["compiled"] is False and d["cpu_kernels"] == [] and "fastar._C" in d["load_error"], d
x = torch.randn(1, 3, 6, 6); w = torch.randn(6, 3, 3, 3); m = fastar.masks.mask_a(6, 3, 3, color_groups=3)
out = fastar.ops.masked_conv2d(x, w, None, m)
ref = torch.nn.functional.conv2d(x, w * m, None, padding=1)
assert torch.allclose(out, ref)
fastar.set_backend("kernel")
try:
    fastar.ops.masked_conv2d(x, w, None, m)
except RuntimeError as e:
    msg = str(e)
    assert "did not load" in msg and "pip install --no-build-isolation -e ." in msg, msg
    print("OK")
"""
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
