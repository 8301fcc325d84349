"""Time the cached sampler of every family in two checkouts of fastar, side by side in one run.

    python benchmarks/compare_checkouts.py OLD_DIR NEW_DIR [--rounds 7] [--threads 1] [--out PREFIX]

Each checkout must have its ``fastar/_C*.so`` built. Every case runs in a fresh interpreter per
round (``PYTHONPATH=DIR``), the two checkouts alternating and the order flipping every round, so the
machine's drift reaches both alike; the medians are kept. Only public API is used (``model.sample``),
so any two versions with the same ``sample`` signature compare. Writes PREFIX.json and PREFIX.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    # name: (constructor expression, sample arguments, batch); untrained weights, fixed seeds
    "gated_pixelcnn 5x32 binary 28x28 b4 (fused step)":
        ("GatedPixelCNN(1, 2, layers=5, channels=32)", "4, (28, 28)"),
    "gated_pixelcnn 5x32 binary 28x28 b4 (per-op, fused=False)":
        ("GatedPixelCNN(1, 2, layers=5, channels=32)", "4, (28, 28), fused=False"),
    "pixelcnn 4x32 binary 16x16 b4 (per-op)":
        ("PixelCNN(1, 2, layers=4, channels=32)", "4, (16, 16)"),
    "pixelrnn diagonal 3x16 binary 16x16 b4":
        ("PixelRNN('diagonal', 1, 2, layers=3, hidden=16)", "4, (16, 16)"),
    "pixelrnn row 3x16 binary 16x16 b4":
        ("PixelRNN('row', 1, 2, layers=3, hidden=16)", "4, (16, 16)"),
    "fvsbn 28x28 b16":
        ("FVSBN(1, 28, 28)", "16, (28, 28)"),
    "wavenet 10x32 softmax 2048 samples b1 (fused)":
        ("WaveNet(layers=10, stacks=1, residual_channels=32, dilation_channels=32, skip_channels=64)",
         "1, (2048,)"),
    "wavenet 10x32 softmax 512 samples b1 (per-op, fused=False)":
        ("WaveNet(layers=10, stacks=1, residual_channels=32, dilation_channels=32, skip_channels=64)",
         "1, (512,), fused=False"),
}

CHILD = r"""
import time, torch
torch.set_num_threads({threads})
from fastar.models import *
torch.manual_seed(0)
m = {ctor}.eval()
g = lambda: torch.Generator().manual_seed(1)
m.sample({args}, generator=g(), progress=False)          # warm-up: allocation, packing, first-call costs
t = time.perf_counter()
m.sample({args}, generator=g(), progress=False)
print(time.perf_counter() - t)
"""


def run_case(root, ctor, args, threads):
    # torch's thread count as a user sets it; each checkout's own default thread policy decides the rest
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(threads))
    env.pop("FASTAR_CPU_THREADS", None)
    code = CHILD.format(threads=threads, ctor=ctor, args=args)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if r.returncode:
        raise RuntimeError(f"{root}: {ctor}: {r.stderr[-800:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    roots = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    rows = []
    for name, (ctor, args) in CASES.items():
        times = {"old": [], "new": []}
        for r in range(a.rounds):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                times[which].append(run_case(roots[which], ctor, args, a.threads))
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append(dict(case=name, old_s=old, new_s=new, new_vs_old=new / old,
                         old_all=times["old"], new_all=times["new"]))
        print(f"{name:60s} old {old:8.4f} s  new {new:8.4f} s  new/old {new / old:5.2f}", flush=True)
    if a.out:
        import platform

        def commit(root):
            r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
            return r.stdout.strip() or None

        meta = dict(command=" ".join([sys.executable, *sys.argv]), date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=a.threads,
                    rounds=a.rounds, old=roots["old"], new=roots["new"], old_commit=commit(roots["old"]),
                    new_commit=commit(roots["new"]))
        with open(a.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(f"# cached sampling, two checkouts side by side\n\n{json.dumps(meta)}\n\n"
                    "Seconds per sample() call (after one warm-up call in the same process), median of "
                    f"{a.rounds} fresh processes per checkout, alternating. new_vs_old < 1: the new checkout is "
                    "faster.\n\n| case | old_s | new_s | new_vs_old |\n|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['case']} | {r['old_s']:.4f} | {r['new_s']:.4f} | {r['new_vs_old']:.2f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
