"""What several commands share: --model-arg parsing, argument types, checkpoint names, threads, seeds, timing."""
from __future__ import annotations

import argparse
import math
import os
import time

import torch


def parse_model_args(items) -> dict:
    """['layers=4', 'channels=16'] -> {'layers': 4, 'channels': 16} (ints, floats, true/false/none, comma-separated
    ints as a list ('hidden_sizes=500,500'), else str)."""
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
        elif "," in v and all(p.strip().lstrip("-").isdigit() for p in v.split(",")):
            val = [int(p) for p in v.split(",")]
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


MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the training sampler adds the epoch to the seed


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative count would silently mean "all" or "all but")."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def seed_int(text: str) -> int:
    """argparse type: a seed torch can take, in [0, 2**63 - 1]."""
    v = _int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**63 - 1], got {v}")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 (nan compares false with everything, so it would pass a `< 0` test)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


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
