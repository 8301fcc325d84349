"""Regenerate the README's pictures from the shipped checkpoints (CPU, fixed seeds):

- docs/samples.png: the class grid of the demo's shipped image model (row k: ten samples drawn for class k);
- docs/completions.png: held-out digits (left) and four completions of their bottom half given the top;
- docs/speech.png: log-magnitude spectrograms of a real held-out speech segment and of one second drawn
  by the shipped WaveNet, one above the other on the same scale.

Usage: .venv/bin/python scripts/make_figures.py [--out docs] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch


def spectrogram(wave: torch.Tensor, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """log10 |STFT| (freq, time) of a waveform in [-1, 1], Hann window."""
    s = torch.stft(wave.float(), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    return torch.log10(s + 1e-4).numpy()


def describe(w: torch.Tensor, rate: int) -> dict:
    """Numbers that say what a clip sounds like: loudness, the share of its energy below 1 kHz (voiced
    speech: most), zero crossings per second (hiss: thousands), the share of 32 ms frames within 30 dB of
    the loudest (speech: pauses between words)."""
    spec = torch.stft(w, 512, 128, window=torch.hann_window(512), return_complex=True).abs().pow(2)
    freqs = torch.arange(spec.shape[0]) * rate / 512
    frame = spec.sum(0)
    return {"rms": float(w.pow(2).mean().sqrt()),
            "energy below 1 kHz": float(spec[freqs < 1000].sum() / spec.sum()),
            "zero crossings/s": float(((w[1:] > 0) != (w[:-1] > 0)).float().mean() * rate),
            "loud frames": float((frame > frame.max() * 1e-3).float().mean())}


def spectrogram_png(parts: list[tuple[str, np.ndarray]], path: str, decades: float = 3.5) -> str:
    """The spectrograms one above the other, on one grey scale: the loudest bin of all white,
    ``decades`` below it black."""
    from PIL import Image, ImageDraw

    hi = max(float(spec.max()) for _, spec in parts)
    lo = hi - decades
    rows = []
    for label, spec in parts:
        img = np.clip((spec - lo) / (hi - lo), 0, 1)[::-1]          # low frequencies at the bottom
        img = (255 * img).astype(np.uint8)
        img = np.repeat(img, 2, axis=1)
        band = np.full((18, img.shape[1]), 255, np.uint8)
        tile = Image.fromarray(np.concatenate([band, img]), "L")
        ImageDraw.Draw(tile).text((4, 3), label, fill=0)
        rows.append(np.asarray(tile))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows), "L").save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastar import checkpoint, quality, registry
    from fastar.checkpoints import shipped_path
    from fastar.commands.writers import PngGrid
    from fastar.data import mu_law_decode

    os.makedirs(args.out, exist_ok=True)
    name = registry.spec(registry.default_model()).shipped[0]
    model, ckpt = checkpoint.load_model(shipped_path(name))
    print(f"image model: the shipped {name}")
    ds = registry.load_like(ckpt["data"])
    for line in PngGrid().demo_write(model, ckpt, None, os.path.join(args.out, "samples.png"), ds, per_class=10,
                                     seed=0, progress=False):
        print(line)
    os.replace(os.path.join(args.out, "samples_completions.png"), os.path.join(args.out, "completions.png"))

    model, ckpt = checkpoint.load_model(shipped_path("wavenet_speech"))
    ds = registry.load_like(ckpt["data"])
    rate = ckpt["data"]["sample_rate"]
    g = torch.Generator().manual_seed(0)
    clip = model.sample(1, (rate,), generator=g, progress=False)[0]
    real = mu_law_decode(ds.test.flatten(), 256)  # the held-out segments, end to end
    fake = mu_law_decode(clip, 256)
    p = spectrogram_png([(f"real held-out speech ({len(real) / rate:.2f} s, 0-8 kHz)", spectrogram(real)),
                         ("wavenet_speech sample, seed 0 (1 s)", spectrogram(fake))],
                        os.path.join(args.out, "speech.png"))
    for name, w in (("real held-out", real), ("sample", fake)):
        print(f"{name:>13}: " + ", ".join(f"{k} {v:.3f}" for k, v in describe(w.float(), rate).items()))
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
