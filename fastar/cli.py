"""The fastar command line: ``python -m fastar {info,bench} ...`` (also the ``fastar`` script)."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from fastar import info

    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(len(k) for k in d)
    for k, v in d.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v)) if v else "-"
        print(f"{k:<{width}}  {v}")
    return 0


def _cmd_bench(args) -> int:
    from fastar import bench

    return bench.main(args.families, out_dir=args.out, quick=args.quick, device=args.device,
                      threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastar", description="fastar: fast autoregressive models for PyTorch")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="what is built: compiled ops per device, CUDA archs, versions")
    pi.add_argument("--json", action="store_true", help="print the info() dict as JSON")
    pi.set_defaults(func=_cmd_info)

    from fastar.bench import FAMILIES

    pb = sub.add_parser("bench", help="benchmark kernels against their references; saves JSON + markdown")
    pb.add_argument("families", nargs="*", metavar="FAMILY",
                    help=f"op families to run (default: all): {', '.join(FAMILIES)}")
    pb.add_argument("--out", default="benchmarks/results", help="folder for the results (default: %(default)s)")
    pb.add_argument("--device", default=None, help="cpu or cuda (default: every device available)")
    pb.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    pb.add_argument("--quick", action="store_true", help="fewer repeats and cases, for a smoke run")
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fastar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
