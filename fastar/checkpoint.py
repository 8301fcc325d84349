"""Checkpoints: atomic writes, and models rebuilt from the config they were saved with.

A checkpoint is one ``torch.save`` file holding a dict:

    format "fastar-checkpoint", version 1,
    model    registry key (a ModelSpec name; see :mod:`fastar.registry`),
    config   the model's constructor keyword arguments,
    state_dict, optimizer (state dict or None), epoch (epochs completed), step (optimizer steps),
    rng      {"torch": CPU generator state, "cuda": [per-device states]},
    data     what the model was trained on (:meth:`fastar.data.sets.Dataset.info`),
    train    the training arguments, history (per-step losses), evals (per-epoch held-out).

Writes go to a temporary file in the same folder, are flushed and fsynced, then renamed
over the target with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves either
the old checkpoint or the new one, never half a file. Loading uses ``weights_only=True``
(no arbitrary code from a checkpoint file).
"""
from __future__ import annotations

import os
import tempfile

import torch

from fastar import registry

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "FORMAT"]

FORMAT = "fastar-checkpoint"
VERSION = 1


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str) -> str:
    """torch.save `obj` to `path` via a temporary file in the same folder and an atomic rename."""
    path = os.path.abspath(str(path))
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)
    return path


def save_checkpoint(path, model_name: str, config: dict, model: torch.nn.Module, optimizer=None, epoch: int = 0,
                    step: int = 0, data: dict | None = None, train: dict | None = None, history=None,
                    evals=None) -> str:
    """Write a checkpoint atomically (see the module docstring); returns the absolute path."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = dict(format=FORMAT, version=VERSION, model=registry.canonical_model(model_name), config=dict(config),
                state_dict=state, optimizer=None if optimizer is None else optimizer.state_dict(),
                epoch=int(epoch), step=int(step), rng=rng, data=dict(data or {}), train=dict(train or {}),
                history=list(history or []), evals=list(evals or []))
    return atomic_save(ckpt, path)


def load_checkpoint(path, expect_model: str | None = None, map_location="cpu") -> dict:
    """Read and check a checkpoint dict. FileNotFoundError for a missing file; ValueError for a file
    that is not a fastar checkpoint, or (with ``expect_model``) a checkpoint of another model."""
    path = str(path)
    if os.path.isdir(path):
        cand = os.path.join(path, "last.pt")
        if not os.path.exists(cand):
            raise FileNotFoundError(f"{path} is a folder without a last.pt checkpoint")
        path = cand
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable fastar checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastar checkpoint (no format={FORMAT!r} entry; a bare state_dict "
                         "cannot be loaded without the model config)")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer fastar (checkpoint version {ckpt['version']}, this "
                         f"fastar reads up to {VERSION})")
    if expect_model is not None:
        want = registry.canonical_model(expect_model)
        if ckpt["model"] != want:
            raise ValueError(f"{path} is a checkpoint of model {ckpt['model']!r}, not {want!r}")
    return ckpt


def load_model(path_or_ckpt, device="cpu", expect_model: str | None = None):
    """(model in eval mode on `device`, checkpoint dict): the model rebuilt from its saved config."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, expect_model)
    model = registry.build_model(ckpt["model"], ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit a {ckpt['model']} built from its config: "
                         f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt
