"""``fastar info``: what is built (compiled ops per device, CUDA archs, versions)."""
from __future__ import annotations

import json

NAME = "info"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="what is built: compiled ops per device, CUDA archs, versions")
    p.add_argument("--json", action="store_true", help="print the info() dict as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
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
    print("\nTo prove this build on this machine (every kernel against its reference, every model family "
          "cached vs naive, CUDA graphs on a GPU): fastar check")
    return 0
