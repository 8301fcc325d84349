"""bench floors: the two-part WaveNet path's stage profile (fastar::_wavenet_profile) and the table's rows."""
from __future__ import annotations

import pytest
import torch

from fastar import _backend
from fastar.bench import floors

pytestmark = pytest.mark.skipif(not _backend.has_ops("_wavenet_profile"), reason="fastar._C without the profile op")


def _two_part_available():
    # the two-part path runs at batch <= 4 in float32 on AVX-512 CPUs
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _two_part_available(), reason="the two-part path needs AVX-512")
@pytest.mark.parametrize("threads", [1, 2])
def test_profile_counts_every_step_and_adds_up_to_the_wall_time(threads):
    m = floors._wavenet(4)
    parts, wall = floors.wavenet_profile(m, 300, threads)
    assert len(parts) == threads
    for p in parts:
        assert set(p) == set(floors._STAGES) - {"steps"}
        assert all(v >= 0 for v in p.values())
        assert p["layer"] > 0 and p["head1"] > 0 and p["draw"] > 0
        assert sum(p.values()) <= wall * 1.05          # the stages are inside the wall time
    if threads == 1:
        assert len(parts) == 1 and parts[0]["layer_wait"] == 0.0   # one thread never waits
    # the profile is off again: a second generate adds nothing
    raw = torch.ops.fastar._wavenet_profile(False)
    before = list(raw)
    m.generate(50, batch_size=1, progress=False)
    assert torch.ops.fastar._wavenet_profile(False) == before


def test_profile_steps_match_the_generated_samples():
    if not _two_part_available():
        pytest.skip("the two-part path needs AVX-512")
    m = floors._wavenet(4)
    op = torch.ops.fastar._wavenet_profile
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        op(True)
        m.generate(700, batch_size=1, progress=False, generator=torch.Generator().manual_seed(0))
    finally:
        raw = op(False)
        torch.set_num_threads(prev)
    n = len(floors._STAGES)
    assert len(raw) == 2 * n
    assert raw[n - 1] == 700 and raw[2 * n - 1] == 0       # one thread: every step in part 0's row


def test_profile_does_not_change_a_sample():
    m = floors._wavenet(4)
    a = m.generate(300, batch_size=1, progress=False, generator=torch.Generator().manual_seed(2))
    torch.ops.fastar._wavenet_profile(True)
    try:
        b = m.generate(300, batch_size=1, progress=False, generator=torch.Generator().manual_seed(2))
    finally:
        torch.ops.fastar._wavenet_profile(False)
    assert torch.equal(a, b)


def test_rows_have_the_columns_and_honest_units():
    r = floors._row("x", 1, 30.0, 10.0, "GEMM", "w")
    assert set(r) == set(floors.COLUMNS) and r["measured_vs_floor"] == 3.0
    assert floors._row("x", 1, None, None, "-", "w")["measured_vs_floor"] is None
    m = floors._wavenet(20)
    # 20 layers of (128x64x2 + 64x64 + 256x64) floats, and the head's two 256x256
    assert floors._weight_bytes(m, head=False) == 4 * 20 * (128 * 64 * 2 + 64 * 64 + 256 * 64)
    assert floors._weight_bytes(m, head=True) == 4 * 2 * 256 * 256
