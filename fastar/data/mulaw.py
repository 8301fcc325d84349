"""Mu-law companding to 256 levels (mu = 255), torchaudio's convention.

Encoding: ``y = sign(x) * log1p(mu * |x|) / log1p(mu)`` for x clamped to [-1, 1], then
``code = floor((y + 1) / 2 * mu + 0.5)``: *rounding* to the nearest level (half up),
so 0.0 maps to 128 (not 127, as truncating implementations give) and the codes span
0..255. Decoding maps a code back to the centre of its level:
``y = code / mu * 2 - 1``, ``x = sign(y) * ((1 + mu) ** |y| - 1) / mu``.
This equals ``torchaudio.functional.mu_law_encoding`` / ``mu_law_decoding``.
"""
from __future__ import annotations

import math

import torch


def mu_law_encode(x: torch.Tensor, quantization_channels: int = 256) -> torch.Tensor:
    """Float audio in [-1, 1] (any shape; values outside are clamped) -> int64 codes in [0, Q-1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"mu_law_encode: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if quantization_channels < 2:
        raise ValueError(f"mu_law_encode: quantization_channels must be at least 2, got {quantization_channels}")
    mu = quantization_channels - 1.0
    x = x.clamp(-1.0, 1.0)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return ((y + 1) / 2 * mu + 0.5).to(torch.int64)


def mu_law_decode(codes: torch.Tensor, quantization_channels: int = 256, dtype=torch.float32) -> torch.Tensor:
    """Integer codes in [0, Q-1] -> float audio in [-1, 1] (the centre of each level)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"mu_law_decode: codes must be a tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"mu_law_decode: codes must be an integer tensor, got {codes.dtype}")
    mu = quantization_channels - 1.0
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > mu):
        raise ValueError(f"mu_law_decode: codes must lie in [0, {int(mu)}], got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    y = codes.to(dtype) / mu * 2 - 1
    return torch.sign(y) * (torch.pow(1 + mu, y.abs()) - 1) / mu
