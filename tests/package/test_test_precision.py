"""The test session's own numerics: float32 references are true float32 (tests/conftest.py)."""
from __future__ import annotations

import torch


def test_tf32_is_off_for_the_whole_session():
    # cuDNN would otherwise run F.conv2d / F.conv1d references in TF32 on Ampere and later GPUs,
    # and the float32 kernel-vs-reference comparisons would fail (or need tolerances that hide bugs).
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
