"""A PNG of the speed-up per batch size (or per case) from saved benchmark JSON (matplotlib).

``plot_results(json_path) -> png_path``: reads ``<family>-<device>.json`` written by
:func:`fastar.bench.save` and writes ``<family>-<device>.png`` beside it: with a ``batch``
column, one line per case (x = batch, log scale); otherwise one bar per row (case + pass).
y is the first ``speedup*`` column (kernel or cached time vs. the reference or naive time),
with a dashed line at 1x.
"""
from __future__ import annotations

import json
import os

__all__ = ["plot_results"]


def plot_results(json_path: str) -> str | None:
    """Write the plot next to `json_path`; returns its path, or None when there is no speed-up column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        res = json.load(f)
    rows, meta = res["rows"], res["meta"]
    cols = [c for c in (rows[0].keys() if rows else []) if c.startswith("speedup")]
    if not cols:
        return None
    y = cols[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if all("batch" in r for r in rows):
        groups: dict = {}
        for r in rows:
            if r.get(y) is not None:
                groups.setdefault(str(r.get("case")), []).append((r["batch"], r[y]))
        for case, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=case)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend(fontsize=7)
    else:
        labels = [" ".join(str(r.get(k)) for k in ("case", "pass") if r.get(k) is not None) for r in rows]
        vals = [r.get(y) or 0.0 for r in rows]
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, ls="--", c="grey")
    if all("batch" in r for r in rows):
        ax.axhline(1.0, ls="--", c="grey")
    ax.set_ylabel(y) if all("batch" in r for r in rows) else ax.set_xlabel(y)
    m = meta.get("machine", {})
    hw = m.get("gpu") if str(meta.get("device", "")).startswith("cuda") else m.get("cpu")
    ax.set_title(f"{meta.get('family')} on {meta.get('device')} ({hw})", fontsize=9)
    fig.tight_layout()
    png = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
