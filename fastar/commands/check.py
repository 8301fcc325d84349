"""``fastar check``: every compiled op against its reference, a tiny model of every family cached vs
naive, and on CUDA a captured decode step (:mod:`fastar.selfcheck`); exit status 1 on any failure."""
from __future__ import annotations

import json
import sys

NAME = "check"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="prove this build on this machine: kernels vs references, models cached vs naive")
    p.add_argument("--device", default="all",
                   help="cpu, cuda, cuda:N or all (default: the CPU and every GPU present)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastar.selfcheck import REPORT_HINT, check

    report = check(args.device)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
        if report.uncovered:
            print(f"\nnot checked (no check case yet): {', '.join(report.uncovered)}")
        n = len(report.rows)
        print(f"\n{n - len(report.failures)} of {n} checks passed in {report.seconds:.1f} s")
    if not report.ok:
        bad = ", ".join(sorted({f"{r.name} ({r.device}, {r.dtype})" for r in report.failures}))
        print(f"fastar check: FAILED: {bad}. {REPORT_HINT}", file=sys.stderr)
        return 1
    return 0
