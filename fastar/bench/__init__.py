"""Benchmark tables: every op family's kernel against its reference.

``python -m fastar bench [FAMILY ...]`` runs the families, prints one markdown
table per family and saves ``<family>-<device>.json`` and ``.md`` under the output
folder, with the machine and the exact command.

A family is any module of this package that defines ``run(device, quick) -> list[dict]``
(one dict per row) and ``COLUMNS`` (optionally ``NOTES``, ``FAMILY``, its name, which
defaults to the module name, and ``DEVICES``, the device types it measures, default cpu and
cuda): adding one is adding a module here, with no edit to the runner.
``FAMILIES`` (name -> module path) is found on first use. A family asked for on a device type
it does not measure (the CPU-only floors and load on cuda) is skipped with a line saying so,
and no empty table is saved.

The public names below (and each family module's documented helpers, such as
:func:`fastar.bench.masked_conv.case_inputs`) are what the pytest-benchmark suites in the
top-level ``benchmarks/`` folder build on, so that a suite and its table time the same inputs.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys

import torch

__all__ = ["FAMILIES", "discover_families", "kernel_built", "family_devices", "families_for", "machine",
           "markdown_table", "save", "main"]


@functools.lru_cache(maxsize=None)
def discover_families() -> dict[str, str]:
    """Family name -> module path for every module of this package that defines ``run`` and ``COLUMNS``."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        path = f"{__name__}.{info.name}"
        try:
            mod = importlib.import_module(path)
        except Exception:
            # Listed under its module name so that the CLI still starts; running it raises the real error.
            found.setdefault(info.name, path)
            continue
        if not (callable(getattr(mod, "run", None)) and hasattr(mod, "COLUMNS")):
            continue  # a helper (timing, plot), not a family
        name = getattr(mod, "FAMILY", info.name)
        if name in found:
            raise RuntimeError(f"benchmark family {name!r} is defined by both {found[name]} and {path}")
        found[name] = path
    return found


def __getattr__(name):
    # FAMILIES is computed on first use (PEP 562) so that importing the package imports no family.
    if name == "FAMILIES":
        return discover_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_built(op: str, device) -> bool:
    """Whether this install has a compiled kernel of ``op`` (e.g. ``"masked_conv2d"``) for ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``): the rows that time a kernel are skipped
    where this is False. Read from :func:`fastar.info`."""
    from fastar import info

    kind = torch.device(device).type
    return op in info().get(f"{kind}_kernels", ())


def family_devices(mod) -> tuple[str, ...]:
    """The device types a family module measures (its ``DEVICES``; default cpu and cuda)."""
    return tuple(getattr(mod, "DEVICES", ("cpu", "cuda")))


def families_for(device_type: str) -> tuple[list[str], list[str]]:
    """(families that measure `device_type`, families that do not), in discovery order."""
    run, skip = [], []
    for name, path in discover_families().items():
        try:
            mod = importlib.import_module(path)
        except Exception:
            run.append(name)  # broken import: running it shows the real error
            continue
        (run if device_type in family_devices(mod) else skip).append(name)
    return run, skip


def machine() -> dict:
    """The machine a result was measured on: CPU model, cores, torch threads, GPU, torch/CUDA/Python."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform()}


def _git_rev() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows (dicts) as a markdown table over ``columns``; a missing value prints as ``-``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def save(family: str, device: str, rows: list[dict], columns: list[str], out_dir: str, notes: str = "") -> str:
    """Write ``<out_dir>/<family>-<device>.json`` and ``.md`` (machine, command, git revision, date, notes,
    table) atomically; returns the path without its extension."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"family": family, "device": device, "machine": machine(), "git": _git_rev(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    base = os.path.join(out_dir, f"{family}-{device}")
    for path, text in ((base + ".json", json.dumps({"meta": meta, "rows": rows}, indent=2)),
                       (base + ".md", f"# {family} on {device}\n\n"
                                      f"Machine: {meta['machine']}\n\nCommand: `{meta['command']}` "
                                      f"(git {meta['git']}, {meta['date']})\n\n"
                                      + (notes + "\n\n" if notes else "")
                                      + markdown_table(rows, columns) + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return base


def main(families=None, out_dir="benchmarks/results", quick=False, device=None, threads=None) -> int:
    """``python -m fastar bench``: run ``families`` (default: all) on ``device`` (default: the CPU, and
    CUDA when a GPU is visible), print each table and save it under ``out_dir``."""
    known = discover_families()
    families = list(families or known)
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(f"unknown benchmark family {unknown[0]!r}; choose from {', '.join(known)}")
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no GPU is visible to torch")
        devices = [device]
    if threads:
        torch.set_num_threads(threads)
    for fam in families:
        mod = importlib.import_module(known[fam])
        for dev in devices:
            if torch.device(dev).type not in family_devices(mod):
                print(f"\n## {fam} on {dev}: skipped (the family measures {', '.join(family_devices(mod))} only)",
                      flush=True)
                continue
            print(f"\n## {fam} on {dev} ({machine()['gpu'] if dev.startswith('cuda') else machine()['cpu']}, "
                  f"{torch.get_num_threads()} threads)", flush=True)
            rows = mod.run(dev, quick)
            print(markdown_table(rows, mod.COLUMNS), flush=True)
            path = save(fam, dev.split(":")[0] + ("-quick" if quick else ""), rows, mod.COLUMNS, out_dir,
                        getattr(mod, "NOTES", ""))
            print(f"saved {path}.json and .md", flush=True)
    return 0
