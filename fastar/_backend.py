"""Loading of the compiled op library and the kernel/reference backend switch.

`_C` is optional: without it fastar runs every op on its pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

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


# ------------------------------------------------------------------ CUDA kernels that failed `fastar check`
# `fastar check` records the CUDA ops whose kernel disagreed with its reference on this machine, per
# build (the _C file) and GPU name, in $FASTAR_CACHE_DIR/check.json (default ~/.cache/fastar). Such an
# op then raises, saying so, unless FASTAR_CUDA_FALLBACK=ref asks for its reference (with a warning).
# Never silent either way.
FALLBACK_ENV = "FASTAR_CUDA_FALLBACK"
_cuda_failed: dict | None = None      # GPU name -> frozenset of failed ops, loaded on first CUDA use
_checking = False                     # inside fastar.check(): run the kernels regardless of the record
_warned: set = set()


def _record_path() -> str:
    root = os.environ.get("FASTAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastar")
    return os.path.join(root, "check.json")


def _build_key() -> str:
    if not C_LOADED:
        return "no-extension"
    path = os.path.realpath(_C.__file__)
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return path


def _load_record() -> dict:
    try:
        with open(_record_path()) as f:
            data = json.load(f)
        entry = data.get(_build_key(), {}) if isinstance(data, dict) else {}
        return {str(k): frozenset(map(str, v)) for k, v in entry.items() if isinstance(v, list)}
    except (OSError, ValueError):
        return {}


def cuda_failures(device=None) -> frozenset:
    """The ops whose CUDA kernel failed ``fastar check`` on this GPU with this build (empty if none)."""
    global _cuda_failed
    if _cuda_failed is None:
        _cuda_failed = _load_record()
    if not _cuda_failed:
        return frozenset()
    name = torch.cuda.get_device_name(device)
    return _cuda_failed.get(name, frozenset())


def record_cuda_failures(device, failed) -> None:
    """Record (or, with no failures, clear) the failed CUDA ops of this build on this GPU."""
    global _cuda_failed
    name = torch.cuda.get_device_name(device)
    path = _record_path()
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    entry = data.setdefault(_build_key(), {})
    if failed:
        entry[name] = sorted(failed)
    else:
        entry.pop(name, None)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"fastar check: could not record the failed CUDA ops in {path} ({e}); they are "
                      "refused in this process only", RuntimeWarning, stacklevel=2)
    _cuda_failed = dict(_load_record())
    if failed:
        _cuda_failed[name] = frozenset(failed)
    else:
        _cuda_failed.pop(name, None)


@contextlib.contextmanager
def checking():
    """Inside fastar.check(): kernels run even when an earlier check recorded them as failed."""
    global _checking
    prev, _checking = _checking, True
    try:
        yield
    finally:
        _checking = prev


def _failed_kernel(op: str, device: torch.device) -> bool:
    """A CUDA kernel recorded as failed: False (use the reference) under FASTAR_CUDA_FALLBACK=ref,
    else a RuntimeError that names the failure and the way out."""
    if os.environ.get(FALLBACK_ENV, "") == "ref":
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"fastar: the CUDA kernel of {op} failed `fastar check` on this GPU; running its "
                          f"reference instead ({FALLBACK_ENV}=ref)", RuntimeWarning, stacklevel=3)
        return False
    raise RuntimeError(f"fastar: the CUDA kernel of {op} failed `fastar check` on this GPU "
                       f"({torch.cuda.get_device_name(device)}), so fastar will not run it. Set {FALLBACK_ENV}=ref to "
                       f"run its reference instead, or fastar.set_backend('reference') for every op; run "
                       f"`fastar check` again after a rebuild (a passing run clears this) and please report "
                       f"the failure with its table.")


def use_kernel(op: str, device: torch.device, dtype: torch.dtype, dtypes: dict[str, tuple]) -> bool:
    """Whether `op` should run its compiled kernel for tensors on `device` of `dtype`.

    `dtypes` maps a device type to the dtypes the kernel supports there.
    """
    mode = get_backend()
    if mode == "reference":
        return False
    have = op in _KERNELS.get(device.type, frozenset())
    ok_dtype = dtype in dtypes.get(device.type, ())
    if have and ok_dtype and device.type == "cuda" and not _checking and (
            _cuda_failed is None or _cuda_failed) and op in cuda_failures(device):
        return _failed_kernel(op, device)
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
