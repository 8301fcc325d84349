"""WAV reading and writing with the standard library's ``wave`` module (16-bit PCM)."""
from __future__ import annotations

import wave

import numpy as np
import torch

__all__ = ["read_wav", "write_wav"]


def read_wav(path) -> tuple[torch.Tensor, int]:
    """Read a PCM WAV file -> (float32 mono audio (T,) in [-1, 1], sample rate); channels are averaged."""
    with wave.open(str(path), "rb") as f:
        n, width, channels, rate = f.getnframes(), f.getsampwidth(), f.getnchannels(), f.getframerate()
        raw = f.readframes(n)
    if width == 1:
        a = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        a = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        a = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        a = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise ValueError(f"read_wav: {path}: unsupported sample width of {width} bytes")
    a = a.reshape(-1, channels).mean(1)
    return torch.from_numpy(np.ascontiguousarray(a)), rate


def write_wav(path, audio: torch.Tensor, sample_rate: int = 16000) -> None:
    """Write float audio in [-1, 1] ((T,) mono or (C, T)) as a 16-bit PCM WAV file (values clipped)."""
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise TypeError("write_wav: audio must be a floating-point tensor in [-1, 1] (decode mu-law codes first "
                        "with fastar.data.mu_law_decode)")
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    if audio.dim() != 2:
        raise ValueError(f"write_wav: audio must be (T,) or (channels, T), got shape {list(audio.shape)}")
    pcm = (audio.detach().cpu().double().clamp(-1, 1) * 32767).round().to(torch.int16).t().contiguous().numpy()
    if not (isinstance(sample_rate, int) or float(sample_rate).is_integer()) or not 1 <= int(sample_rate) <= 10**6:
        raise ValueError(f"write_wav: sample_rate must be a whole number of Hz in [1, 1e6], got {sample_rate!r}")
    # Open the file ourselves: wave.open(path) that cannot open it leaves a half-built Wave_write whose
    # __del__ prints a second traceback at garbage collection, after the caller has reported the error.
    with open(str(path), "wb") as raw:
        f = wave.open(raw, "wb")
        try:
            f.setnchannels(audio.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(pcm.astype("<i2").tobytes())
        except BaseException:
            try:
                f.close()
            except OSError:
                pass  # the write itself failed (disk full): that error is the one to report
            raise
        f.close()
