"""``fastar compress CHECKPOINT INPUTS... -o FILE``: code inputs losslessly with a model's exact conditionals."""
from __future__ import annotations

from fastar.commands.common import positive_int

NAME = "compress"


def add_parser(sub) -> None:
    from fastar.registry import shipped_checkpoints

    shipped = ", ".join(shipped_checkpoints()) or "none in this build"
    p = sub.add_parser(NAME, help="compress PNG / WAV / .npy inputs losslessly with a model (one file)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=f"a checkpoint file or a shipped name ({shipped})")
    p.add_argument("inputs", metavar="INPUTS", nargs="+", help="PNG images, WAV clips (audio models) or .npy "
                                                               "arrays of codes, all of one shape")
    p.add_argument("-o", "--out", required=True, help="the compressed file to write")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="class-conditional models: the label of every input (default: each input's most likely "
                        "label, stored in the file)")
    p.add_argument("--quantize", action="store_true", help="round values the model cannot hold to its nearest level "
                                                           "(lossy on such inputs) instead of refusing them")
    p.add_argument("--chunk", type=positive_int, default=None, help="examples per step batch (default: by memory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s); decode on the same")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from fastar import codec
    from fastar.commands.codec_files import load_for_codec, read_inputs, write_bytes
    from fastar.train import check_device

    device = check_device(args.device)
    model, ckpt = load_for_codec(args.checkpoint, device)
    x, names = read_inputs(args.inputs, model, ckpt, quantize=args.quantize)
    k = getattr(model, "num_classes", None)
    if args.klass is not None:
        if not k:
            raise ValueError("--class needs a class-conditional model; this one is not")
        if not 0 <= args.klass < k:
            raise ValueError(f"--class must lie in [0, {k}), got {args.klass}")
        cond = torch.full((len(x),), args.klass, dtype=torch.int64)
    else:
        cond = codec.best_labels(model, x) if k else None
    data = codec.encode(model, x, cond, chunk=args.chunk, progress=not args.no_progress)
    write_bytes(args.out, data)
    bound = codec.nll_bits(model, x, cond) / 8
    dims = x[0].numel()
    print(f"{len(x)} input(s) of shape {list(x.shape[1:])} -> {args.out}: {len(data)} bytes "
          f"({len(data) / len(x):.1f} per input, {8 * len(data) / (len(x) * dims):.4f} bits/dim; the model's "
          f"bound {bound:.1f} bytes{' with the labels' if cond is not None else ''})")
    return 0
