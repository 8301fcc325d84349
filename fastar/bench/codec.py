"""The ``fastar bench codec`` table: the models as lossless codecs beside the standard coders, and the
models' bits/dim as anomaly scores.

``python -m fastar bench codec`` (``--quick``: fewer items). Three data sets, each coded by a model
through :mod:`fastar.codec` (every round trip checked exact) and by the usual coders, per item
(one file each) and over the whole set at once (one file):

- digits: the 500 held-out MNIST digits of the per-class split, binary, with the shipped
  ``pixelrnn_mnist`` (class labels stored in the file: the true ones, or each digit's most likely
  one; the set is stored sorted by class, so its true labels code as runs, and a shuffled copy shows
  what labels in no order cost), beside PNG (Pillow, 1-bit, optimised), WebP lossless (method 6), JBIG (JBIG-KIT's
  ``pbmtojbg``, when installed; over the set: the digits side by side as one 28 x 14000 image) and
  gzip / bz2 / lzma (level 9) of the packed bits;
- RGB patches: held-out 32x32 tiles of the patches set, 256 levels, with a small PixelCNN
  (softmax per sub-pixel) and a small PixelCNN++ (a pixel's R, G, B from one logistic mixture,
  coded as R, then G given R, then B given both) trained here for a fixed number of steps from a
  fixed seed (no RGB model ships), beside PNG (optimised) and WebP lossless;
- speech: one second of held-out speech, mu-law 256, with the shipped ``wavenet_speech``, beside
  FLAC (soundfile, of the 16-bit audio the codes decode to) when installed, and gzip / bz2 / lzma
  of the codes.

Each model row gives the model's own bound (its NLL in bytes, plus the stored labels' bits), the
encode and decode throughput, and cached sampling of the same batch on the same one pinned
thread (the codec runs the step loop one step a call, per-op or, for WaveNet, the fused step one
step at a time; sampling runs the fused steps in chunks). Anomaly rows: bits/dim of held-out digits, the same digits with 10% of pixels flipped, and
scikit-learn's 8x8 digits upscaled (to 28x28, and to 20x20 framed like MNIST), with the AUROC of
telling each apart from the held-out digits by the score.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import torch

__all__ = ["FAMILY", "COLUMNS", "NOTES", "DEVICES", "run", "auroc"]

FAMILY = "codec"
DEVICES = ("cpu",)

COLUMNS = ["data", "coder", "scope", "items", "bytes_per_item", "bound_bytes_per_item", "x_vs_model",
           "encode_items_per_s", "decode_items_per_s", "exact", "note"]

NOTES = ("bytes_per_item: the compressed size over the items (per item: the mean over one file each; set: one file "
         "for all). bound_bytes_per_item: the model's NLL in bytes (plus the labels it stores). x_vs_model: this "
         "coder's bytes over the model codec's for the same scope (> 1: the model is smaller). Throughputs are "
         "items a second, encode and decode, on this machine's current load (2-core shared Xeon). Model rows "
         "round-trip every item and check it exact. AUROC rows: the chance a scored outlier has a higher "
         "bits/dim than a held-out digit.")


def auroc(inlier: torch.Tensor, outlier: torch.Tensor) -> float:
    """P(score of an outlier > score of an inlier), ties counting half."""
    a, b = inlier.double().view(-1, 1), outlier.double().view(1, -1)
    return float(((b > a).double() + 0.5 * (b == a).double()).mean())


def _timed(fn, repeat=1):
    best = None
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return out, best


# ------------------------------------------------------------------------------- standard coders

def _png(img: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _png1(bits: np.ndarray) -> bytes:
    """A bool image as a 1-bit PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(bits.astype(np.uint8) * 255, "L").convert("1").save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _png_decode(data: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _webp(img: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode).save(buf, "WEBP", lossless=True, quality=100, method=6)
    return buf.getvalue()


def _webp_decode(data: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _pbm(bits: np.ndarray) -> bytes:
    h, w = bits.shape
    return f"P4\n{w} {h}\n".encode() + np.packbits(bits.astype(np.uint8), axis=1).tobytes()


def _jbig(bits: np.ndarray, tool: str) -> bytes:
    r = subprocess.run([tool], input=_pbm(bits), capture_output=True, check=True)
    return r.stdout


def _jbig_decode(data: bytes, tool: str) -> bytes:
    return subprocess.run([tool], input=data, capture_output=True, check=True).stdout


_GENERAL = {"gzip": (lambda b: gzip.compress(b, 9, mtime=0), gzip.decompress),
            "bz2": (lambda b: bz2.compress(b, 9), bz2.decompress),
            "lzma": (lambda b: lzma.compress(b, preset=9), lzma.decompress)}


def _coder_rows(data: str, items: list, whole, coders: dict, n: int, model_per_item: float, model_set: float,
                notes: dict | None = None) -> list[dict]:
    """coders: name -> (encode(item) -> bytes, decode(bytes)); items: per-item inputs; whole: the set
    as one input (or None)."""
    rows = []
    for name, (enc, dec) in coders.items():
        blobs, te = _timed(lambda: [enc(it) for it in items])
        _, td = _timed(lambda: [dec(b) for b in blobs])
        per = sum(len(b) for b in blobs) / len(items)
        rows.append(dict(data=data, coder=name, scope="per item", items=len(items), bytes_per_item=round(per, 2),
                         x_vs_model=round(per / model_per_item, 2) if model_per_item else None,
                         encode_items_per_s=round(len(items) / te, 1), decode_items_per_s=round(len(items) / td, 1),
                         note=(notes or {}).get(name, "")))
        if whole is not None:
            blob, te = _timed(lambda: enc(whole))
            _, td = _timed(lambda: dec(blob))
            rows.append(dict(data=data, coder=name, scope="set", items=n, bytes_per_item=round(len(blob) / n, 2),
                             x_vs_model=round(len(blob) / n / model_set, 2) if model_set else None,
                             encode_items_per_s=round(n / te, 1), decode_items_per_s=round(n / td, 1),
                             note=(notes or {}).get(name + " set", "")))
    return rows


# ---------------------------------------------------------------------------------------- models

def _model_rows(data: str, model, x, cond, per_item: int, label: str, note: str = "",
                repeat: int = 1) -> tuple[list[dict], dict]:
    """The model codec over the set (one file) and per item (one file each, ``per_item`` items
    spread over the set), each round trip checked. Encode, decode and cached sampling of the set are
    timed ``repeat`` times each (the best), sampling on the decoder's one pinned thread."""
    from fastar import codec

    n = x.shape[0]
    blob, te = _timed(lambda: codec.encode(model, x, cond), repeat)
    back, td = _timed(lambda: codec.decode(model, blob, with_cond=True), repeat)
    exact = torch.equal(back[0], x) and (cond is None or torch.equal(back[1], cond))
    bound = codec.nll_bits(model, x, cond) / 8 / n
    from fastar.threads import pinned

    def sample():
        with pinned(1):         # the decoder's thread count
            return model.sample(n, tuple(x.shape[1:]), cond=cond, generator=torch.Generator().manual_seed(0),
                                progress=False)
    _, ts = _timed(sample, repeat)
    set_row = dict(data=data, coder=label, scope="set", items=n, bytes_per_item=round(len(blob) / n, 2),
                   bound_bytes_per_item=round(bound, 2), x_vs_model=1.0, encode_items_per_s=round(n / te, 2),
                   decode_items_per_s=round(n / td, 2), exact=exact,
                   note=f"cached sampling of the same batch: {n / ts:.2f} items/s (decode / sampling time "
                        f"{td / ts:.2f}x){'; ' + note if note else ''}")
    idx = torch.linspace(0, n - 1, per_item).round().long().unique()
    sizes, bounds, t_e, t_d, ok = [], [], 0.0, 0.0, True
    for i in idx.tolist():
        xi, ci = x[i:i + 1], None if cond is None else cond[i:i + 1]
        b, dt = _timed(lambda: codec.encode(model, xi, ci))
        t_e += dt
        bk, dt = _timed(lambda: codec.decode(model, b, with_cond=True))
        t_d += dt
        ok = ok and torch.equal(bk[0], xi) and (ci is None or torch.equal(bk[1], ci))
        sizes.append(len(b))
        bounds.append(codec.nll_bits(model, xi, ci) / 8)
    k = len(sizes)
    item_row = dict(data=data, coder=label, scope="per item", items=k, bytes_per_item=round(sum(sizes) / k, 2),
                    bound_bytes_per_item=round(sum(bounds) / k, 2), x_vs_model=1.0,
                    encode_items_per_s=round(k / t_e, 2), decode_items_per_s=round(k / t_d, 2), exact=ok,
                    note=f"{k} items spread over the set, one file each; header + coder overhead "
                         f"{(sum(sizes) - sum(bounds)) / k:.1f} bytes a file{'; ' + note if note else ''}")
    return [set_row, item_row], dict(set=len(blob) / n, item=sum(sizes) / k, bound=bound)


def _digit_rows(quick: bool) -> tuple[list[dict], dict]:
    from fastar import checkpoint, codec
    from fastar.checkpoints import shipped_path
    from fastar.data.sets import load_dataset

    model = checkpoint.load_model(shipped_path("pixelrnn_mnist"))[0]
    ds = load_dataset("mnist")
    x, y = ds.test, ds.test_labels
    if quick:
        x, y = x[::10], y[::10]
    n = len(x)
    per_item = 10 if quick else 100
    rows, m = _model_rows("digits", model, x, y, per_item, "pixelrnn_mnist", "true labels stored")
    best = codec.best_labels(model, x)
    rows_b, mb = _model_rows("digits", model, x, best, 5 if quick else 20, "pixelrnn_mnist, best labels",
                             "each digit's most likely label stored")
    rows += rows_b
    # the held-out digits come sorted by class, so their labels code as 10 runs: the same set shuffled
    # shows what labels in no order cost (log2(10) bits each)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    rows_s, _ = _model_rows("digits", model, x[perm], y[perm], 2, "pixelrnn_mnist, shuffled order",
                            "the same digits and true labels in a random order: the labels cost log2(10) bits each")
    rows += [r for r in rows_s if r["scope"] == "set"]
    # the standard coders, against the best model figure of each scope
    bits = x[:, 0].numpy().astype(bool)                                       # (n, 28, 28)
    model_item, model_set = min(m["item"], mb["item"]), min(m["set"], mb["set"])
    side = np.concatenate(list(bits), axis=1)                                  # 28 x (28 n)
    coders = {"PNG 1-bit (Pillow, optimised)": (_png1, _png_decode),
              "WebP lossless": (lambda im: _webp(im.astype(np.uint8) * 255, "L"), _webp_decode)}
    out = _coder_rows("digits", list(bits), side, coders, n, model_item, model_set,
                      {"PNG 1-bit (Pillow, optimised) set": "the digits side by side, one image",
                       "WebP lossless set": "the digits side by side, one image"})
    tool, untool = shutil.which("pbmtojbg"), shutil.which("jbgtopbm")
    if tool and untool:
        out += _coder_rows("digits", list(bits), side, {"JBIG (pbmtojbg)": (lambda b: _jbig(b, tool),
                                                                          lambda d: _jbig_decode(d, untool))},
                           n, model_item, model_set, {"JBIG (pbmtojbg) set": "the digits side by side, one image"})
    else:
        out.append(dict(data="digits", coder="JBIG (pbmtojbg)", note="absent: JBIG-KIT's pbmtojbg is not installed "
                                                                      "(apt-get install jbigkit-bin)"))
    packed = [np.packbits(b.reshape(-1)).tobytes() for b in bits]
    allpacked = np.packbits(bits.reshape(n, -1), axis=1).tobytes()
    out += _coder_rows("digits", packed, allpacked, {f"{k} of the packed bits": v for k, v in _GENERAL.items()}, n,
                       model_item, model_set)
    return rows + out, dict(model=m, best=mb, rows=out)


def _train_rgb(model, ds, steps: int, lr: float, seed: int = 0):
    """Adam on batches of 16 random 16x16 crops of the training patches (the bench trains its RGB models
    itself: no RGB model is shipped)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x = ds.train
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=g)
        i, j = torch.randint(0, 17, (2,), generator=g).tolist()
        loss = model.loss(x[idx, :, i:i + 16, j:j + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _patch_rows(quick: bool) -> list[dict]:
    from fastar.data.sets import load_dataset
    from fastar.models import PixelCNN, PixelCNNpp

    ds = load_dataset("patches")
    steps = 60 if quick else 600
    x = ds.test[:4] if quick else ds.test[:20]
    rows, best = [], None
    models = [("PixelCNN (4 layers, 24 ch, softmax per sub-pixel)", 3e-3,
               lambda: PixelCNN(in_channels=3, levels=256, layers=4, channels=24)),
              ("PixelCNN++ (nr_resnet 1, 32 filters, 5 logistics; R, G, B coded one after another)", 1e-3,
               lambda: PixelCNNpp(in_channels=3, nr_resnet=1, nr_filters=32, nr_logistic_mix=5, dropout=0.0))]
    for label, lr, make in models:
        torch.manual_seed(0)
        prev = torch.get_num_threads()
        model, t_train = _timed(lambda: _train_rgb(make(), ds, steps, lr))
        torch.set_num_threads(prev)
        r, m = _model_rows("RGB patches 32x32", model, x, None, 2 if quick else 4, label,
                           f"trained here: {steps} Adam steps on 16x16 crops, {t_train:.0f} s")
        rows += r
        best = m if best is None or m["set"] < best["set"] else best
    imgs = [e.permute(1, 2, 0).numpy().astype(np.uint8) for e in x]
    side = np.concatenate(imgs, axis=1)
    coders = {"PNG (Pillow, optimised)": (lambda im: _png(im, "RGB"), _png_decode),
              "WebP lossless": (lambda im: _webp(im, "RGB"), _webp_decode)}
    return rows + _coder_rows("RGB patches 32x32", imgs, side, coders, len(imgs), best["item"], best["set"])


def _speech_rows(quick: bool) -> list[dict]:
    from fastar import checkpoint
    from fastar.checkpoints import shipped_path
    from fastar.data import mu_law_decode
    from fastar.data.sets import load_dataset

    model = checkpoint.load_model(shipped_path("wavenet_speech"))[0]
    ds = load_dataset("speech")
    T = 1600 if quick else 16000
    x = ds.test.reshape(-1)[:T].unsqueeze(0)
    rows, m = _model_rows("speech 1 s" if not quick else "speech 0.1 s", model, x, None, 1,
                          "wavenet_speech (mu-law 256)", "held-out speech; best of 3", repeat=3)
    rows = [r for r in rows if r["scope"] == "set"]                   # one clip: set = item
    codes = x[0].numpy().astype(np.uint8).tobytes()
    coders = {f"{k} of the mu-law codes": v for k, v in _GENERAL.items()}
    try:
        import soundfile as sf

        pcm = (mu_law_decode(x[0]).double().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()

        def flac(p):
            buf = io.BytesIO()
            sf.write(buf, p, 16000, format="FLAC", subtype="PCM_16")
            return buf.getvalue()

        def unflac(b):
            return sf.read(io.BytesIO(b), dtype="int16")[0]
        coders["FLAC (soundfile, of the 16-bit audio)"] = (lambda _: flac(pcm), unflac)
    except ImportError:
        rows.append(dict(data="speech", coder="FLAC", note="absent: soundfile is not installed"))
    return rows + _coder_rows(rows[0]["data"], [codes], None, coders, 1, m["set"], m["set"])


def _anomaly_rows(quick: bool) -> list[dict]:
    import torch.nn.functional as F

    from fastar import checkpoint, codec
    from fastar.checkpoints import shipped_path
    from fastar.data.digits import load_digits_8x8
    from fastar.data.sets import load_dataset

    model = checkpoint.load_model(shipped_path("pixelrnn_mnist"))[0]
    ds = load_dataset("mnist")
    k = 20 if quick else 100
    x = ds.test[::len(ds.test) // k][:k]
    g = torch.Generator().manual_seed(0)
    flip = torch.where(torch.rand(x.shape, generator=g) < 0.10, 1 - x, x)
    d, _ = load_digits_8x8(17)
    d = d[:k].double() / 16
    full = (F.interpolate(d, size=(28, 28), mode="bilinear", align_corners=False) >= 0.5).long()
    framed = (F.pad(F.interpolate(d, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4)) >= 0.5).long()
    held, t = _timed(lambda: codec.score(model, x))
    rows = [dict(data="anomaly", coder="held-out MNIST digits", items=k, note=f"bits/dim {held.mean():.4f} "
                 f"(mixture over the 10 classes; {k / t:.1f} digits/s)")]
    for name, o in (("10% of pixels flipped", flip), ("sklearn 8x8 digits upscaled to 28x28", full),
                    ("sklearn 8x8 digits upscaled to 20x20, framed like MNIST", framed)):
        s = codec.score(model, o)
        rows.append(dict(data="anomaly", coder=name, items=k,
                         note=f"bits/dim {s.mean():.4f}; AUROC against the held-out digits {auroc(held, s):.3f}"))
    return rows


def run(device: str, quick: bool) -> list[dict]:
    if device != "cpu":
        return []
    rows, _ = _digit_rows(quick)
    rows += _patch_rows(quick)
    rows += _speech_rows(quick)
    rows += _anomaly_rows(quick)
    return rows
