"""The fastar command line: ``python -m fastar {info,bench} ...`` (also the ``fastar`` script)."""
from __future__ import annotations

import argparse
import json
import os
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
    import time

    from fastar import bench

    start = time.time()
    rc = bench.main(args.families, out_dir=args.out, quick=args.quick, device=args.device,
                    threads=args.threads)
    if rc == 0 and not getattr(args, "no_plot", False):
        _plot_new_results(args.out, start)
    return rc


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastar", description="fastar: fast autoregressive models for PyTorch")
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
    pb.add_argument("--no-plot", action="store_true", help="skip the speed-up plot (PNG beside the results)")
    pb.set_defaults(func=_cmd_bench)
    _add_door_commands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastar {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, OSError) as e:
        if os.environ.get("FASTAR_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fastar {args.command}: error: {msg}", file=sys.stderr)
        return 2


from fastar._cli_door import _add_door_commands, _plot_new_results  # noqa: E402


if __name__ == "__main__":
    raise SystemExit(main())
