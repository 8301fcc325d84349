"""Shared test fixtures: the device parametrisation and the per-dtype tolerance table."""
from __future__ import annotations

import pytest
import torch

import fastar
# Two model families defined only in the tests (a joint three-value step with a fused multi-step cache,
# a real-valued head): registering them here puts them under every suite that iterates the registry.
import tests.models.toy_families  # noqa: F401,E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# One table of tolerances for kernel-vs-reference comparisons, by dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def tol(dtype, scale: float = 1.0) -> dict:
    t = TOLERANCES[dtype]
    return dict(rtol=t["rtol"] * scale, atol=t["atol"] * scale)


@pytest.fixture(scope="session", autouse=True)
def _no_tf32():
    """Every float32 reference is computed in true float32: TF32 off for cuDNN and for matmul.

    cuDNN convolutions default to TF32 on Ampere and later (``torch.backends.cudnn.allow_tf32`` is
    True by default), so on an H200 ``F.conv2d`` / ``F.conv1d`` in float32 (the masked-conv and Row
    LSTM references, and their backward) round their inputs to a 10-bit mantissa: errors of 1e-3
    to 3e-2 against kernels that really compute in float32 (the CUDA masked-conv and LSTM-scan
    kernels use plain FMA in float32, no tensor cores for float32). Comparing against that
    reference would need tolerances wide enough to hide real kernel bugs. The legacy flags are
    used (not ``torch.backends.*.fp32_precision``): torch 2.11 and 2.14 both honour them, they set
    conv and RNN alike, and once the newer per-op API has been used the legacy getters raise
    (torch's own code, e.g. inductor's conv template, still reads them). Restored at the end.
    """
    b = torch.backends
    prev = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.allow_tf32 = False
    b.cuda.matmul.allow_tf32 = False
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = prev


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _restore_backend():
    prev = fastar.get_backend()
    yield
    fastar.set_backend(prev)


@pytest.fixture
def one_thread():
    """Hundreds of tiny forward passes: on a shared 2-core machine OpenMP's barriers with 2 threads
    cost up to ~100x more than the work (measured), so such tests run single-threaded
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _restore_threads():
    # In-process CLI calls (--threads N) and single-threaded tests set torch's thread count globally.
    prev = torch.get_num_threads()
    yield
    if torch.get_num_threads() != prev:
        torch.set_num_threads(prev)


def requires_kernel(op: str, device) -> None:
    """Skip (with the reason) when the compiled kernel for `op` is not built for `device`.

    Under FASTAR_REQUIRE_KERNELS=1 (CI, which builds everything) a missing kernel fails instead.
    """
    import os

    from fastar import _backend

    kernels = _backend.CUDA_KERNELS if torch.device(device).type == "cuda" else _backend.CPU_KERNELS
    if op not in kernels:
        if os.environ.get("FASTAR_REQUIRE_KERNELS") == "1":
            pytest.fail(f"FASTAR_REQUIRE_KERNELS=1 but fastar._C has no {torch.device(device).type} kernel for {op} "
                        f"({_backend.C_LOAD_ERROR or 'not registered'})")
        pytest.skip(f"fastar._C has no {torch.device(device).type} kernel for {op} "
                    f"(compiled: {_backend.C_LOADED}, {_backend.C_LOAD_ERROR or ''})")
