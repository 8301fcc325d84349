"""Loading of the compiled op library and the kernel/reference backend switch.

`_C` is optional: without it fastar runs every op on its pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib

import torch

REBUILD_HINT = (
    "rebuild the extension from the fastar checkout with "
    "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` "
    "(FASTAR_CUDA=1 to force the CUDA kernels)"
)

try:
    from fastar import _C  # noqa: F401  (importing it runs the op registrations)

    C_LOADED = True
    C_LOAD_ERROR: str | None = None
except Exception as e:  # ImportError, or an OSError from a stale/ABI-mismatched .so
    C_LOADED = False
    C_LOAD_ERROR = f"{type(e).__name__}: {e}"

_BACKENDS = ("auto", "kernel", "reference")
# A plain module global (not thread-local) so torch.compile can read it and guard on it.
_current = "auto"


def _registered_ops() -> list[str]:
    if not C_LOADED:
        return []
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastar::")]
    return sorted(n.split("::", 1)[1] for n in names)


def _ops_with_kernel(dispatch_key: str) -> frozenset[str]:
    return frozenset(
        op for op in _registered_ops()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastar::{op}", dispatch_key)
    )


# Computed once at import: plain frozensets keep the per-call check cheap and
# traceable by torch.compile.
OPS = tuple(_registered_ops())
CPU_KERNELS = _ops_with_kernel("CPU")
CUDA_KERNELS = _ops_with_kernel("CUDA")
_KERNELS = {"cpu": CPU_KERNELS, "cuda": CUDA_KERNELS}


def has_ops(*ops: str) -> bool:
    """Whether the loaded _C registers every op named (a stale build may lack newer ones)."""
    return C_LOADED and all(op in OPS for op in ops)


def get_backend() -> str:
    """The backend in force: "auto", "kernel" or "reference"."""
    return _current


def set_backend(name: str) -> None:
    """Choose how fastar ops run (process-wide).

    "auto": the compiled kernel when it is built for the tensor's device and dtype,
    else the reference. "kernel": always the compiled kernel; raises if it is
    missing. "reference": always the pure-PyTorch reference.
    """
    global _current
    _check_name(name)
    _current = name


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of :func:`set_backend`; the previous backend is restored on exit."""
    global _current
    _check_name(name)
    prev = _current
    _current = name
    try:
        yield
    finally:
        _current = prev


def _check_name(name):
    if name not in _BACKENDS:
        raise ValueError(f"fastar backend must be one of {_BACKENDS}, got {name!r}")


def use_kernel(op: str, device: torch.device, dtype: torch.dtype, dtypes: dict[str, tuple]) -> bool:
    """Whether `op` should run its compiled kernel for tensors on `device` of `dtype`.

    `dtypes` maps a device type to the dtypes the kernel supports there.
    """
    mode = get_backend()
    if mode == "reference":
        return False
    have = op in _KERNELS.get(device.type, frozenset())
    ok_dtype = dtype in dtypes.get(device.type, ())
    if mode == "auto":
        return have and ok_dtype
    if not have:
        if not C_LOADED:
            why = f"the compiled extension fastar._C did not load ({C_LOAD_ERROR})"
        else:
            why = f"fastar._C was built without a {device.type.upper()} kernel for {op}"
        raise RuntimeError(f"fastar backend 'kernel' asked for {op} on {device}, but {why}; {REBUILD_HINT}, "
                           "or use fastar.set_backend('auto') to fall back to the reference")
    if not ok_dtype:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes.get(device.type, ()))
        raise RuntimeError(f"fastar backend 'kernel': the {device.type.upper()} kernel of {op} supports "
                           f"{names}, got {str(dtype).replace('torch.', '')}; use fastar.set_backend('auto') "
                           "to run other dtypes on the reference")
    return True
