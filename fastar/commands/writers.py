"""How samples are drawn for and written to a file, per ``ModelSpec.writer``: a PNG grid, a WAV, a
``.npy`` array; a table that grows (:func:`register_writer`).

The commands pick the writer of a checkpoint's model from its spec (``WRITERS[spec.writer]``)
and never ask which model it is. A writer knows the shape of what its kind of model draws
(from the checkpoint's data info), the inputs only it takes (an image prefix; a clip length),
how the result is written, and the words the commands print about it.
"""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _writing(path):
    """An OSError while writing `path` as one sentence that names the file, whatever the library said."""
    try:
        yield
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None


class PngGrid:
    """Image models: draws (n, C, H, W) images of the data set's size, written as one PNG grid."""

    ext = ".png"
    unit = "pixels"
    demo_n = 2  # the naive sampler runs the whole network per sub-pixel: 784 passes for a 28x28 digit
    cached_label, naive_label, speedup_label = "cached sampler", "naive sampler", "cached sampler"

    def shape(self, info: dict, length=None, demo=False) -> tuple:
        return tuple(info["shape"][1:])

    def inputs(self, info: dict, n: int, prefix=None, length=None) -> dict:
        """The prefix image (its top half given, the bottom half drawn) as sample()'s prefix + mask."""
        if length is not None:  # an image has the data set's size; a --length would be silently ignored
            raise ValueError("--length applies to audio models (.wav); this checkpoint holds an image model")
        if not prefix:
            return {}
        from fastar.data.images import load_image

        C, H, W = info["shape"]
        img = load_image(prefix, C, info["levels"], (H, W))
        mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
        mask[:, :, : H // 2] = True
        return dict(prefix=img.expand(n, C, H, W).contiguous(), mask=mask)

    def describe(self, x) -> str:
        return f"{len(x)} images"

    def write(self, x, path, info: dict, demo=False) -> str:
        from fastar.data.images import save_image_grid

        w = info["shape"][-1]
        with _writing(path):
            if demo:  # the demo's grid: ten a row and about 64 pixels a digit, for a person to look at
                return save_image_grid(x, path, info["levels"], nrow=10 if len(x) % 10 == 0 else None,
                                       scale=max(1, 64 // w))
            return save_image_grid(x, path, info["levels"], scale=4 if w <= 8 else 1)

    def demo_write(self, model, ckpt: dict, fast, path, ds, per_class: int = 10, seed: int = 0,
                   progress: bool = True):
        """The demo's pictures: ten rows of ``per_class`` cached samples (row k drawn for class k when the
        model is class-conditional, with the fixed classifier's agreement), then completions of held-out
        images (their top half given) beside the originals. Yields the lines to print."""
        import time

        from fastar import quality, registry

        info = ckpt["data"]
        conditional = registry.is_conditional(ckpt["model"], ckpt["config"], info)
        t = time.perf_counter()
        if conditional:
            grid, labels = quality.class_grid(model, info, per_class, seed=seed, progress=progress)
        else:
            dev = next(model.parameters()).device
            g = torch.Generator(device=dev).manual_seed(seed)
            grid = model.sample(10 * per_class, tuple(info["shape"][1:]), generator=g, progress=progress).cpu()
        dt = time.perf_counter() - t
        with _writing(path):
            self._write_rows(grid, path, info, per_class)
        what = "row k: class k" if conditional else "unconditional"
        yield f"wrote {path} ({len(grid)} cached samples, {what}; drawn in {dt:.2f} s)"
        if conditional and ds is not None and ds.train_labels is not None:
            clf = quality.classifier_for(info)
            a = quality.agreement(clf, grid, labels)
            yield (f"classifier agreement: {100 * a['agreement']:.1f}% of the {a['n']} samples are labelled as the "
                   f"class they were drawn for (chance {100 / info['num_classes']:.0f}%; the classifier, an MLP "
                   f"trained on the real training digits, labels {100 * clf.accuracy:.1f}% of the real held-out "
                   "digits right)")
        if ds is None:
            yield "no completions picture: the held-out data is unavailable"
            return
        per = 4
        t = time.perf_counter()
        done = quality.completions(model, ds, conditional, n=10, per=per, seed=seed, progress=progress)
        dt = time.perf_counter() - t
        cpath = os.path.splitext(str(path))[0] + "_completions" + self.ext
        with _writing(cpath):
            self._write_rows(done, cpath, info, 1 + per)
        yield (f"wrote {cpath} (each row: a held-out image, then {per} completions of its bottom half given its "
               f"top half{' and class' if conditional else ''}; drawn in {dt:.2f} s)")

    @staticmethod
    def _write_rows(x, path, info, per_row):
        from fastar.data.images import save_image_grid

        return save_image_grid(x, path, info["levels"], nrow=per_row, scale=max(1, 64 // info["shape"][-1]))


class WavClips:
    """Audio models: draws (n, T) clips, written as one WAV, the clips joined by 0.25 s of silence."""

    ext = ".wav"
    unit = "samples"
    demo_n = 20
    cached_label, naive_label, speedup_label = "fast (queued) generation", "naive generation", "fast generator"

    def shape(self, info: dict, length=None, demo=False) -> tuple:
        rate = info.get("sample_rate") or 16000
        return (length or (rate // 4 if demo else rate),)  # the demo times a short clip; sample writes 1 s

    def inputs(self, info: dict, n: int, prefix=None, length=None) -> dict:
        if prefix:
            raise ValueError("--prefix applies to image models (.png); this checkpoint holds an audio model")
        return {}

    def describe(self, x) -> str:
        return f"{len(x)} clip(s) of {x.shape[-1]} samples"

    def write(self, x, path, info: dict, demo=False) -> str:
        from fastar.data import mu_law_decode
        from fastar.data.audio import write_wav

        rate = info.get("sample_rate") or 16000
        gap = torch.zeros(rate // 4)
        parts = []
        for i, c in enumerate(x.cpu()):
            if i:
                parts.append(gap)
            # integer draws are mu-law codes; a continuous head already draws audio in [-1, 1]
            parts.append(c.float() if c.is_floating_point() else mu_law_decode(c, info["levels"]).float())
        with _writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
            write_wav(str(path), torch.cat(parts), rate)
        return str(path)


    def demo_write(self, model, ckpt: dict, fast, path, ds, per_class=None, seed=0, progress=True):
        """The demo writes the fast generator's clips."""
        yield f"wrote {self.write(fast, path, ckpt['data'], demo=True)}"


class NpyArray:
    """Real-valued vectors (the ``vector`` kind): draws (n, D) values, written as one ``.npy`` array, or as
    CSV (one row per draw, full float precision) when the path ends in ``.csv``.
    ``--prefix FILE.npy``: a (D,) or (n, D) array whose NaN entries are drawn and the rest given."""

    ext = ".npy"
    exts = (".npy", ".csv")
    unit = "values"
    demo_n = 16
    cached_label, naive_label, speedup_label = "cached sampler", "naive sampler", "cached sampler"

    def shape(self, info: dict, length=None, demo=False) -> tuple:
        return tuple(info["shape"])

    def inputs(self, info: dict, n: int, prefix=None, length=None) -> dict:
        if length is not None:
            raise ValueError("--length applies to audio models (.wav); this checkpoint holds a vector model")
        if not prefix:
            return {}
        import numpy as np

        try:
            a = torch.as_tensor(np.load(prefix, allow_pickle=False), dtype=torch.float64)
        except (OSError, ValueError) as e:
            raise ValueError(f"--prefix {prefix}: not a readable .npy array ({e})") from None
        D = tuple(info["shape"])
        if tuple(a.shape) == D:
            a = a.expand(n, *D)
        if tuple(a.shape) != (n, *D):
            raise ValueError(f"--prefix {prefix}: the array must be {list(D)} or {[n, *D]}, got {list(a.shape)}")
        mask = ~torch.isnan(a)
        return dict(prefix=torch.where(mask, a, torch.zeros_like(a)).contiguous(), mask=mask)

    def describe(self, x) -> str:
        return f"{len(x)} vectors of {x.shape[-1]} values"

    def write(self, x, path, info: dict, demo=False) -> str:
        import numpy as np

        a = x.detach().cpu().numpy()
        with _writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
            if str(path).lower().endswith(".csv"):
                np.savetxt(str(path), a.reshape(len(a), -1), delimiter=",", fmt="%.17g")
            else:
                np.save(str(path), a)
        return str(path)

    def demo_write(self, model, ckpt: dict, fast, path, ds, per_class=None, seed=0, progress=True):
        yield f"wrote {self.write(fast, path, ckpt['data'], demo=True)}"


WRITERS = {"png": PngGrid(), "wav": WavClips(), "npy": NpyArray()}


def register_writer(name: str, writer) -> None:
    """Add a writer under ``name`` (what a spec's ``writer`` names). A writer offers ``ext``, ``unit``,
    ``demo_n``, ``shape(info, length, demo)``, ``inputs(info, n, prefix, length)``, ``describe(x)``,
    ``write(x, path, info, demo)`` and ``demo_write(...)``; see :class:`PngGrid`."""
    missing = [a for a in ("ext", "shape", "inputs", "describe", "write") if not hasattr(writer, a)]
    if missing:
        raise TypeError(f"register_writer({name!r}): the writer lacks {', '.join(missing)}")
    if name in WRITERS and WRITERS[name] is not writer:
        raise ValueError(f"writer {name!r} is registered twice")
    WRITERS[name] = writer


def writer_of(model_name: str):
    from fastar import registry

    w = registry.spec(model_name).writer
    if w not in WRITERS:
        raise ValueError(f"model {model_name!r} writes its samples with {w!r}, which no one registered; registered "
                         f"writers: {', '.join(WRITERS)}")
    return WRITERS[w]


def class_cond(ckpt: dict, n: int, klass=None):
    """The ``cond`` of a class-conditional model: --class K for every draw, else the batch cycles
    0 .. K-1; None for a model that is not class-conditional (where --class is an error)."""
    from fastar import registry

    info = ckpt["data"]
    conditional = registry.is_conditional(ckpt["model"], ckpt["config"], info)
    if klass is not None:
        if not conditional:
            raise ValueError("--class needs a class-conditional model (trained with --conditional); this one is not")
        if not 0 <= klass < (info.get("num_classes") or 0):
            raise ValueError(f"--class must lie in [0, {info['num_classes']}), got {klass}")
        return torch.full((n,), klass, dtype=torch.int64)
    if conditional:
        return torch.arange(n, dtype=torch.int64) % info["num_classes"]
    return None


def need_info(ckpt: dict) -> dict:
    """The checkpoint's data info, with what drawing and writing read from it (a checkpoint saved without
    data, or with a damaged one, is one ValueError, not a KeyError deep in a writer)."""
    from fastar import registry

    info = ckpt["data"]
    missing = [k for k in ("kind", "levels", "shape") if k not in info]
    if missing:
        raise ValueError(f"the checkpoint records no data {missing[0]!r} (what its model draws), so it cannot be "
                         "sampled; it was saved without the data set's info")
    if info["kind"] != registry.model_kind(ckpt["model"]):
        raise ValueError(f"the checkpoint's data is {info['kind']}, but its model {ckpt['model']} draws "
                         f"{registry.model_kind(ckpt['model'])}")
    return info


def draw(model, ckpt: dict, n: int, method: str, generator, temperature: float = 1.0, klass=None, prefix=None,
         length=None, demo=False, progress=True):
    """``model.sample(...)`` with the shape, cond and given values a checkpoint's writer asks for."""
    w, info = writer_of(ckpt["model"]), need_info(ckpt)
    cond = class_cond(ckpt, n, klass)
    if cond is not None:
        cond = cond.to(next(model.parameters()).device)
    return model.sample(n, w.shape(info, length, demo), cond=cond, generator=generator, temperature=temperature,
                        method=method, progress=progress, **w.inputs(info, n, prefix, length))
