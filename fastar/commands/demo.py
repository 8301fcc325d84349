"""``fastar demo``: a shipped checkpoint (or a quick training run) sampled by the cached and the naive
sampler; prints the held-out NLL (nats and bits/dim) and the speed-up, and writes what the model
draws: for an image model a grid of ten rows (row k: class k for a class-conditional model), the
classifier agreement of those samples (:mod:`fastar.quality`) and a second picture of completions of
held-out digits; for an audio model the cached clips.

Which model, which checkpoint and how to train one all come from the model's spec: the default
model is the first registered image model that ships a checkpoint; ``spec.shipped[0]`` is its
checkpoint; ``spec.demo`` holds the training arguments used when none is shipped (or --train).
"""
from __future__ import annotations

import os
import time

import torch

from fastar.commands.common import model_names, positive_int, resolve_checkpoint, seed_int, seeded, set_threads, timed

NAME = "demo"


def add_parser(sub) -> None:
    from fastar import registry

    default = registry.spec(registry.default_model())
    shipped = f"the shipped {default.shipped[0]} checkpoint" if default.shipped else f"a {default.name}"
    p = sub.add_parser(NAME, help=f"sample {shipped} (or train one) with the cached and the naive sampler; writes "
                                  "samples.png, prints bits/dim and the speed-up")
    p.add_argument("--model", default=None, help=f"{model_names()} (default: {default.name}, or the "
                                                 "--checkpoint's model)")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint instead of the shipped one")
    p.add_argument("--train", action="store_true", help="train a fresh model even when one is shipped")
    p.add_argument("--epochs", type=positive_int, default=3, help="epochs when the demo trains (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="train on only the first N examples")
    p.add_argument("--workdir", default="fastar-demo", help="where a demo training run goes (default: %(default)s)")
    p.add_argument("-n", type=positive_int, default=None,
                   help="images (or clips) each of the cached and the naive sampler draws for the speed-up "
                        "(default: 2 images, 20 clips: the naive sampler runs the whole network per value)")
    p.add_argument("--per-class", type=positive_int, default=10,
                   help="image models: cached samples per row of the picture (ten rows; default: %(default)s)")
    p.add_argument("--length", type=positive_int, default=None, help="audio models: samples per clip (default: 1/4 s)")
    p.add_argument("--out", default="samples.png",
                   help="image grid (default: %(default)s; .wav for audio models); image models also write "
                        "<out>_completions.png")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def demo_checkpoint(args, spec) -> str:
    """The checkpoint the demo uses: --checkpoint, else the spec's shipped one, else a quick training run."""
    from fastar.checkpoints import shipped_path
    from fastar.train import train

    if args.checkpoint:
        return resolve_checkpoint(args.checkpoint)
    p = shipped_path(spec.shipped[0]) if spec.shipped else None
    if p and not args.train:
        print(f"using the shipped checkpoint {p}")
        return p
    kw = dict(spec.demo)
    data = kw.pop("data", spec.datasets[0])
    out = os.path.join(args.workdir, f"{spec.name}_{data}")
    why = "skipped" if p else ("missing" if spec.shipped else "not shipped")
    print(f"training {spec.name} on {data} into {out} (the shipped checkpoint is {why})")
    train(spec.name, data, out=out, device=args.device, resume=True, progress=not args.no_progress,
          **dict(kw, epochs=args.epochs, limit=args.limit))
    return os.path.join(out, "last.pt")


def held_out(model, ckpt):
    """Print the held-out NLL; returns the data set (None when missing: the samplers need no data,
    so missing data is said and skipped)."""
    from fastar import registry
    from fastar.quality import held_out_nll

    info = ckpt["data"]
    try:
        ds = registry.load_like(info)
    except FileNotFoundError as e:
        saved = ckpt["evals"][-1]["test_bpd"] if ckpt.get("evals") else None
        print(f"held-out data unavailable ({e}); bits/dim recorded at training time: "
              + (f"{saved:.4f}" if saved is not None else "none"))
        return None
    t = time.perf_counter()
    r = held_out_nll(model, ds, registry.is_conditional(ckpt["model"], ckpt["config"], info))
    per, dim = (f"{r['dims']}-sample segment", "sample") if info["kind"] == "audio" else ("image", "dim")
    print(f"{ckpt['model']} on {info['name']} held-out ({len(ds.test)} examples): {r['nll_nats']:.2f} nats per "
          f"{per} = {r['bits_per_dim']:.4f} bits/{dim} ({time.perf_counter() - t:.1f} s)")
    return ds


def run(args) -> int:
    from fastar import checkpoint, registry
    from fastar.commands.writers import draw, writer_of
    from fastar.train import check_device

    device = check_device(args.device)
    set_threads(args.threads)
    if args.model is None and args.checkpoint:
        spec = registry.spec(checkpoint.load_checkpoint(resolve_checkpoint(args.checkpoint))["model"])
    else:
        spec = registry.spec(args.model if args.model is not None else registry.default_model())
    path = demo_checkpoint(args, spec)
    model, ckpt = checkpoint.load_model(path, device=device, expect_model=spec.name)
    ds = held_out(model, ckpt)

    w = writer_of(ckpt["model"])
    n = args.n or w.demo_n
    draws = {}
    width = max(len(w.cached_label), len(w.naive_label)) + 1
    for method, label in (("cached", w.cached_label), ("naive", w.naive_label)):
        x, dt = timed(lambda: draw(model, ckpt, n, method, seeded(args.seed, device), length=args.length,
                                   demo=True, progress=not args.no_progress), device)
        draws[method] = (x, dt)
        print(f"{label + ':':<{width}} {w.describe(x)} in {dt:.2f} s")
    (fast, t_fast), (slow, t_slow) = draws["cached"], draws["naive"]
    same = (fast == slow).float().mean().item()
    print(f"speed-up of the {w.speedup_label}: {t_slow / t_fast:.1f}x ({device}, batch {n}, "
          f"{torch.get_num_threads()} threads); the two samplers agree on {100 * same:.2f}% of {w.unit}")
    out = args.out if args.out.lower().endswith(w.ext) else os.path.splitext(args.out)[0] + w.ext
    for line in w.demo_write(model, ckpt, fast, out, ds, per_class=args.per_class, seed=args.seed,
                             progress=not args.no_progress):
        print(line)
    return 0
