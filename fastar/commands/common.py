"""What several commands share: --model-arg parsing, checkpoint names, threads, seeds, timing."""
from __future__ import annotations

import os
import time

import torch


def parse_model_args(items) -> dict:
    """['layers=4', 'channels=16'] -> {'layers': 4, 'channels': 16} (ints, floats, true/false/none, else str)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--model-arg takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            val = low == "true"
        elif low == "none":
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k.strip()] = val
    return out


def resolve_checkpoint(ref: str) -> str:
    """A path, or the name of a shipped checkpoint (see :mod:`fastar.checkpoints`)."""
    if os.path.exists(ref):
        return ref
    from fastar.checkpoints import SHIPPED, shipped_path

    p = shipped_path(ref)
    if p:
        return p
    if ref in SHIPPED:
        raise FileNotFoundError(f"the shipped checkpoint {ref!r} is not in this install (fastar/checkpoints/)")
    raise FileNotFoundError(f"checkpoint not found: {ref}")


def set_threads(n) -> None:
    if n:
        torch.set_num_threads(n)


def seeded(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device).type if str(device).startswith("cuda") else "cpu")
    g.manual_seed(seed)
    return g


def timed(fn, device):
    """(fn(), seconds), synchronising a GPU on both sides so its queued work is counted."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def model_names() -> str:
    from fastar.registry import specs

    return ", ".join(specs())


def data_names() -> str:
    from fastar.data.sets import DATASETS

    return ", ".join(DATASETS)
