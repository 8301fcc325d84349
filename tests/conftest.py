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
