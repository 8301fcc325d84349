"""Checkpoints: atomic writes, and models rebuilt from the config they were saved with.

A checkpoint is one ``torch.save`` file holding a dict:

    format "fastar-checkpoint", version 1,
    model    registry key (a ModelSpec name; see :mod:`fastar.registry`),
    config   the model's constructor keyword arguments,
    state_dict, optimizer (state dict or None), epoch (epochs completed), step (optimizer steps),
    rng      {"torch": CPU generator state, "cuda": [per-device states]},
    data     what the model was trained on (:meth:`fastar.data.sets.Dataset.info`),
    train    the training arguments, history (per-step losses), evals (per-epoch held-out).

    checksum "sha256:<hex>" over every other entry (see :func:`checksum`).

Writes go to a temporary file in the same folder, are flushed and fsynced, then renamed
over the target with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves either
the old checkpoint or the new one, never half a file. A writer killed mid-write leaves its
temporary behind; the next save or load of that checkpoint removes it (see
:func:`clean_stale_temporaries` for the rule that keeps another process's write safe).

Loading uses ``weights_only=True`` (no arbitrary code from a checkpoint file), checks every
entry's presence and type, verifies the checksum, and validates the config against the
model's constructor (:func:`fastar.registry.validate_config`) before anything is built, so a
damaged or crafted file is one ValueError naming what is wrong. Checkpoints written before
checksums existed (no ``checksum`` entry) still load,
unverified.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import time
import warnings

import torch

from fastar import registry

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "export_checkpoint", "checksum",
           "clean_stale_temporaries", "FORMAT"]

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


# ---------------------------------------------------------------------------- temporaries

# atomic_save names its temporary ".<name>.<pid>.<random>.tmp" beside <name> (the pid of the writer);
# temporaries from before the pid was recorded are ".<name>.<random>.tmp".
STALE_SECONDS = 60          # a pid-named temporary untouched this long, whose writer is gone, is stale
STALE_SECONDS_NO_PID = 3600  # one without a pid: only its age says it is abandoned, so wait longer


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or we cannot tell): keep its file
    return True


def clean_stale_temporaries(path) -> list[str]:
    """Remove the temporaries an interrupted :func:`atomic_save` of `path` left behind; returns them.

    The rule, so another process's write in flight is never deleted: only files in the same folder
    named exactly as atomic_save names them for this target (``.<name>.<pid>.<random>.tmp``), and
    only when BOTH their mtime is more than STALE_SECONDS old (a writer that is still writing keeps
    the mtime fresh) AND the pid in the name is not a live process on this machine (a live pid,
    even a reused one, keeps the file: a later save cleans it). A name without a pid (written
    before pids were recorded) needs STALE_SECONDS_NO_PID of age. Anything else is never touched,
    and a file we cannot remove (a read-only install) is left quietly.
    """
    path = os.path.abspath(str(path))
    d, base = os.path.dirname(path), os.path.basename(path)
    pat = re.compile(r"\." + re.escape(base) + r"\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    removed, now = [], time.time()
    for n in names:
        m = pat.fullmatch(n)
        if not m:
            continue
        f = os.path.join(d, n)
        try:
            age = now - os.lstat(f).st_mtime
        except OSError:
            continue
        pid = m.group(1)
        stale = (age > STALE_SECONDS and not _pid_alive(int(pid))) if pid else age > STALE_SECONDS_NO_PID
        if stale and os.path.isfile(f) and not os.path.islink(f):
            try:
                os.unlink(f)
                removed.append(f)
            except OSError:
                pass
    return removed


def atomic_save(obj, path: str) -> str:
    """torch.save `obj` to `path` via a temporary file in the same folder and an atomic rename
    (first removing the stale temporaries of earlier, interrupted saves of `path`)."""
    path = os.path.abspath(str(path))
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=d)
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
    opt = None if optimizer is None else optimizer.state_dict()
    if opt is not None:  # what is hashed must be what is written: tensors as they come back (on the CPU)
        opt = _to_cpu(opt)
    ckpt = dict(format=FORMAT, version=VERSION, model=registry.canonical_model(model_name), config=dict(config),
                state_dict=state, optimizer=opt, epoch=int(epoch), step=int(step), rng=rng, data=dict(data or {}),
                train=dict(train or {}), history=list(history or []), evals=list(evals or []))
    ckpt["checksum"] = checksum(ckpt)
    return atomic_save(ckpt, path)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------- checksum

def _feed(h, obj) -> None:
    """A canonical byte stream of a checkpoint entry: type tags, dict keys in sorted order, tensors as
    dtype + shape + raw bytes, scalars by repr (exact for floats). Same content, same stream."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(b"D" + struct.pack("<q", len(items)))
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for v in obj:
            _feed(h, v)
    else:
        r = repr(obj).encode()
        h.update(b"S" + type(obj).__name__.encode() + struct.pack("<q", len(r)) + r)


def checksum(ckpt: dict) -> str:
    """"sha256:<hex>" over every entry of a checkpoint dict but ``checksum`` itself: the weights, the
    config, the data info, the optimizer and RNG state, the history; in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------- loading

def _unreadable(path: str, e: Exception) -> ValueError:
    """What a file torch.load (weights only) refuses is NOT, in words that never suggest the unsafe
    ``weights_only=False`` that PyTorch's own message recommends."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as oe:
        return ValueError(f"cannot read {path}: {oe.strerror or oe}")
    if not head:
        return ValueError(f"{path} is not a readable fastar checkpoint: the file is empty")
    g = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if g:
        return ValueError(f"{path} is not a fastar checkpoint: it holds a Python object of type {g.group(1)}, and a "
                          "fastar checkpoint holds only tensors and plain values (fastar never runs code from a file)")
    if head == b"PK\x03\x04":
        return ValueError(f"{path} is not a readable fastar checkpoint: its archive is damaged or was not written "
                          "by torch.save")
    return ValueError(f"{path} is not a readable fastar checkpoint: not a file written by torch.save (or truncated)")


def _need(path, d: dict, key: str, types, what: str, where: str = ""):
    if key not in d:
        raise ValueError(f"{path} is a damaged fastar checkpoint: no {where}{key!r} entry ({what})")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                                        else (types,))):
        raise ValueError(f"{path} is a damaged fastar checkpoint: {where}{key!r} is a {type(v).__name__}, not "
                         f"{what}")
    return v


def _check_entries(path: str, ck: dict) -> None:
    """Every entry save_checkpoint writes, present and of its type (a KeyError later would be a traceback)."""
    _need(path, ck, "model", str, "the model's name")
    cfg = _need(path, ck, "config", dict, "a dict of constructor arguments")
    if not all(isinstance(k, str) for k in cfg):
        raise ValueError(f"{path} is a damaged fastar checkpoint: its config has keys that are not names")
    sd = _need(path, ck, "state_dict", dict, "a dict of tensors")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is a damaged fastar checkpoint: its state_dict holds more than named tensors")
    _need(path, ck, "optimizer", (dict, type(None)), "an optimizer state dict or None")
    for k in ("epoch", "step"):
        if _need(path, ck, k, int, "an integer") < 0:
            raise ValueError(f"{path} is a damaged fastar checkpoint: {k} is {ck[k]}")
    rng = _need(path, ck, "rng", dict, "a dict of RNG states")
    _need(path, rng, "torch", torch.Tensor, "the CPU generator state", "rng ")
    _need(path, ck, "train", dict, "the training arguments")
    _need(path, ck, "history", list, "a list of losses")
    _need(path, ck, "evals", list, "a list of evaluations")
    data = _need(path, ck, "data", dict, "what the model was trained on")
    # save_checkpoint(data=None) records {}: fine for the library; what is recorded must make sense,
    # and what a command needs of it is asked for by the command (fastar.commands.writers.need_info).
    from fastar.data.kinds import KINDS

    for k, types, what in (("name", str, "the data set's name"), ("kind", str, f"one of {', '.join(KINDS)}"),
                           ("levels", (int, type(None)), "an integer"), ("shape", (list, tuple), "a list of sizes")):
        if k in data:
            _need(path, data, k, types, what, "data ")
    kind, levels, shape = data.get("kind", "image"), data.get("levels", 2), data.get("shape")
    known = KINDS.get(kind)
    ok_shape = shape is None or known is None or (len(shape) == known.rank and all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in shape))
    ok_levels = (isinstance(levels, int) and 2 <= levels <= 1 << 16) if (known is None or known.discrete) else \
        (levels is None or (isinstance(levels, int) and 0 <= levels <= 1 << 16))
    if known is None or not ok_levels or not ok_shape:
        raise ValueError(f"{path} is a damaged fastar checkpoint: data kind {kind!r}, levels {levels}, shape "
                         f"{shape} make no data set")
    for k in ("num_classes", "sample_rate"):
        v = data.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10**6):
            raise ValueError(f"{path} is a damaged fastar checkpoint: data {k} is {v!r}")
    if "checksum" in ck and not isinstance(ck["checksum"], str):
        raise ValueError(f"{path} is a damaged fastar checkpoint: its checksum is not a string")


def load_checkpoint(path, expect_model: str | None = None, map_location="cpu") -> dict:
    """Read and check a checkpoint dict. FileNotFoundError for a missing file; ValueError for a file
    that is not a fastar checkpoint, one with a missing or mistyped entry, one whose checksum does
    not match its content (damaged on disk), one whose config the model's constructor would not
    take (:func:`fastar.registry.validate_config`), or (with ``expect_model``) a checkpoint of
    another model. A checkpoint without a ``checksum`` entry was written before checksums:
    it loads unverified. Stale temporaries of interrupted saves of this file are
    removed on the way (:func:`clean_stale_temporaries`)."""
    path = str(path)
    if os.path.isdir(path):
        cand = os.path.join(path, "last.pt")
        if not os.path.exists(cand):
            raise FileNotFoundError(f"{path} is a folder without a last.pt checkpoint")
        path = cand
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        # a FIFO would block the read forever, a device could be endless: only regular files are read
        raise ValueError(f"{path} is not a regular file (a pipe, socket or device), so it is no checkpoint")
    clean_stale_temporaries(path)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr; the error below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastar checkpoint (no format={FORMAT!r} entry; a bare state_dict "
                         "cannot be loaded without the model config)")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer fastar (checkpoint version {ckpt['version']}, this "
                         f"fastar reads up to {VERSION})")
    _check_entries(path, ckpt)
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        raise ValueError(f"{path} is damaged: its content does not match the checksum stored when it was written "
                         "(weights, config or state changed on disk); use another checkpoint")
    try:
        model = registry.canonical_model(ckpt["model"])
    except ValueError:
        raise ValueError(f"{path} is a checkpoint of model {ckpt['model']!r}, which this fastar does not have; "
                         f"it has {', '.join(registry.specs())}") from None
    if expect_model is not None:
        want = registry.canonical_model(expect_model)
        if model != want:
            raise ValueError(f"{path} is a checkpoint of model {ckpt['model']!r}, not {want!r}")
    try:
        registry.validate_config(model, ckpt["config"])
    except ValueError as e:
        raise ValueError(f"{path} holds a config its model cannot be built from: {e}") from None
    for name, t in ckpt["state_dict"].items():
        # Weights a diverged run (or a crafted file with its checksum recomputed) left non-finite would
        # sample garbage: refused here. Buffers may hold infinities (masks of -inf), never NaN.
        if t.is_floating_point() and (bool(torch.isnan(t).any()) or (
                name.rsplit(".", 1)[-1] in ("weight", "bias") and not bool(torch.isfinite(t).all()))):
            raise ValueError(f"{path} holds non-finite weights ({name} has NaN or inf): the run that wrote it "
                             "diverged or the file was altered; use an earlier checkpoint")
    return ckpt


def check_data_fits(path, model, data: dict) -> None:
    """ValueError when a checkpoint's data entry contradicts the model built from its config (levels,
    image channels, a fixed image size, the number of classes): one of the two was altered."""
    if not data:
        return
    clash = []
    lv = getattr(model, "levels", None)
    if isinstance(lv, int) and isinstance(data.get("levels"), int) and data.get("kind", "image") == "image" \
            and lv != data["levels"]:
        clash.append(f"levels {lv} vs data levels {data['levels']}")
    shape = data.get("shape")
    ch = getattr(model, "in_channels", None)
    if data.get("kind", "image") == "image" and shape and isinstance(ch, int) and ch != shape[0]:
        clash.append(f"in_channels {ch} vs data shape {list(shape)}")
    fixed = getattr(model, "fixed_shape", None)
    if fixed and shape and tuple(shape[-len(fixed):]) != tuple(fixed):
        clash.append(f"image size {tuple(fixed)} vs data shape {list(shape)}")
    nc, dnc = getattr(model, "num_classes", None), data.get("num_classes")
    if isinstance(nc, int) and isinstance(dnc, int) and nc != dnc:
        clash.append(f"num_classes {nc} vs data num_classes {dnc}")
    if clash:
        raise ValueError(f"{path}: its data entry contradicts its model config ({'; '.join(clash)}); the file was "
                         "altered, use another checkpoint")


def export_checkpoint(src, dst: str, keep_optimizer: bool = False) -> str:
    """Copy a verified checkpoint to ``dst`` without its optimizer state (Adam's moments are twice the
    weights): what a shipped model needs to be sampled and evaluated, a third of the size. Everything
    else (config, weights, data info, history, evaluations, RNG) is kept; the copy gets its own
    checksum and is written atomically. It can seed a new run but not ``--resume`` one exactly."""
    ck = load_checkpoint(src)
    if not keep_optimizer:
        ck["optimizer"] = None
    ck.pop("checksum", None)
    ck["checksum"] = checksum(ck)
    out = atomic_save(ck, dst)
    load_checkpoint(out)  # read back and verified before it is called done
    return out


def load_model(path_or_ckpt, device="cpu", expect_model: str | None = None):
    """(model in eval mode on `device`, checkpoint dict): the model rebuilt from its saved config."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, expect_model)
    model = registry.build_model(ckpt["model"], ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit a {ckpt['model']} built from its config: "
                         f"{str(e).splitlines()[0]}") from None
    check_data_fits(path_or_ckpt if not isinstance(path_or_ckpt, dict) else "the checkpoint", model,
                    ckpt.get("data") or {})
    return model.to(device).eval(), ckpt
