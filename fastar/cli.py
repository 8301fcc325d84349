"""The fastar command line: ``python -m fastar {info,bench,demo,train,sample,compress,decompress,score} ...`` (also the ``fastar`` script).

The commands live in :mod:`fastar.commands`, one module each; this module only assembles the
parser and turns a user's mistake into one line on stderr with exit status 2
(``FASTAR_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from fastar.commands import COMMANDS

    p = _Parser(prog="fastar", description="fastar: fast autoregressive models for PyTorch")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
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


if __name__ == "__main__":
    raise SystemExit(main())
