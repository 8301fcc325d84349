"""Files in and out of ``fastar compress`` / ``decompress`` / ``score``: PNG images, WAV clips and
``.npy`` arrays of a model's codes, read exactly (a value the model cannot hold is an error, or
rounded to the nearest with ``--quantize``) and written back the same way."""
from __future__ import annotations

import os

import numpy as np
import torch

from fastar.commands.common import resolve_checkpoint

__all__ = ["load_for_codec", "read_inputs", "write_outputs", "find_model_for", "write_bytes", "read_bytes"]


def load_for_codec(ref: str, device="cpu"):
    """(model, checkpoint dict) of a checkpoint path or shipped name."""
    from fastar import checkpoint

    return checkpoint.load_model(resolve_checkpoint(ref), device=device)


def _example_shape(model, ckpt) -> tuple:
    info = ckpt.get("data") or {}
    shape = info.get("shape")
    if not shape:
        raise ValueError("the checkpoint records no data shape, so inputs cannot be read for it")
    return tuple(int(s) for s in shape)


def _png(path, channels, levels, quantize):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.int64)
    if channels == 1:
        a = a[..., None]
    codes = np.rint(a * ((levels - 1) / 255.0)).astype(np.int64)
    back = np.rint(codes * (255.0 / (levels - 1))).astype(np.int64)
    if not quantize and not np.array_equal(back, a):
        raise ValueError(f"{path} has grey values the model's {levels} levels do not hold exactly (e.g. "
                         f"{int(a[back != a][0])}); lossless coding needs exactly those values "
                         "(--quantize rounds to the nearest level)")
    return torch.from_numpy(codes).permute(2, 0, 1).contiguous()


def _wav(path, levels, rate, quantize):
    import wave

    from fastar.data import mu_law_decode, mu_law_encode

    try:
        with wave.open(str(path), "rb") as f:
            n, width, ch, r = f.getnframes(), f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} as a WAV file ({e})") from None
    if width != 2 or ch != 1:
        raise ValueError(f"{path}: the codec reads 16-bit mono WAV (as `fastar sample` and `decompress` write), got "
                         f"{8 * width}-bit, {ch} channel(s)")
    if rate and r != rate:
        raise ValueError(f"{path} is sampled at {r} Hz; the model's data is at {rate} Hz")
    pcm = torch.from_numpy(np.frombuffer(raw, "<i2").astype(np.int64))
    if pcm.numel() == 0:
        raise ValueError(f"{path} holds no samples")
    codes = mu_law_encode(pcm.double() / 32767.0, levels)
    back = (mu_law_decode(codes, levels, torch.float64).clamp(-1, 1) * 32767).round().to(torch.int64)
    if not quantize and not torch.equal(back, pcm):
        raise ValueError(f"{path} holds samples off the model's {levels} mu-law levels; lossless coding needs "
                         "audio on those levels (as `fastar sample` and `decompress` write it; --quantize rounds "
                         "to the nearest level)")
    return codes


def read_inputs(paths, model, ckpt, quantize=False) -> tuple[torch.Tensor, list[str]]:
    """The inputs as one batch (N, *shape) of codes, and a name for each example."""
    from fastar.registry import model_kind

    kind = model_kind(ckpt["model"])
    info = ckpt.get("data") or {}
    levels = int(info.get("levels") or 256)
    shape = _example_shape(model, ckpt)
    xs, names = [], []
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"input not found: {p}")
        ext = os.path.splitext(p)[1].lower()
        if ext == ".npy":
            try:
                a = np.load(p, allow_pickle=False)
            except Exception as e:
                raise ValueError(f"cannot read {p} as a .npy array ({e})") from None
            if a.dtype.kind not in "iub":
                raise ValueError(f"{p}: a .npy input must hold integer codes, got dtype {a.dtype}")
            t = torch.from_numpy(a.astype(np.int64))
            if kind == "image":
                # (H, W) or (C, H, W): one image; (N, H, W) for a one-channel model, (N, C, H, W): a batch
                if t.dim() == 2 and shape[0] == 1:
                    t = t.unsqueeze(0)
                one = t.dim() == 3 and t.shape[0] == shape[0]
                if t.dim() == 3 and not one and shape[0] == 1:
                    t = t.unsqueeze(1)
            else:
                one = t.dim() == len(shape)
            if one:
                t = t.unsqueeze(0)
            if t.dim() != len(shape) + 1:
                raise ValueError(f"{p}: a .npy input holds one example of {len(shape)} dimensions or a batch of "
                                 f"them, got shape {list(a.shape)}")
            xs.extend(t)
            names.extend([p] if one else [f"{p}[{i}]" for i in range(t.shape[0])])
        elif ext == ".png" and kind == "image":
            xs.append(_png(p, shape[0], levels, quantize))
            names.append(p)
        elif ext == ".wav" and kind == "audio":
            xs.append(_wav(p, levels, info.get("sample_rate"), quantize))
            names.append(p)
        else:
            want = {"image": ".png or .npy", "audio": ".wav or .npy"}.get(kind, ".npy")
            raise ValueError(f"{p}: a model of {kind} data reads {want} inputs")
    if not xs:
        raise ValueError("no inputs given")
    first = tuple(xs[0].shape)
    for x, nm in zip(xs, names):
        if tuple(x.shape) != first:
            raise ValueError(f"the inputs must share one shape: {names[0]} is {list(first)}, {nm} is "
                             f"{list(x.shape)}")
    x = torch.stack(xs)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= levels):
        raise ValueError(f"the inputs hold codes outside [0, {levels}) (range [{int(x.min())}, {int(x.max())}])")
    return x, names


def write_outputs(x: torch.Tensor, ckpt, out_dir: str, fmt: str | None = None) -> list[str]:
    """Write each decoded example as its own file in out_dir (PNG / WAV by the model's kind, or
    .npy); returns the paths."""
    from fastar.registry import model_kind

    kind = model_kind(ckpt["model"])
    info = ckpt.get("data") or {}
    levels = int(info.get("levels") or 256)
    fmt = fmt or {"image": "png", "audio": "wav"}.get(kind, "npy")
    if (fmt == "png" and kind != "image") or (fmt == "wav" and kind != "audio"):
        raise ValueError(f"--format {fmt} does not fit a {kind} model")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    x = x.cpu()
    width = max(4, len(str(len(x) - 1)))
    for i, e in enumerate(x):
        path = os.path.join(out_dir, f"{i:0{width}d}.{fmt}")
        if fmt == "png":
            from PIL import Image

            from fastar.data.images import to_uint8

            pix = to_uint8(e.unsqueeze(0), levels)[0]
            Image.fromarray(pix[..., 0] if pix.shape[2] == 1 else pix, "L" if pix.shape[2] == 1 else "RGB").save(path)
        elif fmt == "wav":
            from fastar.data import mu_law_decode
            from fastar.data.audio import write_wav

            write_wav(path, mu_law_decode(e, levels), int(info.get("sample_rate") or 16000))
        else:
            np.save(path, e.numpy())
        paths.append(path)
    return paths


def find_model_for(data: bytes, ref: str | None, device="cpu"):
    """(model, ckpt, name) that decodes this file: the given checkpoint, else the shipped checkpoint
    whose model and environment hashes match the file's."""
    from fastar import codec

    if ref is not None:
        model, ckpt = load_for_codec(ref, device)
        codec.check(model, data)
        return model, ckpt, ref
    from fastar.registry import shipped_checkpoints

    for name in shipped_checkpoints():
        try:
            model, ckpt = load_for_codec(name, device)
        except (ValueError, FileNotFoundError):
            continue
        try:
            codec.check(model, data)
        except ValueError:
            continue
        return model, ckpt, name
    codec.header(data)          # a foreign or truncated file says so
    raise ValueError("no shipped checkpoint matches the file (it was written with another model, or under another "
                     "dtype, device or build); give the one it was written with: --checkpoint CHECKPOINT")


def write_bytes(path: str, data: bytes) -> str:
    """Write a file whole or not at all (a temporary beside it, then a rename)."""
    path = os.path.abspath(str(path))
    d = os.path.dirname(path)
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
