"""``fastar sample CHECKPOINT --out FILE``: load a saved model and write what it draws (PNG grid or WAV)."""
from __future__ import annotations

import os

from fastar.commands.common import nonneg_float, positive_int, resolve_checkpoint, seed_int, seeded, set_threads, timed

NAME = "sample"


def add_parser(sub) -> None:
    from fastar.registry import shipped_checkpoints

    shipped = ", ".join(shipped_checkpoints()) or "none in this build"
    p = sub.add_parser(NAME, help="load a saved model and write an image grid (.png) or audio (.wav)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, a training --out folder, or a "
                                                            f"shipped name ({shipped})")
    p.add_argument("-n", type=positive_int, default=64, help="images or clips (default: %(default)s)")
    p.add_argument("--method", default="cached", choices=["cached", "naive"])
    p.add_argument("--out", required=True, help="FILE.png (image models) or FILE.wav (audio models)")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="class label for every image (conditional models; default: the batch cycles 0 .. K-1)")
    p.add_argument("--temperature", type=nonneg_float, default=1.0)
    p.add_argument("--prefix", default=None, help="an image of the model's size: its top half is kept, the rest "
                                                  "drawn")
    p.add_argument("--length", type=positive_int, default=None, help="audio models: samples per clip (default: 1 s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastar import checkpoint, registry
    from fastar.commands.writers import draw, writer_of
    from fastar.train import check_device

    if args.n < 1:
        raise ValueError(f"-n must be a positive integer, got {args.n}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    device = check_device(args.device)
    set_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    ckpt = checkpoint.load_checkpoint(path)
    name, w = ckpt["model"], writer_of(ckpt["model"])
    exts = getattr(w, "exts", (w.ext,))
    if os.path.splitext(args.out)[1].lower() not in exts:
        raise ValueError(f"{path} holds an {registry.model_kind(name)} model ({name}); --out must end in "
                         f"{' or '.join(exts)}, got {args.out}")
    model, ckpt = checkpoint.load_model(ckpt, device=device)
    gen = seeded(args.seed, device)
    x, dt = timed(lambda: draw(model, ckpt, args.n, args.method, gen, temperature=args.temperature,
                               klass=args.klass, prefix=args.prefix, length=args.length,
                               progress=not args.no_progress), device)
    w.write(x, args.out, ckpt["data"])
    print(f"{w.describe(x)} from {name} ({args.method} sampler, {device}) in {dt:.2f} s -> {args.out}")
    return 0
