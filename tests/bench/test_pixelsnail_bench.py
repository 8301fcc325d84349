"""The PixelSNAIL benchmark family: discovered by the runner, its attention rows well formed."""
from __future__ import annotations

import pytest

import fastar.bench
from fastar.bench import pixelsnail

pytestmark = pytest.mark.usefixtures("one_thread")


def test_family_is_discovered():
    assert fastar.bench.FAMILIES["pixelsnail"] == "fastar.bench.pixelsnail"


def test_attention_rows_against_the_floor():
    rows = pixelsnail.attention_rows("cpu", quick=True)
    assert [r["batch"] for r in rows] == [1]
    r = rows[0]
    L = pixelsnail.SIZE ** 2
    cfg = pixelsnail.CASES[0][1]
    assert r["kv_bytes"] == 4 * (L - 1) * (cfg["key_channels"] + cfg["value_channels"])
    assert r["attn_step_us"] > 0 and r["floor_us"] > 0 and 0 < r["attn_share"] < 1
    assert r["attn_vs_floor"] == pytest.approx(r["attn_step_us"] / r["floor_us"])
