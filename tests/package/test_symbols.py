"""The compiled extension's linkage: what a header gives to both compilers is defined once per compiler."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

import fastar
from fastar import _backend


def test_shared_header_code_is_not_merged_across_compilers():
    """csrc/common/macros.h's FASTAR_TU_NAMESPACE: the inline functions of the headers that both g++
    (csrc/cpu) and nvcc (csrc/cuda) compile live in fastar::tu_host / fastar::tu_cuda, so the
    linker cannot keep one compiler's copy for the other's callers (an ODR merge; the suspect of
    the H200's SIGSEGV in gated_pixelcnn_step's CUDA argument check)."""
    if not _backend.CUDA_KERNELS:
        pytest.skip("this build of fastar._C has no CUDA kernels")
    nm = shutil.which("nm")
    libs = glob.glob(os.path.join(os.path.dirname(fastar.__file__), "_C*.so"))
    if nm is None or not libs:
        pytest.skip("needs binutils' nm and the in-place fastar._C")
    syms = subprocess.run([nm, "-C", libs[0]], capture_output=True, text=True, timeout=120).stdout
    for fn in ("parse_gated_pixelcnn_step(", "check_lstm_scan(", "check_dml_sample("):
        assert f"fastar::tu_host::" in syms and any(f"fastar::tu_host::{p}{fn}" in syms for p in ("", "mix::")), fn
        assert any(f"fastar::tu_cuda::{p}{fn}" in syms for p in ("", "mix::")), fn
        assert not any(f" fastar::{p}{fn}" in syms for p in ("", "mix::")), f"{fn} outside the per-compiler namespace"
