"""Codec decode of speech against cached sampling of the same clip, the shipped WaveNet, CPU.

One repetition (``--once``, in the tree on sys.path / the working directory): encode one clip of
held-out speech (not timed), then time, in this order, ``codec.decode`` of it (the codec pins one
thread), ``model.sample(1, (T,))`` on one pinned thread (the decoder's count) and ``model.sample``
at the default thread policy; prints one JSON line. The driver (default) runs ``--reps``
repetitions of every tree given with ``--tree LABEL=PATH``, interleaved (tree A, tree B, tree A,
...), each in a fresh process, and writes the medians as markdown + JSON:

    python benchmarks/bench_codec_speech.py --tree before=/path/to/old/checkout --tree after=. \\
        --reps 3 --out benchmarks/results/codec-speech-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def once(T: int) -> dict:
    import torch

    from fastar import checkpoint, codec
    from fastar.checkpoints import shipped_path
    from fastar.data.sets import load_dataset
    from fastar.threads import pinned

    model = checkpoint.load_model(shipped_path("wavenet_speech"))[0].eval()
    x = load_dataset("speech").test.reshape(-1)[:T].unsqueeze(0)
    t0 = time.perf_counter()
    data = codec.encode(model, x)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = codec.decode(model, data)
    t_dec = time.perf_counter() - t0
    assert torch.equal(y, x), "round trip failed"

    def sample():
        t0 = time.perf_counter()
        model.sample(1, (T,), generator=torch.Generator().manual_seed(0), progress=False)
        return time.perf_counter() - t0

    with pinned(1):
        t_s1 = sample()
    t_sd = sample()     # the default policy's first call in this process: it times one thread and all
    t_sd2 = sample()    # its second call: the choice it made
    return dict(encode_s=t_enc, decode_s=t_dec, sample_1thread_s=t_s1, sample_default_s=t_sd,
                sample_default_2nd_s=t_sd2, bytes=len(data), torch_threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--once", action="store_true", help="one repetition in this process; print JSON")
    ap.add_argument("--steps", type=int, default=16000, help="samples of speech (16000 = 1 s)")
    ap.add_argument("--tree", action="append", default=[], help="LABEL=PATH of a checkout to time (repeatable)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--machine", default="2-core shared Xeon (AVX-512), CPU only")
    a = ap.parse_args()
    if a.once:
        print(json.dumps(once(a.steps)))
        return
    trees = [t.split("=", 1) for t in (a.tree or ["this=."])]
    runs = {label: [] for label, _ in trees}
    me = os.path.abspath(__file__)
    for r in range(a.reps):
        for label, path in trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            out = subprocess.run([sys.executable, me, "--once", "--steps", str(a.steps)], cwd=path, env=env,
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[label].append(row)
            print(label, r, row, flush=True)
    summary = {}
    for label, rows in runs.items():
        med = {k: statistics.median(row[k] for row in rows) for k in ("encode_s", "decode_s", "sample_1thread_s",
                                                                       "sample_default_s", "sample_default_2nd_s")}
        med["decode_over_sample_1thread"] = med["decode_s"] / med["sample_1thread_s"]
        med["decode_over_sample_default"] = med["decode_s"] / med["sample_default_2nd_s"]
        med["bytes"] = rows[0]["bytes"]
        summary[label] = med
    if a.out:
        info = dict(machine=a.machine, python=platform.python_version(), steps=a.steps, reps=a.reps,
                    trees=dict(trees), runs=runs, medians=summary)
        with open(a.out + ".json", "w") as f:
            json.dump(info, f, indent=1)
        lines = [f"# Codec decode of speech vs cached sampling ({a.steps} samples, batch 1, shipped wavenet_speech)",
                 "", f"Machine: {a.machine}. Median of {a.reps} repetitions, the trees interleaved, each "
                 "repetition a fresh process. Encode and decode pin one thread (the codec's); sampling is timed on one "
                 "pinned thread, then twice at the default thread policy (its first call in a process times one "
                 "thread and all; the second runs its choice; the ratio uses the second).", "",
                 "| tree | encode s | decode s | sample s (1 thread) | sample s (default, 1st / 2nd call) | "
                 "decode / sample (1 thread) | decode / sample (default, 2nd) | file bytes |",
                 "|---|---|---|---|---|---|---|---|"]
        for label, m in summary.items():
            lines.append(f"| {label} | {m['encode_s']:.3f} | {m['decode_s']:.3f} | {m['sample_1thread_s']:.3f} | "
                         f"{m['sample_default_s']:.3f} / {m['sample_default_2nd_s']:.3f} | "
                         f"{m['decode_over_sample_1thread']:.2f}x | {m['decode_over_sample_default']:.2f}x | "
                         f"{m['bytes']:,} |")
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
