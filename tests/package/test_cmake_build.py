"""The CMake build (for libtorch users) produces the same op library; load it with torch.ops.load_library."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cmake_args(build_dir: str) -> list[str]:
    """Configure arguments that let find_package(Torch) succeed against a pip CUDA build of torch."""
    args = ["cmake", "-S", ROOT, "-B", build_dir, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DFASTAR_CUDA=OFF"]
    if torch.version.cuda:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
        nv = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
        if os.path.isdir(nv):  # CUDA 13 wheels: headers and nvrtc live in site-packages
            args.append(f"-DFASTAR_EXTRA_INCLUDE={nv}/include")
            nvrtc = os.path.join(nv, "lib", "libnvrtc.so.13")
            if os.path.exists(nvrtc):
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


@pytest.mark.slow
def test_cmake_build_loads_and_runs(tmp_path):
    if shutil.which("cmake") is None:
        if os.environ.get("FASTAR_REQUIRE_KERNELS") == "1":
            pytest.fail("cmake is not installed, but CI must build the CMake variant")
        pytest.skip("cmake is not installed")
    build = str(tmp_path / "build")
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")  # no GPU to detect archs from
    cuda_bin = os.path.join(env.get("CUDA_HOME", "/usr/local/cuda"), "bin")
    env["PATH"] = cuda_bin + os.pathsep + env.get("PATH", "")
    r = subprocess.run(cmake_args(build), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    r = subprocess.run(["cmake", "--build", build, "-j", jobs], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lib = os.path.join(build, "libfastar_ops.so")
    assert os.path.exists(lib)
    # A fresh interpreter without fastar: the namespace may be registered only once per process.
    code = f"""
import torch
torch.ops.load_library({lib!r})
x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
w = torch.randn(6, 3, 5, 5, dtype=torch.float64)
m = torch.zeros(6, 3, 5, 5, dtype=torch.float64); m[:, :, :2] = 1; m[:, :, 2, :2] = 1
b = torch.randn(6, dtype=torch.float64)
out = torch.ops.fastar.masked_conv2d(x, w, b, m, [2, 2], [1, 1])
ref = torch.nn.functional.conv2d(x, w * m, b, padding=2)
assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10), (out - ref).abs().max()
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
