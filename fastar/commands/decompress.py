"""``fastar decompress FILE -o DIR``: the exact inputs of a ``fastar compress`` file, one file each."""
from __future__ import annotations

NAME = "decompress"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="decode a `fastar compress` file into DIR (one PNG / WAV / .npy per input)")
    p.add_argument("file", metavar="FILE", help="a file written by `fastar compress`")
    p.add_argument("-o", "--out", required=True, help="the folder to write into (created if missing)")
    p.add_argument("--checkpoint", default=None, help="the checkpoint the file was written with (default: the "
                                                      "shipped checkpoint that matches it)")
    p.add_argument("--format", choices=["png", "wav", "npy"], default=None,
                   help="output files (default: PNG for image models, WAV for audio models)")
    p.add_argument("--device", default="cpu", help="the device it was compressed on (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastar import codec
    from fastar.commands.codec_files import find_model_for, read_bytes, write_outputs
    from fastar.train import check_device

    device = check_device(args.device)
    data = read_bytes(args.file)
    codec.header(data)                  # a foreign or truncated file fails here, before any model loads
    model, ckpt, name = find_model_for(data, args.checkpoint, device)
    x, cond = codec.decode(model, data, with_cond=True, progress=not args.no_progress)
    paths = write_outputs(x, ckpt, args.out, args.format)
    labels = f"; labels {cond.tolist() if len(cond) <= 20 else '...'}" if cond is not None and \
        hasattr(cond, "tolist") else ""
    print(f"{len(paths)} input(s) of shape {list(x.shape[1:])} decoded with {name} -> {args.out}{labels}")
    return 0
