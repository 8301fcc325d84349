from __future__ import annotations

import platform

import torch

from fastar import _backend
from fastar._version import __version__


def info() -> dict:
    """What this fastar install can do: versions, the compiled ops per device, CUDA archs, GPUs."""
    try:
        from fastar import _build_config as bc

        archs, with_cuda = list(bc.CUDA_ARCHS), bool(bc.WITH_CUDA)
    except ImportError:
        archs, with_cuda = [], bool(_backend.CUDA_KERNELS)
    gpu = torch.cuda.is_available()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compiled": _backend.C_LOADED,
        "load_error": _backend.C_LOAD_ERROR,
        "built_with_cuda": with_cuda,
        "ops": list(_backend.OPS),
        "cpu_kernels": sorted(_backend.CPU_KERNELS),
        "cuda_kernels": sorted(_backend.CUDA_KERNELS),
        "cuda_archs": archs,
        "gpu_available": gpu,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else [],
        "backend": _backend.get_backend(),
        "cpu_threads": torch.get_num_threads(),
    }
