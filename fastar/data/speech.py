"""Real speech for WaveNet: the WAV files Debian's ``alsa-utils`` installs (no internet needed).

``load_speech()`` reads every ``*.wav`` under ``/usr/share/sounds/alsa`` ("Front Center",
"Noise", ... spoken by a human voice), mixes to mono, resamples to ``sample_rate`` with
``scipy.signal.resample_poly`` and returns a list of float32 (T,) tensors in [-1, 1].
``speech_codes()`` mu-law encodes them (256 levels, rounding; see :mod:`fastar.data.mulaw`).
"""
from __future__ import annotations

import glob
import math
import os

import torch

from fastar.data.audio import read_wav
from fastar.data.mulaw import mu_law_encode

__all__ = ["ALSA_SOUNDS", "load_speech", "speech_codes"]

ALSA_SOUNDS = "/usr/share/sounds/alsa"


def load_speech(sample_rate: int = 16000, directory: str = ALSA_SOUNDS) -> list[torch.Tensor]:
    """Every WAV under `directory`, mono float32 (T,) at `sample_rate`, sorted by file name."""
    paths = sorted(glob.glob(os.path.join(directory, "*.wav")))
    if not paths:
        raise FileNotFoundError(f"no speech WAV files under {directory}: install them with "
                                "`apt-get install alsa-utils` (Debian/Ubuntu)")
    from scipy.signal import resample_poly

    out = []
    for p in paths:
        a, rate = read_wav(p)
        if rate != sample_rate:
            g = math.gcd(rate, sample_rate)
            a = torch.from_numpy(resample_poly(a.numpy(), sample_rate // g, rate // g).astype("float32"))
        out.append(a.clamp(-1, 1))
    return out


def speech_codes(sample_rate: int = 16000, quantization: int = 256, directory: str = ALSA_SOUNDS):
    """:func:`load_speech` mu-law encoded: a list of int64 (T,) code tensors."""
    return [mu_law_encode(a, quantization) for a in load_speech(sample_rate, directory)]
