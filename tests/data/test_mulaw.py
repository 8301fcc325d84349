"""Mu-law: torchaudio's convention (rounding, 0.0 -> 128), checked against the formula written out
independently here (torchaudio itself is not installable in this environment) and known values."""
from __future__ import annotations

import math

import pytest
import torch

from fastar.data import mu_law_decode, mu_law_encode

MU = 255


def _encode_by_hand(v: float) -> int:
    """torchaudio.functional.mu_law_encoding for one float, in plain Python."""
    v = min(max(v, -1.0), 1.0)
    y = math.copysign(math.log1p(MU * abs(v)) / math.log1p(MU), v) if v != 0 else 0.0
    return int((y + 1) / 2 * MU + 0.5)


def _decode_by_hand(code: int) -> float:
    """torchaudio.functional.mu_law_decoding for one code, in plain Python."""
    y = code / MU * 2 - 1
    return math.copysign((math.exp(abs(y) * math.log1p(MU)) - 1) / MU, y) if y != 0 else 0.0


def test_known_values():
    x = torch.tensor([0.0, -1.0, 1.0, -2.0, 3.0, 0.5, -0.5, 1e-3, -1e-3])
    assert mu_law_encode(x).tolist() == [128, 0, 255, 0, 255, 239, 16, 133, 122]
    assert mu_law_encode(x).dtype == torch.int64
    d = mu_law_decode(torch.tensor([0, 255, 128, 127]))
    torch.testing.assert_close(d[:2], torch.tensor([-1.0, 1.0]))
    assert 0 < d[2] < 1e-4 and -1e-4 < d[3] < 0  # the two levels either side of zero


def test_matches_the_formula_everywhere():
    x = torch.linspace(-1.2, 1.2, 20001, dtype=torch.float64)
    want = [_encode_by_hand(float(v)) for v in x]
    assert mu_law_encode(x).tolist() == want
    codes = torch.arange(256)
    torch.testing.assert_close(mu_law_decode(codes, dtype=torch.float64),
                               torch.tensor([_decode_by_hand(c) for c in range(256)], dtype=torch.float64))


def test_rounding_not_truncation():
    """About half of all values differ between the rounding and truncating conventions; we round."""
    x = torch.rand(10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    y = torch.sign(x) * torch.log1p(MU * x.abs()) / math.log1p(MU)
    scaled = (y + 1) / 2 * MU
    codes = mu_law_encode(x)
    assert torch.equal(codes, torch.floor(scaled + 0.5).long())
    assert (codes != scaled.long()).float().mean() > 0.3


def test_round_trip():
    codes = torch.arange(256)
    assert torch.equal(mu_law_encode(mu_law_decode(codes)), codes)
    assert torch.equal(mu_law_encode(mu_law_decode(codes, dtype=torch.float64)), codes)
    x = torch.linspace(-1, 1, 5001)
    back = mu_law_decode(mu_law_encode(x))
    # Error bounded by half a level in the companded domain, mapped back: largest near +-1.
    assert (back - x).abs().max() < 0.022  # half a level (1/255) times dx/dy = ln(256) * 256 / 255 at |x| = 1
    assert (back - x).abs()[x.abs() < 0.01].max() < 3e-4  # levels near zero are ~1.7e-4 apart


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        mu_law_encode(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        mu_law_decode(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="lie in \\[0, 255\\]"):
        mu_law_decode(torch.tensor([256]))
    with pytest.raises(ValueError, match="at least 2"):
        mu_law_encode(torch.tensor([0.1]), quantization_channels=1)
