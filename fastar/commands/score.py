"""``fastar score CHECKPOINT INPUTS...``: each input's bits per dimension under a model (an anomaly score:
the higher, the less the input looks like the model's training data)."""
from __future__ import annotations

NAME = "score"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="bits/dim of each input under a model (anomaly score; --format json|csv)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or a shipped name")
    p.add_argument("inputs", metavar="INPUTS", nargs="+", help="PNG images, WAV clips or .npy arrays of codes")
    p.add_argument("--format", choices=["text", "json", "csv"], default="text")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="class-conditional models: score under this label (default: the uniform mixture over "
                        "the classes, a likelihood of the input alone)")
    p.add_argument("--quantize", action="store_true", help="round values the model cannot hold to its nearest level")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import csv
    import io
    import json

    import torch

    from fastar import codec
    from fastar.commands.codec_files import load_for_codec, read_inputs
    from fastar.sampling import progress_bar
    from fastar.train import check_device

    device = check_device(args.device)
    model, ckpt = load_for_codec(args.checkpoint, device)
    x, names = read_inputs(args.inputs, model, ckpt, quantize=args.quantize)
    cond = None
    if args.klass is not None:
        k = getattr(model, "num_classes", None)
        if not k:
            raise ValueError("--class needs a class-conditional model; this one is not")
        if not 0 <= args.klass < k:
            raise ValueError(f"--class must lie in [0, {k}), got {args.klass}")
        cond = torch.full((len(x),), args.klass, dtype=torch.int64)
    batch = 64
    bar = progress_bar(len(x), not args.no_progress and len(x) > batch, "scoring")
    out = []
    for a in range(0, len(x), batch):
        out.append(codec.score(model, x[a:a + batch], None if cond is None else cond[a:a + batch]))
        bar.update(min(batch, len(x) - a))
    bar.close()
    bpd = torch.cat(out).tolist()
    rows = [{"input": n, "bits_per_dim": b} for n, b in zip(names, bpd)]
    if args.format == "json":
        print(json.dumps({"checkpoint": args.checkpoint, "model": ckpt["model"], "scores": rows}, indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["input", "bits_per_dim"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        print(buf.getvalue(), end="")
    else:
        width = max(len(n) for n in names)
        for r in rows:
            print(f"{r['input']:<{width}}  {r['bits_per_dim']:.6f}")
    return 0
