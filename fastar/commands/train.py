"""``fastar train MODEL --data SET``: train a model on a bundled real data set, with checkpoints (torchrun-ready)."""
from __future__ import annotations

from fastar.commands.common import (data_names, model_names, parse_model_args, positive_int, seed_int,
                                    set_threads)

NAME = "train"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="train a model on a bundled real data set, with checkpoints (torchrun-ready)")
    p.add_argument("model", metavar="MODEL", help=model_names())
    p.add_argument("--data", required=True, help=data_names())
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="examples per process per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True, help="folder for last.pt and train.log")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (the last complete epoch)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--levels", type=int, default=None,
                   help="grey levels, 2 .. 256 (default: 2 for mnist/digits, 256 patches)")
    p.add_argument("--conditional", action="store_true", help="condition on the class labels (mnist, digits)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model constructor argument, e.g. --model-arg layers=5 (repeatable)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N training examples")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on only the first N held-out examples")
    p.add_argument("--segment", type=positive_int, default=4096, help="audio data: samples per training segment")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastar import registry
    from fastar.data.sets import DATASETS
    from fastar.train import train

    name = registry.canonical_model(args.model)  # unknown model: one line before any data is read
    if args.data not in DATASETS:
        raise ValueError(f"unknown data set {args.data!r}; choose from {', '.join(DATASETS)}")
    registry.check_compatible(name, dict(name=args.data, kind=DATASETS[args.data].kind))
    set_threads(args.threads)
    train(name, args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, out=args.out,
          resume=args.resume, device=args.device, amp=args.amp, seed=args.seed,
          config=parse_model_args(args.model_arg), levels=args.levels, conditional=args.conditional,
          limit=args.limit, eval_limit=args.eval_limit, segment=args.segment, progress=not args.no_progress)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: leave the group cleanly
        dist.destroy_process_group()
    return 0
